"""Flow-GRPO: the clipped objective and KL on hand values, the round's bookkeeping, a short run where a brightness
reward rises, exact resume, the published stage with the Ray reward service, and bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load_file

from krea2_core.artifacts import ArtifactError, read_manifest
from krea2_core.diffusion.text_to_image import TextToImage
from krea2_core.post.config import RLConfig
from krea2_core.post.grpo import (
    EVAL_FILE,
    POOL_FILE,
    RLSettings,
    check_rl_config,
    grpo_loss,
    reward_metrics,
    run_rl_stage,
    train_grpo,
    train_timesteps,
)
from krea2_core.post.preference import policy_and_reference
from krea2_core.post.prompt_pool import PromptPool, rl_prompts
from krea2_core.training import checkpoint as ckpt
from krea2_core.training.config import FinetuneConfig
from krea2_core.training.diffusers_format import DIFFUSERS_CONFIG_FILE, DIFFUSERS_WEIGHTS_FILE
from krea2_core.training.launch import launch_local
from krea2_core.training.parallel import init_distributed
from krea2_core.training.pretrain import METRICS_FILE
from krea2_core.training.image_model import load_text_to_image, new_model
from krea2_core.world.captions import Prompt

from ._checkpoints import PRETRAIN, RESOLUTION, TRAINER, publish_checkpoints

CPU = torch.device("cpu")


def rl_config(steps: int = 3, **grpo: object) -> RLConfig:
    return RLConfig.from_dict({
        "rewards": {"weights": {"rubric": 1.0}},
        "pool": {"n_prompts": 6, "min_active": 2, "min_std": 0.0},
        "grpo": {"steps": steps, "prompts_per_step": 2, "group_size": 4, "sample_steps": 3, "train_timesteps": 2,
                 "lr": 3e-2, "warmup_steps": 0, "kl_beta": 0.01, "log_every": 2, **grpo},
        "eval_prompts": 4, "diversity_prompts": 2, "diversity_samples": 2,
    })


def rl_settings(config: RLConfig, trainer: FinetuneConfig = TRAINER, resolution: int = RESOLUTION) -> RLSettings:
    return RLSettings(rl=config, resolution=resolution, trainer=trainer)


# --------------------------------------------------------------------------- the objective


def test_clipped_objective_and_kl_on_hand_values() -> None:
    ratio = torch.tensor([1.5, 0.5, 1.1])
    old = torch.tensor([-1.0, 0.3, 2.0])
    log_prob = (old + ratio.log()).requires_grad_()
    advantages = torch.tensor([1.0, 1.0, -2.0])
    kl = torch.tensor([0.1, 0.2, 0.3])
    loss, stats = grpo_loss(log_prob, old, advantages, clip_range=0.2, kl=kl, kl_beta=0.5)
    # min(r A, clip(r) A): 1.2 (clipped above), 0.5 (unclipped: below the range with A > 0), -2.2 (both equal)
    policy = -(1.2 + 0.5 - 2.2) / 3
    assert stats["policy_loss"].item() == pytest.approx(policy, rel=1e-5)
    assert loss.item() == pytest.approx(policy + 0.5 * 0.2, rel=1e-5)
    assert stats["ratio"].item() == pytest.approx(3.1 / 3, rel=1e-5)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)
    assert stats["kl"].item() == pytest.approx(0.2)
    loss.backward()
    # d/dlogp of -r A / B where the unclipped term is the minimum, 0 where the clipped one is
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, -0.5 / 3, 2.2 / 3]))


def test_without_kl_the_loss_is_the_policy_term_and_bad_shapes_fail() -> None:
    zeros = torch.zeros(4)
    loss, stats = grpo_loss(zeros, zeros, torch.tensor([1.0, -1.0, 2.0, 0.0]), clip_range=0.2)
    assert loss.item() == pytest.approx(-0.5) and "kl" not in stats and stats["clip_fraction"].item() == 0.0
    with pytest.raises(ValueError, match=r"one shape \(B,\).*'advantages': \(3,\)"):
        grpo_loss(zeros, zeros, torch.zeros(3), clip_range=0.2)
    with pytest.raises(ValueError, match="one shape"):
        grpo_loss(zeros, zeros, zeros, clip_range=0.2, kl=torch.zeros(4, 1))


def test_trained_timesteps_are_distinct_seeded_and_cover_only_stochastic_steps() -> None:
    drawn = train_timesteps(9, 4, seed=0, step=3)
    assert len(set(drawn)) == 4 and all(0 <= i < 9 for i in drawn)
    assert drawn == train_timesteps(9, 4, seed=0, step=3)
    assert {tuple(train_timesteps(9, 4, seed=0, step=s)) for s in range(5)} != {tuple(drawn)}


def test_reward_metrics_average_only_where_a_reward_applies() -> None:
    scores = {"rubric": np.array([0.2, 0.4, 0.6, 0.8]), "text": np.array([np.nan, 1.0, np.nan, 0.0])}
    metrics = reward_metrics(scores, {"rubric": 1.0, "text": 1.0})
    assert metrics["reward.rubric"] == pytest.approx(0.5) and metrics["reward.text"] == pytest.approx(0.5)
    # per sample: 0.2, (0.4 + 1) / 2, 0.6, (0.8 + 0) / 2
    assert metrics["reward.total"] == pytest.approx((0.2 + 0.7 + 0.6 + 0.4) / 4)
    assert "reward.text" not in reward_metrics({"rubric": np.ones(2), "text": np.full(2, np.nan)},
                                               {"rubric": 1.0, "text": 1.0})


def test_config_checks_name_the_problem() -> None:
    check_rl_config(rl_config(), dp_size=2)
    with pytest.raises(ValueError, match=r"prompts_per_step x group_size \(8\) must be divisible by .* \(3\)"):
        check_rl_config(rl_config(), dp_size=3)
    with pytest.raises(ValueError, match="train_timesteps <= sample_steps - 1"):
        check_rl_config(rl_config(train_timesteps=3), dp_size=1)
    no_rubric = dataclasses.replace(rl_config(), rewards=dataclasses.replace(rl_config().rewards,
                                                                             weights={"aesthetic": 1.0}))
    with pytest.raises(ValueError, match="rubric"):
        check_rl_config(no_rubric, dp_size=1)
    with pytest.raises(ValueError, match="min_active"):
        check_rl_config(rl_config(prompts_per_step=3), dp_size=1)


# --------------------------------------------------------------------------- training


class BrightnessReward:
    """A stand-in for the reward service: the "rubric" reward is the image's mean brightness in [0, 1] (or its
    darkness)."""

    def __init__(self, darker: bool = False) -> None:
        self.darker = darker
        self.calls: list[int] = []

    def score(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> dict[str, np.ndarray]:
        self.calls.append(len(images))
        brightness = np.array([np.asarray(image).mean() / 255 for image in images])
        return {"rubric": 1 - brightness if self.darker else brightness}


@pytest.fixture(scope="module")
def init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return publish_checkpoints(tmp_path_factory.mktemp("rl_inputs"))[0]


def _train(init: Path, config: RLConfig, **kwargs: object) -> tuple[list[dict], TextToImage, PromptPool]:
    env = init_distributed("cpu")
    pipe, reference = policy_and_reference(PRETRAIN, init, env)
    pool = PromptPool(rl_prompts(config.pool, RESOLUTION), config.pool)
    curve: list[dict] = []
    log = kwargs.pop("log", lambda step, metrics: curve.append({"step": step, **metrics}))
    train_grpo(pipe, reference, pool, kwargs.pop("rewards", BrightnessReward()), config, PRETRAIN, env, RESOLUTION,
               log=log, **kwargs)
    return curve, pipe, pool


def _brightness(pipe: TextToImage) -> float:
    """Mean brightness of ODE samples from fixed noise: a paired comparison between models."""
    images = pipe.generate(["a red circle", "two blue squares"] * 8, width=RESOLUTION, height=RESOLUTION, steps=4,
                           cfg_scale=1.0, shift=1.0, seed=1)
    return float(np.mean([np.asarray(image).mean() / 255 for image in images]))


def test_grpo_rounds_move_the_policy_the_way_the_reward_points(init: Path) -> None:
    before = _brightness(load_text_to_image(init, PRETRAIN.parallel, CPU, seed=PRETRAIN.seed))
    rewards = BrightnessReward()
    curve, brighter, pool = _train(init, rl_config(), rewards=rewards)
    _, darker, _ = _train(init, rl_config(), rewards=BrightnessReward(darker=True))
    assert _brightness(brighter) > before + 0.01 and _brightness(darker) < before - 0.01
    assert curve[-1]["reward.rubric"] > curve[0]["reward.rubric"]
    assert rewards.calls == [8] * 3  # the whole global batch, once per round
    for c in curve:
        for key in ("reward.total", "advantage_std", "loss", "policy_loss", "clip_fraction", "kl", "ratio",
                    "grad_norm", "lr", "pool.active", "round_s"):
            assert np.isfinite(c[key]), key
    assert curve[0]["advantage_std"] == pytest.approx(1.0, abs=1e-6)  # GDPO normalises the batch
    assert curve[-1]["kl"] > 0 and pool.draws.sum() == 2 * 3


def test_training_recomputes_the_rollouts_log_probs_exactly_before_the_first_update(init: Path) -> None:
    # one round, one trained step: the policy is still the one that sampled, and still the reference
    (first,) = _train(init, rl_config(steps=1, train_timesteps=1))[0]
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6) and first["clip_fraction"] == 0.0
    assert first["kl"] == pytest.approx(0.0, abs=1e-9)


class _Crash(Exception):
    pass


def test_a_crashed_run_resumes_to_the_same_weights_pool_and_curve(init: Path, tmp_path: Path) -> None:
    config = rl_config()
    straight, pipe, pool = _train(init, config)

    def crash_at_2(step: int, metrics: dict) -> None:
        if step == 2:
            raise _Crash

    with pytest.raises(_Crash):
        _train(init, config, checkpoints=tmp_path, log=crash_at_2, checkpoint_every_s=1e-9)
    resumed, resumed_pipe, resumed_pool = _train(init, config, checkpoints=tmp_path, checkpoint_every_s=1e-9)
    assert [c["step"] for c in resumed] == [2, 3]  # from the step-1 checkpoint

    def timeless(curve: list[dict]) -> list[dict]:
        return [{k: v for k, v in c.items() if k != "round_s"} for c in curve]

    assert timeless(resumed) == timeless(straight[1:])
    for (name, a), b in zip(pipe.model.state_dict().items(), resumed_pipe.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed_pool.state_dict() == pool.state_dict()
    assert json.loads((ckpt.latest_checkpoint(tmp_path) / ckpt.EXTRA_FILE).read_text())["pool"] == pool.state_dict()


# --------------------------------------------------------------------------- the stage


def test_stage_publishes_a_checkpoint_with_reward_curves_pool_and_evaluation(init: Path, tmp_path: Path) -> None:
    config = rl_config()
    config = dataclasses.replace(config, rewards=dataclasses.replace(config.rewards,
                                                                      weights={"rubric": 1.0, "artifact": 0.5}))
    out = run_rl_stage({"init": init}, rl_settings(config), root=tmp_path)
    assert out is not None
    manifest = read_manifest(out, kind="checkpoint")
    assert manifest.counts == {"steps": 3, "prompts": 6, "samples": 24}
    assert {DIFFUSERS_WEIGHTS_FILE, DIFFUSERS_CONFIG_FILE, METRICS_FILE, POOL_FILE, EVAL_FILE, "samples.png"} <= {
        p.name for p in out.iterdir()}
    new_model(out, CPU, seed=PRETRAIN.seed)  # loadable like any checkpoint
    trained, start = load_file(out / DIFFUSERS_WEIGHTS_FILE), load_file(init / DIFFUSERS_WEIGHTS_FILE)
    assert any(not torch.equal(trained[k], start[k]) for k in start)

    curve = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [c["step"] for c in curve] == [1, 2, 3]
    assert all({"reward.rubric", "reward.artifact", "reward.total", "kl", "pool.active"} <= set(c) for c in curve)
    pool = pd.read_parquet(out / POOL_FILE)
    assert len(pool) == 6 and pool["draws"].sum() == 6

    report = json.loads((out / EVAL_FILE).read_text())
    assert set(report) == {"init_cfg", "init_nocfg", "policy_nocfg", "vs_init_nocfg", "vs_init_cfg", "diversity"}
    for name in ("init_cfg", "init_nocfg", "policy_nocfg"):
        assert 0.0 <= report[name]["score"] <= 1.0 and "pass_rate" in report[name]
    for start in ("init_nocfg", "init_cfg"):  # the policy's paired change against each start setting, with its CI
        change = report[f"vs_{start}"]
        assert change["score"] == pytest.approx(report["policy_nocfg"]["score"] - report[start]["score"])
        assert change["score.low"] <= change["score"] <= change["score.high"]
        assert (change["score.before"], change["score.after"]) == (report[start]["score"],
                                                                    report["policy_nocfg"]["score"])
    assert set(report["diversity"]) == {"init", "policy"} and all(v >= 0 for v in report["diversity"].values())

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    metrics = client.get_run(manifest.mlflow_run_id).data.metrics
    for key in ("reward.rubric", "reward.total", "eval.init_cfg.score", "eval.policy_nocfg.score",
                "eval.vs_init_nocfg.score.low", "eval.diversity.policy", "pool.active"):
        assert key in metrics, key
    assert sorted(m.step for m in client.get_metric_history(manifest.mlflow_run_id, "reward.rubric")) == [2, 3]


@pytest.mark.slow
def test_two_ranks_with_fsdp_follow_the_single_process_curve(init: Path, tmp_path: Path) -> None:
    single = run_rl_stage({"init": init}, rl_settings(rl_config(steps=2)), "", tmp_path / "one")
    two = dataclasses.replace(TRAINER, parallel=dataclasses.replace(TRAINER.parallel, nproc_per_node=2))
    out = launch_local(two.parallel, run_rl_stage, {"init": init}, rl_settings(rl_config(steps=2), two), "",
                       tmp_path / "two")

    def curve(artifact: Path) -> list[dict]:
        return [json.loads(line) for line in (artifact / METRICS_FILE).read_text().splitlines()]

    for a, b in zip(curve(out), curve(single), strict=True):
        for key in ("reward.rubric", "advantage_std", "loss", "ratio", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), (a["step"], key)


def test_bad_input_fails_before_anything_is_written(init: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="expected 'reward_model'"):
        run_rl_stage({"init": init, "reward_model": init}, rl_settings(rl_config()), root=tmp_path)
    with pytest.raises(ArtifactError):
        run_rl_stage({"init": tmp_path}, rl_settings(rl_config()), root=tmp_path)
    two_ranks = dataclasses.replace(TRAINER, parallel=dataclasses.replace(TRAINER.parallel, nproc_per_node=2))
    with pytest.raises(RuntimeError, match="launched with 1 processes but parallel.nnodes x nproc_per_node is 2"):
        run_rl_stage({"init": init}, rl_settings(rl_config(), two_ranks), root=tmp_path)
    with pytest.raises(ValueError, match="train_timesteps <= sample_steps - 1"):
        run_rl_stage({"init": init}, rl_settings(rl_config(train_timesteps=3)), root=tmp_path)
    aesthetic = dataclasses.replace(rl_config(), rewards=dataclasses.replace(
        rl_config().rewards, weights={"rubric": 1.0, "aesthetic": 0.5}))
    with pytest.raises(ValueError, match="aesthetic reward needs the reward_model stage's artifact"):
        run_rl_stage({"init": init}, rl_settings(aesthetic), root=tmp_path)
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "work").exists()
    assert not (tmp_path / "mlflow.db").exists()
