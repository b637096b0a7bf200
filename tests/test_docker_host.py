"""The containers service's Docker client: calls on many containers (a sweep, fifty
users) leave no connection to dockerd open behind them, and every failure is told in
Docker's words or as Docker not answering, never as a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import docker.errors
import pytest

from ds01.containers import adapters
from ds01.containers.adapters import DockerHost, DockerUnavailable


@contextlib.asynccontextmanager
async def counting_relay(docker_socket: Path) -> AsyncIterator[tuple[Path, list[int]]]:
    """A unix socket that passes every byte to dockerd's and counts its connections:
    those accepted, and those still open."""
    accepted = [0, 0]
    path = Path(tempfile.mkdtemp(prefix="ds01-relay-", dir="/tmp")) / "docker.sock"

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        accepted[1] += 1
        upstream_reader, upstream_writer = await asyncio.open_unix_connection(str(docker_socket))
        try:
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        finally:
            accepted[1] -= 1

    server = await asyncio.start_unix_server(relay, str(path))
    try:
        yield path, accepted
    finally:
        server.close()
        path.unlink(missing_ok=True)
        path.parent.rmdir()


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("containers", [30, 80])
async def test_calls_on_many_containers_leave_no_connection_open(
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
            await through.find(made[0])  # the SDK's client connects (and keeps one open)
            before, kept = accepted
            for _round in range(3):  # as three sweeps do
                found = await asyncio.gather(*(through.find(c) for c in made))
                assert [c.id for c in found] == made
            assert accepted[0] - before == 3 * containers  # one short connection a call
            for _ in range(100):
                if accepted[1] == kept:
                    break
                await asyncio.sleep(0.02)
            assert accepted[1] == kept, f"{accepted[1] - kept} connections left open"
            await through.close()
    finally:
        for container in made:
            await host.run(host.client.api.remove_container, container, force=True)
        await host.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_each_docker_failure_is_told_in_words(
    docker_socket: Path, test_image: str, monkeypatch: pytest.MonkeyPatch
):
    """What Docker refuses, in Docker's words; what is not there, as not found; a Docker
    that is not there or does not answer, as that, naming where it was asked."""
    host = DockerHost(f"unix://{docker_socket}")
    broken = await host.run(
        lambda: host.client.api.create_container(test_image, "/no/such/program")["Id"]
    )
    try:
        assert await host.find("no-such-container-anywhere") is None
        assert await host.image("no-such-image:anywhere") is None
        with pytest.raises(docker.errors.NotFound, match="404"):
            await host.stop("no-such-container-anywhere", 1)
        await host.remove("no-such-container-anywhere")  # gone already: removed
        with pytest.raises(docker.errors.APIError, match="/no/such/program"):
            await host.start(await host.find(broken))
    finally:
        await host.remove(broken)
        await host.close()
    assert await host.find(broken) is None

    nowhere = Path(tempfile.mkdtemp(prefix="ds01-nowhere-", dir="/tmp"))
    silent_path = nowhere / "silent.sock"

    async def silent(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, reads, never answers

    async def redirecting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # as Go's router answers a path it would clean
        writer.write(b"HTTP/1.0 301 Moved Permanently\r\nLocation: /elsewhere\r\n\r\n")
        writer.close()

    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # a dockerd that goes away mid-answer
        writer.write(b'HTTP/1.0 200 OK\r\n\r\n{"Id": "abc", "State": {"Sta')
        writer.close()

    redirect_path, cut_path = nowhere / "redirect.sock", nowhere / "cut.sock"
    servers = [await asyncio.start_unix_server(silent, str(silent_path)),
               await asyncio.start_unix_server(redirecting, str(redirect_path)),
               await asyncio.start_unix_server(cut_short, str(cut_path))]  # fmt: skip
    monkeypatch.setattr(adapters, "CALL_SECONDS", 0.5)
    try:
        for url in (f"unix://{nowhere}/docker.sock", f"unix://{silent_path}", "tcp://127.0.0.1:9"):
            away = DockerHost(url)
            for call in (away.find("x"), away.stop("x", 0), away.remove("x"), away.image("i")):
                with pytest.raises(DockerUnavailable, match=f"Docker at {url} does not answer"):
                    await call
        elsewhere = DockerHost(f"unix://{redirect_path}")  # no answer is taken for another's
        for call in (elsewhere.find("x"), elsewhere.stop("x", 0), elsewhere.image("i")):
            with pytest.raises(docker.errors.APIError, match="301"):
                await call
        short = DockerHost(f"unix://{cut_path}")
        for call in (short.find("x"), short.stop("x", 0), short.image("i")):
            with pytest.raises(DockerUnavailable, match="cut its answer"):
                await call
    finally:
        for server in servers:
            server.close()
        for path in (silent_path, redirect_path, cut_path):
            path.unlink(missing_ok=True)
        nowhere.rmdir()


IMPOSSIBLE = [
    "victim/json",
    "../victim",
    "mine/../victim",
    "mine%2F..%2Fvictim",
    "..",
    ".",
    "",
    "-flag",
    "mine?all=1",
    "mine#x",
    "mine victim",
    "mine\n",
    "mine\r\nHost: x",
    "mïne",
]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("reference", IMPOSSIBLE)
async def test_a_reference_no_container_can_have_never_reaches_docker(reference: str):
    """Docker's router cleans and splits paths: a name with '/' or '..' would reach
    another object, so the containers service never asks Docker about one."""
    nowhere = Path(tempfile.mkdtemp(prefix="ds01-asked-", dir="/tmp"))
    asked: list[bytes] = []

    async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b'HTTP/1.0 200 OK\r\n\r\n{"Id": "victim", "State": {}}')
        writer.close()

    server = await asyncio.start_unix_server(recording, str(nowhere / "docker.sock"))
    host = DockerHost(f"unix://{nowhere}/docker.sock")
    try:
        assert await host.find(reference) is None
        with pytest.raises(docker.errors.NotFound, match="no container is named"):
            await host.stop(reference, 0)
        await host.remove(reference)  # no such container: nothing to remove
        assert asked == []
        assert await host.stop("mine-1.x_y", 0) == {}  # a name is asked: stop, inspect
        assert [line.split(b" ")[1] for line in asked] == [
            b"/containers/mine-1.x_y/stop?t=0",
            b"/containers/mine-1.x_y/json",
        ]
    finally:
        server.close()
        (nowhere / "docker.sock").unlink(missing_ok=True)
        nowhere.rmdir()
