"""Checkpoints: exact resume (params, AdamW moments, LambdaLR), atomic step directories, pruning with PMA
protection, strict weight loading, the rank-0 timer, and FSDP2 resharding between world sizes 1 and 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from krea2_core.training.checkpoint import (
    CONFIG_FILE,
    STATE_DIR,
    STATE_RECORD,
    STEP_WEIGHTS_FILE,
    CheckpointTimer,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_config,
    load_weights,
    save_checkpoint,
    step_dir_name,
)

from ._checkpoint_worker import MODEL_CONFIG, SAVED_STEPS, STATE_FILE, WS1, WS2, build_model, build_optimizers, full_state, train

WORKER = Path(__file__).with_name("_checkpoint_worker.py")


def _build(seed: int = 0, muon: bool = False):
    model = build_model(seed)
    return (model, *build_optimizers(model, muon))


def _save(directory: Path, step: int, model, optimizers, schedulers, keep: int = 3, protect=(), **extra) -> Path:
    return save_checkpoint(directory, step=step, model=model, optimizers=optimizers, schedulers=schedulers,
                           extra=extra, model_config=MODEL_CONFIG, keep=keep, protect=protect)


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.mark.parametrize("muon", [False, True], ids=["adamw", "muon+adamw"])
def test_resume_restores_everything_and_continues_bit_identically(tmp_path: Path, muon: bool) -> None:
    reference = _build(muon=muon)
    train(*reference, range(10))

    model, optimizers, schedulers = _build(muon=muon)
    train(model, optimizers, schedulers, range(5))
    path = _save(tmp_path, 5, model, optimizers, schedulers, cursor={"shard": 2, "offset": 40})
    assert path == tmp_path / step_dir_name(5) and latest_checkpoint(tmp_path) == path
    saved_state, saved_other = full_state(model, optimizers)

    resumed = _build(seed=1, muon=muon)  # other initial weights: all must be overwritten
    extra = load_checkpoint(path, model=resumed[0], optimizers=resumed[1], schedulers=resumed[2])
    assert extra == {"cursor": {"shard": 2, "offset": 40}, "step": 5}
    state, other = full_state(resumed[0], resumed[1])
    _assert_same_tensors(state, saved_state)  # params and every optimizer's moments and step counts
    assert any(".exp_avg_sq" in key for key in state) and other == saved_other  # lr, betas, weight decay, ...
    assert muon == any(".momentum_buffer" in key for key in state)
    assert [s.state_dict() for s in resumed[2]] == [s.state_dict() for s in schedulers]
    assert load_model_config(path) == MODEL_CONFIG
    _assert_same_tensors(load_file(path / STEP_WEIGHTS_FILE), model.state_dict())

    train(*resumed, range(5, 10))
    _assert_same_tensors(resumed[0].state_dict(), reference[0].state_dict())


def test_crash_leftovers_are_ignored_then_removed(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "none-yet") is None and latest_checkpoint(tmp_path) is None
    model, optimizers, schedulers = _build()
    first = _save(tmp_path, 1, model, optimizers, schedulers)
    crashed = tmp_path / (step_dir_name(9) + ".tmp")  # a save killed half-way: newer, but unfinished
    (crashed / STATE_DIR).mkdir(parents=True)
    (crashed / STEP_WEIGHTS_FILE).write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path) == first
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1]
    assert _save(tmp_path, 2, model, optimizers, schedulers) == tmp_path / step_dir_name(2)
    assert not crashed.exists() and latest_checkpoint(tmp_path) == tmp_path / step_dir_name(2)


def test_only_a_training_state_saved_here_and_unchanged_is_unpickled(tmp_path: Path) -> None:
    model, optimizers, schedulers = _build()
    path = _save(tmp_path, 1, model, optimizers, schedulers)
    metadata = path / STATE_DIR / ".metadata"  # DCP's pickle
    assert metadata.is_file()
    metadata.write_bytes(b"\x00" + metadata.read_bytes()[1:])
    with pytest.raises(ValueError, match=r"its training state changed since it was saved: refusing to unpickle"):
        load_checkpoint(path, model=model, optimizers=optimizers, schedulers=schedulers)
    (path / STATE_RECORD).unlink()
    with pytest.raises(ValueError, match=r"no state.json vouches for its training state"):
        load_checkpoint(path, model=model, optimizers=optimizers, schedulers=schedulers)


def test_pruning_keeps_the_newest_and_the_weights_of_protected_steps(tmp_path: Path) -> None:
    model, optimizers, schedulers = _build()
    for step in range(1, 7):
        train(model, optimizers, schedulers, range(step - 1, step))
        _save(tmp_path, step, model, optimizers, schedulers, keep=2, protect={2, 4})
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4, 5, 6]
    assert [(tmp_path / step_dir_name(s) / STATE_DIR).is_dir() for s in (2, 4, 5, 6)] == [False, False, True, True]
    assert latest_checkpoint(tmp_path) == tmp_path / step_dir_name(6)
    weights_only = tmp_path / step_dir_name(2)
    assert load_model_config(weights_only) == MODEL_CONFIG
    load_weights(weights_only, _build(seed=3)[0])
    with pytest.raises(FileNotFoundError, match="pruned to its weights"):
        load_checkpoint(weights_only, model=model, optimizers=optimizers, schedulers=schedulers)
    # an already saved step is kept as it is, not rewritten
    before = (tmp_path / step_dir_name(6) / STEP_WEIGHTS_FILE).stat().st_mtime_ns
    train(model, optimizers, schedulers, range(6, 7))
    _save(tmp_path, 6, model, optimizers, schedulers, keep=2)
    assert (tmp_path / step_dir_name(6) / STEP_WEIGHTS_FILE).stat().st_mtime_ns == before


def test_load_weights_is_strict_and_names_the_keys(tmp_path: Path) -> None:
    model, optimizers, schedulers = _build()
    path = _save(tmp_path, 1, model, optimizers, schedulers)
    plain = _build(seed=4)[0]
    load_weights(path / STEP_WEIGHTS_FILE, plain)  # the file itself or its step directory
    _assert_same_tensors(plain.state_dict(), model.state_dict())
    bigger = nn.Sequential(*build_model(), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"missing keys \['5.bias', '5.weight'\], unexpected keys \[\]"):
        load_weights(path, bigger)
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['4.bias', '4.weight'\]"):
        load_weights(path, build_model()[:4])
    wider = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    with pytest.raises(RuntimeError, match="size mismatch for 4.weight"):
        load_weights(path, wider)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_weights(tmp_path / "nowhere", plain)


def test_bad_input_fails_clearly(tmp_path: Path) -> None:
    model, optimizers, schedulers = _build()
    with pytest.raises(ValueError, match="keep must be >= 1"):
        _save(tmp_path, 1, model, optimizers, schedulers, keep=0)
    with pytest.raises(ValueError, match="extra must be JSON-serialisable"):
        _save(tmp_path, 1, model, optimizers, schedulers, loss=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"extra\['step'\] \(2\) differs from step \(1\)"):
        save_checkpoint(tmp_path, step=1, model=model, optimizers=optimizers, schedulers=schedulers,
                        extra={"step": 2}, model_config={}, keep=1)
    assert list(tmp_path.iterdir()) == []  # nothing was written
    path = _save(tmp_path, 1, model, optimizers, schedulers)
    with pytest.raises(ValueError, match="holds 1 scheduler states but 2 schedulers"):
        load_checkpoint(path, model=model, optimizers=optimizers, schedulers=schedulers * 2)
    with pytest.raises(FileNotFoundError, match="model config not found"):
        load_model_config(tmp_path)
    with pytest.raises(ValueError, match="every_s must be > 0"):
        CheckpointTimer(0)


def test_timer_fires_every_interval() -> None:
    now = [100.0]
    timer = CheckpointTimer(30.0, clock=lambda: now[0])
    decisions = []
    for t in (110.0, 129.9, 130.0, 131.0, 159.0, 160.0):
        now[0] = t
        decisions.append(timer.due())
    assert decisions == [False, False, True, False, False, True]


def test_fsdp_checkpoints_reshard_between_world_sizes_1_and_2(tmp_path: Path) -> None:
    """World size 1 -> 2: the torchrun worker (FSDP2, gloo) resumes a plain single-process checkpoint; 2 -> 1:
    the checkpoint it then saves is resumed here. Gathered params and AdamW state must match exactly."""
    model, optimizers, schedulers = _build()
    train(model, optimizers, schedulers, range(SAVED_STEPS))
    _save(tmp_path / WS1, SAVED_STEPS, model, optimizers, schedulers, keep=1, cursor=5)
    expected, expected_other = full_state(model, optimizers)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = load_file(tmp_path / STATE_FILE)
    sides = [json.loads((tmp_path / f"side-rank{rank}.json").read_text()) for rank in (0, 1)]

    # 1 -> 2
    _assert_same_tensors(_part(result, "loaded."), expected)
    assert sides[0]["loaded"] == json.loads(json.dumps(expected_other))
    assert sides[0]["loaded_scheduler"] == json.loads(json.dumps(schedulers[0].state_dict()))
    assert all(side["extra"] == {"cursor": 5, "step": SAVED_STEPS} for side in sides)
    _assert_same_tensors(_part(result, "weights_only."), _part(expected, "model."))
    assert [side["timer"] for side in sides] == [[False, True], [False, True]]  # rank 0 decides for both

    # 2 -> 1
    resumed, resumed_optimizers, resumed_schedulers = _build(seed=9)
    path = latest_checkpoint(tmp_path / WS2)
    assert path is not None and path.name == step_dir_name(2 * SAVED_STEPS)
    extra = load_checkpoint(path, model=resumed, optimizers=resumed_optimizers, schedulers=resumed_schedulers)
    assert extra == {"cursor": 22, "step": 2 * SAVED_STEPS}
    state, other = full_state(resumed, resumed_optimizers)
    _assert_same_tensors(state, _part(result, "saved."))
    assert json.loads(json.dumps(other)) == sides[0]["saved"]
    assert json.loads(json.dumps(resumed_schedulers[0].state_dict())) == sides[0]["saved_scheduler"]
    _assert_same_tensors(load_file(path / STEP_WEIGHTS_FILE), _part(_part(result, "saved."), "model."))
    assert json.loads((path / CONFIG_FILE).read_text()) == MODEL_CONFIG
