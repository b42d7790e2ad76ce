"""Our own teacher encoder (log-mel -> conv subsampling -> pre-norm transformer) and its checkpoint format.

The project trains it itself (a "larger teacher" on synthetic speech), so it must be padding-invariant by
construction: log-mel frames never straddle the end of an utterance, convolutions are unpadded, attention uses
key padding masks and all norms are per-frame LayerNorms. Checkpoints are one safetensors file whose metadata
carries the config, so loading needs no code execution and no pickle.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ci_store.fsio import write_file
from distill.config import JSONConfig
from distill.teachers.base import Teacher, TeacherError, min_samples_for

__all__ = ["NATIVE_FORMAT", "NATIVE_VERSION", "NativeTeacherConfig", "NativeTeacherModel", "NativeTeacherOutput",
           "NativeTeacher", "log_mel", "num_mel_frames", "mel_filterbank", "save_native_teacher",
           "load_native_model", "read_safetensors_metadata"]

NATIVE_FORMAT = "ci-store-teacher"
NATIVE_VERSION = 1


# ---------------------------------------------------------------------------------------------- log-mel

def _mel_params(sample_rate: int) -> tuple[int, int, int]:
    """(window, hop, n_fft) for 25 ms windows every 10 ms."""
    win = int(round(0.025 * sample_rate))
    hop = int(round(0.010 * sample_rate))
    return win, hop, 1 << (win - 1).bit_length()


def num_mel_frames(num_samples: int, sample_rate: int) -> int:
    """Frames of `log_mel`: only whole windows inside the signal (no edge padding), so padding cannot leak in."""
    win, hop, _ = _mel_params(sample_rate)
    return 0 if num_samples < win else (int(num_samples) - win) // hop + 1


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, num_mels: int, fmin: float = 20.0,
                   fmax: float | None = None) -> np.ndarray:
    """[n_fft//2 + 1, num_mels] triangular HTK-mel filters (float32), triangles drawn on the mel axis."""
    fmax = sample_rate / 2 if fmax is None else fmax

    def mel(f):
        return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)

    edges = np.linspace(mel(fmin), mel(fmax), num_mels + 2)
    bins = mel(np.arange(n_fft // 2 + 1) * sample_rate / n_fft)
    lo, centre, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins[None, :] - lo) / (centre - lo)
    down = (hi - bins[None, :]) / (hi - centre)
    fb = np.clip(np.minimum(up, down), 0.0, None)
    return fb.T.astype(np.float32)


def log_mel(wave: torch.Tensor, sample_rate: int, num_mels: int = 80, *, filterbank: torch.Tensor | None = None,
            window: torch.Tensor | None = None) -> torch.Tensor:
    """Log-mel energies [..., T, num_mels] of waveforms [..., S]: 25 ms Hann windows (DC removed) every 10 ms,
    power spectrum, `num_mels` mel bands from 20 Hz to Nyquist, natural log floored at 1e-10. Deterministic;
    each frame depends on its own samples only, so padded batches give the same frames as single utterances."""
    win, hop, n_fft = _mel_params(sample_rate)
    if filterbank is None:
        filterbank = torch.from_numpy(mel_filterbank(sample_rate, n_fft, num_mels)).to(wave.device)
    if window is None:
        window = torch.hann_window(win, periodic=False, dtype=torch.float32, device=wave.device)
    if wave.shape[-1] < win:
        return wave.new_zeros(*wave.shape[:-1], 0, num_mels)
    frames = wave.to(torch.float32).unfold(-1, win, hop)
    frames = (frames - frames.mean(dim=-1, keepdim=True)) * window
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2)
    return torch.log(torch.matmul(power, filterbank).clamp_min(1e-10))


# ---------------------------------------------------------------------------------------------- model

@dataclass
class NativeTeacherConfig(JSONConfig):
    """Hyper-parameters of NativeTeacherModel; stored as JSON in the checkpoint metadata."""

    sample_rate: int = 16000
    num_mels: int = 80
    d_model: int = 256
    num_heads: int = 4
    ffn_dim: int = 1024
    num_layers: int = 6
    dropout: float = 0.1
    vocab_size: int | None = None  # adds a CTC head when set (for training the teacher)

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise TeacherError(f"d_model {self.d_model} must be divisible by num_heads {self.num_heads}")
        if self.num_layers < 1:
            raise TeacherError("num_layers must be >= 1")

    config_error = TeacherError  # an unknown key in a checkpoint's config is a bad checkpoint


class NativeTeacherOutput(NamedTuple):
    hidden_states: list  # [num_computed_layers + 1] of [B, T, d_model]; [0] = input to layer 1, [i] = layer i out
    output: torch.Tensor | None  # final LayerNorm of the last layer (None when stopped early via max_layer)
    frame_lengths: torch.Tensor  # [B] int64
    logits: torch.Tensor | None  # [B, T, vocab] from the CTC head, if any and computed


