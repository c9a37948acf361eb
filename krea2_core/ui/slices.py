"""A stage's config slice: the parts of the pipeline config its settings are made of, as YAML a user can edit.

A spec's ``settings(config)`` builds the stage's settings from sub-objects of the config (``SelectionSettings(
filters=config.curation.stages["256"], dedup=config.curation.dedup, ...)``), so walking both trees and matching
objects by identity says which config paths a stage reads, with no table to keep in step with the specs. Scalars
a stage derives (its stage name, a seed taken from the top-level seed) match nothing and are not part of the slice.

The recorded slice comes from the stage's manifest, which holds exactly ``to_plain(settings)`` of the run; merged
over all stages of a run it rebuilds the config the run used (the parts any of its stages read), so a dry run with
an edited slice changes only that stage and what consumes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from krea2_core.config import PipelineConfig, deep_merge
from krea2_core.stage_spec import StageSpec

Path_ = tuple[str, ...]


def _nodes(value: Any, path: Path_, found: dict[int, Path_]) -> None:
    """id -> path of every dataclass, dict and list under ``value`` (the first path wins)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        found.setdefault(id(value), path)
        for field in dataclasses.fields(value):
            _nodes(getattr(value, field.name), (*path, field.name), found)
    elif isinstance(value, dict):
        found.setdefault(id(value), path)
        for key, item in value.items():
            _nodes(item, (*path, str(key)), found)
    elif isinstance(value, list):
        found.setdefault(id(value), path)


def _matches(settings: Any, path: Path_, config_nodes: dict[int, Path_], out: list[tuple[Path_, Path_]]) -> None:
    if isinstance(settings, (dict, list)) or dataclasses.is_dataclass(settings):
        if id(settings) in config_nodes:
            out.append((path, config_nodes[id(settings)]))
            return
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        for field in dataclasses.fields(settings):
            _matches(getattr(settings, field.name), (*path, field.name), config_nodes, out)
    elif isinstance(settings, dict):
        for key, item in settings.items():
            _matches(item, (*path, str(key)), config_nodes, out)


def slice_paths(spec: StageSpec, config: PipelineConfig) -> list[tuple[Path_, Path_]]:
    """(path in the stage's settings, path in the pipeline config) for each config part the settings are made of."""
    config_nodes: dict[int, Path_] = {}
    _nodes(config, (), config_nodes)
    out: list[tuple[Path_, Path_]] = []
    settings = spec.settings(config)
    if settings is not None:
        _matches(settings, (), config_nodes, out)
    return out


def _get(tree: Any, path: Path_) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _nest(path: Path_, value: Any) -> dict[str, Any]:
    for key in reversed(path):
        value = {key: value}
    return value


def recorded_slice(spec: StageSpec, config: PipelineConfig, recorded_settings: dict[str, Any] | None
                   ) -> dict[str, Any]:
    """The stage's slice as config overrides, valued as its run recorded them (its manifest's settings)."""
    overrides: dict[str, Any] = {}
    if recorded_settings is None:
        return overrides
    for settings_path, config_path in slice_paths(spec, config):
        try:
            overrides = deep_merge(overrides, _nest(config_path, _get(recorded_settings, settings_path)))
        except (KeyError, TypeError, IndexError):
            continue  # a field the run's version of the settings did not have: the preset's value stands
    return overrides
