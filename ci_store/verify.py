"""Full integrity check of a store: layout, completeness, checksums, value ranges, quantizer.

Shard data is decoded with zarr's own sharding codec (which checks the crc32c of the shard index and of every
inner chunk), independently of ci_store's fast reader, and compared with the sha256 in the completion record.
"""
from __future__ import annotations

import hashlib

import numpy as np

from . import hashindex
from .completion import data_sha256, decode_manifest, decode_record, shard_from_done_key
from .errors import StoreError, name_some
from .format import DONE_GROUP, MANIFEST_KEY, done_key, shard_key
from .plan import layout_problems
from .quantizer import arrays_sha256, read_quantizer
from .store import CIStore, open_store


def verify_store(store: CIStore | str, storage_options: dict | None = None, check_data: bool = True,
                 progress=None) -> list[str]:
    """Every problem found, as readable lines naming the shard / utterance / array; [] for a sound store."""
    try:
        st = store if isinstance(store, CIStore) else open_store(store, storage_options=storage_options)
        meta = st.meta
        idx = st.index
    except StoreError as e:
        return [str(e)]
    problems: list[str] = []
    S = meta["shard_frames"]
    v2 = meta["format_version"] >= 2
    try:
        if v2:      # arrays, never a Python object per utterance (80M ids)
            problems += [f"index: {p}" for p in idx.problems()]
        else:
            ids = idx.ids.tolist()
            problems += [f"index: {p}" for p in layout_problems(S, ids, idx.offsets, idx.num_frames, idx.shard)]
            problems += [f"index: {p}" for p in idx.sort_problems()]
    except StoreError as e:
        return [f"index: {e}"]
    shard = idx.shard
    n_shards = int(shard.max()) + 1 if len(idx) else 0
    for key, got in (("num_utterances", len(idx)), ("total_frames", int(idx.num_frames.sum())),
                     ("num_shards", n_shards), ("padded_frames", n_shards * S)):
        if meta[key] != got:
            problems.append(f"metadata {key}={meta[key]} but the index gives {got}")
    if problems:
        return problems          # the layout itself is broken; shard checks would only repeat it
    plan = idx.to_plan(S)
    if (hashindex.plan_digest(plan) if v2 else plan.sha256()) != meta["plan_sha256"]:
        problems.append("index does not match plan_sha256 in the metadata")

    h = st._handle()
    listed = h.objects.list_prefix(f"{DONE_GROUP}/")
    stray = [k for k in listed if k != f"{DONE_GROUP}/zarr.json" and not (v2 and k == MANIFEST_KEY) and
             (shard_from_done_key(k) is None or not 0 <= shard_from_done_key(k) < n_shards)]
    if stray:
        problems.append(f"unexpected objects under {DONE_GROUP}/: {name_some(stray)}")
    done = {s for s in (shard_from_done_key(k) for k in listed) if s is not None and 0 <= s < n_shards}
    missing = [s for s in range(n_shards) if s not in done]
    if v2 and MANIFEST_KEY in listed:
        problems += _manifest_problems(st, h, n_shards)
    if missing:
        problems.append(f"{len(missing)} of {n_shards} shards not complete: {name_some(missing)}")
    array_keys = h.objects.list_prefix(f"{meta['array']}/c/")
    expected = {shard_key(meta["array"], s) for s in range(n_shards)}
    stray = [k for k in array_keys if k not in expected]
    if stray:
        problems.append(f"unexpected objects in the label array: {name_some(stray)}")

    zarray = h.group[meta["array"]] if check_data else None
    for s in sorted(done):
        where = f"shard {s}"
        try:
            rec = st.shard_record(s)
        except StoreError as e:
            problems.append(f"{where}: {e}")
            continue
        sh = plan.shards[s]
        for k, want in (("frames", sh.size), ("num_utterances", len(sh)), ("start", sh.start), ("capacity", S)):
            if rec.get(k) != want:
                problems.append(f"{where}: completion record says {k}={rec.get(k)}, plan says {want}")
        unknown = [u for u in rec["failures"] if u not in set(sh.utt_ids)]
        if unknown:
            problems.append(f"{where}: failures name utterances not in the shard: {name_some(unknown)}")
        if not check_data:
            continue
        key = shard_key(meta["array"], s)
        raw = h.objects.get(key)
        if rec["object_nbytes"] == 0:
            if raw is not None:
                problems.append(f"{where}: {key} exists but the record says the shard is all padding")
        elif raw is None:
            problems.append(f"{where}: shard object {key} is missing")
            continue
        elif len(raw) != rec["object_nbytes"] or hashlib.sha256(raw).hexdigest() != rec["object_sha256"]:
            problems.append(f"{where}: {key} bytes do not match the completion record (size {len(raw)} vs "
                            f"{rec['object_nbytes']} or sha256 differs): corrupted or overwritten")
        try:    # ci_store's checked decoder first: zarr's would allocate whatever a crafted index or frame claims
            ours = h.layout.decode_shard(raw, key)
        except StoreError as e:
            problems.append(f"{where}: {e}")
            continue
        try:
            block = zarray[sh.start:sh.start + S]
        except Exception as e:  # noqa: BLE001 - zarr raises various codec errors on corrupt bytes
            problems.append(f"{where}: {key} cannot be decoded ({type(e).__name__}: {e})")
            continue
        if data_sha256(block) != rec["data_sha256"]:
            problems.append(f"{where}: decoded data does not match data_sha256 of its completion record")
        elif ours.tobytes() != np.ascontiguousarray(block, dtype=ours.dtype).tobytes():
            problems.append(f"{where}: ci_store's reader and zarr decode {key} differently")
        problems += _value_problems(st, sh, block, rec["failures"])
        if progress:
            progress(s)
    problems += _quantizer_problems(st, meta)
    return problems


