"""Peak memory of one extraction shard task vs shard size, before and after bounded-memory shard tasks (issue 16).

    git archive <commit before> | tar -x -C /tmp/ci-store-before        # the code to compare against
    python bench/extract_memory.py --before /tmp/ci-store-before [--sizes 16384,32768,65536] [--json F]

What runs: a corpus made by `ci-store make-corpus` (distill.synth.corpus, cached in --workdir), a native teacher with
random weights and 1024-dim frames (d_model 1024, 8 heads, ffn 1024, 1 layer: the frame size of a large teacher,
at a fraction of its compute), and a 4 x 256 MVQ quantizer trained briefly on its frames. For each shard size S,
the first utterances of the corpus adding up to about S frames are planned as ONE CI shard (this process runs
distill.extract.prepare), then a fresh Python process, with the code under test or with --before's code on its
PYTHONPATH, loads the models (distill.extract.job._models), resets the kernel's peak-RSS mark to its current RSS
(/proc/self/clear_refs: loading the models peaks higher than the process stays), runs run_shard on the shard and
reads the peak (VmHWM). Printed per (code, S): the task's extra peak (peak during the task - RSS before it), its
wall time, and the before/after ratio of the extra peak. Variants (--variants):
  codes     CI store only
  float16   plus a float16 float-label store (default float layout: 64 Ki-frame sub-shards at 1024 dims)
  ckpt-4k   CI store only, with checkpoints every 4096 frames (this code only): the cost of a finer restart unit
The child runs as a Dask worker does: started with MALLOC_TRIM_THRESHOLD_=65536 (Dask's nanny), which the worker
undoes at model load by raising glibc's thresholds (distill.extract.cluster.undo_dask_malloc_trim); --plain-malloc
runs it with glibc's defaults. oneDNN caches compiled primitives per input shape (up to 1024 by default), so a
worker's memory also grows with the number of distinct utterance lengths it has seen, in both codes, until that
cache is full; --onednn-cache 0 switches the cache off to show the task's own memory. Last, the cost of the checkpoints themselves: 16 segments of 4096 frames x 16 codebooks saved, loaded and deleted
on local disk and on a loopback moto S3 server. Linux only (/proc); the machine's load is printed with the results (it moves the
times, not the memory).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, cached_corpus, load_line, machine_state, table, write_json  # noqa: E402

CHILD = r"""
import gc, json, sys, time
import torch
a = json.loads(sys.argv[1])
from distill.data.manifest import load_manifest
from distill.extract import ExtractionConfig, run_shard
from distill.extract.job import _models
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024
cfg = ExtractionConfig(**a["cfg"])
utts = load_manifest(a["manifest"])
_models(cfg)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: loading the models peaks higher than it stays
base = status("VmRSS")
t = time.perf_counter()
r = run_shard(cfg, 0, utts, a["nested"])
wall = time.perf_counter() - t
peak = status("VmHWM")
print("RESULT " + json.dumps({"rss_before_task_mib": base, "peak_during_task_mib": peak,
                              "task_extra_mib": peak - base, "wall_s": wall, "frames": r.frames,
                              "failures": len(r.failures)}))
