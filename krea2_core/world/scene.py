"""Scene graph of the verifiable world: shapes on a 3x3 grid over a textured background."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .split import MAX_DRAWS, Split, draw_streams, split_of

# Saturated colours, pairwise >= ~88 apart in RGB and far from every pale background,
# so nearest-palette segmentation stays reliable after blur and JPEG.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 40),
    "orange": (250, 140, 10),
    "yellow": (245, 225, 30),
    "green": (30, 150, 50),
    "cyan": (20, 180, 200),
    "blue": (30, 60, 200),
    "purple": (130, 40, 160),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
# Side of the shape's bounding box as a fraction of the image's short side.
SIZES: dict[str, float] = {"small": 0.12, "medium": 0.19, "large": 0.26}
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
POSITIONS: tuple[str, ...] = tuple(
    "center" if (r, c) == ("middle", "center") else f"{r} {c}" for r in ROWS for c in COLS
)
# Mean colour of each background; the renderer builds around it and the checker classifies by it.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "beige gradient": (236, 222, 196),
    "grey sand": (205, 205, 202),
    "light blue sky gradient": (200, 220, 244),
    "pale green stripes": (205, 232, 198),
    "lavender haze": (228, 206, 234),
}
WORDS: tuple[str, ...] = ("SALE", "HELLO", "KREA", "OPEN", "STOP", "CAFE", "JAZZ", "MOON", "BOOK", "SUN")
TEXT_COLOR: tuple[int, int, int] = (40, 40, 48)


def cell_index(position: str) -> int:
    return POSITIONS.index(position)


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for value, allowed in ((self.kind, KINDS), (self.color, COLORS), (self.size, SIZES), (self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{value!r} not in {tuple(allowed)}")


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    shapes: tuple[Shape, ...]
    text: str | None
    seed: int

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        cells = [s.position for s in self.shapes]
        if len(set(cells)) != len(cells):
            raise ValueError("two shapes share a grid cell")
        if not self.shapes:
            raise ValueError("a scene needs at least one shape")
        if self.text is not None and len(cells) > 8:
            raise ValueError("text needs a free grid cell")

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "background": self.background,
            "shapes": [{"kind": s.kind, "color": s.color, "size": s.size, "position": s.position} for s in self.shapes],
            "text": self.text,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scene:
        return cls(
            width=int(d["width"]),
            height=int(d["height"]),
            background=d["background"],
            shapes=tuple(Shape(**s) for s in d["shapes"]),
            text=d["text"],
            seed=int(d["seed"]),
        )


def text_cell(scene: Scene) -> int:
    """Grid cell holding the scene's text: a free cell chosen from the seed."""
    taken = {cell_index(s.position) for s in scene.shapes}
    free = [i for i in range(9) if i not in taken]
    return free[int(np.random.default_rng([scene.seed, 99]).integers(len(free)))]


def scene_type(scene: Scene) -> str:
    """Coarse type (dominant kind + count bucket), used to measure the share of rare scene types."""
    counts = Counter(s.kind for s in scene.shapes)
    dominant = max(KINDS, key=lambda k: counts[k])  # ties go to the earlier kind
    n = len(scene.shapes)
    bucket = "single" if n == 1 else "few" if n <= 3 else "many"
    return f"{dominant}-{bucket}"


def _pick(rng: np.random.Generator, options: Sequence[str], weights: Mapping[str, float] | None) -> str:
    w = np.array([float((weights or {}).get(o, 1.0)) for o in options])
    if w.sum() <= 0:
        raise ValueError(f"weights for {options} sum to zero")
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def sample_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    *,
    max_shapes: int = 3,
    text_prob: float = 0.3,
    weights: Mapping[str, Mapping[str, float]] | None = None,
    split: Split | None = "train",
) -> Scene:
    """Random scene. `weights` maps "kind"/"color"/"size"/"background" to relative option weights
    (missing options weigh 1.0), so callers can make some scene types rare. `split` draws again until the
    scene's content belongs to that split (world.split: "train" for every training source, "held_out" for
    evaluation); None takes the first draw."""
    if not 1 <= max_shapes <= 9:
        raise ValueError("max_shapes must be in 1..9")
    if split not in ("train", "held_out", None):
        raise ValueError(f"split must be 'train', 'held_out' or None, got {split!r}")
    for stream in draw_streams(rng, MAX_DRAWS):
        scene = _draw_scene(stream, width, height, max_shapes, text_prob, weights or {})
        if split is None or split_of(scene) == split:
            return scene
    raise ValueError(f"no {split} scene in {MAX_DRAWS} draws: the weights leave (almost) no scene of that split")


def _draw_scene(rng: np.random.Generator, width: int, height: int, max_shapes: int, text_prob: float,
                w: Mapping[str, Mapping[str, float]]) -> Scene:
    text = WORDS[int(rng.integers(len(WORDS)))] if rng.random() < text_prob else None
    n = int(rng.integers(1, max_shapes + 1))
    if text is not None:
        n = min(n, 8)
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    shapes = tuple(
        Shape(
            kind=_pick(rng, KINDS, w.get("kind")),
            color=_pick(rng, COLORS, w.get("color")),
            size=_pick(rng, tuple(SIZES), w.get("size")),
            position=POSITIONS[c],
        )
        for c in cells
    )
    background = _pick(rng, tuple(BACKGROUNDS), w.get("background"))
    return Scene(width, height, background, shapes, text, seed=int(rng.integers(2**31 - 1)))
