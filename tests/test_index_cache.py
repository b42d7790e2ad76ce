"""Per-host local copy of a remote v2 store's index (ci_store/indexcache.py), on the real moto S3 server.

Requests are counted at ci_store's ObjectStore (every index byte a remote reader gets goes through get / get_many /
get_ranges); downloads across processes are told by the files' inodes and by what each process reports it copied.
"""
import multiprocessing as mp
import os
import pickle
import warnings

import numpy as np
import pytest

from ci_store import StoreError, create, open_store, plan_shards
from ci_store import fsio, hashindex, indexcache
from ci_store.format import INDEX_GROUP

ARRAYS = sorted(hashindex.V2_ARRAYS)


def corpus(n=300, seed=1):
    rng = np.random.default_rng(seed)
    utts = [(f"gigaspeech-POD{k // 5:010d}_S{k % 5:07d}" if k % 4 else f"spk{k % 3}-ütt{k}",
             int(rng.integers(5, 40))) for k in range(n)]
    return utts, {u: rng.integers(0, 256, (f, 4), dtype=np.uint8) for u, f in utts}


def make(url, utts, data, storage_options=None, version=None):
    st = create(url, plan_shards(utts, 256), num_codebooks=4, frame_rate=50.0, storage_options=storage_options,
                format_version=version)
    for s in range(st.num_shards):
        st.write_shard(s, {u: data[u] for u in st.plan.shards[s].utt_ids})
    st.write_completion_manifest()
    return st


@pytest.fixture(scope="module")
def corpus_data():
    return corpus()


@pytest.fixture
def stores(s3_bucket, tmp_path, corpus_data):
    """The same plan and labels as a local v2 store and a v2 store on S3."""
    url, opts = s3_bucket
    utts, data = corpus_data
    make(str(tmp_path / "local"), utts, data)
    make(f"{url}/s", utts, data, storage_options=opts)
    return str(tmp_path / "local"), f"{url}/s", opts


class IndexRequests:
    """Counts the index objects (keys under index/, ranges counted one each) remote stores read through
    ObjectStore."""

    def __init__(self, monkeypatch):
        self.keys: list[str] = []
        for name, keys_of in (("get", lambda k, *a: [k]), ("get_many", lambda ks, *a: list(ks)),
                              ("get_ranges", lambda rs, *a: [r[0] for r in rs])):
            orig = getattr(fsio.ObjectStore, name)

            def f(obj, *a, _orig=orig, _keys=keys_of, **kw):
                if not obj.local:           # the S3 store's requests, not the local reference store's
                    self.keys += [k for k in _keys(*a) if k.startswith(f"{INDEX_GROUP}/")]
                return _orig(obj, *a, **kw)
            monkeypatch.setattr(fsio.ObjectStore, name, f)

    def data(self) -> list[str]:
        """Reads of array data (not the arrays' zarr.json, which every open reads)."""
        return [k for k in self.keys if k.endswith("/c/0")]


def same_reads(a, b, utts):
    ids = [u for u, _ in utts]
    rng = np.random.default_rng(0)
    for u in (ids[i] for i in rng.permutation(len(ids))):
        assert a.locate(u) == b.locate(u)
        assert np.array_equal(a[u], b[u])
    assert all(np.array_equal(x, y) for x, y in zip(a.get_many(ids[::7]), b.get_many(ids[::7])))
    assert a.ids == b.ids
    assert "missing-id" not in a and "missing-id" not in b


def test_cached_index_reads_like_the_local_store_with_no_index_gets_after_open(stores, tmp_path, corpus_data,
                                                                             monkeypatch):
    local, remote, opts = stores
    utts, _ = corpus_data
    cache = tmp_path / "cache"
    req = IndexRequests(monkeypatch)
    st = open_store(remote, storage_options=opts, index_cache=str(cache))   # forced on, far below 64 MiB
    idx = st.index
    assert sorted(idx.cache_downloaded) == sorted(idx.cache_files) == ARRAYS
    key = indexcache.cache_key(st.meta, remote)
    assert key.startswith("v2-" + st.meta["plan_sha256"])
    assert sorted(os.listdir(cache)) == sorted([key, f"{key}.lock"])        # no temp file left behind
    assert sorted(os.listdir(cache / key)) == ARRAYS
    for name in ARRAYS:
        assert open(cache / key / name, "rb").read() == open(os.path.join(local, "index", name, "c", "0"), "rb").read()
    assert sorted(set(req.data())) == sorted(f"index/{n}/c/0" for n in ARRAYS)
    req.keys.clear()
    same_reads(st, open_store(local), utts)
    assert req.keys == []                   # every lookup, id and entry came from the mapped copy
    assert open_store(remote, storage_options=opts, index_cache=str(cache)).index.cache_downloaded == []
    assert req.data() == []                 # a second open in this process downloads nothing


def _open_and_read(args):
    remote, opts, cache, ids, barrier = args
    if barrier is not None:
        barrier.wait()
    st = open_store(remote, storage_options=opts, index_cache=cache)
    idx = st.index
    return (sorted(idx.cache_downloaded), {n: os.stat(f).st_ino for n, f in idx.cache_files.items()},
            [st.locate(u) for u in ids], [st[u].tobytes() for u in ids[::5]])


