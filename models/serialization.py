"""JSON round-trip for model configs, so the model repository records exactly what was built."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Self


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_jsonable(v) for v in value]
    return value


class ConfigMixin:
    """`to_dict` / `from_dict` / `to_json` / `from_json` for (nested) dataclass configs.

    Nested dataclass fields are rebuilt from their type hints; unknown keys are an error, not
    silently dropped, so a typo in a user's config file is caught at load time.
    """

    def to_dict(self) -> dict[str, Any]:
        return typing.cast(dict[str, Any], _to_jsonable(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} is not a dataclass")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; known: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            hint = hints[key]
            if dataclasses.is_dataclass(hint) and isinstance(value, dict):
                value = hint(**value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls.from_dict(json.loads(text))
