"""Reinforcement learning (report, "Reinforcement learning"): multi-reward Flow-GRPO without CFG, from the last
preference checkpoint, against a frozen copy of it.

Each round draws ``prompts_per_step`` prompts from the prompt pool (krea2_core/post/prompt_pool.py) and samples
each ``group_size`` times with the SDE sampler (krea2_core/post/flow_sde.py), conditional branch only: the report
trains the whole stage without CFG so rollouts and training see one distribution. The global batch is
prompt-major (prompt i's samples at i*G .. i*G+G-1); each data-parallel rank rolls out its contiguous slice, with
noise seeded by (``pretrain.seed``, round, sample index) so the samples do not depend on the world size, on the
inference grid of the held-out evaluation (``pretrain.eval.shift``). Rank 0 gathers the images, scores them
with the reward service (one Ray actor per reward), turns the scores into group-relative GDPO advantages
(krea2_core/post/rewards.py, clipped to ``adv_clip``) and broadcasts them with the rubric rewards, which every
rank feeds to its copy of the pool (so all ranks draw the same prompts next round).

Training: ``train_timesteps`` of the stochastic steps, drawn by (seed, round), one optimiser step each: the
policy's step mean at the stored state gives the log-probability of the stored next state; the loss is PPO's
clipped ratio objective with the advantages plus ``kl_beta`` times the closed-form KL to the reference's step
(two Gaussians of one std). The learning-rate schedule counts rounds. The SDE's last step is deterministic and
never trained. The reference is the init checkpoint, frozen and parallelised like the policy.

Artifact (kind ``checkpoint``): ``diffusion_pytorch_model.safetensors``, ``config.json`` and ``model_index.json``
(self-describing like a pretraining checkpoint), ``metrics.jsonl`` (raw reward means, advantage std, loss, clip fraction, KL, ratio,
grad norm, lr and pool statistics per round), ``pool.parquet`` (the pool's final per-prompt statistics),
``eval.json`` and ``samples.png``. The evaluation samples held-out prompts with the ODE sampler: the world
checker's score (the rubric reward) of the init model with and without CFG and of the policy without CFG, and the
sample diversity (mean pairwise embedding distance among one prompt's seeds, no CFG) of init and policy.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from krea2_core.common.layout import EVAL_FILE, METRICS_FILE, SAMPLES_FILE
from krea2_core.artifacts import read_manifest, to_plain
from krea2_core.post.config import RLConfig
from krea2_core.training.config import EvalConfig, FinetuneConfig
from krea2_core.curation.embedders import make_embedder
from krea2_core.diffusion.text_to_image import TextToImage
from krea2_core.post.diversity import group_diversity
from krea2_core.post.flow_sde import Rollout, gaussian_kl, gaussian_log_prob, sde_rollout, sde_step
from krea2_core.post.preference import policy_and_reference
from krea2_core.post.prompt_pool import PromptPool, rl_prompts
from krea2_core.post.reward_model import trains_reward_model
from krea2_core.post.reward_service import RewardService
from krea2_core.post.rewards import gdpo_advantages
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput
from krea2_core.tracking import MetricsLog, StageRun
from krea2_core.training import checkpoint as ckpt
from krea2_core.training.distributed_stage import run_distributed_stage
from krea2_core.training.image_model import ModelIndex, new_model, publish_checkpoint
from krea2_core.training.parallel import DistEnv, data_parallel_rank, global_means
from krea2_core.training.trainer import Optimized, TrainState
from krea2_core.evaluation.prompt_following import comparison_metrics, eval_sampler, held_out_prompts, image_grid, \
    score_images
from krea2_core.world.captions import Prompt

POOL_FILE = "pool.parquet"

Log = Callable[[int, dict[str, float]], None]


class RewardScorer(Protocol):
    """What the trainer needs of the reward service: raw scores per reward, NaN where a reward does not apply."""

    def score(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> dict[str, np.ndarray]: ...


def check_rl_config(config: RLConfig, dp_size: int) -> None:
    """What the trainer needs beyond the config's own checks; raises ValueError."""
    grpo = config.grpo
    if config.rewards.weights.get("rubric", 0.0) <= 0:
        raise ValueError("rl.rewards.weights['rubric'] must be > 0: the prompt pool allocates rounds by the rubric "
                         "reward")
    if grpo.samples_per_step % dp_size:
        raise ValueError(f"rl.grpo prompts_per_step x group_size ({grpo.samples_per_step}) must be divisible by the "
                         f"data-parallel size ({dp_size})")


