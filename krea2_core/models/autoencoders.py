"""Frozen autoencoders between pixels in [-1, 1] and the latents the DiT is trained on.

Every autoencoder maps (B, 3, H, W) pixels to (B, channels, H/downsample, W/downsample) latents normalised
for diffusion (about zero mean, unit variance per channel) and back. ``pixel`` is plain space-to-depth (no
weights, for tiny CPU runs); ``qwen_image`` and ``flux2`` are diffusers VAEs loaded by hub id or local path.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from krea2_core.common.device import resolve_device
from krea2_core.models.config import AutoencoderConfig

_VAE_DOWNSAMPLE = 8  # both diffusers VAEs
_FLUX2_BN_PATCH = 2  # Flux2 normalises latents in 2x2 patches


@runtime_checkable
class Autoencoder(Protocol):
    channels: int
    downsample: int

    def encode(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, channels, H/downsample, W/downsample)."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> (B, 3, H, W) pixels in about [-1, 1]."""
        ...


def pixel_multiple(config: AutoencoderConfig) -> int:
    """What image sides must be a multiple of: one DiT token covers downsample x patch_size pixels, and
    Flux2's normalisation works on 2x2 latent patches."""
    if config.kind == "pixel":
        return config.downsample * config.patch_size
    side = _VAE_DOWNSAMPLE * config.patch_size
    return math.lcm(side, _VAE_DOWNSAMPLE * _FLUX2_BN_PATCH) if config.kind == "flux2" else side


def _check_pixels(pixels: Tensor, multiple: int) -> None:
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
    if pixels.shape[-2] % multiple or pixels.shape[-1] % multiple:
        raise ValueError(f"image height and width must be multiples of {multiple}, got {tuple(pixels.shape[-2:])}")


class PixelSpaceAutoencoder:
    """Space-to-depth: each ``downsample`` x ``downsample`` block of RGB becomes 3*d*d channels; exact inverse.
    Pixels in [-1, 1] already have the scale diffusion expects."""

    def __init__(self, downsample: int) -> None:
        if downsample < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        self.downsample = downsample
        self.channels = 3 * downsample * downsample

    def encode(self, pixels: Tensor) -> Tensor:
        _check_pixels(pixels, self.downsample)
        return F.pixel_unshuffle(pixels, self.downsample)

    def decode(self, latents: Tensor) -> Tensor:
        return F.pixel_shuffle(latents, self.downsample)


class DiffusersAutoencoder:
    """A frozen diffusers VAE in eval mode on one device. Latents are the posterior mode (deterministic), one
    encode/decode call per batch; outputs are float32 on the VAE's device. Subclasses add each VAE's layout
    and normalisation."""

    multiple = _VAE_DOWNSAMPLE

    def __init__(self, vae: torch.nn.Module, channels: int, device: torch.device | str) -> None:
        device = torch.device(device)
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.vae = vae.to(device, self.dtype).eval().requires_grad_(False)
        self.device = device
        self.channels = channels
        self.downsample = _VAE_DOWNSAMPLE

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        _check_pixels(pixels, self.multiple)
        return self._encode(pixels.to(self.device, self.dtype)).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self._decode(latents.to(self.device, torch.float32)).float()

    def _encode(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError


class QwenImageAutoencoder(DiffusersAutoencoder):
    """``AutoencoderKLQwenImage`` (16 channels, /8). It is a video VAE: images go in as one frame
    (B, C, 1, H, W); latents are normalised by its config's per-channel ``latents_mean``/``latents_std``."""

    def __init__(self, model_id: str, device: torch.device | str) -> None:
        from diffusers import AutoencoderKLQwenImage

        vae = AutoencoderKLQwenImage.from_pretrained(model_id)
        if vae.spatial_compression_ratio != _VAE_DOWNSAMPLE:
            raise ValueError(f"{model_id} downsamples by {vae.spatial_compression_ratio}, expected {_VAE_DOWNSAMPLE}")
        super().__init__(vae, vae.config.z_dim, device)
        shape = (1, self.channels, 1, 1)
        self.mean = torch.tensor(vae.config.latents_mean, device=self.device).view(shape)
        self.std = torch.tensor(vae.config.latents_std, device=self.device).view(shape)

    def _encode(self, pixels: Tensor) -> Tensor:
        latents = self.vae.encode(pixels.unsqueeze(2)).latent_dist.mode().squeeze(2).float()
        return (latents - self.mean) / self.std

    def _decode(self, latents: Tensor) -> Tensor:
        latents = (latents * self.std + self.mean).to(self.dtype)
        return self.vae.decode(latents.unsqueeze(2)).sample.squeeze(2)


class Flux2Autoencoder(DiffusersAutoencoder):
    """``AutoencoderKLFlux2``: 32 latent channels at /8, exposed unpatchified (32 channels, so the DiT folds
    2x2 patches into 128-channel tokens, as the Flux2 transformer sees them). Normalised as diffusers' Flux2
    pipeline does: with the VAE's batch-norm running statistics over 2x2-patchified latents (128 channels),
    here applied in patch space and folded back, so height and width must be multiples of 16."""

    multiple = _VAE_DOWNSAMPLE * _FLUX2_BN_PATCH

    def __init__(self, model_id: str, device: torch.device | str) -> None:
        from diffusers import AutoencoderKLFlux2

        vae = AutoencoderKLFlux2.from_pretrained(model_id)
        depth = 2 ** (len(vae.config.block_out_channels) - 1)
        if depth != _VAE_DOWNSAMPLE or tuple(vae.config.patch_size) != (_FLUX2_BN_PATCH,) * 2:
            raise ValueError(f"{model_id} downsamples by {depth} with bn patch {vae.config.patch_size}; "
                             f"expected {_VAE_DOWNSAMPLE} and {_FLUX2_BN_PATCH}")
        shape = (1, -1, 1, 1)  # statistics read in float32, before the VAE may move to bf16
        mean = vae.bn.running_mean.float().view(shape)
        std = torch.sqrt(vae.bn.running_var.float() + vae.config.batch_norm_eps).view(shape)
        super().__init__(vae, vae.config.latent_channels, device)
        self.mean, self.std = mean.to(self.device), std.to(self.device)

    def _encode(self, pixels: Tensor) -> Tensor:
        latents = F.pixel_unshuffle(self.vae.encode(pixels).latent_dist.mode().float(), _FLUX2_BN_PATCH)
        return F.pixel_shuffle((latents - self.mean) / self.std, _FLUX2_BN_PATCH)

    def _decode(self, latents: Tensor) -> Tensor:
        latents = F.pixel_unshuffle(latents, _FLUX2_BN_PATCH) * self.std + self.mean
        return self.vae.decode(F.pixel_shuffle(latents, _FLUX2_BN_PATCH).to(self.dtype)).sample


def load_autoencoder(config: AutoencoderConfig, device: torch.device | str | None = None) -> Autoencoder:
    """The autoencoder ``config`` names, on ``device`` (default: ``config.device``; ``auto`` picks CUDA)."""
    if config.kind == "pixel":
        return PixelSpaceAutoencoder(config.downsample)
    device = torch.device(device) if device is not None else resolve_device(config.device)
    cls = {"qwen_image": QwenImageAutoencoder, "flux2": Flux2Autoencoder}[config.kind]
    return cls(config.model_id, device)
