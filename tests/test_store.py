"""ci_store on local and memory:// storage: planning, layout, writes, reads, resume, failures, verify, bad input."""
import json
import os
import pickle
import subprocess
import sys
import uuid

import numpy as np
import pytest
import zarr

from ci_store import (FORMAT_VERSION, CIStore, ShardPlan, StoreError, UtteranceIndex, create, open_store,
                      plan_shards)
from ci_store.format import done_key, shard_key
from ci_store.verify import verify_store

NCB = 4


def make_utts(n=60, seed=0, lo=5, hi=90):
    rng = np.random.default_rng(seed)
    return [(f"spk{i % 7}-utt{i:04d}", int(rng.integers(lo, hi))) for i in range(n)]


def make_codes(utts, seed=1, ncb=NCB, k=256):
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, k, (n, ncb)).astype(np.uint8 if k <= 256 else np.uint16) for u, n in utts}


def fill(store, data, shards=None, failures=None):
    failures = failures or {}
    for sh in store.plan.shards:
        if shards is not None and sh.index not in shards:
            continue
        fails = {u: failures[u] for u in sh.utt_ids if u in failures}
        store.write_shard(sh.index, {u: data[u] for u in sh.utt_ids if u not in fails}, failures=fails)


def all_objects(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.fixture
def utts():
    return make_utts()


@pytest.fixture
def data(utts):
    return make_codes(utts)


@pytest.fixture
def full_store(tmp_path, utts, data):
    plan = plan_shards(utts, 256)
    st = create(str(tmp_path / "s"), plan, num_codebooks=NCB, frame_rate=50.0, chunk_frames=32)
    fill(st, data)
    return st


# --- planning ---------------------------------------------------------------------------------------------------
def test_plan_greedy_keeps_order_and_never_crosses(utts):
    plan = plan_shards(utts, 200)
    assert plan.ids == [u for u, _ in utts]
    assert plan.total_frames == sum(n for _, n in utts)
    assert plan.padded_frames == plan.num_shards * 200
    frames = dict(utts)
    for sh in plan.shards:
        assert sh.start == sh.index * 200 and 0 < sh.size <= 200
        pos = sh.start
        for u, off, n in zip(sh.utt_ids, sh.offsets, sh.num_frames):
            assert off == pos and n == frames[u]
            assert sh.start <= off and off + n <= sh.start + 200
            pos += n
    # greedy: the first utterance of each next shard would not have fitted in the previous one
    for a, b in zip(plan.shards, plan.shards[1:]):
        assert a.size + b.num_frames[0] > 200


def test_plan_json_roundtrip_and_dict_input(utts):
    plan = plan_shards(dict(utts), 300)
    again = ShardPlan.from_json(plan.to_json())
    assert again == plan and again.sha256() == plan.sha256()
    assert plan_shards(utts, 301).sha256() != plan.sha256()
    with pytest.raises(StoreError, match="not a ci-store shard plan"):
        ShardPlan.from_json(json.dumps({"ids": []}))


def test_plan_bad_inputs_name_the_utterances():
    with pytest.raises(StoreError, match="duplicate utterance ids: 'a'"):
        plan_shards([("a", 3), ("b", 4), ("a", 5)], 10)
    with pytest.raises(StoreError, match=r"no frames.*'z'"):
        plan_shards([("a", 3), ("z", 0)], 10)
    with pytest.raises(StoreError, match=r"longer than shard_frames=10: 'big'.*shard_frames >= 11"):
        plan_shards([("a", 3), ("big", 11)], 10)
    with pytest.raises(StoreError, match="integers"):
        plan_shards([("a", 2.5)], 10)
    with pytest.raises(StoreError, match="no utterances"):
        plan_shards([], 10)
    with pytest.raises(StoreError, match="shard_frames"):
        plan_shards([("a", 3)], 0)


# --- roundtrip ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["local", "file", "memory"])
def test_roundtrip(tmp_path, utts, data, scheme):
    url = {"local": str(tmp_path / "s"), "file": f"file://{tmp_path}/s",
           "memory": f"memory://ci-{uuid.uuid4().hex}/s"}[scheme]
    plan = plan_shards(utts, 256)
    st = create(url, plan, num_codebooks=NCB, frame_rate=50.0, chunk_frames=32,
                teacher={"name": "hubert-large", "checkpoint_sha256": "ab" * 32, "layer": 18})
    for sh in reversed(plan.shards):           # any order: each shard is independent
        st.write_shard(sh.index, {u: data[u] for u in sh.utt_ids})
    ro = open_store(url)
    assert len(ro) == len(utts) and ro.ids == [u for u, _ in utts]
    assert ro.teacher["layer"] == 18 and ro.frame_rate == 50.0 and ro.kind == "codes"
    for u, n in utts:
        assert u in ro and ro.num_frames(u) == n
        got = ro[u]
        assert got.dtype == np.uint8 and np.array_equal(got, data[u])
    shuffled = [u for u, _ in utts][::-3]
    for u, a in zip(shuffled, ro.get_many(shuffled)):
        assert np.array_equal(a, data[u])
    assert [u for u, _ in ro] == [u for u, _ in utts]
    assert all(np.array_equal(a, data[u]) for u, a in ro)
    assert "nope" not in ro
    with pytest.raises(KeyError, match="'nope'"):
        ro["nope"]
    assert verify_store(ro) == []


def test_plain_zarr_reads_what_we_write(full_store, data):
    """The shards are standard zarr v3 sharding: zarr itself decodes them (crc32c checked) to the same rows."""
    z = zarr.open_group(full_store.url, mode="r")["codes"]
    for u in full_store.ids:
        off, n, _ = full_store.locate(u)
        assert np.array_equal(z[off:off + n], data[u])


def test_shard_bytes_equal_zarr_encoder(full_store):
    """Our fast encoder emits exactly the bytes zarr's own sharding codec would (same codecs, same layout)."""
    from zarr.storage import MemoryStore
    store = MemoryStore()
    meta = json.loads(open(os.path.join(full_store.url, "codes", "zarr.json")).read())
    store._store_dict["codes/zarr.json"] = zarr.core.buffer.default_buffer_prototype().buffer.from_bytes(
        json.dumps(meta).encode())
    z = zarr.open_array(store, path="codes", mode="r+", config={"write_empty_chunks": False})
    ref = zarr.open_group(full_store.url, mode="r")["codes"]
    S = full_store.shard_frames
    for s in range(full_store.num_shards):
        z[s * S:(s + 1) * S] = ref[s * S:(s + 1) * S]
        ours = open(os.path.join(full_store.url, shard_key("codes", s)), "rb").read()
        assert store._store_dict[f"codes/c/{s}/0"].to_bytes() == ours


def test_tail_padding_and_failed_rows_are_zero(tmp_path, utts, data):
    plan = plan_shards(utts, 256)
    st = create(str(tmp_path / "s"), plan, num_codebooks=NCB, frame_rate=50.0, chunk_frames=32)
    victim = plan.shards[1].utt_ids[0]
    data = {u: a + (a == 0) for u, a in data.items()}   # no zero codes in real rows, so padding is visible
    fill(st, data, failures={victim: "decode error: truncated flac"})
    z = zarr.open_group(st.url, mode="r")["codes"]
    off, n, _ = st.locate(victim)
    assert n > 0
    for sh in plan.shards:
        rows = z[sh.start:sh.start + 256]
        assert not rows[sh.size:].any()                 # tail padding holds PAD_VALUE 0
        real = np.ones(sh.size, bool)                   # every row of every other utterance holds its codes
        if sh.index == 1:
            real[off - sh.start:off - sh.start + n] = False
        assert rows[:sh.size][real].all(), sh.index
    assert not z[off:off + n].any()


def test_index_lookup_dict_and_sorted_paths(tmp_path, utts, data):
    full_store = create(str(tmp_path / "v1"), plan_shards(utts, 256), num_codebooks=NCB, frame_rate=50.0,
                        chunk_frames=32, format_version=1)      # the v1 index's two lookups (v2: test_store_v2.py)
    fill(full_store, data)
    ids = full_store.ids
    by_dict = open_store(full_store.url, lookup="dict")
    by_sort = open_store(full_store.url, lookup="sorted")
    assert by_dict.index.lookup == "dict" and by_sort.index.lookup == "sorted"
    for u in ids:
        assert by_dict.index.position(u) == by_sort.index.position(u) == ids.index(u)
        assert np.array_equal(by_dict[u], by_sort[u])
    for st in (by_dict, by_sort):
        with pytest.raises(KeyError, match="'missing-id'"):
            st.locate("missing-id")
        assert "spk0-utt9999" not in st and 17 not in st
    idx = UtteranceIndex(["b", "a", "c"], [0, 5, 9], [5, 4, 1], [0, 0, 0])
    assert idx.sort_order.tolist() == [1, 0, 2] and idx.sort_problems() == []


def test_sorted_lookup_finds_ids_of_16_bytes_and_more():
    """numpy 2.4's searchsorted on StringDType misplaces strings of >= 16 bytes; the sorted path must not use it
    (it is the default above 2M utterances, and corpus ids such as GigaSpeech's are ~30 bytes)."""
    ids = [f"gigaspeech-POD{k // 3:010d}_S{k % 3:07d}" for k in range(50)][::-1] + ["a", "0235-102353-0038"]
    idx = UtteranceIndex(ids, np.arange(len(ids)), np.ones(len(ids)), np.zeros(len(ids)), lookup="sorted")
    assert [idx.position(u) for u in ids] == list(range(len(ids)))
    assert "gigaspeech-POD0000000000_S0000003" not in idx and "zz" not in idx and "" not in idx


def test_uint16_codes_for_large_codebooks(tmp_path):
    utts = make_utts(10)
    data = make_codes(utts, k=1024)
    st = create(str(tmp_path / "s"), plan_shards(utts, 512), num_codebooks=NCB, codebook_size=1024,
                frame_rate=50.0)
    fill(st, data)
    assert st.dtype == np.uint16
    for u, _ in utts:
        assert np.array_equal(open_store(st.url)[u], data[u])


# --- completion, resume, idempotence, failures -----------------------------------------------------------------
def test_resume_gives_byte_identical_store(tmp_path, utts, data):
    plan = plan_shards(utts, 256)
    kw = dict(num_codebooks=NCB, frame_rate=50.0, chunk_frames=32)
    ref = create(str(tmp_path / "ref"), plan, **kw)
    fill(ref, data)

    st = create(str(tmp_path / "job"), plan, **kw)
    first = set(range(0, plan.num_shards, 2))
    fill(st, data, shards=first)
    # a crash mid-shard: data object written, no completion record
    crashed = next(s for s in range(plan.num_shards) if s not in first)
    partial = os.path.join(st.url, shard_key("codes", crashed))
    os.makedirs(os.path.dirname(partial), exist_ok=True)
    with open(partial, "wb") as fh:
        fh.write(b"partial garbage")
    del st

    with pytest.raises(StoreError, match="exist_ok"):
        create(str(tmp_path / "job"), plan, **kw)
    st = create(str(tmp_path / "job"), plan, exist_ok=True, **kw)
    assert st.completed_shards() == first
    assert not st.is_shard_complete(crashed) and st.is_shard_complete(min(first))
    u = plan.shards[crashed].utt_ids[0]
    with pytest.raises(StoreError, match=f"shard {crashed} is not complete"):
        open_store(st.url)[u]
    assert any("shards not complete" in p for p in verify_store(st.url))
    fill(st, data, shards=set(range(plan.num_shards)) - first)
    assert st.completed_shards() == set(range(plan.num_shards))
    assert all_objects(st.url) == all_objects(ref.url)
    assert verify_store(st.url) == []


def test_rewrite_is_idempotent_and_refuses_different_content(full_store, data):
    sh = full_store.plan.shards[0]
    before = all_objects(full_store.url)
    rec = full_store.write_shard(0, {u: data[u] for u in sh.utt_ids})
    assert rec == full_store.shard_record(0)
    assert all_objects(full_store.url) == before
    changed = {u: data[u].copy() for u in sh.utt_ids}
    changed[sh.utt_ids[0]][0, 0] ^= 1
    with pytest.raises(StoreError, match="shard 0 is already complete with different content"):
        full_store.write_shard(0, changed)
    with pytest.raises(StoreError, match="already complete"):
        full_store.write_shard(0, {u: data[u] for u in sh.utt_ids[1:]}, failures={sh.utt_ids[0]: "oops"})
    assert all_objects(full_store.url) == before


def test_replace_rewrites_a_complete_shard_and_equals_a_fresh_write(tmp_path, full_store, utts, data):
    """write_shard(replace=True): a shard first written with a failure, rewritten with the utterance recovered,
    holds exactly the bytes of a store written right the first time (object and record)."""
    sh = full_store.plan.shards[1]
    victim = sh.utt_ids[2]
    plan = plan_shards(utts, 256)
    st = create(str(tmp_path / "t"), plan, num_codebooks=NCB, frame_rate=50.0, chunk_frames=32)
    fill(st, data, failures={victim: "audio file not found"})
    assert st.failures() == {victim: "audio file not found"}
    with pytest.raises(StoreError, match="already complete with different content"):
        st.write_shard(1, {u: data[u] for u in sh.utt_ids})
    rec = st.write_shard(1, {u: data[u] for u in sh.utt_ids}, replace=True)
    assert rec["failures"] == {} and st.failures() == {}
    np.testing.assert_array_equal(open_store(st.url)[victim], data[victim])
    assert all_objects(st.url) == all_objects(full_store.url)
    assert verify_store(st.url) == []


def test_failures_recorded_and_reported(tmp_path, utts, data):
    plan = plan_shards(utts, 256)
    st = create(str(tmp_path / "s"), plan, num_codebooks=NCB, frame_rate=50.0, chunk_frames=32)
    whole = plan.shards[2]
    failures = {plan.shards[0].utt_ids[1]: "CUDA OOM", **{u: "corrupt audio" for u in whole.utt_ids}}
    fill(st, data, failures=failures)
    ro = open_store(st.url)
    assert ro.failures() == failures
    assert ro.shard_record(2)["object_nbytes"] == 0                # an all-failed shard stores no data object
    with pytest.raises(StoreError, match=f"utterance {plan.shards[0].utt_ids[1]} failed extraction: CUDA OOM"):
        ro[plan.shards[0].utt_ids[1]]
    with pytest.raises(StoreError, match="failed extraction"):
        ro.get_many([plan.shards[0].utt_ids[0], whole.utt_ids[0]])
    seen = [u for u, _ in ro]
    assert seen == [u for u, _ in utts if u not in failures]
    assert verify_store(ro) == []


# --- verify ---------------------------------------------------------------------------------------------------------
def test_verify_detects_flipped_byte_and_missing_record(full_store, data):
    assert verify_store(full_store.url) == []
    path = os.path.join(full_store.url, shard_key("codes", 1))
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 3] ^= 0x40
    open(path, "wb").write(bytes(raw))
    problems = verify_store(full_store.url)
    assert problems and all("shard 1" in p for p in problems)
    assert any("do not match the completion record" in p for p in problems)
    # the fast reader also refuses the corrupted chunk instead of returning wrong labels
    ro = open_store(full_store.url)
    with pytest.raises(StoreError, match="shard|checksum"):
        for u in full_store.plan.shards[1].utt_ids:
            assert np.array_equal(ro[u], data[u])
    os.remove(os.path.join(full_store.url, done_key(2)))
    problems = verify_store(full_store.url)
    assert any("not complete: 2" in p for p in problems)


