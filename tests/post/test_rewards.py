"""RL rewards on rendered world scenes (rubric, OCR text, structure), the transformers-model variants with tiny random
models, GDPO advantages by hand, and the Ray reward service end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from krea2_core.post.config import REWARD_NAMES, RewardsConfig
from krea2_core.post.reward_service import RewardService, RewardServiceError
from krea2_core.post.rewards import (ArtifactClassifierReward, StructureReward, build_reward, gdpo_advantages,
                                     text_similarity)
from krea2_core.world import BACKGROUNDS, Prompt, Requirement, Scene, Shape, prompt_for, render, sample_prompts
from krea2_core.world.render import shape_geometry


def world(n: int, resolution: int = 64, seed: int = 0, **kwargs: object) -> tuple[list[Prompt], list[Scene]]:
    pairs = sample_prompts(np.random.default_rng(seed), n, resolution, resolution, **kwargs)
    return [p for p, _ in pairs], [s for _, s in pairs]


def speckled(image: Image.Image, fraction: float, seed: int) -> Image.Image:
    """``fraction`` of the pixels set to random colours."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image).copy()
    hit = rng.random(pixels.shape[:2]) < fraction
    pixels[hit] = rng.integers(0, 256, (int(hit.sum()), 3))
    return Image.fromarray(pixels)


def torn(scene: Scene) -> Image.Image:
    """The scene with a background-coloured band cut through the middle of its first shape."""
    pixels = np.asarray(render(scene)).copy()
    cx, cy, d = shape_geometry(scene, scene.shapes[0])
    band = max(2, round(d / 4))
    rows = slice(round(cy) - band // 2, round(cy) - band // 2 + band)
    pixels[rows, max(0, round(cx - d / 2) - 1):round(cx + d / 2) + 1] = BACKGROUNDS[scene.background]
    return Image.fromarray(pixels)


def tiny_vit(directory: Path, labels: list[str]) -> Path:
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, id2label=dict(enumerate(labels)),
                       label2id={label: i for i, label in enumerate(labels)})
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def logits_of(directory: Path, images: list[Image.Image]) -> torch.Tensor:
    processor = ViTImageProcessorPil.from_pretrained(directory)
    model = ViTForImageClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(**processor(images=images, return_tensors="pt")).logits


# ----------------------------------------------------------------------------------------------------- rubric


def test_rubric_reward_is_the_fraction_of_requirements_met() -> None:
    prompts, scenes = world(8)
    reward = build_reward("rubric", RewardsConfig(), None)
    perfect = reward.score([render(s) for s in scenes], prompts)
    assert perfect.dtype == np.float64 and perfect.shape == (8,)
    np.testing.assert_array_equal(perfect, 1.0)
    recoloured = [dataclasses.replace(s, background=next(b for b in BACKGROUNDS if b != s.background)) for s in scenes]
    wrong = reward.score([render(s) for s in recoloured], prompts)
    np.testing.assert_allclose(wrong, [1 - 1 / len(p.rubric) for p in prompts])  # all but the background met
    with pytest.raises(ValueError, match="2 images for 8 prompts"):
        reward.score([render(s) for s in scenes[:2]], prompts)


# ------------------------------------------------------------------------------------------------------- text


def test_text_reward_reads_the_word_and_skips_prompts_without_text() -> None:
    scene = Scene(128, 128, "grey sand", (Shape("circle", "red", "medium", "top left"),), "HELLO", seed=3)
    no_text = dataclasses.replace(scene, text=None)
    prompts = [prompt_for(scene), prompt_for(dataclasses.replace(scene, text="MOON")), prompt_for(scene),
               prompt_for(no_text)]
    images = [render(scene), render(scene), render(no_text), render(scene)]
    scores = build_reward("text", RewardsConfig(), None).score(images, prompts)
    assert scores[0] == 1.0  # read exactly
    assert scores[1] < 0.3  # "HELLO" read where "MOON" was asked: one letter in common
    assert scores[2] == 0.0  # nothing to read
    assert np.isnan(scores[3])  # the prompt asks for no text


def test_text_reward_reads_upscaled_64px_words() -> None:
    prompts, scenes = world(4, text_prob=1.0, seed=1)
    assert build_reward("text", RewardsConfig(), None).score([render(s) for s in scenes], prompts).mean() >= 0.75


def test_text_similarity() -> None:
    assert text_similarity(" he llo", "HELLO") == 1.0
    assert text_similarity("HELO", "HELLO") == pytest.approx(2 * 4 / 9)
    assert text_similarity("", "HELLO") == 0.0


