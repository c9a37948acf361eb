"""Model merging (uniform, weighted, task arithmetic, TIES) in memory and streamed over safetensors files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft.utils.merge_utils import ties
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from krea2_core.post.config import MergeConfig
from krea2_core.training.diffusers_format import DIFFUSERS_WEIGHTS_FILE
from krea2_core.training.merging import (
    Source,
    merge_checkpoints,
    merge_domain_state_dicts,
    merge_sources,
    weighted_sum,
)

METHODS = ["uniform", "weighted", "task_arithmetic", "ties"]
BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
# task vectors (model - base); at density 0.5 each keeps its 2 largest magnitudes:
#   a [3, 0, 0, 2], b [-2, -3, 0, 0], c [4, 0, 0, -5]; elected signs (of the sum [5, -3, 0, -3]): +, -, +, -;
#   entries 0 and 3 have a sign conflict, entry 2 is trimmed everywhere
TASKS = {"a": [3.0, -1.0, 0.5, 2.0], "b": [-2.0, -3.0, 0.1, 1.0], "c": [4.0, 2.0, 0.2, -5.0]}
STEPS = torch.tensor([2, 5])  # an integer buffer, equal everywhere


def _models(dtype: torch.dtype = torch.float32) -> dict[str, dict[str, Tensor]]:
    return {name: {"w": (BASE + torch.tensor(task)).to(dtype), "steps": STEPS.clone()} for name, task in TASKS.items()}


def _base(dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    return {"w": BASE.to(dtype), "steps": STEPS.clone()}


@pytest.mark.parametrize(("config", "expected_task"), [
    (MergeConfig(method="uniform", weights={"a": 5.0}), [5 / 3, -2 / 3, 0.8 / 3, -2 / 3]),  # weights ignored
    (MergeConfig(method="weighted", weights={"a": 2.0}), [8 / 4, -3 / 4, 1.3 / 4, 0.0]),  # (2a + b + c) / 4
    (MergeConfig(method="task_arithmetic", weights={"a": 2.0}, scale=0.5), [4.0, -1.5, 0.65, 0.0]),
    (MergeConfig(method="ties", density=0.5), [3.5, -3.0, 0.0, -5.0]),
    (MergeConfig(method="ties", density=0.5, weights={"a": 2.0}, scale=0.5), [2.5, -1.5, 0.0, -2.5]),
    # density 1 keeps everything: disjoint means [(3+4)/2, (-1-3)/2, 0.8/3, -5]
    (MergeConfig(method="ties", density=1.0), [3.5, -2.0, 0.8 / 3, -5.0]),
])
def test_each_method_matches_a_hand_computation(config: MergeConfig, expected_task: list[float]) -> None:
    merged = merge_domain_state_dicts(_base(), _models(), config)
    torch.testing.assert_close(merged["w"], BASE + torch.tensor(expected_task))
    assert torch.equal(merged["steps"], STEPS) and set(merged) == {"w", "steps"}


def test_ties_trims_each_tensor_by_floor_of_density_times_size() -> None:
    base = {"one": torch.zeros(1), "three": torch.zeros(3)}
    models = {"a": {"one": torch.tensor([4.0]), "three": torch.tensor([1.0, -3.0, 2.0])}}
    merged = merge_domain_state_dicts(base, models, MergeConfig(method="ties", density=0.5))
    # floor(0.5 * 1) = 0 entries kept; floor(0.5 * 3) = 1 (the largest magnitude)
    assert merged["one"].tolist() == [0.0] and merged["three"].tolist() == [0.0, -3.0, 0.0]


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_ties_equals_peft_ties(density: float) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 7, generator=g)}
    tasks = [torch.randn(6, 7, generator=g) for _ in range(3)]
    models = {name: {"w": base["w"] + task} for name, task in zip("xyz", tasks, strict=True)}
    merged = merge_domain_state_dicts(base, models, MergeConfig(method="ties", density=density, weights={"y": 0.5},
                                                                scale=0.7))
    expected = base["w"] + 0.7 * ties(tasks, torch.tensor([1.0, 0.5, 1.0]), density, majority_sign_method="total")
    torch.testing.assert_close(merged["w"], expected)


@pytest.mark.parametrize("method", METHODS)
def test_merging_identical_models_gives_that_model(method: str) -> None:
    model = _models()["a"]
    # task arithmetic adds the n task vectors up (weights are not normalised), so n copies need scale 1/n
    config = MergeConfig(method=method, weights={"b": 3.0} if method == "weighted" else {}, density=1.0,
                         scale=1 / 3 if method == "task_arithmetic" else 1.0)
    merged = merge_domain_state_dicts(_base(), {name: dict(model) for name in "abc"}, config)
    torch.testing.assert_close(merged["w"], model["w"])


def test_task_arithmetic_of_one_model_at_scale_one_is_that_model() -> None:
    merged = merge_domain_state_dicts(_base(), {"a": _models()["a"]}, MergeConfig(method="task_arithmetic"))
    torch.testing.assert_close(merged["w"], _models()["a"]["w"])


def test_weights_zero_leaves_a_model_out_and_unknown_or_all_zero_weights_are_rejected() -> None:
    without_b = {name: model for name, model in _models().items() if name != "b"}
    for method in ["weighted", "task_arithmetic", "ties"]:
        dropped = merge_domain_state_dicts(_base(), _models(), MergeConfig(method=method, weights={"b": 0.0}))
        kept = merge_domain_state_dicts(_base(), without_b, MergeConfig(method=method))
        torch.testing.assert_close(dropped["w"], kept["w"])
    with pytest.raises(ValueError, match=r"merge weights name models that are not merged: \['d'\]"):
        merge_domain_state_dicts(_base(), _models(), MergeConfig(method="uniform", weights={"d": 1.0}))
    with pytest.raises(ValueError, match="every merge weight is 0"):
        merge_domain_state_dicts(_base(), _models(), MergeConfig(method="weighted", weights=dict.fromkeys("abc", 0.0)))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_task_vector_methods_need_the_base(method: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{method}' needs the base checkpoint"):
        merge_domain_state_dicts(None, _models(), MergeConfig(method=method))
    with pytest.raises(ValueError, match=f"{method}' needs the base checkpoint"):
        merge_checkpoints(None, {"a": tmp_path}, MergeConfig(method=method), tmp_path / "out.safetensors")
    # the averages do not use it
    torch.testing.assert_close(merge_domain_state_dicts(None, _models(), MergeConfig(method="uniform"))["w"],
                               BASE + torch.tensor([5 / 3, -2 / 3, 0.8 / 3, -2 / 3]))


def test_mismatches_are_rejected_naming_the_key_and_the_models() -> None:
    shape, keys, dtype, ints = _models(), _models(), _models(), _models()
    shape["b"]["w"] = torch.zeros(2, 2)
    keys["c"]["extra"] = keys["c"].pop("w")
    dtype["a"]["w"] = dtype["a"]["w"].double()
    ints["c"]["steps"] = torch.tensor([2, 6])
    for models, message in [
        (shape, r"'w' differs across checkpoints: a has \(4,\) torch.float32, b has \(2, 2\)"),
        (keys, r"c has different keys from a: missing \['w'\], extra \['extra'\]"),
        (dtype, r"'w' differs across checkpoints: a has \(4,\) torch.float64, b has \(4,\) torch.float32"),
        (ints, r"'steps' is a torch.int64 tensor whose values differ across checkpoints \(a, b, c, base\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            merge_domain_state_dicts(_base(), models, MergeConfig(method="ties"))
    base = _base()
    base["w"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"'w' differs across checkpoints: a has \(4,\) .*, base has \(5,\)"):
        merge_domain_state_dicts(base, _models(), MergeConfig(method="task_arithmetic"))
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_domain_state_dicts(_base(), {}, MergeConfig(method="uniform"))


def test_merging_reads_one_tensor_name_at_a_time() -> None:
    reads: list[tuple[str, str]] = []

    def source(label: str, state: dict[str, Tensor]) -> Source:
        return Source(label, list(state), lambda key: reads.append((label, key)) or state[key])

    models = _models()
    merge_sources([source(name, models[name]) for name in "ab"], weighted_sum([0.5, 0.5]), source("base", _base()))
    assert reads == [(label, key) for key in ["w", "steps"] for label in ["a", "b", "base"]]


def _write_checkpoints(root: Path, base: dict[str, Tensor], models: dict[str, dict[str, Tensor]]) -> dict[str, Path]:
    dirs = {}
    for name, state in {"base": base, **models}.items():
        dirs[name] = root / name
        dirs[name].mkdir()
        save_file(state, str(dirs[name] / DIFFUSERS_WEIGHTS_FILE), metadata={"format": "pt"})
    return dirs


@pytest.mark.parametrize("method", METHODS)
def test_streamed_files_equal_the_in_memory_merge_and_keep_bf16(method: str, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    base = {"blocks.0.w": torch.randn(8, 5, generator=g).bfloat16(), "norm": torch.randn(5, generator=g).bfloat16(),
            "steps": STEPS.clone()}
    models = {name: {key: (t + 0.1 * torch.randn(t.shape, generator=g)).bfloat16() if t.is_floating_point()
                     else t.clone() for key, t in base.items()} for name in ["text", "people", "style"]}
    dirs = _write_checkpoints(tmp_path, base, models)
    config = MergeConfig(method=method, weights={"people": 2.0}, density=0.5, scale=0.8)
    out = tmp_path / "merged" / DIFFUSERS_WEIGHTS_FILE
    stats = merge_checkpoints(dirs.pop("base"), dirs, config, out)
    expected = merge_domain_state_dicts(base, models, config)
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(expected)
        for key in expected:
            assert f.get_tensor(key).dtype == base[key].dtype and torch.equal(f.get_tensor(key), expected[key])
        metadata = f.metadata()
    assert metadata["format"] == "pt" and metadata["merge_method"] == method
    assert json.loads(metadata["merge_weights"])["people"] == (1.0 if method == "uniform" else 2.0)
    assert stats["models"] == 3 and stats["tensors"] == 3 and stats["parameters"] == 8 * 5 + 5 + 2
    assert ("ties_kept_fraction" in stats) == (method == "ties")
    assert sorted(p.name for p in out.parent.iterdir()) == [DIFFUSERS_WEIGHTS_FILE]


def test_ties_statistics_count_kept_entries_and_sign_conflicts(tmp_path: Path) -> None:
    dirs = _write_checkpoints(tmp_path, _base(), _models())
    stats = merge_checkpoints(dirs.pop("base"), dirs, MergeConfig(method="ties", density=0.5), tmp_path / "out")
    # kept: a0, c0, b1, c3 of 12 task-vector entries; conflicts: entries 0 and 3 of 4
    assert stats["ties_kept_fraction"] == pytest.approx(4 / 12) and stats["ties_sign_conflict_fraction"] == 0.5


def test_file_errors_name_the_key_and_the_files(tmp_path: Path) -> None:
    models = _models()
    models["b"]["w"] = torch.zeros(3)
    dirs = _write_checkpoints(tmp_path, _base(), models)
    base = dirs.pop("base")
    a, b = re.escape(str(tmp_path / "a")), re.escape(str(tmp_path / "b"))
    with pytest.raises(ValueError, match=rf"'w' differs across checkpoints: a \({a}\) has \(4,\) torch.float32, "
                                         rf"b \({b}\) has \(3,\)"):
        merge_checkpoints(base, dirs, MergeConfig(method="ties"), tmp_path / "out")
    save_file({"v": torch.zeros(4), "steps": STEPS}, str(dirs["c"] / DIFFUSERS_WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"c \(.*\) has different keys from a \(.*\): missing \['w'\], extra \['v'\]"):
        merge_checkpoints(base, {"a": dirs["a"], "c": dirs["c"]}, MergeConfig(method="uniform"), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"d \(.*\): no weights file"):
        merge_checkpoints(base, {"a": dirs["a"], "d": tmp_path / "d"}, MergeConfig(method="uniform"), tmp_path / "out")
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_checkpoints(base, {}, MergeConfig(method="uniform"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
