"""Re-running one stage from a previous execution, and saying which stages a new config would re-run.

A stage's inputs are found through MLflow lineage: its run's ``krea2.upstream.<input>`` tags name the runs
that produced them, and those runs' ``krea2.output_path`` tags say where the artifacts are under the output root. A dry run
compares the config each stage recorded in its manifest with the config it would get now; a stage re-runs
when its recorded output is damaged, when its config changed or when one of its inputs re-runs (the same rule the
Flyte cache applies, plus the integrity check every artifact read makes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from krea2_core.artifacts import DamagedArtifact, Manifest, read_manifest, to_plain
from krea2_core.config import PipelineConfig


@dataclass(frozen=True)
class StageSpec:
    inputs: dict[str, str]  # input name -> the stage that produces it
    config_of: Callable[[PipelineConfig], Any]  # this stage's config inside a pipeline config
    run: Callable[[PipelineConfig, dict[str, Path], str], tuple[Path, Manifest]]  # (config, inputs, parent run)
    optional: frozenset[str] = frozenset()  # inputs a run may have gone without (e.g. a reward model named by id)


@functools.cache
def _stages(domains: tuple[str, ...] = ()) -> dict[str, StageSpec]:
    """Every stage's spec; ``domains`` are the configured SFT domains (one data and one SFT stage each)."""
    from krea2_core.captioning.stages import run_captioning, run_scene_captions
    from krea2_core.curation.stages import run_embedding, run_semantic_selection, semantic_selection_config
    from krea2_core.data import stages as data

    return {
        "world_pool": StageSpec({}, lambda p: p.world, lambda p, i, parent: data.run_world_pool(p.world, parent_run_id=parent)),
        "ingest": StageSpec({"world_pool": "world_pool"}, lambda p: {"parallel": p.curation.parallel},
                            lambda p, i, parent: data.run_ingest(i["world_pool"], p.curation.parallel, parent_run_id=parent)),
        "scoring": StageSpec({"raw_pool": "ingest"}, lambda p: {"analysis": p.curation.analysis, "parallel": p.curation.parallel},
                             lambda p, i, parent: data.run_scoring(i["raw_pool"], p.curation.analysis, p.curation.parallel,
                                                                   parent_run_id=parent)),
        "selection": StageSpec({"raw_pool": "ingest", "scores": "scoring"},
                               lambda p: {"stages": p.curation.stages, "dedup": p.curation.dedup},
                               lambda p, i, parent: data.run_selection(i["raw_pool"], i["scores"], p.curation.stages,
                                                                       p.curation.dedup, parent_run_id=parent)),
        "scene_captions": StageSpec({"world_pool": "world_pool", "raw_pool": "ingest"}, lambda p: {"source": "scene_graph"},
                                    lambda p, i, parent: run_scene_captions(i["world_pool"], i["raw_pool"],
                                                                            parent_run_id=parent)),
        "captioning": StageSpec({"curated": "selection", "scene_captions": "scene_captions"},
                                lambda p: {"captioning": p.captioning},
                                lambda p, i, parent: run_captioning(i["curated"], i["scene_captions"], p.captioning,
                                                                    p.curation.parallel, parent_run_id=parent)),
        "embedding": StageSpec({"curated": "selection"}, lambda p: {"stage": p.semantic.stage, "embedder": p.semantic.embedder},
                               lambda p, i, parent: run_embedding(i["curated"], p.semantic.stage, p.semantic.embedder,
                                                                  parent_run_id=parent)),
        "semantic_selection": StageSpec({"curated": "selection", "embeddings": "embedding", "captions": "captioning"},
                                        lambda p: semantic_selection_config(p.semantic),
                                        lambda p, i, parent: run_semantic_selection(i["curated"], i["embeddings"],
                                                                                    i["captions"], p.semantic,
                                                                                    parent_run_id=parent)),
        **{name: spec for stage in PRETRAIN_STAGES for name, spec in _pretraining(stage).items()},
        **_post_training(domains),
        **_expander(),
    }


