"""A DiT with its frozen autoencoder and text encoder: encoding for training, Euler + CFG sampling for eval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from krea2_core.diffusion.sampling import euler_sample, guided
from krea2_core.models.autoencoders import Autoencoder
from krea2_core.models.dit import patchify, position_ids, unpatchify
from krea2_core.models.text_encoders import TextEncoder


@dataclass
class TextToImage:
    model: nn.Module  # Krea2DiT, possibly wrapped by FSDP/TP
    autoencoder: Autoencoder
    text_encoder: TextEncoder
    patch_size: int
    compute_dtype: torch.dtype = torch.float32  # bfloat16: the DiT runs under autocast (weights stay float32)
    drop_text_padding: bool = True  # see ``text_columns``; False keeps every batch at max_tokens (static shapes)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, captions: Sequence[str]
               ) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor, torch.Tensor]:
        """(image tokens (B, N, C), token grid (h, w), text hidden states, text mask) of one same-shape batch."""
        latents = self.autoencoder.encode(pixels.to(self.device))
        grid = (latents.shape[-2] // self.patch_size, latents.shape[-1] // self.patch_size)
        text, mask = self.text_columns(*self.text_encoder.encode(list(captions)))
        return patchify(latents, self.patch_size), grid, text.to(self.device), mask.to(self.device)

    def text_columns(self, text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``text`` (B, L, ...) and ``mask`` (B, L) without the columns that every row pads, if
        ``drop_text_padding``. Exact: a padded token is a masked key that no output reads, and text has no RoPE
        position (index 0) nor any other positional input in the DiT, so the image tokens' velocity is the same
        while the sequence is shorter: a batch costs what its longest caption does, not ``max_tokens``."""
        used = mask.any(dim=0)
        if not self.drop_text_padding or bool(used.all()):
            return text, mask
        return text[:, used], mask[:, used]

    def velocity(self, tokens: torch.Tensor, t: torch.Tensor, grid: tuple[int, int], text: torch.Tensor,
                 mask: torch.Tensor, *, return_block: int | None = None):  # noqa: ANN201 - tensor or pair
        text, mask = self.text_columns(text, mask)
        positions = position_ids(text.shape[1], grid[0], grid[1]).to(tokens.device)
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=self.compute_dtype == torch.bfloat16):
            return self.model(tokens, text, t, positions, mask, return_block=return_block)

    def token_grid(self, width: int, height: int) -> tuple[int, int]:
        """The (h, w) token grid of a ``width`` x ``height`` image; both must be multiples of one token's pixels."""
        down = self.autoencoder.downsample * self.patch_size
        if width % down or height % down:
            raise ValueError(f"width and height must be multiples of {down}, got {width}x{height}")
        return height // down, width // down

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> list[Image.Image]:
        """Image tokens (B, N, C) on a ``grid`` -> RGB images (pixels clamped to [-1, 1], then 8-bit)."""
        p = self.patch_size
        latents = unpatchify(tokens, p, grid[0] * p, grid[1] * p, self.autoencoder.channels)
        pixels = self.autoencoder.decode(latents).clamp(-1, 1)
        arrays = ((pixels.permute(0, 2, 3, 1).float().cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
        return [Image.fromarray(a, "RGB") for a in arrays]

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, width: int, height: int, steps: int, cfg_scale: float,
                 shift: float, seed: int, first_index: int = 0) -> list[Image.Image]:
        """One image per prompt; image i's noise depends only on (seed, first_index + i), so a prompt set is
        reproducible and the same in any batching."""
        grid = self.token_grid(width, height)
        channels = self.autoencoder.channels
        noise = torch.stack([
            torch.randn((channels, height // self.autoencoder.downsample, width // self.autoencoder.downsample),
                        generator=torch.Generator().manual_seed(seed * 100_003 + i))
            for i in range(first_index, first_index + len(prompts))]).to(self.device)
        cond = self.text_encoder.encode(list(prompts))
        uncond = self.text_encoder.encode([""] * len(prompts))

        def model_fn(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.velocity(x, t, grid, text.to(x.device), mask.to(x.device))

        velocity_fn = guided(model_fn, cond, uncond, cfg_scale)
        return self.decode(euler_sample(velocity_fn, patchify(noise, self.patch_size), steps=steps, shift=shift), grid)
