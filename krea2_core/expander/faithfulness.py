"""Prompt-level verifiable rewards for the expander: which of the world's requirements a text states, how many of
the user's requirements an expansion keeps, and the sparse safety/constraint gate (report, "Prompt Expansion").

The parser reads the world's vocabulary only (``world.scene`` COLORS, KINDS, BACKGROUNDS; quoted words):

- shape groups: ``[a|an|one..nine|digits|the] [modifiers] <colour> <kind>[s]`` -> ``color(shape, color, n)``,
  per kind ``count(shape=kind)`` = sum over its colour groups, ``count(shape="any")`` = the total. Counts without a
  colour ("three circles") are not parsed; the world's prompts always name the colour.
- a later mention of a group already seen is a reference, not a new group, when it carries the definite article,
  no number at all ("each red circle") or the same count; so the world's long captions ("The red circle is small
  ...", "Two blue squares: a large one ...") restate nothing. A mention with a *different* count is a conflicting
  claim: the text then states both ``color`` claims (so the gate reports a contradiction) and no total for that
  kind nor for "any" (the text does not state one).
- a singular mention without a number states one; a plural one without a number ("red circles") names the group
  but states no count.
- ``background`` for every BACKGROUNDS name that occurs; ``text`` for every double-quoted single word, upper-cased
  like the world's WORDS ('says "sale"' -> SALE).
- positions and sizes are not parsed: expanding them is what the expander is for, and the user prompts never
  state them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

from krea2_core.expander.config import ExpansionConfig
from krea2_core.expander.format import Expansion
from krea2_core.world.captions import NUMBER_WORDS, Prompt, Requirement
from krea2_core.world.scene import BACKGROUNDS, COLORS, KINDS, SIZES

# Words allowed between the number and the colour ("two small bright red circles").
_MODIFIERS = (*SIZES, "big", "tiny", "little", "bright", "dark", "light", "solid", "flat", "plain", "single")
_NUMBER_WORDS = {w: i for i, w in enumerate(NUMBER_WORDS) if i >= 1}
_GROUP = re.compile(
    rf"(?:\b(?P<det>an?|the|{'|'.join(_NUMBER_WORDS)}|[1-9]\d*)\s+)?"
    rf"(?:(?:{'|'.join(_MODIFIERS)})[\s,]+)*"
    rf"\b(?P<color>{'|'.join(COLORS)})[\s-]+(?P<kind>{'|'.join(KINDS)})(?P<plural>s)?\b",
    re.IGNORECASE,
)
_BACKGROUND = re.compile(rf"\b(?P<bg>{'|'.join(map(re.escape, BACKGROUNDS))})\b", re.IGNORECASE)
_QUOTED = re.compile(r"[\"“](?P<word>[A-Za-z0-9]+)[\"”]")
_UNPARSED = ("position", "size")
GATE_REASONS = ("malformed", "too_long", "blocked_word", "unprompted_shape", "contradiction")


@dataclass
class _Claims:
    # (colour, kind) -> the distinct counts stated, in order; empty = named without a count
    groups: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    backgrounds: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def requirements(self) -> tuple[Requirement, ...]:
        known = all(len(c) == 1 for c in self.groups.values())
        kinds: dict[str, int | None] = {}
        for (_, kind), counts in self.groups.items():
            previous = kinds.get(kind, 0)
            kinds[kind] = None if previous is None or len(counts) != 1 else previous + counts[0]
        reqs = []
        if self.groups and known:
            reqs.append(Requirement.make("count", shape="any", n=sum(c[0] for c in self.groups.values())))
        reqs += [Requirement.make("count", shape=k, n=n) for k, n in kinds.items() if n is not None]
        reqs += [Requirement.make("color", shape=kind, color=color, n=n)
                 for (color, kind), counts in self.groups.items() for n in counts]
        reqs += [Requirement.make("background", background=b) for b in self.backgrounds]
        reqs += [Requirement.make("text", text=t) for t in self.texts]
        return tuple(reqs)


def _claims(text: str) -> _Claims:
    claims = _Claims()
    for m in _GROUP.finditer(text):
        det = (m["det"] or "").lower()
        key = (m["color"].lower(), m["kind"].lower())
        plural = bool(m["plural"])
        if key in claims.groups and det in ("", "the"):
            continue  # a reference to a group already named
        if det.isdigit() or det in _NUMBER_WORDS:
            n: int | None = int(det) if det.isdigit() else _NUMBER_WORDS[det]
        else:  # a / an / the / no determiner: one, unless plural without a number
            n = None if plural else 1
        counts = claims.groups.setdefault(key, [])
        if n is not None and n not in counts:
            counts.append(n)
    for m in _BACKGROUND.finditer(text):
        if (bg := m["bg"].lower()) not in claims.backgrounds:
            claims.backgrounds.append(bg)
    for m in _QUOTED.finditer(text):
        if (word := m["word"].upper()) not in claims.texts:
            claims.texts.append(word)
    return claims


def parse_requirements(text: str) -> tuple[Requirement, ...]:
    """The verifiable claims ``text`` makes, in ``rubric_for``'s order (counts, colours, background, text)."""
    return _claims(text).requirements()


