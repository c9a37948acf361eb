"""Flyte tasks of the prompt expander: SFT data, SFT, GDPO RL; the work is in krea2_core.expander.

Each runs in one process on the training image with one GPU when training has GPUs (an LLM of a few billion
parameters finetunes on one card; the RL task also samples the image model there)."""

from __future__ import annotations

from typing import Optional

from flytekit import task
from flytekit.types.directory import FlyteDirectory

from containers.images import TRAIN_IMAGE
from krea2_core.config import ExpanderDataConfig, ExpansionConfig, ExpanderRLConfig, ExpanderSFTConfig, \
    PretrainConfig
from krea2_core.expander.data import run_expander_data
from krea2_core.expander.rl import run_expander_rl
from krea2_core.expander.sft import run_expander_sft
from tasks.common import CACHE, from_flyte_dir, to_flyte_dir
from tasks.pretrain import SAMPLE_RESOURCES


@task(cache=CACHE, container_image=TRAIN_IMAGE, requests=SAMPLE_RESOURCES)
def expander_data(captions: FlyteDirectory, config: ExpanderDataConfig, parent_run_id: str = "") -> FlyteDirectory:
    """User prompt -> thinking trace + expansion pairs, written by an LLM from the long captions."""
    return to_flyte_dir(run_expander_data(from_flyte_dir(captions), config, parent_run_id=parent_run_id))


@task(cache=CACHE, container_image=TRAIN_IMAGE, requests=SAMPLE_RESOURCES)
def expander_sft(pairs: FlyteDirectory, config: ExpanderSFTConfig, expansion: ExpansionConfig, resolution: int,
                 parent_run_id: str = "") -> FlyteDirectory:
    return to_flyte_dir(run_expander_sft(from_flyte_dir(pairs), config, expansion, resolution,
                                         parent_run_id=parent_run_id))


@task(cache=CACHE, container_image=TRAIN_IMAGE, requests=SAMPLE_RESOURCES)
def expander_rl(sft: FlyteDirectory, image_model: FlyteDirectory, reward_model: Optional[FlyteDirectory],
                config: ExpanderRLConfig, expansion: ExpansionConfig, pretrain: PretrainConfig, resolution: int,
                parent_run_id: str = "") -> FlyteDirectory:
    """GDPO through the images ``image_model`` makes of the expansions (the tiny pipeline: the distilled student)."""
    return to_flyte_dir(run_expander_rl(from_flyte_dir(sft), from_flyte_dir(image_model),
                                        from_flyte_dir(reward_model) if reward_model is not None else None, config,
                                        expansion, pretrain, resolution, parent_run_id=parent_run_id))
