"""Create, open, write and read a ci-store (layout: docs/store-format.md).

A CIStore is cheap to pickle (URL, storage options, mode, lookup only) and opens its storage lazily once per
process, so DataLoader workers started by fork or spawn each get their own handle: an fsspec/S3 filesystem opened
before a fork is bound to the parent's event loop and fails in the child ("attached to a different loop").
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from typing import Iterator, Mapping, Sequence

import numpy as np
import zarr

from .completion import (CLAIMS_PREFIX, build_claim, build_record, claim_key, content_differences, data_sha256,
                         decode_claim, decode_manifest, decode_record, encode_manifest, encode_record, same_labels,
                         same_object, shard_from_done_key, writer_id)
from .errors import StoreError, name_some
from .format import (ARRAY_NAME, ATTRS_KEY, DEFAULT_CODES_CHUNK_FRAMES, DONE_GROUP, MAX_FLOAT_CHUNK_FRAMES,
                     default_float_chunk_frames,
                     FORMAT_NAME, FORMAT_VERSION, KINDS, PAD_VALUE, check_meta, choose_chunk_frames, codes_dtype,
                     compressor_spec, created_by, done_key, float_dtype, parse_compressor, shard_key)
from .completion import check_record
from .format import FORMAT_VERSIONS, MANIFEST_KEY, check_layout_limits, parse_json
from . import hashindex, indexcache
from .hashindex import HashIndex
from .plan import Shard
from .fsio import ObjectStore, RetryPolicy, normalize_url
from .index import LOOKUPS, UtteranceIndex
from .plan import ShardPlan
from .quantizer import arrays_sha256, check_quantizer, read_quantizer, write_quantizer
from .reader import ShardReader
from .shardcodec import ShardLayout, layout_from_zarr_metadata

log = logging.getLogger("ci_store")
MODES = ("r", "r+")
_CLAIM_ROUNDS = 8        # claim attempts per write_shard; each failed round means another writer claimed and let go
# keys an interrupted create() may leave behind; anything else at the path is data we must not touch
_CREATE_PREFIXES = ("zarr.json", "index/", "quantizer/", f"{DONE_GROUP}/zarr.json",
                    *(f"{a}/zarr.json" for a in ARRAY_NAME.values()))


class _Handle:
    """Everything bound to one process: the object store (and its event-loop-bound clients) and caches."""

    def __init__(self, url: str, storage_options: dict, mode: str, retry: RetryPolicy | None = None):
        self.pid = os.getpid()
        self.objects = ObjectStore(url, storage_options, read_only=(mode == "r"), retry=retry)
        raw = self.objects.get("zarr.json")
        if raw is None:
            raise StoreError(f"{url} is not a ci-store (no zarr.json at its root)")
        root_meta = parse_json(raw, f"{url}/zarr.json")
        if root_meta.get("zarr_format") != 3 or root_meta.get("node_type") != "group":
            raise StoreError(f"{url} is not a ci-store (its zarr.json is not a Zarr v3 group)")
        attrs = root_meta.get("attributes")
        self.meta = check_meta(attrs.get(ATTRS_KEY) if isinstance(attrs, dict) else None, url)
        array = self.meta["array"]
        raw = self.objects.get(f"{array}/zarr.json")
        if raw is None:
            raise StoreError(f"{url}: label array {array!r} is missing")
        array_meta = parse_json(raw, f"{url}/{array}/zarr.json")
        self.layout = layout_from_zarr_metadata(array_meta, f"{url}/{array}")
        m = self.meta
        expect = (m["shard_frames"], m["chunk_frames"], m["width"], m["dtype"], m["padded_frames"],
                  parse_compressor(m["compressor"]), m["kind"] == "codes")
        got = (self.layout.shard_frames, self.layout.chunk_frames, self.layout.width, str(self.layout.dtype),
               array_meta["shape"][0], (self.layout.compressor, self.layout.level), self.layout.transpose)
        if expect != got:
            raise StoreError(f"{url}: array {array!r} layout {got} does not match the store metadata {expect}")
        self.reader = ShardReader(self.objects, array, self.layout)
        self.records: dict[int, dict] = {}
        self.manifest_read = False      # v2: looked for done/manifest.json.zst (its records are then in .records)
        self.all_complete = False       # v2: a manifest was found, so every shard is complete
        self._group = None
        self.mode = mode

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(self.objects.zarr_store, mode="r" if self.mode == "r" else "r+")
        return self._group


class CIStore:
    """One ci-store: metadata, index lookup, shard writes and utterance reads. Use create() / open_store()."""

    def __init__(self, url, storage_options: dict | None = None, mode: str = "r", lookup: str = "auto",
                 _lazy: bool = False, retry: RetryPolicy | None = None, index_cache="auto"):
        if mode not in MODES:
            raise StoreError(f"mode must be one of {MODES}, got {mode!r}")
        if lookup not in LOOKUPS:
            raise StoreError(f"lookup must be one of {LOOKUPS}, got {lookup!r}")
        self.url = normalize_url(url)
        self.storage_options = dict(storage_options or {})
        self.mode = mode
        self.lookup = lookup
        self.index_cache = indexcache.check_option(index_cache)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise StoreError(f"retry must be a ci_store.fsio.RetryPolicy, got {type(retry).__name__}")
        self.retry = retry          # None: fsio.DEFAULT_RETRY
        self._h: _Handle | None = None
        self._index: UtteranceIndex | HashIndex | None = None
        self._plan: ShardPlan | None = None
        self._ids: list[str] | None = None
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()
        if not _lazy:
            self._handle()

    # --- per-process handle, pickling --------------------------------------------------------------------------
    def _handle(self) -> _Handle:
        h = self._h
        pid = os.getpid()
        if h is not None and h.pid == pid:
            return h
        if self._lock_pid != pid:           # a lock inherited through fork may be held by a thread that is gone
            self._lock, self._lock_pid = threading.Lock(), pid
        with self._lock:
            if self._h is None or self._h.pid != pid:
                self._h = _Handle(self.url, self.storage_options, self.mode, self.retry)
            return self._h

    def __getstate__(self) -> dict:
        return {"url": self.url, "storage_options": self.storage_options, "mode": self.mode, "lookup": self.lookup,
                "retry": self.retry, "index_cache": self.index_cache}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["storage_options"], state["mode"], state["lookup"], _lazy=True,
                      retry=state.get("retry"), index_cache=state.get("index_cache", "auto"))

    def __repr__(self) -> str:
        return f"CIStore({self.url!r}, mode={self.mode!r})"

    # --- metadata ----------------------------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return dict(self._handle().meta)

    kind = property(lambda self: self._handle().meta["kind"])
    num_codebooks = property(lambda self: self._handle().meta.get("num_codebooks"))
    codebook_size = property(lambda self: self._handle().meta.get("codebook_size"))
    dim = property(lambda self: self._handle().meta.get("dim"))
    width = property(lambda self: self._handle().meta["width"])
    dtype = property(lambda self: np.dtype(self._handle().meta["dtype"]))
    frame_rate = property(lambda self: float(self._handle().meta["frame_rate"]))
    quantizer_id = property(lambda self: self._handle().meta.get("quantizer_id"))
    teacher = property(lambda self: self._handle().meta.get("teacher"))
    total_frames = property(lambda self: int(self._handle().meta["total_frames"]))
    num_shards = property(lambda self: int(self._handle().meta["num_shards"]))
    shard_frames = property(lambda self: int(self._handle().meta["shard_frames"]))
    array_name = property(lambda self: self._handle().meta["array"])
    layout = property(lambda self: self._handle().layout)

    format_version = property(lambda self: int(self._handle().meta["format_version"]))

    @property
    def index(self) -> UtteranceIndex | HashIndex:
        """The utterance index: v1 loaded whole (dict or sorted lookup); v2 mapped, read on demand (hash lookup)."""
        if self._index is None:
            h = self._handle()
            if h.meta["format_version"] >= 2:
                self._index = HashIndex.read(h.objects, h.meta, self.url, self.index_cache)
            else:
                self._index = UtteranceIndex.read(h.objects, h.meta, self.url, lookup=self.lookup)
        return self._index

    def _shard(self, shard: int) -> Shard:
        """One shard of the plan, built from the index alone (the whole plan of a large store is GBs)."""
        if self._plan is not None:
            return self._plan.shards[shard]
        idx = self.index
        lo, hi = idx.shard_range(shard)
        offs, nf = idx.frames_range(lo, hi)
        S = self.shard_frames
        if hi <= lo or (offs // S != shard).any() or (offs[1:] != offs[:-1] + nf[:-1]).any() \
                or offs[0] != shard * S or offs[-1] + nf[-1] > (shard + 1) * S:
            raise StoreError(f"{self.url}: index entries of shard {shard} (positions {lo}..{hi - 1}) are not "
                             f"contiguous from the shard start")
        return Shard(shard, shard * S, int(nf.sum()), tuple(idx.ids_range(lo, hi)), tuple(offs.tolist()),
                     tuple(nf.tolist()))

    @property
    def plan(self) -> ShardPlan:
        if self._plan is None:
            self._plan = self.index.to_plan(self.shard_frames)
        return self._plan

    @property
    def ids(self) -> list[str]:
        """Utterance ids in storage order (a list built once per CIStore)."""
        if self._ids is None:
            self._ids = self.index.ids.tolist()
        return self._ids

    def __len__(self) -> int:
        return int(self._handle().meta["num_utterances"])

    def __contains__(self, utt_id) -> bool:
        return utt_id in self.index

    def num_frames(self, utt_id: str) -> int:
        return int(self.index.num_frames[self.index.position(utt_id)])

    def locate(self, utt_id: str) -> tuple[int, int, int]:
        """(global row offset, num_frames, shard) of an utterance; KeyError naming it when absent."""
        return self.index.entry(self.index.position(utt_id))

    def shard_of(self, utt_id: str) -> int:
        """Shard holding an utterance (readers group requests by shard for locality)."""
        return int(self.index.shard[self.index.position(utt_id)])

    def quantizer_state(self) -> tuple[dict, dict[str, np.ndarray]] | None:
        q = read_quantizer(self._handle().objects, self.url)
        return None if q is None else (q[0], q[1])

    # --- completion --------------------------------------------------------------------------------------------
    def completed_shards(self) -> set[int]:
        """Shards with a completion record. Format v2 stores with a completion manifest (a complete store): one
        GET; otherwise one listing of done/."""
        h = self._handle()
        if self._read_manifest():
            return set(range(self.num_shards))
        done = {shard_from_done_key(k) for k in h.objects.list_prefix(f"{DONE_GROUP}/")}
        return {s for s in done if s is not None and 0 <= s < self.num_shards}

    def _read_manifest(self) -> bool:
        """Load done/manifest.json.zst once per handle (v2); True when it exists (every shard is complete)."""
        h = self._handle()
        if h.meta["format_version"] < 2:
            return False
        if not h.manifest_read:
            raw = h.objects.get(MANIFEST_KEY)
            if raw is not None:
                L = h.layout
                recs = decode_manifest(raw, h.meta, self.url)
                for s, rec in enumerate(recs):
                    h.records[s] = check_record(rec, s, self.array_name, L.index_nbytes, L.max_object_nbytes,
                                                f"{self.url} ({MANIFEST_KEY})")
                h.all_complete = True
            h.manifest_read = True
        return h.all_complete

    def write_completion_manifest(self) -> bool:
        """Format v2: once every shard is complete, write done/manifest.json.zst holding every completion record, so
        a reader finds completion and failures with one GET instead of a listing and a GET per shard. Returns
        whether it was written (False: some shard is incomplete, or a v1 store). The per-shard records stay the
        truth; the manifest is their copy, written only from a complete store, byte-identical whoever writes it,
        and deleted by write_shard(replace=True) before it changes a record (docs/store-format.md)."""
        if self.mode == "r":
            raise StoreError(f"{self.url} is open read-only; open it with mode='r+' to write the manifest")
        h = self._handle()
        if h.meta["format_version"] < 2:
            return False
        done = {shard_from_done_key(k) for k in h.objects.list_prefix(f"{DONE_GROUP}/")}
        if not set(range(self.num_shards)) <= done:
            return False
        for s in range(self.num_shards):          # fresh reads of the records themselves, never of a manifest
            h.records.pop(s, None)
        h.manifest_read, h.all_complete = True, False
        recs = self._records(range(self.num_shards))
        h.objects.set(MANIFEST_KEY, encode_manifest(recs, h.meta["plan_sha256"], self.num_shards))
        h.manifest_read = h.all_complete = True
        return True

    def is_shard_complete(self, shard: int) -> bool:
        self._check_shard_number(shard)
        h = self._handle()
        return shard in h.records or self._read_manifest() or h.objects.exists(done_key(shard))

    def shard_record(self, shard: int) -> dict:
        """The completion record of a complete shard; StoreError naming the shard if it is not complete."""
        return self._records([shard])[shard]

    def _records(self, shards) -> dict[int, dict]:
        h = self._handle()
        shards = list(shards)
        missing = sorted({s for s in shards if s not in h.records})
        if missing and self._read_manifest():
            missing = sorted({s for s in shards if s not in h.records})
        for s in missing:
            self._check_shard_number(s)
        for s, raw in zip(missing, h.objects.get_many([done_key(s) for s in missing])):
            if raw is None:
                raise StoreError(f"{self.url}: shard {s} is not complete (no {done_key(s)}); "
                                 f"its labels have not been written yet")
            L = h.layout
            h.records[s] = check_record(decode_record(raw, s, self.url), s, self.array_name, L.index_nbytes,
                                        L.max_object_nbytes, self.url)
        return {s: h.records[s] for s in shards}

    def remove_stale_claims(self) -> list[int]:
        """Delete the claims of complete shards (left by a writer that could not remove its claim after the record
        was written; they protect nothing) and return those shards. Claims of incomplete shards may belong to
        running writers and are kept. create(exist_ok=True) calls this when a job resumes."""
        h = self._handle()
        claims = {shard_from_done_key(k): k for k in h.objects.list_prefix(f"{CLAIMS_PREFIX}/")}
        claims.pop(None, None)          # temporary files of local writers in progress
        if not claims:
            return []
        done = self.completed_shards()
        stale = sorted(s for s in claims if s in done)
        for s in stale:
            h.objects.delete(claims[s])
        return stale

    def failures(self) -> dict[str, str]:
        """utterance id -> reason, over all complete shards."""
        done = sorted(self.completed_shards())
        out = {}
        for s, rec in sorted(self._records(done).items()):
            out.update(rec["failures"])
        return out

    def _check_shard_number(self, shard) -> None:
        if isinstance(shard, bool) or not isinstance(shard, (int, np.integer)) or not 0 <= shard < self.num_shards:
            raise StoreError(f"{self.url}: shard {shard!r} does not exist (store has {self.num_shards} shards)")

    # --- writing -----------------------------------------------------------------------------------------------
    def write_shard(self, shard: int, arrays: Mapping[str, np.ndarray], failures: Mapping[str, str] | None = None,
                    *, replace: bool = False) -> dict:
        """Write every utterance of one shard, then its completion record; returns the record.

        `arrays` holds every utterance of the shard except those in `failures` (id -> reason), which are padded
        and recorded. Rewriting a complete shard with the same content does nothing; different content raises.
        Safe with several writers of one shard at once (a zombie task, two runs): the same content succeeds for
        all, different content for one, the others get a StoreError naming the shard and what differs.
        `replace=True` is the one path that rewrites a complete shard (e.g. `extract --retry-failed`): its
        completion record is deleted first, so until the new one is written the shard reads as incomplete, and a
        crash in between leaves an incomplete shard that the next run rewrites, never a record that disagrees
        with the data.
        """
        if self.mode == "r":
            raise StoreError(f"{self.url} is open read-only; open it with mode='r+' to write shards")
        self._check_shard_number(shard)
        h = self._handle()
        sh = self._shard(shard)
        failures = {} if failures is None else dict(failures)
        members = set(sh.utt_ids)
        for what, keys in (("arrays", arrays), ("failures", failures)):
            for uid in keys:
                if uid not in members:
                    if uid in self.index:
                        raise KeyError(f"utterance {uid!r} (in {what}) belongs to shard "
                                       f"{self.locate(uid)[2]}, not shard {shard}")
                    raise KeyError(f"utterance {uid!r} (in {what}) is not in the store")
        both = set(arrays) & set(failures)
        if both:
            raise ValueError(f"utterances both written and marked failed: {name_some(sorted(both))}")
        missing = [u for u in sh.utt_ids if u not in arrays and u not in failures]
        if missing:
            raise ValueError(f"shard {shard}: no array and no failure reason for utterances {name_some(missing)}")
        failures = {u: str(r) for u, r in failures.items()}
        layout = h.layout
        block = np.full((layout.shard_frames, layout.width), PAD_VALUE, dtype=layout.dtype)
        for uid, off, n in zip(sh.utt_ids, sh.offsets, sh.num_frames):
            if uid in failures:
                continue
            a = off - sh.start
            block[a:a + n] = self._check_array(uid, arrays[uid], n)
        block_sha = data_sha256(block)
        mine = {"data_sha256": block_sha, "failures": dict(sorted(failures.items())), "object_sha256": None}
        existing = h.objects.get(done_key(shard))
        if existing is not None:
            old = decode_record(existing, shard, self.url)
            if not replace or same_labels(old, mine):
                return self._settle(shard, old, mine, block, tidy=True)
            if h.meta["format_version"] >= 2:       # the manifest copies this record: gone before it changes
                h.objects.delete(MANIFEST_KEY)
                h.manifest_read, h.all_complete = True, False
            h.objects.delete(done_key(shard))
            h.records.pop(shard, None)
        payload = layout.encode(block)
        record = build_record(self.array_name, sh, layout.shard_frames, failures, block_sha, payload,
                              format_version=h.meta["format_version"])
        return self._commit(shard, record, payload, block)

    def _commit(self, shard: int, record: dict, payload: bytes | None, block: np.ndarray) -> dict:
        """Claim the shard, write its object, create its record if absent, release the claim (see
        docs/store-format.md#concurrent-writers). Only the claimant, or a writer whose object is byte-identical to
        the claimant's, ever writes the shard object, so a losing writer never changes a completed shard."""
        h = self._handle()
        objects, ckey, dkey = h.objects, claim_key(shard), done_key(shard)
        me = writer_id()
        claim = build_claim(record, me)
        for _ in range(_CLAIM_ROUNDS):
            held = objects.create(ckey, encode_record(claim))
            if held:
                break
            raw = objects.get(ckey)
            if raw is not None:
                other = decode_claim(raw, shard, self.url)
                held = other["writer"] == me         # our own create, retried after its answer was lost
                if held or same_object(other, record):
                    break                            # identical bytes: safe to write next to the claimant
            existing = objects.get(dkey)             # the claimant may have finished (or let go) meanwhile
            if existing is not None:
                return self._settle(shard, decode_record(existing, shard, self.url), record, block, tidy=True)
            if raw is not None:
                raise StoreError(
                    f"{self.url}: shard {shard} is being written by another writer with different content "
                    f"({'; '.join(content_differences(other, record))}); its claim {ckey} names writer "
                    f"{other['writer']}. If that writer is no longer running (a crashed job), delete "
                    f"{self.url}/{ckey} and write the shard again.")
        else:
            raise StoreError(f"{self.url}: shard {shard}: could not claim {ckey} in {_CLAIM_ROUNDS} rounds "
                             f"(other writers keep claiming and releasing it)")
        settled = False
        try:
            existing = objects.get(dkey)             # completed since our first look: never touch its object
            if existing is not None:
                out = self._settle(shard, decode_record(existing, shard, self.url), record, block)
            else:
                key = shard_key(self.array_name, shard)
                if payload is not None:
                    objects.set(key, payload)        # replaces what an interrupted attempt may have left
                elif objects.exists(key):            # all padding: no object; remove an interrupted attempt's
                    objects.delete(key)
                if objects.create(dkey, encode_record(record)):
                    h.records[shard] = out = record
                else:     # our own create answered late, or a claimless writer (non-atomic storage)
                    out = self._settle(shard, decode_record(objects.get(dkey) or b"", shard, self.url), record,
                                       block)
            settled = True
            return out
        finally:
            if held or settled:      # settled: a record exists, the claim protects nothing; held: let others try
                try:
                    objects.delete(ckey)
                except Exception as e:  # noqa: BLE001 - never hide the write's own outcome behind this one
                    log.warning("%s/%s: could not remove the claim (%s: %s); harmless once shard %d is complete, "
                                "else delete it before writing the shard with other content",
                                self.url, ckey, type(e).__name__, e, shard)

    def _settle(self, shard: int, theirs: dict, ours: dict, block: np.ndarray, tidy: bool = False) -> dict:
        """The shard is complete with record `theirs`: fine if it holds our labels and failures (returned), else a
        StoreError naming the shard and what differs. tidy: also remove a claim a crashed writer left behind."""
        h = self._handle()
        if same_labels(theirs, ours):
            h.records[shard] = theirs
            if tidy and not h.objects.read_only and h.objects.exists(claim_key(shard)):
                h.objects.delete(claim_key(shard))
            return theirs
        diffs = content_differences(theirs, ours, self._differing_utterances(shard, theirs, block))
        raise StoreError(f"{self.url}: shard {shard} is already complete with different content "
                         f"({'; '.join(diffs)}); refusing to overwrite it. Delete {done_key(shard)} to rewrite "
                         f"the shard.")

    def _differing_utterances(self, shard: int, theirs: dict, block: np.ndarray) -> list[str] | None:
        """Utterances whose stored rows differ from ours (both written), read from the stored shard; None if it
        cannot be read (then the error names the checksums only)."""
        sh = self._shard(shard)
        try:
            (rows,) = self._handle().reader.read([(shard, 0, sh.size)], {shard: int(theirs["object_nbytes"])})
        except Exception:  # noqa: BLE001 - an explanation, not a check: fall back to the checksums
            return None
        out = []
        for uid, off, n in zip(sh.utt_ids, sh.offsets, sh.num_frames):
            a = off - sh.start
            if uid not in theirs["failures"] and not np.array_equal(rows[a:a + n], block[a:a + n]):
                out.append(uid)
        return out

    def _check_array(self, uid: str, arr, n: int) -> np.ndarray:
        a = arr if isinstance(arr, np.ndarray) else np.asarray(arr)
        w = self.width
        if a.shape != (n, w):
            raise ValueError(f"utterance {uid!r}: expected an array of shape ({n}, {w}), got {a.shape}")
        if self.kind == "codes":
            if a.dtype.kind not in "iu":
                raise ValueError(f"utterance {uid!r}: codebook indexes must be integers, got dtype {a.dtype}")
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= self.codebook_size:
                bad = lo if lo < 0 else hi
                frame = int(np.argwhere(a == bad)[0][0])
                raise ValueError(f"utterance {uid!r}: index {bad} at frame {frame} is outside "
                                 f"[0, {self.codebook_size})")
            return a.astype(self.dtype, copy=False)
        if a.dtype.kind != "f":
            raise ValueError(f"utterance {uid!r}: float labels must be a floating dtype, got {a.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):
            out = a.astype(self.dtype, copy=False)
        finite = np.isfinite(out)
        if not finite.all():
            frame = int(np.argwhere(~finite)[0][0])
            why = ("NaN or inf" if not np.isfinite(a[frame]).all()
                   else f"a value too large for {self.dtype} (overflows to inf)")
            raise ValueError(f"utterance {uid!r}: {why} at frame {frame}")
        return out

    # --- reading -----------------------------------------------------------------------------------------------
    def _requests(self, ids: Sequence[str]) -> list[tuple[int, int, int]]:
        idx = self.index
        entries = [idx.entry(idx.position(u)) for u in ids]
        records = self._records({s for _, _, s in entries})
        for u, (_, _, s) in zip(ids, entries):
            reason = records[s]["failures"].get(u)
            if reason is not None:
                raise StoreError(f"utterance {u} failed extraction: {reason}")
        S = self.shard_frames
        return [(s, off - s * S, off - s * S + n) for off, n, s in entries]

    def _sizes(self, shards) -> dict[int, int]:
        recs = self._records(shards)
        return {s: int(recs[s]["object_nbytes"]) for s in shards}

    def get_many(self, ids: Sequence[str]) -> list[np.ndarray]:
        """Arrays for many utterances; reads are grouped per shard into few concurrent byte-range requests.

        Local uncompressed float stores return views into one block allocated for the batch (see
        docs/store-format.md, "Reading"): keeping one of the arrays keeps the batch's block alive."""
        ids = list(ids)
        if not ids:
            return []
        reqs = self._requests(ids)
        return self._handle().reader.read(reqs, self._sizes({s for s, _, _ in reqs}), names=ids)

    def __getitem__(self, utt_id: str) -> np.ndarray:
        return self.get_many([utt_id])[0]

    def read_shard(self, shard: int, include_failed: bool = False) -> list[tuple[str, np.ndarray]]:
        """All utterances of one shard (one read of its used rows); failed ones skipped unless include_failed."""
        self._check_shard_number(shard)
        sh = self._shard(shard)
        rec = self._records([shard])[shard]
        (rows,) = self._handle().reader.read([(shard, 0, sh.size)], self._sizes([shard]))
        out = []
        for uid, off, n in zip(sh.utt_ids, sh.offsets, sh.num_frames):
            if uid in rec["failures"] and not include_failed:
                continue
            a = off - sh.start
            out.append((uid, rows[a:a + n]))
        return out

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        """(id, array) in storage order, one shard read at a time; failed utterances are skipped."""
        for s in range(self.num_shards):
            yield from self.read_shard(s)

    def close(self) -> None:
        self._h = None


# --- create / open ------------------------------------------------------------------------------------------------
def open_store(url, mode: str = "r", storage_options: dict | None = None, lookup: str = "auto",
               retry: RetryPolicy | None = None, index_cache="auto") -> CIStore:
    """Open an existing store. StoreError (naming the path) if it is not a ci-store or its format is newer.
    retry: how transient storage errors are retried (ci_store.fsio.RetryPolicy; default fsio.DEFAULT_RETRY).
    index_cache (remote format v2 stores): "auto" copies an index over 64 MiB once per host into
    $CI_STORE_INDEX_CACHE (default ~/.cache/ci-store/index; "off" disables) and maps it; a directory forces
    the copy there; None/False reads the index by ranged requests (docs/store-format.md, "Index cache")."""
    return CIStore(url, storage_options, mode=mode, lookup=lookup, retry=retry, index_cache=index_cache)


def _positive(x, what: str, integer: bool = True):
    ok = (isinstance(x, (int, np.integer)) if integer else isinstance(x, (int, float, np.integer, np.floating)))
    if isinstance(x, bool) or not ok or not x > 0 or (not integer and not math.isfinite(x)):
        raise StoreError(f"{what} must be a positive {'integer' if integer else 'number'}, got {x!r}")
    return int(x) if integer else float(x)


def _json_dict(x, what: str) -> dict:
    if x is None:
        return {}
    if not isinstance(x, dict):
        raise StoreError(f"{what} must be a dict, got {type(x).__name__}")
    try:
        return json.loads(json.dumps(x))
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} is not JSON-serialisable: {e}") from None


def _utterances_sha256(plan: ShardPlan) -> str:
    """Identity of the utterance set (ids and frame counts, order-free): compare checks stores hold the same data."""
    h = hashlib.sha256()
    for uid, n in sorted((u, n) for s in plan.shards for u, n in zip(s.utt_ids, s.num_frames)):
        h.update(f"{uid}\t{n}\n".encode())
    return h.hexdigest()


def create(url, plan: ShardPlan, *, kind: str = "codes", num_codebooks: int | None = None, codebook_size: int = 256,
           dim: int | None = None, dtype=None, frame_rate: float, teacher: dict | None = None,
           quantizer: dict | None = None, storage_options: dict | None = None, exist_ok: bool = False,
           extra: dict | None = None, compressor: str | None = None, chunk_frames: int | None = None,
           lookup: str = "auto", retry: RetryPolicy | None = None, format_version: int | None = None) -> CIStore:
    """Create an empty store laid out by `plan` (index written now); shards are filled later by write_shard.

    format_version: None writes FORMAT_VERSION (2: mapped hash index, completion manifest) for a new store and
    continues an existing store in its own version on resume; 1 writes the format-v1 layout (for readers that
    predate v2).

    exist_ok=True reopens a store made with the same plan, kind, shape, teacher and quantizer (to resume a job);
    any difference, or a path holding something that is not a ci-store, raises StoreError. Never overwrites data.
    compressor / chunk_frames: None is the kind's default for a new store (codes zstd:3 in 1024-frame chunks;
    float uncompressed in ~128 KiB chunks) and the existing store's own layout on resume.
    """
    if not isinstance(plan, ShardPlan):
        raise StoreError(f"plan must be a ShardPlan (from plan_shards), got {type(plan).__name__}")
    if format_version is not None and format_version not in FORMAT_VERSIONS:
        raise StoreError(f"format_version must be one of {FORMAT_VERSIONS}, got {format_version!r}")
    if kind not in KINDS:
        raise StoreError(f"kind must be one of {KINDS}, got {kind!r}")
    frame_rate = _positive(frame_rate, "frame_rate", integer=False)
    teacher = _json_dict(teacher, "teacher") or None
    extra = _json_dict(extra, "extra")
    cname, level = parse_compressor(compressor, kind)
    qid = qconfig = qarrays = None
    if quantizer is not None:
        qid, qconfig, qarrays = check_quantizer(quantizer)
    if kind == "codes":
        width = _positive(num_codebooks, "num_codebooks")
        codebook_size = _positive(codebook_size, "codebook_size")
        dt = codes_dtype(codebook_size)
        if dtype is not None:
            want = np.dtype(dtype)
            if want not in (np.dtype("uint8"), np.dtype("uint16")) or np.iinfo(want).max < codebook_size - 1:
                raise StoreError(f"codes dtype must be uint8 or uint16 holding indexes below {codebook_size}, "
                                 f"got {want}")
            dt = want
        if dim is None and qconfig and isinstance(qconfig.get("dim"), int):
            dim = qconfig["dim"]
        if dim is not None:
            dim = _positive(dim, "dim")
        target_chunk = DEFAULT_CODES_CHUNK_FRAMES
    else:
        width = dim = _positive(dim, "dim (required for float stores)")
        dt = float_dtype(dtype)
        num_codebooks = codebook_size = None
        target_chunk = default_float_chunk_frames(width, dt.itemsize)
    S = plan.shard_frames
    chunk_arg = chunk_frames
    if chunk_frames is None and kind == "float":
        try:
            chunk_frames = choose_chunk_frames(S, target_chunk)
        except StoreError:      # no divisor near the small target: the chunk every earlier version chose
            chunk_frames = choose_chunk_frames(S, MAX_FLOAT_CHUNK_FRAMES)
    elif chunk_frames is None:
        chunk_frames = choose_chunk_frames(S, target_chunk)
    else:
        chunk_frames = _positive(chunk_frames, "chunk_frames")
        if S % chunk_frames:
            raise StoreError(f"chunk_frames={chunk_frames} must divide shard_frames={S}")
    layout = ShardLayout(S, chunk_frames, width, np.dtype(dt), kind == "codes", cname, level)
    check_layout_limits(S, chunk_frames, width, layout.dtype.itemsize, str(url))
    q_sha = None
    if qarrays is not None:
        q_sha = arrays_sha256(qarrays)
    url = normalize_url(url)
    objects = ObjectStore(url, storage_options, read_only=False, retry=retry)
    empty = objects.is_empty()
    root = None if empty else objects.get("zarr.json")
    existing_meta = None        # the ci-store metadata already there (a resume), read once for the version and below
    if root is not None:
        try:
            existing_meta = (json.loads(root).get("attributes") or {}).get(ATTRS_KEY)
        except (ValueError, AttributeError):
            existing_meta = None
    version = format_version
    if version is None:
        v = existing_meta.get("format_version") if isinstance(existing_meta, dict) else None
        version = v if v in FORMAT_VERSIONS else FORMAT_VERSION
    if version >= 2 and plan.num_utterances > hashindex.MAX_UTTERANCES:
        raise StoreError(f"{url}: {plan.num_utterances} utterances, more than the {hashindex.MAX_UTTERANCES} a "
                         f"format v2 store holds")
    meta = {
        "format": FORMAT_NAME, "format_version": version, "kind": kind, "array": ARRAY_NAME[kind],
        "dtype": str(np.dtype(dt)), "width": width, "num_codebooks": num_codebooks if kind == "codes" else None,
        "codebook_size": codebook_size, "dim": dim, "frame_rate": frame_rate, "teacher": teacher,
        "quantizer_id": qid, "quantizer_sha256": q_sha,
        "total_frames": plan.total_frames, "padded_frames": plan.padded_frames,
        "num_utterances": plan.num_utterances, "num_shards": plan.num_shards, "shard_frames": S,
        "chunk_frames": chunk_frames, "pad_value": PAD_VALUE, "compressor": compressor_spec(cname, level),
        "chunk_order": "codebook-major" if layout.transpose else "frame-major",
        "created_by": created_by(), "extra": extra,
    }
    if version >= 2:
        meta.update({"plan_sha256": hashindex.plan_digest(plan), "utterances_hash_sha256":
                     hashindex.utterances_digest(plan), "id_hash": hashindex.HASH_NAME,
                     "id_hash_bits": hashindex.ID_HASH_BITS, "index_block": hashindex.HASH_BLOCK})
    else:
        meta.update({"plan_sha256": plan.sha256(), "utterances_sha256": _utterances_sha256(plan)})
    if not empty:
        keys = objects.list_all()
        if existing_meta is not None:
            if not exist_ok:
                raise StoreError(f"{url} already holds a ci-store; pass exist_ok=True to resume it")
            existing = CIStore(url, storage_options, mode="r+", lookup=lookup, retry=retry)
            # defaults change between versions (float stores: issue 17); a resume that did not ask for a layout
            # continues the store's own, so its shards stay byte-identical to those already written
            kept = [("compressor", compressor), ("chunk_frames", chunk_arg)]
            kept += [(key, None) for key in ("id_hash_bits", "index_block") if key in existing.meta]   # v2 only
            for key, given in kept:
                if given is None:
                    meta[key] = existing.meta[key]
            diffs = _differences(existing.meta, meta)
            if diffs:
                raise StoreError(f"{url} already holds a different ci-store: " + "; ".join(diffs))
            existing.remove_stale_claims()
            return existing
        if root is None or not all(k.startswith(_CREATE_PREFIXES) for k in keys):
            foreign = [k for k in keys if not k.startswith(_CREATE_PREFIXES)]
            raise StoreError(f"{url} is not empty and is not a ci-store (holds {name_some(foreign, 5)}); "
                             f"refusing to write there")
        # only metadata of an interrupted create(): safe to redo
    group = zarr.open_group(objects.zarr_store, mode="w", zarr_format=3)
    group.create_array(ARRAY_NAME[kind], shape=(plan.padded_frames, width), dtype=layout.dtype,
                       **layout.zarr_codecs())
    if version >= 2:
        hashindex.write(group, objects, plan, meta["id_hash_bits"], meta["index_block"])
    else:
        UtteranceIndex.from_plan(plan).write(group)
    if qarrays is not None:
        write_quantizer(group, qid, qconfig, qarrays)
    group.create_group(DONE_GROUP, attributes={
        "description": "completion records: one JSON object per finished shard (shard-NNNNNN.json)"})
    group.update_attributes({ATTRS_KEY: meta})     # last: a store without it is an unfinished create
    return CIStore(url, storage_options, mode="r+", lookup=lookup, retry=retry)


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for k in ("format_version", "kind", "dtype", "width", "num_codebooks", "codebook_size", "dim", "frame_rate",
              "teacher", "quantizer_id", "quantizer_sha256", "shard_frames", "chunk_frames", "compressor"):
        if old.get(k) != new.get(k):
            out.append(f"{k} is {old.get(k)!r} there, {new.get(k)!r} here")
    if old.get("plan_sha256") != new.get("plan_sha256"):
        out.append(f"shard plan differs (there {old['num_utterances']} utterances, {old['total_frames']} frames, "
                   f"{old['num_shards']} shards; here {new['num_utterances']}, {new['total_frames']}, "
                   f"{new['num_shards']})")
    return out
