"""Configs of the prompt expander: its SFT data, SFT, GDPO RL and what they share (prompts, gate, answer length)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from krea2_core.captioning.config import SMOLLM2_GGUF
from krea2_core.common.strict import Strict, require
from krea2_core.curation.config import EmbedderConfig
from krea2_core.world.config import SceneDomainConfig


EXPANDER_REWARDS = ("image", "faithfulness", "diversity", "aesthetic")


@dataclass
class ExpanderDataConfig(Strict):
    """SFT data (report, "Prompt Expansion"): a writer LLM turns long captions into short, conversational user
    prompts that leave visual details out, and writes a short intent-reconstruction trace; the long caption is the
    expansion. Artistic captions are oversampled and a share of photographic ones name the photographic medium."""

    writer_model: str = SMOLLM2_GGUF
    n_pairs: int = 24  # captions drawn (without replacement, capped at the table's usable rows)
    user_words: int = 14  # a written user prompt is cut to this many words
    thinking_words: int = 30
    max_new_tokens: int = 40
    batch_size: int = 8
    # a caption is artistic / photographic when it contains one of these whole words (case-insensitive)
    artistic_words: list[str] = field(default_factory=lambda: [
        "illustration", "drawing", "painting", "graphic", "cartoon", "clipart", "sketch", "art", "artwork",
        "stylized", "watercolor", "poster", "icon"])
    photo_words: list[str] = field(default_factory=lambda: ["photo", "photograph", "photography", "realistic",
                                                            "camera", "shot"])
    artistic_weight: float = 2.0  # sampling weight of an artistic caption relative to any other
    photo_bias: float = 0.5  # share of photographic captions whose expansion opens with a photographic medium
    val_fraction: float = 0.1  # pairs held out for the SFT validation loss
    seed: int = 50_000
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        require(bool(self.writer_model), "writer_model is required")
        require(min(self.n_pairs, self.user_words, self.thinking_words, self.batch_size) >= 1
                and self.max_new_tokens >= 8, "n_pairs, user_words, thinking_words, batch_size must be >= 1 and "
                                              "max_new_tokens >= 8")
        require(self.artistic_weight > 0, f"artistic_weight must be > 0, got {self.artistic_weight}")
        require(0.0 <= self.photo_bias <= 1.0, f"photo_bias must be in [0, 1], got {self.photo_bias}")
        require(0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class ExpanderSFTConfig(Strict):
    """Supervised finetuning of an open causal LLM (hub id, local directory, or the offline SmolLM2) on
    user prompt -> thinking trace + expansion, loss on the answer tokens only."""

    model_id: str = SMOLLM2_GGUF
    steps: int = 12  # optimiser steps (why 12 for SmolLM2-135M: docs/presets.md)
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 2
    max_tokens: int = 192  # longer examples are cut (and counted)
    grad_clip: float = 1.0
    eval_prompts: int = 8  # world user prompts expanded greedily after training: format and faithfulness
    seed: int = 0
    log_every: int = 5
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        require(bool(self.model_id), "model_id is required")
        require(min(self.steps, self.batch_size, self.eval_prompts, self.log_every) >= 1 and self.lr > 0,
                "steps, batch_size, eval_prompts, log_every and lr must be > 0")
        require(self.max_tokens >= 32, f"max_tokens must be >= 32, got {self.max_tokens}")
        require(0 <= self.warmup_steps < self.steps, f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        require(self.grad_clip > 0 and self.weight_decay >= 0, "grad_clip must be > 0 and weight_decay >= 0")


@dataclass
class ExpanderRLConfig(Strict):
    """GDPO on the expander through the images its expansions produce (report, "Prompt Expansion"): per-reward
    group normalisation, then a weighted sum; safety/constraint checks gate the rewards; the diversity reward
    (each image's mean embedding distance to its group) stays on all along."""

    steps: int = 3  # rounds: one sampled batch and ``updates_per_step`` optimiser steps each
    prompts_per_step: int = 4
    group_size: int = 4
    hard_fraction: float = 0.25  # share of each round's prompts drawn from the mined hard cases
    n_prompts: int = 48  # realistic user-like world prompts
    n_candidates: int = 8  # probes scored by the SFT expander; the hard-but-not-hopeless ones are kept
    hopeless: float = 0.1  # group mean image reward at or below which a probe is hopeless
    too_easy: float = 0.9  # ... at or above which it is too easy
    min_std: float = 0.02  # ... group std below which it carries no signal
    seed: int = 61_000  # round draws, answers and image noise
    weights: dict[str, float] = field(default_factory=lambda: {"image": 1.0, "faithfulness": 1.0,
                                                               "diversity": 0.5, "aesthetic": 0.0})
    temperature: float = 1.0
    top_p: float = 0.95
    lr: float = 1e-5
    warmup_steps: int = 1
    updates_per_step: int = 1  # > 1 reuses a batch; the clipped ratio then bounds each update
    clip_range: float = 0.2
    kl_beta: float = 0.02
    adv_clip: float = 5.0
    grad_clip: float = 1.0
    image_steps: int = 4  # the image model's sampler (the tiny default samples the 4-step distilled student)
    image_cfg: float = 1.0
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)  # diversity
    eval_prompts: int = 8
    diversity_prompts: int = 4
    diversity_samples: int = 4
    log_every: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(EXPANDER_REWARDS)
        require(not unknown, f"weights: unknown rewards {sorted(unknown)}; use {list(EXPANDER_REWARDS)}")
        require(all(w >= 0 for w in self.weights.values()) and any(w > 0 for w in self.weights.values()),
                f"weights must be >= 0 with at least one > 0, got {self.weights}")
        require(min(self.steps, self.prompts_per_step, self.updates_per_step, self.image_steps, self.eval_prompts,
                    self.diversity_prompts, self.log_every) >= 1,
                "steps, prompts_per_step, updates_per_step, image_steps, eval_prompts, diversity_prompts, log_every "
                "must be >= 1")
        require(self.n_prompts >= self.prompts_per_step,
                f"n_prompts ({self.n_prompts}) must be >= prompts_per_step ({self.prompts_per_step}): a round draws "
                f"distinct prompts")
        require(self.group_size >= 2 and self.diversity_samples >= 2,
                "group_size and diversity_samples must be >= 2 (rewards and diversity are relative to the group)")
        require(0.0 <= self.hard_fraction <= 1.0 and self.n_candidates >= 0,
                "hard_fraction must be in [0, 1] and n_candidates >= 0")
        require(0.0 <= self.hopeless < self.too_easy <= 1.0 and self.min_std >= 0,
                "need 0 <= hopeless < too_easy <= 1 and min_std >= 0")
        require(self.temperature > 0 and 0 < self.top_p <= 1, "temperature must be > 0 and top_p in (0, 1]")
        require(self.lr > 0 and self.clip_range > 0 and self.kl_beta >= 0 and self.adv_clip > 0
                and self.grad_clip > 0, "lr, clip_range, adv_clip, grad_clip must be > 0 and kl_beta >= 0")
        require(0 <= self.warmup_steps < self.steps, f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        require(self.image_cfg >= 1.0, f"image_cfg must be >= 1, got {self.image_cfg}")


@dataclass
class ExpansionConfig(Strict):
    """What SFT's evaluation and RL share: the world user prompts expansions are judged on (training, mining and
    held-out sets, seeded apart from each other by ``seed``), the safety/constraint gate, and the answer length."""

    seed: int = 60_000
    scenes: SceneDomainConfig = field(default_factory=SceneDomainConfig)
    blocked_words: list[str] = field(default_factory=lambda: [
        "nude", "naked", "gore", "blood", "corpse", "weapon", "gun", "kill", "violence", "drugs"])
    max_words: int = 90  # longer expansions fail the constraint gate (the tiny image model reads 80 tokens)
    max_new_tokens: int = 112  # thinking + expansion

    def __post_init__(self) -> None:
        require(self.max_words >= 1, f"max_words must be >= 1, got {self.max_words}")
        require(self.max_new_tokens >= 16, f"max_new_tokens must be >= 16, got {self.max_new_tokens}")


@dataclass
class ExpanderConfig(Strict):
    expansion: ExpansionConfig = field(default_factory=ExpansionConfig)
    data: ExpanderDataConfig = field(default_factory=ExpanderDataConfig)
    sft: ExpanderSFTConfig = field(default_factory=ExpanderSFTConfig)
    rl: ExpanderRLConfig = field(default_factory=ExpanderRLConfig)