def _check_rubric(user_rubric: Sequence[Requirement]) -> None:
    unparsed = [r for r in user_rubric if r.kind in _UNPARSED]
    if unparsed:
        raise ValueError(f"user rubric holds requirements no text is parsed for: {unparsed[0]} "
                         f"(kinds {_UNPARSED}); build it with parse_requirements")


def faithfulness(user_rubric: Sequence[Requirement], expansion_text: str) -> float:
    """Fraction of the user's requirements the expansion states identically; NaN for an empty rubric."""
    _check_rubric(user_rubric)
    if not user_rubric:
        return math.nan
    stated = set(parse_requirements(expansion_text))
    return sum(r in stated for r in user_rubric) / len(user_rubric)


def _key(req: Requirement) -> tuple:
    """What a requirement is about (its params less the value a contradiction would change)."""
    p = req.p
    return {"count": ("count", p.get("shape")), "color": ("color", p.get("shape"), p.get("color")),
            "background": ("background",), "text": ("text",)}[req.kind]


def gate_failures(user_rubric: Sequence[Requirement], expansion: Expansion, config: ExpansionConfig) -> list[str]:
    """Why ``expansion`` fails the safety/constraint gate ([] = it passes), in GATE_REASONS order.

    Blocked words are checked in the thinking trace too: it is the model's output even though the image model
    never reads it. Adding what the user left open (a background, a text when the user asked for none, positions,
    sizes) passes; a different background/text/count than the user's is a contradiction, and a colour+kind group
    the user did not name is unprompted (checked only when the user named at least one group).
    """
    _check_rubric(user_rubric)
    reasons = []
    if not expansion.well_formed:
        reasons.append("malformed")
    if len(expansion.text.split()) > config.max_words:
        reasons.append("too_long")
    said = f"{expansion.thinking}\n{expansion.text}"
    if any(re.search(rf"\b{re.escape(w)}\b", said, re.IGNORECASE) for w in config.blocked_words):
        reasons.append("blocked_word")
    claims = _claims(expansion.text)
    user_groups = {(r.p["color"], r.p["shape"]) for r in user_rubric if r.kind == "color"}
    if user_groups and set(claims.groups) - user_groups:
        reasons.append("unprompted_shape")
    users = {}
    for r in user_rubric:
        users.setdefault(_key(r), set()).add(r)
    if any(_key(r) in users and r not in users[_key(r)] for r in claims.requirements()):
        reasons.append("contradiction")
    return reasons


@dataclass(frozen=True)
class Judgement:
    """Faithfulness and gate reasons of one expansion per user prompt."""

    faithfulness: list[float]  # per prompt; NaN for a prompt without requirements
    gates: list[list[str]]  # per prompt; [] = passes

    @property
    def mean_faithfulness(self) -> float | None:
        """Mean over the prompts that have requirements; None (JSON null, no metric) if none has."""
        defined = [f for f in self.faithfulness if math.isfinite(f)]
        return sum(defined) / len(defined) if defined else None

    @property
    def gate_pass(self) -> float:
        return sum(not g for g in self.gates) / len(self.gates)


def judge(prompts: Sequence[Prompt], expansions: Sequence[Expansion], config: ExpansionConfig) -> Judgement:
    """``faithfulness`` and ``gate_failures`` of ``expansions[i]`` against ``prompts[i]``'s rubric."""
    if len(prompts) != len(expansions) or not prompts:
        raise ValueError(f"judge needs one expansion per prompt (and at least one), got {len(prompts)} prompts and "
                         f"{len(expansions)} expansions")
    pairs = list(zip(prompts, expansions, strict=True))
    return Judgement([faithfulness(p.rubric, e.text) for p, e in pairs],
                     [gate_failures(p.rubric, e, config) for p, e in pairs])
