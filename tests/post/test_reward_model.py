"""The aesthetic reward model: Bradley-Terry head on frozen embeddings, trained on preference-pair artifacts where the
winner is always the brighter image; its artifact, its loader (the "aesthetic" reward) and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from krea2_core.artifacts import ArtifactError, read_manifest
from krea2_core.data.schemas import PreferencePairs, write_table
from krea2_core.post.config import RewardModelConfig, RewardsConfig
from krea2_core.post.pairs import PAIR_COLUMNS, PAIRS_FILE, png_bytes, rubric_json
from krea2_core.post.reward_model import HEAD_FILE, METRICS_FILE, REWARD_INFO_FILE, load_reward_model, run_reward_model
from krea2_core.post.rewards import build_reward
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import run_metrics
from krea2_core.world import render, sample_prompts

CONFIG = RewardModelConfig(steps=150, val_fraction=0.25)


def shaded(image: Image.Image, factor: float) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(image, np.float32) * factor, 0, 255).astype(np.uint8))


def bright_and_dark(n: int, seed: int) -> tuple[list, list[Image.Image], list[Image.Image]]:
    """n world prompts, each with a bright and a dark rendering of its scene."""
    rng = np.random.default_rng(seed)
    pairs = sample_prompts(rng, n, 64, 64)
    bright = [shaded(render(s), f) for (_, s), f in zip(pairs, rng.uniform(0.8, 1.0, n), strict=True)]
    dark = [shaded(render(s), f) for (_, s), f in zip(pairs, rng.uniform(0.3, 0.6, n), strict=True)]
    return [p for p, _ in pairs], bright, dark


def publish_pairs(root: Path, name: str, n: int, seed: int, origin: str) -> Path:
    prompts, bright, dark = bright_and_dark(n, seed)
    rows = [{"pair_id": f"{name}-{i}", "prompt": p.text, "rubric": rubric_json(p), "width": 64, "height": 64,
             "winner": png_bytes(w), "loser": png_bytes(lo), "winner_source": "bright", "loser_source": "dark",
             "on_policy": False, "winner_score": None, "loser_score": None, "origin": origin}
            for i, (p, w, lo) in enumerate(zip(prompts, bright, dark, strict=True))]

    def body(inputs: dict[str, Path], staging: Path, run: object) -> StageOutput:
        write_table(pd.DataFrame(rows, columns=PAIR_COLUMNS), staging / PAIRS_FILE, PreferencePairs)
        return StageOutput(counts={"pairs": n})

    return execute_stage(f"test_pairs_{name}", "preference_pairs", body, config={"name": name, "n": n},
                         root=root)[0]


# Per test, in the test's own isolated output root (conftest): a module-wide root would write its MLflow runs before
# the per-test isolation is in place, wherever the tracking state of the previous test in the process pointed.
@pytest.fixture
def root(isolated_outputs: Path) -> Path:
    return isolated_outputs


@pytest.fixture
def pairs(root: Path) -> dict[str, Path]:
    return {"pairs.0": publish_pairs(root, "synthetic", 32, 0, "synthetic"),
            "pairs.1": publish_pairs(root, "human", 12, 1, "human")}


@pytest.fixture
def trained(pairs: dict[str, Path], root: Path) -> Path:
    return run_reward_model(pairs, CONFIG, root=root)


def test_reward_model_learns_the_preference_of_both_tables(trained: Path, pairs: dict[str, Path], root: Path) -> None:
    manifest = read_manifest(trained, kind="reward_model")
    assert manifest.counts == {"pairs": 44, "train_pairs": 33, "val_pairs": 11, "images": 88}
    assert set(manifest.inputs) == {"pairs.0", "pairs.1"}
    assert (trained / HEAD_FILE).is_file()
    info = json.loads((trained / REWARD_INFO_FILE).read_text())
    assert (info["embedder"]["kind"], info["dim"], info["hidden"]) == ("efficientnet_lite0", 1280, CONFIG.hidden)
    metrics = info["metrics"]
    assert metrics["train.accuracy"] == 1.0 and metrics["val.accuracy"] > 0.8
    assert 0.5 < metrics["val.accuracy.low"] <= metrics["val.accuracy"] <= metrics["val.accuracy.high"] <= 1.0
    assert metrics["val.loss"] < np.log(2)  # better than chance (a constant head scores log 2)
    curve = [json.loads(line) for line in (trained / METRICS_FILE).read_text().splitlines()]
    assert [row["step"] for row in curve] == list(range(1, CONFIG.steps + 1))
    assert curve[-1]["train.loss"] < curve[0]["train.loss"]
    logged = run_metrics(root, manifest.mlflow_run_id)
    assert logged["val.accuracy"] == pytest.approx(metrics["val.accuracy"]) and logged["count.val_pairs"] == 11


def test_loaded_reward_model_scores_unseen_brighter_images_higher(trained: Path) -> None:
    prompts, bright, dark = bright_and_dark(8, seed=9)
    model = load_reward_model(trained)
    wins = model.score(bright) > model.score(dark)
    assert wins.mean() >= 0.8
    reward = build_reward("aesthetic", RewardsConfig(), trained)  # the RL stage's aesthetic reward
    np.testing.assert_allclose(reward.score(bright, prompts), model.score(bright))
    assert model.score([]).shape == (0,)


def test_bad_input_is_a_clear_error_and_publishes_nothing(pairs: dict[str, Path], root: Path, tmp_path: Path
                                                          ) -> None:
    published = set((root / "artifacts").glob("reward_model/*"))
    with pytest.raises(ValueError, match="at least one preference_pairs artifact"):
        run_reward_model({}, CONFIG, root=root)
    checkpoint = execute_stage("test_checkpoint", "checkpoint", lambda i, s, r: StageOutput(counts={}),
                               config={}, root=root)[0]
    with pytest.raises(ArtifactError, match="holds a 'checkpoint' artifact, expected 'preference_pairs'"):
        run_reward_model({"pairs.0": pairs["pairs.0"], "pairs.1": checkpoint}, CONFIG, root=root)
    with pytest.raises(ArtifactError, match="expected 'reward_model'"):
        load_reward_model(pairs["pairs.0"])
    empty = publish_pairs(root, "empty", 0, 2, "synthetic")
    with pytest.raises(ValueError, match="no preference pairs in"):
        run_reward_model({"pairs.0": empty}, CONFIG, root=root)
    assert set((root / "artifacts").glob("reward_model/*")) == published
