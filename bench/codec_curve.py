"""The reference `multi-quantization==0.1.1` trained to its own schedule: held-out error vs its training steps, with
our codec as a horizontal line (docs/codec.md, "The reference at convergence").

    .venv/bin/python bench/codec_curve.py --config synthetic:256:8 --schedules 25,100,500,2000 --json bench_out/curve_syn256.json
    .venv/bin/python bench/codec_curve.py --config whisper:8 --schedules 25,100,2000 --json bench_out/curve_whisper.json
    .venv/bin/python bench/codec_curve.py --plot docs/codec_curve.png bench_out/curve_syn256.json bench_out/curve_whisper.json

A *schedule* N is the reference's QuantizerTrainer with phase_one_iters = phase_two_iters = N (2N Adam steps of 512
frames; its default is N = 10,000; its learning-rate schedule halves every N/4 steps in each phase, so a run of
N is trained to the end of its own schedule, not a truncated longer one). Each schedule is a separate run. Every
--snapshot-every steps the run's current quantizer (16-entry codebooks in phase one, 256-entry in phase two) is
scored on the held-out frames: the thin lines of the plot, the trend *within* a run. The end of each run is the
point that answers "what does the reference give when trained properly for 2N steps".

Resumable across interruptions and sessions: the trainer's full state (quantizer, Adam, LR scheduler, step, Python
and torch RNG, data position) is saved at every snapshot under --state-dir and picked up by the same command;
finished schedules and our codec's result are cached there too, so a longer schedule (N = 10,000) can be added
later with the same command. A resumed run is bit-identical to an uninterrupted one (same state, same batches).

Configs: synthetic:DIM:BYTES (the shared generator's frames, as bench/codec_vs_reference.py) or TEACHER:BYTES with
TEACHER whisper|native (real layer-3 frames over a synthetic corpus, held-out utterances; bench/_teacher_frames.py).
The extrapolation fits err(s) = a + b * s^-c to the schedules' end points (s = steps) and says where the reference
would end at its default 20,000 steps; it is a fit to at most a handful of points, printed as such.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from _common import load_line, machine_state, write_json  # noqa: E402
from codec_vs_reference import REF_BATCH, REF_DEFAULT_ITERS, _ref_trainer, load_data, run_ours  # noqa: E402
from distill.codec.quantizer import codebook_usage_entropy, relative_reconstruction_error  # noqa: E402


# ----------------------------------------------------------------------------------------------------- data
def config_data(spec: str, a) -> tuple[str, int, np.ndarray, np.ndarray, str]:
    """(name, bytes/frame, train, test, description) for a --config spec."""
    parts = spec.split(":")
    if parts[0] == "synthetic" and len(parts) == 3:
        dim, nb = int(parts[1]), int(parts[2])
        train, test = load_data(a.data_dir, a.make_embeddings, dim, a.n_train, a.n_test)
        return f"synthetic-{dim}", nb, train, test, f"shared generator, dim {dim}"
    if len(parts) == 2:
        from _teacher_frames import LAYER, describe, teacher_frames
        train, test = teacher_frames(parts[0], a.n_test, seed=a.seed)
        return f"{parts[0]}-l{LAYER}", int(parts[1]), train, test, f"{parts[0]} layer {LAYER}: {describe(train)}"
    raise SystemExit(f"--config {spec!r}: expected synthetic:DIM:BYTES or whisper|native:BYTES")


# ---------------------------------------------------------------------------------------- reference, resumable
def _save_state(path: str, tr, offset: int, step_s: list[float], snaps: list[dict]) -> None:
    state = {"quantizer": tr.quantizer.state_dict(), "optim": tr.optim.state_dict(),
             "scheduler": tr.scheduler.state_dict(), "cur_iter": tr.cur_iter, "lr": tr.lr,
             "py_random": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
             "torch_rng": torch.get_rng_state(), "offset": offset, "step_s": step_s, "snapshots": snaps}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: str, tr) -> tuple[int, list[float], list[dict]]:
    st = torch.load(path, weights_only=True)  # tensors, numbers, lists and dicts only
    if st["cur_iter"] > tr.phase_one_iters:  # the saved quantizer is already the 256-entry product quantizer
        tr.cur_iter = 1  # _init_optimizer picks the phase's step size from cur_iter; both phases use N here
        tr.quantizer = tr.quantizer.get_product_quantizer()
        tr.lr = st["lr"]
        tr._init_optimizer()
    tr.quantizer.load_state_dict(st["quantizer"])
    tr.optim.load_state_dict(st["optim"])
    tr.scheduler.load_state_dict(st["scheduler"])
    tr.cur_iter, tr.lr = st["cur_iter"], st["lr"]
    v, s, g = st["py_random"]
    random.setstate((v, tuple(s), g))
    torch.set_rng_state(st["torch_rng"])
    return st["offset"], st["step_s"], st["snapshots"]


def _ref_eval(q, test: np.ndarray, chunk: int = 1024) -> tuple[float, np.ndarray]:
    with torch.no_grad():
        x = torch.from_numpy(test)
        codes = torch.cat([q.encode(x[s:s + chunk]) for s in range(0, x.shape[0], chunk)])
        x_hat = q.decode(codes).numpy()
    return relative_reconstruction_error(test, x_hat), codes.numpy()


def run_schedule(train: np.ndarray, test: np.ndarray, nbytes: int, iters: int, seed: int, state: str,
                 snapshot_every: int, log=print, save_every_s: float = 60.0) -> dict:
    """One reference run of iters + iters steps, resumable from `state`; snapshots of held-out error on the way."""
    import multi_quantization as mq

    dim = train.shape[1]
    train_t = torch.from_numpy(train)
    tr = _ref_trainer(mq, dim, nbytes, iters, seed)
    offset, step_s, snaps = 0, [], []
    if os.path.exists(state):
        offset, step_s, snaps = _load_state(state, tr)
        log(f"  resumed schedule {iters} at step {tr.cur_iter} of {2 * iters + 1}")
    n = train_t.shape[0] + 1 - REF_BATCH
    last_save = time.perf_counter()
    while not tr.done():
        s = offset % n  # icefall's minibatch_generator(repeat=True): consecutive slices, wrapping around
        t0 = time.perf_counter()
        tr.step(train_t[s:s + REF_BATCH])
        step_s.append(time.perf_counter() - t0)
        offset += REF_BATCH
        if tr.cur_iter % snapshot_every == 0 or tr.done():
            err, _ = _ref_eval(tr.quantizer.eval(), test)
            tr.quantizer.train()
            phase = 1 if tr.cur_iter <= iters else 2
            snaps.append({"step": tr.cur_iter, "phase": phase, "rel_err": err, "train_s": float(sum(step_s))})
            log(f"  schedule {iters}+{iters}: step {tr.cur_iter:>6,} (phase {phase}) held-out error {err:.4f}, "
                f"{sum(step_s):,.0f} s of training; {load_line()}", flush=True)
            if time.perf_counter() - last_save > save_every_s or tr.done():
                _save_state(state, tr, offset, step_s, snaps)
                last_save = time.perf_counter()
    q = tr.get_quantizer().eval()
    err, codes = _ref_eval(q, test)
    ent = codebook_usage_entropy(codes.astype(np.int64), 256)
    return {"iters_per_phase": iters, "steps": 2 * iters + 1, "train_s": float(sum(step_s)),
            "median_step_s": float(np.median(step_s)), "rel_err": err, "entropy_min": float(ent.min()),
            "entropy_mean": float(ent.mean()), "snapshots": snaps}


# ------------------------------------------------------------------------------------------------ extrapolation
def fit_power(steps: list[float], errs: list[float]) -> dict | None:
    """Least-squares err = a + b * steps^-c over a grid of c (a, b linear for each c); None below 3 points."""
    if len(steps) < 3:
        return None
    s, e = np.asarray(steps, float), np.asarray(errs, float)
    best = None
    for c in np.linspace(0.05, 2.0, 391):
        A = np.stack([np.ones_like(s), s ** -c], 1)
        (a, b), *_ = np.linalg.lstsq(A, e, rcond=None)
        if b < 0:
            continue
        r = float(((A @ [a, b] - e) ** 2).sum())
        if best is None or r < best["sse"]:
            best = {"a": float(a), "b": float(b), "c": float(c), "sse": r}
    if best:
        best["at_default"] = best["a"] + best["b"] * (2 * REF_DEFAULT_ITERS) ** -best["c"]
    return best


# ------------------------------------------------------------------------------------------------------- main
def run_config(spec: str, a) -> dict:
    name, nb, train, test, desc = config_data(spec, a)
    rng = np.random.default_rng(a.seed)
    train = train[rng.permutation(train.shape[0])]  # shuffled rows, as icefall's read_hdf5_data gives them
    tag = f"{name}_b{nb}_n{train.shape[0]}_t{test.shape[0]}_seed{a.seed}"
    os.makedirs(a.state_dir, exist_ok=True)
    print(f"\n## {name}, {nb} bytes/frame ({4 * train.shape[1] // nb}x smaller than float32): {desc}; "
          f"{test.shape[0]:,} held-out frames", flush=True)
    ours_path = os.path.join(a.state_dir, f"{tag}_ours.json")
    if os.path.exists(ours_path):
        ours = json.load(open(ours_path))
    else:
        ours = run_ours(train, test, nb, a.seed, 1, 64)
        ours = {k: v for k, v in ours.items() if k != "config"} | {"proj_dim": ours["config"]["proj_dim"]}
        json.dump(ours, open(ours_path, "w"))
    print(f"ours: held-out error {ours['rel_err']:.4f}, trained in {ours['train_s']:.0f} s", flush=True)
    sched = {}
    partial = {}
    for iters in a.schedules:
        done_path = os.path.join(a.state_dir, f"{tag}_ref{iters}.json")
        state_path = os.path.join(a.state_dir, f"{tag}_ref{iters}.state.pt")
        if os.path.exists(done_path):
            sched[iters] = json.load(open(done_path))
        elif a.no_run:  # report an unfinished run's snapshots as they stand
            if os.path.exists(state_path):
                snaps = torch.load(state_path, weights_only=True)["snapshots"]
                partial[iters] = {"iters_per_phase": iters, "steps": 2 * iters + 1, "snapshots": snaps}
                last = snaps[-1]
                print(f"reference {iters:,} + {iters:,} steps: UNFINISHED, at step {last['step']:,} held-out error "
                      f"{last['rel_err']:.4f} after {last['train_s']:,.0f} s", flush=True)
            continue
        else:
            sched[iters] = run_schedule(train, test, nb, iters, a.seed, os.path.join(a.state_dir,
                                        f"{tag}_ref{iters}.state.pt"), a.snapshot_every)
            json.dump(sched[iters], open(done_path, "w"))
        r = sched[iters]
        print(f"reference {iters:,} + {iters:,} steps: held-out error {r['rel_err']:.4f} "
              f"({r['rel_err'] / ours['rel_err']:.2f}x ours), {r['train_s']:,.0f} s "
              f"({r['median_step_s']:.2f} s/step median), entropy min/mean {r['entropy_min']:.2f}/"
              f"{r['entropy_mean']:.2f}", flush=True)
    pts = sorted((r["steps"], r["rel_err"]) for r in sched.values())
    fit = fit_power([p[0] for p in pts], [p[1] for p in pts])
    step_s = float(min(r["median_step_s"] for r in sched.values()))  # the least-loaded measurement
    out = {"config": spec, "name": name, "bytes_per_frame": nb, "dim": int(train.shape[1]), "description": desc,
           "n_train": int(train.shape[0]), "n_test": int(test.shape[0]), "ours": ours,
           "schedules": {str(k): v for k, v in sched.items()}, "fit": fit,
           "unfinished": {str(k): v for k, v in partial.items()}, "ref_median_step_s": step_s,
           "ours_train_s_in_ref_steps": ours["train_s"] / step_s, "machine": machine_state()}
    best = min(r["rel_err"] for r in sched.values())
    print(f"best reference end point {best:.4f}: ours/reference = {ours['rel_err'] / best:.3f}x "
          f"(goal <= 0.9x); our training time = {out['ours_train_s_in_ref_steps']:,.0f} reference steps", flush=True)
    if fit:
        print(f"extrapolation (a fit to {len(pts)} points, not a measurement): err = {fit['a']:.4f} + "
              f"{fit['b']:.3f} * steps^-{fit['c']:.2f}; at the default 20,000 steps ~{fit['at_default']:.4f} "
              f"(ours/that = {ours['rel_err'] / fit['at_default']:.3f}x), asymptote {fit['a']:.4f}")
    return out


def plot(path: str, results: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        for k, s in sorted(r["schedules"].items(), key=lambda kv: int(kv[0])):
            sn = s["snapshots"]
            ax.plot([p["step"] for p in sn], [p["rel_err"] for p in sn], lw=0.8, alpha=0.6,
                    label=f"ref. run {int(k):,}+{int(k):,} (within run)")
        for k, s in sorted(r.get("unfinished", {}).items(), key=lambda kv: int(kv[0])):
            sn = s["snapshots"]
            ax.plot([p["step"] for p in sn], [p["rel_err"] for p in sn], lw=1.2, ls="--",
                    label=f"ref. run {int(k):,}+{int(k):,} (unfinished, to step {sn[-1]['step']:,})")
        ends = sorted((s["steps"], s["rel_err"]) for s in r["schedules"].values())
        ax.plot(*zip(*ends), "ko-", ms=5, label="ref. end of schedule")
        xmax = 2 * REF_DEFAULT_ITERS
        if r.get("fit"):
            f = r["fit"]
            xs = np.geomspace(ends[0][0], xmax, 100)
            ax.plot(xs, f["a"] + f["b"] * xs ** -f["c"], "k:", lw=1, label="extrapolation (fit, not measured)")
        ax.axhline(r["ours"]["rel_err"], color="C3", lw=2, label=f"ours ({r['ours']['train_s']:.0f} s training)")
        ax.axvline(r["ours_train_s_in_ref_steps"], color="C3", ls="--", lw=1,
                   label="ref. steps in our training time")
        ax.axvline(xmax, color="grey", ls="-.", lw=1, label="ref. default 10k+10k")
        ax.set_xscale("log")
        ax.set_xlabel("reference training steps (512 frames each)")
        ax.set_ylabel("held-out relative reconstruction error")
        ax.set_title(f"{r['name']}, {r['bytes_per_frame']} B/frame")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], help="synthetic:DIM:BYTES or whisper|native:BYTES")
    ap.add_argument("--schedules", default="25,100,500,2000", help="reference iterations per phase, one run each")
    ap.add_argument("--snapshot-every", type=int, default=250, help="held-out error every this many steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-train", type=int, default=100000, help="synthetic configs")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state-dir", default=os.path.join(HERE, ".cache", "codec_curve"))
    ap.add_argument("--data-dir", default=os.path.join(HERE, ".cache", "embeddings"))
    ap.add_argument("--make-embeddings", default=os.path.join(os.path.dirname(ROOT), "shared", "bench",
                                                              "make_embeddings.py"))
    ap.add_argument("--no-run", action="store_true",
                    help="train nothing: report finished schedules and unfinished runs' snapshots from --state-dir")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="write a PNG of the given JSON results (positional) and exit")
    ap.add_argument("results", nargs="*", help="with --plot: JSON files written by --json")
    a = ap.parse_args(argv)
    if a.plot:
        plot(a.plot, [r for f in a.results for r in json.load(open(f))["results"]])
        return {}
    a.schedules = [int(s) for s in a.schedules.split(",")]
    torch.set_num_threads(a.threads)
    print(f"# reference convergence curve; torch {torch.__version__}, {a.threads} threads; {load_line()}; "
          f"{time.strftime('%F %T')}", flush=True)
    out = {"args": {k: v for k, v in vars(a).items() if k != "results"},
           "results": [run_config(c, a) for c in a.config or ["synthetic:256:8"]]}
    print(f"\n{load_line()} at end; {time.strftime('%F %T')}")
    write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
