"""Flow-GRPO's SDE sampler (Liu et al. 2025) for our rectified flow: stochastic rollouts whose every step is a
Gaussian with a known log-probability, the quantity a policy-gradient method needs.

Hand-written: no maintained library implements Flow-GRPO's sampler for our model and convention.

Convention (krea2_core/diffusion/flow.py): ``x_t = (1 - t) x0 + t noise``, ``v = noise - x0``, sampling runs
t = 1 -> 0 and the Euler ODE step is ``x' = x + (t' - t) v``. With the model's v, the posterior means are
``x0_hat = x - t v`` and ``eps_hat = x + (1 - t) v``, so the score of the marginal is
``grad log p_t(x) = -eps_hat / t``. For any ``sigma_t``, the reverse-time SDE
``dx = [-v + sigma_t^2 / 2 * score] ds + sigma_t dW`` (s = -t increasing) has the ODE's marginals. One
Euler-Maruyama step over ``dt = t - t' > 0`` is Gaussian:

    mean = x - dt * (v + sigma_t^2 / (2 t) * (x + (1 - t) v)),   std = sigma_t * sqrt(dt),

with Flow-GRPO's ``sigma_t = noise_level * sqrt(t / (1 - t))``. It diverges at t = 1, so ``1 - t`` is floored at
``dt``: at the first step this is Flow-GRPO's own choice (there it evaluates ``1 - t`` at the next grid point,
``1 - t' = dt``), and elsewhere it caps the injected variance ``std^2`` at ``noise_level^2 * t``.

The last step (to t = 0, where ``sigma`` vanishes in the limit) is the deterministic ODE step, as in Flow-GRPO:
it has no log-probability and is never trained. Log-probabilities are the Gaussian's per element, averaged over
each sample's elements (Flow-GRPO's normalisation, which keeps ratios of different image sizes comparable).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from krea2_core.diffusion.flow import VelocityFn
from krea2_core.diffusion.sampling import inference_timesteps
from krea2_core.diffusion.text_to_image import TextToImage

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def sde_sigma(t: float, dt: float, noise_level: float) -> float:
    """``noise_level * sqrt(t / (1 - t))`` with ``1 - t`` floored at the step size ``dt`` (module docstring)."""
    return noise_level * math.sqrt(t / max(1.0 - t, dt))


def sde_step(x: Tensor, v: Tensor, t: float, t_next: float, noise_level: float) -> tuple[Tensor, float]:
    """(mean float32, std) of the stochastic step from ``x`` at ``t`` to ``t_next < t`` given the velocity ``v``."""
    if not 0.0 <= t_next < t <= 1.0:
        raise ValueError(f"an SDE step needs 0 <= t_next < t <= 1, got t={t}, t_next={t_next}")
    dt = t - t_next
    sigma = sde_sigma(t, dt, noise_level)
    x, v = x.float(), v.float()
    mean = x - dt * (v + sigma**2 / (2 * t) * (x + (1 - t) * v))
    return mean, sigma * math.sqrt(dt)


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: float) -> Tensor:
    """log N(sample; mean, std^2) per element, averaged over each sample's elements: (B,) float32."""
    z = (sample.float() - mean) / std
    return (-0.5 * z.square() - math.log(std) - _HALF_LOG_2PI).flatten(1).mean(dim=1)


def gaussian_kl(mean: Tensor, mean_ref: Tensor, std: float) -> Tensor:
    """KL between two steps of one std, ``||mean - mean_ref||^2 / (2 std^2)`` averaged over elements: (B,)."""
    return ((mean - mean_ref).square() / (2 * std**2)).flatten(1).mean(dim=1)


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """Sample ``index``'s generator in round ``step``: its noise does not depend on which rank draws it, and a
    resumed run draws it again."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence((seed, step, index)).generate_state(1, np.uint64)[0]))


@torch.no_grad()
def sde_trajectory(velocity_fn: VelocityFn, noise: Tensor, times: Tensor, noise_level: float,
                   generators: Sequence[torch.Generator]) -> tuple[Tensor, Tensor]:
    """Sample from ``noise`` (B, ...) over ``times`` (T + 1 from 1 down to 0): SDE steps, then the ODE step to the
    last time. Sample b's step noise comes from ``generators[b]`` (on the CPU). Returns the states
    (T + 1, B, ...) float32 and the log-probabilities (T - 1, B) of the stochastic steps' outcomes."""
    if len(generators) != noise.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {noise.shape[0]}")
    if times.ndim != 1 or len(times) < 3:
        raise ValueError(f"times must hold at least 3 points (one SDE step and the final ODE step), got {len(times)}")
    grid = times.tolist()
    x = noise.float()
    states, log_probs = [x], []
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
        v = velocity_fn(x, torch.full((x.shape[0],), t, device=x.device)).float()
        if i == len(grid) - 2:
            x = x + (t_next - t) * v
        else:
            mean, std = sde_step(x, v, t, t_next, noise_level)
            eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x.device)
            x = mean + std * eps
            log_probs.append(gaussian_log_prob(x, mean, std))
        states.append(x)
    return torch.stack(states), torch.stack(log_probs)


@dataclass
class Rollout:
    """A batch of SDE samples (no CFG) with what training needs to recompute each step's log-probability."""

    states: Tensor  # (T + 1, B, N, C) float32 image tokens: states[0] noise, states[-1] the samples
    log_probs: Tensor  # (T - 1, B): log p(states[i + 1] | states[i]) of the stochastic steps (the last is ODE)
    times: Tensor  # (T + 1,) from 1 to 0
    text: Tensor  # (B, L, ...) text hidden states, one encoding per distinct prompt
    mask: Tensor  # (B, L)
    grid: tuple[int, int]
    images: list[Image.Image]


@torch.no_grad()
def sde_rollout(pipe: TextToImage, prompts: Sequence[str], sample_index: Sequence[int], *, steps: int, shift: float,
                noise_level: float, seed: int, step: int, width: int, height: int) -> Rollout:
    """One SDE sample per prompt over the ``steps``-step shifted inference grid, without CFG. Sample i's noise
    comes from ``sample_generator(seed, step, sample_index[i])``, so a slice of a batch samples what the
    whole batch samples for it."""
    if len(prompts) != len(sample_index):
        raise ValueError(f"{len(prompts)} prompts for {len(sample_index)} sample indices")
    if steps < 2:
        raise ValueError(f"SDE rollouts need steps >= 2 (the last step is deterministic), got {steps}")
    grid = pipe.token_grid(width, height)
    distinct = list(dict.fromkeys(prompts))
    text, mask = pipe.text_encoder.encode(distinct)
    rows = torch.tensor([distinct.index(p) for p in prompts])
    text, mask = text[rows].to(pipe.device), mask[rows].to(pipe.device)
    generators = [sample_generator(seed, step, i) for i in sample_index]
    shape = (grid[0] * grid[1], pipe.autoencoder.channels * pipe.patch_size**2)
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(pipe.device)
    times = inference_timesteps(steps, shift)
    states, log_probs = sde_trajectory(lambda x, t: pipe.velocity(x, t, grid, text, mask), noise, times, noise_level,
                                       generators)
    return Rollout(states, log_probs, times, text, mask, grid, pipe.decode(states[-1], grid))
