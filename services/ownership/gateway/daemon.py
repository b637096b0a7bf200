"""The gateway's own questions to the real daemon: one short request per question.

Every reference a request names is resolved here, afresh for each request, to the object
Docker itself would act on (its full id and its labels): nothing is cached for a name that
could change owner.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

CHUNK = 65536
MAX_REPLY = 64 * 1024 * 1024


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body) if self.body.strip() else None
        except ValueError:
            return None


class Daemon:
    def __init__(self, socket: Path) -> None:
        self.socket = socket

    async def call(
        self, method: str, target: str, body: bytes = b"", content_type: str | None = None
    ) -> Reply:
        """One HTTP/1.0 request on a connection of its own: Docker answers with a length or
        until it closes, never chunked, so the whole answer is what it sent."""
        reader, writer = await asyncio.open_unix_connection(str(self.socket), limit=CHUNK)
        head = f"{method} {target} HTTP/1.0\r\nHost: docker\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        if body or method in ("POST", "PUT"):
            head += f"Content-Length: {len(body)}\r\n"
        try:
            writer.write(head.encode("latin-1") + b"\r\n" + body)
            chunks, size = [], 0
            while chunk := await reader.read(MAX_REPLY):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_REPLY:
                    raise ValueError("the daemon's answer is too large")
        finally:
            writer.close()
        head_bytes, _, answer = b"".join(chunks).partition(b"\r\n\r\n")
        try:
            status = int(head_bytes.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return Reply(502, b"")
        return Reply(status, answer)

    async def get(self, target: str) -> Any | None:
        """GET ``target``: the JSON answer, or None unless Docker answered 200."""
        reply = await self.call("GET", target)
        return reply.json() if reply.status == 200 else None

    async def container(self, reference: str) -> dict[str, Any] | None:
        return await self.get(f"/containers/{quote(reference, safe='')}/json")

    async def exec(self, reference: str) -> dict[str, Any] | None:
        return await self.get(f"/exec/{quote(reference, safe='')}/json")

    async def image(self, reference: str) -> dict[str, Any] | None:
        return await self.get(f"/images/{quote(reference, safe='/:@')}/json")

    async def volume(self, name: str) -> dict[str, Any] | None:
        return await self.get(f"/volumes/{quote(name, safe='')}")

    async def network(self, reference: str) -> dict[str, Any] | None:
        return await self.get(f"/networks/{quote(reference, safe='')}")

    async def delete(self, target: str) -> int:
        return (await self.call("DELETE", target)).status
