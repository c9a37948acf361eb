"""Re-running one stage from a recorded execution, and the dry-run plan."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from krea2_core.artifacts import read_manifest
from krea2_core.captioning.stages import CAPTIONS_FILE, SCENE_CAPTIONS, captioning_spec
from krea2_core.cli import main
from krea2_core.config import PipelineConfig, deep_merge, load_config
from krea2_core.data.packing import packing_spec
from krea2_core.data.stages import read_kept, select, selection_spec
from krea2_core.models.dit import Krea2DiT
from krea2_core.rerun import RerunError, plan, rerun
from krea2_core.stage_spec import run_stage
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import StageRun, configure_tracking, end_pipeline_run, start_pipeline_run
from krea2_core.training.diffusers_format import DIFFUSERS_WEIGHTS_FILE
from krea2_core.training.image_model import ModelIndex
from krea2_core.training.pretrain import PRETRAIN_STAGES, pretrain_settings
from tests._recorded import SMALL, curate, record_curation, small_config

@pytest.fixture
def recorded(isolated_outputs: Path) -> tuple[str, PipelineConfig, dict[str, Path]]:
    """A pipeline run of the first four stages, as krea2_pipeline records it."""
    return record_curation(isolated_outputs)


def _untrained(config: PipelineConfig) -> Any:
    """A checkpoint artifact body that writes the initial weights instead of training (the rerun trains for real)."""
    def body(inputs: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        save_file(Krea2DiT(config.pretrain.model).state_dict(), staging / DIFFUSERS_WEIGHTS_FILE)
        ModelIndex.of(config.pretrain).write(staging)
        return StageOutput({"steps": 0})
    return body


@pytest.fixture(scope="module")
def pretrained_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, PipelineConfig, dict[str, Path]]:
    """A pipeline run through pretrain_1024 as krea2_pipeline records it, in its own output root (built once): curation,
    captioning (world images only: OCR and scene-graph captions) and packing for real, training fabricated with the
    configs it records (the rerun test trains one for real)."""
    root = tmp_path_factory.mktemp("pretrained") / "krea2-outputs"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KREA2_OUTPUT_ROOT", str(root))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        config = load_config("tiny", SMALL)
        parent = start_pipeline_run(root, "tiny", config)
        paths, _ = curate(config, parent)
        paths["scenes"] = scenes = run_stage(SCENE_CAPTIONS, config, {"world_pool": paths["world_pool"], "raw_pool": paths["raw_pool"]},
                           parent)
        init: dict[str, Path] = {}
        for stage in PRETRAIN_STAGES:
            curated = {"curated": paths[f"curated_{stage}"]}
            paths[f"captions_{stage}"] = run_stage(captioning_spec(stage), config, {**curated, "scene_captions": scenes},
                                                   parent)
            paths[f"pack_{stage}"] = run_stage(packing_spec(stage), config,
                                               {**curated, "captions": paths[f"captions_{stage}"]}, parent)
            paths[f"pretrain_{stage}"], manifest = execute_stage(
                f"pretrain_{stage}", "checkpoint", _untrained(config), config=pretrain_settings(config, stage),
                inputs={"packed": paths[f"pack_{stage}"], **init}, parent_run_id=parent)
            init = {"init": paths[f"pretrain_{stage}"]}
        end_pipeline_run(root, parent, [manifest.mlflow_run_id])
    return root, parent, config, paths


@pytest.fixture
def pretrained(pretrained_store: tuple[Path, str, PipelineConfig, dict[str, Path]], monkeypatch: pytest.MonkeyPatch
               ) -> tuple[str, PipelineConfig, dict[str, Path]]:
    """The recorded pretraining run, with this test's outputs and MLflow store pointed at its root."""
    root, parent, config, paths = pretrained_store
    monkeypatch.setenv("KREA2_OUTPUT_ROOT", str(root))
    configure_tracking(root)
    return parent, config, paths


def _why(steps: list[tuple[str, bool, str]]) -> dict[str, str]:
    return {stage: ("RE-RUN " if reruns else "cached ") + why for stage, reruns, why in steps}


