"""The captioning stages, each a ``StageSpec`` beside its ``run_*``: scene-graph captions of the world's images,
then captioning of every kept image (OCR, long caption, rewrites), resumable by shard."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Mapping

import mlflow
import pandas as pd

from krea2_core.artifacts import read_manifest
from krea2_core.captioning.config import CaptioningConfig
from krea2_core.captioning.worker import CaptionWorker
from krea2_core.curation.config import ParallelConfig
from krea2_core.data.ingest import RAW_POOL_FILE
from krea2_core.data.schemas import Captions, RawPool, SceneCaptions, Verdicts, read_table, write_table
from krea2_core.shards import run_sharded
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import StageRun
from krea2_core.world.pool import POOL_SCENES_FILE

SCENE_CAPTIONS_FILE = "scene_captions.parquet"
CAPTIONS_FILE = "captions.parquet"


def scene_graph_captions(raw_pool: pd.DataFrame, scenes: pd.DataFrame) -> pd.DataFrame:
    """Captions of the pool rows that are world images (matched by file name), keyed by pool id."""
    files = raw_pool.assign(file=raw_pool["uri"].map(lambda uri: Path(uri).name))[["id", "file"]]
    captions = files.merge(scenes[["file", "long", "medium", "short"]], on="file", validate="one_to_one")
    return captions.drop(columns="file").assign(source="scene_graph")


def run_scene_captions(inputs: Mapping[str, Path], settings: None = None, parent_run_id: str = "") -> Path:
    """The world images' captions, written from their scene graphs (no setting changes them)."""
    read_manifest(inputs["world_pool"], kind="world_pool")

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        pool = read_table(paths["raw_pool"] / RAW_POOL_FILE, RawPool)
        scenes = pd.read_parquet(paths["world_pool"] / POOL_SCENES_FILE)
        captions = write_table(scene_graph_captions(pool, scenes), staging / SCENE_CAPTIONS_FILE, SceneCaptions)
        return StageOutput(counts={"captioned": len(captions), "pool": len(pool)})

    return execute_stage(SCENE_CAPTIONS.name, SCENE_CAPTIONS.kind, body, config=settings, inputs=dict(inputs),
                         parent_run_id=parent_run_id)[0]


SCENE_CAPTIONS = StageSpec("scene_captions", "scene_captions", {"world_pool": "world_pool", "raw_pool": "ingest"},
                           lambda p: None, run_scene_captions)


def _kept_union(curated: Path) -> pd.DataFrame:
    """Every image kept by any resolution stage (each stage's training set needs captions)."""
    stages = sorted(p for p in curated.iterdir() if (p / "kept.parquet").is_file())
    kept = pd.concat([read_table(p / "kept.parquet", Verdicts)[["id", "uri", "exif"]] for p in stages])
    return kept.drop_duplicates("id").sort_values("id").reset_index(drop=True)


def run_captioning(inputs: Mapping[str, Path], settings: CaptioningConfig, parent_run_id: str = "", *,
                   parallel: ParallelConfig) -> Path:
    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        kept = _kept_union(paths["curated"])
        scenes = read_table(paths["scene_captions"] / SCENE_CAPTIONS_FILE, SceneCaptions).set_index("id")
        worker = functools.partial(CaptionWorker, settings, scenes[["long", "medium", "short"]].to_dict("index"))
        items = list(kept[["id", "uri", "exif"]].itertuples(index=False, name=None))
        start = time.perf_counter()
        frame, reused = run_sharded(items, worker, run.work_dir, settings.shard_size, parallel=parallel,
                                    num_gpus=settings.gpu_fraction, desc="caption")
        seconds = time.perf_counter() - start
        captions = write_table(frame, staging / CAPTIONS_FILE, Captions)
        mlflow.log_table(captions.drop(columns=["error"]).head(25), artifact_file="captions_sample.json")
        sources = captions["source"].value_counts().to_dict()
        flags = pd.Series([f for row in captions["flags"] for f in row.split(",") if f]).value_counts().to_dict()
        return StageOutput(
            counts={"images": len(captions), "errors": int(captions["error"].notna().sum()), "shards_reused": reused,
                    **{f"source.{k}": int(v) for k, v in sources.items()}, **{f"flag.{k}": int(v) for k, v in flags.items()}},
            metrics={"images_per_s": (len(captions) / seconds) if seconds > 0 else 0.0,
                     "with_text_share": float((captions["ocr_text"] != "").mean()) if len(captions) else 0.0})

    return execute_stage(CAPTIONING.name, CAPTIONING.kind, body, config=settings, inputs=dict(inputs),
                         parent_run_id=parent_run_id)[0]


CAPTIONING = StageSpec("captioning", "captions", {"curated": "selection", "scene_captions": "scene_captions"},
                       lambda p: p.captioning, run_captioning, parallel=True)
