"""RNN-T (transducer) loss in pure PyTorch: log-space forward algorithm vectorised along anti-diagonals.

torchaudio's and k2's kernels are not available here, so the loss is plain tensor code, differentiated by
autograd through the recursion (float32 or float64; half inputs are computed in float32).

Two steps:
1. `gather_log_probs`: from joiner logits [B, T, U+1, V] keep only what the lattice needs,
   log P(blank | t, u) [B, T, U+1] and log P(y_{u+1} | t, u) [B, T, U]. This is the only place the V axis
   appears. Memory: logsumexp over V saves the logits for backward and backward builds one softmax of the same
   size, so peak ~ 2-3 x B*T*(U+1)*V floats. With a joiner callable (`logits_fn(t0, t1)`) the logits are made
   `chunk_frames` frames at a time under activation checkpointing: only one chunk's logits ever exist (in the
   forward and again in the backward, recomputed), so memory is bounded by B*chunk_frames*(U+1)*V regardless of T.
   The gather itself (`cell_log_probs`) is shared with the pruned loss (distill.student.pruned_rnnt), whose cells
   carry their own label ids.
2. `transducer_forward`: alpha recursion over the (t, u) lattice. All cells with t + u = n depend only on
   diagonal n-1, so each of the T+U-1 steps is one vectorised logaddexp over [B, U+1]. Memory O(B*(T+U)*U).

Lattice convention (Graves 2012, same as torchaudio/k2): emitting label y_{u+1} at (t, u) moves to (t, u+1),
blank moves to (t+1, u); the path ends with a blank from (T-1, U). Padded frames (t >= T_b) and padded target
positions (u > U_b) never influence the result or its gradient.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["rnnt_loss", "gather_log_probs", "gather_log_probs_chunked", "transducer_forward", "cell_log_probs"]

LogitsFn = Callable[[int, int], torch.Tensor]

# Finite stand-in for log(0): -inf would make logaddexp's gradient NaN (exp(-inf - -inf)) in unreachable cells.
_NEG = -1.0e30


def _check_inputs(targets: torch.Tensor, logit_lengths: torch.Tensor, target_lengths: torch.Tensor,
                  B: int, T: int, U: int, V: int | None, blank: int) -> None:
    if targets.dim() != 2 or targets.shape[0] != B or targets.shape[1] != U:
        raise ValueError(f"rnnt_loss: targets must be [B={B}, U={U}], got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rnnt_loss: targets must be an integer tensor, got {targets.dtype}")
    for name, lens, hi in (("logit_lengths", logit_lengths, T), ("target_lengths", target_lengths, U)):
        if lens.dim() != 1 or lens.shape[0] != B:
            raise ValueError(f"rnnt_loss: {name} must be [B={B}], got {tuple(lens.shape)}")
        if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > hi):
            raise ValueError(f"rnnt_loss: {name} must lie in [0, {hi}], got {lens.tolist()}")
    if B and int(logit_lengths.min()) < 1:
        bad = (logit_lengths < 1).nonzero().flatten().tolist()
        raise ValueError(f"rnnt_loss: utterances {bad} have no frames (logit_lengths must be >= 1)")
    if V is not None:
        if not 0 <= blank < V:
            raise ValueError(f"rnnt_loss: blank={blank} outside vocabulary [0, {V})")
        if U and B:
            valid = torch.arange(U, device=targets.device)[None, :] < target_lengths[:, None]
            t = targets[valid]
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= V):
                raise ValueError(f"rnnt_loss: target ids must lie in [0, {V}); got min {int(t.min())}, "
                                 f"max {int(t.max())}")


class _CellLogProbs(torch.autograd.Function):
    """log_softmax over V followed by a gather of the blank and one label entry per cell, with a one-pass backward.

    logits [B, T, W, V], label_ids [B, T, W] -> (log P(blank) [B, T, W], log P(label_ids) [B, T, W]). W is U+1 for
    the full lattice (label of cell u = y_{u+1}) and the prune range for the pruned one (distill.student.pruned_rnnt).
    Autograd of logsumexp + two gathers would allocate three [B,T,W,V] tensors in backward (two zero-filled
    scatter targets and the softmax); here the gradient is written once:
    dL/dlogits = g_blank * (onehot(blank) - p) + g_label * (onehot(y) - p) = -(g_blank + g_label) * p + onehots.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, label_ids: torch.Tensor, blank: int):
        lse = torch.logsumexp(logits, dim=-1)  # [B,T,W]
        idx = torch.stack([torch.full_like(label_ids, blank), label_ids], -1)  # [B,T,W,2]: blank, label
        picked = logits.gather(-1, idx) - lse.unsqueeze(-1)
        ctx.save_for_backward(logits, lse, idx)
        return picked[..., 0], picked[..., 1]

    @staticmethod
    def backward(ctx, g_blank: torch.Tensor, g_label: torch.Tensor):
        logits, lse, idx = ctx.saved_tensors
        g = torch.zeros(idx.shape, dtype=logits.dtype, device=logits.device)
        if g_blank is not None:
            g[..., 0] = g_blank
        if g_label is not None:
            g[..., 1] = g_label
        grad = torch.sub(logits, lse.unsqueeze(-1)).exp_().mul_(-g.sum(-1, keepdim=True))
        grad.scatter_add_(-1, idx, g)
        return grad, None, None


