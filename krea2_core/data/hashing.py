"""Perceptual hashes for dedup: 12x12 pHash (structure) and colorhash (colour), packed to bytes.

The hashes are imagehash's own, computed on the analysis copy so the image is decoded once for all
filters and hashes.
"""

from __future__ import annotations

import hashlib

import imagehash
import numpy as np
from PIL import Image


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _pack(bits: np.ndarray) -> bytes:
    return np.packbits(bits.astype(bool).ravel()).tobytes()


def phash(image: Image.Image, size: int) -> bytes:
    return _pack(imagehash.phash(image, hash_size=size).hash)


COLORHASH_SIDE = 128  # colour fractions need no finer sampling; a 256 px copy at 2x box reduction hashes 3x faster


def colorhash(image: Image.Image, binbits: int) -> bytes:
    """imagehash's colorhash of ``image`` box-reduced to a long side of about COLORHASH_SIDE: its HSV conversion was
    a quarter of the scoring time of a small image (benchmarks/near_duplicates.py measures the dedup result)."""
    factor = max(image.size) // COLORHASH_SIDE
    return _pack(imagehash.colorhash(image.reduce(factor) if factor > 1 else image, binbits=binbits).hash)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance between packed uint8 code arrays of equal shape."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1)


def codes(column: list[bytes]) -> np.ndarray:
    """A column of equal-length packed hashes -> (n, nbytes) uint8 array."""
    if not column:
        return np.zeros((0, 0), dtype=np.uint8)
    return np.frombuffer(b"".join(column), dtype=np.uint8).reshape(len(column), -1)
