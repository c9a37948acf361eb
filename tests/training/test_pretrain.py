"""A pretraining stage end to end on a tiny world dataset: the artifact (diffusers-loadable weights, DCP state,
loss curve, samples), MLflow metrics, progressive init, exact resume after kill -9, and 2 ranks = 1 rank."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from krea2_core.artifacts import read_manifest
from krea2_core.config import PipelineConfig
from krea2_core.post.config import PostTrainConfig
from krea2_core.training.config import PretrainConfig
from krea2_core.data.packing import pack_stage
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.training.launch import launch_local
from krea2_core.evaluation.prompt_following import PromptFollowing
from krea2_core.training.diffusers_format import DIFFUSERS_WEIGHTS_FILE
from krea2_core.training.image_model import MODEL_INDEX_FILE, ModelIndex
from krea2_core.training.pretrain import EVAL_FILE, METRICS_FILE, TrainingSettings, pretrain_settings, run_training_stage
from krea2_core.world.captions import captions, sample_prompts
from krea2_core.world.render import render

CONFIG = {
    "model": {"in_channels": 192, "num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 128, "timestep_embed_dim": 32,
              "text_num_attention_heads": 6, "text_num_key_value_heads": 6, "text_intermediate_size": 256},
    "autoencoder": {"downsample": 4, "patch_size": 2},
    "text_encoder": {"max_tokens": 32},
    "parallel": {"nproc_per_node": 1},
    "repa": {"block": 1},
    "eval": {"n_prompts": 4, "steps": 3, "grid_size": 4},
    "stages": {
        "256": {"resolution": 32, "steps": 6, "global_batch": 8, "warmup_steps": 1, "repa": True,
                "pma_checkpoints": 2, "pma_interval": 2, "val_every": 3, "eval_every": 3, "checkpoint_every_s": 3600},
        "512": {"resolution": 32, "steps": 2, "global_batch": 8, "warmup_steps": 0, "pma_checkpoints": 1,
                "val_every": 2},
    },
}


def pretrain_config(**stage_256: object) -> PretrainConfig:
    data = json.loads(json.dumps(CONFIG))
    data["stages"]["256"].update(stage_256)
    return PretrainConfig.from_dict(data)


def stage_settings(config: PretrainConfig, stage: str) -> TrainingSettings:
    """Pretraining stage ``stage``'s settings as the pipeline makes them, from a pipeline config around ``config``
    (midtraining at its top resolution)."""
    midtrain = PostTrainConfig().midtrain
    top = dataclasses.replace(midtrain.stage, resolution=max(s.resolution for s in config.stages.values()))
    post = PostTrainConfig(midtrain=dataclasses.replace(midtrain, stage=top))
    return pretrain_settings(PipelineConfig(pretrain=config, post=post), stage)


def run_pretrain(packed: Path, init: Path | None, stage: str, config: PretrainConfig, root: Path) -> Path | None:
    return run_training_stage({"packed": packed, **({"init": init} if init else {})}, stage_settings(config, stage),
                              root=root)


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("packed")
    rows, texts = [], []
    for i, (_, scene) in enumerate(sample_prompts(np.random.default_rng(0), 24, 48, 48)):
        path = root / f"scene{i}.png"
        render(scene).save(path)
        rows.append({"id": f"scene{i}", "uri": str(path), "width": 48, "height": 48})
        texts.append({"id": f"scene{i}", **captions(scene)})

    def body(inputs: dict[str, Path], staging: Path, run: object) -> StageOutput:
        return StageOutput(pack_stage(pd.DataFrame(rows), pd.DataFrame(texts), resolution=32, aspect_ratios=[1.0],
                                      multiple=8, global_batch=8, seed=0, out_dir=staging))

    out, _ = execute_stage("pack_test", "packed", body, config={"test": 1}, root=root)
    return out


def losses(artifact_or_scratch: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (artifact_or_scratch / METRICS_FILE).read_text().splitlines()]


def test_stage_publishes_diffusers_loadable_weights_and_logs_metrics(packed: Path, tmp_path: Path) -> None:
    from diffusers import Krea2Transformer2DModel

    config = pretrain_config()
    out = run_pretrain(packed, None, "256", config, root=tmp_path)
    assert out is not None
    manifest = read_manifest(out, kind="checkpoint")
    assert manifest.counts["steps"] == 6 and manifest.counts["merged_checkpoints"] == 2
    assert {DIFFUSERS_WEIGHTS_FILE, "config.json", MODEL_INDEX_FILE, "train_state", "metrics.jsonl", "samples.png"} <= {
        p.name for p in out.iterdir()}
    curve = losses(out)
    assert len(curve) == 6 and all(np.isfinite(curve))

    weights = load_file(out / DIFFUSERS_WEIGHTS_FILE)
    assert not any(k.startswith("repa_projector") for k in weights)  # the iREPA head stays out of the model
    reference = Krea2Transformer2DModel.from_pretrained(out)  # the artifact is a diffusers model directory
    assert reference.config.num_layers == 2
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in weights.items())
    assert ModelIndex.read(out) == ModelIndex.of(config)  # and it describes itself: DiT, autoencoder, text encoder

    metrics = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(manifest.mlflow_run_id).data.metrics
    for key in ("loss", "loss.repa", "grad_norm", "lr", "images_per_s", "mfu", "val_loss", "val_loss.t0.5",
                "eval.score", "eval.score.low", "eval.score.high", "eval.kind", "eval.untrained.score",
                "eval.vs_untrained.score", "eval.vs_untrained.score.low", "eval.vs_untrained.score.before",
                "curve.score", "final.val_loss"):
        assert key in metrics, key
    assert metrics["eval.score.low"] <= metrics["eval.score"] <= metrics["eval.score.high"]
    assert metrics["eval.vs_untrained.score.after"] - metrics["eval.vs_untrained.score.before"] == pytest.approx(
        metrics["eval.vs_untrained.score"])
    # eval.json: per-prompt outcomes of the merged weights and of the untrained model, and the learning curve
    report = json.loads((out / EVAL_FILE).read_text())
    assert report["resolution"] == 32 and report["stage"] == "pretrain_256"
    result, untrained = PromptFollowing.from_dict(report["eval"]), PromptFollowing.from_dict(report["untrained"])
    assert result.n_prompts == untrained.n_prompts == 4 and result.score == pytest.approx(metrics["eval.score"])
    assert [(p["name"], p["step"]) for p in report["curve"]] == [("eval.untrained", 0), ("curve", 3), ("eval", 6)]


def test_next_stage_starts_from_the_previous_checkpoint(packed: Path, tmp_path: Path) -> None:
    config = pretrain_config()
    first = run_pretrain(packed, None, "256", config, root=tmp_path)
    second = run_pretrain(packed, first, "512", config, root=tmp_path)
    manifest = read_manifest(second, kind="checkpoint")
    assert manifest.inputs["init"] == read_manifest(first).digest
    # the held-out change against the stage before (same prompts, paired) and against the untrained model
    metrics = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(manifest.mlflow_run_id).data.metrics
    assert {"eval.vs_previous.score", "eval.vs_previous.score.low", "eval.vs_untrained.kind"} <= set(metrics)
    assert "eval.untrained.score" not in metrics  # the untrained model is evaluated once, in the first stage
    report = json.loads((second / EVAL_FILE).read_text())
    assert report["previous"] == {"stage": "pretrain_256", "resolution": 32}
    assert report["untrained"] == json.loads((first / EVAL_FILE).read_text())["untrained"]
    # the trained init predicts the data far better than a fresh model does on the same first batch
    scratch = run_pretrain(packed, None, "512", config, root=tmp_path / "scratch")
    assert losses(second)[0] < losses(scratch)[0]


_WORKER = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_pretrain import pretrain_config, run_pretrain
run_pretrain(Path({packed!r}), None, "256", pretrain_config(steps=12, checkpoint_every_s=0.01, repa=False),
             root=Path(sys.argv[1]))
"""


