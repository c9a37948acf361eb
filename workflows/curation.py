"""Curation workflows: an image folder or a Parquet table of URIs -> one curated artifact (kept + verdict tables)
per resolution stage, by stage ("256", "512", "1024").

    pyflyte run workflows/curation.py curation --source ./images [--preset tiny] [--config overrides.yaml] \
        [--overrides 'curation: {parallel: {backend: serial}}']
    pyflyte run workflows/curation.py curation_from_uris --table uris.parquet

``--config`` (a YAML file) and ``--overrides`` (inline YAML) override the whole pipeline config, read by the loader the
krea2 CLI uses: unknown keys, wrong types and bad values are errors that name the key.
"""

from __future__ import annotations

from typing import Dict, Optional

from flytekit import dynamic, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from containers.images import DATA_IMAGE
from krea2_core.config import PipelineConfig
from krea2_core.training.config import PRETRAIN_STAGES
from tasks.common import SourceFolder, SourceTable
from tasks.curation import ingest_folder, ingest_uri_table
from tasks.pipeline import resolve_config
from workflows.graph import add_stages


@workflow
def curation(source: SourceFolder, preset: str = "tiny", config: Optional[FlyteFile] = None, overrides: str = "",
             parent_run_id: str = "") -> Dict[str, FlyteDirectory]:
    cfg = resolve_config(preset=preset, config=config, overrides=overrides)
    raw_pool = ingest_folder(source=source, parallel=cfg.curation.parallel, parent_run_id=parent_run_id)
    return curate_raw_pool(config=cfg, raw_pool=raw_pool, parent_run_id=parent_run_id)


@workflow
def curation_from_uris(table: SourceTable, preset: str = "tiny", config: Optional[FlyteFile] = None,
                       overrides: str = "", parent_run_id: str = "") -> Dict[str, FlyteDirectory]:
    cfg = resolve_config(preset=preset, config=config, overrides=overrides)
    raw_pool = ingest_uri_table(table=table, parallel=cfg.curation.parallel, parent_run_id=parent_run_id)
    return curate_raw_pool(config=cfg, raw_pool=raw_pool, parent_run_id=parent_run_id)


@dynamic(container_image=DATA_IMAGE)
def curate_raw_pool(config: PipelineConfig, raw_pool: FlyteDirectory, parent_run_id: str = ""
                    ) -> Dict[str, FlyteDirectory]:
    """Score every image once, then select per resolution stage (thresholds + dedup)."""
    selections = [f"selection_{stage}" for stage in PRETRAIN_STAGES]
    have = add_stages(config, {"ingest": raw_pool}, selections, parent_run_id)
    return {stage: have[f"selection_{stage}"] for stage in PRETRAIN_STAGES}
