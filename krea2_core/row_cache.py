"""Per-image results kept across runs: a selection change computes captions, OCR and embeddings only for images
never processed with the same settings.

A ``RowCache`` holds the rows of one kind of per-image work (``captions``, ``ocr``, ``embeddings``) computed under
one config slice (the settings that change the result, no more), keyed by an item key that digests what the result
depends on besides the config: the image's content (its md5, from scoring) and, where it matters, more (a world
image's scene-graph caption). Its directory is ``<output root>/rows/<kind>/<digest of version + slice>/``:
``config.json`` names the slice, and every run that computed rows adds one ``part-*.parquet`` (written to a temporary
name and renamed, so a part is whole or absent; concurrent runs never write the same file) whose rows carry the MLflow
run that computed them (``computed_in``). Rows that failed are not stored: a transient error is retried next time.

Why not a library: the reuse must follow the stage's own notion of "same work" (a config slice and a content key)
and live beside the content-addressed artifacts; a key-value store (LMDB, SQLite) would add a service-less but
single-writer file where Parquet parts give concurrent writers and columnar reads for free.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from krea2_core.artifacts import to_plain
from krea2_core.shards import save_parquet

KEY = "key"
COMPUTED_IN = "computed_in"
LINEAGE_FILE = "lineage.parquet"  # per artifact row: its item key and the run that computed it


def item_key(*parts: str) -> str:
    """The key of one item: a digest of what its result depends on besides the config slice."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


class RowCache:
    def __init__(self, root: Path, kind: str, config: Any, version: int = 1) -> None:
        """The cache of ``kind`` rows computed under ``config`` (a config slice) by code ``version`` (bump it when
        the code that computes these rows changes its results)."""
        self.slice = {"version": version, "config": to_plain(config)}
        digest = hashlib.sha256(json.dumps(self.slice, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.path = Path(root) / "rows" / kind / digest

    def _parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet")) if self.path.is_dir() else []

    def lookup(self, keys: Iterable[str]) -> pd.DataFrame:
        """The stored rows of ``keys`` (one per key: the earliest part's), with their ``computed_in``."""
        wanted = pa.array(sorted(set(keys)), pa.string())
        frames = []
        for part in self._parts() if len(wanted) else ():  # one at a time: a damaged part is skipped (its rows are computed again)
            try:
                table = ds.dataset(part, format="parquet").to_table(filter=ds.field(KEY).isin(wanted))
            except (OSError, pa.ArrowInvalid) as err:
                print(f"krea2: skipping damaged row cache part {part}: {err}", file=sys.stderr)
                continue
            frames.append(table.to_pandas())
        if not frames:
            return pd.DataFrame(columns=[KEY, COMPUTED_IN])
        return pd.concat(frames, ignore_index=True).drop_duplicates(KEY, ignore_index=True)

    def add(self, rows: pd.DataFrame, computed_in: str) -> int:
        """Store ``rows`` (with a ``key`` column) as computed in MLflow run ``computed_in``; returns how many."""
        if KEY not in rows.columns:
            raise ValueError(f"rows to cache need a {KEY!r} column, got {list(rows.columns)}")
        if rows.empty:
            return 0
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "config.json").is_file():
            _write_atomic(self.path / "config.json", json.dumps(self.slice, indent=2, sort_keys=True, default=str))
        # a unique name per part (it sorts by time): concurrent writers never share one
        save_parquet(rows.assign(**{COMPUTED_IN: computed_in}),
                     self.path / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet")
        return len(rows)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

