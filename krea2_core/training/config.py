"""Configs of image-model training: the trainer every flow stage shares (model, optimiser, parallelism, iREPA,
evaluation) and pretraining's progressive-resolution stages. The defaults are the tiny preset's."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from krea2_core.common.strict import Strict, require
from krea2_core.models.config import AutoencoderConfig, DiTConfig, TextEncoderConfig
from krea2_core.world.config import SceneDomainConfig, WorldScenesConfig

# progressive resolution, by nominal resolution: each stage starts from the previous one, and curation selects, and
# captioning captions, per stage
PRETRAIN_STAGES = ("256", "512", "1024")
TOP_STAGE = PRETRAIN_STAGES[-1]  # where midtraining continues, on images this stage kept


@dataclass
class OptimizerConfig(Strict):
    """AdamW, or Muon on the hidden 2-D weights (first/last layers, norms, biases and tables stay on AdamW)."""

    kind: Literal["adamw", "muon"] = "adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    muon_momentum: float = 0.95

    def __post_init__(self) -> None:
        require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
                f"betas must be two values in [0, 1), got {self.betas}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}")


@dataclass
class TrainParallelConfig(Strict):
    """How one training stage is spread: torchrun processes (Flyte Elastic), FSDP2 over data-parallel ranks,
    tensor parallel inside each group of ``tp`` ranks, activation checkpointing, compile, dtype."""

    device: Literal["cpu", "cuda"] = "cpu"
    nnodes: int = 1
    nproc_per_node: int = 2
    fsdp: bool = True
    tp: int = 1
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    compile: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        require(self.nnodes >= 1 and self.nproc_per_node >= 1, "nnodes and nproc_per_node must be >= 1")
        require(self.tp >= 1 and (self.nnodes * self.nproc_per_node) % self.tp == 0,
                f"tp ({self.tp}) must divide the world size ({self.nnodes * self.nproc_per_node})")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


@dataclass
class RepaConfig(Strict):
    """iREPA: align an early block's image tokens (conv projector) with a frozen encoder's spatially
    normalised patch features, during the first ``epochs`` of the first stage only."""

    encoder: Literal["efficientnet_lite0", "hf"] = "efficientnet_lite0"
    model_id: str = ""  # for hf, e.g. a DINOv3 id
    block: int = 2  # 1-based index of the DiT block whose output is aligned
    weight: float = 0.5
    epochs: float = 1.0

    def __post_init__(self) -> None:
        require(self.encoder != "hf" or bool(self.model_id), "model_id is required when encoder is 'hf'")
        require(self.block >= 1, f"block must be >= 1, got {self.block}")
        require(self.weight >= 0 and self.epochs >= 0, "weight and epochs must be >= 0")


@dataclass
class PretrainStageConfig(Strict):
    """One resolution stage (its name is the report's: 256, 512, 1024; ``resolution`` is the real pixel size)."""

    resolution: int
    steps: int
    global_batch: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly to 0
    timestep_shift: float = 1.0  # shifted logit-normal; grows with resolution
    float8: Literal["none", "tensorwise", "rowwise"] = "none"
    repa: bool = False  # iREPA during this stage's first RepaConfig.epochs
    pma_checkpoints: int = 4  # average of the last K checkpoints (1 = no merging)
    pma_interval: int = 25  # steps between the checkpoints that PMA averages
    checkpoint_every_s: float = 120.0
    val_every: int = 50
    eval_every: int = 0  # > 0: held-out prompt following of the live weights every this many steps (a learning curve)
    world_scenes: WorldScenesConfig = field(default_factory=WorldScenesConfig)  # packed with the curated images

    def __post_init__(self) -> None:
        require(self.resolution >= 16, f"resolution must be >= 16, got {self.resolution}")
        require(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        require(self.global_batch >= 1, f"global_batch must be >= 1, got {self.global_batch}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(0 <= self.warmup_steps < self.steps, f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        require(0.0 <= self.decay_fraction <= 1.0, f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        require(self.timestep_shift > 0, f"timestep_shift must be > 0, got {self.timestep_shift}")
        require(self.pma_checkpoints >= 1 and self.pma_interval >= 1, "pma_checkpoints and pma_interval must be >= 1")
        require(self.checkpoint_every_s > 0, f"checkpoint_every_s must be > 0, got {self.checkpoint_every_s}")
        require(self.val_every >= 1, f"val_every must be >= 1, got {self.val_every}")


@dataclass
class EvalConfig(Strict):
    """Held-out world prompts sampled with the Euler sampler and scored by the world's checker."""

    n_prompts: int = 96  # enough for 95% CIs of about +-0.05 on a score
    seed: int = 10_000
    steps: int = 20
    cfg_scale: float = 4.0
    shift: float = 1.0  # inference shift stays constant across resolutions (report)
    grid_size: int = 8  # images in the logged sample grid
    batch: int = 96  # prompts sampled together (memory vs speed; results do not depend on it)
    scenes: SceneDomainConfig = field(default_factory=SceneDomainConfig)

    def __post_init__(self) -> None:
        require(self.n_prompts >= 1 and self.steps >= 1, "n_prompts and steps must be >= 1")
        require(self.cfg_scale >= 1.0, f"cfg_scale must be >= 1, got {self.cfg_scale}")
        require(self.batch >= 1, f"batch must be >= 1, got {self.batch}")


def _tiny_pretrain_stages() -> dict[str, PretrainStageConfig]:
    """The tiny preset's resolution stages: 32/48/64 px stand for 256/512/1024 (why these recipes:
    docs/presets.md)."""
    scenes = WorldScenesConfig(n=500)
    return {
        "256": PretrainStageConfig(resolution=32, steps=320, global_batch=32, lr=2e-3, warmup_steps=20,
                                   timestep_shift=1.0, repa=True, pma_checkpoints=3, pma_interval=40, val_every=150,
                                   world_scenes=scenes),
        "512": PretrainStageConfig(resolution=48, steps=30, global_batch=32, lr=1e-3, warmup_steps=5,
                                   timestep_shift=1.5, pma_checkpoints=3, pma_interval=5, val_every=30,
                                   world_scenes=scenes),
        "1024": PretrainStageConfig(resolution=64, steps=12, global_batch=32, lr=5e-4, warmup_steps=2,
                                    timestep_shift=2.0, pma_checkpoints=3, pma_interval=3, val_every=12,
                                    world_scenes=scenes),
    }


# The tiny preset's DiT (1.06 M params): hidden 128, 4 blocks, no text fusion blocks (why: docs/presets.md).
_TINY_DIT = DiTConfig(num_layers=4, attention_head_dim=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=384, text_num_key_value_heads=2, text_intermediate_size=384,
                      num_layerwise_text_blocks=0, num_refiner_text_blocks=0)


@dataclass
class RunConfig(Strict):
    """How a stage runs and evaluates a checkpoint it loads: pretraining's parallelism (device, dtype), evaluation
    and seed. The model, its autoencoder and text encoder come from the checkpoint (its model index)."""

    parallel: TrainParallelConfig
    eval: EvalConfig
    seed: int


@dataclass
class FinetuneConfig(RunConfig):
    """How a stage that trains a checkpoint it loads runs it: ``RunConfig`` and pretraining's optimiser."""

    optimizer: OptimizerConfig


@dataclass
class TrainerConfig(Strict):
    """How the image model is built, trained, run and evaluated: everything of pretraining but its resolution
    stages. Every training and sampling stage's settings hold one (the DiT config matches the checkpoints)."""

    model: DiTConfig = field(default_factory=lambda: _TINY_DIT)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    # the tiny preset keeps every caption encoded (why: docs/presets.md)
    text_encoder: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(cache_mb=1024))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # the tiny preset: 2 CPU ranks in float32 (why not bfloat16: docs/presets.md)
    parallel: TrainParallelConfig = field(default_factory=TrainParallelConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(steps=10, batch=48))
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.333, 2.0])  # width / height
    # how often a training step draws each caption length (long, medium, short): mostly long, short and
    # medium always in the mix
    caption_ratios: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    caption_dropout: float = 0.1  # empty caption, for classifier-free guidance
    seed: int = 0

    def __post_init__(self) -> None:
        require(all(a > 0 for a in self.aspect_ratios) and bool(self.aspect_ratios),
                f"aspect_ratios must be positive, got {self.aspect_ratios}")
        require(len(self.caption_ratios) == 3 and all(r >= 0 for r in self.caption_ratios)
                and abs(sum(self.caption_ratios) - 1.0) < 1e-9,
                f"caption_ratios (long, medium, short) must be 3 values >= 0 that sum to 1, got {self.caption_ratios}")
        require(0.0 <= self.caption_dropout < 1.0, f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        require(self.model.num_text_layers == len(self.text_encoder.layers),
                f"model.num_text_layers ({self.model.num_text_layers}) must equal the number of tapped "
                f"text_encoder.layers ({len(self.text_encoder.layers)})")
        require(self.repa.block <= self.model.num_layers,
                f"repa.block ({self.repa.block}) must be <= model.num_layers ({self.model.num_layers})")
        ae = self.autoencoder
        channels = (3 * ae.downsample**2 if ae.kind == "pixel" else {"qwen_image": 16, "flux2": 32}[ae.kind])
        require(self.model.in_channels == channels * ae.patch_size**2,
                f"model.in_channels ({self.model.in_channels}) must equal the autoencoder's channels x "
                f"patch_size^2 ({channels} x {ae.patch_size}^2)")

    def run_config(self) -> RunConfig:
        """What the stages after SFT that sample a checkpoint (the merge, pairs, the expander's RL) take."""
        return RunConfig(self.parallel, self.eval, self.seed)

    def finetune(self) -> FinetuneConfig:
        """What the stages after SFT that train a checkpoint (preference, RL, distillation) take."""
        return FinetuneConfig(self.parallel, self.eval, self.seed, self.optimizer)


@dataclass
class PretrainConfig(TrainerConfig):
    """The trainer and the progressive-resolution stages' recipes."""

    stages: dict[str, PretrainStageConfig] = field(default_factory=lambda: _tiny_pretrain_stages())

    def trainer(self) -> TrainerConfig:
        """The shared settings without the stages: what midtraining and SFT continue a checkpoint with (retraining a
        pretraining stage differently re-runs it through its input instead)."""
        return TrainerConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainerConfig)})

    def __post_init__(self) -> None:
        super().__post_init__()
        require(set(self.stages) <= set(PRETRAIN_STAGES) and bool(self.stages),
                f"stages must be a non-empty subset of 256, 512, 1024, got {sorted(self.stages)}")
        dp = self.parallel.world_size // self.parallel.tp
        for name, stage in self.stages.items():
            require(stage.global_batch % dp == 0,
                    f"stages.{name}.global_batch ({stage.global_batch}) must be divisible by the data-parallel "
                    f"size ({dp} = world size / tp)")
