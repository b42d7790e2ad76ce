"""Format v2 (issue 19): mapped hash index, column plans, completion manifest; v1 stores still open and read the same.

v1 stores are written by the same code with create(format_version=1): the v1 writer is kept (a resume continues
a v1 store in v1, and readers that predate v2 need v1 stores), so the fixture exercises exactly the layout older
ci-store versions wrote (the v1 index code is unchanged apart from the sorted-lookup fix).
"""
import json
import os
import threading

import numpy as np
import pytest

from ci_store import StoreError, create, open_store, plan_shards
from ci_store import fsio, hashindex
from ci_store.format import MANIFEST_KEY, done_key
from ci_store.plan import plan_arrays
from ci_store.verify import verify_store


def corpus(n=240, seed=0):
    rng = np.random.default_rng(seed)
    utts = [(f"gigaspeech-POD{k // 7:010d}_S{k % 7:07d}" if k % 3 else f"spk{k % 5}-ütt{k}", int(rng.integers(5, 40)))
            for k in range(n)]
    data = {u: rng.integers(0, 256, (f, 4), dtype=np.uint8) for u, f in utts}
    return utts, data


def fill(st, data, failed=()):
    for s in range(st.num_shards):
        sh = st.plan.shards[s]
        st.write_shard(s, {u: data[u] for u in sh.utt_ids if u not in failed},
                       failures={u: "too noisy" for u in sh.utt_ids if u in failed})


def make(url, utts, data, version=None, storage_options=None, failed=(), manifest=True):
    plan = plan_shards(utts, 256)
    st = create(url, plan, num_codebooks=4, frame_rate=50.0, format_version=version,
                storage_options=storage_options)
    fill(st, data, failed)
    if manifest:
        st.write_completion_manifest()
    return st


def test_v2_round_trip_and_v1_reads_identically(tmp_path):
    utts, data = corpus()
    failed = {utts[7][0]}
    v1 = make(str(tmp_path / "v1"), utts, data, version=1, failed=failed)
    v2 = make(str(tmp_path / "v2"), utts, data, failed=failed)
    assert (v1.format_version, v2.format_version) == (1, 2)
    assert sorted(os.listdir(tmp_path / "v2" / "index")) == sorted([*hashindex.V2_ARRAYS, "zarr.json"])
    for url in (v1.url, v2.url):
        assert verify_store(url) == []
    for lookup in ("dict", "sorted"):
        r1, r2 = open_store(v1.url, lookup=lookup), open_store(v2.url)
        assert r2.index.lookup == "hash"
        assert r1.ids == r2.ids == [u for u, _ in utts]
        for u, n in utts:
            assert r1.locate(u) == r2.locate(u)
            if u not in failed:
                assert np.array_equal(r2[u], data[u]) and np.array_equal(r1[u], data[u])
        ok = [u for u, _ in utts if u not in failed]
        assert all(np.array_equal(a, b) for a, b in zip(r1.get_many(ok), r2.get_many(ok)))
        assert r1.failures() == r2.failures() == {utts[7][0]: "too noisy"}
        assert [list(map(str, (u for u, _ in r1.read_shard(s)))) for s in range(r1.num_shards)] == \
               [[u for u, _ in r2.read_shard(s)] for s in range(r2.num_shards)]
        for st in (r1, r2):
            with pytest.raises(KeyError, match="'missing-id'"):
                st.locate("missing-id")
            assert "spk0-ütt0-x" not in st and 17 not in st and "" not in st
    assert v1.plan == v2.plan and v2.plan == open_store(v2.url).index.to_plan(256)


def test_a_v1_store_resumes_as_v1_and_new_stores_are_v2(tmp_path):
    utts, data = corpus(60)
    plan = plan_shards(utts, 256)
    st = create(str(tmp_path / "s"), plan, num_codebooks=4, frame_rate=50.0, format_version=1)
    st.write_shard(0, {u: data[u] for u in st.plan.shards[0].utt_ids})
    again = create(str(tmp_path / "s"), plan, num_codebooks=4, frame_rate=50.0, exist_ok=True)
    assert again.format_version == 1 and again.completed_shards() == {0}
    fill(again, data)
    assert again.write_completion_manifest() is False       # v1 has no manifest
    assert verify_store(again.url) == []
    with pytest.raises(StoreError, match="format_version is 1 there, 2 here"):
        create(str(tmp_path / "s"), plan, num_codebooks=4, frame_rate=50.0, exist_ok=True, format_version=2)
    with pytest.raises(StoreError, match="format_version must be one of"):
        create(str(tmp_path / "t"), plan, num_codebooks=4, frame_rate=50.0, format_version=3)


