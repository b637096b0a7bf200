"""The ownership service: the owner map over gRPC, its Docker sync, and enrollment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc

from ds01.client import ClientIdentity, Ds01Client, Ds01Error
from ds01.containers.adapters import CgroupfsSlices, DockerHost, IntentStore, SystemdSlices
from ds01.containers.adoption import unaccounted
from ds01.containers.lifecycle import apply_user_limits
from ds01.containers.spec import limits_of
from ds01.core.account_files import AccountFiles
from ds01.core.admin_view import AdminView
from ds01.core.docker_api import Daemon
from ds01.core.docker_args import nano_cpus
from ds01.core.etcd import connect
from ds01.core.identity import caller
from ds01.core.limits_cache import CachedLimits
from ds01.core.messages import abort
from ds01.core.server import ServiceRuntime, ServiceSpec
from ds01.core.watch import PUT, under, watching
from ds01.ownership import metrics as gateway_metrics
from ds01.ownership.enroll import EnrollmentServer
from ds01.ownership.gateway.admission import Gateway, UserSettings
from ds01.ownership.gateway.pins import PINS_LABEL, Pins
from ds01.ownership.gateway.policy import Caps
from ds01.ownership.gateway.relay import DockerGateway
from ds01.ownership.owners import DEVCONTAINER, DS01_LABEL, MLC_LABEL, NONE, Ownership
from ds01.ownership.sync import OwnershipSync, OwnerStore
from ds01.v1 import ownership_pb2, ownership_pb2_grpc

log = logging.getLogger(__name__)
OWNERSHIP_SERVICE = ownership_pb2.DESCRIPTOR.services_by_name["OwnershipService"].full_name
_SOURCES = {
    DS01_LABEL: ownership_pb2.OWNER_SOURCE_DS01_LABEL,
    MLC_LABEL: ownership_pb2.OWNER_SOURCE_MLC_LABEL,
    DEVCONTAINER: ownership_pb2.OWNER_SOURCE_DEVCONTAINER,
    NONE: ownership_pb2.OWNER_SOURCE_NONE,
}


def owner_message(ownership: Ownership) -> ownership_pb2.ContainerOwner:
    return ownership_pb2.ContainerOwner(
        container_id=ownership.container_id,
        name=ownership.name,
        owner=ownership.owner,
        source=_SOURCES[ownership.source],
        ds01_managed=ownership.managed,
    )


class OwnershipServicer(ownership_pb2_grpc.OwnershipServiceServicer):
    """Answers from the sync's memory of this node's containers; WatchOwners follows the
    etcd keys the sync writes."""

    def __init__(self, sync: OwnershipSync, is_admin: Callable[[str], Awaitable[bool]]) -> None:
        self.sync = sync
        self.store = sync.store
        self.is_admin = is_admin

    async def _ready(self, context: grpc.aio.ServicerContext) -> None:
        if not self.sync.resyncs:
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the ownership service is still reading Docker's containers; try again in a moment",
            )

    async def GetOwner(
        self, request: ownership_pb2.GetOwnerRequest, context: grpc.aio.ServicerContext
    ) -> ownership_pb2.GetOwnerResponse:
        principal = caller()
        await self._ready(context)
        found = self.sync.lookup(request.container)
        # Someone else's container looks the same as no container to a user.
        if found is None or not (principal.privileged or found.owner == principal.name):
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no container {request.container}")
        return ownership_pb2.GetOwnerResponse(owner=owner_message(found))

    async def ListOwners(
        self, request: ownership_pb2.ListOwnersRequest, context: grpc.aio.ServicerContext
    ) -> ownership_pb2.ListOwnersResponse:
        principal = caller()
        owner = request.owner or ("" if principal.privileged else principal.name)
        if owner != principal.name and not principal.privileged:
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "only admins may list other users' containers",
            )
        await self._ready(context)
        owners = [o for o in self.sync.known.values() if not owner or o.owner == owner]
        return ownership_pb2.ListOwnersResponse(owners=[owner_message(o) for o in owners])

    async def WatchOwners(
        self, request: ownership_pb2.WatchOwnersRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ownership_pb2.WatchOwnersResponse]:
        principal = caller()
        if not principal.privileged:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, "for services and admins")
        view = AdminView(principal, True, self.is_admin, "container owners")
        prefix = under(self.store.prefix.encode())
        async with watching(self.store.client, [prefix], 0, prev_kv=True) as stream:
            async for events in stream:
                for event in events:
                    answer = owner_event(event)
                    if answer is not None and await view.shows(context, (answer.owner.owner,)):
                        yield answer


def owner_event(event: Any) -> ownership_pb2.WatchOwnersResponse | None:
    """An etcd event of an ownership key (``mvccpb.Event``, with the value before it) as
    WatchOwners tells it; None for a removal etcd has no earlier value of."""
    if event.type == PUT:
        kind, value = ownership_pb2.OWNER_EVENT_TYPE_SET, event.kv.value
    elif event.HasField("prev_kv"):
        kind, value = ownership_pb2.OWNER_EVENT_TYPE_REMOVED, event.prev_kv.value
    else:
        return None
    return ownership_pb2.WatchOwnersResponse(
        type=kind, owner=owner_message(Ownership.decode(value))
    )


async def register(server: grpc.aio.Server, runtime: ServiceRuntime) -> None:
    config = runtime.config
    etcd = connect(config, "ownership")
    store = OwnerStore(etcd, config.node)
    docker_host = DockerHost(config.docker_host)
    docker_socket = Path(config.docker_host.removeprefix("unix://"))
    pins = Pins(config.state_dir / "pins")
    pins.prepare()

    async def unpin(labels: dict[str, str]) -> None:
        """A removed container's pins go at once (the sweep is for what was missed)."""
        for token in labels.get(PINS_LABEL, "").split():
            await asyncio.to_thread(pins.unpin, token)

    identity = ClientIdentity(config.pki.ca_cert, config.pki.service("ownership"))
    client = Ds01Client(config, identity, wait_for_ready=True)
    limits = CachedLimits(client, runtime.context.limits)
    runtime.run_in_background(limits.follow_changes(), "limits-changes")

    async def known_admin(user: str) -> bool:
        """For the gateway, which fails closed: not known to be an admin is none."""
        try:
            return await limits.is_admin(user)
        except Ds01Error:
            return False

    sync = OwnershipSync(docker_host, store, on_destroy=unpin)
    # WatchOwners ends UNAVAILABLE when whether its admin still is one cannot be told.
    servicer = OwnershipServicer(sync, limits.is_admin)
    ownership_pb2_grpc.add_OwnershipServiceServicer_to_server(servicer, server)
    runtime.run_in_background(sync.run(), "ownership-sync")
    enrollment = EnrollmentServer(config.pki, config.ownership.enroll_socket)
    await enrollment.start()
    runtime.needs_etcd(etcd)
    runtime.dependencies.add("docker", config.docker_host, docker_host.ping)
    runtime.needs_services(identity, "limits")

    cgroups, slices = CgroupfsSlices(), SystemdSlices()

    known: dict[str, tuple[float, UserSettings]] = {}

    async def settings(user: str) -> UserSettings:
        """A user's limits for gateway creates, asked again after 5 s (they change rarely)."""
        cached = known.get(user)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        found = await read_settings(user)
        known[user] = (time.monotonic() + 5, found)
        return found

    async def read_settings(user: str) -> UserSettings:
        found = await limits.get_limits(user)
        # What a container on this Docker gets, as `ds01 limits --docker-args` prints it.
        args = await limits.get_docker_args(user, "", await docker_host.docker_info())
        await asyncio.to_thread(apply_user_limits, cgroups, slices, args.cgroup_parent, found)
        most = found.max_containers_per_user if found.HasField("max_containers_per_user") else None
        return UserSettings(args.cgroup_parent, caps_of(found, args), most)

    async def container_owner(container_id: str) -> str | None:
        known = sync.known.get(container_id)  # by full id only: an id never changes owner
        return known.owner if known else None

    daemon = Daemon(docker_socket)
    runtime.run_in_background(sweep_pins(daemon, pins), "pin-sweep")
    gpus = AllocatorGpus(client, config.node)
    intents = IntentStore(etcd, config.node)

    async def create_pending(name: str) -> bool:
        return await intents.get(name) is not None

    gateway = Gateway(
        daemon,
        settings,
        container_owner,
        pins=pins,
        gpus=gpus,
        create_pending=create_pending,
        account_files=AccountFiles(config.state_dir / "accounts"),
    )
    proxy = DockerGateway(
        config.ownership.proxy_socket, docker_socket, gateway, known_admin, runtime.audit
    )
    gateway_metrics.register(runtime.metrics, proxy.stats)
    await proxy.start()

    async def close() -> None:
        await proxy.stop()
        await client.close()
        await enrollment.stop()
        await docker_host.close()
        with contextlib.suppress(Exception):
            await etcd.close()

    runtime.on_stop.append(close)


