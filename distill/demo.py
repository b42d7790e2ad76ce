"""`make demo`: the whole system on a small synthetic corpus, one command, on a 2-core machine.

    python -m distill.demo --workdir demo_out [--s3-endpoint http://127.0.0.1:PORT --s3-bucket NAME]
"""
from __future__ import annotations

import argparse
import json
import time

from distill.experiment import Sizes, result_table, run_pipeline, storage_table

# About 1 h of audio (0.75 h teacher split), sized for well under 20 minutes on 2 CPU cores (install excluded):
# every step does real work and the KD students get off the blank plateau; bench/paper_table.py is the
# experiment (docs/results.md).
DEMO = Sizes(hours=0.75, student_hours=0.15, dev_hours=0.04, test_hours=0.04, teacher_d_model=192, teacher_layers=4,
             teacher_epochs=8, teacher_layer=3, num_codebooks=4, sample_utterances=200, student_epochs=10,
             student_max_seconds=15.0, student_warmup_steps=30, kd_runs=("none", "mvq", "l2"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo_out")
    ap.add_argument("--hours", type=float, default=DEMO.hours, help="teacher training split (hours)")
    ap.add_argument("--student-hours", type=float, default=DEMO.student_hours)
    ap.add_argument("--teacher-epochs", type=int, default=DEMO.teacher_epochs)
    ap.add_argument("--student-epochs", type=int, default=DEMO.student_epochs)
    ap.add_argument("--s3-endpoint", default=None, help="write the label stores to this S3 endpoint instead")
    ap.add_argument("--s3-bucket", default="ci-store-demo")
    a = ap.parse_args(argv)
    sizes = Sizes(**{**DEMO.__dict__, "hours": a.hours, "student_hours": a.student_hours,
                     "teacher_epochs": a.teacher_epochs, "student_epochs": a.student_epochs})
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
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; everything is in {a.workdir}/ "
          f"(summary.json, students/*/curves.png)")
    print(json.dumps(summary["timings"]))


if __name__ == "__main__":
    main()
