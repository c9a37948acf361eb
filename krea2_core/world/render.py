"""Deterministic rasteriser for scenes: textured background, anti-aliased shapes, optional word."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .scene import BACKGROUNDS, PALETTE, SIZES, TEXT_COLOR, Scene, Shape, cell_index, text_cell

# Sensor-like noise over the whole image so no region (shapes included) is exactly flat.
_NOISE_SIGMA = 3.0


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(1, size))  # type: ignore[return-value]


def _supersample(width: int, height: int) -> int:
    return max(2, min(4, 2048 // max(width, height)))


def _background(name: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(BACKGROUNDS[name], dtype=np.float32)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y, x = (y + 0.5) / h - 0.5, (x + 0.5) / w - 0.5
    if name == "beige gradient":
        a = rng.uniform(0, 2 * math.pi)
        field = 28.0 * (x * math.cos(a) + y * math.sin(a))
        img = base + field[..., None] * np.array([1.0, 1.0, 1.2], dtype=np.float32)
    elif name == "grey sand":
        grain = ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), 1.0) * 12.0 + rng.normal(0, 4, (h, w))
        img = base + grain[..., None].astype(np.float32)
    elif name == "light blue sky gradient":
        top, bottom = np.array([178, 205, 240]), np.array([222, 235, 248])
        img = base + (y[..., None] * (bottom - top)).astype(np.float32)
    elif name == "pale green stripes":
        a, freq = rng.uniform(0, math.pi), rng.uniform(5, 10)
        img = base + (9.0 * np.sin(2 * math.pi * freq * (x * math.cos(a) + y * math.sin(a))))[..., None]
    else:  # lavender haze: smooth blobs from an upsampled coarse random grid
        coarse = rng.normal(0, 1, (4, 4))
        blobs = ndimage.zoom(coarse, (h / 4, w / 4), order=3, mode="nearest")[:h, :w]
        img = base + (7.0 * blobs / (np.abs(blobs).max() + 1e-6))[..., None].astype(np.float32)
    return np.broadcast_to(img, (h, w, 3)).astype(np.float32)


def shape_geometry(scene: Scene, shape: Shape) -> tuple[float, float, float]:
    """Centre (x, y) and bounding-box side in pixels; jitter comes from the seed and cell only."""
    cell = cell_index(shape.position)
    row, col = divmod(cell, 3)
    cw, ch = scene.width / 3, scene.height / 3
    d = SIZES[shape.size] * min(scene.width, scene.height)
    # Jitter uses a quarter of the slack so neighbours in adjacent cells always keep a gap.
    jx, jy = np.random.default_rng([scene.seed, cell]).uniform(-1, 1, 2)
    cx = (col + 0.5) * cw + jx * 0.25 * (cw - d) / 2
    cy = (row + 0.5) * ch + jy * 0.25 * (ch - d) / 2
    return cx, cy, d


def _composite(img: np.ndarray, x0: int, y0: int, alpha: np.ndarray, color: tuple[int, int, int]) -> None:
    h, w = alpha.shape
    region = img[y0 : y0 + h, x0 : x0 + w]
    a = alpha[..., None]
    region[:] = region * (1 - a) + np.array(color, dtype=np.float32) * a


def _draw_shape(img: np.ndarray, scene: Scene, shape: Shape, ss: int) -> None:
    cx, cy, d = shape_geometry(scene, shape)
    x0, y0 = max(0, math.floor(cx - d / 2) - 1), max(0, math.floor(cy - d / 2) - 1)
    x1, y1 = min(scene.width, math.ceil(cx + d / 2) + 1), min(scene.height, math.ceil(cy + d / 2) + 1)
    mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    draw = ImageDraw.Draw(mask)
    lx, ly, r = (cx - x0) * ss, (cy - y0) * ss, d * ss / 2
    if shape.kind == "circle":
        draw.ellipse((lx - r, ly - r, lx + r - 1, ly + r - 1), fill=255)
    elif shape.kind == "square":
        draw.rectangle((lx - r, ly - r, lx + r - 1, ly + r - 1), fill=255)
    else:
        draw.polygon([(lx, ly - r), (lx + r, ly + r), (lx - r, ly + r)], fill=255)
    alpha = np.asarray(mask.resize((x1 - x0, y1 - y0), Image.Resampling.BOX), dtype=np.float32) / 255
    _composite(img, x0, y0, alpha, PALETTE[shape.color])


def _draw_text(img: np.ndarray, scene: Scene, ss: int) -> None:
    assert scene.text is not None
    row, col = divmod(text_cell(scene), 3)
    x0, x1 = round(col * scene.width / 3), round((col + 1) * scene.width / 3)
    y0, y1 = round(row * scene.height / 3), round((row + 1) * scene.height / 3)
    cw, ch = (x1 - x0) * ss, (y1 - y0) * ss
    left, top, right, bottom = font(100).getbbox(scene.text)
    size = int(100 * min(0.8 * cw / (right - left), 0.45 * ch / (bottom - top)))
    mask = Image.new("L", (cw, ch), 0)
    ImageDraw.Draw(mask).text((cw / 2, ch / 2), scene.text, fill=255, font=font(size), anchor="mm")
    alpha = np.asarray(mask.resize((x1 - x0, y1 - y0), Image.Resampling.BOX), dtype=np.float32) / 255
    _composite(img, x0, y0, alpha, TEXT_COLOR)


def render(scene: Scene) -> Image.Image:
    """RGB image of `scene` at scene.width x scene.height; the same scene always gives the same pixels."""
    rng = np.random.default_rng(scene.seed)
    ss = _supersample(scene.width, scene.height)
    img = _background(scene.background, scene.width, scene.height, rng).copy()
    for shape in scene.shapes:
        _draw_shape(img, scene, shape, ss)
    if scene.text is not None:
        _draw_text(img, scene, ss)
    img += rng.normal(0, _NOISE_SIGMA, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
