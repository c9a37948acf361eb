"""What the UI's pages show, read from the tracking store and the artifacts: no Flask here, so it is testable alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from krea2_core.artifacts import DamagedArtifact, read_manifest
from krea2_core.config import PipelineConfig, deep_merge
from krea2_core.report import headline
from krea2_core.rerun import RerunError, recorded_output, stage_runs
from krea2_core.stage_spec import stage_specs
from krea2_core.tracking import PARENT_KINDS
from krea2_core.ui.slices import recorded_slice

_IMAGES_PER_STAGE = 3


@dataclass(frozen=True)
class RunRow:
    run_id: str
    name: str
    kind: str  # pipeline, or "re-run of <stage>"
    status: str
    started_ms: int
    seconds: float | None
    metrics: dict[str, str]  # a re-run's stage's headline metrics (its counts); empty for a pipeline run


@dataclass(frozen=True)
class StageRow:
    stage: str
    run_id: str
    experiment_id: str
    status: str  # computed, cache hit, running, failed
    seconds: float | None
    metrics: dict[str, str]
    images: list[str]  # artifact paths of the run's pictures (sample grids, plots)


def _seconds(run: Run) -> float | None:
    return (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None


def parent_runs(limit: int = 100) -> list[RunRow]:
    """Pipeline runs and re-runs, newest first."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = [run for kind in PARENT_KINDS for run in client.search_runs(
        experiments, f"tags.`krea2.kind` = '{kind}'", order_by=["attributes.start_time DESC"], max_results=limit)]
    rows = []
    for run in sorted(found, key=lambda r: r.info.start_time, reverse=True)[:limit]:
        tags = run.data.tags
        stage = tags.get("krea2.rerun_stage", "")
        metrics: dict[str, str] = {}
        if stage and f"krea2.stage_run.{stage}" in tags:
            metrics = headline(stage, client.get_run(tags[f"krea2.stage_run.{stage}"]).data.metrics)
        rows.append(RunRow(run.info.run_id, run.info.run_name or run.info.run_id,
                           f"re-run of {stage}" if stage else "pipeline", run.info.status, run.info.start_time,
                           _seconds(run), metrics))
    return rows


def _stage_runs_of(run: Run) -> dict[str, Run]:
    """The runs behind a parent run: its stage_run tags once it ended, its child runs while it runs."""
    named = stage_runs(run.info.run_id)
    if named:
        return named
    children = MlflowClient().search_runs([run.info.experiment_id],
                                          f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    return {child.data.tags.get("krea2.stage", child.info.run_name): child for child in children}


def _status(parent_id: str, run: Run) -> str:
    if run.info.status == "FAILED":
        return "failed"
    if run.info.status == "RUNNING":
        return "running"
    return "computed" if run.data.tags.get("mlflow.parentRunId") == parent_id else "cache hit"


def _images(client: MlflowClient, run_id: str) -> list[str]:
    """PNG artifacts of a run, two levels deep: every plot, and of a sample series (samples/) the newest grid."""
    images, samples = [], []
    for entry in client.list_artifacts(run_id):
        for child in client.list_artifacts(run_id, entry.path) if entry.is_dir else [entry]:
            if child.path.endswith(".png"):
                (samples if child.path.startswith("samples/") else images).append(child.path)
    return (sorted(samples)[-1:] + sorted(images))[:_IMAGES_PER_STAGE]


def parent_run(run_id: str) -> Run:
    run = MlflowClient().get_run(run_id)
    if run.data.tags.get("krea2.kind") not in PARENT_KINDS:
        raise RerunError(f"run {run_id} is a {run.data.tags.get('krea2.kind', 'non-krea2')} run, not a pipeline "
                         f"run or a re-run")
    return run


def stage_rows(run_id: str) -> list[StageRow]:
    """Each stage behind a pipeline run or re-run, in execution order."""
    client = MlflowClient()
    runs = _stage_runs_of(parent_run(run_id))
    return [StageRow(stage, run.info.run_id, run.info.experiment_id, _status(run_id, run), _seconds(run),
                     headline(stage, run.data.metrics), _images(client, run.info.run_id))
            for stage, run in sorted(runs.items(), key=lambda item: item[1].info.start_time)]


def preset_of(run_id: str) -> str:
    return parent_run(run_id).data.tags.get("krea2.preset", "tiny")


def recorded_settings(run: Run) -> dict[str, Any]:
    """The settings a stage run recorded in its output's manifest (RerunError if the output is gone)."""
    try:
        return read_manifest(recorded_output(run)).config or {}
    except DamagedArtifact as err:
        raise RerunError(f"the output of run {run.info.run_id} is damaged: {err.what}") from err


def recorded_overrides(runs: dict[str, Run], base: PipelineConfig) -> dict[str, Any]:
    """The config a run's stage ``runs`` recorded, as overrides of the preset ``base``: every stage's slice, in
    pipeline order. Stages whose output is gone add nothing (a dry run then says so)."""
    specs = stage_specs(tuple(base.post.sft.domains))
    overrides: dict[str, Any] = {}
    for stage in (s for s in specs if s in runs):
        try:
            overrides = deep_merge(overrides, recorded_slice(specs[stage], base, recorded_settings(runs[stage])))
        except RerunError:
            continue
    return overrides


def stage_slice(runs: dict[str, Run], stage: str, base: PipelineConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the stage's recorded settings, its config slice as recorded) for the stage page."""
    specs = stage_specs(tuple(base.post.sft.domains))
    if stage not in specs or stage not in runs:
        raise RerunError(f"stage {stage!r} is not in this run; it has {sorted(runs)}")
    settings = recorded_settings(runs[stage])
    return settings, recorded_slice(specs[stage], base, settings)


def artifact_file(run_id: str, artifact: str, into: Path) -> Path:
    """A run's PNG artifact downloaded into ``into``."""
    import mlflow

    if not artifact.endswith(".png") or ".." in Path(artifact).parts:
        raise RerunError(f"not a picture of the run: {artifact}")
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(into)))
