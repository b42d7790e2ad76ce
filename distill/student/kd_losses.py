"""Knowledge-distillation heads on an intermediate student encoder layer, and their losses.

Each student frame predicts `stack_k` consecutive teacher frames (teacher rate / student rate, see
distill.data.alignment), so a head outputs k predictions per student frame:

- `MVQKDHead` (MVQ-KD, Guo et al. 2022): logits for k x num_codebooks codebook indexes (CI), trained with
  cross-entropy; label -100 marks padding. Per teacher frame the loss is the SUM of the codebooks'
  cross-entropies (as icefall's JointCodebookLoss).
- `RegressionKDHead`: k x teacher_dim floats, trained with L1 or L2 against the stacked teacher frames; per
  teacher frame the loss is the MEAN over feature dims.

`kd_loss(student_out, labels, mask, reduction)`: reduction "mean" divides by the number of valid teacher frames,
"sum" leaves it to the caller (the transducer normalises everything per student frame). Frames that are masked
out or labelled -100 contribute nothing, not even NaN: their values are never read into the loss.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "MVQKDHead", "RegressionKDHead", "mvq_kd_loss", "regression_kd_loss", "build_kd_head"]

IGNORE_INDEX = -100


def _teacher_frame_mask(mask: torch.Tensor | None, B: int, T: int, k: int, device) -> torch.Tensor:
    """Normalise a validity mask ([B,T,k] per teacher frame or [B,T] per student frame) to bool [B,T,k]."""
    if mask is None:
        return torch.ones(B, T, k, dtype=torch.bool, device=device)
    mask = mask.to(device=device, dtype=torch.bool)
    if mask.dim() == 2 and tuple(mask.shape) == (B, T):
        return mask[:, :, None].expand(B, T, k)
    if mask.dim() == 3 and tuple(mask.shape) == (B, T, k):
        return mask
    raise ValueError(f"KD mask must be [B={B}, T={T}] or [B, T, k={k}], got {tuple(mask.shape)}")


def _reduce(per_frame_sum: torch.Tensor, num_frames: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return per_frame_sum
    if reduction == "mean":
        return per_frame_sum / num_frames.clamp(min=1)
    raise ValueError(f"KD loss reduction must be 'mean' or 'sum', got {reduction!r}")


def mvq_kd_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of codebook logits [B, T, k, N, K] against CI labels [B, T, k*N] or [B, T, k, N].

    Labels equal to -100, and teacher frames where `mask` is False, are ignored. Per valid teacher frame the
    loss is the sum over the N codebooks; "mean" averages over valid teacher frames.
    """
    if logits.dim() != 5:
        raise ValueError(f"MVQ logits must be [B, T, k, N, K], got {tuple(logits.shape)}")
    B, T, k, N, K = logits.shape
    if labels.dim() == 3 and labels.shape[2] == k * N:
        labels = labels.reshape(B, labels.shape[1], k, N)
    if tuple(labels.shape) != (B, T, k, N):
        raise ValueError(f"CI labels must be [B={B}, T={T}, k*N={k * N}] or [B, T, k={k}, N={N}] to match the "
                         f"student, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point:
        raise ValueError(f"CI labels must be integer codebook indexes, got {labels.dtype}")
    labels = labels.long()
    valid = _teacher_frame_mask(mask, B, T, k, logits.device)[..., None] & (labels != IGNORE_INDEX)
    bad = valid & ((labels < 0) | (labels >= K))
    if bad.any():
        raise ValueError(f"CI labels outside [0, {K}) (codebook_size) at {int(bad.sum())} positions, "
                         f"e.g. value {int(labels[bad][0])}")
    ce = F.cross_entropy(logits.reshape(-1, K).float(), labels.masked_fill(~valid, IGNORE_INDEX).reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="sum")
    num_frames = valid.any(-1).sum()
    return _reduce(ce, num_frames, reduction)


def regression_kd_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                       kind: str = "l1", reduction: str = "mean") -> torch.Tensor:
    """L1/L2 between predictions [B, T, k, D] and stacked teacher frames [B, T, k*D] (or [B, T, k, D]).

    Per valid teacher frame: mean over D of |p - t| (l1) or (p - t)^2 (l2); masked frames contribute nothing.
    """
    if kind not in ("l1", "l2"):
        raise ValueError(f"regression KD kind must be 'l1' or 'l2', got {kind!r}")
    if pred.dim() != 4:
        raise ValueError(f"regression KD predictions must be [B, T, k, D], got {tuple(pred.shape)}")
    B, T, k, D = pred.shape
    if target.dim() == 3 and target.shape[2] == k * D:
        target = target.reshape(B, target.shape[1], k, D)
    if tuple(target.shape) != (B, T, k, D):
        raise ValueError(f"teacher frames must be [B={B}, T={T}, k*D={k * D}] or [B, T, k={k}, D={D}] to match the "
                         f"student, got {tuple(target.shape)}")
    valid = _teacher_frame_mask(mask, B, T, k, pred.device)
    diff = torch.where(valid[..., None], pred.float() - target.to(pred.device).float(), 0.0)
    per = diff.abs() if kind == "l1" else diff.square()
    return _reduce(per.sum() / D, valid.sum(), reduction)


