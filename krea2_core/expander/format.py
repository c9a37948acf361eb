"""The expander's conversation format: one user prompt in, a short thinking trace and the expansion out.

The answer is ``<think>{thinking}</think>\n{expansion}``. The thinking trace (intent reconstruction) comes first
because the report finds that step improves the expansion; only the text after ``</think>`` reaches the image model.
An answer without a closed trace is malformed: it expands to the user prompt itself, so an expander never makes a
request worse than the user wrote it, and RL's constraint gate sees ``well_formed`` False.
"""

from __future__ import annotations

from dataclasses import dataclass

from krea2_core.captioning.llm import Messages

SYSTEM = ("You turn short image requests into detailed image descriptions. First think briefly about what the "
          "user wants inside <think></think>, then write the description. Keep everything the user asked for.")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def messages(user_prompt: str) -> Messages:
    """The conversation an expander sees for ``user_prompt`` (before its answer)."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_prompt}]


def answer(thinking: str, expansion: str) -> str:
    """The training target for one pair."""
    return f"{THINK_OPEN}{thinking.strip()}{THINK_CLOSE}\n{expansion.strip()}"


@dataclass(frozen=True)
class Expansion:
    prompt: str  # what the user wrote
    thinking: str
    text: str  # what the image model is given
    well_formed: bool  # the answer closed its thinking trace and wrote a non-empty expansion


def parse(user_prompt: str, generated: str) -> Expansion:
    """Split a generated answer into thinking and expansion; malformed answers fall back to ``user_prompt``."""
    head, closed, tail = generated.partition(THINK_CLOSE)
    text = tail.strip()
    if not closed or not text:
        return Expansion(user_prompt, "", user_prompt, well_formed=False)
    return Expansion(user_prompt, head.replace(THINK_OPEN, "", 1).strip(), text, well_formed=True)
