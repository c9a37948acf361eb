"""The embedding stage: every kept image embedded once per embedder; a later selection reuses what was embedded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from krea2_core.artifacts import read_manifest
from krea2_core.curation.config import EmbedderConfig
from krea2_core.curation.embedders import read_embeddings
from krea2_core.curation.stages import EMBEDDINGS_FILE, FAILED_FILE, run_embedding
from krea2_core.data.hashing import md5_hex
from krea2_core.data.schemas import Verdicts, write_table
from krea2_core.data.stages import KEPT_FILE
from krea2_core.row_cache import LINEAGE_FILE
from krea2_core.stages import StageOutput, execute_stage

CPU = EmbedderConfig(kind="efficientnet_lite0", device="cpu", batch_size=4)


@pytest.fixture
def images(tmp_path: Path) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for k in range(9):
        path = tmp_path / f"img{k}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        rows.append({"id": f"img{k}", "uri": str(path), "md5": md5_hex(path.read_bytes())})
    return pd.DataFrame(rows)


def _curated(rows: pd.DataFrame) -> Path:
    verdicts = rows.assign(source="test", stage="1024", kept=True, reason=None, reasons=None, dup_of=None,
                           width=64, height=48, n_bytes=100, format="PNG", exif="{}", pixel_correlation=0.9, entropy=5.0,
                           white_ratio=0.0, black_ratio=0.0, border_fraction=0.0, error=[None] * len(rows))

    def body(inputs: dict[str, Path], staging: Path, run: object) -> StageOutput:
        write_table(verdicts, staging / KEPT_FILE, Verdicts)
        return StageOutput(counts={"kept": len(rows)})

    return execute_stage("selection_1024", "curated", body, config={"ids": rows["id"].tolist()})[0]


def test_a_later_selection_embeds_only_new_images(images: pd.DataFrame, isolated_outputs: Path) -> None:
    first = run_embedding({"curated": _curated(images.iloc[:6])}, CPU)
    assert {k: read_manifest(first).counts[k] for k in ("computed", "reused")} == {"computed": 6, "reused": 0}
    second = run_embedding({"curated": _curated(images)}, CPU)
    assert {k: read_manifest(second).counts[k] for k in ("computed", "reused")} == {"computed": 3, "reused": 6}
    ids_1, vectors_1, _ = read_embeddings(first / EMBEDDINGS_FILE)
    ids_2, vectors_2, meta = read_embeddings(second / EMBEDDINGS_FILE)
    assert ids_2 == sorted(images["id"]) and meta["model"] == "efficientnet_lite0"
    np.testing.assert_array_equal(vectors_2[:6], vectors_1)  # reused rows are the stored vectors
    lineage = pd.read_parquet(second / LINEAGE_FILE).set_index("id")
    assert lineage["computed_in"].nunique() == 2 and lineage.loc["img8", "computed_in"] == read_manifest(
        second).mlflow_run_id
    # the batch size changes no embedding; the device may (another slice: computed again)
    larger_batches = run_embedding({"curated": _curated(images)}, EmbedderConfig(kind="efficientnet_lite0",
                                                                                   device="cpu", batch_size=8))
    assert read_manifest(larger_batches).counts["computed"] == 0
    auto = run_embedding({"curated": _curated(images)}, EmbedderConfig(kind="efficientnet_lite0", device="auto"))
    assert read_manifest(auto).counts["computed"] == 9


def test_an_image_that_fails_to_load_is_listed_and_not_stored(images: pd.DataFrame, isolated_outputs: Path) -> None:
    Path(images["uri"].iloc[0]).write_bytes(b"not an image")
    path = run_embedding({"curated": _curated(images)}, CPU)
    counts = read_manifest(path).counts
    assert (counts["embedded"], counts["failed"]) == (8, 1)
    assert pd.read_parquet(path / FAILED_FILE)["id"].tolist() == ["img0"]