# --------------------------------------------------------------------------------------------------- artifact


def test_structure_reward_prefers_clean_scenes_to_speckled_or_torn_ones() -> None:
    prompts, scenes = world(8, seed=2)
    reward = build_reward("artifact", RewardsConfig(), None)
    assert isinstance(reward, StructureReward)
    clean = reward.score([render(s) for s in scenes], prompts)
    np.testing.assert_array_equal(clean, 1.0)
    specks = reward.score([speckled(render(s), 0.01, i) for i, s in enumerate(scenes)], prompts)
    tears = reward.score([torn(s) for s in scenes], prompts)
    assert (specks < clean).all() and (tears < clean).all()
    more_specks = reward.score([speckled(render(s), 0.04, i) for i, s in enumerate(scenes)], prompts)
    assert (more_specks < specks).all()
    blank = Image.new("RGB", (64, 64), BACKGROUNDS["grey sand"])
    assert reward.score([blank], prompts[:1])[0] == 1.0  # nothing drawn, nothing malformed


def test_artifact_classifier_reward(tmp_path: Path) -> None:
    model = tiny_vit(tmp_path / "classifier", ["clean", "artifact", "blurry"])
    prompts, scenes = world(3)
    images = [render(s) for s in scenes]
    reward = build_reward("artifact", RewardsConfig(artifact_model=str(model)), None)
    assert isinstance(reward, ArtifactClassifierReward) and reward.name == "artifact"
    expected = 1 - logits_of(model, images).softmax(-1)[:, 1].double().numpy()
    np.testing.assert_allclose(reward.score(images, prompts), expected, rtol=1e-5)
    with pytest.raises(ValueError, match=r"needs label 'broken'.*\['artifact', 'blurry', 'clean'\]"):
        build_reward("artifact", RewardsConfig(artifact_model=str(model), artifact_label="broken"), None)


def test_aesthetic_regression_model_reward(tmp_path: Path) -> None:
    model = tiny_vit(tmp_path / "aesthetic", ["score"])
    prompts, scenes = world(3)
    images = [render(s) for s in scenes]
    scores = build_reward("aesthetic", RewardsConfig(aesthetic_model=str(model)), None).score(images, prompts)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, logits_of(model, images)[:, 0].double().numpy(), rtol=1e-5)
    two = tiny_vit(tmp_path / "two_labels", ["bad", "good"])
    with pytest.raises(ValueError, match="one regression logit"):
        build_reward("aesthetic", RewardsConfig(aesthetic_model=str(two)), None)


def test_build_reward_errors(tmp_path: Path) -> None:
    assert {build_reward(name, RewardsConfig(), None).name for name in ("rubric", "text", "artifact")} == \
        set(REWARD_NAMES) - {"aesthetic"}
    with pytest.raises(ValueError, match=r"unknown reward 'beauty'.*'rubric'"):
        build_reward("beauty", RewardsConfig(), None)
    with pytest.raises(ValueError, match="aesthetic reward needs a model"):
        build_reward("aesthetic", RewardsConfig(), None)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_reward("artifact", RewardsConfig(artifact_model=str(tmp_path / "missing")), None)


# ------------------------------------------------------------------------------------------------------- GDPO


def test_gdpo_normalises_each_reward_within_its_group_then_the_batch() -> None:
    # group 1: (1, 0), group 2: (3, 3) -> per group (+1, -1) and (0, 0); the batch std is sqrt(1/2)
    out = gdpo_advantages({"rubric": np.array([1.0, 0.0, 3.0, 3.0])}, 2, {"rubric": 1.0})
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, np.array([1, -1, 0, 0]) * np.sqrt(2), atol=1e-5)
    # a reward on another scale (and offset) contributes exactly as much as the first
    x = np.array([0.2, 0.9, 0.4, 0.1, 0.5, 0.5, 0.8, 0.3])
    both = gdpo_advantages({"rubric": x, "aesthetic": 100 * x + 7}, 4, {"rubric": 1.0, "aesthetic": 1.0})
    np.testing.assert_allclose(both, gdpo_advantages({"rubric": x}, 4, {"rubric": 1.0}), atol=1e-6)
    assert both.mean() == pytest.approx(0, abs=1e-12) and both.std() == pytest.approx(1)


