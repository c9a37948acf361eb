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
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from krea2_core.artifacts import Manifest, to_plain
from krea2_core.config import PretrainConfig, SFTConfig, SFTDomainConfig
from krea2_core.data.packing import pack_stage
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import StageRun
from krea2_core.training.pretrain import run_training_stage
from krea2_core.world.captions import captions
from krea2_core.world.render import render
from krea2_core.world.scene import sample_scene

SCENES_FILE = "scenes.parquet"
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


def sft_data_view(domain: SFTDomainConfig, sft: SFTConfig, multiple: int) -> dict[str, Any]:
    """What a domain set's packed shards depend on (the data stage's cache key)."""
    return {"domain": to_plain(domain), "resolution": sft.stage.resolution, "global_batch": sft.stage.global_batch,
            "multiple": multiple}


def run_sft_data(name: str, domain: SFTDomainConfig, sft: SFTConfig, multiple: int, *, parent_run_id: str = "",
                 root: Path | None = None) -> tuple[Path, Manifest]:
    """Render and pack domain ``name``'s set at the SFT resolution, image sides multiples of ``multiple`` (the
    autoencoder's downsample x patch size); a ``packed`` artifact."""
    stage = sft.stage

    def body(inputs: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        images = run.work_dir / "images"
        kept, texts = render_domain(domain, stage.resolution, images)
        counts = pack_stage(kept, texts, resolution=stage.resolution, aspect_ratios=[1.0], multiple=multiple,
                            global_batch=stage.global_batch, seed=domain.seed, out_dir=staging)
        kept.drop(columns=["uri"]).merge(texts, on="id").to_parquet(staging / SCENES_FILE, index=False)
        return StageOutput(counts=counts)

    return execute_stage(f"sft_data_{name}", "packed", body, config=sft_data_view(domain, sft, multiple),
                         parent_run_id=parent_run_id, root=root)


def domain_eval(pretrain: PretrainConfig, domain: SFTDomainConfig, sft: SFTConfig) -> PretrainConfig:
    """``pretrain`` with its evaluation (held-out prompts, validation scenes) drawn from ``domain``."""
    return dataclasses.replace(pretrain, eval=dataclasses.replace(pretrain.eval, scenes=domain.scenes,
                                                                  n_prompts=sft.eval_prompts))


def run_sft(packed: Path, init: Path, name: str, pretrain: PretrainConfig, sft: SFTConfig,
            parent_run_id: str = "", root: Path | None = None) -> Path | None:
    """SFT of domain ``name`` from ``init`` (every torchrun rank calls it; rank 0 returns the checkpoint)."""
    if name not in sft.domains:
        raise ValueError(f"unknown SFT domain {name!r}; configured: {sorted(sft.domains)}")
    return run_training_stage(packed, init, f"sft_{name}", sft.stage, domain_eval(pretrain, sft.domains[name], sft),
                              parent_run_id=parent_run_id, root=root)
