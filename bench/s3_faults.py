"""Transient-fault benchmark: a ci-store written and read through a loopback S3 endpoint that fails a seeded fraction
of requests, compared byte for byte with the same store written through a fault-free endpoint.

    .venv/bin/python bench/s3_faults.py                       # ~1-2 min on 2 CPU cores
    .venv/bin/python bench/s3_faults.py --rate 0.3 --shards 12 --json out.json

The endpoint is moto (in this process) behind tests/faulty_s3.py's proxy, which for a fraction `--rate` of requests
answers 503 SlowDown, resets the connection before forwarding, forwards and then resets (S3 applied the request,
the client never hears), or cuts the response body short. Decisions come from random.Random(--seed) in arrival
order. Data: synthetic speech-like 16-codebook codes (bench/store_io.py), log-normal utterance lengths, no teacher.

Each run creates the store, writes every shard (one write_shard per shard, as extraction tasks do), reads every
utterance back in get_many batches of 32 (as the training loader does) and runs verify_store, all through its
endpoint. Runs:
  clean          - no faults (the reference store; its request count is the baseline)
  client+ours    - faults; the client's retries as shipped (botocore 5 attempts, s3fs 5) under ci_store's
  ours only      - faults; botocore and s3fs retries off, so ci_store's RetryPolicy handles every fault
                   (aiohttp still resends an idempotent request once when a kept-alive connection drops)
  no retries     - faults; every retry layer off but aiohttp's for the shard writes (create, ~20 requests, runs
                   with ci_store's retries): shards fail with a StoreError; then the job is "resumed"
                   (create exist_ok=True, rewrite the incomplete shards, retries as shipped)
Printed per run: requests seen by the endpoint, faults injected (by kind), ci_store retries, wall time, whether
the store's objects equal the clean store's byte for byte, and utterances lost (not readable or not equal).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from _common import load_line, machine_state, start_moto, table, write_json  # noqa: E402
from faulty_s3 import FaultyProxy  # noqa: E402
from store_io import synthetic_codes, utterance_lengths  # noqa: E402

from ci_store import StoreError, create, open_store, plan_shards  # noqa: E402
from ci_store.fsio import NO_RETRY, PROCESS_RETRIES, RetryPolicy  # noqa: E402
from ci_store.verify import verify_store  # noqa: E402

NCB = 16
CLIENT_RETRIES_OFF = {"config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}}


def objects_under(fs, url: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    base = url[len("s3://"):]
    return {k[len(base) + 1:]: fs.cat_file(k) for k in fs.find(base)}


def lost_utterances(url, opts, data, retry) -> int:
    """Utterances that cannot be read back or differ from what was written (read through the run's endpoint)."""
    st = open_store(url, storage_options=opts, retry=retry)
    ids, lost = list(data), 0
    done = st.completed_shards()
    readable = [u for u in ids if st.shard_of(u) in done]
    lost += len(ids) - len(readable)
    for i in range(0, len(readable), 32):
        batch = readable[i:i + 32]
        for u, a in zip(batch, st.get_many(batch)):
            lost += not np.array_equal(a, data[u])
    return lost


def run(name, url, opts, plan, data, proxy, retry, s3fs_retries, reference, fs, resume=False):
    import s3fs
    s3fs.S3FileSystem.retries = s3fs_retries        # s3fs's own retry loop (class attribute; 5 as shipped)
    proxy.reset_counts()
    before = PROCESS_RETRIES.snapshot()
    t0 = time.perf_counter()
    failed = []
    # without any retries create (~20 requests) would almost never get through; that run creates with retries
    st = create(url, plan, num_codebooks=NCB, frame_rate=50.0, storage_options=opts,
                retry=RetryPolicy() if retry is NO_RETRY else retry)
    if retry is NO_RETRY:
        st = open_store(url, mode="r+", storage_options=opts, retry=NO_RETRY)
    for sh in plan.shards:
        try:
            st.write_shard(sh.index, {u: data[u] for u in sh.utt_ids})
        except StoreError as e:
            failed.append((sh.index, str(e)))
    t_write = time.perf_counter() - t0
    row = {"run": name, "shards_failed": len(failed),
           "utts_in_failed_shards": sum(len(plan.shards[s].utt_ids) for s, _ in failed)}
    if failed:
        row["first_failure"] = failed[0][1][:200]
    if resume:                                      # the job is rerun: reopen, write what is incomplete
        s3fs.S3FileSystem.retries = 5
        opts = {k: v for k, v in opts.items() if k != "config_kwargs"}
        retry = None
        st = create(url, plan, num_codebooks=NCB, frame_rate=50.0, storage_options=opts, exist_ok=True)
        done = st.completed_shards()
        for sh in plan.shards:
            if sh.index not in done:
                st.write_shard(sh.index, {u: data[u] for u in sh.utt_ids})
        row["resumed_shards"] = plan.num_shards - len(done)
    lost = lost_utterances(url, opts, data, retry)
    problems = verify_store(open_store(url, storage_options=opts, retry=retry))
    wall = time.perf_counter() - t0
    objs = objects_under(fs, url)
    after = PROCESS_RETRIES.snapshot()
    row.update(requests=proxy.requests, by_method=dict(proxy.by_method), faults=proxy.injected,
               fault_kinds={k: n for k, n in proxy.faults.items() if n},
               ci_store_retries=after["retries"] - before["retries"], gave_up=after["gave_up"] - before["gave_up"],
               retried_errors={k: n - before["by_error"].get(k, 0) for k, n in after["by_error"].items()
                               if n > before["by_error"].get(k, 0)},
               write_s=round(t_write, 2), wall_s=round(wall, 2), verify_problems=len(problems),
               objects=len(objs), identical=(reference is None or objs == reference), utterances_lost=lost)
    return row, objs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-frames", type=int, default=1 << 17, help="frames per shard (2**17: ~44 min of audio)")
    ap.add_argument("--mean-frames", type=int, default=600, help="mean utterance length in frames (12 s at 50 Hz)")
    ap.add_argument("--rate", type=float, default=0.2, help="fraction of requests that fail")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    logging.getLogger("ci_store").setLevel(logging.WARNING)

    rng = np.random.default_rng(args.seed)
    total = int(args.shards * args.shard_frames * 0.97)
    lengths = utterance_lengths(total, args.mean_frames, rng)
    codes = synthetic_codes(sum(lengths), NCB, rng)
    data, pos = {}, 0
    for i, n in enumerate(lengths):
        data[f"spk{i % 97:03d}-utt{i:06d}"] = codes[pos:pos + n]
        pos += n
    plan = plan_shards([(u, len(a)) for u, a in data.items()], args.shard_frames)
    print(f"# transient S3 faults: {len(data)} utterances, {sum(lengths):,} frames of {NCB}-codebook codes, "
          f"{plan.num_shards} shards of {args.shard_frames} frames; fault rate {args.rate}, seed {args.seed}")
    print(f"# {load_line()}")

    server, opts = start_moto()
    import s3fs
    direct = s3fs.S3FileSystem(**opts)
    rows, results = [], {}
    try:
        clean_proxy = FaultyProxy(opts["endpoint_url"], rate=0.0)
        faulty_proxy = FaultyProxy(opts["endpoint_url"], rate=args.rate, seed=args.seed)
        clean_ep, faulty_ep = clean_proxy.start(), faulty_proxy.start()
        clean = {**opts, "endpoint_url": clean_ep}
        faulty = {**opts, "endpoint_url": faulty_ep}
        row, reference = run("clean", "s3://bench/clean", clean, plan, data, clean_proxy, None, 5, None, direct)
        rows.append(row)
        for name, url, o, retry, s3r, resume in [
                ("client+ours", "s3://bench/client-ours", faulty, None, 5, False),
                ("ours only", "s3://bench/ours", {**faulty, **CLIENT_RETRIES_OFF}, RetryPolicy(), 1, False),
                ("no retries", "s3://bench/none", {**faulty, **CLIENT_RETRIES_OFF}, NO_RETRY, 1, True)]:
            row, _ = run(name, url, o, plan, data, faulty_proxy, retry, s3r, reference, direct, resume=resume)
            rows.append(row)
        clean_proxy.stop()
        faulty_proxy.stop()
    finally:
        server.stop()
    print()
    print(table(["run", "requests", "faults", "ci_store retries", "shards failed", "write s", "total s", "objects",
                 "byte-identical", "utts lost", "verify"],
                [[r["run"], r["requests"], r["faults"], r["ci_store_retries"], r["shards_failed"], r["write_s"],
                  r["wall_s"], r["objects"], "yes" if r["identical"] else "NO", r["utterances_lost"],
                  "ok" if r["verify_problems"] == 0 else f"{r['verify_problems']} problems"] for r in rows]))
    print()
    for r in rows[1:]:
        print(f"{r['run']}: faults {r['fault_kinds']}; requests by method {r['by_method']}")
        print(f"  ci_store retried {r['retried_errors']}; gave up {r['gave_up']} times")
        if r.get("first_failure"):
            print(f"  first failure: {r['first_failure']}")
        if "resumed_shards" in r:
            print(f"  {r['utts_in_failed_shards']} utterances were in the failed shards; resumed: "
                  f"{r['resumed_shards']} incomplete shards rewritten with retries on (counts above include it)")
    print(f"# {load_line()}")
    results.update(args=vars(args), machine=machine_state(), runs=rows)
    write_json(args.json, results)
    bad = [r["run"] for r in rows if not r["identical"] or r["utterances_lost"] or r["verify_problems"]]
    if bad:
        print(f"FAILED: {bad} differ from the fault-free store")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
