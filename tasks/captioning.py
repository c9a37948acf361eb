"""Flyte tasks of captioning: scene-graph captions of the world's images, then a resolution stage's kept images'
captions; the work is in krea2_core.captioning.stages."""

from __future__ import annotations

from flytekit import Resources, task
from flytekit.types.directory import FlyteDirectory

from containers.images import DATA_IMAGE
from krea2_core.captioning.stages import SCENE_CAPTIONS, CaptioningSettings, captioning_spec
from krea2_core.curation.config import ParallelConfig
from tasks.common import CACHE, local, to_flyte_dir


@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="1", mem="2Gi"))
def scene_captions(world_pool: FlyteDirectory, raw_pool: FlyteDirectory, parent_run_id: str = "") -> FlyteDirectory:
    return to_flyte_dir(SCENE_CAPTIONS.run(local(world_pool=world_pool, raw_pool=raw_pool), None, parent_run_id))


# One pod (given a GPU at run time when the captioner runs on CUDA) whose local Ray actors share it by `gpu_fraction`.
@task(cache=CACHE, container_image=DATA_IMAGE, requests=Resources(cpu="4", mem="16Gi"))
def caption_images(curated: FlyteDirectory, scene_captions: FlyteDirectory, settings: CaptioningSettings,
                   parallel: ParallelConfig, parent_run_id: str = "") -> FlyteDirectory:
    return to_flyte_dir(captioning_spec(settings.stage).run(local(curated=curated, scene_captions=scene_captions),
                                                            settings, parent_run_id, parallel=parallel))
