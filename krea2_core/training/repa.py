"""iREPA (Singh et al. 2025, "What matters for representation alignment: global information or spatial
structure?"): REPA with a 3x3 convolutional projector instead of the MLP, and a spatial normalisation of the
frozen target encoder's patch tokens. The report uses it for the first epoch of the 256px stage only.

Target encoders: ``efficientnet_lite0`` (our offline EfficientNet-Lite0 with real ImageNet weights) or ``hf``
(a transformers DINOv3 / SigLIP-2 vision model by hub id or local directory). Each maps pixels in [-1, 1] to a
(B, D, h, w) patch feature map; ``repa_loss`` resizes it to the DiT's token grid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from krea2_core.common.device import resolve_device
from krea2_core.curation.efficientnet import INPUT_MEAN, INPUT_SIZE, INPUT_STD, load_efficientnet_lite0
from krea2_core.training.config import RepaConfig

# the paper uses gamma in [0.6, 0.8]: the spatial mean (the tokens' global component) is only partly removed
SPATIAL_NORM_GAMMA = 0.7
SPATIAL_NORM_EPS = 1e-6
# EfficientNet-Lite0 through stage 5 (blocks 0-10; 112 channels) has output stride 16, see ``EfficientNetPatchEncoder``
_EFFNET_BLOCKS = 11
_EFFNET_STRIDE = 16

_DINOV3_MODELS = ("DINOv3ViTModel",)
_SIGLIP2_MODELS = ("Siglip2VisionModel", "Siglip2Model")


class FrozenPatchEncoder(Protocol):
    dim: int
    device: torch.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [-1, 1] -> (B, dim, h, w) float32 patch features, without gradient."""
        ...


def _patch_grid(height: int, width: int, stride: int, min_patches: int) -> tuple[int, int]:
    """Patch grid for an image: its native grid at ``stride``, but at least ~``min_patches`` patches (the size
    the encoder was trained at: tiny images are upscaled), keeping the aspect ratio."""
    scale = max(1.0, math.sqrt(min_patches * stride**2 / (height * width)))
    return max(1, round(height * scale / stride)), max(1, round(width * scale / stride))


