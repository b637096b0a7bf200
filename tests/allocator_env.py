"""A limits and an allocator service on a wiped etcd, for the allocator tests."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import pytest_asyncio

from ds01.allocator.cache import ClusterCache
from ds01.allocator.etcd_state import EtcdState
from ds01.allocator.peers import Presence
from ds01.allocator.placement import Request
from ds01.allocator.server import RemoteLimits
from ds01.allocator.service import Actor, Allocator
from ds01.client import ClientIdentity, Ds01Client
from ds01.containers.adapters import DockerHost, MetadataStore
from ds01.containers.lifecycle import Lifecycle
from ds01.core.account_files import AccountFiles
from ds01.core.config import (
    AllocatorConfig,
    Config,
    ContainersConfig,
    InventoryConfig,
    OwnershipConfig,
)
from ds01.core.etcd import connect, etcd_client
from ds01.core.identity import Roles
from ds01.core.launcher import service_spec
from ds01.core.pki import SERVICES, Pki, issue_client_cert
from ds01.core.processes import ManagedProcess, free_port, start_etcd
from ds01.core.server import RunningService, ServiceContext, start_service
from tests.harness import (
    ANY_PORT_METRICS,
    USERS,
    remove_managed_containers,
    run_cli,
    write_config_file,
)

HOLD_SECONDS = 2  # etcd's shortest lease is about 2 s

LIMITS = textwrap.dedent(
    f"""\
    defaults:
      max_gpu_equivalents: 1
      max_gpu_slots_per_container: 1
      allow_full_gpu: false
      gpu_hold_after_stop: {HOLD_SECONDS}s
      priority: 10
    default_group: students
    groups:
      students: {{}}
      researchers:
        priority: 50
        max_gpu_equivalents: 2
        max_gpu_slots_per_container: 2
        allow_full_gpu: true
        gpu_hold_after_stop: null      # held until cleared or released
        members: [rita, ray]
      admin:
        priority: 100
        members: [labadmin]
    access_control:
      admin_group: admin
    """
)

# Two full GPUs and one in MIG mode with three 2g.20gb slices: 5 slots.
INVENTORY = textwrap.dedent(
    """\
    gpus:
      - {index: 0, uuid: GPU-0000, product: A100}
      - {index: 1, uuid: GPU-0001, product: A100}
      - index: 2
        uuid: GPU-0002
        product: A100
        mig:
          slices: 7
          instances:
            - {id: 1, profile: 2g.20gb, uuid: MIG-0002-1}
            - {id: 2, profile: 2g.20gb, uuid: MIG-0002-2}
            - {id: 3, profile: 2g.20gb, uuid: MIG-0002-3}
    """
)


def write_files(directory: Path, limits: str = LIMITS, inventory: str = INVENTORY) -> Config:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "resource-limits.yaml").write_text(limits)
    (directory / "inventory.yaml").write_text(inventory)
    return Config(
        node="n1",
        limits_file=directory / "resource-limits.yaml",
        inventory=InventoryConfig(source="declared", file=directory / "inventory.yaml"),
        allocator=AllocatorConfig(lock_ttl=2),
    )


async def wipe(endpoint: str, pki: Pki) -> None:
    client = etcd_client((endpoint,), pki.etcd, "admin")
    try:
        await client.delete_prefix(b"/ds01/")
    finally:
        await client.close()


async def etcd_revision(endpoint: str, pki: Pki) -> int:
    """The current revision: a watcher resuming from it sees only what comes after."""
    client = etcd_client((endpoint,), pki.etcd, "admin")
    try:
        return (await client.get_prefix(b"/")).header.revision
    finally:
        await client.close()


@dataclass
class AllocatorEnv:
    config: Config
    pki: Pki
    services: dict[str, RunningService]
    config_file: Path

    async def cli(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        return await run_cli(self.config_file, self.pki, user, *args)

    def client(self, user: str) -> Ds01Client:
        paths = self.pki.client(user)
        if not paths.cert.is_file():
            issue_client_cert(self.pki, user)
        return Ds01Client(self.config, ClientIdentity(self.pki.ca_cert, paths))

    def service_client(self, service: str = "containers") -> Ds01Client:
        return Ds01Client(self.config, ClientIdentity(self.pki.ca_cert, self.pki.service(service)))

    async def start(self, *names: str) -> None:
        context = ServiceContext(config=self.config, roles=Roles())
        for name in names:
            self.services[name] = await start_service(service_spec(name), context)
        for name in names:
            assert await self.services[name].ready(timeout=20), f"{name} is not ready"

    async def stop(self, *names: str) -> None:
        for name in names or list(self.services):
            await self.services.pop(name).stop(grace=0)


async def make_env(
    directory: Path,
    pki: Pki,
    state_dir: Path,
    etcd: str,
    docker_socket: Path | None = None,
    limits: str = LIMITS,
    services: tuple[str, ...] | None = None,
    ds01_metadata: Path | None = None,
    run_dir: Path | None = None,
    inventory: str = INVENTORY,
    **containers: Any,
) -> AllocatorEnv:
    """limits and allocator (and containers, given a Docker socket) on a wiped etcd;
    ``services`` names the ones to run in this process when that is not all of them;
    ``run_dir`` holds the ownership service's sockets (enrollment, the gateway);
    ``containers``: more of the containers section (tests ask for no GPU by default:
    default_gpus=1 and default_gpu_kind restore the host default)."""
    await wipe(etcd, pki)
    files = write_files(directory, limits, inventory)
    containers.setdefault("default_gpus", 0)
    if services is None:
        services = (
            ("limits", "allocator", "containers") if docker_socket else ("limits", "allocator")
        )
    config = Config(
        node=files.node,
        state_dir=state_dir,
        listen={s: f"127.0.0.1:{free_port()}" for s in SERVICES},
        metrics=ANY_PORT_METRICS,
        etcd_endpoints=(etcd,),
        limits_file=files.limits_file,
        inventory=files.inventory,
        allocator=files.allocator,
        containers=ContainersConfig(
            network_mode="none",
            ds01_metadata_dir=ds01_metadata or directory / "no-ds01",
            **containers,
        ),
        docker_host=f"unix://{docker_socket}" if docker_socket else Config.docker_host,
        ownership=(
            OwnershipConfig(run_dir / "enroll.sock", run_dir / "docker.sock")
            if run_dir
            else OwnershipConfig()
        ),
    )
    env = AllocatorEnv(config, pki, {}, write_config_file(config, directory / "ds01.yaml"))
    try:
        await env.start(*services)
    except BaseException:
        await env.stop()
        raise
    return env


def make_lifecycle(env: AllocatorEnv, docker_socket: Path, etcd: aetcd.Client) -> Lifecycle:
    """The containers domain on the real Docker and etcd, with the env's services."""
    return Lifecycle(
        node="n1",
        docker=DockerHost(f"unix://{docker_socket}"),
        metadata=MetadataStore(etcd, "n1"),
        client=env.service_client("containers"),
        network_mode="none",
        account_files=AccountFiles(env.config.state_dir / "accounts"),
    )


