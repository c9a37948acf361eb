"""Configs of post-training: midtraining, SFT per domain and merging, preference optimisation, RL (rewards, the
reward model, the prompt pool, Flow-GRPO) and TDM distillation. The defaults are the tiny preset's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from krea2_core.captioning.config import OcrConfig
from krea2_core.common.strict import Strict, require
from krea2_core.curation.config import EmbedderConfig
from krea2_core.training.config import PretrainStageConfig
from krea2_core.world.config import SceneDomainConfig


@dataclass
class MidtrainDomain(Strict):
    """One top-down domain of the midtraining mix: images of these sources whose long caption names one of these
    words (an empty list matches everything), at this share of the mix."""

    share: float
    sources: list[str] = field(default_factory=list)
    keywords: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(0.0 < self.share <= 1.0, f"share must be in (0, 1], got {self.share}")


@dataclass
class MidtrainConfig(Strict):
    """Midtraining: the last pretraining checkpoint continues at the preset's highest resolution on a mix whose
    domains/sources are chosen first (``domains``, in order) and filled from the semantic-curation sample."""

    domains: dict[str, MidtrainDomain] = field(default_factory=lambda: {
        "text_rendering": MidtrainDomain(share=0.3, keywords=["word", "text", "reads", "letters"]),
        "world": MidtrainDomain(share=0.7, sources=["world"]),
    })
    n_images: int = 64
    stage: PretrainStageConfig = field(default_factory=lambda: PretrainStageConfig(
        resolution=64, steps=12, global_batch=8, lr=1e-4, warmup_steps=2, timestep_shift=2.0, pma_checkpoints=3,
        pma_interval=3, val_every=12))

    def __post_init__(self) -> None:
        require(bool(self.domains), "midtraining needs at least one domain")
        total = sum(d.share for d in self.domains.values())
        require(abs(total - 1.0) < 1e-6, f"domain shares must sum to 1, got {total}")
        require(self.n_images >= self.stage.global_batch,
                f"n_images ({self.n_images}) must fill at least one global batch ({self.stage.global_batch})")


@dataclass
class SFTDomainConfig(Strict):
    """One small, hand-curated domain set. On the world it is rendered from ``scenes`` (perfect images of one
    visual domain); its held-out evaluation prompts come from the same slice."""

    scenes: SceneDomainConfig
    n_images: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.n_images >= 1, f"n_images must be >= 1, got {self.n_images}")


def warm_and_cool_domains() -> dict[str, SFTDomainConfig]:
    """Every preset's SFT domains: two disjoint palettes of large shapes, any background, no text (why:
    docs/presets.md)."""
    colors = ("red", "orange", "yellow", "green", "cyan", "blue", "purple")
    big = {"large": 2.0, "medium": 1.0, "small": 0.0}
    return {name: SFTDomainConfig(seed=seed, scenes=SceneDomainConfig(max_shapes=2, text_prob=0.0, weights={
        "color": {c: float(c in palette) for c in colors}, "size": big}))
        for name, seed, palette in (("warm", 1, ("red", "orange", "yellow")), ("cool", 2, ("cyan", "blue", "purple")))}


@dataclass
class SFTConfig(Strict):
    """Supervised finetuning: one checkpoint per domain, from the midtraining checkpoint, with one recipe."""

    domains: dict[str, SFTDomainConfig] = field(default_factory=warm_and_cool_domains)
    # a low learning rate, for the merge (why 5e-5: docs/presets.md)
    stage: PretrainStageConfig = field(default_factory=lambda: PretrainStageConfig(
        resolution=64, steps=30, global_batch=8, lr=5e-5, warmup_steps=3, decay_fraction=0.3, timestep_shift=2.0,
        pma_checkpoints=3, pma_interval=5, val_every=30))
    eval_prompts: int = 16  # held-out prompts per domain

    def __post_init__(self) -> None:
        require(len(self.domains) >= 1, "SFT needs at least one domain")
        for name, domain in self.domains.items():
            require(domain.n_images >= self.stage.global_batch,
                    f"domains.{name}.n_images ({domain.n_images}) must fill a global batch ({self.stage.global_batch})")


@dataclass
class MergeConfig(Strict):
    """Merging the domain SFT checkpoints into one generalist (weights are per domain; missing ones weigh 1)."""

    # why uniform: docs/presets.md
    method: Literal["uniform", "weighted", "task_arithmetic", "ties"] = "uniform"
    weights: dict[str, float] = field(default_factory=dict)
    density: float = 0.5  # ties: fraction of each task vector's entries kept (largest magnitudes)
    scale: float = 1.0  # task_arithmetic / ties: multiplier of the merged task vector added to the base
    compare: bool = False  # also evaluate the other methods (logged; the artifact holds ``method``)

    def __post_init__(self) -> None:
        require(0.0 < self.density <= 1.0, f"density must be in (0, 1], got {self.density}")
        require(self.scale > 0, f"scale must be > 0, got {self.scale}")
        require(all(w >= 0 for w in self.weights.values()), f"weights must be >= 0, got {self.weights}")


@dataclass
class SamplerConfig(Strict):
    """How one side of a preference pair is sampled: which checkpoint (``policy`` is the model being optimised,
    ``previous`` an earlier, weaker one) and which sampler settings."""

    checkpoint: Literal["policy", "previous"] = "policy"
    steps: int = 12
    cfg_scale: float = 4.0

    def __post_init__(self) -> None:
        require(self.steps >= 1 and self.cfg_scale >= 1.0, "steps must be >= 1 and cfg_scale >= 1")


@dataclass
class PairsConfig(Strict):
    """Synthetic preference pairs (delta-learning style): the policy's own sample against an opponent from a
    weaker checkpoint or sampler; ``off_policy_fraction`` of pairs use two off-policy samples."""

    n_prompts: int = 48
    policy: SamplerConfig = field(default_factory=SamplerConfig)
    opponents: list[SamplerConfig] = field(default_factory=lambda: [
        SamplerConfig(checkpoint="previous"), SamplerConfig(steps=4, cfg_scale=1.5), SamplerConfig()])
    off_policy_fraction: float = 0.2
    min_margin: float = 0.05  # oracle score difference below which a pair is a tie (skipped)
    seed: int = 20_000  # prompts apart from the pool and the evaluation prompts

    def __post_init__(self) -> None:
        require(self.n_prompts >= 1, f"n_prompts must be >= 1, got {self.n_prompts}")
        require(self.policy.checkpoint == "policy", "pairs.policy must sample the policy checkpoint")
        require(bool(self.opponents), "pairs.opponents needs at least one sampler")
        require(0.0 <= self.off_policy_fraction < 0.5,
                f"off_policy_fraction must be in [0, 0.5) (most pairs are on-policy), got {self.off_policy_fraction}")
        require(self.min_margin >= 0, f"min_margin must be >= 0, got {self.min_margin}")


@dataclass
class PreferenceLossConfig(Strict):
    """Diffusion-DPO, or STPO = DPO with a capped margin and hinges that stop the winner's and the loser's
    likelihood falling below the reference's (formula in krea2_core/post/preference_loss.py)."""

    kind: Literal["dpo", "stpo"] = "stpo"
    beta: float = 2000.0
    winner_weight: float = 1.0  # STPO: hinge on the winner's likelihood falling
    loser_weight: float = 0.5  # STPO: hinge on the loser's likelihood falling further than loser_tolerance
    loser_tolerance: float = 0.002  # STPO: in flow-MSE units
    max_margin: float = 5.0  # STPO: the DPO logit stops pushing once beta * margin exceeds this

    def __post_init__(self) -> None:
        require(self.beta > 0, f"beta must be > 0, got {self.beta}")
        require(min(self.winner_weight, self.loser_weight, self.loser_tolerance) >= 0 and self.max_margin > 0,
                "winner_weight, loser_weight, loser_tolerance must be >= 0 and max_margin > 0")


