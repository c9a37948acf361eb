"""Progressive-resolution pretraining, 256 -> 512 -> 1024 px (32 -> 64 -> 128 px on the tiny preset): per stage,
pack the curated images of that stage into aspect-ratio-bucketed shards, then train from the previous stage's
checkpoint.

    pyflyte run workflows/pretraining.py pretraining --curated '{"256": "<dir>", "512": "<dir>", "1024": "<dir>"}' \
        --captions '{"256": "<dir>", "512": "<dir>", "1024": "<dir>"}' \
        [--preset tiny] [--config overrides.yaml] [--overrides '<inline YAML>']
"""

from __future__ import annotations

from typing import Dict, Optional

from flytekit import dynamic, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from containers.images import DATA_IMAGE
from krea2_core.config import PipelineConfig
from krea2_core.training.config import PRETRAIN_STAGES
from tasks.pipeline import resolve_config
from tasks.pretrain import TRAIN_TASK
from workflows.graph import add_stages

LAST = f"pretrain_{PRETRAIN_STAGES[-1]}"


@workflow
def pretraining(curated: Dict[str, FlyteDirectory], captions: Dict[str, FlyteDirectory], preset: str = "tiny",
                config: Optional[FlyteFile] = None, overrides: str = "", parent_run_id: str = "") -> FlyteDirectory:
    """The last stage's checkpoint from each stage's curated images and their captions (by stage), under a preset with
    YAML overrides."""
    cfg = resolve_config(preset=preset, config=config, overrides=overrides)
    return pretraining_stages(config=cfg, curated=curated, captions=captions, parent_run_id=parent_run_id)


# compiles training tasks at run time: the launch shape they were registered with must be in this pod's environment
@dynamic(container_image=DATA_IMAGE, environment=TRAIN_TASK["environment"])
def pretraining_stages(config: PipelineConfig, curated: Dict[str, FlyteDirectory], captions: Dict[str, FlyteDirectory],
                       parent_run_id: str = "") -> FlyteDirectory:
    if missing := sorted(set(PRETRAIN_STAGES) - set(curated) | set(PRETRAIN_STAGES) - set(captions)):
        raise ValueError(f"pretraining needs every stage's curated images and captions; missing for {missing}")
    have = {**{f"selection_{s}": curated[s] for s in PRETRAIN_STAGES},
            **{f"captioning_{s}": captions[s] for s in PRETRAIN_STAGES}}
    return add_stages(config, have, [LAST], parent_run_id)[LAST]