def _prepare(pixels: torch.Tensor, size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels resized to ``size`` and normalised with the encoder's own mean / std (of 0..1 pixels)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must have shape (B, 3, H, W), got {tuple(pixels.shape)}")
    x = pixels.to(mean.device, torch.float32)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    return ((x + 1) / 2 - mean) / std


def _channel_stats(values: list[float] | tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)


class EfficientNetPatchEncoder:
    """The stride-16 map of EfficientNet-Lite0 (end of stage 5, 112 channels); the stride-32 stages and the head
    are dropped. Why this stage: images are fed at their own size, or upscaled to ~224px (the training size) when
    smaller, so a 256px image gives a 16x16 map, exactly the 256px stage's token grid (8x VAE, 2x2 patches), and a
    tiny 32px image gives 14x14, area-downsampled to its 8x8 grid. The 1280-d stride-32 map would be 8x8 / 7x7 and
    need upsampling, which invents the spatial structure iREPA is about. Stage 5 is also 11 of 16 blocks deep,
    past the low-level edge detectors."""

    name = "efficientnet_lite0"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        net = load_efficientnet_lite0()
        self.net = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6(), *net._blocks[:_EFFNET_BLOCKS])
        self.net.to(self.device).requires_grad_(False).eval()
        self.dim: int = net._blocks[_EFFNET_BLOCKS - 1]._bn2.num_features
        self._mean = _channel_stats(INPUT_MEAN, self.device)
        self._std = _channel_stats(INPUT_STD, self.device)

    @torch.no_grad()  # not inference_mode: the targets enter the autograd graph of the loss as constants
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        gh, gw = _patch_grid(*pixels.shape[-2:], _EFFNET_STRIDE, (INPUT_SIZE // _EFFNET_STRIDE) ** 2)
        return self.net(_prepare(pixels, (gh * _EFFNET_STRIDE, gw * _EFFNET_STRIDE), self._mean, self._std)).float()


def _patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, gh*p, gw*p) -> (B, gh*gw, p*p*C), patches row-major and each patch (row, col, channel), the layout
    of SigLIP-2's NaFlex image processor."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class HFPatchEncoder:
    """Last-layer patch tokens of a transformers DINOv3 ViT (CLS and register tokens dropped) or SigLIP-2 NaFlex
    vision model (all tokens are patches), by hub id or local directory. The image is fed at the model's native
    patch count (``image_size`` / ``num_patches`` of its config) or its own size if larger, aspect kept."""

    def __init__(self, model_id: str, device: torch.device | str = "cpu") -> None:
        from transformers import AutoModel
        from transformers.image_processing_utils import ImageProcessingMixin

        local = Path(model_id).expanduser().is_dir()
        if model_id.startswith(("/", "./", "../", "~")) and not local:
            raise FileNotFoundError(f"iREPA encoder model directory not found: {model_id}")
        path = str(Path(model_id).expanduser()) if local else model_id
        self.name = model_id
        self.device = resolve_device(device) if isinstance(device, str) else device
        model = AutoModel.from_pretrained(path, local_files_only=local)
        self._kind = type(model).__name__
        if self._kind not in _DINOV3_MODELS + _SIGLIP2_MODELS:
            raise ValueError(f"{model_id}: unsupported iREPA encoder class {self._kind}; supported: "
                             f"{list(_DINOV3_MODELS + _SIGLIP2_MODELS)}")
        self.model = (model.vision_model if self._kind == "Siglip2Model" else model).to(self.device)
        self.model.requires_grad_(False).eval()
        config = self.model.config
        self.dim: int = config.hidden_size
        self.patch: int = config.patch_size
        if self._kind in _DINOV3_MODELS:
            self._skip = 1 + config.num_register_tokens
            self._min_patches = (config.image_size // self.patch) ** 2
        else:
            self._skip, self._min_patches = 0, config.num_patches
        # only the normalisation is read from the processor config: resizing happens on tensors here
        processor, _ = ImageProcessingMixin.get_image_processor_dict(path, local_files_only=local)
        if not {"image_mean", "image_std"} <= processor.keys():
            raise ValueError(f"{model_id}: image processor config lacks image_mean / image_std")
        self._mean = _channel_stats(processor["image_mean"], self.device)
        self._std = _channel_stats(processor["image_std"], self.device)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        gh, gw = _patch_grid(*pixels.shape[-2:], self.patch, self._min_patches)
        x = _prepare(pixels, (gh * self.patch, gw * self.patch), self._mean, self._std)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if self._kind in _DINOV3_MODELS:
                tokens = self.model(pixel_values=x).last_hidden_state[:, self._skip:]
            else:
                b = x.shape[0]
                shapes = torch.tensor([[gh, gw]], device=self.device).expand(b, 2)
                mask = torch.ones(b, gh * gw, dtype=torch.long, device=self.device)
                tokens = self.model(pixel_values=_patchify(x, self.patch), pixel_attention_mask=mask,
                                    spatial_shapes=shapes).last_hidden_state
        return tokens.float().transpose(1, 2).reshape(x.shape[0], self.dim, gh, gw)


def load_patch_encoder(config: RepaConfig, device: torch.device | str) -> FrozenPatchEncoder:
    if config.encoder == "efficientnet_lite0":
        return EfficientNetPatchEncoder(device)
    if config.encoder == "hf":
        return HFPatchEncoder(config.model_id, device)
    raise ValueError(f"unknown iREPA encoder {config.encoder!r}")


def spatial_normalize(feats: torch.Tensor, gamma: float = SPATIAL_NORM_GAMMA,
                      eps: float = SPATIAL_NORM_EPS) -> torch.Tensor:
    """iREPA's spatial normalisation of patch tokens: per image and channel, over the h*w positions,
    ``(x - gamma * mean) / sqrt(var + eps)``. Removing (most of) the spatial mean, the tokens' shared global
    component, raises the contrast between positions, which is what the alignment should transfer."""
    if feats.ndim != 4:
        raise ValueError(f"feats must have shape (B, D, h, w), got {tuple(feats.shape)}")
    if feats.shape[-2] * feats.shape[-1] < 2:
        raise ValueError(f"spatial normalisation needs at least 2 positions, got a {tuple(feats.shape[-2:])} map")
    var, mean = torch.var_mean(feats, dim=(2, 3), keepdim=True, correction=0)
    return (feats - gamma * mean) * torch.rsqrt(var + eps)


class IRepaProjector(nn.Module):
    """iREPA's projector: one 3x3 convolution (padding 1) on the DiT's image-token grid, which keeps the local
    spatial relations an MLP applied token by token would blur."""

    def __init__(self, hidden_size: int, target_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(hidden_size, target_dim, kernel_size=3, padding=1)

    def forward(self, grid_tokens: torch.Tensor) -> torch.Tensor:
        """(B, hidden_size, gh, gw) -> (B, target_dim, gh, gw)."""
        return self.conv(grid_tokens)


def repa_loss(tokens: torch.Tensor, grid: tuple[int, int], target: torch.Tensor, projector: IRepaProjector) -> torch.Tensor:
    """Negative mean cosine similarity, over images and grid positions, between the projected DiT tokens and the
    spatially normalised target. ``tokens``: (B, gh*gw, hidden) image tokens in row-major grid order; ``target``:
    (B, D, h, w) encoder features, resized to (gh, gw) first (antialiased bilinear: area-like when shrinking)."""
    gh, gw = grid
    if tokens.ndim != 3 or tokens.shape[1] != gh * gw:
        raise ValueError(f"tokens must have shape (B, gh*gw={gh * gw}, hidden) for grid {grid}, "
                         f"got {tuple(tokens.shape)}")
    if target.ndim != 4 or target.shape[0] != tokens.shape[0]:
        raise ValueError(f"target must have shape (B={tokens.shape[0]}, D, h, w), got {tuple(target.shape)}")
    projected = projector(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)).float()
    if projected.shape[1] != target.shape[1]:
        raise ValueError(f"projector outputs {projected.shape[1]} channels but the target has {target.shape[1]}")
    if tuple(target.shape[-2:]) != (gh, gw):
        target = F.interpolate(target.float(), size=(gh, gw), mode="bilinear", align_corners=False, antialias=True)
    return -F.cosine_similarity(projected, spatial_normalize(target.float()), dim=1).mean()


def repa_active(step: int, *, steps_per_epoch: int, epochs: float) -> bool:
    """Whether 0-based ``step`` of a stage lies in its first ``epochs`` epochs (iREPA is then switched off)."""
    if step < 0 or steps_per_epoch < 1 or epochs < 0:
        raise ValueError(f"need step >= 0, steps_per_epoch >= 1, epochs >= 0; got {step}, {steps_per_epoch}, {epochs}")
    return step < epochs * steps_per_epoch
