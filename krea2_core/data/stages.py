"""Entry points of the data stages: world pool -> ingest -> scoring -> selection.

Each is ``run_<stage>(inputs..., config..., parent_run_id="") -> (artifact dir, manifest)`` and can be
called from Python, the Flyte tasks or tests alike; ``execute_stage`` gives every one the same
manifest, content-addressed location and MLflow child run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from krea2_core.artifacts import MANIFEST, RETRYABLE, Manifest, read_manifest
from krea2_core.config import AnalysisConfig, DedupConfig, ParallelConfig, StageFilters, WorldPoolConfig
from krea2_core.data.curation import score_pool, select_stage, summarize
from krea2_core.data.ingest import RAW_POOL_FILE, build_raw_pool, list_folder, read_uri_table
from krea2_core.data.schemas import RawPool, Scores, Verdicts, read_table, write_table
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import StageRun
from krea2_core.world.pool import IMAGES_DIR, build_world_pool

SCORES_FILE = "scores.parquet"
SUMMARY_FILE = "summary.json"


def run_world_pool(config: WorldPoolConfig, *, parent_run_id: str = "") -> tuple[Path, Manifest]:
    def body(_: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        return StageOutput(counts=build_world_pool(config, staging))

    return execute_stage("world_pool", "world_pool", body, config=config, parent_run_id=parent_run_id)


def run_ingest(source: Path, parallel: ParallelConfig, *, parent_run_id: str = "") -> tuple[Path, Manifest]:
    """Ingest an image folder, a Parquet table of URIs, or the images of a ``world_pool`` artifact
    (which is then linked as this stage's input for lineage)."""
    source = Path(source).resolve()
    from_artifact = (source / MANIFEST).is_file()
    if from_artifact:
        read_manifest(source, kind="world_pool")
    config = {"parallel": parallel} if from_artifact else {"source": str(source), "parallel": parallel}

    def listing() -> pd.DataFrame:
        if from_artifact:
            return list_folder(source / IMAGES_DIR, source="world")
        return read_uri_table(source) if source.is_file() else list_folder(source)

    def body(_: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        pool = write_table(build_raw_pool(listing(), parallel), staging / RAW_POOL_FILE, RawPool)
        return StageOutput(counts={"rows": len(pool), "unreadable_headers": int(pool["probe_error"].notna().sum())})

    return execute_stage("ingest", "raw_pool", body, config=config,
                         inputs={"world_pool": source} if from_artifact else {}, parent_run_id=parent_run_id)


def run_scoring(raw_pool: Path, analysis: AnalysisConfig, parallel: ParallelConfig, *,
                parent_run_id: str = "") -> tuple[Path, Manifest]:
    def body(inputs: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        pool = read_table(inputs["raw_pool"] / RAW_POOL_FILE, RawPool)
        scores = write_table(score_pool(pool, analysis, parallel), staging / SCORES_FILE, Scores)
        unreadable = scores["error_reason"].value_counts().to_dict()
        # rows whose source did not answer: `krea2 verify` lists the artifact as worth computing again
        return StageOutput(counts={"scored": int(scores["error_reason"].isna().sum()),
                                   **{f"unreadable.{k}": int(v) for k, v in unreadable.items()},
                                   RETRYABLE: int(unreadable.get("unreachable", 0))})

    return execute_stage("scoring", "scores", body, config={"analysis": analysis, "parallel": parallel},
                         inputs={"raw_pool": raw_pool}, parent_run_id=parent_run_id)


def run_selection(raw_pool: Path, scores: Path, stages: dict[str, StageFilters], dedup: DedupConfig, *,
                  parent_run_id: str = "") -> tuple[Path, Manifest]:
    """Per resolution stage: ``<stage>/verdicts.parquet`` (every pool row) and ``<stage>/kept.parquet``."""

    def body(inputs: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        pool = read_table(inputs["raw_pool"] / RAW_POOL_FILE, RawPool)
        scored = read_table(inputs["scores"] / SCORES_FILE, Scores)
        summary = {}
        for stage, filters in stages.items():
            verdicts = select_stage(pool, scored, stage, filters, dedup)
            (staging / stage).mkdir()
            write_table(verdicts, staging / stage / "verdicts.parquet", Verdicts)
            write_table(verdicts[verdicts["kept"]], staging / stage / "kept.parquet", Verdicts)
            summary[stage] = summarize(verdicts)
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
        return StageOutput(counts={f"{stage}.{key}": n for stage, counts in summary.items() for key, n in counts.items()})

    return execute_stage("selection", "curated", body, config={"stages": stages, "dedup": dedup},
                         inputs={"raw_pool": raw_pool, "scores": scores}, parent_run_id=parent_run_id)