def test_verify_detects_quantizer_tampering(tmp_path, utts, data):
    q = {"id": "mvq-abc123", "config": {"dim": 64, "num_codebooks": NCB, "codebook_size": 256},
         "arrays": {"centers": np.arange(NCB * 256 * 16, dtype=np.float32).reshape(NCB, 256, 16),
                    "scale": np.ones(64, np.float32)}}
    st = create(str(tmp_path / "s"), plan_shards(utts, 256), num_codebooks=NCB, frame_rate=50.0, quantizer=q)
    fill(st, data)
    config, arrays = open_store(st.url).quantizer_state()
    assert config == q["config"] and set(arrays) == {"centers", "scale"}
    assert np.array_equal(arrays["centers"], q["arrays"]["centers"])
    assert open_store(st.url).dim == 64 and verify_store(st.url) == []
    zarr.open_group(st.url, mode="r+")["quantizer/scale"][3] = 2.0
    assert any("quantizer_sha256" in p for p in verify_store(st.url))


# --- float stores -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_float_store_roundtrip(tmp_path, utts, dtype):
    rng = np.random.default_rng(3)
    emb = {u: rng.standard_normal((n, 24)).astype(np.float32) for u, n in utts}
    plan = plan_shards(utts, 512)
    st = create(str(tmp_path / "f"), plan, kind="float", dim=24, dtype=dtype, frame_rate=50.0)
    fill(st, emb)
    ro = open_store(st.url)
    assert ro.kind == "float" and ro.dtype == np.dtype(dtype) and ro.meta["chunk_frames"] == 256 and ro.meta["compressor"] == "none"
    for u, _ in utts:
        assert np.array_equal(ro[u], emb[u].astype(dtype))
    assert verify_store(ro) == []


