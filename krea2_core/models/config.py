"""Configs of the image model's parts: the DiT, the autoencoder and the text encoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from krea2_core.common.strict import Strict, require


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
    max_tokens: int = 80  # a longer caption is cut (why 80: docs/presets.md)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_mb: int = 0  # > 0: keep up to this many MB of encoded captions per process (float16, valid tokens only)

    def __post_init__(self) -> None:
        require(self.kind != "hf" or bool(self.model_id), "model_id is required when kind is 'hf'")
        require(self.cache_mb >= 0, f"cache_mb must be >= 0, got {self.cache_mb}")
        require(len(self.layers) >= 1 and all(i >= 0 for i in self.layers),
                f"layers must be a non-empty list of indices >= 0, got {self.layers}")
        require(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
