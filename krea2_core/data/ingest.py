"""Raw pool ingest: an image folder or a Parquet list of URIs -> the raw-pool table.

Every directory entry but a subdirectory becomes a row, images or not: a non-image, a FIFO or a broken link in
the pool is a curation verdict, not something to skip silently. Headers (size, format, EXIF) are probed in
parallel; a file whose header cannot be read keeps its row with ``probe_error`` set.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from krea2_core.curation.config import ParallelConfig
from krea2_core.data.images import READ_ERRORS, BadImage, NotAFile, Unreachable, open_uri, probe
from krea2_core.data.schemas import SchemaError
from krea2_core.ray_map import map_shards

RAW_POOL_FILE = "raw_pool.parquet"


def stable_id(source: str, key: str) -> str:
    # surrogateescape: a file name that is not UTF-8 hashes as its own bytes (UTF-8 names hash as before)
    return hashlib.sha1(f"{source}\0{key}".encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _local_uri(path: Path) -> str:
    """The path itself, or, where its name is not UTF-8 (a table cannot hold it), its percent-encoded file:// URI
    (the original bytes, which ``open_uri`` opens)."""
    text = str(path)
    try:
        text.encode()
    except UnicodeEncodeError:
        return path.as_uri()
    return text


def list_folder(root: str | Path, source: str | None = None) -> pd.DataFrame:
    """Every non-hidden entry under ``root`` (recursively) that is not a directory (files, and FIFOs, sockets or broken
    links, which get their verdict later), with ids stable across machines and runs."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    source = source or root.name
    files = sorted(p for p in root.rglob("*")
                   if not p.is_dir() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise ValueError(f"image folder {root} holds no files")
    return pd.DataFrame({
        "id": [stable_id(source, p.relative_to(root).as_posix()) for p in files],
        "uri": [_local_uri(p.absolute()) for p in files],  # not resolve(): a broken link keeps its own name
        "source": source,
        "bytes": None,
    })


def source_digest(source: Path) -> str:
    """What a folder or URI table holds, cheaply: a folder's files' relative paths, sizes and modification times (as
    rsync compares them: no image is read), a table's sha256. Ingesting a source at the same path again after an
    image was added, removed or rewritten is new work, not the artifact of its old contents."""
    digest = hashlib.sha256()
    if source.is_file():
        with source.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            stat = os.lstat(path)
            digest.update(f"{os.path.relpath(path, source)}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                          .encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def read_uri_table(path: str | Path, source: str | None = None) -> pd.DataFrame:
    """A Parquet table with a ``uri`` column (and optional ``id``, ``source``, ``bytes``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"URI table not found: {path}")
    table = pq.read_table(path).to_pandas()
    if table.empty:
        raise SchemaError(f"{path}: the URI table has no rows")
    if "uri" not in table.columns:
        raise SchemaError(f"{path}: a URI table needs a 'uri' column; it has {list(table.columns)}")
    blank = table.index[table["uri"].isna() | (table["uri"].astype(str).str.len() == 0)].tolist()
    if blank:
        raise SchemaError(f"{path}: rows {blank[:10]} have an empty uri")
    source = source or path.stem
    frame = pd.DataFrame({"uri": table["uri"].astype(str)})
    frame["source"] = table["source"].astype(str) if "source" in table.columns else source
    frame["id"] = (table["id"].astype(str) if "id" in table.columns
                   else [stable_id(s, u) for s, u in zip(frame["source"], frame["uri"], strict=True)])
    duplicated = frame["id"][frame["id"].duplicated()].unique().tolist()
    if duplicated:
        raise SchemaError(f"{path}: duplicate ids {duplicated[:10]}")
    frame["bytes"] = table["bytes"] if "bytes" in table.columns else None
    return frame[["id", "uri", "source", "bytes"]]


def _probe_one(uri: str, inline: bytes | None) -> dict[str, object]:
    row: dict[str, object] = {"n_bytes": None, "width": None, "height": None, "format": None, "exif": "{}",
                              "probe_error": None}
    try:
        fp = io.BytesIO(inline) if inline is not None else open_uri(uri)
        with fp:
            fp.seek(0, io.SEEK_END)
            row["n_bytes"] = fp.tell()
            fp.seek(0)
            header = probe(fp)
        row.update(width=header.width, height=header.height, format=header.format,
                   exif=json.dumps(header.exif, sort_keys=True))
    except BadImage as err:
        row["probe_error"] = str(err)
    except (NotAFile, Unreachable) as err:
        row["probe_error"] = f"{READ_ERRORS[type(err)]}: {err}"
    except OSError as err:
        row["probe_error"] = f"unreadable: {type(err).__name__}: {err}"
    return row


def _probe_shard(shard: list[tuple[str, bytes | None]]) -> list[dict[str, object]]:
    return [_probe_one(uri, inline) for uri, inline in shard]


def build_raw_pool(listing: pd.DataFrame, parallel: ParallelConfig) -> pd.DataFrame:
    """Probe every listed file's header; returns a frame that satisfies the RawPool schema."""
    work = list(zip(listing["uri"], listing["bytes"], strict=True))
    probed = pd.DataFrame(map_shards(_probe_shard, work, parallel, desc="probe headers"),
                          columns=["n_bytes", "width", "height", "format", "exif", "probe_error"])
    pool = pd.concat([listing[["id", "uri", "source"]].reset_index(drop=True), probed], axis=1)
    pool["bytes"] = listing["bytes"].to_numpy()
    return pool
