import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from krea2_core.artifacts import ArtifactError, DamagedArtifact, publish, read_manifest, staged_dir, verify
from krea2_core.owners import HOST, this_process
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import configure_tracking, end_pipeline_run, lineage, start_pipeline_run
from krea2_core.tracking.runs import OWNER_TAG


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


def _published(tmp_path: Path, files: dict[str, bytes]) -> Path:
    def body(inputs, staging: Path, run) -> StageOutput:
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        return StageOutput(counts={"files": len(files)})
    path, _ = execute_stage("make", "thing", body, config={"files": sorted(files)})
    return path


@pytest.mark.parametrize("damage, what", [
    (lambda p: (p / "weights.bin").write_bytes(b"x" * 64), r"weights.bin changed since it was published"),
    (lambda p: (p / "weights.bin").write_bytes(b"\0" * 10), r"weights.bin is 10 bytes, published as 64"),
    (lambda p: (p / "deep" / "table.parquet").unlink(), r"deep/table.parquet is missing"),
    (lambda p: (p / "extra.txt").write_text("hi"), r"extra.txt is not in its manifest"),
    (lambda p: (p / "manifest.json").write_text(""), r"manifest.json is damaged: not JSON"),
    (lambda p: (p / "manifest.json").write_text("[1]"), r"manifest.json is damaged: a JSON list"),
    (lambda p: (p / "manifest.json").write_text(json.dumps({**json.loads((p / "manifest.json").read_text()),
                                                            "extra": 1})),
     r"manifest.json is damaged: unknown field\(s\) \['extra'\]"),
])
def test_a_damaged_artifact_is_an_error_naming_it_and_the_file(tmp_path: Path, damage, what: str) -> None:
    path = _published(tmp_path, {"weights.bin": bytes(range(64)), "deep/table.parquet": b"rows"})
    read_manifest(path)  # sound as published (and remembered as verified: a change must still be seen)
    damage(path)
    with pytest.raises(DamagedArtifact, match=what) as err:
        read_manifest(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_large_artifacts_are_checked_by_size_on_read_and_rehashed_when_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _published(tmp_path, {"weights.bin": bytes(range(64))})
    monkeypatch.setenv("KREA2_VERIFY_MAX_BYTES", "10")
    (path / "weights.bin").write_bytes(b"x" * 64)  # same size: only a re-hash sees it
    manifest = read_manifest(path)
    with pytest.raises(DamagedArtifact, match="weights.bin changed"):
        verify(path, manifest, full=True)
    monkeypatch.setenv("KREA2_VERIFY_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="KREA2_VERIFY_MAX_BYTES must be a number of bytes, got 'lots'"):
        read_manifest(path)


def test_a_sound_artifact_is_served_a_damaged_one_recomputed(isolated_outputs: Path) -> None:
    calls = []

    def body(inputs, staging: Path, run) -> StageOutput:
        calls.append(run.run_id)
        (staging / "data.txt").write_text("payload")
        return StageOutput(counts={"rows": 1})

    path, first = execute_stage("make", "thing", body, config={})
    again, cached = execute_stage("make", "thing", body, config={})
    assert again == path and cached == first and len(calls) == 1  # served, no second run
    (path / "data.txt").write_text("PAYLOAD")
    again, recomputed = execute_stage("make", "thing", body, config={})
    assert again == path and len(calls) == 2 and recomputed.mlflow_run_id == calls[1]
    assert (path / "data.txt").read_text() == "payload" and read_manifest(path) == recomputed


def test_a_content_key_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "artifacts" / "thing" / "key"
    with staged_dir(out) as staging:
        (staging / "a.txt").write_text("first")
        first = publish(staging, out, kind="thing")
    with staged_dir(out) as staging:  # a concurrent run of the same work that came out different
        (staging / "a.txt").write_text("second")
        kept = publish(staging, out, kind="thing")
    assert kept == first and (out / "a.txt").read_text() == "first"
    assert not [p for p in out.parent.iterdir() if p != out]  # its staging directory is gone too


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_staging_left_by_a_killed_process_is_swept(tmp_path: Path) -> None:
    out = tmp_path / "artifacts" / "thing" / "key"
    dead = out.parent / f".key.{HOST}-{_dead_pid()}.0123abcd.tmp"
    live = out.parent / f".other.{this_process()}.0123abcd.tmp"
    foreign = out.parent / ".key.elsewhere-1.0123abcd.tmp"  # another machine's: cannot tell, kept
    for path in (dead, live, foreign):
        (path / "half").mkdir(parents=True)
    with staged_dir(out) as staging:
        publish(staging, out, kind="thing")
    assert not dead.exists() and live.exists() and foreign.exists()


def test_a_run_whose_process_was_killed_is_marked_failed(isolated_outputs: Path) -> None:
    experiment = configure_tracking(isolated_outputs)
    client = MlflowClient()
    killed = client.create_run(experiment, tags={"krea2.kind": "stage", "krea2.stage": "make",
                                                 OWNER_TAG: f"{HOST}-{_dead_pid()}"}).info.run_id
    alive = client.create_run(experiment, tags={"krea2.kind": "stage", "krea2.stage": "make",
                                                OWNER_TAG: this_process()}).info.run_id
    # the next process to track into this store (here: to run a stage) cleans up
    code = "import sys; from krea2_core.tracking import configure_tracking; configure_tracking(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(isolated_outputs)], check=True, timeout=120)
    assert client.get_run(killed).info.status == "FAILED"
    assert client.get_run(killed).data.tags["krea2.failure"].startswith("interrupted: its process")
    assert client.get_run(alive).info.status == "RUNNING"


def test_an_output_root_can_move(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from krea2_core.cli import main

    old, new = tmp_path / "old", tmp_path / "new"
    monkeypatch.setenv("KREA2_OUTPUT_ROOT", str(old))
    a, manifest_a = execute_stage("make_a", "thing", _writer("aa"), config={})
    b, manifest_b = execute_stage("make_b", "other", _writer("b"), config={}, inputs={"thing": a})
    shutil.move(old, new)
    monkeypatch.setenv("KREA2_OUTPUT_ROOT", str(new))
    assert main(["lineage", manifest_b.mlflow_run_id]) == 0
    printed = capsys.readouterr().out
    assert str(new / "artifacts" / "thing") in printed and str(old) not in printed
    # new runs log into the moved store, not the old place
    execute_stage("make_c", "other", _writer("c"), config={}, inputs={"thing": new / a.relative_to(old)})
    assert not old.exists()
    experiment = MlflowClient().get_experiment_by_name("krea2")
    assert experiment.artifact_location == (new / "mlruns").as_uri()
    assert {a.path for a in MlflowClient().list_artifacts(manifest_b.mlflow_run_id, "other")} >= {"other/data.txt"}


def test_concurrent_first_runs_share_a_fresh_store(tmp_path: Path) -> None:
    script = ("import sys; from krea2_core.tracking import configure_tracking; "
              "print(configure_tracking(sys.argv[1]))")
    processes = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "fresh")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, [err[-2000:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1
