"""Our codec's training options on real teacher frames: held-out error and training time per option set
(docs/codec.md, "The claim, restated"). One process, the same frames and held-out utterances as codec_curve.py.

    .venv/bin/python bench/codec_options.py --teacher whisper --bytes 8 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
for p in (os.path.dirname(HERE), HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from _common import load_line  # noqa: E402
from _teacher_frames import teacher_frames  # noqa: E402
from distill.codec.quantizer import MultiCodebookQuantizer, relative_reconstruction_error  # noqa: E402

VARIANTS = {"default": {}, "proj 288": {"proj_dim": 288}, "no projection": {"proj_dim": None},
            "lsq 8": {"lsq_iters": 8}, "100k frames": {"max_train_frames": 100000}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="whisper", choices=("whisper", "native"))
    ap.add_argument("--bytes", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of: {', '.join(VARIANTS)}")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    train, test = teacher_frames(a.teacher, a.n_test, seed=a.seed)
    train = train[np.random.default_rng(a.seed).permutation(train.shape[0])]  # as codec_curve.py feeds both codecs
    print(f"# {a.teacher} layer-3 frames, {a.bytes} B/frame, {a.threads} thread(s); {load_line()}", flush=True)
    for name in a.variants.split(","):
        opts = VARIANTS[name]
        t0 = time.perf_counter()
        q = MultiCodebookQuantizer.train(train, num_codebooks=a.bytes, seed=a.seed, progress=False, **opts)
        dt = time.perf_counter() - t0
        err = relative_reconstruction_error(test, q.decode(q.encode(test)))
        print(f"{name:>14} {json.dumps(opts):>28}: held-out error {err:.4f}, proj_dim {q.config['proj_dim']}, "
              f"trained in {dt:.0f} s; training-set error per round {q.train_info['train_rel_err']}", flush=True)


if __name__ == "__main__":
    main()