def test_dry_run_says_what_would_rerun_and_why(recorded: tuple[str, PipelineConfig, dict[str, Path]]) -> None:
    parent, config, _ = recorded
    assert all(why.startswith("cached") for why in _why(plan(parent, config)).values()), plan(parent, config)

    threshold = load_config("tiny", {**SMALL, "curation": {**SMALL["curation"], "stages": {"512": {"min_side": 100}}}})
    assert _why(plan(parent, threshold)) == {
        **dict.fromkeys(("world_pool", "ingest", "scoring", "selection_256"), CACHED),
        "selection_512": "RE-RUN config changed: filters.min_side",
        "selection_1024": CACHED,
    }
    side = load_config("tiny", {**SMALL, "curation": {**SMALL["curation"], "analysis": {"side": 128}}})
    steps = _why(plan(parent, side))
    assert steps["scoring"] == "RE-RUN config changed: side"  # its settings: the AnalysisConfig
    assert all(steps[f"selection_{s}"] == "RE-RUN input from re-run stage(s): scoring" for s in PRETRAIN_STAGES)


def test_rerun_reuses_the_recorded_inputs(recorded: tuple[str, PipelineConfig, dict[str, Path]]) -> None:
    parent, config, paths = recorded
    changed = replace(config, curation=replace(config.curation, stages={
        **config.curation.stages, "512": replace(config.curation.stages["512"], min_side=100)}))
    path, rerun_run = rerun("selection_512", parent, changed, "tiny")
    assert path != paths["curated_512"] and path.is_dir()
    manifest = read_manifest(path)
    original = MlflowClient().get_run(MlflowClient().get_run(parent).data.tags["krea2.stage_run.selection_512"])
    new = MlflowClient().get_run(manifest.mlflow_run_id)
    for name in ("raw_pool", "scores"):
        assert new.data.tags[f"krea2.upstream.{name}"] == original.data.tags[f"krea2.upstream.{name}"]
    assert new.data.params["filters.min_side"] == "100" and new.data.params["stage"] == "512"
    # the re-run's parent run names the new stage run and the recorded ones upstream, as a pipeline run does
    tags = MlflowClient().get_run(rerun_run).data.tags
    assert (tags["krea2.kind"], tags["krea2.rerun_of"], tags["krea2.rerun_stage"]) == ("rerun", parent, "selection_512")
    assert tags["krea2.stage_run.selection_512"] == manifest.mlflow_run_id
    assert tags["krea2.stage_run.scoring"] == original.data.tags["krea2.upstream.scores"]


def test_rerun_errors_name_the_problem(recorded: tuple[str, PipelineConfig, dict[str, Path]]) -> None:
    parent, config, paths = recorded
    with pytest.raises(RerunError, match="unknown stage 'trainer'"):
        rerun("trainer", parent, config, "tiny")
    with pytest.raises(RerunError, match="stage 'embedding' is not in this run's lineage"):
        rerun("embedding", parent, config, "tiny")
    shutil.rmtree(paths["scores"])
    with pytest.raises(RerunError, match=r"the output of run \w+ \(scoring\) is gone"):
        rerun("selection_256", parent, config, "tiny")
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(experiments, "tags.`krea2.kind` = 'rerun'")  # a refused re-run leaves no run


CACHED = "cached cached: same config and inputs"
CURATION = ("world_pool", "ingest", "scoring", *(f"selection_{s}" for s in PRETRAIN_STAGES), "scene_captions",
            *(f"captioning_{s}" for s in PRETRAIN_STAGES))


