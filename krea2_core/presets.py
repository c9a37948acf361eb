"""The built-in presets: ``tiny`` (CPU, minutes: the leaf configs' defaults), ``small`` (one GPU) and ``full``
(a cluster), built from keyword-argument builders of their sections. Why their values are what they are:
docs/presets.md."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from krea2_core.captioning.config import CaptionerConfig, CaptioningConfig, OcrConfig, RewriterConfig
from krea2_core.common.strict import ConfigError
from krea2_core.config import PipelineConfig
from krea2_core.curation.config import CurationConfig, EmbedderConfig, ParallelConfig, stage_filters
from krea2_core.expander.config import (ExpanderConfig, ExpanderDataConfig, ExpanderRLConfig, ExpanderSFTConfig,
                                        ExpansionConfig)
from krea2_core.models.config import AutoencoderConfig, DiTConfig, TextEncoderConfig
from krea2_core.post.config import (DistillConfig, GRPOConfig, MergeConfig, MidtrainConfig, PairsConfig,
                                    PostTrainConfig, PreferenceConfig, PreferenceStageConfig, PromptPoolConfig,
                                    RewardModelConfig, RewardsConfig, RLConfig, SamplerConfig, SFTConfig,
                                    warm_and_cool_domains)
from krea2_core.training.config import PretrainConfig, PretrainStageConfig, RepaConfig, TrainParallelConfig
from krea2_core.world.config import WorldPoolConfig

# Krea 2 at diffusers' default size (hidden 6144, 28 blocks) and a ~1B model of the same shape for one GPU.
FULL_DIT = DiTConfig(in_channels=64, num_layers=28, attention_head_dim=128, num_attention_heads=48,
                     num_key_value_heads=12, intermediate_size=16384, timestep_embed_dim=256, text_hidden_dim=2560,
                     num_text_layers=12, text_num_attention_heads=20, text_num_key_value_heads=20,
                     text_intermediate_size=6912, num_layerwise_text_blocks=2, num_refiner_text_blocks=2,
                     axes_dims_rope=[32, 48, 48])
SMALL_DIT = dataclasses.replace(FULL_DIT, num_layers=16, num_attention_heads=16, num_key_value_heads=4,
                                intermediate_size=5632)


def gpu_captioning() -> CaptioningConfig:
    """A VLM that sees the image writes the long caption; a cheaper LLM rewrites it. Four actors per GPU."""
    return CaptioningConfig(
        captioner=CaptionerConfig(kind="vlm", model_id="Qwen/Qwen3-VL-8B-Instruct", max_new_tokens=300, batch_size=16,
                                  device="cuda"),
        rewriter=RewriterConfig(model_id="Qwen/Qwen3-4B-Instruct-2507", max_new_tokens=96, device="cuda"),
        shard_size=256, gpu_fraction=0.25)


def gpu_pretraining(*, nnodes: int, gpus_per_node: int, tp: int, model: DiTConfig, text_model: str,
                    vae: str) -> PretrainConfig:
    """Real 256/512/1024 px on ``text_model``'s features (12 tapped layers) and the ``vae`` (Qwen Image: 16 channels,
    /8, 2x2 patches), bf16 + FSDP2 (+ TP ``tp``), float8 tensorwise at 256 and rowwise at 512, bf16 at 1024."""
    stages = {
        "256": PretrainStageConfig(resolution=256, steps=200_000, global_batch=2048, lr=3e-4, warmup_steps=2000,
                                   timestep_shift=1.0, float8="tensorwise", repa=True, pma_interval=2000,
                                   checkpoint_every_s=1800, val_every=2000),
        "512": PretrainStageConfig(resolution=512, steps=100_000, global_batch=1024, lr=2e-4, warmup_steps=1000,
                                   timestep_shift=2.0, float8="rowwise", pma_interval=2000, checkpoint_every_s=1800,
                                   val_every=2000),
        "1024": PretrainStageConfig(resolution=1024, steps=50_000, global_batch=512, lr=1e-4, warmup_steps=500,
                                    timestep_shift=3.0, pma_interval=1000, checkpoint_every_s=1800, val_every=1000),
    }
    return PretrainConfig(
        model=model,
        autoencoder=AutoencoderConfig(kind="qwen_image", model_id=vae, patch_size=2, device="cuda"),
        text_encoder=TextEncoderConfig(kind="hf", model_id=text_model, layers=[3, 6, 9, 12, 15, 18, 21, 24, 27, 30,
                                                                               33, 36], max_tokens=256,
                                       device="cuda"),
        parallel=TrainParallelConfig(device="cuda", nnodes=nnodes, nproc_per_node=gpus_per_node, tp=tp,
                                     activation_checkpointing="selective", compile=True, dtype="bfloat16"),
        repa=RepaConfig(encoder="hf", model_id="facebook/dinov3-vitb16-pretrain-lvd1689m", block=8),
        stages=stages,
    )


def gpu_post_training() -> PostTrainConfig:
    """Everything at 1024 px: midtraining at a lower lr than the 1024 stage, short SFT, PO pairs and Flow-GRPO at
    scale, TDM distillation."""
    return PostTrainConfig(
        resolution=1024,
        midtrain=MidtrainConfig(n_images=2_000_000, stage=PretrainStageConfig(
            resolution=1024, steps=20_000, global_batch=512, lr=5e-5, warmup_steps=200, timestep_shift=3.0,
            pma_interval=1000, checkpoint_every_s=1800, val_every=1000)),
        sft=SFTConfig(domains={name: dataclasses.replace(d, n_images=20_000)
                               for name, d in warm_and_cool_domains().items()},
                      stage=PretrainStageConfig(resolution=1024, steps=2000, global_batch=128, lr=1e-5,
                                                warmup_steps=100, timestep_shift=3.0, pma_interval=200,
                                                checkpoint_every_s=1800, val_every=200),
                      eval_prompts=64),
        preference=PreferenceConfig(
            pairs=PairsConfig(n_prompts=50_000, policy=SamplerConfig(steps=50),
                              opponents=[SamplerConfig(checkpoint="previous", steps=50), SamplerConfig(steps=8),
                                         SamplerConfig(steps=50)]),
            synthetic=PreferenceStageConfig(steps=4000, global_batch=256, lr=1e-6, warmup_steps=100, log_every=20),
            calibration=PreferenceStageConfig(steps=500, global_batch=64, lr=5e-7, warmup_steps=20, log_every=10),
            simulated_annotations=32, eval_prompts=256, timestep_shift=3.0),
        merge=MergeConfig(compare=True),
        rl=RLConfig(
            rewards=RewardsConfig(weights={"rubric": 1.0, "aesthetic": 0.5, "text": 0.5, "artifact": 0.5}, ocr=OcrConfig(),
                                  actor_gpus=0.25),
            reward_model=RewardModelConfig(embedder=EmbedderConfig(kind="hf", model_id="google/siglip2-base-patch16-224",
                                                                   device="cuda"), hidden=256, steps=5000),
            pool=PromptPoolConfig(n_prompts=20_000, min_active=512),
            grpo=GRPOConfig(steps=2000, prompts_per_step=48, group_size=16, sample_steps=10, train_timesteps=6,
                            lr=1e-6, warmup_steps=20, log_every=10),
            eval_prompts=256, diversity_prompts=64, diversity_samples=8),
        distill=DistillConfig(steps=4000, batch=64, lr=2e-6, fake_lr=2e-5, warmup_steps=100, n_prompts=100_000,
                              eval_prompts=256, log_every=20),
    )


def gpu_expander() -> ExpanderConfig:
    """A real open LLM on one GPU: Qwen3 writes the user prompts and is finetuned; images from the distilled model."""
    return ExpanderConfig(
        data=ExpanderDataConfig(writer_model="Qwen/Qwen3-4B-Instruct-2507", n_pairs=50_000, thinking_words=60,
                                max_new_tokens=128, batch_size=64, device="cuda"),
        sft=ExpanderSFTConfig(model_id="Qwen/Qwen3-1.7B", steps=3000, batch_size=32, lr=1e-5, warmup_steps=100,
                              max_tokens=512, eval_prompts=256, log_every=20, device="cuda"),
        expansion=ExpansionConfig(max_words=200, max_new_tokens=384),
        rl=ExpanderRLConfig(steps=500, prompts_per_step=32, group_size=8, n_prompts=20_000, n_candidates=4000,
                            lr=1e-6, warmup_steps=20, image_cfg=1.0,
                            embedder=EmbedderConfig(kind="hf", model_id="facebook/dinov3-vitb16-pretrain-lvd1689m",
                                                    device="cuda"),
                            eval_prompts=256, diversity_prompts=64, diversity_samples=8, log_every=10,
                            device="cuda"),
    )


def gpu_pipeline(*, name: str, world: WorldPoolConfig, parallel: ParallelConfig,
                 pretrain: PretrainConfig) -> PipelineConfig:
    """A GPU preset: real 256/512/1024 px curation stages and the GPU captioning, post-training and expander."""
    return PipelineConfig(
        preset=name,
        world=world,
        curation=CurationConfig(stages=stage_filters(min_side_256=256, min_side_512=512, min_side_1024=1024),
                                parallel=parallel),
        captioning=gpu_captioning(),
        pretrain=pretrain,
        post=gpu_post_training(),
        expander=gpu_expander(),
    )


def tiny() -> PipelineConfig:
    """CPU, minutes: every section's defaults."""
    return PipelineConfig(preset="tiny")


