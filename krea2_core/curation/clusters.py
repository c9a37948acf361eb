"""Hierarchical k-means with resampling and balanced sampling (Vo et al. 2024, "Automatic Data Curation
for Self-Supervised Learning"), plus naming and dropping of leaf clusters.

Level 0 clusters the points, level l+1 clusters the centroids of level l. Plain k-means puts centroids
where the data is dense, so head concepts get many clusters and tail concepts share a few. Each level is
therefore refined by resampling: ``resampling_steps`` times, take the ``samples_per_cluster`` points
closest to each current centroid and re-fit the level's k-means from a fresh initialisation on that evenly
drawn set. Centroids then spread over the support of the data rather than its density. The re-fit is not
warm-started from the current centroids: a warm start cannot move a centroid across the gap between two
modes, so surplus head centroids never reach the tail (on the test blobs the largest blob kept 12 of 60
leaves with a warm start, 3 with a fresh one).

Balanced sampling walks the hierarchy top-down: the target is split evenly among the top clusters,
clusters smaller than their share give everything and the rest is redistributed among the others
(water-filling), then each cluster's quota is split the same way among its children, down to the leaves,
where points are drawn at random.

Spherical k-means is used when every input row has unit norm (embeddings); any other input gets plain
L2 k-means. faiss never subsamples silently here: by default every level trains on all its points, and a
``max_points_per_centroid`` cap draws one seeded subsample per level that is documented by the caller.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np
import pandas as pd

from krea2_core.curation.config import HierarchicalKMeansConfig
from krea2_core.text import content_words

_CHUNK_ROWS = 65_536  # rows per block when measuring point-to-centroid distances


@dataclass
class Hierarchy:
    """Cluster tree. Level 0 holds the leaves; ``parents[l][c]`` is the level l+1 cluster of level-l cluster c."""

    leaf: np.ndarray  # (n,) int64 leaf cluster of every point
    parents: list[np.ndarray]  # len(levels) - 1 arrays, parents[l] has one entry per level-l cluster
    centroids: list[np.ndarray]  # centroids[l]: (k_l, d) float32

    @property
    def n_levels(self) -> int:
        return len(self.centroids)

    def labels(self, level: int) -> np.ndarray:
        """(n,) cluster of every point at ``level`` (0 = leaves)."""
        if not 0 <= level < self.n_levels:
            raise ValueError(f"level must be in [0, {self.n_levels - 1}], got {level}")
        labels = self.leaf
        for parent in self.parents[:level]:
            labels = parent[labels]
        return labels

    def sizes(self, level: int) -> np.ndarray:
        """Points per cluster at ``level`` (empty clusters included, as 0)."""
        return np.bincount(self.labels(level), minlength=len(self.centroids[level]))


# --------------------------------------------------------------------------- clustering


def hierarchical_kmeans(x: np.ndarray, config: HierarchicalKMeansConfig, *,
                        max_points_per_centroid: int | None = None, threads: int | None = None) -> Hierarchy:
    """Fit ``config.levels`` (finest first) on ``x`` (n, d); deterministic for ``config.seed``.

    ``max_points_per_centroid``: when a level has more than k times this many points, it is fitted on one
    seeded uniform subsample of that size (all points are still assigned to the final centroids).
    ``threads``: faiss OpenMP threads, by default the cores this process may run on.
    A level asking for more clusters than it has points is clamped with a warning.
    """
    points = np.ascontiguousarray(x, dtype=np.float32)
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"x must be a non-empty (n, d) array, got shape {points.shape}")
    # einsum, not np.linalg.norm: the latter builds an (n, d) temporary, as large as x itself
    spherical = bool(np.allclose(np.einsum("ij,ij->i", points, points), 1.0, atol=2e-3))
    rng = np.random.default_rng(config.seed)
    centroids: list[np.ndarray] = []
    labels_per_level: list[np.ndarray] = []
    with _faiss_threads(threads):
        for level, k in enumerate(config.levels):
            k = _clamp_k(k, len(points), level)
            train = points
            if max_points_per_centroid is not None and len(points) > k * max_points_per_centroid:
                train = points[np.sort(rng.choice(len(points), k * max_points_per_centroid, replace=False))]
            level_centroids = _fit_level(train, k, config, spherical, rng)
            labels_per_level.append(_assign(points, level_centroids, spherical)[0])
            centroids.append(level_centroids)
            points = level_centroids
    return Hierarchy(leaf=labels_per_level[0], parents=labels_per_level[1:], centroids=centroids)


def _clamp_k(k: int, n_points: int, level: int) -> int:
    if k <= n_points:
        return k
    what = "points" if level == 0 else f"level-{level - 1} centroids"
    warnings.warn(f"hierarchical k-means level {level}: {k} clusters requested but only {n_points} {what}; "
                  f"using k={n_points}", RuntimeWarning, stacklevel=3)
    return n_points


def _fit_level(train: np.ndarray, k: int, config: HierarchicalKMeansConfig, spherical: bool,
               rng: np.random.Generator) -> np.ndarray:
    """Centroids of one level: k-means, then ``resampling_steps`` re-fits on evenly sampled points."""
    centroids = _kmeans(train, k, config.niter, spherical, _faiss_seed(rng))
    for _ in range(config.resampling_steps):
        labels, dist = _assign(train, centroids, spherical)
        sample = closest_per_cluster(labels, dist, config.samples_per_cluster)
        if len(sample) < k:  # faiss needs >= k training points; only when most clusters are empty
            break
        centroids = _kmeans(train[sample], k, config.niter, spherical, _faiss_seed(rng))
    return centroids


def _faiss_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31 - 1))


def _kmeans(train: np.ndarray, k: int, niter: int, spherical: bool, seed: int) -> np.ndarray:
    # max_points_per_centroid >= n/k: faiss would otherwise subsample silently above 256 points per centroid;
    # min_points_per_centroid=1: resampled sets hold only ~samples_per_cluster points per centroid by design
    kmeans = faiss.Kmeans(train.shape[1], k, niter=niter, seed=seed, spherical=spherical, verbose=False,
                          max_points_per_centroid=len(train) // k + 1, min_points_per_centroid=1)
    kmeans.train(train)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def _assign(points: np.ndarray, centroids: np.ndarray, spherical: bool) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every point and a distance to it (1 - cosine when spherical, else squared L2)."""
    index = faiss.IndexFlatIP(centroids.shape[1]) if spherical else faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    score, nearest = index.search(points, 1)
    dist = 1.0 - score[:, 0] if spherical else score[:, 0]
    return nearest[:, 0].astype(np.int64), dist


