"""Train / held-out split of the world by scene-graph content.

A scene's content key is what its captions and rubric say (background, text, and each shape's kind, colour,
size and cell; not the render seed or image size). A fixed share of all possible contents is held out, chosen
by a hash of the key: training sources draw only "train" scenes and evaluation only "held_out" ones, so no
held-out prompt describes a scene any training image shows, whatever seeds or pool sizes are used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # scene.py imports this module
    from .scene import Scene

Split = Literal["train", "held_out"]
HELD_OUT_BUCKETS = 8  # one bucket of 8 (12.5% of all scene contents) is held out
MAX_DRAWS = 10_000  # draws before a caller filtering by split gives up


def content_key(scene: Scene) -> str:
    shapes = sorted((s.position, s.kind, s.color, s.size) for s in scene.shapes)
    return "|".join([scene.background, scene.text or "", *(",".join(shape) for shape in shapes)])


def split_of(scene: Scene) -> Split:
    digest = hashlib.blake2b(content_key(scene).encode(), digest_size=8).digest()
    return "held_out" if int.from_bytes(digest, "big") % HELD_OUT_BUCKETS == 0 else "train"


def draw_streams(rng: np.random.Generator, limit: int) -> Iterator[np.random.Generator]:
    """``rng`` itself, then up to ``limit - 1`` independent streams jumped ahead of it for redraws. A caller that
    redraws until a scene is in its split advances ``rng`` exactly as one draw does, so filtering by split
    replaces the other split's scenes and leaves every other scene a seed draws unchanged."""
    yield rng
    for jumps in range(1, limit):
        yield np.random.Generator(rng.bit_generator.jumped(jumps))