def cell_log_probs(logits: torch.Tensor, label_ids: torch.Tensor, blank: int):
    """(log P(blank), log P(label_ids)) per cell of logits [B, T, W, V]; half inputs are computed in float32."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return _CellLogProbs.apply(logits, label_ids.long(), blank)


def _gather(logits: torch.Tensor, targets: torch.Tensor, blank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P(blank) [B,T,U+1], log P(next label) [B,T,U]) without materialising a full log_softmax."""
    B, T, U1, V = logits.shape
    label_ids = torch.cat([targets.long().clamp(0, V - 1), targets.new_full((B, 1), blank, dtype=torch.long)], 1)
    lp_blank, lp_label = cell_log_probs(logits, label_ids[:, None].expand(B, T, U1), blank)
    return lp_blank, lp_label[:, :, : U1 - 1]


def gather_log_probs(logits: torch.Tensor, targets: torch.Tensor, blank: int = 0):
    """log P(blank) [B,T,U+1] and log P(y_{u+1}) [B,T,U] from full joiner logits [B,T,U+1,V]."""
    if logits.dim() != 4:
        raise ValueError(f"rnnt_loss: logits must be [B, T, U+1, V], got {tuple(logits.shape)}")
    if targets.shape[1] != logits.shape[2] - 1:
        raise ValueError(f"rnnt_loss: logits have U+1={logits.shape[2]} but targets have U={targets.shape[1]}")
    return _gather(logits, targets, blank)


def gather_log_probs_chunked(logits_fn: LogitsFn, num_frames: int, targets: torch.Tensor, blank: int = 0,
                             chunk_frames: int = 16, target_lengths: torch.Tensor | None = None):
    """Like `gather_log_probs`, but logits come from `logits_fn(t0, t1) -> [B, t1-t0, U+1, V]`, chunk by chunk.

    Each chunk runs under non-reentrant activation checkpointing, so its logits are freed after the gather and
    recomputed during backward: peak memory is one chunk's logits (plus what `logits_fn` itself keeps).
    """
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    if target_lengths is None:
        target_lengths = torch.full((targets.shape[0],), targets.shape[1], dtype=torch.long, device=targets.device)
    lengths = torch.full_like(target_lengths, num_frames)

    def one(t0: int, t1: int):
        logits = logits_fn(t0, t1)
        if logits.dim() != 4 or logits.shape[1] != t1 - t0 or logits.shape[2] != targets.shape[1] + 1:
            raise ValueError(f"rnnt_loss: logits_fn({t0}, {t1}) returned shape {tuple(logits.shape)}, expected "
                             f"[B, {t1 - t0}, {targets.shape[1] + 1}, V]")
        if t0 == 0:  # V is known only now
            _check_inputs(targets, lengths, target_lengths, targets.shape[0], num_frames, targets.shape[1],
                          logits.shape[-1], blank)
        return _gather(logits, targets, blank)

    if num_frames <= chunk_frames:
        return one(0, num_frames)
    blanks, labels = [], []
    for t0 in range(0, num_frames, chunk_frames):
        t1 = min(num_frames, t0 + chunk_frames)
        if torch.is_grad_enabled():
            b, l = checkpoint(one, t0, t1, use_reentrant=False)
        else:
            b, l = one(t0, t1)
        blanks.append(b)
        labels.append(l)
    return torch.cat(blanks, 1), torch.cat(labels, 1)


