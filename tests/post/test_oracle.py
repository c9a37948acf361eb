"""The preferred rate: wins plus half the ties, with a 95% CI that resamples prompts."""

from __future__ import annotations

import pytest

from krea2_core.post.oracle import PreferredRate, judge


def test_a_clear_preference_has_an_interval_above_one_half() -> None:
    rate = PreferredRate(wins=70, losses=20, ties=6)
    estimate = rate.estimate()
    assert estimate.value == pytest.approx((70 + 3) / 96) == rate.rate
    assert 0.5 < estimate.low < estimate.value < estimate.high < 1.0
    metrics = rate.metrics("eval")
    assert (metrics["eval.preferred_rate.low"], metrics["eval.preferred_rate.high"]) == (estimate.low, estimate.high)


def test_noise_and_a_handful_of_prompts_do_not_exclude_one_half() -> None:
    assert PreferredRate(wins=10, losses=6, ties=0).estimate().low < 0.5  # 0.62 of 16 prompts: not resolved
    assert PreferredRate(wins=45, losses=45, ties=6).estimate().low < 0.5 < PreferredRate(45, 45, 6).estimate().high
    all_ties = PreferredRate(wins=0, losses=0, ties=20).estimate()
    assert all_ties.value == 0.5 and all_ties.low < 0.5 < all_ties.high  # not a zero-width interval


def test_judge_calls_close_scores_a_tie() -> None:
    assert judge(0.8, 0.5, 0.1) == "a" and judge(0.5, 0.8, 0.1) == "b" and judge(0.55, 0.5, 0.1) == "tie"
