"""benchmarks/post_training_effects.py: its configs, its verdict on each issue-18 target, and its bad input."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest

from krea2_core.config import load_config

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def effects(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    saved = dict(os.environ)  # the benchmarks' _common pins thread counts in the environment
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    yield importlib.import_module("post_training_effects")
    os.environ.clear()
    os.environ.update(saved)


def _change(key: str, value: float, low: float, high: float) -> dict[str, float]:
    return {key: value, f"{key}.low": low, f"{key}.high": high}


def test_every_stage_runs_and_evaluates_at_the_checkpoint_resolution(effects: ModuleType) -> None:
    post = effects.at_resolution(load_config("tiny").post, 32, 96)
    assert post.resolution == post.sft.stage.resolution == 32
    assert post.sft.eval_prompts == post.preference.eval_prompts == post.rl.eval_prompts == post.distill.eval_prompts == 96


def test_targets_are_met_only_when_the_interval_says_so(effects: ModuleType) -> None:
    metrics = {
        "merge": {**_change("vs_base.sft_warm.warm.score", 0.05, 0.01, 0.09), "gain_retained.warm": 0.85,
                  **_change("vs_base.merged.warm.score", 0.04, 0.00, 0.08)},
        "preference_synthetic": {**_change("eval.preferred_rate", 0.56, 0.49, 0.63), "implicit_loglik.winner": 0.2},
        "reward_model": {**_change("val.accuracy", 0.7, 0.6, 0.8), "count.val_pairs": 40},
        "rl": {**_change("eval.vs_init_nocfg.score", 0.06, 0.02, 0.10), "eval.init_cfg.score": 0.7,
               "eval.init_nocfg.score": 0.6, "eval.diversity.init": 0.10, "eval.diversity.policy": 0.08},
        "distill": {**_change("eval.student_vs_teacher.score", -0.03, -0.06, 0.0), "latency.ratio": 20.0},
    }
    verdicts = {target: met for target, _, met in effects.targets(metrics, ["warm"])}
    assert verdicts == {
        "SFT warm raises its domain (CI above 0)": "yes",
        "merge keeps >= 80% of warm's gain": "yes",
        "merge not below the base on warm (CI reaches 0 or above)": "yes",
        "PO synthetic: preferred over its reference (CI above 0.5)": "no",  # 0.56, but the CI reaches 0.49
        "PO synthetic: the winner's implicit likelihood stays above the reference's (last training batch)": "yes",
        "PO calibration: preferred over its reference (CI above 0.5)": "no",  # not measured
        "PO calibration: the winner's implicit likelihood stays above the reference's (last training batch)": "no",
        "reward model: held-out accuracy above 0.5 (CI) on >= 64 pairs": "no",  # 40 pairs
        "RL: no-CFG score rises (CI above 0)": "yes",
        "RL: closes >= half the gap to the start's CFG score": "yes",  # 0.06 of 0.10
        "RL: diversity falls by <= 10%": "no",  # 0.10 -> 0.08
        "TDM: 4-step student without CFG within 0.05 of the CFG teacher (CI)": "no",  # the CI reaches -0.06
    }


@pytest.mark.parametrize(("args", "message"), [
    (["--init", "{tmp}", "--prompts", "0"], "--prompts must be >= 1"),
    (["--init", "{tmp}"], "not a pretraining checkpoint artifact"),
])
def test_bad_input_is_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(BENCHMARKS / "post_training_effects.py"),
                             *[a.format(tmp=tmp_path) for a in args]], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
