"""Re-running one stage from a previous execution, and saying which stages a new config would re-run.

A stage's inputs are found through MLflow lineage: its run's ``krea2.upstream.<input>`` tags name the runs
that produced them, and those runs' ``krea2.output_path`` tags say where the artifacts are under the output root. A dry run
compares the config each stage recorded in its manifest with the config it would get now; a stage re-runs
when its recorded output is damaged, when its config changed or when one of its inputs re-runs (the same rule the
Flyte cache applies, plus the integrity check every artifact read makes).
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
    from krea2_core.tracking import lineage

    client = MlflowClient()
    run = client.get_run(run_id)
    if run.data.tags.get("krea2.kind") == "pipeline":
        ids = {k.removeprefix("krea2.stage_run."): v for k, v in run.data.tags.items() if k.startswith("krea2.stage_run.")}
    else:
        ids = lineage(run_id)
    return {stage: client.get_run(stage_id) for stage, stage_id in ids.items()}


def _output(run: Run) -> Path:
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
        inputs[name] = _output(MlflowClient().get_run(upstream))
    return inputs


def rerun(stage: str, run_id: str, config: PipelineConfig, parent_run_id: str = "") -> Path:
    """Run ``stage`` again with ``config`` on the inputs its recorded run used."""
    domains = tuple(config.post.sft.domains)
    inputs = resolve_inputs(stage, stage_runs(run_id), domains)
    return run_stage(stage_specs(domains)[stage], config, inputs, parent_run_id)


def _changed_keys(recorded: Any, wanted: Any, prefix: str = "") -> list[str]:
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        keys = sorted(set(recorded) | set(wanted))
        return [k for key in keys for k in _changed_keys(recorded.get(key), wanted.get(key), f"{prefix}{key}.")]
    return [] if recorded == wanted else [prefix.rstrip(".")]


def plan(run_id: str, config: PipelineConfig) -> list[tuple[str, bool, str]]:
    """(stage, re-runs?, why) for every stage behind ``run_id``, in pipeline order, under ``config``."""
    runs = stage_runs(run_id)
    domains = tuple(config.post.sft.domains)
    specs = stage_specs(domains)
    reruns: set[str] = set()
    steps = []
    for stage in (s for s in specs if s in runs):
        damage, changed = "", []
        try:
            wanted = to_plain(specs[stage].settings(config)) or {}  # as publish records it
            changed = _changed_keys(read_manifest(_output(runs[stage])).config, wanted)
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
        steps.append((stage, stage in reruns, why))
    return steps