@contextmanager
def _faiss_threads(threads: int | None) -> Iterator[None]:
    previous = faiss.omp_get_max_threads()
    # OpenMP defaults to the machine's CPU count, which overcommits inside a container limited by affinity
    faiss.omp_set_num_threads(threads or len(os.sched_getaffinity(0)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def closest_per_cluster(labels: np.ndarray, dist: np.ndarray, r: int) -> np.ndarray:
    """Indices of the ``r`` points with the smallest ``dist`` in every cluster (ties by index), grouped by
    cluster id, each group ordered by distance. Clusters with fewer points give all of them."""
    order = np.lexsort((np.arange(len(labels)), dist, labels))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    return order[np.arange(len(order)) - starts < r]


# --------------------------------------------------------------------------- balanced sampling


def balanced_sample(h: Hierarchy, target: int, seed: int, exclude_leaves: Collection[int] = ()) -> np.ndarray:
    """Sorted indices of min(target, available) points, balanced top-down over the hierarchy.

    Points of ``exclude_leaves`` are never drawn (and their share goes to the other clusters).
    """
    if target < 0:
        raise ValueError(f"target must be >= 0, got {target}")
    rng = np.random.default_rng(seed)
    available = h.sizes(0)
    excluded = np.asarray(sorted(set(exclude_leaves)), dtype=np.int64)
    if len(excluded) and not (0 <= excluded[0] and excluded[-1] < len(available)):
        raise ValueError(f"exclude_leaves must be leaf ids in [0, {len(available) - 1}], got {excluded.tolist()}")
    available[excluded] = 0
    capacities = [available]
    for level, parent in enumerate(h.parents):
        capacities.append(np.bincount(parent, weights=capacities[-1],
                                      minlength=len(h.centroids[level + 1])).astype(np.int64))
    quota = water_fill(capacities[-1], target, rng)
    for level in range(h.n_levels - 2, -1, -1):
        quota = _split_quota(h.parents[level], capacities[level], quota, rng)
    return _draw_within_leaves(h.leaf, quota, rng)


def water_fill(capacity: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``budget`` as evenly as possible over bins of ``capacity``: a bin below the common level gives
    all it has; the few units left after the level is fixed go to randomly chosen bins above it."""
    budget = min(budget, int(capacity.sum()))
    low, high = 0, int(capacity.max(initial=0))
    while low < high:  # largest level t with sum(min(capacity, t)) <= budget
        mid = (low + high + 1) // 2
        if np.minimum(capacity, mid).sum() <= budget:
            low = mid
        else:
            high = mid - 1
    share = np.minimum(capacity, low)
    above = np.flatnonzero(capacity > low)
    share[rng.choice(above, budget - int(share.sum()), replace=False)] += 1
    return share


def _split_quota(parent: np.ndarray, capacity: np.ndarray, parent_quota: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """Quota of every child cluster, each parent's quota water-filled over its children."""
    quota = np.zeros(len(parent), dtype=np.int64)
    by_parent = np.argsort(parent, kind="stable")
    bounds = np.searchsorted(parent[by_parent], np.arange(len(parent_quota) + 1))
    for p in np.flatnonzero(parent_quota):
        children = by_parent[bounds[p]:bounds[p + 1]]
        quota[children] = water_fill(capacity[children], int(parent_quota[p]), rng)
    return quota


def _draw_within_leaves(leaf: np.ndarray, quota: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    order = np.lexsort((rng.random(len(leaf)), leaf))  # random order inside each leaf
    sorted_leaf = leaf[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_leaf, sorted_leaf, side="left")
    return np.sort(order[rank < quota[sorted_leaf]])


# --------------------------------------------------------------------------- naming and dropping leaves


class ClusterNamer(Protocol):
    def name(self, leaf: int, rows: np.ndarray) -> tuple[str, bool]:
        """(name, flagged) of a leaf cluster from its ``rows`` nearest the centroid, nearest first."""
        ...


class CaptionClusterNamer:
    """Offline namer: the ``top`` most frequent non-stopword words of the rows' captions (counted once per
    caption, ties alphabetical), flagged when any caption of the rows contains a flag word."""

    def __init__(self, captions: Sequence[str], flag_words: Collection[str] = (), top: int = 3) -> None:
        self.captions = captions
        self.flag_words = frozenset(w.lower() for w in flag_words)
        self.top = top

    def name(self, leaf: int, rows: np.ndarray) -> tuple[str, bool]:
        words = [set(content_words(self.captions[row])) - {None} for row in rows]
        counts = Counter(w for caption in words for w in caption)
        ranked = sorted(counts, key=lambda w: (-counts[w], w))[: self.top]
        flagged = any(caption & self.flag_words for caption in words)
        return (" ".join(ranked) or "unnamed"), flagged


def _distance_to_centroid(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Squared L2 distance of every row to the centroid of its own cluster, in blocks to bound memory."""
    dist = np.empty(len(x), dtype=np.float64)
    for start in range(0, len(x), _CHUNK_ROWS):
        block = slice(start, start + _CHUNK_ROWS)
        diff = x[block].astype(np.float64) - centroids[labels[block]]
        dist[block] = np.einsum("ij,ij->i", diff, diff)
    return dist


def name_leaves(x: np.ndarray, h: Hierarchy, namer: ClusterNamer, m: int = 8) -> pd.DataFrame:
    """One row per leaf (leaf, size, name, flagged); ``namer`` sees the ``m`` points nearest each centroid.
    Empty leaves are not shown to the namer."""
    nearest = closest_per_cluster(h.leaf, _distance_to_centroid(x, h.centroids[0], h.leaf), m)
    groups = np.split(nearest, np.flatnonzero(np.diff(h.leaf[nearest])) + 1) if len(nearest) else []
    rows_of = {int(h.leaf[g[0]]): g for g in groups}
    sizes = h.sizes(0)
    records = []
    for leaf, size in enumerate(sizes.tolist()):
        name, flagged = namer.name(leaf, rows_of[leaf]) if size else ("(empty)", False)
        records.append({"leaf": leaf, "size": size, "name": name, "flagged": bool(flagged)})
    return pd.DataFrame.from_records(records, columns=["leaf", "size", "name", "flagged"])


_LEAF_ID = re.compile(r"(?:leaf:)?(\d+)")


def leaves_to_drop(names_df: pd.DataFrame, drop_list: Sequence[str]) -> set[int]:
    """Leaf ids named by a reviewed drop-list: ``leaf:<id>`` or ``<id>``, or an exact cluster name (all
    leaves with that name). An entry that matches nothing is an error: the review was about other clusters."""
    leaves = set(names_df["leaf"].astype(int).tolist())
    by_name = {name: set(group.astype(int).tolist()) for name, group in names_df.groupby("name")["leaf"]}
    drop: set[int] = set()
    unknown: list[str] = []
    for entry in drop_list:
        text = str(entry).strip()
        as_id = _LEAF_ID.fullmatch(text)
        if as_id and int(as_id.group(1)) in leaves:
            drop.add(int(as_id.group(1)))
        elif text in by_name:
            drop |= by_name[text]
        else:
            unknown.append(str(entry))
    if unknown:
        raise ValueError(f"drop-list entries match no leaf id or cluster name: {unknown} "
                         f"(use 'leaf:<id>' with ids in [0, {max(leaves, default=-1)}] or an exact name)")
    return drop
