"""Student training step: full vs pruned RNN-T loss, time and peak memory, with pruned/full ratios.

Each (size, loss) runs in its own subprocess so peak memory is that configuration's alone: on CPU the growth of
the process's peak RSS (resource.getrusage ru_maxrss) over the training steps above what the model, optimizer and
batch held before the first step; on CUDA torch.cuda.max_memory_allocated over the steps above the allocation
before them. Timings are medians over --steps steps
after one warm-up step, and split into
  step:      encoder + transducer loss + backward + AdamW (what the trainer does per batch, no KD head)
  loss:      transducer loss forward + backward alone, encoder output given (the part the two losses change)
  recursion: the anti-diagonal alpha recursion forward + backward alone on a random [B, T, U+1] lattice (T+U
             Python steps; the same code runs in both losses, on the full lattice and the scattered pruned one)

Sizes: "experiment" is the student of distill/experiment.py (d_model 144, 4 layers, character vocabulary) on a
30-second batch of the synthetic corpus (8 x 4 s utterances: 100 encoder frames, ~60 characters); "librispeech"
is B=16, T=500 encoder frames (20 s), U=100 tokens, V=500 (BPE-500 as icefall's LibriSpeech recipes).

With --train-steps N it instead trains the experiment's student (no KD) with each loss for N steps on a synthetic
espeak-ng corpus (ci-store's trainer, 30-second batches) and reports seconds per step, the full RNN-T NLL per
frame on the dev split (the pruned student scored with the full loss on its own weights) and greedy dev CER/WER.

    nice -n 10 python bench/rnnt_step.py --threads 2 --steps 3
    nice -n 10 python bench/rnnt_step.py --threads 2 --train-steps 200
    python bench/rnnt_step.py --device cuda --steps 10
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import load_line, machine_state, table, write_json  # noqa: E402

SIZES = {
    "experiment": dict(B=8, T=100, U=60, V=32, student={"d_model": 144, "num_layers": 4, "num_heads": 4}),
    "librispeech": dict(B=16, T=500, U=100, V=500, student={"d_model": 144, "num_layers": 4, "num_heads": 4}),
}


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def one_config(size: str, loss: str, device: str, steps: int, prune_range: int, seed: int = 0) -> dict:
    """Runs inside the subprocess: build student + batch, time the parts, measure the step's peak memory."""
    import torch

    from distill.student.model import StudentConfig, Transducer
    from distill.student.rnnt_loss import transducer_forward

    s = SIZES[size]
    B, T, U, V = s["B"], s["T"], s["U"], s["V"]
    torch.manual_seed(seed)
    cfg = StudentConfig(vocab_size=V, rnnt_loss=loss, prune_range=prune_range, dropout=0.0, **s["student"])
    model = Transducer(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # lengths spread over [0.7, 1] of the maximum, as a duration-bucketed batch
    feat_T = T * cfg.subsampling
    feat_lens = torch.linspace(feat_T, int(0.7 * feat_T), B).long()
    token_lens = torch.linspace(U, int(0.7 * U), B).long()
    batch = {"feats": torch.randn(B, feat_T, cfg.num_mel_bins, device=device), "feat_lens": feat_lens.to(device),
             "tokens": torch.randint(1, V, (B, U), device=device), "token_lens": token_lens.to(device)}

    def step():
        total, parts = model.compute_loss(batch)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return parts

    def timed(fn, n):
        out = []
        for _ in range(n):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t0)
        return out

    # memory base: model, optimizer and batch exist, no step has run (the steps add activations, gradients and
    # the AdamW state, which is 2x the parameters: 8 * params bytes)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up: allocator pools, lazy inits, AdamW state
    step_times = timed(step, steps)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    parts = step()

    with torch.no_grad():
        enc_out, enc_lens, _ = model.encode(batch["feats"], batch["feat_lens"])
    enc_out = enc_out.detach().requires_grad_()

    def loss_only():
        model.transducer_loss(enc_out, enc_lens, batch["tokens"], batch["token_lens"]).backward()

    loss_only()
    loss_times = timed(loss_only, steps)
    lpb = torch.randn(B, T, U + 1, device=device).log_softmax(-1).requires_grad_()
    lpl = torch.randn(B, T, U, device=device).log_softmax(-1).requires_grad_()

    def recursion():
        transducer_forward(lpb, lpl, enc_lens, batch["token_lens"]).sum().backward()

    recursion()
    rec_times = timed(recursion, steps)
    return {"size": size, "loss": loss, "device": device, "B": B, "T": T, "U": U, "V": V,
            "prune_range": prune_range if loss == "pruned" else None, "params": model.num_params(),
            "step_s": statistics.median(step_times), "loss_s": statistics.median(loss_times),
            "recursion_s": statistics.median(rec_times), "step_peak_bytes": peak,
            "parts": {k: v for k, v in parts.items() if isinstance(v, float)}}


