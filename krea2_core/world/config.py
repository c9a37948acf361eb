"""Configs of the verifiable world: the raw pool it renders, and the scene slices stages draw from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from krea2_core.common.strict import Strict, require


@dataclass
class WorldPoolConfig(Strict):
    """The raw pool the tiny preset curates: world scenes, injected defects and real photos."""

    seed: int = 0
    n_scenes: int = 400
    min_side: int = 160
    max_side: int = 384
    n_exact_duplicates: int = 30
    n_near_duplicates: int = 60  # spread over re-encode, resize, crop and mild recolor
    n_color_variants: int = 20  # same layout, other shape colours: distinct images that must be kept
    n_per_defect: int = 6  # of each defect class (corrupt, flat, border, noise, tiny, extreme aspect, ...)
    real_image_dirs: list[str] = field(default_factory=lambda: ["skimage", "/usr/share/backgrounds"])
    max_real_images: int = 24  # each real image costs the offline LLM captioner ~5 s on 2 cores
    # relative weights per scene attribute ("kind", "color", "size", "background"; missing options weigh 1):
    # a long tail for semantic curation to keep
    weights: dict[str, dict[str, float]] = field(default_factory=lambda: {
        "kind": {"triangle": 0.15}, "background": {"lavender haze": 0.1}})

    def __post_init__(self) -> None:
        require(self.n_scenes >= 1, f"n_scenes must be >= 1, got {self.n_scenes}")
        require(32 <= self.min_side <= self.max_side,
                f"needs 32 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        for name in ("n_exact_duplicates", "n_near_duplicates", "n_color_variants", "n_per_defect", "max_real_images"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for attribute, options in self.weights.items():
            require(attribute in ("kind", "color", "size", "background"),
                    f"weights: unknown scene attribute {attribute!r}; use kind, color, size or background")
            require(all(w >= 0 for w in options.values()), f"weights.{attribute}: weights must be >= 0")
        require(self.n_exact_duplicates + self.n_near_duplicates + self.n_color_variants <= self.n_scenes,
                "duplicates and colour variants need at least as many scenes as their sum")


@dataclass
class SceneDomainConfig(Strict):
    """A slice of the verifiable world as ``world.sample_scene`` arguments: which scenes held-out evaluation
    prompts and the world's SFT domain sets are drawn from (the defaults are the whole world)."""

    max_shapes: int = 3
    text_prob: float = 0.3
    # "kind" / "color" / "size" / "background" -> option -> relative weight (missing options weigh 1)
    weights: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from krea2_core.world.scene import BACKGROUNDS, COLORS, KINDS, SIZES

        require(1 <= self.max_shapes <= 9, f"max_shapes must be in 1..9, got {self.max_shapes}")
        require(0.0 <= self.text_prob <= 1.0, f"text_prob must be in [0, 1], got {self.text_prob}")
        options = {"kind": KINDS, "color": COLORS, "size": tuple(SIZES), "background": tuple(BACKGROUNDS)}
        for attribute, weights in self.weights.items():
            require(attribute in options, f"weights: unknown attribute {attribute!r}; use {sorted(options)}")
            unknown = set(weights) - set(options[attribute])
            require(not unknown, f"weights.{attribute}: unknown options {sorted(unknown)}; use {options[attribute]}")
            require(all(w >= 0 for w in weights.values()), f"weights.{attribute} must be >= 0")
            require(sum(float(weights.get(o, 1.0)) for o in options[attribute]) > 0,
                    f"weights.{attribute} leave no option with a positive weight")

    def sample_kwargs(self) -> dict[str, Any]:
        return {"max_shapes": self.max_shapes, "text_prob": self.text_prob, "weights": self.weights}


@dataclass
class WorldScenesConfig(Strict):
    """Procedural world scenes a resolution stage trains on besides its curated images: ``n`` training-split scenes
    (world.split) drawn for this stage, rendered at its square bucket with their exact scene-graph captions. The
    world costs nothing to draw; on the tiny preset they give pretraining the thousands of unique scenes that
    composition needs, without sending each one through OCR and embedding."""

    n: int = 0
    scenes: SceneDomainConfig = field(default_factory=SceneDomainConfig)

    def __post_init__(self) -> None:
        require(self.n >= 0, f"n must be >= 0, got {self.n}")
