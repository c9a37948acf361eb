"""Semantic curation end to end on the verifiable world and on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image

from krea2_core.config import PipelineConfig
from krea2_core.curation.config import EmbedderConfig, SemanticCurationConfig
from krea2_core.curation.embedders import make_embedder
from krea2_core.curation.selection import Candidates, SemanticSelectionSettings, _coverage, select_for_midtraining
from krea2_core.curation.semdedup import semantic_dedup
from krea2_core.curation.stages import _balance, semantic_selection_settings
from krea2_core.data.dedup import keep_order
from krea2_core.world import captions, render, sample_scene

RARE = ("lavender haze", "pale green stripes")
SMALL = SemanticCurationConfig.from_dict({
    "sae": {"n_features": 64, "k": 4, "epochs": 15},
    "kmeans": {"levels": [16, 4], "target_fraction": 0.4},
})


def settings(config: SemanticCurationConfig) -> SemanticSelectionSettings:
    """What selection takes of a semantic curation config: all of it but the embedder."""
    return semantic_selection_settings(PipelineConfig(semantic=config))


@pytest.fixture(scope="module")
def world() -> tuple[Candidates, list[str]]:
    """240 world scenes with two rare backgrounds (weight 0.06 each), embedded with EfficientNet-Lite0."""
    rng = np.random.default_rng(3)
    weights = {"background": {name: 0.06 for name in RARE}}
    scenes = [sample_scene(rng, 160, 160, weights=weights, split=None) for _ in range(240)]
    vectors = make_embedder(EmbedderConfig(kind="efficientnet_lite0", device="cpu")).embed([render(s) for s in scenes])
    candidates = Candidates(ids=np.array([f"s{k:03d}" for k in range(len(scenes))]), vectors=vectors,
                            captions=[captions(s)["long"] for s in scenes],
                            pixels=np.full(len(scenes), 160 * 160), n_bytes=np.arange(len(scenes)))
    return candidates, [s.background for s in scenes]


def test_balanced_sampling_raises_the_share_of_rare_scene_types(world: tuple[Candidates, list[str]]) -> None:
    candidates, backgrounds = world
    selection = select_for_midtraining(candidates, settings(SMALL))
    rare = np.isin(backgrounds, RARE)
    kept = selection.verdicts["kept"].to_numpy()
    assert rare[kept].mean() >= 1.5 * rare.mean(), f"rare share {rare.mean():.3f} -> {rare[kept].mean():.3f}"
    balance = _balance(selection.verdicts)
    assert balance["head_leaves_share.sample"] < balance["head_leaves_share.input"], balance
    assert abs(kept.sum() - 0.4 * len(kept)) <= selection.verdicts["added_for_coverage"].sum() + 1
    # every row has a verdict, and the reasons are the documented steps
    reasons = set(selection.verdicts.loc[~selection.verdicts["kept"], "reason"].str.split(":").str[0])
    assert reasons <= {"sae_tag", "dropped_cluster", "semantic_duplicate", "not_sampled"}
    assert not selection.coverage["lost"].any()


def test_reviewed_drop_list_and_tag_filter_remove_what_they_name(world: tuple[Candidates, list[str]]) -> None:
    candidates, _ = world
    first = select_for_midtraining(candidates, settings(SMALL))
    leaf = int(first.clusters.sort_values("size").iloc[-1]["leaf"])
    tag = first.tags.sort_values("images").iloc[-1]["label"]
    flag = first.clusters.sort_values("size").iloc[-1]["name"].split()[0]
    kmeans = {**SMALL.kmeans.to_dict(), "drop_clusters": [f"leaf:{leaf}"], "flag_words": [flag]}
    config = SemanticCurationConfig.from_dict({**SMALL.to_dict(), "kmeans": kmeans,
                                               "sae": {**SMALL.sae.to_dict(), "drop_tags": [tag]}})
    second = select_for_midtraining(candidates, settings(config))
    verdicts = second.verdicts
    assert (verdicts["reason"] == f"sae_tag:{tag}").sum() > 0
    assert not verdicts.loc[verdicts["kept"], "tags"].str.split(",").map(lambda t: tag in t).any()
    assert second.clusters.loc[second.clusters["name"].str.contains(flag), "flagged"].all()
    dropped = verdicts["reason"].fillna("").str.startswith("dropped_cluster:")
    assert dropped.sum() > 0 and not verdicts.loc[verdicts["kept"], "leaf"].eq(leaf).any()


def test_coverage_report_catches_a_deliberately_dropped_concept(world: tuple[Candidates, list[str]]) -> None:
    candidates, _ = world
    selection = select_for_midtraining(candidates, settings(SMALL))
    from krea2_core.curation.coverage import ConceptIndex, load_graph, select_concepts

    concepts = select_concepts(*load_graph("wordnet"), SMALL.coverage)
    matches = ConceptIndex(concepts).find(candidates.captions).tocsr()
    sample = np.flatnonzero(selection.verdicts["kept"].to_numpy())
    everyone = np.arange(len(candidates.ids))
    assert not _coverage(concepts, matches, everyone, sample)["lost"].any()
    moon = concepts.index[concepts["name"] == "moon"][0]
    naming = matches[:, moon].nonzero()[0]
    assert len(naming) > 0, "the world's text 'MOON' names WordNet's moon"
    report = _coverage(concepts, matches, everyone, np.setdiff1d(sample, naming))
    assert report.loc[report["name"] == "moon", "lost"].all()


def _photos() -> list[Image.Image]:
    root = Path(skimage.__file__).parent / "data"
    names = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
             "ihc.png", "retina.jpg", "coins.png", "camera.png", "brick.png", "grass.png")
    return [Image.open(root / name).convert("RGB") for name in names]


def test_semantic_dedup_removes_near_copies_and_keeps_distinct_photos() -> None:
    photos = _photos()
    copies = [p.crop((p.width // 50, p.height // 50, p.width - p.width // 50, p.height - p.height // 50)) for p in photos]
    vectors = make_embedder(EmbedderConfig(device="cpu")).embed(photos + copies)
    n = len(photos)
    pixels = np.array([im.width * im.height for im in photos + copies])
    ids = np.array([f"p{k:02d}" for k in range(2 * n)])
    dup_of = semantic_dedup(vectors, np.zeros(2 * n, np.int64), SemanticCurationConfig().dedup.max_cosine_similarity,
                            keep_order(pixels, np.zeros(2 * n, np.int64), ids))
    assert (dup_of[:n] == -1).all(), "every distinct photo is kept"
    assert (dup_of[n:] == np.arange(n)).mean() >= 0.8, f"2% crops removed: {dup_of[n:]}"

