"""Real daemons for the tests: an etcd and a private dockerd, plus an offline test image.

With CI=true a missing daemon fails the run instead of skipping the test: integration
tests must never pass vacuously there.
"""

from __future__ import annotations

import asyncio
import io
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import docker
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ds01.core.config import Config, MetricsConfig
from ds01.core.metrics import TOKEN_FILE
from ds01.core.pki import SERVICES, EtcdPki, Pki, issue_client_cert
from ds01.core.processes import ManagedProcess, free_port, start_dockerd, start_etcd

REPO = Path(__file__).resolve().parent.parent
DS01 = str(REPO / ".venv" / "bin" / "ds01")
TEST_IMAGE = "ds01-test/busybox:latest"
# Every service's /metrics on a free port: the tests run many services in one process.
ANY_PORT_METRICS = MetricsConfig(listen=dict.fromkeys(SERVICES, "127.0.0.1:0"))
# Real Unix accounts the container tests create: a lab group with an unusual GID.
USERS = {"ds01alice": 35001, "ds01bob": 35002}
GROUP, GID = "ds01lab", 35000
BUSYBOX_APPLETS = (
    "sh",
    "cat",
    "sleep",
    "id",
    "ls",
    "echo",
    "true",
    "env",
    "grep",
    "adduser",
    "addgroup",
    "head",
    "wc",
    "whoami",
    "yes",
    "dd",
    "printf",
    "test",
)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed: run `make setup` (installs etcd-server, docker.io)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


@contextmanager
def running_etcd(pki: EtcdPki) -> Iterator[tuple[str, ManagedProcess]]:
    """An etcd that, like ds01d's, answers only certificates of ``pki``'s CA."""
    require_binary("etcd")
    with tempfile.TemporaryDirectory(prefix="ds01-etcd-") as tmp:
        port = free_port()
        etcd = start_etcd(Path(tmp) / "data", port, pki)
        try:
            yield f"127.0.0.1:{port}", etcd
        finally:
            etcd.stop()


@contextmanager
def running_dockerd() -> Iterator[tuple[Path, ManagedProcess]]:
    """A private dockerd; its Unix socket path is kept short (sun_path is 108 bytes)."""
    require_binary("dockerd")
    root = Path(tempfile.mkdtemp(prefix="ds01-dockerd-", dir="/tmp"))
    dockerd = start_dockerd(root)
    try:
        yield root / "docker.sock", dockerd
    finally:
        dockerd.stop(timeout=30)
        remove_tree(root)


def remove_tree(root: Path) -> None:
    """Remove a stopped dockerd's directory, unmounting first what it left mounted there
    (its network namespace file under exec-root, on every kernel here)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
        points = [Path(line.split()[4]) for line in mounts]
    for point in sorted((p for p in points if p.is_relative_to(root)), reverse=True):
        subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)
    shutil.rmtree(root, ignore_errors=True)


def busybox_binary() -> Path:
    """The statically linked busybox from Debian's busybox-static package."""
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        # A dynamically linked ELF names its loader (PT_INTERP) in the first page.
        if candidate.is_file() and b"/ld-linux" not in candidate.read_bytes()[:4096]:
            return candidate
    message = "busybox-static is not installed: run `make setup`"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


def build_test_image(docker_socket: Path, tag: str = TEST_IMAGE) -> str:
    """Import a busybox root filesystem as an image: no registry needed.

    Built with the real docker CLI (``docker import``), as DESIGN.md describes.
    """
    busybox = busybox_binary()
    with tempfile.TemporaryDirectory(prefix="ds01-rootfs-") as tmp:
        archive = Path(tmp) / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            for directory in (
                "bin",
                "etc",
                "tmp",
                "workspace",
                "data",
                "home",
                "proc",
                "sys",
                "dev",
            ):
                info = tarfile.TarInfo(directory)
                info.type = tarfile.DIRTYPE
                info.mode = 0o1777 if directory == "tmp" else 0o755
                tar.addfile(info)
            tar.add(busybox, arcname="bin/busybox")
            for applet in BUSYBOX_APPLETS:
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type = tarfile.SYMTYPE
                link.linkname = "busybox"
                tar.addfile(link)
            for name, text in (
                ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
                ("etc/group", "root:x:0:\n"),
                ("etc/os-release", 'ID=busybox\nNAME="BusyBox"\nVERSION_ID="1"\n'),
            ):
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, fileobj=io.BytesIO(data))
        subprocess.run(
            ["docker", "-H", f"unix://{docker_socket}", "import", str(archive), tag],
            check=True,
            capture_output=True,
        )
    return tag


