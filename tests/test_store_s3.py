"""ci_store on a real S3 endpoint (loopback moto server): roundtrip, resume, verify, and reads from forked workers."""
import multiprocessing as mp
import pickle

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