def test_resume_after_kill_9_retraces_the_same_loss_curve(packed: Path, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=str(Path(__file__).parent), packed=str(packed)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "straight")], check=True, env=env, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(killed)], env=env)
    deadline = time.monotonic() + 240
    while not any(killed.glob("work/checkpoint/*/checkpoints/step-00000005")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not any(killed.glob("artifacts/checkpoint/*/manifest.json")), "killed before finishing"
    subprocess.run([sys.executable, str(script), str(killed)], check=True, env=env, timeout=300)

    straight = next((tmp_path / "straight").glob("artifacts/checkpoint/*/manifest.json")).parent
    resumed = next(killed.glob("artifacts/checkpoint/*/manifest.json")).parent
    assert losses(resumed) == losses(straight)  # bit for bit, no repeated or missing steps
    a, b = load_file(straight / DIFFUSERS_WEIGHTS_FILE), load_file(resumed / DIFFUSERS_WEIGHTS_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_ranks_with_fsdp_follow_the_single_process_curve(packed: Path, tmp_path: Path) -> None:
    one = pretrain_config(repa=False)
    one.parallel.dtype = "float32"  # bf16 rounding would hide a real difference
    single = run_pretrain(packed, None, "256", one, root=tmp_path / "one")
    two = pretrain_config(repa=False)
    two.parallel.dtype, two.parallel.nproc_per_node = "float32", 2
    out = launch_local(two.parallel, run_training_stage, {"packed": packed}, stage_settings(two, "256"), "",
                       tmp_path / "two")
    assert np.allclose(losses(out), losses(single), rtol=1e-4, atol=1e-6)


def test_bad_stage_or_launch_shape_fails_before_training(packed: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stage '2048' is not configured"):
        run_pretrain(packed, None, "2048", pretrain_config(), root=tmp_path)
    two_ranks = pretrain_config()
    two_ranks.parallel.nproc_per_node = 2
    with pytest.raises(RuntimeError, match="launched with 1 processes but parallel.nnodes x nproc_per_node is 2"):
        run_pretrain(packed, None, "256", two_ranks, root=tmp_path)
    assert not (tmp_path / "artifacts").exists()  # nothing published, nothing half-written
