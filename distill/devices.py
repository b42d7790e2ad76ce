"""Where and in which precision torch computes: `--device` and `--dtype`, parsed and checked in one place.

Every layer uses it (extraction workers, the teacher trainer, the student trainer), so it sits beside
distill/config.py rather than inside one job. Errors are `DeviceError` (a ValueError); each job re-raises it as
its own error class so the CLI reports it with that job's exit status.
"""
from __future__ import annotations

import contextlib
import re

__all__ = ["DeviceError", "DTYPES", "parse_device", "check_device", "torch_device", "check_dtype", "autocast",
           "grad_scaler"]

DTYPES = ("float32", "bfloat16", "float16")


class DeviceError(ValueError):
    """A --device / --dtype value that is malformed or that this machine cannot compute with; names the value."""


def parse_device(device: str, *, cuda_hint: str = "the default GPU") -> tuple[str, int | None]:
    """'cpu' -> ('cpu', None), 'cuda' -> ('cuda', None), 'cuda:N' -> ('cuda', N); anything else is refused."""
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", str(device).strip())
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise DeviceError(f"--device {device!r} is not a device; use cpu, cuda ({cuda_hint}) or cuda:N (GPU N only)")
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def check_device(device: str, *, cuda_hint: str = "the default GPU") -> str:
    """`device`, if this process can compute on it; DeviceError naming the device and why not otherwise."""
    kind, index = parse_device(device, cuda_hint=cuda_hint)
    if kind == "cpu":
        return device
    import torch

    if not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: no CUDA device is usable here (torch {torch.__version__}, "
                          f"torch.cuda.is_available() is False); use --device cpu")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise DeviceError(f"--device {device}: only {count} CUDA device(s) visible here (cuda:0 to "
                          f"cuda:{count - 1})")
    return device


def torch_device(device: str, local_rank: int | None = None):
    """The torch.device to compute on; with `local_rank` (one process per GPU), plain 'cuda' means cuda:<local_rank>."""
    import torch

    kind, index = parse_device(device)
    if kind == "cpu":
        return torch.device("cpu")
    if index is None:
        index = local_rank if local_rank is not None else torch.cuda.current_device()
    return torch.device("cuda", index)


def check_dtype(dtype: str, device: str) -> str:
    """`dtype` if autocast can run the forward in it on `device`'s kind; DeviceError naming both otherwise."""
    import torch

    if dtype not in DTYPES:
        raise DeviceError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == "float32":
        return dtype
    kind = parse_device(device)[0]
    if not torch.amp.is_autocast_available(kind):
        raise DeviceError(f"--dtype {dtype}: torch {torch.__version__} has no autocast on {kind}; use --dtype float32")
    try:  # autocast refuses (or silently disables) dtypes its device type does not support
        with torch.autocast(kind, dtype=getattr(torch, dtype)):
            pass
    except RuntimeError as e:
        raise DeviceError(f"--dtype {dtype} is not supported on {kind} by torch {torch.__version__}: {e}") from None
    if kind == "cuda" and dtype == "bfloat16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"--dtype bfloat16: this GPU ({torch.cuda.get_device_name()}) has no bfloat16 support; "
                          f"use --dtype float16")
    return dtype


def autocast(dtype: str, device):
    """Mixed precision for a forward pass (weights and optimizer state stay float32); a no-op for float32."""
    import torch

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))


def grad_scaler(dtype: str, device):
    """float16 needs loss scaling (its gradients underflow); bfloat16 and float32 do not (a disabled scaler)."""
    import torch

    return torch.amp.GradScaler(torch.device(device).type, enabled=dtype == "float16")
