"""A lhotse storage backend for ci-stores: `import distill.interop.lhotse_backend` registers `storage_type="ci_store"`.

A cut's custom field then reads as
    TemporalArray(Array(storage_type="ci_store", storage_path=STORE_URL, storage_key=CUT_ID, shape=[T, N]),
                  temporal_dim=0, frame_shift=1/frame_rate, start=cut.start)
and icefall's unchanged `collate_custom_field(cuts, "codebook_indexes", pad_value=-100)` gets its codes from
the store. lhotse builds a new reader for every load with only the storage path, so:

- open stores are cached per process (keyed by pid): a DataLoader worker opens its own, never one inherited
  through fork (an fsspec/S3 client is bound to the parent's event loop);
- storage options cannot travel in the manifest (they hold secrets); they come from `set_storage_options`
  (per URL prefix, longest wins, before the env var; inherited by forked workers) or the environment variable
  CI_STORE_STORAGE_OPTIONS (a JSON object, used for every URL no prefix matches; reaches spawned workers too).
"""
from __future__ import annotations

import json
import os
import threading
from typing import Iterable

from lhotse.array import Array, TemporalArray
from lhotse.features.io import FeaturesReader, register_reader

from ci_store import StoreError, open_store
from ci_store.errors import name_some
from ci_store.fsio import normalize_url

from . import InteropError

STORAGE_TYPE = "ci_store"
ENV_STORAGE_OPTIONS = "CI_STORE_STORAGE_OPTIONS"

_prefix_options: dict[str, dict] = {}
_open: dict[tuple[int, str, str], object] = {}
_lock = threading.Lock()
_lock_pid = os.getpid()


def set_storage_options(options: dict | None, prefix: str = "") -> None:
    """fsspec options for store URLs starting with `prefix` ("" = all); None removes the entry."""
    if options is None:
        _prefix_options.pop(prefix, None)
    elif not isinstance(options, dict):
        raise InteropError(f"storage options must be a dict, got {type(options).__name__}")
    else:
        _prefix_options[prefix] = dict(options)


def storage_options_for(url: str) -> dict:
    """The options a reader uses for `url`: the longest matching set_storage_options prefix, else the env var."""
    best = None
    for prefix in _prefix_options:
        if url.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    if best is not None:
        return dict(_prefix_options[best])
    raw = os.environ.get(ENV_STORAGE_OPTIONS)
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except ValueError as e:
        raise InteropError(f"${ENV_STORAGE_OPTIONS} is not valid JSON: {e}") from None
    if not isinstance(opts, dict):
        raise InteropError(f"${ENV_STORAGE_OPTIONS} must be a JSON object")
    return opts


def open_cached(url: str):
    """The CIStore for `url` opened by this process (opened on first use)."""
    url = normalize_url(url)
    opts = storage_options_for(url)
    pid = os.getpid()
    key = (pid, url, json.dumps(opts, sort_keys=True, default=str))
    st = _open.get(key)
    if st is None:
        global _lock, _lock_pid
        if _lock_pid != pid:            # a lock inherited through fork may be held by a thread that is gone
            _lock, _lock_pid = threading.Lock(), pid
        with _lock:
            for k in [k for k in _open if k[0] != pid]:   # handles inherited through fork: never used here
                del _open[k]
            st = _open.get(key)
            if st is None:
                st = _open[key] = open_store(url, storage_options=opts or None)
    return st


def close_cached_stores() -> None:
    _open.clear()


@register_reader
class CIStoreReader(FeaturesReader):
    """Reads one utterance's labels (optionally a frame range of them) from a ci-store by its id."""

    name = STORAGE_TYPE

    def __init__(self, storage_path: str, *args, **kwargs):
        super().__init__()
        self.store = open_cached(storage_path)

    def read(self, key: str, left_offset_frames: int = 0, right_offset_frames: int | None = None):
        try:
            arr = self.store[key]
        except KeyError:
            raise KeyError(f"utterance {key!r} is not in ci-store {self.store.url}") from None
        if left_offset_frames or right_offset_frames is not None:
            arr = arr[left_offset_frames:right_offset_frames]
        return arr


# ------------------------------------------------------------------------------------------------------ attach
def expected_frames(duration: float, frame_rate: float) -> int:
    """Frames a cut of `duration` seconds spans at `frame_rate` (lhotse's seconds_to_frames rounding)."""
    from lhotse.array import seconds_to_frames
    return seconds_to_frames(duration, 1.0 / frame_rate)


def store_array(url: str, cut_id: str, num_frames: int, width: int, frame_rate: float, start: float
                ) -> TemporalArray:
    """The manifest of one utterance in a store, as a cut starting at `start` seconds sees it."""
    return TemporalArray(array=Array(storage_type=STORAGE_TYPE, storage_path=url, storage_key=cut_id,
                                     shape=[int(num_frames), int(width)]),
                         temporal_dim=0, frame_shift=1.0 / frame_rate, start=start)


def attach_store(cuts: Iterable, store_url: str, *, field: str = "codebook_indexes",
                 storage_options: dict | None = None, tolerance_frames: int = 2):
    """Point `field` of every cut into the store; returns (CutSet of labelled cuts, {cut id: failure reason}).

    Cuts whose extraction failed are left out and returned with their reasons. A cut the store does not hold,
    or whose length there differs from its duration by more than `tolerance_frames` frames, is an error (all
    such cuts are named) and nothing is written.
    """
    from lhotse import CutSet
    from lhotse.cut import MonoCut

    if not isinstance(field, str) or not field.isidentifier():
        raise InteropError(f"field must be a Python identifier (it becomes a cut attribute), got {field!r}")
    try:
        store = open_store(store_url, storage_options=storage_options)
        ids_in_store, failures = store.index, store.failures()
        rate, width = store.frame_rate, store.width
    except StoreError as e:
        raise InteropError(str(e)) from None
    cuts = list(cuts)
    not_mono = [c.id for c in cuts if not isinstance(c, MonoCut)]
    if not_mono:
        raise InteropError(f"attach works on MonoCuts (attach before mixing/augmenting); "
                           f"{len(not_mono)} other cuts: {name_some(not_mono)}")
    missing = [c.id for c in cuts if c.id not in ids_in_store]
    if missing:
        raise InteropError(f"{store.url} does not hold labels for {len(missing)} of {len(cuts)} cuts: "
                           f"{name_some(missing)}")
    out, failed, bad = [], {}, []
    for c in cuts:
        if c.id in failures:
            failed[c.id] = failures[c.id]
            continue
        n = store.num_frames(c.id)
        want = expected_frames(c.duration, rate)
        if abs(n - want) > tolerance_frames:
            bad.append(f"{c.id!r} ({n} frames in the store, {c.duration:g} s = {want} frames at {rate:g} Hz)")
            continue
        out.append(c.with_custom(field, store_array(store.url, c.id, n, width, rate, c.start)))
    if bad:
        shown = "; ".join(bad[:10]) + (f"; ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
        raise InteropError(f"{len(bad)} cuts disagree with {store.url} on their length by more than "
                           f"{tolerance_frames} frames: {shown}")
    return CutSet.from_cuts(out), failed

