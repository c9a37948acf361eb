"""Semantic curation (midtraining data selection) of the top resolution stage's curated images and their captions:

    pyflyte run workflows/semantic_curation.py semantic_curation --curated <dir> --captions <dir> \
        [--preset tiny] [--config overrides.yaml] [--overrides '<inline YAML>']
"""

from __future__ import annotations

from typing import Optional

from flytekit import dynamic, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from containers.images import DATA_IMAGE
from krea2_core.config import PipelineConfig
from krea2_core.training.config import TOP_STAGE
from tasks.pipeline import resolve_config
from workflows.graph import add_stages


@workflow
def semantic_curation(curated: FlyteDirectory, captions: FlyteDirectory, preset: str = "tiny",
                      config: Optional[FlyteFile] = None, overrides: str = "", parent_run_id: str = ""
                      ) -> FlyteDirectory:
    """The midtraining selection, under a preset with YAML overrides."""
    cfg = resolve_config(preset=preset, config=config, overrides=overrides)
    return semantic_curation_stages(config=cfg, curated=curated, captions=captions, parent_run_id=parent_run_id)


@dynamic(container_image=DATA_IMAGE)
def semantic_curation_stages(config: PipelineConfig, curated: FlyteDirectory, captions: FlyteDirectory,
                             parent_run_id: str = "") -> FlyteDirectory:
    have = {f"selection_{TOP_STAGE}": curated, f"captioning_{TOP_STAGE}": captions}
    return add_stages(config, have, ["semantic_selection"], parent_run_id)["semantic_selection"]
