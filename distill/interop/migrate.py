"""Migration between lhotse storage and ci-stores: existing icefall CIs in, plain lhotse storage out.

Import stores, for each cut, exactly what the recipe's `cut.load_custom(field)` returns (so attaching the new
store gives the recipe the same codes), one shard at a time: memory is bounded by a shard, every shard is read
back and compared before the next, and an interrupted import resumes with `exist_ok=True`.
Export writes with lhotse's own lossless writers (HDF5 as icefall does, or .npy files) and reads every array
back through lhotse before returning.
"""
from __future__ import annotations

import os
from math import isclose

import numpy as np

from ci_store import StoreError, create, default_shard_frames, open_store, plan_shards
from ci_store.errors import name_some

from . import InteropError
from .lhotse_backend import expected_frames

LOSSLESS_WRITERS = ("numpy_hdf5", "numpy_files")


def _errors(what: str, items: list[str], total: int) -> InteropError:
    shown = "; ".join(items[:10]) + (f"; ... ({len(items) - 10} more)" if len(items) > 10 else "")
    return InteropError(f"{what} ({len(items)} of {total} cuts): {shown}")


def _view_frames(cut, m) -> int:
    """Frames `cut.load_custom` returns for TemporalArray `m`, computed like TemporalArray.load, without reading."""
    from lhotse.array import seconds_to_frames

    n, fs = int(m.shape[0]), float(m.frame_shift)
    left = 0 if isclose(cut.start, m.start) else seconds_to_frames(cut.start - m.start, fs, max_index=n)
    right = left + seconds_to_frames(cut.duration, fs, max_index=n)
    return max(0, min(right, n) - left)


def _plan_import(cuts, field: str, tolerance_frames: int):
    """(frame shift, width, {cut id: frames}) from the manifests alone; every problem found, all cuts named."""
    from lhotse.array import TemporalArray

    missing, not_temporal, shapes, bad_span = [], [], [], []
    shifts: dict[float, list[str]] = {}
    widths: dict[int, list[str]] = {}
    frames = {}
    for c in cuts:
        m = (c.custom or {}).get(field) if hasattr(c, "custom") else None
        if m is None:
            missing.append(c.id)
            continue
        if not isinstance(m, TemporalArray):
            not_temporal.append(f"{c.id!r} ({type(m).__name__})")
            continue
        if m.temporal_dim != 0 or len(m.shape) != 2:
            shapes.append(f"{c.id!r} (shape {list(m.shape)}, temporal_dim {m.temporal_dim})")
            continue
        shifts.setdefault(float(m.frame_shift), []).append(c.id)
        widths.setdefault(int(m.shape[1]), []).append(c.id)
        if c.start < m.start - 1e-5:
            bad_span.append(f"{c.id!r} (array starts at {m.start:g} s, the cut at {c.start:g} s)")
            continue
        n = _view_frames(c, m)
        want = expected_frames(c.duration, 1.0 / m.frame_shift)
        if n < want - tolerance_frames or n == 0:
            bad_span.append(f"{c.id!r} (array {m.start:g}-{m.end:g} s gives {n} of the cut's {want} frames "
                            f"({c.start:g}-{c.end:g} s))")
            continue
        frames[c.id] = n
    total = len(cuts)
    if missing:
        raise _errors(f"field {field!r} is missing", [repr(i) for i in missing], total)
    if not_temporal:
        raise _errors(f"field {field!r} is not a TemporalArray", not_temporal, total)
    if shapes:
        raise _errors(f"field {field!r} is not a [frames, codebooks] array with time first", shapes, total)
    if len(shifts) > 1:
        raise InteropError(f"field {field!r} has different frame shifts: " + "; ".join(
            f"{fs:g} s on {len(ids)} cuts ({name_some(ids, 3)})" for fs, ids in shifts.items()))
    if len(widths) > 1:
        raise InteropError(f"field {field!r} has different widths (codebooks): " + "; ".join(
            f"{w} on {len(ids)} cuts ({name_some(ids, 3)})" for w, ids in widths.items()))
    if bad_span:
        raise _errors(f"field {field!r} does not cover the cut (icefall's vq_utils writes start=0, which only "
                      f"fits cuts starting at 0)", bad_span, total)
    (fs,), (width,) = shifts, widths
    return fs, width, frames


