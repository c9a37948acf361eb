from pathlib import Path

import pytest

from krea2_core.common.strict import ConfigError
from krea2_core.config import PipelineConfig, load_config
from krea2_core.presets import preset


@pytest.mark.parametrize("name", ["tiny", "small", "full"])
def test_presets_are_valid_and_round_trip(name: str) -> None:
    config = preset(name)
    assert config.preset == name
    assert set(config.curation.stages) == {"256", "512", "1024"}
    assert PipelineConfig.from_dict(config.to_dict()) == config


def test_tiny_stages_stand_for_256_512_1024_at_32_64_128() -> None:
    stages = preset("tiny").curation.stages
    assert [stages[s].min_side for s in ("256", "512", "1024")] == [32, 64, 128]


def test_overrides_merge_deeply_from_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "over.yaml"
    path.write_text('curation:\n  stages:\n    "512":\n      min_side: 100\n  dedup:\n    max_phash_distance: 10\n')
    config = load_config("tiny", path)
    assert config.curation.stages["512"].min_side == 100
    assert config.curation.stages["512"].max_aspect == preset("tiny").curation.stages["512"].max_aspect
    assert config.curation.stages["256"] == preset("tiny").curation.stages["256"]
    assert config.curation.dedup.max_phash_distance == 10


def test_inline_yaml_and_preset_switch() -> None:
    assert load_config("tiny", "world:\n  seed: 5\n").world.seed == 5
    assert load_config("tiny", {"preset": "small"}).preset == "small"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"curation": {"stages": {"256": {"min_side": -1}}}}, "curation.stages.256: min_side must be >= 1"),
        ({"curation": {"dedupe": {}}}, "curation: unknown key(s) ['dedupe']"),
        ({"world": {"seed": "abc"}}, "world.seed: expected int, got 'abc'"),
        ({"world": {"seed": True}}, "world.seed: expected int"),
        ({"curation": {"parallel": {"backend": "gpu"}}}, "curation.parallel.backend: must be one of ['ray', 'serial']"),
        ({"curation": {"stages": {"2048": {"max_aspect": 2}}}}, "curation.stages.2048"),
        ({"curation": {"stages": {"256": {"max_white_ratio": 1.5}}}}, "max_white_ratio must be in [0, 1]"),
        ({"curation": {"dedup": {"max_phash_distance": 144}}}, "dedup.max_phash_distance must be < 144"),
        ({"world": {"min_side": 500, "max_side": 100}}, "world: needs 32 <= min_side <= max_side"),
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"preset": ["tiny"]}, "unknown preset ['tiny']; choose one of: tiny, small, full"),
        ({"semantic": {"embedder": {"kind": "hf"}}}, "semantic.embedder: model_id is required when kind is 'hf'"),
        ({"semantic": {"kmeans": {"levels": [4, 8]}}}, "semantic.kmeans: levels must not grow from fine to coarse"),
        ({"semantic": {"sae": {"k": 0}}}, "semantic.sae: k must be in [1, n_features]"),
        ({"semantic": {"coverage": {"damping": 1.0}}}, "semantic.coverage: damping must be in (0, 1)"),
        ({"curation": {"stages": {"256": {"min_pixel_correlation": 1.5}}}},
         "curation.stages.256: min_pixel_correlation must be in [-1, 1], got 1.5"),
        ({"curation": {"dedup": {"source_priority": ["crawl", "crawl"]}}},
         "curation.dedup: source_priority names a source twice"),
        ({"captioning": {"shard_size": 0}}, "captioning: shard_size must be >= 1"),
        ({"captioning": {"ocr": {"min_score": 2}}}, "captioning.ocr: min_score must be in [0, 1]"),
        ({"captioning": {"rewriter": {"short_words": 40}}}, "captioning.rewriter: short_words must be below medium_words"),
        ({"captioning": {"captioner": {"kind": "gan"}}}, "captioning.captioner.kind: must be one of ['vlm', 'text_llm']"),
        ({"world": {"weights": {"shape": {}}}}, "world: weights: unknown scene attribute 'shape'"),
        ({"pretrain": {"caption_ratios": [0.7, 0.2, 0.2]}}, "pretrain: caption_ratios (long, medium, short) must be 3"),
        ({"pretrain": {"model": {"num_key_value_heads": 3}}}, "pretrain.model: num_attention_heads (4) must be a multiple"),
        ({"pretrain": {"model": {"axes_dims_rope": [8, 8, 8]}}}, "axes_dims_rope must be 3 even sizes summing to"),
        ({"pretrain": {"model": {"in_channels": 12}}}, "pretrain: model.in_channels (12) must equal the autoencoder's"),
        ({"pretrain": {"text_encoder": {"layers": [1, 2]}}}, "model.num_text_layers (3) must equal the number of tapped"),
        ({"pretrain": {"stages": {"256": {"global_batch": 7}}}}, "stages.256.global_batch (7) must be divisible by the"),
        ({"pretrain": {"stages": {"256": {"warmup_steps": 320}}}}, "pretrain.stages.256: warmup_steps must be in [0, steps)"),
        ({"pretrain": {"stages": {"2048": {"resolution": 64, "steps": 100}}}}, "stages must be a non-empty subset"),
        ({"pretrain": {"stages": {"256": {"world_scenes": {"n": -1}}}}}, "pretrain.stages.256.world_scenes: n must be >= 0"),
        ({"pretrain": {"stages": {"512": {"eval_every": -5}}}}, "pretrain.stages.512: eval_every must be >= 0"),
        ({"pretrain": {"eval": {"n_prompts": 0}}}, "pretrain.eval: n_prompts and steps must be >= 1"),
        ({"pretrain": {"eval": {"batch": 0}}}, "pretrain.eval: batch must be >= 1"),
        ({"pretrain": {"text_encoder": {"cache_mb": -1}}}, "pretrain.text_encoder: cache_mb must be >= 0"),
        ({"pretrain": {"autoencoder": {"kind": "flux2"}}}, "model_id is required when kind is 'flux2'"),
        ({"pretrain": {"parallel": {"tp": 3}}}, "pretrain.parallel: tp (3) must divide the world size (2)"),
        ({"pretrain": {"optimizer": {"betas": [0.9]}}}, "betas must be two values in [0, 1)"),
        ({"post": {"rl": {"rewards": {"weights": {"beauty": 1.0}}}}}, "post.rl.rewards: weights: unknown rewards ['beauty']"),
        ({"post": {"rl": {"rewards": {"weights": {"rubric": 0.0, "aesthetic": 0.0, "text": 0.0, "artifact": 0.0}}}}},
         "at least one > 0"),
        ({"post": {"rl": {"grpo": {"group_size": 1}}}}, "post.rl.grpo: group_size must be >= 2"),
        ({"post": {"rl": {"grpo": {"train_timesteps": 10}}}}, "train_timesteps <= sample_steps - 1"),
        ({"post": {"rl": {"grpo": {"prompts_per_step": 9}}}}, "prompts_per_step (9) must be <= pool.min_active (8)"),
        ({"post": {"rl": {"pool": {"hopeless": 0.95}}}}, "post.rl.pool: need 0 <= hopeless < too_easy <= 1"),
        ({"post": {"rl": {"grpo": {"prompts_per_step": 3, "group_size": 3}}}},
         "rl.grpo prompts_per_step x group_size global_batch (9) must be divisible"),
        ({"post": {"distill": {"student_steps": 0}}}, "post.distill: student_steps must be in 1..16"),
        ({"post": {"distill": {"batch": 7}}}, "post.distill.batch global_batch (7) must be divisible"),
        ({"expander": {"rl": {"weights": {"beauty": 1.0}}}}, "expander.rl: weights: unknown rewards ['beauty']"),
        ({"expander": {"rl": {"weights": {"image": 0.0, "faithfulness": 0.0, "diversity": 0.0}}}}, "at least one > 0"),
        ({"expander": {"rl": {"group_size": 1}}}, "expander.rl: group_size and diversity_samples must be >= 2"),
        ({"expander": {"rl": {"hopeless": 0.95}}}, "expander.rl: need 0 <= hopeless < too_easy <= 1"),
        ({"expander": {"rl": {"top_p": 0.0}}}, "expander.rl: temperature must be > 0 and top_p in (0, 1]"),
        ({"expander": {"rl": {"image_cfg": 0.5}}}, "expander.rl: image_cfg must be >= 1"),
        ({"expander": {"data": {"photo_bias": 1.5}}}, "expander.data: photo_bias must be in [0, 1]"),
        ({"expander": {"data": {"artistic_weight": 0}}}, "expander.data: artistic_weight must be > 0"),
        ({"expander": {"sft": {"max_tokens": 16}}}, "expander.sft: max_tokens must be >= 32"),
        ({"expander": {"sft": {"warmup_steps": 20}}}, "expander.sft: warmup_steps must be in [0, steps)"),
        ({"expander": {"expansion": {"max_new_tokens": 8}}}, "expander.expansion: max_new_tokens must be >= 16"),
        ("x: [1", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("missing.yaml", "config file not found: missing.yaml"),
        ("overrides", "config file not found: overrides (inline overrides must be a YAML mapping)"),
    ],
)
def test_bad_config_gets_a_clear_error(overrides: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)  # type: ignore[arg-type]
    assert message in str(err.value)


def test_every_pretraining_stage_needs_its_curation_stage() -> None:
    data = load_config("tiny").to_dict()
    del data["curation"]["stages"]["512"]
    with pytest.raises(ConfigError, match=r"curation.stages must select images for every pretraining stage; it lacks "
                                          r"\['512'\]"):
        PipelineConfig.from_dict(data)
