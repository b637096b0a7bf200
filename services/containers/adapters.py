"""The containers service's adapters: Docker (SDK in a worker thread), host accounts,
container metadata in etcd, and per-user cgroups on cgroupfs."""

from __future__ import annotations

import asyncio
import grp
import logging
import pwd
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
import docker
import docker.errors

from ds01.containers.spec import Account
from ds01.core.records import JsonRecord

log = logging.getLogger(__name__)

METADATA = "/ds01/v1/containers/"


class NoAccount(LookupError):
    pass


class DockerUnavailable(ConnectionError):
    pass


def host_account(user: str) -> Account:
    """The user's uid, gid, group name and home on this host."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise NoAccount(f"{user} has no account on this host") from None
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = user
    return Account(user, entry.pw_uid, entry.pw_gid, group, Path(entry.pw_dir))


class DockerHost:
    """The Docker SDK, called from a worker thread so the event loop never blocks."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._client: docker.DockerClient | None = None

    @property
    def client(self) -> docker.DockerClient:
        """Connected on first use: the service starts even while Docker is down."""
        if self._client is None:
            try:
                self._client = docker.DockerClient(base_url=self.base_url, timeout=120)
            except docker.errors.DockerException as err:
                raise DockerUnavailable(
                    f"Docker at {self.base_url} does not answer: {err}"
                ) from err
        return self._client

    async def run(self, work: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(work, *args, **kwargs)

    async def status(self, container: Any) -> str:
        await self.run(container.reload)
        return container.status

    async def cgroup_driver(self) -> str:
        return (await self.run(lambda: self.client.info())).get("CgroupDriver", "cgroupfs")

    async def has_nvidia_runtime(self) -> bool:
        return "nvidia" in (await self.run(lambda: self.client.info())).get("Runtimes", {})

    async def image_exists(self, image: str) -> bool:
        try:
            await self.run(lambda: self.client.images.get(image))
        except docker.errors.ImageNotFound:
            return False
        return True

    async def find(self, name: str) -> Any | None:
        try:
            return await self.run(lambda: self.client.containers.get(name))
        except docker.errors.NotFound:
            return None

    async def names_labelled(self, label: str, value: str) -> list[str]:
        """The names of every container, running or not, whose ``label`` is ``value``."""
        found = await self.run(
            lambda: self.client.containers.list(all=True, filters={"label": f"{label}={value}"})
        )
        return [container.name for container in found]

    async def create(self, arguments: dict[str, Any]) -> Any:
        return await self.run(lambda: self.client.containers.create(**arguments))

    async def start(self, container: Any) -> None:
        await self.run(container.start)

    async def exec_as_root(self, container: Any, script: str) -> None:
        """Run ``script`` with sh as uid 0 in a running container; raise if it fails."""
        result = await self.run(lambda: container.exec_run(["sh", "-c", script], user="0"))
        if result.exit_code != 0:
            output = result.output.decode(errors="replace").strip()
            raise DockerUnavailable(f"setting up the user failed ({result.exit_code}): {output}")

    async def stop(self, container: Any, grace: int) -> None:
        await self.run(container.stop, timeout=grace)

    async def remove(self, container: Any) -> None:
        await self.run(container.remove, force=True, v=True)

    async def close(self) -> None:
        if self._client is not None:
            await self.run(self._client.close)


@dataclass
class Metadata(JsonRecord):
    """What ds01 remembers of a container, beside Docker's own record."""

    docker_name: str
    name: str
    user: str
    image: str
    container_id: str
    node: str
    created_at: float
    gpu_slots: list[str] = field(default_factory=list)
    workspace: str = ""
    data_dirs: list[str] = field(default_factory=list)
    limits: dict[str, Any] = field(default_factory=dict)
    runtime_before: float = 0.0  # seconds of finished runs (for max_runtime)
    counted_start: str = ""  # Docker's StartedAt of the last run added to runtime_before
    container_type: str = ""  # container_types.<type> of the limits configuration
    notice: str = ""  # the reconciler's warning to the owner, e.g. of an idle stop to come


class MetadataStore:
    def __init__(self, client: aetcd.Client, node: str) -> None:
        self.client = client
        self.node = node

    def _key(self, docker_name: str) -> bytes:
        return f"{METADATA}{self.node}/{docker_name}".encode()

    async def put(self, metadata: Metadata) -> None:
        await self.client.put(self._key(metadata.docker_name), metadata.encode())

    async def get(self, docker_name: str) -> Metadata | None:
        found = await self.client.get(self._key(docker_name))
        return Metadata.decode(found.value) if found else None

    async def delete(self, docker_name: str) -> None:
        await self.client.delete(self._key(docker_name))

    async def all(self) -> list[Metadata]:
        found = await self.client.get_prefix(f"{METADATA}{self.node}/".encode())
        return [Metadata.decode(kv.value) for kv in found]


class CgroupfsSlices:
    """Per-user cgroups for Docker's cgroupfs driver, with the user's aggregate limits.

    Docker puts each container under ``/ds01/<group>/<user>``; the limits written on that
    directory bound the sum of all the user's containers. Works on cgroup v1 (one tree
    per controller) and v2 (one unified tree).
    """

    def __init__(self, root: Path = Path("/sys/fs/cgroup")) -> None:
        self.root = root

    def ensure(self, parent: str, aggregate: dict[str, float | int]) -> None:
        unified = (self.root / "cgroup.controllers").exists()
        relative = parent.strip("/")
        settings: list[tuple[str, str, str]] = []  # (v1 controller, file, value)
        if "memory" in aggregate:
            memory = str(int(aggregate["memory"]))
            settings.append(
                ("memory", "memory.max" if unified else "memory.limit_in_bytes", memory)
            )
        if "cpus" in aggregate:
            quota = int(float(aggregate["cpus"]) * 100_000)
            if unified:
                settings.append(("cpu", "cpu.max", f"{quota} 100000"))
            else:
                settings.append(("cpu", "cpu.cfs_period_us", "100000"))
                settings.append(("cpu", "cpu.cfs_quota_us", str(quota)))
        if "pids" in aggregate:
            settings.append(("pids", "pids.max", str(int(aggregate["pids"]))))
        for controller, name, value in settings:
            directory = self.root / relative if unified else self.root / controller / relative
            directory.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(value)
