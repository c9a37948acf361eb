"""The RL stage's rewards (report, "Reinforcement learning") behind one interface, and their GDPO combination.

- ``rubric``: prompt following. Each world prompt is decomposed into verifiable requirements (its rubric); the
  reward is the fraction the image meets, by the world's checker (the same upscale as the held-out evaluation).
- ``text``: text rendering. OCR of the image against the prompt's word; NaN for prompts without text.
- ``artifact``: structure and artifacts, higher = fewer. By default the world's structure check (below); or a
  transformers image classifier's probability of an artifact label.
- ``aesthetic``: the small model the ``reward_model`` stage trains on the PO preference pairs, or a transformers
  image model with one regression logit.

``gdpo_advantages`` combines them per group of samples of one prompt. It is hand-written: GDPO is a few lines of
numpy and no maintained library implements it.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from krea2_core.captioning.ocr import RapidOcrEngine
from krea2_core.common.device import resolve_device
from krea2_core.captioning.config import OcrConfig
from krea2_core.post.config import REWARD_NAMES, RewardsConfig
from krea2_core.data.images import to_rgb
from krea2_core.post.oracle import WorldCheckerOracle
from krea2_core.evaluation.prompt_following import for_checker
from krea2_core.world.captions import Prompt
from krea2_core.world.checker import Detected, analyze

# PP-OCR reads the world's words reliably once they are ~25 px tall: the short side is upscaled to this first
# (64 px renders: 58 of 60 words read exactly at 192, 56 at 256, 3 of 12 without upscaling).
OCR_SIDE = 192
# Structure check: a pixel is foreground when this far (RGB) from the background's mean colour; backgrounds
# (gradients, grain, sensor noise) stay within ~35, shapes and text are >= ~150 away.
_FOREGROUND_DIST = 60.0
# Fraction of its bounding box a cleanly drawn shape of each kind fills, and the tolerance around it; rendered
# shapes at 64 and 128 px stay within 0.06 of these (triangles up to 0.15: blur fills their corners).
_NOMINAL_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
_FILL_TOL = 0.16
_MAX_ASPECT = 1.25  # every shape's bounding box is square; rendered ones stay within 1.15
_PAD = 2  # px around a clean shape's or the text's box that still counts as theirs (anti-aliased edges)


class Reward(Protocol):
    name: str

    def score(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> np.ndarray:
        """float64 (n,), higher is better; NaN where the reward does not apply to a prompt."""
        ...


def _check_batch(images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")


class RubricReward:
    """The fraction of the prompt's rubric requirements the image meets (the world's checker)."""

    name = "rubric"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> np.ndarray:
        _check_batch(images, prompts)
        return np.asarray(WorldCheckerOracle().score(images, prompts), dtype=np.float64)


def _word(prompt: Prompt) -> str | None:
    return next((r.p["text"] for r in prompt.rubric if r.kind == "text"), None)


def _upscaled(image: Image.Image, side: int) -> Image.Image:
    if min(image.size) >= side:
        return image
    scale = side / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)


def text_similarity(read: str, target: str) -> float:
    """difflib's ratio (2 x matched characters / total characters, 1 = identical) of the two strings, ignoring
    case and spaces. A normalised Levenshtein would do as well; no edit-distance package is a dependency."""
    def norm(s: str) -> str:
        return "".join(s.split()).casefold()

    return difflib.SequenceMatcher(None, norm(read), norm(target)).ratio()


class TextReward:
    """For prompts that ask for a word: its similarity to the best-matching line RapidOCR reads in the image
    (0 when nothing is read); NaN for prompts without text. Images are upscaled to ``OCR_SIDE`` first. The
    renderer's own 64 px words read after that, but a word at 64 px is ~9 px tall and the tiny preset's DiT
    rarely draws it legibly: on the tiny preset this reward is mostly 0 (a sparse signal)."""

    name = "text"

    def __init__(self, config: OcrConfig) -> None:
        self.engine = RapidOcrEngine(config)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> np.ndarray:
        _check_batch(images, prompts)
        out = np.full(len(images), np.nan)
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            word = _word(prompt)
            if word is not None:
                lines = self.engine.read(_upscaled(to_rgb(image), OCR_SIDE)).lines
                out[i] = max((text_similarity(line.text, word) for line in lines), default=0.0)
        return out


def _is_clean(shape: Detected) -> bool:
    x0, y0, x1, y1 = shape.bbox
    w, h = x1 - x0, y1 - y0
    fill = shape.area / (w * h)
    return max(w / h, h / w) <= _MAX_ASPECT and abs(fill - _NOMINAL_FILL[shape.kind]) <= _FILL_TOL


def structure_score(image: Image.Image) -> float:
    """1 - the fraction of foreground pixels (far from the background colour) that are not part of a cleanly
    detected shape or the text line: specks, fragments, torn or malformed shapes (a shape's box must be square
    and filled as its kind fills it). An image with no foreground has nothing malformed: 1."""
    image = for_checker(to_rgb(image))
    analysis = analyze(image)
    rgb = np.asarray(image, dtype=np.float32)
    foreground = np.linalg.norm(rgb - np.asarray(analysis.background_mean, np.float32), axis=-1) > _FOREGROUND_DIST
    if not foreground.any():
        return 1.0
    explained = np.zeros_like(foreground)
    boxes = [s.bbox for s in analysis.shapes if _is_clean(s)]
    boxes += [analysis.ink_bbox] if analysis.ink_bbox is not None else []
    for x0, y0, x1, y1 in boxes:
        explained[max(0, y0 - _PAD):y1 + _PAD, max(0, x0 - _PAD):x1 + _PAD] = True
    return 1.0 - float((foreground & ~explained).sum() / foreground.sum())


class StructureReward:
    """The world's structure check (``structure_score``): 1 for a clean scene, lower the more stray ink."""

    name = "artifact"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> np.ndarray:
        _check_batch(images, prompts)
        return np.array([structure_score(image) for image in images], dtype=np.float64)


