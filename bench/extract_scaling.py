"""Extraction scaling benchmark (issue 4): teacher-frames/s of the Dask extraction job with 1 and 2 workers.

    .venv/bin/python bench/extract_scaling.py                       # defaults: ~6 min on 2 idle CPU cores
    .venv/bin/python bench/extract_scaling.py --variants shipped,dask-defaults --json /tmp/x.json   # ~9 min

What runs: a synthetic espeak-ng corpus (distill.synth.corpus.make_corpus), a randomly initialised native teacher of
realistic-but-small size (d_model 256, 6 layers, ffn 1024; embeddings of its last layer) and an MVQ quantizer
(16 x 256 codebooks, production encode settings: beam 8 + 1 ICM sweep) trained on its frames with a short
training schedule (training settings do not change encode cost). Per worker count, the job's own code path:
distill.extract.job.prepare (plan + create store), a LocalCluster of N single-threaded worker processes, and one
distill.extract.job.run_shard task per CI shard (shards sized so every worker gets several tasks).

Definitions (all printed):
  steady frames/s      frames / (last task end - first task start); the cluster is started and every worker has
                       loaded teacher + quantizer (distill.extract.job._models, the per-process cache) before the clock
                       starts, so start-up is excluded here and reported separately.
  scaling              steady frames/s with 2 workers / with 1 worker (goal >= 1.8).
  outside-teacher      1 - sum(teacher forward seconds) / sum(task seconds), over all tasks (goal < 10%):
   (steady)            the share of the workers' busy time spent on anything but the teacher forward (audio
                       decode + resampling, store opening, quantizer encode, finite checks, shard writing).
  outside-teacher      1 - sum(teacher forward seconds) / (workers x end-to-end wall), end-to-end = planning +
   (end-to-end)        cluster start + model loading + tasks + cluster shutdown: idle worker time counts too.
  cpu/wall             task-thread CPU seconds / task wall seconds: below 1 means the worker was waiting (I/O, or
                       other processes on a shared machine taking the cores).
  sys/cpu, faults/fr   kernel share of the task threads' CPU time and minor page faults per frame (getrusage).
Variants (--variants; each a LocalCluster as distill.extract.cluster.embedded_cluster makes it):
  shipped        the job as shipped: Dask's profiler off and slow monitoring ticks
                 (distill.extract.cluster.LEAN_DASK_CONFIG), workers undo Dask's MALLOC_TRIM_THRESHOLD_=65536 with
                 mallopt at model load.
  dask-defaults  Dask's own profiler (10 ms stack sampling) and 20 ms ticks: what `extract --dask-profile` runs.
  glibc          shipped, with MALLOC_TRIM_THRESHOLD_ removed before the workers start (glibc's dynamic thresholds).
History: the variable freezes glibc's mmap threshold, so every large temporary of the quantizer search became a
fresh mmap + page faults + munmap, measured 2.7x slower extraction (sys/cpu and faults/frame in the table show
it) before the workers undid it.
Machine ceiling (--ceiling, on by default): a one-thread GEMM loop alone vs two at once, no Dask: the most two
workers can scale on this machine (two vCPUs that share a core or a memory bus give well below 2).
Repeats (--repeats): worker counts alternate within each repeat (1, 2, 1, 2, ...), so a drift of the machine's
speed hits both; the scaling is given as the median over repeats of the ratio within a repeat (with its range)
and as the ratio of the median rates.
Then an in-process profile (cProfile) of one real run_shard call splits a task's time into stages, and a table of
quantizer encode speed for other beam/ICM settings shows the cost/quality knob.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import filecmp
import json
import math
import os
import pstats
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cached_corpus, load_line, machine_state, table, write_json  # noqa: E402

import numpy as np  # noqa: E402


# ------------------------------------------------------------------------------------------- worker-side functions
def _warm(cfg) -> dict:
    """Load teacher + quantizer into the worker's per-process cache (what the first task would otherwise do)."""
    from distill.extract.job import _models

    _models(cfg)
    return {"pid": os.getpid(), "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_", "unset")}


