import numpy as np
import pandas as pd
import pytest

from krea2_core.curation.clusters import (
    CaptionClusterNamer,
    Hierarchy,
    balanced_sample,
    hierarchical_kmeans,
    leaves_to_drop,
    name_leaves,
    water_fill,
)
from krea2_core.curation.config import HierarchicalKMeansConfig

N_BLOBS = 60
CONFIG = HierarchicalKMeansConfig(levels=[60, 12, 3], resampling_steps=10, samples_per_cluster=10, niter=20, seed=3)
# one faiss thread: the problems are tiny, and OpenMP barriers stall for seconds on a loaded 2-core CI runner
THREADS = 1


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in 60 Gaussian blobs with Zipf(1.1) sizes (1500 down to 17 points); blob 0 is the largest."""
    rng = np.random.default_rng(seed)
    d = 32
    centres = rng.standard_normal((N_BLOBS, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = np.maximum(np.round(1500 / np.arange(1, N_BLOBS + 1) ** 1.1).astype(int), 1)
    blob = np.repeat(np.arange(N_BLOBS), sizes)
    x = centres[blob] + rng.standard_normal((len(blob), d)) * (0.4 / np.sqrt(d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), blob


@pytest.fixture(scope="module")
def fitted() -> tuple[np.ndarray, np.ndarray, Hierarchy]:
    x, blob = _blobs()
    return x, blob, hierarchical_kmeans(x, CONFIG, threads=THREADS)


def test_hierarchy_shapes_and_consistency(fitted: tuple[np.ndarray, np.ndarray, Hierarchy]) -> None:
    x, _, h = fitted
    assert h.leaf.shape == (len(x),)
    assert [c.shape for c in h.centroids] == [(k, x.shape[1]) for k in CONFIG.levels]
    assert [p.shape for p in h.parents] == [(k,) for k in CONFIG.levels[:-1]]
    for level, parent in enumerate(h.parents):  # every cluster has a parent one level up
        assert parent.min() >= 0 and parent.max() < CONFIG.levels[level + 1]
    assert np.array_equal(h.labels(0), h.leaf)
    assert np.array_equal(h.labels(1), h.parents[0][h.leaf])
    assert np.array_equal(h.labels(2), h.parents[1][h.parents[0][h.leaf]])
    for level in range(h.n_levels):
        assert h.sizes(level).sum() == len(x)
    np.testing.assert_allclose(np.linalg.norm(h.centroids[0], axis=1), 1.0, atol=1e-4)  # spherical for unit input
    with pytest.raises(ValueError, match="level"):
        h.labels(3)


def test_same_seed_same_hierarchy(fitted: tuple[np.ndarray, np.ndarray, Hierarchy]) -> None:
    x, _, h = fitted
    again = hierarchical_kmeans(x, CONFIG, threads=THREADS)
    assert np.array_equal(again.leaf, h.leaf)
    assert all(np.array_equal(a, b) for a, b in zip(again.parents, h.parents, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(again.centroids, h.centroids, strict=True))
    other = hierarchical_kmeans(x, HierarchicalKMeansConfig(levels=CONFIG.levels, seed=CONFIG.seed + 1), threads=THREADS)
    assert not np.array_equal(other.leaf, h.leaf)


def test_resampling_moves_leaves_from_the_head_to_the_tail(fitted: tuple[np.ndarray, np.ndarray, Hierarchy]) -> None:
    x, blob, h = fitted
    plain = hierarchical_kmeans(x, HierarchicalKMeansConfig(levels=CONFIG.levels, resampling_steps=0, seed=CONFIG.seed),
                                threads=THREADS)
    rare = blob >= N_BLOBS // 2

    def head_leaves(tree: Hierarchy) -> int:
        return np.unique(tree.leaf[blob == 0]).size

    def tail_leaves(tree: Hierarchy) -> int:
        return np.unique(tree.leaf[rare]).size

    assert head_leaves(h) * 2 <= head_leaves(plain)  # measured: 3 vs 12 leaves for the largest blob
    assert tail_leaves(h) >= 1.4 * tail_leaves(plain)  # measured: 42 vs 25 leaves for the 30 rarest blobs


def test_balanced_sample_favours_the_long_tail(fitted: tuple[np.ndarray, np.ndarray, Hierarchy]) -> None:
    x, blob, h = fitted
    target = len(x) // 5
    picked = balanced_sample(h, target, seed=0)
    assert len(picked) == target
    assert np.array_equal(picked, np.unique(picked))  # sorted, no repeats
    assert np.array_equal(balanced_sample(h, target, seed=0), picked)

    rare = blob >= N_BLOBS // 2  # the 30 smallest blobs
    uniform = np.random.default_rng(0).choice(len(x), target, replace=False)
    input_share, uniform_share, balanced_share = rare.mean(), rare[uniform].mean(), rare[picked].mean()
    assert input_share < 0.15
    assert balanced_share > 2 * input_share  # measured: 0.34 vs 0.11 input / 0.11 uniform
    assert balanced_share > 2 * uniform_share
    # every rare blob keeps at least one point; uniform sampling loses some
    assert np.unique(blob[picked][rare[picked]]).size == N_BLOBS // 2


def test_excluded_leaves_contribute_nothing(fitted: tuple[np.ndarray, np.ndarray, Hierarchy]) -> None:
    x, _, h = fitted
    excluded = {int(h.leaf[0]), int(h.leaf[-1])}
    picked = balanced_sample(h, len(x) // 5, seed=1, exclude_leaves=excluded)
    assert len(picked) == len(x) // 5
    assert not np.isin(h.leaf[picked], list(excluded)).any()

    available = int((~np.isin(h.leaf, list(excluded))).sum())
    everything = balanced_sample(h, len(x) + 10, seed=1, exclude_leaves=excluded)
    assert len(everything) == available
    with pytest.raises(ValueError, match="exclude_leaves"):
        balanced_sample(h, 10, seed=0, exclude_leaves=[CONFIG.levels[0]])


def test_water_fill_gives_small_bins_everything_and_splits_the_rest_evenly() -> None:
    rng = np.random.default_rng(0)
    assert water_fill(np.array([2, 10, 10]), 12, rng).tolist() == [2, 5, 5]
    odd = water_fill(np.array([2, 10, 10]), 13, rng)
    assert odd.sum() == 13 and odd[0] == 2 and sorted(odd[1:].tolist()) == [5, 6]
    assert water_fill(np.array([2, 10, 10]), 100, rng).tolist() == [2, 10, 10]
    assert water_fill(np.array([0, 0]), 5, rng).tolist() == [0, 0]


class _RecordingNamer:
    def __init__(self) -> None:
        self.seen: dict[int, np.ndarray] = {}

    def name(self, leaf: int, rows: np.ndarray) -> tuple[str, bool]:
        self.seen[leaf] = rows
        return f"cluster {leaf}", False


def test_namer_sees_the_rows_nearest_each_centroid(fitted: tuple[np.ndarray, np.ndarray, Hierarchy]) -> None:
    x, _, h = fitted
    namer = _RecordingNamer()
    names = name_leaves(x, h, namer, m=5)
    assert list(names.columns) == ["leaf", "size", "name", "flagged"]
    assert names["size"].tolist() == h.sizes(0).tolist()
    for leaf, rows in namer.seen.items():
        members = np.flatnonzero(h.leaf == leaf)
        squared = ((x[members].astype(np.float64) - h.centroids[0][leaf]) ** 2).sum(axis=1)
        assert np.array_equal(rows, members[np.lexsort((members, squared))[:5]])  # nearest first, ties by index
        dist = np.linalg.norm(x[h.leaf == leaf] - h.centroids[0][leaf], axis=1)
        assert np.linalg.norm(x[rows] - h.centroids[0][leaf], axis=1).max() <= np.sort(dist)[len(rows) - 1] + 1e-6


def test_caption_namer_names_and_flags_from_captions(fitted: tuple[np.ndarray, np.ndarray, Hierarchy]) -> None:
    x, blob, h = fitted
    words = [f"thing{chr(97 + b // 26)}{chr(97 + b % 26)}" for b in range(N_BLOBS)]  # thingaa, thingab, ...
    captions = [f"a photo of the {words[b]} on grass" for b in blob]
    namer = CaptionClusterNamer(captions, flag_words={"Thingaa"})
    names = name_leaves(x, h, namer)
    head_leaf = int(np.bincount(h.leaf[blob == 0]).argmax())
    row = names.set_index("leaf").loc[head_leaf]
    assert row["name"].split() == ["grass", "thingaa"]  # ties alphabetical; "a", "of", "the", "photo" are stopwords
    assert row["flagged"]
    assert names["flagged"].sum() < len(names) // 2
    assert CaptionClusterNamer(["the of a"]).name(0, np.array([0])) == ("unnamed", False)


def test_drop_list_matches_ids_and_names_and_rejects_unknown_entries() -> None:
    names = pd.DataFrame({"leaf": [0, 1, 2, 3], "size": [5, 5, 5, 5], "name": ["dog grass", "cat", "dog grass", "car"],
                          "flagged": [False, True, False, False]})
    assert leaves_to_drop(names, ["leaf:1", "3"]) == {1, 3}
    assert leaves_to_drop(names, ["dog grass"]) == {0, 2}
    assert leaves_to_drop(names, []) == set()
    with pytest.raises(ValueError, match=r"\['leaf:9', 'horse'\]"):
        leaves_to_drop(names, ["cat", "leaf:9", "horse"])


def test_more_clusters_than_points_is_clamped_with_a_warning() -> None:
    x, _ = _blobs()
    few = x[:10]
    with pytest.warns(RuntimeWarning, match="32 clusters requested but only 10 points"):
        h = hierarchical_kmeans(few, HierarchicalKMeansConfig(levels=[32, 8], seed=0), threads=THREADS)
    assert len(h.centroids[0]) == 10 and len(h.centroids[1]) == 8
    assert h.sizes(0).sum() == 10
    with pytest.raises(ValueError, match="non-empty"):
        hierarchical_kmeans(x[:0], CONFIG, threads=THREADS)


def test_subsampled_training_still_assigns_every_point(fitted: tuple[np.ndarray, np.ndarray, Hierarchy]) -> None:
    x, _, _ = fitted
    h = hierarchical_kmeans(x, CONFIG, max_points_per_centroid=20, threads=THREADS)
    assert h.leaf.shape == (len(x),) and h.sizes(0).sum() == len(x)
