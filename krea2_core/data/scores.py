"""Cheap per-image scores behind the CPU filters of the report's low-resolution stages.

All scores are measured on the analysis copy (long side ``AnalysisConfig.side``), so thresholds hold
for any original resolution.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from krea2_core.config import AnalysisConfig

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian: very high for noise and extreme textures."""
    return float(ndimage.laplace(gray).var())


def rgb_entropy(rgb: np.ndarray) -> float:
    """Mean Shannon entropy (bits, 0..8) of the R, G and B histograms: near 0 for flat images."""
    total = 0.0
    for channel in range(3):
        counts = np.bincount(rgb[..., channel].ravel(), minlength=256)
        p = counts[counts > 0] / counts.sum()
        total += float(-(p * np.log2(p)).sum())
    return total / 3.0


def _flat_depth(lines_mean: np.ndarray, lines_std: np.ndarray, tolerance: float) -> int:
    """How many leading lines are flat and share the colour of the first line (capped at half)."""
    limit = len(lines_std) // 2
    flat = (lines_std[:limit] <= tolerance) & (np.abs(lines_mean[:limit] - lines_mean[0]).max(axis=-1) <= 2 * tolerance)
    return int(limit if flat.all() else np.argmin(flat))


def border_fraction(rgb: np.ndarray, tolerance: float) -> float:
    """Largest fraction of width/height taken by a flat strip on any side (letterbox bars, frames)."""
    pixels = rgb.astype(np.float32)
    height, width = pixels.shape[:2]
    row_mean, row_std = pixels.mean(axis=1), pixels.std(axis=1).max(axis=-1)
    col_mean, col_std = pixels.mean(axis=0), pixels.std(axis=0).max(axis=-1)
    depths = (
        _flat_depth(row_mean, row_std, tolerance) / height,
        _flat_depth(row_mean[::-1], row_std[::-1], tolerance) / height,
        _flat_depth(col_mean, col_std, tolerance) / width,
        _flat_depth(col_mean[::-1], col_std[::-1], tolerance) / width,
    )
    return float(max(depths))


def image_scores(rgb: np.ndarray, config: AnalysisConfig) -> dict[str, float]:
    gray = rgb.astype(np.float32) @ _LUMA
    return {
        "laplacian_var": laplacian_variance(gray),
        "entropy": rgb_entropy(rgb),
        "white_ratio": float((rgb.min(axis=-1) >= config.white_level).mean()),
        "black_ratio": float((rgb.max(axis=-1) <= config.black_level).mean()),
        "border_fraction": border_fraction(rgb, config.border_tolerance),
    }
