"""The RL prompt pool: prompt selection as a resource-allocation problem.

Rounds spend their rollouts where the model can still learn. Every scored group updates its prompt's statistics;
a group is uninformative when it is saturated (mean >= ``too_easy``), hopeless (mean <= ``hopeless``) or has no
variance (std < ``min_std``), checked in that order, since a saturated or hopeless group usually has no variance
either and its mean says why. Each uninformative group in a row multiplies the prompt's sampling weight by
``downweight`` (floored at ``downweight ** drop_after``); an informative group resets it to 1. After ``drop_after``
uninformative groups in a row the prompt is dropped, unless that would leave fewer than ``min_active`` prompts:
then the candidates whose last group varied most stay.

``draw`` changes nothing, so the prompts of round ``step`` follow from (seed, step, state) alone and a run resumed
from ``state_dict`` draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np
import pandas as pd

from krea2_core.post.config import PromptPoolConfig
from krea2_core.world.captions import Prompt, sample_prompts

REASONS = ("too_easy", "hopeless", "no_variance")
ACTIVE, DROPPED = "active", "dropped"
_STATE_ARRAYS = {"draws": np.int64, "samples": np.int64, "reward_sum": np.float64, "last_mean": np.float64,
                 "last_std": np.float64, "streak": np.int64, "dropped": bool}


def rl_prompts(config: PromptPoolConfig, resolution: int) -> list[Prompt]:
    """The pool's world prompts (with rubrics), seeded apart from evaluation and preference prompts."""
    rng = np.random.default_rng(config.seed)
    return [prompt for prompt, _ in sample_prompts(rng, config.n_prompts, resolution, resolution,
                                                   **config.scenes.sample_kwargs())]


def _fingerprint(prompts: Sequence[Prompt]) -> str:
    return hashlib.sha256(json.dumps([p.to_dict() for p in prompts]).encode()).hexdigest()


