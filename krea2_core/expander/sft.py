"""Supervised finetuning of the prompt expander (report, "Prompt Expansion": SFT on underspecified user prompt ->
thinking trace + expanded caption pairs).

Each example is the chat-templated conversation of ``format.messages(user)`` with the generation prompt, then
``format.answer(thinking, expansion)`` and the end-of-sequence token; the loss covers the answer tokens only
(labels are -100 on the prompt and the padding). Examples longer than ``max_tokens`` are cut at the end and counted.
Batches are drawn from the train split by (seed, step), so any step can be replayed; the val split's loss is
measured before and after training.

Before and after training the expander greedily expands the held-out world user prompts (``prompt_set("held_out")``,
the set RL evaluates on): well-formed rate, faithfulness to the user's rubric, the RL constraint gate's pass rate
and the expansions' length (``eval.base.*`` / ``eval.sft.*``), so the SFT gain is visible.

Artifact (kind ``expander``): the HF model and tokenizer files at the top level (``load_expander`` and
``expand`` take the directory), ``expander.json``, ``metrics.jsonl``, ``eval.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from krea2_core.common.layout import EVAL_FILE, METRICS_FILE
from krea2_core.expander import format as fmt
from krea2_core.expander.config import ExpanderSFTConfig, ExpansionConfig
from krea2_core.expander.data import read_pairs
from krea2_core.expander.faithfulness import judge
from krea2_core.expander.model import (ARTIFACT_KIND, INFO_FILE, MICRO_BATCH, expand_loaded, load_expander,
                                       prompt_texts, save_expander)
from krea2_core.expander.user_prompts import prompt_set
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import MetricsLog, StageRun
from krea2_core.training.schedules import wsd_scheduler
from krea2_core.world.captions import Prompt

FORMAT = "think-then-expand"
IGNORE = -100  # label of a token the loss skips
DECAY_FRACTION = 0.2  # WSD: the last fifth of the steps anneals the LR to 0


@dataclass(frozen=True)
class Example:
    ids: list[int]  # prompt + answer + EOS, cut to max_tokens
    prompt_len: int


def encode_pairs(tokenizer: Any, pairs: pd.DataFrame, max_tokens: int) -> tuple[list[Example], int]:
    """(one example per pair, how many were cut to ``max_tokens``). A prompt that leaves no room for an answer
    token is a ValueError naming the pair."""
    if pairs.empty:  # a tokenizer rejects an empty batch
        return [], 0
    prompts = tokenizer(prompt_texts(tokenizer, list(pairs["user"])), add_special_tokens=False)["input_ids"]
    answers = tokenizer([fmt.answer(t, e) for t, e in zip(pairs["thinking"], pairs["expansion"], strict=True)],
                        add_special_tokens=False)["input_ids"]
    examples, cut = [], 0
    for pair_id, prompt, answer in zip(pairs["id"], prompts, answers, strict=True):
        if len(prompt) >= max_tokens:
            raise ValueError(f"pair {pair_id!r}: its prompt alone is {len(prompt)} tokens, max_tokens={max_tokens} "
                             "leaves no room for the answer")
        ids = [*prompt, *answer, tokenizer.eos_token_id]
        cut += len(ids) > max_tokens
        examples.append(Example(ids[:max_tokens], len(prompt)))
    return examples, cut


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (the answer tokens; IGNORE on prompt and padding)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        ids[row, :len(e.ids)] = torch.tensor(e.ids)
        labels[row, e.prompt_len:len(e.ids)] = ids[row, e.prompt_len:len(e.ids)]
        mask[row, :len(e.ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def batch_rows(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The train rows of ``step``: a function of (seed, step) alone (with replacement only when n < batch_size)."""
    return np.random.default_rng([seed, step]).choice(n, size=batch_size, replace=n < batch_size)


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss averages over (HF shifts labels by one: the first position predicts nothing)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def backward_batch(model: Any, examples: Sequence[Example], pad_id: int) -> tuple[float, int, int]:
    """Accumulate the gradient of the batch's answer-token mean loss, ``MICRO_BATCH`` examples per pass (bounded
    memory, the same gradient as one pass). Returns (loss, tokens, answer tokens)."""
    parts = [collate(examples[s:s + MICRO_BATCH], pad_id, model.device) for s in range(0, len(examples), MICRO_BATCH)]
    counts = [answer_tokens(part) for part in parts]
    n_answer = sum(counts)
    if not n_answer:
        raise ValueError("the batch has no answer tokens to train on (every example cut before its answer?)")
    loss = 0.0
    for part, count in zip(parts, counts, strict=True):
        if count:
            part_loss = model(**part).loss * (count / n_answer)
            part_loss.backward()
            loss += part_loss.item()
    return loss, sum(int(part["attention_mask"].sum()) for part in parts), n_answer


