"""Timestep distillation (report, "Timestep distillation"): TDM (krea2_core/post/tdm.py) from a checkpoint, data-free.

Every rank of a torchrun launch calls ``run_distill_stage``; rank 0 owns the MLflow run and publishes the artifact.
Three copies of the teacher checkpoint: the student and the fake score (trainable, each with its own optimizer and
schedule) and the teacher (frozen), all parallelised like pretraining. Each step draws a global batch; every sample
gets its prompt (from the world prompts seeded by ``config.seed``), student step, noise and diffusion times from
its own generator seeded by (seed, step, global sample index), and each data-parallel rank takes its contiguous
slice, so a run is the same at any rank count and a resumed run replays the same samples. One step: a student
update on the TDM loss, then ``fake_updates`` fake-score updates on the same (detached) student samples.
Student and fake are checkpointed together (one module holding both, one optimizer list) for exact resume.

Artifact (kind ``checkpoint``): ``diffusion_pytorch_model.safetensors`` (the student), ``config.json`` and
``model_index.json``, self-describing like any checkpoint; ``distill.json`` (how to sample it: ``student_steps``, ``shift``, ``cfg_scale`` 1);
``metrics.jsonl`` (student loss, fake loss, DMD gradient RMS, |x0_fake - x0_real|, grad norms, lrs per step);
``eval.json`` (held-out checker scores of the student at K steps without CFG, the teacher at
``teacher_eval_steps`` with CFG and the teacher at K steps with CFG, and the sampler latencies);
``samples.png`` (rows: teacher, student, teacher at K steps; one noise per column).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import json
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn

from krea2_core.common.layout import EVAL_FILE, METRICS_FILE, SAMPLES_FILE
from krea2_core.artifacts import read_manifest, to_plain
from krea2_core.post.config import DistillConfig
from krea2_core.training.config import FinetuneConfig
from krea2_core.diffusion.sampling import ModelFn, guided, inference_timesteps
from krea2_core.diffusion.text_to_image import TextToImage
from krea2_core.post.preference import Log, policy_and_reference
from krea2_core.post.tdm import fake_score_loss, few_step_sample, interval_times, student_rollout, student_x0, tdm_loss
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput
from krea2_core.tracking import MetricsLog, StageRun
from krea2_core.training import checkpoint as ckpt
from krea2_core.training.distributed_stage import run_distributed_stage
from krea2_core.training.image_model import ModelIndex, new_model, publish_checkpoint
from krea2_core.training.parallel import DistEnv, data_parallel_rank, global_means, parallelize
from krea2_core.common.rng import rng
from krea2_core.training.trainer import Optimized, TrainState
from krea2_core.evaluation.prompt_following import Generate, comparison_metrics, held_out_prompts, image_grid, \
    score_images
from krea2_core.world.captions import sample_prompts

DISTILL_FILE = "distill.json"
LATENCY_REPEATS = 2
LATENCY_PROMPTS = 8  # latency is timed on this many of the held-out prompts (the teacher's 50 CFG steps are slow)


@dataclass
class DistillSettings:
    """What the stage depends on: the distillation recipe, the resolution and how the checkpoint is trained
    (not the pretraining stages)."""

    distill: DistillConfig
    resolution: int
    trainer: FinetuneConfig


def run_distill_stage(inputs: Mapping[str, Path], settings: DistillSettings, parent_run_id: str = "",
                      root: Path | None = None) -> Path | None:
    """Distil the ``teacher`` checkpoint artifact into a ``settings.distill.student_steps`` student at
    ``settings.resolution``. Returns the checkpoint artifact on rank 0, None on the other ranks."""
    config, pretrain, resolution = settings.distill, settings.trainer, settings.resolution
    teacher = Path(inputs["teacher"])
    read_manifest(teacher, kind="checkpoint")
    autoencoder = ModelIndex.read(teacher).autoencoder

    def check(env: DistEnv) -> None:  # bad input fails before anything is written
        rank_slots(config.batch, *data_parallel_rank(env, pretrain.parallel.tp))
        token_side(resolution, autoencoder.downsample * autoencoder.patch_size)

    def work(env: DistEnv, scratch: Path, run: StageRun | None, staging: Path | None) -> StageOutput | None:
        student, fake, frozen = student_fake_teacher(pretrain, Path(teacher), env)
        log = MetricsLog(scratch / METRICS_FILE, run, every=config.log_every, last=config.steps) if run else None
        train_distill(student, fake, frozen, training_prompts(config, pretrain, resolution), config, pretrain, env,
                      resolution, checkpoints=scratch / "checkpoints", log=log)
        if run is None or staging is None:
            return None
        return _publish(student, run, staging, config, pretrain, Path(teacher), resolution)

    return run_distributed_stage(DISTILL.name, work, parallel=pretrain.parallel, view=settings,
                                 inputs={"teacher": teacher}, check=check, parent_run_id=parent_run_id, root=root)


DISTILL = StageSpec("distill", "checkpoint", {"teacher": "rl"},
                    lambda p: DistillSettings(distill=p.post.distill, resolution=p.post.resolution,
                                              trainer=p.pretrain.finetune()),
                    run_distill_stage, distributed=True)


def rank_slots(batch: int, dp_rank: int, dp_size: int) -> Tensor:
    """This data-parallel rank's contiguous slice of the global batch (global sample indices)."""
    if batch % dp_size:
        raise ValueError(f"distill.batch ({batch}) must be divisible by the data-parallel size ({dp_size})")
    per_rank = batch // dp_size
    return torch.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank)


