"""Captioning of one resolution stage's curated images: OCR, long captions (a VLM, or a text LLM from the image's
metadata), rewrites into medium / short / tags / conversational; the world's images keep their exact scene-graph
captions. Images an earlier run captioned under the same settings are reused, not captioned again:
    pyflyte run workflows/captioning.py captioning --curated <dir> --stage 256 --world_pool <dir> --raw_pool <dir> \
        [--preset tiny] [--config overrides.yaml] [--overrides '<inline YAML>']
"""

from __future__ import annotations

from typing import Optional

from flytekit import dynamic, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from containers.images import DATA_IMAGE
from krea2_core.config import PipelineConfig
from tasks.pipeline import resolve_config
from workflows.graph import add_stages


@workflow
def captioning(curated: FlyteDirectory, world_pool: FlyteDirectory, raw_pool: FlyteDirectory, stage: str = "256",
               preset: str = "tiny", config: Optional[FlyteFile] = None, overrides: str = "", parent_run_id: str = ""
               ) -> FlyteDirectory:
    """Every image resolution stage ``stage``'s ``curated`` artifact kept, captioned, under a preset with overrides."""
    cfg = resolve_config(preset=preset, config=config, overrides=overrides)
    return captioning_stages(config=cfg, curated=curated, stage=stage, world_pool=world_pool, raw_pool=raw_pool,
                             parent_run_id=parent_run_id)


@dynamic(container_image=DATA_IMAGE)
def captioning_stages(config: PipelineConfig, curated: FlyteDirectory, stage: str, world_pool: FlyteDirectory,
                      raw_pool: FlyteDirectory, parent_run_id: str = "") -> FlyteDirectory:
    have = {f"selection_{stage}": curated, "world_pool": world_pool, "ingest": raw_pool}
    return add_stages(config, have, [f"captioning_{stage}"], parent_run_id)[f"captioning_{stage}"]
