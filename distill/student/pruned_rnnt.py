"""Pruned RNN-T loss (Kuang et al. 2022, "Pruned RNN-T for fast, memory-efficient ASR training") in pure PyTorch.

The full loss evaluates the joiner on every (t, u) cell: [B, T, U+1, V] logits. The pruned loss does it in two passes:
1. "simple" loss: a trivial joiner logits(t, u) = am[t] + lm[u] (linear projections of encoder and predictor output
   to the vocabulary). Its log-softmax normaliser is logsumexp_v(am[t, v] + lm[u, v]) = a batched matmul of
   exp(am - max) and exp(lm - max), so the lattice costs [B, T, U+1] memory, never [B, T, U+1, V]. Optionally its
   log-probs are interpolated with lm-only and am-only ones (smoothing, as k2's `rnnt_loss_smoothed`).
2. From the simple lattice's occupation probabilities (d log P / d edge log-prob) pick per frame the window of
   `prune_range` symbols [s_t, s_t + R) holding the most probability mass, with s_t non-decreasing in t, s_0 = 0,
   s_{t+1} - s_t <= R - 1 (so every frame's window can be entered from the previous one by a blank) and the last
   frame's window ending at U (`prune_ranges`). The real joiner then runs only on those cells: [B, T, R, V] logits,
   and the RNN-T recursion runs on the pruned lattice (the pruned log-probs scattered into a [B, T, U+1] lattice
   with log 0 outside the windows, then the full lattice's anti-diagonal recursion of distill.student.rnnt_loss).

When R >= U+1 the windows are the whole lattice and the pruned loss equals the full loss exactly (tested). The
pruned loss sums over a subset of the alignments, so it is >= the full NLL; the simple loss supplies no gradient
to the pruned part (the windows are integers), it trains the am/lm projections and, through them, the encoder and
predictor.
"""
from __future__ import annotations

from typing import Callable

import torch

from distill.student.rnnt_loss import _NEG, _check_inputs, cell_log_probs, transducer_forward

__all__ = ["simple_lattice", "occupation", "prune_ranges", "pruned_lattice", "pruned_rnnt_loss",
           "pruned_loss_scales"]

# logits_fn(ranges [B, T, R]) -> joiner logits [B, T, R, V] on cells (t, ranges[b, t, k])
PrunedLogitsFn = Callable[[torch.Tensor], torch.Tensor]


