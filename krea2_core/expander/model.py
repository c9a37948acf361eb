"""The expander LLM: loading a trainable copy, saving it, sampling answers, and per-token log-probabilities.

``sample_completions`` and ``token_logprobs`` are what SFT evaluation and RL share: rows are prompt-major (prompt
i's samples at ``i*n .. i*n+n-1``), prompts are left-padded, and a completion runs up to and including its first
end-of-sequence token. ``token_logprobs`` passes the same attention-mask-derived positions that ``generate`` uses,
so a left-padded row scores its tokens exactly as they were sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from krea2_core.artifacts import MANIFEST, read_manifest
from krea2_core.captioning.config import SMOLLM2_GGUF
from krea2_core.captioning.llm import eos_token_ids, read_causal_lm
from krea2_core.expander import format as fmt
from krea2_core.expander.format import Expansion

ARTIFACT_KIND = "expander"
INFO_FILE = "expander.json"  # an expander artifact's format and base model (and, after RL, the image model)
# Sequences per forward/backward pass of SFT and RL updates (gradients accumulated, weighted by answer tokens): a pass
# holds every layer's activations and float32 logits over the whole vocabulary (49k for SmolLM2) per token.
MICRO_BATCH = 4


def resolve_model(path_or_id: str) -> str:
    """``path_or_id`` as ``read_causal_lm`` takes it: an expander artifact or model directory, the offline SmolLM2,
    or a hub id. A path that does not exist is a FileNotFoundError (not a hub look-up)."""
    if path_or_id == SMOLLM2_GGUF:
        return path_or_id
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if (path / MANIFEST).is_file():
            read_manifest(path, kind=ARTIFACT_KIND)  # another kind of artifact is an ArtifactError
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is neither an expander artifact nor a model directory (no config.json)")
        return str(path)
    if path.exists() or path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") > 1:
        raise FileNotFoundError(f"expander model {path_or_id!r} not found: not a directory, a hub id ('org/name') "
                                f"or {SMOLLM2_GGUF!r}")
    return path_or_id


def _drop_gguf_tags(model: Any) -> None:
    # GGUF weights arrive de-quantised to plain float tensors, but transformers still tags the model as
    # GGUF-quantized and refuses to save it; without the tags a finetuned SmolLM2 saves as ordinary safetensors
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config.quant_method, "value", None) == "gguf":
        model.hf_quantizer, model.is_quantized, model.config._is_quantized = None, False, False
        del model.config.quantization_config


def load_expander(path_or_id: str, device: str = "auto") -> tuple[Any, Any]:
    """A fresh (tokenizer, model in train mode) that a trainer may update; never the captioners' cached copy."""
    tokenizer, model = read_causal_lm(resolve_model(path_or_id), device)
    _drop_gguf_tags(model)
    return tokenizer, model.train()


def save_expander(tokenizer: Any, model: Any, out: Path) -> None:
    """The model (safetensors + config) and tokenizer files at the top level of ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@dataclass
class Completions:
    input_ids: torch.Tensor  # (B, T) long: left-padded prompt, then the generated tokens
    attention_mask: torch.Tensor  # (B, T): prompt tokens and the completion up to its first EOS
    completion_mask: torch.Tensor  # (B, T) bool: the generated answer tokens (first EOS included)
    texts: list[str]  # decoded answers, special tokens skipped


def prompt_texts(tokenizer: Any, user_prompts: Sequence[str]) -> list[str]:
    """The chat-templated conversation each expander answer follows."""
    return [tokenizer.apply_chat_template(fmt.messages(u), tokenize=False, add_generation_prompt=True)
            for u in user_prompts]


def until_first_eos(new_tokens: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """(B, G) bool: each row's tokens up to and including its first end-of-sequence token (all if none)."""
    is_eos = torch.isin(new_tokens, torch.tensor(sorted(eos_ids), device=new_tokens.device))
    before = is_eos.long().cumsum(dim=1) - is_eos.long()  # EOS tokens strictly before each position
    return before == 0


def sample_completions(tokenizer: Any, model: Any, user_prompts: Sequence[str], *, n: int, temperature: float,
                       top_p: float, max_new_tokens: int, seed: int, greedy: bool = False) -> Completions:
    """``n`` answers per user prompt (prompt-major rows), sampled with ``temperature`` / ``top_p`` (no top-k) or
    greedy. The same seed gives the same completions; the caller's RNG state is left untouched."""
    if not user_prompts or n < 1:
        raise ValueError(f"need at least one user prompt and n >= 1, got {len(user_prompts)} prompts, n={n}")
    tokenizer.padding_side = "left"
    batch = tokenizer(prompt_texts(tokenizer, user_prompts), return_tensors="pt", padding=True,
                      add_special_tokens=False).to(model.device)
    ids, mask = batch["input_ids"].repeat_interleave(n, 0), batch["attention_mask"].repeat_interleave(n, 0)
    eos_ids = eos_token_ids(tokenizer, model)
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    cuda = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=not greedy, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos_ids), **sampling)
    out = out.clone()  # a normal tensor, not an inference-mode one: RL backpropagates through its embedding
    new = out[:, ids.shape[1]:]
    answer = until_first_eos(new, eos_ids)
    texts = [tokenizer.decode(row[keep], skip_special_tokens=True).strip()
             for row, keep in zip(new, answer, strict=True)]
    prompt_part = torch.zeros_like(ids, dtype=torch.bool)
    return Completions(input_ids=out, attention_mask=torch.cat([mask, answer.long()], dim=1),
                       completion_mask=torch.cat([prompt_part, answer], dim=1), texts=texts)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as ``generate`` assigns them."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def token_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) float32: log p(token t | tokens < t); position 0 has no prefix and gets 0. Differentiable."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=positions(attention_mask)).logits[:, :-1].float()
    # gather minus logsumexp: no second (B, T, vocab) tensor as a full log_softmax would make
    picked = logits.gather(-1, input_ids[:, 1:, None])[..., 0] - logits.logsumexp(dim=-1)
    return torch.cat([picked.new_zeros(len(input_ids), 1), picked], dim=1)


def expand_loaded(tokenizer: Any, model: Any, user_prompts: Sequence[str], *, n: int = 1, greedy: bool = True,
                  temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0,
                  batch_size: int = 16) -> list[Expansion]:
    """``expand`` with a loaded model, ``batch_size`` prompts per generate call (prompt-major results)."""
    was_training = model.training
    model.eval()
    try:
        texts = [text for start in range(0, len(user_prompts), batch_size)
                 for text in sample_completions(tokenizer, model, user_prompts[start:start + batch_size], n=n,
                                                temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                                seed=seed + start, greedy=greedy).texts]
    finally:
        model.train(was_training)
    return [fmt.parse(user_prompts[i // n], text) for i, text in enumerate(texts)]


def expand(user_prompts: Sequence[str], model_dir_or_id: str, *, n: int = 1, greedy: bool = True,
           temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0,
           device: str = "auto") -> list[Expansion]:
    """Expand each user prompt ``n`` times with the model at ``model_dir_or_id`` (an expander artifact, a model
    directory, a hub id or the offline SmolLM2); malformed answers fall back to the user prompt."""
    tokenizer, model = load_expander(model_dir_or_id, device)
    return expand_loaded(tokenizer, model, list(user_prompts), n=n, greedy=greedy, temperature=temperature,
                         top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
