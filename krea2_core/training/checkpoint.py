"""Training checkpoints: weights in safetensors, training state in torch.distributed.checkpoint (DCP).

One directory per saved step, ``<directory>/step-<step:08d>/``:

- ``state/``: DCP, model + optimizer state as each rank holds it (FSDP shards, DTensors); it reshards on load,
  so a run saved at one world size resumes at any other;
- ``model.safetensors`` (full weights, written by rank 0), ``config.json`` (the model config),
  ``extra.json`` (``step`` and the caller's JSON: loader cursor, ...), ``schedulers.json`` (LR scheduler states),
  ``state.json`` (the size of every ``state/`` file and the sha256 of each but the tensor shards).

DCP pickles its ``.metadata`` file; a state is loaded only when ``state.json`` vouches for it (written here, unchanged
since), so resuming never unpickles a file this project did not write. Everything else is safetensors and JSON.
A step directory is written as
``step-XXXXXXXX.tmp`` and renamed when complete, so a crash never leaves a directory that looks finished.

Pruning keeps the ``keep`` newest resumable checkpoints. Older ones are deleted, except the steps in
``protect`` (PMA merges the weights of the last K checkpoints at a fixed interval): those lose only their
``state/`` (the optimizer moments, ~2/3 of a checkpoint) and keep their weights, config and extra.

All ranks call ``save_checkpoint``, ``load_checkpoint``, ``load_weights`` and ``CheckpointTimer.due`` together
(they contain collectives), with ``directory`` on a file system every rank sees.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from krea2_core.artifacts import file_sha256
from krea2_core.training.config import PretrainStageConfig

STATE_DIR = "state"
STEP_WEIGHTS_FILE = "model.safetensors"  # a step directory's full weights (an artifact's are diffusers-named)
CONFIG_FILE = "config.json"
EXTRA_FILE = "extra.json"
SCHEDULERS_FILE = "schedulers.json"
STATE_RECORD = "state.json"
TMP_SUFFIX = ".tmp"
# how often the post-training loops without a stage recipe save: a pretraining stage's default
CHECKPOINT_EVERY_S = PretrainStageConfig.checkpoint_every_s
_STEP_DIR = re.compile(r"step-(\d{8,})")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _has_state(path: Path) -> bool:
    return (path / STATE_DIR).is_dir()


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished step directory (resumable or weights-only), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint that training can resume from; ``.tmp`` leftovers of a crash are ignored."""
    resumable = [path for _, path in list_checkpoints(directory) if _has_state(path)]
    return resumable[-1] if resumable else None


def _prune(directory: Path, keep: int, protect: set[int]) -> None:
    for leftover in directory.glob(f"step-*{TMP_SUFFIX}"):  # crashed saves: no other save is in flight now
        shutil.rmtree(leftover)
    checkpoints = list_checkpoints(directory)
    kept = set([step for step, path in checkpoints if _has_state(path)][-keep:])
    for step, path in checkpoints:
        if step in kept:
            continue
        if step in protect:
            shutil.rmtree(path / STATE_DIR, ignore_errors=True)  # weights-only from now on
        else:
            shutil.rmtree(path)


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, indent=2, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serialisable (finite numbers, str, list, dict): {err}") from err


