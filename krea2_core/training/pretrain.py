"""Flow-matching training stages: progressive-resolution pretraining (256, 512 or 1024), and midtraining and
domain SFT, which run the same trainer on other data with their own recipe.

Every rank of a torchrun / Flyte Elastic launch calls ``run_training_stage``. Rank 0 owns the MLflow run and
publishes the artifact; all ranks train and checkpoint into the stage's scratch directory, which survives a
killed attempt, so a re-run resumes from the newest checkpoint and retraces the same loss curve: every random
draw comes from a generator seeded by (seed, step, rank) and the loader replays any step exactly.

Artifact (kind ``checkpoint``), a self-describing diffusers model directory plus training records:
``diffusion_pytorch_model.safetensors`` (PMA merge of the last K checkpoints) and ``config.json``, so
``Krea2Transformer2DModel.from_pretrained(artifact)`` loads it (ablation switches, when not at their defaults,
sit under ``"krea2"`` and diffusers cannot run them); ``model_index.json`` (the frozen autoencoder and text encoder:
krea2_core/training/image_model.py); ``train_state/`` (DCP: model, optimizer, scheduler of the
final step); ``metrics.jsonl`` (the loss curve); ``samples.png`` (held-out prompts); ``eval.json`` (per-prompt
checker outcomes of the merged weights, and of the untrained model, for paired comparisons downstream).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from krea2_core.artifacts import to_plain
from krea2_core.config import PipelineConfig
from krea2_core.training.config import PRETRAIN_STAGES, PretrainStageConfig, TrainerConfig
from krea2_core.common.layout import EVAL_FILE, METRICS_FILE, SAMPLES_FILE
from krea2_core.data.loader import PackedLoader
from krea2_core.diffusion.flow import add_noise, flow_loss, validation_loss
from krea2_core.diffusion.text_to_image import TextToImage
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput
from krea2_core.tracking import MetricsLog, StageRun
from krea2_core.training import checkpoint as ckpt
from krea2_core.training.diffusers_format import DIFFUSERS_WEIGHTS_FILE
from krea2_core.training.distributed_stage import run_distributed_stage
from krea2_core.training.image_model import ModelIndex, new_model, publish_checkpoint, text_to_image
from krea2_core.training.parallel import DistEnv, data_parallel_rank, global_means, parallelize
from krea2_core.training.pma import merge_safetensors
from krea2_core.training.repa import IRepaProjector, load_patch_encoder, repa_active, repa_loss
from krea2_core.training.trainer import Optimized, TrainState, noise_and_timesteps
from krea2_core.training.throughput import dit_parameters, peak_flops, train_flops_per_image
from krea2_core.evaluation.prompt_following import (PromptFollowing, comparison_metrics, eval_sampler,
                                                    evaluate_shared, held_out_prompts, image_grid)
from krea2_core.world.captions import sample_prompts
from krea2_core.world.render import render

_PROJECTOR = "repa_projector"




@dataclass
class TrainingSettings:
    """What a training stage's checkpoint depends on: its name, its recipe and the trainer, not the other stages'
    recipes (changing the 1024 stage does not re-run the 256 stage)."""

    name: str  # pretrain_<resolution>, midtrain or sft_<domain>
    recipe: PretrainStageConfig
    trainer: TrainerConfig


def run_training_stage(inputs: Mapping[str, Path], settings: TrainingSettings, parent_run_id: str = "",
                       root: Path | None = None) -> Path | None:
    """Flow-matching training of ``settings.trainer.model`` on the ``packed`` shards with the recipe
    ``settings.recipe``, from the ``init`` checkpoint artifact or from scratch: a pretraining resolution stage,
    midtraining or a domain SFT (they differ in data, recipe and ``trainer.eval`` prompts).
    Every rank calls it; returns the checkpoint artifact on rank 0, None on the other ranks."""
    name, stage, config = settings.name, settings.recipe, settings.trainer

    def check(env: DistEnv) -> None:
        dp = env.world_size // config.parallel.tp
        if stage.global_batch % dp:
            raise ValueError(f"{name}: global_batch ({stage.global_batch}) must be divisible by the data-parallel "
                             f"size ({dp})")

    inputs = {key: Path(path) for key, path in inputs.items()}
    return run_distributed_stage(
        name, lambda env, scratch, run, staging: _train(env, inputs, name, stage, config, scratch, staging, run),
        parallel=config.parallel, view=settings, inputs=inputs, check=check, parent_run_id=parent_run_id, root=root)


def pretrain_settings(config: PipelineConfig, stage: str) -> TrainingSettings:
    if stage not in config.pretrain.stages:
        raise ValueError(f"stage {stage!r} is not configured; configured stages: {sorted(config.pretrain.stages)}")
    return TrainingSettings(f"pretrain_{stage}", config.pretrain.stages[stage], config.pretrain.trainer())


def pretrain_spec(stage: str) -> StageSpec:
    """``pretrain_<stage>``: one resolution stage, from the previous stage's checkpoint (the first from scratch)."""
    index = PRETRAIN_STAGES.index(stage)
    inputs = {"packed": f"pack_{stage}", **({"init": f"pretrain_{PRETRAIN_STAGES[index - 1]}"} if index else {})}
    return StageSpec(f"pretrain_{stage}", "checkpoint", inputs, lambda p: pretrain_settings(p, stage),
                     run_training_stage, distributed=True)


