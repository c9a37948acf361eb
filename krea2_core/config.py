"""The pipeline config: every section composed into ``PipelineConfig``, its cross-section checks, and strict YAML
loading (``load_config``: a preset with overrides merged on top).

Configs are plain dataclasses so Flyte can pass them between tasks and use their values as cache keys. Each leaf
config lives beside the code that uses it, in ``krea2_core/<area>/config.py`` (world, curation, captioning, models,
training, data, post, expander), and builds strictly from plain data (``krea2_core/common/strict.py``); the
presets are in ``krea2_core/presets.py`` (docs/architecture.md#where-configs-live).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from krea2_core.captioning.config import CaptioningConfig
from krea2_core.common.strict import ConfigError, Strict, require
from krea2_core.curation.config import CurationConfig, SemanticCurationConfig, stage_filters
from krea2_core.expander.config import ExpanderConfig
from krea2_core.post.config import PostTrainConfig
from krea2_core.training.config import PretrainConfig
from krea2_core.world.config import WorldPoolConfig


@dataclass
class PipelineConfig(Strict):
    preset: Literal["tiny", "small", "full"] = "tiny"
    world: WorldPoolConfig = field(default_factory=WorldPoolConfig)
    # the tiny preset's minimum sides (why 32/64/128: docs/presets.md)
    curation: CurationConfig = field(default_factory=lambda: CurationConfig(
        stages=stage_filters(min_side_256=32, min_side_512=64, min_side_1024=128)))
    captioning: CaptioningConfig = field(default_factory=CaptioningConfig)
    semantic: SemanticCurationConfig = field(default_factory=SemanticCurationConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    post: PostTrainConfig = field(default_factory=PostTrainConfig)
    expander: ExpanderConfig = field(default_factory=ExpanderConfig)

    def __post_init__(self) -> None:
        missing = sorted(set(self.pretrain.stages) - set(self.curation.stages))
        require(not missing, f"curation.stages must select images for every pretraining stage; it lacks {missing}")
        top = max(self.pretrain.stages.values(), key=lambda stage: stage.resolution).resolution
        require(self.post.midtrain.stage.resolution == top,
                f"post.midtrain.stage.resolution ({self.post.midtrain.stage.resolution}) must be the highest "
                f"pretraining resolution ({top})")
        dp = self.pretrain.parallel.world_size // self.pretrain.parallel.tp
        for name, batch in (("midtrain", self.post.midtrain.stage.global_batch),
                            ("sft", self.post.sft.stage.global_batch),
                            ("preference.synthetic", self.post.preference.synthetic.global_batch),
                            ("preference.calibration", self.post.preference.calibration.global_batch),
                            ("rl.grpo prompts_per_step x group_size", self.post.rl.grpo.samples_per_step),
                            ("distill.batch", self.post.distill.batch)):
            require(batch % dp == 0, f"post.{name} global_batch ({batch}) must be divisible by the data-parallel "
                                     f"size ({dp})")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _overrides(overrides: str | Path | dict[str, Any] | None) -> dict[str, Any]:
    """One override source as a mapping: a YAML file path, a YAML string, a dict, or nothing."""
    if overrides is None or overrides == "":
        return {}
    if isinstance(overrides, dict):
        return overrides
    text = str(overrides)
    source = Path(text)
    if "\n" not in text and source.suffix in (".yaml", ".yml", ".json"):
        if not source.is_file():
            raise ConfigError(f"config file not found: {source}")
        text = source.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        if "\n" not in text:  # most likely a mistyped file name
            raise ConfigError(f"config file not found: {overrides} (inline overrides must be a YAML mapping)")
        raise ConfigError(f"config overrides must be a mapping, got {type(data).__name__}")
    return data


def load_config(preset_name: str = "tiny", *overrides: str | Path | dict[str, Any] | None) -> PipelineConfig:
    """A preset with overrides (each a YAML file path, a YAML string, or a dict) merged on top, in order.

    Raises ConfigError naming the offending key for unknown keys, wrong types and out-of-range values.
    """
    from krea2_core.presets import preset  # presets.py imports PipelineConfig: imported here, not at the top (no cycle)

    data: dict[str, Any] = {}
    for override in overrides:
        data = deep_merge(data, _overrides(override))
    base = preset(data.get("preset", preset_name)).to_dict()
    return PipelineConfig.from_dict(deep_merge(base, data))