def save_checkpoint(directory: str | Path, *, step: int, model: nn.Module, optimizers: Sequence[Optimizer],
                    schedulers: Sequence[LRScheduler], extra: dict[str, Any], model_config: dict[str, Any],
                    keep: int, protect: Iterable[int] = ()) -> Path:
    """Write ``<directory>/step-<step:08d>/`` atomically, then prune (see the module docstring). A step that is
    already saved is left as it is (a step's state is unique). Returns the step directory on every rank."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the newest checkpoint is what training resumes from), got {keep}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if extra.get("step", step) != step:
        raise ValueError(f"extra['step'] ({extra['step']}) differs from step ({step})")
    # serialised up front so that bad input fails on every rank before any collective
    texts = {EXTRA_FILE: _json({**extra, "step": step}, "extra"),
             SCHEDULERS_FILE: _json([s.state_dict() for s in schedulers], "scheduler state"),
             CONFIG_FILE: _json(model_config, "model_config")}
    directory = Path(directory)
    final = directory / step_dir_name(step)
    if final.is_dir():
        return final
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizers)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / STATE_DIR)
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _is_rank0():
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / STEP_WEIGHTS_FILE, metadata={"format": "pt"})
        for name, text in texts.items():
            (tmp / name).write_text(text)
    _barrier()
    if _is_rank0():
        (tmp / STATE_RECORD).write_text(json.dumps(_state_record(tmp / STATE_DIR), indent=2, sort_keys=True))
        tmp.rename(final)
        _prune(directory, keep, set(protect))
    _barrier()
    return final


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizers: Sequence[Optimizer],
                    schedulers: Sequence[LRScheduler]) -> dict[str, Any]:
    """Restore model, optimizers (resharded to the current world size and wrapping) and schedulers in place from a
    ``save_checkpoint`` directory; returns its extra JSON (with ``step``)."""
    path = Path(path)
    if not _has_state(path):
        raise FileNotFoundError(f"{path}: no training state ({STATE_DIR}/): not a checkpoint, or one pruned to its "
                                "weights (load those with load_weights)")
    scheduler_states = json.loads((path / SCHEDULERS_FILE).read_text())
    if len(scheduler_states) != len(schedulers):
        raise ValueError(f"{path} holds {len(scheduler_states)} scheduler states but {len(schedulers)} schedulers "
                         "were given")
    _check_state(path)
    model_state, optim_state = get_state_dict(model, optimizers)  # the current layout, filled in place by DCP
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path / STATE_DIR)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for scheduler, scheduler_state in zip(schedulers, scheduler_states, strict=True):
        scheduler.load_state_dict(scheduler_state)
    return json.loads((path / EXTRA_FILE).read_text())


def _state_record(state: Path) -> dict[str, Any]:
    """Every state file's size, and the sha256 of every one but the tensor shards (``*.distcp``, read as tensors
    only): among them DCP's pickled ``.metadata``."""
    record: dict[str, Any] = {}
    for file in sorted(p for p in state.rglob("*") if p.is_file()):
        entry = record[file.relative_to(state).as_posix()] = {"bytes": file.stat().st_size}
        if file.suffix != ".distcp":
            entry["sha256"] = file_sha256(file)
    return record


def _check_state(path: Path) -> None:
    record = path / STATE_RECORD
    if not record.is_file():
        raise ValueError(f"{path}: no {STATE_RECORD} vouches for its training state (not saved by this version): "
                         "refusing to unpickle it; delete the directory to resume from an earlier step or the start")
    if json.loads(record.read_text()) != _state_record(path / STATE_DIR):
        raise ValueError(f"{path}: its training state changed since it was saved: refusing to unpickle it; delete the "
                         "directory to resume from an earlier step or the start")


def _weights_file(path: str | Path) -> Path:
    path = Path(path)
    file = path / STEP_WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"weights file not found: {file}")
    return file


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Load a step directory's (or any) safetensors weights into ``model``, plain or FSDP-wrapped, strictly: every
    model key must be in the file and every file key in the model."""
    file = _weights_file(path)
    weights = load_file(file)
    expected = set(get_model_state_dict(model))  # the local (sharded) view: no communication
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{file} does not match the model: missing keys {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''}")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))


def load_model_config(path: str | Path) -> dict[str, Any]:
    """The model config a step directory was saved with."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"model config not found: {file}")
    return json.loads(file.read_text())


class CheckpointTimer:
    """Time-based checkpoints ("checkpoints every N seconds"). Rank 0's clock decides and the decision is
    broadcast, so every rank enters ``save_checkpoint``'s collectives at the same step (clocks that differ by a
    millisecond across ranks would otherwise deadlock the job). Call ``due`` once per step on every rank."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if every_s <= 0:
            raise ValueError(f"every_s must be > 0, got {every_s}")
        self.every_s = every_s
        self._clock = clock
        self._last = clock()

    def due(self) -> bool:
        """True once ``every_s`` has passed since the last time it was True (or since construction)."""
        now = self._clock()
        decision = now - self._last >= self.every_s
        if _distributed():
            device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in dist.get_backend() else "cpu"
            flag = torch.tensor([decision], dtype=torch.uint8, device=device)
            dist.broadcast(flag, src=0)
            decision = bool(flag.item())
        if decision:
            self._last = now
        return decision
