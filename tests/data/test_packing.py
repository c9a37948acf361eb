"""Aspect buckets and packing: every kept image is packed once or dropped with a reason, global batches hold
exactly one bucket each, the layout is deterministic, and the stage publishes a ``packed`` artifact."""

from __future__ import annotations

import dataclasses

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from krea2_core.artifacts import ArtifactError, read_manifest
from krea2_core.curation.config import ParallelConfig
from krea2_core.data.buckets import assign_bucket, bucket_sizes, resize_crop
from krea2_core.data.images import load_image
from krea2_core.data.packing import (DROPPED_FILE, INDEX_FILE, WORLD_SCENE_PREFIX, pack_stage, packing_config,
                                     run_packing, world_scene_rows)
from krea2_core.data.schemas import Captions, Verdicts, write_table
from krea2_core.data.stages import KEPT_FILE
from krea2_core.models.autoencoders import pixel_multiple
from krea2_core.models.config import AutoencoderConfig, DiTConfig
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.training.config import PretrainConfig, PretrainStageConfig
from krea2_core.world.captions import captions as world_captions
from krea2_core.world.captions import prompt_for
from krea2_core.world.checker import check
from krea2_core.world.config import SceneDomainConfig, WorldScenesConfig
from krea2_core.world.scene import Scene
from krea2_core.world.split import split_of

BUCKETS = [(24, 48), (32, 32), (48, 24)]  # bucket_sizes(32, [0.5, 1, 2], 8)
PACK = {"resolution": 32, "aspect_ratios": [0.5, 1.0, 2.0], "multiple": 8, "global_batch": 4, "seed": 3}


def test_bucket_sizes_are_unique_multiples_of_about_the_same_area() -> None:
    sizes = bucket_sizes(256, [2.0, 1.0, 0.5, 1.01, 1.333], 16)
    assert sizes == [(176, 368), (256, 256), (288, 224), (368, 176)]  # 1.01 snaps onto 1:1, sorted by aspect
    assert all(w % 16 == 0 and h % 16 == 0 and abs(w * h / 256**2 - 1) < 0.05 for w, h in sizes)
    assert bucket_sizes(32, [0.5, 1.0, 2.0], 8) == BUCKETS
    assert bucket_sizes(16, [100.0], 16) == [(160, 16)]  # never below one multiple


@pytest.mark.parametrize("args, rule", [((8, [1.0], 16), "resolution"), ((32, [], 8), "aspect_ratios"),
                                        ((32, [1.0, 0.0], 8), "aspect_ratios"), ((32, [1.0], 0), "multiple")])
