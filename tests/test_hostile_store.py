"""A store from someone else's bucket is untrusted input: crafted shard objects, indexes, completion records and
attributes must each be refused with StoreError naming the object, and never make the reader allocate what they
claim (checked with tracemalloc: the peak of traced allocations while the read is refused stays small)."""
import hashlib
import json
import resource
import tracemalloc

import crc32c
import fsspec
import numpy as np
import pytest
from numcodecs import Zstd

from ci_store import StoreError, create, open_store, plan_shards
from ci_store.verify import verify_store

NCB = 8
SHARD, CHUNK = 2048, 1024          # two 8 KiB inner chunks per shard
SMALL = 16 << 20                   # what a refused read may allocate at most (traced peak)
# On S3 the moto server runs in this process (session fixture): tracemalloc also traces its threads while they
# serve the read, and their share grows with what earlier tests left in the server (20.1 MB peak seen in a
# full-suite run, under 16 MB alone). Still far below what the crafted stores claim (1 TiB).
SMALL_S3 = 64 << 20
MAGIC = b"\x28\xb5\x2f\xfd"


def _crc(b: bytes) -> bytes:
    return crc32c.crc32c(b).to_bytes(4, "little")


def refused(call, match=None, small=SMALL):
    """Run call(); it must raise StoreError (matching `match`) with a small traced allocation peak.

    The address space is capped meanwhile (1 GiB above what the process maps now), so that a reader that does
    allocate what a crafted store claims fails here with MemoryError instead of exhausting the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    cap = mapped + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    tracemalloc.start()
    try:
        with pytest.raises(StoreError, match=match) as e:
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert peak < small, f"refusing took {peak} bytes of allocations"
    return str(e.value)


def zstd_bomb(declared: int | None, output: int) -> bytes:
    """A valid zstd frame of RLE blocks decoding to `output` zero bytes in a few bytes per 128 KiB; its header
    declares `declared` bytes (None: no size in the header, as a streaming writer leaves it)."""
    if declared is None:
        head = MAGIC + bytes([0x00, 7 << 3])                        # no content size; window 128 KiB
    else:
        head = MAGIC + bytes([0xE0]) + declared.to_bytes(8, "little")   # single segment, 8-byte content size
    blocks, left = [], output
    while left > 0:
        n = min(left, 128 << 10)
        left -= n
        blocks.append(((n << 3) | (1 << 1) | (left == 0)).to_bytes(3, "little") + b"\x00")
    return head + b"".join(blocks)


class Tamper:
    """Edit a store's objects the way an attacker would, through fsspec (local path or s3://)."""

    def __init__(self, url, opts=None):
        self.url, self.fs = url, fsspec.core.url_to_fs(url, **(opts or {}))[0]

    def get(self, key):
        return self.fs.cat_file(f"{self.url}/{key}")

    def put(self, key, data):
        self.fs.pipe_file(f"{self.url}/{key}", data)

    def json(self, key, edit):
        obj = json.loads(self.get(key))
        edit(obj)
        self.put(key, json.dumps(obj).encode())

    def meta(self, edit):
        self.json("zarr.json", lambda root: edit(root["attributes"]["ci_store"]))

    def shard(self, s, edit_payloads=None, edit_index=None, record=None):
        """Re-lay out shard s: payloads (list, edited in place) are written back to back, the index is rebuilt
        (then edit_index may change it), the crc recomputed, and the record made to match (then `record` edits)."""
        data = self.get(f"codes/c/{s}/0")
        n_index = (SHARD // CHUNK) * 16 + 4
        idx = np.frombuffer(data[-n_index:-4], "<u8").reshape(-1, 2)
        payloads = [None if o == 2**64 - 1 else data[o:o + n] for o, n in idx.tolist()]
        if edit_payloads:
            edit_payloads(payloads)
        new, parts, pos = np.full_like(idx, 2**64 - 1), [], 0
        for c, p in enumerate(payloads):
            if p is not None:
                new[c] = (pos, len(p))
                parts.append(p)
                pos += len(p)
        if edit_index:
            edit_index(new)
        body = new.astype("<u8").tobytes()
        obj = b"".join(parts) + body + _crc(body)
        self.put(f"codes/c/{s}/0", obj)

        def fix(rec):
            rec["object_nbytes"], rec["object_sha256"] = len(obj), hashlib.sha256(obj).hexdigest()
            if record:
                record(rec)
        self.json(f"done/shard-{s:06d}.json", fix)


def chunk_payload(frame: bytes) -> bytes:
    return frame + _crc(frame)


def make_store(url, opts=None, quantizer=None):
    rng = np.random.default_rng(0)
    utts = [(f"utt{i:02d}", 300) for i in range(12)]            # 6 per shard: 1800 of 2048 frames
    data = {u: rng.integers(0, 256, (n, NCB)).astype(np.uint8) for u, n in utts}
    st = create(url, plan_shards(utts, SHARD), num_codebooks=NCB, frame_rate=50.0, chunk_frames=CHUNK,
                storage_options=opts, quantizer=quantizer, format_version=1)   # v2 index: test_store_v2.py
    for sh in st.plan.shards:
        st.write_shard(sh.index, {u: data[u] for u in sh.utt_ids})
    return data


@pytest.fixture
def store(tmp_path):
    url = str(tmp_path / "s")
    q = {"id": "q1", "config": {"dim": 16}, "arrays": {"codebooks": np.ones((NCB, 256, 2), np.float32)}}
    data = make_store(url, quantizer=q)
    assert verify_store(url) == []
    return url, data, Tamper(url)


def first_of_shard(s):
    return f"utt{6 * s:02d}"


def test_untouched_store_reads(store):
    url, data, _ = store
    st = open_store(url)
    assert all(np.array_equal(st[u], data[u]) for u in data)
    assert np.array_equal(st.quantizer_state()[1]["codebooks"], np.ones((NCB, 256, 2), np.float32))


def test_checked_decoders_read_what_zarr_writes(tmp_path, monkeypatch):
    """The index and quantizer are decoded by ci_store, not zarr: multi-chunk index arrays (edge chunk padded by
    zarr), 0-d, empty, bool and float64 quantizer arrays all come back exactly; zarr itself agrees."""
    import zarr
    import ci_store.index
    monkeypatch.setattr(ci_store.index, "INDEX_CHUNK", 4)           # 11 utterances: 3 index chunks
    arrays = {"codebooks": np.arange(4 * 256 * 2, dtype=np.float32).reshape(4, 256, 2), "empty": np.zeros((0, 5)),
              "scale": np.array(3.5), "flags": np.array([True, False]), "to_logits.bias": np.arange(3, dtype="<i8")}
    utts = [(f"u{i}", 30) for i in range(11)]
    st = create(str(tmp_path / "m"), plan_shards(utts, 64), num_codebooks=4, frame_rate=50.0,
                quantizer={"id": "q", "config": {"dim": 8}, "arrays": arrays}, format_version=1)
    for sh in st.plan.shards:
        st.write_shard(sh.index, {u: np.full((30, 4), sh.index, np.uint8) for u in sh.utt_ids})
    ro = open_store(str(tmp_path / "m"))
    assert ro.ids == [u for u, _ in utts] and ro.index.offsets.tolist() == [i // 2 * 64 + i % 2 * 30 for i in
                                                                             range(11)]
    g = zarr.open_group(str(tmp_path / "m"), mode="r")
    assert g["index/ids"].chunks == (4,) and list(g["index/ids"][:]) == ro.ids
    got = ro.quantizer_state()[1]
    assert sorted(got) == sorted(arrays)
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape and np.array_equal(got[k], a), k
    assert verify_store(ro) == []


# --- shard objects -----------------------------------------------------------------------------------------------
def test_index_entry_claiming_a_tebibyte(store):
    """The issue's case: a checksum-valid index entry claiming a 1 TiB chunk (was a bare MemoryError)."""
    url, _, t = store
    t.shard(1, edit_index=lambda idx: idx.__setitem__(0, (0, 1 << 40)))
    msg = refused(lambda: open_store(url)[first_of_shard(1)], "inner chunk 0")
    assert "codes/c/1/0" in msg
    assert any("codes/c/1/0" in p and "inner chunk 0" in p for p in verify_store(url))
    assert np.array_equal(open_store(url)[first_of_shard(0)], store[1][first_of_shard(0)])   # shard 0 still reads


@pytest.mark.parametrize("entry", [
    lambda idx: idx.__setitem__(1, (idx[0, 0] + 10, idx[1, 1])),                   # overlaps chunk 0
    lambda idx: idx.__setitem__(1, (idx[1, 0] + 100, idx[1, 1])),                  # runs into the index tail
    lambda idx: idx.__setitem__(1, (2**64 - 100, 200)),                            # offset + length overflows
    lambda idx: idx.__setitem__(1, (2**64 - 1, 17)),                               # half-empty entry
    lambda idx: idx.__setitem__(1, (idx[1, 0], 3)),                                # smaller than a crc
], ids=["overlap", "into-index", "overflow", "half-empty", "tiny"])
def test_bad_index_entries(store, entry):
    url, _, t = store
    t.shard(0, edit_index=entry)
    refused(lambda: open_store(url).read_shard(0), "codes/c/0/0")
    refused(lambda: list(open_store(url)), "codes/c/0/0")
    assert any("codes/c/0/0" in p for p in verify_store(url))


@pytest.mark.parametrize("bomb", [
    lambda: zstd_bomb(1 << 40, 1 << 20),                                    # declares 1 TiB
    lambda: zstd_bomb(None, 200 << 20),                                     # declares nothing, decodes 200 MiB
    lambda: zstd_bomb(8 << 10, 8 << 10) + zstd_bomb(None, 64 << 20),       # right size, then 64 MiB more
], ids=["declares-1TiB", "no-declared-size-200MiB", "right-size-then-64MiB"])
def test_zstd_bomb_in_a_chunk(store, bomb):
    url, _, t = store
    frame = bomb()
    assert len(frame) < 8 << 10                 # a few KiB: fits where a real 8 KiB chunk does
    t.shard(0, edit_payloads=lambda p: p.__setitem__(0, chunk_payload(frame)))
    refused(lambda: open_store(url)[first_of_shard(0)], "codes/c/0/0")
    refused(lambda: open_store(url).get_many(list(store[1])), "codes/c/0/0")
    assert any("codes/c/0/0" in p for p in verify_store(url))


def test_truncated_object(store):
    url, _, t = store
    key = "codes/c/1/0"
    t.put(key, t.get(key)[:5000])
    refused(lambda: open_store(url)[first_of_shard(1)], "codes/c/1/0")
    assert any("codes/c/1/0" in p for p in verify_store(url))


@pytest.mark.parametrize("nbytes", [1 << 50, 20000, 16000, -1, "16588", True, 100], ids=str)
def test_record_with_wrong_object_nbytes(store, nbytes):
    url, _, t = store
    t.json("done/shard-000001.json", lambda r: r.__setitem__("object_nbytes", nbytes))
    refused(lambda: open_store(url)[first_of_shard(1)], "shard-000001.json|codes/c/1/0")
    assert verify_store(url)


def test_record_with_bad_failures_map(store):
    url, _, t = store
    t.json("done/shard-000000.json", lambda r: r.__setitem__("failures", {first_of_shard(0): ["not", "a reason"]}))
    refused(lambda: open_store(url)[first_of_shard(0)], "shard-000000.json")


def test_huge_layout_claim_is_refused_at_open(store):
    """Metadata and label array consistently claiming 2**34-frame shards of 1-frame chunks (an all-padding shard
    would have built a 256 GiB empty index)."""
    url, _, t = store

    def grow(m):
        m.update(shard_frames=1 << 34, chunk_frames=1, padded_frames=2 << 34)
    t.meta(grow)

    def grow_array(a):
        a["shape"][0] = 2 << 34
        a["chunk_grid"]["configuration"]["chunk_shape"][0] = 1 << 34
        a["codecs"][0]["configuration"]["chunk_shape"][0] = 1
    t.json("codes/zarr.json", grow_array)
    assert "more than the" in refused(lambda: open_store(url), str(url))


# --- root attributes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("shard_frames", "2048"), ("shard_frames", -2048), ("shard_frames", 2**62), ("chunk_frames", 0),
    ("chunk_frames", 1000), ("width", 0), ("num_codebooks", 4), ("num_shards", 2**40), ("padded_frames", 4095),
    ("total_frames", 10**18), ("num_utterances", 10**9), ("format_version", True), ("frame_rate", "fast"),
    ("frame_rate", float("inf")), ("dtype", "object"), ("codebook_size", 10**6), ("pad_value", 7),
    ("compressor", ["zstd"]), ("plan_sha256", "../../etc"), ("teacher", "bert"), ("extra", [1]),
    ("chunk_order", "frame-major"), ("quantizer_id", 5),
], ids=lambda x: repr(x)[:20])
def test_root_attributes_of_wrong_type_or_range(store, key, value):
    url, _, t = store
    t.meta(lambda m: m.__setitem__(key, value))
    assert url in refused(lambda: open_store(url), key)
    assert verify_store(url) and all(url in p for p in verify_store(url))


