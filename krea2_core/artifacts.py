"""Artifact directories: the contract between stages.

Every artifact is a directory with a ``manifest.json`` holding its kind, schema version, row counts, a
content digest of its files, the config that made it, the digests of its inputs and the MLflow run that
produced it. Artifacts are written to a temporary sibling and renamed into place, so a crash never
leaves a directory with a manifest but half its files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact directory that is missing, incomplete or of the wrong kind."""


@dataclass(frozen=True)
class Manifest:
    kind: str
    schema_version: int
    digest: str  # sha256 over the relative paths and bytes of every file but the manifest
    counts: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> input artifact digest
    mlflow_run_id: str = ""
    upstream_runs: dict[str, str] = field(default_factory=dict)  # input name -> producing MLflow run id

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=str)


def to_plain(value: Any) -> Any:
    """Dataclasses (also inside dicts/lists) -> JSON-safe dicts, for manifests, params and keys."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def digest_dir(path: Path) -> str:
    """sha256 over the sorted relative paths and contents of every file under ``path`` but the manifest."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        h.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_manifest(path: str | os.PathLike[str], kind: str | None = None) -> Manifest:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not an artifact: {MANIFEST} is missing")
    manifest = Manifest(**json.loads(manifest_path.read_text()))
    if kind is not None and manifest.kind != kind:
        raise ArtifactError(f"{path} holds a {manifest.kind!r} artifact, expected {kind!r}")
    return manifest


@contextmanager
def staged_dir(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging directory next to ``out_dir``, removed again if the body raises.

    Usage::

        with staged_dir(out) as staging:
            ...write files into staging...
            manifest = publish(staging, out, kind="raw_pool", ...)
    """
    out = Path(out_dir)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish(staging: Path, out_dir: str | os.PathLike[str], *, kind: str, schema_version: int = 1,
            counts: dict[str, int] | None = None, config: Any = None, inputs: dict[str, Manifest] | None = None,
            mlflow_run_id: str = "") -> Manifest:
    """Write the manifest into ``staging`` and atomically move it to ``out_dir`` (replacing any old copy)."""
    inputs = inputs or {}
    manifest = Manifest(
        kind=kind,
        schema_version=schema_version,
        digest=digest_dir(staging),
        counts=dict(counts or {}),
        config=to_plain(config) or {},
        inputs={name: m.digest for name, m in inputs.items()},
        mlflow_run_id=mlflow_run_id,
        upstream_runs={name: m.mlflow_run_id for name, m in inputs.items() if m.mlflow_run_id},
    )
    (staging / MANIFEST).write_text(manifest.to_json())
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return manifest


def artifact_key(config: Any, inputs: dict[str, Manifest]) -> str:
    """Directory name for an output: a digest of the config and the input digests (content-addressed)."""
    payload = json.dumps(
        {"config": to_plain(config),
         "inputs": {k: m.digest for k, m in sorted(inputs.items())}},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
