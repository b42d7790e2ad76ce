"""Frame alignment between teacher labels and the student encoder, made explicit.

The teacher emits frames at `teacher_rate` (e.g. HuBERT: 50 Hz); the student encoder runs at
`student_rate` (100 Hz fbank subsampled x4 = 25 Hz). Each student frame predicts k = teacher_rate /
student_rate consecutive teacher frames ("stacking"). Teacher and student frame counts rarely agree exactly
(different conv front ends round differently), so a mismatch of a few teacher frames is padded (with
IGNORE for codes, masked for floats) or truncated; a larger one means the labels belong to other audio or
another frame rate, and is refused.
"""
from __future__ import annotations

import math

import numpy as np

IGNORE = -100  # cross-entropy ignore_index for padded CI labels


class AlignmentError(ValueError):
    """Teacher labels and student frames disagree by more than the tolerated few frames."""


def stack_factor(teacher_rate: float, student_rate: float) -> int:
    """k teacher frames per student frame; refuses rates that are not an integer multiple."""
    k = teacher_rate / student_rate
    if k < 1 or abs(k - round(k)) > 1e-6:
        raise AlignmentError(
            f"teacher frame rate {teacher_rate} Hz is not an integer multiple of the student rate "
            f"{student_rate} Hz; cannot stack teacher frames per student frame")
    return int(round(k))


def default_tolerance(k: int) -> int:
    """Teacher frames of mismatch we pad/truncate silently: a couple of student frames' worth."""
    return max(4, 2 * k)


def align_labels(labels: np.ndarray, num_student_frames: int, k: int, *, utt_id: str = "?",
                 tolerance: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack teacher frames [T_t, C] into [num_student_frames, k*C] plus a bool validity mask [num_student_frames, k].

    Missing teacher frames at the end are filled with IGNORE (integer labels) or 0.0 (float labels) and
    marked invalid in the mask; surplus teacher frames at the end are dropped.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise AlignmentError(f"utterance {utt_id}: labels must be 2-D [frames, width], got shape {labels.shape}")
    need = num_student_frames * k
    have = labels.shape[0]
    tol = default_tolerance(k) if tolerance is None else tolerance
    if abs(have - need) > tol:
        raise AlignmentError(
            f"utterance {utt_id}: {have} teacher frames vs {num_student_frames} student frames x {k} = {need} "
            f"(mismatch {have - need:+d} > tolerance {tol}); labels do not match this audio or frame rate")
    width = labels.shape[1]
    if np.issubdtype(labels.dtype, np.integer):
        out = np.full((need, width), IGNORE, dtype=np.int64)
    else:
        out = np.zeros((need, width), dtype=np.float32)
    n = min(have, need)
    out[:n] = labels[:n]
    valid = np.zeros(need, dtype=bool)
    valid[:n] = True
    return out.reshape(num_student_frames, k * width), valid.reshape(num_student_frames, k)


def subsampled_length(num_frames, subsampling: int = 4):
    """Student encoder frames for `num_frames` fbank frames: ceil(num_frames / subsampling) (int or integer tensor).

    The student's conv front end (distill.student.model.Conv2dSubsampling) produces exactly this many frames; labels
    are aligned to it here, so the data layer needs no import of the model."""
    n = num_frames
    for _ in range(int(math.log2(subsampling))):
        n = (n + 1) // 2  # conv kernel 3, stride 2, padding 1
    return n
