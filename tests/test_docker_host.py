"""The containers service's Docker client keeps its connections to dockerd: calls on
many different containers (a sweep, fifty users) reuse a few, not one each."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ds01.containers.adapters import POOL_SIZE, DockerHost


@contextlib.asynccontextmanager
async def counting_relay(docker_socket: Path) -> AsyncIterator[tuple[Path, list[int]]]:
    """A unix socket that passes every byte to dockerd's and counts its connections."""
    accepted = [0]
    path = Path(tempfile.mkdtemp(prefix="ds01-relay-", dir="/tmp")) / "docker.sock"

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        upstream_reader, upstream_writer = await asyncio.open_unix_connection(str(docker_socket))
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_unix_server(relay, str(path))
    try:
        yield path, accepted
    finally:
        server.close()
        path.unlink(missing_ok=True)
        path.parent.rmdir()


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("containers", [30, 80])
async def test_calls_on_many_containers_reuse_connections(
    docker_socket: Path, test_image: str, containers: int
):
    host = DockerHost(f"unix://{docker_socket}")
    made = [
        await host.run(lambda: host.client.api.create_container(test_image, "true")["Id"])
        for _ in range(containers)
    ]
    try:
        async with counting_relay(docker_socket) as (relay, accepted):
            through = DockerHost(f"unix://{relay}")
            for _round in range(3):  # as three sweeps do
                await asyncio.gather(*(through.find(c) for c in made))
                assert all([await through.find(c) for c in made[:3]])
            # Without the one pool: a connection per call once more than 25 were in turn.
            assert accepted[0] <= POOL_SIZE, f"{accepted[0]} connections for {containers}"
            await through.close()
    finally:
        for container in made:
            await host.run(host.client.api.remove_container, container, force=True)
        await host.close()