"""


def build_models(workdir: str, manifest: str, seed: int) -> tuple[str, str]:
    import torch

    from distill.codec.quantizer import MultiCodebookQuantizer
    from distill.extract import sample_frames
    from distill.teachers import NativeTeacherConfig, NativeTeacherModel, save_native_teacher

    teacher = os.path.join(workdir, f"teacher-d1024-s{seed}.safetensors")
    qpath = os.path.join(workdir, f"mvq-d1024-N4-s{seed}.safetensors")
    if not os.path.exists(teacher):
        torch.manual_seed(seed)
        save_native_teacher(NativeTeacherModel(NativeTeacherConfig(d_model=1024, num_heads=8, ffn_dim=1024,
                                                                   num_layers=1)), teacher)
    if not os.path.exists(qpath):
        frames = sample_frames(manifest, teacher, 1, num_utterances=40, max_frames=6000, seed=seed, progress=False)
        MultiCodebookQuantizer.train(frames, num_codebooks=4, seed=seed, progress=False, kmeans_iters=4, lsq_iters=1,
                                     train_beam_size=2, max_train_frames=6000).save(qpath)
    return teacher, qpath


def subset_manifest(manifest: str, teacher_path: str, frames: int, path: str) -> int:
    """The first utterances (by id) adding up to at most `frames` teacher frames, as a JSONL manifest."""
    from distill.data.manifest import load_manifest
    from distill.teachers import load_teacher

    t = load_teacher(teacher_path, layer=1)
    total, lines = 0, []
    for u in sorted(load_manifest(manifest), key=lambda u: u.id):
        n = t.num_frames(u.num_samples_at(16000))
        if total + n > frames:
            break
        total += n
        lines.append(json.dumps({"id": u.id, "audio": u.audio, "sample_rate": u.sample_rate,
                                 "num_samples": u.num_samples, "duration": u.duration}))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return total


def run_child(code_root: str, cfg: dict, manifest: str, nested, threads: int, dask_malloc: bool,
              onednn_cache: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": code_root, "OMP_NUM_THREADS": str(threads)}
    if onednn_cache is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(onednn_cache)
    if dask_malloc:  # as a Dask nanny starts its workers (the worker then raises glibc's thresholds at model load)
        env["MALLOC_TRIM_THRESHOLD_"] = "65536"
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"cfg": cfg, "manifest": manifest,
                                                                     "nested": nested})],
                          env=env, cwd=code_root, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def checkpoint_cost(workdir: str, segments: int = 16, seg_frames: int = 4096, codebooks: int = 16) -> list:
    """Seconds per segment to save, load back and delete the codes checkpoints of one shard (local disk and a
    loopback moto S3): what a finer restart unit costs, next to the teacher time it saves."""
    import shutil

    import numpy as np

    from _common import start_moto
    from distill.extract.checkpoints import ShardCheckpoints

    rng = np.random.default_rng(0)
    utts = [[(f"s{k}-u{i}", seg_frames // 16) for i in range(16)] for k in range(segments)]
    codes = {u: rng.integers(0, 256, (n, codebooks), dtype=np.uint8) for seg in utts for u, n in seg}
    server, opts = start_moto()
    local = os.path.join(workdir, "ckpt-local")
    shutil.rmtree(local, ignore_errors=True)
    os.makedirs(local)
    rows = []
    try:
        for where, url, so in (("local", local, None), ("moto S3", "s3://bench/ckpt", opts)):
            ck = ShardCheckpoints(url, so, 0, "bench", np.uint8, codebooks)
            t0 = time.perf_counter()
            for k, seg in enumerate(utts):
                ck.save(k, seg, codes, {})
            t1 = time.perf_counter()
            got = ck.load(utts)
            t2 = time.perf_counter()
            ck.clear()
            t3 = time.perf_counter()
            assert len(got) == segments
            rows.append([where, segments, seg_frames * codebooks // 1024, 1000 * (t1 - t0) / segments,
                         1000 * (t2 - t1) / segments, 1000 * (t3 - t2) / segments])
    finally:
        server.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="root of a checkout of the code to compare against")
    ap.add_argument("--sizes", default="16384,32768,65536", help="shard sizes in frames")
    ap.add_argument("--variants", default="codes,float16,ckpt-4k")
    ap.add_argument("--minutes", type=float, default=24.0, help="corpus size (must cover the largest shard)")
    ap.add_argument("--workdir", default="/tmp/ci-store-bench-memory")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plain-malloc", action="store_true",
                    help="run the child without Dask's MALLOC_TRIM_THRESHOLD_ (default: as a Dask worker runs)")
    ap.add_argument("--onednn-cache", type=int, default=None,
                    help="ONEDNN_PRIMITIVE_CACHE_CAPACITY for the child (default: torch's, 1024 primitives)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import shutil

    from distill.extract import ExtractionConfig, prepare

    os.makedirs(args.workdir, exist_ok=True)
    manifest, corpus_s = cached_corpus(os.path.join(args.workdir, "corpus"), args.minutes, args.seed)
    teacher, qpath = build_models(args.workdir, manifest, args.seed)
    print(f"corpus {manifest} ({args.minutes:g} min; made in {corpus_s:.0f} s), teacher dim 1024; {load_line()}")
    rows, results = [], []
    for variant in [v for v in args.variants.split(",") if v]:  # --variants "": the checkpoint costs only
        for size in (int(s) for s in args.sizes.split(",")):
            sub = os.path.join(args.workdir, f"subset-{size}.jsonl")
            frames = subset_manifest(manifest, teacher, size, sub)
            res = {}
            for code, root in (("before", os.path.abspath(args.before)), ("after", ROOT)):
                if variant == "ckpt-4k" and code == "before":
                    continue
                out = os.path.join(args.workdir, f"out-{variant}-{size}-{code}")
                shutil.rmtree(out, ignore_errors=True)
                cfg = ExtractionConfig(teacher=teacher, layer=1, quantizer=qpath, out=os.path.join(out, "ci"),
                                       float_labels=[os.path.join(out, "f16")] if variant == "float16" else None)
                _, tasks = prepare(sub, cfg, shard_frames=1 << 20)
                assert len(tasks) == 1
                d = {k: v for k, v in cfg.__dict__.items()
                     if code == "after" or k not in ("batch_seconds", "prefetch", "checkpoint_frames", "io_attempts",
                                                     "io_backoff_seconds", "retry_failed")}
                if variant == "ckpt-4k":
                    d["checkpoint_frames"] = 4096
                res[code] = run_child(root, d, sub, tasks[0][2], args.threads, not args.plain_malloc,
                                      args.onednn_cache)
                results.append({"variant": variant, "shard_frames": frames, "code": code, **res[code]})
                print(f"  {variant:8s} S={frames:6d} {code:6s} extra peak {res[code]['task_extra_mib']:7.1f} MiB "
                      f"(RSS {res[code]['rss_before_task_mib']:.0f} -> {res[code]['peak_during_task_mib']:.0f} MiB) in {res[code]['wall_s']:.1f} s", flush=True)
            b, a = res.get("before"), res["after"]
            rows.append([variant, frames, b["task_extra_mib"] if b else float("nan"), a["task_extra_mib"],
                         (b["task_extra_mib"] / a["task_extra_mib"]) if b and a["task_extra_mib"] > 0 else float("nan"),
                         b["wall_s"] if b else float("nan"), a["wall_s"],
                         (a["wall_s"] / b["wall_s"]) if b else float("nan")])
    print()
    print(table(["variant", "shard frames", "before MiB", "after MiB", "before/after", "before s", "after s",
                 "after/before time"], rows))
    print(f"(peak RSS of one shard task above the worker's RSS after loading the models; {load_line()})")
    ck = checkpoint_cost(args.workdir)
    print()
    print(table(["checkpoints on", "segments", "KiB each", "save ms/segment", "load ms/segment",
                 "delete ms/segment"], ck))
    write_json(args.json, {"machine": machine_state(), "args": vars(args), "results": results, "checkpoints": ck})


if __name__ == "__main__":
    main()
