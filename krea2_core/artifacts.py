"""Artifact directories: the contract between stages.

Every artifact is a directory with a ``manifest.json`` holding its kind, schema version, row counts, a
content digest of its files and each file's size and sha256, the config that made it, the digests of its inputs
and the MLflow run that produced it. Artifacts are written to a temporary sibling and renamed into place, so a
crash never leaves a directory with a manifest but half its files.

Reading an artifact verifies it against its manifest: every recorded file present, nothing added, every size
equal and, for artifacts up to ``KREA2_VERIFY_MAX_BYTES`` (default 2 GiB: sha256 runs at 1.3 GiB/s here,
benchmarks/artifact_verification.py), every file re-hashed; larger artifacts are re-hashed by ``krea2 verify --full``.
A damaged artifact is an error that names it and the file, never data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

from krea2_core.owners import is_gone, this_process

MANIFEST = "manifest.json"
RETRYABLE = "retryable"  # a manifest count of rows worth computing again later (their source did not answer)
STAGING_SUFFIX = ".tmp"
_VERIFY_MAX_BYTES = "KREA2_VERIFY_MAX_BYTES"


class ArtifactError(ValueError):
    """An artifact directory that is missing, incomplete or of the wrong kind."""


class DamagedArtifact(ArtifactError):
    """An artifact whose files or manifest no longer match what was published; ``what`` says how."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what


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
    files: dict[str, tuple[int, str]] = field(default_factory=dict)  # relative path -> (bytes, sha256)

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


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p != path / MANIFEST)


def index_dir(path: Path) -> tuple[str, dict[str, tuple[int, str]]]:
    """(digest, files) of a directory in one read: the digest is sha256 over the sorted relative paths and contents
    of every file but the manifest; ``files`` maps each relative path to its size and own sha256."""
    digest = hashlib.sha256()
    files = {}
    for file in _files(path):
        name = file.relative_to(path).as_posix()
        digest.update(name.encode() + b"\0")
        own = hashlib.sha256()
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                own.update(block)
        files[name] = (file.stat().st_size, own.hexdigest())
    return digest.hexdigest(), files


