"""iREPA: spatial normalisation, conv projector, alignment loss, schedule, and the frozen target encoders (real
EfficientNet-Lite0 weights; tiny random DINOv3 / SigLIP-2 models saved offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from krea2_core.training.config import RepaConfig
from krea2_core.training.repa import (
    EfficientNetPatchEncoder,
    HFPatchEncoder,
    IRepaProjector,
    load_patch_encoder,
    repa_active,
    repa_loss,
    spatial_normalize,
)

_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


@pytest.fixture(scope="module")
def effnet() -> EfficientNetPatchEncoder:
    encoder = load_patch_encoder(RepaConfig(encoder="efficientnet_lite0"), "cpu")
    assert isinstance(encoder, EfficientNetPatchEncoder)
    return encoder


def _pixels(name: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] from a scikit-image photo, optionally resized (PIL, bicubic) to (H, W)."""
    image = Image.fromarray(getattr(skimage.data, name)())
    if size is not None:
        image = image.resize(size[::-1], Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1


def _identity_projector(dim: int) -> IRepaProjector:
    """A projector that passes the grid through unchanged (3x3 kernel with only its centre tap, identity)."""
    projector = IRepaProjector(dim, dim)
    with torch.no_grad():
        projector.conv.weight.zero_()
        projector.conv.weight[:, :, 1, 1] = torch.eye(dim)
        projector.conv.bias.zero_()
    return projector


def _as_tokens(grid_map: torch.Tensor) -> torch.Tensor:
    """(B, C, gh, gw) -> (B, gh*gw, C) row-major, the DiT's image-token layout."""
    return grid_map.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------- spatial normalisation


def test_spatial_normalize_matches_the_definition() -> None:
    feats = torch.randn(2, 5, 3, 4) * 3 + torch.arange(5.0).view(1, 5, 1, 1)
    full = spatial_normalize(feats, gamma=1.0)
    torch.testing.assert_close(full.mean(dim=(2, 3)), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(full.var(dim=(2, 3), correction=0), torch.ones(2, 5), atol=1e-4, rtol=0)
    mean = feats.mean(dim=(2, 3), keepdim=True)
    std = feats.std(dim=(2, 3), keepdim=True, correction=0)
    torch.testing.assert_close(spatial_normalize(feats), (feats - 0.7 * mean) / std, atol=1e-5, rtol=1e-5)
    # per image: another image in the batch changes nothing
    torch.testing.assert_close(spatial_normalize(feats[:1]), spatial_normalize(feats)[:1])


def test_spatial_normalize_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="at least 2 positions"):
        spatial_normalize(torch.randn(2, 4, 1, 1))
    with pytest.raises(ValueError, match=r"\(B, D, h, w\)"):
        spatial_normalize(torch.randn(2, 4, 9))


# --------------------------------------------------------------------------- loss


def test_loss_is_minus_one_when_the_projection_equals_the_normalised_target() -> None:
    target = torch.randn(2, 8, 3, 5)
    projector = _identity_projector(8)
    aligned = _as_tokens(spatial_normalize(target))
    assert repa_loss(aligned, (3, 5), target, projector).item() == pytest.approx(-1.0, abs=1e-6)
    assert repa_loss(-aligned, (3, 5), target, projector).item() == pytest.approx(1.0, abs=1e-6)
    # scaled per position: still aligned (cosine ignores the norm)
    scaled = aligned * torch.rand(2, 15, 1).add(0.5)
    assert repa_loss(scaled, (3, 5), target, projector).item() == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize(("grid", "target_hw"), [((3, 5), (7, 9)), ((6, 4), (3, 2)), ((4, 7), (4, 7)), ((2, 9), (8, 3))])
def test_loss_on_non_square_grids_and_resized_targets(grid: tuple[int, int], target_hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    tokens = torch.randn(3, grid[0] * grid[1], 12)
    target = torch.randn(3, 6, *target_hw)
    loss = repa_loss(tokens, grid, target, IRepaProjector(12, 6))
    assert loss.shape == () and -1.0 <= loss.item() <= 1.0
    # the target is resized to the grid before normalising: aligning with exactly that gives -1
    resized = F.interpolate(target, size=grid, mode="bilinear", align_corners=False, antialias=True)
    aligned = _as_tokens(spatial_normalize(resized))
    assert repa_loss(aligned, grid, target, _identity_projector(6)).item() == pytest.approx(-1.0, abs=1e-5)


def test_loss_rejects_mismatched_inputs() -> None:
    projector = IRepaProjector(12, 6)
    with pytest.raises(ValueError, match=r"gh\*gw=15"):
        repa_loss(torch.randn(2, 16, 12), (3, 5), torch.randn(2, 6, 3, 5), projector)
    with pytest.raises(ValueError, match="B=2"):
        repa_loss(torch.randn(2, 15, 12), (3, 5), torch.randn(3, 6, 3, 5), projector)
    with pytest.raises(ValueError, match="6 channels but the target has 5"):
        repa_loss(torch.randn(2, 15, 12), (3, 5), torch.randn(2, 5, 3, 5), projector)


def test_gradients_reach_tokens_and_projector_but_not_the_encoder(effnet: EfficientNetPatchEncoder) -> None:
    pixels = _pixels("astronaut", (32, 48)).repeat(2, 1, 1, 1).requires_grad_(True)
    target = effnet.encode(pixels)
    assert not target.requires_grad  # frozen: no graph into the encoder or the pixels
    tokens = torch.randn(2, 4 * 6, 16, requires_grad=True)
    projector = IRepaProjector(16, effnet.dim)
    repa_loss(tokens, (4, 6), target, projector).backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert pixels.grad is None
    assert all(not p.requires_grad and p.grad is None for p in effnet.net.parameters())


def test_a_few_steps_align_a_toy_model_with_real_features(effnet: EfficientNetPatchEncoder) -> None:
    torch.manual_seed(0)
    pixels = torch.cat([_pixels(name, (32, 32)) for name in ("chelsea", "coffee", "rocket")])
    target = effnet.encode(pixels)
    grid = (8, 8)
    # a stand-in for the DiT's early block: a linear map of the 4x4-patchified pixels, the tokens' only source
    patches = _as_tokens(F.pixel_unshuffle(pixels, 4))
    block = torch.nn.Linear(48, 32)
    projector = IRepaProjector(32, effnet.dim)
    optimizer = torch.optim.Adam([*block.parameters(), *projector.parameters()], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = repa_loss(block(patches), grid, target, projector)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_repa_active_for_the_first_epochs_only() -> None:
    assert [repa_active(s, steps_per_epoch=10, epochs=1.0) for s in (0, 9, 10, 500)] == [True, True, False, False]
    assert [repa_active(s, steps_per_epoch=10, epochs=0.5) for s in (4, 5)] == [True, False]
    assert not repa_active(0, steps_per_epoch=10, epochs=0.0)
    for bad in (dict(step=-1, steps_per_epoch=10, epochs=1.0), dict(step=0, steps_per_epoch=0, epochs=1.0),
                dict(step=0, steps_per_epoch=10, epochs=-1.0)):
        with pytest.raises(ValueError, match="steps_per_epoch >= 1"):
            repa_active(bad.pop("step"), **bad)


# --------------------------------------------------------------------------- encoders


def test_efficientnet_encoder_gives_a_spatial_feature_map(effnet: EfficientNetPatchEncoder) -> None:
    photo = _pixels("chelsea")  # 300 x 451: its own resolution, stride 16
    feats = effnet.encode(photo)
    assert feats.shape == (1, 112, 19, 28) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    tiny = _pixels("chelsea", (32, 48))  # upscaled to ~224^2 (196 positions), aspect kept
    assert effnet.encode(tiny).shape == (1, 112, 11, 17)
    # a feature map, not a pooled vector: mirroring the image mirrors the map
    small = _pixels("chelsea", (64, 64))
    both = effnet.encode(torch.cat([small, small.flip(-1)]))
    plain, mirrored = both[:1], both[1:].flip(-1)
    assert F.cosine_similarity(mirrored, plain, dim=1).mean() > 0.8
    assert F.cosine_similarity(mirrored, plain.flip(-2), dim=1).mean() < 0.8  # not just any similar map
    # batch invariant and on the requested device
    torch.testing.assert_close(plain, effnet.encode(small), atol=1e-4, rtol=1e-4)
    assert both.device == effnet.device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        effnet.encode(small[:, :2])


def _save_dinov3(root: Path) -> None:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    DINOv3ViTModel(DINOv3ViTConfig(**_TINY_VISION, patch_size=8, image_size=32, num_register_tokens=2)).save_pretrained(root)
    # the hub's processor class needs torchvision; the encoder only reads mean / std from its config
    (root / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "DINOv3ViTImageProcessorFast", "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "size": {"height": 32, "width": 32}}))


def _save_siglip2(root: Path) -> None:
    from transformers import Siglip2ImageProcessorPil, Siglip2VisionConfig, Siglip2VisionModel

    Siglip2VisionModel(Siglip2VisionConfig(**_TINY_VISION, patch_size=8, num_patches=16)).save_pretrained(root)
    Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16).save_pretrained(root)


def test_dinov3_encoder_keeps_only_patch_tokens(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _save_dinov3(tmp_path)
    encoder = load_patch_encoder(RepaConfig(encoder="hf", model_id=str(tmp_path)), "cpu")
    assert isinstance(encoder, HFPatchEncoder) and encoder.dim == 32
    pixels = torch.rand(2, 3, 32, 48) * 2 - 1  # native 4x6 grid of 8px patches (>= the model's 16)
    feats = encoder.encode(pixels)
    assert feats.shape == (2, 32, 4, 6) and not feats.requires_grad
    # the model's own output for the normalised image: CLS + 2 registers + 24 patches, patches row-major
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = encoder.model(pixel_values=((pixels + 1) / 2 - mean) / std).last_hidden_state
    assert hidden.shape[1] == 1 + 2 + 24
    torch.testing.assert_close(feats, hidden[:, 3:].transpose(1, 2).reshape(2, 32, 4, 6), atol=1e-5, rtol=1e-5)
    assert encoder.encode(torch.rand(1, 3, 16, 16) * 2 - 1).shape == (1, 32, 4, 4)  # tiny: upscaled to 16 patches


def test_siglip2_encoder_matches_its_image_processor(tmp_path: Path) -> None:
    from transformers import Siglip2ImageProcessorPil

    torch.manual_seed(0)
    _save_siglip2(tmp_path)
    encoder = HFPatchEncoder(str(tmp_path))
    image = Image.fromarray(skimage.data.astronaut()).resize((32, 32))  # 4x4 patches: no resize
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    feats = encoder.encode(pixels)
    assert feats.shape == (1, 32, 4, 4)
    inputs = Siglip2ImageProcessorPil.from_pretrained(tmp_path)(images=[image], return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.model(**inputs).last_hidden_state
    torch.testing.assert_close(feats, hidden.transpose(1, 2).reshape(1, 32, 4, 4), atol=1e-4, rtol=1e-4)
    assert encoder.encode(torch.rand(2, 3, 24, 40) * 2 - 1).shape == (2, 32, 3, 5)


def test_hf_encoder_rejects_unsupported_models_and_missing_dirs(tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(**_TINY_VISION, patch_size=8, image_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported iREPA encoder class ViTModel"):
        HFPatchEncoder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not-there"):
        load_patch_encoder(RepaConfig(encoder="hf", model_id=str(tmp_path / "not-there")), "cpu")
