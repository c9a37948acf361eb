"""Flyte tasks of the data stages (world pool, ingest, scoring, a resolution stage's selection); the work is in krea2_core.data.stages."""

from __future__ import annotations

from pathlib import Path

from flytekit import Resources, task
from flytekit.types.directory import FlyteDirectory
from flytekitplugins.ray import HeadNodeConfig, RayJobConfig, WorkerNodeConfig

from containers.images import DATA_IMAGE
from krea2_core.curation.config import AnalysisConfig, ParallelConfig
from krea2_core.data.stages import INGEST, SCORING, WORLD_POOL, SelectionSettings, selection_spec
from krea2_core.world.config import WorldPoolConfig
from tasks.common import CACHE, SourceFolder, SourceTable, local, to_flyte_dir

# Per-image work runs on Ray: a local Ray when run locally, a KubeRay cluster of these groups remotely.
RAY_CPU = RayJobConfig(
    head_node_config=HeadNodeConfig(requests=Resources(cpu="2", mem="8Gi")),
    worker_node_config=[WorkerNodeConfig(group_name="cpu", replicas=4, requests=Resources(cpu="8", mem="16Gi"))],
    shutdown_after_job_finishes=True,
    ttl_seconds_after_finished=300,
)


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="2", mem="4Gi"))
def build_world_pool(settings: WorldPoolConfig, parent_run_id: str = "") -> FlyteDirectory:
    return to_flyte_dir(WORLD_POOL.run({}, settings, parent_run_id))


@task(cache=CACHE, container_image=DATA_IMAGE, task_config=RAY_CPU, requests=Resources(cpu="2", mem="4Gi"))
def ingest(world_pool: FlyteDirectory, parallel: ParallelConfig, parent_run_id: str = "") -> FlyteDirectory:
    """The images of a world pool artifact."""
    return to_flyte_dir(INGEST.run(local(world_pool=world_pool), None, parent_run_id, parallel=parallel))


@task(cache=CACHE, container_image=DATA_IMAGE, task_config=RAY_CPU, requests=Resources(cpu="2", mem="4Gi"))
def ingest_folder(source: SourceFolder, parallel: ParallelConfig, parent_run_id: str = "") -> FlyteDirectory:
    """The images of a folder (an entry point's ``--source``)."""
    return to_flyte_dir(INGEST.run(local(source=source), None, parent_run_id, parallel=parallel))


@task(cache=CACHE, container_image=DATA_IMAGE, task_config=RAY_CPU, requests=Resources(cpu="2", mem="4Gi"))
def ingest_uri_table(table: SourceTable, parallel: ParallelConfig, parent_run_id: str = "") -> FlyteDirectory:
    """The images a Parquet table of URIs names."""
    return to_flyte_dir(INGEST.run({"source": Path(table.download())}, None, parent_run_id, parallel=parallel))


@task(cache=CACHE, container_image=DATA_IMAGE, task_config=RAY_CPU, requests=Resources(cpu="2", mem="4Gi"))
def score_images(raw_pool: FlyteDirectory, settings: AnalysisConfig, parallel: ParallelConfig,
                 parent_run_id: str = "") -> FlyteDirectory:
    return to_flyte_dir(SCORING.run(local(raw_pool=raw_pool), settings, parent_run_id, parallel=parallel))


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="2", mem="8Gi"))
def select_images(raw_pool: FlyteDirectory, scores: FlyteDirectory, settings: SelectionSettings,
                  parent_run_id: str = "") -> FlyteDirectory:
    return to_flyte_dir(selection_spec(settings.stage).run(local(raw_pool=raw_pool, scores=scores), settings,
                                                           parent_run_id))