def test_float_store_rejects_nan_and_overflow(tmp_path, utts):
    rng = np.random.default_rng(3)
    emb = {u: rng.standard_normal((n, 8)).astype(np.float32) for u, n in utts}
    plan = plan_shards(utts, 512)
    st = create(str(tmp_path / "f"), plan, kind="float", dim=8, dtype="float16", frame_rate=50.0)
    sh = plan.shards[0]
    bad = dict((u, emb[u]) for u in sh.utt_ids)
    victim = sh.utt_ids[2]
    bad[victim] = bad[victim].copy()
    bad[victim][3, 1] = np.nan
    with pytest.raises(ValueError, match=f"utterance '{victim}': NaN or inf at frame 3"):
        st.write_shard(0, bad)
    bad[victim][3, 1] = 1e6
    with pytest.raises(ValueError, match=f"'{victim}'.*too large for float16"):
        st.write_shard(0, bad)
    assert st.completed_shards() == set()
    assert not os.path.exists(os.path.join(st.url, shard_key("embeddings", 0)))


# --- bad input ----------------------------------------------------------------------------------------------------------
def test_write_shard_bad_inputs(tmp_path, utts, data):
    plan = plan_shards(utts, 256)
    st = create(str(tmp_path / "s"), plan, num_codebooks=NCB, frame_rate=50.0)
    sh0, sh1 = plan.shards[0], plan.shards[1]
    good = {u: data[u] for u in sh0.utt_ids}
    u0 = sh0.utt_ids[0]
    with pytest.raises(KeyError, match="'ghost' .*not in the store"):
        st.write_shard(0, {**good, "ghost": data[u0]})
    with pytest.raises(KeyError, match=f"'{sh1.utt_ids[0]}'.*belongs to shard 1, not shard 0"):
        st.write_shard(0, {**good, sh1.utt_ids[0]: data[sh1.utt_ids[0]]})
    with pytest.raises(ValueError, match=f"no array and no failure reason for utterances '{u0}'"):
        st.write_shard(0, {u: data[u] for u in sh0.utt_ids[1:]})
    with pytest.raises(ValueError, match=f"'{u0}': expected an array of shape \\({data[u0].shape[0]}, 4\\)"):
        st.write_shard(0, {**good, u0: data[u0][:, :3]})
    with pytest.raises(ValueError, match=f"'{u0}': expected an array of shape"):
        st.write_shard(0, {**good, u0: data[u0][:-1]})
    with pytest.raises(ValueError, match=f"'{u0}': codebook indexes must be integers, got dtype float32"):
        st.write_shard(0, {**good, u0: data[u0].astype(np.float32)})
    neg = data[u0].astype(np.int64)
    neg[2, 1] = -1
    with pytest.raises(ValueError, match=f"'{u0}': index -1 at frame 2 is outside"):
        st.write_shard(0, {**good, u0: neg})
    st16 = create(str(tmp_path / "s16"), plan, num_codebooks=NCB, codebook_size=100, frame_rate=50.0)
    big = (data[u0] % 100).astype(np.int32)
    big[4, 0] = 100
    with pytest.raises(ValueError, match=r"index 100 at frame 4 is outside \[0, 100\)"):
        st16.write_shard(0, {**{u: data[u] % 100 for u in sh0.utt_ids}, u0: big})
    with pytest.raises(ValueError, match="both written and marked failed"):
        st.write_shard(0, good, failures={u0: "x"})
    with pytest.raises(StoreError, match="shard 99 does not exist"):
        st.write_shard(99, good)
    assert st.completed_shards() == set() and st16.completed_shards() == set()
    ro = open_store(st.url)
    with pytest.raises(StoreError, match="read-only"):
        ro.write_shard(0, good)


