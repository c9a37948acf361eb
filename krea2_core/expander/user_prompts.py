"""Realistic user-like world prompts for the expander's RL mix (report, "Prompt Expansion": "realistic user-like
traffic"): short, conversational and under-specified. They name every shape group of a sampled scene (so their
counts hold) and sometimes the background or the word, never positions or sizes; the rubric is what the text
states, so only the user's own claims are required of an image."""

from __future__ import annotations

import numpy as np

from krea2_core.expander.config import ExpansionConfig
from krea2_core.expander.faithfulness import parse_requirements
from krea2_core.world.captions import NUMBER_WORDS, Prompt, article, shape_groups, join_words
from krea2_core.world.config import SceneDomainConfig
from krea2_core.world.scene import Scene, sample_scene

TEMPLATES = (
    "can you make {what}{extra}?",
    "draw {what}{extra}",
    "i want {what}{extra}",
    "{what}{extra} please",
    "make me a picture of {what}{extra}",
    "{what}{extra}",
    "could you draw {what}{extra} pls",
    "hey, i need an image with {what}{extra}",
    "generate {what}{extra}, thanks",
)
_BACKGROUND = (" on a {} background", " on {}", ", {} background", " with a {} background")
_TEXT = (' with the word "{}"', ' that says "{}"', ', text "{}"', ' and the word "{}" somewhere')
BACKGROUND_PROB = 0.35  # users leave the background open most of the time
TEXT_PROB = 0.7  # ... and usually mention a word they want written


def _group(rng: np.random.Generator, color: str, kind: str, n: int) -> str:
    if n == 1:
        return f"{article(color)} {color} {kind}" if rng.random() < 0.8 else f"one {color} {kind}"
    return f"{n if rng.random() < 0.3 else NUMBER_WORDS[n]} {color} {kind}s"


def _word(rng: np.random.Generator, word: str) -> str:
    return (word, word.lower(), word.capitalize())[int(rng.integers(3))]


def user_prompt(rng: np.random.Generator, scene: Scene) -> Prompt:
    """One casual request for ``scene``; its rubric is parse_requirements of the text."""
    what = join_words([_group(rng, color, kind, len(g)) for (color, kind), g in shape_groups(scene).items()])
    extra = ""
    if rng.random() < BACKGROUND_PROB:
        extra += _BACKGROUND[int(rng.integers(len(_BACKGROUND)))].format(scene.background)
    if scene.text and rng.random() < TEXT_PROB:
        extra += _TEXT[int(rng.integers(len(_TEXT)))].format(_word(rng, scene.text))
    text = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(what=what, extra=extra)
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    return Prompt(text, parse_requirements(text))


def user_prompts(n: int, seed: int, scenes: SceneDomainConfig, resolution: int) -> list[Prompt]:
    """``n`` user-like prompts. Scenes come from ``sample_scene`` on a generator seeded by ``seed`` alone (the same
    scenes as world sampling with that seed); the wording draws from a separate stream."""
    if n < 0 or resolution < 1:
        raise ValueError(f"need n >= 0 and resolution >= 1, got n={n}, resolution={resolution}")
    scene_rng, word_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    return [user_prompt(word_rng, sample_scene(scene_rng, resolution, resolution, **scenes.sample_kwargs()))
            for _ in range(n)]


PROMPT_SETS = {"train": 0, "mining": 1, "held_out": 2}  # seed offsets: the sets never share a scene stream


def prompt_set(name: str, n: int, config: ExpansionConfig, resolution: int) -> list[Prompt]:
    """The first ``n`` prompts of one of the expander's world prompt sets: ``train`` (RL's realistic prompts),
    ``mining`` (RL's hard-case probes) or ``held_out`` (SFT's and RL's evaluations)."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; use one of {list(PROMPT_SETS)}")
    return user_prompts(n, config.seed + PROMPT_SETS[name], config.scenes, resolution)
