"""The store at corpus scale, simulated: index, plan, metadata and completion records of 960 h, 10k h and 100k h
stores at full size, shard data for a sample of shards only (issue 19; numbers in docs/store-format.md).

    nice -n 10 .venv/bin/python bench/store_scale.py                         # 960h,10kh local + 960h on S3
    nice -n 10 .venv/bin/python bench/store_scale.py --sizes 960h,10kh,100kh --s3-sizes 960h,10kh
    nice -n 10 .venv/bin/python bench/store_scale.py --sizes '' --s3-sizes 960h,10kh --s3-readers cache --skip-inspect

Corpora (deterministic, numpy-vectorised): LibriSpeech-like 960 h (log-normal durations, mean ~12.3 s, ids like
`1034-121119-0049`) and GigaSpeech-like 10k h / 100k h (mean ~4.5 s, ids like `gigaspeech-POD0000000001_S0000123`),
50 Hz frames, default codes layout (2**20-frame shards, 16 codebooks). The store is made with the public API
(plan, `create`, `write_shard` for `--sample-shards` shards with random codes); every other shard gets the
completion record a writer leaves for a shard whose utterances all failed (`object_nbytes` 0: no shard object,
reads give padding), written with the same create-if-absent call `write_shard` uses. That is the one helper here
that is not the public API (`_sparse_records`): computing 17,000 shards of labels is what this bench avoids.

Each measurement runs in a fresh subprocess (`python bench/store_scale.py _child ...`), so every number is one
reader or writer process from a cold start of the library (page cache warm). RSS: `VmHWM - VmRSS at baseline`
(peak resident set of the process minus the resident set after imports, i.e. what opening/using the store
added), plus RssAnon/RssFile after the step (file pages of memory-mapped index arrays are page cache shared by
every process of the host; anonymous pages are each process's own). Requests: counted at the ObjectStore level
(ci_store's object API: gets, ranged gets, lists; local and S3 alike) and, on S3, at the s3fs level (each
`_call_s3` is one HTTP request: GetObject, ListObjectsV2, HeadObject, PutObject). A child that would exceed
`--mem-limit-gb` of address space fails with MemoryError instead of taking the shared machine down.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SIZES = {   # name: (hours, mean seconds, log-normal sigma, min s, max s, id style)
    "960h": (960, 12.3, 0.35, 1.0, 35.0, "libri"),
    "10kh": (10_000, 4.5, 0.6, 0.5, 20.0, "giga"),
    "100kh": (100_000, 4.5, 0.6, 0.5, 20.0, "giga"),
}
FRAME_RATE = 50
NUM_CODEBOOKS = 16
PRICE_PER_1K = {"GET": 0.0004, "LIST": 0.005, "PUT": 0.005}     # S3 standard, us-east-1, USD per 1000 requests


# --- corpus ----------------------------------------------------------------------------------------------------------
def _digits(x: np.ndarray, width: int) -> np.ndarray:
    """[n, width] uint8 ASCII decimal digits of x, zero-padded."""
    out = np.empty((len(x), width), np.uint8)
    x = x.astype(np.int64).copy()
    for j in range(width - 1, -1, -1):
        out[:, j] = 48 + (x % 10)
        x //= 10
    return out


def corpus(size: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids as a fixed-width bytes array 'S<k>', frames int64) of a synthetic corpus of `size`."""
    hours, mean_s, sigma, lo, hi, style = SIZES[size]
    n = int(round(hours * 3600 / mean_s))
    rng = np.random.default_rng(seed)
    dur = np.clip(rng.lognormal(np.log(mean_s) - sigma ** 2 / 2, sigma, n), lo, hi)
    frames = np.maximum(1, np.round(dur * FRAME_RATE)).astype(np.int64)
    k = np.arange(n, dtype=np.int64)
    if style == "libri":        # speaker-chapter-utterance: ~100 utterances per chapter, ~10 chapters per speaker
        parts = [_digits(k // 1000, 4), np.full((n, 1), ord("-"), np.uint8), _digits(100_000 + k // 100, 6),
                 np.full((n, 1), ord("-"), np.uint8), _digits(k % 100, 4)]
    else:                       # podcast/YouTube episode + segment: ~2000 segments per episode
        prefix = np.frombuffer(b"gigaspeech-POD", np.uint8)
        parts = [np.broadcast_to(prefix, (n, len(prefix))), _digits(k // 2000, 10),
                 np.broadcast_to(np.frombuffer(b"_S", np.uint8), (n, 2)), _digits(k % 2000, 7)]
    mat = np.ascontiguousarray(np.concatenate(parts, axis=1))
    return mat.view(f"S{mat.shape[1]}").reshape(-1), frames


# --- measuring helpers -------------------------------------------------------------------------------------------
def proc_status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) / 1024      # MiB
    return out


def reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs), so peaks are per step."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Counter:
    """Counts ci_store ObjectStore calls (keys touched) and, on S3, s3fs HTTP requests by operation."""

    def __init__(self):
        self.ops: dict[str, int] = {}
        self.s3: dict[str, int] = {}

    def snapshot(self) -> dict:
        return {"objects": dict(self.ops), "s3": dict(self.s3)}

    def reset(self) -> None:
        self.ops.clear()
        self.s3.clear()

    def install(self) -> None:
        from ci_store import fsio
        c = self

        def wrap(name, count):
            orig = getattr(fsio.ObjectStore, name)

            def f(self, *a, **kw):
                c.ops[name] = c.ops.get(name, 0) + count(*a)
                return orig(self, *a, **kw)
            setattr(fsio.ObjectStore, name, f)
        wrap("get", lambda *a: 1)
        wrap("get_many", lambda keys, *a: len(keys))
        wrap("get_ranges", lambda reqs, *a: len(reqs))
        wrap("read_into", lambda *a: 1)
        wrap("list_prefix", lambda *a: 1)
        wrap("exists", lambda *a: 1)
        try:
            import s3fs
        except ImportError:
            return
        orig = s3fs.S3FileSystem._call_s3

        async def call(self, method, *a, **kw):
            name = getattr(method, "__name__", str(method))
            c.s3[name] = c.s3.get(name, 0) + 1
            return await orig(self, method, *a, **kw)
        s3fs.S3FileSystem._call_s3 = call