def test_create_and_open_refuse_bad_paths_and_mismatches(tmp_path, utts, data):
    plan = plan_shards(utts, 256)
    q1 = {"id": "q-one", "config": {"dim": 8}, "arrays": {"c": np.zeros((NCB, 256, 2), np.float32)}}
    q2 = {"id": "q-two", "config": {"dim": 8}, "arrays": {"c": np.zeros((NCB, 256, 2), np.float32)}}
    url = str(tmp_path / "s")
    st = create(url, plan, num_codebooks=NCB, frame_rate=50.0, quantizer=q1)
    fill(st, data, shards={0})
    before = all_objects(url)
    with pytest.raises(StoreError, match="quantizer_id is 'q-one' there, 'q-two' here"):
        create(url, plan, num_codebooks=NCB, frame_rate=50.0, quantizer=q2, exist_ok=True)
    with pytest.raises(StoreError, match="num_codebooks is 4 there, 8 here"):
        create(url, plan, num_codebooks=8, frame_rate=50.0, quantizer=q1, exist_ok=True)
    with pytest.raises(StoreError, match="shard plan differs"):
        create(url, plan_shards(utts[:-1], 256), num_codebooks=NCB, frame_rate=50.0, quantizer=q1, exist_ok=True)
    with pytest.raises(StoreError, match="kind is 'codes' there, 'float' here"):
        create(url, plan, kind="float", dim=8, frame_rate=50.0, quantizer=q1, exist_ok=True)
    assert all_objects(url) == before                          # nothing touched by refused creates
    again = create(url, plan, num_codebooks=NCB, frame_rate=50.0, quantizer=q1, exist_ok=True)
    assert again.completed_shards() == {0}

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not empty and is not a ci-store.*notes.txt"):
        create(str(other), plan, num_codebooks=NCB, frame_rate=50.0, exist_ok=True)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(StoreError, match="not a ci-store"):
        open_store(str(other))
    lookalike = tmp_path / "lookalike"                   # files named like ours, but no zarr.json: not ours
    (lookalike / "index").mkdir(parents=True)
    (lookalike / "index" / "mine.csv").write_text("keep me too")
    with pytest.raises(StoreError, match="not empty and is not a ci-store"):
        create(str(lookalike), plan, num_codebooks=NCB, frame_rate=50.0)
    assert (lookalike / "index" / "mine.csv").read_text() == "keep me too"
    import importlib.util
    if importlib.util.find_spec("gcsfs") is None:        # without gcsfs: a clear error, not a crash
        with pytest.raises(StoreError, match="gcsfs"):
            open_store("gs://some-bucket/labels")
    with pytest.raises(StoreError, match="no such directory"):
        open_store(str(tmp_path / "absent"))
    zarr.open_group(str(tmp_path / "plainzarr"), mode="w").create_array("x", shape=(3,), dtype="int8")
    with pytest.raises(StoreError, match="Zarr group but not a ci-store"):
        open_store(str(tmp_path / "plainzarr"))


