"""Euler sampling of the rectified-flow ODE and classifier-free guidance.

Hand-written rather than diffusers' FlowMatchEulerDiscreteScheduler: that scheduler works in 1000-scaled
timesteps with internal step state, while the loop here is three lines in the model's own t in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from krea2_core.diffusion.flow import VelocityFn, shift_time

# (x (B, N, C), t (B,), text_hidden (B, L, ...), text_mask (B, L)) -> velocity (B, N, C)
ModelFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def inference_timesteps(steps: int, shift: float) -> Tensor:
    """``steps + 1`` times from 1 (noise) to 0 (data), uniform then shifted, float32."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1), shift)


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: Tensor, *, steps: int, shift: float,
                 progress: bool = False) -> Tensor:
    """Integrate ``dx/dt = v(x, t)`` from ``t = 1`` (``noise``) down to ``t = 0`` with ``steps`` Euler steps.

    The state is carried in float32 (a bf16 model still gets inputs in ``noise``'s dtype); returns ``x0`` in
    ``noise``'s dtype.
    """
    times = inference_timesteps(steps, shift).to(noise.device)
    x = noise.float()
    for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        t = times[i].expand(noise.shape[0])
        x = x + (times[i + 1] - times[i]) * velocity_fn(x.to(noise.dtype), t).float()
    return x.to(noise.dtype)


def guided(model_fn: ModelFn, cond: tuple[Tensor, Tensor], uncond: tuple[Tensor, Tensor],
           scale: float) -> VelocityFn:
    """Classifier-free guidance as a velocity function: ``v_u + scale * (v_c - v_u)``.

    ``cond`` and ``uncond`` are ``(text_hidden, text_mask)``; ``uncond`` may have batch 1 (one empty prompt
    for all). Both branches run in one ``model_fn`` call on a doubled batch; ``scale == 1`` runs ``cond`` only.
    """
    (c_hidden, c_mask), (u_hidden, u_mask) = cond, uncond
    if u_hidden.shape[0] == 1:
        u_hidden, u_mask = u_hidden.expand_as(c_hidden), u_mask.expand_as(c_mask)
    if u_hidden.shape != c_hidden.shape or u_mask.shape != c_mask.shape:
        raise ValueError("cond and uncond text must have the same shapes (pad both to one length; uncond may have "
                         f"batch 1), got {tuple(c_hidden.shape)}/{tuple(c_mask.shape)} and "
                         f"{tuple(u_hidden.shape)}/{tuple(u_mask.shape)}")
    if scale == 1.0:
        return lambda x, t: model_fn(x, t, c_hidden, c_mask)
    hidden, mask = torch.cat([c_hidden, u_hidden]), torch.cat([c_mask, u_mask])

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        v_cond, v_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), hidden, mask).chunk(2)
        return torch.lerp(v_uncond, v_cond, scale)

    return velocity
