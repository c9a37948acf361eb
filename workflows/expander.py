"""The prompt expander: an LLM writes user prompts from long captions -> SFT of an open LLM on user prompt ->
thinking + expansion -> GDPO RL through the images an image model makes of its expansions.

    pyflyte run workflows/expander.py prompt_expander --captions <captions artifact> --image_model <checkpoint> \
        [--reward_model <reward model artifact>] [--preset tiny] [--config overrides.yaml] [--overrides '<YAML>']

The expander needs only captions and a sampler, so it can run beside post-training; the whole pipeline trains it
against the distilled model (the fast sampler users get).
"""

from __future__ import annotations

from typing import Optional

from flytekit import dynamic, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from containers.images import DATA_IMAGE
from krea2_core.config import PipelineConfig
from krea2_core.expander.data import EXPANDER_DATA
from tasks.pipeline import resolve_config
from workflows.graph import add_stages


@workflow
def prompt_expander(captions: FlyteDirectory, image_model: FlyteDirectory,
                    reward_model: Optional[FlyteDirectory] = None, preset: str = "tiny",
                    config: Optional[FlyteFile] = None, overrides: str = "", parent_run_id: str = "") -> FlyteDirectory:
    """The expander under a preset with YAML overrides; ``reward_model`` serves the aesthetic reward when
    ``expander.rl.weights['aesthetic']`` > 0."""
    cfg = resolve_config(preset=preset, config=config, overrides=overrides)
    return prompt_expander_stages(config=cfg, captions=captions, image_model=image_model, reward_model=reward_model,
                                  parent_run_id=parent_run_id)


@dynamic(container_image=DATA_IMAGE)
def prompt_expander_stages(config: PipelineConfig, captions: FlyteDirectory, image_model: FlyteDirectory,
                           reward_model: Optional[FlyteDirectory] = None, parent_run_id: str = "") -> FlyteDirectory:
    """The RL-trained expander artifact (a transformers model directory)."""
    have = {EXPANDER_DATA.inputs["captions"]: captions, "distill": image_model, "reward_model": reward_model}
    return add_stages(config, have, ["expander_rl"], parent_run_id)["expander_rl"]