LOSSY_SLACK = 0.25  # largest distance from an integer accepted from lossy (lilcom) storage


def _load_codes(cut, field: str, n: int, width: int, codebook_size: int) -> np.ndarray:
    """cut.load_custom(field), checked to be [n, width] integer codes in [0, codebook_size)."""
    m = cut.custom[field]
    where = f"cut {cut.id!r} field {field!r} ({m.array.storage_type} {m.array.storage_path})"
    try:
        a = np.asarray(cut.load_custom(field))
    except Exception as e:  # any lhotse reader: missing file/key, corrupt data
        raise InteropError(f"{where}: cannot be read: {type(e).__name__}: {e}") from None
    if a.shape != (n, width):
        raise InteropError(f"{where}: read an array of shape {list(a.shape)}, its manifest says {[n, width]}")
    if a.dtype.kind == "f":
        r = np.rint(a)
        # lilcom is lossy (a code of 0..255 comes back within ~0.02): round when it plainly was an integer
        slack = LOSSY_SLACK if "lilcom" in m.array.storage_type else 0.0
        if a.size and float(np.abs(r - a).max()) > slack:
            raise InteropError(f"{where}: holds non-integer values (dtype {a.dtype}); not codebook indexes")
        a = r.astype(np.int64)
    elif a.dtype.kind not in "iu":
        raise InteropError(f"{where}: dtype {a.dtype} is not an integer type; not codebook indexes")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= codebook_size):
        bad = int(a.min()) if int(a.min()) < 0 else int(a.max())
        raise InteropError(f"{where}: index {bad} is outside [0, {codebook_size})")
    return a


def import_lhotse(cuts, out_url: str, *, field: str = "codebook_indexes", quantizer=None,
                  codebook_size: int | None = None, shard_frames: int | None = None,
                  storage_options: dict | None = None, teacher: dict | None = None, exist_ok: bool = False,
                  tolerance_frames: int = 2, source: str | None = None) -> dict:
    """Copy every cut's CIs (any lhotse storage) into a new sharded store at `out_url`; returns a summary.

    `quantizer` (a ReferenceQuantizer or our MultiCodebookQuantizer) is kept in the store so the codes decode
    from it alone. Problems in the manifests are found before anything is created; a problem in the data
    stops the import with the shards written so far intact (rerun with exist_ok=True after fixing it).
    """
    from distill.codec.reference import store_quantizer

    cuts = list(cuts)
    if not cuts:
        raise InteropError("no cuts to import")
    fs, width, frames = _plan_import(cuts, field, tolerance_frames)
    qstate = None
    if quantizer is not None:
        qstate = store_quantizer(quantizer)
        if quantizer.num_codebooks != width:
            raise InteropError(f"quantizer has {quantizer.num_codebooks} codebooks, field {field!r} has {width}")
        if codebook_size is not None and codebook_size != quantizer.codebook_size:
            raise InteropError(f"codebook_size {codebook_size} given, the quantizer has {quantizer.codebook_size}")
        codebook_size = quantizer.codebook_size
    K = 256 if codebook_size is None else codebook_size
    plan = plan_shards([(c.id, frames[c.id]) for c in cuts], shard_frames or default_shard_frames("codes"))
    extra = {"imported_from": {"field": field, "source": source, "frame_shift": fs}}
    if not exist_ok:
        try:
            open_store(out_url, storage_options=storage_options)
        except StoreError:
            pass                                       # nothing there (create() refuses anything else there)
        else:
            raise InteropError(f"{out_url} already holds a ci-store; refusing to overwrite it (to continue an "
                               f"interrupted import into it: --resume / exist_ok=True)")
    try:
        store = create(out_url, plan, kind="codes", num_codebooks=width, codebook_size=K, frame_rate=1.0 / fs,
                       teacher=teacher, quantizer=qstate, storage_options=storage_options, exist_ok=exist_ok,
                       extra=extra)
        done = store.completed_shards()
    except StoreError as e:
        raise InteropError(str(e)) from None
    by_id = {c.id: c for c in cuts}
    for sh in plan.shards:
        if sh.index in done:
            continue
        arrays = {u: _load_codes(by_id[u], field, n, width, K) for u, n in zip(sh.utt_ids, sh.num_frames)}
        store.write_shard(sh.index, arrays)
        back = store.get_many(list(sh.utt_ids))
        for u, b in zip(sh.utt_ids, back):
            if not np.array_equal(b, arrays[u]):
                raise StoreError(f"{store.url}: shard {sh.index}: utterance {u!r} reads back different from "
                                 f"what was written")
    return {"store": store.url, "cuts": len(cuts), "frames": plan.total_frames, "shards": plan.num_shards,
            "resumed_shards": len(done), "num_codebooks": width, "codebook_size": K, "frame_rate": 1.0 / fs,
            "quantizer_id": qstate["id"] if qstate else None}


