"""Curation on the verifiable world: every injected defect is caught for the right reason, duplicates
are resolved by the keep rule, and real photos and distinct images survive."""

from pathlib import Path

import pandas as pd
import pytest

from krea2_core.data.curation import select_stage
from krea2_core.data.schemas import Verdicts, validate
from krea2_core.presets import preset
from krea2_core.world.pool import DEFECTS, NEAR_TRANSFORMS
from tests.conftest import ScoredPool

TINY = preset("tiny").curation
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "camera")


@pytest.fixture(scope="module")
def verdicts(scored_pool: ScoredPool) -> pd.DataFrame:
    frame = select_stage(scored_pool.pool, scored_pool.scores, "256", TINY.stages["256"], TINY.dedup)
    validate(frame, Verdicts, "verdicts")
    return scored_pool.by_file(frame)


def test_nothing_vanishes(scored_pool: ScoredPool, verdicts: pd.DataFrame) -> None:
    assert sorted(verdicts["id"]) == sorted(scored_pool.pool["id"])
    assert (verdicts["kept"] == verdicts["reason"].isna()).all()
    dropped = verdicts[~verdicts["kept"]]
    assert dropped["reasons"].str.split(",").map(lambda rs: rs[0]).tolist() == dropped["reason"].tolist()


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_every_defect_class_is_caught_with_the_right_reason(verdicts: pd.DataFrame, defect: str) -> None:
    rows = verdicts[verdicts["group"] == f"defect:{defect}"]
    assert len(rows) > 0
    assert (rows["reason"] == DEFECTS[defect]).all(), rows[["file", "reason", "reasons"]].to_string()


def test_rejections_keep_their_scores(verdicts: pd.DataFrame) -> None:
    noise = verdicts[verdicts["group"] == "defect:noise"]
    assert (noise["pixel_correlation"] < TINY.stages["256"].min_pixel_correlation).all()
    bombs = verdicts[verdicts["group"] == "defect:bomb"]
    assert bombs["error"].str.contains("40000x40000|exceeds limit", regex=True).all()


def _pairs(verdicts: pd.DataFrame, group: str) -> pd.DataFrame:
    """Each copy with its original's verdict beside it."""
    copies = verdicts[verdicts["group"] == group]
    originals = verdicts.set_index("file").loc[copies["copy_of"]]
    return copies.assign(original_id=originals["id"].to_numpy(), original_kept=originals["kept"].to_numpy(),
                         original_dup_of=originals["dup_of"].to_numpy())


def _resolved(pairs: pd.DataFrame) -> pd.Series:
    """Exactly one of copy/original kept, and the other points at it."""
    copy_dropped = ~pairs["kept"] & (pairs["dup_of"] == pairs["original_id"]) & pairs["original_kept"]
    original_dropped = pairs["kept"] & ~pairs["original_kept"] & (pairs["original_dup_of"] == pairs["id"])
    return copy_dropped | original_dropped


def test_exact_copies_all_resolved_with_exact_reason(verdicts: pd.DataFrame) -> None:
    pairs = _pairs(verdicts, "exact_duplicate")
    assert _resolved(pairs).all()
    dropped = verdicts[verdicts["id"].isin(pairs["id"]) | verdicts["id"].isin(pairs["original_id"])]
    assert set(dropped["reason"].dropna()) == {"exact_duplicate"}


@pytest.mark.parametrize("transform", NEAR_TRANSFORMS)
def test_near_copies_are_resolved_to_one_kept_image(verdicts: pd.DataFrame, transform: str) -> None:
    pairs = _pairs(verdicts, "near_duplicate")
    pairs = pairs[pairs["file"].str.contains(transform)]
    assert len(pairs) >= 3
    assert _resolved(pairs).mean() >= 0.75, pairs[["file", "reason", "dup_of", "original_id"]].to_string()


def test_smaller_copies_lose_to_their_original(verdicts: pd.DataFrame) -> None:
    pairs = _pairs(verdicts, "near_duplicate")
    shrunk = pairs[pairs["file"].str.contains("resize|crop") & _resolved(pairs)]
    assert len(shrunk) > 0 and (~shrunk["kept"]).all()


def test_colour_variants_are_distinct_images(verdicts: pd.DataFrame) -> None:
    pairs = _pairs(verdicts, "color_variant")
    assert pairs["kept"].all()
    assert not pairs["dup_of"].isin(pairs["original_id"]).any()
    assert not pairs["original_dup_of"].isin(pairs["id"]).any()


def test_few_distinct_scenes_are_merged(verdicts: pd.DataFrame) -> None:
    copied = set(verdicts["copy_of"].dropna())
    scenes = verdicts[(verdicts["group"] == "scene") & ~verdicts["file"].isin(copied)]
    assert scenes["kept"].mean() >= 0.97, scenes[~scenes["kept"]][["file", "reason", "dup_of"]].to_string()


def test_real_photos_are_kept(verdicts: pd.DataFrame) -> None:
    real = verdicts[verdicts["group"] == "real"]
    named = real[real["file"].map(lambda f: Path(f).stem.split("_", 2)[-1] in PHOTOS)]
    assert len(named) == len(PHOTOS) and named["kept"].all(), named[["file", "reason"]].to_string()
    jpeg_photos = real[real["file"].str.endswith(".jpg")]
    passed_filters = jpeg_photos["reason"].isna() | jpeg_photos["reason"].str.endswith("duplicate")
    assert len(jpeg_photos) >= 20 and passed_filters.mean() >= 0.95, jpeg_photos[["file", "reason"]].to_string()


def test_higher_stages_need_larger_images(scored_pool: ScoredPool, verdicts: pd.DataFrame) -> None:
    high = scored_pool.by_file(select_stage(scored_pool.pool, scored_pool.scores, "1024", TINY.stages["1024"], TINY.dedup))
    too_small = high["reason"] == "min_resolution"
    assert (high.loc[too_small, ["width", "height"]].min(axis=1) < TINY.stages["1024"].min_side).all()
    assert too_small.sum() > (verdicts["reason"] == "min_resolution").sum()