@pytest.mark.parametrize("raw", [b"[1, 2]", b"{", b"[" * 100000, b'{"zarr_format": 3, "node_type": "group", '
                                 b'"attributes": []}'], ids=["list", "truncated", "deeply-nested", "attrs-list"])
def test_root_zarr_json_not_an_object(store, raw):
    url, _, t = store
    t.put("zarr.json", raw)
    refused(lambda: open_store(url), "zarr.json|not a ci-store")


# --- utterance index ---------------------------------------------------------------------------------------------
def _rewrite_index_array(t, name, values, dtype):
    t.put(f"index/{name}/c/0", bytes(Zstd(level=3).encode(np.asarray(values, dtype).tobytes())))


def test_index_arrays_with_inconsistent_lengths(store):
    url, _, t = store
    t.json("index/offsets/zarr.json", lambda a: a.__setitem__("shape", [13]))
    assert "index/offsets" in refused(lambda: open_store(url)["utt00"], r"shape \(13,\)")


def test_index_array_claiming_a_huge_shape(store):
    url, _, t = store
    for name in ("ids", "offsets", "num_frames", "shard", "sort_order"):
        t.json(f"index/{name}/zarr.json", lambda a: a.__setitem__("shape", [1 << 40]))
    t.meta(lambda m: m.update(num_utterances=1 << 40))       # more utterances than frames: refused first
    refused(lambda: open_store(url), "num_utterances")