def _worker_timers(dask_worker) -> dict:
    return {k: pc.callback_time for k, pc in dask_worker.periodic_callbacks.items() if k in ("tick", "profile")}


def _timed_shard(cfg, shard, utts, nested) -> dict:
    """run_shard plus wall-clock start/end (comparable across processes) and the task thread's CPU time."""
    import resource

    from distill.extract import run_shard

    ru0 = resource.getrusage(resource.RUSAGE_THREAD)
    t0, c0 = time.time(), time.thread_time()
    r = run_shard(cfg, shard, utts, nested)
    ru1 = resource.getrusage(resource.RUSAGE_THREAD)
    return {"shard": shard, "frames": r.frames, "utterances": r.utterances, "failures": len(r.failures),
            "teacher_s": r.seconds_teacher, "run_shard_s": r.seconds_total, "start": t0, "end": time.time(),
            "cpu_s": time.thread_time() - c0, "sys_s": ru1.ru_stime - ru0.ru_stime,
            "minor_faults": ru1.ru_minflt - ru0.ru_minflt, "pid": os.getpid()}


# ------------------------------------------------------------------------------------------- setup
def build_models(workdir: str, manifest: str, args) -> tuple[str, str, dict]:
    """Teacher checkpoint + quantizer for this configuration, cached in workdir."""
    import torch

    from distill.extract import sample_frames
    from distill.codec.quantizer import MultiCodebookQuantizer
    from distill.teachers import NativeTeacherConfig, NativeTeacherModel, save_native_teacher

    tag = f"d{args.d_model}-L{args.layers}-h{args.heads}-f{args.ffn}-s{args.seed}"
    teacher = os.path.join(workdir, f"teacher-{tag}.safetensors")
    qpath = os.path.join(workdir, f"mvq-{tag}-layer{args.layer}-N{args.codebooks}-m{args.minutes:g}.safetensors")
    times = {"teacher_s": 0.0, "sample_frames_s": 0.0, "quantizer_train_s": 0.0}
    torch.set_num_threads(args.setup_threads)
    if not os.path.exists(teacher):
        t = time.perf_counter()
        torch.manual_seed(args.seed)
        cfg = NativeTeacherConfig(d_model=args.d_model, num_heads=args.heads, ffn_dim=args.ffn,
                                  num_layers=args.layers)
        save_native_teacher(NativeTeacherModel(cfg), teacher)
        times["teacher_s"] = time.perf_counter() - t
    if not os.path.exists(qpath):
        t = time.perf_counter()
        frames = sample_frames(manifest, teacher, args.layer, num_utterances=400, max_frames=args.train_frames,
                               seed=args.seed, progress=False)
        times["sample_frames_s"] = time.perf_counter() - t
        t = time.perf_counter()
        q = MultiCodebookQuantizer.train(frames, num_codebooks=args.codebooks, seed=args.seed, progress=False,
                                         kmeans_iters=4, lsq_iters=1, train_beam_size=2,
                                         max_train_frames=args.train_frames)
        q.save(qpath)
        times["quantizer_train_s"] = time.perf_counter() - t
    return teacher, qpath, times


CEILING_PROBE = """
import sys, time, torch
torch.set_num_threads(1)
a, b = torch.randn(512, 512), torch.randn(512, 512)
t0, n = time.perf_counter(), 0
while time.perf_counter() - t0 < float(sys.argv[1]):
    a @ b
    n += 1
print(n / (time.perf_counter() - t0))
"""