def test_other_processes_map_the_copy_and_four_at_once_download_once(stores, tmp_path, corpus_data):
    local, remote, opts = stores
    utts, _ = corpus_data
    ids = [u for u, _ in utts]
    ref = open_store(local)
    want = ([ref.locate(u) for u in ids], [ref[u].tobytes() for u in ids[::5]])
    ctx = mp.get_context("spawn")
    cache = str(tmp_path / "four")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            res = pool.map(_open_and_read, [(remote, opts, cache, ids, barrier)] * 4)
    got = [name for r in res for name in r[0]]
    assert sorted(got) == ARRAYS            # each array downloaded by exactly one of the four
    assert all(r[1] == res[0][1] and sorted(r[1]) == ARRAYS for r in res)   # all map the same files
    assert all((r[2], r[3]) == want for r in res)
    with ctx.Pool(1) as pool:               # a later process of the host: maps, downloads nothing
        again = pool.map(_open_and_read, [(remote, opts, cache, ids, None)])[0]
    assert again[0] == [] and again[1] == res[0][1] and (again[2], again[3]) == want


def test_a_truncated_cached_array_is_downloaded_again(stores, tmp_path, corpus_data):
    local, remote, opts = stores
    utts, _ = corpus_data
    cache = str(tmp_path / "c")
    files = open_store(remote, storage_options=opts, index_cache=cache).index.cache_files
    size = os.path.getsize(files["id_bytes"])
    os.truncate(files["id_bytes"], size // 2)           # a copy cut short (crash of an older writer, disk full)
    with open(files["hash_rows"], "ab") as f:
        f.write(b"\0" * 4)                               # and one too long
    st = open_store(remote, storage_options=opts, index_cache=cache)
    assert sorted(st.index.cache_downloaded) == ["hash_rows", "id_bytes"]
    assert os.path.getsize(files["id_bytes"]) == size
    same_reads(st, open_store(local), utts)


def test_the_copy_is_checked_like_the_store(stores, tmp_path, corpus_data):
    """A cached file of the right size with bad content is refused by the per-entry checks, naming the array."""
    _, remote, opts = stores
    utts, _ = corpus_data
    cache = str(tmp_path / "c")
    files = open_store(remote, storage_options=opts, index_cache=cache).index.cache_files
    rows = np.fromfile(files["hash_rows"], "<u4")
    rows[:] = 4_000_000_000
    rows.tofile(files["hash_rows"])
    st = open_store(remote, storage_options=opts, index_cache=cache)
    with pytest.raises(StoreError, match=r"index/hash_rows: row 4000000000 outside \[0, 300\)"):
        st.locate(utts[3][0])


def test_an_unwritable_cache_falls_back_to_ranged_reads_with_a_warning(stores, tmp_path, corpus_data, monkeypatch):
    local, remote, opts = stores
    utts, _ = corpus_data
    (tmp_path / "file").write_text("not a directory")
    req = IndexRequests(monkeypatch)
    st = open_store(remote, storage_options=opts, index_cache=str(tmp_path / "file" / "cache"))
    with pytest.warns(indexcache.IndexCacheWarning, match="is not writable.*ranged requests"):
        idx = st.index
    assert idx.cache_files == {}
    same_reads(st, open_store(local), utts)
    assert req.data()                       # the old path: ranged reads of the store's index objects


def test_auto_copies_only_large_indexes_into_the_env_directory(stores, tmp_path, corpus_data, monkeypatch):
    local, remote, opts = stores
    utts, _ = corpus_data
    env_dir = tmp_path / "env"
    monkeypatch.setenv(indexcache.ENV_VAR, str(env_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_store(remote, storage_options=opts).index.cache_files == {}     # ~30 KB: below the threshold
    assert not env_dir.exists()
    monkeypatch.setattr(indexcache, "AUTO_MIN_BYTES", 1000)
    st = open_store(remote, storage_options=opts)
    assert sorted(st.index.cache_downloaded) == ARRAYS
    assert all(f.startswith(str(env_dir) + os.sep) for f in st.index.cache_files.values())
    same_reads(st, open_store(local), utts)
    monkeypatch.setenv(indexcache.ENV_VAR, "off")
    assert open_store(remote, storage_options=opts).index.cache_files == {}
    monkeypatch.delenv(indexcache.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert indexcache.default_dir() == str(tmp_path / "xdg" / "ci-store" / "index")
    # pickled (DataLoader workers, Dask tasks): the choice travels with the store
    off = pickle.loads(pickle.dumps(open_store(remote, storage_options=opts, index_cache=None)))
    assert off.index_cache is None and pickle.loads(pickle.dumps(st)).index_cache == "auto"


def test_none_keeps_ranged_reads_and_local_and_v1_stores_never_copy(stores, tmp_path, corpus_data, monkeypatch,
                                                                    s3_bucket):
    local, remote, opts = stores
    utts, data = corpus_data
    cache = tmp_path / "c"
    req = IndexRequests(monkeypatch)
    st = open_store(remote, storage_options=opts, index_cache=None)
    assert st.index.cache_files == {}
    st.locate(utts[-1][0])
    assert req.data()
    assert open_store(local, index_cache=str(cache)).index.cache_files == {}
    v1 = make(f"{s3_bucket[0]}/v1", utts[:50], data, storage_options=opts, version=1)
    r1 = open_store(v1.url, storage_options=opts, index_cache=str(cache))
    assert r1.format_version == 1 and np.array_equal(r1[utts[0][0]], data[utts[0][0]])
    assert not cache.exists()
    for bad in (3, True, ""):
        with pytest.raises(StoreError, match="index_cache must be"):
            open_store(local, index_cache=bad)
