"""What every task shares: cache policy and artifact directories in and out of Flyte."""

from __future__ import annotations

from pathlib import Path

from flytekit import Cache, FlyteContextManager
from flytekit.types.directory import FlyteDirectory

# Bump when a task's code changes its outputs for the same inputs. The MLflow parent run id is not
# part of the cache key: a cached stage is reused across pipeline executions.
CACHE = Cache(version="1", ignored_inputs=("parent_run_id",))


def to_flyte_dir(path: Path) -> FlyteDirectory:
    """Artifact directory -> task output.

    Locally the artifact already lies in the persistent output root, so Flyte keeps that path (no copy
    into a temp sandbox that the local cache would later point at after it is gone); on a cluster it is
    uploaded to the raw-output prefix as usual.
    """
    file_access = FlyteContextManager.current_context().file_access
    if file_access.is_remote(file_access.raw_output_prefix):
        return FlyteDirectory(str(path))
    return FlyteDirectory(str(path), remote_directory=False)


def from_flyte_dir(directory: FlyteDirectory) -> Path:
    return Path(directory.download())
