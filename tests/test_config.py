from pathlib import Path

import pytest

from krea2_core.config import ConfigError, PipelineConfig, load_config, preset


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
        ({"semantic": {"embedder": {"kind": "hf"}}}, "semantic.embedder: model_id is required when kind is 'hf'"),
        ({"semantic": {"kmeans": {"levels": [4, 8]}}}, "semantic.kmeans: levels must not grow from fine to coarse"),
        ({"semantic": {"sae": {"k": 0}}}, "semantic.sae: k must be in [1, n_features]"),
        ({"semantic": {"coverage": {"damping": 1.0}}}, "semantic.coverage: damping must be in (0, 1)"),
        ({"captioning": {"shard_size": 0}}, "captioning: shard_size must be >= 1"),
        ({"captioning": {"ocr": {"min_score": 2}}}, "captioning.ocr: min_score must be in [0, 1]"),
        ({"captioning": {"rewriter": {"short_words": 40}}}, "captioning.rewriter: short_words must be below medium_words"),
        ({"captioning": {"captioner": {"kind": "gan"}}}, "captioning.captioner.kind: must be one of ['vlm', 'text_llm']"),
        ({"world": {"weights": {"shape": {}}}}, "world: weights: unknown scene attribute 'shape'"),
        ("x: [1", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("missing.yaml", "config file not found: missing.yaml"),
    ],
)
def test_bad_config_gets_a_clear_error(overrides: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)  # type: ignore[arg-type]
    assert message in str(err.value)
