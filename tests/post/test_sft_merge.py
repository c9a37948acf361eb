"""SFT per domain and merging, end to end on a 1-block DiT at 32 px: each domain set is packed and finetuned
from the base, the merge stage publishes a loadable checkpoint holding the configured method, and its score
matrix covers every candidate on every domain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from krea2_core.artifacts import read_manifest
from krea2_core.config import PipelineConfig
from krea2_core.post.config import PostTrainConfig
from krea2_core.post.merge import EVAL_FILE, METHODS, merge_settings, run_merge
from krea2_core.post.sft import DOMAIN_SCENES_FILE, run_sft_data, sft_data_settings, sft_settings
from krea2_core.presets import preset
from krea2_core.training.diffusers_format import DIFFUSERS_WEIGHTS_FILE
from krea2_core.training.pretrain import run_training_stage
from krea2_core.training.image_model import new_model
from tests.post._checkpoints import PRETRAIN, publish_checkpoints

TINY = preset("tiny").post
POST = PostTrainConfig.from_dict({
    "resolution": 32,
    # midtraining (unused here) at the pretraining config's top resolution, as a PipelineConfig requires
    "midtrain": {"n_images": 8, "stage": {"resolution": 32, "steps": 1, "global_batch": 8, "warmup_steps": 0}},
    "sft": {"domains": {name: {"scenes": d.scenes.to_dict(), "n_images": 8, "seed": d.seed}
                        for name, d in TINY.sft.domains.items()},
            "stage": {"resolution": 32, "steps": 2, "global_batch": 8, "warmup_steps": 0, "pma_checkpoints": 1,
                      "val_every": 2},
            "eval_prompts": 2},
    "merge": {"method": "ties", "density": 0.5, "compare": True},
})
EVAL = {"eval": {"n_prompts": 2, "steps": 2, "grid_size": 2}}
CONFIG = type(PRETRAIN).from_dict({**PRETRAIN.to_dict(), **EVAL})
PIPELINE = PipelineConfig(pretrain=CONFIG, post=POST)


@pytest.fixture(scope="module")
def sft_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("sft")
    base, _ = publish_checkpoints(root)
    out = {}
    for name in POST.sft.domains:
        data = run_sft_data({}, sft_data_settings(POST.sft, name, 8), root=root)
        assert read_manifest(data).counts["packed"] == 8 and (data / DOMAIN_SCENES_FILE).is_file()
        out[name] = run_training_stage({"packed": data, "init": base}, sft_settings(CONFIG.trainer(), POST.sft, name),
                                       root=root)
    return root, base, out


def test_each_domain_finetunes_from_the_base(sft_checkpoints) -> None:
    _, base, domains = sft_checkpoints
    base_weights = load_file(base / DIFFUSERS_WEIGHTS_FILE)
    for name, path in domains.items():
        manifest = read_manifest(path, kind="checkpoint")
        # evaluated on its own domain's prompts
        assert manifest.config["trainer"]["eval"]["scenes"] == POST.sft.domains[name].scenes.to_dict()
        tuned = load_file(path / DIFFUSERS_WEIGHTS_FILE)
        assert any(not torch.equal(tuned[k], base_weights[k]) for k in base_weights)


def test_merge_publishes_the_configured_method_and_scores_every_candidate(sft_checkpoints) -> None:
    root, base, domains = sft_checkpoints
    out = run_merge({"base": base, **{f"sft.{d}": path for d, path in domains.items()}}, merge_settings(PIPELINE),
                    root=root)
    manifest = read_manifest(out, kind="checkpoint")
    model = new_model(out, torch.device("cpu"), seed=CONFIG.seed)  # loadable like any checkpoint
    assert sum(p.numel() for p in model.parameters()) > 0
    scores = json.loads((out / EVAL_FILE).read_text())["scores"]
    assert set(scores) == {"base", *(f"sft_{d}" for d in domains), *(f"merged_{m}" for m in METHODS)}
    assert all(set(row) == set(domains) for row in scores.values())
    assert json.loads((out / EVAL_FILE).read_text())["method"] == "ties"
    metrics = MlflowClient().get_run(manifest.mlflow_run_id).data.metrics
    assert {f"gain_retained.{d}" for d in domains} <= set(metrics)
    for candidate in ("sft_warm", "sft_cool", "merged", "merged_uniform"):  # "merged" is the published ties merge
        for d in domains:  # each candidate against the base on each domain, paired by prompt, with its CI
            change = f"vs_base.{candidate}.{d}.score"
            scored = {"merged": "merged_ties"}.get(candidate, candidate)
            assert metrics[change] == pytest.approx(metrics[f"score.{scored}.{d}"] - metrics[f"score.base.{d}"])
            assert metrics[f"{change}.low"] <= metrics[change] <= metrics[f"{change}.high"]
    assert "vs_base.merged_ties.warm.score" not in metrics
    assert 0 < metrics["merge.ties.ties_kept_fraction"] <= 1
    assert (out / "samples.png").is_file()


def test_merge_needs_one_checkpoint_per_domain(sft_checkpoints) -> None:
    root, base, domains = sft_checkpoints
    with pytest.raises(ValueError, match="one SFT checkpoint per configured domain"):
        run_merge({"base": base, "sft.warm": domains["warm"]}, merge_settings(PIPELINE), root=root)
    with pytest.raises(ValueError, match="unknown"):
        run_training_stage({"packed": base, "init": base}, sft_settings(CONFIG.trainer(), POST.sft, "sepia"),
                           root=root)