def simple_lattice(am: torch.Tensor, lm: torch.Tensor, targets: torch.Tensor, blank: int = 0,
                   lm_only_scale: float = 0.0, am_only_scale: float = 0.0,
                   target_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lattice log-probs (blank [B, T, U+1], next label [B, T, U]) of the trivial joiner am[b, t] + lm[b, u].

    am [B, T, V], lm [B, U+1, V]. Smoothing (k2's choice) interpolates the log-probs:
    (1 - lm_only_scale - am_only_scale) * joint + lm_only_scale * log softmax(lm[u]) + am_only_scale * (log of
    softmax(am[t]) reweighted by the unigram of the lm's predictions). The unigram is averaged over the batch's valid
    predictor positions (`target_lengths`), so with am_only_scale > 0 an utterance's loss depends on its batch.
    Computed in float32 or float64 (half inputs are upcast, autocast is off inside).
    """
    with torch.autocast(device_type=am.device.type, enabled=False):  # bmm under autocast would run in half
        if am.dtype in (torch.float16, torch.bfloat16):
            am, lm = am.float(), lm.float()
        return _simple_lattice(am, lm, targets, blank, lm_only_scale, am_only_scale, target_lengths)


def _simple_lattice(am, lm, targets, blank, lm_only_scale, am_only_scale, target_lengths):
    B, T, V = am.shape
    U = lm.shape[1] - 1
    label_ids = torch.cat([targets.long().clamp(0, V - 1), targets.new_full((B, 1), blank, dtype=torch.long)], 1)
    am_max = am.detach().amax(-1, keepdim=True)  # [B,T,1]
    lm_max = lm.detach().amax(-1, keepdim=True)  # [B,U+1,1]
    am_e, lm_e = (am - am_max).exp(), (lm - lm_max).exp()
    tiny = torch.finfo(am_e.dtype).tiny
    # logsumexp_v(am[t,v] + lm[u,v]) [B,T,U+1] through one bmm: the [B,T,U+1,V] sum is never formed
    norm = torch.bmm(am_e, lm_e.transpose(1, 2)).clamp_min(tiny).log() + am_max + lm_max.transpose(1, 2)
    am_blank = am[:, :, blank]  # [B,T]
    lm_blank = lm[:, :, blank]  # [B,U+1]
    am_label = am.gather(2, label_ids[:, None, :U].expand(B, T, U))  # [B,T,U]: am[b,t,y_{u+1}]
    lm_label = lm[:, :U].gather(2, label_ids[:, :U, None]).squeeze(2)  # [B,U]: lm[b,u,y_{u+1}]
    lp_blank = am_blank[:, :, None] + lm_blank[:, None, :] - norm
    lp_label = am_label + lm_label[:, None, :] - norm[:, :, :U]
    if not lm_only_scale and not am_only_scale:
        return lp_blank, lp_label
    joint = 1.0 - lm_only_scale - am_only_scale
    lp_blank, lp_label = joint * lp_blank, joint * lp_label
    if lm_only_scale:
        lm_norm = lm.logsumexp(-1)  # [B,U+1]
        lp_blank = lp_blank + lm_only_scale * (lm_blank - lm_norm)[:, None, :]
        lp_label = lp_label + lm_only_scale * (lm_label - lm_norm[:, :U])[:, None, :]
    if am_only_scale:
        if target_lengths is None:
            target_lengths = torch.full((B,), U, dtype=torch.long, device=lm.device)
        valid = (torch.arange(U + 1, device=lm.device)[None] <= target_lengths[:, None]).to(lm_e.dtype)
        lm_p = lm_e / lm_e.sum(-1, keepdim=True)  # softmax(lm) [B,U+1,V]
        unigram = (lm_p * valid[:, :, None]).sum((0, 1)) / valid.sum().clamp_min(1) + tiny  # [V]
        log_uni = unigram.log()
        am_norm = (am_e @ unigram).clamp_min(tiny).log() + am_max.squeeze(-1)  # [B,T]
        lp_blank = lp_blank + am_only_scale * (am_blank + log_uni[blank] - am_norm)[:, :, None]
        lp_label = lp_label + am_only_scale * (am_label + log_uni[label_ids[:, :U]][:, None, :] - am_norm[:, :, None])
    return lp_blank, lp_label


def occupation(lp_blank: torch.Tensor, lp_label: torch.Tensor, logit_lengths: torch.Tensor,
               target_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log P(y|x) [B], blank-edge occupation [B, T, U+1], label-edge occupation [B, T, U]), all without a graph.

    The occupation of an edge is the posterior probability that an alignment takes it = d log P / d (its log-prob),
    obtained by one backward through the recursion. Works under no_grad / inference_mode too.
    """
    with torch.inference_mode(False), torch.enable_grad():
        lpb = lp_blank.detach().clone().requires_grad_()
        lpl = lp_label.detach().clone().requires_grad_()
        loglike = transducer_forward(lpb, lpl, logit_lengths, target_lengths)
        occ_b, occ_l = torch.autograd.grad(loglike.sum(), (lpb, lpl), allow_unused=True)
    if occ_l is None:  # U == 0
        occ_l = torch.zeros_like(lpl)
    return loglike.detach(), occ_b, occ_l


def _with_occupation_gradient(loglike: torch.Tensor, occ: tuple, lps: tuple) -> torch.Tensor:
    """log P [B] whose gradient w.r.t. each lattice log-prob is its occupation: the recursion is not run twice."""
    out = loglike
    for o, lp in zip(occ, lps):
        if lp.requires_grad and lp.numel():
            out = out + (o * (lp - lp.detach())).flatten(1).sum(1)
    return out


def _suffix_min(x: torch.Tensor) -> torch.Tensor:
    """out[:, t] = min(x[:, t:]) : the largest non-decreasing sequence <= x."""
    return x.flip(1).cummin(1).values.flip(1)


def prune_ranges(occ_blank: torch.Tensor, occ_label: torch.Tensor, logit_lengths: torch.Tensor,
                 target_lengths: torch.Tensor, prune_range: int) -> torch.Tensor:
    """Symbol windows [B, T, R] (R = min(prune_range, U+1)): ranges[b, t] = s_t + arange(R).

    s_t maximises the occupation (sum of both out-edges of each node) inside the window, then is adjusted so that
    0 = s_0 <= s_1 <= ... with s_{t+1} - s_t <= R - 1, and frames from T_b - 1 on use max(U_b - R + 1, 0), so the
    final node (T_b - 1, U_b) is inside the last valid frame's window.
    """
    B, T, U1 = occ_blank.shape
    R = min(prune_range, U1)
    dev = occ_blank.device
    node = occ_blank.clone()
    node[:, :, : U1 - 1] += occ_label
    csum = torch.nn.functional.pad(node.cumsum(2), (1, 0))  # [B,T,U+2], csum[..., s] = sum(node[..., :s])
    window = csum[:, :, R:] - csum[:, :, : U1 + 1 - R]  # [B,T,U+2-R]: mass of [s, s+R)
    s = window.argmax(2)  # [B,T]
    t = torch.arange(T, device=dev)[None]
    last = (target_lengths.long() - R + 1).clamp_min(0)[:, None]
    s = torch.where(t < logit_lengths.long()[:, None] - 1, s, last)
    # non-decreasing (lower earlier frames), then steps of at most R-1 and s_0 = 0: with y_t = (R-1) t - s_t the
    # step constraint is y non-decreasing (raise earlier s) and s_t <= (R-1) t is y >= 0
    s = _suffix_min(s)
    y = (R - 1) * t - s
    s = (R - 1) * t - _suffix_min(y).clamp_min(0)
    return s[:, :, None] + torch.arange(R, device=dev)


def pruned_lattice(logits: torch.Tensor, targets: torch.Tensor, ranges: torch.Tensor,
                   blank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-size lattice log-probs (blank [B, T, U+1], label [B, T, U]) from logits [B, T, R, V] on `ranges`,
    log 0 (a large negative number) outside the windows."""
    B, T, R, V = logits.shape
    U = targets.shape[1]
    ids = torch.cat([targets.long().clamp(0, V - 1), targets.new_full((B, 1), blank, dtype=torch.long)], 1)
    label_ids = ids.gather(1, ranges.reshape(B, T * R)).view(B, T, R)  # y_{u+1} at u = ranges (blank at u = U)
    lpb, lpl = cell_log_probs(logits, label_ids, blank)
    lp_blank = lpb.new_full((B, T, U + 1), _NEG).scatter(2, ranges, lpb)
    lp_label = lpl.new_full((B, T, U + 1), _NEG).scatter(2, ranges, lpl)[:, :, :U]
    return lp_blank, lp_label


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def pruned_rnnt_loss(logits_fn: PrunedLogitsFn, am: torch.Tensor, lm: torch.Tensor, targets: torch.Tensor,
                     logit_lengths: torch.Tensor, target_lengths: torch.Tensor, prune_range: int = 5,
                     blank: int = 0, reduction: str = "mean", lm_only_scale: float = 0.25,
                     am_only_scale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(simple NLL, pruned NLL), each reduced by `reduction` ("mean" over utterances, "sum", "none" -> [B]).

    logits_fn(ranges [B, T, R]) -> the real joiner's logits [B, T, R, V] at (t, ranges[b, t, k]).
    am [B, T, V], lm [B, U+1, V]: the simple joiner's projections. Smoothing defaults are icefall's (lm-only 0.25,
    am-only 0). Combine the two as `pruned_loss_scales` says.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"pruned_rnnt_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if isinstance(prune_range, bool) or not isinstance(prune_range, int) or prune_range < 2:
        raise ValueError(f"pruned_rnnt_loss: prune_range must be an integer >= 2 (a window of one symbol per frame "
                         f"can never emit a label), got {prune_range!r}")
    for name, v in (("lm_only_scale", lm_only_scale), ("am_only_scale", am_only_scale)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"pruned_rnnt_loss: {name} must lie in [0, 1], got {v}")
    if lm_only_scale + am_only_scale > 1.0:
        raise ValueError(f"pruned_rnnt_loss: lm_only_scale + am_only_scale must be <= 1, got "
                         f"{lm_only_scale + am_only_scale}")
    if targets.dim() != 2:
        raise ValueError(f"pruned_rnnt_loss: targets must be [B, U], got {tuple(targets.shape)}")
    B, U = targets.shape
    if am.dim() != 3 or lm.dim() != 3 or am.shape[0] != B or lm.shape[0] != B or lm.shape[1] != U + 1 \
            or am.shape[2] != lm.shape[2]:
        raise ValueError(f"pruned_rnnt_loss: need am [B={B}, T, V] and lm [B, U+1={U + 1}, V], got am "
                         f"{tuple(am.shape)}, lm {tuple(lm.shape)}")
    T, V = am.shape[1], am.shape[2]
    logit_lengths = torch.as_tensor(logit_lengths).to(targets.device)
    target_lengths = torch.as_tensor(target_lengths).to(targets.device)
    _check_inputs(targets, logit_lengths, target_lengths, B, T, U, V, blank)
    # windows advance at most R-1 symbols per frame: more labels than (R-1) * frames cannot be aligned
    too_long = target_lengths > (min(prune_range, U + 1) - 1) * logit_lengths
    if too_long.any():
        rows = too_long.nonzero().flatten().tolist()
        raise ValueError(f"pruned_rnnt_loss: utterances {rows} have more labels ({target_lengths[too_long].tolist()}) "
                         f"than prune_range - 1 = {prune_range - 1} per frame allows over "
                         f"{logit_lengths[too_long].tolist()} frames; use a larger prune_range or the full loss")

    lp_blank, lp_label = simple_lattice(am, lm, targets, blank, lm_only_scale, am_only_scale, target_lengths)
    loglike, occ_b, occ_l = occupation(lp_blank, lp_label, logit_lengths, target_lengths)
    simple = -_with_occupation_gradient(loglike, (occ_b, occ_l), (lp_blank, lp_label))

    ranges = prune_ranges(occ_b, occ_l, logit_lengths, target_lengths, prune_range)
    logits = logits_fn(ranges)
    if logits.shape != (B, T, ranges.shape[2], V):
        raise ValueError(f"pruned_rnnt_loss: logits_fn returned {tuple(logits.shape)}, expected "
                         f"[B={B}, T={T}, R={ranges.shape[2]}, V={V}]")
    pb, pl = pruned_lattice(logits, targets, ranges, blank)
    pruned = -transducer_forward(pb, pl, logit_lengths, target_lengths)
    return _reduce(simple, reduction), _reduce(pruned, reduction)


def pruned_loss_scales(step: int | None, warmup_steps: int, simple_loss_scale: float) -> tuple[float, float]:
    """(scale of the simple loss, scale of the pruned loss) at training step `step` (icefall's zipformer warm-up).

    Over the first `warmup_steps` steps the simple loss's scale falls linearly from 1 to `simple_loss_scale` and the
    pruned loss's rises from 0.1 to 1: early windows come from an untrained simple joiner, so the pruned loss is
    trusted gradually. step None or warmup_steps 0: the steady scales (simple_loss_scale, 1).
    """
    if step is None or warmup_steps <= 0 or step >= warmup_steps:
        return simple_loss_scale, 1.0
    f = max(0, step) / warmup_steps
    return 1.0 - f * (1.0 - simple_loss_scale), 0.1 + 0.9 * f
