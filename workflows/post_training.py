"""Post-training: midtraining -> SFT per domain + model merging -> preference optimisation (synthetic pairs, then
calibration on human annotations) -> RL (Flow-GRPO without CFG on a multi-reward objective; the aesthetic reward
model is trained on the PO pairs) -> TDM timestep + guidance distillation, from the last pretraining checkpoint.

    pyflyte run workflows/post_training.py post_training --curated <dir> --captions <dir> --selection <dir> \
        --pretrained <checkpoint dir> [--preset tiny] [--config overrides.yaml]

A dynamic workflow: the SFT domains come from the config, so the graph is built when it runs.
"""

from __future__ import annotations

from typing import NamedTuple

from flytekit import dynamic, workflow
from flytekit.types.directory import FlyteDirectory

from containers.images import DATA_IMAGE
from krea2_core.config import PostTrainConfig, PretrainConfig, preset
from krea2_core.models.autoencoders import pixel_multiple
from krea2_core.post.midtrain import midtrain_packing
from krea2_core.post.sft import domain_eval
from tasks.post import annotation_pairs, distill_stage, file_digest, finetune_stage, merge_sft, pack_midtrain, \
    preference_pairs, preference_stage, reward_model, rl_stage, sft_data
from tasks.pipeline import resolve_config
from tasks.pretrain import TRAIN_TASK

_TINY = preset("tiny")


class PostTrained(NamedTuple):
    final: FlyteDirectory  # the RL checkpoint: the full-step model
    distilled: FlyteDirectory  # its few-step, guidance-free student


@workflow
def post_training(curated: FlyteDirectory, captions: FlyteDirectory, selection: FlyteDirectory,
                  pretrained: FlyteDirectory, preset: str = "tiny", config: str = "", parent_run_id: str = ""
                  ) -> PostTrained:
    """Post-training under a preset with YAML overrides (a file or inline)."""
    cfg = resolve_config(preset=preset, overrides=config)
    return post_training_stages(curated=curated, captions=captions, selection=selection, pretrained=pretrained,
                                post=cfg.post, pretrain=cfg.pretrain, parent_run_id=parent_run_id)


# The training tasks are compiled in this task's pod at run time, from its import of tasks.pretrain, which reads
# their launch shape from the environment: the registered shape must be in this pod's environment too.
@dynamic(container_image=DATA_IMAGE, environment=TRAIN_TASK["environment"])
def post_training_stages(curated: FlyteDirectory, captions: FlyteDirectory, selection: FlyteDirectory,
                         pretrained: FlyteDirectory, post: PostTrainConfig = _TINY.post,
                         pretrain: PretrainConfig = _TINY.pretrain, parent_run_id: str = "") -> PostTrained:
    """The final checkpoint (after RL) and its distilled student. The data tasks get only the part of the config
    their output depends on, so a training change never re-packs."""
    packed = pack_midtrain(curated=curated, captions=captions, selection=selection, config=post.midtrain,
                           packing=midtrain_packing(pretrain, post.midtrain), parent_run_id=parent_run_id)
    midtrained = finetune_stage(packed=packed, init=pretrained, name="midtrain", stage=post.midtrain.stage,
                                config=pretrain, parent_run_id=parent_run_id)
    domains = {}
    for name, domain in post.sft.domains.items():
        data = sft_data(name=name, domain=domain, sft=post.sft, multiple=pixel_multiple(pretrain.autoencoder),
                        parent_run_id=parent_run_id)
        domains[name] = finetune_stage(packed=data, init=midtrained, name=f"sft_{name}", stage=post.sft.stage,
                                       config=domain_eval(pretrain, domain, post.sft), parent_run_id=parent_run_id)
    merged = merge_sft(base=midtrained, sft=domains, post=post, pretrain=pretrain, parent_run_id=parent_run_id)
    po = post.preference
    pairs = preference_pairs(policy=merged, previous=midtrained, config=po, pretrain=pretrain,
                             resolution=post.resolution, parent_run_id=parent_run_id)
    synthetic = preference_stage(pairs=pairs, init=merged, name="synthetic", config=po, pretrain=pretrain,
                                 resolution=post.resolution, parent_run_id=parent_run_id)
    labelled = annotation_pairs(annotations=po.annotations, annotations_digest=file_digest(path=po.annotations),
                                policy=synthetic, previous=midtrained, config=po, pretrain=pretrain,
                                resolution=post.resolution, parent_run_id=parent_run_id)
    calibrated = preference_stage(pairs=labelled, init=synthetic, name="calibration", config=po, pretrain=pretrain,
                                  resolution=post.resolution, parent_run_id=parent_run_id)
    rewards = post.rl.rewards
    # the aesthetic reward is a model by id when one is named; otherwise it is trained here on the PO pairs
    aesthetic = (reward_model(pairs=[pairs, labelled], config=post.rl.reward_model, parent_run_id=parent_run_id)
                 if rewards.weights.get("aesthetic", 0.0) > 0 and not rewards.aesthetic_model else None)
    final = rl_stage(init=calibrated, reward_model=aesthetic, config=post.rl, pretrain=pretrain,
                     resolution=post.resolution, parent_run_id=parent_run_id)
    distilled = distill_stage(teacher=final, config=post.distill, pretrain=pretrain, resolution=post.resolution,
                              parent_run_id=parent_run_id)
    return PostTrained(final=final, distilled=distilled)