@dataclass
class PreferenceStageConfig(Strict):
    """One preference-optimisation stage: synthetic pairs first, then calibration on human annotations."""

    steps: int
    global_batch: int = 8  # pairs per step
    lr: float = 2e-5
    warmup_steps: int = 2
    log_every: int = 5

    def __post_init__(self) -> None:
        require(self.steps >= 1 and self.global_batch >= 1 and self.lr > 0, "steps, global_batch, lr must be > 0")
        require(0 <= self.warmup_steps < self.steps, f"warmup_steps must be in [0, steps), got {self.warmup_steps}")


@dataclass
class PreferenceConfig(Strict):
    pairs: PairsConfig = field(default_factory=PairsConfig)
    loss: PreferenceLossConfig = field(default_factory=PreferenceLossConfig)
    # the tiny preset's lr is large (why: docs/presets.md)
    synthetic: PreferenceStageConfig = field(default_factory=lambda: PreferenceStageConfig(steps=30, lr=1e-4))
    calibration: PreferenceStageConfig = field(default_factory=lambda: PreferenceStageConfig(steps=10, lr=5e-5))
    # a human annotation set: a folder (local, or an object-store URI for a remote run) with annotations.parquet
    # (schema Annotations) and the images it names; "" = simulated annotators
    annotations: str = ""
    simulated_annotations: int = 16  # pairs the simulated annotators label when ``annotations`` is ""
    simulated_label_noise: float = 0.1  # probability a simulated annotator picks the worse image
    eval_prompts: int = 16  # held-out prompts for the preferred-rate over the reference
    timestep_shift: float = 2.0  # of the training timesteps: the SFT stage's at the same resolution

    def __post_init__(self) -> None:
        require(0.0 <= self.simulated_label_noise < 0.5,
                f"simulated_label_noise must be in [0, 0.5), got {self.simulated_label_noise}")
        require(self.simulated_annotations >= 1 and self.eval_prompts >= 1,
                "simulated_annotations and eval_prompts must be >= 1")
        require(self.timestep_shift > 0, f"timestep_shift must be > 0, got {self.timestep_shift}")


