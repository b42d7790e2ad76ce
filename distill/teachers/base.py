"""The contract every teacher meets, so the extraction job can treat HF and native checkpoints alike.

Frame counts are pure functions of sample counts (known before any audio is read), and `embed` results for an
utterance do not depend on what else is in the batch: the stored labels must not change with batching.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import torch

__all__ = ["Teacher", "TeacherError", "TeacherFileNotFoundError", "sha256_of_files", "min_samples_for",
           "TEACHER_DTYPES"]

# Weight dtypes a teacher can run in. Checkpoints load as float32; half precision halves the weights' memory and
# uses a GPU's tensor cores, at the cost of different frames (so different codes: the store records the dtype).
TEACHER_DTYPES = ("float32", "float16", "bfloat16")


class TeacherError(ValueError):
    """A teacher checkpoint cannot be used as asked (unknown format, bad file, layer out of range); the message
    names the file or option and what to do."""


class TeacherFileNotFoundError(TeacherError, FileNotFoundError):
    """The teacher checkpoint does not exist (a TeacherError for the CLI, a FileNotFoundError for callers)."""


def sha256_of_files(paths: Iterable[str], *, opener=open) -> str:
    """sha256 over the concatenated bytes of `paths` in the given order (one file: the usual sha256sum)."""
    h = hashlib.sha256()
    for p in paths:
        with opener(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def min_samples_for(num_frames, upper: int = 1 << 20) -> int:
    """Smallest sample count giving at least one frame (num_frames is monotone), by binary search."""
    lo, hi = 1, upper
    if num_frames(hi) < 1:
        raise TeacherError("teacher produces no frames even for very long inputs")
    while lo < hi:
        mid = (lo + hi) // 2
        if num_frames(mid) >= 1:
            hi = mid
        else:
            lo = mid + 1
    return lo


class Teacher:
    """A frozen speech encoder that turns waveforms into frame embeddings taken at one layer.

    Attributes: sample_rate (Hz the waveforms must have), frame_rate (frames per second), dim (embedding size),
    layer (which hidden state is returned), num_layers, name, checkpoint_sha256 (of the weight file bytes),
    min_samples (shortest input that yields a frame), source (where it was loaded from), format.
    """

    sample_rate: int
    frame_rate: float
    dim: int
    layer: int
    num_layers: int
    name: str
    checkpoint_sha256: str
    min_samples: int
    source: str
    format: str
    module: torch.nn.Module

    # -- to implement
    def num_frames(self, num_samples: int) -> int:
        """Exact number of output frames for an utterance of `num_samples` samples (0 if too short)."""
        raise NotImplementedError

    def _embed(self, waveforms: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """[B, S] on device, valid lengths -> [B, max_frames, dim]; padded frames may hold anything."""
        raise NotImplementedError

    # -- shared
    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device) -> "Teacher":
        self.module.to(device)
        return self

    def eval(self) -> "Teacher":
        self.module.eval()
        return self

    @property
    def dtype(self) -> str:
        """Name of the weights' dtype (one of TEACHER_DTYPES): what the layers compute in."""
        return str(next(self.module.parameters()).dtype).removeprefix("torch.")

    def set_dtype(self, dtype: str) -> "Teacher":
        """Cast the weights to `dtype` (TEACHER_DTYPES). Front ends (log-mel, waveform normalisation) stay float32
        and each teacher casts their output to the weights' dtype; `embed` still returns float32 frames."""
        if dtype not in TEACHER_DTYPES:
            raise TeacherError(f"teacher dtype {dtype!r} unknown; choose one of {', '.join(TEACHER_DTYPES)}")
        self.module.to(getattr(torch, dtype))
        return self

    def metadata(self) -> dict:
        """Provenance to store next to the labels (what produced these frames)."""
        return {"name": self.name, "format": self.format, "source": self.source, "layer": self.layer,
                "num_layers": self.num_layers, "dim": self.dim, "sample_rate": self.sample_rate,
                "frame_rate": self.frame_rate, "checkpoint_sha256": self.checkpoint_sha256, "dtype": self.dtype}

    def frame_lengths(self, lengths: Sequence[int]) -> list[int]:
        return [self.num_frames(int(n)) for n in lengths]

    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= self.num_layers:
            raise TeacherError(f"teacher {self.name!r} ({self.source}): layer {layer!r} out of range; "
                             f"valid layers are 0..{self.num_layers} (0 = input of the first transformer layer)")
        return layer

    def embed(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a padded batch: waveforms [B, S] float32 at `sample_rate`, lengths [B] valid samples.

        Returns (frames [B, T, dim] float32 on the teacher's device, zero beyond each utterance's frame count;
        frame_lengths [B] int64 on the same device), with T = max frame count. Each utterance's frames are the
        same whether it is embedded alone or inside any padded batch.
        """
        if not isinstance(waveforms, torch.Tensor) or waveforms.dim() != 2:
            raise ValueError(f"teacher {self.name!r}: waveforms must be a [B, S] tensor, got "
                             f"{getattr(waveforms, 'shape', type(waveforms))}")
        lens = [int(n) for n in torch.as_tensor(lengths).reshape(-1).tolist()]
        if len(lens) != waveforms.shape[0]:
            raise ValueError(f"teacher {self.name!r}: {len(lens)} lengths for a batch of {waveforms.shape[0]}")
        for b, n in enumerate(lens):
            if n > waveforms.shape[1]:
                raise ValueError(f"teacher {self.name!r}: batch item {b} has length {n} > padded width "
                                 f"{waveforms.shape[1]}")
            if n < self.min_samples:
                raise ValueError(f"teacher {self.name!r}: batch item {b} has {n} samples; at least "
                                 f"{self.min_samples} are needed for one frame")
        dev = self.device
        with torch.inference_mode():
            wav = waveforms.to(device=dev, dtype=torch.float32)
            if lens:
                wav = wav[:, :max(lens)]
            nfr = self.frame_lengths(lens)
            if not lens:
                return (torch.zeros(0, 0, self.dim, device=dev), torch.zeros(0, dtype=torch.long, device=dev))
            # zero the padding so no implementation can pick up garbage from it
            valid = torch.arange(wav.shape[1], device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
            wav = torch.where(valid, wav, torch.zeros((), device=dev))
            frames = self._embed(wav, lens)
            t_max = max(nfr)
            if frames.shape[1] < t_max:
                raise RuntimeError(f"teacher {self.name!r}: produced {frames.shape[1]} frames, expected {t_max}")
            frames = frames[:, :t_max].to(torch.float32)
            flen = torch.tensor(nfr, dtype=torch.long, device=dev)
            fmask = torch.arange(t_max, device=dev)[None, :] < flen[:, None]
            frames = torch.where(fmask[..., None], frames, torch.zeros((), device=dev))
        return frames, flen

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, layer={self.layer}/{self.num_layers}, dim={self.dim}, "
                f"sample_rate={self.sample_rate}, frame_rate={self.frame_rate}, "
                f"sha256={self.checkpoint_sha256[:12]}..., source={self.source!r})")
