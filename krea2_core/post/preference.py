"""Preference optimisation (PO): Diffusion-DPO or STPO on judged pairs, from a checkpoint, against a frozen copy.

Two stages share this trainer (report, "Preference optimization"): ``synthetic`` (large-scale synthetic pairs) and
``calibration`` (human annotations only). Every rank of a torchrun launch calls ``run_preference_stage``; rank 0
owns the MLflow run and publishes the artifact. Each step draws a global batch of pairs from a stream of per-epoch
permutations seeded by (seed, epoch), so all ranks agree and a resumed run replays the same batches; each
data-parallel rank takes its contiguous slice. A pair's winner and loser share one noise and timestep, seeded by
(seed, step, slot in the global batch), and go through the policy in one forward (and through the reference,
without grad): the loss compares how well each model denoises the two (krea2_core/post/preference_loss.py).

The reference is the init checkpoint, frozen, parallelised like the policy (FSDP shards it too): a full unsharded
copy per rank would cost as much memory as the unsharded policy.

Artifact (kind ``checkpoint``): ``diffusion_pytorch_model.safetensors`` (the final step's weights),
``config.json`` and ``model_index.json`` (self-describing like a pretraining checkpoint), ``metrics.jsonl`` (loss, implicit log-likelihood ratios
of winner and loser, margin, accuracy per step: the curves that show policy divergence), ``samples.png`` (held-out
prompts: the policy's images in the first row, the reference's from the same noise below).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import torch
from PIL import Image

from krea2_core.artifacts import read_manifest, to_plain
from krea2_core.config import PipelineConfig
from krea2_core.post.config import PreferenceLossConfig, PreferenceStageConfig
from krea2_core.training.config import EvalConfig, FinetuneConfig
from krea2_core.common.layout import METRICS_FILE, SAMPLES_FILE
from krea2_core.diffusion.flow import add_noise, velocity_target
from krea2_core.diffusion.text_to_image import TextToImage
from krea2_core.post.oracle import WorldCheckerOracle, preferred_rate
from krea2_core.post.pairs import PAIRS_FILE, decode_pair_images, read_pairs
from krea2_core.post.preference_loss import preference_loss
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput
from krea2_core.tracking import MetricsLog, StageRun
from krea2_core.training import checkpoint as ckpt
from krea2_core.training.distributed_stage import run_distributed_stage
from krea2_core.training.image_model import ModelIndex, new_model, publish_checkpoint, text_to_image
from krea2_core.training.parallel import DistEnv, data_parallel_rank, global_means, parallelize
from krea2_core.training.trainer import Optimized, TrainState, noise_and_timesteps
from krea2_core.evaluation.prompt_following import comparison_metrics, eval_sampler, held_out_prompts, image_grid, \
    score_images

STAGES = ("synthetic", "calibration")

Log = Callable[[int, dict[str, float]], None]


@dataclass
class PreferenceSettings:
    """What preference stage ``name`` depends on: its loss and recipe, the evaluation, the trainer; not the
    pair-generation settings (the pairs' digest covers them) nor the pretraining stages."""

    name: str  # synthetic or calibration
    loss: PreferenceLossConfig
    recipe: PreferenceStageConfig
    timestep_shift: float
    eval_prompts: int
    resolution: int
    trainer: FinetuneConfig


def _check_name(name: str) -> None:
    if name not in STAGES:
        raise ValueError(f"preference stage must be one of {STAGES}, got {name!r}")


def preference_settings(config: PipelineConfig, name: str) -> PreferenceSettings:
    _check_name(name)
    po = config.post.preference
    return PreferenceSettings(name=name, loss=po.loss, recipe=po.synthetic if name == "synthetic" else po.calibration,
                              timestep_shift=po.timestep_shift, eval_prompts=po.eval_prompts,
                              resolution=config.post.resolution, trainer=config.pretrain.finetune())


def run_preference_stage(inputs: Mapping[str, Path], settings: PreferenceSettings, parent_run_id: str = "",
                         root: Path | None = None) -> Path | None:
    """Optimise the ``init`` checkpoint artifact on the ``pairs`` artifact (all at ``settings.resolution``) with
    ``settings.loss``; ``init`` is also the frozen reference. Returns the checkpoint artifact on rank 0, None on the
    other ranks."""
    name, stage, pretrain, resolution = settings.name, settings.recipe, settings.trainer, settings.resolution
    _check_name(name)
    pairs, init = Path(inputs["pairs"]), Path(inputs["init"])
    read_manifest(pairs, kind="preference_pairs")
    read_manifest(init, kind="checkpoint")
    table = load_pairs(pairs, resolution)

    def check(env: DistEnv) -> None:
        _, dp_size = data_parallel_rank(env, pretrain.parallel.tp)
        if stage.global_batch % dp_size:
            raise ValueError(f"preference.{name}.global_batch ({stage.global_batch}) must be divisible by the "
                             f"data-parallel size ({dp_size})")

    def work(env: DistEnv, scratch: Path, run: StageRun | None, staging: Path | None) -> StageOutput | None:
        pipe, reference = policy_and_reference(pretrain, init, env)
        log = MetricsLog(scratch / METRICS_FILE, run, every=stage.log_every, last=stage.steps) if run else None
        train_preference(pipe, reference, table, settings.loss, stage, pretrain, env,
                         timestep_shift=settings.timestep_shift, checkpoints=scratch / "checkpoints", log=log)
        if run is None or staging is None:
            return None
        return _publish(pipe, run, staging, settings, init, len(table))

    return run_distributed_stage(preference_spec(name).name, work, parallel=pretrain.parallel, view=settings,
                                 inputs={"pairs": pairs, "init": init}, check=check, parent_run_id=parent_run_id,
                                 root=root)


def preference_spec(name: str) -> StageSpec:
    """``preference_synthetic`` (from the merged checkpoint) or ``preference_calibration`` (from the synthetic one,
    on the annotated pairs)."""
    inputs = ({"pairs": "preference_pairs", "init": "merge"} if name == "synthetic"
              else {"pairs": "preference_annotations", "init": "preference_synthetic"})
    return StageSpec(f"preference_{name}", "checkpoint", inputs, lambda p: preference_settings(p, name),
                     run_preference_stage, distributed=True)


def load_pairs(artifact: Path, resolution: int) -> pd.DataFrame:
    """The artifact's pairs table, checked for training: at least one pair, every one ``resolution`` square (a
    batch is encoded at one size)."""
    table = read_pairs(artifact).reset_index(drop=True)
    if table.empty:
        raise ValueError(f"{artifact / PAIRS_FILE} holds no pairs: nothing to optimise on")
    wrong = table[(table["width"] != resolution) | (table["height"] != resolution)]
    if len(wrong):
        first = wrong.iloc[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ValueError(f"{artifact / PAIRS_FILE}: preference training runs at {resolution}x{resolution} and every "
                         f"pair must be that size; pair {first['pair_id']!r} is {first['width']}x{first['height']}"
                         f"{more}")
    return table


def pair_indices(n_pairs: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Table rows of the global batch at ``step``: positions ``step * global_batch ...`` in an endless stream of
    permutations of the table, epoch e's drawn from (seed, e). The same on every rank and after a resume."""
    positions = np.arange(step * global_batch, (step + 1) * global_batch)
    epochs = positions // n_pairs
    rows = np.empty(global_batch, dtype=np.int64)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        rows[chosen] = np.random.default_rng([seed, int(epoch)]).permutation(n_pairs)[positions[chosen] % n_pairs]
    return rows


def policy_and_reference(pretrain: FinetuneConfig, init: Path, env: DistEnv) -> tuple[TextToImage, torch.nn.Module]:
    """The policy (trainable, with the frozen autoencoder and text encoder) and the frozen reference, both the
    checkpoint ``init`` as it describes itself, both parallelised like pretraining (no float8: the loss compares
    their small differences)."""
    policy = parallelize(new_model(init, env.device, seed=pretrain.seed), pretrain.parallel, env, "none")
    reference = new_model(init, env.device, seed=pretrain.seed).eval().requires_grad_(False)
    return (text_to_image(policy, ModelIndex.read(init), pretrain.parallel, env.device),
            parallelize(reference, pretrain.parallel, env, "none"))


def _flow_errors(velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (velocity.float() - target.float()).square().flatten(1).mean(dim=1)


def train_preference(pipe: TextToImage, reference: torch.nn.Module, pairs: pd.DataFrame, loss: PreferenceLossConfig,
                     stage: PreferenceStageConfig, pretrain: FinetuneConfig, env: DistEnv, *,
                     timestep_shift: float = 1.0, checkpoints: Path | None = None, log: Log | None = None,
                     checkpoint_every_s: float = ckpt.CHECKPOINT_EVERY_S) -> None:
    """Optimise ``pipe.model`` (parallelised) for ``stage.steps`` steps against ``reference`` on ``pairs``
    (``load_pairs``), every rank together. With ``checkpoints``: resume from its newest checkpoint, save every
    ``checkpoint_every_s`` and at the last step. ``log(step, metrics)`` gets every step's metrics (rank means)."""
    ref_pipe = dataclasses.replace(pipe, model=reference)
    dp_rank, dp_size = data_parallel_rank(env, pretrain.parallel.tp)
    per_rank = stage.global_batch // dp_size
    slots = torch.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    policy = Optimized.build(pipe.model, pretrain.optimizer, stage.lr, total_steps=stage.steps,
                             warmup_steps=stage.warmup_steps)
    state = TrainState(policy, checkpoints, steps=stage.steps, model_config=to_plain(pipe.model.config),
                       every_s=checkpoint_every_s)
    state.resume()
    pipe.model.train()
    for step in state.range(f"preference {loss.kind}", show=env.rank == 0):
        rows = pairs.iloc[pair_indices(len(pairs), stage.global_batch, step, pretrain.seed)[slots.numpy()]]
        winner, loser = decode_pair_images(rows)
        tokens, grid, text, mask = pipe.encode(torch.cat([winner, loser]), list(rows["prompt"]) * 2)
        # one noise and timestep per pair, shared by its winner and loser
        noise, t = noise_and_timesteps(tokens[:per_rank], slots, seed=pretrain.seed, step=step, shift=timestep_shift)
        noise, t = torch.cat([noise, noise]), torch.cat([t, t])
        x_t, target = add_noise(tokens, noise, t), velocity_target(tokens, noise)
        err = _flow_errors(pipe.velocity(x_t, t, grid, text, mask), target)
        with torch.no_grad():
            err_ref = _flow_errors(ref_pipe.velocity(x_t, t, grid, text, mask), target)
        value, stats = preference_loss(err[:per_rank], err[per_rank:], err_ref[:per_rank], err_ref[per_rank:], loss)
        metrics = global_means(stats)
        metrics["grad_norm"] = policy.step(value)
        metrics["lr"] = policy.lr
        done = step + 1
        if log is not None:
            log(done, metrics)
        state.maybe_checkpoint(done)


def compare_with_reference(policy: TextToImage, reference: TextToImage, eval_cfg: EvalConfig, resolution: int
                           ) -> tuple[dict[str, float], list[Image.Image], list[Image.Image]]:
    """Held-out prompts generated by both models from the same noise: the checker-oracle's preferred rate of the
    policy over the reference (``eval.preferred_rate`` with its 95% CI, wins, losses, ties), each one's checker score
    (``eval.policy.*``, ``eval.reference.*``) and their paired difference (``eval.vs_reference.*``); and the two image
    lists."""
    prompts = held_out_prompts(eval_cfg, resolution)

    texts = [p.text for p in prompts]
    ours, theirs = (eval_sampler(pipe, eval_cfg, resolution)(texts) for pipe in (policy, reference))
    metrics = preferred_rate(ours, theirs, prompts, WorldCheckerOracle()).metrics("eval")
    policy_result, reference_result = score_images(ours, prompts), score_images(theirs, prompts)
    metrics.update(policy_result.metrics("eval.policy"))
    metrics.update(reference_result.metrics("eval.reference"))
    metrics.update(comparison_metrics(reference_result, policy_result, "eval.vs_reference"))
    return metrics, ours, theirs


def _publish(pipe: TextToImage, run: StageRun, staging: Path, settings: PreferenceSettings, init: Path,
             n_pairs: int) -> StageOutput:
    pretrain, steps = settings.trainer, settings.recipe.steps
    publish_checkpoint(staging, run.work_dir / "checkpoints" / ckpt.step_dir_name(steps) / ckpt.STEP_WEIGHTS_FILE,
                       ModelIndex.read(init), metrics=run.work_dir / METRICS_FILE)
    # unsharded copies on rank 0 (the other ranks are done), with the frozen autoencoder and text encoder
    device = pipe.device
    metrics, ours, theirs = compare_with_reference(
        dataclasses.replace(pipe, model=new_model(staging, device, seed=pretrain.seed)),
        dataclasses.replace(pipe, model=new_model(init, device, seed=pretrain.seed)),
        dataclasses.replace(pretrain.eval, n_prompts=settings.eval_prompts), settings.resolution)
    run.log_metrics(metrics, step=steps)
    shown = min(pretrain.eval.grid_size, len(ours))
    grid = image_grid(ours[:shown] + theirs[:shown], columns=shown)
    grid.save(staging / SAMPLES_FILE)
    run.log_image(grid, f"samples/preference_{settings.name}.png")
    return StageOutput(counts={"steps": steps, "pairs": n_pairs}, metrics=metrics)