def small() -> PipelineConfig:
    """One GPU: the ~1B DiT."""
    return gpu_pipeline(
        name="small",
        world=WorldPoolConfig(n_scenes=5000, min_side=256, max_side=1024, n_exact_duplicates=200,
                              n_near_duplicates=400, n_color_variants=200, n_per_defect=50, max_real_images=300),
        parallel=ParallelConfig(num_cpus=8),
        pretrain=gpu_pretraining(nnodes=1, gpus_per_node=1, tp=1, model=SMALL_DIT,
                                 text_model="Qwen/Qwen3-VL-4B-Instruct", vae="Qwen/Qwen-Image"),
    )


def full() -> PipelineConfig:
    """A cluster: Krea 2's size on 8 nodes x 8 GPUs."""
    return gpu_pipeline(
        name="full",
        world=WorldPoolConfig(n_scenes=20000, min_side=256, max_side=1536, n_exact_duplicates=500,
                              n_near_duplicates=1000, n_color_variants=500, n_per_defect=200, max_real_images=300),
        parallel=ParallelConfig(num_cpus=64, shard_size=512),
        pretrain=gpu_pretraining(nnodes=8, gpus_per_node=8, tp=2, model=FULL_DIT,
                                 text_model="Qwen/Qwen3-VL-4B-Instruct", vae="Qwen/Qwen-Image"),
    )


PRESETS: dict[str, Callable[[], PipelineConfig]] = {"tiny": tiny, "small": small, "full": full}


def preset(name: str) -> PipelineConfig:
    """The built-in preset ``tiny`` (CPU, minutes), ``small`` (one GPU) or ``full`` (cluster)."""
    if not (isinstance(name, str) and name in PRESETS):  # a YAML override may give any value, hashable or not
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
