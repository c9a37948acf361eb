"""Flyte tasks of post-training (midtraining data, SFT data, merging, the preference stages, the aesthetic reward
model, RL, timestep distillation); the work is in krea2_core.post. Training tasks are the Flyte Elastic (torchrun)
tasks declared like pretraining's (midtraining and SFT run tasks.pretrain.train_stage)."""

from __future__ import annotations

from typing import Optional

from flytekit import Resources, task
from flytekit.types.directory import FlyteDirectory

from containers.images import DATA_IMAGE, TRAIN_IMAGE
from krea2_core.post.annotations import ANNOTATIONS, AnnotationSettings
from krea2_core.post.config import RewardModelConfig
from krea2_core.post.distill import DISTILL, DistillSettings
from krea2_core.post.grpo import RL, RLSettings
from krea2_core.post.merge import MergeSettings, run_merge
from krea2_core.post.midtrain import PACK_MIDTRAIN, MidtrainPackingSettings
from krea2_core.post.pairs import PAIRS, PairSettings
from krea2_core.post.preference import PreferenceSettings, run_preference_stage
from krea2_core.post.reward_model import REWARD_MODEL
from krea2_core.post.sft import SFTDataSettings, run_sft_data
from tasks.common import CACHE, from_flyte_dir, local, to_flyte_dir
from tasks.pretrain import SAMPLE_RESOURCES, TRAIN_TASK


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="2", mem="8Gi"))
def pack_midtrain(curated: FlyteDirectory, captions: FlyteDirectory, selection: FlyteDirectory,
                  settings: MidtrainPackingSettings, parent_run_id: str = "") -> FlyteDirectory:
    return to_flyte_dir(PACK_MIDTRAIN.run(local(curated=curated, captions=captions, selection=selection), settings,
                                          parent_run_id))


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="2", mem="4Gi"))
def sft_data(settings: SFTDataSettings, parent_run_id: str = "") -> FlyteDirectory:
    """One domain's SFT set, rendered and packed."""
    return to_flyte_dir(run_sft_data({}, settings, parent_run_id))


@task(cache=CACHE, container_image=TRAIN_IMAGE, requests=SAMPLE_RESOURCES)
def merge_sft(base: FlyteDirectory, sft: dict[str, FlyteDirectory], settings: MergeSettings,
              parent_run_id: str = "") -> FlyteDirectory:
    """The domain SFT checkpoints (by domain) merged over ``base``, with the candidate x domain evaluation."""
    inputs = {"base": from_flyte_dir(base), **{f"sft.{name}": from_flyte_dir(d) for name, d in sft.items()}}
    return to_flyte_dir(run_merge(inputs, settings, parent_run_id))


@task(cache=CACHE, container_image=TRAIN_IMAGE, requests=SAMPLE_RESOURCES)
def preference_pairs(policy: FlyteDirectory, previous: FlyteDirectory, settings: PairSettings,
                     parent_run_id: str = "") -> FlyteDirectory:
    return to_flyte_dir(PAIRS.run(local(policy=policy, previous=previous), settings, parent_run_id))


@task(cache=CACHE, container_image=TRAIN_IMAGE, requests=SAMPLE_RESOURCES)
def annotation_pairs(policy: Optional[FlyteDirectory], previous: Optional[FlyteDirectory],
                     annotations: Optional[FlyteDirectory],
                     settings: AnnotationSettings, parent_run_id: str = "") -> FlyteDirectory:
    """The calibration pairs: from the human annotation set ``annotations`` (its digest is in the settings, so its
    location is not in the cache key), or from simulated annotators when it is None."""
    return to_flyte_dir(ANNOTATIONS.run(local(policy=policy, previous=previous), settings, parent_run_id,
                                        annotations=from_flyte_dir(annotations) if annotations is not None else None))


@task(**TRAIN_TASK)
def preference_stage(pairs: FlyteDirectory, init: FlyteDirectory, settings: PreferenceSettings,
                     parent_run_id: str = "") -> FlyteDirectory:
    """Preference optimisation (``settings.name``: synthetic or calibration) from ``init``, also the reference."""
    return to_flyte_dir(run_preference_stage(local(pairs=pairs, init=init), settings, parent_run_id))


@task(cache=CACHE, container_image=TRAIN_IMAGE, requests=SAMPLE_RESOURCES)
def reward_model(pairs: list[FlyteDirectory], settings: RewardModelConfig, parent_run_id: str = "") -> FlyteDirectory:
    """The offline aesthetic reward: a head on frozen image embeddings, trained on the PO preference pairs."""
    inputs = {f"pairs.{i}": from_flyte_dir(d) for i, d in enumerate(pairs)}
    return to_flyte_dir(REWARD_MODEL.run(inputs, settings, parent_run_id))


# Rank 0 of the RL task serves the rewards from Ray actors: a local Ray instance in the task's pod, or the cluster at
# post.rl.rewards.ray_address.
@task(**TRAIN_TASK)
def rl_stage(init: FlyteDirectory, reward_model: Optional[FlyteDirectory], settings: RLSettings,
             parent_run_id: str = "") -> FlyteDirectory:
    """Flow-GRPO without CFG from ``init`` (also the KL reference), on the multi-reward objective."""
    return to_flyte_dir(RL.run(local(init=init, reward_model=reward_model), settings, parent_run_id))


@task(**TRAIN_TASK)
def distill_stage(teacher: FlyteDirectory, settings: DistillSettings, parent_run_id: str = "") -> FlyteDirectory:
    """TDM: a few-step, guidance-free student of ``teacher`` (data-free)."""
    return to_flyte_dir(DISTILL.run(local(teacher=teacher), settings, parent_run_id))
