"""The student: a small Conformer-transducer (RNN-T) with an optional KD head on a middle encoder layer.

Design points that matter for correctness:
- Padding never leaks: conv subsampling zeroes padded frames before every conv, attention masks padded keys,
  the depthwise convolution sees zeros in padded frames, and normalisation is LayerNorm (per frame; no
  BatchNorm statistics). So a padded utterance in a batch gets the same encoder output as alone (tested).
- Conv subsampling uses kernel 3, stride 2, padding 1 per factor of 2, so the output length is exactly
  ceil(T / subsampling) (`subsampled_length`), i.e. 100 Hz fbank -> 25 Hz for subsampling 4, proportional to
  duration, which keeps teacher-frame stacking aligned (distill.data.alignment).
- Stateless predictor (icefall's "stateless decoder"): embedding + 1-D conv over the last `pred_context`
  tokens, left-padded with blank in token space, so training and greedy decoding see identical contexts.
- The transducer loss never materialises [B, T, U+1, V] beyond `joiner_chunk_elems` elements: the joiner is
  evaluated in chunks of frames under activation checkpointing (distill.student.rnnt_loss). With
  rnnt_loss="pruned" it is evaluated on [B, T, prune_range, V] only, windows chosen by a "simple" joiner (two extra
  linear layers to the vocabulary, created only then, so "full" checkpoints keep their parameter set)
  (distill.student.pruned_rnnt).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.config import JSONConfig
from distill.data.alignment import subsampled_length
from distill.student.kd_losses import build_kd_head
from distill.student.pruned_rnnt import pruned_loss_scales, pruned_rnnt_loss
from distill.student.rnnt_loss import rnnt_loss

__all__ = ["StudentConfig", "Transducer", "subsampled_length", "ConformerEncoder", "Conv2dSubsampling",
           "StatelessPredictor", "Joiner"]


@dataclass
class StudentConfig(JSONConfig):
    """Everything needed to rebuild the student; `to_dict`/`from_dict` round-trip through JSON."""

    vocab_size: int
    num_mel_bins: int = 80
    d_model: int = 144
    num_layers: int = 6
    num_heads: int = 4
    ff_mult: int = 4
    conv_kernel: int = 15
    dropout: float = 0.1
    subsampling: int = 4
    subsampling_channels: int = 64
    pred_dim: int = 256
    pred_context: int = 2
    joiner_dim: int = 256
    blank_id: int = 0
    kd_layer: int | None = None  # 1-based encoder layer whose output feeds the KD head; None -> num_layers // 2
    kd_type: str = "none"  # "none" | "mvq" | "l1" | "l2"
    kd_stack: int = 1  # teacher frames per student frame (k)
    num_codebooks: int = 16
    codebook_size: int = 256
    teacher_dim: int = 1024
    joiner_chunk_elems: int = 1 << 24  # max elements of one chunk of joiner logits/activations in the loss
    rnnt_loss: str = "full"  # "full" | "pruned" (distill.student.pruned_rnnt)
    prune_range: int = 5  # symbols per frame the pruned loss keeps (k2/icefall's s_range)
    simple_loss_scale: float = 0.5  # total = simple_loss_scale * simple + pruned (after the warm-up)
    prune_warmup_steps: int = 0  # icefall's warm-up of the two scales over this many steps, when compute_loss gets
    # `step`; 0 = none (the trainer does not pass `step` yet)

    def __post_init__(self):
        if self.kd_layer is None:
            self.kd_layer = max(1, self.num_layers // 2)
        errors = []
        if self.vocab_size < 2:
            errors.append(f"vocab_size={self.vocab_size} (need blank + at least one token)")
        if not 0 <= self.blank_id < self.vocab_size:
            errors.append(f"blank_id={self.blank_id} outside [0, vocab_size)")
        if self.d_model % self.num_heads:
            errors.append(f"d_model={self.d_model} not divisible by num_heads={self.num_heads}")
        if self.conv_kernel % 2 == 0:
            errors.append(f"conv_kernel={self.conv_kernel} must be odd")
        if self.subsampling < 1 or self.subsampling & (self.subsampling - 1):
            errors.append(f"subsampling={self.subsampling} must be a power of 2")
        if self.pred_context < 1:
            errors.append(f"pred_context={self.pred_context} must be >= 1")
        if not 1 <= self.kd_layer <= self.num_layers:
            errors.append(f"kd_layer={self.kd_layer} outside [1, num_layers={self.num_layers}]")
        if self.kd_type not in ("none", "mvq", "l1", "l2"):
            errors.append(f"kd_type={self.kd_type!r} not in none|mvq|l1|l2")
        if self.kd_stack < 1:
            errors.append(f"kd_stack={self.kd_stack} must be >= 1")
        if self.rnnt_loss not in ("full", "pruned"):
            errors.append(f"rnnt_loss={self.rnnt_loss!r} not in full|pruned")
        if isinstance(self.prune_range, bool) or not isinstance(self.prune_range, int) or self.prune_range < 2:
            errors.append(f"prune_range={self.prune_range!r} must be an integer >= 2")
        if not 0.0 <= self.simple_loss_scale <= 1.0:
            errors.append(f"simple_loss_scale={self.simple_loss_scale} outside [0, 1]")
        if self.prune_warmup_steps < 0:
            errors.append(f"prune_warmup_steps={self.prune_warmup_steps} must be >= 0")
        if errors:
            raise ValueError("invalid StudentConfig: " + "; ".join(errors))


def _length_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """bool [B, T], True on valid frames."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


