"""Real teacher frames for the codec benchmarks: the bundled Whisper tiny.en and a native teacher trained here,
both at layer 3, embedded over a synthetic espeak-ng corpus; cached in bench/.cache/teacher_frames/.

Held-out frames come from held-out *utterances* (the corpus's dev split: other sentences, and mostly other
speakers), not from held-out frames of the training utterances, which would share speaker, sentence and
neighbouring frames with the training set. Everything is made with the project's own CLI:

    ci-store make-corpus  C --hours 1.0 --dev-hours 0.12 --test-hours 0.05 --seed 14
    ci-store sample-frames C/cuts_train.jsonl.gz --teacher T --layer 3 --num-utterances 1051 --max-frames 100000
    ci-store sample-frames C/cuts_dev.jsonl.gz   --teacher T --layer 3 --num-utterances 129 --max-frames 100000 --seed 1
    ci-store train-teacher --train C/cuts_train.jsonl.gz --dev C/cuts_dev.jsonl.gz --d-model 256 --layers 4 --epochs 5
                                                                                   (the native teacher only)
The native teacher of docs/codec.md's table is the checkpoint written after epoch 5 of an 8-epoch run of that
command (train-teacher saves after every epoch; the run was stopped there to free the 2 CPUs; dev CER 41.1%).
`--epochs 5` gives a teacher of the same size and data, with a shorter learning-rate schedule.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(HERE, ".cache", "teacher_frames")
LAYER = 3
TEACHERS = ("whisper", "native")


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "cli", *args]
    print("#", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})


def _corpus(cache: str) -> str:
    c = os.path.join(cache, "corpus")
    if not os.path.exists(os.path.join(c, "cuts_dev.jsonl.gz")):
        _cli("make-corpus", c, "--hours", "1.0", "--dev-hours", "0.12", "--test-hours", "0.05", "--seed", "14",
             "--quiet", "--overwrite")
    return c


def _teacher(kind: str, cache: str, corpus: str) -> str:
    if kind == "whisper":
        return "whisper-tiny.en"
    ckpt = os.path.join(cache, "native", "teacher.safetensors")
    if not os.path.exists(ckpt):
        _cli("train-teacher", "--train", os.path.join(corpus, "cuts_train.jsonl.gz"), "--dev",
             os.path.join(corpus, "cuts_dev.jsonl.gz"), "--out", ckpt, "--d-model", "256", "--layers", "4",
             "--epochs", "5", "--seed", "0", "--quiet")
    return ckpt


def teacher_frames(kind: str, n_test: int, seed: int = 0, cache: str = CACHE) -> tuple[np.ndarray, np.ndarray]:
    """(train [<=100,000, dim], held-out [n_test, dim]) float32 frames of teacher `kind` at layer 3; the held-out
    frames are a seeded random subset of all frames of the dev utterances."""
    if kind not in TEACHERS:
        raise SystemExit(f"unknown teacher {kind!r}: one of {', '.join(TEACHERS)}")
    corpus = _corpus(cache)
    teacher = _teacher(kind, cache, corpus)
    tr = os.path.join(cache, f"{kind}_l{LAYER}_train.npy")
    dv = os.path.join(cache, f"{kind}_l{LAYER}_dev.npy")
    if not os.path.exists(tr):
        _cli("sample-frames", os.path.join(corpus, "cuts_train.jsonl.gz"), "--teacher", teacher, "--layer",
             str(LAYER), "--out", tr, "--num-utterances", "1051", "--max-frames", "100000", "--seed", "0")
    if not os.path.exists(dv):
        _cli("sample-frames", os.path.join(corpus, "cuts_dev.jsonl.gz"), "--teacher", teacher, "--layer",
             str(LAYER), "--out", dv, "--num-utterances", "129", "--max-frames", "100000", "--seed", "1")
    train, dev = np.load(tr), np.load(dv)
    rng = np.random.default_rng(seed)
    test = dev[np.sort(rng.choice(dev.shape[0], min(n_test, dev.shape[0]), replace=False))]
    return np.ascontiguousarray(train, dtype=np.float32), np.ascontiguousarray(test, dtype=np.float32)


def describe(x: np.ndarray) -> str:
    """One line on what makes real frames unlike the synthetic generator's: tails and per-dimension scale."""
    xc = x - x.mean(0)
    kurt = (xc ** 4).mean(0) / np.maximum((xc ** 2).mean(0) ** 2, 1e-30)
    var = xc.var(0)
    ev = np.linalg.eigvalsh(np.cov(xc[:20000].T.astype(np.float64)))[::-1]
    k90 = int(np.searchsorted(np.cumsum(ev) / ev.sum(), 0.9)) + 1
    return (f"{x.shape[0]:,} x {x.shape[1]}; per-dim excess kurtosis median {np.median(kurt) - 3:.1f}, max "
            f"{kurt.max() - 3:.0f}; largest/median per-dim variance {var.max() / np.median(var):.0f}x; "
            f"{k90} principal directions hold 90% of the variance")
