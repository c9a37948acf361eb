"""Flyte tasks of the prompt expander: SFT data, SFT, GDPO RL; the work is in krea2_core.expander.

Each runs in one process on the training image with one GPU when training has GPUs (an LLM of a few billion
parameters finetunes on one card; the RL task also samples the image model there)."""

from __future__ import annotations

from typing import Optional

from flytekit import task
from flytekit.types.directory import FlyteDirectory

from containers.images import TRAIN_IMAGE
from krea2_core.expander.config import ExpanderDataConfig
from krea2_core.expander.data import EXPANDER_DATA
from krea2_core.expander.rl import EXPANDER_RL, ExpanderRLSettings
from krea2_core.expander.sft import EXPANDER_SFT, ExpanderSFTSettings
from tasks.common import CACHE, local, to_flyte_dir
from tasks.pretrain import SAMPLE_RESOURCES


@task(cache=CACHE, container_image=TRAIN_IMAGE, requests=SAMPLE_RESOURCES)
def expander_data(captions: FlyteDirectory, settings: ExpanderDataConfig, parent_run_id: str = "") -> FlyteDirectory:
    """User prompt -> thinking trace + expansion pairs, written by an LLM from the long captions."""
    return to_flyte_dir(EXPANDER_DATA.run(local(captions=captions), settings, parent_run_id))


@task(cache=CACHE, container_image=TRAIN_IMAGE, requests=SAMPLE_RESOURCES)
def expander_sft(pairs: FlyteDirectory, settings: ExpanderSFTSettings, parent_run_id: str = "") -> FlyteDirectory:
    return to_flyte_dir(EXPANDER_SFT.run(local(pairs=pairs), settings, parent_run_id))


@task(cache=CACHE, container_image=TRAIN_IMAGE, requests=SAMPLE_RESOURCES)
def expander_rl(sft: FlyteDirectory, image_model: FlyteDirectory, reward_model: Optional[FlyteDirectory],
                settings: ExpanderRLSettings, parent_run_id: str = "") -> FlyteDirectory:
    """GDPO through the images ``image_model`` makes of the expansions (the whole pipeline: the distilled student)."""
    return to_flyte_dir(EXPANDER_RL.run(local(sft=sft, image_model=image_model, reward_model=reward_model), settings,
                                        parent_run_id))