def parse_manifest(path: Path) -> Manifest:
    """The manifest of the artifact at ``path``, unverified (``read_manifest`` verifies)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not an artifact: {MANIFEST} is missing")
    try:
        data = json.loads(manifest_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _damaged_manifest(manifest_path, f"not JSON ({err})") from None
    if not isinstance(data, dict):
        raise _damaged_manifest(manifest_path, f"a JSON {type(data).__name__}, not an object")
    known = {f.name for f in dataclasses.fields(Manifest)}
    required = {f.name for f in dataclasses.fields(Manifest)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if unknown := sorted(set(data) - known):
        raise _damaged_manifest(manifest_path, f"unknown field(s) {unknown}")
    if missing := sorted(required - set(data)):
        raise _damaged_manifest(manifest_path, f"field(s) {missing} missing")
    data["files"] = {name: (int(size), sha) for name, (size, sha) in data.get("files", {}).items()}
    return Manifest(**data)


def _damaged_manifest(manifest_path: Path, what: str) -> DamagedArtifact:
    return DamagedArtifact(f"{manifest_path} is damaged: {what}", f"{MANIFEST}: {what}")


_verified: dict[str, tuple[Any, ...]] = {}  # artifact -> the file stats of its last re-hash (re-hash once per change)


def verify(path: str | os.PathLike[str], manifest: Manifest, *, full: bool | None = None) -> None:
    """Raise DamagedArtifact when ``path``'s files differ from ``manifest``: a file missing or added, a size changed,
    or (when ``full``; by default when the artifact is at most KREA2_VERIFY_MAX_BYTES) a file's sha256 changed."""
    path = Path(path)
    files = _files(path)
    stats = tuple((f.relative_to(path).as_posix(), *_stat(f)) for f in files)
    if full is None and _verified.get(str(path.resolve())) == stats:
        return

    def damaged(what: str) -> DamagedArtifact:
        return DamagedArtifact(f"artifact {path} ({manifest.kind}) is damaged: {what}; re-run the stage that made it"
                               + (f" (MLflow run {manifest.mlflow_run_id})" if manifest.mlflow_run_id else ""), what)

    rehash = full or (full is None and sum(stat[1] for stat in stats) <= _max_bytes())
    if not manifest.files:  # written before per-file records: only the whole digest can tell
        if rehash and index_dir(path)[0] != manifest.digest:
            raise damaged("its files no longer match its digest")
    else:
        present = {name: size for name, size, *_ in stats}
        if missing := sorted(set(manifest.files) - set(present)):
            raise damaged(f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if added := sorted(set(present) - set(manifest.files)):
            raise damaged(f"{added[0]} is not in its manifest")
        for name, (size, _) in manifest.files.items():
            if present[name] != size:
                raise damaged(f"{name} is {present[name]} bytes, published as {size}")
        if rehash:
            for name, (_, sha) in manifest.files.items():
                if file_sha256(path / name) != sha:
                    raise damaged(f"{name} changed since it was published (sha256 differs)")
    if rehash:
        _verified[str(path.resolve())] = stats


def _stat(file: Path) -> tuple[int, int, int]:
    st = file.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def file_sha256(file: Path) -> str:
    with file.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _max_bytes() -> int:
    value = os.environ.get(_VERIFY_MAX_BYTES, str(2 << 30))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{_VERIFY_MAX_BYTES} must be a number of bytes, got {value!r}") from None


def read_manifest(path: str | os.PathLike[str], kind: str | None = None) -> Manifest:
    """The manifest of a verified artifact (see ``verify``), of ``kind`` when given."""
    manifest = parse_manifest(Path(path))
    if kind is not None and manifest.kind != kind:
        raise ArtifactError(f"{path} holds a {manifest.kind!r} artifact, expected {kind!r}")
    verify(path, manifest)
    return manifest


def existing_artifact(out: Path) -> Manifest | None:
    """The manifest of a sound artifact at ``out``; None when there is none. A damaged one is removed (so its stage
    computes it again) with a warning naming why."""
    if not out.exists():
        return None
    try:
        return read_manifest(out)
    except ArtifactError as err:
        print(f"krea2: recomputing {out}: {err}", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
        return None


_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<owner>[A-Za-z0-9_-]+-\d+)\.[0-9a-f]{8}" + re.escape(STAGING_SUFFIX) + "$")


def staging_owner(path: Path) -> str | None:
    """The process (``host-pid``) that stages into ``path``; None when ``path`` is no staging directory."""
    match = _STAGING.match(path.name)
    return match["owner"] if match else None


def sweep_staging(parent: Path) -> None:
    """Remove the staging directories under ``parent`` whose process is gone (killed before it could clean up)."""
    for path in parent.glob(f".*{STAGING_SUFFIX}") if parent.is_dir() else ():
        if (owner := staging_owner(path)) is not None and is_gone(owner):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staged_dir(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging directory next to ``out_dir``, removed again if the body raises; staging directories
    that killed processes left beside it are swept first.

    Usage::

        with staged_dir(out) as staging:
            ...write files into staging...
            manifest = publish(staging, out, kind="raw_pool", ...)
    """
    out = Path(out_dir)
    sweep_staging(out.parent)
    staging = out.parent / f".{out.name}.{this_process()}.{uuid.uuid4().hex[:8]}{STAGING_SUFFIX}"
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish(staging: Path, out_dir: str | os.PathLike[str], *, kind: str, schema_version: int = 1,
            counts: dict[str, int] | None = None, config: Any = None, inputs: dict[str, Manifest] | None = None,
            mlflow_run_id: str = "") -> Manifest:
    """Write the manifest into ``staging`` and atomically move it to ``out_dir``. A sound artifact already there (a
    concurrent run of the same work) is kept and returned: a content key is never overwritten; a damaged one is
    replaced."""
    inputs = inputs or {}
    digest, files = index_dir(staging)
    manifest = Manifest(
        kind=kind,
        schema_version=schema_version,
        digest=digest,
        counts=dict(counts or {}),
        config=to_plain(config) or {},
        inputs={name: m.digest for name, m in inputs.items()},
        mlflow_run_id=mlflow_run_id,
        upstream_runs={name: m.mlflow_run_id for name, m in inputs.items() if m.mlflow_run_id},
        files=files,
    )
    (staging / MANIFEST).write_text(manifest.to_json())
    out = Path(out_dir)
    for _ in range(2):
        if (existing := existing_artifact(out)) is not None:
            shutil.rmtree(staging)
            return existing
        try:
            staging.rename(out)
            return manifest
        except OSError:  # another process published (or is removing) it in between: look again
            continue
    raise ArtifactError(f"could not publish {out}: another process keeps replacing it")


def artifact_key(config: Any, inputs: dict[str, Manifest]) -> str:
    """Directory name for an output: a digest of the config and the input digests (content-addressed)."""
    payload = json.dumps(
        {"config": to_plain(config),
         "inputs": {k: m.digest for k, m in sorted(inputs.items())}},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
