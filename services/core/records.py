"""Records kept in etcd: frozen dataclasses stored as sorted JSON, one key each."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Self


class JsonRecord:
    """Mixin for dataclasses whose every field is stored."""

    def encode(self) -> bytes:
        return json.dumps(fields_of(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> Self:
        fields: dict[str, Any] = json.loads(data)
        return cls(**fields)


def fields_of(record: Any) -> dict[str, Any]:
    """A record's fields by name. Records hold no records, so this shallow read is the
    whole of one (``dataclasses.asdict`` copies deeply, at several times the cost, on
    every claim and release)."""
    return {name: getattr(record, name) for name in _field_names(type(record))}


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(cls))
