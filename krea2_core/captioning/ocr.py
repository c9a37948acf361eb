"""OCR of target images (the Krea 2 captioner's first step): visible text lines, their boxes and how much
of the image text covers. The default engine is RapidOCR with the PP-OCR ONNX models shipped in its wheel;
nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from krea2_core.captioning.config import OcrConfig
from krea2_core.data.images import to_rgb

Box = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class TextLine:
    text: str
    score: float  # recognition confidence in [0, 1]
    box: Box  # polygon corners in the original image's pixel coordinates


@dataclass(frozen=True)
class OcrResult:
    lines: tuple[TextLine, ...]  # in reading order
    text_density: float  # sum of line box areas / image area, clipped to [0, 1] (overlaps count twice)

    @property
    def text(self) -> str:
        return " / ".join(line.text for line in self.lines)


EMPTY = OcrResult(lines=(), text_density=0.0)


class OcrError(ValueError):
    """The OCR engine failed on an image (not raised for images that merely contain no text)."""


class OcrEngine(Protocol):
    def read(self, image: Image.Image) -> OcrResult: ...


def fit_long_side(image: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def box_area(box: Box) -> float:
    xs, ys = np.array([p[0] for p in box]), np.array([p[1] for p in box])
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)  # shoelace


def text_density(lines: tuple[TextLine, ...] | list[TextLine], width: int, height: int) -> float:
    return min(1.0, sum(box_area(line.box) for line in lines) / (width * height))


def reading_order(lines: list[TextLine]) -> tuple[TextLine, ...]:
    """Top-to-bottom rows, left-to-right within a row; a line joins the current row when its vertical
    centre lies within half the height of the row's first line."""

    def top(line: TextLine) -> float:
        return min(y for _, y in line.box)

    def bottom(line: TextLine) -> float:
        return max(y for _, y in line.box)

    rows: list[list[TextLine]] = []
    for line in sorted(lines, key=lambda ln: (top(ln) + bottom(ln)) / 2):
        centre = (top(line) + bottom(line)) / 2
        if rows:
            first = rows[-1][0]
            if abs(centre - (top(first) + bottom(first)) / 2) <= (bottom(first) - top(first)) / 2:
                rows[-1].append(line)
                continue
        rows.append([line])
    return tuple(ln for row in rows for ln in sorted(row, key=lambda ln: min(x for x, _ in ln.box)))


def _has_alnum(text: str) -> bool:
    """Lines of symbols only (":", "■", "●") are shapes or texture misread as text, never words."""
    return any(c.isalnum() for c in text)


@lru_cache(maxsize=4)
def _rapidocr(max_side: int) -> Any:
    """One RapidOCR per detector size (engines differing only in min_score share it). Model paths point at
    the wheel's shipped files, so rapidocr never reaches its download code."""
    import rapidocr

    models = Path(rapidocr.__file__).parent / "models"
    return rapidocr.RapidOCR(
        params={
            "Global.log_level": "error",  # "warning" logs every image without text
            "Global.text_score": 0.0,  # min_score is applied here, not inside rapidocr
            "Global.max_side_len": max_side,  # images arrive already fitted: no second resize
            "Det.model_path": str(models / "PP-OCRv6_det_small.onnx"),
            "Det.limit_type": "max",  # the default ("min", 736) would upscale the fitted image again
            "Det.limit_side_len": max_side,
            # Mean text probability a box needs; the default 0.5 boxes whole textured backgrounds or shapes
            # (read as ":", "O", "■") on ~8% of text-free world scenes, 0.7 on ~2%, with no loss of words.
            "Det.box_thresh": 0.7,
            "Cls.model_path": str(models / "ch_ppocr_mobile_v2.0_cls_mobile.onnx"),
            "Rec.model_path": str(models / "PP-OCRv6_rec_small.onnx"),  # its character set is embedded
        }
    )


class RapidOcrEngine:
    """RapidOCR (PP-OCRv6 small det + rec, 180-degree line classifier) on CPU via onnxruntime. One image per
    call: rapidocr batches the line crops of an image for recognition but not images, so callers loop.
    Lines below min_score or without any letter or digit are dropped."""

    def __init__(self, config: OcrConfig) -> None:
        self.config = config
        self._ocr = _rapidocr(config.max_side)

    def read(self, image: Image.Image) -> OcrResult:
        rgb = to_rgb(image)
        small = fit_long_side(rgb, self.config.max_side)
        try:
            out = self._ocr(np.ascontiguousarray(np.asarray(small)[..., ::-1]))  # rapidocr takes BGR arrays
        except Exception as e:
            raise OcrError(f"OCR failed on a {image.width}x{image.height} {image.mode} image: {e}") from e
        if out.boxes is None or out.txts is None:
            return EMPTY
        sx, sy = rgb.width / small.width, rgb.height / small.height
        lines = [
            TextLine(text=str(text), score=float(score), box=tuple((float(x) * sx, float(y) * sy) for x, y in box))
            for text, score, box in zip(out.txts, out.scores, out.boxes, strict=True)
            if score >= self.config.min_score and _has_alnum(str(text))
        ]
        return OcrResult(lines=reading_order(lines), text_density=text_density(lines, rgb.width, rgb.height))
