"""Progressive-resolution pretraining, 256 -> 512 -> 1024 px (32 -> 64 -> 128 px on the tiny preset): per stage,
pack the curated images of that stage into aspect-ratio-bucketed shards, then train from the previous stage's
checkpoint.

    pyflyte run workflows/pretraining.py pretraining --curated <curated dir> --captions <captions dir> \
        [--preset tiny] [--config overrides.yaml]
"""

from __future__ import annotations

from flytekit import workflow
from flytekit.types.directory import FlyteDirectory

from krea2_core.config import ParallelConfig, PretrainConfig, preset
from tasks.pipeline import resolve_config
from tasks.pretrain import pack_images, pretrain_stage, stage_config, stage_packing

STAGES = ("256", "512", "1024")
_TINY = preset("tiny")


@workflow
def pretraining(curated: FlyteDirectory, captions: FlyteDirectory, preset: str = "tiny", config: str = "",
                parent_run_id: str = "") -> FlyteDirectory:
    """The last stage's checkpoint, under a preset with YAML overrides (a file or inline)."""
    cfg = resolve_config(preset=preset, overrides=config)
    return pretraining_stages(curated=curated, captions=captions, config=cfg.pretrain, parallel=cfg.curation.parallel,
                              parent_run_id=parent_run_id)


@workflow
def pretraining_stages(curated: FlyteDirectory, captions: FlyteDirectory, config: PretrainConfig = _TINY.pretrain,
                       parallel: ParallelConfig = _TINY.curation.parallel, parent_run_id: str = "") -> FlyteDirectory:
    """``parallel`` is the CPU parallelism of packing (Ray, as in curation)."""
    checkpoint = None
    for stage in STAGES:
        cfg = stage_config(config=config, stage=stage)
        packing = stage_packing(config=config, stage=stage)
        packed = pack_images(curated=curated, captions=captions, packing=packing, parallel=parallel,
                             parent_run_id=parent_run_id)
        checkpoint = pretrain_stage(packed=packed, init=checkpoint, stage=stage, config=cfg,
                                    parent_run_id=parent_run_id)
    return checkpoint
