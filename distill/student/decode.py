"""Batched transducer decoding (icefall-style: greedy and modified beam search) and word error rate.

Greedy search walks the encoder frames; at each frame it emits the joiner's argmax until blank or
`max_sym_per_frame` symbols, updating the stateless predictor's context only for the utterances that emitted.
Modified beam search keeps `beam` hypotheses per utterance and emits at most one symbol per frame; hypotheses
with the same token sequence are merged by adding their probabilities.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

__all__ = ["greedy_search", "modified_beam_search", "wer", "cer"]


@contextmanager
def _encoded(model, feats: torch.Tensor, feat_lens: torch.Tensor):
    """The model in eval mode (restored afterwards): yields (encoder output projected for the joiner [B, T, J],
    encoder lengths [B]), what both searches start from."""
    was_training = model.training
    model.eval()
    try:
        enc_out, enc_lens, _ = model.encode(feats, feat_lens)
        yield model.joiner.enc_proj(enc_out), enc_lens
    finally:
        model.train(was_training)


@torch.no_grad()
def greedy_search(model, feats: torch.Tensor, feat_lens: torch.Tensor, max_sym_per_frame: int = 1) -> list[list[int]]:
    """Token ids per utterance for a padded batch feats [B, T, F], feat_lens [B] (model run in eval mode)."""
    if max_sym_per_frame < 1:
        raise ValueError(f"max_sym_per_frame must be >= 1, got {max_sym_per_frame}")
    with _encoded(model, feats, feat_lens) as (enc_p, enc_lens):
        blank, ctx_len = model.blank_id, model.predictor.context
        B, T, _ = enc_p.shape
        context = torch.full((B, ctx_len), blank, dtype=torch.long, device=enc_p.device)
        pred_p = model.joiner.pred_proj(model.predictor(context, need_pad=False)[:, -1])  # [B, J]
        hyps: list[list[int]] = [[] for _ in range(B)]
        for t in range(T):
            active = t < enc_lens
            for _ in range(max_sym_per_frame):
                if not active.any():
                    break
                y = model.joiner(enc_p[:, t], pred_p).argmax(-1)
                emit = active & (y != blank)
                if not emit.any():
                    break
                rows = emit.nonzero().flatten()
                for b in rows.tolist():
                    hyps[b].append(int(y[b]))
                context[rows] = torch.cat([context[rows, 1:], y[rows, None]], 1)
                pred_p[rows] = model.joiner.pred_proj(model.predictor(context[rows], need_pad=False)[:, -1])
                active = emit
        return hyps


@torch.no_grad()
def modified_beam_search(model, feats: torch.Tensor, feat_lens: torch.Tensor, beam: int = 4,
                         return_scores: bool = False):
    """Token ids per utterance (and, with return_scores, the log-probability of each best hypothesis: the log-sum
    over the merged alignments the search kept) for a padded batch feats [B, T, F], feat_lens [B].

    Per frame, every live hypothesis of every utterance goes through the predictor and joiner in one batch; each
    utterance then keeps the `beam` best (hypothesis, blank-or-token) extensions of its own hypotheses. An
    utterance stops at its own last frame, so padding never changes its result; beam=1 is greedy search with one
    symbol per frame.
    """
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise ValueError(f"beam must be an integer >= 1, got {beam!r}")
    with _encoded(model, feats, feat_lens) as (enc_p, enc_lens):
        blank, ctx_len = model.blank_id, model.predictor.context
        B, T, _ = enc_p.shape
        # per utterance: {token tuple: log-prob}; the predictor sees the last ctx_len tokens (blank-padded)
        hyps: list[dict[tuple, float]] = [{(): 0.0} for _ in range(B)]
        for t in range(T):
            live = [b for b in range(B) if t < int(enc_lens[b])]
            if not live:
                break
            keys = [(b, ys) for b in live for ys in hyps[b]]
            ctx = torch.tensor([([blank] * ctx_len + list(ys))[-ctx_len:] for _, ys in keys], dtype=torch.long,
                               device=enc_p.device)
            pred_p = model.joiner.pred_proj(model.predictor(ctx, need_pad=False)[:, -1])  # [N, J]
            rows = torch.tensor([b for b, _ in keys], device=enc_p.device)
            logp = model.joiner(enc_p[rows, t], pred_p).float().log_softmax(-1)  # [N, V]
            logp += torch.tensor([hyps[b][ys] for b, ys in keys], dtype=logp.dtype, device=logp.device)[:, None]
            V = logp.shape[1]
            start = 0
            for b in live:
                n = len(hyps[b])
                scores, flat = logp[start: start + n].flatten().topk(min(beam, n * V))
                new: dict[tuple, float] = {}
                for score, i in zip(scores.tolist(), flat.tolist()):
                    ys = keys[start + i // V][1]
                    tok = i % V
                    key = ys if tok == blank else ys + (tok,)
                    new[key] = score if key not in new else _log_add(new[key], score)
                hyps[b] = new
                start += n
        best = [max(h.items(), key=lambda kv: kv[1]) for h in hyps]
        out = [list(ys) for ys, _ in best]
        return (out, [score for _, score in best]) if return_scores else out


def _log_add(a: float, b: float) -> float:
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def wer(refs: list[str], hyps: list[str]) -> dict:
    """Corpus word error rate: dict(wer, errors, words, substitutions, deletions, insertions).

    Texts are compared word by word after whitespace splitting (normalise them the same way first, e.g. with
    distill.data.tokenizer.normalize_text). Empty references are allowed: their hypothesis words count as insertions.
    """
    import jiwer

    if len(refs) != len(hyps):
        raise ValueError(f"wer: {len(refs)} references but {len(hyps)} hypotheses")
    words = sum(len(r.split()) for r in refs)
    if not refs:
        sub = dels = ins = 0
    else:
        o = jiwer.process_words([" ".join(r.split()) for r in refs], [" ".join(h.split()) for h in hyps])
        sub, dels, ins = o.substitutions, o.deletions, o.insertions
    errors = sub + dels + ins
    return {"wer": errors / words if words else (0.0 if errors == 0 else float("inf")), "errors": errors,
            "words": words, "substitutions": sub, "deletions": dels, "insertions": ins}


def cer(refs: list[str], hyps: list[str]) -> dict:
    """Corpus character error rate (spaces count as characters): dict(cer, char_errors, chars). Finer-grained
    than WER for small students whose word error rate is still near 100%."""
    import jiwer

    if len(refs) != len(hyps):
        raise ValueError(f"cer: {len(refs)} references but {len(hyps)} hypotheses")
    refs = [" ".join(r.split()) for r in refs]
    hyps = [" ".join(h.split()) for h in hyps]
    chars = sum(len(r) for r in refs)
    errors = 0
    if refs:
        o = jiwer.process_characters(refs, hyps)
        errors = o.substitutions + o.deletions + o.insertions
    return {"cer": errors / chars if chars else (0.0 if errors == 0 else float("inf")), "char_errors": errors,
            "chars": chars}
