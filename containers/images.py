"""Container images the tasks name. ``pyflyte register`` builds them (flytekit ImageSpec) and pushes to
``$KREA2_IMAGE_REGISTRY``; ``containers/Dockerfile.data`` is the same image for a plain ``docker build``.
Local runs (``pyflyte run`` without ``--remote``) use the current environment and build nothing."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from flytekit import ImageSpec

_ROOT = Path(__file__).resolve().parents[1]
_DEPENDENCIES = tomllib.loads((_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]

# CPU image for curation: data tasks and their Ray workers. The apt packages are the real photos the
# tiny preset mixes into its world pool.
DATA_IMAGE = ImageSpec(
    name="krea2-data",
    registry=os.environ.get("KREA2_IMAGE_REGISTRY", "localhost:30000"),
    python_version="3.11",
    packages=_DEPENDENCIES,
    apt_packages=["mate-backgrounds", "lomiri-wallpapers-16.04"],
    env={"RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true"},
)

# GPU image for the training stages (Flyte Elastic / torchrun workers): the same Python dependencies with the
# CUDA build of the pinned torch (its wheels bring the CUDA runtime; nodes provide the driver).
# ``containers/Dockerfile.train`` is the same image for a plain ``docker build``.
TRAIN_IMAGE = ImageSpec(
    name="krea2-train",
    registry=os.environ.get("KREA2_IMAGE_REGISTRY", "localhost:30000"),
    python_version="3.11",
    packages=_DEPENDENCIES,
    pip_extra_index_url=["https://download.pytorch.org/whl/cu128"],
    env={"MLFLOW_DISABLE_TELEMETRY": "true", "NCCL_ASYNC_ERROR_HANDLING": "1"},
)