def caps_of(limits: Any, args: Any) -> Caps:
    """The ceilings of a user's gateway creates, from GetLimits and from GetDockerArgs for
    this Docker: a request that names no value gets what `ds01 limits --docker-args`
    prints. Swap and /dev/shm are ceilings only where the configuration sets them;
    otherwise the printed value is Docker's own default, which a request naming none
    gets from Docker, and one may name more: the configuration sets no limit there."""

    got = limits_of(args)
    return Caps(
        nano_cpus=nano_cpus(got.cpus) if got.cpus is not None else None,
        memory=got.memory,
        memory_swap=got.memory_swap if limits.memory_swap_bytes else None,
        pids=got.pids,
        shm_size=got.shm_size if limits.shm_size_bytes else None,
    )


class AllocatorGpus:
    """The allocator, asked with the ownership service's own certificate."""

    def __init__(self, client: Ds01Client, node: str) -> None:
        self.client = client
        self.node = node

    async def check(self, container: str, slots: list[str]) -> str | None:
        try:
            for slot in slots:
                node, _, slot_id = slot.rpartition("/")
                answer = await self.client.validate(container, slot_id, node=node)
                if not answer.valid:
                    return answer.reason or f"{slot} is no longer {container}'s"
        except Ds01Error as err:  # unknown is not valid: fail closed
            return f"the allocator could not be asked ({err.message})"
        return None

    async def check_references(self, container: str, references: list[str]) -> str | None:
        try:
            status = await self.client.gpu_status(node=self.node)
        except Ds01Error as err:  # unknown is not valid: fail closed
            return f"the allocator could not be asked ({err.message})"
        return unaccounted(container, references, status.allocations) or None

    async def started(self, container: str) -> None:
        try:
            await self.client.clear_stopped(container)
        except Ds01Error as err:
            log.warning("%s runs again but its GPU hold stays: %s", container, err.message)


async def sweep_pins(daemon: Daemon, pins: Pins, every: float = 30.0) -> None:
    """Unpin the bind sources of containers that are gone: at start, then every 30 s."""
    wanted = json.dumps({"label": [PINS_LABEL]})
    while True:
        try:
            listed = await daemon.get(f"/containers/json?all=1&filters={quote(wanted)}")
            if listed is not None:  # never sweep on a daemon that did not answer
                in_use = {
                    token
                    for container in listed
                    for token in (container.get("Labels") or {}).get(PINS_LABEL, "").split()
                }
                await asyncio.to_thread(pins.sweep, in_use)
        except OSError as err:
            log.info("pin sweep skipped: %s", err)
        await asyncio.sleep(every)


SPEC = ServiceSpec(name="ownership", grpc_services=(OWNERSHIP_SERVICE,), register=register)
