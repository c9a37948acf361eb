"""Supervised finetuning on small domain sets: one checkpoint per domain, trained from the midtraining
checkpoint with one shared recipe, and evaluated on held-out prompts of its own domain.

On the verifiable world a domain set is rendered from a slice of the world (``SFTDomainConfig.scenes``): perfect
images with exact captions, which is what "small, hand-curated, highly aesthetic" means in a world whose ground
truth is known. Artifact of the data stage (kind ``packed``): the packed shards plus ``scenes.parquet`` (the
scene graph of every image).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from krea2_core.data.packing import pack_stage
from krea2_core.models.autoencoders import pixel_multiple
from krea2_core.post.config import SFTConfig, SFTDomainConfig
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import StageRun
from krea2_core.training.config import TrainerConfig
from krea2_core.training.pretrain import TrainingSettings, run_training_stage
from krea2_core.world.captions import captions
from krea2_core.world.render import render
from krea2_core.world.scene import sample_scene

DOMAIN_SCENES_FILE = "scenes.parquet"
_DATA_SEED = 7_001  # domain sets are drawn apart from the evaluation prompts (EvalConfig.seed)


def render_domain(domain: SFTDomainConfig, resolution: int, image_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Render the domain set as PNGs into ``image_dir``: (kept rows: id, uri, width, height, scene JSON;
    captions: id, long, medium, short)."""
    rng = np.random.default_rng([domain.seed, _DATA_SEED])
    image_dir.mkdir(parents=True, exist_ok=True)
    rows, texts = [], []
    for i in range(domain.n_images):
        scene = sample_scene(rng, resolution, resolution, **domain.scenes.sample_kwargs())
        image_id = f"sft{domain.seed}-{i:06d}"
        uri = image_dir / f"{image_id}.png"
        render(scene).save(uri)
        rows.append({"id": image_id, "uri": str(uri), "width": resolution, "height": resolution,
                     "scene": json.dumps(scene.to_dict())})
        texts.append({"id": image_id, **captions(scene)})
    return pd.DataFrame(rows), pd.DataFrame(texts)


@dataclass
class SFTDataSettings:
    """What a domain set's packed shards depend on."""

    name: str
    domain: SFTDomainConfig
    resolution: int  # the SFT recipe's
    global_batch: int
    multiple: int  # image sides are multiples of this (the autoencoder's downsample x patch size)


def sft_data_settings(sft: SFTConfig, name: str, multiple: int) -> SFTDataSettings:
    if name not in sft.domains:
        raise ValueError(f"unknown SFT domain {name!r}; configured: {sorted(sft.domains)}")
    return SFTDataSettings(name=name, domain=sft.domains[name], resolution=sft.stage.resolution,
                           global_batch=sft.stage.global_batch, multiple=multiple)


def run_sft_data(inputs: Mapping[str, Path], settings: SFTDataSettings, parent_run_id: str = "", *,
                 root: Path | None = None) -> Path:
    """Render and pack domain ``settings.name``'s set at the SFT resolution; a ``packed`` artifact."""
    domain = settings.domain

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        images = run.work_dir / "images"
        kept, texts = render_domain(domain, settings.resolution, images)
        counts = pack_stage(kept, texts, resolution=settings.resolution, aspect_ratios=[1.0],
                            multiple=settings.multiple, global_batch=settings.global_batch, seed=domain.seed,
                            out_dir=staging)
        kept.drop(columns=["uri"]).merge(texts, on="id").to_parquet(staging / DOMAIN_SCENES_FILE, index=False)
        return StageOutput(counts=counts)

    spec = sft_data_spec(settings.name)
    return execute_stage(spec.name, spec.kind, body, config=settings, inputs=dict(inputs),
                         parent_run_id=parent_run_id, root=root)[0]


def sft_data_spec(name: str) -> StageSpec:
    return StageSpec(f"sft_data_{name}", "packed", {},
                     lambda p: sft_data_settings(p.post.sft, name, pixel_multiple(p.pretrain.autoencoder)),
                     run_sft_data)


def domain_eval(trainer: TrainerConfig, domain: SFTDomainConfig, sft: SFTConfig) -> TrainerConfig:
    """``trainer`` with its evaluation (held-out prompts, validation scenes) drawn from ``domain``."""
    return dataclasses.replace(trainer, eval=dataclasses.replace(trainer.eval, scenes=domain.scenes,
                                                                 n_prompts=sft.eval_prompts))


def sft_settings(trainer: TrainerConfig, sft: SFTConfig, name: str) -> TrainingSettings:
    """SFT of domain ``name`` with the shared recipe, evaluated on the domain's held-out prompts."""
    if name not in sft.domains:
        raise ValueError(f"unknown SFT domain {name!r}; configured: {sorted(sft.domains)}")
    return TrainingSettings(f"sft_{name}", sft.stage, domain_eval(trainer, sft.domains[name], sft))


def sft_spec(name: str) -> StageSpec:
    """``sft_<name>``: one domain's SFT from the midtraining checkpoint."""
    return StageSpec(f"sft_{name}", "checkpoint", {"packed": f"sft_data_{name}", "init": "midtrain"},
                     lambda p: sft_settings(p.pretrain.trainer(), p.post.sft, name), run_training_stage,
                     distributed=True)
