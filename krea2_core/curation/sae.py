"""Top-k sparse autoencoder on image embeddings, and the unsupervised tagging system built on it.

The report trains an SAE on SigLIP-2 embeddings, has a VLM annotate each feature from its top
activating images, and tags every image with its predominant annotated features; images tagged with a
reviewed artifact tag (``SAEConfig.drop_tags``) are filtered without training a classifier.

Model (top-k SAE, Gao et al. 2024): ``z = topk(relu(W_enc (x - b_pre) + b_enc))``,
``x_hat = W_dec z + b_pre``. Decoder columns are kept at unit norm (renormalised after every optimizer
step) so feature activations are comparable in scale and cannot shrink the decoder to cheat. The
encoder starts as the decoder's transpose and ``b_pre`` at the data mean, which avoids an early phase
of features firing on the mean direction.

Dead features: a feature that has not fired on any of the last ``n`` training samples (one epoch) is
dead. An auxiliary loss (AuxK) asks the ``AUX_K`` strongest dead features to reconstruct the residual
of the live ones, which gives dead features a gradient towards directions the model still misses.

Feature labelling is pluggable (``FeatureLabeller``): real runs use a VLM on the top images; the
offline ``CaptionKeywordLabeller`` names a feature by the caption word most over-represented among its
top images.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from krea2_core.curation.config import SAEConfig
from krea2_core.text import content_words

AUX_K_FACTOR = 2  # dead features recruited by the auxiliary loss, as a multiple of k
AUX_WEIGHT = 1.0 / 32  # weight of the auxiliary loss (Gao et al. 2024)
_METADATA_KEY = "krea2_sae"


class TopKSAE(nn.Module):
    """``d_in -> n_features`` sparse autoencoder keeping the ``k`` largest ReLU activations per row."""

    def __init__(self, d_in: int, n_features: int, k: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 1 <= k <= n_features:
            raise ValueError(f"k must be in [1, n_features={n_features}], got {k}")
        self.d_in, self.n_features, self.k = d_in, n_features, k
        decoder = torch.randn(d_in, n_features, generator=generator)
        decoder /= decoder.norm(dim=0, keepdim=True)
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        self.W_enc = nn.Parameter(decoder.T.clone())  # (n_features, d_in)
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.W_dec = nn.Parameter(decoder)  # (d_in, n_features), unit-norm columns

    def pre_activations(self, x: torch.Tensor, b_pre: torch.Tensor | None = None) -> torch.Tensor:
        return (x - (self.b_pre if b_pre is None else b_pre)) @ self.W_enc.T + self.b_enc

    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, feature indices), each (n, k); values are >= 0 (ReLU before the top-k)."""
        values, indices = torch.relu(self.pre_activations(x)).topk(self.k, dim=-1)
        return values, indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = self.topk(x)
        return torch.zeros(x.shape[0], self.n_features, dtype=values.dtype).scatter(-1, indices, values)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec.T + self.b_pre

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, sparse codes)."""
        z = self.encode(x)
        return self.decode(z), z

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12)


def check_embeddings(embeddings: np.ndarray, d_in: int | None = None) -> np.ndarray:
    """``embeddings`` as a float32 (n, d) array; ValueError naming the problem otherwise."""
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (n_images, dim), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"embeddings is empty: shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"embeddings must be real numbers, got dtype {array.dtype}")
    if d_in is not None and array.shape[1] != d_in:
        raise ValueError(f"embeddings have dim {array.shape[1]} but the SAE expects {d_in}")
    # torch shares memory with the result: a read-only view (e.g. zero-copy from Parquet) gets copied
    array = array.astype(np.float32, copy=not array.flags.writeable)
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad.size:
        raise ValueError(f"embeddings have {bad.size} row(s) with NaN/inf values (first rows: {bad[:5].tolist()})")
    return array


def train_sae(embeddings: np.ndarray, config: SAEConfig,
              progress: bool = True) -> tuple[TopKSAE, list[dict[str, float]]]:
    """Train a top-k SAE on CPU; the same data and ``config.seed`` give identical weights.

    History rows (one per epoch) are measured on the epoch's training batches as the model learns:
    ``mse`` (mean squared error per element), ``fvu`` (squared error / total variance of the data) and
    ``dead_fraction`` (features that fired on no sample of the epoch).
    """
    data = torch.from_numpy(check_embeddings(embeddings))
    n, d_in = data.shape
    init = torch.Generator().manual_seed(config.seed)
    shuffle = torch.Generator().manual_seed(config.seed + 1)
    sae = TopKSAE(d_in, config.n_features, config.k, generator=init)
    with torch.no_grad():
        sae.b_pre.copy_(data.mean(dim=0))
    total_variance = float(((data - data.mean(dim=0)) ** 2).sum().clamp_min(1e-12))
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr)
    samples_since_fired = torch.zeros(config.n_features, dtype=torch.long)
    history: list[dict[str, float]] = []
    epochs = tqdm(range(config.epochs), desc="sae", unit="epoch", disable=not progress)
    for _ in epochs:
        squared_error = 0.0
        fired = torch.zeros(config.n_features, dtype=torch.bool)
        for batch in data[torch.randperm(n, generator=shuffle)].split(config.batch_size):
            reconstruction, z = sae(batch)
            error = ((reconstruction - batch) ** 2).sum()
            batch_fired = (z > 0).any(dim=0)
            samples_since_fired = torch.where(batch_fired, 0, samples_since_fired + batch.shape[0])
            loss = error / batch.numel() + AUX_WEIGHT * _aux_loss(sae, batch, reconstruction, samples_since_fired >= n)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sae.normalise_decoder()
            squared_error += error.item()
            fired |= batch_fired
        row = {"mse": squared_error / data.numel(), "fvu": squared_error / total_variance,
               "dead_fraction": float((~fired).float().mean())}
        history.append(row)
        epochs.set_postfix(fvu=f"{row['fvu']:.3f}", dead=f"{row['dead_fraction']:.2f}")
    sae.eval()
    return sae, history


def _aux_loss(sae: TopKSAE, batch: torch.Tensor, reconstruction: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """AuxK: normalised MSE of the top dead features reconstructing the live features' residual."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return batch.new_zeros(())
    residual = (batch - reconstruction).detach()
    # b_pre is detached so that this loss only moves the dead features' own weights: once the live
    # features reconstruct well, the normalised residual loss would otherwise dominate b_pre's gradient
    pre = torch.relu(sae.pre_activations(batch, sae.b_pre.detach())).masked_fill(~dead, 0.0)
    values, indices = pre.topk(min(AUX_K_FACTOR * sae.k, n_dead), dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values)
    residual_hat = z @ sae.W_dec.T  # no b_pre: the residual has no offset to model
    variance = ((residual - residual.mean(dim=0)) ** 2).sum().clamp_min(1e-12)
    return ((residual_hat - residual) ** 2).sum() / variance