def machine_ceiling(seconds: float = 4.0, repeats: int = 3) -> dict:
    """What this machine gives two processes: a one-thread GEMM loop alone vs two at once (no Dask, no I/O).
    The job's scaling cannot beat this; on a VM whose two vCPUs share a core or a memory bus it is well below 2."""
    import subprocess

    def run(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", CEILING_PROBE, str(seconds)], stdout=subprocess.PIPE,
                                  text=True) for _ in range(n)]
        return sum(float(p.communicate()[0]) for p in procs)

    ratios = []
    for _ in range(repeats):
        one = run(1)
        ratios.append(run(2) / one)
    return {"gemm_2_over_1": _median(ratios), "per_repeat": sorted(ratios), "seconds_per_probe": seconds}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def pick_shard_frames(counts: list[int], workers: int, tasks_per_worker: int) -> int:
    """Shard size giving about workers x tasks_per_worker tasks (never smaller than the longest utterance), rounded
    up to a multiple of 128 frames so the store finds an inner chunk size that tiles it."""
    total = sum(max(1, n) for n in counts)
    return 128 * math.ceil(max(max(counts), math.ceil(total / (workers * tasks_per_worker))) / 128)


# ------------------------------------------------------------------------------------------- one measured run
VARIANTS = {
    "shipped": "the job as shipped: LEAN_DASK_CONFIG (Dask profiler off, 1 s ticks), workers undo Dask's "
               "MALLOC_TRIM_THRESHOLD_=65536 with mallopt at model load",
    "dask-defaults": "Dask's statistical profiler (10 ms) and 20 ms ticks kept (extract --dask-profile)",
    "glibc": "shipped, with MALLOC_TRIM_THRESHOLD_ removed from the nanny's pre-spawn-environ (glibc's default, "
             "dynamic mmap/trim thresholds, as in a plain Python process)",
}


MALLOC_KEY = "MALLOC_TRIM_THRESHOLD_"
MALLOC_AT_START = os.environ.get(MALLOC_KEY)  # glibc reads it once, at process start


def _start_cluster(workers: int, variant: str):
    """The job's embedded cluster (distill.extract.cluster.embedded_cluster) in the given variant.

    For 'glibc' the nanny copies pre-spawn-environ into *this* process's os.environ before spawning (so every
    later cluster inherits it even with the config changed); the variable is therefore also removed from
    os.environ for the spawn, and os.environ is restored afterwards so runs do not depend on their order."""
    import dask

    from distill.extract import embedded_cluster

    before = os.environ.get(MALLOC_KEY)
    over = {}
    if variant == "glibc":
        os.environ.pop(MALLOC_KEY, None)
        over = {f"distributed.nanny.pre-spawn-environ.{MALLOC_KEY}": None}
    try:
        with dask.config.set(over):
            return embedded_cluster(workers, profile=variant == "dask-defaults", dashboard=False)
    finally:
        if before is None:
            os.environ.pop(MALLOC_KEY, None)
        else:
            os.environ[MALLOC_KEY] = before