@dataclass
class RLSettings:
    """What the stage depends on: the RL recipe, the resolution and how the checkpoint is trained (not the pretraining stages)."""

    rl: RLConfig
    resolution: int
    trainer: FinetuneConfig


def run_rl_stage(inputs: Mapping[str, Path], settings: RLSettings, parent_run_id: str = "",
                 root: Path | None = None) -> Path | None:
    """Flow-GRPO on the ``init`` checkpoint artifact (also the frozen reference) with the rewards of
    ``settings.rl.rewards`` (the aesthetic one from the ``reward_model`` artifact unless a model is named), at
    ``settings.resolution``. Returns the checkpoint artifact on rank 0, None on the other ranks."""
    config, pretrain, resolution = settings.rl, settings.trainer, settings.resolution
    init = Path(inputs["init"])
    reward_model = Path(inputs["reward_model"]) if "reward_model" in inputs else None
    read_manifest(init, kind="checkpoint")
    if reward_model is not None:
        read_manifest(reward_model, kind="reward_model")
    elif config.rewards.weights.get("aesthetic", 0.0) > 0 and not config.rewards.aesthetic_model:
        raise ValueError("the aesthetic reward needs the reward_model stage's artifact or rl.rewards.aesthetic_model "
                         "(or weight 0)")

    def work(env: DistEnv, scratch: Path, run: StageRun | None, staging: Path | None) -> StageOutput | None:
        pipe, reference = policy_and_reference(pretrain, init, env)
        pool = PromptPool(rl_prompts(config.pool, resolution), config.pool)
        if run is None or staging is None:  # rank 0 alone serves the rewards and logs
            train_grpo(pipe, reference, pool, None, config, pretrain, env, resolution,
                       checkpoints=scratch / "checkpoints", log=None)
            return None
        with RewardService(config.rewards, reward_model) as rewards:
            train_grpo(pipe, reference, pool, rewards, config, pretrain, env, resolution,
                       checkpoints=scratch / "checkpoints",
                       log=MetricsLog(scratch / METRICS_FILE, run, every=config.grpo.log_every, last=config.grpo.steps))
        return _publish(pipe, pool, run, staging, config, pretrain, init, resolution)

    return run_distributed_stage(
        RL.name, work, parallel=pretrain.parallel, view=settings, inputs={k: Path(v) for k, v in inputs.items()},
        check=lambda env: check_rl_config(config, data_parallel_rank(env, pretrain.parallel.tp)[1]),
        parent_run_id=parent_run_id, root=root)


RL = StageSpec("rl", "checkpoint", {"init": "preference_calibration", "reward_model": "reward_model"},
               lambda p: RLSettings(rl=p.post.rl, resolution=p.post.resolution, trainer=p.pretrain.finetune()),
               run_rl_stage, optional={"reward_model": trains_reward_model}, distributed=True)