def mean_loss(model: Any, examples: Sequence[Example], batch_size: int, pad_id: int) -> float:
    """Answer-token-weighted mean loss over ``examples``."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_id, model.device)
            n = answer_tokens(batch)
            total, count = total + float(model(**batch).loss) * n, count + n
    model.train()
    return total / count


def evaluate(tokenizer: Any, model: Any, prompts: Sequence[Prompt], expansion: ExpansionConfig, batch_size: int
             ) -> dict[str, Any]:
    """Greedy expansions of ``prompts``: {well_formed, faithfulness, gate_pass, words, examples} (JSON-safe)."""
    expansions = expand_loaded(tokenizer, model, [p.text for p in prompts], greedy=True,
                               max_new_tokens=expansion.max_new_tokens, batch_size=batch_size)
    judged = judge(prompts, expansions, expansion)
    return {"well_formed": float(np.mean([e.well_formed for e in expansions])),
            "faithfulness": judged.mean_faithfulness, "gate_pass": judged.gate_pass,
            "words": float(np.mean([len(e.text.split()) for e in expansions])),
            "examples": [{"prompt": p.text, "thinking": e.thinking, "expansion": e.text, "well_formed": e.well_formed,
                          "faithfulness": f if math.isfinite(f) else None, "gates": g}
                         for p, e, f, g in zip(prompts, expansions, judged.faithfulness, judged.gates, strict=True)]}


def _numbers(prefix: str, report: dict[str, Any]) -> dict[str, float]:
    return {f"{prefix}.{k}": v for k, v in report.items() if isinstance(v, float)}


@dataclass
class ExpanderSFTSettings:
    """What the stage depends on: the SFT recipe, the expansion format and gate, and the evaluation resolution."""

    sft: ExpanderSFTConfig
    expansion: ExpansionConfig
    resolution: int


def _splits(pairs: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    table = read_pairs(Path(pairs))
    train, val = table[table["split"] == "train"], table[table["split"] == "val"]
    if train.empty:
        raise ValueError(f"{pairs}: the pairs table has no 'train' rows ({len(table)} pairs): nothing to finetune on")
    return train, val


def run_expander_sft(inputs: Mapping[str, Path], settings: ExpanderSFTSettings, parent_run_id: str = "", *,
                     root: Path | None = None) -> Path:
    """Finetune ``settings.sft.model_id`` on the ``expander_data`` artifact ``pairs``; evaluate on the held-out world
    user prompts at ``settings.resolution`` with the expansion's gate. Returns the ``expander`` artifact directory."""
    config, expansion, resolution = settings.sft, settings.expansion, settings.resolution
    train_pairs, val_pairs = _splits(inputs["pairs"])

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        tokenizer, model = load_expander(config.model_id, config.device)
        pad_id = tokenizer.pad_token_id
        train, cut_train = encode_pairs(tokenizer, train_pairs, config.max_tokens)
        val, cut_val = encode_pairs(tokenizer, val_pairs, config.max_tokens)
        prompts = prompt_set("held_out", config.eval_prompts, expansion, resolution)
        report = {"prompts": len(prompts), "base": evaluate(tokenizer, model, prompts, expansion, config.batch_size)}
        log = MetricsLog(staging / METRICS_FILE, run, every=config.log_every, last=config.steps)
        metrics: dict[str, float] = {}
        if val:
            metrics["val.loss_before"] = mean_loss(model, val, config.batch_size, pad_id)
            log(0, {"val.loss": metrics["val.loss_before"]})

        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        scheduler = wsd_scheduler(optimizer, total_steps=config.steps, warmup_steps=config.warmup_steps,
                                  decay_fraction=DECAY_FRACTION)
        start = time.perf_counter()
        for step in tqdm(range(1, config.steps + 1), desc="expander sft", mininterval=5):
            rows = batch_rows(len(train), config.batch_size, config.seed, step)
            optimizer.zero_grad(set_to_none=True)
            loss, tokens, n_answer = backward_batch(model, [train[i] for i in rows], pad_id)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            step_metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                            "tokens": tokens, "answer_tokens": n_answer}
            if step == config.steps and val:
                metrics["val.loss_after"] = step_metrics["val.loss"] = mean_loss(model, val, config.batch_size,
                                                                                  pad_id)
            log(step, step_metrics)
        seconds = time.perf_counter() - start
        metrics.update({"train.loss": step_metrics["loss"], "seconds": seconds,
                        "seconds_per_step": seconds / config.steps})

        model.eval()
        report["sft"] = evaluate(tokenizer, model, prompts, expansion, config.batch_size)
        metrics.update({**_numbers("eval.base", report["base"]), **_numbers("eval.sft", report["sft"])})
        save_expander(tokenizer, model, staging)
        (staging / INFO_FILE).write_text(json.dumps({"format": FORMAT, "base_model": config.model_id}, indent=2))
        (staging / EVAL_FILE).write_text(json.dumps(report, indent=2, allow_nan=False))
        return StageOutput(counts={"pairs": len(train) + len(val), "train_pairs": len(train), "val_pairs": len(val),
                                   "truncated": cut_train + cut_val, "steps": config.steps,
                                   "eval_prompts": len(prompts)}, metrics=metrics)

    return execute_stage(EXPANDER_SFT.name, EXPANDER_SFT.kind, body, config=settings, inputs=dict(inputs),
                         parent_run_id=parent_run_id, root=root)[0]


EXPANDER_SFT = StageSpec("expander_sft", ARTIFACT_KIND, {"pairs": "expander_data"},
                         lambda p: ExpanderSFTSettings(sft=p.expander.sft, expansion=p.expander.expansion,
                                                       resolution=p.post.resolution), run_expander_sft)
