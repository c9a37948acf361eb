"""Prompt-following evaluation: true scenes score 1, noise does not, prompts are fixed per seed, bad input errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from krea2_core.config import EvalConfig
from krea2_core.training.world_eval import evaluate, held_out_prompts, image_grid, reference_score, score_images


def test_true_scenes_score_one_and_noise_fails_every_rubric() -> None:
    config = EvalConfig(n_prompts=6)
    assert reference_score(config, 64).score == 1.0  # the checker's ceiling at the eval resolution
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(6)]
    result, images = evaluate(lambda texts: noise[:len(texts)], held_out_prompts(config, 64))
    assert result.pass_rate == 0.0 and result.score < 0.5 and images == noise
    assert set(result.per_kind) <= {"count", "color", "position", "size", "background", "text"}
    assert set(result.metrics("eval")) >= {"eval.score", "eval.pass_rate", "eval.background"}


def test_held_out_prompts_are_fixed_by_the_seed() -> None:
    texts = [p.text for p in held_out_prompts(EvalConfig(n_prompts=4), 32)]
    assert texts == [p.text for p in held_out_prompts(EvalConfig(n_prompts=4), 32)]
    assert texts != [p.text for p in held_out_prompts(EvalConfig(n_prompts=4, seed=1), 32)]


def test_bad_input_errors() -> None:
    prompts = held_out_prompts(EvalConfig(n_prompts=2), 32)
    with pytest.raises(ValueError, match="1 images for 2 prompts"):
        score_images([Image.new("RGB", (32, 32))], prompts)
    with pytest.raises(ValueError, match="at least one image"):
        image_grid([])
    assert image_grid([Image.new("RGB", (8, 8))] * 5, columns=4).size == (32, 16)
