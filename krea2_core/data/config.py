"""Configs of the data stages: what one resolution stage's packed shards depend on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from krea2_core.common.strict import Strict, require
from krea2_core.world.config import WorldScenesConfig


@dataclass
class PackingConfig(Strict):
    """Everything one stage's packed shards depend on, and nothing else: the packing task is cached on it, so a
    training setting (steps, lr, ...) never re-packs."""

    stage: Literal["256", "512", "1024"]
    resolution: int
    aspect_ratios: list[float]
    multiple: int  # image sides are multiples of this (autoencoder downsample x patch size)
    global_batch: int
    seed: int
    world_scenes: WorldScenesConfig = field(default_factory=WorldScenesConfig)

    def __post_init__(self) -> None:
        require(self.resolution >= 16 and self.multiple >= 1 and self.global_batch >= 1,
                "resolution must be >= 16, multiple and global_batch >= 1")