def _skew(x: torch.Tensor, num_diag: int) -> torch.Tensor:
    """x [B, T, W] -> [B, num_diag, W] with out[b, n, u] = x[b, n-u, u] (NEG where n-u is outside [0, T))."""
    B, T, W = x.shape
    n = torch.arange(num_diag, device=x.device)[:, None]
    u = torch.arange(W, device=x.device)[None, :]
    t = n - u
    ok = (t >= 0) & (t < T)
    g = x[:, t.clamp(0, max(T - 1, 0)), u.expand_as(t)]  # [B, num_diag, W]
    return g.masked_fill(~ok, _NEG)


def transducer_forward(lp_blank: torch.Tensor, lp_label: torch.Tensor, logit_lengths: torch.Tensor,
                       target_lengths: torch.Tensor) -> torch.Tensor:
    """Per-utterance log P(y | x) [B] from lattice log-probs (anti-diagonal alpha recursion)."""
    B, T, U1 = lp_blank.shape
    U = U1 - 1
    N = T + U  # diagonals n = t + u in [0, T+U-1]
    # per-diagonal views, unbound once (indexing [:, n] inside the loop would make autograd build a full-size
    # zero gradient per step)
    blank_d = _skew(lp_blank, N).unbind(1)  # blank_d[n][:, u] = lp_blank[:, n-u, u]
    label_d = _skew(lp_label, N).unbind(1) if U > 0 else None  # label_d[n][:, u] = lp_label[:, n-u, u]
    neg = lp_blank.new_full((B, 1), _NEG)
    alpha = torch.cat([lp_blank.new_zeros(B, 1), lp_blank.new_full((B, U), _NEG)], 1)  # diagonal 0
    diags = [alpha]
    for n in range(1, N):
        # from (t-1, u) by blank: cell (t-1,u) is on diagonal n-1 at index u
        from_blank = alpha + blank_d[n - 1]
        if U > 0:
            # from (t, u-1) by label y_u: cell (t,u-1) is on diagonal n-1 at index u-1
            from_label = torch.cat([neg, alpha[:, :U] + label_d[n - 1]], 1)
            alpha = torch.logaddexp(from_blank, from_label)
        else:
            alpha = from_blank
        diags.append(alpha)
    alphas = torch.stack(diags, 1)  # [B, N, U+1]
    t_end = (logit_lengths - 1).long()
    u_end = target_lengths.long()
    b = torch.arange(B, device=lp_blank.device)
    return alphas[b, t_end + u_end, u_end] + lp_blank[b, t_end, u_end]


def rnnt_loss(logits: torch.Tensor | LogitsFn, targets: torch.Tensor, logit_lengths: torch.Tensor,
              target_lengths: torch.Tensor, blank: int = 0, reduction: str = "mean",
              chunk_frames: int = 16) -> torch.Tensor:
    """Negative log-likelihood of `targets` under the transducer.

    logits: joiner output [B, T, U+1, V], or a callable `logits_fn(t0, t1) -> [B, t1-t0, U+1, V]` (memory-bounded
        path, evaluated `chunk_frames` frames at a time; T is taken as max(logit_lengths)).
    targets: [B, U] integer label ids, padded (padding values are ignored).
    logit_lengths: [B] valid frames per utterance (>= 1). target_lengths: [B] valid labels (may be 0).
    reduction: "mean" (over utterances), "sum", or "none" ([B]).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"rnnt_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    logit_lengths = torch.as_tensor(logit_lengths).to(targets.device)
    target_lengths = torch.as_tensor(target_lengths).to(targets.device)
    B, U = targets.shape if targets.dim() == 2 else (-1, -1)
    if callable(logits) and not isinstance(logits, torch.Tensor):
        T = int(logit_lengths.max()) if logit_lengths.numel() else 0
        _check_inputs(targets, logit_lengths, target_lengths, B, T, U, None, blank)
        lp_blank, lp_label = gather_log_probs_chunked(logits, T, targets, blank, chunk_frames, target_lengths)
    else:
        if logits.dim() != 4:
            raise ValueError(f"rnnt_loss: logits must be [B, T, U+1, V], got {tuple(logits.shape)}")
        Bl, T, U1, V = logits.shape
        if Bl != B or U1 != U + 1:
            raise ValueError(f"rnnt_loss: logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)} "
                             f"(need [B, T, U+1, V])")
        _check_inputs(targets, logit_lengths, target_lengths, B, T, U, V, blank)
        lp_blank, lp_label = gather_log_probs(logits, targets, blank)
    loss = -transducer_forward(lp_blank, lp_label, logit_lengths, target_lengths)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