class PromptPool:
    def __init__(self, prompts: Sequence[Prompt], config: PromptPoolConfig) -> None:
        if len(prompts) < config.min_active:
            raise ValueError(f"{len(prompts)} prompts but min_active is {config.min_active}")
        self.prompts = list(prompts)
        self.config = config
        self._fingerprint = _fingerprint(self.prompts)
        n = len(self.prompts)
        self.draws = np.zeros(n, np.int64)  # groups scored
        self.samples = np.zeros(n, np.int64)
        self.reward_sum = np.zeros(n, np.float64)
        self.last_mean = np.full(n, np.nan)
        self.last_std = np.full(n, np.nan)
        self.streak = np.zeros(n, np.int64)  # uninformative groups in a row
        self.dropped = np.zeros(n, bool)
        self.reason = [""] * n  # why the last group was uninformative ("" when it was informative or none yet)
        self.informative_fraction: float | None = None  # of the last update's groups

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def weights(self) -> np.ndarray:
        """Sampling weight per prompt; 0 once dropped."""
        c = self.config
        return np.where(self.dropped, 0.0, c.downweight ** np.minimum(self.streak, c.drop_after))

    @property
    def active(self) -> np.ndarray:
        return np.flatnonzero(~self.dropped)

    def draw(self, n: int, step: int) -> np.ndarray:
        """``n`` distinct active prompt indices, drawn with probability proportional to their weights."""
        if n < 1 or step < 0:
            raise ValueError(f"need n >= 1 and step >= 0, got n={n}, step={step}")
        active = self.active
        if n > len(active):
            raise ValueError(f"cannot draw {n} distinct prompts: only {len(active)} are active "
                             f"(min_active must be >= the prompts drawn per round)")
        weights = self.weights[active]
        rng = np.random.default_rng([self.config.seed, step])
        return rng.choice(active, size=n, replace=False, p=weights / weights.sum())

    def update(self, indices: Sequence[int], rewards: np.ndarray) -> None:
        """Record one group of rubric rewards per prompt: ``rewards[i]`` are the samples of ``indices[i]``."""
        idx = np.asarray(indices)
        rewards = np.asarray(rewards, dtype=np.float64)
        if idx.ndim != 1 or len(idx) == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be a non-empty 1-d sequence of ints, got {idx!r}")
        if rewards.ndim != 2 or rewards.shape[0] != len(idx) or rewards.shape[1] < 2:
            raise ValueError(f"rewards must have shape ({len(idx)}, group_size >= 2), got {rewards.shape}")
        if not np.isfinite(rewards).all():
            raise ValueError("rewards contain NaN or inf")
        if idx.min() < 0 or idx.max() >= len(self):
            raise ValueError(f"prompt indices must be in [0, {len(self)}), got {idx.tolist()}")
        if len(np.unique(idx)) != len(idx):
            raise ValueError(f"prompt indices repeat: {idx.tolist()}")
        if self.dropped[idx].any():
            raise ValueError(f"prompts {idx[self.dropped[idx]].tolist()} were dropped and cannot be scored")

        c = self.config
        means, stds = rewards.mean(axis=1), rewards.std(axis=1)
        reasons = np.select([means >= c.too_easy, means <= c.hopeless, stds < c.min_std], REASONS, "")
        self.draws[idx] += 1
        self.samples[idx] += rewards.shape[1]
        self.reward_sum[idx] += rewards.sum(axis=1)
        self.last_mean[idx], self.last_std[idx] = means, stds
        self.streak[idx] = np.where(reasons == "", 0, self.streak[idx] + 1)
        for i, reason in zip(idx.tolist(), reasons.tolist(), strict=True):
            self.reason[i] = reason
        self.informative_fraction = float(np.mean(reasons == ""))
        self._drop_stale()

    def _drop_stale(self) -> None:
        candidates = np.flatnonzero(~self.dropped & (self.streak >= self.config.drop_after))
        room = len(self.active) - self.config.min_active
        # the candidates whose last group varied least go first (stable: lower index first on ties)
        order = candidates[np.argsort(self.last_std[candidates], kind="stable")]
        self.dropped[order[:max(room, 0)]] = True

    def metrics(self) -> dict[str, float]:
        """``pool.*`` metrics for the run; ``mean_reward`` and ``informative_fraction`` once groups are scored."""
        weights = self.weights[self.active]
        p = weights / weights.sum()
        entropy = float(-(p * np.log(p)).sum() / np.log(len(p))) if len(p) > 1 else 1.0
        out = {"pool.active": float(len(p)), "pool.drawn": float((self.draws > 0).sum()),
               "pool.weight_entropy": entropy}
        reasons = np.array(self.reason, dtype=object)
        out.update({f"pool.dropped.{r}": float((self.dropped & (reasons == r)).sum()) for r in REASONS})
        if self.informative_fraction is not None:
            out["pool.mean_reward"] = float(np.mean(self._mean_reward()[self.draws > 0]))
            out["pool.informative_fraction"] = self.informative_fraction
        return out

    def _mean_reward(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.samples > 0, self.reward_sum / self.samples, np.nan)

    def table(self) -> pd.DataFrame:
        """One row per prompt (NaN statistics for prompts never scored); ``reason``: the last group's verdict."""
        return pd.DataFrame({
            "prompt_id": np.arange(len(self), dtype=np.int64),
            "text": [p.text for p in self.prompts],
            "rubric": [json.dumps([r.to_dict() for r in p.rubric]) for p in self.prompts],
            "draws": self.draws.copy(),
            "mean_reward": self._mean_reward(),
            "last_mean": self.last_mean.copy(),
            "last_std": self.last_std.copy(),
            "weight": self.weights,
            "status": np.where(self.dropped, DROPPED, ACTIVE).astype(object),
            "reason": list(self.reason),
        })

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable (no NaN: never-scored statistics are None) for a checkpoint's ``extra``."""
        state: dict[str, Any] = {"prompts": self._fingerprint, "reason": list(self.reason),
                                 "informative_fraction": self.informative_fraction}
        for name in _STATE_ARRAYS:
            state[name] = [None if isinstance(v, float) and np.isnan(v) else v for v in getattr(self, name).tolist()]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` of a pool over the same prompts; on a mismatch nothing changes."""
        missing = ({"prompts", "reason", "informative_fraction"} | set(_STATE_ARRAYS)) - set(state)
        if missing:
            raise ValueError(f"prompt pool state lacks {sorted(missing)}")
        if state["prompts"] != self._fingerprint:
            raise ValueError("prompt pool state was saved for different prompts")
        arrays = {name: np.array([np.nan if v is None else v for v in state[name]], dtype=dtype)
                  for name, dtype in _STATE_ARRAYS.items()}
        if any(a.shape != (len(self),) for a in arrays.values()) or len(state["reason"]) != len(self):
            raise ValueError(f"prompt pool state does not hold {len(self)} prompts")
        for name, array in arrays.items():
            setattr(self, name, array)
        self.reason = list(state["reason"])
        self.informative_fraction = state["informative_fraction"]
