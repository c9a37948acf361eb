"""95% confidence intervals for held-out measurements, resampling prompts.

A prompt's requirements are judged on one image, so they are not independent: every interval here is a
percentile bootstrap over prompts (scipy.stats.bootstrap), of a pooled share (requirements met / requirements
asked, summed over the resampled prompts) or of a paired difference (two models on the same prompts and noise,
resampled together). Where every resample gives the same value (every prompt's share the same: all met, or none)
the bootstrap interval would have zero width; there the Wilson interval of the pooled counts is used instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A measured value with its confidence interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def excludes(self, value: float) -> bool:
        return not self.low <= value <= self.high

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def _pooled(hits: np.ndarray, totals: np.ndarray, axis: int = -1) -> np.ndarray:
    return hits.sum(axis=axis) / totals.sum(axis=axis)


def _bootstrap(data: tuple[np.ndarray, ...], statistic, seed: int) -> tuple[float, float]:  # noqa: ANN001
    result = stats.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=RESAMPLES,
                             confidence_level=LEVEL, method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _check(name: str, *arrays: np.ndarray) -> None:
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError(f"{name}: per-prompt arrays must be 1-D and of one length, got "
                         f"{[a.shape for a in arrays]}")


def share(hits: np.ndarray, totals: np.ndarray, seed: int = 0) -> Estimate:
    """Pooled share ``sum(hits) / sum(totals)`` over prompts (one entry each; prompts without any total are
    ignored), with its interval. A per-prompt score or a pass flag is a share with totals of one."""
    hits, totals = np.asarray(hits, dtype=float), np.asarray(totals, dtype=float)
    _check("share", hits, totals)
    asked = totals > 0
    hits, totals = hits[asked], totals[asked]
    if not len(totals):
        return Estimate(float("nan"), float("nan"), float("nan"))
    value = float(hits.sum() / totals.sum())
    if len(totals) < 2 or np.ptp(hits / totals) == 0:
        # every resample agrees: fall back to the binomial interval of the pooled counts
        ci = stats.binomtest(int(round(hits.sum())), int(round(totals.sum()))).proportion_ci(LEVEL, method="wilson")
        return Estimate(value, float(ci.low), float(ci.high))
    return Estimate(value, *_bootstrap((hits, totals), _pooled, seed))


def paired_difference(hits_a: np.ndarray, hits_b: np.ndarray, totals_a: np.ndarray, totals_b: np.ndarray,
                      seed: int = 0) -> Estimate:
    """``share(b) - share(a)`` measured on the same prompts (and noise), prompts resampled together."""
    arrays = tuple(np.asarray(a, dtype=float) for a in (hits_a, hits_b, totals_a, totals_b))
    _check("paired_difference", *arrays)
    hits_a, hits_b, totals_a, totals_b = arrays
    asked = (totals_a > 0) & (totals_b > 0)
    hits_a, hits_b, totals_a, totals_b = (a[asked] for a in arrays)
    if not len(totals_a):
        return Estimate(float("nan"), float("nan"), float("nan"))

    def difference(ha: np.ndarray, hb: np.ndarray, ta: np.ndarray, tb: np.ndarray, axis: int = -1) -> np.ndarray:
        return _pooled(hb, tb, axis) - _pooled(ha, ta, axis)

    value = float(difference(hits_a, hits_b, totals_a, totals_b))
    if len(totals_a) < 2 or np.array_equal(hits_a / totals_a, hits_b / totals_b):
        return Estimate(value, value, value)  # identical outcomes on every prompt
    return Estimate(value, *_bootstrap((hits_a, hits_b, totals_a, totals_b), difference, seed))


def format_change(before: Estimate, after: Estimate, difference: Estimate) -> str:
    """``a -> b (+d, 95% CI [lo, hi])``."""
    return (f"{before.value:.3f} -> {after.value:.3f} ({difference.value:+.3f}, 95% CI "
            f"[{difference.low:+.3f}, {difference.high:+.3f}])")


def format_metric(key: str, metrics: dict[str, float]) -> str:
    """``key``'s value as ``a -> b (diff, 95% CI [lo, hi])`` when ``metrics`` has its ``.before`` / ``.after`` / ``.low``
    / ``.high`` companions (a paired comparison), ``v [lo, hi]`` when it has its interval, ``v`` without, and ``n/a``
    when ``metrics`` lacks ``key``."""
    if key not in metrics:
        return "n/a"
    value = metrics[key]
    parts = {part: metrics.get(f"{key}.{part}") for part in ("low", "high", "before", "after")}
    if None not in parts.values():
        return format_change(Estimate(parts["before"], parts["before"], parts["before"]),  # type: ignore[arg-type]
                             Estimate(parts["after"], parts["after"], parts["after"]),  # type: ignore[arg-type]
                             Estimate(value, parts["low"], parts["high"]))  # type: ignore[arg-type]
    if parts["low"] is not None and parts["high"] is not None:
        return str(Estimate(value, parts["low"], parts["high"]))
    return f"{value:.3g}"
