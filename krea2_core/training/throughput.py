"""Training FLOPs per image and the device peak, for MFU (model FLOPs utilisation)."""

from __future__ import annotations

import functools
import os
import time

import torch

from krea2_core.models.config import AutoencoderConfig, DiTConfig

# Dense bf16 tensor-core peaks (vendor datasheets, no sparsity).
_GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def sequence_length(model: DiTConfig, autoencoder: AutoencoderConfig, resolution: int, text_tokens: int) -> int:
    down = (autoencoder.downsample if autoencoder.kind == "pixel" else 8) * autoencoder.patch_size
    return text_tokens + model.time_tokens + (resolution // down) ** 2


def dit_parameters(model: DiTConfig) -> int:
    from krea2_core.models.dit import Krea2DiT  # meta device: counts without allocating

    with torch.device("meta"):
        return sum(p.numel() for p in Krea2DiT(model).parameters())


def train_flops_per_image(model: DiTConfig, autoencoder: AutoencoderConfig, resolution: int, text_tokens: int) -> float:
    """6 x parameters x tokens (forward + backward matmuls) + 12 x layers x width x tokens^2 (attention scores
    and values), the usual transformer estimate (PaLM appendix B) applied to the joint text+image sequence."""
    s = sequence_length(model, autoencoder, resolution, text_tokens)
    return 6.0 * dit_parameters(model) * s + 12.0 * model.num_layers * model.hidden_size * s * s


@functools.cache
def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """$KREA2_PEAK_FLOPS if set; the datasheet bf16 peak of known GPUs; on CPU a matmul peak measured in ``dtype``
    (bf16 runs about twice as fast as fp32 on CPUs with AVX-512 bf16) with this process's threads."""
    if "KREA2_PEAK_FLOPS" in os.environ:
        return float(os.environ["KREA2_PEAK_FLOPS"])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK_BF16.items():
            if key in name:
                return value
        raise RuntimeError(f"unknown GPU {name!r}: set KREA2_PEAK_FLOPS to its peak FLOP/s for MFU")
    a = torch.randn(1024, 1024, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best
