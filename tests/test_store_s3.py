"""ci_store on a real S3 endpoint (loopback moto server): roundtrip, resume, verify, and reads from forked workers."""
import json
import multiprocessing as mp
import os
import pickle
import subprocess
import sys

import fsspec
import numpy as np
import pytest

from ci_store import StoreError, create, open_store, plan_shards
from ci_store.format import shard_key
from ci_store.verify import verify_store

NCB = 8


@pytest.fixture
def s3_store(s3_bucket):
    url, opts = s3_bucket
    rng = np.random.default_rng(0)
    utts = [(f"utt{i:03d}", int(rng.integers(10, 200))) for i in range(40)]
    data = {u: rng.integers(0, 256, (n, NCB)).astype(np.uint8) for u, n in utts}
    plan = plan_shards(utts, 1024)
    st = create(f"{url}/labels", plan, num_codebooks=NCB, frame_rate=50.0, storage_options=opts, chunk_frames=128)
    for sh in plan.shards:
        st.write_shard(sh.index, {u: data[u] for u in sh.utt_ids})
    return st, data, opts


def test_s3_roundtrip_and_verify(s3_store):
    st, data, opts = s3_store
    ro = open_store(st.url, storage_options=opts)
    for u in ro.ids:
        assert np.array_equal(ro[u], data[u])
    ids = ro.ids[::-1]
    assert all(np.array_equal(a, data[u]) for u, a in zip(ids, ro.get_many(ids)))
    assert verify_store(st.url, storage_options=opts) == []
    # a flipped byte in one shard object is found and named
    fs = fsspec.filesystem("s3", **opts)
    key = f"{st.url}/{shard_key('codes', 1)}"
    raw = bytearray(fs.cat(key))
    raw[10] ^= 1
    fs.pipe(key, bytes(raw))
    problems = verify_store(st.url, storage_options=opts)
    assert problems and all("shard 1" in p for p in problems)


def test_s3_resume_with_exist_ok(s3_bucket):
    url, opts = s3_bucket
    utts = [(f"u{i}", 30 + i) for i in range(20)]
    data = {u: np.full((n, NCB), i % 256, np.uint8) for i, (u, n) in enumerate(utts)}
    plan = plan_shards(utts, 256)
    st = create(f"{url}/job", plan, num_codebooks=NCB, frame_rate=50.0, storage_options=opts)
    st.write_shard(0, {u: data[u] for u in plan.shards[0].utt_ids})
    again = create(f"{url}/job", plan, num_codebooks=NCB, frame_rate=50.0, storage_options=opts, exist_ok=True)
    assert again.completed_shards() == {0}
    with pytest.raises(StoreError, match="shard 1 is not complete"):
        again[plan.shards[1].utt_ids[0]]
    for sh in plan.shards[1:]:
        again.write_shard(sh.index, {u: data[u] for u in sh.utt_ids})
    assert verify_store(again) == []


def _write_shard_elsewhere(args):
    url, opts, shard, arrays = args
    open_store(url, mode="r+", storage_options=opts).write_shard(shard, arrays)


def test_reader_sees_shards_written_by_other_processes(s3_bucket):
    """A handle that listed the store before workers wrote must not trust fsspec's cached listing."""
    url, opts = s3_bucket
    utts = [(f"u{i}", 40) for i in range(12)]
    plan = plan_shards(utts, 128)
    create(f"{url}/w", plan, num_codebooks=NCB, frame_rate=50.0, storage_options=opts)
    reader = open_store(f"{url}/w", storage_options=opts)
    assert reader.completed_shards() == set()
    jobs = [(f"{url}/w", opts, sh.index, {u: np.full((40, NCB), sh.index, np.uint8) for u in sh.utt_ids})
            for sh in plan.shards]
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_write_shard_elsewhere, jobs)
    assert reader.completed_shards() == set(range(plan.num_shards))
    assert open_store(f"{url}/w", storage_options=opts).completed_shards() == set(range(plan.num_shards))
    assert (reader["u5"] == plan.shard_of("u5")).all()


_INHERITED = {}


def _read_inherited(ids):
    """Runs in a forked worker: uses the parent's CIStore object as inherited through fork (not pickled)."""
    store = _INHERITED["store"]
    return [store[u].tobytes() for u in ids]


def _read_pickled(args):
    store, ids = args
    return [store[u].tobytes() for u in ids]