def run_once(manifest: str, cfg, workers: int, shard_frames: int, variant: str = "shipped") -> dict:
    from dask.distributed import Client, as_completed

    from distill.extract import prepare

    if os.path.exists(cfg.out):
        shutil.rmtree(cfg.out)
    t0 = time.perf_counter()
    plan, tasks = prepare(manifest, cfg, shard_frames=shard_frames)
    t_plan = time.perf_counter()
    cluster = _start_cluster(workers, variant)
    client = Client(cluster)
    client.wait_for_workers(workers)
    t_cluster = time.perf_counter()
    warm = client.run(_warm, cfg)
    timers = client.run(_worker_timers)
    t_warm = time.perf_counter()
    results = []
    try:
        futs = [client.submit(_timed_shard, cfg, i, utts, nested, key=f"bench-shard-{i}-{workers}", pure=False)
                for i, utts, nested in tasks]
        for fut in as_completed(futs):
            results.append(fut.result())
        t_tasks = time.perf_counter()
    finally:
        client.close()
        cluster.close()
    t_close = time.perf_counter()

    frames = sum(r["frames"] for r in results)
    window = max(r["end"] for r in results) - min(r["start"] for r in results)
    busy = sum(r["end"] - r["start"] for r in results)
    teacher = sum(r["teacher_s"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    sys_s = sum(r["sys_s"] for r in results)
    e2e = t_close - t0
    per_worker = {}
    for r in results:
        per_worker.setdefault(r["pid"], []).append(r["shard"])
    return {
        "workers": workers, "variant": variant, "shards": len(tasks), "frames": frames,
        "failures": sum(r["failures"] for r in results),
        "tasks_per_worker": sorted(len(v) for v in per_worker.values()),
        "worker_env": sorted({str(v["MALLOC_TRIM_THRESHOLD_"]) for v in warm.values()}),
        "worker_timers_ms": sorted({json.dumps(v, sort_keys=True) for v in timers.values()}),
        "seconds": {"plan": t_plan - t0, "cluster_start": t_cluster - t_plan, "model_load": t_warm - t_cluster,
                    "tasks_dispatch_to_last_result": t_tasks - t_warm, "cluster_close": t_close - t_tasks,
                    "end_to_end": e2e, "steady_window": window, "task_busy_sum": busy, "teacher_sum": teacher,
                    "task_cpu_sum": cpu, "task_sys_cpu_sum": sys_s},
        "frames_per_s_steady": frames / window,
        "frames_per_s_end_to_end": frames / e2e,
        "outside_teacher_share_steady": 1.0 - teacher / busy,
        "outside_teacher_share_end_to_end": 1.0 - teacher / (workers * e2e),
        "worker_utilisation_in_window": busy / (workers * window),
        "cpu_over_wall": cpu / busy,
        "cpu_s_per_1k_frames": 1000.0 * cpu / frames,
        "sys_share_of_cpu": sys_s / cpu if cpu > 0 else float("nan"),
        "minor_faults_per_frame": sum(r["minor_faults"] for r in results) / frames,
        "teacher_frames_per_s_per_worker": frames / teacher,
    }


# ------------------------------------------------------------------------------------------- profile of one task
STAGES = [  # (label, file suffix, function name): cumulative time inside run_shard
    ("open stores + completion checks", "ci_store/store.py", "open_store"),
    ("", "ci_store/store.py", "is_shard_complete"),
    ("audio read (decode + resample)", "distill/data/audio.py", "read_audio"),
    ("teacher forward", "distill/extract/", "embed_batch"),
    ("quantizer encode", "distill/codec/quantizer.py", "encode"),
    ("  of which: unary GEMM", "distill/codec/search.py", "unary_terms"),
    ("  of which: beam search", "distill/codec/search.py", "beam_search"),
    ("  of which: ICM sweeps", "distill/codec/search.py", "icm"),
    ("shard write (encode, checksum, upload, record)", "ci_store/store.py", "write_shard"),
]


def profile_task(manifest: str, cfg, shard_frames: int) -> dict:
    """cProfile one real run_shard call in this process (1 torch thread, models preloaded) and split its time."""
    import torch

    from distill.extract import prepare, run_shard
    from distill.extract.job import _models

    torch.set_num_threads(cfg.threads_per_worker)
    cfg = dataclasses.replace(cfg, prefetch=0)  # audio read inline: cProfile sees only this thread
    if os.path.exists(cfg.out):
        shutil.rmtree(cfg.out)
    plan, tasks = prepare(manifest, cfg, shard_frames=shard_frames)
    _models(cfg)
    i, utts, nested = tasks[0]
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    r = run_shard(cfg, i, utts, nested)
    prof.disable()
    wall = time.perf_counter() - t
    st = pstats.Stats(prof).stats
    cum: dict[str, float] = {}
    for label, suffix, fn in STAGES:
        key = label or "open stores + completion checks"
        for (path, _line, name), (_cc, _nc, _tt, ct, _callers) in st.items():
            if name == fn and path.replace(os.sep, "/").endswith(suffix):
                cum[key] = cum.get(key, 0.0) + ct
    top_level = ["open stores + completion checks", "audio read (decode + resample)", "teacher forward",
                 "quantizer encode", "shard write (encode, checksum, upload, record)"]
    cum["other (checks, concatenation, bookkeeping)"] = max(0.0, wall - sum(cum.get(k, 0.0) for k in top_level))
    return {"shard": i, "frames": r.frames, "utterances": len(utts), "wall_s": wall,
            "teacher_s_reported": r.seconds_teacher, "stages_s": cum, "top_level": top_level}


def encode_knobs(qpath: str, frames: np.ndarray, threads: int) -> list[dict]:
    """Encode speed and quality of the trained codebooks under other beam / ICM settings (same codebooks)."""
    import torch

    from distill.codec.quantizer import MultiCodebookQuantizer

    torch.set_num_threads(threads)
    base = MultiCodebookQuantizer.load(qpath)
    arrays = base.to_arrays()
    x = frames.astype(np.float32)
    var = float(((x - x.mean(0)) ** 2).sum())
    ref = None
    rows = []
    for beam, sweeps in [(base.config["beam_size"], base.config["icm_sweeps"]), (8, 0), (4, 1), (2, 1), (1, 1)]:
        q = MultiCodebookQuantizer.from_arrays({**base.config, "beam_size": beam, "icm_sweeps": sweeps}, arrays)
        q.encode(x[:256])
        t = time.perf_counter()
        codes = q.encode(x)
        dt = time.perf_counter() - t
        err = float(((x - q.decode(codes)) ** 2).sum()) / var
        if ref is None:
            ref = codes
        rows.append({"beam": beam, "icm_sweeps": sweeps, "frames_per_s": len(x) / dt, "rel_sq_error": err,
                     "codes_equal_to_default": float((codes == ref).mean())})
    return rows


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="audio in the synthetic corpus (minutes)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts to measure")
    ap.add_argument("--tasks-per-worker", type=int, default=12, help="shards per worker at the largest count")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--layer", type=int, default=None, help="teacher layer to extract (default: the last)")
    ap.add_argument("--codebooks", type=int, default=16)
    ap.add_argument("--train-frames", type=int, default=8192, help="frames used to train the quantizer")
    ap.add_argument("--setup-threads", type=int, default=2, help="torch threads for corpus/quantizer setup")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                    help="profile one task in-process and time encode settings (default on)")
    ap.add_argument("--knob-frames", type=int, default=1024, help="frames per encode-setting measurement")
    ap.add_argument("--variants", default="shipped",
                    help=f"comma-separated cluster variants to measure: {', '.join(VARIANTS)} (see above)")
    ap.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                    help="first measure what the machine gives two processes (GEMM alone vs two at once)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="measurements per variant and worker count, worker counts alternating")
    ap.add_argument("--workdir", default="/tmp/ci-store-bench/extract", help="cache for corpus/models/stores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write all numbers here")
    args = ap.parse_args(argv)
    args.layer = args.layers if args.layer is None else args.layer
    worker_counts = [int(w) for w in args.workers.split(",")]
    os.makedirs(args.workdir, exist_ok=True)

    from distill.extract import ExtractionConfig, frame_counts
    from distill.data.manifest import load_manifest
    from distill.teachers import load_teacher

    state0 = machine_state()
    print(f"# extraction scaling benchmark  ({load_line()} at start)")
    t = time.perf_counter()
    manifest, corpus_s = cached_corpus(os.path.join(args.workdir, f"corpus-{args.minutes:g}m-s{args.seed}"),
                                       args.minutes, args.seed)
    teacher, qpath, setup_times = build_models(args.workdir, manifest, args)
    setup_s = time.perf_counter() - t
    utts = load_manifest(manifest)
    tch = load_teacher(teacher, layer=args.layer)
    counts = [n for _, n in frame_counts(utts, tch)]
    audio_s = sum(u.num_samples_at(16000) for u in utts) / 16000
    shard_frames = pick_shard_frames(counts, max(worker_counts), args.tasks_per_worker)
    from distill.codec.quantizer import MultiCodebookQuantizer
    qcfg = MultiCodebookQuantizer.load(qpath).config
    params = sum(p.numel() for p in tch.model.parameters()) if hasattr(tch, "model") else None

    config = {
        "corpus": {"manifest": manifest, "utterances": len(utts), "audio_seconds": round(audio_s, 1),
                   "teacher_frames": sum(counts), "seed": args.seed, "format": "16 kHz FLAC (make_corpus)"},
        "teacher": {"kind": "native (random init)", "d_model": args.d_model, "layers": args.layers,
                    "heads": args.heads, "ffn_dim": args.ffn, "layer_extracted": args.layer, "params": params,
                    "frame_rate": tch.frame_rate, "dim": tch.dim},
        "quantizer": {k: qcfg[k] for k in ("dim", "num_codebooks", "codebook_size", "proj_dim", "beam_size",
                                           "icm_sweeps", "block_rows")},
        "job": {"workers": worker_counts, "threads_per_worker": 1, "processes": True,
                "shard_frames": shard_frames, "batch_frames": ExtractionConfig.batch_frames,
                "store": "local directory", "float_labels": None},
        "setup_seconds": {"total": round(setup_s, 1), "corpus": round(corpus_s, 1),
                          **{k: round(v, 1) for k, v in setup_times.items()}},
        "machine_at_start": state0,
    }
    print(f"corpus: {len(utts)} utterances, {audio_s / 60:.1f} min audio, {sum(counts):,} teacher frames "
          f"({manifest})")
    print(f"teacher: native, random init, d_model {args.d_model}, {args.layers} layers, {args.heads} heads, "
          f"ffn {args.ffn}, {params:,} params; extracting layer {args.layer} ({tch.dim}-dim, {tch.frame_rate:g} Hz)")
    print(f"quantizer: {config['quantizer']}")
    print(f"job: LocalCluster processes, 1 thread per worker (torch threads 1), shard_frames {shard_frames} "
          f"-> {math.ceil(sum(counts) / shard_frames)}+ shards, local store")
    print(f"setup: {setup_s:.1f} s (corpus {corpus_s:.1f} s, quantizer sample {setup_times['sample_frames_s']:.1f} s"
          f" + train {setup_times['quantizer_train_s']:.1f} s; 0 = reused from {args.workdir})")

    if args.ceiling:
        ceiling = machine_ceiling()
        config["machine_ceiling"] = ceiling
        print(f"machine ceiling: two one-thread GEMM processes run {ceiling['gemm_2_over_1']:.2f}x one alone "
              f"(median of {len(ceiling['per_repeat'])}, range {ceiling['per_repeat'][0]:.2f}-"
              f"{ceiling['per_repeat'][-1]:.2f}): the most 2 workers can scale here")

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    config["job"]["variants"] = {v: VARIANTS[v] for v in variants}
    config["job"]["repeats"] = args.repeats
    runs = []
    for rep in range(args.repeats):
        for variant in variants:
            for w in worker_counts:
                cfg = ExtractionConfig(teacher=teacher, layer=args.layer, quantizer=qpath,
                                       out=os.path.join(args.workdir, f"store-{variant}-w{w}-r{rep}"),
                                       threads_per_worker=1)
                la = os.getloadavg()[0]
                r = run_once(manifest, cfg, w, shard_frames, variant)
                r.update(repeat=rep, store=cfg.out, loadavg_1min_before=round(la, 2),
                         loadavg_1min_after=round(os.getloadavg()[0], 2))
                runs.append(r)
                s = r["seconds"]
                print(f"\n## repeat {rep + 1}/{args.repeats}, '{variant}', {w} worker(s): {r['frames']:,} frames, "
                      f"{r['shards']} shards, tasks per worker {r['tasks_per_worker']}, failures {r['failures']}, "
                      f"load avg {la:.2f} -> {r['loadavg_1min_after']:.2f}; workers' MALLOC_TRIM_THRESHOLD_ "
                      f"{', '.join(r['worker_env'])}, timers (ms) {', '.join(r['worker_timers_ms'])}")
                print(f"   plan {s['plan']:.2f} s | cluster start {s['cluster_start']:.2f} s | model load "
                      f"{s['model_load']:.2f} s | tasks {s['tasks_dispatch_to_last_result']:.2f} s | close "
                      f"{s['cluster_close']:.2f} s | end-to-end {s['end_to_end']:.2f} s")

    # identical bytes whatever the worker count, variant and repeat (a cheap correctness check on what was measured)
    dirs = [r["store"] for r in runs]
    same = all(_same_tree(dirs[0], d) for d in dirs[1:]) if len(dirs) > 1 else None
    for d in dirs[1:]:
        shutil.rmtree(d, ignore_errors=True)

    print("\n## results")
    headers = ["variant", "repeat", "workers", "steady fr/s", "e2e fr/s", "outside teacher (steady)",
               "outside teacher (e2e)", "util in window", "cpu/wall", "cpu s/1k fr", "sys/cpu", "faults/fr",
               "teacher fr/s/worker"]
    rows = [[r["variant"], r["repeat"] + 1, r["workers"], r["frames_per_s_steady"], r["frames_per_s_end_to_end"],
             f"{100 * r['outside_teacher_share_steady']:.1f}%", f"{100 * r['outside_teacher_share_end_to_end']:.1f}%",
             f"{100 * r['worker_utilisation_in_window']:.0f}%", f"{r['cpu_over_wall']:.2f}",
             f"{r['cpu_s_per_1k_frames']:.2f}", f"{100 * r['sys_share_of_cpu']:.0f}%",
             f"{r['minor_faults_per_frame']:.0f}", r["teacher_frames_per_s_per_worker"]] for r in runs]
    print(table(headers, rows))
    verdict = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        v = verdict[variant] = {"frames_per_s_steady_median": {
            w: _median([r["frames_per_s_steady"] for r in mine if r["workers"] == w]) for w in worker_counts}}
        print(f"[{variant}] {VARIANTS[variant]}")
        if 1 in worker_counts and 2 in worker_counts:
            pairs = [({r["workers"]: r for r in mine if r["repeat"] == rep}) for rep in range(args.repeats)]
            ratios = sorted(p[2]["frames_per_s_steady"] / p[1]["frames_per_s_steady"] for p in pairs)
            cpu_ratios = sorted(2 * p[1]["cpu_s_per_1k_frames"] / p[2]["cpu_s_per_1k_frames"] for p in pairs)
            scaling = _median(ratios)
            of_medians = v["frames_per_s_steady_median"][2] / v["frames_per_s_steady_median"][1]
            v.update(scaling_2_over_1=scaling, scaling_per_repeat=ratios, scaling_goal_met=scaling >= 1.8,
                     scaling_ratio_of_medians=of_medians, scaling_if_cores_were_free=_median(cpu_ratios))
            print(f"  scaling 2 vs 1 worker (steady), median of the {len(ratios)} per-repeat ratios: {scaling:.2f}x, "
                  f"range {ratios[0]:.2f}-{ratios[-1]:.2f} (goal >= 1.8x: {'MET' if scaling >= 1.8 else 'NOT MET'}); "
                  f"ratio of the median rates: {of_medians:.2f}x ({'MET' if of_medians >= 1.8 else 'NOT MET'}); "
                  f"from CPU cost per frame: {_median(cpu_ratios):.2f}x (2 x cpu/frame(1) / cpu/frame(2): what "
                  f"free cores would give)")
        worst = max(r["outside_teacher_share_steady"] for r in mine)
        v.update(outside_teacher_share_steady_max=worst, outside_teacher_goal_met=worst < 0.10)
        print(f"  outside-teacher share (steady, worst run): {100 * worst:.1f}%  (goal < 10%: "
              f"{'MET' if worst < 0.10 else 'NOT MET'})")
    for variant in variants[1:]:
        for w in worker_counts:
            gain = (verdict[variant]["frames_per_s_steady_median"][w]
                    / verdict[variants[0]]["frames_per_s_steady_median"][w])
            verdict[variant].setdefault(f"speed_vs_{variants[0]}", {})[w] = gain
            print(f"  {w} worker(s): '{variant}' runs at {gain:.2f}x the speed of '{variants[0]}' (medians)")
    if same is not None:
        print(f"stores identical across all runs: {same}")

    prof = knobs = None
    if args.profile:
        cfg = ExtractionConfig(teacher=teacher, layer=args.layer, quantizer=qpath,
                               out=os.path.join(args.workdir, "store-profile"), threads_per_worker=1)
        prof = profile_task(manifest, cfg, shard_frames)
        print(f"\n## where a task's time goes (cProfile of run_shard on shard {prof['shard']}: "
              f"{prof['utterances']} utterances, {prof['frames']:,} frames, {prof['wall_s']:.2f} s; in this process: "
              f"1 torch thread; this process started with MALLOC_TRIM_THRESHOLD_="
              f"{MALLOC_AT_START or 'unset'})")
        rows = []
        for label, _, _ in STAGES:
            if not label:
                continue
            v = prof["stages_s"].get(label, 0.0)
            rows.append([label, f"{v:.3f}", f"{100 * v / prof['wall_s']:.1f}%",
                         prof["frames"] / v if v > 0 else float("nan")])
        v = prof["stages_s"]["other (checks, concatenation, bookkeeping)"]
        rows.append(["other (checks, concatenation, bookkeeping)", f"{v:.3f}", f"{100 * v / prof['wall_s']:.1f}%",
                     float("nan")])
        print(table(["stage", "seconds", "share", "frames/s of stage alone"], rows))
        non_teacher = {k: prof["stages_s"].get(k, 0.0) for k in prof["top_level"] if k != "teacher forward"}
        big = max(non_teacher, key=non_teacher.get)
        t_teacher = prof["stages_s"].get("teacher forward", 0.0)
        t_other = prof["wall_s"] - t_teacher
        need = 9.0 * t_other / t_teacher if t_teacher > 0 else float("nan")
        prof["largest_non_teacher_stage"] = big
        prof["teacher_cost_factor_for_10pct"] = need
        print(f"largest non-teacher stage: {big} ({100 * non_teacher[big] / prof['wall_s']:.1f}% of the task, "
              f"{non_teacher[big] / t_teacher:.1f}x the teacher forward)")
        print(f"outside-teacher share < 10% needs a teacher >= {need:.0f}x as costly per frame as this one "
              f"(the non-teacher work per frame does not grow with the teacher, except the quantizer's dim)")
        from distill.extract import sample_frames
        frames = sample_frames(manifest, teacher, args.layer, num_utterances=50, max_frames=args.knob_frames,
                               seed=args.seed + 1, progress=False)
        knobs = encode_knobs(qpath, frames, 1)
        print(f"\n## quantizer encode cost vs search settings (same codebooks, {len(frames)} frames, 1 thread; "
              f"teacher forward alone: {prof['frames'] / prof['stages_s'].get('teacher forward', float('nan')):,.0f}"
              f" frames/s)")
        print(table(["beam / ICM sweeps", "frames/s", "rel. sq. error", "codes = default"],
                    [[f"{k['beam']} / {k['icm_sweeps']}", k["frames_per_s"], f"{k['rel_sq_error']:.4f}",
                      f"{100 * k['codes_equal_to_default']:.1f}%"] for k in knobs]))

    state1 = machine_state()
    print(f"\n{load_line()} at end")
    out = {"config": config, "runs": runs, "verdict": verdict, "stores_identical": same, "profile": prof,
           "encode_settings": knobs, "machine_at_end": state1}
    write_json(args.json, out)
    return out


def _same_tree(a: str, b: str) -> bool:
    fa = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    fb = sorted(os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) for f in fs)
    if fa != fb:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, fa, shallow=False)
    return not mismatch and not errors


if __name__ == "__main__":
    main()
