"""Our MVQ codec vs the reference `multi-quantization==0.1.1` (k2-fsa), same data, same bytes per frame, one process.

    .venv/bin/python bench/codec_vs_reference.py                 # dims 1024 (16 B/frame) and 256 (8 B/frame)
    .venv/bin/python bench/codec_vs_reference.py --quick         # small sizes, a couple of minutes
    .venv/bin/python bench/codec_vs_reference.py --dims 256:8 --n-train 50000 --json /tmp/codec.json

Data: ../shared/bench/make_embeddings.py (deterministic, anisotropic, clustered "embedding-like" frames), generated
once into --data-dir. Both codecs train on the same --n-train frames and are scored on the same held-out test
frames. Printed per config: held-out relative reconstruction error sum||x_hat-x||^2 / sum||x-mean(x)||^2, training
wall time, encode and decode frames/s (torch threads = --threads), per-codebook usage entropy (bits; 8 = uniform),
and the ratios ours/reference against the goals (error <= 0.9x, encode >= 2x faster, training no slower).

The reference's default schedule is 10,000 + 10,000 steps of 512-600 frames, tuned for a GPU; on 2 CPU cores a
step of the 1024-dim trainer costs seconds, so the default would take many hours here. The reference therefore
gets a training budget of --ref-budget times OUR training time (default 1.5x, i.e. more time than ours):
its per-step cost is probed first, then phase_one_iters = phase_two_iters are set to fit the budget (its
learning-rate schedule adapts to the iteration count). The printout gives the iterations used and what the
default schedule would cost at the probed speed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from distill.mvq import MultiCodebookQuantizer, codebook_usage_entropy, relative_reconstruction_error  # noqa: E402

REF_BATCH = 512


def load_data(data_dir: str, dim: int, n_train: int, n_test: int, maker: str) -> tuple[np.ndarray, np.ndarray]:
    tr, te = os.path.join(data_dir, f"train_d{dim}.npy"), os.path.join(data_dir, f"test_d{dim}.npy")
    meta = os.path.join(data_dir, f"meta_d{dim}.json")
    ok = os.path.exists(meta) and json.load(open(meta)).get("n_train", 0) >= n_train \
        and json.load(open(meta)).get("n_test", 0) >= n_test
    if not ok:
        os.makedirs(data_dir, exist_ok=True)
        subprocess.run([sys.executable, maker, "--dim", str(dim), "--n-train", str(n_train), "--n-test",
                        str(n_test), "--out", data_dir], check=True, stdout=subprocess.DEVNULL)
    x = np.load(tr, mmap_mode="r")[:n_train]
    y = np.load(te, mmap_mode="r")[:n_test]
    return np.array(x, dtype=np.float32), np.array(y, dtype=np.float32)  # in-memory, writable copies


def timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


def rate(fn, x, repeats: int = 1) -> float:
    """frames/s of fn(x), best of `repeats` (first call included in the measurement when repeats == 1)."""
    best = float("inf")
    for _ in range(repeats):
        _, dt = timed(fn, x)
        best = min(best, dt)
    return len(x) / best


def run_ours(train: np.ndarray, test: np.ndarray, nbytes: int, seed: int) -> dict:
    q, t_train = timed(MultiCodebookQuantizer.train, train, num_codebooks=nbytes, codebook_size=256, seed=seed,
                       progress=False)
    codes = q.encode(test)
    x_hat = q.decode(codes)
    ent = codebook_usage_entropy(codes, 256)
    return {"train_s": t_train, "rel_err": relative_reconstruction_error(test, x_hat),
            "encode_fps": rate(q.encode, test, 2), "decode_fps": rate(q.decode, codes, 3),
            "entropy_min": float(ent.min()), "entropy_mean": float(ent.mean()),
            "train_frames_used": int(q.train_info["train_frames"]), "config": q.config}


def _ref_train(mq, train_t: torch.Tensor, dim: int, nbytes: int, iters: int, seed: int):
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    tr = mq.QuantizerTrainer(dim=dim, bytes_per_frame=nbytes, device=torch.device("cpu"),
                             phase_one_iters=iters, phase_two_iters=iters)
    steps = 0
    while not tr.done():
        idx = torch.from_numpy(gen.integers(0, train_t.shape[0], REF_BATCH))
        tr.step(train_t[idx])
        steps += 1
    return tr.get_quantizer(), steps


def probe_ref_step(mq, train_t: torch.Tensor, dim: int, nbytes: int, n: int = 6) -> float:
    """Seconds per reference training step (phase one; phase two costs about the same, measured below)."""
    tr = mq.QuantizerTrainer(dim=dim, bytes_per_frame=nbytes, device=torch.device("cpu"),
                             phase_one_iters=1000, phase_two_iters=1000)
    tr.step(train_t[:REF_BATCH])  # first step allocates
    t0 = time.perf_counter()
    for i in range(n):
        tr.step(train_t[(i + 1) * REF_BATCH:(i + 2) * REF_BATCH])
    return (time.perf_counter() - t0) / n


def run_ref(train: np.ndarray, test: np.ndarray, nbytes: int, seed: int, budget_s: float, min_iters: int) -> dict:
    import multi_quantization as mq

    dim = train.shape[1]
    train_t = torch.from_numpy(train)
    step_s = probe_ref_step(mq, train_t, dim, nbytes)
    iters = max(min_iters, int(budget_s / (2 * step_s)))
    (q, steps), t_train = timed(_ref_train, mq, train_t, dim, nbytes, iters, seed)
    test_t = torch.from_numpy(test)
    with torch.no_grad():
        codes = q.encode(test_t)
        x_hat = q.decode(codes)
        enc = lambda x: q.encode(x)  # noqa: E731
        dec = lambda c: q.decode(c)  # noqa: E731
        enc_fps = rate(enc, test_t, 1)
        dec_fps = rate(dec, codes, 3)
    c = codes.cpu().numpy().astype(np.int64)
    ent = codebook_usage_entropy(c.reshape(c.shape[0], -1), 256)
    return {"train_s": t_train, "rel_err": relative_reconstruction_error(test, x_hat.cpu().numpy()),
            "encode_fps": enc_fps, "decode_fps": dec_fps, "entropy_min": float(ent.min()),
            "entropy_mean": float(ent.mean()), "iters_per_phase": iters, "steps": steps,
            "train_frames_used": min(train.shape[0], steps * REF_BATCH), "probe_step_s": step_s,
            "default_schedule_est_s": 20000 * step_s}


def table(rows: list[list], headers: list[str]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{v:,.4f}" if isinstance(v, float) and abs(v) < 10 else
                                            (f"{v:,.0f}" if isinstance(v, float) else str(v)) for v in r]
                                           for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in cells]
    out.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="1024:16,256:8", help="comma-separated dim:bytes_per_frame")
    ap.add_argument("--n-train", type=int, default=100000)
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ref-budget", type=float, default=1.5, help="reference training time / ours")
    ap.add_argument("--ref-min-iters", type=int, default=20, help="lower bound on reference iterations per phase")
    ap.add_argument("--quick", action="store_true", help="n-train 20000, n-test 2000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "bench", ".cache", "embeddings"))
    ap.add_argument("--make-embeddings", default=os.path.join(os.path.dirname(ROOT), "shared", "bench",
                                                              "make_embeddings.py"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.n_train, a.n_test = 20000, 2000
    torch.set_num_threads(a.threads)
    import multi_quantization

    print(f"# codec benchmark: ours (distill.mvq) vs multi-quantization {getattr(multi_quantization, '__version__', '0.1.1')}"
          f"; torch {torch.__version__}, {a.threads} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at start")
    print(f"# data: {a.make_embeddings} -> {a.data_dir}; n_train {a.n_train:,}, n_test {a.n_test:,} (held out)")
    results = []
    for spec in a.dims.split(","):
        dim, nbytes = (int(v) for v in spec.split(":"))
        train, test = load_data(a.data_dir, dim, a.n_train, a.n_test, a.make_embeddings)
        print(f"\n## dim {dim}, {nbytes} bytes/frame ({4 * dim / nbytes:.0f}x smaller than float32)", flush=True)
        ours = run_ours(train, test, nbytes, a.seed)
        print(f"ours: trained in {ours['train_s']:.1f} s on {ours['train_frames_used']:,} frames "
              f"(proj_dim {ours['config']['proj_dim']}, beam {ours['config']['beam_size']}, "
              f"ICM {ours['config']['icm_sweeps']})", flush=True)
        ref = run_ref(train, test, nbytes, a.seed, a.ref_budget * ours["train_s"], a.ref_min_iters)
        print(f"reference: {ref['iters_per_phase']} + {ref['iters_per_phase']} steps of {REF_BATCH} frames "
              f"({ref['probe_step_s']:.2f} s/step probed) in {ref['train_s']:.1f} s; its default 10k + 10k "
              f"steps would take ~{ref['default_schedule_est_s'] / 3600:.1f} h here", flush=True)
        rows = [["ours", ours["rel_err"], ours["train_s"], ours["encode_fps"], ours["decode_fps"],
                 ours["entropy_min"], ours["entropy_mean"]],
                ["reference", ref["rel_err"], ref["train_s"], ref["encode_fps"], ref["decode_fps"],
                 ref["entropy_min"], ref["entropy_mean"]]]
        print(table(rows, ["codec", "rel. error (test)", "train s", "encode fr/s", "decode fr/s",
                           "entropy min", "entropy mean"]))
        ratios = {"error_ratio": ours["rel_err"] / ref["rel_err"], "encode_speedup": ours["encode_fps"] /
                  ref["encode_fps"], "decode_speedup": ours["decode_fps"] / ref["decode_fps"],
                  "train_time_ratio": ours["train_s"] / ref["train_s"]}
        goals = {"error_ratio": ratios["error_ratio"] <= 0.9, "encode_speedup": ratios["encode_speedup"] >= 2.0,
                 "train_time_ratio": ratios["train_time_ratio"] <= 1.0}
        print(f"ours/reference: error {ratios['error_ratio']:.3f}x (goal <= 0.9: "
              f"{'MET' if goals['error_ratio'] else 'NOT MET'}), encode {ratios['encode_speedup']:.1f}x faster "
              f"(goal >= 2: {'MET' if goals['encode_speedup'] else 'NOT MET'}), decode "
              f"{ratios['decode_speedup']:.1f}x faster, training time {ratios['train_time_ratio']:.2f}x "
              f"(goal <= 1: {'MET' if goals['train_time_ratio'] else 'NOT MET'})", flush=True)
        results.append({"dim": dim, "bytes_per_frame": nbytes, "ours": ours, "reference": ref, "ratios": ratios,
                        "goals_met": goals})
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")
    out = {"args": vars(a), "results": results}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return out


if __name__ == "__main__":
    main()
