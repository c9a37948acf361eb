"""The RL prompt pool: seeded prompts, weighted deterministic draws, down-weighting and dropping of saturated,
hopeless and variance-free prompts, the min_active floor, exact resume from state, the table and bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from krea2_core.post.config import PromptPoolConfig
from krea2_core.post.prompt_pool import PromptPool, rl_prompts
from krea2_core.world.captions import Prompt

RESOLUTION = 64
INFORMATIVE = [0.2, 0.8, 0.5, 0.4]
UNINFORMATIVE = {"too_easy": [1.0, 1.0, 0.9, 1.0], "hopeless": [0.0, 0.1, 0.0, 0.05],
                 "no_variance": [0.5, 0.5, 0.5, 0.5]}


def config(**overrides: object) -> PromptPoolConfig:
    return PromptPoolConfig(**{"n_prompts": 10, "min_active": 2, "drop_after": 3, "downweight": 0.3,
                               **overrides})


def pool(**overrides: object) -> PromptPool:
    c = config(**overrides)
    return PromptPool(rl_prompts(c, RESOLUTION), c)


def snapshot(p: PromptPool) -> str:
    return json.dumps(p.state_dict(), allow_nan=False)


def test_rl_prompts_are_seeded_world_prompts() -> None:
    c = config()
    prompts = rl_prompts(c, RESOLUTION)
    assert len(prompts) == c.n_prompts and all(isinstance(p, Prompt) and p.rubric for p in prompts)
    assert prompts == rl_prompts(c, RESOLUTION)
    assert [p.text for p in prompts] != [p.text for p in rl_prompts(config(seed=c.seed + 1), RESOLUTION)]


def test_draw_is_deterministic_distinct_and_changes_nothing() -> None:
    p = pool()
    before = snapshot(p)
    drawn = p.draw(4, step=3)
    assert drawn.shape == (4,) and len(set(drawn.tolist())) == 4 and all(0 <= i < len(p) for i in drawn)
    np.testing.assert_array_equal(drawn, p.draw(4, step=3))
    assert snapshot(p) == before
    assert len({tuple(p.draw(4, step=s)) for s in range(10)}) > 1  # rounds see different prompts


def test_down_weighted_prompt_is_drawn_less() -> None:
    p = pool()
    p.update([0], np.array([UNINFORMATIVE["too_easy"]]))
    assert p.weights[0] == pytest.approx(0.3) and (p.weights[1:] == 1.0).all()
    counts = np.bincount(np.concatenate([p.draw(1, step=s) for s in range(3000)]), minlength=len(p))
    expected = 3000 * p.weights / p.weights.sum()  # 0.3 / 9.3 of the draws, about 97
    assert counts[0] < 0.5 * counts[1:].min()
    np.testing.assert_allclose(counts, expected, rtol=0.3)


@pytest.mark.parametrize("reason", sorted(UNINFORMATIVE))
def test_uninformative_groups_down_weight_then_drop(reason: str) -> None:
    p = pool()
    for k in range(1, 4):
        assert p.table().loc[0, "status"] == "active"
        p.update([0, 1], np.array([UNINFORMATIVE[reason], INFORMATIVE]))
        assert p.weights[0] == pytest.approx(0.3 ** k if k < 3 else 0.0)
        assert p.weights[1] == 1.0
    row = p.table().loc[0]
    assert (row["status"], row["reason"], row["draws"]) == ("dropped", reason, 3)
    metrics = p.metrics()
    assert metrics[f"pool.dropped.{reason}"] == 1.0 and metrics["pool.active"] == 9.0
    assert sum(v for k, v in metrics.items() if k.startswith("pool.dropped.")) == 1.0
    assert 0 not in np.concatenate([p.draw(9, step=s) for s in range(20)])


def test_saturated_and_hopeless_take_priority_over_no_variance() -> None:
    p = pool()
    p.update([0, 1, 2], np.array([[1.0] * 4, [0.0] * 4, [0.5] * 4]))
    assert p.reason[:3] == ["too_easy", "hopeless", "no_variance"]
    assert p.metrics()["pool.informative_fraction"] == 0.0


def test_informative_group_restores_weight_and_resets_the_streak() -> None:
    p = pool()
    for _ in range(2):
        p.update([0], np.array([UNINFORMATIVE["hopeless"]]))
    p.update([0], np.array([INFORMATIVE]))
    assert p.weights[0] == 1.0 and p.table().loc[0, "reason"] == ""
    for _ in range(2):  # the streak starts over: two more are not enough to drop
        p.update([0], np.array([UNINFORMATIVE["hopeless"]]))
    assert p.table().loc[0, "status"] == "active"


def test_min_active_keeps_the_candidates_that_varied_most() -> None:
    p = pool(n_prompts=4, min_active=2)
    saturated = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.7], [1.0, 1.0, 0.9, 0.9], [1.0, 1.0, 1.0, 0.8]])
    for _ in range(3):
        p.update([0, 1, 2, 3], saturated)
    assert p.table()["status"].tolist() == ["dropped", "active", "dropped", "active"]
    with pytest.raises(ValueError, match="only 2 are active"):
        p.draw(3, step=0)
    for _ in range(5):  # still uninformative: kept, with the floor weight, and drawable
        p.update([1, 3], saturated[[1, 3]])
    assert p.metrics()["pool.active"] == 2.0
    np.testing.assert_allclose(p.weights[[1, 3]], 0.3 ** 3)
    assert sorted(p.draw(2, step=7).tolist()) == [1, 3]


def test_metrics() -> None:
    p = pool()
    assert p.metrics() == {"pool.active": 10.0, "pool.drawn": 0.0, "pool.weight_entropy": pytest.approx(1.0),
                           "pool.dropped.too_easy": 0.0, "pool.dropped.hopeless": 0.0,
                           "pool.dropped.no_variance": 0.0}
    p.update([3, 5], np.array([UNINFORMATIVE["no_variance"], INFORMATIVE]))
    p.update([3], np.array([INFORMATIVE]))
    metrics = p.metrics()
    assert metrics["pool.drawn"] == 2.0 and metrics["pool.informative_fraction"] == 1.0
    assert metrics["pool.mean_reward"] == pytest.approx(np.mean([np.mean([0.5] * 4 + INFORMATIVE), 0.475]))
    p.update([3, 5], np.array([UNINFORMATIVE["no_variance"], INFORMATIVE]))
    assert p.metrics()["pool.informative_fraction"] == 0.5
    assert 0.9 < p.metrics()["pool.weight_entropy"] < 1.0


def test_state_round_trip_resumes_exactly() -> None:
    rng = np.random.default_rng(0)
    original = pool()
    for step in range(6):
        drawn = original.draw(3, step)
        original.update(drawn, rng.choice([0.0, 0.5, 1.0], size=(3, 4), p=[0.6, 0.1, 0.3]))
    state = json.loads(snapshot(original))  # as a checkpoint's extra stores it
    resumed = pool()
    resumed.load_state_dict(state)
    pd.testing.assert_frame_equal(resumed.table(), original.table())
    assert resumed.metrics() == original.metrics()
    for step in range(6, 30):
        drawn = original.draw(3, step)
        np.testing.assert_array_equal(resumed.draw(3, step), drawn)
        rewards = rng.choice([0.0, 0.5, 1.0], size=(3, 4), p=[0.6, 0.1, 0.3])
        original.update(drawn, rewards)
        resumed.update(drawn, rewards)
    assert snapshot(resumed) == snapshot(original)


def test_state_for_other_prompts_is_rejected_and_changes_nothing() -> None:
    p = pool()
    p.update([0], np.array([INFORMATIVE]))
    before = snapshot(p)
    with pytest.raises(ValueError, match="different prompts"):
        p.load_state_dict(pool(seed=1).state_dict())
    with pytest.raises(ValueError, match="lacks"):
        p.load_state_dict({"prompts": p.state_dict()["prompts"]})
    assert snapshot(p) == before


def test_table_columns_and_types() -> None:
    p = pool()
    p.update([2], np.array([INFORMATIVE]))
    table = p.table()
    assert list(table.columns) == ["prompt_id", "text", "rubric", "draws", "mean_reward", "last_mean", "last_std",
                                   "weight", "status", "reason"]
    assert len(table) == 10 and table["prompt_id"].tolist() == list(range(10))
    for column in ("prompt_id", "draws"):
        assert table[column].dtype == np.int64
    for column in ("mean_reward", "last_mean", "last_std", "weight"):
        assert table[column].dtype == np.float64
    assert table["text"].tolist() == [q.text for q in p.prompts]
    assert json.loads(table.loc[2, "rubric"]) == [r.to_dict() for r in p.prompts[2].rubric]
    assert table.loc[2, "mean_reward"] == pytest.approx(0.475)
    assert table.loc[2, "last_std"] == pytest.approx(np.std(INFORMATIVE))
    assert table["mean_reward"].isna().sum() == 9 and set(table["status"]) == {"active"}


@pytest.mark.parametrize(("indices", "rewards", "match"), [
    ([0, 1], [INFORMATIVE], "shape"),
    ([0], [[0.5]], "shape"),
    ([0], [[0.5, np.nan]], "NaN"),
    ([10], [INFORMATIVE], r"in \[0, 10\)"),
    ([-1], [INFORMATIVE], r"in \[0, 10\)"),
    ([1, 1], [INFORMATIVE, INFORMATIVE], "repeat"),
    ([], np.zeros((0, 4)), "non-empty"),
    ([0.5], [INFORMATIVE], "ints"),
])
def test_bad_update_is_rejected_and_changes_nothing(indices: list, rewards: list, match: str) -> None:
    p = pool()
    before = snapshot(p)
    with pytest.raises(ValueError, match=match):
        p.update(indices, np.array(rewards))
    assert snapshot(p) == before


def test_dropped_prompt_cannot_be_scored_and_bad_draws_fail() -> None:
    p = pool()
    for _ in range(3):
        p.update([0], np.array([UNINFORMATIVE["too_easy"]]))
    with pytest.raises(ValueError, match="dropped"):
        p.update([0], np.array([INFORMATIVE]))
    with pytest.raises(ValueError, match="only 9 are active"):
        p.draw(10, step=0)
    with pytest.raises(ValueError, match="n >= 1"):
        p.draw(0, step=0)
    with pytest.raises(ValueError, match="step >= 0"):
        p.draw(1, step=-1)


def test_pool_needs_min_active_prompts() -> None:
    c = config()
    with pytest.raises(ValueError, match="min_active"):
        PromptPool(rl_prompts(c, RESOLUTION)[:1], c)
