"""Shard planning: assign utterances to fixed-capacity shards before any label exists.

Planning first (frame counts are known exactly from the audio) lets every shard be written by exactly one
task, lets the index be written at create time, and guarantees that no utterance crosses a shard boundary.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from .errors import StoreError, duplicate_ids, name_some

PLAN_FORMAT = "ci-store-plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class Shard:
    """One shard: rows [start, start + capacity) of the label array; utterances fill [start, start + size).

    `offsets` are global row offsets in the label array (not shard-local); rows after `start + size`
    up to the capacity are padding.
    """

    index: int
    start: int
    size: int
    utt_ids: tuple[str, ...]
    offsets: tuple[int, ...]
    num_frames: tuple[int, ...]

    @property
    def end(self) -> int:
        """One past the last row holding utterance data."""
        return self.start + self.size

    def __len__(self) -> int:
        return len(self.utt_ids)


class ShardPlan:
    """Utterances in storage order, grouped into shards of `shard_frames` rows each.

    Two representations of one thing: a list of Shard objects (plan_shards, from_groups: handy for small plans),
    or columns (plan_arrays, from_columns: ids as UTF-8 bytes back to back with end offsets, frames, the first
    position of each shard), which hold 80M utterances in a few GB; `shards` of a column plan builds each Shard
    when it is asked for."""

    def __init__(self, shard_frames: int, shards: Sequence[Shard]):
        self.shard_frames = int(shard_frames)
        self.shards: Sequence[Shard] = list(shards)
        self._shard_of: dict[str, int] | None = None
        self._cols: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._hash64: np.ndarray | None = None

    @classmethod
    def from_columns(cls, shard_frames: int, id_bytes, id_ends, num_frames, shard_starts) -> "ShardPlan":
        """A plan over columns (no checks: plan_arrays and the v2 index reader check them)."""
        plan = cls(shard_frames, [])
        plan._cols = (np.asarray(id_bytes, np.uint8), np.asarray(id_ends, np.uint64),
                      np.asarray(num_frames, np.int64), np.asarray(shard_starts, np.int64))
        plan.shards = _ColumnShards(plan)
        return plan

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(id_bytes uint8, id_ends uint64, num_frames int64, shard_starts int64): the v2 index columns."""
        if self._cols is None:
            ids, _, frames, shard = self.arrays()
            enc = [u.encode("utf-8") for u in ids]
            id_bytes = np.frombuffer(b"".join(enc), np.uint8)
            id_ends = np.cumsum([len(e) for e in enc], dtype=np.uint64)
            starts = np.searchsorted(shard, np.arange(self.num_shards + 1)).astype(np.int64)
            self._cols = (id_bytes, id_ends, frames, starts)
        return self._cols

    def offsets(self) -> np.ndarray:
        """Global row offset of every utterance (storage order)."""
        _, _, frames, starts = self.columns()
        before = np.cumsum(frames) - frames
        per_shard = np.diff(starts)
        first = before[starts[:-1]]
        return before - np.repeat(first, per_shard) + np.repeat(
            np.arange(len(per_shard), dtype=np.int64) * self.shard_frames, per_shard)

    def hashes(self, bits: int = 64) -> np.ndarray:
        """64-bit FNV-1a id hash of every utterance (the v2 index key), low `bits` bits kept."""
        from .hashindex import id_hashes
        if self._hash64 is None:
            id_bytes, id_ends, _, _ = self.columns()
            self._hash64 = id_hashes(id_bytes, id_ends, 64)
        return self._hash64 if bits == 64 else self._hash64 & np.uint64((1 << bits) - 1)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def total_frames(self) -> int:
        """Frames of utterance data (padding excluded)."""
        if self._cols is not None:
            return int(self._cols[2].sum())
        return sum(s.size for s in self.shards)

    @property
    def padded_frames(self) -> int:
        """Rows of the label array: every shard at full capacity."""
        return self.num_shards * self.shard_frames

    @property
    def num_utterances(self) -> int:
        if self._cols is not None:
            return len(self._cols[1])
        return sum(len(s.utt_ids) for s in self.shards)

    @property
    def ids(self) -> list[str]:
        if self._cols is not None:
            return _decode_ids(self._cols[0], self._cols[1], 0, len(self._cols[1]))
        return [u for s in self.shards for u in s.utt_ids]

    def shard_of(self, utt_id: str) -> int:
        if self._shard_of is None:
            self._shard_of = {u: s.index for s in self.shards for u in s.utt_ids}
        try:
            return self._shard_of[utt_id]
        except KeyError:
            raise KeyError(f"utterance {utt_id!r} is not in the plan") from None

    def arrays(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(ids, offsets int64, num_frames int64, shard int32) in storage order: the stored index."""
        ids = self.ids
        if self._cols is not None:
            _, _, frames, starts = self._cols
            shard = np.repeat(np.arange(len(starts) - 1, dtype=np.int32), np.diff(starts))
            return ids, self.offsets(), frames.copy(), shard
        offsets = np.fromiter((o for s in self.shards for o in s.offsets), np.int64, len(ids))
        frames = np.fromiter((n for s in self.shards for n in s.num_frames), np.int64, len(ids))
        shard = np.fromiter((s.index for s in self.shards for _ in s.utt_ids), np.int32, len(ids))
        return ids, offsets, frames, shard

    @classmethod
    def from_arrays(cls, shard_frames: int, ids: Sequence[str], offsets, num_frames, shard) -> "ShardPlan":
        """Rebuild a plan from the stored index, checking that it is a valid layout."""
        offsets = np.asarray(offsets, np.int64)
        num_frames = np.asarray(num_frames, np.int64)
        shard = np.asarray(shard, np.int64)
        ids = [str(u) for u in ids]
        n = len(ids)
        if not (len(offsets) == len(num_frames) == len(shard) == n):
            raise StoreError(f"index arrays have different lengths: ids {n}, offsets {len(offsets)}, "
                             f"num_frames {len(num_frames)}, shard {len(shard)}")
        problems = layout_problems(shard_frames, ids, offsets, num_frames, shard)
        if problems:
            raise StoreError("invalid shard layout: " + "; ".join(problems[:10]))
        shards = []
        num_shards = int(shard.max()) + 1 if n else 0
        bounds = np.searchsorted(shard, np.arange(num_shards + 1))
        for i in range(num_shards):
            a, b = int(bounds[i]), int(bounds[i + 1])
            start = i * shard_frames
            shards.append(Shard(i, start, int(num_frames[a:b].sum()), tuple(ids[a:b]),
                                tuple(int(x) for x in offsets[a:b]), tuple(int(x) for x in num_frames[a:b])))
        return cls(shard_frames, shards)

    @classmethod
    def from_groups(cls, groups: Sequence[Sequence[tuple[str, int]]], shard_frames: int) -> "ShardPlan":
        """A plan with explicit shard membership: group k becomes shard k (e.g. float shards nested in CI shards).

        Same checks as plan_shards (duplicate ids, non-positive frames), plus: no empty group, and no group with
        more frames than shard_frames (StoreError naming the group).
        """
        shard_frames = _positive_int(shard_frames, "shard_frames")
        groups = [list(g) for g in groups]
        if not groups:
            raise StoreError("cannot plan a store with no utterances")
        empty = [k for k, g in enumerate(groups) if not g]
        if empty:
            raise StoreError(f"empty shard groups: {name_some(empty)}")
        flat = [item for g in groups for item in g]
        plan_shards(flat, max(int(n) if isinstance(n, (int, np.integer)) else 1 for _, n in flat))  # item checks
        shards = []
        for k, g in enumerate(groups):
            size = sum(int(n) for _, n in g)
            if size > shard_frames:
                raise StoreError(f"shard group {k} holds {size} frames, more than shard_frames={shard_frames}")
            offs = np.cumsum([0] + [int(n) for _, n in g[:-1]]) + k * shard_frames
            shards.append(Shard(k, k * shard_frames, size, tuple(u for u, _ in g), tuple(int(o) for o in offs),
                                tuple(int(n) for _, n in g)))
        return cls(shard_frames, shards)

    def to_json(self) -> str:
        """A self-contained JSON text: the explicit shard of every utterance (not just the inputs to greedy fill)."""
        ids, _, frames, shard = self.arrays()
        return json.dumps({"format": PLAN_FORMAT, "version": PLAN_VERSION, "shard_frames": self.shard_frames,
                           "ids": ids, "num_frames": frames.tolist(), "shard": shard.tolist()},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "ShardPlan":
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise StoreError("not a ci-store shard plan (missing format 'ci-store-plan')")
        if int(d.get("version", 0)) > PLAN_VERSION:
            raise StoreError(f"shard plan version {d['version']} is newer than supported ({PLAN_VERSION})")
        sf = int(d["shard_frames"])
        frames = np.asarray(d["num_frames"], np.int64)
        shard = np.asarray(d["shard"], np.int64)
        offsets = _contiguous_offsets(sf, frames, shard)
        return cls.from_arrays(sf, d["ids"], offsets, frames, shard)

    def sha256(self) -> str:
        """Identity of the layout: equal plans give equal hashes (used to match a store on resume)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def __eq__(self, other) -> bool:
        if not isinstance(other, ShardPlan) or self.shard_frames != other.shard_frames:
            return False
        if self._cols is None and other._cols is None:
            return self.shards == other.shards
        return all(np.array_equal(a, b) for a, b in zip(self.columns(), other.columns()))

    def __repr__(self) -> str:
        return (f"ShardPlan(num_shards={self.num_shards}, num_utterances={self.num_utterances}, "
                f"total_frames={self.total_frames}, shard_frames={self.shard_frames})")


def _contiguous_offsets(shard_frames: int, frames: np.ndarray, shard: np.ndarray) -> np.ndarray:
    """Offsets implied by packing utterances back to back from the start of their shard."""
    offsets = np.empty(len(frames), np.int64)
    pos, cur = 0, -1
    for k, (n, s) in enumerate(zip(frames.tolist(), shard.tolist())):
        if s != cur:
            cur, pos = s, s * shard_frames
        offsets[k] = pos
        pos += n
    return offsets


def layout_problems(shard_frames: int, ids: Sequence[str], offsets: np.ndarray, num_frames: np.ndarray,
                    shard: np.ndarray) -> list[str]:
    """Every way the index breaks the layout rules (used by from_arrays and by verify)."""
    problems = []
    n = len(ids)
    if shard_frames <= 0:
        return [f"shard_frames must be positive, got {shard_frames}"]
    if n == 0:
        return problems
    dup = duplicate_ids(ids)
    if dup:
        problems.append(f"duplicate utterance ids: {name_some(dup)}")
    bad = np.flatnonzero(num_frames <= 0)
    if len(bad):
        problems.append(f"utterances with no frames: {name_some(ids[i] for i in bad)}")
    if shard[0] != 0 or np.any(np.diff(shard) < 0) or np.any(np.diff(shard) > 1):
        problems.append("shard numbers are not 0, 1, 2, ... in storage order (empty shard or out of order)")
    start = shard.astype(np.int64) * shard_frames
    end = offsets + num_frames
    out = np.flatnonzero((offsets < start) | (end > start + shard_frames))
    if len(out):
        problems.append(f"utterances crossing or outside their shard: {name_some(ids[i] for i in out)}")
    same = shard[1:] == shard[:-1]
    gap = np.flatnonzero(same & (offsets[1:] != end[:-1]))
    if len(gap):
        problems.append(f"utterances not contiguous with the previous one (gap or overlap): "
                        f"{name_some(ids[i + 1] for i in gap)}")
    first = np.flatnonzero(np.concatenate([[True], ~same]))
    notstart = [i for i in first if offsets[i] != start[i]]
    if notstart:
        problems.append(f"first utterance of a shard not at the shard start: {name_some(ids[i] for i in notstart)}")
    return problems


def plan_shards(utt_frames: Mapping[str, int] | Iterable[tuple[str, int]], shard_frames: int = 1 << 20) -> ShardPlan:
    """Greedy fill in the given order: an utterance that does not fit in the current shard starts the next one.

    Errors (StoreError, naming the utterances): duplicate ids, non-positive or non-integer frame counts, an
    utterance longer than `shard_frames` (choose a larger shard_frames), an empty plan.
    """
    items = list(utt_frames.items()) if isinstance(utt_frames, Mapping) else list(utt_frames)
    shard_frames = _positive_int(shard_frames, "shard_frames")
    if not items:
        raise StoreError("cannot plan a store with no utterances")
    ids, frames, bad_type = [], [], []
    for item in items:
        try:
            uid, n = item
        except (TypeError, ValueError):
            raise StoreError(f"plan entries must be (utterance_id, num_frames) pairs, got {item!r}") from None
        if not isinstance(uid, str) or not uid:
            bad_type.append(uid)
            continue
        ids.append(uid)
        frames.append(n)
    if bad_type:
        raise StoreError(f"utterance ids must be non-empty strings, got {name_some(bad_type)}")
    dups = duplicate_ids(ids)
    if dups:
        raise StoreError(f"duplicate utterance ids: {name_some(dups)}")
    nonint = [u for u, n in zip(ids, frames) if isinstance(n, bool) or not isinstance(n, (int, np.integer))]
    if nonint:
        raise StoreError(f"frame counts must be integers; utterances {name_some(nonint)} have "
                         f"{name_some(frames[ids.index(u)] for u in nonint[:3])}")
    zero = [u for u, n in zip(ids, frames) if n <= 0]
    if zero:
        raise StoreError(f"utterances with no frames (zero or negative count) cannot be stored: {name_some(zero)}")
    too_long = [u for u, n in zip(ids, frames) if n > shard_frames]
    if too_long:
        longest = max(int(n) for n in frames)
        raise StoreError(f"utterances longer than shard_frames={shard_frames}: {name_some(too_long)} "
                         f"(longest has {longest} frames); choose shard_frames >= {longest}")
    shards, cur_ids, cur_off, cur_n, used = [], [], [], [], 0

    def close():
        i = len(shards)
        shards.append(Shard(i, i * shard_frames, used, tuple(cur_ids), tuple(cur_off), tuple(cur_n)))

    for uid, n in zip(ids, frames):
        n = int(n)
        if used + n > shard_frames:
            close()
            cur_ids, cur_off, cur_n, used = [], [], [], 0
        cur_ids.append(uid)
        cur_off.append(len(shards) * shard_frames + used)
        cur_n.append(n)
        used += n
    close()
    return ShardPlan(shard_frames, shards)


def _positive_int(x, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x <= 0:
        raise StoreError(f"{what} must be a positive integer, got {x!r}")
    return int(x)


class _ColumnShards(Sequence):
    """The shards of a column plan, each built when asked for."""

    def __init__(self, plan: ShardPlan):
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan._cols[3]) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"shard {i} out of range ({n} shards)")
        id_bytes, id_ends, frames, starts = self.plan._cols
        a, b = int(starts[i]), int(starts[i + 1])
        nf = frames[a:b]
        start = i * self.plan.shard_frames
        offs = start + np.cumsum(nf) - nf
        return Shard(i, start, int(nf.sum()), tuple(_decode_ids(id_bytes, id_ends, a, b)), tuple(offs.tolist()),
                     tuple(nf.tolist()))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


