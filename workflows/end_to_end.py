"""The whole pipeline. With no arguments it runs every stage that exists on the tiny preset:

    pyflyte run workflows/end_to_end.py krea2_pipeline
    pyflyte run workflows/end_to_end.py krea2_pipeline --preset small --config my_overrides.yaml

Stages so far: world pool -> curation (ingest, scoring, per-resolution selection).
"""

from __future__ import annotations

from flytekit import workflow

from tasks.curation import build_world_pool
from tasks.pipeline import finish_pipeline, resolve_config, start_pipeline
from workflows.curation import curation


@workflow
def krea2_pipeline(preset: str = "tiny", config: str = "") -> str:
    cfg = resolve_config(preset=preset, overrides=config)
    parent_run_id = start_pipeline(config=cfg)
    pool = build_world_pool(config=cfg.world, parent_run_id=parent_run_id)
    curated = curation(source=pool, config=cfg.curation, parent_run_id=parent_run_id)
    return finish_pipeline(parent_run_id=parent_run_id, curated=curated)
