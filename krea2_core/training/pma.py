"""PMA: merge the last K pretraining checkpoints (Li et al. 2025, "Model Merging in Pre-training of LLMs").

The report uses PMA instead of an EMA of the weights: comparable quality without an EMA copy in memory during
training. Default is the simple moving average; the paper's EMA- and linearly-weighted variants are offered.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor


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
    return _normalised(raw, k)


def _normalised(weights: Sequence[float] | None, n: int) -> list[float]:
    if n < 1:
        raise ValueError("nothing to merge: no checkpoints given")
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be {n} non-negative values with a positive sum, got {list(weights)}")
    total = sum(weights)
    return [w / total for w in weights]


def _check_keys(key_sets: list[set[str]], sources: list[str]) -> None:
    for keys, source in zip(key_sets[1:], sources[1:], strict=True):
        if keys != key_sets[0]:
            missing, extra = sorted(key_sets[0] - keys), sorted(keys - key_sets[0])
            raise ValueError(f"{source} has different keys from {sources[0]}: missing {missing[:5]}, "
                             f"extra {extra[:5]}")


def _merge(key: str, tensors: list[Tensor], weights: list[float]) -> Tensor:
    """Weighted sum of one tensor across checkpoints, accumulated in (at least) float32, in its own dtype."""
    first = tensors[0]
    for tensor in tensors[1:]:
        if tensor.shape != first.shape or tensor.dtype != first.dtype:
            raise ValueError(f"{key!r} differs across checkpoints: {tuple(first.shape)} {first.dtype} vs "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
    if not first.is_floating_point():  # integer/bool buffers cannot be averaged; they must agree
        if any(not torch.equal(first, tensor) for tensor in tensors[1:]):
            raise ValueError(f"{key!r} is a {first.dtype} tensor whose values differ across checkpoints")
        return first.clone()
    acc = torch.zeros(first.shape, dtype=torch.promote_types(first.dtype, torch.float32), device=first.device)
    for weight, tensor in zip(weights, tensors, strict=True):
        acc.add_(tensor, alpha=weight)
    return acc.to(first.dtype)


def merge_state_dicts(state_dicts: Sequence[dict[str, Tensor]],
                      weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Weighted average (equal by default; weights are normalised) of state dicts with identical keys, shapes
    and dtypes; each tensor keeps its dtype."""
    norm = _normalised(weights, len(state_dicts))
    _check_keys([set(sd) for sd in state_dicts], [f"state dict {i}" for i in range(len(state_dicts))])
    return {key: _merge(key, [sd[key] for sd in state_dicts], norm) for key in state_dicts[0]}


def merge_safetensors(paths: Sequence[Path], out: Path, weights: Sequence[float] | None = None, *,
                      drop_prefix: str | None = None) -> Path:
    """Merge safetensors checkpoints into ``out`` one tensor at a time (peak memory ~ the merged model plus one
    tensor per input), leaving out keys starting with ``drop_prefix`` (e.g. a training-only head). The newest
    (last) file's metadata is kept, with the sources and weights added."""
    norm = _normalised(weights, len(paths))
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(path), framework="pt", device="cpu")) for path in paths]
        _check_keys([set(f.keys()) for f in files], [str(path) for path in paths])
        keys = [key for key in files[0].keys() if not (drop_prefix and key.startswith(drop_prefix))]
        merged = {key: _merge(key, [f.get_tensor(key) for f in files], norm) for key in keys}
        metadata = dict(files[-1].metadata() or {})
    metadata["pma_sources"] = json.dumps([Path(path).name for path in paths])
    metadata["pma_weights"] = json.dumps(norm)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(merged, str(tmp), metadata=metadata)
    tmp.replace(out)  # never leave a half-written checkpoint under the final name
    return out
