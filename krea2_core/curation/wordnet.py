"""WordNet as an offline stand-in for the Wikipedia link graph of the entity-coverage step.

Synsets are nodes, pointers are edges and lexicographer files (``noun.animal``, ``noun.act``, ...) are
the node types used to drop unrepresentable concepts. Reads the Princeton database files directly
(format: wndb(5WN)), so no NLTK corpus download is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

DEFAULT_ROOT = "/usr/share/wordnet"
POS_LETTER = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}

# lexnames(5WN): lex_filenum -> lexicographer file. Used when the database folder has no ``lexnames``
# file, as with Debian's wordnet-base, which ships only the data/index files.
WORDNET30_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)


def read_lexnames(root: Path) -> tuple[str, ...]:
    """Lexicographer file names by number, from ``root/lexnames`` when present."""
    path = root / "lexnames"
    if not path.is_file():
        return WORDNET30_LEXNAMES
    rows = (line.split() for line in path.read_text().splitlines() if line.strip())
    names = {int(number): name for number, name, *_ in rows}
    return tuple(names[i] for i in range(len(names)))


def synset_id(offset: str, pos: str) -> str:
    # adjective satellites ("s") share the adjective data file and id space
    return f"{'a' if pos == 's' else pos}:{offset}"


def _lemma(word: str) -> str:
    # adjectives may carry a syntactic marker: "galore(ip)", "elect(p)"
    return word.split("(", 1)[0].replace("_", " ")


def _parse_data_file(path: Path, lexnames: Sequence[str]) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str]]]:
    nodes: list[tuple[str, str, str, str]] = []
    edges: list[tuple[str, str]] = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("  "):  # license header
                continue
            fields = line.split(" | ", 1)[0].split()
            offset, lex_filenum, ss_type, n_words = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
            lemmas = [_lemma(word) for word in fields[4:4 + 2 * n_words:2]]
            src = synset_id(offset, ss_type)
            nodes.append((src, lemmas[0], "|".join(lemmas), lexnames[lex_filenum]))
            at = 4 + 2 * n_words
            n_pointers = int(fields[at])
            # each pointer: symbol, target offset, target pos, source/target word numbers
            for k in range(at + 1, at + 1 + 4 * n_pointers, 4):
                edges.append((src, synset_id(fields[k + 1], fields[k + 2])))
    return nodes, edges


def load_wordnet(root: str | Path = DEFAULT_ROOT, pos: Sequence[str] = ("noun",)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Nodes (id, name, aliases, type) and directed edges (src, dst) of the WordNet synset graph.

    Every pointer type is kept (hypernym/hyponym, meronym/holonym, antonym, derivation, domain, ...):
    like Wikipedia links, any pointer says one concept refers to another. Lexical pointers (between two
    words) become edges between their synsets. Pointers to a part of speech not loaded are dropped, and
    repeated (src, dst) pairs are kept once.
    """
    root = Path(root)
    unknown = sorted(set(pos) - set(POS_LETTER))
    if unknown:
        raise ValueError(f"unknown part(s) of speech {unknown}; choose from {sorted(POS_LETTER)}")
    lexnames = read_lexnames(root)
    node_rows: list[tuple[str, str, str, str]] = []
    edge_rows: list[tuple[str, str]] = []
    for part in pos:
        path = root / f"data.{part}"
        if not path.is_file():
            raise FileNotFoundError(f"WordNet data file not found: {path} (install Debian's wordnet-base)")
        nodes, edges = _parse_data_file(path, lexnames)
        node_rows += nodes
        edge_rows += edges
    nodes_df = pd.DataFrame(node_rows, columns=["id", "name", "aliases", "type"])
    edges_df = pd.DataFrame(edge_rows, columns=["src", "dst"])
    loaded = tuple(POS_LETTER[part] + ":" for part in pos)
    edges_df = edges_df[edges_df["dst"].str.startswith(loaded)].drop_duplicates(ignore_index=True)
    return nodes_df, edges_df
