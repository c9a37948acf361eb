"""Post-training: midtraining -> SFT per domain + model merging -> preference optimisation (synthetic pairs, then
calibration on human annotations) -> RL (Flow-GRPO without CFG on a multi-reward objective; the aesthetic reward
model is trained on the PO pairs) -> TDM timestep + guidance distillation, from the last pretraining checkpoint
(``--curated`` and ``--captions``: the top resolution stage's, whose images midtraining selects from).

    pyflyte run workflows/post_training.py post_training --curated <dir> --captions <dir> --selection <dir> \
        --pretrained <checkpoint dir> [--preset tiny] [--config overrides.yaml] [--overrides '<inline YAML>']
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from flytekit import dynamic, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from containers.images import DATA_IMAGE
from krea2_core.config import PipelineConfig
from krea2_core.training.config import TOP_STAGE
from tasks.pipeline import resolve_config
from tasks.pretrain import TRAIN_TASK
from workflows.graph import add_stages
from workflows.pretraining import LAST


class PostTrained(NamedTuple):
    final: FlyteDirectory  # the RL checkpoint: the full-step model
    distilled: FlyteDirectory  # its few-step, guidance-free student


@workflow
def post_training(curated: FlyteDirectory, captions: FlyteDirectory, selection: FlyteDirectory,
                  pretrained: FlyteDirectory, preset: str = "tiny", config: Optional[FlyteFile] = None,
                  overrides: str = "", parent_run_id: str = "") -> PostTrained:
    """Post-training under a preset with YAML overrides."""
    cfg = resolve_config(preset=preset, config=config, overrides=overrides)
    return post_training_stages(config=cfg, curated=curated, captions=captions, selection=selection,
                                pretrained=pretrained, parent_run_id=parent_run_id)


# compiles training tasks at run time: the launch shape they were registered with must be in this pod's environment
@dynamic(container_image=DATA_IMAGE, environment=TRAIN_TASK["environment"])
def post_training_stages(config: PipelineConfig, curated: FlyteDirectory, captions: FlyteDirectory,
                         selection: FlyteDirectory, pretrained: FlyteDirectory, parent_run_id: str = ""
                         ) -> PostTrained:
    """The final checkpoint (after RL) and its distilled student."""
    have = {f"selection_{TOP_STAGE}": curated, f"captioning_{TOP_STAGE}": captions, "semantic_selection": selection,
            LAST: pretrained}
    have = add_stages(config, have, ["rl", "distill"], parent_run_id)
    return PostTrained(final=have["rl"], distilled=have["distill"])
