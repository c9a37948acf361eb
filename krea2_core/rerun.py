"""Re-running one stage from a previous execution, and saying which stages a new config would re-run.

A stage's inputs are found through MLflow lineage: its run's ``krea2.upstream.<input>`` tags name the runs
that produced them, and those runs' ``krea2.output_path`` tags say where the artifacts are under the output root. A dry run
compares the config each stage recorded in its manifest with the config it would get now; a stage re-runs
when its recorded output is damaged, when its config changed or when one of its inputs re-runs (the same rule the
Flyte cache applies, plus the integrity check every artifact read makes).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from krea2_core.artifacts import DamagedArtifact, read_manifest, to_plain
from krea2_core.config import PipelineConfig
from krea2_core.stage_spec import StageSpec, run_stage


@functools.cache
def stage_specs(domains: tuple[str, ...] = ()) -> dict[str, StageSpec]:
    """Every stage's spec in pipeline order; ``domains`` are the configured SFT domains (a data and an SFT stage
    each). The specs live beside their ``run_*`` functions; this is only their order."""
    from krea2_core.captioning.stages import CAPTIONING, SCENE_CAPTIONS
    from krea2_core.curation.stages import EMBEDDING, SEMANTIC_SELECTION
    from krea2_core.data.packing import packing_spec
    from krea2_core.data.stages import INGEST, SCORING, SELECTION, WORLD_POOL
    from krea2_core.expander.data import EXPANDER_DATA
    from krea2_core.expander.rl import EXPANDER_RL
    from krea2_core.expander.sft import EXPANDER_SFT
    from krea2_core.post.annotations import ANNOTATIONS
    from krea2_core.post.distill import DISTILL
    from krea2_core.post.grpo import RL
    from krea2_core.post.merge import merge_spec
    from krea2_core.post.midtrain import MIDTRAIN, PACK_MIDTRAIN
    from krea2_core.post.pairs import PAIRS
    from krea2_core.post.preference import preference_spec
    from krea2_core.post.reward_model import REWARD_MODEL
    from krea2_core.post.sft import sft_data_spec, sft_spec
    from krea2_core.training.pretrain import PRETRAIN_STAGES, pretrain_spec

    specs = [WORLD_POOL, INGEST, SCORING, SELECTION, SCENE_CAPTIONS, CAPTIONING, EMBEDDING, SEMANTIC_SELECTION,
             *(spec for stage in PRETRAIN_STAGES for spec in (packing_spec(stage), pretrain_spec(stage))),
             PACK_MIDTRAIN, MIDTRAIN, *map(sft_data_spec, domains), *map(sft_spec, domains), merge_spec(domains),
             PAIRS, preference_spec("synthetic"), ANNOTATIONS, preference_spec("calibration"), REWARD_MODEL, RL,
             DISTILL, EXPANDER_DATA, EXPANDER_SFT, EXPANDER_RL]
    return {spec.name: spec for spec in specs}


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