class MVQKDHead(nn.Module):
    """Linear map from a student layer [B, T, d_model] to codebook logits [B, T, k, N, K]."""

    def __init__(self, d_model: int, num_codebooks: int, codebook_size: int, stack_k: int = 1):
        super().__init__()
        if min(num_codebooks, codebook_size, stack_k) < 1:
            raise ValueError(f"MVQKDHead: invalid num_codebooks={num_codebooks}, codebook_size={codebook_size}, "
                             f"stack_k={stack_k}")
        self.num_codebooks, self.codebook_size, self.stack_k = num_codebooks, codebook_size, stack_k
        self.proj = nn.Linear(d_model, stack_k * num_codebooks * codebook_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        B, T, _ = hidden.shape
        return self.proj(hidden).view(B, T, self.stack_k, self.num_codebooks, self.codebook_size)

    def kd_loss(self, student_out: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        return mvq_kd_loss(student_out, labels, mask, reduction)


class RegressionKDHead(nn.Module):
    """Linear map from a student layer [B, T, d_model] to k stacked teacher frames [B, T, k, teacher_dim]."""

    def __init__(self, d_model: int, teacher_dim: int, stack_k: int = 1, kind: str = "l1"):
        super().__init__()
        if kind not in ("l1", "l2"):
            raise ValueError(f"RegressionKDHead: kind must be 'l1' or 'l2', got {kind!r}")
        if min(teacher_dim, stack_k) < 1:
            raise ValueError(f"RegressionKDHead: invalid teacher_dim={teacher_dim}, stack_k={stack_k}")
        self.teacher_dim, self.stack_k, self.kind = teacher_dim, stack_k, kind
        self.proj = nn.Linear(d_model, stack_k * teacher_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        B, T, _ = hidden.shape
        return self.proj(hidden).view(B, T, self.stack_k, self.teacher_dim)

    def kd_loss(self, student_out: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        return regression_kd_loss(student_out, labels, mask, self.kind, reduction)


def build_kd_head(kd_type: str, d_model: int, *, stack_k: int, num_codebooks: int, codebook_size: int,
                  teacher_dim: int) -> nn.Module | None:
    """The head for `kd_type` in {"none", "mvq", "l1", "l2"} (None for "none")."""
    if kd_type == "none":
        return None
    if kd_type == "mvq":
        return MVQKDHead(d_model, num_codebooks, codebook_size, stack_k)
    if kd_type in ("l1", "l2"):
        return RegressionKDHead(d_model, teacher_dim, stack_k, kind=kd_type)
    raise ValueError(f"unknown kd_type {kd_type!r}; expected 'none', 'mvq', 'l1' or 'l2'")
