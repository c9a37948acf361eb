"""A cheaper LLM rewrites each long caption into short, medium, tag and conversational variants.

Limits are enforced after generation (a small LLM does not count words): over-long text is cut at a word
boundary and flagged ``<variant>_truncated``; empty or failed generations get a deterministic fallback
from the long caption, flagged ``<variant>_fallback``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


from krea2_core.captioning.config import RewriterConfig
from krea2_core.captioning.llm import ChatLLM, Generated, Messages
from krea2_core.text import content_words

VARIANTS = ("short", "medium", "tags", "conversational")
_SYSTEM = "You rewrite image captions into text-to-image prompts. Reply with the rewritten text only."

@dataclass(frozen=True)
class Variants:
    short: str
    medium: str
    tags: str  # comma-separated, lowercased, deduplicated
    conversational: str
    flags: tuple[str, ...] = ()


def _limit(variant: str, config: RewriterConfig) -> int:
    return {"short": config.short_words, "medium": config.medium_words, "tags": config.tags,
            "conversational": config.conversational_words}[variant]


def _instruction(variant: str, limit: int) -> str:
    return {
        "short": f"Rewrite this caption as a short prompt of at most {limit} words:",
        "medium": f"Rewrite this caption as a prompt of at most {limit} words, keeping the main details:",
        "tags": f"List at most {limit} lowercase comma-separated tags (objects, colours, setting, style) "
                "for this caption:",
        "conversational": f"Rewrite this caption as a casual request to an image generator, at most {limit} "
                          "words, starting like 'Can you make':",
    }[variant]


def prompt_for(variant: str, long_caption: str, config: RewriterConfig) -> Messages:
    return [{"role": "system", "content": _SYSTEM},
            {"role": "user", "content": f"{_instruction(variant, _limit(variant, config))}\n\n{long_caption}"}]


def cut_words(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut to at most ``limit`` words at a word boundary; True when it was cut."""
    words = text.split()
    if len(words) <= limit:
        return " ".join(words), False
    return " ".join(words[:limit]).rstrip(",;:-"), True


def clean_generation(text: str) -> str:
    """First paragraph of a generation without a label or wrapping quotes."""
    text = text.strip().split("\n\n")[0].strip()
    text = re.sub(r"^(short|medium|prompt|tags|request|caption)[^:\n]{0,20}:\s*", "", text, flags=re.I)
    return text.strip().strip("\"'“”").strip()


TAG_WORDS = 3  # a longer "tag" is a phrase or a sentence: cut and flagged


def parse_tags(text: str, limit: int) -> tuple[str, bool]:
    """Comma/newline-separated tags, lowercased, stripped of bullets, deduplicated, at most ``limit`` tags
    of at most ``TAG_WORDS`` words; True when anything was cut."""
    tags = [re.sub(r"^[\s\-*#\d.)]+|[\s.]+$", "", t).lower() for t in re.split(r"[,\n]", text)]
    cut = [cut_words(t, TAG_WORDS) for t in tags if t]
    unique = list(dict.fromkeys(tag for tag, _ in cut))
    return ", ".join(unique[:limit]), len(unique) > limit or any(was_cut for _, was_cut in cut)


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0].rstrip(".!?")


def fallback(variant: str, long_caption: str, config: RewriterConfig) -> str:
    """Deterministic stand-in from the long caption: its first sentence (its content words for tags)."""
    sentence = first_sentence(long_caption)
    if variant == "tags":
        return parse_tags(", ".join(w for w in content_words(sentence) if w), config.tags)[0]
    return cut_words(sentence, _limit(variant, config))[0]


def finalize(variant: str, generated: Generated | None, long_caption: str,
             config: RewriterConfig) -> tuple[str, list[str]]:
    """Enforce the variant's limit on a generation (None: it failed); returns (text, flags)."""
    text = clean_generation(generated.text) if generated is not None else ""
    limit = _limit(variant, config)
    text, cut = parse_tags(text, limit) if variant == "tags" else cut_words(text, limit)
    if not text:
        return fallback(variant, long_caption, config), [f"{variant}_fallback"]
    # a generation stopped by max_new_tokens ends mid-sentence even when it fits the word limit
    return text, [f"{variant}_truncated"] if cut or generated.truncated else []


def generate_isolated(llm: ChatLLM, prompts: list[Messages], max_new_tokens: int,
                       batch_size: int) -> list[Generated | None]:
    """Batched generation; a failing batch is retried prompt by prompt, a failing prompt gives None."""
    out: list[Generated | None] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        try:
            out += llm.generate(batch, max_new_tokens)
            continue
        except Exception:  # noqa: BLE001 - isolated per prompt below
            if len(batch) == 1:
                out.append(None)
                continue
        for prompt in batch:
            try:
                out += llm.generate([prompt], max_new_tokens)
            except Exception:  # noqa: BLE001 - the row gets a fallback
                out.append(None)
    return out


def rewrite_many(captions: Sequence[str], llm: ChatLLM, config: RewriterConfig,
                 variants: Sequence[str] = VARIANTS, batch_size: int = 8) -> list[Variants]:
    """All variants of every caption, one prompt per (caption, variant), batched across captions.

    Variants not in ``variants`` get their fallback (flagged ``<variant>_fallback``) without a generation.
    """
    texts: dict[str, list[str]] = {}
    flags: list[list[str]] = [[] for _ in captions]
    for variant in VARIANTS:
        if variant in variants:
            prompts = [prompt_for(variant, c, config) for c in captions]
            generated = generate_isolated(llm, prompts, config.max_new_tokens, batch_size)
        else:
            generated = [None] * len(captions)
        texts[variant] = []
        for i, (caption, g) in enumerate(zip(captions, generated, strict=True)):
            text, new_flags = finalize(variant, g, caption, config)
            texts[variant].append(text)
            flags[i] += new_flags
    return [Variants(*(texts[v][i] for v in VARIANTS), flags=tuple(flags[i])) for i in range(len(captions))]


def rewrite(long_caption: str, llm: ChatLLM, config: RewriterConfig) -> Variants:
    return rewrite_many([long_caption], llm, config)[0]