# --------------------------------------------------------------------------- the objective


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, *, clip_range: float,
              kl: torch.Tensor | None = None, kl_beta: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped objective ``-mean(min(r A, clip(r, 1 - c, 1 + c) A))`` with ``r = exp(log_prob -
    old_log_prob)``, plus ``kl_beta * mean(kl)`` when ``kl`` (per sample) is given. All inputs (B,).
    Returns (loss, detached stats: loss, policy_loss, ratio, clip_fraction and kl when given)."""
    shapes = {name: tuple(x.shape) for name, x in
              (("log_prob", log_prob), ("old_log_prob", old_log_prob), ("advantages", advantages),
               *((("kl", kl),) if kl is not None else ()))}
    if len(set(shapes.values())) != 1 or len(log_prob.shape) != 1 or not len(log_prob):
        raise ValueError(f"grpo_loss needs inputs of one shape (B,) with B >= 1, got {shapes}")
    ratio = torch.exp(log_prob - old_log_prob)
    policy = -torch.minimum(ratio * advantages, ratio.clamp(1 - clip_range, 1 + clip_range) * advantages).mean()
    loss = policy if kl is None else policy + kl_beta * kl.mean()
    stats = {"loss": loss, "policy_loss": policy, "ratio": ratio.mean(),
             "clip_fraction": ((ratio - 1).abs() > clip_range).float().mean()}
    if kl is not None:
        stats["kl"] = kl.mean()
    return loss, {name: value.detach() for name, value in stats.items()}


def train_timesteps(n_stochastic: int, k: int, seed: int, step: int) -> list[int]:
    """The ``k`` of ``n_stochastic`` SDE steps trained in round ``step``, in training order."""
    return np.random.default_rng([seed, step]).permutation(n_stochastic)[:k].tolist()


def reward_metrics(scores: dict[str, np.ndarray], weights: dict[str, float]) -> dict[str, float]:
    """``reward.<name>``: each reward's raw mean over the samples it applies to (left out when none);
    ``reward.total``: the mean over samples of the ``weights``-weighted mean of the rewards that apply."""
    names = sorted(scores)
    table = np.stack([np.asarray(scores[n], dtype=np.float64) for n in names])  # (rewards, samples)
    applies = np.isfinite(table)
    w = np.array([weights[n] for n in names])[:, None] * applies
    out = {f"reward.{n}": float(table[i][applies[i]].mean()) for i, n in enumerate(names) if applies[i].any()}
    per_sample = (np.where(applies, table, 0.0) * w).sum(axis=0) / np.maximum(w.sum(axis=0), 1e-12)
    out["reward.total"] = float(per_sample.mean())
    return out


# --------------------------------------------------------------------------- training


def _gather_images(images: list[Image.Image], tp: int) -> list[Image.Image] | None:
    """Every data-parallel rank's images on rank 0, in global sample order (None elsewhere)."""
    if not dist.is_initialized():
        return images
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(images, parts, dst=0)
    return None if parts is None else [image for part in parts[::tp] for image in part]