def test_fork_pool_reads_after_parent_read(s3_store):
    """The parent reads first (binding its fsspec/S3 client to its event loop); forked workers must still read,
    both with the store object inherited through fork and with a pickled copy."""
    st, data, opts = s3_store
    ro = open_store(st.url, storage_options=opts)
    assert np.array_equal(ro[ro.ids[0]], data[ro.ids[0]])        # parent handle now bound to the parent's loop
    ids = ro.ids
    _INHERITED["store"] = ro
    try:
        with mp.get_context("fork").Pool(2) as pool:
            inherited = pool.map(_read_inherited, [ids[0::2], ids[1::2]])
            pickled = pool.map(_read_pickled, [(ro, ids[0::2]), (ro, ids[1::2])])
    finally:
        _INHERITED.clear()
    for results in (inherited, pickled):
        for part, got in zip([ids[0::2], ids[1::2]], results):
            assert len(got) == len(part)
            for b, u in zip(got, part):
                assert np.array_equal(np.frombuffer(b, np.uint8).reshape(-1, NCB), data[u])
    assert np.array_equal(ro[ids[-1]], data[ids[-1]])             # the parent still reads afterwards


def test_pickled_store_reopens_lazily(s3_store):
    st, data, opts = s3_store
    ro = open_store(st.url, storage_options=opts)
    ro[ro.ids[3]]
    clone = pickle.loads(pickle.dumps(ro))
    assert clone._h is None and clone.storage_options == opts
    assert np.array_equal(clone[ro.ids[3]], data[ro.ids[3]])


def _write_codes_store(url, opts, seed):
    rng = np.random.default_rng(seed)
    utts = [(f"s{seed}-{i:02d}", int(rng.integers(10, 150))) for i in range(12)]
    data = {u: rng.integers(0, 256, (n, NCB)).astype(np.uint8) for u, n in utts}
    plan = plan_shards(utts, 512)
    st = create(url, plan, num_codebooks=NCB, frame_rate=50.0, storage_options=opts, chunk_frames=64)
    for sh in plan.shards:
        st.write_shard(sh.index, {u: data[u] for u in sh.utt_ids})
    return data


@pytest.mark.parametrize("cache", ["simplecache", "blockcache", "filecache"])
def test_caching_url_in_the_writing_process(s3_bucket, tmp_path, cache):
    """The process that wrote two stores (and, like an extraction job, used plain synchronous fsspec on the same
    bucket with the same options) reads them back through a caching URL, then still uses its synchronous client.

    Before the fix, the cache layer's S3 filesystem was fsspec's cached synchronous instance (same options), whose
    client is bound to fsspec's I/O loop, and zarr awaited it on its own loop: "attached to a different loop"."""
    url, opts = s3_bucket
    with fsspec.open(f"{url}/manifest.jsonl", "wb", **opts) as f:   # what the extraction job does with manifests
        f.write(b'{"id": "x"}\n')
    stores = {f"{url}/a": _write_codes_store(f"{url}/a", opts, 1), f"{url}/b": _write_codes_store(f"{url}/b", opts, 2)}
    options = {"s3": dict(opts), cache: {"cache_storage": str(tmp_path / cache)}}
    for store_url, data in stores.items():
        cached = open_store(f"{cache}::{store_url}", storage_options=options)
        assert sorted(cached.ids) == sorted(data)
        for u, a in cached:
            assert np.array_equal(a, data[u])
        assert all(np.array_equal(a, data[u]) for u, a in zip(cached.ids, cached.get_many(cached.ids)))
        assert verify_store(cached) == []
    assert options == {"s3": opts, cache: {"cache_storage": str(tmp_path / cache)}}   # caller's options untouched
    # the synchronous client of this process still works after the cached reads
    assert fsspec.filesystem("s3", **opts).cat(f"{url}/manifest.jsonl") == b'{"id": "x"}\n'
    if cache != "blockcache":                      # whole-file caches: the objects really went through the cache
        assert os.listdir(tmp_path / cache)


def test_caching_url_read_leaves_the_process_sync_client_working(s3_store):
    """A fresh process reads through simplecache:: first, then uses plain synchronous fsspec with the same options
    (before the fix the cache layer had bound that shared client to zarr's loop, and the second use failed)."""
    st, data, opts = s3_store
    code = (f"import json, fsspec\nfrom ci_store import open_store\nopts = json.loads({json.dumps(opts)!r})\n"
            f"st = open_store('simplecache::{st.url}', storage_options={{'s3': opts}})\n"
            f"print(sum(len(a) for _, a in st))\n"
            f"print(len(fsspec.filesystem('s3', **opts).cat('{st.url}/zarr.json')) > 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [str(sum(len(a) for a in data.values())), "True"]