def train_compare(steps: int, threads: int, corpus_dir: str, minutes: float, prune_range: int) -> list[dict]:
    """Train full and pruned students for `steps` steps each; dev full-NLL/frame, CER, WER, seconds/step."""
    import shutil

    import torch

    from distill.data.dataset import KDDataset, collate
    from distill.data.manifest import load_manifest
    from distill.data.tokenizer import load_tokenizer
    from distill.experiment import Sizes
    from distill.student.model import StudentConfig, Transducer
    from distill.student.trainer import TrainConfig, evaluate_model, load_student, read_log, train_student
    from distill.synth.corpus import make_corpus

    paths_file = os.path.join(corpus_dir, "paths.json")
    if not os.path.exists(paths_file):
        paths = make_corpus(os.path.join(corpus_dir, "corpus"), hours=minutes / 60, dev_hours=minutes / 600,
                            test_hours=0, seed=0, progress=False, overwrite=True)
        with open(paths_file, "w") as f:
            json.dump(paths, f)
    with open(paths_file) as f:
        paths = json.load(f)
    sizes = Sizes()
    out = []
    for loss in ("full", "pruned"):
        run = os.path.join(corpus_dir, f"run-{loss}-{steps}")
        shutil.rmtree(run, ignore_errors=True)
        cfg = TrainConfig(kd="none", epochs=1000, max_seconds=sizes.student_max_seconds, lr=2e-3,
                          warmup_steps=sizes.student_warmup_steps, threads=threads, log_every=1, checkpoint_every=0)
        student = {**sizes.student, "rnnt_loss": loss, "prune_range": prune_range}
        t0 = time.perf_counter()
        train_student(paths["train"], run, cfg=cfg, student=student, progress=False, stop_after_steps=steps,
                      log=lambda *a: None)
        wall = time.perf_counter() - t0
        recs = [r for r in read_log(os.path.join(run, "log.jsonl")) if "loss" in r]
        model, tok = load_student(run)
        # the full NLL of the trained weights (a pruned student's extra simple projections are not used)
        full_twin = Transducer(StudentConfig.from_dict({**model.cfg.to_dict(), "rnnt_loss": "full"})).eval()
        full_twin.load_state_dict(model.state_dict(), strict=False)
        dev = load_manifest(paths["dev"])
        ds = KDDataset(dev, load_tokenizer(os.path.join(run, "tokenizer.json")))
        nll = frames = 0.0
        with torch.no_grad():
            for i in range(0, len(dev), 8):
                batch = collate([ds[j] for j in range(i, min(len(dev), i + 8))])
                _, parts = full_twin.compute_loss(batch)
                nll += parts["transducer"] * parts["frames"]
                frames += parts["frames"]
        res = evaluate_model(model, tok, dev)
        out.append({"loss": loss, "steps": steps, "train_wall_s": wall,
                    "s_per_step": (recs[-1]["time"] - recs[0]["time"]) / max(1, recs[-1]["step"] - recs[0]["step"]),
                    "dev_full_nll_per_frame": nll / frames, "dev_cer": res["cer"], "dev_wer": res["wer"],
                    "last_logged_loss_transducer": recs[-1]["loss_transducer"]})
        print(f"  {loss:<6} {out[-1]}  {load_line()}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="experiment,librispeech")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    ap.add_argument("--prune-range", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--train-steps", type=int, default=0, help="train both students this many steps instead")
    ap.add_argument("--corpus-dir", default="/tmp/rnnt-step-bench", help="synthetic corpus + runs (--train-steps)")
    ap.add_argument("--minutes", type=float, default=18.0, help="synthetic training audio (--train-steps)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: size,loss in a subprocess
    a = ap.parse_args()
    if a.one:
        import torch

        torch.set_num_threads(a.threads)
        size, loss = a.one.split(",")
        print(json.dumps(one_config(size, loss, a.device, a.steps, a.prune_range)))
        return
    print(f"{load_line()}; torch threads {a.threads}; device {a.device}")
    if a.train_steps:
        import torch

        torch.set_num_threads(a.threads)
        res = train_compare(a.train_steps, a.threads, a.corpus_dir, a.minutes, a.prune_range)
        f, p = res
        keys = ["s_per_step", "dev_full_nll_per_frame", "dev_cer", "dev_wer"]
        print()
        print(table(["measure", "full", f"pruned (R={a.prune_range})", "pruned/full"],
                    [[k, f[k], p[k], p[k] / f[k] if f[k] else float("nan")] for k in keys]))
        print(load_line())
        write_json(a.json, {"machine": machine_state(), "args": vars(a), "results": res})
        return
    rows, results = [], []
    for size in a.sizes.split(","):
        if size not in SIZES:
            raise SystemExit(f"unknown size {size!r}; choose from {sorted(SIZES)}")
        pair = {}
        for loss in ("full", "pruned"):
            cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{size},{loss}", "--device", a.device,
                   "--steps", str(a.steps), "--threads", str(a.threads), "--prune-range", str(a.prune_range)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{size}/{loss} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            pair[loss] = r
            results.append(r)
            print(f"  {size:<12} {loss:<6} step {r['step_s']:.3f}s  loss {r['loss_s']:.3f}s  recursion "
                  f"{r['recursion_s']:.3f}s  step peak {r['step_peak_bytes'] / 2**20:,.0f} MiB  {load_line()}",
                  flush=True)
        f, p = pair["full"], pair["pruned"]
        sz = f"{size} (B={f['B']}, T={f['T']}, U={f['U']}, V={f['V']})"
        for key, name in (("step_s", "step time (s)"), ("loss_s", "loss fwd+bwd (s)"),
                          ("recursion_s", "recursion fwd+bwd (s)")):
            rows.append([sz, name, f[key], p[key], p[key] / f[key]])
        rows.append([sz, "recursion share of loss", f["recursion_s"] / f["loss_s"], p["recursion_s"] / p["loss_s"],
                     float("nan")])
        mib = 2 ** 20
        rows.append([sz, "step peak memory (MiB)", f["step_peak_bytes"] / mib, p["step_peak_bytes"] / mib,
                     p["step_peak_bytes"] / max(1, f["step_peak_bytes"])])
    print()
    print(table(["size", "measure", "full", f"pruned (R={a.prune_range})", "pruned/full"],
                [[r[0], r[1], *(float(x) for x in r[2:])] for r in rows]))
    print(load_line())
    write_json(a.json, {"machine": machine_state(), "args": vars(a), "results": results})


if __name__ == "__main__":
    main()
