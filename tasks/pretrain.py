"""Flyte tasks of packing and of flow-matching training (the pretraining resolution stages, midtraining, SFT); the
work is in krea2_core.data.packing and krea2_core.training.pretrain.

Every training task is a Flyte Elastic (torchrun) task: locally it starts ``nproc_per_node`` processes on this
machine, on a cluster ``nnodes`` pods of ``nproc_per_node`` GPU workers each. A task's launch shape is fixed
when it is registered, so it is read from $KREA2_TRAIN_NNODES / $KREA2_TRAIN_NPROC_PER_NODE (defaults: the tiny
preset's 1 x 2 CPU processes); the trainer checks it against the config's ``pretrain.parallel`` and says so
when they differ.
"""

from __future__ import annotations

import os
from typing import Optional

from flytekit import Resources, task
from flytekit.types.directory import FlyteDirectory
from flytekitplugins.kfpytorch import Elastic

from containers.images import DATA_IMAGE, TRAIN_IMAGE
from krea2_core.curation.config import ParallelConfig
from krea2_core.data.config import PackingConfig
from krea2_core.data.packing import packing_spec
from krea2_core.training.pretrain import TrainingSettings, run_training_stage
from tasks.common import CACHE, local, to_flyte_dir

_LAUNCH_ENV = {name: os.environ.get(name, default) for name, default in (
    ("KREA2_TRAIN_NNODES", "1"), ("KREA2_TRAIN_NPROC_PER_NODE", "2"), ("KREA2_TRAIN_GPUS_PER_NODE", "0"))}
TRAIN_LAUNCH = Elastic(nnodes=int(_LAUNCH_ENV["KREA2_TRAIN_NNODES"]),
                       nproc_per_node=int(_LAUNCH_ENV["KREA2_TRAIN_NPROC_PER_NODE"]))
_GPUS = _LAUNCH_ENV["KREA2_TRAIN_GPUS_PER_NODE"]


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="4", mem="16Gi"))
def pack_images(curated: FlyteDirectory, captions: FlyteDirectory, settings: PackingConfig, parallel: ParallelConfig,
                parent_run_id: str = "") -> FlyteDirectory:
    """One resolution stage's images in aspect-ratio-bucketed shards."""
    return to_flyte_dir(packing_spec(settings.stage).run(local(curated=curated, captions=captions), settings,
                                                         parent_run_id, parallel=parallel))


# What every training task (pretraining, midtraining, SFT, preference optimisation) is declared with. The launch
# shape goes into the task's environment too: the pod re-imports the task's module, and flytekit starts torchrun
# from that import.
TRAIN_TASK = dict(task_config=TRAIN_LAUNCH, cache=CACHE, container_image=TRAIN_IMAGE, environment=_LAUNCH_ENV,
                  requests=Resources(cpu="2", mem="8Gi", gpu=_GPUS) if _GPUS != "0" else Resources(cpu="2", mem="8Gi"))
# One GPU (when training has them) for the stages that only sample and score: merging's evaluation, pair generation.
SAMPLE_RESOURCES = Resources(cpu="2", mem="8Gi", gpu="1") if _GPUS != "0" else Resources(cpu="2", mem="8Gi")


@task(**TRAIN_TASK)
def train_stage(packed: FlyteDirectory, settings: TrainingSettings, init: Optional[FlyteDirectory] = None,
                parent_run_id: str = "") -> FlyteDirectory:
    """A pretraining resolution stage, midtraining or a domain's SFT (``settings.name``) on every torchrun worker, from
    ``init`` (None: from scratch); rank 0's artifact is the output (Elastic ignores the other ranks')."""
    return to_flyte_dir(run_training_stage(local(packed=packed, init=init), settings, parent_run_id))
