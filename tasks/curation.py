"""Flyte tasks of the curation stage family; the work is in krea2_core.data.stages."""

from __future__ import annotations

from pathlib import Path

from flytekit import Resources, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile
from flytekitplugins.ray import HeadNodeConfig, RayJobConfig, WorkerNodeConfig

from containers.images import DATA_IMAGE
from krea2_core.config import AnalysisConfig, DedupConfig, ParallelConfig, StageFilters, WorldPoolConfig
from krea2_core.data import stages
from tasks.common import CACHE, from_flyte_dir, to_flyte_dir

# Per-image work runs on Ray: a local Ray when run locally, a KubeRay cluster of these groups remotely.
RAY_CPU = RayJobConfig(
    head_node_config=HeadNodeConfig(requests=Resources(cpu="2", mem="8Gi")),
    worker_node_config=[WorkerNodeConfig(group_name="cpu", replicas=4, requests=Resources(cpu="8", mem="16Gi"))],
    shutdown_after_job_finishes=True,
    ttl_seconds_after_finished=300,
)


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="2", mem="4Gi"))
def build_world_pool(config: WorldPoolConfig, parent_run_id: str = "") -> FlyteDirectory:
    path, _ = stages.run_world_pool(config, parent_run_id=parent_run_id)
    return to_flyte_dir(path)


@task(cache=CACHE, container_image=DATA_IMAGE, task_config=RAY_CPU, requests=Resources(cpu="2", mem="4Gi"))
def ingest(source: FlyteDirectory, parallel: ParallelConfig, parent_run_id: str = "") -> FlyteDirectory:
    path, _ = stages.run_ingest(from_flyte_dir(source), parallel, parent_run_id=parent_run_id)
    return to_flyte_dir(path)


@task(cache=CACHE, container_image=DATA_IMAGE, task_config=RAY_CPU, requests=Resources(cpu="2", mem="4Gi"))
def score_images(raw_pool: FlyteDirectory, analysis: AnalysisConfig, parallel: ParallelConfig,
                 parent_run_id: str = "") -> FlyteDirectory:
    path, _ = stages.run_scoring(from_flyte_dir(raw_pool), analysis, parallel, parent_run_id=parent_run_id)
    return to_flyte_dir(path)


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="2", mem="8Gi"))
def select_images(raw_pool: FlyteDirectory, scores: FlyteDirectory, stages_filters: dict[str, StageFilters],
                  dedup: DedupConfig, parent_run_id: str = "") -> FlyteDirectory:
    path, _ = stages.run_selection(from_flyte_dir(raw_pool), from_flyte_dir(scores), stages_filters, dedup,
                                   parent_run_id=parent_run_id)
    return to_flyte_dir(path)


@task(cache=CACHE, container_image=DATA_IMAGE, task_config=RAY_CPU, requests=Resources(cpu="2", mem="4Gi"))
def ingest_uri_table(table: FlyteFile, parallel: ParallelConfig, parent_run_id: str = "") -> FlyteDirectory:
    path, _ = stages.run_ingest(Path(table.download()), parallel, parent_run_id=parent_run_id)
    return to_flyte_dir(path)