def _pretraining(stage: str) -> dict[str, StageSpec]:
    """``pack_<stage>`` and ``pretrain_<stage>``, whose configs are what those stages record in their manifests."""
    from krea2_core.data.packing import packing_config, run_packing
    from krea2_core.training.launch import launch_local
    from krea2_core.training.pretrain import run_pretrain_stage, stage_view

    def train(p: PipelineConfig, i: dict[str, Path], parent: str) -> tuple[Path, Manifest]:
        # on pretrain.parallel.nproc_per_node local processes, like the Flyte Elastic task; rank 0's artifact
        path = launch_local(p.pretrain.parallel, run_pretrain_stage, i["packed"], i.get("init"), stage, p.pretrain,
                            parent)
        return path, read_manifest(path)

    inputs = {"packed": f"pack_{stage}"}
    if stage != PRETRAIN_STAGES[0]:
        inputs["init"] = f"pretrain_{PRETRAIN_STAGES[PRETRAIN_STAGES.index(stage) - 1]}"
    return {
        f"pack_{stage}": StageSpec({"curated": "selection", "captions": "captioning"},
                                   lambda p: packing_config(p.pretrain, stage),
                                   lambda p, i, parent: run_packing(i["curated"], i["captions"],
                                                                    packing_config(p.pretrain, stage),
                                                                    parallel=p.curation.parallel, parent_run_id=parent)),
        f"pretrain_{stage}": StageSpec(inputs, lambda p: stage_view(p.pretrain, stage), train),
    }


