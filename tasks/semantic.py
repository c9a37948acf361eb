"""Flyte tasks of captioning-from-scene-graphs and semantic curation; the work is in krea2_core."""

from __future__ import annotations

from flytekit import Resources, dynamic, task
from flytekit.types.directory import FlyteDirectory

from containers.images import DATA_IMAGE
from krea2_core.captioning.stages import run_world_captions
from krea2_core.config import EmbedderConfig, SemanticCurationConfig
from krea2_core.curation.stages import run_embedding, run_semantic_selection
from tasks.common import CACHE, from_flyte_dir, to_flyte_dir


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="1", mem="2Gi"))
def world_captions(world_pool: FlyteDirectory, raw_pool: FlyteDirectory, parent_run_id: str = "") -> FlyteDirectory:
    path, _ = run_world_captions(from_flyte_dir(world_pool), from_flyte_dir(raw_pool), parent_run_id=parent_run_id)
    return to_flyte_dir(path)


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="4", mem="16Gi"))
def embed_images(curated: FlyteDirectory, stage: str, config: EmbedderConfig, parent_run_id: str = "") -> FlyteDirectory:
    path, _ = run_embedding(from_flyte_dir(curated), stage, config, parent_run_id=parent_run_id)
    return to_flyte_dir(path)


@dynamic(container_image=DATA_IMAGE)
def embed_on_device(curated: FlyteDirectory, stage: str, config: EmbedderConfig, parent_run_id: str = "") -> FlyteDirectory:
    """Embedding with a GPU request when the embedder is asked to run on CUDA (on the CPU otherwise)."""
    node = embed_images(curated=curated, stage=stage, config=config, parent_run_id=parent_run_id)
    if config.device == "cuda":
        return node.with_overrides(requests=Resources(cpu="8", mem="32Gi", gpu="1"))
    return node


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="4", mem="16Gi"))
def semantic_select(curated: FlyteDirectory, embeddings: FlyteDirectory, captions: FlyteDirectory,
                    config: SemanticCurationConfig, parent_run_id: str = "") -> FlyteDirectory:
    path, _ = run_semantic_selection(from_flyte_dir(curated), from_flyte_dir(embeddings), from_flyte_dir(captions),
                                     config, parent_run_id=parent_run_id)
    return to_flyte_dir(path)