def reconstruction_fvu(sae: TopKSAE, embeddings: np.ndarray, batch_size: int = 4096) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over ``embeddings``."""
    data = torch.from_numpy(check_embeddings(embeddings, sae.d_in))
    with torch.no_grad():
        error = sum(float(((sae(b)[0] - b) ** 2).sum()) for b in data.split(batch_size))
    return error / max(float(((data - data.mean(dim=0)) ** 2).sum()), 1e-12)


def activations(sae: TopKSAE, embeddings: np.ndarray, batch_size: int = 4096) -> sp.csr_matrix:
    """(n, n_features) float32 sparse codes: ``k`` non-zeros per row (fewer where top-k values are 0)."""
    data = torch.from_numpy(check_embeddings(embeddings, sae.d_in))
    values, indices = [], []
    with torch.no_grad():
        for batch in data.split(batch_size):
            v, i = sae.topk(batch)
            values.append(v.numpy())
            indices.append(i.numpy())
    v, i = np.concatenate(values), np.concatenate(indices)
    rows = np.repeat(np.arange(len(data)), sae.k)
    positive = v.ravel() > 0
    acts = sp.csr_matrix((v.ravel()[positive], (rows[positive], i.ravel()[positive])),
                         shape=(len(data), sae.n_features), dtype=np.float32)
    acts.sort_indices()
    return acts


def top_activating(acts: sp.spmatrix, top_images: int) -> dict[int, np.ndarray]:
    """For each feature that fires at all, its ``top_images`` strongest rows (descending; ties by row)."""
    columns = sp.csc_matrix(acts)
    columns.sort_indices()
    top: dict[int, np.ndarray] = {}
    for feature in range(columns.shape[1]):
        start, end = columns.indptr[feature], columns.indptr[feature + 1]
        if start == end:
            continue
        rows, values = columns.indices[start:end], columns.data[start:end]
        order = np.lexsort((rows, -values))[:top_images]
        top[feature] = rows[order].astype(np.int64)
    return top


class FeatureLabeller(Protocol):
    """Names an SAE feature from its top-activating image rows; None when it has no clear meaning."""

    def label(self, feature: int, rows: np.ndarray) -> str | None: ...


def caption_terms(caption: str) -> set[str]:
    """Content words of a lowercased caption and the two-word phrases of adjacent content words."""
    terms: set[str] = set()
    previous: str | None = None
    for word in content_words(caption):
        if word is None:
            previous = None
            continue
        terms.add(word)
        if previous is not None:
            terms.add(f"{previous} {word}")
        previous = word
    return terms


class CaptionKeywordLabeller:
    """Offline labeller: the caption term most over-represented among a feature's top images.

    Score of a term = share of the top images whose caption has it - share of the whole pool's
    captions that have it (a term that is everywhere says nothing about the feature). The best term is
    returned when it is in at least ``min_share`` of the top images and more common there than overall.
    """

    def __init__(self, captions: Sequence[str], min_share: float = 0.5) -> None:
        if not 0.0 < min_share <= 1.0:
            raise ValueError(f"min_share must be in (0, 1], got {min_share}")
        if len(captions) == 0:
            raise ValueError("captions is empty")
        self.min_share = min_share
        self._terms = [caption_terms(c) for c in captions]
        document_frequency = Counter(t for terms in self._terms for t in terms)
        self._pool_share = {t: count / len(captions) for t, count in document_frequency.items()}

    def label(self, feature: int, rows: np.ndarray) -> str | None:
        if len(rows) == 0:
            return None
        counts = Counter(t for row in rows for t in self._terms[int(row)])
        if not counts:
            return None

        def rank(term: str) -> tuple[float, float, int, str]:
            # ties go to the higher share, then the shorter term (a phrase must beat its own words), then A-Z
            share = counts[term] / len(rows)
            return self._pool_share[term] - share, -share, term.count(" "), term

        negative_score, negative_share, _, term = min(rank(t) for t in counts)
        return term if -negative_share >= self.min_share and negative_score < 0 else None


def label_features(acts: sp.spmatrix, labeller: FeatureLabeller, top_images: int) -> dict[int, str]:
    """Labels of the features the labeller can name, keyed by feature index."""
    labels: dict[int, str] = {}
    for feature, rows in top_activating(acts, top_images).items():
        name = labeller.label(feature, rows)
        if name:
            labels[feature] = name
    return labels


def predominant_tags(acts: sp.spmatrix, labels: dict[int, str], per_image: int) -> list[list[str]]:
    """Per image, the distinct labels of its strongest labelled features (at most ``per_image``)."""
    rows = sp.csr_matrix(acts)
    tags: list[list[str]] = []
    for start, end in zip(rows.indptr[:-1], rows.indptr[1:], strict=True):
        features, values = rows.indices[start:end], rows.data[start:end]
        image_tags: list[str] = []
        for feature in features[np.lexsort((features, -values))]:
            name = labels.get(int(feature))
            if name is not None and name not in image_tags:
                image_tags.append(name)
                if len(image_tags) == per_image:
                    break
        tags.append(image_tags)
    return tags


def tag_filter(tags: Sequence[Sequence[str]], drop_tags: Sequence[str]) -> np.ndarray:
    """Boolean keep-mask: True where none of the image's tags is in ``drop_tags`` (case-insensitive)."""
    drop = {t.strip().lower() for t in drop_tags}
    return np.array([not any(t.strip().lower() in drop for t in image_tags) for image_tags in tags], dtype=bool)


def save_sae(sae: TopKSAE, path: str | Path) -> Path:
    """Write weights to a safetensors file; the architecture is JSON in the file's metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = {"d_in": sae.d_in, "n_features": sae.n_features, "k": sae.k}
    tensors = {name: p.detach().contiguous() for name, p in sae.state_dict().items()}
    save_file(tensors, str(path), metadata={_METADATA_KEY: json.dumps(shape)})
    return path


def load_sae(path: str | Path) -> TopKSAE:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if _METADATA_KEY not in metadata:
            raise ValueError(f"{path} is not a krea2 SAE file (no {_METADATA_KEY!r} metadata)")
        shape = json.loads(metadata[_METADATA_KEY])
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    sae = TopKSAE(shape["d_in"], shape["n_features"], shape["k"])
    sae.load_state_dict(state)
    return sae.eval()
