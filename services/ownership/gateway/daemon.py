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

import h11

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
        """One request on a connection of its own; the whole answer."""
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        connection = h11.Connection(h11.CLIENT)
        headers = [("host", "docker"), ("connection", "close")]
        if content_type:
            headers.append(("content-type", content_type))
        if body or method in ("POST", "PUT"):
            headers.append(("content-length", str(len(body))))
        try:
            writer.write(
                connection.send(h11.Request(method=method, target=target, headers=headers))
            )
            if body:
                writer.write(connection.send(h11.Data(data=body)))
            writer.write(connection.send(h11.EndOfMessage()))
            await writer.drain()
            status, data = 0, bytearray()
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await reader.read(CHUNK))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    data += event.data
                    if len(data) > MAX_REPLY:
                        raise h11.RemoteProtocolError("the daemon's answer is too large")
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return Reply(status, bytes(data))
        finally:
            writer.close()

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