@pytest.mark.parametrize("name,pos,value,dtype", [
    ("num_frames", 2, 1 << 40, "int64"), ("offsets", 3, 10**15, "int64"), ("offsets", 4, -5, "int64"),
    ("shard", 5, 7, "int32"), ("shard", 5, -1, "int32"), ("sort_order", 0, 99, "int64"),
], ids=str)
def test_index_entry_outside_its_shard(store, name, pos, value, dtype):
    url, _, t = store
    st = open_store(url)
    values = getattr(st.index, name).copy()
    values[pos] = value
    _rewrite_index_array(t, name, values, dtype)
    refused(lambda: open_store(url)[f"utt{pos:02d}"], "index")
    assert verify_store(url)


@pytest.mark.parametrize("name", ["offsets", "ids"])
def test_zstd_bomb_in_an_index_chunk(store, name):
    url, _, t = store
    t.put(f"index/{name}/c/0", zstd_bomb(1 << 40, 1 << 20))
    refused(lambda: open_store(url)["utt00"], f"index/{name}")


def test_ids_chunk_claiming_more_strings(store):
    url, _, t = store
    from numcodecs.vlen import VLenUTF8
    raw = bytearray(VLenUTF8().encode(np.array([f"utt{i:02d}" for i in range(12)], object)))
    raw[:4] = (1 << 31).to_bytes(4, "little")
    t.put("index/ids/c/0", bytes(Zstd(level=3).encode(bytes(raw))))
    refused(lambda: open_store(url)["utt00"], "12 strings")


