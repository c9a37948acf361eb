"""The whole pipeline. With no arguments it runs every stage on the tiny preset:

    pyflyte run workflows/end_to_end.py krea2_pipeline
    pyflyte run workflows/end_to_end.py krea2_pipeline --preset small --config my_overrides.yaml \
        --overrides 'post: {distill: {lr: 1e-5}}'

Stages: world pool -> curation (ingest, scoring, per-resolution selection) -> captioning (OCR, long captions,
rewrites; world images keep their scene-graph captions) -> semantic curation (midtraining selection) -> pretraining
256 -> 512 -> 1024 px (packing per stage, then training from the previous stage's checkpoint) -> post-training:
midtraining, SFT per domain + model merging, preference optimisation (synthetic pairs, then calibration on human
annotations), RL (Flow-GRPO without CFG, multi-reward), TDM timestep distillation -> the prompt expander (SFT data
from the captions, SFT, GDPO RL through the distilled model's images).

The stages' graph is built from their specs when ``pipeline_stages`` runs (workflows/graph.py).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

from flytekit import dynamic, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from containers.images import DATA_IMAGE
from krea2_core.config import PipelineConfig
from krea2_core.training.config import PRETRAIN_STAGES
from tasks.pipeline import finish_pipeline, resolve_config, start_pipeline
from tasks.pretrain import TRAIN_TASK
from workflows.graph import add_stages

# what the pipeline reports, by the stage that makes it
OUTPUTS = {"midtrain": "semantic_selection", "pretrained": "pretrain_1024", "final": "rl",
           "distilled": "distill", "expander": "expander_rl"}


class PipelineOutputs(NamedTuple):
    curated: Dict[str, FlyteDirectory]  # by resolution stage
    midtrain: FlyteDirectory
    pretrained: FlyteDirectory
    final: FlyteDirectory
    distilled: FlyteDirectory
    expander: FlyteDirectory


@workflow
def krea2_pipeline(preset: str = "tiny", config: Optional[FlyteFile] = None, overrides: str = "") -> str:
    cfg = resolve_config(preset=preset, config=config, overrides=overrides)
    parent_run_id = start_pipeline(config=cfg)
    out = pipeline_stages(config=cfg, parent_run_id=parent_run_id)
    return finish_pipeline(parent_run_id=parent_run_id, curated=out.curated, midtrain=out.midtrain,
                           pretrained=out.pretrained, final=out.final, distilled=out.distilled, expander=out.expander)


# A dynamic's nodes are compiled in its pod at run time, from its import of tasks.pretrain, which reads the training
# tasks' launch shape from the environment: the registered shape must be in this pod's environment too.
@dynamic(container_image=DATA_IMAGE, environment=TRAIN_TASK["environment"])
def pipeline_stages(config: PipelineConfig, parent_run_id: str = "") -> PipelineOutputs:
    curated = {stage: f"selection_{stage}" for stage in PRETRAIN_STAGES}
    have = add_stages(config, {}, [*curated.values(), *OUTPUTS.values()], parent_run_id)
    return PipelineOutputs(curated={stage: have[name] for stage, name in curated.items()},
                           **{name: have[stage] for name, stage in OUTPUTS.items()})
