"""Midtraining data selection over one curated resolution stage, in the report's order:

1. SAE tags: a top-k sparse autoencoder on the image embeddings, features labelled from their top
   images (a VLM in real runs; caption keywords offline); images whose predominant tags are on the
   drop list go.
2. Hierarchical k-means (Vo et al. 2024) on the rest; leaves are named (and flagged) from the images
   nearest their centroids, and a reviewed drop-list of leaves goes.
3. Semantic dedup inside each leaf (cosine similarity, the project's keep rule).
4. Hierarchical balanced sampling to the target size, which keeps long-tail clusters.
5. Entity coverage: concepts (PageRank-ranked link graph, unrepresentable types dropped) are searched
   in the captions; images naming rare concepts are kept and the sample is topped up until no concept
   present among the eligible images is missing.

Every input row gets a verdict: kept, or the step that dropped it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from krea2_core.curation.clusters import CaptionClusterNamer, balanced_sample, hierarchical_kmeans, leaves_to_drop, name_leaves
from krea2_core.curation.config import CoverageConfig, HierarchicalKMeansConfig, SAEConfig, SemanticDedupConfig
from krea2_core.curation.coverage import (ConceptIndex, coverage_counts, coverage_report, ensure_coverage, load_graph,
                                         select_concepts)
from krea2_core.curation.sae import (CaptionKeywordLabeller, TopKSAE, activations, label_features, predominant_tags,
                                    tag_filter, train_sae)
from krea2_core.curation.semdedup import semantic_dedup
from krea2_core.data.dedup import keep_order


@dataclass
class Candidates:
    """What the selection works on: one row per image with an embedding."""

    ids: np.ndarray  # (n,) str
    vectors: np.ndarray  # (n, d) float32, L2-normalised
    captions: list[str]  # "" where an image has no caption yet
    pixels: np.ndarray  # (n,) width * height, for the keep rule
    n_bytes: np.ndarray  # (n,)


@dataclass
class Selection:
    verdicts: pd.DataFrame  # id, kept, reason, dup_of, leaf, cluster, tags, n_concepts, added_for_coverage
    clusters: pd.DataFrame  # leaf, size, name, flagged, dropped, sampled
    tags: pd.DataFrame  # feature, label, images
    coverage: pd.DataFrame  # concept, name, type, images_in_input, images_eligible, images_in_sample, lost
    sae: TopKSAE
    sae_history: list[dict[str, float]]


@dataclass
class SemanticSelectionSettings:
    """What selection depends on: the semantic curation config but the embedder (the embedding stage's)."""

    sae: SAEConfig
    kmeans: HierarchicalKMeansConfig
    dedup: SemanticDedupConfig
    coverage: CoverageConfig


def select_for_midtraining(c: Candidates, config: SemanticSelectionSettings) -> Selection:
    n = len(c.ids)
    reason = np.full(n, None, dtype=object)
    dup_of = np.full(n, None, dtype=object)

    # 1. SAE tags
    sae, history = train_sae(c.vectors, config.sae)
    acts = activations(sae, c.vectors)
    labels = label_features(acts, CaptionKeywordLabeller(c.captions), config.sae.top_images)
    tags = predominant_tags(acts, labels, config.sae.tags_per_image)
    tag_kept = tag_filter(tags, config.sae.drop_tags)
    for row in np.flatnonzero(~tag_kept):
        reason[row] = "sae_tag:" + next(t for t in tags[row] if t in config.sae.drop_tags)

    # 2. clusters on what the tags kept, then the reviewed drop-list
    eligible = np.flatnonzero(tag_kept)
    x = c.vectors[eligible]
    hierarchy = hierarchical_kmeans(x, config.kmeans)
    namer = CaptionClusterNamer([c.captions[i] for i in eligible], flag_words=config.kmeans.flag_words)
    names = name_leaves(x, hierarchy, namer)
    dropped_leaves = leaves_to_drop(names, config.kmeans.drop_clusters)
    name_of = dict(zip(names["leaf"], names["name"], strict=True))
    in_dropped = np.isin(hierarchy.leaf, list(dropped_leaves))
    for local in np.flatnonzero(in_dropped):
        reason[eligible[local]] = f"dropped_cluster:{name_of[hierarchy.leaf[local]]}"

    # 3. semantic dedup inside leaves (dropped leaves are out already)
    order = keep_order(c.pixels[eligible], c.n_bytes[eligible], c.ids[eligible])
    local_dup = semantic_dedup(x, hierarchy.leaf, config.dedup.max_cosine_similarity, order)
    for local in np.flatnonzero((local_dup >= 0) & ~in_dropped):
        reason[eligible[local]] = "semantic_duplicate"
        dup_of[eligible[local]] = c.ids[eligible[local_dup[local]]]

    # 4. balanced sampling among the survivors
    survivors = np.flatnonzero(reason[eligible] == None)  # noqa: E711 - elementwise on an object array
    target = max(1, round(config.kmeans.target_fraction * n))
    sub_hierarchy = replace(hierarchy, leaf=hierarchy.leaf[survivors])
    sampled = eligible[survivors[balanced_sample(sub_hierarchy, target, config.kmeans.seed)]]

    # 5. entity coverage over the survivors
    concepts = select_concepts(*load_graph(config.coverage.graph), config.coverage)
    matches = ConceptIndex(concepts).find(c.captions).tocsr()
    pool = eligible[survivors]
    position = {row: k for k, row in enumerate(pool)}
    covered_local = ensure_coverage(np.array([position[r] for r in sampled], dtype=np.int64), matches[pool],
                                    config.coverage.rare_max_images)
    final = np.sort(pool[covered_local])
    added = np.setdiff1d(final, sampled)
    kept = np.zeros(n, dtype=bool)
    kept[final] = True
    reason[(reason == None) & ~kept] = "not_sampled"  # noqa: E711

    leaf = np.full(n, -1, dtype=np.int64)
    leaf[eligible] = hierarchy.leaf
    verdicts = pd.DataFrame({
        "id": c.ids, "kept": kept, "reason": reason, "dup_of": dup_of, "leaf": leaf,
        "cluster": [name_of.get(int(v), "") if v >= 0 else "" for v in leaf],
        "tags": [",".join(t) for t in tags],
        "n_concepts": np.asarray(matches.sum(axis=1)).ravel().astype(np.int64),
        "added_for_coverage": np.isin(np.arange(n), added),
    })
    clusters = names.assign(dropped=names["leaf"].isin(dropped_leaves),
                            sampled=names["leaf"].map(pd.Series(leaf[kept]).value_counts()).fillna(0).astype(int))
    return Selection(verdicts=verdicts, clusters=clusters, tags=_tag_counts(labels, tags),
                     coverage=_coverage(concepts, matches, pool, final), sae=sae, sae_history=history)


def _tag_counts(labels: dict[int, str], tags: list[list[str]]) -> pd.DataFrame:
    counts = pd.Series([t for row in tags for t in row]).value_counts()
    return pd.DataFrame({"feature": list(labels), "label": list(labels.values())}).assign(
        images=lambda f: f["label"].map(counts).fillna(0).astype(int))


def _coverage(concepts: pd.DataFrame, matches, eligible: np.ndarray, final: np.ndarray) -> pd.DataFrame:
    """Images naming each concept present in the input: in the input, among eligible images, in the
    sample. ``lost`` marks a concept that eligible images name but the sample does not (must not happen)."""
    report = coverage_report(matches, eligible, final, concepts).rename(columns={"images_in_pool": "images_eligible"})
    report.insert(3, "images_in_input", coverage_counts(matches))
    return report[report["images_in_input"] > 0].reset_index(drop=True)