def test_dry_run_of_the_pretraining_stages(pretrained: tuple[str, PipelineConfig, dict[str, Path]], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    parent, config, paths = pretrained
    steps = _why(plan(parent, config))
    assert list(steps) == [*CURATION, *(f"{kind}_{s}" for s in PRETRAIN_STAGES for kind in ("pack", "pretrain"))]
    assert set(steps.values()) == {CACHED}

    # a training setting of the last stage re-runs that stage only: packing and earlier stages are cached
    longer = _why(plan(parent, small_config(pretrain={"stages": {"1024": {"steps": 3}}})))
    assert longer == {**dict.fromkeys(longer, CACHED), "pretrain_1024": "RE-RUN config changed: recipe.steps"}

    # a training setting of the first stage re-runs its training and the stages initialised from it
    lr = _why(plan(parent, small_config(pretrain={"stages": {"256": {"lr": 3e-4}}})))
    assert {stage: why for stage, why in lr.items() if why != CACHED} == {
        "pretrain_256": "RE-RUN config changed: recipe.lr",
        "pretrain_512": "RE-RUN input from re-run stage(s): pretrain_256",
        "pretrain_1024": "RE-RUN input from re-run stage(s): pretrain_512"}

    # aspect ratios change the packed bytes of every stage, so everything from packing on re-runs
    aspects = _why(plan(parent, small_config(pretrain={"aspect_ratios": [0.5, 1.0, 2.0]})))
    assert {stage: aspects[stage] for stage in CURATION} == dict.fromkeys(CURATION, CACHED)
    for stage in PRETRAIN_STAGES:
        assert aspects[f"pack_{stage}"] == "RE-RUN config changed: aspect_ratios"
        assert aspects[f"pretrain_{stage}"] == "RE-RUN config changed: trainer.aspect_ratios"  # and its packed input

    # a threshold of the 512 stage re-runs that stage's selection, captioning, packing and training and what follows,
    # never the 256 stage's; its captioning computes only the images no stage captioned before (here: the noise
    # images the 512 stage now keeps), which the dry run counts on the selection the new config makes
    loose = small_config(curation={"stages": {"512": {"min_pixel_correlation": -1.0}}})
    threshold = _why(plan(parent, loose))
    assert {stage for stage, why in threshold.items() if why != CACHED} == {
        "selection_512", "captioning_512", "pack_512", "pretrain_512", "pretrain_1024"}
    new_kept = select({"raw_pool": paths["raw_pool"], "scores": paths["scores"]},
                      selection_spec("512").settings(loose)).query("kept")
    captioned = {i for s in PRETRAIN_STAGES for i in pd.read_parquet(paths[f"captions_{s}"] / CAPTIONS_FILE)["id"]}
    new = int((~new_kept["id"].isin(captioned)).sum())
    assert new >= 1 and len(new_kept) > len(read_kept(paths["curated_512"]))
    assert threshold["captioning_512"] == (f"RE-RUN input from re-run stage(s): selection_512; {new} images to "
                                           f"compute, {len(new_kept) - new} reused")
    assert threshold["pack_512"] == "RE-RUN input from re-run stage(s): captioning_512, selection_512"
    # ... and running it computes exactly that many
    selected = run_stage(selection_spec("512"), loose, {"raw_pool": paths["raw_pool"], "scores": paths["scores"]})
    recaptioned = run_stage(captioning_spec("512"), loose, {"curated": selected, "scene_captions": paths["scenes"]})
    assert read_manifest(recaptioned).counts["computed"] == new

    # the command line: krea2 rerun pretrain_512 --from-run <id> --config <yaml> --dry-run
    overrides = tmp_path / "longer.yaml"
    overrides.write_text(yaml.safe_dump(deep_merge(SMALL, {"pretrain": {"stages": {"512": {"steps": 2}}}})))
    assert main(["rerun", "pretrain_512", "--from-run", parent, "--config", str(overrides), "--dry-run"]) == 0
    lines = {line.split()[0]: line.split(None, 1)[1] for line in capsys.readouterr().out.splitlines()}
    assert lines["pack_512"].startswith("cached") and lines["pretrain_256"].startswith("cached")
    assert lines["pretrain_512"] == "RE-RUN  config changed: recipe.steps"
    assert lines["pretrain_1024"] == "RE-RUN  input from re-run stage(s): pretrain_512"


def test_rerun_trains_a_stage_on_its_recorded_inputs(pretrained: tuple[str, PipelineConfig, dict[str, Path]]) -> None:
    """pretrain_512 again, for real, on the tiny preset's 2 local processes: from the recorded packed shards and
    256 checkpoint, with a manifest whose config the dry run reads back as unchanged."""
    parent, _, paths = pretrained
    changed = small_config(pretrain={"stages": {"512": {"steps": 2}}})
    assert changed.pretrain.parallel.nproc_per_node == 2
    path, _ = rerun("pretrain_512", parent, changed, "tiny")
    assert path != paths["pretrain_512"] and (path / DIFFUSERS_WEIGHTS_FILE).is_file()
    manifest = read_manifest(path, kind="checkpoint")
    assert manifest.counts["steps"] == 2
    # each of the 2 ranks wrote its shard of the final training state
    assert len(list((path / "train_state").glob("*.distcp"))) == 2

    client = MlflowClient()
    recorded = {stage: client.get_run(client.get_run(parent).data.tags[f"krea2.stage_run.{stage}"])
                for stage in ("pack_512", "pretrain_256")}
    new = client.get_run(manifest.mlflow_run_id)
    assert new.data.tags["krea2.upstream.packed"] == recorded["pack_512"].info.run_id
    assert new.data.tags["krea2.upstream.init"] == recorded["pretrain_256"].info.run_id
    assert new.data.params["name"] == "pretrain_512" and new.data.params["recipe.steps"] == "2"
    steps = _why(plan(manifest.mlflow_run_id, changed))
    assert list(steps)[-3:] == ["pretrain_256", "pack_512", "pretrain_512"]
    assert set(steps.values()) == {CACHED}


def test_a_damaged_input_is_one_line_and_the_dry_run_re_runs_its_stage(
        recorded: tuple[str, PipelineConfig, dict[str, Path]], capsys: pytest.CaptureFixture[str]) -> None:
    parent, config, paths = recorded
    table = next(p for p in sorted(paths["scores"].rglob("*.parquet")))
    pd.read_parquet(table).head(3).to_parquet(table)  # a valid table, not the one scoring published
    name = table.relative_to(paths["scores"]).as_posix()
    assert main(["rerun", "selection_256", "--from-run", parent]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"artifact {paths['scores']} (scores) is damaged: {name} is " in err
    steps = _why(plan(parent, config))
    assert steps["scoring"].startswith(f"RE-RUN output damaged: {name} is ")
    assert all(steps[f"selection_{s}"] == "RE-RUN input from re-run stage(s): scoring" for s in PRETRAIN_STAGES)
    assert steps["ingest"] == "cached cached: same config and inputs"


def test_a_missing_upstream_file_fails_a_training_rerun_in_one_line_in_a_copied_root(
        pretrained: tuple[str, PipelineConfig, dict[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's case: a deleted weights file upstream of `krea2 rerun pretrain_512` gave a 112-line
    ChildFailedError. Here in a copy of the recorded root (output roots are relocatable), so the shared one stays."""
    parent, _, paths = pretrained
    root = Path(os.environ["KREA2_OUTPUT_ROOT"])
    copy = tmp_path / "copied-root"
    shutil.copytree(root, copy)
    monkeypatch.setenv("KREA2_OUTPUT_ROOT", str(copy))
    weights = copy / paths["pretrain_256"].relative_to(root) / DIFFUSERS_WEIGHTS_FILE
    weights.unlink()
    overrides = tmp_path / "longer.yaml"
    overrides.write_text(yaml.safe_dump(deep_merge(SMALL, {"pretrain": {"stages": {"512": {"steps": 2}}}})))
    assert main(["rerun", "pretrain_512", "--from-run", parent, "--config", str(overrides)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"artifact {weights.parent} (checkpoint) is damaged: {DIFFUSERS_WEIGHTS_FILE} is missing" in err
    # the original is untouched
    assert (root / paths["pretrain_256"].relative_to(root) / DIFFUSERS_WEIGHTS_FILE).is_file()
