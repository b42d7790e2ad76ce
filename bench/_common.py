"""Helpers shared by bench/extract_scaling.py and bench/loader_throughput.py: machine state, tables, JSON output,
a loopback S3 server and a cached synthetic corpus. Benchmarks print the machine load with every result because
on a shared machine the load average is what makes a number trustworthy or not."""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def machine_state() -> dict:
    """CPU count, load averages and library versions, captured at the moment of the call."""
    import numpy
    info = {"cpus": os.cpu_count(), "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "numpy": numpy.__version__, "time": time.strftime("%F %T")}
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def load_line() -> str:
    la = os.getloadavg()
    return f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} CPUs"


def table(headers: list[str], rows: list[list]) -> str:
    """Plain-text table, right-aligned numbers, floats with thousands separators."""
    def cell(x):
        if isinstance(x, float):
            if x != x:
                return "-"
            return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"
        return str(x)

    cells = [[cell(x) for x in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for r in cells:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def write_json(path: str | None, obj: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=str)
    print(f"\nwrote {path}")


def start_moto():
    """A moto S3 server on 127.0.0.1 (random port) with a bucket 'bench'; returns (server, s3fs storage_options)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "eu-west-1"}.items():
        os.environ.setdefault(k, v)
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"key": "testing", "secret": "testing", "endpoint_url": f"http://{host}:{port}",
            "client_kwargs": {"region_name": "eu-west-1"}}
    s3fs.S3FileSystem(**opts).mkdir("bench")
    return server, opts


def cached_corpus(out_dir: str, minutes: float, seed: int) -> tuple[str, float]:
    """A synthetic espeak-ng train split of `minutes` of audio (no dev/test), reused if already made with the same
    arguments. Returns (manifest path, seconds spent generating it now; 0.0 when reused)."""
    from distill.synth.corpus import make_corpus

    stamp = os.path.join(out_dir, "bench_args.json")
    args = {"minutes": minutes, "seed": seed}
    if os.path.exists(stamp):
        with open(stamp) as f:
            saved = json.load(f)
        if saved.get("args") == args and os.path.exists(saved.get("train", "")):
            return saved["train"], 0.0
    t = time.perf_counter()
    paths = make_corpus(out_dir, hours=minutes / 60.0, dev_hours=0, test_hours=0, seed=seed, progress=False,
                        overwrite=True)
    dt = time.perf_counter() - t
    with open(stamp, "w") as f:
        json.dump({"args": args, "train": paths["train"]}, f)
    return paths["train"], dt
