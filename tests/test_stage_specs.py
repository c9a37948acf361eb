"""One definition per stage: every Flyte task takes exactly its stage spec's settings and input artifacts, the graph
is wired by the specs, and each post-training setting reaches exactly one stage's settings."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from flytekit import FlyteContextManager
from flytekit.core.base_task import PythonTask
from flytekit.core.context_manager import CompilationState
from flytekit.core.type_engine import TypeEngine
from flytekit.models.literals import Literal
from flytekit.types.directory import FlyteDirectory
from flytekitplugins.kfpytorch import Elastic

import tasks.captioning
import tasks.curation
import tasks.expander
import tasks.pipeline
import tasks.post
import tasks.pretrain
import tasks.semantic
from krea2_core.artifacts import to_plain
from krea2_core.config import PipelineConfig, load_config
from krea2_core.presets import preset
from krea2_core.stage_spec import stage_specs
from krea2_core.training.config import PRETRAIN_STAGES
from tasks.common import CACHE
from workflows.graph import add_stages, stages_to_run, task_of

TINY = preset("tiny")
DOMAINS = tuple(TINY.post.sft.domains)
SPECS = stage_specs(DOMAINS)
SELECTIONS = [f"selection_{stage}" for stage in PRETRAIN_STAGES]
# execution inputs a task may take besides its spec's: not in its cache key (tasks.common.CACHE)
UNTRACKED = {"parent_run_id", "parallel"}
# tasks that ingest what a user hands an entry point (a folder, a table of URIs) instead of the world pool artifact
SOURCE_TASKS = {tasks.curation.ingest_folder: "source", tasks.curation.ingest_uri_table: "table"}


def _stage_tasks() -> set[PythonTask]:
    modules = (tasks.captioning, tasks.curation, tasks.expander, tasks.post, tasks.pretrain, tasks.semantic)
    return {task for module in modules for task in vars(module).values()
            if isinstance(task, PythonTask) and task.metadata.cache}


def _unwrap(annotation: Any) -> Any:
    """``X`` of ``Optional[X]``, ``list[X]`` and ``dict[str, X]``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return _unwrap(args[-1]) if args else annotation


@pytest.mark.parametrize("name", list(SPECS))
def test_a_stage_task_takes_exactly_its_specs_settings_and_inputs(name: str) -> None:
    spec, task = SPECS[name], task_of(name)
    inputs = task.python_interface.inputs
    defaults = task.python_interface.inputs_with_defaults
    settings = spec.settings(TINY)
    artifacts = {input_name.split(".")[0] for input_name in spec.inputs}
    expected = artifacts | set(spec.files(TINY) if spec.files else ()) | {"parent_run_id"}
    expected |= {"settings"} if settings is not None else set()
    expected |= {"parallel"} if spec.parallel else set()
    # a task shared by a family of stages (e.g. training) may take an input another member has, as an optional one
    extra = set(inputs) - expected
    assert all(defaults[extra_name][1] is None for extra_name in extra), (name, extra)
    assert expected <= set(inputs), (name, expected - set(inputs))
    if settings is not None:
        assert inputs["settings"] is type(settings), name
    for input_name in artifacts | set(spec.files(TINY) if spec.files else ()) | extra:
        assert _unwrap(inputs[input_name]) is FlyteDirectory, (name, input_name)
    # the cache key is the artifact key: the spec's settings and inputs, nothing untracked
    assert set(task.metadata.cache_ignore_input_vars) >= (set(inputs) & UNTRACKED) | set(spec.files(TINY) or {}
                                                                                             if spec.files else ())
    assert not set(task.metadata.cache_ignore_input_vars) & (artifacts | {"settings"}), name
    assert isinstance(task.task_config, Elastic) == spec.distributed, name


def test_every_cached_task_runs_a_stage() -> None:
    served = {task_of(name) for name in SPECS} | set(SOURCE_TASKS)
    assert _stage_tasks() == served, _stage_tasks() ^ served
    for task, source in SOURCE_TASKS.items():  # the same stage as `ingest`, from what a user hands in
        assert set(task.python_interface.inputs) == {source, "parallel", "parent_run_id"}
    assert set(CACHE.ignored_inputs) >= UNTRACKED
    assert tasks.pipeline.resolve_config.metadata.cache is False


