"""The captioning stages, each a ``StageSpec`` beside its ``run_*``: scene-graph captions of the world's images,
then, per resolution stage, captioning of every kept image (OCR, long caption, rewrites), resumable by shard and
reused per image across stages and runs (krea2_core/row_cache.py)."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import mlflow
import pandas as pd

from krea2_core.artifacts import read_manifest
from krea2_core.captioning.config import CaptioningConfig
from krea2_core.captioning.worker import OCR_COLUMNS, CaptionWorker
from krea2_core.curation.config import ParallelConfig
from krea2_core.data.ingest import RAW_POOL_FILE
from krea2_core.data.schemas import Captions, RawPool, SceneCaptions, read_table, write_table
from krea2_core.data.stages import read_kept
from krea2_core.row_cache import COMPUTED_IN, KEY, LINEAGE_FILE, RowCache, item_key
from krea2_core.shards import run_sharded, save_parquet
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


@dataclass
class CaptioningSettings:
    """Captioning of one resolution stage's kept images (the captions of images another stage captioned under the
    same settings are reused, krea2_core/row_cache.py)."""

    stage: str
    captioning: CaptioningConfig


CAPTIONS_VERSION = 1  # bump when the code changes the captions (or OCR) of an image under the same settings


def caption_caches(config: CaptioningConfig, root: Path) -> tuple[RowCache, RowCache]:
    """(captions, OCR) computed earlier under ``config``: captions by its whole row slice, OCR by the OCR config."""
    return (RowCache(root, "captions", config.row_slice(), CAPTIONS_VERSION),
            RowCache(root, "ocr", config.ocr, CAPTIONS_VERSION))


def caption_keys(kept: pd.DataFrame, scene_captions: pd.DataFrame) -> pd.Series:
    """Each kept row's captions key: its content and, for a world image, the scene-graph caption it is given."""
    given = pd.Series([json.dumps(row, sort_keys=True) for row in
                       scene_captions[["long", "medium", "short"]].to_dict("records")], index=scene_captions["id"])
    given = kept["id"].map(given).fillna("")
    return pd.Series([item_key(md5, text) for md5, text in zip(kept["md5"], given, strict=True)], index=kept.index)


def planned_captions(inputs: Mapping[str, Any], settings: CaptioningSettings, root: Path) -> tuple[int, int]:
    """(to compute, reused) of captioning the ``curated`` input's kept images: what a dry run reports."""
    scenes = read_table(Path(inputs["scene_captions"]) / SCENE_CAPTIONS_FILE, SceneCaptions)
    keys = caption_keys(read_kept(inputs["curated"]), scenes)
    reused = int(keys.isin(caption_caches(settings.captioning, root)[0].lookup(keys)[KEY]).sum())
    return len(keys) - reused, reused


def run_captioning(inputs: Mapping[str, Path], settings: CaptioningSettings, parent_run_id: str = "", *,
                   parallel: ParallelConfig) -> Path:
    """Captions of every kept image: reused where an earlier run computed them under the same settings, computed
    (resumable by shard) for the rest; ``lineage.parquet`` names the run that computed each row."""
    config = settings.captioning
    spec = captioning_spec(settings.stage)

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        kept = read_kept(paths["curated"]).sort_values("id", ignore_index=True)
        scene_table = read_table(paths["scene_captions"] / SCENE_CAPTIONS_FILE, SceneCaptions)
        keyed = kept.assign(**{KEY: caption_keys(kept, scene_table)})
        captions_cache, ocr_cache = caption_caches(config, run.output_root)
        todo = _todo(keyed, captions_cache, run.work_dir)
        start = time.perf_counter()
        computed, ocr_reused, resumed = _caption(todo, scene_table, config, ocr_cache, run, parallel)
        seconds = time.perf_counter() - start
        ok = computed[computed["error"].isna()]
        captions_cache.add(ok.drop(columns=["id", "md5", COMPUTED_IN]), run.run_id)
        rest = keyed[~keyed["id"].isin(todo["id"])]
        reused = rest[["id", KEY]].merge(captions_cache.lookup(rest[KEY]), on=KEY, validate="many_to_one")
        if len(reused) < len(rest):  # rows removed from the cache since this run planned: plan again next attempt
            (run.work_dir / _TODO_FILE).unlink()
            raise RuntimeError(f"{captions_cache.path} lost {len(rest) - len(reused)} rows this run planned to reuse; "
                               "run the stage again")
        rows = pd.concat([reused, computed], ignore_index=True).sort_values("id", ignore_index=True)
        captions = write_table(rows[list(Captions.to_schema().columns)], staging / CAPTIONS_FILE, Captions)
        rows[["id", KEY, COMPUTED_IN]].to_parquet(staging / LINEAGE_FILE, index=False)
        mlflow.log_table(captions.drop(columns=["error"]).head(25), artifact_file="captions_sample.json")
        sources = captions["source"].value_counts().to_dict()
        flags = pd.Series([f for row in captions["flags"] for f in row.split(",") if f]).value_counts().to_dict()
        return StageOutput(
            counts={"images": len(captions), "computed": len(computed), "reused": len(reused), "ocr_reused": ocr_reused,
                    "errors": int(captions["error"].notna().sum()), "shards_resumed": resumed,
                    **{f"source.{k}": int(v) for k, v in sources.items()}, **{f"flag.{k}": int(v) for k, v in flags.items()}},
            metrics={"images_per_s": (len(computed) / seconds) if len(computed) and seconds > 0 else 0.0,
                     "with_text_share": float((captions["ocr_text"] != "").mean()) if len(captions) else 0.0})

    return execute_stage(spec.name, spec.kind, body, config=settings, inputs=dict(inputs),
                         parent_run_id=parent_run_id)[0]


