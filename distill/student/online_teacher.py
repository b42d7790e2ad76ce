"""On-the-fly KD labels: the teacher (and, for MVQ, the quantizer) run inside the training loop, every batch.

This is the baseline a label store is measured against (the paper's third claim: stored labels avoid running the
teacher every epoch). The labels are made exactly as extraction makes them, so the same training follows from
either source: each utterance is embedded alone (no padding, bit-reproducible), codes come from the quantizer's
fixed-block encoder (independent of how frames are grouped), float labels are standardised with per-dimension
statistics taken over the same utterances in the same order as `distill.data.dataset.float_label_stats` takes them
from a float32 store, and both are stacked onto the student's frames by `distill.data.alignment.align_labels`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from distill.data.alignment import align_labels, stack_factor
from distill.data.dataset import FBANK_RATE, pad_labels, student_frames

__all__ = ["OnlineTeacher", "OnlineTeacherSpec", "load_online_teacher"]


@dataclass(frozen=True)
class OnlineTeacherSpec:
    """What train-student's --online-teacher options name: the teacher checkpoint (path, URL or Whisper alias),
    its layer, format and weight dtype, and for MVQ-KD the quantizer file."""
    teacher: str
    layer: int
    quantizer: str | None = None
    kind: str | None = None  # load_teacher(kind=): None detects the format from the files
    dtype: str = "float32"  # the teacher's weights (frames come back float32)


class OnlineTeacher:
    """A teacher (+ optional quantizer) that labels training batches as they are drawn.

    kind "codes" (with a quantizer: MVQ-KD labels) or "float" (without: l1/l2 labels). `label_width`,
    `codebook_size` and `k` (teacher frames per student frame) mean what they mean on `KDDataset`.
    """

    def __init__(self, teacher, quantizer=None, *, subsampling: int = 4):
        self.teacher = teacher
        self.quantizer = quantizer
        self.subsampling = subsampling
        self.kind = "codes" if quantizer is not None else "float"
        if quantizer is not None and quantizer.dim != teacher.dim:
            raise ValueError(f"quantizer is for {quantizer.dim}-dim frames but teacher {teacher.name!r} layer "
                             f"{teacher.layer} gives {teacher.dim}-dim frames")
        self.k = stack_factor(teacher.frame_rate, FBANK_RATE / subsampling)
        self.label_width = quantizer.num_codebooks if quantizer is not None else teacher.dim
        self.codebook_size = quantizer.codebook_size if quantizer is not None else None
        self.label_mean: np.ndarray | None = None
        self.label_std: np.ndarray | None = None
        self.seconds = 0.0  # wall time spent labelling (teacher + quantizer), for the speed comparison

    def provenance(self, spec: OnlineTeacherSpec | None = None) -> dict:
        """What the labels depend on, for a run's config.json: a resumed run must be labelled by the same teacher
        bytes, layer, weight dtype and quantizer (the path may move; the checkpoint sha256 may not)."""
        q = self.quantizer
        return {"teacher": spec.teacher if spec else self.teacher.source, "name": self.teacher.name,
                "checkpoint_sha256": self.teacher.checkpoint_sha256, "layer": self.teacher.layer,
                "teacher_dtype": self.teacher.dtype, "quantizer": spec.quantizer if spec else None,
                "quantizer_id": q.quantizer_id if q is not None else None}

    @property
    def sample_rate(self) -> int:
        return self.teacher.sample_rate

    def frames(self, wave: np.ndarray) -> torch.Tensor:
        """Teacher frames [T, dim] float32 of one utterance, embedded alone, on the teacher's device."""
        with torch.inference_mode():
            w = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None]
            out, lens = self.teacher.embed(w, torch.tensor([w.shape[1]]))
        return out[0, : int(lens[0])]

    def fit_stats(self, ids: Sequence[str], read_wave: Callable[[str], np.ndarray],
                  max_frames: int = 200_000) -> None:
        """Per-dimension mean/std of the float labels (kind "float" only), over utterances in sorted id order until
        `max_frames`: the statistics `float_label_stats` takes from a float32 store of the same utterances."""
        if self.kind != "float":
            return
        total, s1, s2 = 0, None, None
        for uid in sorted(ids):
            x = self.frames(read_wave(uid)).cpu().numpy().astype(np.float64)
            s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
            s2 = (x * x).sum(0) if s2 is None else s2 + (x * x).sum(0)
            total += x.shape[0]
            if total >= max_frames:
                break
        if not total:
            raise ValueError("online teacher: no frames to take label statistics from")
        mean = s1 / total
        std = np.sqrt(np.maximum(s2 / total - mean * mean, 0.0))
        self.label_mean = mean.astype(np.float32)
        self.label_std = np.maximum(std, 1e-3 * max(float(std.max()), 1e-12)).astype(np.float32)

    def utterance_labels(self, wave: np.ndarray) -> np.ndarray:
        """One utterance's labels before alignment: codes [T, N] or standardised floats [T, dim] (numpy)."""
        emb = self.frames(wave)
        if self.quantizer is not None:
            return self.quantizer.encode_torch(emb).cpu().numpy()
        if self.label_mean is None:
            raise RuntimeError("online teacher: fit_stats() must run before float labels are made")
        return (emb.cpu().numpy() - self.label_mean) / self.label_std

    def batch_labels(self, waves: Sequence[np.ndarray], num_fbank: Sequence[int], ids: Sequence[str]):
        """Labels for a collated batch: (labels [B, T, k*W] int64 padded with IGNORE or float32 padded with 0,
        mask [B, T, k] bool), T the longest student frame count - what `collate` puts in a batch from a store."""
        t0 = time.perf_counter()
        aligned = [align_labels(self.utterance_labels(w), student_frames(int(n), self.subsampling), self.k,
                                utt_id=uid) for w, n, uid in zip(waves, num_fbank, ids)]
        labels, mask = pad_labels(aligned)
        self.seconds += time.perf_counter() - t0
        return labels, mask


def load_online_teacher(spec: OnlineTeacherSpec, *, device="cpu", storage_options: dict | None = None,
                        subsampling: int = 4) -> OnlineTeacher:
    """The teacher (on `device`, in `spec.dtype`) and quantizer a spec names, ready to label batches."""
    from distill.codec.quantizer import MultiCodebookQuantizer
    from distill.teachers import load_teacher

    teacher = load_teacher(spec.teacher, layer=spec.layer, device=device, storage_options=storage_options,
                           kind=spec.kind, dtype=spec.dtype)
    quantizer = None
    if spec.quantizer is not None:
        quantizer = MultiCodebookQuantizer.load(spec.quantizer, device=device, storage_options=storage_options)
    return OnlineTeacher(teacher, quantizer, subsampling=subsampling)
