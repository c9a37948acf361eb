"""Flyte tasks of semantic curation (embedding, midtraining selection); the work is in krea2_core.curation.stages."""

from __future__ import annotations

from flytekit import Resources, task
from flytekit.types.directory import FlyteDirectory

from containers.images import DATA_IMAGE
from krea2_core.curation.selection import SemanticSelectionSettings
from krea2_core.curation.config import EmbedderConfig
from krea2_core.curation.stages import EMBEDDING, SEMANTIC_SELECTION
from tasks.common import CACHE, local, to_flyte_dir


# given a GPU at run time when the embedder runs on CUDA
@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="4", mem="16Gi"))
def embed_images(curated: FlyteDirectory, settings: EmbedderConfig, parent_run_id: str = "") -> FlyteDirectory:
    return to_flyte_dir(EMBEDDING.run(local(curated=curated), settings, parent_run_id))


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="4", mem="16Gi"))
def semantic_select(curated: FlyteDirectory, embeddings: FlyteDirectory, captions: FlyteDirectory,
                    settings: SemanticSelectionSettings, parent_run_id: str = "") -> FlyteDirectory:
    return to_flyte_dir(SEMANTIC_SELECTION.run(local(curated=curated, embeddings=embeddings, captions=captions),
                                               settings, parent_run_id))