def _refuse_existing(storage_type: str, path: str) -> None:
    """lhotse's writers truncate or overwrite: never point one at data that is already there."""
    candidates = [path]
    if storage_type == "numpy_hdf5" and not path.endswith(".h5"):
        candidates.append(path + ".h5")
    for p in candidates:
        if os.path.isdir(p) and os.listdir(p) or os.path.isfile(p):
            raise InteropError(f"{p} already exists; refusing to overwrite it (choose a new --storage-path)")


def export_lhotse(store_url: str, cuts, storage_path: str, *, field: str = "codebook_indexes",
                  storage_type: str = "numpy_hdf5", storage_options: dict | None = None):
    """Write the store's labels for `cuts` with a lossless lhotse writer; returns (cuts with `field`, failures).

    Cuts whose extraction failed are left out and returned with their reasons; cuts the store lacks are an
    error. The arrays are read back through lhotse and compared before returning.
    """
    from lhotse.cut import MonoCut
    from lhotse.features.io import close_cached_file_handles, get_writer

    if storage_type not in LOSSLESS_WRITERS:
        raise InteropError(f"storage type {storage_type!r} is not supported: codebook indexes need a lossless "
                           f"writer ({', '.join(LOSSLESS_WRITERS)}); lilcom is lossy")
    storage_path = str(storage_path)
    if "://" in storage_path or "::" in storage_path:
        raise InteropError(f"--storage-path must be a local path (lhotse's HDF5 writer needs one), "
                           f"got {storage_path}")
    cuts = list(cuts)
    try:
        store = open_store(store_url, storage_options=storage_options)
        failures = store.failures()
        rate = store.frame_rate
    except StoreError as e:
        raise InteropError(str(e)) from None
    not_mono = [c.id for c in cuts if not isinstance(c, MonoCut)]
    if not_mono:
        raise InteropError(f"export works on MonoCuts; {len(not_mono)} other cuts: {name_some(not_mono)}")
    missing = [c.id for c in cuts if c.id not in store]
    if missing:
        raise InteropError(f"{store.url} does not hold labels for {len(missing)} of {len(cuts)} cuts: "
                           f"{name_some(missing)}")
    _refuse_existing(storage_type, storage_path)
    failed = {c.id: failures[c.id] for c in cuts if c.id in failures}
    keep = [c for c in cuts if c.id not in failures]
    by_shard: dict[int, list] = {}
    for c in keep:
        by_shard.setdefault(store.shard_of(c.id), []).append(c)
    kwargs = {"mode": "w-"} if storage_type == "numpy_hdf5" else {}
    out = {}
    os.makedirs(os.path.dirname(os.path.abspath(storage_path)), exist_ok=True)
    with get_writer(storage_type)(storage_path, **kwargs) as writer:
        for s in sorted(by_shard):
            group = by_shard[s]
            for c, a in zip(group, store.get_many([c.id for c in group])):
                out[c.id] = c.with_custom(field, writer.store_array(key=c.id, value=a, frame_shift=1.0 / rate,
                                                                    temporal_dim=0, start=c.start))
    close_cached_file_handles()    # lhotse caches open HDF5 handles by path; read what is on disk now
    for s in sorted(by_shard):
        group = by_shard[s]
        for c, a in zip(group, store.get_many([c.id for c in group])):
            got = out[c.id].load_custom(field)
            if not np.array_equal(got, a[:expected_frames(c.duration, rate)]):
                raise InteropError(f"cut {c.id!r}: {storage_type} {storage_path} reads back different labels")
    return [out[c.id] for c in keep], failed
