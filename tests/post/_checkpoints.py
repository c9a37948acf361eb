"""Shared by the PO data tests: a tiny DiT config, two published checkpoints and stub oracles."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from krea2_core.post.annotations import SimulatedAnnotations, simulated_like
from krea2_core.post.config import PreferenceConfig
from krea2_core.post.pairs import PairSettings
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.training.config import PretrainConfig
from krea2_core.training.diffusers_format import DIFFUSERS_WEIGHTS_FILE
from krea2_core.training.image_model import ModelIndex, new_model
from krea2_core.world.captions import Prompt

RESOLUTION = 32
PRETRAIN = PretrainConfig.from_dict({
    "model": {"in_channels": 192, "num_layers": 1, "attention_head_dim": 32, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 128, "timestep_embed_dim": 32,
              "text_num_attention_heads": 6, "text_num_key_value_heads": 6, "text_intermediate_size": 256},
    "autoencoder": {"downsample": 4, "patch_size": 2},
    "text_encoder": {"max_tokens": 32},
    "repa": {"block": 1},
    "parallel": {"nproc_per_node": 1, "dtype": "float32"},
    "stages": {"256": {"resolution": 32, "steps": 2, "global_batch": 8, "warmup_steps": 0, "pma_checkpoints": 1}},
})
TRAINER = PRETRAIN.finetune()  # what the stages after SFT that train a checkpoint take
RUNNER = PRETRAIN.run_config()  # what the ones that sample it take


def preference_config(simulated: int = 40, **pairs: object) -> PreferenceConfig:
    base = {"n_prompts": 10, "policy": {"steps": 2}, "off_policy_fraction": 0.3, "min_margin": 0.05, "seed": 5,
            "opponents": [{"checkpoint": "previous", "steps": 2}, {"steps": 2, "cfg_scale": 1.5}, {"steps": 2}]}
    return PreferenceConfig.from_dict({"pairs": {**base, **pairs}, "simulated_annotations": simulated,
                                       "simulated_label_noise": 0.2})


def pair_settings(config: PreferenceConfig | None = None, **sampling: int) -> PairSettings:
    """The pair-generation settings of ``config`` (default ``preference_config()``) at RESOLUTION with RUNNER."""
    return PairSettings(pairs=(config or preference_config()).pairs, resolution=RESOLUTION, trainer=RUNNER,
                        **sampling)


def simulated_annotations(config: PreferenceConfig | None = None) -> SimulatedAnnotations:
    """How the simulated annotation table of ``config`` (default ``preference_config()``) is made."""
    config = config or preference_config()
    return simulated_like(pair_settings(config), config.simulated_annotations, config.simulated_label_noise)


def publish_checkpoints(root: Path) -> tuple[Path, Path]:
    """(policy, previous): a freshly initialised DiT, and one whose constant velocity makes every sample bright
    (x0 = noise - v with v = -2 everywhere), so a brightness oracle always prefers "previous"."""
    def publish(name: str, bright: bool) -> Path:
        def body(inputs: dict[str, Path], staging: Path, run: object) -> StageOutput:
            state = new_model(PRETRAIN.model, torch.device("cpu"), seed=PRETRAIN.seed).state_dict()
            if bright:
                state["final_layer.linear.weight"].zero_()
                state["final_layer.linear.bias"].fill_(-2.0)
            save_file({k: v.contiguous() for k, v in state.items()}, staging / DIFFUSERS_WEIGHTS_FILE)
            ModelIndex.of(PRETRAIN).write(staging)
            return StageOutput(counts={})

        return execute_stage(f"test_{name}", "checkpoint", body, config={"name": name}, root=root)[0]

    return publish("policy", False), publish("previous", True)


class BrightnessOracle:
    """Prefers brighter images (mean pixel value in [0, 1])."""

    name = "brightness"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> list[float]:
        return [float(np.asarray(image.convert("RGB")).mean() / 255) for image in images]


class ConstantOracle:
    """Sees no difference between any two images: every pair is a tie."""

    name = "constant"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> list[float]:
        return [0.5 for _ in images]


class HashOracle:
    """An arbitrary but deterministic score per distinct image: distinct images almost never tie."""

    name = "hash"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> list[float]:
        return [int(hashlib.sha256(image.tobytes()).hexdigest()[:8], 16) / 16**8 for image in images]
