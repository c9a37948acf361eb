"""Prompt-following evaluation: true scenes score 1 and noise near 0, with CIs; kinds the checker cannot judge at a
resolution are left out; prompts are fixed per seed and held out from every training scene; paired comparisons."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from krea2_core.evaluation.prompt_following import (
    PromptFollowing,
    RELIABLE,
    checker_reliability,
    evaluate,
    held_out_prompts,
    image_grid,
    reference_score,
    report_kind,
    score_images,
)
from krea2_core.training.config import EvalConfig
from krea2_core.world.captions import Requirement, sample_prompts
from krea2_core.world.config import WorldPoolConfig
from krea2_core.world.pool import POOL_SCENES_FILE, build_world_pool
from krea2_core.world.scene import Scene, sample_scene
from krea2_core.world.split import content_key, split_of


def _noise(n: int, side: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def test_true_scenes_score_one_and_noise_gets_no_credit() -> None:
    config = EvalConfig(n_prompts=24)
    reference = reference_score(config, 64)
    assert reference.score == 1.0 and reference.pass_rate == 1.0 and reference.unjudged == ()
    result, images = evaluate(lambda texts: _noise(len(texts), 64), held_out_prompts(config, 64))
    assert len(images) == 24 and result.pass_rate == 0.0 and result.score < 0.15
    # many random blobs must not meet "the red circle sits top left" by chance
    assert result.per_kind["position"] < 0.1 and result.per_kind["size"] < 0.1
    estimates = result.estimates()
    assert set(estimates) == {"score", "pass_rate", *result.kinds}
    assert all(e.low <= e.value <= e.high for e in estimates.values())
    metrics = result.metrics("eval")
    assert {"eval.score", "eval.score.low", "eval.score.high", "eval.kind", "eval.count"} <= set(metrics)


def test_kinds_the_checker_cannot_judge_at_a_resolution_are_left_out() -> None:
    assert checker_reliability(32)["text"] < 0.5 <= checker_reliability(64)["text"]
    # the judged kinds are those the checker gets right on >= RELIABLE of true renders of the 96 held-out scenes
    small = reference_score(EvalConfig(n_prompts=96), 32)
    assert small.unjudged == ("text",) and "text" not in small.per_kind
    assert min(small.per_kind.values()) >= RELIABLE
    assert "text" in reference_score(EvalConfig(n_prompts=16), 64).per_kind


def test_report_kinds_split_counts_by_shape() -> None:
    assert report_kind(Requirement.make("count", shape="any", n=2)) == "count"
    assert report_kind(Requirement.make("count", shape="circle", n=1)) == "kind"
    assert report_kind(Requirement.make("color", shape="circle", color="red", n=1)) == "color"


def test_held_out_prompts_are_fixed_by_the_seed_and_never_describe_a_training_scene(tmp_path) -> None:
    texts = [p.text for p in held_out_prompts(EvalConfig(n_prompts=8), 32)]
    assert texts == [p.text for p in held_out_prompts(EvalConfig(n_prompts=8), 64)]  # resolution-independent
    assert texts != [p.text for p in held_out_prompts(EvalConfig(n_prompts=8, seed=1), 32)]
    held = {content_key(s) for _, s in sample_prompts(np.random.default_rng(10_000), 96, 64, 64, split="held_out")}
    # every training source draws the train split; a large sample of training draws never meets a held-out scene
    rng = np.random.default_rng(0)
    training = {content_key(sample_scene(rng, 64, 64)) for _ in range(20_000)}
    assert not held & training
    # the pool the tiny pipeline curates, colour variants included
    build_world_pool(WorldPoolConfig(n_scenes=120, n_exact_duplicates=5, n_near_duplicates=5, n_color_variants=20,
                                     n_per_defect=0, max_real_images=0), tmp_path)
    pool = [Scene.from_dict(json.loads(s)) for s in pd.read_parquet(tmp_path / POOL_SCENES_FILE)["scene"]]
    assert all(split_of(scene) == "train" for scene in pool)
    assert all(split_of(s) == "held_out" for _, s in sample_prompts(np.random.default_rng(3), 50, 32, 32,
                                                                     split="held_out"))


def test_paired_comparison_on_the_same_prompts() -> None:
    config = EvalConfig(n_prompts=24)
    prompts = held_out_prompts(config, 64)
    before = score_images(_noise(24, 64), prompts)
    after = reference_score(config, 64)
    diffs = before.compare(after)
    assert diffs["score"].low > 0.5 and diffs["kind"].value > 0
    lines = before.change_lines(after)
    assert lines[0].startswith("score: ") and "95% CI" in lines[0]
    # a 32 px evaluation (text not judged) pairs with a 64 px one on the kinds both judge
    small = reference_score(config, 32)
    assert "text" not in small.compare(after)
    assert small.compare(after)["score"].value == pytest.approx(0, abs=1 - RELIABLE)  # the 32 px checker's misses
    with pytest.raises(ValueError, match="same prompts"):
        before.compare(score_images(_noise(8, 64), prompts[:8]))


def test_outcomes_round_trip_through_json() -> None:
    result = score_images(_noise(6, 64), held_out_prompts(EvalConfig(n_prompts=6), 64))
    again = PromptFollowing.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.metrics("x") == result.metrics("x")


def test_bad_input_errors() -> None:
    prompts = held_out_prompts(EvalConfig(n_prompts=2), 32)
    with pytest.raises(ValueError, match="1 images for 2 prompts"):
        score_images([Image.new("RGB", (32, 32))], prompts)
    with pytest.raises(ValueError, match="one size"):
        score_images([Image.new("RGB", (32, 32)), Image.new("RGB", (64, 64))], prompts)
    with pytest.raises(ValueError, match="at least one image"):
        image_grid([])
    assert image_grid([Image.new("RGB", (8, 8))] * 5, columns=4).size == (32, 16)
    with pytest.raises(ValueError, match="split"):
        sample_scene(np.random.default_rng(0), 32, 32, split="test")  # type: ignore[arg-type]


def test_the_split_replaces_only_the_other_splits_scenes() -> None:
    rng_all, rng_train = np.random.default_rng(5), np.random.default_rng(5)
    drawn = [(sample_scene(rng_all, 64, 64, split=None), sample_scene(rng_train, 64, 64)) for _ in range(200)]
    # a train draw is kept as it was; a held-out one is replaced by a train scene; the stream stays in step
    assert all(train == first for first, train in drawn if split_of(first) == "train")
    replaced = [(first, train) for first, train in drawn if split_of(first) == "held_out"]
    assert replaced and all(split_of(train) == "train" and train != first for first, train in replaced)
    with pytest.raises(ValueError, match="split must be"):
        sample_scene(rng_all, 64, 64, split="test")  # type: ignore[arg-type]


def test_the_tiny_text_encoder_reads_every_held_out_prompt_and_world_caption_whole() -> None:
    # A prompt cut at max_tokens would be judged on clauses (a word, the last shape's place) the model never read.
    from krea2_core.presets import preset
    from krea2_core.models.text_encoders import MiniLMTextEncoder
    from krea2_core.world.captions import captions

    config = preset("tiny").pretrain
    tokenizer = MiniLMTextEncoder(config.text_encoder.layers, config.text_encoder.max_tokens).tokenizer
    rng = np.random.default_rng(0)
    longest = [captions(sample_scene(rng, 64, 64, max_shapes=3, text_prob=1.0))["long"] for _ in range(2000)]
    texts = [p.text for p in held_out_prompts(config.eval, 64)] + longest
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    assert max(lengths) <= config.text_encoder.max_tokens, max(lengths)
