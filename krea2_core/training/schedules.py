"""Warmup-stable-decay (WSD) learning-rate schedule, used for every pretraining stage (report: Pretraining)."""

from __future__ import annotations

from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def wsd_factor(step: int, *, total_steps: int, warmup_steps: int, decay_fraction: float,
               min_factor: float = 0.0) -> float:
    """LR multiplier for the 0-based optimizer ``step``.

    Warmup: ``(step + 1) / warmup_steps`` over the first ``warmup_steps`` steps (reaching 1 on the last of them).
    Stable: 1. Decay: linear over the last ``round(decay_fraction * total_steps)`` steps, from 1 on the first
    decay step towards ``min_factor``, which is reached at ``step == total_steps`` (so every step still learns)
    and held after. Where warmup and decay overlap the smaller factor wins.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must be in [0, 1], got {decay_fraction}")
    if not 0.0 <= min_factor <= 1.0:
        raise ValueError(f"min_factor must be in [0, 1], got {min_factor}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    decay_steps = round(decay_fraction * total_steps)
    remaining = max(0, total_steps - step)
    decay = min_factor + (1.0 - min_factor) * min(1.0, remaining / decay_steps) if decay_steps else 1.0
    return min(warm, decay)


def wsd_scheduler(optimizer: Optimizer, *, total_steps: int, warmup_steps: int, decay_fraction: float,
                  min_factor: float = 0.0) -> LambdaLR:
    """A LambdaLR applying ``wsd_factor`` to every param group's base LR; call ``.step()`` after each
    ``optimizer.step()``. Arguments are checked here, not on the first step."""
    factor = partial(wsd_factor, total_steps=total_steps, warmup_steps=warmup_steps, decay_fraction=decay_fraction,
                     min_factor=min_factor)
    factor(0)
    return LambdaLR(optimizer, factor)