def test_newer_format_version_is_refused(full_store):
    g = zarr.open_group(full_store.url, mode="r+")
    meta = dict(g.attrs["ci_store"])
    meta["format_version"] = FORMAT_VERSION + 1
    g.update_attributes({"ci_store": meta})
    with pytest.raises(StoreError, match=f"format_version {FORMAT_VERSION + 1}, newer than this ci-store supports"):
        open_store(full_store.url)


def test_create_argument_errors(tmp_path, utts):
    plan = plan_shards(utts, 256)
    url = str(tmp_path / "s")
    with pytest.raises(StoreError, match="num_codebooks"):
        create(url, plan, frame_rate=50.0)
    with pytest.raises(StoreError, match="frame_rate"):
        create(url, plan, num_codebooks=4, frame_rate=0)
    with pytest.raises(StoreError, match="dim"):
        create(url, plan, kind="float", frame_rate=50.0)
    with pytest.raises(StoreError, match="float32 or float16"):
        create(url, plan, kind="float", dim=8, dtype="int8", frame_rate=50.0)
    with pytest.raises(StoreError, match="unsupported compressor"):
        create(url, plan, num_codebooks=4, frame_rate=50.0, compressor="lz4")
    with pytest.raises(StoreError, match="chunk_frames=100 must divide shard_frames=256"):
        create(url, plan, num_codebooks=4, frame_rate=50.0, chunk_frames=100)
    with pytest.raises(StoreError, match="quantizer dict lacks arrays"):
        create(url, plan, num_codebooks=4, frame_rate=50.0, quantizer={"id": "x", "config": {}})
    assert not os.path.exists(url)


