"""Preference optimisation: the DPO / STPO loss math, a short training run where DPO lowers the winner's likelihood
below the reference's and STPO does not (policy divergence), exact resume, the published stage, and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from krea2_core.artifacts import ArtifactError, read_manifest
from krea2_core.data.schemas import PreferencePairs, write_table
from krea2_core.diffusion.flow import add_noise, flow_loss, sample_timesteps
from krea2_core.post.config import PreferenceConfig, PreferenceLossConfig, PreferenceStageConfig
from krea2_core.post.pairs import PAIRS_FILE, decode_pair_images, png_bytes
from krea2_core.post.preference import (
    METRICS_FILE,
    PreferenceSettings,
    load_pairs,
    pair_indices,
    policy_and_reference,
    preference_settings,
    run_preference_stage,
    train_preference,
)
from krea2_core.post.preference_loss import preference_loss
from krea2_core.presets import preset
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.training.config import FinetuneConfig
from krea2_core.training.diffusers_format import DIFFUSERS_CONFIG_FILE, DIFFUSERS_WEIGHTS_FILE
from krea2_core.training.launch import launch_local
from krea2_core.training.parallel import init_distributed
from krea2_core.training.image_model import ModelIndex, new_model, text_to_image
from krea2_core.world.captions import sample_prompts
from krea2_core.world.render import render
from krea2_core.world.scene import COLORS

from ._checkpoints import PRETRAIN, RESOLUTION, TRAINER

CPU = torch.device("cpu")
STPO = PreferenceLossConfig(kind="stpo", beta=10.0, winner_weight=1.0, loser_weight=0.5, loser_tolerance=0.05,
                            max_margin=2.0)
DPO = dataclasses.replace(STPO, kind="dpo")


# --------------------------------------------------------------------------- the loss


def _errors(*values: list[float], grad: bool = False) -> list[torch.Tensor]:
    return [torch.tensor(v, requires_grad=grad) for v in values]


def test_dpo_is_minus_log_sigmoid_of_the_beta_scaled_margin() -> None:
    pw, pl, rw, rl = _errors([1.0, 0.5], [1.2, 0.4], [0.9, 0.5], [1.0, 0.45])
    loss, stats = preference_loss(pw, pl, rw, rl, DPO)
    # Δ_w = [0.1, 0], Δ_l = [0.2, -0.05]: z = -β (Δ_w - Δ_l) = [1, -0.5]
    expected = [-math.log(1 / (1 + math.exp(-z))) for z in (1.0, -0.5)]
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert stats["dpo_loss"].item() == pytest.approx(loss.item())
    assert stats["implicit_loglik.winner"].item() == pytest.approx(-10.0 * 0.05, rel=1e-5)  # mean(-β Δ_w)
    assert stats["implicit_loglik.loser"].item() == pytest.approx(-10.0 * 0.075, rel=1e-5)
    assert stats["margin"].item() == pytest.approx(0.25, rel=1e-5)
    assert stats["accuracy"].item() == 0.5  # Δ_w < Δ_l in the first pair only


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_stpo_caps_the_margin_and_adds_beta_scaled_hinges() -> None:
    # pair 0: the winner fell (Δ_w = 0.1), the loser fell by 0.25 > τ, z = 1.5 < κ;
    # pair 1: the winner rose (Δ_w = -0.2), the loser fell by 0.04 < τ, z = 2.4 > κ = 2
    pw, pl, rw, rl = _errors([1.1, 0.8], [1.25, 1.04], [1.0, 1.0], [1.0, 1.0])
    loss, stats = preference_loss(pw, pl, rw, rl, STPO)
    hinges = 1.0 * 10.0 * 0.1 + 0.5 * 10.0 * (0.25 - 0.05)  # λ_w β relu(Δ_w) + λ_l β relu(Δ_l - τ), pair 0
    assert loss.item() == pytest.approx((_softplus(-1.5) + hinges + _softplus(-2.0)) / 2, rel=1e-5)
    assert stats["hinge.winner"].item() == pytest.approx(10.0 * 0.1 / 2, rel=1e-5)  # unweighted, batch mean
    assert stats["hinge.loser"].item() == pytest.approx(10.0 * 0.2 / 2, rel=1e-5)
    assert stats["capped"].item() == 0.5
    assert stats["dpo_loss"].item() == pytest.approx((_softplus(-1.5) + _softplus(-2.4)) / 2, rel=1e-5)  # uncapped


def test_stpo_gradients_protect_the_winner_bound_the_loser_and_stop_past_the_cap() -> None:
    def grads(config: PreferenceLossConfig, pw: float, pl: float) -> tuple[float, float]:
        w, lo = _errors([pw], [pl], grad=True)
        preference_loss(w, lo, *_errors([1.0], [1.0]), config)[0].backward()
        return w.grad.item(), lo.grad.item()

    # the winner fell below the reference (Δ_w = 0.1), margin z = 0.5 not reached: STPO pushes the winner's
    # error down by λ_w β more than DPO does
    sig = 1 / (1 + math.exp(0.5))  # σ(-z)
    dpo_w, dpo_l = grads(DPO, 1.1, 1.15)
    stpo_w, stpo_l = grads(STPO, 1.1, 1.15)
    assert dpo_w == pytest.approx(10.0 * sig, rel=1e-5) and stpo_w == pytest.approx(10.0 * sig + 10.0, rel=1e-5)
    # the loser fell past τ (Δ_l = 0.15): STPO's hinge pulls it back against DPO's push, and wins once σ(-z) < 0.5
    assert dpo_l == pytest.approx(-10.0 * sig, rel=1e-5) and stpo_l == pytest.approx(-10.0 * sig + 5.0, rel=1e-5)
    assert dpo_l < 0 < stpo_l
    # past the cap (z = 2.4) with both within their limits: no gradient, where DPO still pushes the pair apart
    assert grads(STPO, 0.8, 1.04) == (0.0, 0.0)
    dpo_past = grads(DPO, 0.8, 1.04)
    assert dpo_past[0] > 0 > dpo_past[1]


def test_loss_rejects_mismatched_or_empty_errors() -> None:
    ok = torch.ones(3)
    with pytest.raises(ValueError, match=r"one shape \(B,\).*'err_ref_l': \(2,\)"):
        preference_loss(ok, ok, ok, torch.ones(2), STPO)
    with pytest.raises(ValueError, match="one shape"):
        preference_loss(torch.ones(3, 1), torch.ones(3, 1), torch.ones(3, 1), torch.ones(3, 1), STPO)
    with pytest.raises(ValueError, match="B >= 1"):
        preference_loss(*(torch.ones(0),) * 4, STPO)


def test_pair_batches_walk_seeded_permutations_the_same_way_every_time() -> None:
    stream = np.concatenate([pair_indices(5, 3, step, seed=1) for step in range(10)])  # 30 draws = 6 epochs
    for epoch in range(6):
        assert sorted(stream[epoch * 5:(epoch + 1) * 5]) == list(range(5))  # every pair once per epoch
    assert not np.array_equal(stream[:5], stream[5:10])  # a new order each epoch
    assert np.array_equal(pair_indices(5, 3, 7, seed=1), pair_indices(5, 3, 7, seed=1))
    assert sorted(pair_indices(2, 4, 0, seed=0)) == [0, 0, 1, 1]  # fewer pairs than a batch: two epochs


# --------------------------------------------------------------------------- training


def _pairs_frame(n: int, size: int = RESOLUTION) -> pd.DataFrame:
    """Winner: the prompt's scene rendered; loser: the same scene with every shape in a wrong colour."""
    rows = []
    for i, (prompt, scene) in enumerate(sample_prompts(np.random.default_rng(0), n, size, size)):
        wrong = dataclasses.replace(scene, shapes=tuple(
            dataclasses.replace(s, color=COLORS[(COLORS.index(s.color) + 3) % len(COLORS)]) for s in scene.shapes))
        rows.append({"pair_id": f"p{i}", "prompt": prompt.text, "rubric": json.dumps(prompt.to_dict()["rubric"]),
                     "width": size, "height": size, "winner": png_bytes(render(scene)),
                     "loser": png_bytes(render(wrong)), "winner_source": "render", "loser_source": "wrong_colour",
                     "on_policy": False, "winner_score": 1.0, "loser_score": 0.0, "origin": "synthetic"})
    return pd.DataFrame(rows)


