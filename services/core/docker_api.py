"""dockerd's HTTP API, asked directly: one short request per question, on a connection
of its own.

The gateway resolves every reference a request names here, afresh for each request, to
the object Docker itself would act on (its full id and its labels): nothing is cached for
a name that could change owner. The containers service makes its calls of every start,
stop and remove here too: the Docker SDK spent ten times the CPU on each (requests,
urllib3 and a worker thread), about a sixth of the service's under fifty users.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

CHUNK = 65536
MAX_REPLY = 64 * 1024 * 1024


def container_path(reference: str) -> str:
    """The API path of a container by name or id: one path segment, whatever it holds."""
    return f"/containers/{quote(reference, safe='')}"


def image_path(reference: str) -> str:
    """The API path of an image by reference (a name may hold '/', ':' and '@')."""
    return f"/images/{quote(reference, safe='/:@')}"


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
    """dockerd at a Unix socket, or at ``(host, port)`` on loopback TCP."""

    def __init__(self, address: Path | tuple[str, int]) -> None:
        self.address = address

    @classmethod
    def at(cls, docker_host: str) -> Daemon:
        """The daemon at a docker host URL as the configuration has it: unix:///path or
        tcp://127.x.x.x:PORT."""
        if docker_host.startswith("unix://"):
            return cls(Path(docker_host.removeprefix("unix://")))
        url = urlsplit(docker_host)
        return cls((url.hostname or "127.0.0.1", url.port or 2375))

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if isinstance(self.address, Path):
            return await asyncio.open_unix_connection(str(self.address), limit=CHUNK)
        return await asyncio.open_connection(*self.address, limit=CHUNK)

    async def call(
        self, method: str, target: str, body: bytes = b"", content_type: str | None = None
    ) -> Reply:
        """One HTTP/1.0 request on a connection of its own: Docker answers with a length or
        until it closes, never chunked, so the whole answer is what it sent."""
        reader, writer = await self._connect()
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
        return await self.get(f"{container_path(reference)}/json")

    async def exec(self, reference: str) -> dict[str, Any] | None:
        return await self.get(f"/exec/{quote(reference, safe='')}/json")

    async def image(self, reference: str) -> dict[str, Any] | None:
        return await self.get(f"{image_path(reference)}/json")

    async def volume(self, name: str) -> dict[str, Any] | None:
        return await self.get(f"/volumes/{quote(name, safe='')}")

    async def network(self, reference: str) -> dict[str, Any] | None:
        return await self.get(f"/networks/{quote(reference, safe='')}")

    async def delete(self, target: str) -> int:
        return (await self.call("DELETE", target)).status
