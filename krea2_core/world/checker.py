"""Scores an image against a rubric by re-detecting the scene graph with numpy/scipy only."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .captions import Prompt, Requirement
from .render import font
from .scene import BACKGROUNDS, COLORS, PALETTE, POSITIONS, SIZES

_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)
_BG_NAMES = tuple(BACKGROUNDS)
_BG_MEANS = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float32)
# A pixel belongs to a shape when within this RGB distance of a palette colour; pale
# backgrounds sit >= ~150 away, and blurred edges further than ~50% toward the background drop out.
_COLOR_TOL = 75.0
_MIN_AREA_FRAC = 0.0015  # of short_side**2; a small triangle covers ~0.0072
# Size bins split between the nominal sides (0.12 / 0.19 / 0.26 of the short side).
_SIZE_EDGES = (0.155, 0.225)
# Text ink: darker than the background by this much and nearly grey (shapes are saturated).
_INK_DROP, _INK_MAX_SAT = 45.0, 60.0
_TEXT_MIN_NCC = 0.5
_H, _PAD, _SMOOTH = 16, 3, 1.2  # text matching: normalised ink height, context and blur, in px
_TEXT_MAX_LOG_ASPECT = 0.4

TextMatcher = Callable[[Image.Image, str], tuple[bool, Any]]


@dataclass(frozen=True)
class Detected:
    kind: str
    color: str
    size: str
    position: str
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


@dataclass(frozen=True)
class Detail:
    requirement: Requirement
    ok: bool
    measured: Any


@dataclass(frozen=True)
class CheckResult:
    score: float
    passed: bool
    details: tuple[Detail, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "passed": self.passed,
            "details": [{"requirement": d.requirement.to_dict(), "ok": d.ok, "measured": d.measured} for d in self.details],
        }


@dataclass(frozen=True, eq=False)
class Analysis:
    shapes: tuple[Detected, ...]
    background: str
    background_mean: tuple[float, float, float]
    darkness: np.ndarray  # how much darker than the background each pixel is (0 where not ink)
    ink_bbox: tuple[int, int, int, int] | None


def _classify_kind(sub: np.ndarray) -> str:
    h, w = sub.shape
    top, bottom = sub[: h // 2].sum(), sub[(h + 1) // 2 :].sum()
    # An upright triangle holds ~1/4 of its area in the top half; circles and squares ~1/2.
    if top / max(top + bottom, 1) < 0.38:
        return "triangle"
    # Circle vs square: bbox fill (0.785 vs 1) and farthest pixel from the centroid over
    # sqrt(area) (0.564 vs 0.707); two cues because blur rounds small squares' corners.
    ys, xs = np.nonzero(sub)
    reach = np.sqrt((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2).max() / np.sqrt(len(ys))
    fill = len(ys) / (h * w)
    return "square" if (fill - 0.89) / 0.08 + (reach - 0.6) / 0.025 > 0 else "circle"


def _bin(value: float, edges: Sequence[float], names: Sequence[str]) -> str:
    return names[int(np.searchsorted(edges, value))]


def analyze(image: Image.Image) -> Analysis:
    """Detect shapes, background and text ink in an image of any size."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = rgb.shape
    short = min(h, w)
    dist = np.sqrt(((rgb[:, :, None, :] - _PALETTE) ** 2).sum(-1))  # h x w x colours
    nearest = dist.argmin(-1)
    fg = dist.min(-1) < _COLOR_TOL
    labels, _ = ndimage.label(fg)
    shapes = []
    shape_mask = np.zeros_like(fg)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        sub = labels[sl] == i
        area = int(sub.sum())
        bh, bw = sub.shape
        if area < max(4, _MIN_AREA_FRAC * short * short) or area / (bh * bw) < 0.3:
            continue
        shape_mask[sl] |= sub
        color = COLORS[int(np.bincount(nearest[sl][sub], minlength=len(COLORS)).argmax())]
        y0, x0 = sl[0].start, sl[1].start
        col = min(2, int((x0 + bw / 2) * 3 / w))
        row = min(2, int((y0 + bh / 2) * 3 / h))
        # +1 px compensates the edge pixels lost to anti-aliasing and blur.
        size = _bin((max(bh, bw) + 1) / short, _SIZE_EDGES, tuple(SIZES))
        shapes.append(Detected(_classify_kind(sub), color, size, POSITIONS[row * 3 + col], area, (x0, y0, x0 + bw, y0 + bh)))

    # Only accepted shapes are masked out: stray palette-like pixels on text edges must not hide the text.
    near_fg = ndimage.binary_dilation(shape_mask, iterations=max(2, short // 64))
    bg = ~near_fg & ~fg
    lum = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    sat = rgb.max(-1) - rgb.min(-1)
    bg_lum = float(np.median(lum[bg])) if bg.any() else float(np.median(lum))
    ink = bg & (lum < bg_lum - _INK_DROP) & (sat < _INK_MAX_SAT)
    bg &= ~ndimage.binary_dilation(ink, iterations=2)
    mean = rgb[bg].mean(0) if bg.any() else rgb.reshape(-1, 3).mean(0)
    background = _BG_NAMES[int(((_BG_MEANS - mean) ** 2).sum(-1).argmin())]
    darkness = np.where(near_fg, 0.0, np.clip(bg_lum - lum, 0, None)).astype(np.float32)
    return Analysis(tuple(shapes), background, tuple(round(float(v), 1) for v in mean), darkness, _ink_bbox(ink, short))


def _ink_bbox(ink: np.ndarray, short: int) -> tuple[int, int, int, int] | None:
    """Bounding box of the largest line of ink pixels (letters merged by a horizontal dilation)."""
    if ink.sum() < 4:
        return None
    reach = max(2, short // 32)
    clusters, n = ndimage.label(ndimage.binary_dilation(ink, structure=np.ones((3, 2 * reach + 1), bool)))
    counts = np.bincount(clusters[ink], minlength=n + 1)
    ys, xs = np.nonzero(ink & (clusters == int(counts[1:].argmax()) + 1))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@lru_cache(maxsize=64)
def _word_template(word: str) -> np.ndarray:
    f = font(64)
    left, top, right, bottom = f.getbbox(word)
    canvas = Image.new("L", (right - left + 8, bottom - top + 8), 0)
    ImageDraw.Draw(canvas).text((4 - left, 4 - top), word, fill=255, font=f)
    box = canvas.getbbox()
    assert box is not None
    return np.asarray(canvas.crop(box), dtype=np.float32)


def _best_ncc(region: np.ndarray, t: np.ndarray) -> float:
    """Max normalised cross-correlation of template t over every placement inside region."""
    win = np.lib.stride_tricks.sliding_window_view(region, t.shape)
    a = win - win.mean(axis=(-2, -1), keepdims=True)
    b = t - t.mean()
    num = (a * b).sum(axis=(-2, -1))
    den = np.sqrt((a * a).sum(axis=(-2, -1)) * (b * b).sum()) + 1e-6
    return float((num / den).max())


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a, mode="F").resize((w, h), Image.Resampling.BILINEAR))


def match_text(analysis: Analysis, word: str) -> tuple[bool, dict[str, float]]:
    """Correlate the ink region with the expected word rendered in the bundled font, after
    normalising both to a fixed height; a small shift/scale search absorbs bbox errors of a pixel
    or two. Scale-free and cheap; a missing word has no ink, a wrong one correlates poorly."""
    if analysis.ink_bbox is None:
        return False, {"ncc": 0.0, "log_aspect": float("inf")}
    x0, y0, x1, y1 = analysis.ink_bbox
    tmpl = _word_template(word)
    log_aspect = float(abs(np.log(((x1 - x0) / (y1 - y0)) / (tmpl.shape[1] / tmpl.shape[0]))))
    # Work at a fixed ink height of _H px, with _PAD px of context around the detected box.
    scale = _H / (y1 - y0)
    pad = int(np.ceil(_PAD / scale))
    h_img, w_img = analysis.darkness.shape
    px0, py0 = max(0, x0 - pad), max(0, y0 - pad)
    px1, py1 = min(w_img, x1 + pad), min(h_img, y1 + pad)
    region = _resize(analysis.darkness[py0:py1, px0:px1], max(1, round((px1 - px0) * scale)), max(1, round((py1 - py0) * scale)))
    region = ndimage.gaussian_filter(region, _SMOOTH)
    best = -1.0
    for s in (0.85, 1.0, 1.15):
        th, tw = round(_H * s), round((x1 - x0) * scale * s)
        if th > region.shape[0] or tw > region.shape[1] or tw < 2:
            continue
        # Degrade the template to the image's resolution first so tiny text compares like with like.
        small = _resize(tmpl, max(1, round(tw / scale)), max(1, round(th / scale)))
        best = max(best, _best_ncc(region, ndimage.gaussian_filter(_resize(small, tw, th), _SMOOTH)))
    ok = best >= _TEXT_MIN_NCC and log_aspect <= _TEXT_MAX_LOG_ASPECT
    return ok, {"ncc": round(best, 3), "log_aspect": round(log_aspect, 3)}


def _asked_counts(reqs: Sequence[Requirement]) -> dict[tuple[str, str], int]:
    """How many shapes of each (kind, colour) the rubric asks for: its colour requirement, else one per position."""
    asked: dict[tuple[str, str], int] = {}
    for req in reqs:
        if req.kind == "position":
            key = (req.p["shape"], req.p["color"])
            asked[key] = asked.get(key, 0) + 1
    asked.update({(r.p["shape"], r.p["color"]): r.p["n"] for r in reqs if r.kind == "color"})
    return asked


def _evaluate(req: Requirement, a: Analysis, image: Image.Image, text_matcher: TextMatcher | None,
              asked: dict[tuple[str, str], int]) -> Detail:
    p = req.p
    if req.kind == "background":
        return Detail(req, a.background == p["background"], {"background": a.background, "mean": list(a.background_mean)})
    if req.kind == "text":
        ok, measured = text_matcher(image, p["text"]) if text_matcher else match_text(a, p["text"])
        return Detail(req, bool(ok), measured)
    if req.kind == "count":
        n = sum(1 for s in a.shapes if p["shape"] in ("any", s.kind))
        return Detail(req, n == p["n"], n)
    same = [s for s in a.shapes if s.kind == p["shape"] and s.color == p["color"]]
    if req.kind == "color":
        return Detail(req, len(same) == p["n"], len(same))
    # Where and how large "the red circle" is only means something if there are no more red circles than asked:
    # otherwise an image of many random blobs would meet position and size requirements by chance.
    surplus = len(same) > asked.get((p["shape"], p["color"]), 1)
    if req.kind == "position":
        found = [s.position for s in same]
        return Detail(req, p["position"] in found and not surplus, found)
    if req.kind == "size":
        found = [s.size for s in same]
        return Detail(req, p["size"] in found and not surplus, found)
    raise ValueError(f"unknown requirement kind {req.kind!r}")


def check(
    image: Image.Image, rubric: Prompt | Sequence[Requirement], *, text_matcher: TextMatcher | None = None
) -> CheckResult:
    """Score `image` against `rubric`. `text_matcher(image, word) -> (ok, measured)` can replace the
    built-in template match for "text" requirements (e.g. an OCR model)."""
    reqs = rubric.rubric if isinstance(rubric, Prompt) else tuple(rubric)
    analysis = analyze(image)
    asked = _asked_counts(reqs)
    details = tuple(_evaluate(r, analysis, image, text_matcher, asked) for r in reqs)
    ok = sum(d.ok for d in details)
    return CheckResult(ok / len(details) if details else 1.0, ok == len(details), details)

