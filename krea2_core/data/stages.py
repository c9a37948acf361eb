"""The data stages: world pool -> ingest -> scoring -> selection (one per resolution stage), each a ``StageSpec``
beside its ``run_*``.

Each is ``run_<stage>(inputs, settings, parent_run_id="") -> artifact dir`` and can be called from Python, the Flyte
tasks or tests alike; ``execute_stage`` gives every one the same manifest, content-addressed location and MLflow
child run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import pandas as pd

from krea2_core.artifacts import RETRYABLE, read_manifest
from krea2_core.common.layout import SUMMARY_FILE
from krea2_core.config import PipelineConfig
from krea2_core.curation.config import AnalysisConfig, DedupConfig, ParallelConfig, StageFilters
from krea2_core.data.curation import score_pool, select_stage, summarize
from krea2_core.data.ingest import RAW_POOL_FILE, build_raw_pool, list_folder, read_uri_table, source_digest
from krea2_core.data.schemas import RawPool, Scores, Verdicts, read_table, write_table
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import StageRun
from krea2_core.world.config import WorldPoolConfig
from krea2_core.world.pool import POOL_IMAGES_DIR, build_world_pool

SCORES_FILE = "scores.parquet"
VERDICTS_FILE = "verdicts.parquet"
KEPT_FILE = "kept.parquet"


def run_world_pool(inputs: Mapping[str, Path], settings: WorldPoolConfig, parent_run_id: str = "") -> Path:
    def body(_: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        return StageOutput(counts=build_world_pool(settings, staging))

    return execute_stage(WORLD_POOL.name, WORLD_POOL.kind, body, config=settings, parent_run_id=parent_run_id)[0]


WORLD_POOL = StageSpec("world_pool", "world_pool", {}, lambda p: p.world, run_world_pool)


def run_ingest(inputs: Mapping[str, Path], settings: None = None, parent_run_id: str = "", *,
               parallel: ParallelConfig) -> Path:
    """Ingest the images of a ``world_pool`` artifact (linked as this stage's input for lineage), or of
    ``inputs["source"]``: an image folder or a Parquet table of URIs. No setting changes what it ingests."""
    if len(inputs) != 1 or not {"world_pool", "source"} >= set(inputs):
        raise ValueError(f"ingest takes a world_pool artifact or a source folder or table, got {sorted(inputs)}")
    from_artifact = "world_pool" in inputs
    source = Path(inputs["world_pool" if from_artifact else "source"]).resolve()
    if from_artifact:
        read_manifest(source, kind="world_pool")

    def listing() -> pd.DataFrame:
        if from_artifact:
            return list_folder(source / POOL_IMAGES_DIR, source="world")
        return read_uri_table(source) if source.is_file() else list_folder(source)

    def body(_: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        pool = write_table(build_raw_pool(listing(), parallel), staging / RAW_POOL_FILE, RawPool)
        return StageOutput(counts={"rows": len(pool), "unreadable_headers": int(pool["probe_error"].notna().sum())})

    source_key = {"source": str(source), "digest": source_digest(source)}  # a source's contents change under its path
    return execute_stage(INGEST.name, INGEST.kind, body, config=settings if from_artifact else source_key,
                         inputs={"world_pool": source} if from_artifact else {}, parent_run_id=parent_run_id)[0]


INGEST = StageSpec("ingest", "raw_pool", {"world_pool": "world_pool"}, lambda p: None, run_ingest, parallel=True)


def run_scoring(inputs: Mapping[str, Path], settings: AnalysisConfig, parent_run_id: str = "", *,
                parallel: ParallelConfig) -> Path:
    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        pool = read_table(paths["raw_pool"] / RAW_POOL_FILE, RawPool)
        scores = write_table(score_pool(pool, settings, parallel), staging / SCORES_FILE, Scores)
        unreadable = scores["error_reason"].value_counts().to_dict()
        # rows whose source did not answer: `krea2 verify` lists the artifact as worth computing again
        return StageOutput(counts={"scored": int(scores["error_reason"].isna().sum()),
                                   **{f"unreadable.{k}": int(v) for k, v in unreadable.items()},
                                   RETRYABLE: int(unreadable.get("unreachable", 0))})

    return execute_stage(SCORING.name, SCORING.kind, body, config=settings, inputs=dict(inputs),
                         parent_run_id=parent_run_id)[0]


SCORING = StageSpec("scoring", "scores", {"raw_pool": "ingest"}, lambda p: p.curation.analysis, run_scoring,
                    parallel=True)


@dataclass
class SelectionSettings:
    """What one resolution stage's selection depends on: its filters and the dedup (each stage dedups its own
    survivors, so no stage's selection depends on another's thresholds)."""

    stage: str
    filters: StageFilters
    dedup: DedupConfig


def run_selection(inputs: Mapping[str, Path], settings: SelectionSettings, parent_run_id: str = "") -> Path:
    """One resolution stage's ``verdicts.parquet`` (every pool row), ``kept.parquet`` and ``summary.json``."""

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        verdicts = select(paths, settings)
        write_table(verdicts, staging / VERDICTS_FILE, Verdicts)
        write_table(verdicts[verdicts["kept"]], staging / KEPT_FILE, Verdicts)
        summary = summarize(verdicts)
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
        return StageOutput(counts=summary)

    spec = selection_spec(settings.stage)
    return execute_stage(spec.name, spec.kind, body, config=settings, inputs=dict(inputs),
                         parent_run_id=parent_run_id)[0]


def select(inputs: Mapping[str, Path], settings: SelectionSettings) -> pd.DataFrame:
    """The stage's verdict of every pool row, from the ``raw_pool`` and ``scores`` artifacts (cheap: what a dry run
    computes to say how much per-image work a new selection would reuse)."""
    pool = read_table(Path(inputs["raw_pool"]) / RAW_POOL_FILE, RawPool)
    scored = read_table(Path(inputs["scores"]) / SCORES_FILE, Scores)
    return select_stage(pool, scored, settings.stage, settings.filters, settings.dedup)


def selection_spec(stage: str) -> StageSpec:
    """``selection_<stage>``: the images resolution stage ``stage`` trains on (a ``curated`` artifact)."""

    def settings(config: PipelineConfig) -> SelectionSettings:
        if stage not in config.curation.stages:
            raise ValueError(f"curation.stages has no stage {stage!r}; it has {sorted(config.curation.stages)}")
        return SelectionSettings(stage=stage, filters=config.curation.stages[stage], dedup=config.curation.dedup)

    return StageSpec(f"selection_{stage}", "curated", {"raw_pool": "ingest", "scores": "scoring"}, settings,
                     run_selection, preview=lambda inputs, s: (verdicts := select(inputs, s))[verdicts["kept"]])


def read_kept(curated: Path | pd.DataFrame) -> pd.DataFrame:
    """The kept rows of a ``curated`` artifact (one resolution stage's selection); a DataFrame is such rows already
    (a selection a dry run previewed)."""
    if isinstance(curated, pd.DataFrame):
        return curated
    read_manifest(curated, kind="curated")
    return read_table(Path(curated) / KEPT_FILE, Verdicts)