_TODO_FILE = "todo.parquet"


def _todo(keyed: pd.DataFrame, cache: RowCache, work_dir: Path) -> pd.DataFrame:
    """The kept rows whose captions no earlier run stored; fixed at a run's first attempt (in ``work_dir``), so a
    resumed attempt's shards hold the same items even when another run stored some of them since."""
    plan = work_dir / _TODO_FILE
    if plan.is_file():
        return pd.read_parquet(plan)
    todo = keyed[~keyed[KEY].isin(cache.lookup(keyed[KEY])[KEY])].reset_index(drop=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    save_parquet(todo, plan)
    return todo


def _caption(todo: pd.DataFrame, scene_table: pd.DataFrame, config: CaptioningConfig, ocr_cache: RowCache,
             run: StageRun, parallel: ParallelConfig) -> tuple[pd.DataFrame, int, int]:
    """(the captions of ``todo``'s rows with their key, md5 and this run as ``computed_in``; how many reused an
    earlier OCR result; how many shards an earlier attempt had finished). Stores the new OCR results."""
    known = ocr_cache.lookup(todo["md5"]).set_index(KEY)
    items = [(i, uri, exif, (known.at[md5, "ocr_lines"], float(known.at[md5, "text_density"]))
              if md5 in known.index else None)
             for i, uri, exif, md5 in todo[["id", "uri", "exif", "md5"]].itertuples(index=False, name=None)]
    scenes = scene_table.set_index("id")[["long", "medium", "short"]].to_dict("index")
    frame, resumed = run_sharded(items, functools.partial(CaptionWorker, config, scenes), run.work_dir / "shards",
                                 config.shard_size, parallel=parallel, num_gpus=config.gpu_fraction, desc="caption")
    columns = list(Captions.to_schema().columns)
    computed = (frame if items else pd.DataFrame(columns=columns)).merge(
        todo[["id", KEY, "md5"]], on="id", validate="one_to_one").assign(**{COMPUTED_IN: run.run_id})
    new_ocr = computed[computed["error"].isna() & ~computed["md5"].isin(known.index)].drop_duplicates("md5")
    ocr_cache.add(new_ocr[["md5", *OCR_COLUMNS]].rename(columns={"md5": KEY}), run.run_id)
    return computed, int(todo["md5"].isin(known.index).sum()), resumed


def captioning_spec(stage: str) -> StageSpec:
    """``captioning_<stage>``: OCR, long captions and rewrites of the images resolution stage ``stage`` kept."""
    return StageSpec(f"captioning_{stage}", "captions",
                     {"curated": f"selection_{stage}", "scene_captions": "scene_captions"},
                     lambda p: CaptioningSettings(stage=stage, captioning=p.captioning), run_captioning, parallel=True,
                     planned=planned_captions)
