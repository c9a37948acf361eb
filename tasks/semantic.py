"""Flyte tasks of captioning and semantic curation; the work is in krea2_core."""

from __future__ import annotations

from flytekit import Resources, dynamic, task
from flytekit.types.directory import FlyteDirectory

from containers.images import DATA_IMAGE
from krea2_core.captioning.stages import run_captioning, run_scene_captions
from krea2_core.config import CaptioningConfig, EmbedderConfig, ParallelConfig, SemanticCurationConfig
from krea2_core.curation.stages import run_embedding, run_semantic_selection
from tasks.common import CACHE, from_flyte_dir, to_flyte_dir


def _gpu_if(node, device: str):  # noqa: ANN001, ANN202 - a flytekit node promise
    """Give a model task a GPU when its config asks for CUDA (Flyte resources are static, so a dynamic
    workflow decides at run time)."""
    return node.with_overrides(requests=Resources(cpu="8", mem="32Gi", gpu="1")) if device == "cuda" else node


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="1", mem="2Gi"))
def scene_captions(world_pool: FlyteDirectory, raw_pool: FlyteDirectory, parent_run_id: str = "") -> FlyteDirectory:
    path, _ = run_scene_captions(from_flyte_dir(world_pool), from_flyte_dir(raw_pool), parent_run_id=parent_run_id)
    return to_flyte_dir(path)


# One pod (with a GPU when asked) whose local Ray actors share it by `gpu_fraction`.
@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="4", mem="16Gi"))
def caption_images(curated: FlyteDirectory, scenes: FlyteDirectory, config: CaptioningConfig, parallel: ParallelConfig,
                   parent_run_id: str = "") -> FlyteDirectory:
    path, _ = run_captioning(from_flyte_dir(curated), from_flyte_dir(scenes), config, parallel,
                             parent_run_id=parent_run_id)
    return to_flyte_dir(path)


@dynamic(container_image=DATA_IMAGE)
def caption_on_device(curated: FlyteDirectory, scenes: FlyteDirectory, config: CaptioningConfig,
                      parallel: ParallelConfig, parent_run_id: str = "") -> FlyteDirectory:
    """Captioning with a GPU request when the captioner is asked to run on CUDA."""
    node = caption_images(curated=curated, scenes=scenes, config=config, parallel=parallel, parent_run_id=parent_run_id)
    return _gpu_if(node, config.captioner.device)


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="4", mem="16Gi"))
def embed_images(curated: FlyteDirectory, stage: str, config: EmbedderConfig, parent_run_id: str = "") -> FlyteDirectory:
    path, _ = run_embedding(from_flyte_dir(curated), stage, config, parent_run_id=parent_run_id)
    return to_flyte_dir(path)


@dynamic(container_image=DATA_IMAGE)
def embed_on_device(curated: FlyteDirectory, stage: str, config: EmbedderConfig, parent_run_id: str = "") -> FlyteDirectory:
    """Embedding with a GPU request when the embedder is asked to run on CUDA (on the CPU otherwise)."""
    node = embed_images(curated=curated, stage=stage, config=config, parent_run_id=parent_run_id)
    return _gpu_if(node, config.device)


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="4", mem="16Gi"))
def semantic_select(curated: FlyteDirectory, embeddings: FlyteDirectory, captions: FlyteDirectory,
                    config: SemanticCurationConfig, parent_run_id: str = "") -> FlyteDirectory:
    path, _ = run_semantic_selection(from_flyte_dir(curated), from_flyte_dir(embeddings), from_flyte_dir(captions),
                                     config, parent_run_id=parent_run_id)
    return to_flyte_dir(path)
