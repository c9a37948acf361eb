"""Rectified flow with the velocity ("v") target, as in the report's pretraining section.

Convention (diffusers' Krea 2 / Flux): ``x_t = (1 - t) * x0 + t * noise``, ``t`` in [0, 1] with 1 = pure noise,
and the model predicts the constant velocity ``dx_t/dt = noise - x0``. Randomness always comes from an explicit
``torch.Generator`` so a step can be replayed exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, ...), t (B,)) -> velocity (B, ...)

# Fixed noise levels at which validation loss is reported: a per-t curve is comparable across runs and shifts,
# where the loss at randomly drawn t is dominated by which t were drawn.
VALIDATION_TIMESTEPS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def shift_time(t: Tensor, shift: float) -> Tensor:
    """The SD3/Flux resolution shift ``shift * t / (1 + (shift - 1) * t)``: monotone, fixes 0 and 1, and for
    ``shift > 1`` moves mass towards noise (larger images need more noise to destroy the same structure)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(n: int, *, shift: float, generator: torch.Generator, mean: float = 0.0, std: float = 1.0,
                     device: torch.device | str | None = None) -> Tensor:
    """``n`` shifted logit-normal timesteps, float32 (n,): ``shift_time(sigmoid(N(mean, std)), shift)``.

    The draw uses ``generator`` on its own device; the result is moved to ``device`` (default: that device).
    """
    if n < 1 or std <= 0:
        raise ValueError(f"n must be >= 1 and std > 0, got n={n}, std={std}")
    # one expression: a library helper (diffusers.training_utils) would only add an import
    u = torch.randn(n, generator=generator, device=generator.device, dtype=torch.float32).mul_(std).add_(mean)
    return shift_time(torch.sigmoid(u), shift).to(device or generator.device)


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (B,) reshaped to broadcast over ``like``'s trailing dims, in ``like``'s dtype."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape ({like.shape[0]},) to match the batch, got {tuple(t.shape)}")
    return t.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) * x0 + t * noise`` with ``t`` (B,) broadcast over the trailing dims."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
    return torch.lerp(x0, noise, _per_sample(t, x0))


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow velocity ``noise - x0`` (the direction from data to noise)."""
    return noise - x0


def flow_loss(pred: Tensor, x0: Tensor, noise: Tensor, weight: Tensor | None = None) -> Tensor:
    """MSE to the velocity target: mean over each sample's elements, then (optionally ``weight``-ed, (B,)) mean
    over the batch. Computed in float32 whatever ``pred``'s dtype."""
    target = velocity_target(x0, noise)
    if pred.shape != target.shape:
        raise ValueError(f"pred must have the target's shape {tuple(target.shape)}, got {tuple(pred.shape)}")
    per_sample = (pred.float() - target.float()).square().flatten(1).mean(dim=1)
    if weight is not None:
        per_sample = per_sample * _per_sample(weight, per_sample)
    return per_sample.mean()


@torch.no_grad()
def validation_loss(velocity_fn: VelocityFn, x0: Tensor, noise: Tensor,
                    timesteps: tuple[float, ...] = VALIDATION_TIMESTEPS) -> dict[float, float]:
    """Flow loss of ``velocity_fn`` at each fixed ``t`` (same ``x0`` and ``noise`` at every t): {t: loss}."""
    losses = {}
    for t in timesteps:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"validation timesteps must be in [0, 1], got {t}")
        tt = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.float32)
        losses[t] = flow_loss(velocity_fn(add_noise(x0, noise, tt), tt), x0, noise).item()
    return losses
