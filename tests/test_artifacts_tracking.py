import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from krea2_core.artifacts import ArtifactError, read_manifest
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import end_pipeline_run, lineage, start_pipeline_run


def _writer(text: str):
    def body(inputs: dict[str, Path], staging: Path, run) -> StageOutput:
        (staging / "data.txt").write_text(text + "".join((p / "data.txt").read_text() for p in inputs.values()))
        return StageOutput(counts={"rows": len(text)}, metrics={"quality": 0.5})
    return body


def test_stage_outputs_are_content_addressed_with_manifests(isolated_outputs: Path) -> None:
    a, manifest_a = execute_stage("make_a", "thing", _writer("aa"), config={"x": 1})
    again, manifest_again = execute_stage("make_a", "thing", _writer("aa"), config={"x": 1})
    other, manifest_other = execute_stage("make_a", "thing", _writer("bb"), config={"x": 2})
    assert a == again and manifest_a.digest == manifest_again.digest
    assert other != a and manifest_other.digest != manifest_a.digest
    assert a.is_relative_to(isolated_outputs)
    stored = json.loads((a / "manifest.json").read_text())
    assert stored["kind"] == "thing" and stored["counts"] == {"rows": 2} and stored["config"] == {"x": 1}


def test_failed_stage_leaves_no_artifact(isolated_outputs: Path) -> None:
    def broken(inputs, staging: Path, run) -> StageOutput:
        (staging / "half.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        execute_stage("broken", "thing", broken, config={})
    assert not [p for p in (isolated_outputs / "artifacts").rglob("*") if p.is_file()]
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("krea2").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_wrong_or_missing_artifacts_are_named(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        read_manifest(tmp_path)
    path, _ = execute_stage("make_a", "thing", _writer("aa"), config={})
    with pytest.raises(ArtifactError, match="holds a 'thing' artifact, expected 'raw_pool'"):
        read_manifest(path, kind="raw_pool")


def test_child_runs_record_params_inputs_outputs_and_lineage(isolated_outputs: Path) -> None:
    parent = start_pipeline_run(isolated_outputs, "tiny", {"seed": 3})
    a, manifest_a = execute_stage("make_a", "thing", _writer("aa"), config={"x": 1}, parent_run_id=parent)
    b, manifest_b = execute_stage("make_b", "other", _writer("b"), config={"nested": {"y": 2}},
                                  inputs={"thing": a}, parent_run_id=parent)
    client = MlflowClient()
    run_b = client.get_run(manifest_b.mlflow_run_id)
    assert run_b.data.tags["mlflow.parentRunId"] == parent
    assert run_b.data.tags["krea2.upstream.thing"] == manifest_a.mlflow_run_id
    assert run_b.data.params["nested.y"] == "2"
    assert run_b.data.metrics["count.rows"] == 1 and run_b.data.metrics["quality"] == 0.5
    (dataset,) = run_b.inputs.dataset_inputs
    assert dataset.dataset.digest == manifest_a.digest[:36] and dataset.tags[0].value == "thing"
    assert read_manifest(b).inputs == {"thing": manifest_a.digest}
    assert {a.path for a in client.list_artifacts(run_b.info.run_id, "other")} >= {"other/manifest.json", "other/data.txt"}

    assert lineage(manifest_b.mlflow_run_id) == {"make_b": manifest_b.mlflow_run_id, "make_a": manifest_a.mlflow_run_id}
    stage_runs = end_pipeline_run(isolated_outputs, parent, [manifest_b.mlflow_run_id])
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags["krea2.stage_run.make_a"] == manifest_a.mlflow_run_id == stage_runs["make_a"]


def test_each_output_root_tracks_to_its_own_store_unless_a_server_is_set(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from krea2_core.tracking import configure_tracking

    configure_tracking(tmp_path / "a")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    # mlflow exported the first store's URI; a second root in the same process must not inherit it
    configure_tracking(tmp_path / "b")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    user_store = f"sqlite:///{tmp_path / 'server.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", user_store)
    configure_tracking(tmp_path / "c")
    assert mlflow.get_tracking_uri() == user_store
    assert not (tmp_path / "c" / "mlflow.db").exists()
