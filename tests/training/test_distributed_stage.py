"""The scaffold of the checkpoint stages: rank 0 of 1, and 2 local ranks for the cache and failures (the 2-rank
training path runs in the torchrun pretraining, RL and TDM tests)."""

import functools
from pathlib import Path

import pytest

from krea2_core.artifacts import read_manifest
from krea2_core.stages import StageOutput
from krea2_core.training.config import TrainParallelConfig
from krea2_core.training.distributed_stage import run_distributed_stage
from krea2_core.training.launch import RankFailed, launch_local

ONE = TrainParallelConfig(nproc_per_node=1)
TWO = TrainParallelConfig(nproc_per_node=2)


def _write(env, scratch: Path, run, staging: Path | None) -> StageOutput | None:
    assert env.rank == 0 and run is not None and scratch == run.work_dir
    (staging / "model.safetensors").write_bytes(b"weights")
    return StageOutput(counts={"steps": 3})


def test_rank_0_publishes_what_its_work_staged(tmp_path: Path) -> None:
    out = run_distributed_stage("toy", _write, parallel=ONE, view={"lr": 1.0}, inputs={}, root=tmp_path)
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert read_manifest(out, kind="checkpoint").counts == {"steps": 3}


def test_bad_launches_and_inputs_fail_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="launched with 1 processes but .* is 2: the launch and the config"):
        run_distributed_stage("toy", _write, parallel=TrainParallelConfig(), view={}, inputs={}, root=tmp_path)

    def reject(env) -> None:
        raise ValueError("batch must be divisible")

    with pytest.raises(ValueError, match="batch must be divisible"):
        run_distributed_stage("toy", _write, parallel=ONE, view={}, inputs={}, check=reject, root=tmp_path)
    assert not (tmp_path / "artifacts").exists()
    with pytest.raises(RuntimeError, match="rank 0's work returned no StageOutput"):
        run_distributed_stage("toy", lambda *args: None, parallel=ONE, view={}, inputs={}, root=tmp_path)
    assert not list((tmp_path / "artifacts").glob("checkpoint/*/model.safetensors"))


def _logged(log: str, env, scratch: Path, run, staging: Path | None) -> StageOutput | None:
    with open(log, "a") as f:
        f.write(f"{env.rank}\n")
    if staging is None:
        return None
    (staging / "model.safetensors").write_bytes(b"weights")
    return StageOutput(counts={"steps": 1})


def _two_ranks(root: str, log: str, inputs: dict[str, Path]) -> Path | None:
    return run_distributed_stage("toy", functools.partial(_logged, log), parallel=TWO, view={}, inputs=inputs,
                                 root=Path(root))


def test_every_rank_skips_a_finished_stage_and_a_failed_rank_says_why(tmp_path: Path) -> None:
    log = tmp_path / "work.log"
    out = launch_local(TWO, _two_ranks, str(tmp_path), str(log), {})
    assert sorted(log.read_text().split()) == ["0", "1"]
    assert launch_local(TWO, _two_ranks, str(tmp_path), str(log), {}) == out  # cached: neither rank works again
    assert sorted(log.read_text().split()) == ["0", "1"]

    (out / "model.safetensors").write_bytes(b"")
    with pytest.raises(RankFailed, match=rf"^rank [01] failed( \(and 1 more rank\(s\)\))?: DamagedArtifact: artifact {out} "
                                         r"\(checkpoint\) is damaged: model.safetensors is 0 bytes, published as 7") as err:
        launch_local(TWO, _two_ranks, str(tmp_path), str(log), {"init": out})
    assert "\n" not in str(err.value) and "in read_manifest" in err.value.rank_traceback
