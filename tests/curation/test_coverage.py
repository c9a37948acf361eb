"""Entity coverage: PageRank, the WordNet graph, whole-word concept search and coverage-preserving sampling."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from krea2_core.curation.config import CoverageConfig
from krea2_core.curation.coverage import (
    ConceptIndex,
    GraphError,
    coverage_counts,
    coverage_report,
    ensure_coverage,
    load_graph,
    lost_concepts,
    pagerank,
    read_graph,
    select_concepts,
)
from krea2_core.curation.wordnet import DEFAULT_ROOT, load_wordnet

needs_wordnet = pytest.mark.skipif(not Path(DEFAULT_ROOT, "data.noun").is_file(),
                                   reason="Debian's wordnet-base is not installed")


# --------------------------------------------------------------------------- pagerank


def dense_pagerank(n: int, src: np.ndarray, dst: np.ndarray, damping: float) -> np.ndarray:
    """Reference: the principal eigenvector of the dense Google matrix."""
    links = np.zeros((n, n))
    np.add.at(links, (dst, src), 1.0)
    out_degree = links.sum(axis=0)
    transition = np.where(out_degree > 0, links / np.maximum(out_degree, 1), 1.0 / n)
    google = damping * transition + (1 - damping) / n
    values, vectors = np.linalg.eig(google)
    principal = np.real(vectors[:, np.argmax(np.real(values))])
    return principal / principal.sum()


def test_pagerank_matches_dense_reference_with_dangling_nodes() -> None:
    rng = np.random.default_rng(0)
    n = 40
    src, dst = rng.integers(0, n, 200), rng.integers(0, n, 200)
    keep = src >= 5  # nodes 0..4 have no out-edges
    src, dst = src[keep], dst[keep]
    for damping in (0.5, 0.85):
        rank = pagerank(n, src, dst, damping=damping)
        assert rank.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(rank, dense_pagerank(n, src, dst, damping), atol=1e-8, rtol=0)


def test_pagerank_hub_outranks_leaves_and_handles_edge_cases() -> None:
    leaves = np.arange(1, 11)
    rank = pagerank(11, leaves, np.zeros(10, dtype=int))  # every leaf links to the dangling hub 0
    assert rank[0] > rank[1:].max()
    assert rank.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(pagerank(4, np.array([], int), np.array([], int)), np.full(4, 0.25))
    assert pagerank(0, np.array([], int), np.array([], int)).shape == (0,)
    with pytest.raises(ValueError, match="edge indices"):
        pagerank(3, np.array([0]), np.array([3]))


# --------------------------------------------------------------------------- WordNet


@pytest.fixture(scope="module")
def wordnet() -> tuple[pd.DataFrame, pd.DataFrame]:
    if not Path(DEFAULT_ROOT, "data.noun").is_file():
        pytest.skip("Debian's wordnet-base is not installed")
    started = time.perf_counter()
    nodes, edges = load_wordnet()
    print(f"WordNet nouns: {len(nodes)} synsets, {len(edges)} edges in {time.perf_counter() - started:.2f} s")
    return nodes, edges


@pytest.fixture(scope="module")
def wordnet_index(wordnet: tuple[pd.DataFrame, pd.DataFrame]) -> ConceptIndex:
    return ConceptIndex(select_concepts(*wordnet, CoverageConfig()))


def test_load_wordnet_nouns(wordnet: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    nodes, edges = wordnet
    assert len(nodes) > 80_000 and len(edges) > 100_000
    assert nodes["id"].is_unique and nodes["id"].str.match(r"^n:\d{8}$").all()
    ids = pd.Index(nodes["id"])
    assert (ids.get_indexer(edges["src"]) >= 0).all() and (ids.get_indexer(edges["dst"]) >= 0).all()
    lemmas = set("|".join(nodes["aliases"]).split("|"))
    assert {"dog", "fire engine", "fire truck"} <= lemmas
    assert {"noun.animal", "noun.artifact", "noun.act"} <= set(nodes["type"])
    dog = nodes[nodes["aliases"].str.contains(r"(?:^|\|)dog(?:\||$)") & (nodes["type"] == "noun.animal")]
    assert dog["name"].tolist() == ["dog"]


@needs_wordnet
def test_load_graph_dispatch_and_other_parts_of_speech(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("krea2_core.curation.coverage.load_wordnet", lambda: ("nodes", "edges"))
    assert load_graph("wordnet") == ("nodes", "edges")
    nodes, edges = load_wordnet(pos=("verb",))
    assert len(nodes) > 10_000
    assert nodes["type"].str.startswith("verb.").all() and edges["dst"].str.startswith("v:").all()
    with pytest.raises(ValueError, match="part"):
        load_wordnet(pos=("pronoun",))


def test_select_concepts_keeps_top_fraction_then_drops_types(wordnet: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    nodes, edges = wordnet
    everything = select_concepts(nodes, edges, CoverageConfig(keep_top_fraction=0.9, drop_types=[]))
    assert len(everything) == math.ceil(0.9 * len(nodes))
    assert everything["rank"].is_monotonic_decreasing
    assert list(everything.columns) == ["id", "name", "aliases", "type", "rank"]
    dropped = ["noun.act", "noun.cognition", "noun.feeling"]
    concepts = select_concepts(nodes, edges, CoverageConfig(keep_top_fraction=0.9, drop_types=dropped))
    assert not concepts["type"].isin(dropped).any()
    assert len(concepts) == (~everything["type"].isin(dropped)).sum()
    assert "dog" in set(concepts["name"])


# --------------------------------------------------------------------------- concept search


def small_index(plurals: bool = True) -> ConceptIndex:
    concepts = pd.DataFrame({
        "id": ["cat", "fire_engine", "dog", "hot_dog", "st_louis", "bus"],
        "name": ["cat", "fire engine", "dog", "hot dog", "St. Louis", "bus"],
        "aliases": ["cat|true cat", "fire engine|fire truck", "dog", "hot dog|hotdog", "St. Louis|Saint Louis", "bus"],
        "type": ["noun.animal", "noun.artifact", "noun.animal", "noun.food", "noun.location", "noun.artifact"],
    })
    return ConceptIndex(concepts, plurals=plurals)


def found(index: ConceptIndex, caption: str) -> set[str]:
    return set(index.concepts["id"].iloc[index.find([caption]).indices])


@pytest.mark.parametrize(("caption", "expected"), [
    ("a cat sits", {"cat"}),
    ("a category of things", set()),
    ("concatenate; scat; cats", {"cat"}),  # "cats" is the plural, the others are inside longer words
    ("THE CAT!", {"cat"}),
    ("(cat),cat.", {"cat"}),
    ("a red Fire-Engine's siren", {"fire_engine"}),
    ("a fire\ttruck by a fire engines parade", {"fire_engine"}),
    ("fire, engine", {"fire_engine"}),  # punctuation separates words like a space does
    ("a dog eats a hot dog", {"dog", "hot_dog"}),
    ("a hot dog", {"hot_dog"}),  # "dog" inside the longer match does not count
    ("two dogs in saint louis near the buses", {"dog", "st_louis", "bus"}),
    ("st.louis", {"st_louis"}),
    ("", set()),
])
def test_concept_search_whole_words(caption: str, expected: set[str]) -> None:
    assert found(small_index(), caption) == expected


def test_concept_search_rows_and_edge_cases() -> None:
    index = small_index()
    matches = index.find(["a cat", "nothing here", "", "hotdog and a bus\nwith a cat", None, "dog"])
    assert matches.shape == (6, index.n_concepts) and matches.dtype == bool
    rows = [set(index.concepts["id"].iloc[matches[i].indices]) for i in range(6)]
    assert rows == [{"cat"}, set(), set(), {"hot_dog", "bus", "cat"}, set(), {"dog"}]
    assert index.find([]).shape == (0, index.n_concepts)
    assert found(small_index(plurals=False), "cats") == set()


def test_concept_search_matches_regex_reference() -> None:
    """Random captions over a vocabulary where no form nests in another: every whole-word match counts."""
    concepts = pd.DataFrame({"id": ["a", "b", "c", "d"], "name": ["red car", "blue", "tree", "stone wall"],
                             "type": ["t"] * 4})
    index = ConceptIndex(concepts, plurals=False)
    rng = np.random.default_rng(1)
    words = ["red", "car", "blue", "bluet", "tree", "street", "stone", "wall", "walls", "Red", "CAR"]
    separators = [" ", ", ", "-", ". ", "  ", "!"]
    captions = ["".join(w + rng.choice(separators) for w in rng.choice(words, rng.integers(0, 12)))
                for _ in range(500)]
    matches = index.find(captions).toarray()
    for row, caption in enumerate(captions):
        text = re.sub(r"[\W_]+", " ", caption.lower())
        for column, name in enumerate(concepts["name"]):
            assert matches[row, column] == bool(re.search(rf"(?<!\w){name}(?!\w)", text)), caption


def test_concept_search_throughput(wordnet_index: ConceptIndex, record_property: pytest.RecordProperty) -> None:
    rng = np.random.default_rng(0)
    names = wordnet_index.concepts["name"].to_numpy()
    fillers = np.array("a the on of with near in front behind and photo of large small red old under".split())
    planted = rng.integers(0, len(names), size=(10_000, 3))
    captions = [" ".join([*rng.choice(fillers, 10), ", ".join(names[columns])]).capitalize() + "."
                for columns in planted]
    started = time.perf_counter()
    matches = wordnet_index.find(captions)
    seconds = time.perf_counter() - started
    rate = len(captions) / seconds
    record_property("captions_per_s", rate)
    print(f"concept search: {rate:,.0f} captions/s over {wordnet_index.n_concepts} concepts "
          f"({wordnet_index.n_forms} forms)")
    # a planted name is missed only inside a longer form ("red" + "fox") or when it is a stop word
    found_planted = matches[np.repeat(np.arange(len(captions)), 3), planted.ravel()]
    assert np.asarray(found_planted).mean() > 0.95
    assert rate > 1_000  # generous: measured ~100x faster


# --------------------------------------------------------------------------- coverage


def zipf_pool(n_rows: int = 3000, n_concepts: int = 200, seed: int = 0) -> sp.csr_matrix:
    """Captions naming 1-3 concepts with Zipf-like popularity: a few common concepts, a long rare tail."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_concepts + 1) ** 1.5
    popularity /= popularity.sum()
    rows, columns = [], []
    for row in range(n_rows):
        named = rng.choice(n_concepts, size=rng.integers(1, 4), replace=False, p=popularity)
        rows += [row] * len(named)
        columns += list(named)
    return sp.csr_matrix((np.ones(len(rows), bool), (rows, columns)), shape=(n_rows, n_concepts))


