"""Planning an extraction: exact frame counts per utterance, then CI shards with float-label shards nested inside.

The layout depends only on the manifest's ids and exact sample counts, so any run over the same manifest plans the
same shards (the basis of resume and of byte-identical stores).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ci_store import ShardPlan, plan_shards
from ci_store.errors import duplicate_ids, name_some
from ci_store.format import default_shard_frames
from distill.data.audio import AudioError, probe_missing
from distill.data.manifest import Utterance


class ExtractionError(RuntimeError):
    """The job cannot start (bad manifest, incompatible store, ...); raised before any shard is written."""


PROBE_THREADS = 16  # header reads are latency-bound (object stores: one or two ranged GETs per file)


def probe_all(utts: list[Utterance], storage_options: dict | None, *, threads: int = PROBE_THREADS,
              progress: bool = False) -> list[Utterance]:
    """Fill missing sample counts from file headers, `threads` files at a time; unreadable files keep a 0-sample
    placeholder so they still get an index entry and fail (recorded, with the reason) inside their shard task. A
    header that storage keeps failing to serve (transient faults, after probe_utterance's retries) stops planning
    instead: a placeholder would fix a wrong frame count into the store's plan for good."""
    from tqdm.auto import tqdm

    need = [i for i, u in enumerate(utts) if u.num_samples is None or u.sample_rate is None]
    out = list(utts)
    if not need:
        return out
    with tqdm(total=len(need), desc="probe", unit="utt", disable=not progress, dynamic_ncols=True) as bar:
        probed = probe_missing([utts[i] for i in need], storage_options, max_workers=threads,
                               on_error=_unreadable, progress=lambda: bar.update(1))
    for i, u in zip(need, probed):
        out[i] = u
    return out


def _unreadable(utt: Utterance, error: AudioError) -> Utterance:
    if error.transient:
        raise ExtractionError(f"cannot plan the store: {error}; nothing was written, run again once the storage "
                              f"answers") from None
    return dataclasses.replace(utt, num_samples=0, sample_rate=utt.sample_rate or 16000)


def check_unique_ids(utts: list[Utterance]) -> None:
    dups = duplicate_ids(u.id for u in utts)
    if dups:
        raise ExtractionError(f"duplicate utterance ids in the manifest: {name_some(dups)}")


def frame_counts(utts: list[Utterance], teacher) -> list[tuple[str, int]]:
    """Exact teacher frame count of every utterance, from exact sample counts; sorted by id."""
    out = []
    for u in sorted(utts, key=lambda u: u.id):
        n = u.num_samples_at(teacher.sample_rate)
        out.append((u.id, max(0, int(teacher.num_frames(n)))))
    return out


def plan_stores(counts: list[tuple[str, int]], shard_frames: int, float_shard_frames: int | None):
    """CI shards, and float shards nested inside them (so one task owns every object it writes).

    Utterances whose audio is too short for even one teacher frame still get an entry of 1 frame so they
    appear in the index; their extraction is recorded as a failure.
    """
    counts = [(u, max(1, n)) for u, n in counts]
    plan = plan_shards(counts, shard_frames)
    if float_shard_frames is None:
        return plan, None, None
    # a float shard must hold the longest utterance (float shards are sized in bytes, not by the user)
    float_shard_frames = max(float_shard_frames, max(n for _, n in counts))
    groups, nested = [], []
    for sh in plan.shards:
        sub = plan_shards(list(zip(sh.utt_ids, sh.num_frames)), float_shard_frames)
        nested.append(list(range(len(groups), len(groups) + sub.num_shards)))
        groups.extend([list(zip(s.utt_ids, s.num_frames)) for s in sub.shards])
    fplan = ShardPlan.from_groups(groups, float_shard_frames)
    return plan, fplan, nested


def float_layout_frames(dim: int, dtypes: list[str]) -> int:
    """One layout for every float-label store of a run, sized by the store format for the widest dtype."""
    widest = max(dtypes, key=lambda d: np.dtype(d).itemsize)
    return default_shard_frames("float", dim, widest)
