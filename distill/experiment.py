"""The MVQ-KD experiment end to end, as the `ci-store` commands a user would type.

corpus -> teacher (trained on the large split) -> frame sample -> quantizer -> Dask extraction (CI store +
float16/float32 stores) -> inspect/verify/compare -> students (none / l1 / l2 / mvq) on the small labelled
split -> WER table. `make demo` runs it small; `bench/paper_table.py` runs it at experiment size.
Every step is skipped when its output already exists, so an interrupted run continues.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
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
    kd_runs: tuple = ("none", "mvq", "l2")
    seed: int = 0
    workers: int = 2


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


def run_pipeline(workdir: str, sizes: Sizes, *, s3: dict | None = None, log=print) -> dict:
    """Run (or continue) every step in `workdir`; returns timings, storage and WER results."""
    os.makedirs(workdir, exist_ok=True)

    def step(*args: str) -> float:
        return cli(*args, log=log)

    w = lambda *p: os.path.join(workdir, *p)  # noqa: E731
    timings_path = w("timings.json")  # kept across resumed runs: a skipped step keeps the time it took
    timings: dict[str, float] = json.load(open(timings_path)) if os.path.exists(timings_path) else {}

    def save_timings():
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=1)

    corpus = w("corpus")
    if not os.path.exists(w("corpus", "cuts_test.jsonl.gz")):
        timings["corpus"] = step("make-corpus", corpus, "--hours", str(sizes.hours), "--student-hours",
                                 str(sizes.student_hours), "--dev-hours", str(sizes.dev_hours), "--test-hours",
                                 str(sizes.test_hours), "--seed", str(sizes.seed), "--workers", str(sizes.workers),
                                 "--overwrite")
    train_big, train_small = w("corpus", "cuts_train.jsonl.gz"), w("corpus", "cuts_train_small.jsonl.gz")
    dev, test = w("corpus", "cuts_dev.jsonl.gz"), w("corpus", "cuts_test.jsonl.gz")
    teacher = w("teacher", "teacher.safetensors")
    if not os.path.exists(teacher):
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
    results: dict[str, dict] = {}
    for kd in sizes.kd_runs:
        run = w("students", kd)
        n = mvq_codebooks(kd, sizes)
        args = ["train-student", "--train", train_small, "--kd", "mvq" if n else kd, "--dev", dev, "--out", run,
                "--epochs", str(sizes.student_epochs), "--seed", str(sizes.seed),
                "--max-seconds", str(sizes.student_max_seconds), "--warmup-steps", str(sizes.student_warmup_steps),
                "--student", json.dumps(sizes.student),
                "--no-progress"]
        if sizes.rnnt_loss:
            args += ["--rnnt-loss", sizes.rnnt_loss]
        if n:
            args += ["--labels", stores.get(kd, stores["ci"])]
        elif kd in ("l1", "l2"):
            args += ["--labels", stores["float16"]]
        if kd != "none" and s3:
            args += so_args
        if not os.path.exists(os.path.join(run, "final.json")):
            dt = step(*args)
            with open(os.path.join(run, "final.json"), "w") as f:
                json.dump({"seconds": dt}, f)
        with open(os.path.join(run, "final.json")) as f:
            secs = json.load(f)["seconds"]
        res = {"train_seconds": secs}
        for split, man in (("dev", dev), ("test", test)):
            r = cli_json("evaluate", run, man, "--json")
            res[split] = {k: r[k] for k in ("wer", "errors", "words", "cer", "char_errors", "chars")}
        results[kd] = res
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


def result_table(summary: dict) -> str:
    """Markdown: WER per run and relative WER reduction vs no KD (test set)."""
    res = summary["results"]
    base = res.get("none")
    lines = ["| run | labels | dev WER % | test WER % | rel. WER reduction vs no KD (test) | dev CER % | test CER % "
             "| rel. CER reduction vs no KD (test) | train time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    labels = {"none": "-", "mvq": "CI store", "l1": "float16 store", "l2": "float16 store"}

    def rel(kd, r, key):
        if not base or kd == "none" or not base["test"].get(key):
            return "-"
        return f"{100 * (base['test'][key] - r['test'][key]) / base['test'][key]:+.1f}%"

    def pct(r, split, key):
        return f"{100 * r[split][key]:.2f}" if key in r[split] else "n/a"

    for kd, r in res.items():
        label = labels.get(kd) or (f"CI store, {kd[3:]} B/frame" if kd.startswith("mvq") else "")
        lines.append(f"| {kd} | {label} | {pct(r, 'dev', 'wer')} | {pct(r, 'test', 'wer')} "
                     f"| {rel(kd, r, 'wer')} | {pct(r, 'dev', 'cer')} | {pct(r, 'test', 'cer')} "
                     f"| {rel(kd, r, 'cer')} | {r['train_seconds']:.0f} |")
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
