"""The verifiable world: procedural scenes with known scene graphs, captions, rubrics and a checker."""

from .captions import Prompt, Requirement, captions, prompt_for, rubric_for, sample_prompts
from .checker import Analysis, CheckResult, Detail, Detected, analyze, check, match_text
from .render import render
from .scene import (
    BACKGROUNDS,
    COLORS,
    KINDS,
    PALETTE,
    POSITIONS,
    SIZES,
    WORDS,
    Scene,
    Shape,
    sample_scene,
    scene_type,
    text_cell,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "KINDS",
    "PALETTE",
    "POSITIONS",
    "SIZES",
    "WORDS",
    "Analysis",
    "CheckResult",
    "Detail",
    "Detected",
    "Prompt",
    "Requirement",
    "Scene",
    "Shape",
    "analyze",
    "captions",
    "check",
    "match_text",
    "prompt_for",
    "render",
    "rubric_for",
    "sample_prompts",
    "sample_scene",
    "scene_type",
    "text_cell",
]
