"""The seeding rule of training draws: one CPU generator per (seed, *keys), e.g. (seed, step, global sample index),
so a step's draws replay exactly after a resume and at any world size (ranks hold slices of one global batch).

Sampling keeps its own rules, fixed by the measured results: ``TextToImage.generate``'s per-image noise and the
Flow-GRPO rollouts' ``flow_sde.sample_generator``.
"""

from __future__ import annotations

import torch

# one large prime per key: (seed, step, index) -> (seed * P0 + step) * P1 + index, distinct for every triple in range
_KEY_PRIMES = (1_000_003, 1_000_033)


def rng(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by (seed, *keys), at most two keys: e.g. (seed, step, global sample index)."""
    if len(keys) > len(_KEY_PRIMES):
        raise ValueError(f"rng takes at most {len(_KEY_PRIMES)} keys after the seed, got {len(keys)}")
    value = seed
    for prime, key in zip(_KEY_PRIMES, keys, strict=False):  # checked above: no more keys than primes
        value = value * prime + key
    return torch.Generator().manual_seed(value)