# --- quantizer ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../index/offsets", "codebooks/../../etc", "/etc/passwd", "..", ".hidden", "",
                                  "a" * 300, 7])
def test_quantizer_array_names_are_plain_names(store, name):
    url, _, t = store
    t.json("quantizer/zarr.json", lambda g: g["attributes"].__setitem__("array_names", ["codebooks", name]))
    refused(lambda: open_store(url).quantizer_state(), "invalid quantizer array names")
    assert any(p.startswith("quantizer:") and "invalid quantizer array names" in p for p in verify_store(url))


def test_quantizer_array_claiming_a_huge_shape(store):
    url, _, t = store
    t.json("quantizer/codebooks/zarr.json", lambda a: a.__setitem__("shape", [1 << 20, 1 << 20, 1 << 10]))
    refused(lambda: open_store(url).quantizer_state(), "quantizer/codebooks")


def test_quantizer_chunk_bomb(store):
    url, _, t = store
    t.put("quantizer/codebooks/c/0/0/0", zstd_bomb(1 << 40, 1 << 20))
    refused(lambda: open_store(url).quantizer_state(), "quantizer/codebooks")


def test_create_refuses_what_readers_refuse(tmp_path):
    with pytest.raises(StoreError, match="quantizer array name"):
        create(str(tmp_path / "q"), plan_shards([("a", 5)], 64), num_codebooks=2, frame_rate=50.0,
               quantizer={"id": "q", "config": {}, "arrays": {"a b": np.zeros(3)}})
    with pytest.raises(StoreError, match="more than the"):
        create(str(tmp_path / "big"), plan_shards([("a", 5)], 1 << 28), kind="float", dim=1024, frame_rate=50.0)


