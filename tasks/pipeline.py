"""Tasks that frame a pipeline execution: resolve the config, open and close the MLflow parent run."""

from __future__ import annotations

import json
from typing import Optional

from flytekit import task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from containers.images import DATA_IMAGE
from krea2_core.artifacts import read_manifest
from krea2_core.config import PipelineConfig, load_config
from krea2_core.report import expander_summary, post_training_summary, pretraining_summary
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
def finish_pipeline(parent_run_id: str, curated: FlyteDirectory, midtrain: FlyteDirectory,
                    pretrained: FlyteDirectory, final: FlyteDirectory, distilled: FlyteDirectory,
                    expander: FlyteDirectory) -> str:
    """Close the parent run, linking every stage run behind the outputs, and say where things are."""
    root = output_root()
    curated_path, midtrain_path = from_flyte_dir(curated), from_flyte_dir(midtrain)
    pretrained_path, final_path = from_flyte_dir(pretrained), from_flyte_dir(final)
    distilled_path, expander_path = from_flyte_dir(distilled), from_flyte_dir(expander)
    finals = [read_manifest(midtrain_path, kind="midtrain_selection"), read_manifest(final_path, kind="checkpoint"),
              read_manifest(distilled_path, kind="checkpoint"), read_manifest(expander_path, kind="expander")]
    stage_runs = end_pipeline_run(root, parent_run_id, [m.mlflow_run_id for m in finals])
    summary = json.loads((curated_path / "summary.json").read_text())
    sampling = json.loads((distilled_path / "distill.json").read_text())
    selection = json.loads((midtrain_path / "summary.json").read_text())
    lines = [
        "krea2 pipeline finished",
        f"  curated data : {curated_path}",
        *[f"    stage {stage:>4}: kept {summary[stage]['kept']} of {summary[stage]['total']}"
          for stage in sorted(summary, key=lambda s: (len(s), s))],
        f"  midtraining  : {midtrain_path}",
        f"    sampled {selection['sampled']} of {selection['input']} ({selection['added_for_coverage']} added for "
        f"entity coverage; {selection['concepts_in_input']} concepts, {selection['concepts_lost']} lost); "
        f"plots: cluster_sizes.png, tag_counts.png",
        f"  pretrained   : {pretrained_path} (a diffusers Krea2Transformer2DModel directory, train state, "
        f"samples.png)",
        *pretraining_summary(root, stage_runs),
        f"  final model  : {final_path} (post-trained: midtraining, SFT + merge, preference optimisation, RL)",
        f"  distilled    : {distilled_path} ({sampling['student_steps']}-step student without CFG: distill.json)",
        *post_training_summary(root, stage_runs),
        f"  expander     : {expander_path} (a transformers LLM: krea2 expand --model <it> \"a red circle\")",
        *expander_summary(root, stage_runs),
        f"  MLflow       : parent run {parent_run_id}; stage runs {stage_runs}",
        f"  browse with  : mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}",
    ]
    return "\n".join(lines)
