"""The pipeline's Flyte graph, built from the stage specs (krea2_core/stage_spec.py) when a dynamic workflow runs.

Every stage is one node of its Flyte task, given the artifacts its spec names as inputs and its settings computed
from the resolved config: the node's cache key is its artifact key, and the stages, their wiring and their settings
are defined once, beside the code that runs them. ``add_stages`` adds the nodes a set of wanted stages needs that are
not already there (an entry point run alone starts from artifacts it is given).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from flytekit import Resources
from flytekit.core.base_task import PythonTask
from flytekit.types.directory import FlyteDirectory

from krea2_core.config import PipelineConfig
from krea2_core.post.annotations import ANNOTATIONS
from krea2_core.stage_spec import StageSpec, stage_specs
from tasks import captioning, curation, expander, post, pretrain, semantic

# stage -> its task; a name missing here is looked up by its family's prefix in FAMILIES
TASKS: dict[str, PythonTask] = {
    "world_pool": curation.build_world_pool, "ingest": curation.ingest, "scoring": curation.score_images,
    "scene_captions": captioning.scene_captions, "embedding": semantic.embed_images,
    "semantic_selection": semantic.semantic_select, "pack_midtrain": post.pack_midtrain, "midtrain": pretrain.train_stage,
    "merge": post.merge_sft, "preference_pairs": post.preference_pairs, "preference_annotations": post.annotation_pairs,
    "reward_model": post.reward_model, "rl": post.rl_stage, "distill": post.distill_stage,
    "expander_data": expander.expander_data, "expander_sft": expander.expander_sft, "expander_rl": expander.expander_rl,
}
FAMILIES: tuple[tuple[str, PythonTask], ...] = (
    ("selection_", curation.select_images), ("captioning_", captioning.caption_images), ("pack_", pretrain.pack_images),
    ("pretrain_", pretrain.train_stage), ("sft_data_", post.sft_data), ("sft_", pretrain.train_stage),
    ("preference_", post.preference_stage))
# the model stages (by name prefix) given a GPU at run time when their settings ask for CUDA (Flyte resources are
# static)
DEVICE = {"captioning_": lambda s: s.captioning.captioner.device, "embedding": lambda s: s.device}
GPU = Resources(cpu="8", mem="32Gi", gpu="1")


def task_of(stage: str) -> PythonTask:
    if stage in TASKS:
        return TASKS[stage]
    for prefix, task in FAMILIES:
        if stage.startswith(prefix):
            return task
    raise KeyError(f"no Flyte task runs stage {stage!r}")


def stages_to_run(specs: dict[str, StageSpec], config: PipelineConfig, have: Iterable[str], want: Iterable[str]
                  ) -> list[str]:
    """The stages, in pipeline order, that ``want`` needs and ``have`` does not: the producers of their inputs, of
    an optional input only when the config has the stage take it (e.g. RL's reward model when RL weighs it)."""
    have, needed, todo = set(have), set(), list(want)
    while todo:
        stage = todo.pop()
        if stage in have or stage in needed:
            continue
        if stage not in specs:
            raise KeyError(f"unknown stage {stage!r}; stages: {list(specs)}")
        needed.add(stage)
        todo += [producer for name, producer in specs[stage].inputs.items() if specs[stage].takes(name, config)]
    return [stage for stage in specs if stage in needed]


def add_stages(config: PipelineConfig, have: dict[str, Any], want: Iterable[str], parent_run_id: str
               ) -> dict[str, Any]:
    """Add a node for every stage ``want`` needs beyond ``have`` (stage -> its output: a node's promise or an
    artifact directory); returns ``have`` with them. Call it inside a dynamic workflow, with the resolved config."""
    specs = stage_specs(tuple(config.post.sft.domains))
    stages = stages_to_run(specs, config, have, want)
    if ANNOTATIONS.name in stages:
        config = localized(config)
    previous_captioning = None
    for stage in stages:
        spec = specs[stage]
        settings = spec.settings(config)
        kwargs: dict[str, Any] = _inputs(spec, have, config)
        if settings is not None:
            kwargs["settings"] = settings
        if spec.parallel:
            kwargs["parallel"] = config.curation.parallel
        for name, path in (spec.files(config) if spec.files else {}).items():
            kwargs[name] = FlyteDirectory(str(path)) if path is not None else None
        node = task_of(stage)(**kwargs, parent_run_id=parent_run_id)
        if any(stage.startswith(prefix) and device(settings) == "cuda" for prefix, device in DEVICE.items()):
            node = node.with_overrides(requests=GPU, limits=GPU)
        if stage.startswith("captioning_"):  # one after another: each reuses what the ones before captioned
            if previous_captioning is not None:
                previous_captioning >> node
            previous_captioning = node
        have[stage] = node
    return have


def localized(config: PipelineConfig) -> PipelineConfig:
    """``config`` with the annotation set it names downloaded into this pod when it is an object-store URI: settings
    hold the set's digest, and a remote execution uploads the local copy as the task's input."""
    uri = config.post.preference.annotations
    if "://" not in uri:
        return config
    post = config.post
    preference = dataclasses.replace(post.preference, annotations=FlyteDirectory.from_source(uri).download())
    return dataclasses.replace(config, post=dataclasses.replace(post, preference=preference))


def _inputs(spec: StageSpec, have: dict[str, Any], config: PipelineConfig) -> dict[str, Any]:
    """The task's artifact inputs from the spec's: ``a.b`` names are entry ``b`` of the task's input ``a`` (a list
    when the ``b`` are numbers, else a dict); an optional input the stage does not take is None."""
    kwargs: dict[str, Any] = {}
    grouped: dict[str, dict[str, Any]] = {}
    for name, producer in spec.inputs.items():
        if not spec.takes(name, config):
            kwargs[name] = None
            continue
        value = have.get(producer)
        if value is None:
            raise KeyError(f"{spec.name}: input {name!r} ({producer}) has neither run nor been given")
        if "." in name:
            group, key = name.split(".", 1)
            grouped.setdefault(group, {})[key] = value
        else:
            kwargs[name] = value
    for group, entries in grouped.items():
        numbered = all(key.isdigit() for key in entries)
        kwargs[group] = [entries[k] for k in sorted(entries, key=int)] if numbered else entries
    return kwargs
