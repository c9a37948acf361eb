"""The whole pipeline. With no arguments it runs every stage that exists on the tiny preset:

    pyflyte run workflows/end_to_end.py krea2_pipeline
    pyflyte run workflows/end_to_end.py krea2_pipeline --preset small --config my_overrides.yaml

Stages so far: world pool -> curation (ingest, scoring, per-resolution selection) -> captioning (OCR, long
captions, rewrites; world images keep their scene-graph captions) -> semantic curation (midtraining selection)
-> pretraining 256 -> 512 -> 1024 px (packing per stage, then training from the previous stage's checkpoint)
-> post-training: midtraining, SFT per domain + model merging, preference optimisation (synthetic pairs, then
calibration on human annotations), RL (Flow-GRPO without CFG, multi-reward), TDM timestep distillation
-> the prompt expander (SFT data from the captions, SFT, GDPO RL through the distilled model's images).
"""

from __future__ import annotations

from flytekit import workflow

from tasks.curation import build_world_pool, ingest
from tasks.pipeline import finish_pipeline, resolve_config, start_pipeline
from tasks.semantic import caption_on_device, scene_captions
from workflows.curation import curate_raw_pool
from workflows.expander import prompt_expander_stages
from workflows.post_training import post_training_stages
from workflows.pretraining import pretraining_stages
from workflows.semantic_curation import semantic_curation_stages


@workflow
def krea2_pipeline(preset: str = "tiny", config: str = "") -> str:
    cfg = resolve_config(preset=preset, overrides=config)
    parent_run_id = start_pipeline(config=cfg)
    pool = build_world_pool(config=cfg.world, parent_run_id=parent_run_id)
    raw_pool = ingest(source=pool, parallel=cfg.curation.parallel, parent_run_id=parent_run_id)
    curated = curate_raw_pool(raw_pool=raw_pool, config=cfg.curation, parent_run_id=parent_run_id)
    scenes = scene_captions(world_pool=pool, raw_pool=raw_pool, parent_run_id=parent_run_id)
    captions = caption_on_device(curated=curated, scenes=scenes, config=cfg.captioning, parallel=cfg.curation.parallel,
                                 parent_run_id=parent_run_id)
    midtrain = semantic_curation_stages(curated=curated, captions=captions, config=cfg.semantic,
                                        parent_run_id=parent_run_id)
    pretrained = pretraining_stages(curated=curated, captions=captions, config=cfg.pretrain,
                                    parallel=cfg.curation.parallel, parent_run_id=parent_run_id)
    trained = post_training_stages(curated=curated, captions=captions, selection=midtrain, pretrained=pretrained,
                                   post=cfg.post, pretrain=cfg.pretrain, parent_run_id=parent_run_id)
    expander = prompt_expander_stages(captions=captions, image_model=trained.distilled, config=cfg.expander,
                                      pretrain=cfg.pretrain, resolution=cfg.post.resolution,
                                      parent_run_id=parent_run_id)
    return finish_pipeline(parent_run_id=parent_run_id, curated=curated, midtrain=midtrain, pretrained=pretrained,
                           final=trained.final, distilled=trained.distilled, expander=expander)
