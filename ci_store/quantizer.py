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

from .errors import StoreError
from .format import QUANTIZER_GROUP


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
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise StoreError(f"quantizer array name {name!r} is not a valid name (no '/', not empty)")
        if not isinstance(a, np.ndarray):
            raise StoreError(f"quantizer array {name!r} must be a numpy array, got {type(a).__name__}")
        if a.dtype.kind not in "biuf":
            raise StoreError(f"quantizer array {name!r} has unsupported dtype {a.dtype}")
        out[name] = a
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


def read_quantizer(root: zarr.Group, where: str) -> tuple[dict, dict[str, np.ndarray], dict] | None:
    """(config, arrays, attrs) or None when the store holds no quantizer."""
    try:
        g = root[QUANTIZER_GROUP]
    except KeyError:
        return None
    attrs = dict(g.attrs)
    arrays = {}
    for name in attrs.get("array_names", []):
        try:
            arrays[name] = np.asarray(g[name][...])
        except KeyError:
            raise StoreError(f"{where}: quantizer array {name!r} is missing") from None
    return attrs.get("config", {}), arrays, attrs
