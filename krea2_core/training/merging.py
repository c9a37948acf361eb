"""Model merging: the domain SFT checkpoints into one generalist SFT checkpoint (report, SFT: "we use model
merging to produce a generalist SFT checkpoint"), and the streaming weighted average that PMA also uses.

Per tensor, with theta_i the domain checkpoints, theta_0 the base, tau_i = theta_i - theta_0 the task vectors and
w_i the configured weights (missing = 1), computed in (at least) float32 and cast back to the tensor's dtype:

- uniform:          theta_0 unused, weights ignored;  theta = mean_i theta_i
- weighted:         theta = sum_i w_i theta_i / sum_i w_i
- task_arithmetic:  theta = theta_0 + scale * sum_i w_i tau_i  (peft ``task_arithmetic``: weights are NOT
                    normalised, so n identical domains at weights 1 move n times as far; scale ~ 1/n undoes it)
- ties:             theta = theta_0 + scale * sum_{i in A} w_i t_i / max(|A|, 1)  (peft ``ties``, sign "total")
  where t_i is tau_i with all but its floor(density * numel) largest-magnitude entries zeroed, per tensor (not
  over the whole model; a 1-entry tensor at density < 1 keeps nothing; density 1 trims nothing); the elected sign
  is s = sign(sum_i t_i), unweighted, 0 counting as +; and per entry A = {i : sign(t_i) = s} (trimmed zeros never
  count). The weights scale a domain's contribution but neither its vote nor the count |A|; at weights 1 this is
  the TIES paper's disjoint mean.

Domains weighted 0 are left out of every method but uniform. Non-float tensors must be equal everywhere.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from krea2_core.post.config import MergeConfig
from krea2_core.training.diffusers_format import DIFFUSERS_WEIGHTS_FILE

# One tensor name across the models (and the base, or None), in the compute dtype -> the merged tensor.
# Statistics are added to the counter.
Combine = Callable[[list[Tensor], Tensor | None, Counter], Tensor]


@dataclass(frozen=True)
class Source:
    """One model to merge: a label for error messages (a file, a domain), its keys, and a tensor reader."""

    label: str
    keys: list[str]
    get: Callable[[str], Tensor]

    @classmethod
    def of(cls, label: str, state: Mapping[str, Tensor]) -> Source:
        return cls(label, list(state), state.__getitem__)


def normalise(weights: Sequence[float] | None, n: int) -> list[float]:
    """``n`` weights scaled to sum 1 (equal when None)."""
    if n < 1:
        raise ValueError("nothing to merge: no checkpoints given")
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be {n} non-negative values with a positive sum, got {list(weights)}")
    total = sum(weights)
    return [w / total for w in weights]


def weighted_sum(weights: Sequence[float]) -> Combine:
    """sum_i w_i theta_i (a weighted mean when the weights sum to 1), accumulated without stacking the models."""
    def combine(models: list[Tensor], base: Tensor | None, stats: Counter) -> Tensor:
        acc = torch.zeros_like(models[0])
        for weight, tensor in zip(weights, models, strict=True):
            acc.add_(tensor, alpha=weight)
        return acc
    return combine


def _task_arithmetic(weights: Sequence[float], scale: float) -> Combine:
    from peft.utils.merge_utils import task_arithmetic  # imported when used: peft pulls in transformers (~5 s)

    def combine(models: list[Tensor], base: Tensor | None, stats: Counter) -> Tensor:
        assert base is not None
        w = torch.tensor(weights, dtype=base.dtype)
        return base + scale * task_arithmetic([model - base for model in models], w)
    return combine


def _ties(weights: Sequence[float], density: float, scale: float) -> Combine:
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, prune, reshape_weight_task_tensors

    def combine(models: list[Tensor], base: Tensor | None, stats: Counter) -> Tensor:
        assert base is not None
        # peft's ties() step by step (same primitives, same order; a test checks they agree) so that its trimmed
        # task vectors and sign mask also give the statistics; density 1 skips prune(), which would only warn
        tasks = torch.stack([prune(m - base, density, "magnitude") if density < 1 else m - base for m in models])
        agree = calculate_majority_sign_mask(tasks, method="total")
        w = reshape_weight_task_tensors(tasks, torch.tensor(weights, dtype=base.dtype))
        merged = disjoint_merge(tasks * w, agree)
        stats["ties_kept"] += int(agree.sum())
        stats["ties_entries"] += tasks.numel()
        stats["ties_conflicts"] += int(((tasks > 0).any(0) & (tasks < 0).any(0)).sum())
        stats["ties_positions"] += base.numel()
        return base + scale * merged
    return combine


def _check_keys(sources: Sequence[Source]) -> None:
    first = set(sources[0].keys)
    for source in sources[1:]:
        keys = set(source.keys)
        if keys != first:
            missing, extra = sorted(first - keys), sorted(keys - first)
            raise ValueError(f"{source.label} has different keys from {sources[0].label}: missing {missing[:5]}, "
                             f"extra {extra[:5]}")


def merge_sources(models: Sequence[Source], combine: Combine, base: Source | None = None, *,
                  drop_prefix: str | None = None) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Merge one tensor name at a time (memory: the merged model plus one tensor per source), leaving out keys
    starting with ``drop_prefix``. Returns the merged state dict (each tensor in its dtype) and counters."""
    if not models:
        raise ValueError("nothing to merge: no checkpoints given")
    sources = [*models, *([base] if base is not None else [])]
    _check_keys(sources)
    stats: Counter = Counter()
    merged: dict[str, Tensor] = {}
    for key in models[0].keys:
        if drop_prefix and key.startswith(drop_prefix):
            continue
        tensors = [source.get(key) for source in sources]
        first = tensors[0]
        for source, tensor in zip(sources[1:], tensors[1:], strict=True):
            if tensor.shape != first.shape or tensor.dtype != first.dtype:
                raise ValueError(f"{key!r} differs across checkpoints: {sources[0].label} has {tuple(first.shape)} "
                                 f"{first.dtype}, {source.label} has {tuple(tensor.shape)} {tensor.dtype}")
        if first.is_floating_point():
            compute = [t.to(torch.promote_types(first.dtype, torch.float32)) for t in tensors]
            merged[key] = combine(compute[:len(models)], compute[-1] if base is not None else None, stats).to(
                first.dtype)
        else:  # integer/bool buffers cannot be averaged; they must agree
            if any(not torch.equal(first, tensor) for tensor in tensors[1:]):
                raise ValueError(f"{key!r} is a {first.dtype} tensor whose values differ across checkpoints "
                                 f"({', '.join(source.label for source in sources)})")
            merged[key] = first.clone()
        stats["tensors"] += 1
        stats["parameters"] += first.numel()
    return merged, dict(stats)