def _post_training(domains: tuple[str, ...]) -> dict[str, StageSpec]:
    """Midtraining, SFT per domain, merging, the preference stages, the reward model, RL and distillation, with the
    configs their manifests record."""
    from krea2_core.post.annotations import annotation_view, run_annotation_pairs
    from krea2_core.post.distill import distill_view, run_distill_stage
    from krea2_core.post.grpo import rl_view, run_rl_stage
    from krea2_core.post.merge import merge_view, run_merge
    from krea2_core.models.autoencoders import pixel_multiple
    from krea2_core.post.midtrain import midtrain_packing, midtrain_packing_view, run_midtrain_packing
    from krea2_core.post.pairs import generation_view, run_pair_generation
    from krea2_core.post.preference import preference_view, run_preference_stage
    from krea2_core.post.reward_model import run_reward_model
    from krea2_core.post.sft import domain_eval, run_sft_data, sft_data_view
    from krea2_core.training.pretrain import run_training_stage, training_view

    def launched(function: Callable[..., Path | None], *args: Callable[[PipelineConfig], Any],
                 inputs: Callable[[dict[str, Path]], list[Path | None]] = lambda i: list(i.values())
                 ) -> Callable[[PipelineConfig, dict[str, Path], str], tuple[Path, Manifest]]:
        """A training stage on pretrain.parallel's local processes, like its Flyte Elastic task: ``function``
        (its ``inputs`` first, then ``args`` evaluated on the pipeline config, then the parent run)."""
        def run(p: PipelineConfig, i: dict[str, Path], parent: str) -> tuple[Path, Manifest]:
            from krea2_core.training.launch import launch_local

            path = launch_local(p.pretrain.parallel, function, *inputs(i), *(arg(p) for arg in args), parent)
            return path, read_manifest(path)
        return run

    specs = {
        "pack_midtrain": StageSpec(
            {"curated": "selection", "captions": "captioning", "selection": "semantic_selection"},
            lambda p: midtrain_packing_view(p.post.midtrain, midtrain_packing(p.pretrain, p.post.midtrain)),
            lambda p, i, parent: run_midtrain_packing(i["curated"], i["captions"], i["selection"], p.post.midtrain,
                                                      midtrain_packing(p.pretrain, p.post.midtrain),
                                                      parent_run_id=parent)),
        "midtrain": StageSpec({"packed": "pack_midtrain", "init": f"pretrain_{PRETRAIN_STAGES[-1]}"},
                              lambda p: training_view(p.pretrain, "midtrain", p.post.midtrain.stage),
                              launched(run_training_stage, lambda p: "midtrain", lambda p: p.post.midtrain.stage,
                                       lambda p: p.pretrain)),
        "merge": StageSpec({"base": "midtrain", **{f"sft.{d}": f"sft_{d}" for d in domains}},
                           lambda p: merge_view(p.post, p.pretrain),
                           lambda p, i, parent: run_merge(i["base"], {d: i[f"sft.{d}"] for d in domains}, p.post,
                                                          p.pretrain, parent_run_id=parent)),
        "preference_pairs": StageSpec(
            {"policy": "merge", "previous": "midtrain"},
            lambda p: generation_view(p.post.preference, p.pretrain, p.post.resolution),
            lambda p, i, parent: run_pair_generation(i["policy"], i["previous"], p.post.preference, p.pretrain,
                                                     p.post.resolution, parent_run_id=parent)),
        "preference_annotations": StageSpec(
            {"policy": "preference_synthetic", "previous": "midtrain"},
            lambda p: annotation_view(p.post.preference, p.pretrain, p.post.resolution, annotations=_table(p)),
            lambda p, i, parent: run_annotation_pairs(_table(p), i["policy"], i["previous"], p.post.preference,
                                                      p.pretrain, p.post.resolution, parent_run_id=parent)),
    }
    for name, init in (("synthetic", "merge"), ("calibration", "preference_synthetic")):
        pairs = "preference_pairs" if name == "synthetic" else "preference_annotations"
        specs[f"preference_{name}"] = StageSpec(
            {"pairs": pairs, "init": init},
            lambda p, n=name: preference_view(n, p.post.preference, p.pretrain, p.post.resolution),
            launched(run_preference_stage, lambda p, n=name: n, lambda p: p.post.preference, lambda p: p.pretrain,
                     lambda p: p.post.resolution))
    specs["reward_model"] = StageSpec(
        {"pairs_0": "preference_pairs", "pairs_1": "preference_annotations"}, lambda p: p.post.rl.reward_model,
        lambda p, i, parent: run_reward_model([i["pairs_0"], i["pairs_1"]], p.post.rl.reward_model,
                                              parent_run_id=parent))
    specs["rl"] = StageSpec(
        {"init": "preference_calibration", "reward_model": "reward_model"},
        lambda p: rl_view(p.post.rl, p.pretrain, p.post.resolution),
        launched(run_rl_stage, lambda p: p.post.rl, lambda p: p.pretrain, lambda p: p.post.resolution,
                 inputs=lambda i: [i["init"], i.get("reward_model")]),
        optional=frozenset({"reward_model"}))
    specs["distill"] = StageSpec(
        {"teacher": "rl"}, lambda p: distill_view(p.post.distill, p.pretrain, p.post.resolution),
        launched(run_distill_stage, lambda p: p.post.distill, lambda p: p.pretrain, lambda p: p.post.resolution))
    for d in domains:
        specs[f"sft_data_{d}"] = StageSpec(
            {}, lambda p, d=d: sft_data_view(p.post.sft.domains[d], p.post.sft, pixel_multiple(p.pretrain.autoencoder)),
            lambda p, i, parent, d=d: run_sft_data(d, p.post.sft.domains[d], p.post.sft,
                                                   pixel_multiple(p.pretrain.autoencoder), parent_run_id=parent))
        specs[f"sft_{d}"] = StageSpec(
            {"packed": f"sft_data_{d}", "init": "midtrain"},
            lambda p, d=d: training_view(domain_eval(p.pretrain, p.post.sft.domains[d], p.post.sft), f"sft_{d}",
                                         p.post.sft.stage),
            launched(run_training_stage, lambda p, d=d: f"sft_{d}", lambda p: p.post.sft.stage,
                     lambda p, d=d: domain_eval(p.pretrain, p.post.sft.domains[d], p.post.sft)))
    return specs