def _manifest_problems(st: CIStore, h, n_shards: int) -> list[str]:
    """The completion manifest must copy the per-shard records exactly (a stale one would misdirect readers)."""
    try:
        recs = decode_manifest(h.objects.get(MANIFEST_KEY) or b"", st.meta, st.url)
    except StoreError as e:
        return [str(e)]
    raws = h.objects.get_many([done_key(s) for s in range(n_shards)])
    bad = []
    for s, (rec, raw) in enumerate(zip(recs, raws)):
        if raw is None or decode_record(raw, s, st.url) != rec:
            bad.append(s)
    return [f"{MANIFEST_KEY} disagrees with the completion records of shards {name_some(bad)} (stale: delete it, "
            f"or rewrite it with CIStore.write_completion_manifest)"] if bad else []


def _value_problems(st: CIStore, sh, block: np.ndarray, failures: dict) -> list[str]:
    bad = []
    for uid, off, n in zip(sh.utt_ids, sh.offsets, sh.num_frames):
        if uid in failures:
            continue
        a = block[off - sh.start:off - sh.start + n]
        if st.kind == "float" and not np.isfinite(a).all():
            bad.append(f"utterance {uid!r} (shard {sh.index}) holds NaN or inf")
        elif st.kind == "codes" and a.size and int(a.max()) >= st.codebook_size:
            bad.append(f"utterance {uid!r} (shard {sh.index}) holds index {int(a.max())} >= codebook_size")
    return bad


def _quantizer_problems(st: CIStore, meta: dict) -> list[str]:
    if not meta.get("quantizer_id"):
        return []
    try:
        q = read_quantizer(st._handle().objects, st.url)
    except StoreError as e:
        return [f"quantizer: {e}"]
    if q is None:
        return [f"quantizer: metadata names quantizer {meta['quantizer_id']!r} but the store has no quantizer/ group"]
    config, arrays, attrs = q
    out = []
    if attrs.get("id") != meta["quantizer_id"]:
        out.append(f"quantizer: stored id {attrs.get('id')!r} differs from quantizer_id {meta['quantizer_id']!r}")
    if arrays_sha256(arrays) != meta.get("quantizer_sha256"):
        out.append("quantizer: arrays do not match quantizer_sha256 (changed or corrupted)")
    return out
