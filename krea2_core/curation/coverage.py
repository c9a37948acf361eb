"""Entity coverage: rank concepts of a link graph, find them in captions, keep every concept in the sample.

The report ran PageRank over English Wikipedia, kept the top 90% of articles, dropped unrepresentable
subjects by their Wikidata type, searched every caption for the remaining concepts and, when sampling,
prioritised images whose captions name rare concepts, then checked that no concept of the pool was lost.
Here the graph is WordNet (``krea2_core.curation.wordnet``) or a user graph in Parquet.
"""

from __future__ import annotations

import heapq
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import ahocorasick
import numpy as np
import pandas as pd
import scipy.sparse as sp

from krea2_core.curation.config import CoverageConfig
from krea2_core.curation.wordnet import load_wordnet

NODES_FILE = "nodes.parquet"
EDGES_FILE = "edges.parquet"


class GraphError(ValueError):
    """A concept graph that cannot be used; the message names the file and what is wrong."""


# --------------------------------------------------------------------------- graph


def _read_table(path: Path, required: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise GraphError(f"{path}: file not found (a graph folder needs {NODES_FILE} and {EDGES_FILE})")
    try:
        table = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise GraphError(f"{path}: not a readable Parquet file: {err}") from err
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise GraphError(f"{path}: missing column(s) {missing}; it has {list(table.columns)}")
    nulls = [column for column in required if table[column].isna().any()]
    if nulls:
        raise GraphError(f"{path}: null values in column(s) {nulls}")
    return table


def read_graph(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A user graph: ``nodes.parquet`` (id, name, type, optional aliases joined by '|') and
    ``edges.parquet`` (src, dst node ids). Ids are compared as strings."""
    folder = Path(folder)
    nodes_path, edges_path = folder / NODES_FILE, folder / EDGES_FILE
    raw_nodes = _read_table(nodes_path, ("id", "name", "type"))
    raw_edges = _read_table(edges_path, ("src", "dst"))
    nodes = pd.DataFrame({column: raw_nodes[column].astype(str) for column in ("id", "name", "type")})
    aliases = raw_nodes["aliases"] if "aliases" in raw_nodes.columns else nodes["name"]
    nodes.insert(2, "aliases", aliases.fillna(nodes["name"]).astype(str))
    repeated = nodes["id"][nodes["id"].duplicated()].unique()
    if len(repeated):
        raise GraphError(f"{nodes_path}: {len(repeated)} repeated id(s), e.g. {list(repeated[:5])}")
    edges = pd.DataFrame({"src": raw_edges["src"].astype(str), "dst": raw_edges["dst"].astype(str)})
    known = pd.Index(nodes["id"])
    for column in ("src", "dst"):
        dangling = edges[column][known.get_indexer(edges[column]) < 0].unique()
        if len(dangling):
            raise GraphError(f"{edges_path}: column {column!r} names {len(dangling)} id(s) missing from "
                             f"{nodes_path.name}, e.g. {list(dangling[:5])}")
    return nodes, edges


def load_graph(graph: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``CoverageConfig.graph``: "wordnet" (Debian's wordnet-base nouns) or a graph folder."""
    if graph == "wordnet":
        return load_wordnet()
    if not Path(graph).is_dir():
        raise GraphError(f"graph must be 'wordnet' or a folder with {NODES_FILE} and {EDGES_FILE}; "
                         f"{graph!r} is neither")
    return read_graph(graph)


def pagerank(n_nodes: int, src_idx: np.ndarray, dst_idx: np.ndarray, damping: float = 0.85,
             tol: float = 1e-10, max_iter: int = 200) -> np.ndarray:
    """PageRank by sparse power iteration; stops when the L1 change is below ``tol``.

    Repeated edges weigh more; the rank of dangling nodes (no out-edges) is spread uniformly.
    """
    src = np.asarray(src_idx, dtype=np.int64)
    dst = np.asarray(dst_idx, dtype=np.int64)
    if src.shape != dst.shape:
        raise ValueError(f"src_idx and dst_idx differ in shape: {src.shape} vs {dst.shape}")
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n_nodes):
        raise ValueError(f"edge indices must be in [0, {n_nodes})")
    if n_nodes == 0:
        return np.zeros(0)
    out_degree = np.bincount(src, minlength=n_nodes).astype(np.float64)
    # column-stochastic over non-dangling columns: transition[dst, src] = 1 / out_degree[src]
    transition = sp.csr_matrix((1.0 / out_degree[src], (dst, src)), shape=(n_nodes, n_nodes))
    dangling = out_degree == 0
    rank = np.full(n_nodes, 1.0 / n_nodes)
    for _ in range(max_iter):
        updated = damping * (transition @ rank + rank[dangling].sum() / n_nodes) + (1.0 - damping) / n_nodes
        updated /= updated.sum()  # keeps float rounding from drifting the total
        change = np.abs(updated - rank).sum()
        rank = updated
        if change < tol:
            return rank
    warnings.warn(f"pagerank did not converge to {tol} in {max_iter} iterations (last change {change:.2e})",
                  stacklevel=2)
    return rank


def select_concepts(nodes: pd.DataFrame, edges: pd.DataFrame, config: CoverageConfig) -> pd.DataFrame:
    """The top ``keep_top_fraction`` of nodes by PageRank, then without ``drop_types``; sorted by rank
    (ties by id). Columns: id, name, aliases, type, rank."""
    ids = pd.Index(nodes["id"])
    src, dst = ids.get_indexer(edges["src"]), ids.get_indexer(edges["dst"])
    if (src < 0).any() or (dst < 0).any():
        raise GraphError("edges name node ids that are not in the nodes table")
    rank = pagerank(len(nodes), src, dst, damping=config.damping)
    aliases = nodes["aliases"] if "aliases" in nodes.columns else nodes["name"]
    ranked = pd.DataFrame({"id": nodes["id"], "name": nodes["name"], "aliases": aliases,
                           "type": nodes["type"], "rank": rank})
    ranked = ranked.sort_values(["rank", "id"], ascending=[False, True], kind="stable")
    kept = ranked.head(math.ceil(config.keep_top_fraction * len(ranked)))
    unknown = sorted(set(config.drop_types) - set(nodes["type"]))
    if unknown:
        warnings.warn(f"drop_types not found among the graph's node types: {unknown}", stacklevel=2)
    return kept[~kept["type"].isin(config.drop_types)].reset_index(drop=True)


# --------------------------------------------------------------------------- concept search

# Lowercased function words that WordNet also lists as nouns ("In" indium, "At" astatine, "Be"
# beryllium, "are" the unit of area): indexed, they would match nearly every caption.
STOPWORDS = frozenset(
    "a an the and or but nor if so as at by in on of to up for from with into onto over under out off "
    "i me my we us our you your he him his she her it its they them their this that these those who "
    "what which whom whose there here be am is are was were been being do does did have has had no not".split()
)

# Anything that is not a letter or digit separates words ("St. Louis" -> "st louis", "t-shirt" ->
# "t shirt"); newlines are kept as caption separators.
_SEPARATORS = re.compile(r"(?:[^\w\n]|_)+")


def _normalise(text: str) -> str:
    return _SEPARATORS.sub(" ", text.lower()).strip()


def _plural(form: str) -> str:
    if form.endswith(("s", "x", "z", "ch", "sh")):
        return form + "es"
    if form.endswith("y") and form[-2:-1] not in ("a", "e", "i", "o", "u"):
        return form[:-1] + "ies"
    return form + "s"


class ConceptIndex:
    """Whole-word, case-insensitive search of concept names and aliases in captions.

    Captions and surface forms are lowercased and every run of non-word characters becomes one space;
    forms are indexed padded with spaces (" fire engine "), so the Aho-Corasick automaton only reports
    whole-word matches and one pass over the text finds them all ("cat" never matches "category").
    Regular plurals of forms ending in a word of >= 3 letters are indexed too ("dogs", "buses",
    "puppies") unless the plural is itself a form or a stop word. Of overlapping matches, only those not
    inside a longer match are kept ("hot dog" does not also count as "dog"; "hot dog stand" keeps "hot
    dog" and "dog stand" when both are forms). A form shared by several concepts matches them all (no
    sense disambiguation). Single characters and ``STOPWORDS`` are not indexed.
    """

    def __init__(self, concepts: pd.DataFrame, plurals: bool = True) -> None:
        self.concepts = concepts.reset_index(drop=True)
        forms: dict[str, set[int]] = {}
        aliases = self.concepts["aliases"] if "aliases" in self.concepts.columns else self.concepts["name"]
        for column, (name, alias_text) in enumerate(zip(self.concepts["name"], aliases, strict=True)):
            for surface in dict.fromkeys([name, *str(alias_text).split("|")]):
                form = _normalise(surface)
                if len(form) > 1 and form not in STOPWORDS:
                    forms.setdefault(form, set()).add(column)
        if plurals:
            inflected: dict[str, set[int]] = {}
            for form, columns in forms.items():
                plural = _plural(form)
                if len(form.rsplit(" ", 1)[-1]) >= 3 and plural not in forms and plural not in STOPWORDS:
                    inflected.setdefault(plural, set()).update(columns)
            forms.update(inflected)
        self._automaton = ahocorasick.Automaton()
        self._key_length = np.empty(len(forms), dtype=np.int64)
        key_concepts: list[list[int]] = []
        for key, (form, columns) in enumerate(forms.items()):
            self._automaton.add_word(f" {form} ", key)
            self._key_length[key] = len(form) + 2
            key_concepts.append(sorted(columns))
        if forms:
            self._automaton.make_automaton()
        # concepts of key k: self._concept_of[self._key_start[k]:self._key_start[k + 1]]
        self._key_start = np.concatenate([[0], np.cumsum([len(c) for c in key_concepts])]).astype(np.int64)
        self._concept_of = np.fromiter((c for cs in key_concepts for c in cs), dtype=np.int64,
                                       count=int(self._key_start[-1]))

    @property
    def n_concepts(self) -> int:
        return len(self.concepts)

    @property
    def n_forms(self) -> int:
        return len(self._key_length)

    def find(self, captions: Sequence[str]) -> sp.csr_matrix:
        """Boolean (n_captions, n_concepts) matrix: caption i names concept j (columns follow ``concepts``)."""
        shape = (len(captions), self.n_concepts)
        parts = [_normalise(c.replace("\n", " ")) if isinstance(c, str) else "" for c in captions]
        # one pass over all captions joined by newlines, which no form contains
        text = " " + " \n ".join(parts) + " "
        hits = list(self._automaton.iter(text)) if self.n_forms else []
        if not hits:
            return sp.csr_matrix(shape, dtype=bool)
        end, key = np.array(hits, dtype=np.int64).T
        # word spans, without the padding spaces
        first, last = end - self._key_length[key] + 2, end - 1
        order = np.lexsort((-last, first))
        first, last, key = first[order], last[order], key[order]
        reach = np.maximum.accumulate(last)
        # sorted by start then longest first: a match lies inside an earlier one iff an earlier one reaches as far
        outer = np.concatenate([[True], last[1:] > reach[:-1]])
        first, key = first[outer], key[outer]
        lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        newlines = 2 + np.cumsum(lengths) + 3 * np.arange(len(parts))  # where the newline after caption i is
        rows = np.searchsorted(newlines, first)
        n_per_key = self._key_start[key + 1] - self._key_start[key]
        offset_in_key = np.arange(n_per_key.sum()) - np.repeat(np.cumsum(n_per_key) - n_per_key, n_per_key)
        columns = self._concept_of[np.repeat(self._key_start[key], n_per_key) + offset_in_key]
        data = np.ones(len(columns), dtype=bool)
        matches = sp.csr_matrix((data, (np.repeat(rows, n_per_key), columns)), shape=shape)
        matches.sum_duplicates()
        return matches


# --------------------------------------------------------------------------- coverage


def _bool_csr(matches: sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    csr = sp.csr_matrix(matches, dtype=bool)
    csr.sum_duplicates()
    csr.eliminate_zeros()
    return csr


def _row_indices(rows: np.ndarray, n_rows: int, what: str) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.size and not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"{what} must hold integer row indices, got dtype {rows.dtype}")
    rows = rows.astype(np.int64).ravel()
    if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
        raise ValueError(f"{what} must hold row indices in [0, {n_rows})")
    return rows


def coverage_counts(matches: sp.spmatrix | sp.sparray) -> np.ndarray:
    """Number of captions (images) naming each concept."""
    csr = _bool_csr(matches)
    return np.bincount(csr.indices, minlength=csr.shape[1])


def ensure_coverage(sample: np.ndarray, matches: sp.spmatrix | sp.sparray, rare_max_images: int,
                    priority: np.ndarray | None = None) -> np.ndarray:
    """Sorted pool rows: ``sample`` plus the rows needed so no concept of the pool is absent.

    First every image of a rare concept (named by 1..``rare_max_images`` images of the pool) is added.
    Then, while a concept is still absent, the row naming the most absent concepts is added; ties go to
    the row whose rarest absent concept has the fewest pool images, then to higher ``priority`` (one
    value per row, e.g. an aesthetic score), then to the lower row index. Deterministic.
    """
    csr = _bool_csr(matches)
    n_rows, _ = csr.shape
    selected = np.zeros(n_rows, dtype=bool)
    selected[_row_indices(sample, n_rows, "sample")] = True
    if priority is None:
        priority = np.zeros(n_rows)
    priority = np.asarray(priority, dtype=np.float64)
    if priority.shape != (n_rows,) or not np.isfinite(priority).all():
        raise ValueError(f"priority must hold {n_rows} finite values, one per pool row")

    counts = np.bincount(csr.indices, minlength=csr.shape[1])
    by_concept = csr.tocsc()
    rare = (counts > 0) & (counts <= rare_max_images)
    selected[by_concept[:, rare].indices] = True

    missing = counts > 0
    missing[csr[selected].indices] = False

    def key(row: int) -> tuple[int, float, float, int]:
        named = csr.indices[csr.indptr[row]:csr.indptr[row + 1]]
        absent = named[missing[named]]
        return (-len(absent), counts[absent].min() if len(absent) else math.inf, -priority[row], row)

    # lazy greedy: a row's key only worsens as concepts get covered, so a popped row whose key is
    # still current is the best one
    heap = [key(row) for row in np.unique(by_concept[:, missing].indices)]
    heapq.heapify(heap)
    while heap:
        stale = heapq.heappop(heap)
        current = key(stale[-1])
        if current == stale:
            row = stale[-1]
            selected[row] = True
            missing[csr.indices[csr.indptr[row]:csr.indptr[row + 1]]] = False
        elif current[0] < 0:
            heapq.heappush(heap, current)
    return np.flatnonzero(selected)


def coverage_report(matches: sp.spmatrix | sp.sparray, pool_rows: np.ndarray, sample_rows: np.ndarray,
                    concepts: pd.DataFrame) -> pd.DataFrame:
    """Per concept (rows of ``concepts``, the columns of ``matches``): images in the pool and in the
    sample, and ``lost`` when the pool has the concept and the sample does not."""
    csr = _bool_csr(matches)
    n_rows, n_concepts = csr.shape
    if len(concepts) != n_concepts:
        raise ValueError(f"concepts has {len(concepts)} rows but matches has {n_concepts} columns")
    in_pool = coverage_counts(csr[_row_indices(pool_rows, n_rows, "pool_rows")])
    in_sample = coverage_counts(csr[_row_indices(sample_rows, n_rows, "sample_rows")])
    return pd.DataFrame({
        "id": concepts["id"].to_numpy(), "name": concepts["name"].to_numpy(), "type": concepts["type"].to_numpy(),
        "images_in_pool": in_pool, "images_in_sample": in_sample, "lost": (in_pool > 0) & (in_sample == 0),
    })


def lost_concepts(report: pd.DataFrame) -> list[str]:
    """Ids of the concepts the sample lost."""
    return report.loc[report["lost"], "id"].tolist()
