"""The diffusers model directory that every ``checkpoint`` artifact is (the flow-matching training stages, the
SFT merge, preference optimisation, RL, distillation): its weights file and the ``config.json`` that
``Krea2Transformer2DModel.from_pretrained`` reads.

Its own module so that merging (which pretraining uses, through PMA) names the weights file without importing
the trainer.
"""

from __future__ import annotations

import inspect
from typing import Any

from krea2_core.artifacts import to_plain
from krea2_core.models.config import DiTConfig

DIFFUSERS_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CONFIG_FILE = "config.json"


def diffusers_config(model: DiTConfig) -> dict[str, Any]:
    """``config.json`` for diffusers: its Krea2Transformer2DModel arguments, our ablation switches under "krea2"."""
    from diffusers import Krea2Transformer2DModel

    names = inspect.signature(Krea2Transformer2DModel.__init__).parameters
    plain = to_plain(model)
    return {"_class_name": "Krea2Transformer2DModel", **{k: v for k, v in plain.items() if k in names},
            "krea2": {k: v for k, v in plain.items() if k not in names}}


def dit_config(config: dict[str, Any]) -> DiTConfig:
    """The DiT config a ``config.json`` of ``diffusers_config`` describes (strict: unknown keys are errors)."""
    fields = {k: v for k, v in config.items() if not k.startswith("_") and k != "krea2"}
    return DiTConfig.from_dict({**fields, **config.get("krea2", {})})
