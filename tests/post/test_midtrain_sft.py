"""Midtraining's top-down mix and the SFT domain sets: domains filled in order from the semantic sample,
word-level keyword matches, shortfalls recorded, results independent of row order; domain sets that obey
their slice of the world; config rules that fail early."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from krea2_core.common.strict import ConfigError
from krea2_core.config import PipelineConfig
from krea2_core.data.config import PackingConfig
from krea2_core.post.config import MidtrainConfig, SFTDomainConfig
from krea2_core.post.midtrain import MidtrainPackingSettings, select_mix
from krea2_core.post.sft import render_domain
from krea2_core.presets import preset
from krea2_core.training.config import TOP_STAGE
from krea2_core.world.captions import captions
from krea2_core.world.config import SceneDomainConfig
from krea2_core.world.scene import Scene


def _sample(n_world: int = 20, n_photo: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [{"id": f"w{i:03d}", "uri": f"/w{i}.png", "source": "world"} for i in range(n_world)]
    rows += [{"id": f"p{i:03d}", "uri": f"/p{i}.jpg", "source": "photos"} for i in range(n_photo)]
    texts = [{"id": r["id"], "long": ('Dark text reads "SALE".' if i % 4 == 0 else "A sword on sand.")}
             for i, r in enumerate(rows)]
    return pd.DataFrame(rows), pd.DataFrame(texts)


def _mix(**domains: dict) -> MidtrainConfig:
    return MidtrainConfig.from_dict({"n_images": 16, "domains": domains,
                                     "stage": {"resolution": 32, "steps": 2, "global_batch": 8, "warmup_steps": 0}})


def _settings(**domains: dict) -> MidtrainPackingSettings:
    """The midtraining packing settings of ``_mix(**domains)`` (select_mix reads the domains and n_images)."""
    config = _mix(**domains)
    packing = PackingConfig(stage="1024", resolution=32, aspect_ratios=[1.0], multiple=8, global_batch=8, seed=0)
    return MidtrainPackingSettings(domains=config.domains, n_images=config.n_images, packing=packing)


def test_domains_fill_in_order_with_word_matches_and_shares() -> None:
    sample, texts = _sample()
    config = _settings(text={"share": 0.25, "keywords": ["text"]}, photos={"share": 0.25, "sources": ["photos"]},
                       rest={"share": 0.5})
    mix, shortfall = select_mix(sample, texts, config, seed=0)
    assert mix["domain"].value_counts().to_dict() == {"text": 4, "photos": 4, "rest": 8}
    assert mix["id"].is_unique
    text_ids = set(texts.loc[texts["long"].str.contains("text"), "id"])
    assert set(mix.loc[mix["domain"] == "text", "id"]) <= text_ids
    assert set(mix.loc[mix["domain"] == "photos", "id"]) <= set(sample.loc[sample["source"] == "photos", "id"])
    assert shortfall == {"text": 0, "photos": 0, "rest": 0}


def test_keywords_match_whole_words_and_shortfall_is_recorded() -> None:
    sample, texts = _sample()
    config = _settings(words={"share": 0.5, "keywords": ["word"]}, rest={"share": 0.5})  # "sword" is not "word"
    mix, shortfall = select_mix(sample, texts, config, seed=0)
    assert (mix["domain"] == "words").sum() == 0 and shortfall["words"] == 8


def test_mix_does_not_depend_on_row_order() -> None:
    sample, texts = _sample()
    config = _settings(text={"share": 0.5, "keywords": ["text"]}, rest={"share": 0.5})
    first, _ = select_mix(sample, texts, config, seed=3)
    second, _ = select_mix(sample.iloc[::-1], texts.sample(frac=1, random_state=1), config, seed=3)
    pd.testing.assert_frame_equal(first.sort_values("id", ignore_index=True), second.sort_values("id", ignore_index=True))


def test_sample_without_source_column_is_a_clear_error() -> None:
    sample, texts = _sample()
    with pytest.raises(ValueError, match="source"):
        select_mix(sample.drop(columns=["source"]), texts, _settings(all={"share": 1.0}), seed=0)


def test_domain_set_obeys_its_slice_of_the_world(tmp_path) -> None:
    domain = preset("tiny").post.sft.domains["warm"]
    domain = SFTDomainConfig(scenes=domain.scenes, n_images=12, seed=5)
    kept, texts = render_domain(domain, 32, tmp_path)
    assert len(kept) == 12 and all((tmp_path / f"{i}.png").is_file() for i in kept["id"])
    for _, row in kept.merge(texts, on="id").iterrows():
        scene = Scene.from_dict(json.loads(row["scene"]))
        assert scene.text is None and 1 <= len(scene.shapes) <= 2
        assert {s.color for s in scene.shapes} <= {"red", "orange", "yellow"}
        assert {s.size for s in scene.shapes} <= {"medium", "large"}
        assert row["long"] == captions(scene)["long"]


def test_post_training_config_rules() -> None:
    tiny = preset("tiny")
    assert tiny.pretrain.stages[TOP_STAGE].resolution == tiny.post.midtrain.stage.resolution == 64
    data = tiny.to_dict()
    data["post"]["midtrain"]["stage"]["resolution"] = 48
    with pytest.raises(ConfigError, match="highest pretraining resolution"):
        PipelineConfig.from_dict(data)
    with pytest.raises(ConfigError, match="sum to 1"):
        _mix(a={"share": 0.5}, b={"share": 0.4})
    with pytest.raises(ConfigError, match="unknown options"):
        SceneDomainConfig(weights={"color": {"magenta": 1.0}})
    with pytest.raises(ConfigError, match="no option with a positive weight"):
        SceneDomainConfig(weights={"size": {"small": 0.0, "medium": 0.0, "large": 0.0}})
