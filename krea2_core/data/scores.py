"""Cheap per-image scores behind the CPU filters of the report's low-resolution stages.

All scores are measured on the analysis copy (long side ``AnalysisConfig.side``). Each is chosen so one threshold
holds for any original resolution (benchmarks/curation_calibration.py measures that from 64 px to 8k): in
particular noise is told by its lack of spatial correlation, which downscaling keeps, not by its amplitude, which
downscaling averages away.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from krea2_core.curation.config import AnalysisConfig


def pixel_correlation(gray: np.ndarray) -> float:
    """Lag-1 autocorrelation of the luma, the lower of the horizontal and vertical ones: about 0 for pixel noise and
    still below 0.3 after any downscale (box-averaged noise stays white; the final bilinear step correlates it a
    little), above 0.7 for photos and rendered scenes at any size. 1.0 for a flat image (nothing varies). Capped at
    1.0: the lag products average over one line fewer than the variance, so a smooth blob in the middle of a flat
    image scores a hair above it."""
    centred = gray - gray.mean()
    variance = float((centred * centred).mean())
    if variance < 1e-6:
        return 1.0
    horizontal = float((centred[:, 1:] * centred[:, :-1]).mean())
    vertical = float((centred[1:] * centred[:-1]).mean())
    return min(1.0, min(horizontal, vertical) / variance)


def rgb_entropy(image: Image.Image) -> float:
    """Mean Shannon entropy (bits, 0..8) of the R, G and B histograms of an RGB image: near 0 for flat images."""
    counts = np.asarray(image.histogram(), dtype=np.float64).reshape(3, 256)  # Pillow's histogram: one C pass
    p = counts / counts.sum(axis=1, keepdims=True)
    return float(-(p * np.log2(p, where=p > 0, out=np.zeros_like(p))).sum() / 3.0)


# A bar's last lines before the content carry the codec's ringing (JPEG/WebP blocks straddle the edge): a strip that
# starts flat within the tolerance extends through lines of its colour whose spread is within RINGING x the tolerance.
# A bar then ends at an edge: within the EDGE_LINES lines after it (past any ringing lines that drift off its colour),
# the colour moves off the bar's, or varies, by EDGE x the tolerance or more; a smooth gradient (a blurred sky) has no
# edge. Chosen with benchmarks/curation_calibration.py (docs/results.md).
RINGING = 4.0
EDGE = 5.0
EDGE_LINES = 4


def _leading(lines: np.ndarray, start: int, colour: np.ndarray, spread: float, drift: float, block: int = 8) -> int:
    """Index of the first line from ``start`` whose pixel spread (std) exceeds ``spread`` or whose mean is more than
    ``drift`` off ``colour``, capped at half the lines; scans ``block`` lines at a time, so a normal image costs one
    small block per side instead of a pass over the whole array."""
    limit = len(lines) // 2
    for first in range(start, limit, block):
        chunk = lines[first:min(first + block, limit)].astype(np.float32)
        flat = ((chunk.std(axis=1).max(axis=1) <= spread)
                & (np.abs(chunk.mean(axis=1) - colour).max(axis=1) <= drift))
        if not flat.all():
            return first + int(np.argmin(flat))
    return limit


def _flat_depth(lines: np.ndarray, tolerance: float) -> int:
    """Leading lines (axis 0) of a flat strip of one colour that ends at an edge, capped at half (see RINGING)."""
    colour, half = lines[0].astype(np.float32).mean(axis=0), len(lines) // 2
    depth = _leading(lines, 0, colour, tolerance, 2 * tolerance)
    if depth in (0, half):
        return depth
    depth = _leading(lines, depth, colour, RINGING * tolerance, 2 * tolerance)
    if depth == half:
        return depth
    strip = lines[:depth].astype(np.float32).mean(axis=(0, 1))
    after = lines[depth:depth + EDGE_LINES].astype(np.float32).reshape(-1, lines.shape[-1])
    edge = max(np.abs(after.mean(axis=0) - strip).max(), after.std(axis=0).max())
    return depth if edge >= EDGE * tolerance else 0


def border_fraction(rgb: np.ndarray, tolerance: float) -> float:
    """Largest fraction of width/height taken by a flat strip on any side (letterbox bars, frames)."""
    height, width = rgb.shape[:2]
    columns = rgb.transpose(1, 0, 2)
    return max(
        _flat_depth(rgb, tolerance) / height,
        _flat_depth(rgb[::-1], tolerance) / height,
        _flat_depth(columns, tolerance) / width,
        _flat_depth(columns[::-1], tolerance) / width,
    )


def image_scores(rgb: np.ndarray, config: AnalysisConfig) -> dict[str, float]:
    image = Image.fromarray(rgb)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # channel-wise minimum/maximum: a reduction over the 3-long last axis is several times slower
    darkest = np.minimum(np.minimum(red, green), blue)
    brightest = np.maximum(np.maximum(red, green), blue)
    gray = np.asarray(image.convert("L"), dtype=np.float32)  # ITU-R 601 luma, in C
    return {
        "pixel_correlation": pixel_correlation(gray),
        "entropy": rgb_entropy(image),
        "white_ratio": float(np.count_nonzero(darkest >= config.white_level) / darkest.size),
        "black_ratio": float(np.count_nonzero(brightest <= config.black_level) / brightest.size),
        "border_fraction": border_fraction(rgb, config.border_tolerance),
    }
