"""Flyte tasks of post-training (midtraining, SFT + merging, preference optimisation, the aesthetic reward model,
RL, timestep distillation); the work is in krea2_core.post. Training tasks are Flyte Elastic (torchrun) tasks
declared like pretraining's."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from flytekit import Resources, task
from flytekit.types.directory import FlyteDirectory

from containers.images import DATA_IMAGE, TRAIN_IMAGE
from krea2_core.config import DistillConfig, MidtrainConfig, PackingConfig, PostTrainConfig, PreferenceConfig, \
    PretrainConfig, PretrainStageConfig, RewardModelConfig, RLConfig, SFTConfig, SFTDomainConfig
from krea2_core.post.annotations import run_annotation_pairs
from krea2_core.post.distill import run_distill_stage
from krea2_core.post.grpo import run_rl_stage
from krea2_core.post.merge import run_merge
from krea2_core.post.midtrain import run_midtrain_packing
from krea2_core.post.pairs import run_pair_generation
from krea2_core.post.preference import run_preference_stage
from krea2_core.post.reward_model import run_reward_model
from krea2_core.post.sft import run_sft_data
from krea2_core.training.pretrain import run_training_stage
from tasks.common import CACHE, from_flyte_dir, to_flyte_dir
from tasks.pretrain import SAMPLE_RESOURCES, TRAIN_TASK


def _rank0(path: Path | None) -> FlyteDirectory | None:
    return to_flyte_dir(path) if path is not None else None  # other ranks' outputs are ignored by Elastic


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="2", mem="8Gi"))
def pack_midtrain(curated: FlyteDirectory, captions: FlyteDirectory, selection: FlyteDirectory,
                  config: MidtrainConfig, packing: PackingConfig, parent_run_id: str = "") -> FlyteDirectory:
    path, _ = run_midtrain_packing(from_flyte_dir(curated), from_flyte_dir(captions), from_flyte_dir(selection),
                                   config, packing, parent_run_id=parent_run_id)
    return to_flyte_dir(path)


@task(**TRAIN_TASK)
def finetune_stage(packed: FlyteDirectory, init: FlyteDirectory, name: str, stage: PretrainStageConfig,
                   config: PretrainConfig, parent_run_id: str = "") -> FlyteDirectory:
    """Midtraining or one domain's SFT: the pretraining trainer on other data with its own recipe."""
    return _rank0(run_training_stage(from_flyte_dir(packed), from_flyte_dir(init), name, stage, config,
                                     parent_run_id=parent_run_id))


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="2", mem="4Gi"))
def sft_data(name: str, domain: SFTDomainConfig, sft: SFTConfig, multiple: int, parent_run_id: str = "") -> FlyteDirectory:
    path, _ = run_sft_data(name, domain, sft, multiple, parent_run_id=parent_run_id)
    return to_flyte_dir(path)


@task(cache=CACHE, container_image=TRAIN_IMAGE, requests=SAMPLE_RESOURCES)
def merge_sft(base: FlyteDirectory, sft: dict[str, FlyteDirectory], post: PostTrainConfig, pretrain: PretrainConfig,
              parent_run_id: str = "") -> FlyteDirectory:
    path, _ = run_merge(from_flyte_dir(base), {name: from_flyte_dir(d) for name, d in sft.items()}, post, pretrain,
                        parent_run_id=parent_run_id)
    return to_flyte_dir(path)


@task(cache=CACHE, container_image=TRAIN_IMAGE, requests=SAMPLE_RESOURCES)
def preference_pairs(policy: FlyteDirectory, previous: FlyteDirectory, config: PreferenceConfig,
                     pretrain: PretrainConfig, resolution: int, parent_run_id: str = "") -> FlyteDirectory:
    path, _ = run_pair_generation(from_flyte_dir(policy), from_flyte_dir(previous), config, pretrain, resolution,
                                  parent_run_id=parent_run_id)
    return to_flyte_dir(path)


@task(container_image=DATA_IMAGE)
def file_digest(path: str) -> str:
    """sha256 of a file ("" for no file): a cached task that reads a file by path takes this as an input, so
    editing the file in place re-runs it (Flyte's cache sees only the path string)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""


@task(cache=CACHE, container_image=TRAIN_IMAGE, requests=SAMPLE_RESOURCES)
def annotation_pairs(annotations: str, annotations_digest: str, policy: FlyteDirectory, previous: FlyteDirectory,
                     config: PreferenceConfig, pretrain: PretrainConfig, resolution: int,
                     parent_run_id: str = "") -> FlyteDirectory:
    """The calibration pairs: the human-annotation table at ``annotations`` (``annotations_digest`` keys the
    cache on its content), or simulated annotators when it is ""."""
    path, _ = run_annotation_pairs(Path(annotations) if annotations else None, from_flyte_dir(policy),
                                   from_flyte_dir(previous), config, pretrain, resolution, parent_run_id=parent_run_id)
    return to_flyte_dir(path)


@task(**TRAIN_TASK)
def preference_stage(pairs: FlyteDirectory, init: FlyteDirectory, name: str, config: PreferenceConfig,
                     pretrain: PretrainConfig, resolution: int, parent_run_id: str = "") -> FlyteDirectory:
    """Preference optimisation (``name``: synthetic or calibration) from ``init``, which is also the reference."""
    return _rank0(run_preference_stage(from_flyte_dir(pairs), from_flyte_dir(init), name, config, pretrain,
                                       resolution, parent_run_id=parent_run_id))


@task(cache=CACHE, container_image=TRAIN_IMAGE, requests=SAMPLE_RESOURCES)
def reward_model(pairs: list[FlyteDirectory], config: RewardModelConfig, parent_run_id: str = "") -> FlyteDirectory:
    """The offline aesthetic reward: a head on frozen image embeddings, trained on the PO preference pairs."""
    path, _ = run_reward_model([from_flyte_dir(d) for d in pairs], config, parent_run_id=parent_run_id)
    return to_flyte_dir(path)


# Rank 0 of the RL task serves the rewards from Ray actors: a local Ray instance in the task's pod, or the cluster at
# post.rl.rewards.ray_address.
@task(**TRAIN_TASK)
def rl_stage(init: FlyteDirectory, reward_model: Optional[FlyteDirectory], config: RLConfig, pretrain: PretrainConfig,
             resolution: int, parent_run_id: str = "") -> FlyteDirectory:
    """Flow-GRPO without CFG from ``init`` (also the KL reference), on the multi-reward objective."""
    return _rank0(run_rl_stage(from_flyte_dir(init), from_flyte_dir(reward_model) if reward_model is not None else None,
                               config, pretrain, resolution, parent_run_id=parent_run_id))


@task(**TRAIN_TASK)
def distill_stage(teacher: FlyteDirectory, config: DistillConfig, pretrain: PretrainConfig, resolution: int,
                  parent_run_id: str = "") -> FlyteDirectory:
    """TDM: a few-step, guidance-free student of ``teacher`` (data-free)."""
    return _rank0(run_distill_stage(from_flyte_dir(teacher), config, pretrain, resolution,
                                    parent_run_id=parent_run_id))
