"""The MVQ-KD experiment in miniature (issues 6 and 18) -> docs/results.md + docs/results/*.png.

    .venv/bin/python bench/paper_table.py                # docs/results.md: Whisper tiny.en teacher, ~2 h on 2 cores;
                                                         # resumable (a re-run continues from the last finished step)
    .venv/bin/python bench/paper_table.py --report-only  # rewrite the report from bench_out/whisper/summary.json
    .venv/bin/python bench/paper_table.py --teacher native --workdir bench_out/paper10 --docs docs/results-native-10h.md
                                                         # the earlier experiment: a native teacher trained on 10 h

The default run: the bundled pre-trained Whisper tiny.en teacher (not trained here) labels a synthetic corpus; a
small sweep picks the distilled layer (one short MVQ student per layer, best dev CER); then, on the same 1 h
labelled split and the same budget, students with no KD, l1 and l2 KD (float16 labels from a float store), MVQ-KD
at 4 B/frame and 8 B/frame (CI stores), three seeds for none / l2 / mvq, and the two on-the-fly runs (the teacher
labels every batch: online-l2, online-mvq) timed for a fixed number of steps beside their timing twins (the same
KD from the store, same steps, run alone right before). Everything runs through `ci-store` commands
(distill/experiment.py prints each one as typed), so the report's numbers come from exactly the code a user runs:
WER/CER (mean +- std over seeds), label storage (and the same extrapolated to LibriSpeech 960 h / GigaSpeech 10k h),
training speed from a store vs on the fly, extraction time once vs teacher time per epoch, and plots.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill.experiment import (Sizes, difference_table, extraction_table, extrapolation_table,  # noqa: E402
                                make_corpus, mean_std, per_seed, result_table, run_pipeline, speed_table,
                                storage_table)

EXPERIMENT = Sizes(hours=1.2, student_hours=1.0, dev_hours=0.1, test_hours=0.15, teacher="whisper-tiny.en",
                   teacher_layer=4, num_codebooks=4, sample_utterances=400, student_epochs=8,
                   student_max_seconds=30.0, student_warmup_steps=50, rnnt_loss="pruned",
                   kd_runs=("none", "l1", "l2", "mvq", "mvq8", "online-l2", "online-mvq"), online_max_steps=100,
                   seeds=(0, 1, 2), multi_seed_runs=("none", "l2", "mvq"), parallel_runs=2)
SWEEP_LAYERS = (2, 3, 4)  # Whisper tiny.en's encoder has 4 layers; layer 1 is too close to the fbank input
SWEEP_EPOCHS = 3
# `--teacher native`: the earlier experiment (docs/results-native-10h.md), a native teacher trained on 10 h
NATIVE = Sizes(hours=10.0, student_hours=0.3, dev_hours=0.05, test_hours=0.1, teacher_d_model=256,
               teacher_layers=6, teacher_epochs=5, teacher_layer=4, num_codebooks=4, sample_utterances=400,
               student_epochs=12, student_max_seconds=30.0, student_warmup_steps=50, rnnt_loss="full",
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

    fig, axs = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.38
    runs = [kd for kd in runs if "test" in summary["results"][kd]]  # runs stopped early (timed only) have no WER
    xs = range(len(runs))
    for ax, key, name in ((axs[0], "wer", "WER"), (axs[1], "cer", "CER")):
        for i, split in enumerate(("dev", "test")):
            stats = [mean_std([100 * x[split][key] for x in per_seed(summary["results"][kd])]) for kd in runs]
            bars = ax.bar([x + (i - 0.5) * width for x in xs], [m for m, _ in stats], width, label=split,
                          yerr=[sd for _, sd in stats], capsize=3)
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(list(xs), [f"{kd}\n({len(per_seed(summary['results'][kd]))} seeds)"
                                 if len(per_seed(summary["results"][kd])) > 1 else kd for kd in runs])
        ax.set(ylabel=f"{name} %", title=f"student {name} by KD method (mean, error bar: std over seeds)")
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


def layer_sweep(workdir: str, base: Sizes, layers: tuple, epochs: int) -> dict:
    """Pick the distilled layer: per layer, the teacher's frames, a quantizer and a CI store (each made alone, so
    the extraction time is clean), then one short MVQ student per layer (`parallel_runs` at a time) on the shared
    corpus; the best dev CER wins. Resumable like the pipeline; the chosen layer's quantizer and stores are reused by
    the main run (same corpus, sample, codebooks and seed make them the same files)."""
    t = make_corpus(workdir, base)
    if t is not None:  # the main run finds the corpus made: keep its time for the report
        with open(os.path.join(workdir, "timings.json"), "w") as f:
            json.dump({"corpus": t}, f, indent=1)
    common = {"teacher_layer": None, "student_epochs": epochs, "seeds": (base.seed,), "multi_seed_runs": (),
              "online_max_steps": None}

    def sizes_for(layer: int, runs: tuple) -> Sizes:
        return Sizes(**{**base.__dict__, **common, "teacher_layer": layer, "kd_runs": runs})

    def prepared(layer: int) -> str:
        d = os.path.join(workdir, "sweep", f"layer-{layer}")
        os.makedirs(d, exist_ok=True)
        if not os.path.exists(os.path.join(d, "corpus")):
            os.symlink(os.path.abspath(os.path.join(workdir, "corpus")), os.path.join(d, "corpus"))
        return d

    for layer in layers:  # frames, quantizer and extraction: one layer at a time
        run_pipeline(prepared(layer), sizes_for(layer, ()))

    def student(layer: int) -> tuple[int, dict]:
        s = run_pipeline(prepared(layer), Sizes(**{**sizes_for(layer, ("mvq",)).__dict__,
                                                   "threads": max(1, base.threads // base.parallel_runs)}))
        r = s["results"]["mvq"]
        return layer, {"dev_wer": r["dev"]["wer"], "dev_cer": r["dev"]["cer"], "test_wer": r["test"]["wer"],
                       "test_cer": r["test"]["cer"], "steps": r["steps"], "train_seconds": r["train_seconds"]}

    with ThreadPoolExecutor(max(1, base.parallel_runs)) as ex:
        by_layer = dict(ex.map(student, layers))
    chosen = min(by_layer, key=lambda k: by_layer[k]["dev_cer"])
    sweep = {"layers": {str(k): v for k, v in by_layer.items()}, "chosen": chosen, "epochs": epochs,
             "num_codebooks": base.num_codebooks}
    with open(os.path.join(workdir, "sweep", "sweep.json"), "w") as f:
        json.dump(sweep, f, indent=1)
    return sweep


def reuse_sweep_outputs(workdir: str, layer: int) -> None:
    """Point the main run's quantizer/ and labels/ at the chosen sweep layer's (identical inputs, so identical
    files; the pipeline then skips those steps) and carry their measured times over."""
    src = os.path.join(workdir, "sweep", f"layer-{layer}")
    for name in ("quantizer", "labels"):
        if not os.path.exists(os.path.join(workdir, name)) and os.path.exists(os.path.join(src, name)):
            os.symlink(os.path.abspath(os.path.join(src, name)), os.path.join(workdir, name))
    path, src_t = os.path.join(workdir, "timings.json"), os.path.join(src, "timings.json")
    timings = json.load(open(path)) if os.path.exists(path) else {}
    if os.path.exists(src_t):
        for k, v in json.load(open(src_t)).items():
            if k != "corpus":
                timings.setdefault(k, v)
        with open(path, "w") as f:
            json.dump(timings, f, indent=1)


def sweep_table(sweep: dict) -> str:
    lines = ["| layer | dev WER % | dev CER % | test WER % | test CER % | updates | train time (s) |",
             "|---|---|---|---|---|---|---|"]
    for k, r in sweep["layers"].items():
        mark = " (chosen)" if int(k) == sweep["chosen"] else ""
        lines.append(f"| {k}{mark} | {100 * r['dev_wer']:.2f} | {100 * r['dev_cer']:.2f} | {100 * r['test_wer']:.2f} "
                     f"| {100 * r['test_cer']:.2f} | {r['steps']} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


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
    missing = [kd for kd in s["kd_runs"] if kd not in res]
    sweep = summary.get("layer_sweep")
    n_seeds = max(len(per_seed(r)) for r in res.values()) if res else 1
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
        f"- student: transducer {json.dumps(s['student'])} ({s.get('rnnt_loss') or 'default'} RNN-T loss), "
        f"{s['student_epochs']} epochs, {s['student_max_seconds']} s of audio per batch, warmup "
        f"{s['student_warmup_steps']} steps, seed {s['seed']}"
        + (f" (and seeds {', '.join(str(k) for k in s['seeds'])} for {', '.join(s['multi_seed_runs'])})"
           if s.get("multi_seed_runs") and n_seeds > 1 else "")
        + "; KD scale: 0.1 for mvq (icefall's), 1.0 for l1/l2; "
        f"{s.get('parallel_runs', 1)} students from stores trained at a time with "
        f"{max(1, s.get('threads', 2) // s.get('parallel_runs', 1))} torch thread(s) each",
        *([] if not sweep else [
            "",
            "## Distilled layer: a small sweep",
            "",
            f"One MVQ student ({sweep['num_codebooks']} codebooks, {sweep['epochs']} epochs, seed {s['seed']}) per "
            f"teacher layer, same corpus and labelled split; the layer with the best dev CER is distilled below.",
            "",
            sweep_table(sweep)]),
        "",
        "## Student WER and CER",
        "",
        *([f"**Incomplete: runs not in this report: {', '.join(missing)}.**", ""] if missing else []),
        result_table(summary),
        "",
        "Differences on the test set, in percentage points, with the standard error of the difference "
        "(sqrt(sd_a^2/n_a + sd_b^2/n_b), sd over seeds):",
        "",
        difference_table(summary),
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
        "The same label bytes per frame at full corpus size (frames at the teacher's rate; the quantizer added once):",
        "",
        extrapolation_table(summary),
        "",
        f"![storage]({rel['storage']})",
        "",
        "## Training speed: labels from a store vs the teacher on the fly",
        "",
        "steps/s over each run's first epoch before any dev evaluation (log.jsonl); a run stopped early "
        "(online_max_steps) reports its full-schedule time as projected from that rate, not measured. Students "
        "trained in parallel share the cores, so their steps/s are lower than a run alone; the on-the-fly runs "
        "and their timing twins (`timed-*`: the same KD from the store, same steps, same threads) ran one at a "
        "time, back to back, and their ratio is the comparison to read.",
        "",
        speed_table(summary),
        "",
        "Labelling once vs labelling every epoch:",
        "",
        extraction_table(summary),
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
    ap.add_argument("--workdir", default="bench_out/whisper")
    ap.add_argument("--docs", default="docs/results.md")
    ap.add_argument("--teacher", default=EXPERIMENT.teacher,
                    help="pre-trained teacher (path or alias), or 'native' to train one first (the earlier experiment)")
    ap.add_argument("--teacher-layer", type=int, default=None,
                    help="distilled layer (default: the sweep's choice; 'native': its layer 4)")
    ap.add_argument("--sweep-layers", default=",".join(map(str, SWEEP_LAYERS)),
                    help="comma-separated layers of the layer sweep ('' to skip it: then give --teacher-layer)")
    ap.add_argument("--sweep-epochs", type=int, default=SWEEP_EPOCHS)
    ap.add_argument("--hours", type=float, default=None)
    ap.add_argument("--student-hours", type=float, default=None)
    ap.add_argument("--teacher-epochs", type=int, default=None)
    ap.add_argument("--student-epochs", type=int, default=None)
    ap.add_argument("--runs", default=None, help="comma-separated KD runs (none, l1, l2, mvq, mvqN, online-l2, "
                                                 "online-mvq); default: " + ",".join(EXPERIMENT.kd_runs))
    ap.add_argument("--online-max-steps", type=int, default=None, help="stop online-* runs after this many steps")
    ap.add_argument("--seeds", default=None, help="comma-separated student seeds for --multi-seed-runs")
    ap.add_argument("--multi-seed-runs", default=None, help="comma-separated runs trained once per seed")
    ap.add_argument("--parallel-runs", type=int, default=None, help="students from stores trained at a time")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from summary.json")
    a = ap.parse_args(argv)
    command = "python bench/paper_table.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    if a.report_only:
        with open(os.path.join(a.workdir, "summary.json")) as f:
            summary = json.load(f)
        command = summary.get("command", command)
    else:
        native = a.teacher == "native"
        base = NATIVE if native else Sizes(**{**EXPERIMENT.__dict__, "teacher": a.teacher})
        given = {"hours": a.hours, "student_hours": a.student_hours, "teacher_epochs": a.teacher_epochs,
                 "student_epochs": a.student_epochs, "online_max_steps": a.online_max_steps,
                 "parallel_runs": a.parallel_runs, "teacher_layer": a.teacher_layer,
                 "kd_runs": tuple(a.runs.split(",")) if a.runs else None,
                 "seeds": tuple(int(x) for x in a.seeds.split(",")) if a.seeds else None,
                 "multi_seed_runs": (tuple(x for x in a.multi_seed_runs.split(",") if x)
                                     if a.multi_seed_runs is not None else None)}
        sizes = Sizes(**{**base.__dict__, **{k: v for k, v in given.items() if v is not None}})
        sweep = None
        layers = tuple(int(x) for x in a.sweep_layers.split(",") if x)
        if not native and a.teacher_layer is None and layers:
            sweep = layer_sweep(a.workdir, sizes, layers, a.sweep_epochs)
            sizes = Sizes(**{**sizes.__dict__, "teacher_layer": sweep["chosen"]})
            reuse_sweep_outputs(a.workdir, sweep["chosen"])
        summary = run_pipeline(a.workdir, sizes)
        if sweep:
            summary["layer_sweep"] = sweep
        summary["command"] = command.strip()
        with open(os.path.join(a.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    print(report(summary, a.workdir, a.docs, summary.get("command", command)))


if __name__ == "__main__":
    main()
