"""Captions, prompts and rubrics (verifiable requirements) derived from a scene graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .scene import Scene, Shape, sample_scene

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_OPENERS = ("An image of", "A picture showing", "A simple illustration of", "A flat graphic with")
_TEXT_SENTENCES = (
    'The word "{}" is written in dark letters.',
    'Dark text reads "{}".',
    'It carries the word "{}".',
)

REQUIREMENT_KINDS = ("count", "color", "position", "size", "background", "text")


@dataclass(frozen=True)
class Requirement:
    """One verifiable claim. params (sorted key/value pairs) by kind:
    count: shape ("any" or a kind), n | color: shape, color, n (exact count of that colour+kind) |
    position: shape, color, position | size: shape, color, size | background: background | text: text."""

    kind: str
    params: tuple[tuple[str, Any], ...]

    def __post_init__(self) -> None:
        if self.kind not in REQUIREMENT_KINDS:
            raise ValueError(f"unknown requirement kind {self.kind!r}")

    @classmethod
    def make(cls, kind: str, **params: Any) -> Requirement:
        return cls(kind, tuple(sorted(params.items())))

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": self.p}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Requirement:
        return cls.make(d["kind"], **d["params"])


@dataclass(frozen=True)
class Prompt:
    text: str
    rubric: tuple[Requirement, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "rubric": [r.to_dict() for r in self.rubric]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Prompt:
        return cls(d["text"], tuple(Requirement.from_dict(r) for r in d["rubric"]))


def shape_groups(scene: Scene) -> dict[tuple[str, str], list[Shape]]:
    groups: dict[tuple[str, str], list[Shape]] = {}
    for s in scene.shapes:
        groups.setdefault((s.color, s.kind), []).append(s)
    return groups


def join_words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(color: str, kind: str, n: int) -> str:
    return f"{article(color)} {color} {kind}" if n == 1 else f"{NUMBER_WORDS[n]} {color} {kind}s"


def _where(position: str) -> str:
    return f"in the {position}"


def captions(scene: Scene) -> dict[str, str]:
    """"short" (shapes), "medium" (+ background, text), "long" (+ size and position of every shape)."""
    rng = np.random.default_rng([scene.seed, 7])
    groups = shape_groups(scene)
    short = join_words([_noun(c, k, len(g)) for (c, k), g in groups.items()])
    with_text = f', with the word "{scene.text}"' if scene.text else ""
    medium = f"{short} on a {scene.background} background{with_text}"
    details = []
    for (color, kind), group in groups.items():
        if len(group) == 1:
            s = group[0]
            details.append(f"The {color} {kind} is {s.size} and sits {_where(s.position)}.")
        else:
            parts = join_words([f"{article(s.size)} {s.size} one {_where(s.position)}" for s in group])
            details.append(f"{NUMBER_WORDS[len(group)].capitalize()} {color} {kind}s: {parts}.")
    long = f"{_OPENERS[rng.integers(len(_OPENERS))]} {short} on a {scene.background} background. " + " ".join(details)
    if scene.text:
        long += " " + _TEXT_SENTENCES[rng.integers(len(_TEXT_SENTENCES))].format(scene.text)
    return {"short": short, "medium": medium, "long": long}


def rubric_for(scene: Scene) -> tuple[Requirement, ...]:
    reqs = [Requirement.make("count", shape="any", n=len(scene.shapes))]
    kinds: dict[str, int] = {}
    for s in scene.shapes:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    reqs += [Requirement.make("count", shape=k, n=n) for k, n in kinds.items()]
    for (color, kind), group in shape_groups(scene).items():
        reqs.append(Requirement.make("color", shape=kind, color=color, n=len(group)))
        reqs += [Requirement.make("position", shape=kind, color=color, position=s.position) for s in group]
        for size in dict.fromkeys(s.size for s in group):
            reqs.append(Requirement.make("size", shape=kind, color=color, size=size))
    reqs.append(Requirement.make("background", background=scene.background))
    if scene.text:
        reqs.append(Requirement.make("text", text=scene.text))
    return tuple(reqs)


def prompt_for(scene: Scene) -> Prompt:
    return Prompt(captions(scene)["long"], rubric_for(scene))


def sample_prompts(
    rng: np.random.Generator, n: int, width: int, height: int, **sample_kwargs: Any
) -> list[tuple[Prompt, Scene]]:
    """n (prompt, reference scene) pairs; ``split="held_out"`` (a sample_scene argument) for evaluation sets."""
    out = []
    for _ in range(n):
        scene = sample_scene(rng, width, height, **sample_kwargs)
        out.append((prompt_for(scene), scene))
    return out