def test_hash_collisions_are_resolved_by_the_stored_id(tmp_path, monkeypatch):
    """With 2-bit hashes and 4-key blocks every key is shared by ~60 ids spread over many blocks."""
    monkeypatch.setattr(hashindex, "ID_HASH_BITS", 2)
    monkeypatch.setattr(hashindex, "HASH_BLOCK", 4)
    utts, data = corpus()
    st = make(str(tmp_path / "c"), utts, data)
    r = open_store(st.url)
    assert r.meta["id_hash_bits"] == 2 and r.meta["index_block"] == 4
    assert len(set(r.index.fence.tolist())) <= 4
    for k, (u, _) in enumerate(utts):
        assert r.index.position(u) == k and np.array_equal(r[u], data[u])
    for u in ("gigaspeech-POD0000000000_S9999999", "x", "spk0-ütt0 "):
        assert u not in r
    assert verify_store(st.url) == []
    monkeypatch.setattr(hashindex, "ID_HASH_BITS", 64)      # a resume keeps the store's own hash width
    assert create(st.url, plan_shards(utts, 256), num_codebooks=4, frame_rate=50.0,
                  exist_ok=True).meta["id_hash_bits"] == 2


def test_plan_arrays_matches_plan_shards_and_checks_like_it():
    utts, _ = corpus(500)
    ids = np.array([u for u, _ in utts])
    frames = np.array([n for _, n in utts])
    for S in (40, 256, 1 << 20):
        a, b = plan_arrays(ids, frames, S), plan_shards(utts, S)
        assert a == b and a.shards[:] == b.shards and a.sha256() == b.sha256()
        assert (a.num_shards, a.num_utterances, a.total_frames) == (b.num_shards, b.num_utterances, b.total_frames)
        assert np.array_equal(a.offsets(), b.arrays()[1])
    assert plan_arrays(np.strings.encode(ids, "utf-8"), frames, 256) == plan_shards(utts, 256)
    with pytest.raises(StoreError, match="duplicate utterance ids: 'spk3-ütt3'"):
        plan_arrays(np.array([u for u, _ in utts] + ["spk3-ütt3"]), np.append(frames, 3), 256)
    with pytest.raises(StoreError, match="no frames.*'spk0-ütt0'"):
        plan_arrays(ids, np.where(np.arange(len(frames)) == 0, 0, frames), 256)
    with pytest.raises(StoreError, match="longer than shard_frames=10"):
        plan_arrays(ids, frames, 10)
    with pytest.raises(StoreError, match="non-empty"):
        plan_arrays(np.array(["a", ""]), np.array([1, 2]), 10)


def test_duplicates_found_under_hash_collisions():
    keys = np.zeros(5, np.uint64)                     # every id collides
    ids = [b"a", b"b", b"a", b"c", b"b"]
    blob = np.frombuffer(b"".join(ids), np.uint8)
    ends = np.cumsum([len(x) for x in ids]).astype(np.uint64)
    assert hashindex.duplicate_problems(blob, ends, keys) == ["duplicate utterance ids: 'a', 'b'"]
    distinct = np.frombuffer(b"abc", np.uint8)
    assert hashindex.duplicate_problems(distinct, np.array([1, 2, 3], np.uint64), np.zeros(3, np.uint64)) == []


def test_completion_manifest(tmp_path, monkeypatch):
    utts, data = corpus()
    st = make(str(tmp_path / "m"), utts, data, manifest=False)
    last = st.num_shards - 1
    st2 = open_store(st.url, mode="r+")
    # not complete: no manifest
    os.remove(os.path.join(st.url, *done_key(last).split("/")))
    assert st2.write_completion_manifest() is False and not os.path.exists(os.path.join(st.url, MANIFEST_KEY))
    sh = st.plan.shards[last]
    st2.write_shard(last, {u: data[u] for u in sh.utt_ids})
    # concurrent compactions write the same bytes
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(open_store(st.url, mode="r+").write_completion_manifest()))
               for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    blob = open(os.path.join(st.url, MANIFEST_KEY), "rb").read()
    assert outs == [True] * 4 and open_store(st.url, mode="r+").write_completion_manifest()
    assert open(os.path.join(st.url, MANIFEST_KEY), "rb").read() == blob
    # a reader finds completion and failures without listing done/ or reading a record
    calls = {"list": 0, "get": []}
    orig_list, orig_get = fsio.ObjectStore.list_prefix, fsio.ObjectStore.get_many

    def counting_list(self, prefix):
        calls["list"] += 1
        return orig_list(self, prefix)

    def counting_get(self, keys):
        calls["get"] += list(keys)
        return orig_get(self, keys)
    monkeypatch.setattr(fsio.ObjectStore, "list_prefix", counting_list)
    monkeypatch.setattr(fsio.ObjectStore, "get_many", counting_get)
    r = open_store(st.url)
    assert r.completed_shards() == set(range(st.num_shards)) and r.failures() == {}
    r.get_many([u for u, _ in utts[:50]])
    assert calls["list"] == 0 and not [k for k in calls["get"] if k.startswith("done/shard-")]
    monkeypatch.undo()
    # replace=True removes the manifest before it changes a record; a stale manifest is what verify reports
    w = open_store(st.url, mode="r+")
    u0 = st.plan.shards[0].utt_ids[0]
    w.write_shard(0, {u: data[u] for u in st.plan.shards[0].utt_ids if u != u0}, failures={u0: "retry"},
                  replace=True)
    assert not os.path.exists(os.path.join(st.url, MANIFEST_KEY))
    assert open_store(st.url).failures() == {u0: "retry"}
    with open(os.path.join(st.url, MANIFEST_KEY), "wb") as f:      # the manifest of before the replace
        f.write(blob)
    assert any("disagrees with the completion records of shards 0" in p for p in verify_store(st.url))
    assert open_store(st.url, mode="r+").write_completion_manifest()
    assert verify_store(st.url) == [] and open_store(st.url).failures() == {u0: "retry"}


