"""Image embedders: real EfficientNet-Lite0 weights, tiny offline transformers models, Parquet storage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
import torch
from PIL import Image

from krea2_core.curation.config import EmbedderConfig
from krea2_core.curation.efficientnet import load_efficientnet_lite0, weights_path
from krea2_core.curation.embedders import (
    EfficientNetLite0Embedder,
    HFVisionEmbedder,
    make_embedder,
    read_embeddings,
    write_embeddings,
)
from krea2_core.data.images import to_rgb

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)())


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Embedder:
    embedder = make_embedder(EmbedderConfig(kind="efficientnet_lite0", device="cpu", batch_size=4))
    assert isinstance(embedder, EfficientNetLite0Embedder)
    return embedder


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [_photo(name) for name in ("chelsea", "coffee", "astronaut", "rocket", "horse")]


def _assert_unit_rows(vectors: np.ndarray, n: int, dim: int) -> None:
    assert vectors.shape == (n, dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- EfficientNet-Lite0


def test_efficientnet_checkpoint_loads_every_key_strictly() -> None:
    checkpoint = torch.load(weights_path(), weights_only=True)
    model = load_efficientnet_lite0()  # strict=True inside: a missing or unexpected key raises
    assert set(model.state_dict()) == set(checkpoint)


def test_efficientnet_classifies_chelsea_as_a_cat(effnet: EfficientNetLite0Embedder) -> None:
    with torch.inference_mode():
        probs = effnet.model(effnet.preprocess([_photo("chelsea"), _photo("coffee")])).softmax(-1)
    assert int(probs[0].argmax()) in IMAGENET_CATS
    assert float(probs[0, IMAGENET_CATS.start:IMAGENET_CATS.stop].sum()) > 0.8
    assert int(probs[1].argmax()) == 967  # espresso


def test_efficientnet_embeddings_unit_deterministic_batch_invariant(
        effnet: EfficientNetLite0Embedder, photos: list[Image.Image]) -> None:
    first = effnet.embed(photos)
    _assert_unit_rows(first, len(photos), 1280)
    np.testing.assert_array_equal(first, effnet.embed(photos))
    one_by_one = EfficientNetLite0Embedder("cpu", batch_size=1).embed(photos)
    np.testing.assert_allclose(one_by_one, first, atol=1e-4)


def test_efficientnet_crops_of_one_photo_are_closer_than_another_photo(
        effnet: EfficientNetLite0Embedder) -> None:
    astronaut = _photo("astronaut")  # 512x512
    crop_a = astronaut.crop((0, 0, 448, 448))
    crop_b = astronaut.crop((48, 40, 512, 504)).resize((300, 300), Image.Resampling.BILINEAR)
    a, b, coffee = effnet.embed([crop_a, crop_b, _photo("coffee")])
    assert a @ b > max(a @ coffee, b @ coffee) + 0.1


def test_non_rgb_images_are_converted_and_empty_input_is_empty(effnet: EfficientNetLite0Embedder) -> None:
    chelsea = _photo("chelsea")
    transparent = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)  # composited on white, not black
    images = [chelsea.convert("RGBA"), chelsea.convert("L"), chelsea.convert("P"), transparent,
              Image.new("LA", (20, 90), (30, 128))]
    vectors = effnet.embed(images)
    _assert_unit_rows(vectors, len(images), 1280)
    rgb = effnet.embed([chelsea])[0]
    assert vectors[0] @ rgb > 0.999  # opaque RGBA embeds as its RGB
    assert vectors[1] @ rgb > 0.8  # greyscale stays close
    assert effnet.embed([]).shape == (0, 1280)


# --------------------------------------------------------------------------- transformers models

_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)


def _save_siglip2_vision(root: Path) -> int:
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    Siglip2VisionModel(Siglip2VisionConfig(**_TINY_VISION, patch_size=8, num_patches=16)).save_pretrained(root)
    Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(root)
    return 32


def _save_siglip2_full(root: Path) -> int:
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model

    config = Siglip2Config(text_config=_TINY_TEXT, vision_config=dict(**_TINY_VISION, patch_size=8, num_patches=16))
    Siglip2Model(config).save_pretrained(root)
    Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(root)
    return 32


def _save_siglip_vision(root: Path) -> int:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(**_TINY_VISION, patch_size=8, image_size=32)).save_pretrained(root)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root)
    return 32


def _save_dinov3(root: Path) -> int:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(**_TINY_VISION, patch_size=8, image_size=32, num_register_tokens=2)
    DINOv3ViTModel(config).save_pretrained(root)
    # the processor config as the hub checkpoints ship it; its class needs torchvision, which we lack,
    # so this also exercises the embedder's PIL fallback
    (root / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "DINOv3ViTImageProcessorFast", "do_resize": True, "do_rescale": True,
        "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "resample": 2, "rescale_factor": 1 / 255, "size": {"height": 32, "width": 32}}))
    return 32


@pytest.mark.parametrize("save", [_save_siglip2_vision, _save_siglip2_full, _save_siglip_vision, _save_dinov3])
def test_hf_embedder_loads_tiny_local_models(save, tmp_path: Path, photos: list[Image.Image]) -> None:
    torch.manual_seed(0)
    hidden = save(tmp_path)
    embedder = make_embedder(EmbedderConfig(kind="hf", model_id=str(tmp_path), device="cpu", batch_size=2))
    assert isinstance(embedder, HFVisionEmbedder) and embedder.dim == hidden
    images = photos[:3] + [photos[0].convert("L")]
    vectors = embedder.embed(images)
    _assert_unit_rows(vectors, len(images), hidden)
    np.testing.assert_allclose(embedder.embed(images[:1]), vectors[:1], atol=1e-5)  # batch invariant
    assert embedder.embed([]).shape == (0, hidden)


def test_hf_embedder_rejects_unsupported_models_and_missing_dirs(tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(**_TINY_VISION, patch_size=8, image_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported model class ViTModel"):
        HFVisionEmbedder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not-there"):
        HFVisionEmbedder(str(tmp_path / "not-there"))


# --------------------------------------------------------------------------- Parquet


def test_parquet_round_trip_keeps_ids_values_and_fixed_size_type(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((7, 5)).astype(np.float32)
    ids = [f"img-{i}" for i in range(7)]
    path = tmp_path / "sub" / "embeddings.parquet"
    write_embeddings(path, ids, vectors, model="efficientnet_lite0")
    assert pq.read_schema(path).field("embedding").type == pa.list_(pa.float32(), 5)
    read_ids, read_vectors, meta = read_embeddings(path)
    assert read_ids == ids and meta == {"model": "efficientnet_lite0", "dim": 5}
    assert read_vectors.dtype == np.float32
    np.testing.assert_array_equal(read_vectors, vectors)
    write_embeddings(path, [], np.empty((0, 5), np.float32), model="m")
    assert read_embeddings(path)[1].shape == (0, 5)


def test_parquet_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "no_embedding.parquet"
    pq.write_table(pa.table({"id": ["a"], "vector": [[1.0, 2.0]]}), bad)
    with pytest.raises(ValueError, match="no_embedding.parquet.*columns"):
        read_embeddings(bad)
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        read_embeddings(tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match="ids but"):
        write_embeddings(tmp_path / "x.parquet", ["a"], np.zeros((2, 3), np.float32), model="m")
