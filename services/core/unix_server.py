"""A Unix socket every local user may connect to; the kernel tells who each peer is.

Each connection's task is held here. asyncio keeps a connection's stream reader only by
weak reference, and a task only while something it waits on is reachable: once a client
half-closes its side (``docker start -a -i`` with stdin at its end does), a relayed
connection is reachable only from its own reference cycle, and the garbage collector
destroyed it mid-stream, losing the daemon's last output. Held tasks also let ``stop``
end every connection rather than leave them to the event loop's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class UnixServer:
    def __init__(self, path: Path, handler: Handler, limit: int = 2**16) -> None:
        self.path = path
        self._handler = handler
        self._limit = limit
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=self._limit
        )
        os.chmod(self.path, 0o666)  # anyone may connect; the handler decides who gets what

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._handler(reader, writer)
        finally:
            self._connections.discard(task)