def test_interrupted_create_is_redone(tmp_path, utts):
    plan = plan_shards(utts, 256)
    url = str(tmp_path / "s")
    create(url, plan, num_codebooks=NCB, frame_rate=50.0)
    g = zarr.open_group(url, mode="r+")           # simulate a crash before the last step of create()
    g.attrs.pop("ci_store")
    with pytest.raises(StoreError, match="not a ci-store"):
        open_store(url)
    st = create(url, plan, num_codebooks=NCB, frame_rate=50.0)
    assert st.completed_shards() == set() and len(st) == len(utts)


# --- process safety, caching URLs, no torch --------------------------------------------------------------------------
def test_pickle_carries_only_the_address(full_store, data):
    blob = pickle.dumps(full_store)
    assert len(blob) < 1000
    clone = pickle.loads(blob)
    assert isinstance(clone, CIStore) and clone._h is None
    u = full_store.ids[5]
    assert np.array_equal(clone[u], data[u])


def test_threads_share_one_store(full_store, data):
    from concurrent.futures import ThreadPoolExecutor
    ro = open_store(full_store.url)
    ids = full_store.ids * 3
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda u: ro[u], ids))
    assert all(np.array_equal(a, data[u]) for u, a in zip(ids, got))


def test_caching_url_reads(tmp_path, utts, data):
    url = f"memory://ci-{uuid.uuid4().hex}/s"
    st = create(url, plan_shards(utts, 256), num_codebooks=NCB, frame_rate=50.0, chunk_frames=32)
    fill(st, data)
    cached = open_store(f"simplecache::{url}", storage_options={"simplecache": {"cache_storage": str(tmp_path / "c")}})
    for u, _ in utts:
        assert np.array_equal(cached[u], data[u])
    assert os.listdir(tmp_path / "c")                # objects really went through the local cache
    assert verify_store(cached) == []


