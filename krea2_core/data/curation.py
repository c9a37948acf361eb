"""The CPU curation stage: score every image once, then select per resolution stage.

Scoring (decode, filter scores, md5/pHash/colorhash) is the expensive part and depends only on the
pool and ``AnalysisConfig``; selection (thresholds + dedup) is cheap and depends on the per-stage
thresholds, so changing a threshold re-runs only selection.

Selection drops a row for the first rule it breaks, in this order, and records every rule it breaks:
read errors (broken_file, not_an_image, unsupported_format, decompression_bomb, not_a_file, unreachable: retry those
later), min_resolution, aspect_ratio, white_pixels, black_pixels, low_entropy, extreme_texture, flat_border (specific
causes before the generic ones: an over-exposed image also has low entropy, but "white_pixels" says why); then, among
the survivors, exact_duplicate / near_duplicate with ``dup_of`` naming the kept copy. Nothing vanishes: every pool row
has a verdict.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
from PIL import Image

from krea2_core.curation.config import AnalysisConfig, DedupConfig, ParallelConfig, StageFilters
from krea2_core.data import hashing
from krea2_core.data.dedup import DupDecision, find_duplicates, keep_order, source_rank
from krea2_core.data.images import READ_ERRORS, BadImage, NotAFile, Unreachable, analysis_copy, read_bytes
from krea2_core.data.schemas import Scores
from krea2_core.data.scores import image_scores
from krea2_core.ray_map import map_shards

FILTER_RULES = ("min_resolution", "aspect_ratio", "white_pixels", "black_pixels", "low_entropy",
                "extreme_texture", "flat_border")
SCORE_COLUMNS = ("pixel_correlation", "entropy", "white_ratio", "black_ratio", "border_fraction")


# ----------------------------------------------------------------------------------------- scoring


def score_image(data: bytes, config: AnalysisConfig) -> dict[str, object]:
    """All measurements of one image; read failures become ``error_reason`` instead of raising."""
    row: dict[str, object] = {"error_reason": None, "error": None, "n_bytes": len(data),
                              "md5": hashing.md5_hex(data)}
    try:
        pixels, (width, height) = analysis_copy(data, config.side, config.max_pixels)
    except BadImage as err:
        return {**row, "error_reason": err.reason, "error": err.detail}
    analysis = Image.fromarray(pixels)
    row.update(width=width, height=height, phash=hashing.phash(analysis, config.phash_size),
               colorhash=hashing.colorhash(analysis, config.colorhash_binbits))
    row.update(image_scores(pixels, config))
    return row


def _score_shard(shard: list[tuple[str, str, bytes | None]], config: AnalysisConfig) -> list[dict[str, object]]:
    rows = []
    for row_id, uri, inline in shard:
        try:
            data = inline if inline is not None else read_bytes(uri)
        except (NotAFile, Unreachable) as err:
            rows.append({"id": row_id, "error_reason": READ_ERRORS[type(err)], "error": str(err)})
            continue
        except OSError as err:
            rows.append({"id": row_id, "error_reason": "broken_file", "error": f"unreadable: {err}"})
            continue
        rows.append({"id": row_id, **score_image(data, config)})
    return rows


def score_pool(pool: pd.DataFrame, analysis: AnalysisConfig, parallel: ParallelConfig) -> pd.DataFrame:
    work = list(zip(pool["id"], pool["uri"], pool["bytes"], strict=True))
    rows = map_shards(functools.partial(_score_shard, config=analysis), work, parallel, desc="score images")
    columns = list(Scores.to_schema().columns)
    return pd.DataFrame(rows).reindex(columns=columns)


# --------------------------------------------------------------------------------------- selection


def rule_failures(table: pd.DataFrame, filters: StageFilters) -> pd.DataFrame:
    """Boolean frame, one column per filter rule, True where the row breaks it (NaN scores never fail)."""
    short = table[["width", "height"]].min(axis=1).astype(float)
    long = table[["width", "height"]].max(axis=1).astype(float)
    return pd.DataFrame({
        "min_resolution": short < filters.min_side,
        "aspect_ratio": long / short.where(short > 0) > filters.max_aspect,
        "low_entropy": table["entropy"] < filters.min_entropy,
        "white_pixels": table["white_ratio"] > filters.max_white_ratio,
        "black_pixels": table["black_ratio"] > filters.max_black_ratio,
        "extreme_texture": table["pixel_correlation"] < filters.min_pixel_correlation,
        "flat_border": table["border_fraction"] > filters.max_border_fraction,
    }, index=table.index).fillna(False).astype(bool)


def duplicates_among(rows: pd.DataFrame, dedup: DedupConfig) -> DupDecision:
    """Which of ``rows`` (the filter survivors: md5, phash, colorhash, width, height, n_bytes, id, source) duplicate
    which, under the keep rule."""
    return find_duplicates(
        md5=rows["md5"].to_numpy(),
        phash_codes=hashing.codes(rows["phash"].tolist()),
        colorhash_codes=hashing.codes(rows["colorhash"].tolist()),
        order=keep_order(rows["width"].to_numpy(np.int64) * rows["height"].to_numpy(np.int64),
                         rows["n_bytes"].to_numpy(np.int64), rows["id"].to_numpy(),
                         source_rank(rows["source"].to_numpy(), dedup.source_priority)),
        max_phash_distance=dedup.max_phash_distance,
        max_colorhash_distance=dedup.max_colorhash_distance,
    )


def select_stage(pool: pd.DataFrame, scores: pd.DataFrame, stage: str, filters: StageFilters,
                 dedup: DedupConfig) -> pd.DataFrame:
    """The verdict of every pool row for one resolution stage (Verdicts schema)."""
    table = pool[["id", "uri", "source", "format", "exif"]].merge(scores, on="id", how="left", validate="one_to_one")
    failures = rule_failures(table, filters)
    reasons = [[reason] if isinstance(reason, str) else [] for reason in table["error_reason"]]
    for rule in FILTER_RULES:
        for index in np.flatnonzero(failures[rule].to_numpy()):
            reasons[index].append(rule)

    survivors = np.flatnonzero([not r for r in reasons])
    dup_of = np.full(len(table), None, dtype=object)
    if len(survivors):
        kept = table.iloc[survivors]
        decision = duplicates_among(kept, dedup)
        for local in np.flatnonzero(decision.dup_of >= 0):
            row = survivors[local]
            reasons[row].append("exact_duplicate" if decision.exact[local] else "near_duplicate")
            dup_of[row] = kept["id"].iloc[decision.dup_of[local]]

    verdicts = table[["id", "uri", "source", "width", "height", "n_bytes", "md5", "format", "exif", *SCORE_COLUMNS, "error"]].copy()
    verdicts.insert(3, "stage", stage)
    verdicts.insert(4, "kept", [not r for r in reasons])
    verdicts.insert(5, "reason", [r[0] if r else None for r in reasons])
    verdicts.insert(6, "reasons", [",".join(r) if r else None for r in reasons])
    verdicts.insert(7, "dup_of", dup_of)
    return verdicts


def summarize(verdicts: pd.DataFrame) -> dict[str, int]:
    counts = verdicts["reason"].value_counts().to_dict()
    return {"total": len(verdicts), "kept": int(verdicts["kept"].sum()),
            **{f"dropped.{reason}": int(n) for reason, n in sorted(counts.items())}}
