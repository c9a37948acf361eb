"""Prompt following on held-out world prompts, scored by the world's checker, with 95% confidence intervals.

The checker is the ground truth of the verifiable world: each prompt comes with a rubric and the checker
measures which requirements an image meets. Results are reported per requirement kind: ``background``,
``color`` (exactly the prompted number of shapes of that colour and kind), ``kind`` (exactly the prompted
number of each shape kind), ``count`` (the prompted total), ``position``, ``size`` and ``text``; plus the score
(mean share of a prompt's rubric met) and the pass rate (whole rubric met). A kind the checker cannot judge on
true renders at the images' resolution (text below ~64 px) is left out of every number, and named.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from krea2_core.diffusion.text_to_image import TextToImage
from krea2_core.evaluation.stats import Estimate, format_change, paired_difference, share
from krea2_core.training.config import EvalConfig
from krea2_core.world.captions import Prompt, Requirement, sample_prompts
from krea2_core.world.checker import check
from krea2_core.world.render import render

REPORT_KINDS = ("background", "color", "kind", "count", "position", "size", "text")
# The checker is unreliable below 64 px on shapes' details: smaller samples are upscaled to this side first.
CHECK_SIDE = 128
# A requirement kind is judged at a resolution only if true renders of held-out scenes meet it this often.
RELIABLE = 0.95
_CALIBRATION = EvalConfig(n_prompts=96)

Generate = Callable[..., list[Image.Image]]  # (texts, first_index=0) -> one image per text


def report_kind(requirement: Requirement) -> str:
    """The kind a requirement is reported under: count requirements of one shape kind are ``kind``."""
    if requirement.kind == "count" and requirement.p["shape"] != "any":
        return "kind"
    return requirement.kind


@dataclass(frozen=True)
class PromptFollowing:
    """Per-prompt checker outcomes of one set of images (prompt order kept, so two models can be paired). Score and
    pass rate are over the judged kinds: a prompt's score is the share of its judged requirements met."""

    hits: dict[str, np.ndarray]  # report kind -> requirements of that kind met, per prompt
    totals: dict[str, np.ndarray]  # report kind -> requirements of that kind asked, per prompt
    unjudged: tuple[str, ...] = ()  # kinds the checker cannot judge at this resolution

    @property
    def n_prompts(self) -> int:
        return len(next(iter(self.totals.values()))) if self.totals else 0

    @property
    def kinds(self) -> list[str]:
        """The judged kinds some prompt asks for, in report order."""
        return [kind for kind in REPORT_KINDS if kind in self.totals and self.totals[kind].sum() > 0]

    @property
    def scores(self) -> np.ndarray:
        met = sum(self.hits[kind] for kind in self.kinds)
        asked = sum(self.totals[kind] for kind in self.kinds)
        return np.where(asked > 0, met / np.maximum(asked, 1), 1.0)

    @property
    def passed(self) -> np.ndarray:
        return np.all([self.hits[kind] == self.totals[kind] for kind in self.kinds], axis=0)

    @property
    def score(self) -> float:
        return float(np.mean(self.scores))

    @property
    def pass_rate(self) -> float:
        return float(np.mean(self.passed))

    @property
    def per_kind(self) -> dict[str, float]:
        return {kind: float(self.hits[kind].sum() / self.totals[kind].sum()) for kind in self.kinds}

    def restricted(self, kinds: Sequence[str]) -> PromptFollowing:
        """The same outcomes judged on ``kinds`` only (two evaluations compare on the kinds both judge)."""
        keep = [kind for kind in self.totals if kind in kinds]
        return PromptFollowing({k: self.hits[k] for k in keep}, {k: self.totals[k] for k in keep},
                               tuple(sorted(set(self.unjudged) | (set(self.totals) - set(keep)))))

    def _shares(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        ones = np.ones(self.n_prompts)
        return {"score": (self.scores, ones), "pass_rate": (self.passed.astype(float), ones),
                **{kind: (self.hits[kind], self.totals[kind]) for kind in self.kinds}}

    def estimates(self) -> dict[str, Estimate]:
        """score, pass_rate and each judged kind's accuracy, each with its 95% CI."""
        return {name: share(hits, totals) for name, (hits, totals) in self._shares().items()}

    def metrics(self, prefix: str) -> dict[str, float]:
        """``prefix.name`` with ``prefix.name.low`` / ``.high`` (95% CI) for score, pass_rate and every kind."""
        return _flat(self.estimates(), prefix)

    def _common(self, after: PromptFollowing) -> tuple[PromptFollowing, PromptFollowing]:
        if after.n_prompts != self.n_prompts:
            raise ValueError(f"paired comparison needs the same prompts: {self.n_prompts} vs {after.n_prompts}")
        both = [kind for kind in REPORT_KINDS if kind in self.totals and kind in after.totals]
        return self.restricted(both), after.restricted(both)

    def compare(self, after: PromptFollowing) -> dict[str, Estimate]:
        """``after - self`` per measure, paired by prompt (both must score the same prompts in the same order), on
        the kinds both judge."""
        before, now = self._common(after)
        mine, theirs = before._shares(), now._shares()
        return {name: paired_difference(mine[name][0], theirs[name][0], mine[name][1], theirs[name][1])
                for name in mine if name in theirs}

    def change_lines(self, after: PromptFollowing) -> list[str]:
        """One ``name: a -> b (diff, 95% CI)`` line per measure, on the kinds both judge."""
        before, now = self._common(after)
        old, new, diffs = before.estimates(), now.estimates(), self.compare(after)
        return [f"{name}: {format_change(old[name], new[name], diff)}" for name, diff in diffs.items()]

    def to_dict(self) -> dict[str, object]:
        return {"hits": {k: v.tolist() for k, v in self.hits.items()},
                "totals": {k: v.tolist() for k, v in self.totals.items()}, "unjudged": list(self.unjudged)}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PromptFollowing:
        hits, totals = data["hits"], data["totals"]
        return cls({k: np.asarray(v, dtype=float) for k, v in hits.items()},  # type: ignore[union-attr]
                   {k: np.asarray(v, dtype=float) for k, v in totals.items()},  # type: ignore[union-attr]
                   tuple(data.get("unjudged", ())))  # type: ignore[arg-type]


def _flat(estimates: dict[str, Estimate], prefix: str) -> dict[str, float]:
    out = {}
    for name, estimate in estimates.items():
        out.update({f"{prefix}.{name}": estimate.value, f"{prefix}.{name}.low": estimate.low,
                    f"{prefix}.{name}.high": estimate.high})
    return out


def comparison_metrics(before: PromptFollowing, after: PromptFollowing, prefix: str) -> dict[str, float]:
    """For every measure on the kinds both judge: ``prefix.name`` (after - before, paired by prompt) with its 95% CI
    (``.low`` / ``.high``) and the two values compared (``.before`` / ``.after``): ``stats.format_metric`` prints
    it as ``a -> b (diff, 95% CI)``."""
    old, new = before._common(after)
    old_values, new_values = old.estimates(), new.estimates()
    out = _flat(before.compare(after), prefix)
    for name in old_values:
        out.update({f"{prefix}.{name}.before": old_values[name].value, f"{prefix}.{name}.after": new_values[name].value})
    return out


def held_out_prompts(config: EvalConfig, resolution: int) -> list[Prompt]:
    """The same prompts for every stage and run: held-out scenes (world.split), drawn with ``config.seed``."""
    return [prompt for prompt, _ in _held_out(config, resolution)]


def _held_out(config: EvalConfig, resolution: int) -> list[tuple[Prompt, object]]:
    rng = np.random.default_rng(config.seed)
    return sample_prompts(rng, config.n_prompts, resolution, resolution, split="held_out",
                          **config.scenes.sample_kwargs())


@lru_cache(maxsize=16)
def checker_reliability(side: int) -> dict[str, float]:
    """Accuracy per report kind of the checker on true renders of 96 held-out scenes at ``side`` px."""
    pairs = _held_out(_CALIBRATION, side)
    reference = _outcomes([render(scene) for _, scene in pairs], [prompt for prompt, _ in pairs], ())
    return reference.per_kind


def for_checker(image: Image.Image) -> Image.Image:
    """``image`` upscaled (bicubic) to a short side of at least CHECK_SIDE: what the checker's analysis sees."""
    if min(image.size) >= CHECK_SIDE:
        return image
    scale = CHECK_SIDE / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)


