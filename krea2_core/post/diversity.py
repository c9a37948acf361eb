"""Sample diversity: how far apart a prompt's samples lie in an image embedding space.

RL sharpens the policy towards what the rewards like; the mean pairwise cosine distance between samples of the
same prompt, before and after, shows how much variety that costs (0: every sample the same image).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from krea2_core.curation.embedders import Embedder

_UNIT_TOLERANCE = 1e-3


def embedding_spread(embeddings: np.ndarray) -> np.ndarray:
    """(P, K, D) unit-norm embeddings of K samples per prompt -> (P,) mean cosine distance (1 - cos) over the
    K * (K - 1) / 2 pairs of each prompt's samples, in [0, 2]."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 3 or embeddings.shape[1] < 2 or embeddings.shape[2] < 1:
        raise ValueError(f"embeddings must have shape (prompts, samples >= 2, dim), got {embeddings.shape}")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or inf")
    if not np.allclose(np.linalg.norm(embeddings, axis=-1), 1.0, atol=_UNIT_TOLERANCE):
        raise ValueError("embeddings must have unit L2 norm (as every Embedder returns them)")
    first, second = np.triu_indices(embeddings.shape[1], k=1)
    cosine = np.einsum("pkd,pjd->pkj", embeddings, embeddings)[:, first, second]
    return np.clip(1.0 - cosine, 0.0, 2.0).mean(axis=1)


def group_diversity(groups: Sequence[Sequence[Image.Image]], embedder: Embedder) -> float:
    """Mean ``embedding_spread`` over groups of the same size (each: the samples of one prompt)."""
    sizes = {len(group) for group in groups}
    if not groups or len(sizes) != 1:
        raise ValueError(f"need one or more groups of the same size, got sizes {[len(g) for g in groups]}")
    size = sizes.pop()
    if size < 2:
        raise ValueError(f"each group needs >= 2 samples to compare, got {size}")
    vectors = embedder.embed([image for group in groups for image in group])
    return float(embedding_spread(vectors.reshape(len(groups), size, -1)).mean())