REWARD_NAMES = ("rubric", "aesthetic", "text", "artifact")


@dataclass
class RewardsConfig(Strict):
    """RL rewards (report, "Reinforcement learning"): each served by its own Ray actor, apart from the trainer;
    normalised within each prompt's group, then summed with ``weights`` (GDPO). A weight of 0 turns a reward off."""

    # the tiny preset does not weigh the aesthetic reward (why: docs/presets.md); the GPU presets do
    weights: dict[str, float] = field(default_factory=lambda: {"rubric": 1.0, "aesthetic": 0.0, "text": 0.5,
                                                               "artifact": 0.5})
    # an image-scoring transformers model (hub id or directory, one regression logit); "" = the small model the
    # reward_model stage trains on the PO preference pairs
    aesthetic_model: str = ""
    # a transformers image classifier whose ``artifact_label`` probability is the artifact probability; "" = the
    # world's structure check (fragmented, speckled shapes)
    artifact_model: str = ""
    artifact_label: str = "artifact"
    ocr: OcrConfig = field(default_factory=OcrConfig)
    ray_address: str = ""  # "" = a local Ray instance started by the stage; "auto" or "ray://host:port" = a cluster
    actor_cpus: float = 0.5
    actor_gpus: float = 0.0

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(REWARD_NAMES)
        require(not unknown, f"weights: unknown rewards {sorted(unknown)}; use {list(REWARD_NAMES)}")
        require(all(w >= 0 for w in self.weights.values()) and any(w > 0 for w in self.weights.values()),
                f"weights must be >= 0 with at least one > 0, got {self.weights}")
        require(self.actor_cpus > 0 and self.actor_gpus >= 0, "actor_cpus must be > 0 and actor_gpus >= 0")


