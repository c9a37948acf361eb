"""Aspect-ratio buckets: every image of a resolution stage is cropped to one of a few sizes of about the
same area, so a batch of one bucket stacks into one tensor and no image is squashed or padded."""

from __future__ import annotations

import math

from PIL import Image, ImageOps


def bucket_sizes(resolution: int, aspect_ratios: list[float], multiple: int) -> list[tuple[int, int]]:
    """Unique (width, height) sizes with area close to ``resolution**2`` and width/height close to each
    aspect ratio, both multiples of ``multiple`` (autoencoder downsample x patch size); sorted by aspect."""
    if multiple < 1 or resolution < multiple:
        raise ValueError(f"resolution ({resolution}) must be >= multiple ({multiple}) >= 1")
    if not aspect_ratios or any(a <= 0 for a in aspect_ratios):
        raise ValueError(f"aspect_ratios must be a non-empty list of positive width/height ratios, got {aspect_ratios}")

    def snap(side: float) -> int:
        return max(multiple, round(side / multiple) * multiple)

    sizes = {(snap(resolution * math.sqrt(a)), snap(resolution / math.sqrt(a))) for a in aspect_ratios}
    return sorted(sizes, key=lambda size: size[0] / size[1])


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest in log space (so 2:1 and 1:2 are equally far from 1:1)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("buckets must not be empty")
    aspect = math.log(width / height)
    return min(buckets, key=lambda size: abs(math.log(size[0] / size[1]) - aspect))


def resize_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale ``image`` to cover ``size`` (Lanczos) and crop the centre; the aspect ratio is kept."""
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
