"""Lineage in MLflow's own objects, clickable in its UI.

- Every model a stage publishes (a checkpoint, the reward model, the expander) is an MLflow LoggedModel of its
  stage run (an external model: the files stay in the artifact store, the model points at them by path and
  digest); a stage that consumes one logs it as a model input, so the model's page lists the runs that used it.
- The pipeline's deliverables get versions in the model registry (``REGISTERED``): a new version each time the stage
  computes a new model.
- Each stage run's description (the run page's Description, Markdown) links the run of every input and the model it
  read; a pipeline run's description is a table of its stage runs, linked. Tags stay the machine-readable record.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.entities import LoggedModelInput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from krea2_core.artifacts import Manifest

MODEL_KINDS = frozenset({"checkpoint", "reward_model", "expander"})  # artifact kinds that are models
# the stages whose model is a deliverable of the pipeline (workflows/end_to_end.py's final, distilled, expander)
REGISTERED = {"rl": "krea2-final", "distill": "krea2-distilled", "expander_rl": "krea2-expander"}
MODEL_TAG = "krea2.model_id"  # on a stage run: the LoggedModel it published
DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as a run's Description
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # not the GenAI view


# The MLflow UI shows the GenAI view unless a link asks for the other (or the user switched once: it remembers);
# experimentKind only chooses an experiment's first tab.
_VIEW = "?workflowType=machine_learning"


def run_link(experiment_id: str, run_id: str) -> str:
    """The MLflow UI's route to a run, relative to the UI's own address (so it works behind any host)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}{_VIEW}"


def model_link(experiment_id: str, model_id: str) -> str:
    return f"#/experiments/{experiment_id}/models/{model_id}{_VIEW}"


def describe_inputs(experiment_id: str, inputs: dict[str, tuple[str | Path, Manifest]]) -> None:
    """Log each model among the active stage run's inputs as a model input, and write the run's description: one
    line per input with links to the run that made it (and its model) and the artifact's path and digest."""
    client = MlflowClient()
    lines = []
    for name, (path, manifest) in sorted(inputs.items()):
        line = f"- **{name}**: `{manifest.kind}` artifact `{Path(path).name}` (digest `{manifest.digest[:16]}`)"
        if manifest.mlflow_run_id:
            try:
                upstream = client.get_run(manifest.mlflow_run_id)
            except MlflowException:  # a run of another tracking store: the digest still names the data
                upstream = None
            if upstream is not None:
                stage = upstream.data.tags.get("krea2.stage", upstream.info.run_name)
                line += f" from the [{stage} run]({run_link(upstream.info.experiment_id, manifest.mlflow_run_id)})"
                model_id = upstream.data.tags.get(MODEL_TAG)
                if model_id:
                    mlflow.log_input(model=LoggedModelInput(model_id))
                    line += f", [its model]({model_link(upstream.info.experiment_id, model_id)})"
        lines.append(line)
    mlflow.set_tag(DESCRIPTION_TAG, "Inputs:\n\n" + "\n".join(lines) if lines else "No inputs: a source stage.")


def publish_model(stage: str, run_id: str, manifest: Manifest, path: str) -> str | None:
    """A LoggedModel for a stage run's model artifact (None for other kinds), registered as a new version of
    ``REGISTERED[stage]`` for a deliverable; returns the model id."""
    if manifest.kind not in MODEL_KINDS:
        return None
    tags = {"krea2.output_digest": manifest.digest, "krea2.output_path": path, "krea2.stage": stage}
    model = mlflow.create_external_model(name=stage, source_run_id=run_id, model_type=manifest.kind, tags=tags)
    mlflow.set_tag(MODEL_TAG, model.model_id)
    if stage in REGISTERED:
        client = MlflowClient()
        try:
            client.create_registered_model(REGISTERED[stage], description=f"The pipeline's {stage} output.")
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        client.create_model_version(REGISTERED[stage], model.model_uri, run_id=run_id, tags=tags,
                                    model_id=model.model_id)
    return model.model_id


def describe_pipeline(run_id: str, stage_runs: dict[str, str]) -> None:
    """A pipeline run's description: its stages in execution order, each linked to its run."""
    client = MlflowClient()
    runs = sorted((client.get_run(stage_run) for stage_run in stage_runs.values()), key=lambda r: r.info.start_time)
    rows = [f"| {r.data.tags.get('krea2.stage', r.info.run_name)} | [{r.info.run_id[:8]}]"
            f"({run_link(r.info.experiment_id, r.info.run_id)}) |" for r in runs]
    client.set_tag(run_id, DESCRIPTION_TAG, "\n".join(["| stage | run |", "|---|---|", *rows]))
