"""The MVQ-KD experiment end to end, as the `ci-store` commands a user would type.

corpus -> teacher (trained on the large split, or a pre-trained one such as the bundled whisper-tiny.en) -> frame
sample -> quantizer -> Dask extraction (CI store + float16/float32 stores) -> inspect/verify/compare -> students
(none / l1 / l2 / mvq from the stores, online-l2 / online-mvq with the teacher in the loop, optionally several
seeds) on the small labelled split -> WER and speed tables. `make demo` runs it small; `bench/paper_table.py` runs
it at experiment size. Every step is skipped when its output already exists, so an interrupted run continues.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


@dataclass
class Sizes:
    hours: float = 1.0  # teacher's (large) training split
    student_hours: float = 0.3  # labelled subset the students train on
    dev_hours: float = 0.1
    test_hours: float = 0.1
    teacher_d_model: int = 256
    teacher_layers: int = 6
    teacher_epochs: int = 6
    teacher_layer: int = 4  # distilled layer (upper-middle, as HuBERT layer 18 of 24 in the paper)
    num_codebooks: int = 4  # 4 bytes/frame for a 256-dim teacher = 256x less than float32
    sample_utterances: int = 400
    student_epochs: int = 8
    student_max_seconds: float = 30.0  # audio seconds per batch: small batches = more updates on a small subset
    student_warmup_steps: int = 50
    student: dict = field(default_factory=lambda: {"d_model": 144, "num_layers": 4, "num_heads": 4})
    rnnt_loss: str | None = None  # train-student --rnnt-loss (full | pruned); None: the command's default (pruned)
    kd_runs: tuple = ("none", "mvq", "l2")  # also mvqN (N codebooks), online-l2 / online-mvq (teacher on the fly)
    seed: int = 0
    workers: int = 2
    # None: train the native teacher (teacher_* sizes); else a pre-trained teacher's checkpoint path/URL or alias
    # (e.g. "whisper-tiny.en"), used as is for sample-frames, extract and the online runs
    teacher: str | None = None
    online_max_steps: int | None = None  # online-* runs stop after this many updates (train-student --max-steps)
    seeds: tuple = (0,)  # student seeds of the runs named in multi_seed_runs
    multi_seed_runs: tuple = ()  # e.g. ("none", "l2", "mvq"): trained once per seed, reported as mean +- std
    threads: int = 2  # torch threads of the students trained at once, together
    parallel_runs: int = 1  # students from stores trained at once, threads // parallel_runs each


def cli(*args: str, log=print, env=None) -> float:
    """Run one `ci-store` command (printed as typed), fail loudly, return its wall time."""
    log("\n$ ci-store " + " ".join(shlex.quote(a) for a in args), flush=True) if log is print else \
        log("$ ci-store " + " ".join(shlex.quote(a) for a in args))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "cli", *args], env=env)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"command failed (exit {res.returncode}): ci-store {' '.join(args)}")
    return dt


def cli_json(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"command failed: ci-store {' '.join(args)}\n{out.stderr}")
    return json.loads(out.stdout)


def mvq_codebooks(kd: str, sizes: Sizes) -> int | None:
    """Codebooks of an MVQ run: 'mvq' -> sizes.num_codebooks, 'mvq2' -> 2; None for the other runs."""
    if kd == "mvq":
        return sizes.num_codebooks
    if kd.startswith("mvq") and kd[3:].isdigit() and int(kd[3:]) > 0:
        return int(kd[3:])
    return None


def online_kd(run: str) -> str | None:
    """KD of an on-the-fly run: 'online-l2' -> 'l2', 'online-mvq' -> 'mvq'; None for a run from a store."""
    if run.startswith("online-") and run[7:] in ("l1", "l2", "mvq"):
        return run[7:]
    return None


def timed_kd(run: str) -> str | None:
    """KD of a timing twin: 'timed-mvq' -> 'mvq' (the store-based run timed beside 'online-mvq'); else None."""
    return run[6:] if run.startswith("timed-") and online_kd("online-" + run[6:]) else None


def student_runs(sizes: Sizes) -> list[tuple[str, int, str]]:
    """(run, seed, directory under students/) per student to train. A run in multi_seed_runs trains once per seed
    in sizes.seeds; the one whose seed is sizes.seed keeps the single-seed directory `<run>` (so adding seeds to a
    finished experiment reuses it), the others go to `<run>-seed<k>`. An on-the-fly run stopped after
    online_max_steps is preceded by its timing twin `timed-<kd>`: the same KD from the store for the same steps."""
    out = []
    for run in sizes.kd_runs:
        if online_kd(run) and sizes.online_max_steps:
            out.append((f"timed-{online_kd(run)}", sizes.seed, f"timed-{online_kd(run)}"))
        seeds = tuple(sizes.seeds) if run in sizes.multi_seed_runs else (sizes.seed,)
        for k in seeds:
            out.append((run, k, run if k == sizes.seed else f"{run}-seed{k}"))
    return out


def check_sizes(sizes: Sizes) -> None:
    """Refuse contradictory sizes before any step runs (each message names the field)."""
    for run in sizes.kd_runs:
        if run not in ("none", "l1", "l2") and mvq_codebooks(run, sizes) is None and online_kd(run) is None:
            raise ValueError(f"Sizes.kd_runs: unknown run {run!r}; use none, l1, l2, mvq, mvqN, online-l1, "
                             f"online-l2 or online-mvq")
    unknown = [r for r in sizes.multi_seed_runs if r not in sizes.kd_runs]
    if unknown:
        raise ValueError(f"Sizes.multi_seed_runs names {unknown}, which are not in Sizes.kd_runs {sizes.kd_runs}")
    if not sizes.seeds or len(set(sizes.seeds)) != len(sizes.seeds):
        raise ValueError(f"Sizes.seeds {sizes.seeds!r}: give one or more distinct seeds")
    for name in ("threads", "parallel_runs"):
        if getattr(sizes, name) < 1:
            raise ValueError(f"Sizes.{name} {getattr(sizes, name)}: must be >= 1")
    if sizes.online_max_steps is not None and sizes.online_max_steps < 1:
        raise ValueError(f"Sizes.online_max_steps {sizes.online_max_steps}: must be >= 1 (or None: full schedule)")
    if sizes.teacher is None and not 0 <= sizes.teacher_layer <= sizes.teacher_layers:
        raise ValueError(f"Sizes.teacher_layer {sizes.teacher_layer}: the native teacher has layers "
                         f"0..{sizes.teacher_layers} (Sizes.teacher_layers)")


def pretrained_teacher_info(teacher: str, layer: int) -> dict:
    """Name, layers, dim, checkpoint sha256 and parameter count of a pre-trained teacher, loaded here once (a few
    seconds for whisper-tiny.en); a Sizes.teacher_layer it does not have is refused before any step runs."""
    from distill.teachers import TeacherError, load_teacher

    try:
        t = load_teacher(teacher, layer=layer)
    except TeacherError as e:
        raise ValueError(f"Sizes.teacher {teacher!r} / Sizes.teacher_layer {layer}: {e}") from None
    meta = t.metadata()
    return {"pretrained": True, **{k: meta.get(k) for k in ("name", "format", "source", "layer", "num_layers", "dim",
                                                               "frame_rate", "checkpoint_sha256")},
            "parameters": sum(p.numel() for p in t.module.parameters())}


def train_speed(run_dir: str) -> dict | None:
    """Training speed of a run from its log.jsonl: the last training record of the first session before any dev
    evaluation (so neither evaluation nor a restart is counted), whose `time` and `teacher_seconds` run from the
    session's start at step 0. None when nothing was logged."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return None
    last = None
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "dev_wer" in r or (last is not None and r["time"] < last["time"]):  # an evaluation or a new session
                break
            last = r
    if last is None or not last["time"] > 0:
        return None
    out = {"steps": last["step"], "seconds": last["time"], "steps_per_second": last["step"] / last["time"]}
    if "teacher_seconds" in last:
        out["teacher_seconds"] = last["teacher_seconds"]
    return out


