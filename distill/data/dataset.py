"""Student training data: features, tokens and KD labels per utterance, streamed from a label store (or, for
on-the-fly KD, the waveforms the trainer's online teacher labels).

The store handle is opened lazily inside each DataLoader worker (CIStore pickles as URL + options), because an
fsspec/S3-backed zarr array opened before fork is bound to the parent's event loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from ci_store import open_store
from ci_store.errors import StoreError
from distill.data.alignment import IGNORE, align_labels, stack_factor, subsampled_length
from distill.data.audio import read_audio
from distill.data.fbank import compute_fbank
from distill.data.manifest import Utterance, load_manifest

FBANK_RATE = 100.0  # fbank frames per second (10 ms shift)


def student_frames(num_fbank: int, subsampling: int) -> int:
    """Encoder frames after the student's conv subsampling."""
    return int(subsampled_length(num_fbank, subsampling))


class LabelsMissingError(StoreError, KeyError):
    """A manifest utterance has no entry in the label store: a KeyError like ci_store's own lookups, and a
    StoreError (the store does not belong to this manifest) so the CLI reports it as one."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass
class Example:
    id: str
    feats: np.ndarray  # [T_fbank, 80]
    tokens: list[int]
    labels: np.ndarray | None  # [T_student, k*C] int64 (codes) or float32 (floats)
    label_mask: np.ndarray | None  # [T_student, k] bool
    text: str
    wave: np.ndarray | None = None  # the waveform at the online teacher's rate (KDDataset(audio_rate=...))


class KDDataset(Dataset):
    """Manifest utterances with fbank features, token ids and (optionally) aligned teacher labels.

    `labels` is the URL of a CI store (kind "codes") or a float-label store (kind "float"); None for no-KD runs.
    Utterances whose extraction failed in the store are dropped up front (listed in `self.dropped`).
    `feature_cache`: None, a `distill.data.feature_cache.FeatureCache` (bounded; training) or a dict (unbounded;
    only for small sets such as a dev set evaluated in-process).
    `audio_rate`: also hand each example's waveform at this rate (`Example.wave`, `batch["waves"]`), for a teacher
    that labels batches on the fly (distill.student.online_teacher) instead of a label store.
    """

    def __init__(self, manifest, tokenizer, *, labels: str | None = None, storage_options: dict | None = None,
                 subsampling: int = 4, sample_rate: int = 16000, num_mel_bins: int = 80,
                 feature_cache=None, audio_rate: int | None = None):
        self.utts: list[Utterance] = load_manifest(manifest) if isinstance(manifest, str) else list(manifest)
        self.tokenizer = tokenizer
        self.labels_url = labels
        self.storage_options = storage_options
        self.subsampling = subsampling
        self.sample_rate = sample_rate
        self.num_mel_bins = num_mel_bins
        self.feature_cache = feature_cache
        self.audio_rate = audio_rate
        self._store = None
        self.dropped: dict[str, str] = {}
        self.k = None
        self.kind = None
        if labels is not None:
            store = self.store
            self.kind = store.kind
            self.k = stack_factor(store.frame_rate, FBANK_RATE / subsampling)
            failures = store.failures()
            keep = []
            for u in self.utts:
                if u.id not in store:
                    raise LabelsMissingError(f"utterance {u.id!r} of the manifest is not in label store {labels}; "
                                             f"give the store extracted from this manifest")
                if u.id in failures:
                    self.dropped[u.id] = failures[u.id]
                else:
                    keep.append(u)
            self.utts = keep
            self.label_width = store.num_codebooks if store.kind == "codes" else store.dim
            self.codebook_size = store.codebook_size if store.kind == "codes" else None
            self.frame_rate = store.frame_rate
            if store.kind == "float":
                self.label_mean, self.label_std = float_label_stats(store, [u.id for u in self.utts])
        self._store = None  # reopened lazily per worker process

    @property
    def store(self):
        if self._store is None and self.labels_url is not None:
            self._store = open_store(self.labels_url, mode="r", storage_options=self.storage_options)
        return self._store

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    def __len__(self) -> int:
        return len(self.utts)

    def num_samples(self, i: int) -> int:
        return self.utts[i].num_samples_at(self.sample_rate)

    def durations(self) -> np.ndarray:
        return np.array([self.num_samples(i) / self.sample_rate for i in range(len(self))])

    def shard_of(self) -> np.ndarray:
        """Shard index per utterance (for read locality); zeros without labels."""
        if self.labels_url is None:
            return np.zeros(len(self), dtype=np.int64)
        return np.array([self.store.shard_of(u.id) for u in self.utts], dtype=np.int64)

    def features(self, utt: Utterance, wave: np.ndarray | None = None) -> np.ndarray:
        """fbank of `utt` (`wave`: its waveform at `sample_rate`, if already read)."""
        cache = self.feature_cache
        if cache is not None:
            hit = cache.get(utt.id)
            if hit is not None:
                return hit
        if wave is None:
            wave = read_audio(utt, self.sample_rate, storage_options=self.storage_options)
        feats = compute_fbank(wave, self.sample_rate, self.num_mel_bins)
        if cache is not None:
            cache[utt.id] = feats
        return feats

    def __getitem__(self, i: int) -> Example:
        utt = self.utts[i]
        return self._example(utt, self.store[utt.id] if self.labels_url is not None else None)

    def __getitems__(self, indices) -> list[Example]:
        """A batch's examples (torch's DataLoader calls this with a batch sampler's indices): the labels come from
        one `get_many` (reads grouped per shard into few concurrent requests), the features per utterance."""
        utts = [self.utts[i] for i in indices]
        raws = self.store.get_many([u.id for u in utts]) if self.labels_url is not None else [None] * len(utts)
        return [self._example(u, raw) for u, raw in zip(utts, raws)]

    def _example(self, utt: Utterance, raw: np.ndarray | None) -> Example:
        wave = None
        if self.audio_rate is not None:
            wave = read_audio(utt, self.audio_rate, storage_options=self.storage_options)
        feats = self.features(utt, wave if self.audio_rate == self.sample_rate else None)
        tokens = self.tokenizer.encode(utt.text or "")
        labels = mask = None
        if raw is not None:
            if self.kind == "float":  # standardised per dim, so l1/l2 losses are on a comparable scale
                raw = (raw.astype(np.float32) - self.label_mean) / self.label_std
            labels, mask = align_labels(raw, student_frames(feats.shape[0], self.subsampling), self.k,
                                        utt_id=utt.id)
        return Example(utt.id, feats, tokens, labels, mask, utt.text or "", wave)


def float_label_stats(store, ids: list[str], max_frames: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of float labels over (up to max_frames of) the given utterances, in id order.

    Regression KD targets are standardised with these: raw teacher activations have per-dimension scales that
    differ by orders of magnitude, which would make l1/l2 losses (and their kd_scale) arbitrary.
    """
    total, s1, s2 = 0, None, None
    order = sorted(ids)
    for at in range(0, len(order), 64):  # one get_many per 64 utterances (reads grouped per shard)
        for raw in store.get_many(order[at:at + 64]):
            x = raw.astype(np.float64)
            s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
            s2 = (x * x).sum(0) if s2 is None else s2 + (x * x).sum(0)
            total += x.shape[0]
            if total >= max_frames:
                break
        if total >= max_frames:
            break
    mean = s1 / total
    std = np.sqrt(np.maximum(s2 / total - mean * mean, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3 * max(float(std.max()), 1e-12)).astype(np.float32)


def pad_labels(aligned: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of aligned (labels [T_b, k*W], mask [T_b, k]) pairs, padded to the longest T: labels int64 padded
    with IGNORE (codes) or float32 padded with 0 (floats), mask bool padded with False. One helper for labels read
    from a store (`collate`) and labels made on the fly (`OnlineTeacher.batch_labels`), so both pad alike."""
    B = len(aligned)
    T = max(lab.shape[0] for lab, _ in aligned)
    W = aligned[0][0].shape[1]
    k = aligned[0][1].shape[1]
    is_codes = np.issubdtype(aligned[0][0].dtype, np.integer)
    labels = torch.full((B, T, W), IGNORE if is_codes else 0.0, dtype=torch.int64 if is_codes else torch.float32)
    mask = torch.zeros(B, T, k, dtype=torch.bool)
    for b, (lab, m) in enumerate(aligned):
        labels[b, : lab.shape[0]] = torch.from_numpy(lab)
        mask[b, : m.shape[0]] = torch.from_numpy(m)
    return labels, mask


def collate(examples: list[Example]) -> dict:
    """Pad a batch: feats with 0, tokens with 0 (blank; lengths say where they end), labels (`pad_labels`);
    waveforms (KDDataset(audio_rate=...)) stay a list, unpadded."""
    B = len(examples)
    feat_lens = torch.tensor([e.feats.shape[0] for e in examples], dtype=torch.int64)
    feats = torch.zeros(B, int(feat_lens.max()), examples[0].feats.shape[1], dtype=torch.float32)
    tok_lens = torch.tensor([len(e.tokens) for e in examples], dtype=torch.int64)
    tokens = torch.zeros(B, max(1, int(tok_lens.max())), dtype=torch.int64)
    for b, e in enumerate(examples):
        feats[b, : e.feats.shape[0]] = torch.from_numpy(e.feats)
        tokens[b, : len(e.tokens)] = torch.tensor(e.tokens, dtype=torch.int64)
    batch = {"ids": [e.id for e in examples], "texts": [e.text for e in examples], "feats": feats,
             "feat_lens": feat_lens, "tokens": tokens, "token_lens": tok_lens}
    if examples[0].labels is not None:
        batch["labels"], batch["label_mask"] = pad_labels([(e.labels, e.label_mask) for e in examples])
    if examples[0].wave is not None:
        batch["waves"] = [e.wave for e in examples]
    return batch