def test_ensure_coverage_restores_dropped_and_keeps_rare_concepts() -> None:
    matches = zipf_pool()
    counts = coverage_counts(matches)
    concepts = pd.DataFrame({"id": [f"c{j}" for j in range(matches.shape[1])],
                             "name": [f"concept {j}" for j in range(matches.shape[1])], "type": "t"})
    rare_max = 3
    dropped = int(np.flatnonzero((counts > rare_max) & (counts < 20))[0])
    rng = np.random.default_rng(0)
    sample = rng.choice(matches.shape[0], size=matches.shape[0] // 3, replace=False)
    sample = np.setdiff1d(sample, matches.tocsc()[:, dropped].indices)  # deliberately drop one concept
    pool = np.arange(matches.shape[0])

    before = coverage_report(matches, pool, sample, concepts)
    assert f"c{dropped}" in lost_concepts(before)
    assert list(before.columns) == ["id", "name", "type", "images_in_pool", "images_in_sample", "lost"]

    kept = ensure_coverage(sample, matches, rare_max_images=rare_max)
    assert np.isin(sample, kept).all() and np.all(np.diff(kept) > 0)
    after = coverage_report(matches, pool, kept, concepts)
    assert lost_concepts(after) == []
    rare = (after["images_in_pool"] > 0) & (after["images_in_pool"] <= rare_max)
    assert rare.any()
    assert (after.loc[rare, "images_in_sample"] == after.loc[rare, "images_in_pool"]).all()
    added = len(kept) - len(sample)
    assert added <= len(lost_concepts(before)) + int(counts[counts <= rare_max].sum())
    np.testing.assert_array_equal(kept, ensure_coverage(sample, matches, rare_max_images=rare_max))


def test_ensure_coverage_greedy_order_and_ties() -> None:
    # concepts 0 and 1 have 5 images, concept 2 has 4; rows 0..3 name them, rows 4.. are filler
    named = {0: [0, 1], 1: [1, 2], 2: [0], 3: [2]}
    filler = [[0], [0], [0], [1], [1], [1], [2], [2]]
    rows = [named[r] for r in range(4)] + filler
    data = [(r, c) for r, cs in enumerate(rows) for c in cs]
    matches = sp.csr_matrix((np.ones(len(data), bool), tuple(np.array(data).T)), shape=(len(rows), 3))
    assert coverage_counts(matches).tolist() == [5, 5, 4]
    # rows 0 and 1 both name two absent concepts; row 1 names the rarer concept 2. Then concept 0:
    # rows 0, 2 and the fillers tie, and the lower row index wins unless priority says otherwise.
    assert ensure_coverage(np.array([], int), matches, rare_max_images=1).tolist() == [0, 1]
    priority = np.zeros(len(rows))
    priority[2] = 1.0
    assert ensure_coverage(np.array([], int), matches, rare_max_images=1, priority=priority).tolist() == [1, 2]
    assert ensure_coverage(np.array([4]), matches, rare_max_images=4).tolist() == [1, 3, 4, 10, 11]
    with pytest.raises(ValueError, match="priority"):
        ensure_coverage(np.array([0]), matches, rare_max_images=1, priority=np.zeros(3))
    with pytest.raises(ValueError, match="sample"):
        ensure_coverage(np.array([99]), matches, rare_max_images=1)


# --------------------------------------------------------------------------- user graphs


def write_graph(folder: Path, nodes: pd.DataFrame, edges: pd.DataFrame) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    nodes.to_parquet(folder / "nodes.parquet")
    edges.to_parquet(folder / "edges.parquet")
    return folder


def test_user_graph_round_trip(tmp_path: Path) -> None:
    nodes = pd.DataFrame({"id": [1, 2, 3], "name": ["dog", "cat", "idea"], "type": ["animal", "animal", "abstract"]})
    edges = pd.DataFrame({"src": [2, 3], "dst": [1, 1]})
    folder = write_graph(tmp_path / "graph", nodes, edges)
    read_nodes, read_edges = load_graph(str(folder))
    assert read_nodes["aliases"].tolist() == ["dog", "cat", "idea"] and read_edges["src"].tolist() == ["2", "3"]
    concepts = select_concepts(read_nodes, read_edges, CoverageConfig(keep_top_fraction=1.0, drop_types=["abstract"]))
    assert concepts["name"].tolist() == ["dog", "cat"]  # dog is linked to by both others


def test_user_graph_errors_name_the_file(tmp_path: Path) -> None:
    nodes = pd.DataFrame({"id": ["a", "b"], "name": ["dog", "cat"], "type": ["animal", "animal"]})
    edges = pd.DataFrame({"src": ["a"], "dst": ["b"]})

    folder = write_graph(tmp_path / "no_type", nodes.drop(columns="type"), edges)
    with pytest.raises(GraphError, match=r"nodes\.parquet: missing column\(s\) \['type'\]"):
        read_graph(folder)

    folder = write_graph(tmp_path / "dangling", nodes, pd.DataFrame({"src": ["a"], "dst": ["zebra"]}))
    with pytest.raises(GraphError, match=r"edges\.parquet: column 'dst' names 1 id\(s\) missing .*zebra"):
        read_graph(folder)

    folder = write_graph(tmp_path / "repeated", pd.concat([nodes, nodes]), edges)
    with pytest.raises(GraphError, match=r"nodes\.parquet: 2 repeated id"):
        read_graph(folder)

    (tmp_path / "empty").mkdir()
    with pytest.raises(GraphError, match=r"nodes\.parquet: file not found"):
        read_graph(tmp_path / "empty")
    with pytest.raises(GraphError, match="'wordnet' or a folder"):
        load_graph(str(tmp_path / "missing"))
