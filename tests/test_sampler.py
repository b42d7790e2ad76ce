"""The student's training batch sampler: batches mixed across a window of shards, drawn anew every epoch."""
import numpy as np
import pytest

from distill.data.sampler import ShardBucketSampler, ShardMixSampler


def _librispeech_like(num_speakers=40, per_speaker=30, utts_per_shard=25, seed=0):
    """Durations, speaker and shard per utterance for a corpus sorted by speaker whose store shards were filled in
    manifest order (how extraction lays out LibriSpeech)."""
    rng = np.random.default_rng(seed)
    n = num_speakers * per_speaker
    durations = rng.uniform(1.0, 16.0, n)
    speakers = np.repeat(np.arange(num_speakers), per_speaker)
    shards = np.arange(n) // utts_per_shard
    return durations, speakers, shards


def _flat(batches):
    return sorted(i for b in batches for i in b)


def test_every_utterance_once_per_epoch_and_reproducible():
    dur, _, shards = _librispeech_like()
    s = ShardMixSampler(dur, shards, max_seconds=60, shards_per_window=4, seed=7)
    again = ShardMixSampler(dur, shards, max_seconds=60, shards_per_window=4, seed=7)
    for epoch in range(3):
        batches = s.epoch_batches(epoch)
        assert _flat(batches) == list(range(len(dur)))
        assert again.epoch_batches(epoch) == batches
        s.set_epoch(epoch)
        assert list(s) == batches and len(s) == len(batches)
    other_seed = ShardMixSampler(dur, shards, max_seconds=60, shards_per_window=4, seed=8)
    assert other_seed.epoch_batches(0) != s.epoch_batches(0)


def test_padded_size_within_cap_and_long_utterances_alone():
    dur, _, shards = _librispeech_like()
    dur = dur.copy()
    dur[[5, 300]] = [75.0, 61.0]  # longer than a whole batch
    s = ShardMixSampler(dur, shards, max_seconds=60, seed=1)
    for epoch in range(2):
        batches = s.epoch_batches(epoch)
        assert _flat(batches) == list(range(len(dur)))
        for b in batches:
            assert dur[b].max() * len(b) <= 60 or len(b) == 1, (b, dur[b])
        assert [5] in batches and [300] in batches
    # sorting by (jittered) duration keeps padding low: as little as the per-shard sampler's sorted batches, with
    # uniform 1-16 s durations and 100-utterance windows
    def audio_share(batches):
        return dur.sum() / sum(dur[b].max() * len(b) for b in batches)

    assert audio_share(s.epoch_batches(0)) > 0.88
    assert audio_share(s.epoch_batches(0)) >= audio_share(list(ShardBucketSampler(dur, shards, max_seconds=60)))


def test_a_window_of_shards_is_read_at_a_time():
    dur, _, shards = _librispeech_like()
    G = 3
    s = ShardMixSampler(dur, shards, max_seconds=60, shards_per_window=G, seed=2)
    batches = s.epoch_batches(0)
    per_batch = [set(shards[b].tolist()) for b in batches]
    assert max(map(len, per_batch)) <= G
    assert np.mean([len(x) for x in per_batch]) > 1.5  # batches do mix shards
    # a shard is read only while its window is: every batch between a shard's first and last one belongs to the
    # same window of at most G shards
    for sh in np.unique(shards):
        pos = [k for k, x in enumerate(per_batch) if sh in x]
        assert len(set().union(*per_batch[pos[0]:pos[-1] + 1])) <= G


def test_batches_are_drawn_anew_every_epoch():
    dur, _, shards = _librispeech_like()
    s = ShardMixSampler(dur, shards, max_seconds=60, seed=3)
    e0 = {frozenset(b) for b in s.epoch_batches(0)}
    e1 = {frozenset(b) for b in s.epoch_batches(1)}
    assert len(e0 & e1) < 0.1 * len(e0)  # not the same batches reordered
    fixed = ShardBucketSampler(dur, shards, max_seconds=60, seed=3)
    first = {frozenset(b) for b in fixed}
    fixed.set_epoch(1)
    assert {frozenset(b) for b in fixed} == first  # the evaluation sampler's batches are fixed


def test_batches_mix_speakers_of_a_manifest_ordered_store():
    dur, speakers, shards = _librispeech_like()
    mixed = ShardMixSampler(dur, shards, max_seconds=60, shards_per_window=4, seed=0).epoch_batches(0)
    per_shard = list(ShardBucketSampler(dur, shards, max_seconds=60, seed=0))

    def speakers_per_batch(batches):
        return np.mean([len(set(speakers[b].tolist())) for b in batches])

    assert speakers_per_batch(per_shard) <= 2.0  # one shard holds 25 utterances: one or two speakers
    assert speakers_per_batch(mixed) > 1.5 * speakers_per_batch(per_shard)


def test_without_shards_everything_is_one_pool():
    dur, speakers, _ = _librispeech_like()
    s = ShardMixSampler(dur, None, max_seconds=60, seed=4)
    batches = s.epoch_batches(0)
    assert _flat(batches) == list(range(len(dur)))
    # utterances from anywhere in the manifest share batches: the speakers of a batch are spread over the corpus
    spread = np.mean([np.ptp(speakers[b]) for b in batches if len(b) > 1])
    assert spread > 10


def test_set_epoch_skip_resumes_mid_epoch():
    dur, _, shards = _librispeech_like()
    s = ShardMixSampler(dur, shards, max_seconds=60, seed=5)
    full = s.epoch_batches(2)
    s.set_epoch(2, skip=7)
    assert list(s) == full[7:]
    assert len(s) == len(full)  # len is the whole epoch (progress bars and schedules count from its start)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="max_seconds"):
        ShardMixSampler([1.0, 2.0], max_seconds=0)
    with pytest.raises(ValueError, match="shards_per_window"):
        ShardMixSampler([1.0, 2.0], shards_per_window=0)
    with pytest.raises(ValueError, match="duration_jitter"):
        ShardMixSampler([1.0, 2.0], duration_jitter=1.0)
    with pytest.raises(ValueError, match="3 shard numbers for 2 durations"):
        ShardMixSampler([1.0, 2.0], [0, 0, 1])