def _write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("damage, match", [
    ("truncate:hash_keys", r"index/hash_keys: \d+ bytes stored, expected"),
    ("missing:offsets", "index/offsets: array data index/offsets/c/0 is missing"),
    ("starts", "index/shard_starts: not strictly increasing"),
    ("rows", r"index/hash_rows: row 4294967295 outside"),
    ("ids", r"index/id_ends: entries .* are not increasing id ends"),
    ("utf8", "index/id_bytes: ids .* are not valid UTF-8"),
    ("offset", r"index: entry \d+ .* is outside its shard"),
    ("dtype", r"index/num_frames: shape .* type int64.*expected .* int32"),
    ("manifest", r"done/manifest.json.zst: cannot decompress|done/manifest.json.zst: .*JSON"),
    ("meta", "id_hash_bits must be an integer in"),
])
def test_corrupt_v2_index_gives_a_clear_error(tmp_path, damage, match):
    utts, data = corpus(80)
    st = make(str(tmp_path / "h"), utts, data)
    idx = os.path.join(st.url, "index")
    u = utts[40][0]
    pos = 40

    def arr(name):
        return os.path.join(idx, name, "c", "0")
    if damage.startswith("truncate:"):
        p = arr(damage.split(":")[1])
        _write(p, open(p, "rb").read()[:-3])
    elif damage.startswith("missing:"):
        os.remove(arr(damage.split(":")[1]))
    elif damage == "starts":
        a = np.fromfile(arr("shard_starts"), "<u8")
        a[1] = a[2]
        a.tofile(arr("shard_starts"))
    elif damage == "rows":
        np.full(80, 2 ** 32 - 1, "<u4").tofile(arr("hash_rows"))
    elif damage == "ids":
        a = np.fromfile(arr("id_ends"), "<u8")
        a[pos] = a[pos - 1]
        a.tofile(arr("id_ends"))
    elif damage == "utf8":
        a = np.fromfile(arr("id_ends"), "<u8")
        b = np.fromfile(arr("id_bytes"), np.uint8)
        b[int(a[pos - 1])] = 0xFF
        b.tofile(arr("id_bytes"))
    elif damage == "offset":
        a = np.fromfile(arr("offsets"), "<i8")
        a[pos] = 10 ** 12
        a.tofile(arr("offsets"))
    elif damage == "dtype":
        p = os.path.join(idx, "num_frames", "zarr.json")
        m = json.load(open(p))
        m["data_type"] = "int64"
        _write(p, json.dumps(m).encode())
    elif damage == "manifest":
        p = os.path.join(st.url, MANIFEST_KEY)
        _write(p, open(p, "rb").read()[:-20] + b"x" * 20)
    elif damage == "meta":
        p = os.path.join(st.url, "zarr.json")
        m = json.load(open(p))
        m["attributes"]["ci_store"]["id_hash_bits"] = 65
        _write(p, json.dumps(m).encode())
    with pytest.raises(StoreError, match=match):
        r = open_store(st.url)
        r[u]
        r.failures()
    assert verify_store(st.url) != []


def test_v2_store_on_s3_reads_ranges_and_one_manifest(s3_bucket):
    url, opts = s3_bucket
    utts, data = corpus(300)
    st = make(f"{url}/v2", utts, data, storage_options=opts, failed={utts[3][0]})
    r = open_store(f"{url}/v2", storage_options=opts)
    assert r.format_version == 2 and r.completed_shards() == set(range(st.num_shards))
    assert r.failures() == {utts[3][0]: "too noisy"}
    ok = [u for u, _ in utts if u != utts[3][0]]
    assert all(np.array_equal(a, data[u]) for a, u in zip(r.get_many(ok), ok))
    assert "missing" not in r and verify_store(f"{url}/v2", storage_options=opts) == []