def test_the_specs_form_the_pipeline_graph() -> None:
    order = list(SPECS)
    for name, spec in SPECS.items():
        for producer in spec.inputs.values():
            assert order.index(producer) < order.index(name), (name, producer)
    # the whole pipeline: every stage once, the aesthetic reward model only when RL weighs it
    finals = [*SELECTIONS, "semantic_selection", "pretrain_1024", "rl", "distill", "expander_rl"]
    assert stages_to_run(SPECS, TINY, {}, finals) == [s for s in order if s != "reward_model"]
    weighted = _config(post={"rl": {"rewards": {"weights": {"aesthetic": 0.5}}}})
    assert "reward_model" in stages_to_run(SPECS, weighted, {}, finals)
    named = _config(post={"rl": {"rewards": {"weights": {"aesthetic": 0.5}, "aesthetic_model": "some/model"}}})
    assert "reward_model" not in stages_to_run(SPECS, named, {}, finals)
    # post-training alone, from the artifacts it is handed
    given = {"selection_1024", "captioning_1024", "semantic_selection", "pretrain_1024"}
    assert stages_to_run(SPECS, TINY, given, ["rl", "distill"]) == [
        "pack_midtrain", "midtrain", "sft_data_warm", "sft_data_cool", "sft_warm", "sft_cool", "merge",
        "preference_pairs", "preference_synthetic", "preference_annotations", "preference_calibration", "rl", "distill"]
    with pytest.raises(KeyError, match="unknown stage 'trainer'"):
        stages_to_run(SPECS, TINY, {}, ["trainer"])


def test_the_flyte_graph_is_the_specs_graph() -> None:
    """``add_stages`` compiled as a dynamic workflow compiles it: one node per stage, each input bound to its
    producer's node, the settings bound as the spec computes them, a GPU for a model stage on CUDA."""
    config = _config(captioning={"captioner": {"device": "cuda"}})
    context = FlyteContextManager.current_context()
    with FlyteContextManager.with_context(context.with_compilation_state(CompilationState(prefix=""))) as compiling:
        add_stages(config, {}, [*SELECTIONS, "semantic_selection", "pretrain_1024", "rl", "distill", "expander_rl"],
                   "parent")
        nodes = compiling.compilation_state.nodes
    stages = stages_to_run(SPECS, config, {}, list(SPECS))
    assert [node.flyte_entity for node in nodes] == [task_of(stage) for stage in stages if stage != "reward_model"]
    node_of = {stage: node for stage, node in zip([s for s in stages if s != "reward_model"], nodes, strict=True)}
    for stage, node in node_of.items():
        spec, bound = SPECS[stage], {binding.var: binding.binding for binding in node.bindings}
        for name, producer in spec.inputs.items():
            if name not in spec.optional:
                group, _, key = name.partition(".")
                binding = bound[group]
                if key:  # an entry of a dict (or list) input
                    entries = binding.map.bindings if binding.map else dict(enumerate(binding.collection.bindings))
                    binding = entries[key] if binding.map else entries[int(key)]
                assert binding.promise.node_id == node_of[producer].id, (stage, name)
        assert bound["parent_run_id"].scalar.primitive.string_value == "parent", stage
        settings = spec.settings(config)
        if settings is not None:
            literal = Literal(scalar=bound["settings"].scalar)
            assert TypeEngine.to_python_value(context, literal, type(settings)) == settings, stage
    gpu = {stage for stage, node in node_of.items() if node._resources is not None}
    assert gpu == {f"captioning_{s}" for s in PRETRAIN_STAGES}
    # the resolution stages' captioning runs one after another, each reusing what the ones before it captioned
    for before, after in zip(PRETRAIN_STAGES[:-1], PRETRAIN_STAGES[1:], strict=True):
        assert node_of[f"captioning_{before}"] in node_of[f"captioning_{after}"].upstream_nodes


def _config(**changes: Any) -> PipelineConfig:
    return load_config("tiny", changes)


def _settings(config: PipelineConfig) -> dict[str, Any]:
    return {name: to_plain(spec.settings(config)) for name, spec in stage_specs(tuple(config.post.sft.domains)).items()}


# one setting of each post-training stage -> the only stage whose settings it changes
POST_SETTINGS: dict[str, dict[str, Any]] = {
    "pack_midtrain": {"post": {"midtrain": {"n_images": 48}}},
    "midtrain": {"post": {"midtrain": {"stage": {"lr": 2e-4}}}},
    "sft_data_warm": {"post": {"sft": {"domains": {"warm": {"n_images": 40}}}}},
    "sft_warm": {"post": {"sft": {"domains": {"warm": {"scenes": {"max_shapes": 3}}}}}},
    "merge": {"post": {"merge": {"method": "ties"}}},
    "preference_pairs": {"post": {"preference": {"pairs": {"n_prompts": 40}}}},
    "preference_synthetic": {"post": {"preference": {"synthetic": {"lr": 2e-5}}}},
    "preference_annotations": {"post": {"preference": {"simulated_label_noise": 0.2}}},
    "preference_calibration": {"post": {"preference": {"calibration": {"lr": 2e-5}}}},
    "rl": {"post": {"rl": {"grpo": {"lr": 3e-5}}}},
    "distill": {"post": {"distill": {"lr": 2e-5}}},
}