# --- object storage ----------------------------------------------------------------------------------------------
def test_hostile_shards_on_s3(s3_bucket, tmp_path):
    url, opts = s3_bucket
    url = f"{url}/h"
    data = make_store(url, opts)
    t = Tamper(url, opts)
    assert np.array_equal(open_store(url, storage_options=opts)[first_of_shard(1)], data[first_of_shard(1)])
    t.shard(0, edit_payloads=lambda p: p.__setitem__(0, chunk_payload(zstd_bomb(1 << 40, 1 << 20))))
    t.shard(1, edit_index=lambda idx: idx.__setitem__(0, (0, 1 << 40)))
    # opened outside the measured call: the first S3 request of a process loads botocore's models (~20 MB)
    st = open_store(url, storage_options=opts)
    refused(lambda: st[first_of_shard(0)], "codes/c/0/0", SMALL_S3)
    refused(lambda: st[first_of_shard(1)], "codes/c/1/0", SMALL_S3)
    cached = open_store(f"simplecache::{url}",                        # reads ranges from a local copy
                        storage_options={"s3": opts, "simplecache": {"cache_storage": str(tmp_path / "c")}})
    refused(lambda: cached[first_of_shard(1)], "codes/c/1/0", SMALL_S3)
    assert sorted(p.split(":")[0] for p in verify_store(url, storage_options=opts)) == ["shard 0", "shard 1"]
