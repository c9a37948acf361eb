"""RL of the SFT expander through the images its expansions produce (report, "Prompt Expansion").

Prompt mix: ``n_prompts`` realistic user-like world prompts (krea2_core/expander/user_prompts.py) and mined hard
cases. Mining: the SFT expander samples a group of ``group_size`` expansions for each of ``n_candidates`` other user
prompts; their images are scored by the world's checker against the user's rubric, and a probe is kept when its group
is "hard but not hopeless": ``hopeless < mean < too_easy`` and ``std >= min_std`` (every probe and its verdict:
``mined.parquet``). Each round draws ``round(prompts_per_step * hard_fraction)`` distinct hard cases (realistic
prompts fill in when there are too few, counted as ``prompts.hard_missing``) and the rest from the realistic prompts,
seeded by (seed, round), all texts distinct within the round.

Round: the policy samples ``group_size`` expansions per prompt (prompt-major), the distilled image model renders
them (each sample its own noise, seeded by (seed, round, sample)) and every sample gets raw rewards in [0, 1]:
- ``image``: the world checker's score of the image against the USER prompt's rubric;
- ``faithfulness``: the share of the user's requirements the expansion states (NaN when the rubric is empty);
- ``diversity``: the image's mean cosine distance to the other images of its group (``sample_diversity``), kept
  on all along: the report finds the expander collapses to one house style once it fades;
- ``aesthetic`` (weight > 0): the reward_model artifact's score through a sigmoid (a Bradley-Terry score -> (0, 1)).
Safety and constraint checks (``gate_failures``: malformed answer, too long, blocked word, unprompted content) are
gates, not dense rewards: every raw reward of a gated sample is set to 0 before normalisation, so a gated sample is
the worst of its group on every reward (ties only with other zeros). GDPO advantages (post/rewards.py) are clipped
to ``adv_clip``.

Update: the completion tokens' log-probs under the sampling policy (no grad, before any update) and the frozen
reference (the SFT model); ``updates_per_step`` AdamW steps of the token-level clipped ratio objective averaged over
every completion token of the batch, plus ``kl_beta`` times the k3 estimate of KL(policy || reference) per token.
The batch runs in micro-batches of ``MICRO_BATCH`` sequences (gradients accumulated, weighted by token counts) to
bound memory. The policy stays in eval mode (no dropout), so the sampling policy's log-probs are recomputed exactly.
The learning rate follows a WSD schedule over rounds. Single process.

Artifact (kind ``expander``): the policy's HF model dir files (save_expander; load_expander reads it),
``expander.json`` ({"format", "base_model", "image_model": the image checkpoint's digest}), ``metrics.jsonl``,
``mined.parquet``, ``eval.json`` and ``samples.png`` (krea2_core/expander/evaluate.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from krea2_core.common.layout import EVAL_FILE, METRICS_FILE, SAMPLES_FILE
from krea2_core.artifacts import read_manifest
from krea2_core.common.device import resolve_device
from krea2_core.expander.config import ExpanderRLConfig, ExpansionConfig
from krea2_core.training.config import RunConfig
from krea2_core.curation.embedders import Embedder, make_embedder
from krea2_core.diffusion.text_to_image import TextToImage
from krea2_core.expander.evaluate import (
    Expander,
    eval_metrics,
    evaluate_expander,
    expand_prompts,
    render,
    sample_expansions,
)
from krea2_core.expander.faithfulness import faithfulness, gate_failures
from krea2_core.expander.format import Expansion
from krea2_core.expander.model import (ARTIFACT_KIND, INFO_FILE, MICRO_BATCH, Completions, load_expander,
                                       save_expander, token_logprobs)
from krea2_core.expander.user_prompts import prompt_set
from krea2_core.post.diversity import embedding_spread
from krea2_core.post.grpo import grpo_loss, reward_metrics
from krea2_core.post.pairs import call_seed
from krea2_core.post.rewards import LearnedAestheticReward, RubricReward, gdpo_advantages
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import MetricsLog, StageRun
from krea2_core.training.image_model import load_text_to_image
from krea2_core.training.schedules import wsd_scheduler
from krea2_core.world.captions import Prompt

FORMAT = "think-then-expand"
MINED_FILE = "mined.parquet"

Log = Callable[[int, dict[str, float]], None]


@dataclass
class ExpanderRLSettings:
    """What the stage depends on: the RL recipe, the expansion format and gate, the resolution and how the image
    model is run and sampled (the model itself is its checkpoint's), not how the image model was trained."""

    rl: ExpanderRLConfig
    expansion: ExpansionConfig
    resolution: int
    trainer: RunConfig


def run_expander_rl(inputs: Mapping[str, Path], settings: ExpanderRLSettings, parent_run_id: str = "", *,
                    root: Path | None = None) -> Path:
    """GDPO of the ``sft`` expander artifact through the images of the ``image_model`` checkpoint artifact (the
    aesthetic reward from the ``reward_model`` artifact when its weight is > 0), at ``settings.resolution``."""
    config, expansion, pretrain, resolution = settings.rl, settings.expansion, settings.trainer, settings.resolution
    sft, image_model = Path(inputs["sft"]), Path(inputs["image_model"])
    reward_model = Path(inputs["reward_model"]) if "reward_model" in inputs else None
    base_model = _check_inputs(sft, image_model, reward_model, config)

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        device = resolve_device(config.device)
        policy, reference = load_expander(str(sft), str(device)), load_expander(str(sft), str(device))
        policy[1].eval()  # no dropout: the sampling policy's log-probs are recomputed exactly
        reference[1].eval().requires_grad_(False)
        pipe = load_text_to_image(image_model, pretrain.parallel, device, seed=pretrain.seed)
        pipe.model.eval().requires_grad_(False)
        realistic = distinct(prompt_set("train", config.n_prompts, expansion, resolution))
        if len(realistic) < config.prompts_per_step:
            raise ValueError(f"only {len(realistic)} distinct realistic prompts for prompts_per_step="
                             f"{config.prompts_per_step}: raise n_prompts")
        candidates = distinct(prompt_set("mining", config.n_candidates, expansion, resolution))
        mined = mine_hard_cases(policy, pipe, candidates, config, expansion, pretrain, resolution)
        mined.to_parquet(staging / MINED_FILE, index=False)
        hard = [p for p, kept in zip(candidates, mined["kept"], strict=True) if kept]
        rewards = ExpanderRewards(config, reward_model)
        log = MetricsLog(staging / METRICS_FILE, run, every=config.log_every, last=config.steps)
        train_expander(policy, reference, pipe, rewards, realistic, hard, config, expansion, pretrain, resolution,
                       log)

        save_expander(*policy, staging)
        info = {"format": FORMAT, "base_model": base_model, "image_model": read_manifest(image_model).digest}
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
        report, grid = evaluate_expander({"sft": reference, "rl": policy}, pipe, config, expansion, pretrain,
                                         resolution)
        (staging / EVAL_FILE).write_text(json.dumps(report, indent=2))
        grid.save(staging / SAMPLES_FILE)
        run.log_image(grid, "samples/expander_rl.png")
        metrics = {**eval_metrics(report), "mined.kept": float(len(hard))}
        return StageOutput(counts={"steps": config.steps, "prompts": len(realistic), "candidates": len(candidates),
                                   "hard_cases": len(hard),
                                   "samples": config.steps * config.prompts_per_step * config.group_size},
                           metrics=metrics)

    return execute_stage(EXPANDER_RL.name, EXPANDER_RL.kind, body, config=settings, inputs=dict(inputs),
                         parent_run_id=parent_run_id, root=root)[0]


# the whole pipeline trains the expander through the distilled model (the sampler users get); the aesthetic reward
# model, when the expander weighs that reward, is the one post-training trains
EXPANDER_RL = StageSpec("expander_rl", ARTIFACT_KIND, {"sft": "expander_sft", "image_model": "distill",
                                              "reward_model": "reward_model"},
                        lambda p: ExpanderRLSettings(rl=p.expander.rl, expansion=p.expander.expansion,
                                                     resolution=p.post.resolution, trainer=p.pretrain.run_config()),
                        run_expander_rl,
                        optional={"reward_model": lambda p: p.expander.rl.weights.get("aesthetic", 0.0) > 0})


def _check_inputs(sft: Path, image_model: Path, reward_model: Path | None, config: ExpanderRLConfig) -> str:
    """Fail before any work on inputs the stage cannot use; returns the SFT expander's base model id."""
    read_manifest(sft, kind=ARTIFACT_KIND)
    read_manifest(image_model, kind="checkpoint")
    if reward_model is not None:
        read_manifest(reward_model, kind="reward_model")
    elif config.weights.get("aesthetic", 0.0) > 0:
        raise ValueError("expander rl: the aesthetic reward (weight > 0) needs the reward_model stage's artifact "
                         "(or give it weight 0)")
    info = sft / INFO_FILE
    if not info.is_file():
        raise ValueError(f"{sft}: {INFO_FILE} is missing: not an SFT expander artifact")
    return str(json.loads(info.read_text())["base_model"])


def distinct(prompts: Sequence[Prompt]) -> list[Prompt]:
    """``prompts`` without repeated texts (the first of each kept)."""
    first: dict[str, Prompt] = {}
    for prompt in prompts:
        first.setdefault(prompt.text, prompt)
    return list(first.values())


# --------------------------------------------------------------------------- rewards and gates


def sample_diversity(embeddings: np.ndarray) -> np.ndarray:
    """(P, K, D) unit-norm embeddings of K samples per prompt -> (P, K): each sample's mean cosine distance to the
    other K - 1 samples of its prompt. Its mean over samples is ``embedding_spread`` (each pair counted from both
    ends); the pair distance is ``embedding_spread`` of the pair, so the two share one definition."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 3 or embeddings.shape[1] < 2:
        raise ValueError(f"embeddings must have shape (prompts, samples >= 2, dim), got {embeddings.shape}")
    p, k, d = embeddings.shape
    first, second = np.nonzero(~np.eye(k, dtype=bool))  # ordered pairs, first-major: k - 1 per sample
    pairs = np.stack([embeddings[:, first], embeddings[:, second]], axis=2).reshape(-1, 2, d)
    return embedding_spread(pairs).reshape(p, k, k - 1).mean(axis=2)


class ExpanderRewards:
    """Raw per-sample rewards (module docstring) of a prompt-major batch of groups of ``config.group_size``."""

    def __init__(self, config: ExpanderRLConfig, reward_model: Path | None) -> None:
        self.group_size = config.group_size
        self.embedder: Embedder = make_embedder(config.embedder)
        self.aesthetic = (LearnedAestheticReward(Path(reward_model))
                          if config.weights.get("aesthetic", 0.0) > 0 and reward_model is not None else None)

    def __call__(self, prompts: Sequence[Prompt], expansions: Sequence[Expansion], images: Sequence[Image.Image]
                 ) -> dict[str, np.ndarray]:
        embeddings = self.embedder.embed(list(images))
        scores = {
            "image": RubricReward().score(images, prompts),
            "faithfulness": np.array([faithfulness(p.rubric, e.text) for p, e in zip(prompts, expansions,
                                                                                     strict=True)]),
            "diversity": sample_diversity(embeddings.reshape(-1, self.group_size, embeddings.shape[-1])).reshape(-1),
        }
        if self.aesthetic is not None:
            scores["aesthetic"] = 1.0 / (1.0 + np.exp(-self.aesthetic.score(images, prompts)))
        return scores


def gate(scores: dict[str, np.ndarray], failed: np.ndarray) -> dict[str, np.ndarray]:
    """Every reward of the ``failed`` samples set to 0 (the rewards lie in [0, 1]: the worst of the group)."""
    return {name: np.where(failed, 0.0, values) for name, values in scores.items()}


def gate_metrics(reasons: Sequence[Sequence[str]]) -> dict[str, float]:
    """``gate.pass_rate`` and ``gate.<reason>``: how many samples failed each check."""
    counts: dict[str, float] = {}
    for failed in reasons:
        for reason in failed:
            counts[f"gate.{reason}"] = counts.get(f"gate.{reason}", 0.0) + 1
    return {"gate.pass_rate": float(np.mean([not failed for failed in reasons])), **counts}


# --------------------------------------------------------------------------- the prompt mix


def mining_verdicts(rewards: np.ndarray, config: ExpanderRLConfig) -> list[str]:
    """(probes, group) image rewards -> per probe "kept", "hopeless", "too_easy" or "no_signal" (std below
    ``min_std``): kept groups have intermediate means and real variance."""
    rewards = np.asarray(rewards, dtype=np.float64)
    mean, std = rewards.mean(axis=1), rewards.std(axis=1)
    return ["hopeless" if m <= config.hopeless else "too_easy" if m >= config.too_easy
            else "no_signal" if s < config.min_std else "kept" for m, s in zip(mean, std, strict=True)]


def mine_hard_cases(expander: Expander, pipe: TextToImage, candidates: Sequence[Prompt], config: ExpanderRLConfig,
                    expansion: ExpansionConfig, pretrain: RunConfig, resolution: int) -> pd.DataFrame:
    """One group of ``group_size`` sampled expansions per candidate -> images -> image rewards -> a row per
    candidate: prompt, rubric (JSON), mean, std, kept, reason."""
    g = config.group_size
    rewards = np.empty((len(candidates), g))
    chunk = config.prompts_per_step
    for start in tqdm(range(0, len(candidates), chunk), desc="expander rl: mine", mininterval=5):
        probes = candidates[start:start + chunk]
        texts = [e.text for e in expand_prompts(expander, probes, config, expansion, n=g, salt=f"mine/{start}")]
        images = render(pipe, texts, config, pretrain, resolution, salt=f"mine/{start}")
        rewards[start:start + len(probes)] = RubricReward().score(
            images, [p for p in probes for _ in range(g)]).reshape(-1, g)
    reasons = mining_verdicts(rewards, config) if len(candidates) else []
    return pd.DataFrame({"prompt": [p.text for p in candidates],
                         "rubric": [json.dumps([r.to_dict() for r in p.rubric]) for p in candidates],
                         "mean": rewards.mean(axis=1), "std": rewards.std(axis=1),
                         "kept": [r == "kept" for r in reasons], "reason": reasons})


def round_prompts(realistic: Sequence[Prompt], hard: Sequence[Prompt], config: ExpanderRLConfig, step: int
                  ) -> tuple[list[Prompt], dict[str, float]]:
    """Round ``step``'s prompts (hard cases first) and counts ``prompts.hard``, ``prompts.realistic``,
    ``prompts.hard_missing`` (hard slots realistic prompts filled). Seeded by (seed, step); texts distinct."""
    rng = np.random.default_rng([config.seed, step])
    wanted = round(config.prompts_per_step * config.hard_fraction)
    chosen = [hard[i] for i in rng.permutation(len(hard))[:wanted]]
    taken = {p.text for p in chosen}
    rest = [realistic[i] for i in rng.permutation(len(realistic)) if realistic[i].text not in taken]
    need = config.prompts_per_step - len(chosen)
    if len(rest) < need:
        raise ValueError(f"round {step}: {need} realistic prompts needed, only {len(rest)} distinct ones left")
    counts = {"prompts.hard": float(len(chosen)), "prompts.realistic": float(need),
              "prompts.hard_missing": float(wanted - len(chosen))}
    return chosen + rest[:need], counts


# --------------------------------------------------------------------------- the objective


def k3_kl(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) from tokens the policy sampled: ``exp(d) - d - 1`` with
    ``d = ref_log_prob - log_prob``; >= 0, 0 where the two agree, unbiased in expectation."""
    d = ref_log_prob - log_prob
    return torch.exp(d) - d - 1


def token_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, ref_log_prob: torch.Tensor,
               advantages: torch.Tensor, mask: torch.Tensor, *, clip_range: float, kl_beta: float
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped ratio objective per completion token (each carrying its sequence's advantage), plus
    ``kl_beta`` times the k3 KL, averaged over the ``mask``ed tokens. Log-probs and mask (B, T), advantages (B,).
    Returns post/grpo.grpo_loss's (loss, stats) over the masked tokens."""
    if log_prob.ndim != 2 or not (log_prob.shape == old_log_prob.shape == ref_log_prob.shape == mask.shape) \
            or advantages.shape != log_prob.shape[:1]:
        raise ValueError(f"token_loss needs (B, T) log-probs and mask and (B,) advantages, got {tuple(log_prob.shape)},"
                         f" {tuple(old_log_prob.shape)}, {tuple(ref_log_prob.shape)}, {tuple(mask.shape)}, "
                         f"{tuple(advantages.shape)}")
    mask = mask.bool()
    per_token = advantages[:, None].expand_as(log_prob)
    return grpo_loss(log_prob[mask], old_log_prob[mask], per_token[mask], clip_range=clip_range,
                     kl=k3_kl(log_prob, ref_log_prob)[mask], kl_beta=kl_beta)


def _update(policy: Any, reference: Any, completions: Completions, advantages: torch.Tensor,
            optimizer: torch.optim.Optimizer, config: ExpanderRLConfig) -> dict[str, float]:
    """``updates_per_step`` optimiser steps on one sampled batch; stats averaged over tokens and steps."""
    device = advantages.device
    ids, attention = completions.input_ids.to(device), completions.attention_mask.to(device)
    mask = completions.completion_mask.to(device).bool()
    parts = [slice(s, s + MICRO_BATCH) for s in range(0, len(ids), MICRO_BATCH)]
    parts = [s for s in parts if mask[s].any()]
    total = int(mask.sum())
    if not total:
        raise ValueError("the sampled batch has no completion tokens to train on")
    with torch.no_grad():
        old = [token_logprobs(policy, ids[s], attention[s]) for s in parts]
        ref = [token_logprobs(reference, ids[s], attention[s]) for s in parts]
    totals: dict[str, float] = {}
    for _ in range(config.updates_per_step):
        for s, old_lp, ref_lp in zip(parts, old, ref, strict=True):
            share = float(mask[s].sum()) / total
            loss, stats = token_loss(token_logprobs(policy, ids[s], attention[s]), old_lp, ref_lp, advantages[s],
                                     mask[s], clip_range=config.clip_range, kl_beta=config.kl_beta)
            (loss * share).backward()
            for name, value in stats.items():
                totals[name] = totals.get(name, 0.0) + float(value) * share / config.updates_per_step
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip)
        totals["grad_norm"] = totals.get("grad_norm", 0.0) + float(norm) / config.updates_per_step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return totals


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Round:
    """One round's rollout: the round's prompts per sample (prompt-major), answers, expansions and images."""

    prompts: list[Prompt]
    completions: Completions
    expansions: list[Expansion]
    images: list[Image.Image]


def rollout(expander: Expander, pipe: TextToImage, prompts: Sequence[Prompt], config: ExpanderRLConfig,
            expansion: ExpansionConfig, pretrain: RunConfig, resolution: int, step: int) -> Round:
    """``group_size`` sampled expansions per prompt and their images; answers seeded by (seed, step), image i's
    noise by (seed, step, i): a group's samples get different noise."""
    completions, expansions = sample_expansions(expander, prompts, config, expansion, n=config.group_size,
                                                seed=call_seed(config.seed, f"round/{step}/answers", 0))
    images = render(pipe, [e.text for e in expansions], config, pretrain, resolution, salt=f"round/{step}")
    return Round([p for p in prompts for _ in range(config.group_size)], completions, expansions, images)


def score_round(batch: Round, rewards: Callable[..., dict[str, np.ndarray]], config: ExpanderRLConfig,
                expansion: ExpansionConfig) -> tuple[np.ndarray, dict[str, float]]:
    """(clipped GDPO advantages (n,), metrics: raw reward means, gate pass rate and failures, advantage std)."""
    raw = rewards(batch.prompts, batch.expansions, batch.images)
    reasons = [gate_failures(p.rubric, e, expansion) for p, e in zip(batch.prompts, batch.expansions, strict=True)]
    failed = np.array([bool(r) for r in reasons])
    weights = {name: config.weights.get(name, 0.0) for name in raw}
    advantages = np.clip(gdpo_advantages(gate(raw, failed), config.group_size, weights),
                         -config.adv_clip, config.adv_clip)
    return advantages, {**reward_metrics(raw, weights), **gate_metrics(reasons),
                        "advantage_std": float(advantages.std())}


def train_expander(policy: Expander, reference: Expander, pipe: TextToImage,
                   rewards: Callable[..., dict[str, np.ndarray]], realistic: Sequence[Prompt],
                   hard: Sequence[Prompt], config: ExpanderRLConfig, expansion: ExpansionConfig,
                   pretrain: RunConfig, resolution: int, log: Log | None = None) -> None:
    """``config.steps`` rounds of GDPO on ``policy``'s model (in place) against ``reference``'s;
    ``log(round, metrics)`` gets every round's metrics (rounds count from 1)."""
    model = policy[1]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=0.0)
    scheduler = wsd_scheduler(optimizer, total_steps=config.steps, warmup_steps=config.warmup_steps,
                              decay_fraction=0.0)
    device = next(model.parameters()).device
    for step in tqdm(range(config.steps), desc="expander rl", mininterval=5):
        began = time.perf_counter()
        prompts, counts = round_prompts(realistic, hard, config, step)
        batch = rollout(policy, pipe, prompts, config, expansion, pretrain, resolution, step)
        advantages, metrics = score_round(batch, rewards, config, expansion)
        metrics.update(_update(model, reference[1], batch.completions,
                               torch.as_tensor(advantages, dtype=torch.float32, device=device), optimizer, config))
        metrics["lr"] = scheduler.get_last_lr()[0]
        scheduler.step()
        metrics["completion_tokens"] = float(batch.completions.completion_mask.sum(dim=1).float().mean())
        metrics.update(counts)
        metrics["round_s"] = time.perf_counter() - began
        if log is not None:
            log(step + 1, metrics)
