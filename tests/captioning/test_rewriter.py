"""Caption variants: limits enforced after generation, fallbacks, the training sampler, and one real
offline SmolLM2 rewrite."""

from __future__ import annotations

import pytest

from krea2_core.captioning.config import SMOLLM2_GGUF, RewriterConfig
from krea2_core.captioning.llm import Generated, LocalChatLLM
from krea2_core.captioning.rewriter import Variants, rewrite, rewrite_many

CONFIG = RewriterConfig(short_words=5, medium_words=10, tags=4, conversational_words=8)
LONG = ("A photograph of a red circle and two blue squares on a lavender haze background. The red circle is "
        "large and sits in the top left. Two blue squares: a small one in the center and a medium one in the "
        "bottom right.")


class _Fake:
    """Answers every prompt with ``text`` (or raises), recording batch sizes."""

    def __init__(self, text: str = "", error: bool = False, truncated: bool = False) -> None:
        self.text, self.error, self.truncated, self.batches = text, error, truncated, []

    def generate(self, messages_batch: list, max_new_tokens: int) -> list[Generated]:
        self.batches.append(len(messages_batch))
        if self.error:
            raise RuntimeError("model crashed")
        return [Generated(self.text, self.truncated) for _ in messages_batch]


def _words(text: str) -> int:
    return len(text.split())


def test_over_long_generations_are_cut_at_word_boundaries_and_flagged() -> None:
    long_text = "Short: " + " ".join(f"word{i}," for i in range(40))
    v = rewrite(LONG, _Fake(long_text), CONFIG)
    assert _words(v.short) == 5 and _words(v.medium) == 10 and _words(v.conversational) == 8
    assert v.short == "word0, word1, word2, word3, word4"  # label dropped, trailing comma stripped
    assert v.tags == "word0, word1, word2, word3"
    assert set(v.flags) == {"short_truncated", "medium_truncated", "tags_truncated", "conversational_truncated"}


def test_tags_are_lowercased_deduplicated_and_capped() -> None:
    v = rewrite(LONG, _Fake("- Red Circle\n- blue square, RED CIRCLE, lavender, ."), CONFIG)
    assert v.tags == "red circle, blue square, lavender"
    assert "tags_truncated" not in v.flags


def test_generation_stopped_by_token_limit_is_flagged() -> None:
    v = rewrite(LONG, _Fake("a red circle", truncated=True), CONFIG)
    assert v.short == "a red circle" and "short_truncated" in v.flags


@pytest.mark.parametrize("llm", [_Fake(""), _Fake(error=True)], ids=["empty", "raising"])
def test_empty_or_failed_generation_falls_back_to_the_long_caption(llm: _Fake) -> None:
    v = rewrite(LONG, llm, CONFIG)
    assert v.short == "A photograph of a red"
    assert v.medium == "A photograph of a red circle and two blue squares"
    assert v.tags == "red, circle, blue, squares"  # content words: "photograph" and numbers are stopwords
    assert v.flags == ("short_fallback", "medium_fallback", "tags_fallback", "conversational_fallback")
    assert v == rewrite(LONG, llm, CONFIG)  # deterministic


def test_rewrite_many_batches_across_captions_and_isolates_failures() -> None:
    class FailsOnBoom(_Fake):
        def generate(self, messages_batch: list, max_new_tokens: int) -> list[Generated]:
            if any("boom" in m[1]["content"] for m in messages_batch):
                self.batches.append(len(messages_batch))
                raise RuntimeError("bad row")
            return super().generate(messages_batch, max_new_tokens)

    llm = FailsOnBoom("a red circle")
    out = rewrite_many([LONG, "boom. it failed", LONG], llm, CONFIG, variants=("short",))
    assert [v.short for v in out] == ["a red circle", "boom", "a red circle"]
    assert out[1].flags == ("short_fallback", "medium_fallback", "tags_fallback", "conversational_fallback")
    assert out[0].flags == ("medium_fallback", "tags_fallback", "conversational_fallback")
    assert llm.batches == [3, 1, 1, 1]  # one batch for three captions, then retried one by one


def test_smollm2_rewrites_a_world_caption_offline() -> None:
    """One real generation with the shipped SmolLM2 GGUF: short and medium in one batch of two prompts."""
    config = RewriterConfig(model_id=SMOLLM2_GGUF, max_new_tokens=24, device="cpu")
    llm = LocalChatLLM.load(config.model_id, config.device)
    v: Variants = rewrite_many([LONG], llm, config, variants=("short", "medium"))[0]
    print(f"\nshort: {v.short!r}\nmedium: {v.medium!r}\nflags: {v.flags}")
    assert v.short and v.medium
    assert "short_fallback" not in v.flags and "medium_fallback" not in v.flags
    assert _words(v.short) <= config.short_words and _words(v.medium) <= config.medium_words


def test_sentence_answers_to_the_tags_prompt_become_short_flagged_tags() -> None:
    from krea2_core.captioning.rewriter import TAG_WORDS, parse_tags

    tags, cut = parse_tags("the image is a woman with a scarf, Red Scarf, window", limit=10)
    assert tags == "the image is, red scarf, window" and cut
    assert all(len(t.split()) <= TAG_WORDS for t in tags.split(", "))
    assert parse_tags("red scarf, window", limit=10) == ("red scarf, window", False)
