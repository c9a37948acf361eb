"""pandera schemas of the curation tables, checked whenever a table is written or read."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.parquet as pq
from pandera.typing import Series

class SchemaError(ValueError):
    """A table that breaks its schema; the message names the file, column and failing rows."""


class RawPool(pa.DataFrameModel):
    """One row per file of the raw pool. ``bytes`` holds inline image data when the source had it."""

    id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    uri: Series[str] = pa.Field(str_length={"min_value": 1})
    source: Series[str]
    n_bytes: Series[pd.Int64Dtype] = pa.Field(ge=0, nullable=True)
    width: Series[pd.Int64Dtype] = pa.Field(ge=0, nullable=True)
    height: Series[pd.Int64Dtype] = pa.Field(ge=0, nullable=True)
    format: Series[str] = pa.Field(nullable=True)
    exif: Series[str]  # JSON object of the kept EXIF fields (camera settings for captioning)
    probe_error: Series[str] = pa.Field(nullable=True)
    bytes: Series[object] = pa.Field(nullable=True)

    class Config:
        strict = True
        coerce = True


class _Measures(pa.DataFrameModel):
    """What scoring measures of an image; null where the image could not be read."""

    width: Series[pd.Int64Dtype] = pa.Field(ge=0, nullable=True)
    height: Series[pd.Int64Dtype] = pa.Field(ge=0, nullable=True)
    pixel_correlation: Series[float] = pa.Field(ge=-1, le=1, nullable=True)
    entropy: Series[float] = pa.Field(ge=0, le=8.0001, nullable=True)
    white_ratio: Series[float] = pa.Field(ge=0, le=1, nullable=True)
    black_ratio: Series[float] = pa.Field(ge=0, le=1, nullable=True)
    border_fraction: Series[float] = pa.Field(ge=0, le=0.5, nullable=True)
    error: Series[str] = pa.Field(nullable=True)  # the decoder's message when unreadable


class Scores(_Measures):
    """Per-image measurements and hashes; ``error_reason`` says why an image could not be read."""

    id: Series[str] = pa.Field(unique=True)
    error_reason: Series[str] = pa.Field(nullable=True, isin=["broken_file", "not_an_image", "unsupported_format",
                                                              "decompression_bomb", "not_a_file", "unreachable"])
    n_bytes: Series[pd.Int64Dtype] = pa.Field(ge=0, nullable=True)
    md5: Series[str] = pa.Field(nullable=True)
    phash: Series[object] = pa.Field(nullable=True)
    colorhash: Series[object] = pa.Field(nullable=True)

    class Config:
        strict = True
        coerce = True


class Verdicts(_Measures):
    """Every row of the pool for one stage: kept or the reason it was dropped, with all its scores."""

    id: Series[str] = pa.Field(unique=True)
    uri: Series[str]
    source: Series[str]
    stage: Series[str]
    kept: Series[bool]
    reason: Series[str] = pa.Field(nullable=True)  # first failing rule, null when kept
    reasons: Series[str] = pa.Field(nullable=True)  # every failing rule, comma-separated
    dup_of: Series[str] = pa.Field(nullable=True)  # id of the kept duplicate
    n_bytes: Series[pd.Int64Dtype] = pa.Field(ge=0, nullable=True)
    md5: Series[str] = pa.Field(nullable=True)  # of the file's bytes: per-image work is reused by it (row_cache.py)
    format: Series[str] = pa.Field(nullable=True)
    exif: Series[str]

    @pa.dataframe_check
    def kept_rows_have_no_reason(cls, df: pd.DataFrame) -> Series[bool]:
        return df["kept"] == df["reason"].isna()

    class Config:
        strict = True
        coerce = True


def validate(frame: pd.DataFrame, schema: type[pa.DataFrameModel], where: str) -> pd.DataFrame:
    try:
        return schema.validate(frame, lazy=True)
    except (pa.errors.SchemaErrors, pa.errors.SchemaError) as err:
        raise SchemaError(f"{where} breaks the {schema.__name__} schema:\n{err}") from None


def write_table(frame: pd.DataFrame, path: Path, schema: type[pa.DataFrameModel]) -> pd.DataFrame:
    frame = validate(frame, schema, str(path))
    pq.write_table(pa_arrow.Table.from_pandas(frame, preserve_index=False), path)
    return frame


def read_table(path: Path, schema: type[pa.DataFrameModel]) -> pd.DataFrame:
    if not path.is_file():
        raise SchemaError(f"{path} does not exist")
    frame = pq.read_table(path).to_pandas()
    return validate(frame, schema, str(path))


class SceneCaptions(pa.DataFrameModel):
    """Exact captions of the verifiable world's images, from their scene graphs."""

    id: Series[str] = pa.Field(unique=True)
    long: Series[str]
    medium: Series[str]
    short: Series[str]
    source: Series[str] = pa.Field(isin=["scene_graph"])

    class Config:
        strict = True
        coerce = True


