"""The shared trainer: one seeding rule, Optimized steps and schedules, TrainState resume and checkpoint policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from krea2_core.training.config import OptimizerConfig
from krea2_core.training.checkpoint import STATE_DIR, STEP_WEIGHTS_FILE, list_checkpoints, step_dir_name
from krea2_core.common.rng import rng
from krea2_core.training.trainer import Optimized, TrainState, noise_and_timesteps

STEPS = 6
DATA = torch.randn(STEPS, 8, 4, generator=torch.Generator().manual_seed(1))


def test_rng_is_a_function_of_seed_and_keys() -> None:
    draw = lambda *key: torch.randn(3, generator=rng(*key))  # noqa: E731
    assert torch.equal(draw(7, 2, 5), draw(7, 2, 5))
    assert len({tuple(draw(*key).tolist()) for key in [(7, 2, 5), (7, 5, 2), (7, 2, 6), (8, 2, 5), (7,)]}) == 5
    with pytest.raises(ValueError, match="at most 2 keys"):
        rng(0, 1, 2, 3)


def test_noise_and_timesteps_of_a_slice_are_the_global_batch_rows() -> None:
    """A rank holding samples 2..3 of a global batch of 4 draws what one process draws for those rows."""
    tokens = torch.zeros(4, 5, 3)
    noise, t = noise_and_timesteps(tokens, torch.arange(4), seed=3, step=9, shift=2.0)
    part_noise, part_t = noise_and_timesteps(tokens[2:], torch.arange(2, 4), seed=3, step=9, shift=2.0)
    assert torch.equal(part_noise, noise[2:]) and torch.equal(part_t, t[2:])
    assert not torch.equal(noise[0], noise[1])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _train(checkpoints: Path | None, stop: int | None = None, protect: tuple[int, ...] = ()) -> nn.Module:
    """STEPS steps of Muon + AdamW (the project's optimizers) under a WSD schedule; raises at ``stop``."""
    model = _model()
    part = Optimized.build(model, OptimizerConfig(kind="muon"), 1e-2, total_steps=STEPS, warmup_steps=2,
                           decay_fraction=0.5)
    state = TrainState(part, checkpoints, steps=STEPS, model_config={"kind": "mlp"}, every_s=1e-9, protect=protect)
    state.resume()
    for step in state.range("test", show=False):
        if step == stop:
            raise RuntimeError("killed")
        part.step(model(DATA[step]).square().mean())
        state.maybe_checkpoint(step + 1)
    return model


def test_a_resumed_run_ends_bit_exactly_where_a_straight_run_does(tmp_path: Path) -> None:
    straight = _train(None)
    with pytest.raises(RuntimeError, match="killed"):
        _train(tmp_path, stop=4)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3, 4]  # every step (timer), the newest 2 kept
    resumed = _train(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True))


def test_protected_steps_keep_their_weights_after_pruning(tmp_path: Path) -> None:
    _train(tmp_path, protect=(2,))
    saved = dict(list_checkpoints(tmp_path))
    assert sorted(saved) == [2, 5, 6]
    assert (saved[2] / STEP_WEIGHTS_FILE).is_file() and not (saved[2] / STATE_DIR).exists()
    assert (tmp_path / step_dir_name(STEPS) / STATE_DIR).is_dir()


def test_the_last_step_is_saved_even_when_the_timer_is_not_due(tmp_path: Path) -> None:
    model = _model()
    part = Optimized.build(model, OptimizerConfig(), 1e-2, total_steps=3, warmup_steps=0)
    state = TrainState(part, tmp_path, steps=3, model_config={}, every_s=3600)
    for done in (1, 2, 3):
        state.maybe_checkpoint(done)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3]


def test_several_parts_checkpoint_and_resume_together(tmp_path: Path) -> None:
    """Two models with their own optimizers and schedules (distillation's student and fake score) resume as one."""
    def parts() -> dict[str, Optimized]:
        return {name: Optimized.build(_model(), OptimizerConfig(), lr, total_steps=4, warmup_steps=1)
                for name, lr in (("a", 1e-2), ("b", 1e-3))}

    first = parts()
    state = TrainState(first, tmp_path, steps=4, model_config={}, every_s=1e-9)
    for step in range(2):
        for part in first.values():
            part.step(part.model(DATA[step]).square().mean())
        state.maybe_checkpoint(step + 1)
    again = parts()
    resumed = TrainState(again, tmp_path, steps=4, model_config={}, every_s=1e-9)
    assert resumed.resume()["step"] == 2 and resumed.start == 2
    for name in first:
        assert again[name].lr == first[name].lr
        assert all(torch.equal(a, b) for a, b in zip(first[name].model.state_dict().values(),
                                                     again[name].model.state_dict().values(), strict=True))


def test_a_step_without_schedule_keeps_the_lr_until_schedule() -> None:
    """RL takes several optimiser steps per round and schedules by rounds."""
    model = _model()
    part = Optimized.build(model, OptimizerConfig(), 1e-2, total_steps=4, warmup_steps=2)
    before = part.lr
    part.step(model(DATA[0]).square().mean(), schedule=False)
    assert part.lr == before
    part.schedule()
    assert part.lr > before
    assert all(p.grad is None for p in model.parameters())  # the step zeroed the grads
