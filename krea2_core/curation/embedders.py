"""Image embedders for semantic curation (clustering, semantic dedup, SAE tags) and their Parquet storage.

Every embedder returns float32 rows of unit L2 norm, so cosine similarity is a dot product downstream.
``efficientnet_lite0`` runs offline on CPU with real ImageNet weights; ``hf`` loads a transformers vision
model (SigLIP / SigLIP-2 / DINOv3) by hub id or local directory for GPU runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from krea2_core.common.device import resolve_device
from krea2_core.curation.config import EmbedderConfig
from krea2_core.curation.efficientnet import FEATURE_DIM, INPUT_MEAN, INPUT_SIZE, INPUT_STD, load_efficientnet_lite0
from krea2_core.data.images import to_rgb

ID_COLUMN = "id"
EMBEDDING_COLUMN = "embedding"
_META_MODEL = b"krea2.embedding_model"
_META_DIM = b"krea2.embedding_dim"
# EfficientNet's evaluation crop: the central 224/256 of the shorter side, as in the TF reference
_CROP_FRACTION = 224 / 256

# transformers model classes by how their image embedding is read
_SIGLIP_VISION_MODELS = ("SiglipVisionModel", "Siglip2VisionModel")
_SIGLIP_FULL_MODELS = ("SiglipModel", "Siglip2Model")
_DINOV3_MODELS = ("DINOv3ViTModel",)


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(len(images), dim) float32 rows of unit L2 norm."""
        ...


def _in_batches(images: Sequence[Image.Image], batch_size: int, dim: int,
                embed_batch: Callable[[Sequence[Image.Image]], torch.Tensor]) -> np.ndarray:
    """Run ``embed_batch`` on chunks of at most ``batch_size`` images and L2-normalise the rows."""
    chunks = [F.normalize(embed_batch(images[i:i + batch_size]).float(), dim=-1).cpu().numpy()
              for i in range(0, len(images), batch_size)]
    return np.concatenate(chunks) if chunks else np.empty((0, dim), np.float32)


def _center_crop_224(image: Image.Image) -> np.ndarray:
    """(224, 224, 3) uint8: central crop of the shorter side, then a bicubic resize to 224."""
    image = to_rgb(image)
    w, h = image.size
    side = max(1, round(min(w, h) * _CROP_FRACTION))
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    return np.asarray(image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC, box=box))


class EfficientNetLite0Embedder:
    """1280-d pooled features of EfficientNet-Lite0 (ImageNet); ~5M params, fine on CPU."""

    name = "efficientnet_lite0"
    dim = FEATURE_DIM

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 32) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.batch_size = batch_size
        self.model = load_efficientnet_lite0().to(self.device)
        self._mean = torch.tensor(INPUT_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(INPUT_STD, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, 3, 224, 224) normalised model input on the embedder's device."""
        pixels = torch.from_numpy(np.stack([_center_crop_224(img) for img in images])).to(self.device)
        return (pixels.permute(0, 3, 1, 2).float() / 255.0 - self._mean) / self._std

    def _embed_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.model.features(self.preprocess(images))

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        with torch.inference_mode():
            return _in_batches(images, self.batch_size, self.dim, self._embed_batch)


def _load_image_processor(model_id: str, local: bool, model: Any) -> Any:
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_id, local_files_only=local)
    except ImportError:
        if type(model).__name__ not in _DINOV3_MODELS:
            raise
        # DINOv3's processor needs torchvision; it is resize + rescale + normalise, which the PIL ViT
        # processor does with the same saved size/mean/std (pixel values differ only by rounding)
        from transformers import ViTImageProcessorPil

        return ViTImageProcessorPil.from_pretrained(model_id, local_files_only=local)


