"""Packing one resolution stage for training: every kept, captioned image is cropped to its aspect bucket
ahead of time, and the rows are laid out in global batches in the exact order training reads them.

Layout of a ``packed`` artifact:
- ``shards/shard-00000.parquet`` ...: one row group per global batch (all rows of one bucket), a few batches
  per shard; columns as in ``schemas.Packed``, ``pixels`` are lossless PNG bytes of the cropped image.
- ``index.json``: batch and sample counts, the buckets with their batch counts, each shard's batch range.
- ``dropped.parquet``: every kept row that was not packed, with the reason (no caption, unreadable image,
  remainder of a bucket that does not fill a global batch).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from krea2_core.artifacts import read_manifest
from krea2_core.captioning.stages import CAPTIONS_FILE
from krea2_core.curation.config import ParallelConfig
from krea2_core.data.buckets import assign_bucket, bucket_sizes, resize_crop
from krea2_core.data.config import PackingConfig
from krea2_core.data.images import BadImage, load_image
from krea2_core.data.schemas import Captions, Packed, read_table, validate
from krea2_core.data.stages import read_kept
from krea2_core.models.autoencoders import pixel_multiple
from krea2_core.ray_map import map_shards
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import StageRun
from krea2_core.training.config import PretrainConfig
from krea2_core.world.captions import captions as scene_captions
from krea2_core.world.config import WorldScenesConfig
from krea2_core.world.render import render
from krea2_core.world.scene import Scene, sample_scene

SHARDS_DIR = "shards"
INDEX_FILE = "index.json"
DROPPED_FILE = "dropped.parquet"
_DECODED_FILE = ".decoded.arrow"  # scratch inside the staging dir, removed before publishing
_CHUNK = 4096  # images per map_shards call: the driver holds one chunk's PNGs at a time
_PNG_LEVEL = 1  # zlib level: packing runs once, so speed wins over a few percent of size
_SERIAL = ParallelConfig(backend="serial")

Row = tuple[str, str, int, int, str]  # id, uri, width, height (oriented, from scoring), world scene JSON or ""
Prepared = tuple[int, bytes, str, str]  # bucket number (-1: failed), PNG bytes, reason, detail
WORLD_SCENE_PREFIX = "world-scene-"  # ids of the procedural scenes a stage adds (WorldScenesConfig)


def _decode_side(width: int, height: int, bucket: tuple[int, int]) -> int:
    """Long side to decode at: twice what covering the bucket needs (JPEGs then decode at reduced scale
    and the final Lanczos still has margin to anti-alias), never more than the original."""
    cover = max(bucket[0] / width, bucket[1] / height)
    return min(max(width, height), math.ceil(2 * cover * max(width, height)))


def _prepare(rows: Sequence[Row], buckets: list[tuple[int, int]]) -> list[Prepared]:
    prepared = []
    for _, uri, width, height, scene in rows:
        bucket = assign_bucket(width, height, buckets)
        if scene:  # drawn at the bucket's own size: no crop, the captions stay exact
            image = render(dataclasses.replace(Scene.from_dict(json.loads(scene)), width=bucket[0], height=bucket[1]))
            prepared.append((buckets.index(bucket), _png(image), "", ""))
            continue
        try:
            image = resize_crop(load_image(uri, side=_decode_side(width, height, bucket)), bucket)
        except BadImage as err:
            prepared.append((-1, b"", err.reason, err.detail))
            continue
        except OSError as err:  # missing file, unreachable URI
            prepared.append((-1, b"", "unreadable", f"{type(err).__name__}: {err}"))
            continue
        prepared.append((buckets.index(bucket), _png(image), "", ""))
    return prepared


def _png(image: Image.Image) -> bytes:
    png = io.BytesIO()
    image.save(png, format="PNG", compress_level=_PNG_LEVEL)
    return png.getvalue()


def world_scene_rows(config: WorldScenesConfig, resolution: int, seed: int) -> pd.DataFrame:
    """``config.n`` training-split world scenes for a stage at ``resolution`` (square), as packing rows with their
    scene JSON and captions; the same (config, resolution, seed) always gives the same scenes."""
    rng = np.random.default_rng([seed, resolution, 0x5CE])
    scenes = [sample_scene(rng, resolution, resolution, split="train", **config.scenes.sample_kwargs())
              for _ in range(config.n)]
    return pd.DataFrame([{"id": f"{WORLD_SCENE_PREFIX}{resolution}-{i:06d}", "uri": "", "width": resolution,
                          "height": resolution, "scene": json.dumps(scene.to_dict()), **scene_captions(scene)}
                         for i, scene in enumerate(scenes)],
                        columns=["id", "uri", "width", "height", "scene", "long", "medium", "short"])


def _decode_all(rows: list[Row], buckets: list[tuple[int, int]], path: Path, parallel: ParallelConfig) -> pd.DataFrame:
    """Crop every row to its bucket. The PNGs go to an Arrow file at ``path`` (row k = rows[k]), so memory
    holds one chunk of them; returns (bucket number or -1, reason, detail) per row."""
    prepare = functools.partial(_prepare, buckets=buckets)
    meta: list[tuple[int, str, str]] = []
    schema = pa.schema([("pixels", pa.binary())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, len(rows), _CHUNK):
            chunk = map_shards(prepare, rows[start:start + _CHUNK], parallel, desc=f"crop {start}/{len(rows)}")
            writer.write_batch(pa.record_batch([pa.array([png for _, png, _, _ in chunk], pa.binary())], schema=schema))
            meta += [(bucket, reason, detail) for bucket, _, reason, detail in chunk]
    return pd.DataFrame(meta, columns=["bucket", "reason", "detail"])


def _plan(buckets_of: np.ndarray, n_buckets: int, global_batch: int,
          rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Global batches (row numbers) of one bucket each, in a seeded order, and the unbatched remainder."""
    usable = np.flatnonzero(buckets_of >= 0)
    order = usable[rng.permutation(len(usable))]
    batches, remainder = [], []
    for bucket in range(n_buckets):
        members = order[buckets_of[order] == bucket]
        full = len(members) // global_batch * global_batch
        batches += np.split(members[:full], full // global_batch) if full else []
        remainder.append(members[full:])
    batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches, np.concatenate(remainder)


def pack_stage(kept: pd.DataFrame, captions: pd.DataFrame, *, resolution: int, aspect_ratios: list[float],
               multiple: int, global_batch: int, seed: int, out_dir: Path, parallel: ParallelConfig = _SERIAL,
               batches_per_shard: int = 8, world_scenes: WorldScenesConfig | None = None) -> dict[str, int]:
    """Pack ``kept`` (id, uri, width, height) with ``captions`` (id, long, medium, short), plus ``world_scenes``
    procedural scenes, into ``out_dir``.

    The result depends only on the rows and the arguments (not on row order or ``parallel``). Returns
    counts: packed samples, batches, shards, batches per bucket, dropped rows per reason.
    """
    if global_batch < 1 or batches_per_shard < 1:
        raise ValueError(f"global_batch and batches_per_shard must be >= 1, got {global_batch}, {batches_per_shard}")
    buckets = bucket_sizes(resolution, aspect_ratios, multiple)
    curated = (kept[["id", "uri", "width", "height"]]
               .merge(captions[["id", "long", "medium", "short"]], on="id", how="left", validate="one_to_one")
               .assign(scene=""))
    scenes = world_scene_rows(world_scenes or WorldScenesConfig(), resolution, seed)
    rows = pd.concat([curated, scenes], ignore_index=True).sort_values("id", ignore_index=True)
    no_caption = rows["long"].isna() | (rows["long"] == "")
    no_size = ~((rows["width"].fillna(0) > 0) & (rows["height"].fillna(0) > 0))  # never measured
    dropped = [rows.loc[no_caption, ["id", "uri"]].assign(reason="no_caption", detail=""),
               rows.loc[no_size & ~no_caption, ["id", "uri"]].assign(reason="no_size", detail="")]
    rows = rows[~no_caption & ~no_size].reset_index(drop=True)

    decoded_path = out_dir / _DECODED_FILE
    items = list(zip(rows["id"], rows["uri"], rows["width"].astype(int), rows["height"].astype(int), rows["scene"],
                     strict=True))
    meta = _decode_all(items, buckets, decoded_path, parallel)
    buckets_of = meta["bucket"].to_numpy(np.int64)
    failed = buckets_of < 0
    dropped.append(pd.concat([rows.loc[failed, ["id", "uri"]], meta.loc[failed, ["reason", "detail"]]], axis=1))
    batches, remainder = _plan(buckets_of, len(buckets), global_batch, np.random.default_rng(seed))
    dropped.append(rows.loc[remainder, ["id", "uri"]].assign(
        reason="remainder", detail=f"bucket does not fill a global batch of {global_batch}"))
    if not batches:
        raise ValueError(f"no bucket of {buckets} has {global_batch} usable images (a global batch): "
                         f"{int((~failed).sum())} usable of {len(kept)} kept")

    sizes = [buckets[buckets_of[batch[0]]] for batch in batches]
    shards = _write_shards(rows, batches, sizes, decoded_path, batches_per_shard, out_dir)
    decoded_path.unlink()
    dropped_frame = pd.concat(dropped, ignore_index=True).sort_values("id", ignore_index=True)
    dropped_frame.to_parquet(out_dir / DROPPED_FILE, index=False)

    index = {"resolution": resolution, "seed": seed, "global_batch": global_batch, "n_batches": len(batches),
             "n_samples": len(batches) * global_batch,
             "buckets": [{"width": w, "height": h, "batches": sizes.count((w, h))} for w, h in buckets],
             "shards": shards}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    reasons = dropped_frame["reason"].value_counts()
    return {"kept": len(kept), "world_scenes": len(scenes), "packed": index["n_samples"], "batches": len(batches),
            "shards": len(shards),
            "dropped": len(dropped_frame), **{f"dropped.{k}": int(v) for k, v in reasons.items()},
            **{f"bucket.{w}x{h}": sizes.count((w, h)) for w, h in buckets}}


def _write_shards(rows: pd.DataFrame, batches: list[np.ndarray], sizes: list[tuple[int, int]], decoded_path: Path,
                  batches_per_shard: int, out_dir: Path) -> list[dict[str, object]]:
    (out_dir / SHARDS_DIR).mkdir()
    shards = []
    with pa.memory_map(str(decoded_path)) as source:
        pixels = pa.ipc.open_file(source).read_all().column("pixels")  # zero-copy: pages in on take()
        for shard, first in enumerate(tqdm(range(0, len(batches), batches_per_shard), desc="write shards")):
            name = f"{SHARDS_DIR}/shard-{shard:05d}.parquet"
            last = min(first + batches_per_shard, len(batches))
            writer = None
            for batch_index in range(first, last):
                frame = _batch_frame(rows, batches[batch_index], batch_index, sizes[batch_index], pixels)
                table = pa.Table.from_pandas(validate(frame, Packed, f"{name} batch {batch_index}"), preserve_index=False)
                writer = writer or pq.ParquetWriter(out_dir / name, table.schema)
                writer.write_table(table, row_group_size=len(table))  # one row group per global batch
            writer.close()
            shards.append({"file": name, "first_batch": first, "n_batches": last - first})
    return shards


def _batch_frame(rows: pd.DataFrame, members: np.ndarray, batch_index: int, size: tuple[int, int],
                 pixels: pa.ChunkedArray) -> pd.DataFrame:
    picked, n = rows.iloc[members], len(members)
    return pd.DataFrame({
        "sample_index": batch_index * n + np.arange(n, dtype=np.int64),
        "batch_index": np.full(n, batch_index, dtype=np.int64),
        "id": picked["id"].to_numpy(),
        "width": np.full(n, size[0], dtype=np.int64),
        "height": np.full(n, size[1], dtype=np.int64),
        "pixels": pixels.take(pa.array(members)).to_pylist(),
        "long": picked["long"].to_numpy(), "medium": picked["medium"].to_numpy(), "short": picked["short"].to_numpy(),
    })


def packing_config(config: PretrainConfig, stage: str) -> PackingConfig:
    """The part of a pretraining config that stage ``stage``'s packed shards depend on."""
    if stage not in config.stages:
        raise ValueError(f"stage {stage!r} is not a pretraining stage of this config; it has {sorted(config.stages)}")
    return PackingConfig(stage=stage, resolution=config.stages[stage].resolution, aspect_ratios=config.aspect_ratios,
                         multiple=pixel_multiple(config.autoencoder), global_batch=config.stages[stage].global_batch,
                         seed=config.seed, world_scenes=config.stages[stage].world_scenes)


def run_packing(inputs: Mapping[str, Path], settings: PackingConfig, parent_run_id: str = "", *,
                parallel: ParallelConfig = _SERIAL, root: Path | None = None) -> Path:
    """Pack resolution stage ``settings.stage``'s ``curated`` artifact with its ``captions`` (a ``packed``
    artifact). ``parallel`` is not part of the artifact key: it does not change the packed bytes."""
    read_manifest(inputs["curated"], kind="curated")
    read_manifest(inputs["captions"], kind="captions")

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        kept = read_kept(paths["curated"])
        texts = read_table(paths["captions"] / CAPTIONS_FILE, Captions)
        counts = pack_stage(kept, texts, resolution=settings.resolution, aspect_ratios=settings.aspect_ratios,
                            multiple=settings.multiple, global_batch=settings.global_batch, seed=settings.seed,
                            out_dir=staging, parallel=parallel, world_scenes=settings.world_scenes)
        return StageOutput(counts=counts, metrics={
            "packed_fraction": counts["packed"] / max(1, counts["kept"] + counts["world_scenes"])})

    spec = packing_spec(settings.stage)
    return execute_stage(spec.name, spec.kind, body, config=settings, inputs=dict(inputs), parent_run_id=parent_run_id,
                         root=root)[0]


def packing_spec(stage: str) -> StageSpec:
    """``pack_<stage>``: the curated images of pretraining stage ``stage`` in aspect-ratio-bucketed shards."""
    return StageSpec(f"pack_{stage}", "packed", {"curated": f"selection_{stage}", "captions": f"captioning_{stage}"},
                     lambda p: packing_config(p.pretrain, stage), run_packing, parallel=True)
