"""Confidence intervals: they cover known rates about 95% of the time, paired differences have the right sign,
degenerate and bad input are handled."""

from __future__ import annotations

import numpy as np
import pytest

from krea2_core.evaluation.stats import Estimate, format_change, format_metric, paired_difference, share


def test_share_interval_covers_a_known_rate_about_95_percent_of_the_time() -> None:
    # 96 prompts of 4 requirements each, met with probability 0.6 plus a per-prompt effect (correlated within a
    # prompt, as a model's requirements on one image are): the true pooled rate is 0.6.
    rng = np.random.default_rng(0)
    covered, trials = 0, 300
    for _ in range(trials):
        p = np.clip(0.6 + rng.normal(0, 0.2, 96), 0, 1)
        hits = rng.binomial(4, p).astype(float)
        estimate = share(hits, np.full(96, 4.0), seed=int(rng.integers(1 << 30)))
        covered += estimate.low <= 0.6 <= estimate.high
    assert 0.91 <= covered / trials <= 0.98


def test_share_of_all_or_nothing_uses_the_binomial_interval() -> None:
    full = share(np.ones(96), np.ones(96))
    assert full.value == 1.0 and full.high == 1.0 and 0.95 < full.low < 1.0  # not a zero-width interval
    empty = share(np.zeros(40), np.ones(40))
    assert empty.value == 0.0 and empty.low == 0.0 and 0.0 < empty.high < 0.1


def test_share_of_equal_partial_shares_uses_the_binomial_interval() -> None:
    ties = share(np.full(40, 0.5), np.ones(40))  # e.g. a preferred rate of all ties: every resample gives 0.5
    assert ties.value == 0.5 and ties.low < 0.5 < ties.high


def test_prompts_without_the_requirement_are_ignored() -> None:
    estimate = share(np.array([1.0, 0.0, 2.0]), np.array([1.0, 0.0, 2.0]))
    assert estimate.value == 1.0
    assert np.isnan(share(np.zeros(3), np.zeros(3)).value)


def test_paired_difference_has_the_sign_of_the_change_and_excludes_zero_for_a_real_one() -> None:
    rng = np.random.default_rng(1)
    base = rng.binomial(1, 0.3, 96).astype(float)
    better = np.maximum(base, rng.binomial(1, 0.4, 96)).astype(float)  # same prompts, some flipped to met
    ones = np.ones(96)
    up = paired_difference(base, better, ones, ones)
    assert up.value > 0 and up.low > 0
    down = paired_difference(better, base, ones, ones)
    assert down.value == pytest.approx(-up.value) and down.high < 0
    noise = paired_difference(base, rng.permutation(base), ones, ones)  # same rate, other prompts: no effect
    assert noise.low < 0 < noise.high


def test_pairing_narrows_the_interval_against_unpaired_reading() -> None:
    rng = np.random.default_rng(2)
    difficulty = rng.uniform(0, 1, 96)
    a = difficulty
    b = np.clip(difficulty + 0.05 + rng.normal(0, 0.02, 96), 0, 1)
    ones = np.ones(96)
    paired = paired_difference(a, b, ones, ones)
    separate = share(a, ones), share(b, ones)
    assert paired.low > 0  # a small consistent gain is resolved ...
    assert separate[0].high > separate[1].low  # ... where the two separate intervals overlap


def test_identical_outcomes_give_zero_difference() -> None:
    a = np.array([1.0, 0.0, 1.0, 1.0])
    assert paired_difference(a, a, np.ones(4), np.ones(4)) == Estimate(0.0, 0.0, 0.0)


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="one length"):
        share(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="one length"):
        paired_difference(np.ones(3), np.ones(3), np.ones(3), np.ones(2))


def test_format_change() -> None:
    line = format_change(Estimate(0.2, 0.18, 0.22), Estimate(0.6, 0.55, 0.65), Estimate(0.4, 0.35, 0.45))
    assert line == "0.200 -> 0.600 (+0.400, 95% CI [+0.350, +0.450])"


def test_format_metric_reads_its_companions() -> None:
    change = {"d": 0.4, "d.low": 0.35, "d.high": 0.45, "d.before": 0.2, "d.after": 0.6}
    assert format_metric("d", change) == "0.200 -> 0.600 (+0.400, 95% CI [+0.350, +0.450])"
    assert format_metric("v", {"v": 0.5, "v.low": 0.4, "v.high": 0.6}) == "0.500 [0.400, 0.600]"
    assert format_metric("v", {"v": 0.5}) == "0.5"
    assert format_metric("missing", change) == "n/a"
