"""Float-label stores (issue 17): the defaults (uncompressed, ~128 KiB inner chunks), the local vectored read path
they take, and stores written with the earlier defaults (zstd:3, 256-frame chunks), which must keep reading and
resuming. Every read path is compared with the labels written and with the general (range + decode) path, on
local disk and on the moto S3 server; corrupted and truncated data must raise StoreError naming the utterance."""
import os

import fsspec
import numpy as np
import pytest

import ci_store.fsio
from ci_store import StoreError, create, open_store, plan_shards
from ci_store.format import default_float_chunk_frames, done_key, shard_key
from ci_store.reader import ShardReader
from ci_store.verify import verify_store
from test_hostile_store import refused

DIM = 24
SHARD = 512


def float_utts(seed=0, n=40):
    rng = np.random.default_rng(seed)
    utts = [(f"spk{i % 3}-utt{i:03d}", int(rng.integers(1, 150))) for i in range(n)]
    utts.append(("zeros-long", 70))             # whole chunks of zeros: stored as empty chunks
    utts.append(("neg-zero", 9))                # -0.0 must come back as -0.0, not as padding
    data = {u: rng.standard_normal((n, DIM)).astype(np.float32) for u, n in utts}
    data["zeros-long"][:] = 0
    data["neg-zero"][:] = -0.0
    return utts, data


def write(url, utts, data, failures=None, opts=None, **kw):
    kw.setdefault("chunk_frames", 8)
    st = create(url, plan_shards(utts, SHARD), kind="float", dim=DIM, frame_rate=50.0, storage_options=opts, **kw)
    failures = failures or {}
    for sh in st.plan.shards:
        fails = {u: failures[u] for u in sh.utt_ids if u in failures}
        st.write_shard(sh.index, {u: data[u].astype(st.dtype) for u in sh.utt_ids if u not in fails}, fails)
    return st


