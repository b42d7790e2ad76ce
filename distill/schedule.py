"""The learning-rate schedule both trainers (teacher CTC, student transducer) use."""
from __future__ import annotations

import math


def warmup_cosine_lr(step: int, total: int, *, peak: float, warmup: int, final_ratio: float) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to `peak * final_ratio` at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