def storage_options(args) -> dict | None:
    return json.loads(args.storage_options) if args.storage_options else None


def _plan(ids: np.ndarray, frames: np.ndarray, shard_frames: int):
    """The plan through the public API: plan_shards over (id, frames) pairs, or the array planner where the
    library has one (format v2)."""
    import ci_store.plan as plan_mod
    if hasattr(plan_mod, "plan_arrays"):
        return plan_mod.plan_arrays(ids, frames, shard_frames)
    return plan_mod.plan_shards(list(zip(ids.astype(str).tolist(), frames.tolist())), shard_frames)


def _shard_info(st, plan, s: int):
    return st._shard(s) if hasattr(st, "_shard") else plan.shards[s]


def _sparse_records(st, shards, zero_sha: str) -> None:
    """Completion records for shards whose labels are not computed here: what write_shard records for a shard whose
    utterances all failed (no object, all padding), created if absent like write_shard's own records."""
    from ci_store.completion import build_record, encode_record
    from ci_store.format import done_key
    objects = st._handle().objects
    for s in shards:
        sh = st._shard(s) if hasattr(st, "_shard") else st.plan.shards[s]
        rec = build_record(st.array_name, sh, st.shard_frames, {}, zero_sha, None)
        objects.create(done_key(s), encode_record(rec))


def sample_shards(num_shards: int, k: int) -> list[int]:
    return sorted(set(np.linspace(0, num_shards - 1, k).astype(int).tolist()))


