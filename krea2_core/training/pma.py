"""PMA: merge the last K pretraining checkpoints (Li et al. 2025, "Model Merging in Pre-training of LLMs").

The report uses PMA instead of an EMA of the weights: comparable quality without an EMA copy in memory during
training. Default is the simple moving average; the paper's EMA- and linearly-weighted variants are offered.
The averaging itself is the streaming weighted merge of :mod:`krea2_core.training.merging`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from torch import Tensor

from krea2_core.training.merging import Source, merge_files, merge_sources, normalise, weighted_sum


def pma_weights(k: int, method: Literal["sma", "ema", "wma"] = "sma", alpha: float = 0.2) -> list[float]:
    """Weights of ``k`` checkpoints, oldest first, summing to 1: ``sma`` equal; ``ema`` ``alpha * (1 - alpha)^age``
    (newest heaviest); ``wma`` proportional to 1, 2, ..., k."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if method == "sma":
        raw = [1.0] * k
    elif method == "ema":
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        raw = [alpha * (1.0 - alpha) ** (k - 1 - i) for i in range(k)]
    elif method == "wma":
        raw = [float(i + 1) for i in range(k)]
    else:
        raise ValueError(f"method must be 'sma', 'ema' or 'wma', got {method!r}")
    return normalise(raw, k)


def average_state_dicts(state_dicts: Sequence[dict[str, Tensor]],
                        weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Weighted average (equal by default; weights are normalised) of state dicts with identical keys, shapes
    and dtypes; each tensor keeps its dtype."""
    norm = normalise(weights, len(state_dicts))
    merged, _ = merge_sources([Source.of(f"state dict {i}", sd) for i, sd in enumerate(state_dicts)],
                              weighted_sum(norm))
    return merged


def merge_safetensors(paths: Sequence[Path], out: Path, weights: Sequence[float] | None = None, *,
                      drop_prefix: str | None = None) -> Path:
    """Merge safetensors checkpoints into ``out`` one tensor at a time (peak memory ~ the merged model plus one
    tensor per input), leaving out keys starting with ``drop_prefix`` (e.g. a training-only head). The newest
    (last) file's metadata is kept, with the sources and weights added."""
    norm = normalise(weights, len(paths))
    metadata = {"pma_sources": json.dumps([Path(path).name for path in paths]), "pma_weights": json.dumps(norm)}
    merge_files([(str(path), Path(path)) for path in paths], out, weighted_sum(norm), metadata=metadata,
                drop_prefix=drop_prefix)
    return out
