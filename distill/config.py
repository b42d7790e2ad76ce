"""Dataclass configs that round-trip through JSON; an unknown key is an error (a typo must not be dropped)."""
from __future__ import annotations

import dataclasses
import json


class JSONConfig:
    """Mixin for @dataclass configs: `to_dict`/`from_dict` and `to_json`/`from_json`."""

    config_error = ValueError  # what from_dict raises for unknown keys (a subclass names the kind of input)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise cls.config_error(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))