class HFVisionEmbedder:
    """Pooled image embedding of a transformers vision model given by hub id or local directory.

    SigLIP / SigLIP-2 (vision tower or full model): the attention-pooling head output; DINOv3 ViT: the
    normalised CLS token. Other model classes are rejected rather than pooled in some arbitrary way.
    """

    def __init__(self, model_id: str, device: torch.device | str = "cpu", batch_size: int = 32) -> None:
        from transformers import AutoModel

        if model_id.startswith(("/", "./", "../", "~")) and not Path(model_id).expanduser().is_dir():
            raise FileNotFoundError(f"HF embedder model directory not found: {model_id}")
        local = Path(model_id).expanduser().is_dir()
        path = str(Path(model_id).expanduser()) if local else model_id
        self.name = model_id
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.batch_size = batch_size
        self.model = AutoModel.from_pretrained(path, local_files_only=local).eval().to(self.device)
        kind = type(self.model).__name__
        if kind not in _SIGLIP_VISION_MODELS + _SIGLIP_FULL_MODELS + _DINOV3_MODELS:
            raise ValueError(f"{model_id}: unsupported model class {kind}; supported: "
                             f"{list(_SIGLIP_VISION_MODELS + _SIGLIP_FULL_MODELS + _DINOV3_MODELS)}")
        # the full SigLIP models embed images with their vision tower
        self._encoder = self.model.vision_model if kind in _SIGLIP_FULL_MODELS else self.model
        self.dim: int = getattr(self.model.config, "vision_config", self.model.config).hidden_size
        self.processor = _load_image_processor(path, local, self.model)

    def _embed_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=[to_rgb(img) for img in images], return_tensors="pt").to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            pooled = self._encoder(**inputs).pooler_output
        if pooled is None:  # a SigLIP vision tower saved with vision_use_head=False
            raise ValueError(f"{self.name}: model returns no pooled output (vision_use_head=False?)")
        return pooled

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        with torch.inference_mode():
            return _in_batches(images, self.batch_size, self.dim, self._embed_batch)


def make_embedder(config: EmbedderConfig) -> Embedder:
    device = resolve_device(config.device)
    if config.kind == "efficientnet_lite0":
        return EfficientNetLite0Embedder(device, config.batch_size)
    if config.kind == "hf":
        return HFVisionEmbedder(config.model_id, device, config.batch_size)
    raise ValueError(f"unknown embedder kind {config.kind!r}")


def write_embeddings(path: str | Path, ids: Sequence[str], vectors: np.ndarray, model: str) -> None:
    """Parquet with ``id`` (string) and ``embedding`` (fixed-size list of float32); model and dim in the
    schema metadata. Written to a temporary name first so a crash never leaves a truncated file."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] < 1:
        raise ValueError(f"vectors must have shape (n, dim) with dim >= 1, got {vectors.shape}")
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids but {len(vectors)} vectors")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or inf")
    dim = vectors.shape[1]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    schema = pa.schema([(ID_COLUMN, pa.string()), (EMBEDDING_COLUMN, pa.list_(pa.float32(), dim))],
                       metadata={_META_MODEL: model.encode(), _META_DIM: str(dim).encode()})
    table = pa.Table.from_arrays([pa.array(list(ids), pa.string()), embedding], schema=schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """(ids, (n, dim) float32 vectors, {"model": str, "dim": int}) from a ``write_embeddings`` file.

    The vectors view Arrow's buffer without a copy where possible, so they may be read-only.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file not found: {path}")
    table = pq.read_table(path)
    schema = table.schema
    names = set(schema.names)
    if not {ID_COLUMN, EMBEDDING_COLUMN} <= names:
        raise ValueError(f"{path}: not an embeddings file: needs columns {[ID_COLUMN, EMBEDDING_COLUMN]}, "
                         f"has {schema.names}")
    kind = schema.field(EMBEDDING_COLUMN).type
    if not (pa.types.is_fixed_size_list(kind) and kind.value_type == pa.float32()):
        raise ValueError(f"{path}: column {EMBEDDING_COLUMN!r} must be a fixed-size list of float32, got {kind}")
    metadata = schema.metadata or {}
    if _META_MODEL not in metadata:
        raise ValueError(f"{path}: schema metadata lacks {_META_MODEL.decode()!r}")
    column = table.column(EMBEDDING_COLUMN).combine_chunks()
    if column.null_count:
        raise ValueError(f"{path}: {column.null_count} null embeddings")
    dim = kind.list_size
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    ids = table.column(ID_COLUMN).to_pylist()
    return ids, vectors, {"model": metadata[_META_MODEL].decode(), "dim": dim}
