"""Shared fixtures: an isolated output root / MLflow store per test, and one small scored world pool."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from krea2_core.curation.config import AnalysisConfig, ParallelConfig
from krea2_core.data.curation import score_pool
from krea2_core.data.ingest import build_raw_pool, list_folder
from krea2_core.world.config import WorldPoolConfig
from krea2_core.world.pool import POOL_IMAGES_DIR, LABELS_FILE, build_world_pool

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SERIAL = ParallelConfig(backend="serial", shard_size=32)
# Small but complete: every defect class, every near-duplicate transform, colour variants, all the real photos.
SMALL_WORLD = WorldPoolConfig(seed=7, n_scenes=80, min_side=160, max_side=320, n_exact_duplicates=8,
                              n_near_duplicates=16, n_color_variants=8, n_per_defect=2, max_real_images=300)


@pytest.fixture(autouse=True)
def isolated_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "krea2-outputs"
    monkeypatch.setenv("KREA2_OUTPUT_ROOT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


@dataclass(frozen=True)
class ScoredPool:
    root: Path  # the world pool directory (images/, labels.parquet, scenes.parquet)
    labels: pd.DataFrame
    pool: pd.DataFrame  # raw pool table
    scores: pd.DataFrame

    def by_file(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` (with a uri column) joined to the ground-truth labels on file name."""
        named = frame.assign(file=frame["uri"].map(lambda uri: Path(uri).name))
        return named.merge(self.labels, on="file", validate="one_to_one")


@pytest.fixture(scope="session")
def scored_pool(tmp_path_factory: pytest.TempPathFactory) -> ScoredPool:
    root = tmp_path_factory.mktemp("world") / "pool"
    build_world_pool(SMALL_WORLD, root)
    pool = build_raw_pool(list_folder(root / POOL_IMAGES_DIR), SERIAL)
    scores = score_pool(pool, AnalysisConfig(), SERIAL)
    return ScoredPool(root=root, labels=pd.read_parquet(root / LABELS_FILE), pool=pool, scores=scores)


LONG_POLE = "test_pipeline_flyte.py"  # four `pyflyte run`s of the pipeline: ~15 of the suite's minutes on 2 cores


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long pole first, so that under `-n 2 --dist loadfile` one worker starts it at once while the other runs
    the rest (xdist would otherwise hand files out by test count, and start it late)."""
    items.sort(key=lambda item: item.path.name != LONG_POLE)  # stable: every other file keeps its order
