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
    little), above 0.7 for photos and rendered scenes at any size. 1.0 for a flat image (nothing varies)."""
    centred = gray - gray.mean()
    variance = float((centred * centred).mean())
    if variance < 1e-6:
        return 1.0
    horizontal = float((centred[:, 1:] * centred[:, :-1]).mean())
    vertical = float((centred[1:] * centred[:-1]).mean())
    return min(horizontal, vertical) / variance


def rgb_entropy(image: Image.Image) -> float:
    """Mean Shannon entropy (bits, 0..8) of the R, G and B histograms of an RGB image: near 0 for flat images."""
    counts = np.asarray(image.histogram(), dtype=np.float64).reshape(3, 256)  # Pillow's histogram: one C pass
    p = counts / counts.sum(axis=1, keepdims=True)
    return float(-(p * np.log2(p, where=p > 0, out=np.zeros_like(p))).sum() / 3.0)


def _flat_depth(lines: np.ndarray, tolerance: float, block: int = 8) -> int:
    """Leading lines (axis 0) that are flat and share the first line's colour, capped at half.

    Scans inward ``block`` lines at a time and stops at the first line that breaks the rule, so a normal image
    costs one small block per side instead of a pass over the whole array.
    """
    first = lines[0].astype(np.float32).mean(axis=0)
    limit = len(lines) // 2
    for start in range(0, limit, block):
        chunk = lines[start:min(start + block, limit)].astype(np.float32)
        flat = ((chunk.std(axis=1).max(axis=1) <= tolerance)
                & (np.abs(chunk.mean(axis=1) - first).max(axis=1) <= 2 * tolerance))
        if not flat.all():
            return start + int(np.argmin(flat))
    return limit


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
