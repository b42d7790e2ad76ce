"""The quantizer that produced a codes store, kept inside it (subgroup `quantizer/`) so CIs decode from the store alone.

Arrays are plain zarr arrays; the config and id go in the subgroup's attributes. ci_store cannot recompute the
quantizer id (that hash lives in distill, with torch), so it records its own sha256 of the arrays and verify
checks that instead.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from .errors import StoreError, name_some
from .format import ARRAY_NAME_RE, QUANTIZER_GROUP, parse_json
from .fsio import ObjectStore
from .plainarray import parse_array, read_numeric

MAX_QUANTIZER_ARRAYS = 1024
MAX_QUANTIZER_BYTES = 256 << 20     # all quantizer arrays together (a 16 x 256 x 1280 float32 codebook: 21 MB)


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over arrays sorted by name: name, NUL, dtype (little-endian str), NUL, shape JSON, NUL, raw bytes."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        le = a.dtype.newbyteorder("<") if a.dtype.byteorder not in ("|",) else a.dtype
        a = np.ascontiguousarray(a, dtype=le)
        h.update(name.encode() + b"\0" + a.dtype.str.encode() + b"\0" + json.dumps(list(a.shape)).encode() + b"\0")
        h.update(a.tobytes())
    return h.hexdigest()


def check_quantizer(q) -> tuple[str, dict, dict[str, np.ndarray]]:
    """Validate the `quantizer=` argument of create(): {"id": str, "config": dict, "arrays": {name: ndarray}}."""
    if not isinstance(q, dict):
        raise StoreError(f"quantizer must be a dict with keys id, config, arrays; got {type(q).__name__}")
    missing = [k for k in ("id", "config", "arrays") if k not in q]
    if missing:
        raise StoreError(f"quantizer dict lacks {', '.join(missing)}")
    qid, config, arrays = q["id"], q["config"], q["arrays"]
    if not isinstance(qid, str) or not qid:
        raise StoreError(f"quantizer id must be a non-empty string, got {qid!r}")
    if not isinstance(config, dict):
        raise StoreError("quantizer config must be a dict")
    try:
        json.dumps(config)
    except (TypeError, ValueError) as e:
        raise StoreError(f"quantizer config is not JSON-serialisable: {e}") from None
    if not isinstance(arrays, dict) or not arrays:
        raise StoreError("quantizer arrays must be a non-empty dict of name -> numpy array")
    out = {}
    for name, a in arrays.items():
        if not isinstance(name, str) or not ARRAY_NAME_RE.fullmatch(name):
            raise StoreError(f"quantizer array name {name!r} is not a valid name (letters, digits, '_', '.', '-', "
                             f"not starting with '.', at most 255 characters)")
        if not isinstance(a, np.ndarray):
            raise StoreError(f"quantizer array {name!r} must be a numpy array, got {type(a).__name__}")
        if a.dtype.kind not in "biuf":
            raise StoreError(f"quantizer array {name!r} has unsupported dtype {a.dtype}")
        out[name] = a
    if len(out) > MAX_QUANTIZER_ARRAYS or sum(a.nbytes for a in out.values()) > MAX_QUANTIZER_BYTES:
        raise StoreError(f"quantizer arrays: at most {MAX_QUANTIZER_ARRAYS} arrays of {MAX_QUANTIZER_BYTES} bytes "
                         f"in all (readers refuse more)")
    return qid, config, out


def write_quantizer(root: zarr.Group, qid: str, config: dict, arrays: dict[str, np.ndarray]) -> str:
    digest = arrays_sha256(arrays)
    g = root.create_group(QUANTIZER_GROUP, attributes={"id": qid, "config": config, "arrays_sha256": digest,
                                                       "array_names": sorted(arrays)})
    for name, a in sorted(arrays.items()):
        z = g.create_array(name, shape=a.shape, chunks=tuple(max(1, d) for d in a.shape), dtype=a.dtype,
                           compressors=[ZstdCodec(level=3)])
        z[...] = a
    return digest


def read_quantizer(objects: ObjectStore, where: str) -> tuple[dict, dict[str, np.ndarray], dict] | None:
    """(config, arrays, attrs) or None when the store holds no quantizer.

    The group attributes are checked before use: array names must be plain names (ARRAY_NAME_RE: no '/', no
    leading '.', so never a path out of the group), and the arrays together at most MAX_QUANTIZER_BYTES."""
    raw = objects.get(f"{QUANTIZER_GROUP}/zarr.json")
    if raw is None:
        return None
    at = f"{where}/{QUANTIZER_GROUP}"
    meta = parse_json(raw, f"{at}/zarr.json")
    attrs = meta.get("attributes")
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group" or not isinstance(attrs, dict):
        raise StoreError(f"{at}: not a Zarr v3 group with attributes")
    names = attrs.get("array_names", [])
    if not isinstance(names, list) or len(names) > MAX_QUANTIZER_ARRAYS:
        raise StoreError(f"{at}: array_names must be a list of at most {MAX_QUANTIZER_ARRAYS} names")
    bad = [x for x in names if not isinstance(x, str) or not ARRAY_NAME_RE.fullmatch(x)]
    if bad:
        raise StoreError(f"{at}: invalid quantizer array names {name_some(bad, 3)} (allowed: letters, digits, "
                         f"'_', '.', '-', not starting with '.', at most 255 characters)")
    if len(set(names)) != len(names):
        raise StoreError(f"{at}: array_names lists a name twice")
    if not isinstance(attrs.get("config", {}), dict) or not isinstance(attrs.get("id", ""), str):
        raise StoreError(f"{at}: config must be an object and id a string")
    raws = objects.get_many([f"{QUANTIZER_GROUP}/{x}/zarr.json" for x in names])
    arrays = []
    for name, r in zip(names, raws):
        if r is None:
            raise StoreError(f"{where}: quantizer array {name!r} is missing")
        a = parse_array(r, f"{QUANTIZER_GROUP}/{name}", where)
        if a.dtype is None:
            raise StoreError(f"{a.where}: a quantizer array must be numeric")
        arrays.append(a)
    values = read_numeric(objects, arrays, MAX_QUANTIZER_BYTES) if arrays else []
    return attrs.get("config", {}), dict(zip(names, values)), attrs
