"""Records kept in etcd: frozen dataclasses stored as sorted JSON, one key each."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Self


class JsonRecord:
    """Mixin for dataclasses whose every field is stored."""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()  # type: ignore[call-overload]

    @classmethod
    def decode(cls, data: bytes) -> Self:
        fields: dict[str, Any] = json.loads(data)
        return cls(**fields)
