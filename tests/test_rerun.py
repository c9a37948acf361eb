"""Re-running one stage from a recorded execution, and the dry-run plan."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from krea2_core.config import PipelineConfig, load_config
from krea2_core.data import stages as data
from krea2_core.rerun import RerunError, plan, rerun
from krea2_core.tracking import end_pipeline_run, start_pipeline_run

SMALL = {
    "world": {"n_scenes": 12, "n_exact_duplicates": 2, "n_near_duplicates": 2, "n_color_variants": 1,
              "n_per_defect": 1, "real_image_dirs": ["skimage"], "max_real_images": 3},
    "curation": {"parallel": {"backend": "serial"}},
}


@pytest.fixture
def recorded(isolated_outputs: Path) -> tuple[str, PipelineConfig, dict[str, Path]]:
    """A pipeline run of the first four stages, as krea2_pipeline records it."""
    config = load_config("tiny", SMALL)
    parent = start_pipeline_run(isolated_outputs, "tiny", config)
    world, _ = data.run_world_pool(config.world, parent_run_id=parent)
    raw_pool, _ = data.run_ingest(world, config.curation.parallel, parent_run_id=parent)
    scores, _ = data.run_scoring(raw_pool, config.curation.analysis, config.curation.parallel, parent_run_id=parent)
    curated, manifest = data.run_selection(raw_pool, scores, config.curation.stages, config.curation.dedup,
                                           parent_run_id=parent)
    end_pipeline_run(isolated_outputs, parent, [manifest.mlflow_run_id])
    return parent, config, {"raw_pool": raw_pool, "scores": scores, "curated": curated}


def _why(steps: list[tuple[str, bool, str]]) -> dict[str, str]:
    return {stage: ("RE-RUN " if reruns else "cached ") + why for stage, reruns, why in steps}


def test_dry_run_says_what_would_rerun_and_why(recorded: tuple[str, PipelineConfig, dict[str, Path]]) -> None:
    parent, config, _ = recorded
    assert all(why.startswith("cached") for why in _why(plan(parent, config)).values())

    threshold = load_config("tiny", {**SMALL, "curation": {**SMALL["curation"], "stages": {"512": {"min_side": 100}}}})
    assert _why(plan(parent, threshold)) == {
        "world_pool": "cached cached: same config and inputs",
        "ingest": "cached cached: same config and inputs",
        "scoring": "cached cached: same config and inputs",
        "selection": "RE-RUN config changed: stages.512.min_side",
    }
    side = load_config("tiny", {**SMALL, "curation": {**SMALL["curation"], "analysis": {"side": 128}}})
    steps = _why(plan(parent, side))
    assert steps["scoring"] == "RE-RUN config changed: analysis.side"
    assert steps["selection"] == "RE-RUN input from re-run stage(s): scoring"


def test_rerun_reuses_the_recorded_inputs(recorded: tuple[str, PipelineConfig, dict[str, Path]]) -> None:
    parent, config, paths = recorded
    changed = replace(config, curation=replace(config.curation, stages={
        **config.curation.stages, "512": replace(config.curation.stages["512"], min_side=100)}))
    path, manifest = rerun("selection", parent, changed)
    assert path != paths["curated"] and path.is_dir()
    original = MlflowClient().get_run(MlflowClient().get_run(parent).data.tags["krea2.stage_run.selection"])
    new = MlflowClient().get_run(manifest.mlflow_run_id)
    for name in ("raw_pool", "scores"):
        assert new.data.tags[f"krea2.upstream.{name}"] == original.data.tags[f"krea2.upstream.{name}"]
    assert new.data.params["stages.512.min_side"] == "100"


def test_rerun_errors_name_the_problem(recorded: tuple[str, PipelineConfig, dict[str, Path]]) -> None:
    parent, config, paths = recorded
    with pytest.raises(RerunError, match="unknown stage 'trainer'"):
        rerun("trainer", parent, config)
    with pytest.raises(RerunError, match="stage 'embedding' is not in this run's lineage"):
        rerun("embedding", parent, config)
    shutil.rmtree(paths["scores"])
    with pytest.raises(RerunError, match=r"the output of run \w+ \(scoring\) is gone"):
        rerun("selection", parent, config)
