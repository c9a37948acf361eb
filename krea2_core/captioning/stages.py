"""Captioning stage entry points. So far: captions from the verifiable world's scene graphs, which are
exact by construction (the tiny preset's offline captions for world images)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from krea2_core.artifacts import Manifest, read_manifest
from krea2_core.data.ingest import RAW_POOL_FILE
from krea2_core.data.schemas import Captions, RawPool, read_table, write_table
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import StageRun
from krea2_core.world.pool import SCENES_FILE

CAPTIONS_FILE = "captions.parquet"


def scene_graph_captions(raw_pool: pd.DataFrame, scenes: pd.DataFrame) -> pd.DataFrame:
    """Captions of the pool rows that are world images (matched by file name), keyed by pool id."""
    files = raw_pool.assign(file=raw_pool["uri"].map(lambda uri: Path(uri).name))[["id", "file"]]
    captions = files.merge(scenes[["file", "long", "medium", "short"]], on="file", validate="one_to_one")
    return captions.drop(columns="file").assign(source="scene_graph")


def run_world_captions(world_pool: Path, raw_pool: Path, *, parent_run_id: str = "") -> tuple[Path, Manifest]:
    read_manifest(world_pool, kind="world_pool")

    def body(inputs: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        pool = read_table(inputs["raw_pool"] / RAW_POOL_FILE, RawPool)
        scenes = pd.read_parquet(inputs["world_pool"] / SCENES_FILE)
        captions = write_table(scene_graph_captions(pool, scenes), staging / CAPTIONS_FILE, Captions)
        return StageOutput(counts={"captioned": len(captions), "pool": len(pool)})

    return execute_stage("captions", "captions", body, config={"source": "scene_graph"},
                         inputs={"world_pool": world_pool, "raw_pool": raw_pool}, parent_run_id=parent_run_id)