def make_corpus(workdir: str, sizes: Sizes, log=print) -> float | None:
    """Synthesise `workdir`/corpus unless it is there (then None; else its wall time). Separate from run_pipeline so
    several pipelines (a layer sweep) can share one corpus."""
    corpus = os.path.join(workdir, "corpus")
    if os.path.exists(os.path.join(corpus, "cuts_test.jsonl.gz")):
        return None
    return cli("make-corpus", corpus, "--hours", str(sizes.hours), "--student-hours", str(sizes.student_hours),
               "--dev-hours", str(sizes.dev_hours), "--test-hours", str(sizes.test_hours), "--seed", str(sizes.seed),
               "--workers", str(sizes.workers), "--overwrite", log=log)


def run_pipeline(workdir: str, sizes: Sizes, *, s3: dict | None = None, log=print) -> dict:
    """Run (or continue) every step in `workdir`; returns timings, storage and WER results."""
    check_sizes(sizes)
    pretrained = pretrained_teacher_info(sizes.teacher, sizes.teacher_layer) if sizes.teacher else None
    os.makedirs(workdir, exist_ok=True)

    def step(*args: str) -> float:
        return cli(*args, log=log)

    w = lambda *p: os.path.join(workdir, *p)  # noqa: E731
    timings_path = w("timings.json")  # kept across resumed runs: a skipped step keeps the time it took
    timings: dict[str, float] = json.load(open(timings_path)) if os.path.exists(timings_path) else {}

    def save_timings():
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=1)

    t_corpus = make_corpus(workdir, sizes, log=log)
    if t_corpus is not None:
        timings["corpus"] = t_corpus
    train_big, train_small = w("corpus", "cuts_train.jsonl.gz"), w("corpus", "cuts_train_small.jsonl.gz")
    dev, test = w("corpus", "cuts_dev.jsonl.gz"), w("corpus", "cuts_test.jsonl.gz")
    teacher = sizes.teacher or w("teacher", "teacher.safetensors")
    if pretrained is None and not os.path.exists(teacher):
        os.makedirs(w("teacher"), exist_ok=True)
        timings["teacher"] = step("train-teacher", "--train", train_big, "--dev", dev, "--out", teacher,
                                  "--d-model", str(sizes.teacher_d_model), "--layers", str(sizes.teacher_layers),
                                  "--epochs", str(sizes.teacher_epochs), "--seed", str(sizes.seed))
    layer = str(sizes.teacher_layer)
    frames, quantizer = w("quantizer", "frames.npy"), w("quantizer", "quantizer.safetensors")
    os.makedirs(w("quantizer"), exist_ok=True)
    if not os.path.exists(frames):
        timings["sample_frames"] = step("sample-frames", train_big, "--teacher", teacher, "--layer", layer,
                                        "--out", frames, "--num-utterances", str(sizes.sample_utterances),
                                        "--seed", str(sizes.seed))
    if not os.path.exists(quantizer):
        timings["train_quantizer"] = step("train-quantizer", frames, "--num-codebooks", str(sizes.num_codebooks),
                                          "--out", quantizer, "--seed", str(sizes.seed))

    def store_url(name: str) -> str:
        return f"{s3['url'].rstrip('/')}/{name}" if s3 else w("labels", name)

    stores = {"ci": store_url("ci.zarr"), "float16": store_url("f16.zarr"), "float32": store_url("f32.zarr")}
    so_args = ["--storage-options", json.dumps(s3["storage_options"])] if s3 else []
    t_extract = step("extract", train_small, "--teacher", teacher, "--layer", layer, "--quantizer",
                     quantizer, "--out", stores["ci"], "--float-labels", stores["float16"], "--dtype",
                     "float16", "--float-labels", stores["float32"], "--dtype", "float32", "--workers",
                     str(sizes.workers), *so_args)
    timings.setdefault("extract", t_extract)  # a resumed run that skipped finished shards keeps the first time
    save_timings()
    # Extra MVQ runs at another rate ("mvq2": 2 codebooks): own quantizer from the same frames, own CI store.
    for kd in sizes.kd_runs:
        n = mvq_codebooks(kd, sizes)
        if n is None or n == sizes.num_codebooks:
            continue
        q_n = w("quantizer", f"quantizer-{n}cb.safetensors")
        if not os.path.exists(q_n):
            timings[f"train_quantizer ({kd})"] = step("train-quantizer", frames, "--num-codebooks", str(n),
                                                      "--out", q_n, "--seed", str(sizes.seed))
        stores[kd] = store_url(f"ci-{n}cb.zarr")
        t = step("extract", train_small, "--teacher", teacher, "--layer", layer, "--quantizer", q_n, "--out",
                 stores[kd], "--workers", str(sizes.workers), *so_args)
        timings.setdefault(f"extract ({kd})", t)
        step("verify", stores[kd], *so_args)
        save_timings()
    step("inspect", stores["ci"], *so_args)
    step("verify", stores["ci"], *so_args)
    step("verify", stores["float16"], *so_args)
    compared = [stores["ci"], *(stores[k] for k in sizes.kd_runs if k in stores),
                stores["float16"], stores["float32"]]
    step("compare", *compared, *so_args)
    storage = cli_json("compare", *compared, "--json", *so_args)
    inspected = cli_json("inspect", stores["ci"], "--json", *so_args)

    def student_args(run: str, seed: int, run_dir: str, threads: int) -> list[str]:
        online = online_kd(run)
        kd = online or timed_kd(run) or run
        n = mvq_codebooks(kd, sizes)
        args = ["train-student", "--train", train_small, "--kd", "mvq" if n else kd, "--dev", dev, "--out", run_dir,
                "--epochs", str(sizes.student_epochs), "--seed", str(seed),
                "--max-seconds", str(sizes.student_max_seconds), "--warmup-steps", str(sizes.student_warmup_steps),
                "--student", json.dumps(sizes.student), "--threads", str(threads),
                "--no-progress"]
        if sizes.rnnt_loss:
            args += ["--rnnt-loss", sizes.rnnt_loss]
        if online:  # the teacher (and for mvq the same quantizer as the CI store's) labels every batch
            args += ["--online-teacher", teacher, "--layer", layer]
            if n:
                args += ["--quantizer", quantizer]
        elif n:
            args += ["--labels", stores.get(kd, stores["ci"])]
        elif kd in ("l1", "l2"):
            args += ["--labels", stores["float16"]]
        if online or timed_kd(run):
            if sizes.online_max_steps:
                args += ["--max-steps", str(sizes.online_max_steps)]
        if kd != "none" and not online and s3:
            args += so_args
        return args

    def train(run: str, seed: int, name: str, threads: int) -> None:
        run_dir = w("students", name)
        if not os.path.exists(os.path.join(run_dir, "final.json")):
            dt = step(*student_args(run, seed, run_dir, threads))
            with open(os.path.join(run_dir, "final.json"), "w") as f:
                json.dump({"seconds": dt}, f)

    # Students from stores train `parallel_runs` at a time (threads split between them); the on-the-fly runs and
    # their timing twins (the same KD from the store, same steps) run afterwards one at a time, so the on-the-fly /
    # store speed ratio compares like with like. Every run gets the same threads (a torch run with more threads
    # than it has cores to itself stalls in its thread barriers, so a run alone keeps the pooled runs' count).
    runs = student_runs(sizes)
    pooled = [r for r in runs if not online_kd(r[0]) and not timed_kd(r[0])]
    each = max(1, sizes.threads // sizes.parallel_runs)
    if sizes.parallel_runs > 1 and len(pooled) > 1:
        with ThreadPoolExecutor(sizes.parallel_runs) as ex:
            list(ex.map(lambda r: train(*r, each), pooled))
    for r in runs:
        train(*r, each)
    results: dict[str, dict] = {}
    for run, seed, name in runs:
        run_dir = w("students", name)
        with open(os.path.join(run_dir, "final.json")) as f:
            secs = json.load(f)["seconds"]
        with open(os.path.join(run_dir, "last.json")) as f:
            ckpt = json.load(f)
        res = {"train_seconds": secs, "seed": seed, "run_dir": os.path.join("students", name),
               "steps": ckpt["step"], "speed": train_speed(run_dir)}
        if ckpt["epoch"] < sizes.student_epochs:  # stopped by --max-steps: timed, not a finished student
            res["stopped_early"] = True
        else:
            scores = os.path.join(run_dir, "scores.json")  # kept: a finished student's scores do not change
            if not os.path.exists(scores):
                scored = {}
                for split, man in (("dev", dev), ("test", test)):
                    r = cli_json("evaluate", run_dir, man, "--json")
                    scored[split] = {k: r[k] for k in ("wer", "errors", "words", "cer", "char_errors", "chars")}
                with open(scores, "w") as f:
                    json.dump(scored, f)
            with open(scores) as f:
                res.update(json.load(f))
        if run in sizes.multi_seed_runs:
            entry = results.setdefault(run, res)  # the run's own fields: its first seed, as a single-seed run
            entry.setdefault("seeds", {})[str(seed)] = {k: v for k, v in res.items() if k != "seeds"}
        else:
            results[run] = res
    _project_online_runs(results)
    if pretrained is not None:
        # what produced the stored labels, as the CI store records it, and the parameter count loaded above
        teacher_info = {**pretrained, **(inspected.get("teacher") or {})}
    else:
        with open(teacher + ".train.json") as f:
            t_sum = json.load(f)
        last = (t_sum.get("history") or [{}])[-1]
        teacher_info = {"parameters": t_sum.get("parameters"), "train_hours": t_sum.get("train_hours"),
                        "steps": t_sum.get("steps"), "dev_cer": last.get("dev_cer"), "dev_wer": last.get("dev_wer"),
                        "checkpoint_sha256": t_sum.get("checkpoint_sha256")}
    summary = {"sizes": dataclasses.asdict(sizes), "timings": timings, "teacher": teacher_info, "storage": storage,
               "results": results, "stores": stores}
    with open(w("summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _project_online_runs(results: dict) -> None:
    """Each on-the-fly run (and timing twin) stopped early gets its full schedule's step count and, from its measured
    steps/s, the projected training time of that schedule. The schedule is the no-KD run's (same seed): neither
    reads a store, so their batch sampler draws the same batches; without one, a store run's (whose shards may
    regroup the batches, so the count can differ by a few)."""
    for run, r in results.items():
        kd = online_kd(run) or timed_kd(run)
        if not kd or not r.get("speed"):
            continue
        if not r.get("stopped_early"):
            r["full_schedule_steps"], r["full_schedule_from"] = r["steps"], run
            continue
        done = {o: x for o, x in results.items() if not x.get("stopped_early") and x.get("seed") == r["seed"]}
        ref = "none" if "none" in done else kd if kd in done else next(iter(done), None)
        if ref is None:
            continue
        r["full_schedule_steps"], r["full_schedule_from"] = done[ref]["steps"], ref
        r["projected_full_seconds"] = done[ref]["steps"] / r["speed"]["steps_per_second"]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return m, var ** 0.5


def per_seed(r: dict) -> list[dict]:
    return list(r["seeds"].values()) if r.get("seeds") else [r]


def run_label(run: str) -> str:
    """The 'labels' column: where a run's KD labels come from."""
    fixed = {"none": "-", "mvq": "CI store", "l1": "float16 store", "l2": "float16 store"}
    if run in fixed:
        return fixed[run]
    if online_kd(run):
        return "teacher on the fly" + (", MVQ codes" if online_kd(run) == "mvq" else ", float")
    if timed_kd(run):
        return f"{run_label(timed_kd(run))} (timing twin of online-{timed_kd(run)})"
    return f"CI store, {run[3:]} B/frame" if run.startswith("mvq") else ""


def result_table(summary: dict) -> str:
    """Markdown: WER per run and relative WER reduction vs no KD (test set). A run trained with several seeds shows
    mean +- sample std over its seeds (the reduction: of the means); a run stopped early (on-the-fly runs with
    online_max_steps) has no WER, only its speed (speed_table)."""
    res = summary["results"]

    def stat(r: dict, split: str, key: str) -> tuple[float, float, int] | None:
        vals = [x[split][key] for x in per_seed(r) if split in x and key in x[split]]
        return (*mean_std(vals), len(vals)) if vals else None

    def pct(r, split, key):
        st = stat(r, split, key)
        if st is None:
            return "n/a"
        m, sd, n = st
        return f"{100 * m:.2f} ± {100 * sd:.2f}" if n > 1 else f"{100 * m:.2f}"

    def rel(run, r, key):
        b = stat(res["none"], "test", key) if "none" in res else None
        x = stat(r, "test", key)
        if run == "none" or not b or not b[0] or x is None:
            return "-"
        return f"{100 * (b[0] - x[0]) / b[0]:+.1f}%"

    lines = ["| run | labels | dev WER % | test WER % | rel. WER reduction vs no KD (test) | dev CER % | test CER % "
             "| rel. CER reduction vs no KD (test) | train time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for run, r in res.items():
        seeds = per_seed(r)
        name = f"{run} ({len(seeds)} seeds)" if len(seeds) > 1 else run
        if r.get("stopped_early"):
            secs = f"stopped after {r['steps']} steps ({r['train_seconds']:.0f} s)"
        else:
            m, sd = mean_std([x["train_seconds"] for x in seeds])
            secs = f"{m:.0f} ± {sd:.0f}" if len(seeds) > 1 else f"{m:.0f}"
        lines.append(f"| {name} | {run_label(run)} | {pct(r, 'dev', 'wer')} | {pct(r, 'test', 'wer')} "
                     f"| {rel(run, r, 'wer')} | {pct(r, 'dev', 'cer')} | {pct(r, 'test', 'cer')} "
                     f"| {rel(run, r, 'cer')} | {secs} |")
    return "\n".join(lines)


def speed_table(summary: dict) -> str:
    """Markdown: training steps/s per run (first epoch, no evaluation: train_speed), the teacher's share of an
    on-the-fly run's time, its speed relative to the same KD from a store (its timing twin, run alone right
    before it with the same threads and steps, when there is one), and its full-schedule training time
    (projected from steps/s when the run was stopped early)."""
    res = summary["results"]
    lines = ["| run | labels | steps timed | steps/s | teacher s (share) | on the fly / store | full-schedule "
             "train time (s) |", "|---|---|---|---|---|---|---|"]
    for run, r in res.items():
        sp = r.get("speed")
        if not sp:
            lines.append(f"| {run} | {run_label(run)} | - | n/a | - | - | - |")
            continue
        teacher = "-"
        if "teacher_seconds" in sp:
            teacher = f"{sp['teacher_seconds']:.1f} ({100 * sp['teacher_seconds'] / sp['seconds']:.0f}%)"
        ratio = "-"
        twin = f"timed-{online_kd(run)}" if f"timed-{online_kd(run)}" in res else online_kd(run)
        store = res.get(twin or "")
        if online_kd(run) and store and store.get("speed"):
            ratio = f"{sp['steps_per_second'] / store['speed']['steps_per_second']:.2f}x (vs {twin})"
        if r.get("stopped_early"):
            full = (f"{r['projected_full_seconds']:.0f} (projected: {r['full_schedule_steps']} steps, as "
                    f"{r['full_schedule_from']}, at {sp['steps_per_second']:.2f} steps/s)"
                    if r.get("projected_full_seconds") else "n/a")
        else:
            full = f"{r['train_seconds']:.0f} (measured wall time, with start-up and dev evaluation)"
        lines.append(f"| {run} | {run_label(run)} | {sp['steps']} | {sp['steps_per_second']:.2f} | {teacher} "
                     f"| {ratio} | {full} |")
    return "\n".join(lines)


def storage_table(summary: dict) -> str:
    """Markdown: label storage per store, with and without the quantizer kept inside the CI store."""
    lines = ["| labels | frames | bytes | bytes/frame | vs float32 | bytes/frame w/o quantizer | "
             "vs float32 w/o quantizer |", "|---|---|---|---|---|---|---|"]
    for r in summary["storage"]:
        lr = r.get("label_ratio_vs_float32")
        lr_txt = f"{lr:.1f}x" if lr else "n/a"
        lines.append(f"| {r['label']} | {r['frames']} | {r['bytes']:,} | {r['bytes_per_frame']:.2f} | "
                     f"{r['ratio_vs_float32']:.1f}x | {r['label_bytes_per_frame']:.2f} | {lr_txt} |")
    return "\n".join(lines)


# Corpora the storage table is extrapolated to (hours of audio; teacher frames at the store's frame rate)
EXTRAPOLATE_HOURS = (("LibriSpeech 960 h", 960), ("GigaSpeech 10k h", 10_000))


def difference_table(summary: dict) -> str:
    """Markdown: each finished run's test WER/CER minus no KD's, and MVQ's minus l2's, with the standard error of
    the difference sqrt(sd_a^2/n_a + sd_b^2/n_b). A single-seed run has no spread of its own: it borrows the largest
    std of the multi-seed runs (said in the row)."""
    res = {k: v for k, v in summary["results"].items() if "test" in v}
    multi = [r for r in res.values() if len(per_seed(r)) > 1]

    def stat(r: dict, key: str) -> tuple[float, float, int, bool]:
        vals = [100 * x["test"][key] for x in per_seed(r)]
        m, sd = mean_std(vals)
        if len(vals) > 1 or not multi:
            return m, sd, len(vals), False
        return m, max(mean_std([100 * x["test"][key] for x in per_seed(o)])[1] for o in multi), 1, True

    pairs = [(run, "none") for run in res if run != "none" and "none" in res]
    pairs += [("mvq", b) for b in ("l1", "l2") if "mvq" in res and b in res]
    lines = ["| difference (test) | WER points | CER points | seeds | |", "|---|---|---|---|---|"]
    for a, b in pairs:
        cells, borrowed = [], False
        for key in ("wer", "cer"):
            (ma, sa, na, ba), (mb, sb, nb, bb) = stat(res[a], key), stat(res[b], key)
            se = (sa ** 2 / na + sb ** 2 / nb) ** 0.5
            cells.append(f"{ma - mb:+.2f} ± {se:.2f}" + (f" ({abs(ma - mb) / se:.1f} SE)" if se else ""))
            borrowed |= ba or bb
        n = f"{len(per_seed(res[a]))} vs {len(per_seed(res[b]))}"
        lines.append(f"| {a} - {b} | {cells[0]} | {cells[1]} | {n} | "
                     f"{'single-seed spread borrowed' if borrowed else ''} |")
    return "\n".join(lines)


def extrapolation_table(summary: dict) -> str:
    """Markdown: each store's label bytes per frame scaled to full corpora (the CI store's quantizer is a fixed
    cost, added once)."""
    rate = summary.get("teacher", {}).get("frame_rate") or 50
    head = " | ".join(f"{name} ({h * 3600 * rate / 1e6:,.0f} M frames)" for name, h in EXTRAPOLATE_HOURS)
    lines = [f"| labels | bytes/frame (labels) | {head} |", "|---|---|" + "---|" * len(EXTRAPOLATE_HOURS)]
    for r in summary["storage"]:
        fixed = r["bytes"] - r["label_bytes_per_frame"] * r["frames"]
        cells = [_gb(r["label_bytes_per_frame"] * h * 3600 * rate + fixed) for _, h in EXTRAPOLATE_HOURS]
        lines.append(f"| {r['label']} | {r['label_bytes_per_frame']:.2f} | {' | '.join(cells)} |")
    dim = summary["storage"][0]["dim"]
    raw = [_gb(4 * dim * h * 3600 * rate) for _, h in EXTRAPOLATE_HOURS]
    lines.append(f"| float32, raw (no container) | {4 * dim} | {' | '.join(raw)} |")
    return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / 1e12:.2f} TB" if n >= 1e12 else f"{n / 1e9:.2f} GB"


def extraction_table(summary: dict) -> str:
    """Markdown: labelling the student split once (extract: the CI and float stores in one teacher pass) against
    the teacher time an on-the-fly run spends per epoch and over its full schedule (from its timed steps)."""
    t, res, s = summary["timings"], summary["results"], summary["sizes"]
    lines = ["| labels made by | teacher work | wall time (s) |", "|---|---|---|"]
    if "extract" in t:
        lines.append(f"| `ci-store extract` (once; CI + float16 + float32 stores) | every utterance once | "
                     f"{t['extract']:.0f} |")
    for run, r in res.items():
        sp = r.get("speed") or {}
        if "teacher_seconds" not in sp or not r.get("full_schedule_steps"):
            continue
        per_step = sp["teacher_seconds"] / sp["steps"]
        per_epoch = per_step * r["full_schedule_steps"] / s["student_epochs"]
        lines.append(f"| {run}: teacher on the fly | every utterance, every epoch | {per_epoch:.0f} per epoch "
                     f"(x {s['student_epochs']} epochs = {per_epoch * s['student_epochs']:.0f}; projected from "
                     f"{sp['steps']} timed steps) |")
    return "\n".join(lines)