def test_ci_store_never_imports_torch():
    code = ("import sys, ci_store, ci_store.verify, ci_store.stats; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_plan_from_groups_and_shard_of(tmp_path, utts, data):
    groups = [utts[:10], utts[10:11], utts[11:]]
    cap = max(sum(n for _, n in g) for g in groups)
    plan = ShardPlan.from_groups(groups, cap)
    assert [list(zip(s.utt_ids, s.num_frames)) for s in plan.shards] == groups
    assert ShardPlan.from_json(plan.to_json()) == plan
    st = create(str(tmp_path / "g"), plan, num_codebooks=NCB, frame_rate=50.0, chunk_frames=cap)
    fill(st, data)
    assert [st.shard_of(u) for u, _ in utts] == [0] * 10 + [1] + [2] * (len(utts) - 11)
    assert all(np.array_equal(open_store(st.url)[u], data[u]) for u, _ in utts)
    with pytest.raises(StoreError, match="shard group 2 holds"):
        ShardPlan.from_groups(groups, cap - 1)          # group 2 (49 utterances) is the largest
    with pytest.raises(StoreError, match="duplicate utterance ids"):
        ShardPlan.from_groups([utts[:3], utts[2:4]], cap)
    with pytest.raises(StoreError, match="empty shard groups: 1"):
        ShardPlan.from_groups([utts[:3], []], cap)