# --- child steps -------------------------------------------------------------------------------------------------
def child_create(args) -> dict:
    from ci_store import create
    from ci_store.completion import data_sha256
    from ci_store.format import DEFAULT_CODES_SHARD_FRAMES
    res = {}
    base = proc_status()["VmRSS"]
    t = time.perf_counter()
    ids, frames = corpus(args.size)
    res["generate_s"] = time.perf_counter() - t
    res["utterances"], res["frames"] = len(ids), int(frames.sum())
    res["rss_corpus_mib"] = proc_status()["VmRSS"] - base
    t = time.perf_counter()
    plan = _plan(ids, frames, DEFAULT_CODES_SHARD_FRAMES)
    res["plan_s"] = time.perf_counter() - t
    res["num_shards"] = plan.num_shards
    res["rss_after_plan_mib"] = proc_status()["VmHWM"] - base
    kw = {}
    if args.format_version:
        kw["format_version"] = args.format_version
    t = time.perf_counter()
    st = create(args.url, plan, kind="codes", num_codebooks=NUM_CODEBOOKS, codebook_size=256,
                frame_rate=float(FRAME_RATE), storage_options=storage_options(args), **kw)
    res["create_s"] = time.perf_counter() - t
    res["rss_after_create_mib"] = proc_status()["VmHWM"] - base
    rng = np.random.default_rng(1)
    sample = sample_shards(plan.num_shards, args.sample_shards)
    t = time.perf_counter()
    for s in sample:
        sh = _shard_info(st, plan, s)
        st.write_shard(s, {u: rng.integers(0, 256, (n, NUM_CODEBOOKS), dtype=np.uint8)
                           for u, n in zip(sh.utt_ids, sh.num_frames)})
    res["sample_shards"] = sample
    res["sample_write_s"] = time.perf_counter() - t
    zero_sha = data_sha256(np.zeros((st.shard_frames, NUM_CODEBOOKS), np.uint8))
    t = time.perf_counter()
    _sparse_records(st, [s for s in range(plan.num_shards) if s not in set(sample)], zero_sha)
    res["records_s"] = time.perf_counter() - t
    if hasattr(st, "write_completion_manifest"):
        t = time.perf_counter()
        st.write_completion_manifest()
        res["manifest_s"] = time.perf_counter() - t
    res["peak_rss_mib"] = proc_status()["VmHWM"] - base
    res["total_s"] = sum(v for k, v in res.items() if k.endswith("_s"))
    return res


def child_read(args) -> dict:
    """One reader process: open, index ready, random lookups, get_many batches, finding completed shards."""
    from ci_store import open_store
    c = Counter()
    c.install()
    ids, frames = corpus(args.size)      # the ids to look up (a training manifest would hold them)
    rng = np.random.default_rng(2)
    probe = ids[rng.integers(0, len(ids), args.lookups)].astype(str).tolist()
    del ids, frames
    import gc
    gc.collect()
    reset_hwm()
    base = proc_status()
    res = {"lookup_mode": args.lookup, "baseline_rss_mib": base["VmRSS"]}
    t = time.perf_counter()
    cache = None if args.index_cache in (None, "none") else args.index_cache
    st = open_store(args.url, storage_options=storage_options(args), lookup=args.lookup, index_cache=cache)
    st.locate(probe[0])                  # the index is loaded on first use (and copied to the index cache)
    res["open_s"] = time.perf_counter() - t
    res["index_cache"] = args.index_cache
    res["index_cache_downloaded"] = sorted(getattr(st.index, "cache_downloaded", []))
    res["index_cache_mapped"] = len(getattr(st.index, "cache_files", {}))
    after = proc_status()
    res["open_rss_mib"] = after["VmHWM"] - base["VmRSS"]
    res["open_rss_anon_mib"] = after["RssAnon"] - base["RssAnon"]
    res["open_rss_file_mib"] = after["RssFile"] - base["RssFile"]
    res["open_requests"] = c.snapshot()
    c.reset()
    t = time.perf_counter()
    for u in probe:
        st.locate(u)
    dt = time.perf_counter() - t
    res["lookups_per_s"] = len(probe) / dt
    after = proc_status()
    res["after_lookups_rss_mib"] = after["VmHWM"] - base["VmRSS"]
    res["after_lookups_rss_anon_mib"] = after["RssAnon"] - base["RssAnon"]
    res["lookup_requests"] = c.snapshot()
    c.reset()

    def measured(name: str, call) -> None:
        """res[name] = len(call()), with its time and the requests it made."""
        t = time.perf_counter()
        res[name] = len(call())
        res[f"{name}_s"] = time.perf_counter() - t
        res[f"{name}_requests"] = c.snapshot()
        c.reset()

    measured("completed", st.completed_shards)
    # get_many: batches of 32 random utterances of the shards that hold data (first batch: cold shard index)
    sample = sample_shards(st.num_shards, args.sample_shards)
    pool = [u for s in sample for u in (st._shard(s) if hasattr(st, "_shard") else st.plan.shards[s]).utt_ids]
    lat = []
    for _ in range(args.batches):
        batch = [pool[i] for i in rng.integers(0, len(pool), 32)]
        t = time.perf_counter()
        st.get_many(batch)
        lat.append(time.perf_counter() - t)
    res["get_many_first_ms"] = lat[0] * 1e3
    res["get_many_median_ms"] = float(np.median(lat[1:])) * 1e3 if len(lat) > 1 else None
    res["get_many_requests"] = c.snapshot()
    c.reset()
    measured("failures", st.failures)
    res["peak_rss_mib"] = proc_status()["VmHWM"] - base["VmRSS"]
    return res