@dataclass
class RewardModelConfig(Strict):
    """The offline aesthetic reward: a small MLP head on frozen image embeddings, trained Bradley-Terry on the
    preference pairs of the PO stage (synthetic and calibration)."""

    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    hidden: int = 64
    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2  # pairs held out for the reported pairwise accuracy
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.hidden >= 1 and self.steps >= 1 and self.lr > 0, "hidden, steps and lr must be > 0")
        require(0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class PromptPoolConfig(Strict):
    """RL prompts as a resource-allocation problem: per-prompt reward statistics over the groups drawn so far;
    saturated (too easy), hopeless or variance-free prompts are down-weighted, and dropped once they stay so."""

    n_prompts: int = 48
    seed: int = 30_000  # apart from the pool, evaluation and preference prompts
    scenes: SceneDomainConfig = field(default_factory=SceneDomainConfig)
    too_easy: float = 0.9  # mean rubric reward of a group above which the prompt is saturated
    hopeless: float = 0.1  # ... below which it is hopeless
    min_std: float = 0.02  # rubric reward std of a group below which it carries no signal
    downweight: float = 0.3  # sampling weight multiplier per uninformative group
    drop_after: int = 3  # consecutive uninformative groups before a prompt is dropped
    min_active: int = 8  # never drop below this many prompts

    def __post_init__(self) -> None:
        require(self.n_prompts >= 1, f"n_prompts must be >= 1, got {self.n_prompts}")
        require(0.0 <= self.hopeless < self.too_easy <= 1.0, "need 0 <= hopeless < too_easy <= 1")
        require(self.min_std >= 0 and 0.0 < self.downweight <= 1.0, "min_std >= 0 and downweight in (0, 1]")
        require(self.drop_after >= 1 and 1 <= self.min_active <= self.n_prompts,
                "drop_after must be >= 1 and min_active in 1..n_prompts")


@dataclass
class GRPOConfig(Strict):
    """Flow-GRPO without CFG: SDE rollouts with per-step log-probabilities, group-relative advantages, a clipped
    ratio objective and a KL penalty to the frozen starting model."""

    steps: int = 8  # optimisation rounds (one rollout batch each)
    prompts_per_step: int = 4  # global, over all ranks
    group_size: int = 4  # samples per prompt
    sample_steps: int = 10  # SDE sampling steps of a rollout
    noise_level: float = 0.7  # a in sigma_t = a * sqrt(t / (1 - t)) (Flow-GRPO)
    train_timesteps: int = 4  # rollout steps trained per round, drawn at random; one optimiser step each
    clip_range: float = 0.2
    kl_beta: float = 0.04
    adv_clip: float = 5.0
    lr: float = 2e-5
    warmup_steps: int = 2
    log_every: int = 2

    def __post_init__(self) -> None:
        require(min(self.steps, self.prompts_per_step, self.sample_steps, self.train_timesteps) >= 1,
                "steps, prompts_per_step, sample_steps, train_timesteps must be >= 1")
        require(self.group_size >= 2, f"group_size must be >= 2 (advantages are relative to the group), got "
                                      f"{self.group_size}")
        require(self.sample_steps >= 2 and self.train_timesteps <= self.sample_steps - 1,
                f"sample_steps must be >= 2 and train_timesteps <= sample_steps - 1 (the last SDE step is "
                f"deterministic and not trained), got sample_steps={self.sample_steps}, "
                f"train_timesteps={self.train_timesteps}")
        require(self.noise_level > 0 and self.clip_range > 0 and self.kl_beta >= 0 and self.adv_clip > 0
                and self.lr > 0, "noise_level, clip_range, adv_clip, lr must be > 0 and kl_beta >= 0")
        require(0 <= self.warmup_steps < self.steps, f"warmup_steps must be in [0, steps), got {self.warmup_steps}")

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclass
class RLConfig(Strict):
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    pool: PromptPoolConfig = field(default_factory=PromptPoolConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval_prompts: int = 16  # held-out prompts: rubric/checker score without CFG before and after, and with CFG
    diversity_prompts: int = 6  # held-out prompts sampled diversity_samples times each for the embedding spread
    diversity_samples: int = 4

    def __post_init__(self) -> None:
        require(self.eval_prompts >= 1 and self.diversity_prompts >= 1 and self.diversity_samples >= 2,
                "eval_prompts and diversity_prompts must be >= 1, diversity_samples >= 2")
        require(self.grpo.prompts_per_step <= self.pool.min_active,
                f"grpo.prompts_per_step ({self.grpo.prompts_per_step}) must be <= pool.min_active "
                f"({self.pool.min_active}): every round draws that many distinct active prompts")


@dataclass
class DistillConfig(Strict):
    """TDM timestep + guidance distillation (data-free): a ``student_steps`` student without CFG learns to match
    the CFG teacher's trajectory distribution, with a fake-score network tracking the student's."""

    student_steps: int = 4
    teacher_cfg: float = 4.0  # the guidance scale distilled into the student
    steps: int = 40
    batch: int = 8  # prompts per step, global
    lr: float = 1e-5
    fake_lr: float = 1e-4
    fake_updates: int = 1  # fake-score updates per student update
    warmup_steps: int = 2
    n_prompts: int = 256  # the data-free prompt set
    seed: int = 40_000
    eval_prompts: int = 12
    teacher_eval_steps: int = 50  # the teacher's sampler in the comparison (with teacher_cfg)
    log_every: int = 5

    def __post_init__(self) -> None:
        require(1 <= self.student_steps <= 16, f"student_steps must be in 1..16, got {self.student_steps}")
        require(self.teacher_cfg >= 1.0, f"teacher_cfg must be >= 1, got {self.teacher_cfg}")
        require(min(self.steps, self.batch, self.fake_updates, self.n_prompts, self.eval_prompts,
                    self.teacher_eval_steps) >= 1 and self.lr > 0 and self.fake_lr > 0,
                "steps, batch, fake_updates, n_prompts, eval_prompts, teacher_eval_steps, lr, fake_lr must be > 0")
        require(0 <= self.warmup_steps < self.steps, f"warmup_steps must be in [0, steps), got {self.warmup_steps}")


@dataclass
class PostTrainConfig(Strict):
    """Midtraining -> SFT per domain + merging -> preference optimisation. The model, autoencoder, text encoder,
    parallelism and evaluation settings are pretraining's; ``resolution`` is where SFT and PO run (the tiny
    preset's top pretraining resolution, 64 px)."""

    resolution: int = 64
    midtrain: MidtrainConfig = field(default_factory=MidtrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        require(self.sft.stage.resolution == self.resolution,
                f"sft.stage.resolution ({self.sft.stage.resolution}) must equal resolution ({self.resolution})")