class Conv2dSubsampling(nn.Module):
    """log2(subsampling) x [Conv2d(3x3, stride 2, pad 1) + ReLU] over (time, freq), then Linear to d_model."""

    def __init__(self, num_mel_bins: int, d_model: int, subsampling: int, channels: int):
        super().__init__()
        self.subsampling = subsampling
        self.convs = nn.ModuleList()
        c_in, freq = 1, num_mel_bins
        for _ in range(int(math.log2(subsampling))):
            self.convs.append(nn.Conv2d(c_in, channels, 3, stride=2, padding=1))
            c_in, freq = channels, (freq + 1) // 2
        self.out = nn.Linear(c_in * freq, d_model)

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return subsampled_length(lengths, self.subsampling)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x * _length_mask(lengths, x.shape[1])[:, :, None]
        x = x.unsqueeze(1)  # [B, 1, T, F]
        for conv in self.convs:
            x = F.relu(conv(x))
            lengths = (lengths + 1) // 2
            # zero padded frames so the next conv sees what it would see for this utterance alone
            x = x * _length_mask(lengths, x.shape[2])[:, None, :, None]
        B, C, T, Fr = x.shape
        return self.out(x.permute(0, 2, 1, 3).reshape(B, T, C * Fr)), lengths


def sinusoidal_positions(T: int, d: int, device=None, dtype=None) -> torch.Tensor:
    pos = torch.arange(T, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(T, d, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: d // 2])
    return pe.to(dtype)


class FeedForward(nn.Module):
    def __init__(self, d: int, mult: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d * mult), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Linear(d * mult, d))

    def forward(self, x):
        return self.net(x)


class SelfAttention(nn.Module):
    """Pre-LN multi-head self-attention; padded keys are masked out."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.heads, self.dropout = heads, dropout

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, d))


class ConvModule(nn.Module):
    """Conformer convolution: pointwise + GLU, depthwise conv over time (padded frames zeroed), LN, SiLU, pointwise."""

    def __init__(self, d: int, kernel: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.pw1 = nn.Linear(d, 2 * d)
        self.dw = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.norm2 = nn.LayerNorm(d)
        self.pw2 = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        y = F.glu(self.pw1(self.norm(x)), dim=-1)
        y = y * valid[:, :, None]
        y = self.dw(y.transpose(1, 2)).transpose(1, 2)
        return self.pw2(F.silu(self.norm2(y)))


class ConformerLayer(nn.Module):
    """Macaron FFN/2 -> MHSA -> conv -> FFN/2 -> LayerNorm."""

    def __init__(self, d: int, heads: int, ff_mult: int, kernel: int, dropout: float):
        super().__init__()
        self.ff1 = FeedForward(d, ff_mult, dropout)
        self.attn = SelfAttention(d, heads, dropout)
        self.conv = ConvModule(d, kernel)
        self.ff2 = FeedForward(d, ff_mult, dropout)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.drop(self.ff1(x))
        x = x + self.drop(self.attn(x, valid))
        x = x + self.drop(self.conv(x, valid))
        x = x + 0.5 * self.drop(self.ff2(x))
        return self.norm(x)


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.subsampling = Conv2dSubsampling(cfg.num_mel_bins, cfg.d_model, cfg.subsampling, cfg.subsampling_channels)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            ConformerLayer(cfg.d_model, cfg.num_heads, cfg.ff_mult, cfg.conv_kernel, cfg.dropout)
            for _ in range(cfg.num_layers))
        self.kd_layer = cfg.kd_layer

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor):
        """-> (out [B, T', d], out_lens [B], kd_hidden [B, T', d] = output of layer `kd_layer`)."""
        x, lens = self.subsampling(feats, feat_lens)
        x = self.drop(x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype))
        valid = _length_mask(lens, x.shape[1])
        kd_hidden = None
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x, valid)
            if i == self.kd_layer:
                kd_hidden = x
        return x, lens, kd_hidden


class StatelessPredictor(nn.Module):
    """Embedding + causal 1-D conv over the last `context` tokens (no recurrence), as icefall's stateless decoder."""

    def __init__(self, vocab_size: int, dim: int, context: int, blank_id: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.context, self.blank_id = context, blank_id
        groups = dim // 4 if dim % 4 == 0 else 1
        self.conv = nn.Conv1d(dim, dim, context, groups=groups, bias=False) if context > 1 else None

    def forward(self, y: torch.Tensor, need_pad: bool = True) -> torch.Tensor:
        """y [B, L] ids -> [B, L, dim] (need_pad: left-pad with blank); need_pad=False: [B, L-context+1, dim]."""
        if need_pad and self.context > 1:
            y = F.pad(y, (self.context - 1, 0), value=self.blank_id)
        e = self.embedding(y)
        if self.conv is not None:
            e = self.conv(e.transpose(1, 2)).transpose(1, 2)
        return F.relu(e)


class Joiner(nn.Module):
    """logits = out(tanh(enc_proj(enc) + pred_proj(pred)))."""

    def __init__(self, enc_dim: int, pred_dim: int, joiner_dim: int, vocab_size: int):
        super().__init__()
        self.enc_proj = nn.Linear(enc_dim, joiner_dim)
        self.pred_proj = nn.Linear(pred_dim, joiner_dim)
        self.out = nn.Linear(joiner_dim, vocab_size)

    def forward(self, enc_p: torch.Tensor, pred_p: torch.Tensor) -> torch.Tensor:
        """Projected inputs that broadcast against each other -> logits."""
        return self.out(torch.tanh(enc_p + pred_p))


class Transducer(nn.Module):
    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ConformerEncoder(cfg)
        self.predictor = StatelessPredictor(cfg.vocab_size, cfg.pred_dim, cfg.pred_context, cfg.blank_id)
        self.joiner = Joiner(cfg.d_model, cfg.pred_dim, cfg.joiner_dim, cfg.vocab_size)
        self.kd_head = build_kd_head(cfg.kd_type, cfg.d_model, stack_k=cfg.kd_stack,
                                     num_codebooks=cfg.num_codebooks, codebook_size=cfg.codebook_size,
                                     teacher_dim=cfg.teacher_dim)
        if cfg.rnnt_loss == "pruned":  # the simple joiner am[t] + lm[u] that picks the pruned loss's windows
            self.simple_am_proj = nn.Linear(cfg.d_model, cfg.vocab_size)
            self.simple_lm_proj = nn.Linear(cfg.pred_dim, cfg.vocab_size)

    @property
    def blank_id(self) -> int:
        return self.cfg.blank_id

    def out_lengths(self, feat_lens):
        return subsampled_length(feat_lens, self.cfg.subsampling)

    def encode(self, feats: torch.Tensor, feat_lens: torch.Tensor):
        """feats [B, T, num_mel_bins] (padded), feat_lens [B] -> (enc_out, enc_lens, kd_hidden)."""
        if feats.dim() != 3 or feats.shape[2] != self.cfg.num_mel_bins:
            raise ValueError(f"feats must be [B, T, {self.cfg.num_mel_bins}], got {tuple(feats.shape)}")
        feat_lens = torch.as_tensor(feat_lens, device=feats.device)
        if feat_lens.shape != feats.shape[:1] or int(feat_lens.min()) < 1 or int(feat_lens.max()) > feats.shape[1]:
            raise ValueError(f"feat_lens must be [B={feats.shape[0]}] in [1, {feats.shape[1]}], "
                             f"got {feat_lens.tolist()}")
        return self.encoder(feats, feat_lens)

    def transducer_losses(self, enc_out: torch.Tensor, enc_lens: torch.Tensor, targets: torch.Tensor,
                          target_lens: torch.Tensor, reduction: str = "sum") -> dict[str, torch.Tensor]:
        """{"full": RNN-T NLL} or, for rnnt_loss="pruned", {"simple": ..., "pruned": ...} (unscaled)."""
        B, U = targets.shape
        V, J = self.cfg.vocab_size, self.cfg.joiner_dim
        target_lens = torch.as_tensor(target_lens, device=targets.device)
        valid = torch.arange(U, device=targets.device)[None] < target_lens[:, None]
        bad = valid & ((targets < 0) | (targets >= V) | (targets == self.blank_id))
        if bad.any():
            rows = bad.any(1).nonzero().flatten().tolist()
            raise ValueError(f"targets of batch rows {rows} contain blank ({self.blank_id}) or ids outside "
                             f"[0, {V})")
        sos = targets.new_full((B, 1), self.blank_id)
        pred_in = torch.cat([sos, targets.masked_fill(~valid, self.blank_id)], 1)  # [B, U+1]
        pred_out = self.predictor(pred_in)  # [B, U+1, pred_dim]
        pred_p = self.joiner.pred_proj(pred_out)  # [B, U+1, J]
        enc_p = self.joiner.enc_proj(enc_out)  # [B, T, J]
        if self.cfg.rnnt_loss == "pruned":
            def pruned_logits(ranges: torch.Tensor) -> torch.Tensor:  # [B, T, R] -> [B, T, R, V]
                Bq, T, R = ranges.shape
                p = pred_p.gather(1, ranges.reshape(Bq, T * R, 1).expand(-1, -1, J)).view(Bq, T, R, J)
                return self.joiner(enc_p[:, :, None], p)

            simple, pruned = pruned_rnnt_loss(pruned_logits, self.simple_am_proj(enc_out),
                                              self.simple_lm_proj(pred_out), targets, enc_lens, target_lens,
                                              prune_range=self.cfg.prune_range, blank=self.blank_id,
                                              reduction=reduction)
            return {"simple": simple, "pruned": pruned}

        def logits_fn(t0: int, t1: int) -> torch.Tensor:
            return self.joiner(enc_p[:, t0:t1, None], pred_p[:, None])

        chunk = max(1, self.cfg.joiner_chunk_elems // max(1, B * (U + 1) * max(V, J)))
        return {"full": rnnt_loss(logits_fn, targets, enc_lens, target_lens, blank=self.blank_id,
                                  reduction=reduction, chunk_frames=chunk)}

    def combine_transducer_losses(self, losses: dict[str, torch.Tensor], step: int | None = None) -> torch.Tensor:
        """The trained objective: the full NLL, or simple_scale * simple + pruned_scale * pruned (warm-up by step)."""
        if "full" in losses:
            return losses["full"]
        s_scale, p_scale = pruned_loss_scales(step, self.cfg.prune_warmup_steps, self.cfg.simple_loss_scale)
        return s_scale * losses["simple"] + p_scale * losses["pruned"]

    def transducer_loss(self, enc_out: torch.Tensor, enc_lens: torch.Tensor, targets: torch.Tensor,
                        target_lens: torch.Tensor, reduction: str = "sum", step: int | None = None) -> torch.Tensor:
        """RNN-T objective (cfg.rnnt_loss): full NLL with the joiner in frame chunks of at most `joiner_chunk_elems`
        elements, or the scaled simple + pruned losses."""
        return self.combine_transducer_losses(
            self.transducer_losses(enc_out, enc_lens, targets, target_lens, reduction), step)

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor, targets: torch.Tensor,
                target_lens: torch.Tensor, step: int | None = None) -> dict:
        """-> dict(loss_transducer (summed over the batch), transducer_parts (unscaled, summed), enc_out, enc_lens,
        kd_hidden, kd_out (head output or None))."""
        enc_out, enc_lens, kd_hidden = self.encode(feats, feat_lens)
        losses = self.transducer_losses(enc_out, enc_lens, targets, target_lens, reduction="sum")
        loss = self.combine_transducer_losses(losses, step)
        kd_out = self.kd_head(kd_hidden) if self.kd_head is not None else None
        return {"loss_transducer": loss, "transducer_parts": losses, "enc_out": enc_out, "enc_lens": enc_lens,
                "kd_hidden": kd_hidden, "kd_out": kd_out}

    def compute_loss(self, batch: dict, kd_scale: float = 0.0, step: int | None = None) -> tuple[torch.Tensor, dict]:
        """Total loss for a collated batch (distill.data.dataset.collate) and its parts.

        Everything is normalised per student encoder frame: transducer NLL summed over the batch / frames, KD loss
        summed over valid teacher frames / student frames, so `kd_scale` plays the role of icefall's
        codebook_loss_scale (0.1 there for MVQ). total = transducer + kd_scale * kd. With rnnt_loss="pruned",
        "transducer" is simple_scale * simple + pruned_scale * pruned (scales from `step` during
        cfg.prune_warmup_steps) and parts also holds the unscaled "simple" and "pruned" NLLs per frame ("pruned"
        bounds the full NLL from above).
        """
        out = self(batch["feats"], batch["feat_lens"], batch["tokens"], batch["token_lens"], step=step)
        frames = out["enc_lens"].sum().clamp(min=1)
        transducer = out["loss_transducer"] / frames
        total = transducer
        parts = {"transducer": float(transducer.detach()), "frames": int(frames),
                 "utterances": int(batch["feats"].shape[0])}
        for name, value in out["transducer_parts"].items():
            if name != "full":
                parts[name] = float(value.detach() / frames)
        if self.kd_head is not None and kd_scale:
            if "labels" not in batch:
                raise ValueError(f"kd_type={self.cfg.kd_type!r} with kd_scale={kd_scale} but the batch has no "
                                 f"teacher labels (ids {batch.get('ids', '?')})")
            labels, mask = batch["labels"], batch.get("label_mask")
            Tp = out["enc_out"].shape[1]
            if labels.shape[1] != Tp:
                raise ValueError(f"teacher labels have {labels.shape[1]} frames but the student encoder has {Tp} "
                                 f"(ids {batch.get('ids', '?')}); were labels aligned with subsampling="
                                 f"{self.cfg.subsampling}?")
            student_valid = _length_mask(out["enc_lens"], Tp)
            if mask is None:
                mask = student_valid
            else:
                mask = mask.to(torch.bool) & (student_valid if mask.dim() == 2 else student_valid[:, :, None])
            kd = self.kd_head.kd_loss(out["kd_out"], labels, mask, reduction="sum") / frames
            total = total + kd_scale * kd
            parts["kd"] = float(kd.detach())
        parts["total"] = float(total.detach())
        return total, parts

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