def _outcomes(images: Sequence[Image.Image], prompts: Sequence[Prompt], unjudged: tuple[str, ...]
              ) -> PromptFollowing:
    n = len(prompts)
    hits = {kind: np.zeros(n) for kind in REPORT_KINDS if kind not in unjudged}
    totals = {kind: np.zeros(n) for kind in hits}
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        judged = [r for r in prompt.rubric if report_kind(r) not in unjudged]
        for detail in check(for_checker(image), judged).details:
            kind = report_kind(detail.requirement)
            hits[kind][i] += detail.ok
            totals[kind][i] += 1
    return PromptFollowing(hits, totals, unjudged)


def score_images(images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> PromptFollowing:
    """Checker outcomes of ``images`` (one per prompt, one size); kinds unreliable at that size are left out."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    if not images:
        raise ValueError("score_images needs at least one image")
    sides = {min(image.size) for image in images}
    if len(sides) != 1:
        raise ValueError(f"images of one evaluation must share one size, got short sides {sorted(sides)}")
    reliability = checker_reliability(sides.pop())
    unjudged = tuple(kind for kind in REPORT_KINDS if reliability.get(kind, 1.0) < RELIABLE)
    return _outcomes(images, prompts, unjudged)


def eval_sampler(pipe: TextToImage, config: EvalConfig, resolution: int) -> Generate:
    """How every held-out evaluation samples: ``config``'s steps, CFG, shift and noise seed, ``resolution`` square,
    in batches of ``config.batch``. ``generate(texts, first_index)``: prompt i gets the noise of index
    first_index + i, so a share of the prompts samples exactly what one process sampling all of them would."""
    def generate(texts: Sequence[str], first_index: int = 0) -> list[Image.Image]:
        images: list[Image.Image] = []
        for start in range(0, len(texts), config.batch):
            images += pipe.generate(texts[start:start + config.batch], width=resolution, height=resolution,
                                    steps=config.steps, cfg_scale=config.cfg_scale, shift=config.shift,
                                    seed=config.seed, first_index=first_index + start)
        return images
    return generate


def evaluate(generate: Generate, prompts: Sequence[Prompt]) -> tuple[PromptFollowing, list[Image.Image]]:
    images = generate([p.text for p in prompts])
    return score_images(images, prompts), images


def evaluate_shared(generate: Generate, prompts: Sequence[Prompt], *, share: int, shares: int, rank: int = 0
                    ) -> tuple[PromptFollowing, list[Image.Image]] | None:
    """``evaluate`` split over the processes of a torchrun job: data-parallel replica ``share`` of ``shares``
    samples its contiguous slice (every slice padded to one length, so sharded models run the same number of
    forward passes on every rank), rank 0 gathers the images and scores them. Returns the result on rank 0, None
    elsewhere; without a process group it is ``evaluate``."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return evaluate(generate, prompts)
    size = -(-len(prompts) // shares)
    first = min(share * size, len(prompts))
    mine = [p.text for p in prompts[first:first + size]]
    padded = mine + [prompts[-1].text] * (size - len(mine))
    images = generate(padded, first)[:len(mine)]
    gathered: list[object] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object((share, images), gathered, dst=0)
    if rank != 0:
        return None
    by_share = dict(gathered)  # type: ignore[arg-type]  # tensor-parallel peers of a replica sample the same images
    everything = [image for index in range(shares) for image in by_share[index]]
    return score_images(everything, prompts), everything


def reference_score(config: EvalConfig, resolution: int) -> PromptFollowing:
    """The checker's outcomes on the true held-out scenes rendered at ``resolution``: the ceiling a model can
    reach."""
    pairs = _held_out(config, resolution)
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
