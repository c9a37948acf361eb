"""A small recorded pipeline run (the curation stages, run for real under a pipeline parent run), shared by the
rerun and UI tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from krea2_core.artifacts import Manifest, read_manifest
from krea2_core.config import PipelineConfig, deep_merge, load_config
from krea2_core.data.stages import INGEST, SCORING, WORLD_POOL, selection_spec
from krea2_core.stage_spec import run_stage
from krea2_core.tracking import end_pipeline_run, start_pipeline_run
from krea2_core.training.pretrain import PRETRAIN_STAGES

SMALL = {
    "world": {"n_scenes": 12, "n_exact_duplicates": 2, "n_near_duplicates": 2, "n_color_variants": 1,
              "n_per_defect": 1, "real_image_dirs": []},  # world images: scene-graph captions, OCR, no LLM
    "curation": {"parallel": {"backend": "serial"}},
    # a 2-block model, one step per stage, on the tiny preset's 2 local processes
    "pretrain": {"model": {"num_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                           "intermediate_size": 128, "text_intermediate_size": 256},
                 "text_encoder": {"max_tokens": 32}, "eval": {"n_prompts": 1, "steps": 1, "grid_size": 1},
                 "aspect_ratios": [1.0],
                 "stages": {stage: {"steps": 1, "global_batch": 4, "warmup_steps": 0, "pma_checkpoints": 1,
                                    "world_scenes": {"n": 4}}
                            for stage in ("256", "512", "1024")}},
}


def small_config(**changes: Any) -> PipelineConfig:
    return load_config("tiny", deep_merge(SMALL, changes))


def curate(config: PipelineConfig, parent: str) -> tuple[dict[str, Path], list[Manifest]]:
    """The curation stages, run for real: their artifacts and the selections' manifests."""
    world = run_stage(WORLD_POOL, config, {}, parent)
    raw_pool = run_stage(INGEST, config, {"world_pool": world}, parent)
    scores = run_stage(SCORING, config, {"raw_pool": raw_pool}, parent)
    paths = {"world_pool": world, "raw_pool": raw_pool, "scores": scores}
    for stage in PRETRAIN_STAGES:
        paths[f"curated_{stage}"] = run_stage(selection_spec(stage), config, {"raw_pool": raw_pool, "scores": scores},
                                              parent)
    return paths, [read_manifest(paths[f"curated_{stage}"]) for stage in PRETRAIN_STAGES]


def record_curation(root: Path) -> tuple[str, PipelineConfig, dict[str, Path]]:
    """A pipeline run of the curation stages, as krea2_pipeline records it: (its run id, config, artifacts)."""
    config = load_config("tiny", SMALL)
    parent = start_pipeline_run(root, "tiny", config)
    paths, manifests = curate(config, parent)
    end_pipeline_run(root, parent, [manifest.mlflow_run_id for manifest in manifests])
    return parent, config, paths