def training_prompts(config: DistillConfig, pretrain: FinetuneConfig, resolution: int) -> list[str]:
    """The data-free prompt set: ``config.n_prompts`` world prompts seeded by ``config.seed`` (apart from the
    held-out evaluation prompts), in the evaluation's scene domain."""
    rng = np.random.default_rng(config.seed)
    return [prompt.text for prompt, _ in sample_prompts(rng, config.n_prompts, resolution, resolution,
                                                        **pretrain.eval.scenes.sample_kwargs())]


@dataclasses.dataclass(frozen=True)
class SampleDraws:
    """The randomness of a slice of the global batch, each sample's from its own generator."""

    prompt: Tensor  # (B,) index into the prompt set
    step: Tensor  # (B,) student step k
    noise: Tensor  # (B, N, C) the student's starting noise
    t: Tensor  # (B,) diffusion time of the student loss, inside step k's interval
    eps: Tensor  # (B, N, C) its noise
    fake_t: Tensor  # (fake_updates, B) diffusion times of the fake-score updates, same interval
    fake_eps: Tensor  # (fake_updates, B, N, C)


def draw_samples(slots: Tensor, *, seed: int, step: int, token_shape: tuple[int, int], n_prompts: int,
                 config: DistillConfig, shift: float) -> SampleDraws:
    """Draws of the global samples ``slots`` at training ``step``, seeded by (seed, step, sample index): a step
    replays exactly after a resume and at any world size."""
    draws: dict[str, list[Tensor]] = {name: [] for name in ("prompt", "step", "noise", "u", "eps", "fake_u",
                                                            "fake_eps")}
    for index in slots.tolist():
        g = rng(seed, step, index)
        draws["prompt"].append(torch.randint(n_prompts, (1,), generator=g))
        draws["step"].append(torch.randint(config.student_steps, (1,), generator=g))
        draws["noise"].append(torch.randn(token_shape, generator=g))
        draws["u"].append(torch.rand(1, generator=g))
        draws["eps"].append(torch.randn(token_shape, generator=g))
        draws["fake_u"].append(torch.rand(config.fake_updates, generator=g))
        draws["fake_eps"].append(torch.randn((config.fake_updates, *token_shape), generator=g))
    k = torch.cat(draws["step"])
    return SampleDraws(prompt=torch.cat(draws["prompt"]), step=k, noise=torch.stack(draws["noise"]),
                       t=interval_times(k, torch.cat(draws["u"]), steps=config.student_steps, shift=shift),
                       eps=torch.stack(draws["eps"]),
                       fake_t=interval_times(k, torch.stack(draws["fake_u"], dim=1), steps=config.student_steps,
                                             shift=shift),
                       fake_eps=torch.stack(draws["fake_eps"], dim=1))


def student_fake_teacher(pretrain: FinetuneConfig, teacher: Path, env: DistEnv
                         ) -> tuple[TextToImage, nn.Module, nn.Module]:
    """The student (trainable, with the frozen autoencoder and text encoder), the fake score (trainable) and the
    frozen teacher, all the ``teacher`` weights, all parallelised like pretraining (no float8)."""
    student, frozen = policy_and_reference(pretrain, teacher, env)
    fake = new_model(teacher, env.device, seed=pretrain.seed)
    return student, parallelize(fake, pretrain.parallel, env, "none"), frozen


