"""Expander RL: the token-level objective on hand values, gates, per-sample diversity, hard-case mining, the round's
prompt draws, an update on the tiny LLM, the published stage end to end, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import save_file

from krea2_core.artifacts import ArtifactError, publish, read_manifest, to_plain
from krea2_core.common.strict import ConfigError
from krea2_core.curation.config import EmbedderConfig
from krea2_core.curation.embedders import make_embedder
from krea2_core.expander.config import ExpanderRLConfig, ExpansionConfig
from krea2_core.expander.evaluate import SETTINGS
from krea2_core.expander.format import Expansion
from krea2_core.expander.model import load_expander, sample_completions, token_logprobs
from krea2_core.expander.rl import (
    EVAL_FILE,
    INFO_FILE,
    METRICS_FILE,
    MINED_FILE,
    SAMPLES_FILE,
    ExpanderRewards,
    ExpanderRLSettings,
    _update,
    gate,
    gate_metrics,
    k3_kl,
    mining_verdicts,
    round_prompts,
    run_expander_rl,
    sample_diversity,
    token_loss,
)
from krea2_core.post.diversity import embedding_spread
from krea2_core.post.reward_model import HEAD_FILE as RM_HEAD
from krea2_core.post.reward_model import REWARD_INFO_FILE as RM_INFO
from krea2_core.post.reward_model import load_reward_model, preference_head
from krea2_core.post.rewards import gdpo_advantages
from krea2_core.world.captions import Prompt, Requirement
from krea2_core.world.render import render
from krea2_core.world.scene import sample_scene
from post._checkpoints import PRETRAIN, RESOLUTION, publish_checkpoints


EXPANSION = ExpansionConfig(max_new_tokens=16)


def rl_settings(config: ExpanderRLConfig) -> ExpanderRLSettings:
    return ExpanderRLSettings(rl=config, expansion=EXPANSION, resolution=RESOLUTION, trainer=PRETRAIN.run_config())


def rl_config(**overrides: object) -> ExpanderRLConfig:
    base = {"steps": 2, "prompts_per_step": 2, "group_size": 2, "n_prompts": 4, "n_candidates": 2, "image_steps": 2, "warmup_steps": 0, "eval_prompts": 2, "diversity_prompts": 1,
            "diversity_samples": 2, "device": "cpu", "embedder": {"device": "cpu"}}
    return ExpanderRLConfig.from_dict({**base, **overrides})


# --------------------------------------------------------------------------- the objective


def test_token_loss_clips_the_ratio_and_averages_over_completion_tokens_only() -> None:
    old = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, -3.0]])
    ratio = torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.1, 9.0]])  # row 1's last token is padding (masked out)
    log_prob = old + ratio.log()
    mask = torch.tensor([[False, True, True], [False, True, False]])
    loss, stats = token_loss(log_prob, old, old, torch.tensor([1.0, -2.0]), mask, clip_range=0.2, kl_beta=0.0)
    # min(r A, clip(r) A) per masked token: 1.2 (clipped above), 0.5 (below the range, A > 0: unclipped), -2.2
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.2) / 3, rel=1e-5)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"\(B, T\) log-probs and mask and \(B,\) advantages"):
        token_loss(log_prob, old, old, torch.ones(3), mask, clip_range=0.2, kl_beta=0.0)


def test_k3_kl_is_zero_at_the_reference_and_positive_away_from_it() -> None:
    log_prob = torch.tensor([[-1.0, -2.0, -0.3]])
    assert torch.equal(k3_kl(log_prob, log_prob), torch.zeros(1, 3))
    ref = log_prob + torch.tensor([[0.5, -0.5, 2.0]])
    d = ref - log_prob
    torch.testing.assert_close(k3_kl(log_prob, ref), d.exp() - d - 1)
    assert (k3_kl(log_prob, ref) > 0).all()
    # at the reference the KL term adds nothing to the loss and nothing to the gradient
    at_ref = log_prob.clone().requires_grad_()
    loss, stats = token_loss(at_ref, log_prob, log_prob, torch.zeros(1), torch.ones(1, 3, dtype=torch.bool),
                             clip_range=0.2, kl_beta=1.0)
    loss.backward()
    assert stats["kl"].item() == 0.0 and torch.equal(at_ref.grad, torch.zeros(1, 3))


def test_the_gradient_raises_tokens_with_positive_advantage_and_lowers_the_others() -> None:
    old = torch.full((2, 3), -1.0)
    log_prob = old.clone().requires_grad_()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss, _ = token_loss(log_prob, old, old, torch.tensor([2.0, -1.0]), mask, clip_range=0.2, kl_beta=0.1)
    loss.backward()
    grad = log_prob.grad
    # gradient descent moves log-probs against the gradient: up for A > 0, down for A < 0; padding untouched
    assert (grad[0, :2] < 0).all() and (grad[1] > 0).all() and grad[0, 2] == 0
    torch.testing.assert_close(grad[0, :2], torch.full((2,), -2.0 / 5))  # -A / tokens (ratio 1, no clipping)


# --------------------------------------------------------------------------- rewards, gates and mining


def test_a_gated_sample_scores_zero_on_every_reward_and_is_its_groups_worst() -> None:
    scores = {"image": np.array([0.9, 0.2, 0.6, 0.4]), "faithfulness": np.array([1.0, 0.5, np.nan, np.nan]),
              "diversity": np.array([0.3, 0.1, 0.2, 0.25])}
    failed = np.array([True, False, False, True])
    gated = gate(scores, failed)
    for name, values in gated.items():
        assert values[0] == 0.0 and values[3] == 0.0, name
        np.testing.assert_array_equal(values[[1, 2]], scores[name][[1, 2]])
    advantages = gdpo_advantages(gated, 2, {"image": 1.0, "faithfulness": 1.0, "diversity": 0.5})
    assert advantages[0] < advantages[1] and advantages[3] < advantages[2]
    assert gate_metrics([["malformed"], [], [], ["malformed", "too_long"]]) == {
        "gate.pass_rate": 0.5, "gate.malformed": 2.0, "gate.too_long": 1.0}


def test_per_sample_diversity_averages_to_the_groups_embedding_spread() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3, 4, 5))
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    per_sample = sample_diversity(vectors)
    assert per_sample.shape == (3, 4)
    np.testing.assert_allclose(per_sample.mean(axis=1), embedding_spread(vectors), rtol=1e-12)
    np.testing.assert_allclose(per_sample[0, 0], np.mean([1 - vectors[0, 0] @ vectors[0, j] for j in (1, 2, 3)]))
    same = np.repeat(vectors[:, :1], 3, axis=1)  # a group of identical images has no diversity
    np.testing.assert_allclose(sample_diversity(same), 0.0, atol=1e-12)


def test_rewards_score_the_user_rubric_group_diversity_and_a_squashed_aesthetic(tmp_path: Path) -> None:
    embedder_config = EmbedderConfig(device="cpu")
    dim = make_embedder(embedder_config).dim
    staging = tmp_path / "staging"
    staging.mkdir()
    torch.manual_seed(0)
    save_file(preference_head(dim, 8).state_dict(), staging / RM_HEAD)
    (staging / RM_INFO).write_text(json.dumps({"embedder": to_plain(embedder_config), "dim": dim, "hidden": 8}))
    publish(staging, tmp_path / "rm", kind="reward_model")
    config = rl_config(weights={"image": 1.0, "aesthetic": 1.0}, embedder=to_plain(embedder_config))
    prompts = [Prompt("a red circle", (Requirement.make("count", shape="circle", n=1),))] * 2 + [Prompt("hi", ())] * 2
    scene = sample_scene(np.random.default_rng(0), 64, 64)
    images = [render(scene), render(scene), Image.new("RGB", (64, 64), "white"), render(scene)]
    expansions = [Expansion(p.text, "", p.text, True) for p in prompts]
    scores = ExpanderRewards(config, tmp_path / "rm")(prompts, expansions, images)
    assert set(scores) == {"image", "faithfulness", "diversity", "aesthetic"}
    np.testing.assert_array_equal(scores["faithfulness"][:2], [1.0, 1.0])
    assert np.isnan(scores["faithfulness"][2:]).all() and (scores["image"][2:] == 1.0).all()  # nothing asked
    np.testing.assert_allclose(scores["diversity"][:2], 0.0, atol=1e-6)  # two identical images
    assert scores["diversity"][2] == scores["diversity"][3] > 0.01
    raw = load_reward_model(tmp_path / "rm").score(images)
    np.testing.assert_allclose(scores["aesthetic"], 1 / (1 + np.exp(-raw)))


def test_mining_keeps_exactly_the_hard_but_not_hopeless_groups() -> None:
    config = rl_config(hopeless=0.1, too_easy=0.9, min_std=0.05)
    rewards = np.array([[0.0, 0.2], [0.1, 0.1], [0.9, 0.9], [1.0, 0.85], [0.5, 0.52], [0.2, 0.8], [0.15, 0.35]])
    assert mining_verdicts(rewards, config) == ["hopeless", "hopeless", "too_easy", "too_easy", "no_signal", "kept",
                                                "kept"]


def _prompts(texts: list[str]) -> list[Prompt]:
    return [Prompt(t, ()) for t in texts]


def test_round_draws_are_seeded_distinct_and_fall_back_to_realistic_prompts() -> None:
    realistic = _prompts([f"real {i}" for i in range(6)] + ["shared"])
    hard = _prompts(["hard 0", "hard 1", "shared"])
    config = rl_config(prompts_per_step=4, hard_fraction=0.5)
    drawn = {}
    for step in range(6):
        prompts, counts = round_prompts(realistic, hard, config, step)
        assert prompts == round_prompts(realistic, hard, config, step)[0]
        texts = [p.text for p in prompts]
        assert len(set(texts)) == 4 and all(p in hard for p in prompts[:2]) and all(p in realistic for p in prompts[2:])
        assert counts == {"prompts.hard": 2.0, "prompts.realistic": 2.0, "prompts.hard_missing": 0.0}
        drawn[step] = texts
    assert len({tuple(t) for t in drawn.values()}) > 1
    prompts, counts = round_prompts(realistic, [], config, 0)
    assert all(p in realistic for p in prompts) and len({p.text for p in prompts}) == 4
    assert counts == {"prompts.hard": 0.0, "prompts.realistic": 4.0, "prompts.hard_missing": 2.0}
    with pytest.raises(ValueError, match="4 realistic prompts needed, only 3"):
        round_prompts(realistic[:3], [], config, 0)


# --------------------------------------------------------------------------- the update


def test_an_update_moves_the_sampled_answers_the_way_their_advantages_point(tiny_llm: Path) -> None:
    tokenizer, policy = load_expander(str(tiny_llm), "cpu")
    _, reference = load_expander(str(tiny_llm), "cpu")
    policy.eval()
    reference.eval().requires_grad_(False)
    batch = sample_completions(tokenizer, policy, ["a red circle"], n=2, temperature=1.0, top_p=1.0,
                               max_new_tokens=6, seed=3)

    def answer_logprob() -> torch.Tensor:
        with torch.no_grad():
            return (token_logprobs(policy, batch.input_ids, batch.attention_mask) * batch.completion_mask).sum(1)

    before = answer_logprob()
    config = rl_config(lr=1e-2, updates_per_step=2, kl_beta=0.01)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    first = _update(policy, reference, batch, torch.tensor([1.0, -1.0]), optimizer,
                    rl_config(lr=1e-2, updates_per_step=1, kl_beta=0.01))
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6) and first["kl"] == pytest.approx(0.0, abs=1e-9)
    stats = _update(policy, reference, batch, torch.tensor([1.0, -1.0]), optimizer, config)
    after = answer_logprob()
    assert after[0] > before[0] and after[1] < before[1]
    assert stats["kl"] > 0 and np.isfinite(stats["grad_norm"])


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def inputs(tiny_llm: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(an output root with an MLflow store, an SFT expander artifact holding the tiny LLM, a tiny image checkpoint
    artifact)."""
    root = tmp_path_factory.mktemp("expander_rl")
    staging = root / "staging"
    shutil.copytree(tiny_llm, staging)
    (staging / INFO_FILE).write_text(json.dumps({"format": "think-then-expand", "base_model": "tiny-qwen3"}))
    publish(staging, root / "sft", kind="expander")
    return root, root / "sft", publish_checkpoints(root)[0]


