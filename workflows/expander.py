"""The prompt expander: an LLM writes user prompts from long captions -> SFT of an open LLM on user prompt ->
thinking + expansion -> GDPO RL through the images an image model makes of its expansions.

    pyflyte run workflows/expander.py prompt_expander --captions <captions artifact> --image_model <checkpoint> \
        [--preset tiny] [--config overrides.yaml]

The expander needs only captions and a sampler, so it can run beside post-training; the whole pipeline trains it
against the distilled model (the fast sampler users get).
"""

from __future__ import annotations

from typing import Optional

from flytekit import workflow
from flytekit.types.directory import FlyteDirectory

from krea2_core.config import ExpanderConfig, PretrainConfig, preset
from tasks.expander import expander_data, expander_rl, expander_sft
from tasks.pipeline import resolve_config

_TINY = preset("tiny")


@workflow
def prompt_expander(captions: FlyteDirectory, image_model: FlyteDirectory,
                    reward_model: Optional[FlyteDirectory] = None, preset: str = "tiny", config: str = "",
                    parent_run_id: str = "") -> FlyteDirectory:
    """The expander under a preset with YAML overrides (a file or inline)."""
    cfg = resolve_config(preset=preset, overrides=config)
    return prompt_expander_stages(captions=captions, image_model=image_model, reward_model=reward_model,
                                  config=cfg.expander, pretrain=cfg.pretrain, resolution=cfg.post.resolution,
                                  parent_run_id=parent_run_id)


@workflow
def prompt_expander_stages(captions: FlyteDirectory, image_model: FlyteDirectory,
                           reward_model: Optional[FlyteDirectory] = None, config: ExpanderConfig = _TINY.expander,
                           pretrain: PretrainConfig = _TINY.pretrain, resolution: int = _TINY.post.resolution,
                           parent_run_id: str = "") -> FlyteDirectory:
    """The RL-trained expander artifact (a transformers model directory); ``reward_model`` serves the aesthetic
    reward when ``config.rl.weights['aesthetic']`` > 0."""
    pairs = expander_data(captions=captions, config=config.data, parent_run_id=parent_run_id)
    sft = expander_sft(pairs=pairs, config=config.sft, expansion=config.expansion, resolution=resolution,
                       parent_run_id=parent_run_id)
    return expander_rl(sft=sft, image_model=image_model, reward_model=reward_model, config=config.rl,
                       expansion=config.expansion, pretrain=pretrain, resolution=resolution, parent_run_id=parent_run_id)
