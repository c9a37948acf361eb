import pandas as pd
import pytest
import ray

from krea2_core.curation.config import AnalysisConfig, ParallelConfig
from krea2_core.data.curation import score_pool
from tests.conftest import SERIAL, ScoredPool


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_scoring_matches_in_process_scoring(scored_pool: ScoredPool, local_ray: None) -> None:
    sample = scored_pool.pool.sample(60, random_state=0).reset_index(drop=True)
    on_ray = score_pool(sample, AnalysisConfig(), ParallelConfig(backend="ray", shard_size=16))
    in_process = score_pool(sample, AnalysisConfig(), SERIAL)
    pd.testing.assert_frame_equal(on_ray, in_process)
