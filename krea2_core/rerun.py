"""Re-running one stage from a previous execution, and saying which stages a new config would re-run.

A stage's inputs are found through MLflow lineage: its run's ``krea2.upstream.<input>`` tags name the runs
that produced them, and those runs' ``krea2.output_path`` tags say where the artifacts are under the output root. A dry run
compares the config each stage recorded in its manifest with the config it would get now; a stage re-runs
when its recorded output is damaged, when its config changed or when one of its inputs re-runs (the same rule the
Flyte cache applies, plus the integrity check every artifact read makes). For a per-image stage that re-runs
(captioning, embedding) it also counts the images it would compute and the ones it would reuse from earlier runs,
on the selection the new config makes (computed in memory from the recorded scores: selection is cheap).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from krea2_core.artifacts import DamagedArtifact, read_manifest, to_plain
from krea2_core.config import PipelineConfig
from krea2_core.stage_spec import run_stage, stage_specs


class RerunError(ValueError):
    """A run, stage or artifact that a rerun needs and cannot find."""


def stage_runs(run_id: str) -> dict[str, Run]:
    """The stage runs behind ``run_id``: a pipeline run's tagged stages, or a stage run and its upstream."""
    from krea2_core.tracking import PARENT_KINDS, lineage

    client = MlflowClient()
    run = client.get_run(run_id)
    if run.data.tags.get("krea2.kind") in PARENT_KINDS:
        ids = {k.removeprefix("krea2.stage_run."): v for k, v in run.data.tags.items() if k.startswith("krea2.stage_run.")}
    else:
        ids = lineage(run_id)
    return {stage: client.get_run(stage_id) for stage, stage_id in ids.items()}


def recorded_output(run: Run) -> Path:
    from krea2_core.stages import output_root
    from krea2_core.tracking import output_location

    path = output_location(run.data.tags, output_root())
    if path is None or not path.is_dir():
        raise RerunError(f"the output of run {run.info.run_id} ({run.data.tags.get('krea2.stage')}) is gone: "
                         f"{str(path) if path else 'none recorded'}")
    return path


def resolve_inputs(stage: str, runs: dict[str, Run], domains: tuple[str, ...] = ()) -> dict[str, Path]:
    """Artifact directories the recorded run of ``stage`` consumed, from its upstream tags."""
    specs = stage_specs(domains)
    if stage not in specs:
        raise RerunError(f"unknown stage {stage!r}; stages: {list(specs)}")
    if stage not in runs:
        raise RerunError(f"stage {stage!r} is not in this run's lineage; it has {sorted(runs)}")
    tags = runs[stage].data.tags
    inputs = {}
    for name in specs[stage].inputs:
        upstream = tags.get(f"krea2.upstream.{name}")
        if upstream is None and name in specs[stage].optional:
            continue
        if upstream is None:
            raise RerunError(f"run {runs[stage].info.run_id} of {stage!r} has no upstream tag for input {name!r}")
        inputs[name] = recorded_output(MlflowClient().get_run(upstream))
    return inputs


def rerun(stage: str, run_id: str, config: PipelineConfig, preset: str) -> tuple[Path, str]:
    """Run ``stage`` again with ``config`` on the inputs its recorded run used, under a parent run of kind
    ``rerun`` that names the stage runs behind the new output, as a pipeline run does (so ``krea2 report``, the UI
    and a later re-run read it like one); returns the output and the parent run's id."""
    from krea2_core.stages import output_root
    from krea2_core.tracking import end_pipeline_run, start_pipeline_run

    domains = tuple(config.post.sft.domains)
    inputs = resolve_inputs(stage, stage_runs(run_id), domains)  # before the parent run: a bad request leaves none
    parent = start_pipeline_run(output_root(), preset, config, rerun_of=run_id, stage=stage)
    try:
        path = run_stage(stage_specs(domains)[stage], config, inputs, parent)
    except BaseException:
        MlflowClient().set_terminated(parent, status="FAILED")
        raise
    end_pipeline_run(output_root(), parent, [read_manifest(path).mlflow_run_id])
    return path, parent


def _changed_keys(recorded: Any, wanted: Any, prefix: str = "") -> list[str]:
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        keys = sorted(set(recorded) | set(wanted))
        return [k for key in keys for k in _changed_keys(recorded.get(key), wanted.get(key), f"{prefix}{key}.")]
    return [] if recorded == wanted else [prefix.rstrip(".")]


def plan(run_id: str, config: PipelineConfig) -> list[tuple[str, bool, str]]:
    """(stage, re-runs?, why) for every stage behind ``run_id``, in pipeline order, under ``config``; the why of a
    per-image stage that re-runs ends with how many images it would compute and reuse."""
    runs = stage_runs(run_id)
    domains = tuple(config.post.sft.domains)
    specs = stage_specs(domains)
    reruns: set[str] = set()
    previews: dict[str, Any] = {}  # re-run stage -> what it would output, where its spec can say without running
    steps = []
    for stage in (s for s in specs if s in runs):
        damage, changed = "", []
        try:
            wanted = to_plain(specs[stage].settings(config)) or {}  # as publish records it
            changed = _changed_keys(read_manifest(recorded_output(runs[stage])).config, wanted)
        except DamagedArtifact as err:
            damage = err.what
        consumed = {name for name in specs[stage].inputs if f"krea2.upstream.{name}" in runs[stage].data.tags}
        upstream = sorted({producer for name, producer in specs[stage].inputs.items()
                           if name in consumed and producer in reruns})
        if damage:
            why = "output damaged: " + damage
        elif changed:
            why = "config changed: " + ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
        elif upstream:
            why = "input from re-run stage(s): " + ", ".join(upstream)
        else:
            why = "cached: same config and inputs"
        if damage or changed or upstream:
            reruns.add(stage)
            why += _preview(stage, runs, config, reruns, previews)
        steps.append((stage, stage in reruns, why))
    return steps


def _preview(stage: str, runs: dict[str, Run], config: PipelineConfig, reruns: set[str], previews: dict[str, Any]
             ) -> str:
    """Preview re-run ``stage`` into ``previews`` when its spec can; for a per-image stage, the images it would
    compute and reuse (as the end of its why)."""
    from krea2_core.stages import output_root

    spec = stage_specs(tuple(config.post.sft.domains))[stage]
    if spec.preview is None and spec.planned is None:
        return ""
    waiting = sorted({p for p in spec.inputs.values() if p in reruns and p not in previews})
    if waiting:
        return f"; images to compute: known once {', '.join(waiting)} ran" if spec.planned else ""
    recorded = resolve_inputs(stage, runs, tuple(config.post.sft.domains))
    inputs = {name: previews.get(producer, recorded.get(name)) for name, producer in spec.inputs.items()}
    settings = spec.settings(config)
    if spec.preview is not None:
        previews[stage] = spec.preview(inputs, settings)
    if spec.planned is None:
        return ""
    compute, reuse = spec.planned(inputs, settings, output_root())
    return f"; {compute} images to compute, {reuse} reused"
