"""Data-parallel student training throughput: W processes (torch.distributed) vs 1 process doing the same updates.

    nice -n 10 .venv/bin/python bench/ddp_throughput.py                               # CPU, gloo, 2 processes
    .venv/bin/python bench/ddp_throughput.py --backend nccl --device cuda --world-size 2 --threads 4   # 2 GPUs

Both runs make identical updates: the single process uses --accum-grad W (W batches per update), the W-process
run --accum-grad 1 (one batch per rank per update; see distill/student/distributed.py), on a cached synthetic
espeak-ng corpus (--minutes of audio, bench/_common.cached_corpus) with a small student (--student JSON). Each run
trains --epochs epochs (default 2); only the last epoch is timed (from the trainer's per-update log: the first
epoch computes and caches the features, and process start-up is not training), giving utterances/s and audio
seconds/s of training, and the ratio W-process / 1-process. On CPU each process gets --threads torch threads
(the 1-process run too), so on a machine with fewer than W x threads free cores expect a ratio <= 1: the
processes share the cores and add an all-reduce per update.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cached_corpus, load_line, machine_state, table, write_json  # noqa: E402

SMALL = {"d_model": 96, "num_layers": 4, "num_heads": 4, "dropout": 0.0}


def _last_epoch(log_path: str, epochs: int) -> dict:
    recs = [r for r in map(json.loads, open(log_path)) if "loss" in r]
    prev = [r for r in recs if r["epoch"] <= epochs - 1]
    last = [r for r in recs if r["epoch"] > epochs - 1]
    t0 = prev[-1]["time"] if prev else 0.0
    secs = last[-1]["time"] - t0
    utts = sum(r["utterances"] for r in last)
    audio = sum(r["audio_seconds"] for r in last)
    return {"updates": len(last), "seconds": secs, "utterances": utts, "audio_seconds": audio,
            "utterances_per_s": utts / secs, "audio_seconds_per_s": audio / secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                    help="gloo with --device cpu, nccl with --device cuda (the trainer picks it by device).")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (each rank on cuda:LOCAL_RANK).")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--minutes", type=float, default=4.0, help="Minutes of synthetic training audio.")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=10.0, help="Audio seconds per batch.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process.")
    ap.add_argument("--student", default=json.dumps(SMALL), help="Student architecture JSON.")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "ci-store-bench", "ddp"))
    ap.add_argument("--json", default=None, help="Also write the results here.")
    args = ap.parse_args()
    if (args.backend == "nccl") != args.device.startswith("cuda"):
        ap.error("--backend nccl goes with --device cuda, gloo with --device cpu")

    from distill.student.trainer import TrainConfig, train_student

    W = args.world_size
    train, made = cached_corpus(os.path.join(args.work, "corpus"), args.minutes, seed=5)
    print(f"corpus {train} ({args.minutes} min{f', made in {made:.0f} s' if made else ', cached'}); {load_line()}")
    results = {}
    for name, world, accum in (("1 process", None, W), (f"{W} processes", W, 1)):
        out = os.path.join(args.work, f"run-{world or 1}")
        shutil.rmtree(out, ignore_errors=True)
        cfg = TrainConfig(kd="none", epochs=args.epochs, max_seconds=args.max_seconds, warmup_steps=5, log_every=1,
                          checkpoint_every=0, threads=args.threads, accum_grad=accum, dtype=args.dtype)
        train_student(train, out, cfg=cfg, student=json.loads(args.student), progress=False, device=args.device,
                      world_size=world, log=print)
        results[name] = _last_epoch(os.path.join(out, "log.jsonl"), args.epochs)
        print(f"  {name}: {results[name]['updates']} updates in {results[name]['seconds']:.1f} s; {load_line()}")
    one, many = results["1 process"], results[f"{W} processes"]
    ratio = many["utterances_per_s"] / one["utterances_per_s"]
    print()
    print(table(["run", "updates", "seconds", "utterances/s", "audio s/s"],
                [[k, v["updates"], v["seconds"], v["utterances_per_s"], v["audio_seconds_per_s"]]
                 for k, v in results.items()]))
    print(f"\n{W} processes / 1 process (same updates): {ratio:.2f}x  [{args.backend}, {args.device}, "
          f"{args.threads} thread(s) per process, {os.cpu_count()} CPUs]")
    write_json(args.json, {"args": vars(args), "machine": machine_state(), "results": results, "ratio": ratio})


if __name__ == "__main__":
    main()