class ImageModel:
    """A transformers image-classification model (hub id or local directory) and its image processor."""

    def __init__(self, model_id: str) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        path = Path(model_id).expanduser()
        local = path.is_dir()
        if model_id.startswith(("/", "./", "../", "~")) and not local:
            raise FileNotFoundError(f"reward model directory not found: {model_id}")
        source = str(path) if local else model_id
        self.device = resolve_device("auto")
        self.processor = AutoImageProcessor.from_pretrained(source, local_files_only=local)
        self.model = AutoModelForImageClassification.from_pretrained(source, local_files_only=local)
        self.model.eval().to(self.device)

    def logits(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, num_labels) float32 on the CPU."""
        inputs = self.processor(images=[to_rgb(image) for image in images], return_tensors="pt").to(self.device)
        with torch.inference_mode():
            return self.model(**inputs).logits.float().cpu()


class ArtifactClassifierReward:
    """1 - the classifier's softmax probability of ``label``."""

    name = "artifact"

    def __init__(self, model_id: str, label: str) -> None:
        self.model = ImageModel(model_id)
        labels = {str(v): int(k) for k, v in self.model.model.config.id2label.items()}
        if label not in labels or len(labels) < 2:
            raise ValueError(f"artifact model {model_id}: needs label {label!r} among >= 2 labels, has "
                             f"{sorted(labels)}")
        self.index = labels[label]

    def score(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> np.ndarray:
        _check_batch(images, prompts)
        if not images:
            return np.empty(0)
        probs = self.model.logits(images).softmax(dim=-1)
        return 1.0 - probs[:, self.index].double().numpy()


class AestheticModelReward:
    """The single regression logit of a transformers image model."""

    name = "aesthetic"

    def __init__(self, model_id: str) -> None:
        self.model = ImageModel(model_id)
        if self.model.model.config.num_labels != 1:
            raise ValueError(f"aesthetic model {model_id}: needs one regression logit (num_labels=1), has "
                             f"{self.model.model.config.num_labels}")

    def score(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> np.ndarray:
        _check_batch(images, prompts)
        return self.model.logits(images)[:, 0].double().numpy() if images else np.empty(0)


class LearnedAestheticReward:
    """The reward_model stage's artifact: frozen image embedder + MLP head trained on the PO preference pairs."""

    name = "aesthetic"

    def __init__(self, artifact: Path) -> None:
        # imported here: the other rewards' Ray actors need not load the training stage's modules (MLflow, pandas)
        from krea2_core.post.reward_model import load_reward_model

        self.model = load_reward_model(artifact)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[Prompt]) -> np.ndarray:
        _check_batch(images, prompts)
        return self.model.score(images)


def build_reward(name: str, config: RewardsConfig, reward_model: Path | None) -> Reward:
    """Reward ``name`` as ``config`` sets it up; ``reward_model`` is the reward_model stage's artifact (used by
    ``aesthetic`` when ``config.aesthetic_model`` is empty)."""
    if name == "rubric":
        return RubricReward()
    if name == "text":
        return TextReward(config.ocr)
    if name == "artifact":
        if config.artifact_model:
            return ArtifactClassifierReward(config.artifact_model, config.artifact_label)
        return StructureReward()
    if name == "aesthetic":
        if config.aesthetic_model:
            return AestheticModelReward(config.aesthetic_model)
        if reward_model is None:
            raise ValueError("the aesthetic reward needs a model: the reward_model stage's artifact or "
                             "rewards.aesthetic_model (or give it weight 0)")
        return LearnedAestheticReward(Path(reward_model))
    raise ValueError(f"unknown reward {name!r}; use one of {list(REWARD_NAMES)}")


EPS = 1e-6


def _group_normalised(scores: np.ndarray, group_size: int) -> np.ndarray:
    """(r - group mean) / (group std + EPS) over each group's non-NaN scores; NaN scores (and groups) -> 0."""
    groups = scores.reshape(-1, group_size)
    present = ~np.isnan(groups)
    count = present.sum(axis=1, keepdims=True)
    values = np.where(present, groups, 0.0)
    mean = values.sum(axis=1, keepdims=True) / np.maximum(count, 1)
    std = np.sqrt((np.where(present, groups - mean, 0.0) ** 2).sum(axis=1, keepdims=True) / np.maximum(count, 1))
    return np.where(present, (values - mean) / (std + EPS), 0.0).reshape(-1)


def gdpo_advantages(scores: dict[str, np.ndarray], group_size: int, weights: dict[str, float]) -> np.ndarray:
    """GDPO (group reward-decoupled normalisation) advantages of group-major samples (prompt i's at i*G ..
    i*G+G-1): each reward is normalised within each group on its own, the normalised rewards are summed with
    ``weights``, and the sum is normalised over the whole batch. Rewards of weight 0 are ignored; NaN scores (a
    reward that does not apply) contribute 0.

    Why per reward: normalising the summed reward maps distinct reward combinations to the same advantage (in a
    group of two, rewards (1, 0) + (0, 0) and (1, 0) + (1, 0) both sum-normalise to (+1, -1), though the second
    winner met two criteria), and a reward with a large scale drowns the others; normalising each reward first
    keeps every reward's signal and makes the weights mean what they say. Returns float64 (n,)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    active = {name: w for name, w in weights.items() if w != 0}
    no_weight = sorted(set(scores) - set(weights))
    if no_weight:
        raise ValueError(f"scores for rewards without a weight: {no_weight} (weights: {weights})")
    no_scores = sorted(set(active) - set(scores))
    if no_scores:
        raise ValueError(f"rewards with weight > 0 but no scores: {no_scores}")
    if not active:
        raise ValueError(f"no reward has a weight > 0: {weights}")
    arrays = {name: np.asarray(scores[name], dtype=np.float64) for name in active}
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) > 1 or any(len(shape) != 1 for shape in shapes.values()):
        raise ValueError(f"every reward needs one score per sample (1-D, same length), got shapes {shapes}")
    n = len(next(iter(arrays.values())))
    if n == 0 or n % group_size:
        raise ValueError(f"{n} samples do not split into groups of {group_size}")
    total = sum(w * _group_normalised(arrays[name], group_size) for name, w in active.items())
    centred = total - total.mean()
    std = centred.std()
    return centred / std if std > EPS else centred
