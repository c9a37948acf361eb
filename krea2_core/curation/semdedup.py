"""Semantic deduplication inside leaf clusters (the report's SigLIP similarity step).

Two rows are duplicates when they share a leaf cluster and their cosine similarity is at least
``max_cosine_similarity``. Comparing only within leaves keeps the cost at sum(size^2) instead of n^2;
near-identical images essentially always land in the same leaf, and the rare pair split across a leaf
boundary is kept (by design, not merged).

Keep rule: the one of ``krea2_core.data.dedup``. Rows are visited in ``order`` (e.g. ``keep_order``); a kept
row claims its unclaimed neighbours, which record it as ``dup_of``; a dropped row claims nothing, so a
chain A~B~C with A far from C does not drop C for A.
"""

from __future__ import annotations

import faiss
import numpy as np

from krea2_core.data.dedup import greedy_claim


def semantic_dedup(x: np.ndarray, leaf: np.ndarray, max_cosine_similarity: float, order: np.ndarray) -> np.ndarray:
    """(n,) int64 ``dup_of``: the kept row each dropped row duplicates, -1 for kept rows.

    ``x`` must be L2-normalised (inner product = cosine); ``order`` is a permutation of the rows, most
    preferred first.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if len(leaf) != n or len(order) != n:
        raise ValueError(f"x, leaf and order need the same length, got {n}, {len(leaf)}, {len(order)}")
    if not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError("order must be a permutation of the row indices")
    i, j = similar_pairs_within_clusters(x, np.asarray(leaf), max_cosine_similarity)
    return greedy_claim(n, i, j, np.asarray(order, dtype=np.int64))


def similar_pairs_within_clusters(x: np.ndarray, leaf: np.ndarray, min_cosine: float) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) in the same leaf with inner product >= ``min_cosine``, as two index arrays."""
    # faiss keeps inner products strictly above the radius; one float32 step down makes the bound inclusive
    radius = float(np.nextafter(np.float32(min_cosine), np.float32(-np.inf)))
    by_leaf = np.argsort(leaf, kind="stable")
    bounds = np.flatnonzero(np.diff(leaf[by_leaf])) + 1
    found_i, found_j = [], []
    for rows in np.split(by_leaf, bounds):
        if len(rows) < 2:
            continue
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x[rows])
        limits, _, neighbours = index.range_search(x[rows], radius)
        queries = np.repeat(np.arange(len(rows)), np.diff(limits.astype(np.int64)))
        other = queries != neighbours
        found_i.append(rows[queries[other]])
        found_j.append(rows[neighbours[other]])
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    # a pair counts when either direction passed: float rounding can make the two dot products differ
    pairs = np.unique(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1), axis=0)
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