def _validation_set(pipe: TextToImage, config: TrainerConfig, resolution: int) -> tuple[torch.Tensor, ...]:
    """Held-out world scenes (never in the pool) at the stage resolution, with their captions, fixed noise."""
    rng = np.random.default_rng(config.eval.seed + 1)
    pairs = sample_prompts(rng, config.eval.n_prompts, resolution, resolution, split="held_out",
                           **config.eval.scenes.sample_kwargs())
    pixels = torch.stack([torch.from_numpy(np.array(render(scene))).permute(2, 0, 1)
                          for _, scene in pairs]).float() / 127.5 - 1
    tokens, grid, text, mask = pipe.encode(pixels, [prompt.text for prompt, _ in pairs])
    noise = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(config.seed)).to(tokens.device)
    return tokens, grid, text, mask, noise


def _validation_loss(pipe: TextToImage, val: tuple[torch.Tensor, ...]) -> dict[str, float]:
    tokens, grid, text, mask, noise = val
    losses = validation_loss(lambda x, t: pipe.velocity(x, t, grid, text, mask), tokens, noise)
    return {"val_loss": sum(losses.values()) / len(losses), **{f"val_loss.t{t:.1f}": v for t, v in losses.items()}}


class _HeldOut:
    """Held-out prompt following of one training stage: every rank samples its share, rank 0 scores and logs.

    The published artifact's ``eval.json`` keeps the per-prompt outcomes, so the next stage (same prompts) reports
    its change as a paired difference; the untrained model's outcomes travel along the chain of stages."""

    def __init__(self, env: DistEnv, config: TrainerConfig, resolution: int, run: StageRun | None, scratch: Path,
                 start: int) -> None:
        self.env, self.config, self.resolution, self.run = env, config, resolution, run
        self.prompts = held_out_prompts(config.eval, resolution)
        self.share, self.shares = data_parallel_rank(env, config.parallel.tp)
        # every evaluation's estimates (for eval.json), kept in the scratch dir so a resumed run still has them
        self.curve_file = scratch / "curve.jsonl"
        kept = self.curve_file.read_text().splitlines() if self.curve_file.is_file() else []
        self.curve: list[dict[str, Any]] = [p for p in map(json.loads, kept) if p["step"] <= start]

    def __call__(self, pipe: TextToImage, prefix: str, step: int) -> tuple[PromptFollowing, Image.Image] | None:
        """Evaluate ``pipe`` (every rank calls); on rank 0 log ``prefix`` metrics and the sample grid at ``step``."""
        out = evaluate_shared(eval_sampler(pipe, self.config.eval, self.resolution), self.prompts, share=self.share,
                              shares=self.shares, rank=self.env.rank)
        if out is None or self.run is None:
            return None
        result, images = out
        grid = image_grid(images[:self.config.eval.grid_size])
        self.run.log_metrics(result.metrics(prefix), step=step)
        self.curve.append({"name": prefix, "step": step, **{k: e.to_dict() for k, e in result.estimates().items()}})
        self.curve_file.write_text("".join(json.dumps(point) + "\n" for point in self.curve))
        self.run.log_image(grid, f"samples/{prefix}_step{step:06d}.png")
        return result, grid

    def digest(self) -> str:
        return hashlib.sha256("\n".join(p.text for p in self.prompts).encode()).hexdigest()[:16]


