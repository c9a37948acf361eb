"""What every task shares: cache policy and artifact directories in and out of Flyte."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from flytekit import Cache, FlyteContextManager, HashMethod
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from krea2_core.data.ingest import source_digest

# Bump when a task's code changes its outputs for the same inputs. A stage task's cache key is its settings and its
# input artifacts, as its artifact key is (krea2_core/stage_spec.py). Not in it: the MLflow parent run id and Ray's
# CPU parallelism, which change no output, and where a user's annotation set lies (its digest is in the settings).
CACHE = Cache(version="2", ignored_inputs=("parent_run_id", "parallel", "annotations"))


def _source_digest(value: Any) -> str | None:
    """A local source's cache key (``source_digest``: what it holds); a remote one keeps Flyte's default (its URI)."""
    path = str(getattr(value, "path", value))
    return None if "://" in path or not os.path.exists(path) else source_digest(Path(path))


# what a user hands in at a path whose contents can change between runs: Flyte's cache keys them by what they hold
SourceFolder = Annotated[FlyteDirectory, HashMethod(_source_digest)]
SourceTable = Annotated[FlyteFile, HashMethod(_source_digest)]


def to_flyte_dir(path: Path | None) -> FlyteDirectory | None:
    """Artifact directory -> task output (None: a torchrun rank other than 0, whose output Elastic ignores).

    Locally the artifact already lies in the persistent output root, so Flyte keeps that path (no copy
    into a temp sandbox that the local cache would later point at after it is gone); on a cluster it is
    uploaded to the raw-output prefix as usual.
    """
    if path is None:
        return None
    file_access = FlyteContextManager.current_context().file_access
    if file_access.is_remote(file_access.raw_output_prefix):
        return FlyteDirectory(str(path))
    return FlyteDirectory(str(path), remote_directory=False)


def from_flyte_dir(directory: FlyteDirectory) -> Path:
    return Path(directory.download())


def local(**directories: FlyteDirectory | None) -> dict[str, Path]:
    """The given input artifacts, downloaded, by name (None: an optional input not given)."""
    return {name: from_flyte_dir(d) for name, d in directories.items() if d is not None}