def remove_managed_containers(docker_socket: Path) -> None:
    """Every container ds01 made on this daemon, gone (a fixture's clean-up)."""
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    try:
        for container in client.containers.list(all=True, filters={"label": "ds01.managed=true"}):
            container.remove(force=True)
    finally:
        client.close()


def metrics_token(config: Config) -> str:
    """The bearer token the services of ``config`` ask of every scrape."""
    return (config.metrics.token_file or config.state_dir / TOKEN_FILE).read_text().strip()


def metrics_text(address: str, token: str | None = None) -> str:
    request = urllib.request.Request(f"http://{address}/metrics")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.read().decode()


def scrape_metrics(address: str, token: str | None = None) -> dict[str, list[tuple[dict, float]]]:
    """Every sample of the endpoint, by sample name: (labels, value)."""
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(metrics_text(address, token)):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def write_config_file(config: Config, path: Path) -> Path:
    """The YAML form of ``config``, for the CLI and ds01d processes."""
    path.write_text(
        yaml.safe_dump(
            {
                "node": config.node,
                "state_dir": str(config.state_dir),
                "listen": dict(config.listen),
                "etcd": {"endpoints": list(config.etcd_endpoints)},
                "limits_file": str(config.limits_file),
                "inventory": {
                    "source": config.inventory.source,
                    "file": str(config.inventory.file),
                },
                "ownership": {
                    "enroll_socket": str(config.ownership.enroll_socket),
                    "proxy_socket": str(config.ownership.proxy_socket),
                },
                "docker": {"host": config.docker_host},
                "metrics": {"listen": {s: a or "off" for s, a in config.metrics.listen.items()}},
                "allocator": {"lock_ttl": config.allocator.lock_ttl},
            }
            | _containers_section(config)
        )
    )
    return path


def _containers_section(config: Config) -> dict[str, dict[str, object]]:
    containers = config.containers
    section: dict[str, object] = {"ds01_metadata_dir": str(containers.ds01_metadata_dir)}
    if containers.network_mode:
        section["network_mode"] = containers.network_mode
    section |= {"default_gpus": containers.default_gpus,
                "default_gpu_kind": containers.default_gpu_kind}  # fmt: skip
    return {"containers": section}


async def run_cli(
    config_file: Path, pki: Pki, user: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run the real ``ds01`` CLI as ``user``, off the event loop that serves it."""
    paths = pki.client(user)
    if not paths.cert.is_file():
        issue_client_cert(pki, user)
    env = {**os.environ, "DS01_CERT": str(paths.cert), "DS01_KEY": str(paths.key)}
    command = [DS01, "--config", str(config_file), *args]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, env=env, timeout=60
    )


class HasConfigFile(Protocol):
    config_file: Path


async def ds01_as(
    env: HasConfigFile,
    user: str,
    *args: str,
    tty: bool = False,
    answer: str | None = None,
    within: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """``ds01 ARGS`` as ``user``, in a pseudo-terminal when ``tty`` (typing ``answer``);
    ``within``: a command that runs it, such as ``("timeout", "-s", "INT", "5")``."""
    command = [*within, DS01, "--config", str(env.config_file), *args]
    if tty:
        command = ["script", "-qec", shlex.join(command), "/dev/null"]
    environment = [f"HOME=/home/{user}", f"DOCKER_CONFIG=/home/{user}/.docker",
                   "PATH=/usr/bin:/bin"]  # fmt: skip
    argv = ["runuser", "-u", user, "--", "env", *environment, *command]
    done = await asyncio.to_thread(
        subprocess.run, argv, input=answer, capture_output=True, text=True, timeout=180, cwd="/"
    )
    if tty:  # what the terminal echoes of the end of script(1)'s input is not the output
        for echo in ("^@", "^D", "\b"):
            done.stdout = done.stdout.replace(echo, "")
    return done


class Partition:
    """A TCP relay on loopback between a client and a server (etcd, a ds01 service).
    ``cut`` holds every byte in both directions (a partition: nothing is refused,
    nothing arrives); ``heal`` delivers what was held, late, as TCP's retransmissions
    would."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.endpoint = ""
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Partition:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.endpoint = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, _, port = self.target.rpartition(":")
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            pump = asyncio.ensure_future(self._pump(source, sink))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while chunk := await source.read(65536):
                await self._open.wait()
                sink.write(chunk)
                await sink.drain()
        finally:
            sink.close()
