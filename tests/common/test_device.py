"""resolve_device: the torch device a configured device string names."""

from __future__ import annotations

import pytest
import torch

from krea2_core.common.device import resolve_device


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")
