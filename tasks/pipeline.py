"""Tasks that frame a pipeline execution: resolve the config, open and close the MLflow parent run."""

from __future__ import annotations

import json

from flytekit import task
from flytekit.types.directory import FlyteDirectory

from containers.images import DATA_IMAGE
from krea2_core.artifacts import read_manifest
from krea2_core.config import PipelineConfig, load_config
from krea2_core.stages import output_root
from krea2_core.tracking import end_pipeline_run, start_pipeline_run
from tasks.common import from_flyte_dir


@task(container_image=DATA_IMAGE)
def resolve_config(preset: str, overrides: str) -> PipelineConfig:
    """Preset + YAML overrides (a file path or inline YAML). Not cached: it is cheap, and the values
    it returns, not the file name, are what the stage caches key on."""
    return load_config(preset, overrides)


@task(container_image=DATA_IMAGE)
def start_pipeline(config: PipelineConfig) -> str:
    return start_pipeline_run(output_root(), config.preset, config)


@task(container_image=DATA_IMAGE)
def finish_pipeline(parent_run_id: str, curated: FlyteDirectory) -> str:
    """Close the parent run, linking every stage run behind the outputs, and say where things are."""
    root = output_root()
    curated_path = from_flyte_dir(curated)
    manifest = read_manifest(curated_path, kind="curated")
    stage_runs = end_pipeline_run(root, parent_run_id, [manifest.mlflow_run_id])
    summary = json.loads((curated_path / "summary.json").read_text())
    lines = [
        "krea2 pipeline finished",
        f"  curated data : {curated_path}",
        *[f"    stage {stage:>4}: kept {summary[stage]['kept']} of {summary[stage]['total']}"
          for stage in sorted(summary, key=lambda s: (len(s), s))],
        f"  MLflow       : parent run {parent_run_id}; stage runs {stage_runs}",
        f"  browse with  : mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}",
    ]
    return "\n".join(lines)
