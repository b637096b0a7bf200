"""What admission decides for a request: forward a rebuilt request, or answer at once."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ds01.ownership.gateway.policy import Caps

JSON = "application/json"
Rewrite = Callable[[int, bytes], Awaitable[tuple[int, bytes]]]


@dataclass(frozen=True)
class UserSettings:
    """What the limits say of a user, for containers made through the gateway."""

    cgroup_parent: str
    caps: Caps
    max_containers: int | None = None


@dataclass
class Forward:
    method: str
    target: str
    body: bytes = b""
    content_type: str | None = None
    hijack: bool = False  # attach or exec start: may become a raw stream (101, or no length)
    upgrade: bool = False  # ask Docker to switch protocols (the client asked)
    rewrite: Rewrite | None = None  # the whole answer, checked and filtered
    stream_filter: Callable[[bytes], Awaitable[bytes]] | None = None
    finish: Callable[[bytes], Awaitable[bytes | None]] | None = None  # after a stream
    cleanup: Callable[[], Awaitable[None]] | None = None  # always, once the forward ended


@dataclass
class Answer:
    status: int
    payload: Any


Decision = Forward | Answer


class NotFound(Exception):
    """Answered 404 with Docker's own wording."""


def message(text: str) -> bytes:
    return json.dumps({"message": text}).encode()


def one(query: dict[str, list[str]], key: str) -> str:
    return (query.get(key) or [""])[0]
