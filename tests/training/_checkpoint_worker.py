"""torchrun worker for tests/training/test_checkpoint.py: an FSDP2 (fully_shard) MLP on gloo that resumes a
world-size-1 checkpoint at world size 2, trains on and saves again, so one launch checks both directions. Also home
of the model, data and state helpers that the single-process side shares.

    torchrun --nproc_per_node=2 tests/training/_checkpoint_worker.py DIR
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.optim.lr_scheduler import LambdaLR

from krea2_core.training.checkpoint import CheckpointTimer, latest_checkpoint, load_checkpoint, load_weights, save_checkpoint

SAVED_STEPS = 3
MODEL_CONFIG = {"in": 6, "hidden": 16, "out": 3}
WS1, WS2 = "ws1", "ws2"  # checkpoint directories written at world size 1 and 2
# rank 0 writes the gathered model + optimizer tensors right after loading ("loaded."), the weights load_weights
# put into a fresh model ("weights_only.") and the state it saved ("saved."); every rank writes side-rank<r>.json:
# the non-tensor optimizer state, scheduler states, the extra JSON and its timer decisions
STATE_FILE = "state.safetensors"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True)


def build_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))


def build_optimizers(model: nn.Module, muon: bool = False) -> tuple[list[torch.optim.Optimizer], list[LambdaLR]]:
    """AdamW on everything, or (as the Muon preset does) Muon on the hidden matrix and AdamW on the rest."""
    if muon:
        rest = [p for name, p in model.named_parameters() if name != "2.weight"]
        optimizers = [torch.optim.Muon([model[2].weight], lr=2e-2, nesterov=True, adjust_lr_fn="match_rms_adamw"),
                      torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.1)]
    else:
        optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)]
    return optimizers, [LambdaLR(o, lambda step: min(1.0, (step + 1) / 4)) for o in optimizers]


def train(model: nn.Module, optimizers: list[torch.optim.Optimizer], schedulers: list[LambdaLR], steps: range,
          rank: int = 0) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        F.mse_loss(model(x), y).backward()
        for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()


def full_state(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Gathered model + optimizer state keyed by parameter name (same keys plain or FSDP): tensors, other values."""
    flat = {f"model.{k}": v for k, v in get_model_state_dict(model, options=_FULL).items()}
    flat.update({f"optim.{k}": v for k, v in get_optimizer_state_dict(model, optimizers, options=_FULL).items()})
    # cloned: a replicated tensor (AdamW's step) comes back as the optimizer's own, which later steps update in place
    tensors = {k: v.clone() for k, v in flat.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in flat.items() if not isinstance(v, torch.Tensor)}


def _sharded(seed: int) -> tuple[nn.Module, list[torch.optim.Optimizer], list[LambdaLR]]:
    from torch.distributed.fsdp import fully_shard

    model = build_model(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, *build_optimizers(model)


def _timer_decisions(rank: int) -> list[bool]:
    """Rank 1's clock races ahead, rank 0's does not move until the second call: rank 0 must decide for all."""
    calls = itertools.count()
    rank0_time = [0.0]
    timer = CheckpointTimer(10.0, clock=lambda: rank0_time[0] if rank == 0 else 1e6 * next(calls))
    first = timer.due()
    rank0_time[0] = 10.0
    return [first, timer.due()]


def main(directory: Path) -> None:
    """Resume the world-size-1 checkpoint in ``directory / WS1`` on 2 ranks, train on, save into ``WS2``."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, optimizers, schedulers = _sharded(seed=1)  # the single-process side starts from seed 0
    side: dict[str, Any] = {"timer": _timer_decisions(rank)}
    path = latest_checkpoint(directory / WS1)
    side["extra"] = load_checkpoint(path, model=model, optimizers=optimizers, schedulers=schedulers)
    loaded, side["loaded"] = full_state(model, optimizers)
    side["loaded_scheduler"] = schedulers[0].state_dict()
    fresh, _, _ = _sharded(seed=2)
    load_weights(path, fresh)
    weights_only = get_model_state_dict(fresh, options=_FULL)
    train(model, optimizers, schedulers, range(SAVED_STEPS, 2 * SAVED_STEPS), rank)
    save_checkpoint(directory / WS2, step=2 * SAVED_STEPS, model=model, optimizers=optimizers, schedulers=schedulers,
                    extra={"cursor": 22}, model_config=MODEL_CONFIG, keep=1)
    saved, side["saved"] = full_state(model, optimizers)
    side["saved_scheduler"] = schedulers[0].state_dict()
    if rank == 0:
        save_file({f"{name}.{k}": v for name, part in (("loaded", loaded), ("weights_only", weights_only),
                                                        ("saved", saved)) for k, v in part.items()},
                  directory / STATE_FILE)
    (directory / f"side-rank{rank}.json").write_text(json.dumps(side))
    dist.barrier()  # neither rank tears gloo down while the other is still writing (a rare abort at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