def _publish_pairs(frame: pd.DataFrame, root: Path, name: str) -> Path:
    def body(inputs: dict[str, Path], staging: Path, run: object) -> StageOutput:
        write_table(frame, staging / PAIRS_FILE, PreferencePairs)
        return StageOutput(counts={"pairs": len(frame)})

    return execute_stage(f"test_pairs_{name}", "preference_pairs", body, config={"name": name}, root=root)[0]


def _publish_init(frame: pd.DataFrame, root: Path) -> Path:
    """A checkpoint that already fits both sides of every pair (plain flow matching on winners and losers): what
    PO starts from, a model that generates both."""
    def body(inputs: dict[str, Path], staging: Path, run: object) -> StageOutput:
        model = new_model(PRETRAIN.model, CPU, seed=PRETRAIN.seed)
        pipe = text_to_image(model, ModelIndex.of(PRETRAIN), PRETRAIN.parallel, CPU)
        winner, loser = decode_pair_images(frame)
        tokens, grid, text, mask = pipe.encode(torch.cat([winner, loser]), list(frame["prompt"]) * 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(40):
            noise = torch.randn(tokens.shape, generator=generator)
            t = sample_timesteps(len(tokens), shift=1.0, generator=generator)
            flow_loss(pipe.velocity(add_noise(tokens, noise, t), t, grid, text, mask), tokens, noise).backward()
            optimizer.step()
            optimizer.zero_grad()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, staging / DIFFUSERS_WEIGHTS_FILE)
        ModelIndex.of(PRETRAIN).write(staging)
        return StageOutput(counts={})

    return execute_stage("test_init", "checkpoint", body, config={"steps": 40}, root=root)[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(pairs artifact, init checkpoint artifact)."""
    root = tmp_path_factory.mktemp("po_inputs")
    frame = _pairs_frame(4)
    return _publish_pairs(frame, root, "good"), _publish_init(frame, root)


def _train(inputs: tuple[Path, Path], loss: PreferenceLossConfig, steps: int, **kwargs: object) -> list[dict]:
    pairs, init = inputs
    pipe, reference = policy_and_reference(PRETRAIN, init, init_distributed("cpu"))
    curve: list[dict] = []
    train_preference(pipe, reference, load_pairs(pairs, RESOLUTION), loss,
                     PreferenceStageConfig(steps=steps, global_batch=4, lr=1e-3, warmup_steps=0), PRETRAIN,
                     init_distributed("cpu"), log=lambda step, metrics: curve.append({"step": step, **metrics}),
                     **kwargs)
    return curve


def test_dpo_lowers_the_winners_likelihood_and_stpo_keeps_it(inputs: tuple[Path, Path]) -> None:
    config = PreferenceLossConfig()  # the defaults: β 2000, λ_w 1, λ_l 0.5, τ 0.002, κ 5
    dpo = _train(inputs, dataclasses.replace(config, kind="dpo"), 12)
    stpo = _train(inputs, config, 12)
    winner = {name: [c["implicit_loglik.winner"] for c in curve] for name, curve in (("dpo", dpo), ("stpo", stpo))}
    # DPO widens the margin by lowering both likelihoods (policy divergence), STPO holds the winner near the
    # reference: its lowest and its final winner ratio are both far above DPO's
    assert winner["dpo"][-1] < -10 and min(winner["dpo"]) < -10
    assert min(winner["stpo"]) > min(winner["dpo"]) + 10 and winner["stpo"][-1] > winner["dpo"][-1] + 10
    for curve in (dpo, stpo):  # both learn the preference
        assert np.mean([c["margin"] for c in curve[-4:]]) > 1.0
        assert np.mean([c["accuracy"] for c in curve[-4:]]) > 0.5
        assert all(np.isfinite(c["loss"]) and np.isfinite(c["grad_norm"]) for c in curve)


class _Crash(Exception):
    pass


def test_a_crashed_run_resumes_from_its_checkpoint_on_the_same_curve(inputs: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    straight = _train(inputs, DPO, 4)

    def crash_at_3(step: int, metrics: dict) -> None:
        if step == 3:
            raise _Crash

    pairs, init = inputs
    pipe, reference = policy_and_reference(PRETRAIN, init, init_distributed("cpu"))
    stage = PreferenceStageConfig(steps=4, global_batch=4, lr=1e-3, warmup_steps=0)
    with pytest.raises(_Crash):
        train_preference(pipe, reference, load_pairs(pairs, RESOLUTION), DPO, stage, PRETRAIN,
                         init_distributed("cpu"), checkpoints=tmp_path, log=crash_at_3, checkpoint_every_s=1e-9)
    resumed = _train(inputs, DPO, 4, checkpoints=tmp_path, checkpoint_every_s=1e-9)
    assert [c["step"] for c in resumed] == [3, 4]  # from the step-2 checkpoint
    assert resumed == straight[2:]


# --------------------------------------------------------------------------- the stage


def _config(steps: int = 3) -> PreferenceConfig:
    return PreferenceConfig.from_dict({"synthetic": {"steps": steps, "global_batch": 4, "lr": 1e-3,
                                                     "warmup_steps": 0, "log_every": 2},
                                       "eval_prompts": 4})


def _settings(steps: int = 3, trainer: FinetuneConfig = TRAINER) -> PreferenceSettings:
    """Stage "synthetic" of ``_config(steps)`` at RESOLUTION."""
    config = _config(steps)
    return PreferenceSettings(name="synthetic", loss=config.loss, recipe=config.synthetic,
                              timestep_shift=config.timestep_shift, eval_prompts=config.eval_prompts,
                              resolution=RESOLUTION, trainer=trainer)


def test_stage_publishes_a_loadable_checkpoint_with_the_implicit_curves(inputs: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    pairs, init = inputs
    out = run_preference_stage({"pairs": pairs, "init": init}, _settings(), root=tmp_path)
    assert out is not None
    manifest = read_manifest(out, kind="checkpoint")
    assert manifest.counts == {"steps": 3, "pairs": 4}
    assert {DIFFUSERS_WEIGHTS_FILE, DIFFUSERS_CONFIG_FILE, METRICS_FILE, "samples.png"} <= \
        {p.name for p in out.iterdir()}
    new_model(out, CPU, seed=PRETRAIN.seed)  # loadable like any checkpoint
    trained, start = load_file(out / DIFFUSERS_WEIGHTS_FILE), load_file(init / DIFFUSERS_WEIGHTS_FILE)
    assert any(not torch.equal(trained[k], start[k]) for k in start)

    curve = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [c["step"] for c in curve] == [1, 2, 3]
    for key in ("loss", "dpo_loss", "implicit_loglik.winner", "implicit_loglik.loser", "margin", "accuracy",
                "hinge.winner", "hinge.loser", "grad_norm", "lr"):
        assert all(np.isfinite(c[key]) for c in curve), key

    metrics = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(manifest.mlflow_run_id).data.metrics
    for key in ("implicit_loglik.winner", "margin", "eval.preferred_rate", "eval.wins", "eval.policy.score",
                "eval.reference.score"):
        assert key in metrics, key
    assert metrics["eval.preferred_rate.low"] <= metrics["eval.preferred_rate"] <= metrics["eval.preferred_rate.high"]
    assert metrics["eval.vs_reference.score"] == pytest.approx(metrics["eval.policy.score"]
                                                               - metrics["eval.reference.score"])
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(manifest.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == [2, 3]  # every log_every steps and the last


@pytest.mark.slow
def test_two_ranks_with_fsdp_follow_the_single_process_curve(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    pairs, init = inputs
    single = run_preference_stage({"pairs": pairs, "init": init}, _settings(), root=tmp_path / "one")
    two = dataclasses.replace(TRAINER, parallel=dataclasses.replace(TRAINER.parallel, nproc_per_node=2))
    out = launch_local(two.parallel, run_preference_stage, {"pairs": pairs, "init": init}, _settings(trainer=two), "",
                       tmp_path / "two")

    def curve(artifact: Path) -> list[dict]:
        return [json.loads(line) for line in (artifact / METRICS_FILE).read_text().splitlines()]

    for a, b in zip(curve(out), curve(single), strict=True):
        for key in ("loss", "implicit_loglik.winner", "implicit_loglik.loser", "accuracy", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-3), (a["step"], key)


def test_bad_input_fails_before_anything_is_written(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    pairs, init = inputs
    mixed = pd.concat([_pairs_frame(2), _pairs_frame(1, size=48).assign(pair_id="big")], ignore_index=True)
    with pytest.raises(ValueError, match=r"runs at 32x32 .* pair 'big' is 48x48"):
        run_preference_stage({"pairs": _publish_pairs(mixed, tmp_path / "in", "mixed"), "init": init}, _settings(),
                             root=tmp_path)
    with pytest.raises(ValueError, match="holds no pairs"):
        run_preference_stage({"pairs": _publish_pairs(_pairs_frame(1).iloc[:0], tmp_path / "in", "empty"),
                              "init": init}, _settings(), root=tmp_path)
    two_ranks = dataclasses.replace(TRAINER, parallel=dataclasses.replace(TRAINER.parallel, nproc_per_node=2))
    with pytest.raises(RuntimeError, match="launched with 1 processes but parallel.nnodes x nproc_per_node is 2"):
        run_preference_stage({"pairs": pairs, "init": init}, _settings(trainer=two_ranks), root=tmp_path)
    with pytest.raises(ValueError, match="must be one of"):  # an unknown stage has no settings
        preference_settings(preset("tiny"), "rlhf")
    with pytest.raises(ValueError, match="must be one of"):  # nor runs under hand-made ones
        run_preference_stage({"pairs": pairs, "init": init}, dataclasses.replace(_settings(), name="rlhf"),
                             root=tmp_path)
    with pytest.raises(ArtifactError, match="expected 'checkpoint'"):
        run_preference_stage({"pairs": pairs, "init": pairs}, _settings(), root=tmp_path)
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "work").exists()
    assert not (tmp_path / "mlflow.db").exists()
