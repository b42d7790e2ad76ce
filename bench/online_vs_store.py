"""Training speed with stored labels vs the teacher in the loop (on-the-fly KD): the paper's third claim.

Both runs train the same student on the same batches with the same labels (tests/test_online_teacher.py proves
the logged losses equal); the store run reads labels from a store extracted once, the on-the-fly run embeds every
batch with the teacher (and, for mvq, encodes with the quantizer) on --device. Printed: steps/s of both over steps
2..N (step 1 holds one-off warm-up), their ratio (on-the-fly / store), the share of the on-the-fly run's time spent
in the teacher (log.jsonl's teacher_seconds) and the one-off extraction time the store cost.

    python bench/online_vs_store.py [--corpus DIR] [--teacher whisper-tiny.en --layer 4] [--kd mvq|l2]
                                    [--steps 30] [--work DIR] [--json F]

Without --corpus a small synthetic corpus is made in WORK/corpus (`ci-store make-corpus`'s make_corpus).
"""
from __future__ import annotations

import argparse
import json
import os
import time

from _common import load_line, machine_state, table, write_json


def _corpus(args) -> str:
    if args.corpus:
        return os.path.join(args.corpus, "cuts_train.jsonl.gz")
    from distill.synth.corpus import make_corpus

    out = os.path.join(args.work, "corpus")
    if not os.path.exists(os.path.join(out, "cuts_train.jsonl.gz")):
        make_corpus(out, hours=args.hours, dev_hours=0.001, test_hours=0.001, seed=0, workers=1, progress=False)
    return os.path.join(out, "cuts_train.jsonl.gz")


def _store(args, manifest) -> tuple[str, str | None, float]:
    """(label store URL, quantizer path or None, extraction seconds), extracted once into WORK."""
    import numpy as np

    from distill.codec.quantizer import MultiCodebookQuantizer
    from distill.extract.frames import sample_frames
    from distill.extract.job import ExtractionConfig, run_extraction

    qpath = os.path.join(args.work, f"q-layer{args.layer}.safetensors")
    if not os.path.exists(qpath):
        frames = sample_frames(manifest, args.teacher, args.layer, num_utterances=50, seed=0, progress=False)
        MultiCodebookQuantizer.train(np.asarray(frames), num_codebooks=args.num_codebooks, seed=0,
                                     progress=False).save(qpath)
    ci, f32 = os.path.join(args.work, "ci"), os.path.join(args.work, "f32")
    t0 = time.perf_counter()
    cfg = ExtractionConfig(teacher=args.teacher, layer=args.layer, quantizer=qpath, out=ci, float_labels=[f32],
                           float_dtype=["float32"], device=args.device)
    run_extraction(manifest, cfg, workers=1, progress=False)  # skips the shards an earlier call completed
    secs = time.perf_counter() - t0
    return (ci, qpath, secs) if args.kd == "mvq" else (f32, None, secs)


def _train(args, manifest, out, **source) -> dict:
    from distill.student.trainer import TrainConfig, train_student

    cfg = TrainConfig(kd=args.kd, kd_scale=0.1 if args.kd == "mvq" else 1.0, epochs=args.steps,
                      max_seconds=args.max_seconds, warmup_steps=10, log_every=1, checkpoint_every=0,
                      threads=args.threads, num_workers=args.num_workers)
    student = {**json.loads(args.student), "rnnt_loss": "pruned"}
    train_student(manifest, out, cfg=cfg, student=student, progress=False, stop_after_steps=args.steps,
                  device=args.device, **source)
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl")) if '"loss"' in line]
    first, last = recs[0], recs[-1]
    span = last["time"] - first["time"]
    return {"steps": last["step"], "seconds": last["time"], "steps_per_s": (last["step"] - first["step"]) / span,
            "teacher_seconds": last.get("teacher_seconds"), "utterances": sum(r["utterances"] for r in recs),
            "loss_kd_last": last.get("loss_kd")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=None, help="make-corpus output folder (its cuts_train.jsonl.gz)")
    ap.add_argument("--hours", type=float, default=0.05, help="size of the synthetic corpus made without --corpus")
    ap.add_argument("--teacher", default="whisper-tiny.en")
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--kd", choices=["mvq", "l2", "l1"], default="mvq")
    ap.add_argument("--num-codebooks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--student", default='{"d_model": 96, "num_layers": 4}', help="student overrides (JSON)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default="/tmp/online_vs_store")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import shutil

    from distill.student.online_teacher import OnlineTeacherSpec

    os.makedirs(args.work, exist_ok=True)
    manifest = _corpus(args)
    labels, qpath, extract_s = _store(args, manifest)
    runs = {}
    for name in ("store", "online"):
        out = os.path.join(args.work, f"run-{args.kd}-{name}")
        shutil.rmtree(out, ignore_errors=True)  # a fresh run each time, not a resume
        source = ({"labels": labels} if name == "store" else
                  {"online_teacher": OnlineTeacherSpec(args.teacher, layer=args.layer, quantizer=qpath)})
        runs[name] = _train(args, manifest, out, **source)
        print(f"{name}: {runs[name]['steps_per_s']:.3f} steps/s ({load_line()})", flush=True)
    ratio = runs["online"]["steps_per_s"] / runs["store"]["steps_per_s"]
    on = runs["online"]
    rows = [[n, r["steps"], r["utterances"], r["seconds"], r["steps_per_s"],
             r["teacher_seconds"] if r["teacher_seconds"] is not None else float("nan")] for n, r in runs.items()]
    print(table(["labels", "steps", "utterances", "seconds", "steps/s", "teacher s"], rows))
    print(f"on-the-fly / store steps/s: {ratio:.3f}; teacher share of the on-the-fly run: "
          f"{on['teacher_seconds'] / on['seconds']:.1%}; one-off extraction (incl. float store, or 0 when reused): "
          f"{extract_s:.1f} s")
    write_json(args.json, {"args": vars(args), "machine": machine_state(), "runs": runs, "ratio": ratio,
                           "extraction_seconds": extract_s})


if __name__ == "__main__":
    main()