def merge_files(models: Sequence[tuple[str, Path]], out: Path, combine: Combine, *,
                base: tuple[str, Path] | None = None, metadata: Mapping[str, str] | None = None,
                drop_prefix: str | None = None) -> dict[str, float]:
    """:func:`merge_sources` over safetensors files given as (label, path), written atomically to ``out`` with the
    last model's metadata updated by ``metadata``. Returns the counters."""
    if not models:
        raise ValueError("nothing to merge: no checkpoints given")
    with ExitStack() as stack:
        sources, handles = [], []
        for label, path in [*models, *([base] if base is not None else [])]:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{label}: no weights file {path}")
            handles.append(stack.enter_context(safe_open(str(path), framework="pt", device="cpu")))
            sources.append(Source(label, list(handles[-1].keys()), handles[-1].get_tensor))
        file_metadata = dict(handles[len(models) - 1].metadata() or {})
        merged, stats = merge_sources(sources[:len(models)], combine, sources[-1] if base is not None else None,
                                      drop_prefix=drop_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(merged, str(tmp), metadata={**file_metadata, **(metadata or {})})
    tmp.replace(out)  # never leave a half-written checkpoint under the final name
    return stats


def _plan(names: Sequence[str], config: MergeConfig, has_base: bool) -> tuple[dict[str, float], Combine]:
    """The models that take part with their weights, and the per-tensor combine of ``config.method``."""
    if not names:
        raise ValueError("nothing to merge: no models given")
    unknown = sorted(set(config.weights) - set(names))
    if unknown:
        raise ValueError(f"merge weights name models that are not merged: {unknown} (models: {sorted(names)})")
    if config.method in ("task_arithmetic", "ties") and not has_base:
        raise ValueError(f"merge method {config.method!r} needs the base checkpoint (task vectors = model - base)")
    if config.method == "uniform":
        return dict.fromkeys(names, 1.0), weighted_sum([1.0 / len(names)] * len(names))
    weights = {name: config.weights.get(name, 1.0) for name in names if config.weights.get(name, 1.0) > 0}
    if not weights:
        raise ValueError(f"every merge weight is 0: {config.weights}")
    values = list(weights.values())
    if config.method == "weighted":
        return weights, weighted_sum(normalise(values, len(values)))
    if config.method == "task_arithmetic":
        return weights, _task_arithmetic(values, config.scale)
    return weights, _ties(values, config.density, config.scale)


def _summary(stats: Mapping[str, float], n_models: int) -> dict[str, float]:
    summary = {"models": float(n_models), "tensors": float(stats.get("tensors", 0)),
               "parameters": float(stats.get("parameters", 0))}
    if stats.get("ties_entries"):
        # task-vector entries that survive the trim and agree with the elected sign; parameter positions where the
        # trimmed task vectors disagree in sign
        summary["ties_kept_fraction"] = stats["ties_kept"] / stats["ties_entries"]
        summary["ties_sign_conflict_fraction"] = stats["ties_conflicts"] / stats["ties_positions"]
    return summary


def merge_domain_state_dicts(base: dict[str, Tensor] | None, models: dict[str, dict[str, Tensor]],
                             config: MergeConfig) -> dict[str, Tensor]:
    """Merge in-memory state dicts (domain name -> state dict) with ``config.method``; see the module docstring."""
    weights, combine = _plan(list(models), config, base is not None)
    needs_base = config.method in ("task_arithmetic", "ties")
    merged, _ = merge_sources([Source.of(name, models[name]) for name in weights], combine,
                              Source.of("base", base) if needs_base and base is not None else None)
    return merged


def merge_checkpoints(base: Path | None, checkpoints: dict[str, Path], config: MergeConfig,
                      out: Path) -> dict[str, float]:
    """Merge checkpoint directories (domain name -> dir holding the diffusers weights file) into the safetensors
    file ``out``, streaming one tensor name at a time. Returns counts and, for ties, the fraction of task-vector
    entries kept and of positions with a sign conflict."""
    weights, combine = _plan(list(checkpoints), config, base is not None)
    needs_base = config.method in ("task_arithmetic", "ties")
    metadata = {"merge_method": config.method, "merge_weights": json.dumps(weights),
                "merge_density": str(config.density), "merge_scale": str(config.scale)}
    models = [(f"{name} ({checkpoints[name]})", Path(checkpoints[name]) / DIFFUSERS_WEIGHTS_FILE) for name in weights]
    base_file = (f"base ({base})", Path(base) / DIFFUSERS_WEIGHTS_FILE) if needs_base and base is not None else None
    stats = merge_files(models, out, combine, metadata=metadata, base=base_file)
    return _summary(stats, len(weights))
