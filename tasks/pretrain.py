"""Flyte tasks of progressive-resolution pretraining; the work is in krea2_core.

The training task is a Flyte Elastic (torchrun) task: locally it starts ``nproc_per_node`` processes on this
machine, on a cluster ``nnodes`` pods of ``nproc_per_node`` GPU workers each. A task's launch shape is fixed
when it is registered, so it is read from $KREA2_TRAIN_NNODES / $KREA2_TRAIN_NPROC_PER_NODE (defaults: the tiny
preset's 1 x 2 CPU processes); the trainer checks it against the config's ``pretrain.parallel`` and says so
when they differ.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from flytekit import Resources, task
from flytekit.types.directory import FlyteDirectory
from flytekitplugins.kfpytorch import Elastic

from containers.images import DATA_IMAGE, TRAIN_IMAGE
from krea2_core.config import PackingConfig, ParallelConfig, PretrainConfig
from krea2_core.data.packing import packing_config, run_packing
from krea2_core.training.pretrain import run_pretrain_stage
from tasks.common import CACHE, from_flyte_dir, to_flyte_dir

_LAUNCH_ENV = {name: os.environ.get(name, default) for name, default in (
    ("KREA2_TRAIN_NNODES", "1"), ("KREA2_TRAIN_NPROC_PER_NODE", "2"), ("KREA2_TRAIN_GPUS_PER_NODE", "0"))}
TRAIN_LAUNCH = Elastic(nnodes=int(_LAUNCH_ENV["KREA2_TRAIN_NNODES"]),
                       nproc_per_node=int(_LAUNCH_ENV["KREA2_TRAIN_NPROC_PER_NODE"]))
_GPUS = _LAUNCH_ENV["KREA2_TRAIN_GPUS_PER_NODE"]


@task(container_image=DATA_IMAGE)
def stage_config(config: PretrainConfig, stage: str) -> PretrainConfig:
    """The config with only ``stage`` in it: what that stage's training is cached on, so changing the 1024 stage
    re-runs neither the 256 nor the 512 stage."""
    if stage not in config.stages:
        raise ValueError(f"pretraining stage {stage!r} is not configured; configured: {sorted(config.stages)}")
    return dataclasses.replace(config, stages={stage: config.stages[stage]})


@task(container_image=DATA_IMAGE)
def stage_packing(config: PretrainConfig, stage: str) -> PackingConfig:
    """What ``stage``'s packed shards depend on: packing is cached on this, so training settings never re-pack."""
    return packing_config(config, stage)


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="4", mem="16Gi"))
def pack_images(curated: FlyteDirectory, captions: FlyteDirectory, packing: PackingConfig, parallel: ParallelConfig,
                parent_run_id: str = "") -> FlyteDirectory:
    path, _ = run_packing(from_flyte_dir(curated), from_flyte_dir(captions), packing, parallel=parallel,
                          parent_run_id=parent_run_id)
    return to_flyte_dir(path)


# What every training task (pretraining, midtraining, SFT, preference optimisation) is declared with. The launch
# shape goes into the task's environment too: the pod re-imports the task's module, and flytekit starts torchrun
# from that import.
TRAIN_TASK = dict(task_config=TRAIN_LAUNCH, cache=CACHE, container_image=TRAIN_IMAGE, environment=_LAUNCH_ENV,
                  requests=Resources(cpu="2", mem="8Gi", gpu=_GPUS) if _GPUS != "0" else Resources(cpu="2", mem="8Gi"))
# One GPU (when training has them) for the stages that only sample and score: merging's evaluation, pair generation.
SAMPLE_RESOURCES = Resources(cpu="2", mem="8Gi", gpu="1") if _GPUS != "0" else Resources(cpu="2", mem="8Gi")


@task(**TRAIN_TASK)
def pretrain_stage(packed: FlyteDirectory, init: Optional[FlyteDirectory], stage: str, config: PretrainConfig,
                   parent_run_id: str = "") -> FlyteDirectory:
    """One resolution stage on every torchrun worker; rank 0's artifact is the output."""
    path = run_pretrain_stage(from_flyte_dir(packed), from_flyte_dir(init) if init is not None else None, stage,
                              config, parent_run_id=parent_run_id)
    return to_flyte_dir(path) if path is not None else None  # other ranks' outputs are ignored by Elastic