def child_inspect(args) -> dict:
    """`ci-store verify --no-data` and `ci-store inspect --entropy-frames 0`, as the CLI runs them."""
    from ci_store import open_store
    from ci_store.stats import summarize
    from ci_store.verify import verify_store
    base = proc_status()["VmRSS"]
    res = {}
    t = time.perf_counter()
    problems = verify_store(args.url, storage_options=storage_options(args), check_data=False)
    res["verify_no_data_s"] = time.perf_counter() - t
    res["verify_problems"] = problems[:3]
    res["verify_peak_rss_mib"] = proc_status()["VmHWM"] - base
    reset_hwm()
    base = proc_status()["VmRSS"]
    t = time.perf_counter()
    summarize(open_store(args.url, storage_options=storage_options(args)), entropy_frames=0)
    res["inspect_s"] = time.perf_counter() - t
    res["inspect_peak_rss_mib"] = proc_status()["VmHWM"] - base
    return res


def child_main(argv) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("step")
    p.add_argument("--size")
    p.add_argument("--url")
    p.add_argument("--storage-options")
    p.add_argument("--lookup", default="auto")
    p.add_argument("--index-cache", default="none", help="open_store index_cache: a directory, or none")
    p.add_argument("--lookups", type=int, default=100_000)
    p.add_argument("--batches", type=int, default=51)
    p.add_argument("--sample-shards", type=int, default=4)
    p.add_argument("--format-version", type=int, default=None)
    p.add_argument("--mem-limit-gb", type=float, default=18.0)
    a = p.parse_args(argv)
    lim = int(a.mem_limit_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    try:
        res = {"create": child_create, "read": child_read, "inspect": child_inspect}[a.step](a)
    except MemoryError:
        res = {"error": f"MemoryError: more than {a.mem_limit_gb} GB of address space"}
    print("RESULT " + json.dumps(res, default=str))


def run_child(step: str, size: str, url: str, opts: dict | None, extra: list[str], timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "_child", step, "--size", size, "--url", url, *extra]
    if opts:
        cmd += ["--storage-options", json.dumps(opts)]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {"error": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:] if p.stderr else ''}"}
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = time.perf_counter() - t
    return out


# --- store facts -------------------------------------------------------------------------------------------------
def store_facts(url: str, opts: dict | None, n: int) -> dict:
    if "://" not in url:
        files = [os.path.join(d, f) for d, _, fs in os.walk(url) for f in fs]
        index = [f for f in files if os.path.relpath(f, url).startswith("index" + os.sep)]
        done = [f for f in files if os.path.relpath(f, url).startswith("done" + os.sep)]
        return {"objects": len(files), "done_objects": len(done),
                "index_bytes": sum(os.path.getsize(f) for f in index),
                "bytes": sum(os.path.getsize(f) for f in files),
                "index_bytes_per_utt": sum(os.path.getsize(f) for f in index) / n}
    import s3fs
    fs = s3fs.S3FileSystem(**opts)
    root = url[len("s3://"):]
    sizes = {k: v["size"] for k, v in fs.find(root, detail=True).items()}
    index = [v for k, v in sizes.items() if k[len(root) + 1:].startswith("index/")]
    return {"objects": len(sizes), "done_objects": sum(1 for k in sizes if k[len(root) + 1:].startswith("done/")),
            "index_bytes": sum(index), "bytes": sum(sizes.values()), "index_bytes_per_utt": sum(index) / n}