def _from_rank0(value: Any) -> Any:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _score_round(rewards: RewardScorer, images: list[Image.Image], prompts: list[Prompt], config: RLConfig
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(clipped GDPO advantages (n,), rubric rewards (prompts, group), reward metrics) of one round."""
    scores = rewards.score(images, prompts)
    weights = {name: config.rewards.weights[name] for name in scores}
    advantages = np.clip(gdpo_advantages(scores, config.grpo.group_size, weights),
                         -config.grpo.adv_clip, config.grpo.adv_clip)
    rubric = np.asarray(scores["rubric"], dtype=np.float64).reshape(-1, config.grpo.group_size)
    return advantages, rubric, {**reward_metrics(scores, weights), "advantage_std": float(advantages.std())}


def _train_on_rollout(pipe: TextToImage, ref_pipe: TextToImage, rollout: Rollout, advantages: torch.Tensor,
                      timesteps: list[int], policy: Optimized, config: RLConfig) -> dict[str, float]:
    """One optimiser step per timestep in ``timesteps`` (the schedule steps by rounds); the rank-averaged stats,
    averaged over the steps."""
    grpo = config.grpo
    times = rollout.times.tolist()
    totals: dict[str, float] = {}
    for i in timesteps:
        x, t = rollout.states[i], torch.full((rollout.states.shape[1],), times[i], device=advantages.device)
        mean, std = sde_step(x, pipe.velocity(x, t, rollout.grid, rollout.text, rollout.mask), times[i],
                             times[i + 1], grpo.noise_level)
        kl = None
        if grpo.kl_beta > 0:
            with torch.no_grad():
                v_ref = ref_pipe.velocity(x, t, rollout.grid, rollout.text, rollout.mask)
            kl = gaussian_kl(mean, sde_step(x, v_ref, times[i], times[i + 1], grpo.noise_level)[0], std)
        loss, stats = grpo_loss(gaussian_log_prob(rollout.states[i + 1], mean, std), rollout.log_probs[i], advantages,
                                clip_range=grpo.clip_range, kl=kl, kl_beta=grpo.kl_beta)
        metrics = global_means(stats)
        metrics["grad_norm"] = policy.step(loss, schedule=False)
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value / len(timesteps)
    return totals


def train_grpo(pipe: TextToImage, reference: torch.nn.Module, pool: PromptPool, rewards: RewardScorer | None,
               config: RLConfig, pretrain: FinetuneConfig, env: DistEnv, resolution: int, *,
               checkpoints: Path | None = None, log: Log | None = None,
               checkpoint_every_s: float = ckpt.CHECKPOINT_EVERY_S) -> None:
    """Optimise ``pipe.model`` (parallelised) for ``config.grpo.steps`` rounds against ``reference``, every rank
    together; ``rewards`` scores the rounds on rank 0 (None elsewhere), ``pool`` (the same prompts on every
    rank) picks them. With ``checkpoints``: resume from its newest checkpoint (model, optimiser, schedule and
    pool), save every ``checkpoint_every_s`` and at the last round. ``log(round, metrics)`` gets every round's
    metrics (call it on rank 0)."""
    grpo = config.grpo
    dp_rank, dp_size = data_parallel_rank(env, pretrain.parallel.tp)
    check_rl_config(config, dp_size)
    if env.rank == 0 and rewards is None:
        raise ValueError("rank 0 scores the rollouts: pass the reward service there")
    ref_pipe = dataclasses.replace(pipe, model=reference)
    per_rank = grpo.samples_per_step // dp_size
    mine = np.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    policy = Optimized.build(pipe.model, pretrain.optimizer, grpo.lr, total_steps=grpo.steps,
                             warmup_steps=grpo.warmup_steps)
    state = TrainState(policy, checkpoints, steps=grpo.steps, model_config=to_plain(pipe.model.config),
                       every_s=checkpoint_every_s)
    extra = state.resume()
    if extra:
        pool.load_state_dict(extra["pool"])
    pipe.model.train()
    for step in state.range("rl grpo", show=env.rank == 0):
        began = time.perf_counter()
        drawn = pool.draw(grpo.prompts_per_step, step)
        batch = [pool.prompts[k] for k in np.repeat(drawn, grpo.group_size)]  # prompt-major
        rollout = sde_rollout(pipe, [batch[j].text for j in mine], mine.tolist(), steps=grpo.sample_steps,
                              shift=pretrain.eval.shift, noise_level=grpo.noise_level, seed=pretrain.seed, step=step,
                              width=resolution, height=resolution)
        images = _gather_images(rollout.images, pretrain.parallel.tp)
        scored = _score_round(rewards, images, batch, config) if env.rank == 0 else None
        advantages, rubric, metrics = _from_rank0(scored)
        pool.update(drawn, rubric)
        timesteps = train_timesteps(grpo.sample_steps - 1, grpo.train_timesteps, pretrain.seed, step)
        metrics.update(_train_on_rollout(
            pipe, ref_pipe, rollout, torch.as_tensor(advantages[mine], dtype=torch.float32, device=env.device),
            timesteps, policy, config))
        metrics["lr"] = policy.lr
        policy.schedule()
        metrics.update(pool.metrics())
        metrics["round_s"] = time.perf_counter() - began
        done = step + 1
        if log is not None:
            log(done, metrics)
        state.maybe_checkpoint(done, extra={"pool": pool.state_dict()})


# --------------------------------------------------------------------------- evaluation and publishing


def evaluate_rl(policy: TextToImage, init: TextToImage, config: RLConfig, eval_cfg: EvalConfig, resolution: int
                ) -> tuple[dict[str, Any], dict[str, list[Image.Image]]]:
    """(eval.json content, the held-out images by setting). Checker scores (``score`` is the rubric reward) of
    ``init_cfg`` (init with ``eval_cfg.cfg_scale``), ``init_nocfg`` and ``policy_nocfg``; ``vs_init_nocfg`` /
    ``vs_init_cfg``: ``policy_nocfg`` minus each, paired by prompt, with 95% CIs; ``diversity``: the mean
    embedding spread of ``config.diversity_samples`` seeds of ``config.diversity_prompts`` prompts, no CFG."""
    prompts = held_out_prompts(dataclasses.replace(eval_cfg, n_prompts=config.eval_prompts), resolution)
    texts = [p.text for p in prompts]
    nocfg = dataclasses.replace(eval_cfg, cfg_scale=1.0)
    settings = {"init_cfg": (init, eval_cfg), "init_nocfg": (init, nocfg), "policy_nocfg": (policy, nocfg)}
    images = {name: eval_sampler(pipe, cfg, resolution)(texts) for name, (pipe, cfg) in settings.items()}
    report: dict[str, Any] = {}
    results = {name: score_images(shown, prompts) for name, shown in images.items()}
    for name, result in results.items():
        report[name] = {"score": result.score, "pass_rate": result.pass_rate, **result.per_kind}
    for start in ("init_nocfg", "init_cfg"):  # the policy without CFG against the start without and with it
        report[f"vs_{start}"] = {key.removeprefix("change."): value for key, value in
                                 comparison_metrics(results[start], results["policy_nocfg"], "change").items()}
    few = [p.text for p in held_out_prompts(dataclasses.replace(eval_cfg, n_prompts=config.diversity_prompts),
                                            resolution)]
    embedder = make_embedder(config.reward_model.embedder)
    report["diversity"] = {}
    for name, pipe in (("init", init), ("policy", policy)):
        seeds = [eval_sampler(pipe, dataclasses.replace(nocfg, seed=eval_cfg.seed + k), resolution)(few)
                 for k in range(config.diversity_samples)]
        report["diversity"][name] = group_diversity([list(group) for group in zip(*seeds, strict=True)], embedder)
    return report, images


def _flat(report: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}.{name}.{key}": float(value) for name, values in report.items() for key, value in values.items()}


def _publish(pipe: TextToImage, pool: PromptPool, run: StageRun, staging: Path, config: RLConfig,
             pretrain: FinetuneConfig, init: Path, resolution: int) -> StageOutput:
    steps = config.grpo.steps
    publish_checkpoint(staging, run.work_dir / "checkpoints" / ckpt.step_dir_name(steps) / ckpt.STEP_WEIGHTS_FILE,
                       ModelIndex.read(init), metrics=run.work_dir / METRICS_FILE)
    pool.table().to_parquet(staging / POOL_FILE, index=False)
    # unsharded copies on rank 0 (the other ranks are done), with the frozen autoencoder and text encoder
    device = pipe.device
    report, images = evaluate_rl(dataclasses.replace(pipe, model=new_model(staging, device, seed=pretrain.seed)),
                                 dataclasses.replace(pipe, model=new_model(init, device, seed=pretrain.seed)),
                                 config, pretrain.eval, resolution)
    (staging / EVAL_FILE).write_text(json.dumps(report, indent=2))
    metrics = {**_flat(report, "eval"), **pool.metrics()}
    run.log_metrics(metrics, step=steps)
    shown = min(pretrain.eval.grid_size, config.eval_prompts)
    grid = image_grid([image for name in ("policy_nocfg", "init_nocfg", "init_cfg") for image in images[name][:shown]],
                      columns=shown)
    grid.save(staging / SAMPLES_FILE)
    run.log_image(grid, "samples/rl.png")
    return StageOutput(counts={"steps": steps, "prompts": len(pool), "samples": steps * config.grpo.samples_per_step},
                       metrics=metrics)
