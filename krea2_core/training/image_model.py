"""Self-describing image-model checkpoints: every ``checkpoint`` artifact (and every scratch directory a stage
loads weights from) holds, beside its weights, what builds the model that runs them, so a consumer loads it from the
directory alone:

- ``diffusion_pytorch_model.safetensors`` and ``config.json``: the DiT as a diffusers model directory
  (krea2_core/training/diffusers_format.py); ``config.json`` is read back into the DiT config;
- ``model_index.json`` (after diffusers' pipeline index): the frozen autoencoder and text encoder the DiT was
  trained with, ``{"_class_name": "Krea2TextToImage", "transformer": "config.json", "autoencoder": {...},
  "text_encoder": {...}}``.

How to run the model (device, dtype, compiled or not) is the caller's: ``TrainParallelConfig``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from krea2_core.artifacts import to_plain
from krea2_core.common.strict import ConfigError
from krea2_core.models.config import AutoencoderConfig, DiTConfig, TextEncoderConfig
from krea2_core.training.config import TrainerConfig, TrainParallelConfig
from krea2_core.diffusion.text_to_image import TextToImage
from krea2_core.models.autoencoders import load_autoencoder
from krea2_core.models.dit import Krea2DiT
from krea2_core.models.text_encoders import load_text_encoder
from krea2_core.training import checkpoint as ckpt
from krea2_core.training.diffusers_format import DIFFUSERS_CONFIG_FILE, DIFFUSERS_WEIGHTS_FILE, diffusers_config, \
    dit_config

MODEL_INDEX_FILE = "model_index.json"
_CLASS_NAME = "Krea2TextToImage"


@dataclass(frozen=True)
class ModelIndex:
    """What builds a checkpoint's text-to-image model besides its weights."""

    model: DiTConfig
    autoencoder: AutoencoderConfig
    text_encoder: TextEncoderConfig

    @classmethod
    def of(cls, trainer: TrainerConfig) -> ModelIndex:
        return cls(trainer.model, trainer.autoencoder, trainer.text_encoder)

    def write(self, directory: Path) -> None:
        """``config.json`` and ``model_index.json`` into ``directory``."""
        (directory / DIFFUSERS_CONFIG_FILE).write_text(json.dumps(diffusers_config(self.model), indent=2))
        index = {"_class_name": _CLASS_NAME, "transformer": DIFFUSERS_CONFIG_FILE,
                 "autoencoder": to_plain(self.autoencoder), "text_encoder": to_plain(self.text_encoder)}
        (directory / MODEL_INDEX_FILE).write_text(json.dumps(index, indent=2))

    @classmethod
    def read(cls, directory: Path) -> ModelIndex:
        """The index a checkpoint directory was written with; ValueError naming the file when it is missing or
        does not parse."""
        directory = Path(directory)
        files = {name: directory / name for name in (MODEL_INDEX_FILE, DIFFUSERS_CONFIG_FILE)}
        missing = [name for name, file in files.items() if not file.is_file()]
        if missing:
            raise ValueError(f"{directory} is not a self-describing checkpoint: no {' or '.join(missing)} (written by "
                             "an older version of the pipeline: re-run the stage that made it)")
        try:
            index: dict[str, Any] = json.loads(files[MODEL_INDEX_FILE].read_text())
            if index.get("_class_name") != _CLASS_NAME:
                raise ValueError(f"_class_name is {index.get('_class_name')!r}, expected {_CLASS_NAME!r}")
            return cls(_part("transformer", dit_config, json.loads(files[DIFFUSERS_CONFIG_FILE].read_text())),
                       _part("autoencoder", AutoencoderConfig.from_dict, index.get("autoencoder")),
                       _part("text_encoder", TextEncoderConfig.from_dict, index.get("text_encoder")))
        except ValueError as err:  # ConfigError and JSONDecodeError among them
            raise ValueError(f"{directory}: unreadable model index: {err}") from err


def _part(name: str, build: Callable[[Any], Any], data: Any) -> Any:
    """One component's config; errors name the component."""
    if not isinstance(data, dict):
        raise ValueError(f"{name}: expected a mapping, got {data!r}")
    try:
        return build(data)
    except ConfigError as err:
        raise ConfigError(f"{name}.{err}") from None


def new_model(source: Path | DiTConfig, device: torch.device, *, seed: int) -> Krea2DiT:
    """The DiT of a checkpoint directory ``source`` (its config and weights), or a fresh DiT of config ``source``.
    Seeds torch's global generator with ``seed`` first: a fresh DiT is the same on every rank, and what draws from
    the global generator next draws the same numbers however the model was made."""
    torch.manual_seed(seed)
    if isinstance(source, DiTConfig):
        return Krea2DiT(source).to(device)
    model = Krea2DiT(ModelIndex.read(source).model)
    ckpt.load_weights(Path(source) / DIFFUSERS_WEIGHTS_FILE, model)
    return model.to(device)


def text_to_image(model: torch.nn.Module, index: ModelIndex, parallel: TrainParallelConfig, device: torch.device
                  ) -> TextToImage:
    """``model`` with the index's frozen autoencoder and text encoder, run as ``parallel`` says."""
    return TextToImage(model, load_autoencoder(index.autoencoder, device), load_text_encoder(index.text_encoder, device),
                       index.autoencoder.patch_size, getattr(torch, parallel.dtype),
                       drop_text_padding=not parallel.compile)  # compiled blocks: one shape, no recompiles


def load_text_to_image(checkpoint: Path, parallel: TrainParallelConfig, device: torch.device, *, seed: int
                       ) -> TextToImage:
    """A checkpoint directory's text-to-image model, built from the directory alone."""
    return text_to_image(new_model(checkpoint, device, seed=seed), ModelIndex.read(checkpoint), parallel, device)


def publish_checkpoint(staging: Path, weights: Path, index: ModelIndex, *, prefix: str = "",
                       metrics: Path | None = None) -> None:
    """The model of a checkpoint artifact into ``staging``: the safetensors file ``weights`` (with ``prefix``, only
    its keys under the prefix, the prefix removed), ``config.json``, ``model_index.json``, and a copy of the
    ``metrics`` curve when given."""
    out = staging / DIFFUSERS_WEIGHTS_FILE
    if prefix:
        saved = load_file(weights)
        save_file({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}, out,
                  metadata={"format": "pt"})
    else:
        shutil.copy(weights, out)
    index.write(staging)
    if metrics is not None:
        shutil.copy(metrics, staging / metrics.name)
