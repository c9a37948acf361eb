"""Running one stage: content-addressed output directory, manifest, and an MLflow child run.

A stage body is ``body(inputs, staging, run) -> StageOutput``: it reads its input artifact directories,
writes its files into ``staging`` and returns counts/metrics. ``execute_stage`` does the rest, the same
way for every stage, so Flyte tasks, the CLI and tests all produce identical artifacts and lineage.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from krea2_core.artifacts import Manifest, artifact_key, existing_artifact, publish, read_manifest, staged_dir
from krea2_core.tracking import StageRun, configure_tracking, stage_run


@dataclass
class StageOutput:
    counts: dict[str, int]
    metrics: dict[str, float] = field(default_factory=dict)


StageBody = Callable[[dict[str, Path], Path, StageRun], StageOutput]


def work_dir(root: Path, kind: str, key: str) -> Path:
    """Scratch space of one artifact that outlives a failed attempt, so a resumable stage (e.g. sharded
    model inference) picks up where it stopped; removed once the artifact is published."""
    return root / "work" / kind / key


def output_root() -> Path:
    """Where artifacts and the default MLflow store live: $KREA2_OUTPUT_ROOT, else ./krea2-outputs."""
    return Path(os.environ.get("KREA2_OUTPUT_ROOT", "krea2-outputs")).resolve()


def stage_location(stage: str, kind: str, *, config: Any, manifests: dict[str, Manifest], root: Path
                   ) -> tuple[Path, Path]:
    """(artifact directory, scratch directory) of a stage run: the same for every process that computes it,
    so the ranks of a distributed stage share checkpoints in the scratch directory."""
    key = artifact_key({"stage": stage, "config": config}, manifests)
    return root / "artifacts" / kind / key, work_dir(root, kind, key)


def execute_stage(stage: str, kind: str, body: StageBody, *, config: Any, inputs: dict[str, Path] | None = None,
                  parent_run_id: str = "", root: Path | None = None) -> tuple[Path, Manifest]:
    """Run ``body`` and publish its output under ``<root>/artifacts/<kind>/<key>``; when a sound artifact is
    already there, return it instead (a damaged one is computed again).

    The key digests the stage name, its config and its input digests, so the same work always lands in
    the same place and a different config never overwrites another's output. Inputs are verified first.
    """
    root = root or output_root()
    inputs = {name: Path(path) for name, path in (inputs or {}).items()}
    manifests = {name: read_manifest(path) for name, path in inputs.items()}
    out, scratch = stage_location(stage, kind, config=config, manifests=manifests, root=root)
    if (cached := existing_artifact(out)) is not None:
        configure_tracking(root)  # as stage_run does otherwise: runs a killed process left RUNNING are marked failed
        return out, cached
    scratch.mkdir(parents=True, exist_ok=True)
    with stage_run(stage, output_root=root, parent_run_id=parent_run_id, config=config,
                   inputs={name: (inputs[name], manifests[name]) for name in inputs}, work_dir=scratch) as run:
        with staged_dir(out) as staging:
            result = body(inputs, staging, run)
            manifest = publish(staging, out, kind=kind, counts=result.counts, config=config, inputs=manifests,
                               mlflow_run_id=run.run_id)
        shutil.rmtree(scratch, ignore_errors=True)
        run.log_metrics({**{f"count.{k}": v for k, v in result.counts.items()}, **result.metrics})
        run.log_output(out, manifest)
    return out, manifest