def test_gdpo_keeps_reward_combinations_apart_that_a_summed_reward_collapses() -> None:
    rubric, text = np.array([1.0, 0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0, 0.0])
    out = gdpo_advantages({"rubric": rubric, "text": text}, 2, {"rubric": 1.0, "text": 1.0})
    summed = rubric + text  # (1, 0) and (2, 0): both groups normalise to (+1, -1)
    np.testing.assert_allclose((summed - summed.reshape(2, 2).mean(1).repeat(2)) /
                               summed.reshape(2, 2).std(1).repeat(2), [1, -1, 1, -1])
    assert out[2] == pytest.approx(2 * out[0]) and out[3] == pytest.approx(2 * out[1])  # two criteria met: twice


def test_gdpo_nan_scores_and_zero_weights_contribute_nothing() -> None:
    rubric = np.array([1.0, 0.0, 0.0, 1.0])
    text = np.array([np.nan, np.nan, 1.0, np.nan])  # group 1 asks for no text; group 2's lone score has no spread
    assert np.isfinite(gdpo_advantages({"rubric": rubric, "text": text}, 2, {"rubric": 1, "text": 1})).all()
    np.testing.assert_allclose(gdpo_advantages({"rubric": rubric, "text": text}, 2, {"rubric": 1, "text": 1}),
                               gdpo_advantages({"rubric": rubric}, 2, {"rubric": 1}))
    partial = gdpo_advantages({"text": np.array([1.0, np.nan, 0.0, 0.5, 0.5, 1.0])}, 3, {"text": 1})
    assert partial[1] == pytest.approx(0, abs=1e-12)
    assert partial[0] > 0 > partial[2]  # normalised over the group's two scores
    ignored = {"rubric": rubric, "aesthetic": np.full(4, np.nan)}
    np.testing.assert_allclose(gdpo_advantages(ignored, 2, {"rubric": 1, "aesthetic": 0.0}),
                               gdpo_advantages({"rubric": rubric}, 2, {"rubric": 1, "aesthetic": 0.0}))
    np.testing.assert_array_equal(gdpo_advantages({"rubric": np.ones(4)}, 2, {"rubric": 1}), 0.0)  # no signal


def test_gdpo_bad_input() -> None:
    with pytest.raises(ValueError, match="5 samples do not split into groups of 2"):
        gdpo_advantages({"rubric": np.zeros(5)}, 2, {"rubric": 1})
    with pytest.raises(ValueError, match="same length"):
        gdpo_advantages({"rubric": np.zeros(4), "text": np.zeros(6)}, 2, {"rubric": 1, "text": 1})
    with pytest.raises(ValueError, match=r"without a weight: \['text'\]"):
        gdpo_advantages({"rubric": np.zeros(4), "text": np.zeros(4)}, 2, {"rubric": 1})
    with pytest.raises(ValueError, match=r"no scores: \['text'\]"):
        gdpo_advantages({"rubric": np.zeros(4)}, 2, {"rubric": 1, "text": 0.5})
    with pytest.raises(ValueError, match="no reward has a weight > 0"):
        gdpo_advantages({"rubric": np.zeros(4)}, 2, {"rubric": 0})


# ------------------------------------------------------------------------------------------------ Ray service


def test_reward_service_serves_each_reward_from_its_own_actor() -> None:
    assert not ray.is_initialized()
    prompts, scenes = world(6, text_prob=0.5, seed=4)
    images = [render(s) for s in scenes]
    config = RewardsConfig(weights={"rubric": 1.0, "text": 0.5, "artifact": 0.5, "aesthetic": 0.0})
    with RewardService(config, None) as service:  # starts a local Ray with 2 CPUs: 3 actors of 0.5
        scores = service.score(images, prompts)
        assert set(scores) == {"rubric", "text", "artifact"}
        for name, values in scores.items():  # the same as scoring in this process
            np.testing.assert_array_equal(values, build_reward(name, config, None).score(images, prompts))
        broken = Prompt("a count without n", (Requirement.make("count", shape="any"),))
        with pytest.raises(RewardServiceError, match=r"reward 'rubric' failed to score: KeyError: 'n'"):
            service.score(images[:1], [broken])
        assert service.score(images[:2], prompts[:2])["rubric"].shape == (2,)  # the service still works
        # a second service joins the running Ray (the last 0.5 CPU); its reward fails to start
        with pytest.raises(RewardServiceError, match="reward 'aesthetic' failed to start: ValueError: the aesthetic"):
            RewardService(RewardsConfig(weights={"aesthetic": 1.0}), None)
        assert ray.is_initialized()  # not the failed service's Ray to shut down
    assert not ray.is_initialized()  # the first service started Ray, so it shut it down