def test_bucket_sizes_reject_bad_input(args: tuple, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        bucket_sizes(*args)


def test_assign_bucket_picks_the_nearest_log_aspect() -> None:
    assert assign_bucket(300, 100, BUCKETS) == (48, 24)
    assert assign_bucket(100, 300, BUCKETS) == (24, 48)
    assert assign_bucket(140, 100, BUCKETS) == (32, 32)  # log 1.4 is nearer log 1 than log 2
    assert assign_bucket(150, 100, BUCKETS) == (48, 24)
    with pytest.raises(ValueError, match="positive"):
        assign_bucket(0, 10, BUCKETS)
    with pytest.raises(ValueError, match="empty"):
        assign_bucket(10, 10, [])


def test_resize_crop_covers_and_keeps_the_centre() -> None:
    stripes = np.zeros((100, 200, 3), np.uint8)
    stripes[:, :30] = (255, 0, 0)
    stripes[:, 30:170] = (0, 255, 0)
    stripes[:, 170:] = (0, 0, 255)
    out = np.asarray(resize_crop(Image.fromarray(stripes), (50, 50))).astype(int)
    assert out.shape == (50, 50, 3)
    assert (np.abs(out - (0, 255, 0)) <= 1).all()  # the sides were cropped (columns 50..150), not squeezed in
    upscaled = resize_crop(Image.fromarray(stripes[:10, :10]), (40, 80))
    assert upscaled.size == (40, 80)


def _image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """31 good images (11 wide, 12 square incl. transparent PNGs and JPEGs, 8 tall), a corrupt file, a missing
    file, an image without a caption and one without a size: kept rows (id, uri, width, height), captions."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate([(90, 40)] * 11 + [(60, 64)] * 12 + [(40, 90)] * 8):
        image = _image(rng, w, h)
        if i % 5 == 0:
            path = folder / f"img{i:02d}.jpg"
            image.save(path, quality=90)
        else:
            path = folder / f"img{i:02d}.png"
            (image.convert("RGBA") if i % 7 == 0 else image).save(path)
        rows.append((f"id{i:02d}", str(path), w, h))
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows += [("corrupt", str(folder / "corrupt.jpg"), 64, 64), ("missing", str(folder / "gone.png"), 64, 64)]
    _image(rng, 64, 64).save(folder / "uncaptioned.png")
    rows.append(("uncaptioned", str(folder / "uncaptioned.png"), 64, 64))
    rows.append(("unmeasured", str(folder / "uncaptioned.png"), None, None))
    kept = pd.DataFrame(rows, columns=["id", "uri", "width", "height"]).astype({"width": "Int64", "height": "Int64"})
    ids = [r[0] for r in rows if r[0] != "uncaptioned"]
    captions = pd.DataFrame({"id": ids, "long": [f"long {i}" for i in ids], "medium": [f"medium {i}" for i in ids],
                             "short": [f"short {i}" for i in ids]})
    return kept, captions


def _pack(kept: pd.DataFrame, captions: pd.DataFrame, out: Path, **overrides: object) -> dict[str, int]:
    out.mkdir(parents=True)
    return pack_stage(kept, captions, **{**PACK, **overrides}, out_dir=out, batches_per_shard=2)


def _rows(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted((out / "shards").glob("*.parquet"))], ignore_index=True)


def test_every_kept_image_is_packed_once_or_dropped_with_a_reason(sources, tmp_path: Path) -> None:
    kept, captions = sources
    counts = _pack(kept, captions, tmp_path / "p")
    packed, dropped = _rows(tmp_path / "p"), pd.read_parquet(tmp_path / "p" / DROPPED_FILE)
    assert set(packed["id"]).isdisjoint(dropped["id"]) and len(packed) + len(dropped) == len(kept)
    assert set(packed["id"]) | set(dropped["id"]) == set(kept["id"])
    reasons = dropped.set_index("id")["reason"]
    assert reasons["uncaptioned"] == "no_caption" and reasons["missing"] == "unreadable"
    assert reasons["unmeasured"] == "no_size"
    assert reasons["corrupt"] in ("broken_file", "not_an_image")
    # 11 wide, 12 square, 8 tall in batches of 4: remainders 3 + 0 + 0
    assert (reasons == "remainder").sum() == 3
    assert counts == {"kept": 35, "world_scenes": 0, "packed": 28, "batches": 7, "shards": 4, "dropped": 7, "dropped.remainder": 3,
                      "dropped.no_caption": 1, "dropped.no_size": 1, "dropped.unreadable": 1,
                      f"dropped.{reasons['corrupt']}": 1,
                      "bucket.24x48": 2, "bucket.32x32": 3, "bucket.48x24": 2}
    assert (packed.set_index("id")["long"] == "long " + packed.set_index("id").index).all()


def test_batches_are_row_groups_of_one_bucket_in_index_order(sources, tmp_path: Path) -> None:
    kept, captions = sources
    _pack(kept, captions, tmp_path / "p")
    index = json.loads((tmp_path / "p" / INDEX_FILE).read_text())
    assert index["n_batches"] == 7 and index["global_batch"] == 4 and index["n_samples"] == 28
    assert [(s["first_batch"], s["n_batches"]) for s in index["shards"]] == [(0, 2), (2, 2), (4, 2), (6, 1)]
    assert {(b["width"], b["height"]): b["batches"] for b in index["buckets"]} == {
        (24, 48): 2, (32, 32): 3, (48, 24): 2}
    for shard in index["shards"]:
        parquet = pq.ParquetFile(tmp_path / "p" / shard["file"])
        assert parquet.num_row_groups == shard["n_batches"]
        for group in range(parquet.num_row_groups):
            rows = parquet.read_row_group(group).to_pandas()
            batch = shard["first_batch"] + group
            assert len(rows) == 4 and (rows["batch_index"] == batch).all()
            assert rows["sample_index"].tolist() == list(range(batch * 4, batch * 4 + 4))
            assert rows[["width", "height"]].drop_duplicates().shape[0] == 1
            for png, w, h in zip(rows["pixels"], rows["width"], rows["height"], strict=True):
                assert Image.open(io.BytesIO(png)).size == (w, h)
    assert _rows(tmp_path / "p")["sample_index"].tolist() == list(range(28))


def test_pixels_are_the_lossless_crop_of_the_original(sources, tmp_path: Path) -> None:
    kept, captions = sources
    _pack(kept, captions, tmp_path / "p")
    row = _rows(tmp_path / "p").set_index("id").loc["id01"]  # a 90x40 PNG, decoded at full size
    uri = kept.set_index("id").loc["id01", "uri"]
    expected = np.asarray(resize_crop(load_image(uri, side=90), (48, 24)))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["pixels"]))), expected)


def test_layout_depends_on_the_seed_only(sources, tmp_path: Path) -> None:
    kept, captions = sources
    _pack(kept, captions, tmp_path / "a")
    _pack(kept.sample(frac=1, random_state=1), captions.sample(frac=1, random_state=2), tmp_path / "b")
    _pack(kept, captions, tmp_path / "c", seed=4)
    a, b, c = (_rows(tmp_path / name) for name in "abc")
    pd.testing.assert_frame_equal(a, b)
    assert a["id"].tolist() != c["id"].tolist() and len(a) == len(c)  # another seed: other order and remainder
    assert [p.read_bytes() for p in sorted((tmp_path / "a").rglob("*.parquet"))] == \
        [p.read_bytes() for p in sorted((tmp_path / "b").rglob("*.parquet"))]


def test_world_scenes_are_drawn_at_their_bucket_with_exact_captions(sources, tmp_path: Path) -> None:
    kept, captions = sources
    scenes = WorldScenesConfig(n=9, scenes=SceneDomainConfig(max_shapes=1, text_prob=0.0))
    counts = _pack(kept, captions, tmp_path / "p", world_scenes=scenes)
    assert counts["world_scenes"] == 9 and counts["kept"] == 35
    packed = _rows(tmp_path / "p").set_index("id")
    drawn = packed[packed.index.str.startswith(WORLD_SCENE_PREFIX)]
    dropped = pd.read_parquet(tmp_path / "p" / DROPPED_FILE)
    assert len(drawn) + dropped["id"].str.startswith(WORLD_SCENE_PREFIX).sum() == 9  # 12 + 9 square: 1 remainder
    rows = world_scene_rows(scenes, 32, PACK["seed"]).set_index("id")
    for scene_id, row in drawn.iterrows():
        scene = Scene.from_dict(json.loads(rows.loc[scene_id, "scene"]))
        assert len(scene.shapes) == 1 and scene.text is None and split_of(scene) == "train"
        assert row["long"] == world_captions(scene)["long"] and (row["width"], row["height"]) == (32, 32)
        image = Image.open(io.BytesIO(row["pixels"]))
        assert image.size == (32, 32) and check(image.resize((128, 128)), prompt_for(scene)).score == 1.0
    again = world_scene_rows(scenes, 32, PACK["seed"])
    assert again.equals(rows.reset_index()) and not again.equals(world_scene_rows(scenes, 32, PACK["seed"] + 1))
    assert not set(world_scene_rows(scenes, 64, PACK["seed"])["scene"]) & set(rows["scene"])  # stages differ


def test_too_few_images_for_a_global_batch_is_an_error(sources, tmp_path: Path) -> None:
    kept, captions = sources
    with pytest.raises(ValueError, match="global batch"):
        _pack(kept, captions, tmp_path / "p", global_batch=64)


def _verdicts(kept: pd.DataFrame) -> pd.DataFrame:
    n = len(kept)
    return kept.assign(source="test", stage="256", kept=True, reason=None, reasons=None, dup_of=None, n_bytes=100,
                       md5=[f"{i:032x}" for i in range(n)], format="PNG", exif="{}", pixel_correlation=0.9, entropy=5.0, white_ratio=0.0, black_ratio=0.0,
                       border_fraction=0.0, error=[None] * n)


def _captions(captions: pd.DataFrame) -> pd.DataFrame:
    return captions.assign(ocr_text="", ocr_lines="[]", text_density=0.0, tags="", conversational="",
                           source="text_llm", flags="", error=[None] * len(captions))


def test_run_packing_publishes_a_packed_artifact(sources, isolated_outputs: Path) -> None:
    kept, captions = sources

    def curated_body(inputs: dict[str, Path], staging: Path, run: object) -> StageOutput:
        write_table(_verdicts(kept), staging / KEPT_FILE, Verdicts)
        return StageOutput(counts={"kept": len(kept)})

    def captions_body(inputs: dict[str, Path], staging: Path, run: object) -> StageOutput:
        write_table(_captions(captions), staging / "captions.parquet", Captions)
        return StageOutput(counts={"images": len(captions)})

    curated, _ = execute_stage("selection_256", "curated", curated_body, config={"test": 1})
    texts, _ = execute_stage("captioning_256", "captions", captions_body, config={"test": 1})
    config = PretrainConfig(stages={"256": PretrainStageConfig(resolution=32, steps=2, global_batch=4, warmup_steps=0)},
                            aspect_ratios=[0.5, 1.0, 2.0], autoencoder=AutoencoderConfig(downsample=4, patch_size=2),
                            model=DiTConfig(in_channels=192))
    assert pixel_multiple(config.autoencoder) == 8
    path = run_packing({"curated": curated, "captions": texts}, packing_config(config, "256"))
    manifest = read_manifest(path)
    assert manifest.kind == "packed" and manifest.counts["packed"] == 28 and manifest.counts["dropped.no_caption"] == 1
    assert (path / INDEX_FILE).is_file() and not list(path.glob(".decoded*"))
    # content-addressed on what changes the bytes: same inputs, same place, whatever the training settings
    longer = dataclasses.replace(config, stages={"256": dataclasses.replace(config.stages["256"], steps=50, lr=0.1)})
    assert run_packing({"curated": curated, "captions": texts}, packing_config(longer, "256")) == path
    with pytest.raises(ArtifactError, match="expected 'curated'"):
        run_packing({"curated": texts, "captions": texts}, packing_config(config, "256"))
    with pytest.raises(ValueError, match="not a pretraining stage"):
        packing_config(config, "512")


@pytest.mark.slow
def test_ray_workers_pack_the_same_bytes(sources, tmp_path: Path) -> None:
    kept, captions = sources
    _pack(kept, captions, tmp_path / "serial")
    _pack(kept, captions, tmp_path / "ray", parallel=ParallelConfig(backend="ray", num_cpus=2, shard_size=8))
    files = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*.*"))
    assert files == sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*.*"))
    assert all((tmp_path / "serial" / f).read_bytes() == (tmp_path / "ray" / f).read_bytes() for f in files)
