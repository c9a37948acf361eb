"""Preference oracles: who judges which of two images of a prompt is better.

An oracle scores images against their prompts; a pair's winner is the higher score, and a difference below
a margin is a tie. Offline the verifiable world's checker is the oracle (the fraction of the prompt's rubric
an image meets); a learned reward model or a VLM judge implements the same ``score``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

from krea2_core.evaluation.prompt_following import score_images
from krea2_core.evaluation.stats import Estimate, share
from krea2_core.world.captions import Prompt


class PreferenceOracle(Protocol):
    name: str

    def score(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> list[float]:
        """One score per (image, prompt); higher is better."""
        ...


class WorldCheckerOracle:
    """The world's checker: the fraction of the prompt's rubric requirements an image meets."""

    name = "world_checker"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> list[float]:
        return [score_images([image], [prompt]).score for image, prompt in zip(images, prompts, strict=True)]


def keyed(settings: Any, oracle: PreferenceOracle | None) -> Any:
    """A judging stage's artifact key: its settings, with the oracle's name when one other than the world's checker
    (what every pipeline stage judges with) is given."""
    return settings if oracle is None else {"settings": settings, "oracle": oracle.name}


def judge(score_a: float, score_b: float, min_margin: float) -> str:
    """"a", "b" or "tie" (scores closer than ``min_margin``)."""
    if abs(score_a - score_b) < min_margin or score_a == score_b:
        return "tie"
    return "a" if score_a > score_b else "b"


@dataclass(frozen=True)
class PreferredRate:
    wins: int
    losses: int
    ties: int

    @property
    def rate(self) -> float:
        """Wins plus half the ties, over all prompts: 0.5 means no better than the reference."""
        total = self.wins + self.losses + self.ties
        return (self.wins + 0.5 * self.ties) / total if total else 0.5

    def estimate(self) -> Estimate:
        """The rate with its 95% CI: each prompt an outcome of 1 (win), 1/2 (tie) or 0, prompts resampled."""
        outcomes = np.repeat([1.0, 0.5, 0.0], [self.wins, self.ties, self.losses])
        return share(outcomes, np.ones_like(outcomes))

    def metrics(self, prefix: str) -> dict[str, float]:
        rate = self.estimate()
        return {f"{prefix}.preferred_rate": self.rate, f"{prefix}.preferred_rate.low": rate.low,
                f"{prefix}.preferred_rate.high": rate.high, f"{prefix}.wins": float(self.wins),
                f"{prefix}.losses": float(self.losses), f"{prefix}.ties": float(self.ties)}


def preferred_rate(policy: Sequence[Image.Image], reference: Sequence[Image.Image], prompts: Sequence[Prompt],
                   oracle: PreferenceOracle, min_margin: float = 0.0) -> PreferredRate:
    """How often the oracle prefers the policy's image to the reference's (same prompt, same noise)."""
    if not len(policy) == len(reference) == len(prompts):
        raise ValueError(f"{len(policy)} policy images, {len(reference)} reference images, {len(prompts)} prompts")
    verdicts = [judge(a, b, min_margin) for a, b in zip(oracle.score(policy, prompts),
                                                         oracle.score(reference, prompts), strict=True)]
    return PreferredRate(verdicts.count("a"), verdicts.count("b"), verdicts.count("tie"))