def projection(r: dict, gpus: int = 64, gpus_per_node: int = 8, workers_per_gpu: int = 8) -> dict:
    """Per-node index memory and per-job S3 request cost of a DDP job reading this store."""
    procs = gpus * (workers_per_gpu + 1)      # each rank: its main process (the Dataset) + DataLoader workers
    node_procs = gpus_per_node * (workers_per_gpu + 1)
    rd = r.get("read_sorted") or r.get("read_auto") or {}
    out = {"procs_per_node": node_procs, "procs_per_job": procs}
    if "open_rss_anon_mib" in rd:
        out["private_index_gib_per_node"] = node_procs * rd["after_lookups_rss_anon_mib"] / 1024
        out["peak_rss_gib_per_node_unshared"] = node_procs * rd["peak_rss_mib"] / 1024
    return out


def s3_cost(rd: dict, procs: int, num_shards_read: int) -> dict:
    """Requests each reader makes to open and to find complete shards (+ failures()), and one record (or
    manifest) GET per shard it reads, times the job's processes, priced at PRICE_PER_1K."""
    def count(d):
        s3 = d.get("s3", {})
        get = sum(v for k, v in s3.items() if k in ("get_object", "head_object"))
        lst = sum(v for k, v in s3.items() if k.startswith("list_objects"))
        return get, lst
    g_open, l_open = count(rd.get("open_requests", {}))
    g_done, l_done = count(rd.get("completed_requests", {}))
    g_fail, l_fail = count(rd.get("failures_requests", {}))
    get = (g_open + g_done) * procs + g_fail          # failures(): once per job (the Dataset in rank 0 ... per rank)
    lst = (l_open + l_done) * procs + l_fail
    usd = get / 1000 * PRICE_PER_1K["GET"] + lst / 1000 * PRICE_PER_1K["LIST"]
    return {"get_per_reader_open": g_open + g_done, "list_per_reader_open": l_open + l_done,
            "get_failures_call": g_fail, "list_failures_call": l_fail, "job_get": get, "job_list": lst,
            "job_usd_open": usd}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(sys.argv[2:])
        return
    from _common import load_line, machine_state, start_moto, table, write_json
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="960h,10kh", help="comma-separated of " + ",".join(SIZES))
    p.add_argument("--s3-sizes", default="960h", help="sizes also written to and read from moto S3 ('' for none)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench_out", "store_scale"))
    p.add_argument("--format-version", type=int, default=None, help="write this format version (default: current)")
    p.add_argument("--lookups", type=int, default=100_000)
    p.add_argument("--s3-lookups", type=int, default=2_000)
    p.add_argument("--sample-shards", type=int, default=4)
    p.add_argument("--mem-limit-gb", type=float, default=18.0)
    p.add_argument("--s3-readers", default="ranged,cache",
                   help="S3 reader variants: ranged (index_cache=None, ranged block reads), cache (index_cache="
                        "a fresh directory: a first process downloads, a second maps)")
    p.add_argument("--skip-inspect", action="store_true", help="skip verify --no-data / inspect")
    p.add_argument("--keep", action="store_true", help="keep the stores (default: deleted after measuring)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    sizes = [s for s in a.sizes.split(",") if s]
    s3_sizes = [s for s in a.s3_sizes.split(",") if s]
    print(load_line())
    os.makedirs(a.out, exist_ok=True)
    common = ["--sample-shards", str(a.sample_shards), "--mem-limit-gb", str(a.mem_limit_gb)]
    if a.format_version:
        common += ["--format-version", str(a.format_version)]
    server = opts = None
    results = {}
    for size in sizes + [f"{s}@s3" for s in s3_sizes]:
        on_s3 = size.endswith("@s3")
        name = size[:-3] if on_s3 else size
        if on_s3 and server is None:
            server, opts = start_moto()
        url = f"s3://bench/scale-{name}" if on_s3 else os.path.join(a.out, f"store-{name}")
        if not on_s3 and os.path.exists(url):
            shutil.rmtree(url)
        o = opts if on_s3 else None
        lookups = str(a.s3_lookups if on_s3 else a.lookups)
        r = {"create": run_child("create", name, url, o, common, a.timeout)}
        print(f"[{size}] create: {r['create']}", flush=True)
        if "error" not in r["create"]:
            r["facts"] = store_facts(url, o, r["create"]["utterances"])
            modes = ("dict", "sorted")
            if on_s3:
                readers = a.s3_readers.split(",")
                modes = ("auto",) if "ranged" in readers else ()
            for mode in modes:
                r[f"read_{mode}"] = run_child("read", name, url, o, common + ["--lookup", mode, "--lookups", lookups],
                                              a.timeout)
                print(f"[{size}] read {mode}: {r[f'read_{mode}']}", flush=True)
            if on_s3 and "cache" in readers:
                cache = os.path.join(a.out, f"index-cache-{name}")
                shutil.rmtree(cache, ignore_errors=True)
                for which in ("cache_first", "cache_second"):     # first process downloads, second maps
                    r[f"read_{which}"] = run_child("read", name, url, o, common + [
                        "--lookups", lookups, "--index-cache", cache], a.timeout)
                    print(f"[{size}] read {which}: {r[f'read_{which}']}", flush=True)
                if not a.keep:
                    shutil.rmtree(cache, ignore_errors=True)
            if not a.skip_inspect:
                r["inspect"] = run_child("inspect", name, url, o, common, a.timeout)
                print(f"[{size}] inspect: {r['inspect']}", flush=True)
            r["projection"] = projection(r)
            rd = r.get("read_auto") or r.get("read_sorted") or {}
            if on_s3 and "open_requests" in rd:
                r["s3_cost"] = s3_cost(rd, r["projection"]["procs_per_job"], r["create"]["num_shards"])
        results[size] = r
        if not a.keep and not on_s3 and os.path.exists(url):
            shutil.rmtree(url)
        print(load_line(), flush=True)
    if server is not None:
        server.stop()

    rows = []
    for size, r in results.items():
        c, f = r["create"], r.get("facts", {})
        rd = r.get("read_sorted") or r.get("read_auto") or {}
        rdd = r.get("read_dict") or {}
        ins = r.get("inspect", {})
        rows.append([size, c.get("utterances", "-"), c.get("num_shards", "-"), c.get("error") or
                     f"{c.get('total_s', float('nan')):.1f}", c.get("peak_rss_mib", float("nan")),
                     rd.get("open_s", float("nan")), rd.get("open_rss_mib", float("nan")),
                     rd.get("after_lookups_rss_anon_mib", float("nan")),
                     rdd.get("lookups_per_s", float("nan")), rd.get("lookups_per_s", float("nan")),
                     rd.get("get_many_median_ms", float("nan")), rd.get("completed_s", float("nan")),
                     ins.get("verify_no_data_s", float("nan")), ins.get("inspect_s", float("nan")),
                     f.get("objects", "-"), f.get("index_bytes_per_utt", float("nan"))])
    print()
    print(table(["store", "utts", "shards", "create s", "create MiB", "open s", "open MiB", "anon MiB",
                 "dict lk/s", "sorted lk/s", "get_many ms", "done s", "verify s", "inspect s", "objects",
                 "index B/utt"], rows))
    req = []
    for size, r in results.items():
        rd = r.get("read_sorted") or r.get("read_auto") or {}
        for what in ("open", "completed", "failures", "get_many"):
            q = rd.get(f"{what}_requests")
            if q:
                req.append([size, what, json.dumps(q["objects"]), json.dumps(q["s3"])])
    print()
    print(table(["store", "step", "ObjectStore calls (keys)", "s3 requests"], req))
    cached = []
    for size, r in results.items():
        for which in ("auto", "cache_first", "cache_second"):
            rd = r.get(f"read_{which}")
            if rd and "open_s" in rd:
                look = rd.get("lookup_requests", {})
                cached.append([size, {"auto": "ranged (index_cache=None)", "cache_first": "cache: 1st process",
                                      "cache_second": "cache: 2nd process"}[which],
                               rd["open_s"], len(rd.get("index_cache_downloaded", [])), rd["lookups_per_s"],
                               rd["after_lookups_rss_anon_mib"], rd.get("get_many_median_ms", float("nan")),
                               json.dumps(look.get("s3", {}))])
    if cached:
        print()
        print(table(["store", "S3 reader", "open s", "arrays downloaded", "lookups/s", "private MiB",
                     "get_many ms", "lookup s3 requests"], cached))
    for size, r in results.items():
        if "s3_cost" in r:
            print(f"{size}: 64-GPU job S3 cost to open: {r['s3_cost']}")
        print(f"{size}: projection: {r.get('projection')}")
    write_json(a.json or os.path.join(a.out, "results.json"), {"machine": machine_state(), "args": vars(a),
                                                                "results": results})


if __name__ == "__main__":
    main()
