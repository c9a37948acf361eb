"""`krea2 verify`: check every artifact of an output root against its manifest, and clear away what damage and killed
runs left (damaged artifacts, staging directories of dead processes), so their stages compute them again; artifacts
counting ``retryable`` rows (sources that did not answer) are listed, and cleared too, so their stage tries again."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from krea2_core.artifacts import RETRYABLE, STAGING_SUFFIX, ArtifactError, parse_manifest, staging_owner, verify
from krea2_core.owners import is_gone

# flytekit's local task cache (flytekit.core.local_cache.CACHE_LOCATION): it maps a task's inputs to the artifact
# path it returned, so a removed artifact must leave it too, or `pyflyte run` would hand its old path downstream
FLYTE_LOCAL_CACHE = Path("~/.flyte/local-cache")


REMOVED_BY_REPAIR = ("damaged", "retryable", "stale staging")


@dataclass(frozen=True)
class Finding:
    path: Path
    verdict: str  # "sound", "retryable" (sound, with unreachable rows), "damaged", "stale staging" (its process is
    # gone) or "staging" (still being written)
    detail: str = ""


def verify_root(root: Path, *, full: bool = False) -> list[Finding]:
    """A finding for every artifact and staging directory under ``root``/artifacts: by default files are re-hashed
    for artifacts up to KREA2_VERIFY_MAX_BYTES and checked by size above it; ``full`` re-hashes every file."""
    kinds = root.resolve() / "artifacts"
    if not kinds.is_dir():
        return []
    findings = []
    for path in sorted(p for kind in kinds.iterdir() if kind.is_dir() for p in kind.iterdir()):
        if path.name.endswith(STAGING_SUFFIX):
            owner = staging_owner(path)
            stale = owner is not None and is_gone(owner)
            findings.append(Finding(path, "stale staging" if stale else "staging",
                                    f"written by {owner or 'an unknown process'}"))
            continue
        try:
            manifest = parse_manifest(path)
            verify(path, manifest, full=True if full else None)
            retryable = manifest.counts.get(RETRYABLE, 0)
            findings.append(Finding(path, "retryable", f"{retryable} row(s) unreachable") if retryable
                            else Finding(path, "sound"))
        except ArtifactError as err:
            findings.append(Finding(path, "damaged", getattr(err, "what", str(err))))
    return findings


def repair(findings: list[Finding]) -> list[Path]:
    """Remove the damaged and retryable artifacts and stale staging directories among ``findings`` (and the Flyte local
    cache's entries that point at them); returns what was removed."""
    removed = [f.path for f in findings if f.verdict in REMOVED_BY_REPAIR]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    forget_flyte_outputs(removed)
    return removed


def forget_flyte_outputs(paths: list[Path]) -> int:
    """Drop the Flyte local cache entries whose outputs name one of ``paths``; returns how many."""
    location = FLYTE_LOCAL_CACHE.expanduser()
    if not paths or not location.is_dir():
        return 0
    from diskcache import Cache

    needles = [str(path).encode() for path in paths]
    with Cache(str(location)) as cache:
        stale = [key for key in cache.iterkeys()
                 if isinstance(value := cache.get(key), bytes) and any(needle in value for needle in needles)]
        for key in stale:
            cache.delete(key)
    return len(stale)