def _expander() -> dict[str, StageSpec]:
    """The prompt expander's stages. RL is re-run without a reward model (the pipeline gives it none; the aesthetic
    reward is off by default)."""
    from krea2_core.expander.data import run_expander_data
    from krea2_core.expander.rl import expander_rl_view, run_expander_rl
    from krea2_core.expander.sft import run_expander_sft, sft_view

    def at(path: Path) -> tuple[Path, Manifest]:
        return path, read_manifest(path)

    return {
        "expander_data": StageSpec({"captions": "captioning"}, lambda p: p.expander.data,
                                   lambda p, i, parent: at(run_expander_data(i["captions"], p.expander.data,
                                                                             parent_run_id=parent))),
        "expander_sft": StageSpec({"pairs": "expander_data"},
                                  lambda p: sft_view(p.expander.sft, p.expander.expansion, p.post.resolution),
                                  lambda p, i, parent: at(run_expander_sft(i["pairs"], p.expander.sft,
                                                                           p.expander.expansion, p.post.resolution,
                                                                           parent_run_id=parent))),
        "expander_rl": StageSpec({"sft": "expander_sft", "image_model": "distill"},
                                 lambda p: expander_rl_view(p.expander.rl, p.expander.expansion, p.pretrain,
                                                            p.post.resolution),
                                 lambda p, i, parent: at(run_expander_rl(i["sft"], i["image_model"], None,
                                                                         p.expander.rl, p.expander.expansion,
                                                                         p.pretrain, p.post.resolution,
                                                                         parent_run_id=parent))),
    }


def _table(p: PipelineConfig) -> Path | None:
    """The human-annotation table of the preference calibration, None for simulated annotators."""
    return Path(p.post.preference.annotations) if p.post.preference.annotations else None


PRETRAIN_STAGES = ("256", "512", "1024")  # progressive resolution: each stage starts from the previous one
STAGE_ORDER = ("world_pool", "ingest", "scoring", "selection", "scene_captions", "captioning", "embedding",
               "semantic_selection", *(f"{kind}_{stage}" for stage in PRETRAIN_STAGES for kind in ("pack", "pretrain")))


def stage_order(domains: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every stage in pipeline order, with the SFT stages of ``domains``."""
    return (*STAGE_ORDER, "pack_midtrain", "midtrain", *(f"sft_data_{d}" for d in domains),
            *(f"sft_{d}" for d in domains), "merge", "preference_pairs", "preference_synthetic",
            "preference_annotations", "preference_calibration", "reward_model", "rl", "distill", "expander_data",
            "expander_sft", "expander_rl")


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
    specs = _stages(domains)
    if stage not in specs:
        raise RerunError(f"unknown stage {stage!r}; stages: {list(stage_order(domains))}")
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


def rerun(stage: str, run_id: str, config: PipelineConfig, parent_run_id: str = "") -> tuple[Path, Manifest]:
    """Run ``stage`` again with ``config`` on the inputs its recorded run used."""
    domains = tuple(config.post.sft.domains)
    inputs = resolve_inputs(stage, stage_runs(run_id), domains)
    return _stages(domains)[stage].run(config, inputs, parent_run_id)


def _changed_keys(recorded: Any, wanted: Any, prefix: str = "") -> list[str]:
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        keys = sorted(set(recorded) | set(wanted))
        return [k for key in keys for k in _changed_keys(recorded.get(key), wanted.get(key), f"{prefix}{key}.")]
    return [] if recorded == wanted else [prefix.rstrip(".")]


def plan(run_id: str, config: PipelineConfig) -> list[tuple[str, bool, str]]:
    """(stage, re-runs?, why) for every stage behind ``run_id``, in pipeline order, under ``config``."""
    runs = stage_runs(run_id)
    domains = tuple(config.post.sft.domains)
    specs = _stages(domains)
    reruns: set[str] = set()
    steps = []
    for stage in (s for s in stage_order(domains) if s in runs):
        damage, changed = "", []
        try:
            changed = _changed_keys(read_manifest(_output(runs[stage])).config, to_plain(specs[stage].config_of(config)))
        except DamagedArtifact as err:
            damage = err.what
        upstream = sorted({producer for producer in specs[stage].inputs.values() if producer in reruns})
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
