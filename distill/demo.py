"""`make demo`: the whole system on a small synthetic corpus, one command, on a 2-core machine.

    python -m distill.demo --workdir demo_out [--s3-endpoint http://127.0.0.1:PORT --s3-bucket NAME]
"""
from __future__ import annotations

import argparse
import json
import time

from distill.experiment import Sizes, result_table, run_pipeline, speed_table, storage_table

# The bundled pre-trained teacher (Whisper tiny.en: 4 layers, 384-dim frames at 50 Hz), so no teacher training:
# the teacher split only feeds the quantizer's frame sample. Students train on 0.15 h (about 36 batches of 15 s an
# epoch, 10 epochs) from the CI store (mvq, 4 B/frame = 384x less than float32), the float16 store (l2), without KD,
# and with the teacher and quantizer in the loop (online-mvq) for 20 steps only, right after 20 steps of its timing
# twin from the CI store: enough to time both, whose full-schedule times are then projected (speed table). Measured
# 2026-12-02: 7 min 35 s from a clean clone on 2 CPU cores, install included (README); bench/paper_table.py is the
# experiment (docs/results.md).
DEMO = Sizes(hours=0.2, student_hours=0.15, dev_hours=0.04, test_hours=0.04, teacher="whisper-tiny.en",
             teacher_layer=4, num_codebooks=4, sample_utterances=150, student_epochs=10, student_max_seconds=15.0,
             student_warmup_steps=30, kd_runs=("none", "mvq", "l2", "online-mvq"), online_max_steps=20)
# `--teacher native`: the previous demo, which trains its own teacher on a 0.75 h split first (measured well under
# 20 minutes on 2 cores)
NATIVE_DEMO = Sizes(hours=0.75, student_hours=0.15, dev_hours=0.04, test_hours=0.04, teacher_d_model=192,
                    teacher_layers=4, teacher_epochs=8, teacher_layer=3, num_codebooks=4, sample_utterances=200,
                    student_epochs=10, student_max_seconds=15.0, student_warmup_steps=30,
                    kd_runs=("none", "mvq", "l2"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo_out")
    ap.add_argument("--teacher", default=DEMO.teacher,
                    help="pre-trained teacher (checkpoint path or alias), or 'native' to train one first")
    ap.add_argument("--hours", type=float, default=None, help="teacher split (hours)")
    ap.add_argument("--student-hours", type=float, default=None)
    ap.add_argument("--teacher-epochs", type=int, default=None, help="--teacher native only")
    ap.add_argument("--student-epochs", type=int, default=None)
    ap.add_argument("--s3-endpoint", default=None, help="write the label stores to this S3 endpoint instead")
    ap.add_argument("--s3-bucket", default="ci-store-demo")
    a = ap.parse_args(argv)
    base = NATIVE_DEMO if a.teacher == "native" else Sizes(**{**DEMO.__dict__, "teacher": a.teacher})
    given = {"hours": a.hours, "student_hours": a.student_hours, "teacher_epochs": a.teacher_epochs,
             "student_epochs": a.student_epochs}
    sizes = Sizes(**{**base.__dict__, **{k: v for k, v in given.items() if v is not None}})
    s3 = None
    if a.s3_endpoint:
        opts = {"endpoint_url": a.s3_endpoint, "client_kwargs": {"region_name": "eu-west-1"}}
        import s3fs

        fs = s3fs.S3FileSystem(**opts)
        if not fs.exists(a.s3_bucket):
            fs.mkdir(a.s3_bucket)
        s3 = {"url": f"s3://{a.s3_bucket}/demo", "storage_options": opts}
    t0 = time.perf_counter()
    summary = run_pipeline(a.workdir, sizes, s3=s3)
    print("\n## Label storage\n")
    print(storage_table(summary))
    print("\n## Students (same model, same labelled subset)\n")
    print(result_table(summary))
    print("\n## Training speed: labels from a store vs the teacher on the fly\n")
    print(speed_table(summary))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; everything is in {a.workdir}/ "
          f"(summary.json, students/*/curves.png)")
    print(json.dumps(summary["timings"]))


if __name__ == "__main__":
    main()