class _EncoderLayer(nn.Module):
    """Pre-norm transformer layer; attention ignores padded keys via a boolean mask."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ffn)
        self.ff2 = nn.Linear(ffn, d)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], dropout_p=p)
        x = x + F.dropout(self.out(a.transpose(1, 2).reshape(b, t, d)), p, self.training)
        h = F.dropout(F.gelu(self.ff1(self.norm2(x))), p, self.training)
        x = x + F.dropout(self.ff2(h), p, self.training)
        return x * valid[..., None]


def _sinusoids(t: int, d: int, device) -> torch.Tensor:
    pos = torch.arange(t, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(t, d, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: d // 2])
    return pe


class NativeTeacherModel(nn.Module):
    """Waveform -> 80-dim log-mel (100 Hz) -> two unpadded convs (k3 s1, k3 s2: 50 Hz) -> sinusoidal positions ->
    pre-norm transformer layers -> final LayerNorm (-> optional CTC head). Trainable; see NativeTeacherOutput."""

    def __init__(self, config: NativeTeacherConfig | None = None, **overrides):
        super().__init__()
        config = config or NativeTeacherConfig()
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        c = config
        fb, window = self._front_end_tables(None)
        self.register_buffer("mel_fb", fb, persistent=False)
        self.register_buffer("window", window, persistent=False)
        self.input_norm = nn.LayerNorm(c.num_mels)
        self.conv1 = nn.Conv1d(c.num_mels, c.d_model, kernel_size=3, stride=1)
        self.conv2 = nn.Conv1d(c.d_model, c.d_model, kernel_size=3, stride=2)
        self.embed_norm = nn.LayerNorm(c.d_model)
        self.layers = nn.ModuleList(_EncoderLayer(c.d_model, c.num_heads, c.ffn_dim, c.dropout)
                                    for _ in range(c.num_layers))
        self.final_norm = nn.LayerNorm(c.d_model)
        self.ctc_head = nn.Linear(c.d_model, c.vocab_size) if c.vocab_size else None

    def _front_end_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-mel filterbank and window, float32 (exact values, whatever dtype the weights have)."""
        c = self.config
        win, _, n_fft = _mel_params(c.sample_rate)
        fb = torch.from_numpy(mel_filterbank(c.sample_rate, n_fft, c.num_mels)).to(device)
        return fb, torch.hann_window(win, periodic=False, dtype=torch.float32, device=device)

    def keep_front_end_float32(self) -> None:
        """After a cast of the whole module (`.to(torch.bfloat16)` casts buffers too): the log-mel runs in float32."""
        self.mel_fb, self.window = self._front_end_tables(self.mel_fb.device)

    @property
    def frame_rate(self) -> float:
        _, hop, _ = _mel_params(self.config.sample_rate)
        return self.config.sample_rate / (2 * hop)  # 10 ms hop, x2 subsampling

    def num_frames(self, num_samples: int) -> int:
        t = num_mel_frames(num_samples, self.config.sample_rate) - 2  # conv1: k=3, s=1
        return 0 if t < 3 else (t - 3) // 2 + 1  # conv2: k=3, s=2

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor, *,
                max_layer: int | None = None) -> NativeTeacherOutput:
        """waveforms [B, S] at config.sample_rate, lengths [B]. `max_layer` stops after that many layers."""
        c = self.config
        lens = [int(n) for n in torch.as_tensor(lengths).reshape(-1).tolist()]
        nfr = [self.num_frames(n) for n in lens]
        if any(n < 1 for n in nfr):
            bad = [i for i, n in enumerate(nfr) if n < 1]
            raise ValueError(f"batch items {bad} are too short for one frame "
                             f"(need >= {min_samples_for(self.num_frames)} samples)")
        x = waveforms[:, :max(lens)]
        mel = log_mel(x, c.sample_rate, c.num_mels, filterbank=self.mel_fb, window=self.window)
        feats = self.input_norm(mel.to(self.input_norm.weight.dtype))  # float32 weights: a no-op
        h = F.gelu(self.conv1(feats.transpose(1, 2)))
        h = F.gelu(self.conv2(h)).transpose(1, 2)
        t = max(nfr)
        h = h[:, :t]
        flen = torch.tensor(nfr, dtype=torch.long, device=h.device)
        valid = torch.arange(t, device=h.device)[None, :] < flen[:, None]
        h = self.embed_norm(h) + _sinusoids(t, c.d_model, h.device).to(h.dtype)
        h = F.dropout(h, c.dropout, self.training) * valid[..., None]
        hidden = [h]
        n_run = c.num_layers if max_layer is None else max(0, min(int(max_layer), c.num_layers))
        for layer in self.layers[:n_run]:
            h = layer(h, valid)
            hidden.append(h)
        output = logits = None
        if n_run == c.num_layers:
            output = self.final_norm(h) * valid[..., None]
            if self.ctc_head is not None:
                logits = self.ctc_head(output)
        return NativeTeacherOutput(hidden, output, flen, logits)


