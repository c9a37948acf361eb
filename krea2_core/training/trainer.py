"""The training loop's moving parts, shared by the image-model trainers (pretraining, midtraining and SFT,
preference optimisation, RL, distillation), in the manner of torchtitan's train state:

- the training draws' seeding rule, ``krea2_core.common.rng.rng(seed, step, global sample index)``: a step replays
  exactly after a resume and at any world size (``noise_and_timesteps``).
- ``Optimized``: a model with its optimizers and warmup-stable-decay schedules; ``step(loss)`` is backward, clip,
  optimiser step and schedule step.
- ``TrainState``: the optimised parts of a stage and its checkpoint directory; ``resume()`` restores the newest
  checkpoint, ``maybe_checkpoint(done)`` saves at the last step, at protected steps and on the timer.

Publishing a checkpoint artifact is ``krea2_core.training.image_model.publish_checkpoint``. The prompt expander's
LLM loops (krea2_core/expander/) keep their own few lines: one process, no resume, a plain AdamW and torch's
``clip_grad_norm_``, which computes the clip coefficient in float32 where ``clip_grad_norm`` uses float64, so moving
them here could move their measured numbers in the last bits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from krea2_core.common.rng import rng
from krea2_core.training.config import OptimizerConfig
from krea2_core.diffusion.flow import sample_timesteps
from krea2_core.training import checkpoint as ckpt
from krea2_core.training.optim import build_optimizers
from krea2_core.training.parallel import clip_grad_norm
from krea2_core.training.schedules import wsd_scheduler

def noise_and_timesteps(tokens: torch.Tensor, sample_index: torch.Tensor, *, seed: int, step: int, shift: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-matching noise and timestep of each sample (global index ``sample_index``) at ``step``, each from
    ``rng(seed, step, index)``: ranks holding slices of one global batch draw what a single process would."""
    noise, t = [], []
    for index in sample_index.tolist():
        g = rng(seed, step, index)
        noise.append(torch.randn(tokens.shape[1:], generator=g))
        t.append(sample_timesteps(1, shift=shift, generator=g))
    return torch.stack(noise).to(tokens.device, tokens.dtype), torch.cat(t).to(tokens.device)


@dataclass(frozen=True)
class Optimized:
    """A (parallelised) model with its optimizers and LR schedules, stepped together."""

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    grad_clip: float

    @classmethod
    def build(cls, model: nn.Module, optimizer: OptimizerConfig, lr: float, *, total_steps: int, warmup_steps: int,
              decay_fraction: float = 0.0) -> Optimized:
        """The project's optimizers (``build_optimizers``: Muon and AdamW groups) under a WSD schedule."""
        optimizers = build_optimizers(model, optimizer, lr)
        return cls(model, optimizers, [wsd_scheduler(o, total_steps=total_steps, warmup_steps=warmup_steps,
                                                     decay_fraction=decay_fraction) for o in optimizers],
                   optimizer.grad_clip)

    def step(self, loss: torch.Tensor, *, schedule: bool = True) -> float:
        """Backward ``loss``, clip, optimiser step, zero the grads and, with ``schedule``, a schedule step. Returns
        the gradient norm before clipping."""
        loss.backward()
        norm = clip_grad_norm(self.model, self.grad_clip)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if schedule:
            self.schedule()
        return norm

    def schedule(self) -> None:
        """One LR-schedule step (a trainer that takes several optimiser steps per round schedules by rounds)."""
        for scheduler in self.schedulers:
            scheduler.step()

    @property
    def lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0]


class TrainState:
    """What a resume needs: the optimised parts (one model, or several checkpointed as one ``nn.ModuleDict``), the
    step, and the checkpoint directory (None: no checkpoints). Every rank constructs it and calls its methods
    together (checkpointing has collectives)."""

    def __init__(self, parts: Optimized | Mapping[str, Optimized], checkpoints: Path | None, *, steps: int,
                 model_config: dict[str, Any], every_s: float = ckpt.CHECKPOINT_EVERY_S, keep: int = 2,
                 protect: Iterable[int] = ()) -> None:
        single = isinstance(parts, Optimized)
        many = [parts] if single else list(parts.values())
        self.model = parts.model if single else nn.ModuleDict({name: part.model for name, part in parts.items()})
        self.optimizers = [o for part in many for o in part.optimizers]
        self.schedulers = [s for part in many for s in part.schedulers]
        self.checkpoints, self.steps, self.model_config = checkpoints, steps, model_config
        self.keep, self.protect = keep, set(protect)
        self.timer = ckpt.CheckpointTimer(every_s)
        self.start = 0

    def resume(self) -> dict[str, Any]:
        """Restore the newest checkpoint in place, if any; returns its extra JSON ({} when starting afresh) and
        sets ``start`` to its step."""
        latest = ckpt.latest_checkpoint(self.checkpoints) if self.checkpoints is not None else None
        if latest is None:
            return {}
        extra = ckpt.load_checkpoint(latest, model=self.model, optimizers=self.optimizers, schedulers=self.schedulers)
        self.start = int(extra["step"])
        return extra

    def range(self, desc: str, show: bool) -> Iterable[int]:
        """The steps left, ``start`` to ``steps``, with a progress bar where ``show`` (rank 0)."""
        return tqdm(range(self.start, self.steps), initial=self.start, total=self.steps, desc=desc, disable=not show,
                    mininterval=5)

    def maybe_checkpoint(self, done: int, extra: Mapping[str, Any] | None = None) -> None:
        """Save after step ``done`` if it is the last, a protected one or the timer says so (never without a
        checkpoint directory); ``extra`` is JSON a resume needs beyond the model and optimisers."""
        if self.checkpoints is None or not (done == self.steps or done in self.protect or self.timer.due()):
            return
        ckpt.save_checkpoint(self.checkpoints, step=done, model=self.model, optimizers=self.optimizers,
                             schedulers=self.schedulers, extra={**(extra or {}), "step": done},
                             model_config=self.model_config, keep=self.keep, protect=self.protect)