@contextlib.asynccontextmanager
async def full_stack(
    directory: Path,
    pki: Pki,
    state_dir: Path,
    etcd: str,
    docker_socket: Path,
    limits: str = LIMITS,
    **containers: Any,
) -> AsyncIterator[AllocatorEnv]:
    """All four services in this process, with the gateway's sockets and a copy of the
    configuration where every local user reaches them (as /run/ds01 and /etc/ds01)."""
    run_dir = Path(tempfile.mkdtemp(prefix="ds01-run-", dir="/tmp"))
    run_dir.chmod(0o755)
    for user in USERS:  # a certificate another test's CA issued: they enroll here afresh
        shutil.rmtree(f"/home/{user}/.config/ds01", ignore_errors=True)
    env = await make_env(directory, pki, state_dir, etcd, docker_socket, limits,
                         services=SERVICES, run_dir=run_dir, **containers)  # fmt: skip
    try:
        shared = run_dir / "ds01.yaml"
        shutil.copy(env.config_file, shared)
        shared.chmod(0o644)
        env.config_file = shared
        yield env
    finally:
        await env.stop()
        await asyncio.to_thread(remove_managed_containers, docker_socket)
        shutil.rmtree(run_dir, ignore_errors=True)


@dataclass
class OwnEtcd:
    """An etcd of one test's own (stopping it disturbs no other test), and the limits
    and allocator services on it."""

    env: AllocatorEnv
    data: Path
    client_port: int
    peer_port: int
    process: ManagedProcess

    def stop(self) -> None:
        self.process.stop()

    async def start(self) -> None:
        """Start it again on the same data and ports, as after a crash or an upgrade."""
        self.process = await asyncio.to_thread(
            start_etcd, self.data, self.client_port, self.env.pki.etcd, self.peer_port
        )


@contextlib.asynccontextmanager
async def own_etcd_env(directory: Path, pki: Pki, state_dir: Path) -> AsyncIterator[OwnEtcd]:
    data = directory / "etcd" / "data"
    client_port, peer_port = free_port(), free_port()
    process = start_etcd(data, client_port, pki.etcd, peer_port)
    own = None
    try:
        env = await make_env(directory / "env", pki, state_dir, f"127.0.0.1:{client_port}")
        own = OwnEtcd(env, data, client_port, peer_port, process)
        yield own
    finally:
        if own is not None:
            await own.env.stop()
        (own.process if own else process).stop()


