"""Duration-bucketed batches: one batching rule for the teacher and the student trainers.

Batches hold utterances of similar length and are capped by padded size (count x longest), so little compute is
spent on padding. The student trains with `ShardMixSampler` (batches mixed across a window of a few label-store
shards, drawn anew every epoch) and evaluates with `ShardBucketSampler` (fixed, unshuffled batches).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["bucket_batches", "ShardBucketSampler", "ShardMixSampler", "make_train_sampler"]


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
    """Fixed batches: `bucket_batches` over durations (seconds), grouped by store shard unless bucket_by_shard is
    False; batch order is shuffled per epoch with a seed (`set_epoch`) when `shuffle`. Used unshuffled for
    evaluation. Not for training on a corpus stored in manifest order: a batch never leaves its shard (few speakers
    per batch) and the same batches recur every epoch; training uses `ShardMixSampler`."""

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


class ShardMixSampler(Sampler):
    """The student's training batch sampler: batches that mix speakers and change every epoch, while the
    DataLoader reads few label-store shards at a time.

    Shards are filled in manifest order, so on a corpus sorted by speaker (LibriSpeech) one shard holds a handful of
    speakers: batching inside one shard (`ShardBucketSampler`) caps a batch's speakers at those of its shard, and
    the same batches recur every epoch. Here, every epoch (a generator seeded with (seed, epoch)) the shards are
    shuffled and taken `shards_per_window` at a time; a window's utterances are pooled, sorted by duration times a
    random factor in 1 +- `duration_jitter` (fine duration buckets whose edges move every epoch; +-2% pads about as
    little as plain sorting, see bench/loader_throughput.py --samplers) and cut in that order into batches whose
    padded size (count x longest) stays within `max_seconds`; the window's batches are shuffled and the windows
    follow each other. So a batch spans at most `shards_per_window` shards, consecutive batches share their window
    (all DataLoader workers read the same few shards at a time, each batch with one `CIStore.get_many`), and the
    batches themselves are drawn anew each epoch. The idea is lhotse's DynamicBucketingSampler over shuffled
    shards, with one window as its buffer.

    `shards=None` (no label store) pools everything into one window. `epoch_batches(epoch)` is the epoch's whole,
    reproducible batch list (a distributed wrapper takes every world_size-th one); `set_epoch(epoch, skip)` picks the
    epoch and how many of its first batches to skip (resuming mid-epoch). `len()` is the number of batches of the
    whole current epoch (it varies a little between epochs: each window ends with a partial batch); iteration
    yields the last `len() - skip` of them.
    """

    def __init__(self, durations, shards=None, *, max_seconds: float = 60.0, shards_per_window: int = 4,
                 duration_jitter: float = 0.02, seed: int = 0):
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        if shards_per_window < 1:
            raise ValueError(f"shards_per_window must be >= 1, got {shards_per_window}")
        if not 0 <= duration_jitter < 1:
            raise ValueError(f"duration_jitter must be in [0, 1), got {duration_jitter}")
        self.durations = np.asarray(durations, dtype=np.float64)
        self.shards = np.zeros(len(self.durations), np.int64) if shards is None else np.asarray(shards, np.int64)
        if self.shards.shape != self.durations.shape:
            raise ValueError(f"{len(self.shards)} shard numbers for {len(self.durations)} durations")
        self.max_seconds = float(max_seconds)
        self.shards_per_window = int(shards_per_window)
        self.duration_jitter = float(duration_jitter)
        self.seed = int(seed)
        self.epoch, self.skip = 0, 0
        order = np.argsort(self.shards, kind="stable")
        cuts = np.flatnonzero(np.diff(self.shards[order])) + 1
        self._by_shard = np.split(order, cuts) if len(order) else []
        self._cached: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch` in order (indices into `durations`); the same for the same (seed, epoch)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, int(epoch)])
        order = rng.permutation(len(self._by_shard))
        batches: list[list[int]] = []
        for w in range(0, len(order), self.shards_per_window):
            pool = np.concatenate([self._by_shard[s] for s in order[w:w + self.shards_per_window]])
            key = self.durations[pool] * (1.0 + self.duration_jitter * rng.uniform(-1.0, 1.0, len(pool)))
            window = self._fill(pool[np.argsort(key, kind="stable")])
            batches += [window[j] for j in rng.permutation(len(window))]
        self._cached = (epoch, batches)
        return batches

    def _fill(self, items: np.ndarray) -> list[list[int]]:
        """Greedy batches in the given order, padded size (count x longest) within max_seconds; an utterance
        longer than that is a batch of its own."""
        out, cur, longest = [], [], 0.0
        for i in items.tolist():
            m = max(longest, self.durations[i])
            if cur and m * (len(cur) + 1) > self.max_seconds:
                out.append(cur)
                cur, m = [], self.durations[i]
            cur.append(i)
            longest = m
        if cur:
            out.append(cur)
        return out

    def __iter__(self):
        for b in self.epoch_batches(self.epoch)[self.skip:]:
            yield list(b)

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch))

def make_train_sampler(dataset, *, max_seconds: float, seed: int, shards_per_window: int = 4) -> ShardMixSampler:
    """The trainer's batch sampler over a KDDataset: durations and label-store shards from the dataset."""
    return ShardMixSampler(dataset.durations(), dataset.shard_of(), max_seconds=max_seconds,
                           shards_per_window=shards_per_window, seed=seed)
