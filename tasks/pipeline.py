"""Tasks that frame a pipeline execution: resolve the config, open and close the MLflow parent run."""

from __future__ import annotations

from typing import Optional

from flytekit import task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from containers.images import DATA_IMAGE
from krea2_core.artifacts import read_manifest
from krea2_core.config import PipelineConfig, load_config
from krea2_core.report import pipeline_summary
from krea2_core.stages import output_root
from krea2_core.tracking import end_pipeline_run, start_pipeline_run
from tasks.common import from_flyte_dir


@task(container_image=DATA_IMAGE)
def resolve_config(preset: str, config: Optional[FlyteFile], overrides: str) -> PipelineConfig:
    """The preset, with a YAML file's overrides (a FlyteFile: `pyflyte run` uploads a local file, so a pod reads it
    from the object store) and then inline YAML ones. Not cached: it is cheap, and the settings each stage takes
    from the config it returns, not the file, are what the stage caches key on."""
    return load_config(preset, config.download() if config is not None else None, overrides)


@task(container_image=DATA_IMAGE)
def start_pipeline(config: PipelineConfig) -> str:
    return start_pipeline_run(output_root(), config.preset, config)


@task(container_image=DATA_IMAGE)
def finish_pipeline(parent_run_id: str, curated: dict[str, FlyteDirectory], midtrain: FlyteDirectory,
                    pretrained: FlyteDirectory, final: FlyteDirectory, distilled: FlyteDirectory,
                    expander: FlyteDirectory) -> str:
    """Close the parent run, linking every stage run behind the outputs, and say where things are."""
    root = output_root()
    outputs = {name: from_flyte_dir(directory) for name, directory in (
        *((f"curated_{stage}", directory) for stage, directory in curated.items()), ("midtrain", midtrain), ("pretrained", pretrained), ("final", final),
        ("distilled", distilled), ("expander", expander))}
    finals = [read_manifest(outputs[name], kind=kind) for name, kind in (
        ("midtrain", "midtrain_selection"), ("final", "checkpoint"), ("distilled", "checkpoint"),
        ("expander", "expander"))]
    stage_runs = end_pipeline_run(root, parent_run_id, [m.mlflow_run_id for m in finals])
    return pipeline_summary(root, parent_run_id, stage_runs, outputs)
