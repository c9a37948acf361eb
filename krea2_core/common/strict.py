"""The strict config base every leaf config derives from (``krea2_core/<area>/config.py``).

``Strict.from_dict`` builds a dataclass strictly: unknown keys and wrong types are errors, and every error is
prefixed with the dotted key path, e.g. ``curation.stages.256.min_side: ...``. Each dataclass checks its own value
ranges in ``__post_init__`` with ``require``. Hand-written because mashumaro/pydantic errors do not name the path
of nested dict-of-dataclass keys in a way users can act on.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the rule broken."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _build(tp: Any, value: Any, path: str) -> Any:
    """Convert plain YAML/JSON data to ``tp`` strictly; errors name ``path``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ConfigError(f"{path or 'config'}: unknown key(s) {unknown}; known keys: {names}")
        kwargs = {k: _build(hints[k], v, f"{path}.{k}" if path else k) for k, v in value.items()}
        try:
            return tp(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{path or 'config'}: {err}") from None
        except TypeError as err:  # a required field is missing
            raise ConfigError(f"{path or 'config'}: {err}") from None
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_build(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): _build(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


class Strict:
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
