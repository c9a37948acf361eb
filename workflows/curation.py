"""Curation workflows: an image folder or a Parquet table of URIs -> per-stage kept + verdict tables.

    pyflyte run workflows/curation.py curation --source ./images [--preset tiny] [--config overrides.yaml]
    pyflyte run workflows/curation.py curation_from_uris --table uris.parquet

``--config`` takes YAML overrides of the whole pipeline config (a file or inline), read by the loader the krea2 CLI
uses: unknown keys, wrong types and bad values are errors that name the key.
"""

from __future__ import annotations

from flytekit import workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from krea2_core.config import CurationConfig, preset
from tasks.curation import ingest, ingest_uri_table, score_images, select_images
from tasks.pipeline import resolve_config

_TINY = preset("tiny").curation


@workflow
def curate_raw_pool(raw_pool: FlyteDirectory, config: CurationConfig = _TINY, parent_run_id: str = "") -> FlyteDirectory:
    """Score every image once, then select per resolution stage (thresholds + dedup)."""
    scores = score_images(raw_pool=raw_pool, analysis=config.analysis, parallel=config.parallel,
                          parent_run_id=parent_run_id)
    return select_images(raw_pool=raw_pool, scores=scores, stages_filters=config.stages, dedup=config.dedup,
                         parent_run_id=parent_run_id)


@workflow
def curation(source: FlyteDirectory, preset: str = "tiny", config: str = "", parent_run_id: str = "") -> FlyteDirectory:
    curation = resolve_config(preset=preset, overrides=config).curation
    raw_pool = ingest(source=source, parallel=curation.parallel, parent_run_id=parent_run_id)
    return curate_raw_pool(raw_pool=raw_pool, config=curation, parent_run_id=parent_run_id)


@workflow
def curation_from_uris(table: FlyteFile, preset: str = "tiny", config: str = "", parent_run_id: str = ""
                       ) -> FlyteDirectory:
    curation = resolve_config(preset=preset, overrides=config).curation
    raw_pool = ingest_uri_table(table=table, parallel=curation.parallel, parent_run_id=parent_run_id)
    return curate_raw_pool(raw_pool=raw_pool, config=curation, parent_run_id=parent_run_id)