def token_side(resolution: int, down: int) -> int:
    """Tokens per side of a ``resolution`` square image, ``down`` pixels per token."""
    if resolution % down:
        raise ValueError(f"resolution ({resolution}) must be a multiple of {down} (autoencoder downsampling x patch "
                         "size)")
    return resolution // down


def token_layout(pipe: TextToImage, resolution: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(token grid (h, w), token shape (N, C)) of a ``resolution`` square image."""
    side = token_side(resolution, pipe.autoencoder.downsample * pipe.patch_size)
    return (side, side), (side * side, pipe.autoencoder.channels * pipe.patch_size**2)


def _global_max(value: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def train_distill(pipe: TextToImage, fake: nn.Module, teacher: nn.Module, prompts: Sequence[str],
                  config: DistillConfig, pretrain: FinetuneConfig, env: DistEnv, resolution: int, *,
                  checkpoints: Path | None = None, log: Log | None = None,
                  checkpoint_every_s: float = ckpt.CHECKPOINT_EVERY_S) -> None:
    """Distil into ``pipe.model`` (the student) with the fake score ``fake`` against the frozen CFG ``teacher`` (all
    parallelised) on ``prompts`` for ``config.steps`` steps, every rank together. With ``checkpoints``: resume from
    its newest checkpoint, save every ``checkpoint_every_s`` and at the last step. ``log(step, metrics)`` gets every
    step's metrics (rank means)."""
    dp_rank, dp_size = data_parallel_rank(env, pretrain.parallel.tp)
    slots = rank_slots(config.batch, dp_rank, dp_size)
    grid, token_shape = token_layout(pipe, resolution)
    times = inference_timesteps(config.student_steps, pretrain.eval.shift).to(pipe.device)

    def model_fn(model: nn.Module) -> ModelFn:
        runner = dataclasses.replace(pipe, model=model)
        return lambda x, t, text, mask: runner.velocity(x, t, grid, text, mask)

    student_fn, fake_fn, teacher_fn = model_fn(pipe.model), model_fn(fake), model_fn(teacher)
    student = Optimized.build(pipe.model, pretrain.optimizer, config.lr, total_steps=config.steps,
                              warmup_steps=config.warmup_steps)
    fake_score = Optimized.build(fake, pretrain.optimizer, config.fake_lr, total_steps=config.steps * config.fake_updates,
                                 warmup_steps=config.warmup_steps * config.fake_updates)
    # both trainable models in one checkpoint: it holds everything a resume needs
    state = TrainState({"student": student, "fake": fake_score}, checkpoints, steps=config.steps,
                       model_config=to_plain(pipe.model.config), every_s=checkpoint_every_s)
    state.resume()
    uncond = tuple(x.to(pipe.device) for x in pipe.text_encoder.encode([""]))
    pipe.model.train()
    fake.train()
    for step in state.range("distill tdm", show=env.rank == 0):
        d = draw_samples(slots, seed=config.seed, step=step, token_shape=token_shape, n_prompts=len(prompts),
                         config=config, shift=pretrain.eval.shift)
        d = SampleDraws(**{f.name: getattr(d, f.name).to(pipe.device) for f in dataclasses.fields(d)})
        text, mask = (x.to(pipe.device) for x in pipe.text_encoder.encode([prompts[i] for i in d.prompt.tolist()]))
        fake_velocity = partial(fake_fn, text=text, mask=mask)
        x = student_rollout(student_fn, d.noise, d.step, text, mask, times=times,
                            n_steps=_global_max(int(d.step.max()), pipe.device))
        x0_hat = student_x0(student_fn, x, d.step, text, mask, times=times)
        loss, stats = tdm_loss(x0_hat, d.t, d.eps, guided(teacher_fn, (text, mask), uncond, config.teacher_cfg),
                               fake_velocity)
        metrics = {"grad_norm": student.step(loss)}
        fake_losses, fake_norms = [], []
        for update in range(config.fake_updates):
            fake_losses.append(fake_score_loss(fake_velocity, x0_hat, d.fake_t[update], d.fake_eps[update]))
            fake_norms.append(fake_score.step(fake_losses[-1]))
        metrics.update(global_means({**stats, "fake_loss": torch.stack(fake_losses).detach().mean()}),
                       fake_grad_norm=float(np.mean(fake_norms)), lr=student.lr, fake_lr=fake_score.lr)
        done = step + 1
        if log is not None:
            log(done, metrics)
        state.maybe_checkpoint(done)


def seconds_per_image(generate: Generate, texts: Sequence[str], repeats: int = LATENCY_REPEATS) -> float:
    """Best wall time of ``repeats`` runs of ``generate`` on ``texts``, per image (warm the sampler up first)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generate(texts)
        best = min(best, time.perf_counter() - start)
    return best / len(texts)


def evaluate_distillation(student: TextToImage, teacher: TextToImage, config: DistillConfig,
                          pretrain: FinetuneConfig, resolution: int
                          ) -> tuple[dict[str, float], dict[str, list[Image.Image]]]:
    """Held-out checker scores of the student (K steps, no CFG), the teacher (``teacher_eval_steps``, CFG) and the
    naive few-step teacher (K steps, CFG), one noise per prompt for all three, and the student minus each teacher
    (``eval.student_vs_*``, paired by prompt, 95% CIs); then the latency of the student's and
    the teacher's samplers on the first ``LATENCY_PROMPTS`` of those prompts in this process (the scored runs were
    the warm-up), best of ``LATENCY_REPEATS``. Returns (metrics, images by sampler)."""
    eval_cfg = dataclasses.replace(pretrain.eval, n_prompts=config.eval_prompts)
    prompts = held_out_prompts(eval_cfg, resolution)
    texts = [p.text for p in prompts]
    common = {"width": resolution, "height": resolution, "shift": eval_cfg.shift, "seed": eval_cfg.seed}
    samplers: dict[str, Generate] = {
        "teacher": lambda t: teacher.generate(t, steps=config.teacher_eval_steps, cfg_scale=config.teacher_cfg,
                                              **common),
        "student": lambda t: few_step_sample(student, t, steps=config.student_steps, **common),
        "teacher_few_step": lambda t: teacher.generate(t, steps=config.student_steps, cfg_scale=config.teacher_cfg,
                                                       **common),
    }
    images = {name: generate(texts) for name, generate in samplers.items()}
    metrics: dict[str, float] = {}
    results = {name: score_images(generated, prompts) for name, generated in images.items()}
    for name, result in results.items():
        metrics.update(result.metrics(f"eval.{name}"))
    for name in ("teacher", "teacher_few_step"):
        metrics.update(comparison_metrics(results[name], results["student"], f"eval.student_vs_{name}"))
    latency = {name: seconds_per_image(samplers[name], texts[:LATENCY_PROMPTS]) for name in ("student", "teacher")}
    metrics.update({f"latency.{name}_s_per_image": value for name, value in latency.items()})
    metrics["latency.ratio"] = latency["teacher"] / latency["student"]
    return metrics, images


def _publish(pipe: TextToImage, run: StageRun, staging: Path, config: DistillConfig, pretrain: FinetuneConfig,
             teacher: Path, resolution: int) -> StageOutput:
    # the student's weights of the (student + fake) training checkpoint
    publish_checkpoint(staging, run.work_dir / "checkpoints" / ckpt.step_dir_name(config.steps) / ckpt.STEP_WEIGHTS_FILE,
                       ModelIndex.read(teacher), prefix="student.", metrics=run.work_dir / METRICS_FILE)
    (staging / DISTILL_FILE).write_text(json.dumps({"student_steps": config.student_steps,
                                                    "shift": pretrain.eval.shift, "cfg_scale": 1.0}, indent=2))
    # unsharded copies on rank 0 (the other ranks are done), with the frozen autoencoder and text encoder
    metrics, images = evaluate_distillation(
        dataclasses.replace(pipe, model=new_model(staging, pipe.device, seed=pretrain.seed)),
        dataclasses.replace(pipe, model=new_model(teacher, pipe.device, seed=pretrain.seed)),
        config, pretrain, resolution)
    (staging / EVAL_FILE).write_text(json.dumps(metrics, indent=2))
    run.log_metrics(metrics, step=config.steps)
    shown = min(pretrain.eval.grid_size, config.eval_prompts)
    grid = image_grid([image for name in ("teacher", "student", "teacher_few_step") for image in images[name][:shown]],
                      columns=shown)
    grid.save(staging / SAMPLES_FILE)
    run.log_image(grid, f"samples/{DISTILL.name}.png")
    return StageOutput(counts={"steps": config.steps, "student_steps": config.student_steps}, metrics=metrics)
