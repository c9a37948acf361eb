"""Frozen autoencoders and text encoders on tiny random models built offline and loaded by path: shapes,
normalisation as diffusers' pipelines do it, exact round trips, fixed-length text features, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLFlux2, AutoencoderKLQwenImage
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

from krea2_core.config import AutoencoderConfig
from krea2_core.models.autoencoders import (Autoencoder, Flux2Autoencoder, PixelSpaceAutoencoder, QwenImageAutoencoder,
                                            load_autoencoder, pixel_multiple)


def _pixels(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((b, 3, h, w), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_pixel_space_round_trip_is_exact() -> None:
    ae = load_autoencoder(AutoencoderConfig(kind="pixel", downsample=4))
    assert isinstance(ae, PixelSpaceAutoencoder) and isinstance(ae, Autoencoder)
    x = _pixels(2, 16, 24)
    z = ae.encode(x)
    assert ae.channels == 48 and z.shape == (2, 48, 4, 6)
    assert torch.equal(ae.decode(z), x)
    assert torch.equal(z[0, :, 1, 2], x[0, :, 4:8, 8:12].reshape(3, 16).reshape(-1))  # one block per token
    with pytest.raises(ValueError, match="multiples of 4"):
        ae.encode(_pixels(1, 18, 24))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ae.encode(torch.zeros(1, 4, 16, 16))


def test_pixel_multiple_covers_downsample_patch_and_flux2_bn_patch() -> None:
    assert pixel_multiple(AutoencoderConfig(kind="pixel", downsample=4, patch_size=2)) == 8
    assert pixel_multiple(AutoencoderConfig(kind="qwen_image", model_id="x", patch_size=2)) == 16
    assert pixel_multiple(AutoencoderConfig(kind="qwen_image", model_id="x", patch_size=1)) == 8
    assert pixel_multiple(AutoencoderConfig(kind="flux2", model_id="x", patch_size=1)) == 16


@pytest.fixture(scope="module")
def qwen_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 2.0, 1.5, 1.0])
    path = tmp_path_factory.mktemp("qwen_vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def flux2_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
                             norm_num_groups=4)
    vae.bn.running_mean.copy_(torch.linspace(-1, 1, 16))  # non-trivial statistics, as a trained VAE has
    vae.bn.running_var.copy_(torch.linspace(0.5, 3, 16))
    path = tmp_path_factory.mktemp("flux2_vae")
    vae.save_pretrained(path)
    return path


def test_qwen_image_encodes_one_frame_normalised_by_its_config(qwen_vae: Path) -> None:
    ae = load_autoencoder(AutoencoderConfig(kind="qwen_image", model_id=str(qwen_vae), device="cpu"))
    assert isinstance(ae, QwenImageAutoencoder) and (ae.channels, ae.downsample) == (4, 8)
    assert not ae.vae.training and not any(p.requires_grad for p in ae.vae.parameters())
    x = _pixels(2, 32, 48)
    z = ae.encode(x)
    assert z.shape == (2, 4, 4, 6) and z.dtype == torch.float32
    raw = AutoencoderKLQwenImage.from_pretrained(qwen_vae).encode(x.unsqueeze(2)).latent_dist.mode().squeeze(2)
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1)
    std = torch.tensor([0.5, 2.0, 1.5, 1.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std)
    assert torch.equal(ae.encode(x), z)  # deterministic (posterior mode)
    decoded = ae.decode(z)
    assert decoded.shape == x.shape
    torch.testing.assert_close(decoded, ae.vae.decode((z * std + mean).unsqueeze(2)).sample.squeeze(2))
    with pytest.raises(ValueError, match="multiples of 8"):
        ae.encode(_pixels(1, 20, 32))


def test_flux2_normalises_like_the_flux2_pipeline_and_exposes_unpatchified_latents(flux2_vae: Path) -> None:
    ae = load_autoencoder(AutoencoderConfig(kind="flux2", model_id=str(flux2_vae), device="cpu"))
    assert isinstance(ae, Flux2Autoencoder) and (ae.channels, ae.downsample) == (4, 8)
    x = _pixels(2, 32, 48)
    z = ae.encode(x)
    assert z.shape == (2, 4, 4, 6)
    vae = AutoencoderKLFlux2.from_pretrained(flux2_vae)
    patched = Flux2Pipeline._patchify_latents(vae.encode(x).latent_dist.mode())  # what the pipeline does
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    expected = (patched - mean) / std
    torch.testing.assert_close(Flux2Pipeline._patchify_latents(z), expected)
    torch.testing.assert_close(ae.decode(z), vae.decode(Flux2Pipeline._unpatchify_latents(
        expected * std + mean)).sample)
    with pytest.raises(ValueError, match="multiples of 16"):
        ae.encode(_pixels(1, 24, 32))  # the latent grid must split into 2x2 patches