class Captions(pa.DataFrameModel):
    """The captioning stage's output: OCR, a long caption and its rewrites per image. ``source`` says what
    wrote the long caption; ``flags`` lists truncations/fallbacks; ``error`` is set where a step failed."""

    id: Series[str] = pa.Field(unique=True)
    ocr_text: Series[str]
    ocr_lines: Series[str]  # JSON list of {text, score, box}: box corners in the original image's pixels
    text_density: Series[float] = pa.Field(ge=0, le=1)
    long: Series[str]
    medium: Series[str]
    short: Series[str]
    tags: Series[str]
    conversational: Series[str]
    source: Series[str] = pa.Field(isin=["scene_graph", "text_llm", "vlm", "none"])
    flags: Series[str]
    error: Series[str] = pa.Field(nullable=True)

    class Config:
        strict = True
        coerce = True


class Packed(pa.DataFrameModel):
    """One global batch of a packed training shard: rows of one aspect bucket, in training order
    (``sample_index`` = batch_index * global_batch + row); ``pixels`` are PNG bytes of the cropped image."""

    sample_index: Series[int] = pa.Field(ge=0, unique=True)
    batch_index: Series[int] = pa.Field(ge=0)
    id: Series[str] = pa.Field(unique=True)
    width: Series[int] = pa.Field(ge=1)
    height: Series[int] = pa.Field(ge=1)
    pixels: Series[object]
    long: Series[str]
    medium: Series[str]
    short: Series[str]

    @pa.dataframe_check
    def one_bucket_per_batch(cls, df: pd.DataFrame) -> bool:
        return bool((df.groupby("batch_index")[["width", "height"]].nunique() <= 1).all().all())

    class Config:
        strict = True
        coerce = True


class PreferencePairs(pa.DataFrameModel):
    """Judged preference pairs, one per row: ``winner`` and ``loser`` are lossless PNG bytes of one size
    (``width`` x ``height``); ``rubric`` is the prompt's JSON list of world requirements ("[]" if none);
    ``*_source`` name the checkpoint and sampler that made each image; ``on_policy`` is true when at least one
    image came from the policy being optimised; scores are the oracle's (null for human labels)."""

    pair_id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    prompt: Series[str]
    rubric: Series[str]
    width: Series[int] = pa.Field(ge=1)
    height: Series[int] = pa.Field(ge=1)
    winner: Series[object]
    loser: Series[object]
    winner_source: Series[str]
    loser_source: Series[str]
    on_policy: Series[bool]
    winner_score: Series[float] = pa.Field(nullable=True)
    loser_score: Series[float] = pa.Field(nullable=True)
    origin: Series[str] = pa.Field(isin=["synthetic", "human", "simulated"])

    class Config:
        strict = True
        coerce = True


class Annotations(pa.DataFrameModel):
    """A human-annotation table: which of two images of one prompt the annotator prefers. ``image_a`` and
    ``image_b`` are file paths (relative paths are relative to the table's directory)."""

    pair_id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    prompt: Series[str]
    image_a: Series[str] = pa.Field(str_length={"min_value": 1})
    image_b: Series[str] = pa.Field(str_length={"min_value": 1})
    choice: Series[str] = pa.Field(isin=["a", "b", "tie"])
    annotator: Series[str]

    class Config:
        strict = True
        coerce = True


class Skipped(pa.DataFrameModel):
    """Rows a stage recorded and did not use, with the rule they broke."""

    pair_id: Series[str]
    reason: Series[str]
    detail: Series[str]

    class Config:
        strict = True
        coerce = True


class ExpanderPairs(pa.DataFrameModel):
    """Prompt-expander SFT pairs: a written user prompt, a thinking trace (intent reconstruction) and the
    expansion (the long caption, opened by a photographic medium phrase where ``photo_medium``). ``style`` is the
    caption's style; ``flags`` lists fallbacks/truncations (comma-separated, "" if none)."""

    id: Series[str] = pa.Field(unique=True, str_length={"min_value": 1})
    user: Series[str] = pa.Field(str_length={"min_value": 1})
    thinking: Series[str] = pa.Field(str_length={"min_value": 1})
    expansion: Series[str] = pa.Field(str_length={"min_value": 1})
    style: Series[str] = pa.Field(isin=["artistic", "photo", "other"])
    photo_medium: Series[bool]
    split: Series[str] = pa.Field(isin=["train", "val"])
    flags: Series[str]

    @pa.dataframe_check
    def photo_medium_only_on_photos(cls, df: pd.DataFrame) -> Series[bool]:
        return ~df["photo_medium"] | (df["style"] == "photo")

    class Config:
        strict = True
        coerce = True
