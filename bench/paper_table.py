"""The MVQ-KD experiment in miniature (issue 6) -> docs/results.md + docs/results/*.png.

    .venv/bin/python bench/paper_table.py                # docs/results.md: 10 h teacher split, 1 h 22 min on 2 cores;
                                                         # resumable (a re-run continues from the last finished step)
    .venv/bin/python bench/paper_table.py --report-only  # rewrite the report from bench_out/paper10/summary.json
    .venv/bin/python bench/paper_table.py --hours 3 --workdir bench_out/paper --docs docs/results-3h.md  # the 3 h run
    # the pre-trained teacher (no teacher training), on-the-fly runs timed for 200 steps, three seeds:
    .venv/bin/python bench/paper_table.py --teacher whisper-tiny.en --teacher-layer 4 \
        --runs none,l2,mvq,online-l2,online-mvq --online-max-steps 200 --seeds 0,1,2 --multi-seed-runs none,l2,mvq \
        --workdir bench_out/whisper --docs docs/results-whisper.md        # (not run yet)

Same student, same labelled subset, five runs: no KD, l1 KD and l2 KD (float16 labels from a float store), MVQ-KD
(CI labels from the CI store, 4 B/frame) and MVQ-KD at 2 B/frame ("mvq2": its own quantizer and CI store, the rate
at which a 256-dim teacher's labels are more than 256x smaller than float32). The teacher is trained on the large
split only; the students see only the small split. Everything runs through `ci-store` commands
(distill/experiment.py prints each one as typed), so the numbers in the report come from exactly the code a user
runs. Reports WER on dev/test, relative WER reduction vs no KD, label storage (CI vs float16/float32, with and
without the quantizer kept inside the CI store), extraction time, and plots: training curves, WER bars, storage bars.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill.experiment import Sizes, result_table, run_pipeline, speed_table, storage_table  # noqa: E402

EXPERIMENT = Sizes(hours=10.0, student_hours=0.3, dev_hours=0.05, test_hours=0.1, teacher_d_model=256,
                   teacher_layers=6, teacher_epochs=5, teacher_layer=4, num_codebooks=4, sample_utterances=400,
                   student_epochs=12, student_max_seconds=30.0, student_warmup_steps=50,
                   kd_runs=("none", "l1", "l2", "mvq", "mvq2"))


def _read_log(path: str) -> tuple[list[dict], list[dict]]:
    steps, devs = [], []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            (devs if "dev_wer" in r else steps).append(r)
    return steps, devs


def plots(summary: dict, workdir: str, out_dir: str) -> dict[str, str]:
    """Write the three PNGs; returns {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    runs = list(summary["results"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for kd in runs:
        run_dir = summary["results"][kd].get("run_dir", os.path.join("students", kd))
        steps, devs = _read_log(os.path.join(workdir, run_dir, "log.jsonl"))
        if steps:
            axes[0].plot([r["step"] for r in steps], [r["loss_transducer"] for r in steps], label=kd, lw=1)
            kd_rows = [r for r in steps if "loss_kd" in r]
            if kd_rows:
                axes[1].plot([r["step"] for r in kd_rows], [r["loss_kd"] for r in kd_rows], label=kd, lw=1)
        if devs:
            axes[2].plot([r["epoch"] for r in devs], [100 * r["dev_wer"] for r in devs], marker="o", label=kd)
    axes[0].set(title="transducer loss (per frame)", xlabel="step")
    axes[1].set(title="KD loss (mvq: CE; l1/l2: on standardised labels)", xlabel="step", yscale="log")
    axes[2].set(title="dev WER %", xlabel="epoch")
    for a in axes:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    paths["curves"] = os.path.join(out_dir, "training_curves.png")
    fig.savefig(paths["curves"], dpi=110)
    plt.close(fig)

    fig, axs = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    runs = [kd for kd in runs if "test" in summary["results"][kd]]  # runs stopped early (timed only) have no WER
    xs = range(len(runs))
    for ax, key, name in ((axs[0], "wer", "WER"), (axs[1], "cer", "CER")):
        for i, split in enumerate(("dev", "test")):
            vals = [100 * summary["results"][kd][split].get(key, float("nan")) for kd in runs]
            bars = ax.bar([x + (i - 0.5) * width for x in xs], vals, width, label=split)
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(list(xs), runs)
        ax.set(ylabel=f"{name} %", title=f"student {name} by KD method")
        ax.legend()
    fig.tight_layout()
    paths["wer"] = os.path.join(out_dir, "wer_bars.png")
    fig.savefig(paths["wer"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    st = summary["storage"]
    names, vals = [], []
    for r in st:
        if r["kind"] == "codes":
            names += [r["label"] + "\n(labels only)", r["label"] + "\n(+ quantizer)"]
            vals += [r["label_bytes_per_frame"], r["bytes_per_frame"]]
        else:
            names.append(r["label"])
            vals.append(r["bytes_per_frame"])
    names.append("float32\n(raw)")
    vals.append(4 * st[0]["dim"])
    bars = ax.bar(names, vals, color=["tab:green", "tab:olive"] + ["tab:blue"] * (len(vals) - 2))
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set(yscale="log", ylabel="bytes per frame on storage (log)", title="label storage per teacher frame")
    fig.tight_layout()
    paths["storage"] = os.path.join(out_dir, "storage_bars.png")
    fig.savefig(paths["storage"], dpi=110)
    plt.close(fig)
    return paths


def report(summary: dict, workdir: str, docs: str, command: str) -> str:
    img_dir = os.path.splitext(docs)[0]  # docs/results.md -> docs/results/*.png: one image folder per report
    paths = plots(summary, workdir, img_dir)
    rel = {k: os.path.relpath(v, os.path.dirname(docs)) for k, v in paths.items()}
    s, t, res = summary["sizes"], summary["timings"], summary["results"]
    teacher = summary.get("teacher", {})
    if teacher.get("pretrained"):
        teacher_line = (f"- teacher: pre-trained {teacher.get('name')} ({teacher.get('source')}, "
                        f"{teacher.get('num_layers')} layers, {teacher.get('dim')}-dim frames at "
                        f"{teacher.get('frame_rate')} Hz, {teacher.get('parameters') or 0:,} parameters, checkpoint "
                        f"sha256 {str(teacher.get('checkpoint_sha256'))[:12]}...), not trained here; distilled layer "
                        f"{s['teacher_layer']}")
    else:
        teacher_line = (f"- teacher: native conformer-style CTC model, d_model {s['teacher_d_model']} x "
                        f"{s['teacher_layers']} layers ({teacher.get('parameters') or 0:,} parameters), "
                        f"{s['teacher_epochs']} epochs on the teacher split ({teacher.get('steps')} updates); dev CER "
                        f"{100 * (teacher.get('dev_cer') or 0):.1f}%, dev WER {100 * (teacher.get('dev_wer') or 0):.1f}%"
                        f" (greedy CTC); distilled layer {s['teacher_layer']}")
    ci = next(r for r in summary["storage"] if r["kind"] == "codes")
    frames = ci["frames"]
    missing = [kd for kd in EXPERIMENT.kd_runs if kd not in res]
    lines = [
        "# Results: MVQ-KD in miniature",
        "",
        "Produced by `bench/paper_table.py`; every number below was measured in the run described here "
        "(nothing hand-edited). Re-run the command to reproduce; the run directory keeps every step's output.",
        "",
        f"- command: `{command}`",
        f"- machine: {os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}, "
        f"torch {__import__('torch').__version__} (CPU); date {time.strftime('%Y-%m-%d')}",
        f"- corpus: espeak-ng synthetic English (docs/corpus.md); teacher split {s['hours']} h, student (labelled) "
        f"split {s['student_hours']} h, dev {s['dev_hours']} h, test {s['test_hours']} h; splits share no sentence",
        teacher_line,
        f"- labels: MVQ codec with {s['num_codebooks']} codebooks x 256 (= {s['num_codebooks']} bytes/frame), "
        f"trained on frames of {s['sample_utterances']} randomly drawn teacher-split utterances; float labels "
        f"stored as float16 (the l1/l2 runs read those) and float32 (for the storage comparison)",
        f"- student: transducer {json.dumps(s['student'])}, {s['student_epochs']} epochs, "
        f"{s['student_max_seconds']} s of audio per batch, warmup {s['student_warmup_steps']} steps, seed {s['seed']}; "
        "KD scale: 0.1 for mvq (icefall's), 1.0 for l1/l2",
        "",
        "## Student WER and CER",
        "",
        *([f"**Incomplete: runs not in this report: {', '.join(missing)}.**", ""] if missing else []),
        result_table(summary),
        "",
        f"![WER bars]({rel['wer']})",
        "",
        "## Label storage",
        "",
        f"{frames:,} teacher frames ({frames / 50 / 3600:.2f} h at 50 Hz) of dim {ci['dim']}. "
        "'bytes' is everything on storage (data, index, metadata, failure report, and for the CI store the "
        "quantizer itself, a fixed cost that does not grow with the corpus).",
        "",
        storage_table(summary),
        "",
        f"![storage]({rel['storage']})",
        "",
        "## Training speed: labels from a store vs the teacher on the fly",
        "",
        "steps/s over each run's first epoch before any dev evaluation (log.jsonl); a run stopped early "
        "(online_max_steps) reports its full-schedule time as projected from that rate, not measured.",
        "",
        speed_table(summary),
        "",
        "## Time per step (wall clock, this machine)",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in t.items()],
        *[f"| train student ({kd}) | {r['train_seconds']:.0f} |" for kd, r in res.items()],
        "",
        "## Training curves",
        "",
        f"![curves]({rel['curves']})",
        "",
    ]
    text = "\n".join(lines)
    notes = _hand_written_notes(docs)
    if notes:
        text += "\n" + notes
    with open(docs, "w") as f:
        f.write(text)
    return text


NOTES_HEADING = "## Notes"


def _hand_written_notes(docs: str) -> str:
    """The hand-written '## Notes' section of an existing report (kept on rewrite; it must be re-read by hand)."""
    if not os.path.exists(docs):
        return ""
    with open(docs) as f:
        old = f.read()
    i = old.find("\n" + NOTES_HEADING)
    return old[i + 1:] if i >= 0 else ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench_out/paper10")
    ap.add_argument("--docs", default="docs/results.md")
    ap.add_argument("--hours", type=float, default=EXPERIMENT.hours)
    ap.add_argument("--student-hours", type=float, default=EXPERIMENT.student_hours)
    ap.add_argument("--teacher-epochs", type=int, default=EXPERIMENT.teacher_epochs)
    ap.add_argument("--student-epochs", type=int, default=EXPERIMENT.student_epochs)
    ap.add_argument("--runs", default=",".join(EXPERIMENT.kd_runs),
                    help="comma-separated KD runs (none, l1, l2, mvq, mvqN, online-l2, online-mvq)")
    ap.add_argument("--teacher", default=None, help="pre-trained teacher (path or alias, e.g. whisper-tiny.en) "
                                                    "instead of training the native one")
    ap.add_argument("--teacher-layer", type=int, default=EXPERIMENT.teacher_layer)
    ap.add_argument("--online-max-steps", type=int, default=None, help="stop online-* runs after this many steps")
    ap.add_argument("--seeds", default="0", help="comma-separated student seeds for --multi-seed-runs")
    ap.add_argument("--multi-seed-runs", default="", help="comma-separated runs trained once per seed")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from summary.json")
    a = ap.parse_args(argv)
    command = "python bench/paper_table.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    if a.report_only:
        with open(os.path.join(a.workdir, "summary.json")) as f:
            summary = json.load(f)
        command = summary.get("command", command)
    else:
        sizes = Sizes(**{**EXPERIMENT.__dict__, "hours": a.hours, "student_hours": a.student_hours,
                         "teacher_epochs": a.teacher_epochs, "student_epochs": a.student_epochs,
                         "kd_runs": tuple(a.runs.split(",")), "teacher": a.teacher,
                         "teacher_layer": a.teacher_layer, "online_max_steps": a.online_max_steps,
                         "seeds": tuple(int(x) for x in a.seeds.split(",")),
                         "multi_seed_runs": tuple(x for x in a.multi_seed_runs.split(",") if x)})
        summary = run_pipeline(a.workdir, sizes)
        summary["command"] = command.strip()
        with open(os.path.join(a.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    print(report(summary, a.workdir, a.docs, summary.get("command", command)))


if __name__ == "__main__":
    main()
