"""Duration-bucketed batches: one batching rule for the teacher and the student trainers.

Batches hold utterances of similar length and are capped by padded size (count x longest), so little compute is
spent on padding; optional groups (label-store shards) keep a batch's reads inside one object.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["bucket_batches", "ShardBucketSampler"]


def bucket_batches(lengths: Sequence[float], max_total: float, rng: np.random.Generator | None = None,
                   num_buckets: int = 1, groups: Sequence[int] | None = None) -> list[list[int]]:
    """Sort by (group, length), cut into `num_buckets` runs of about equal total length, shuffle inside each run
    (rng), then fill batches while the padded size (count x longest) stays within `max_total`; a batch never spans
    two groups, and an item longer than `max_total` is a batch on its own. Batch order is shuffled too (rng=None:
    sorted, unshuffled). Groups are for unshuffled batching (the student's shard grouping): with an rng, shuffling
    inside a run interleaves groups and the batches get small."""
    key = [0] * len(lengths) if groups is None else [int(g) for g in groups]
    order = sorted(range(len(lengths)), key=lambda i: (key[i], lengths[i], i))
    total = float(sum(lengths)) or 1.0
    runs, cur, acc = [], [], 0.0
    for i in order:
        cur.append(i)
        acc += lengths[i]
        if acc >= total * (len(runs) + 1) / num_buckets and len(runs) < num_buckets - 1:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    batches = []
    for run in runs:
        if rng is not None:
            rng.shuffle(run)
        b, longest = [], 0
        for i in run:
            m = max(longest, lengths[i])
            if b and (m * (len(b) + 1) > max_total or key[i] != key[b[-1]]):
                batches.append(b)
                b, m = [], lengths[i]
            b.append(i)
            longest = m
        if b:
            batches.append(b)
    if rng is not None:
        rng.shuffle(batches)
    return batches


class ShardBucketSampler(Sampler):
    """The student's batch sampler: `bucket_batches` over durations (seconds) grouped by store shard, so one batch
    mostly reads one shard (coalesced object-store requests) and pads little; batch order is shuffled per epoch
    with a seed (`set_epoch`)."""

    def __init__(self, durations, shards=None, *, max_seconds: float = 60.0, shuffle: bool = True,
                 seed: int = 0, bucket_by_shard: bool = True):
        self.durations = np.asarray(durations, dtype=np.float64)
        self.shards = np.zeros(len(self.durations), np.int64) if shards is None else np.asarray(shards)
        self.max_seconds = max_seconds
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self._batches = bucket_batches(self.durations.tolist(), max_seconds,
                                       groups=self.shards.tolist() if bucket_by_shard else None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        idx = np.arange(len(self._batches))
        if self.shuffle:
            idx = np.random.default_rng(self.seed + self.epoch).permutation(len(self._batches))
        for j in idx:
            yield list(self._batches[j])

    def __len__(self) -> int:
        return len(self._batches)