def same(a, b):
    """Bitwise equality (so -0.0 differs from +0.0)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def general_path(monkeypatch):
    monkeypatch.setattr(ShardReader, "direct", property(lambda self: False))


def all_reads(st, ids):
    """Every way to read: one per call, get_many (shuffled, repeated, across shards), read_shard, iteration."""
    rng = np.random.default_rng(7)
    order = [ids[i] for i in rng.permutation(len(ids))] + ids[:3]
    out = {"single": {u: st[u] for u in ids}}
    out["get_many"] = dict(zip(order, st.get_many(order)))
    out["read_shard"] = {u: a for s in range(st.num_shards) for u, a in st.read_shard(s)}
    out["iter"] = dict(iter(st))
    return out


# --- defaults ----------------------------------------------------------------------------------------------------
def test_float_defaults_are_uncompressed_small_chunks_and_codes_unchanged(tmp_path):
    assert default_float_chunk_frames(1024, 4) == 32 and default_float_chunk_frames(1024, 2) == 64
    assert default_float_chunk_frames(24, 4) == 256 and default_float_chunk_frames(16384, 4) == 16
    utts, data = float_utts()
    f32 = create(str(tmp_path / "f32"), plan_shards(utts, 32768), kind="float", dim=1024, frame_rate=50.0)
    assert f32.meta["compressor"] == "none" and f32.meta["chunk_frames"] == 32 and f32._handle().reader.direct
    f16 = create(str(tmp_path / "f16"), plan_shards(utts, 65536), kind="float", dim=1024, dtype="float16",
                 frame_rate=50.0)
    assert f16.meta["compressor"] == "none" and f16.meta["chunk_frames"] == 64
    odd = create(str(tmp_path / "odd"), plan_shards(utts, 1000), kind="float", dim=1024, frame_rate=50.0)
    assert odd.meta["chunk_frames"] == 25          # largest divisor of 1000 not above 32
    prime = create(str(tmp_path / "p"), plan_shards(utts, 251), kind="float", dim=1024, frame_rate=50.0)
    assert prime.meta["chunk_frames"] == 251       # no divisor near 32: the whole shard, as before
    codes = create(str(tmp_path / "c"), plan_shards(utts, 1 << 20), num_codebooks=4, frame_rate=50.0)
    assert codes.meta["compressor"] == "zstd:3" and codes.meta["chunk_frames"] == 1024
    assert not codes._handle().reader.direct


# --- the local vectored path vs the general path and the data -------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("chunk", [8, 16, 512])
def test_direct_reads_equal_written_labels_and_general_path(tmp_path, monkeypatch, dtype, chunk):
    utts, data = float_utts()
    failed = utts[5][0]
    st = write(str(tmp_path / "f"), utts, data, failures={failed: "teacher crashed"}, chunk_frames=chunk,
               dtype=dtype)
    ro = open_store(st.url)
    assert ro._handle().reader.direct
    ids = [u for u, _ in utts if u != failed]
    fast = all_reads(ro, ids)
    for how, got in fast.items():
        assert sorted(got) == sorted(ids), how
        for u in ids:
            assert same(got[u], data[u].astype(dtype)), (how, u)
            assert got[u].flags.c_contiguous and got[u].flags.writeable
    assert np.signbit(fast["single"]["neg-zero"]).all()
    with pytest.raises(StoreError, match=f"utterance {failed} failed extraction: teacher crashed"):
        ro[failed]
    rows = dict(ro.read_shard(ro.shard_of(failed), include_failed=True))[failed]
    assert not rows.any()                           # a failed utterance's rows are padding (0)
    general_path(monkeypatch)
    slow = all_reads(open_store(st.url), ids)
    assert not open_store(st.url)._handle().reader.direct
    for how in fast:
        assert all(same(fast[how][u], slow[how][u]) for u in ids), how
    assert verify_store(st.url) == []


def test_get_many_results_are_independent_arrays(tmp_path):
    utts, data = float_utts()
    ro = open_store(write(str(tmp_path / "f"), utts, data).url)
    ids = [u for u, _ in utts[:6]]
    got = ro.get_many(ids)
    got[0][:] = 123.0                               # writing one result changes no other
    for u, a in zip(ids[1:], got[1:]):
        assert same(a, data[u])
    assert same(ro[ids[0]], data[ids[0]])           # nor the store


def test_short_reads_resume_where_they_stopped(tmp_path, monkeypatch):
    """preadv may return fewer bytes than asked (NFS, signals): the read goes on inside the buffer it stopped in."""
    utts, data = float_utts()
    url = write(str(tmp_path / "f"), utts, data).url
    calls = []
    real = ci_store.fsio._preadv

    def short(fd, buffers, offset):             # the real preadv, limited to 1000 bytes per call
        calls.append(offset)
        left, cut = 1000, []
        for b in buffers:
            if left <= 0:
                break
            cut.append(b[:left])
            left -= len(cut[-1])
        return real(fd, cut, offset)
    monkeypatch.setattr(ci_store.fsio, "_preadv", short)
    ro = open_store(url)
    for u, _ in utts:
        assert same(ro[u], data[u])
    assert len(calls) > 2 * len(utts)            # most reads took several calls


# --- stores written with the earlier defaults ------------------------------------------------------------------------
def test_store_with_earlier_defaults_reads_verifies_and_resumes(tmp_path):
    """zstd:3 and 256-frame chunks (the defaults before issue 17, format v1 like today's): read by the general
    path, equal to the labels; a resume that does not name a layout keeps the store's own; naming another one is
    refused."""
    utts, data = float_utts()
    url = str(tmp_path / "old")
    st = write(url, utts, data, compressor="zstd:3", chunk_frames=256)
    before = {k: open(os.path.join(url, k), "rb").read() for k in (shard_key("embeddings", 0), done_key(0))}
    ro = open_store(url)
    assert ro.meta["compressor"] == "zstd:3" and ro.meta["chunk_frames"] == 256 and not ro._handle().reader.direct
    ids = [u for u, _ in utts]
    for how, got in all_reads(ro, ids).items():
        assert all(same(got[u], data[u]) for u in ids), how
    assert verify_store(url) == []
    again = create(url, st.plan, kind="float", dim=DIM, frame_rate=50.0, exist_ok=True)
    assert again.meta["compressor"] == "zstd:3" and again.meta["chunk_frames"] == 256
    sh = again.plan.shards[0]
    again.write_shard(0, {u: data[u] for u in sh.utt_ids})      # same labels: a no-op, bytes unchanged
    assert before == {k: open(os.path.join(url, k), "rb").read() for k in before}
    with pytest.raises(StoreError, match="compressor is 'zstd:3' there, 'none' here"):
        create(url, st.plan, kind="float", dim=DIM, frame_rate=50.0, exist_ok=True, compressor="none")
    with pytest.raises(StoreError, match="chunk_frames is 256 there, 8 here"):
        create(url, st.plan, kind="float", dim=DIM, frame_rate=50.0, exist_ok=True, chunk_frames=8)


# --- corruption, truncation, hostile indexes ---------------------------------------------------------------------------
def _object(url, shard=0):
    return os.path.join(url, *shard_key("embeddings", shard).split("/"))


@pytest.mark.parametrize("where", ["data", "crc"])
def test_corrupted_chunk_names_the_utterance(tmp_path, where):
    utts, data = float_utts()
    st = write(str(tmp_path / "f"), utts, data)
    victim = st.plan.shards[0].utt_ids[2]
    off, n, shard = st.locate(victim)
    chunk = (off - shard * SHARD) // 8 + 1 if n > 8 else (off - shard * SHARD) // 8
    idx = st._handle().reader.indexes([shard], {shard: st.shard_record(shard)["object_nbytes"]})[shard]
    pos, size = (int(x) for x in idx[chunk])
    path = _object(st.url, shard)
    raw = bytearray(open(path, "rb").read())
    raw[pos + (size // 2 if where == "data" else size - 1)] ^= 0x10
    open(path, "wb").write(bytes(raw))
    ro = open_store(st.url)
    with pytest.raises(StoreError, match=rf"inner chunk {chunk}\): checksum mismatch.*utterance '{victim}'"):
        ro[victim]
    others = [u for u in st.plan.shards[0].utt_ids if u != victim]
    with pytest.raises(StoreError, match=f"utterance '{victim}'"):
        ro.get_many(others[:1] + [victim] + others[1:])
    assert all(same(ro[u], data[u]) for u in st.plan.shards[1].utt_ids)      # other shards still read
    assert any("shard 0" in p for p in verify_store(st.url))


def test_truncated_and_missing_objects_name_the_utterance(tmp_path):
    utts, data = float_utts()
    st = write(str(tmp_path / "f"), utts, data)
    path = _object(st.url, 0)
    raw = open(path, "rb").read()
    last = st.plan.shards[0].utt_ids[-1]
    # the index stays readable (its bytes moved to where the record says the object ends), the data is cut short
    index_nbytes = st.layout.index_nbytes
    open(path, "wb").write(raw[:len(raw) // 3] + b"\0" * (len(raw) - len(raw) // 3 - index_nbytes))
    os.truncate(path, len(raw) // 3)
    ro = open_store(st.url)
    with pytest.raises(StoreError, match=f"utterance '{last}'"):
        ro[last]
    assert any("shard 0" in p for p in verify_store(st.url))
    os.remove(path)
    with pytest.raises(StoreError, match=f"shard object is missing.*utterance '{last}'"):
        open_store(st.url)[last]


def test_truncated_object_with_cached_index_names_the_utterance(tmp_path):
    """The index was read while the object was whole; the object is cut afterwards (a rewrite in progress,
    a failing disk): the vectored read ends early and says so."""
    utts, data = float_utts()
    st = write(str(tmp_path / "f"), utts, data)
    ro = open_store(st.url)
    first, last = st.plan.shards[0].utt_ids[0], st.plan.shards[0].utt_ids[-1]
    assert same(ro[first], data[first])                 # index of shard 0 cached
    off, n, _ = st.locate(last)
    os.truncate(_object(st.url, 0), (off + n // 2) * DIM * 4)
    with pytest.raises(StoreError, match=f"truncated or corrupted.*utterance '{last}'"):
        ro[last]


@pytest.mark.parametrize("edit", [
    lambda idx, cn: idx.__setitem__(1, (idx[1, 0], cn + 3)),          # one byte short of an uncompressed chunk
    lambda idx, cn: idx.__setitem__(1, (idx[1, 0], cn + 5)),          # one byte more
    lambda idx, cn: idx.__setitem__(1, (0, 1 << 40)),                 # claims a TiB
    lambda idx, cn: idx.__setitem__(1, (idx[0, 0], idx[1, 1])),       # overlaps chunk 0
], ids=["short", "long", "tebibyte", "overlap"])
def test_hostile_index_of_an_uncompressed_store(tmp_path, edit):
    import crc32c
    import hashlib
    import json
    utts, data = float_utts()
    st = write(str(tmp_path / "f"), utts, data)
    L = st.layout
    path = _object(st.url, 0)
    raw = open(path, "rb").read()
    idx = np.frombuffer(raw[-L.index_nbytes:-4], "<u8").reshape(-1, 2).copy()
    edit(idx, L.chunk_nbytes)
    body = idx.astype("<u8").tobytes()
    obj = raw[:-L.index_nbytes] + body + crc32c.crc32c(body).to_bytes(4, "little")
    open(path, "wb").write(obj)
    rec_path = os.path.join(st.url, *done_key(0).split("/"))
    rec = json.load(open(rec_path))
    rec["object_sha256"] = hashlib.sha256(obj).hexdigest()
    open(rec_path, "w").write(json.dumps(rec))
    first = st.plan.shards[0].utt_ids[0]
    msg = refused(lambda: open_store(st.url)[first], "embeddings/c/0/0")
    assert f"utterance '{first}'" in msg
    assert any("embeddings/c/0/0" in p for p in verify_store(st.url))


# --- S3 ----------------------------------------------------------------------------------------------------------------
def test_float_store_on_s3_equals_local_direct_reads(s3_bucket, tmp_path):
    url, opts = s3_bucket
    utts, data = float_utts()
    failed = utts[1][0]
    local = open_store(write(str(tmp_path / "f"), utts, data, failures={failed: "x"}).url)
    remote_st = write(f"{url}/f", utts, data, failures={failed: "x"}, opts=opts)
    remote = open_store(remote_st.url, storage_options=opts)
    assert local._handle().reader.direct and not remote._handle().reader.direct
    ids = [u for u, _ in utts if u != failed]
    fast, s3 = all_reads(local, ids), all_reads(remote, ids)
    for how in fast:
        assert all(same(fast[how][u], s3[how][u]) and same(s3[how][u], data[u]) for u in ids), how
    assert verify_store(remote_st.url, storage_options=opts) == []
    # the same object bytes on both sides (the format does not depend on where it is written)
    fs = fsspec.filesystem("s3", **opts)
    key = shard_key("embeddings", 0)
    assert fs.cat(f"{remote_st.url}/{key}") == open(_object(local.url, 0), "rb").read()
    # a flipped byte on S3 is refused naming the utterance
    victim = remote_st.plan.shards[0].utt_ids[3]
    off, n, _ = remote.locate(victim)
    raw = bytearray(fs.cat(f"{remote_st.url}/{key}"))
    chunk = off // 8
    idx = np.frombuffer(bytes(raw[-remote.layout.index_nbytes:-4]), "<u8").reshape(-1, 2)
    raw[int(idx[chunk, 0]) + 5] ^= 1
    fs.pipe(f"{remote_st.url}/{key}", bytes(raw))
    with pytest.raises(StoreError, match=f"checksum mismatch.*utterance '{victim}'"):
        open_store(remote_st.url, storage_options=opts)[victim]


def test_checksums_are_checked_once_per_reader_and_afresh_by_a_new_handle(tmp_path, monkeypatch):
    """A reader hashes a chunk the first time it reads it (later epochs re-read without hashing); a corruption after
    that is still found by every new handle and by verify."""
    import ci_store.reader as reader

    utts, data = float_utts()
    st = write(str(tmp_path / "f"), utts, data)
    victim = st.plan.shards[0].utt_ids[2]
    hashed = []
    real = reader.crc32c.crc32c
    monkeypatch.setattr(reader.crc32c, "crc32c", lambda b: hashed.append(len(b)) or real(b))
    ro = open_store(st.url)
    assert same(ro[victim], data[victim]) and hashed
    first = len(hashed)
    assert same(ro[victim], data[victim]) and len(hashed) == first  # second read: no hashing
    off, n, shard = st.locate(victim)
    idx = ro._handle().reader.indexes([shard], {shard: st.shard_record(shard)["object_nbytes"]})[shard]
    pos, size = (int(x) for x in idx[(off - shard * SHARD) // 8])
    path = _object(st.url, shard)
    raw = bytearray(open(path, "rb").read())
    raw[pos + size // 2] ^= 0x10
    open(path, "wb").write(bytes(raw))
    with pytest.raises(StoreError, match=f"checksum mismatch.*utterance '{victim}'"):
        open_store(st.url)[victim]
    assert any("shard 0" in p for p in verify_store(st.url))