def _decode_ids(id_bytes: np.ndarray, id_ends: np.ndarray, a: int, b: int) -> list[str]:
    if b <= a:
        return []
    start = int(id_ends[a - 1]) if a else 0
    raw = id_bytes[start:int(id_ends[b - 1])].tobytes()
    ends = id_ends[a:b].astype(np.int64) - start
    return [raw[x:y].decode("utf-8") for x, y in zip([0, *ends[:-1].tolist()], ends.tolist())]


def _encode_ids(ids, chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of every id back to back, and the end offset of each; StoreError for an empty id."""
    ids = ids if isinstance(ids, np.ndarray) else np.asarray(list(ids), dtype=np.dtypes.StringDType())
    parts, lens = [], []
    for a in range(0, len(ids), chunk):
        c = ids[a:a + chunk]
        enc = c if c.dtype.kind == "S" else np.strings.encode(c.astype(np.dtypes.StringDType()), "utf-8")
        ln = np.strings.str_len(enc).astype(np.int64)
        if (ln == 0).any():
            raise StoreError(f"utterance ids must be non-empty strings; position {a + int(np.argmin(ln))} is empty")
        w = enc.dtype.itemsize
        mat = enc.view(np.uint8).reshape(len(enc), w)
        parts.append(mat[np.arange(w) < ln[:, None]])
        lens.append(ln)
    id_bytes = np.concatenate(parts) if parts else np.empty(0, np.uint8)
    return id_bytes, np.cumsum(np.concatenate(lens) if lens else np.empty(0, np.int64)).astype(np.uint64)


def plan_arrays(ids, num_frames, shard_frames: int = 1 << 20) -> ShardPlan:
    """plan_shards for corpus-sized inputs: ids (a numpy string array: bytes 'S', str 'U' or StringDType, or any
    sequence of str) and frame counts as arrays; the same greedy fill, checks and errors, vectorised, and a column
    plan (a few bytes per utterance beyond its id, no Python object per utterance)."""
    shard_frames = _positive_int(shard_frames, "shard_frames")
    frames = np.asarray(num_frames)
    if frames.ndim != 1 or frames.dtype.kind not in "iu":
        raise StoreError(f"frame counts must be a 1-D integer array, got {frames.dtype} of shape {frames.shape}")
    frames = frames.astype(np.int64)
    if len(frames) == 0:
        raise StoreError("cannot plan a store with no utterances")
    id_bytes, id_ends = _encode_ids(ids)
    if len(id_ends) != len(frames):
        raise StoreError(f"{len(id_ends)} ids but {len(frames)} frame counts")
    from .hashindex import MAX_ID_BYTES, MAX_UTTERANCES, duplicate_problems, id_hashes
    if len(frames) > MAX_UTTERANCES:
        raise StoreError(f"{len(frames)} utterances, more than the {MAX_UTTERANCES} one store holds")

    def named(rows):
        return name_some(_decode_ids(id_bytes, id_ends, int(r), int(r) + 1)[0] for r in rows[:10])
    lens = np.diff(id_ends.astype(np.int64), prepend=0)
    if (lens > MAX_ID_BYTES).any():
        raise StoreError(f"utterance ids longer than {MAX_ID_BYTES} bytes: {named(np.flatnonzero(lens > MAX_ID_BYTES))}")
    if (frames <= 0).any():
        raise StoreError(f"utterances with no frames (zero or negative count) cannot be stored: "
                         f"{named(np.flatnonzero(frames <= 0))}")
    if (frames > shard_frames).any():
        raise StoreError(f"utterances longer than shard_frames={shard_frames}: {named(np.flatnonzero(frames > shard_frames))}"
                         f" (longest has {int(frames.max())} frames); choose shard_frames >= {int(frames.max())}")
    hashes = id_hashes(id_bytes, id_ends, 64)
    dup = duplicate_problems(id_bytes, id_ends, hashes)
    if dup:
        raise StoreError(dup[0])
    cs = np.cumsum(frames)
    starts, i, n = [0], 0, len(frames)
    while i < n:
        i = int(np.searchsorted(cs, (cs[i - 1] if i else 0) + shard_frames, "right"))
        starts.append(i)
    plan = ShardPlan.from_columns(shard_frames, id_bytes, id_ends, frames, np.asarray(starts, np.int64))
    plan._hash64 = hashes
    return plan


def column_problems(shard_frames: int, id_bytes, id_ends, num_frames, shard_starts, offsets) -> list[str]:
    """layout_problems for a v2 index (columns): ids, frames, shards contiguous from their start, unique ids."""
    from .hashindex import MAX_ID_BYTES, duplicate_problems, id_hashes
    out = []
    ends = id_ends.astype(np.int64)
    lens = np.diff(ends, prepend=0)
    if len(ends) and (ends[-1] != len(id_bytes) or (lens < 1).any() or (lens > MAX_ID_BYTES).any()):
        return [f"id_ends are not increasing ends of 1..{MAX_ID_BYTES}-byte ids covering id_bytes"]
    try:
        bytes(id_bytes).decode("utf-8")
    except UnicodeDecodeError as e:
        return [f"id_bytes are not valid UTF-8 ({e})"]
    if (num_frames <= 0).any() or (num_frames > shard_frames).any():
        out.append("utterances with no frames or more than shard_frames")
    per = np.diff(shard_starts)
    shard = np.repeat(np.arange(len(per), dtype=np.int64), per)
    before = np.cumsum(num_frames) - num_frames
    want = before - np.repeat(before[shard_starts[:-1]], per) + shard * shard_frames
    bad = np.flatnonzero(want != offsets)
    if len(bad):
        out.append(f"utterances not contiguous from their shard start: "
                   f"{name_some(_decode_ids(id_bytes, id_ends, int(r), int(r) + 1)[0] for r in bad[:10])}")
    ends_sh = np.add.reduceat(num_frames, shard_starts[:-1]) if len(per) else np.empty(0)
    if (ends_sh > shard_frames).any():
        out.append(f"shards holding more than shard_frames: {name_some(np.flatnonzero(ends_sh > shard_frames))}")
    out += duplicate_problems(id_bytes, id_ends, id_hashes(id_bytes, id_ends, 64))
    return out
