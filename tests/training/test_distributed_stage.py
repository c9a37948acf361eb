"""The scaffold of the checkpoint stages (one process here: rank 0 of 1; the 2-rank path runs in the torchrun
pretraining, RL and TDM tests)."""

from pathlib import Path

import pytest

from krea2_core.artifacts import read_manifest
from krea2_core.config import TrainParallelConfig
from krea2_core.stages import StageOutput
from krea2_core.training.distributed_stage import run_distributed_stage

ONE = TrainParallelConfig(nproc_per_node=1)


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