def test_a_resolution_stage_threshold_changes_that_stage_selection_only() -> None:
    """Each resolution stage's selection, captions and packing are its own: a 512 px threshold re-runs the 512 stage's
    selection (and what follows it, by its inputs), never the 256 stage's; a captioner setting re-captions every
    stage (each reuses per image what was captioned under the same settings: krea2_core/row_cache.py)."""
    before = _settings(TINY)
    for stage in PRETRAIN_STAGES:
        after = _settings(_config(curation={"stages": {stage: {"min_side": 100}}}))
        assert {name for name in before if before[name] != after[name]} == {f"selection_{stage}"}
        assert SPECS[f"pack_{stage}"].inputs == {"curated": f"selection_{stage}", "captions": f"captioning_{stage}"}
    after = _settings(_config(captioning={"captioner": {"max_new_tokens": 32}}))
    assert {name for name in before if before[name] != after[name]} == {f"captioning_{s}" for s in PRETRAIN_STAGES}
    after = _settings(_config(captioning={"shard_size": 7}))  # the same captions: per-image reuse ignores it
    assert {name for name in before if before[name] != after[name]} == {f"captioning_{s}" for s in PRETRAIN_STAGES}
    assert TINY.captioning.row_slice() == _config(captioning={"shard_size": 7}).captioning.row_slice()


@pytest.mark.parametrize("stage", list(POST_SETTINGS))
def test_a_post_training_setting_changes_exactly_its_stages_settings(stage: str) -> None:
    """The issue's case: post.distill.lr re-ran merge, whose task took all of PostTrainConfig. A stage's settings are
    its task's only config input and its artifact key, so a setting re-runs exactly the stages whose settings it
    changes, and those downstream of them (the dry run: tests/test_pipeline_flyte.py)."""
    before, after = _settings(TINY), _settings(_config(**POST_SETTINGS[stage]))
    changed = {name for name in before if before[name] != after[name]}
    if stage == "sft_warm":  # a domain's scenes are its data and its evaluation: its data, SFT and merge see them
        assert changed == {"sft_data_warm", "sft_warm", "merge"}
    else:
        assert changed == {stage}



def test_a_model_setting_reaches_the_stages_after_sft_only_through_their_checkpoints() -> None:
    """The stages after SFT load the model their input checkpoint describes: the model's configs are in the settings
    of the stages that build it (pretraining, midtraining, SFT) only, and pretraining's optimiser in those of the
    stages that train (not the merge, the pairs or the expander's RL, which only sample)."""
    before = _settings(TINY)
    model = {name for name, after in _settings(_config(pretrain={"text_encoder": {"cache_mb": 64}})).items()
             if before[name] != after}
    assert model == {*(f"pretrain_{s}" for s in PRETRAIN_STAGES), "midtrain", *(f"sft_{d}" for d in DOMAINS)}
    optimizer = {name for name, after in _settings(_config(pretrain={"optimizer": {"grad_clip": 0.5}})).items()
                 if before[name] != after}
    assert optimizer == model | {"preference_synthetic", "preference_calibration", "rl", "distill"}


def test_a_run_function_rejects_inputs_its_spec_does_not_name(tmp_path) -> None:  # noqa: ANN001
    """Bad input fails before anything is read or written: ingest takes a world pool artifact or a source, not
    both; merge takes a base and one SFT checkpoint per configured domain."""
    from krea2_core.data.stages import run_ingest
    from krea2_core.post.merge import merge_settings, run_merge

    with pytest.raises(ValueError, match=r"ingest takes a world_pool artifact or a source .* got \['source', "
                                         r"'world_pool'\]"):
        run_ingest({"world_pool": tmp_path, "source": tmp_path}, None, parallel=TINY.curation.parallel)
    settings = merge_settings(TINY)
    with pytest.raises(ValueError, match="merge needs a base and one SFT checkpoint per configured domain"):
        run_merge({f"sft.{name}": tmp_path for name in DOMAINS}, settings, root=tmp_path)  # no base
    with pytest.raises(ValueError, match="merge needs a base"):
        run_merge({"base": tmp_path, "sft.warm": tmp_path}, settings, root=tmp_path)  # a domain missing
    assert not any(tmp_path.iterdir())