def test_stage_publishes_a_loadable_expander_with_curves_mined_cases_and_evaluation(
        inputs: tuple[Path, Path, Path]) -> None:
    root, sft, image_model = inputs  # the inputs' root: its MLflow store exists already (creating one takes ~7 s)
    out = run_expander_rl({"sft": sft, "image_model": image_model}, rl_settings(rl_config(hard_fraction=0.5)),
                          root=root)
    manifest = read_manifest(out, kind="expander")
    assert manifest.counts == {"steps": 2, "prompts": 4, "candidates": 2, "hard_cases": manifest.counts["hard_cases"],
                               "samples": 8}
    assert set(manifest.inputs) == {"sft", "image_model"}
    assert {INFO_FILE, METRICS_FILE, MINED_FILE, EVAL_FILE, SAMPLES_FILE, "config.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()}
    load_expander(str(out), "cpu")
    assert json.loads((out / INFO_FILE).read_text()) == {
        "format": "think-then-expand", "base_model": "tiny-qwen3", "image_model": read_manifest(image_model).digest}

    curve = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [c["step"] for c in curve] == [1, 2]
    for c in curve:
        for key in ("reward.image", "reward.diversity", "reward.total", "gate.pass_rate", "advantage_std", "loss",
                    "kl", "clip_fraction", "grad_norm", "lr", "completion_tokens", "prompts.hard",
                    "prompts.realistic", "prompts.hard_missing"):
            assert np.isfinite(c[key]), key
        assert c["prompts.hard"] + c["prompts.hard_missing"] == 1 and c["prompts.realistic"] == 2 - c["prompts.hard"]
        assert c["completion_tokens"] >= 1
        # a random LLM never closes its thinking trace: every sample is gated as malformed
        assert c["gate.pass_rate"] == 0.0 and c["gate.malformed"] == 4
    mined = pd.read_parquet(out / MINED_FILE)
    assert list(mined.columns) == ["prompt", "rubric", "mean", "std", "kept", "reason"] and len(mined) == 2
    assert mined["kept"].sum() == manifest.counts["hard_cases"]
    assert set(mined["reason"]) <= {"kept", "hopeless", "too_easy", "no_signal"}

    report = json.loads((out / EVAL_FILE).read_text())
    assert set(report) == {*SETTINGS, "examples"} and len(report["examples"]) == 2
    assert {"score", "pass_rate", "diversity"} <= set(report["raw"])
    for name in ("sft", "rl"):
        assert {"score", "pass_rate", "faithfulness", "gate_pass", "diversity"} == set(report[name])
        assert 0 <= report[name]["score"] <= 1 and report[name]["diversity"] >= 0
    metrics = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(manifest.mlflow_run_id).data.metrics
    for key in ("eval.raw.score", "eval.sft.score", "eval.rl.score", "eval.rl.gate_pass", "eval.sft.diversity",
                "reward.image", "gate.pass_rate"):
        assert key in metrics, key


def test_bad_inputs_fail_before_any_work(inputs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, sft, image_model = inputs
    with pytest.raises(ArtifactError, match="expected 'expander'"):
        run_expander_rl({"sft": image_model, "image_model": image_model}, rl_settings(rl_config()), root=tmp_path)
    with pytest.raises(ArtifactError, match="expected 'checkpoint'"):
        run_expander_rl({"sft": sft, "image_model": sft}, rl_settings(rl_config()), root=tmp_path)
    with pytest.raises(ArtifactError, match="expected 'reward_model'"):
        run_expander_rl({"sft": sft, "image_model": image_model, "reward_model": image_model}, rl_settings(rl_config()),
                        root=tmp_path)
    aesthetic = rl_config(weights={"image": 1.0, "aesthetic": 0.5})
    with pytest.raises(ValueError, match="aesthetic reward .* needs the reward_model stage's artifact"):
        run_expander_rl({"sft": sft, "image_model": image_model}, rl_settings(aesthetic), root=tmp_path)
    with pytest.raises(ConfigError, match=r"n_prompts \(1\) must be >= prompts_per_step \(2\)"):
        rl_config(n_prompts=1)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
