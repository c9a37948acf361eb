"""Top-k SAE and SAE tagging on synthetic embeddings with a known (planted) dictionary.

Planted data: each row is a positive combination of a few random unit "atoms", so a good SAE must
recover the atoms as decoder columns. In the labelling data every atom is a caption word (a colour, a
shape or a material) and each image's caption names exactly the atoms it was built from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import save_file

from krea2_core.curation.config import SAEConfig
from krea2_core.curation.sae import (
    CaptionKeywordLabeller,
    TopKSAE,
    activations,
    caption_terms,
    label_features,
    load_sae,
    predominant_tags,
    reconstruction_fvu,
    save_sae,
    tag_filter,
    top_activating,
    train_sae,
)

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown"]
SHAPES = ["circle", "square", "triangle", "star", "heart", "hexagon", "cross", "arrow"]
MATERIALS = ["wood", "metal", "glass", "paper", "stone", "plastic", "fabric", "clay"]
WORDS = COLOURS + SHAPES + MATERIALS


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # the matrices here are tiny: intra-op threads only add synchronisation, and thrash on a busy CI box
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit_atoms(rng: np.random.Generator, n_atoms: int, dim: int) -> np.ndarray:
    atoms = rng.normal(size=(n_atoms, dim))
    return atoms / np.linalg.norm(atoms, axis=1, keepdims=True)


def planted_rows(rng: np.random.Generator, atoms: np.ndarray, n: int, k_true: int) -> np.ndarray:
    chosen = np.argsort(rng.random((n, len(atoms))), axis=1)[:, :k_true]
    coefficients = rng.uniform(0.5, 1.5, size=(n, k_true))
    noise = rng.normal(scale=0.01, size=(n, atoms.shape[1]))
    return (np.einsum("nk,nkd->nd", coefficients, atoms[chosen]) + noise).astype(np.float32)


def best_cosines(sae: TopKSAE, atoms: np.ndarray) -> np.ndarray:
    """Per atom: the highest cosine with any decoder column."""
    return (atoms @ sae.W_dec.detach().numpy()).max(axis=1)  # decoder columns have unit norm


@dataclass(frozen=True)
class Planted:
    atoms: np.ndarray
    train: np.ndarray
    held_out: np.ndarray
    sae: TopKSAE
    history: list[dict[str, float]]


@pytest.fixture(scope="module")
def planted() -> Planted:
    rng = np.random.default_rng(0)
    atoms = unit_atoms(rng, 64, 128)
    train, held_out = planted_rows(rng, atoms, 3000, 4), planted_rows(rng, atoms, 1000, 4)
    sae, history = train_sae(train, SAEConfig(n_features=128, k=4, epochs=25, lr=3e-3, seed=0), progress=False)
    return Planted(atoms, train, held_out, sae, history)


def test_planted_dictionary_is_recovered(planted: Planted) -> None:
    # FVU of the trained SAE on 1000 held-out rows drawn from the same planted dictionary
    assert reconstruction_fvu(planted.sae, planted.held_out) < 0.15
    assert planted.history[-1]["fvu"] < planted.history[0]["fvu"]
    assert set(planted.history[-1]) == {"mse", "fvu", "dead_fraction"}
    cosine = best_cosines(planted.sae, planted.atoms)
    assert (cosine > 0.9).mean() >= 0.8
    acts = activations(planted.sae, planted.held_out, batch_size=300)
    assert acts.shape == (1000, 128)
    assert (acts.getnnz(axis=1) == 4).all() and (acts.data > 0).all()


def test_same_seed_same_weights_and_save_load_round_trip(planted: Planted, tmp_path: Path) -> None:
    config = SAEConfig(n_features=32, k=3, epochs=3, batch_size=64, seed=5)
    data = planted.train[:500, :32]
    first, history = train_sae(data, config, progress=False)
    second, history_again = train_sae(data, config, progress=False)
    assert history == history_again
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    other, _ = train_sae(data, SAEConfig(n_features=32, k=3, epochs=3, batch_size=64, seed=6), progress=False)
    assert not torch.equal(first.W_dec, other.W_dec)

    loaded = load_sae(save_sae(first, tmp_path / "sae" / "model.safetensors"))
    assert (loaded.d_in, loaded.n_features, loaded.k) == (32, 32, 3)
    assert (activations(first, data) != activations(loaded, data)).nnz == 0


def test_decoder_columns_stay_unit_norm(planted: Planted) -> None:
    norms = planted.sae.W_dec.detach().norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


@dataclass(frozen=True)
class Tagged:
    words: list[tuple[str, str, str]]  # (colour, shape, material) of each image
    acts: sp.csr_matrix
    labels: dict[int, str]


@pytest.fixture(scope="module")
def tagged() -> Tagged:
    rng = np.random.default_rng(1)
    atoms = unit_atoms(rng, len(WORDS), 64)
    n = 1500
    picks = np.stack([rng.integers(0, 8, n), 8 + rng.integers(0, 8, n), 16 + rng.integers(0, 8, n)], axis=1)
    embeddings = (atoms[picks] * rng.uniform(0.7, 1.3, size=(n, 3, 1))).sum(axis=1)
    embeddings = (embeddings + rng.normal(scale=0.02, size=embeddings.shape)).astype(np.float32)
    words = [(WORDS[c], WORDS[s], WORDS[m]) for c, s, m in picks]
    # "made" is in every caption: it must never win (no more common among top images than overall)
    captions = [f"A photo of a {c} {s} made of {m}." for c, s, m in words]
    config = SAEConfig(n_features=32, k=3, epochs=25, lr=3e-3, top_images=8, seed=0)
    sae, _ = train_sae(embeddings, config, progress=False)
    acts = activations(sae, embeddings)
    labels = label_features(acts, CaptionKeywordLabeller(captions), config.top_images)
    return Tagged(words, acts, labels)


def best_features(tagged: Tagged) -> tuple[np.ndarray, np.ndarray]:
    """Per word: the feature whose activation correlates best with the word's presence, and that correlation.

    Matched on activations rather than decoder cosine: every image has one word of each group, so
    b_pre absorbs each group's mean atom and the decoder columns learn the atoms minus that mean.
    """
    presence = np.array([[word in image for word in WORDS] for image in tagged.words], dtype=float)
    acts = tagged.acts.toarray()
    fires = np.flatnonzero(acts.std(axis=0) > 0)
    corr = np.corrcoef(presence.T, acts[:, fires].T)[: len(WORDS), len(WORDS):]
    return fires[corr.argmax(axis=1)], corr.max(axis=1)


def test_caption_labeller_names_recovered_features(tagged: Tagged) -> None:
    feature, corr = best_features(tagged)
    recovered = corr > 0.8
    assert recovered.mean() >= 0.8
    correct = [tagged.labels.get(int(f)) == word for f, word, ok in zip(feature, WORDS, recovered, strict=True) if ok]
    assert np.mean(correct) >= 0.9
    assert "made" not in tagged.labels.values()


def test_predominant_tags_name_each_images_attributes(tagged: Tagged) -> None:
    tags = predominant_tags(tagged.acts, tagged.labels, per_image=3)
    assert len(tags) == len(tagged.words)
    assert all(len(t) == len(set(t)) <= 3 for t in tags)
    assert np.mean([set(t) == set(w) for t, w in zip(tags, tagged.words, strict=True)]) >= 0.9


def test_tag_filter_drops_images_tagged_with_a_drop_tag(tagged: Tagged) -> None:
    tags = predominant_tags(tagged.acts, tagged.labels, per_image=3)
    keep = tag_filter(tags, ["Red", "glass"])
    assert keep.dtype == bool
    assert keep.tolist() == [not ({"red", "glass"} & set(t)) for t in tags]
    truth = np.array([w[0] != "red" and w[2] != "glass" for w in tagged.words])
    assert (keep == truth).mean() >= 0.95
    assert tag_filter(tags, []).all()


def test_top_activating_orders_by_strength_then_row() -> None:
    acts = sp.csr_matrix(np.array([[0.5, 0.0, 0.0], [0.9, 0.0, 0.0], [0.5, 0.2, 0.0], [0.1, 0.0, 0.0]]))
    top = top_activating(acts, top_images=3)
    assert set(top) == {0, 1}  # feature 2 never fires
    assert top[0].tolist() == [1, 0, 2]
    assert top[1].tolist() == [2]


def test_predominant_tags_dedupe_and_skip_unlabelled() -> None:
    acts = sp.csr_matrix(np.array([[0.9, 0.5, 0.7, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32))
    labels = {0: "cat", 1: "cat", 2: "blur"}  # feature 3 (the strongest) has no label
    assert predominant_tags(acts, labels, per_image=2) == [["cat", "blur"], []]
    assert predominant_tags(acts, labels, per_image=1) == [["cat"], []]


def test_caption_keyword_labeller_rules() -> None:
    assert caption_terms("An image of 2 red cars, the picture") == {"red", "cars", "red cars"}
    labeller = CaptionKeywordLabeller(["a red car", "a red bus", "a blue car", "a green tree"], min_share=0.6)
    assert labeller.label(0, np.array([0, 1])) == "red"
    assert labeller.label(0, np.array([0, 2])) == "car"
    assert labeller.label(0, np.array([1, 2, 3])) is None  # best term in only 1/3 of the top images
    assert CaptionKeywordLabeller(["a dog", "a dog"]).label(0, np.array([0, 1])) is None  # everywhere
    with pytest.raises(ValueError, match="min_share"):
        CaptionKeywordLabeller(["a dog"], min_share=0.0)


@pytest.mark.parametrize(
    ("embeddings", "message"),
    [
        (np.zeros((0, 8), np.float32), "empty"),
        (np.zeros((4, 0), np.float32), "empty"),
        (np.zeros(8, np.float32), "2-D"),
        (np.zeros((2, 3, 4), np.float32), "2-D"),
        (np.array([[0.0, 1.0], [np.nan, 0.0], [1.0, np.inf]]), r"2 row\(s\) with NaN/inf .*\[1, 2\]"),
        (np.array([["a", "b"]]), "real numbers"),
    ],
)
def test_bad_embeddings_get_a_clear_error(embeddings: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train_sae(embeddings, SAEConfig(n_features=4, k=2, epochs=1), progress=False)


def test_wrong_dimension_and_foreign_file_are_rejected(tmp_path: Path) -> None:
    sae = TopKSAE(8, 16, 2)
    with pytest.raises(ValueError, match="dim 4 but the SAE expects 8"):
        activations(sae, np.zeros((3, 4), np.float32))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a krea2 SAE file"):
        load_sae(tmp_path / "other.safetensors")