def _previous_eval(init: Path | None, digest: str) -> dict[str, Any]:
    """The init checkpoint's ``eval.json`` if it scored the same prompts, else {}."""
    path = init / EVAL_FILE if init is not None else None
    if path is None or not path.is_file():
        return {}
    previous = json.loads(path.read_text())
    return previous if previous.get("prompts") == digest else {}


def _train(env: DistEnv, inputs: dict[str, Path], name: str, stage_cfg: PretrainStageConfig, config: TrainerConfig,
           scratch: Path, staging: Path | None, run: StageRun | None) -> StageOutput | None:
    init = inputs.get("init")
    index = ModelIndex.of(config)
    if init is not None and ModelIndex.read(init).model != config.model:
        raise ValueError(f"{name}: the init checkpoint {init} is another DiT than trainer.model: a stage continues "
                         "the model it starts from")
    model = new_model(init if init is not None else config.model, env.device, seed=config.seed)
    projector, encoder = None, None
    if stage_cfg.repa:
        encoder = load_patch_encoder(config.repa, env.device)
        projector = IRepaProjector(config.model.hidden_size, encoder.dim).to(env.device)
        model.add_module(_PROJECTOR, projector)  # sharded and checkpointed with the model, not in its weights file
    model = parallelize(model, config.parallel, env, stage_cfg.float8)
    pipe = text_to_image(model, index, config.parallel, env.device)
    dp_rank, dp_size = data_parallel_rank(env, config.parallel.tp)
    loader = PackedLoader(inputs["packed"], rank=dp_rank, world_size=dp_size, caption_ratios=config.caption_ratios,
                          caption_dropout=config.caption_dropout, seed=config.seed)
    trained = Optimized.build(model, config.optimizer, stage_cfg.lr, total_steps=stage_cfg.steps,
                              warmup_steps=stage_cfg.warmup_steps, decay_fraction=stage_cfg.decay_fraction)
    pma_steps = sorted(s for s in (stage_cfg.steps - i * stage_cfg.pma_interval
                                   for i in range(stage_cfg.pma_checkpoints)) if s > 0)
    checkpoints = scratch / "checkpoints"
    state = TrainState(trained, checkpoints, steps=stage_cfg.steps, model_config=to_plain(config.model),
                       every_s=stage_cfg.checkpoint_every_s, protect=pma_steps)
    state.resume()
    log = MetricsLog(scratch / METRICS_FILE, run) if run is not None else None  # rank 0 records
    held_out = _HeldOut(env, config, stage_cfg.resolution, run, scratch, state.start)
    previous = _previous_eval(init, held_out.digest())
    untrained_file = scratch / "untrained.json"
    if state.start == 0 and init is None:  # the baseline every later number is compared with: the untrained model
        untrained = held_out(pipe, "eval.untrained", 0)
        if untrained is not None:
            untrained_file.write_text(json.dumps(untrained[0].to_dict()))
    if init is None and untrained_file.is_file():
        previous = {"untrained": json.loads(untrained_file.read_text())}
    val = _validation_set(pipe, config, stage_cfg.resolution)
    flops_per_image = functools.cache(functools.partial(train_flops_per_image, config.model, config.autoencoder,
                                                        stage_cfg.resolution))  # of a batch's text length
    model.train()
    for step in state.range(name, show=env.rank == 0):
        t0 = time.perf_counter()
        batch = loader.batch(step)
        tokens, grid, text, mask = pipe.encode(batch.pixels, batch.captions)
        noise, t = noise_and_timesteps(tokens, batch.sample_index, seed=config.seed, step=step,
                                       shift=stage_cfg.timestep_shift)
        aligned = encoder is not None and repa_active(step, steps_per_epoch=loader.n_batches, epochs=config.repa.epochs)
        out = pipe.velocity(add_noise(tokens, noise, t), t, grid, text, mask,
                            return_block=config.repa.block if aligned else None)
        velocity = out[0] if aligned else out
        loss = flow_loss(velocity, tokens, noise)
        losses = {"loss": loss}
        if aligned:
            alignment = repa_loss(out[1].float(), grid, encoder.encode(batch.pixels.to(env.device)), projector)
            losses["loss.repa"] = alignment
            loss = loss + config.repa.weight * alignment
        metrics = global_means(losses)
        metrics["grad_norm"] = trained.step(loss)
        images_per_s = stage_cfg.global_batch / (time.perf_counter() - t0)
        metrics.update(lr=trained.lr, images_per_s=images_per_s,
                       mfu=images_per_s * flops_per_image(text.shape[1]) / (peak_flops(env.device, pipe.compute_dtype) * env.world_size))
        done = step + 1
        if done % stage_cfg.val_every == 0 or done == stage_cfg.steps:
            model.eval()
            metrics.update(_validation_loss(pipe, val))
            model.train()
        if stage_cfg.eval_every and done % stage_cfg.eval_every == 0 and done < stage_cfg.steps:
            held_out(pipe, "curve", done)  # the live (unmerged) weights: a learning curve
        if log is not None:
            log(done, metrics)
        state.maybe_checkpoint(done)
    # PMA merge into the shared scratch dir, then every rank evaluates its share of the prompts on the merged weights
    merged_dir = scratch / "merged"
    if env.rank == 0:
        merged_dir.mkdir(exist_ok=True)
        merge_safetensors([checkpoints / ckpt.step_dir_name(s) / ckpt.STEP_WEIGHTS_FILE for s in pma_steps],
                          merged_dir / DIFFUSERS_WEIGHTS_FILE, drop_prefix=f"{_PROJECTOR}.")
        index.write(merged_dir)
    if dist.is_initialized():
        dist.barrier()
    merged = dataclasses.replace(pipe, model=new_model(merged_dir, env.device, seed=config.seed))
    final = held_out(merged, "eval", stage_cfg.steps)
    if staging is None or run is None or final is None:
        return None
    result, grid = final
    publish_checkpoint(staging, merged_dir / DIFFUSERS_WEIGHTS_FILE, index, metrics=scratch / METRICS_FILE)
    shutil.copytree(checkpoints / ckpt.step_dir_name(stage_cfg.steps) / ckpt.STATE_DIR, staging / "train_state")
    grid.save(staging / SAMPLES_FILE)
    metrics = result.metrics("eval")
    report: dict[str, Any] = {"prompts": held_out.digest(), "resolution": stage_cfg.resolution, "stage": name,
                              "global_batch": stage_cfg.global_batch, "eval": result.to_dict(),
                              "curve": held_out.curve}
    if "untrained" in previous:
        report["untrained"] = previous["untrained"]
        metrics.update(comparison_metrics(PromptFollowing.from_dict(previous["untrained"]), result,
                                          "eval.vs_untrained"))
    if "eval" in previous:
        report["previous"] = {"stage": previous["stage"], "resolution": previous["resolution"]}
        metrics.update(comparison_metrics(PromptFollowing.from_dict(previous["eval"]), result, "eval.vs_previous"))
    (staging / EVAL_FILE).write_text(json.dumps(report))
    metrics.update({f"final.{k}": v for k, v in _validation_loss(merged, val).items()})
    run.log_metrics(metrics, step=stage_cfg.steps)
    return StageOutput(counts={"steps": stage_cfg.steps, "merged_checkpoints": len(pma_steps),
                               "parameters": dit_parameters(config.model)},
                       metrics=metrics)
