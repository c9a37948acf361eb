"""Synthetic preference pairs: the table contract, on-policy share, margins, ties/identical skipped, determinism,
and decoding a batch for the trainer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from krea2_core.artifacts import read_manifest
from krea2_core.data.schemas import Skipped, read_table
from krea2_core.diffusion.text_to_image import TextToImage
from krea2_core.post.pairs import (PAIRS_FILE, SAMPLES_FILE, SKIPPED_FILE, decode_pair_images, plan_draws,
                                   read_pairs, run_pair_generation)

from ._checkpoints import (RESOLUTION, BrightnessOracle, ConstantOracle, HashOracle, pair_settings, preference_config,
                           publish_checkpoints)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outputs")  # one output root (and MLflow store) for the module: much faster


@pytest.fixture(scope="module")
def checkpoints(root: Path) -> dict[str, Path]:
    policy, previous = publish_checkpoints(root)
    return {"policy": policy, "previous": previous}


@pytest.fixture(scope="module")
def brightness_pairs(checkpoints: dict[str, Path], root: Path) -> Path:
    return run_pair_generation(checkpoints, pair_settings(), root=root, oracle=BrightnessOracle())


def test_most_prompts_pair_an_on_policy_sample() -> None:
    config = preference_config(n_prompts=23, off_policy_fraction=0.3)
    side_a, side_b = plan_draws(config.pairs, 23)
    on_policy = [a.sampler.checkpoint == "policy" or b.sampler.checkpoint == "policy"
                 for a, b in zip(side_a, side_b, strict=True)]
    assert sum(on_policy) == 23 - round(0.3 * 23)
    for i, (a, b, on) in enumerate(zip(side_a, side_b, on_policy, strict=True)):
        assert (a.prompt, b.prompt, a.side, b.side) == (i, i, "a", "b")
        if on:  # the policy's sample against the opponent in turn
            assert (a.sampler, b.sampler) == (config.pairs.policy, config.pairs.opponents[i % 3])
        else:  # two samples of the previous checkpoint
            assert a.sampler.checkpoint == b.sampler.checkpoint == "previous"
    assert plan_draws(config.pairs, 23) == (side_a, side_b)  # the off-policy prompts are seeded, not random


def test_pairs_table_winners_margins_and_skipped_ties(brightness_pairs: Path) -> None:
    config = preference_config()
    manifest = read_manifest(brightness_pairs, kind="preference_pairs")
    pairs = read_pairs(brightness_pairs)  # validates the PreferencePairs schema
    skipped = read_table(brightness_pairs / SKIPPED_FILE, Skipped)
    assert (brightness_pairs / SAMPLES_FILE).is_file()
    assert len(pairs) + len(skipped) == config.pairs.n_prompts
    assert manifest.counts == {"prompts": 10, "pairs": len(pairs), "on_policy": int(pairs["on_policy"].sum()),
                               **{f"skipped.{r}": n for r, n in skipped["reason"].value_counts().items()}}
    assert (pairs["origin"] == "synthetic").all() and (pairs[["width", "height"]] == RESOLUTION).all().all()
    assert ((pairs["winner_score"] - pairs["loser_score"]) >= config.pairs.min_margin).all()
    assert all(isinstance(json.loads(r), list) and json.loads(r) for r in pairs["rubric"])
    # the oracle prefers the bright "previous" checkpoint whenever it meets the policy
    mixed = pairs[pairs["winner_source"].str[:6] != pairs["loser_source"].str[:6]]
    assert len(mixed) >= 1 and (mixed["winner_source"] == "previous-s2-cfg4").all()
    assert (pairs["on_policy"] == (pairs["winner_source"].str.startswith("policy")
                                   | pairs["loser_source"].str.startswith("policy"))).all()
    # near-equal scores are ties, recorded with both scores
    assert (skipped["reason"] == "tie").sum() >= 1
    for detail in skipped["detail"].map(json.loads):
        assert abs(detail["score_a"] - detail["score_b"]) < config.pairs.min_margin


def test_same_config_gives_identical_bytes(checkpoints: dict[str, Path], brightness_pairs: Path, root: Path
                                           ) -> None:
    before = {name: (brightness_pairs / name).read_bytes() for name in (PAIRS_FILE, SKIPPED_FILE, SAMPLES_FILE)}
    again = run_pair_generation(checkpoints, pair_settings(), root=root,
                                oracle=BrightnessOracle())  # computed again and republished in place
    assert again == brightness_pairs
    assert {name: (again / name).read_bytes() for name in before} == before


def test_same_checkpoint_and_sampler_opponent_samples_other_noise(checkpoints: dict[str, Path], root: Path) -> None:
    config = preference_config(off_policy_fraction=0.0, min_margin=0.0, opponents=[{"steps": 2}])  # policy sampler
    # three chunks of prompts: their noise must differ too
    out = run_pair_generation(checkpoints, pair_settings(config, chunk=4), root=root, oracle=HashOracle())
    manifest = read_manifest(out)
    pairs = read_pairs(out)
    assert manifest.counts["pairs"] == 10 and "skipped.identical" not in manifest.counts
    assert list(pairs["pair_id"]) == [f"pair-{i:06d}" for i in range(10)]
    assert manifest.config["settings"]["chunk"] == 4 and manifest.config["oracle"] == HashOracle.name
    assert (pairs["winner_source"] == pairs["loser_source"]).all()
    assert (pairs["winner"] != pairs["loser"]).all()
    assert len(set(pairs["winner"]) | set(pairs["loser"])) == 20  # no image repeats across prompts either


def test_no_surviving_pair_is_a_clear_error(checkpoints: dict[str, Path], root: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    published = set((root / "artifacts").glob("preference_pairs/*"))
    with pytest.raises(ValueError, match=r"no usable preference pair.*'tie': 10"):
        run_pair_generation(checkpoints, pair_settings(), root=root, oracle=ConstantOracle())
    flat = Image.new("RGB", (RESOLUTION, RESOLUTION), "grey")
    monkeypatch.setattr(TextToImage, "generate", lambda self, prompts, **kw: [flat.copy() for _ in prompts])
    with pytest.raises(ValueError, match=r"no usable preference pair.*'identical': 10"):
        run_pair_generation(checkpoints, pair_settings(), root=root, oracle=HashOracle())
    assert set((root / "artifacts").glob("preference_pairs/*")) == published  # nothing published


def test_decode_pair_images_checks_sizes(brightness_pairs: Path) -> None:
    pairs = read_pairs(brightness_pairs)
    winners, losers = decode_pair_images(pairs)
    assert winners.shape == losers.shape == (len(pairs), 3, RESOLUTION, RESOLUTION)
    assert winners.dtype == torch.float32 and -1 <= float(winners.min()) and float(winners.max()) <= 1
    first = np.array(Image.open(io.BytesIO(pairs["winner"].iloc[0])))
    assert torch.equal(winners[0], torch.from_numpy(first).permute(2, 0, 1).float() / 127.5 - 1)

    wrong = pairs.copy()
    wrong.loc[wrong.index[-1], ["width", "height"]] = 16
    with pytest.raises(ValueError, match="one size"):
        decode_pair_images(wrong)
    lying = pairs.head(1).assign(width=16, height=16)
    with pytest.raises(ValueError, match=f"pair {pairs['pair_id'].iloc[0]}: winner image is 32x32.*16x16"):
        decode_pair_images(lying)
    small = pairs.head(1).copy()
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="PNG")
    small["loser"] = [buffer.getvalue()]
    with pytest.raises(ValueError, match="loser image is 16x16"):
        decode_pair_images(small)
