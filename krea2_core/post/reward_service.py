"""The RL rewards served apart from the trainer: one Ray actor per reward with a weight > 0.

Each actor builds its reward (and loads its models) once, in its own process, with the CPUs/GPUs
``RewardsConfig`` gives it (Ray runs an actor of under one CPU with one intra-op thread); the trainer sends each
round's images (uint8 arrays, put in the object store once) and prompts to every actor at the same time and gathers
the scores. ``ray_address`` "" starts a private local Ray
sized for the actors (shut down again on ``close``); "auto" or "ray://..." joins a cluster whose workers have
krea2_core installed. A Ray already initialised in the process is used as it is and left running.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ray
from PIL import Image

from krea2_core.data.images import to_rgb
from krea2_core.post.config import RewardsConfig
from krea2_core.post.rewards import build_reward
from krea2_core.world.captions import Prompt


class RewardServiceError(RuntimeError):
    """A reward actor failed to start or to score; names the reward and carries the original error."""


class _RewardActor:
    """Hosts one reward. It is built by ``start`` rather than the constructor, so that a failure reaches the caller
    as the original exception (Ray reports a failed constructor only as a dead actor with a traceback)."""

    def start(self, name: str, config: RewardsConfig, reward_model: Path | None) -> None:
        self.reward = build_reward(name, config, reward_model)

    def score(self, images: list[np.ndarray], prompts: list[Prompt]) -> np.ndarray:
        return self.reward.score([Image.fromarray(image) for image in images], prompts)


def _original(error: Exception) -> str:
    """The exception raised inside the actor as "Type: message" (Ray's own error, e.g. a dead actor, as it is)."""
    cause = getattr(error, "cause", None)
    return f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(error)


class RewardService:
    """``score(images, prompts)`` -> {reward name: float64 (n,) scores} for every reward with a weight > 0."""

    def __init__(self, config: RewardsConfig, reward_model: Path | None) -> None:
        self.names = [name for name, weight in config.weights.items() if weight > 0]
        self._started_ray = False
        if not ray.is_initialized():
            if config.ray_address:
                ray.init(address=config.ray_address, log_to_driver=False)
            else:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance on loopback
                ray.init(num_cpus=max(1, math.ceil(len(self.names) * config.actor_cpus)), include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            self._started_ray = True
        actor = ray.remote(num_cpus=config.actor_cpus, num_gpus=config.actor_gpus)(_RewardActor)
        self._actors = {name: actor.remote() for name in self.names}
        try:
            self._gather({name: handle.start.remote(name, config, reward_model)
                          for name, handle in self._actors.items()}, "start")
        except BaseException:
            self.close()
            raise

    def _gather(self, refs: dict[str, Any], doing: str) -> dict[str, Any]:
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref)
            except ray.exceptions.RayError as error:
                raise RewardServiceError(f"reward {name!r} failed to {doing}: {_original(error)}") from error
        return out

    def score(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> dict[str, np.ndarray]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        images_ref = ray.put([np.asarray(to_rgb(image), dtype=np.uint8) for image in images])
        prompts_ref = ray.put(list(prompts))
        refs = {name: handle.score.remote(images_ref, prompts_ref) for name, handle in self._actors.items()}
        return {name: np.asarray(scores, dtype=np.float64) for name, scores in self._gather(refs, "score").items()}

    def close(self) -> None:
        for handle in self._actors.values():
            ray.kill(handle)
        self._actors = {}
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    def __enter__(self) -> RewardService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