# ---------------------------------------------------------------------------------------------- file format

def read_safetensors_metadata(data: bytes) -> dict:
    """The `__metadata__` dict of a safetensors blob (header only; nothing is executed)."""
    if len(data) < 8:
        raise TeacherError("not a safetensors file (too short)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise TeacherError("not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TeacherError("not a safetensors file (header is not JSON)") from None
    return dict(header.get("__metadata__") or {})


def _canonical_header(data: bytes) -> bytes:
    """Re-emit the safetensors header with sorted keys: the library orders metadata arbitrarily, and equal
    weights must give equal bytes (hence equal checkpoint_sha256)."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode("utf-8")
    header += b" " * (-(8 + len(header)) % 8)  # keep the tensor data 8-byte aligned, as safetensors does
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


def save_native_teacher(model, path: str, *, storage_options: dict | None = None) -> str:
    """Write `model` (NativeTeacherModel or a NativeTeacher wrapping one) as one safetensors file with metadata
    {"format": "ci-store-teacher", "version": "1", "config": JSON}; returns the file's sha256 (local files are
    replaced atomically)."""
    from safetensors.torch import save

    if isinstance(model, NativeTeacher):
        model = model.model
    if not isinstance(model, NativeTeacherModel):
        raise TypeError(f"expected a NativeTeacherModel, got {type(model).__name__}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": NATIVE_FORMAT, "version": str(NATIVE_VERSION),
            "config": json.dumps(model.config.to_dict(), sort_keys=True)}
    data = _canonical_header(save(state, metadata=meta))
    write_file(path, data, storage_options)
    return hashlib.sha256(data).hexdigest()


def _model_from_bytes(data: bytes, source: str) -> NativeTeacherModel:
    from safetensors.torch import load

    meta = read_safetensors_metadata(data)
    if meta.get("format") != NATIVE_FORMAT:
        raise TeacherError(f"{source}: safetensors file is not a {NATIVE_FORMAT} checkpoint "
                         f"(metadata format={meta.get('format')!r})")
    if meta.get("version") != str(NATIVE_VERSION):
        raise TeacherError(f"{source}: unsupported {NATIVE_FORMAT} version {meta.get('version')!r} "
                         f"(this code reads version {NATIVE_VERSION})")
    try:
        config = NativeTeacherConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise TeacherError(f"{source}: bad native teacher config in metadata ({e})") from None
    model = NativeTeacherModel(config)
    try:
        model.load_state_dict(load(data), strict=True)
    except RuntimeError as e:
        raise TeacherError(f"{source}: weights do not match the stored config ({e})") from None
    return model


def load_native_model(path: str, *, storage_options: dict | None = None) -> tuple[NativeTeacherModel, str]:
    """(trainable NativeTeacherModel, sha256 of the file) from a native checkpoint, e.g. to resume training."""
    with fsspec.open(path, "rb", **(storage_options or {})) as f:
        data = f.read()
    return _model_from_bytes(data, path), hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- teacher

class NativeTeacher(Teacher):
    """Teacher interface over NativeTeacherModel; layer 0 = input of the first layer, i = output of layer i."""

    format = "native"

    def __init__(self, model: NativeTeacherModel, *, layer: int, name: str = "native", checkpoint_sha256: str = "",
                 source: str = "<memory>"):
        self.model = self.module = model.eval()
        c = model.config
        self.name, self.source, self.checkpoint_sha256 = name, source, checkpoint_sha256
        self.sample_rate, self.dim, self.num_layers = c.sample_rate, c.d_model, c.num_layers
        self.frame_rate = model.frame_rate
        self.layer = self._check_layer(layer)
        self.min_samples = min_samples_for(self.num_frames)

    @classmethod
    def from_bytes(cls, data: bytes, *, layer: int, source: str) -> "NativeTeacher":
        stem = os.path.basename(source.rstrip("/")).rsplit(".safetensors", 1)[0] or "native"
        return cls(_model_from_bytes(data, source), layer=layer, name=stem,
                   checkpoint_sha256=hashlib.sha256(data).hexdigest(), source=source)

    def num_frames(self, num_samples: int) -> int:
        return self.model.num_frames(num_samples)

    def set_dtype(self, dtype: str) -> "NativeTeacher":
        super().set_dtype(dtype)
        self.model.keep_front_end_float32()
        return self

    def _embed(self, waveforms: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        out = self.model(waveforms, torch.tensor(lengths), max_layer=self.layer)
        return out.hidden_states[self.layer]
