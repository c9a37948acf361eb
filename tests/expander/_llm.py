"""A tiny random Qwen3 causal LM with SmolLM2's tokenizer (and chat template), saved like a hub model, so the
expander's real transformers code path runs in seconds offline (used by tests/expander and the pipeline test)."""

from __future__ import annotations

from pathlib import Path

import torch

from krea2_core.captioning.llm import smollm2_gguf_path


def save_tiny_qwen3(out: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    Qwen3ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
