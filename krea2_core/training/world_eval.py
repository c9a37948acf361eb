"""Prompt-following accuracy on held-out world prompts, scored by the world's checker.

The checker is the ground truth of the verifiable world: each prompt comes with a rubric (counts, colours,
positions, sizes, background, text) and the checker measures how many requirements an image meets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from krea2_core.config import EvalConfig
from krea2_core.diffusion.text_to_image import TextToImage
from krea2_core.world.captions import Prompt, sample_prompts
from krea2_core.world.checker import check
from krea2_core.world.render import render

# The checker is unreliable below 64 px (world tests): smaller samples are upscaled to this side first.
CHECK_SIDE = 128

Generate = Callable[[Sequence[str]], list[Image.Image]]


@dataclass(frozen=True)
class PromptFollowing:
    score: float  # mean fraction of rubric requirements met
    pass_rate: float  # fraction of images meeting their whole rubric
    per_kind: dict[str, float]  # accuracy per requirement kind (count, color, background, ...)

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}.score": self.score, f"{prefix}.pass_rate": self.pass_rate}
        out.update({f"{prefix}.{kind}": value for kind, value in self.per_kind.items()})
        return out


def held_out_prompts(config: EvalConfig, resolution: int) -> list[Prompt]:
    """The same prompts for every stage and run (seeded apart from the pool's scenes)."""
    rng = np.random.default_rng(config.seed)
    return [prompt for prompt, _ in sample_prompts(rng, config.n_prompts, resolution, resolution,
                                                   **config.scenes.sample_kwargs())]


def eval_sampler(pipe: TextToImage, config: EvalConfig, resolution: int) -> Generate:
    """How every held-out evaluation samples: ``config``'s steps, CFG, shift and noise seed, ``resolution`` square."""
    return lambda texts: pipe.generate(texts, width=resolution, height=resolution, steps=config.steps,
                                       cfg_scale=config.cfg_scale, shift=config.shift, seed=config.seed)


def for_checker(image: Image.Image) -> Image.Image:
    """``image`` upscaled (bicubic) to a short side of at least CHECK_SIDE: what the checker's analysis sees."""
    if min(image.size) >= CHECK_SIDE:
        return image
    scale = CHECK_SIDE / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)


def score_images(images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> PromptFollowing:
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    results = [check(for_checker(image), prompt) for image, prompt in zip(images, prompts, strict=True)]
    by_kind: dict[str, list[bool]] = {}
    for result in results:
        for detail in result.details:
            by_kind.setdefault(detail.requirement.kind, []).append(detail.ok)
    return PromptFollowing(
        score=float(np.mean([r.score for r in results])),
        pass_rate=float(np.mean([r.passed for r in results])),
        per_kind={kind: float(np.mean(oks)) for kind, oks in sorted(by_kind.items())},
    )


def evaluate(generate: Generate, prompts: Sequence[Prompt]) -> tuple[PromptFollowing, list[Image.Image]]:
    images = generate([p.text for p in prompts])
    return score_images(images, prompts), images


def reference_score(config: EvalConfig, resolution: int) -> PromptFollowing:
    """The checker's score of the true scenes rendered at ``resolution``: the ceiling a model can reach."""
    rng = np.random.default_rng(config.seed)
    pairs = sample_prompts(rng, config.n_prompts, resolution, resolution, **config.scenes.sample_kwargs())
    return score_images([render(scene) for _, scene in pairs], [prompt for prompt, _ in pairs])


def image_grid(images: Sequence[Image.Image], columns: int = 4) -> Image.Image:
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image.resize((w, h)), ((i % columns) * w, (i // columns) * h))
    return grid