async def start_gateway(
    state_dir: Path,
    pki: Pki,
    etcd: str,
    docker_socket: Path,
    limits_file: Path,
    run_dir: Path,
    proxy_socket: Path | None = None,
) -> tuple[Config, list[RunningService]]:
    """limits and ownership (the Docker gateway, enrollment in ``run_dir``) on a wiped
    etcd, in this process; the gateway at ``proxy_socket`` (default: in ``run_dir``)."""
    await wipe(etcd, pki)
    config = Config(
        node="n1",
        state_dir=state_dir,
        listen={s: f"127.0.0.1:{free_port()}" for s in SERVICES},
        metrics=ANY_PORT_METRICS,
        etcd_endpoints=(etcd,),
        docker_host=f"unix://{docker_socket}",
        limits_file=limits_file,
        ownership=OwnershipConfig(
            enroll_socket=run_dir / "enroll.sock",
            proxy_socket=proxy_socket or run_dir / "docker.sock",
        ),
    )
    context = ServiceContext(config=config, roles=Roles())
    return config, [await start_service(service_spec(n), context) for n in ("limits", "ownership")]


def full_stack_fixture(limits: str = LIMITS, **containers: Any) -> Any:
    """A test module's ``stack`` fixture: :func:`full_stack` with these limits (and
    containers settings), for one test."""

    @pytest_asyncio.fixture(loop_scope="session")
    async def stack(
        tmp_path: Path, pki: Pki, state_dir: Path, etcd_endpoint: str, docker_socket: Path
    ) -> AsyncIterator[AllocatorEnv]:
        async with full_stack(
            tmp_path, pki, state_dir, etcd_endpoint, docker_socket, limits, **containers
        ) as env:
            yield env

    return stack


ADMIN = Actor("svc:containers", True)


@dataclass
class AllocatorNode:
    """One allocator process's parts, built here: its etcd client, state, watched view
    and allocator, and its announcement among the allocators when it makes one."""

    client: aetcd.Client
    state: EtcdState
    cache: ClusterCache
    allocator: Allocator
    limits: RemoteLimits
    presence: Presence | None = None
    keeping: asyncio.Task[None] | None = None

    async def allocate(self, user: str, name: str, **wanted: object) -> list[str]:
        request = Request(user=user, container=f"{name}._.{user}", **wanted)  # type: ignore[arg-type]
        granted = await self.allocator.allocate(request, ADMIN)
        return [g.slot.slot_id for g in granted]

    async def freeze(self) -> None:
        """Stop following etcd but keep planning on the view: a watch that lags."""
        await self.cache.close()
        self.cache.live = True

    async def thaw(self, env: AllocatorEnv) -> None:
        """Follow etcd again, and return once the view has caught up with it."""
        self.cache.start()
        caught_up = await etcd_revision(env.config.etcd_endpoints[0], env.pki)
        for _ in range(200):
            if self.cache.live and self.cache.view.revision >= caught_up:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the view did not catch up with etcd")

    async def close(self) -> None:
        if self.keeping is not None:
            self.keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.keeping
        await self.cache.close()
        await self.state.close()
        await self.limits.client.close()
        await self.client.close()


@contextlib.asynccontextmanager
async def allocator_nodes(
    env: AllocatorEnv, count: int, announce: bool = False, ttl: int = 10
) -> AsyncIterator[list[AllocatorNode]]:
    """``count`` allocators on the env's etcd, as processes or hosts would be, each
    announcing itself (on a lease of ``ttl`` seconds) if ``announce``; returned once
    each view is live with the node registered (and the announcements in it)."""
    made = []
    try:
        for _ in range(count):
            client = connect(env.config, "allocator")
            state = EtcdState(client, lock_ttl=env.config.allocator.lock_ttl)
            cache = ClusterCache(state)
            cache.start()
            limits = RemoteLimits(env.service_client("allocator"))
            presence = Presence(client, env.config.node, ttl=ttl) if announce else None
            me = presence.me if presence else None
            allocator = Allocator(state, limits, cache=cache, me=me)
            node = AllocatorNode(client, state, cache, allocator, limits, presence)
            if presence is not None:
                node.keeping = asyncio.ensure_future(presence.keep())
            made.append(node)
        ids = {n.presence.me.id for n in made if n.presence}
        for node in made:
            for _ in range(200):
                seen = node.cache.view.allocators.get(env.config.node, set())
                if node.cache.live and node.cache.view.nodes and ids <= seen:
                    break
                await asyncio.sleep(0.02)
            assert node.cache.live and ids <= node.cache.view.allocators.get(env.config.node, set())
        yield made
    finally:
        for node in made:
            await node.close()
