"""The containers service over gRPC: the caller's containers, errors in words."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import docker.errors
import grpc

from ds01.allocator.events import HistoryCompacted, from_oldest_kept
from ds01.client import ClientIdentity, Ds01Client, Ds01Error
from ds01.containers import metrics as container_metrics
from ds01.containers.adapters import DockerHost, DockerUnavailable, Metadata, MetadataStore
from ds01.containers.events import Kind, LifecycleEvent, LifecycleEvents, watch_lifecycle
from ds01.containers.lifecycle import Code, ContainerError, CreateRequest, Lifecycle
from ds01.containers.metrics import Tallies
from ds01.containers.reconcile import Reconciler
from ds01.core.account_files import AccountFiles
from ds01.core.admin_view import AdminView
from ds01.core.etcd import connect
from ds01.core.identity import caller
from ds01.core.messages import SLOT_PREFERENCES, abort, timestamp
from ds01.core.server import ServiceRuntime, ServiceSpec, answer
from ds01.v1 import common_pb2, containers_pb2, containers_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_GPU_WAIT = 24 * 3600.0  # seconds a create may queue for its GPUs
CONTAINERS_SERVICE = containers_pb2.DESCRIPTOR.services_by_name["ContainersService"].full_name
_CODES = {
    Code.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Code.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}
_STATES = {
    "created": containers_pb2.CONTAINER_STATE_CREATED,
    "running": containers_pb2.CONTAINER_STATE_RUNNING,
    "restarting": containers_pb2.CONTAINER_STATE_RUNNING,
    "paused": containers_pb2.CONTAINER_STATE_RUNNING,
    "exited": containers_pb2.CONTAINER_STATE_STOPPED,
    "dead": containers_pb2.CONTAINER_STATE_STOPPED,
}


_PENDING = {
    "creating": containers_pb2.CONTAINER_STATE_CREATING,
    "interrupted": containers_pb2.CONTAINER_STATE_INTERRUPTED,
}


@dataclass
class Holdings:
    known: bool
    by_container: dict[str, list[common_pb2.Allocation]] = field(default_factory=dict)


class ContainersServicer(containers_pb2_grpc.ContainersServiceServicer):
    def __init__(self, lifecycle: Lifecycle, reconciler: Reconciler) -> None:
        self.lifecycle = lifecycle
        self.reconciler = reconciler
        self._running: set[asyncio.Future[Any]] = set()  # calls whose callers hung up too

    async def CreateContainer(
        self, request: containers_pb2.CreateContainerRequest, context: grpc.aio.ServicerContext
    ) -> containers_pb2.CreateContainerResponse:
        user, _ = await self._caller(context)
        create = CreateRequest(
            user=user,
            name=request.name,
            image=request.image,
            gpus=request.gpus if request.HasField("gpus") else None,
            workspace=request.workspace,
            data_dirs=tuple(request.data_dirs),
            start=request.start,
            container_type=request.container_type,
            gpu_preference=request.gpu_preference,
            gpu_wait=request.gpu_wait.ToTimedelta().total_seconds(),
            all_gpus=request.all_gpus,
        )
        if create.gpus is not None and create.gpus < 0:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "gpus must be 0 or more")
        if not 0 <= create.gpu_wait <= MAX_GPU_WAIT:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"gpu_wait must be between 0 and {MAX_GPU_WAIT / 3600:g} hours",
            )
        # Any create runs to its end if its caller hangs up, but one that queues for its
        # GPUs gives up (and undoes itself) if its caller leaves while it waits.
        abandoned = asyncio.Event() if create.gpu_wait else None
        gpus: list[common_pb2.Allocation] = []
        metadata = await self._run(
            context,
            self.lifecycle.create(create, abandoned, gpus),
            on_leave=abandoned.set if abandoned else None,
        )
        return containers_pb2.CreateContainerResponse(container=await self._answer(metadata, gpus))

    async def StartContainer(
        self, request: containers_pb2.StartContainerRequest, context: grpc.aio.ServicerContext
    ) -> containers_pb2.StartContainerResponse:
        user, privileged = await self._caller(context)
        gpus: list[common_pb2.Allocation] = []
        metadata = await self._run(
            context, self.lifecycle.start(user, privileged, request.name, gpus)
        )
        return containers_pb2.StartContainerResponse(container=await self._answer(metadata, gpus))

    async def StopContainer(
        self, request: containers_pb2.StopContainerRequest, context: grpc.aio.ServicerContext
    ) -> containers_pb2.StopContainerResponse:
        user, privileged = await self._caller(context)
        gpus: list[common_pb2.Allocation] = []
        stopping = self.lifecycle.stop(
            user, privileged, request.name, request.grace_seconds, allocations=gpus
        )
        metadata = await self._run(context, stopping)
        return containers_pb2.StopContainerResponse(container=await self._answer(metadata, gpus))

    async def RemoveContainer(
        self, request: containers_pb2.RemoveContainerRequest, context: grpc.aio.ServicerContext
    ) -> containers_pb2.RemoveContainerResponse:
        user, privileged = await self._caller(context)
        await self._run(context, self.lifecycle.remove(user, privileged, request.name))
        return containers_pb2.RemoveContainerResponse()

    async def WatchContainerEvents(
        self,
        request: containers_pb2.WatchContainerEventsRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[containers_pb2.WatchContainerEventsResponse]:
        user, privileged = await self._caller(context)
        if request.user and request.user != user and not privileged:
            await abort(
                context, grpc.StatusCode.PERMISSION_DENIED, "only admins see others' events"
            )
        wanted = request.user or ("" if privileged else user)
        view = AdminView(caller(), privileged, self.lifecycle.limits.is_admin, "container events")
        client = self.lifecycle.metadata.client
        try:
            watch = functools.partial(watch_lifecycle, client)
            async for event in from_oldest_kept(watch, request.since_revision):
                if (not wanted or event.user == wanted) and await view.shows(
                    context, (event.user,)
                ):
                    yield lifecycle_message(event)
        except HistoryCompacted as err:
            await abort(context, grpc.StatusCode.OUT_OF_RANGE, str(err))

    async def ListContainers(
        self, request: containers_pb2.ListContainersRequest, context: grpc.aio.ServicerContext
    ) -> containers_pb2.ListContainersResponse:
        user, privileged = await self._caller(context)
        if (request.all_users or (request.user and request.user != user)) and not privileged:
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "only admins may list other users' containers",
            )
        found = await self._run(
            context, self.lifecycle.list(request.user or user, request.all_users)
        )
        held = await self._holdings("" if request.all_users else request.user or user)
        return containers_pb2.ListContainersResponse(
            containers=[await self._message(m, c, held) for m, c in found]
        )

    async def GetContainer(
        self, request: containers_pb2.GetContainerRequest, context: grpc.aio.ServicerContext
    ) -> containers_pb2.GetContainerResponse:
        user, privileged = await self._caller(context)
        metadata, container = await self._run(
            context, self.lifecycle.inspect(user, privileged, request.name)
        )
        return containers_pb2.GetContainerResponse(
            container=await self._message(metadata, container)
        )

    async def ImportContainers(
        self, request: containers_pb2.ImportContainersRequest, context: grpc.aio.ServicerContext
    ) -> containers_pb2.ImportContainersResponse:
        _, privileged = await self._caller(context)
        if not privileged:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, "only admins import")
        found = await self._run(context, self.reconciler.import_containers(request.dry_run))
        return containers_pb2.ImportContainersResponse(
            containers=[containers_pb2.ImportedContainer(**vars(entry)) for entry in found]
        )

    async def _caller(self, context: grpc.aio.ServicerContext) -> tuple[str, bool]:
        principal = caller()
        if principal.is_service:
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "containers are created by users, not services",
            )
        privileged = principal.is_admin
        if not privileged:
            with contextlib.suppress(Ds01Error):
                privileged = await self.lifecycle.limits.is_admin(principal.name)
        return principal.name, privileged

    async def _answer(
        self, metadata: Metadata, gpus: list[common_pb2.Allocation]
    ) -> containers_pb2.Container:
        """The container a create, start or stop has just acted on, as that call left it:
        the status Docker gave it and the GPUs the allocator gave back to it. (Adopted
        containers may hold GPUs the call did not touch: for them the allocator is asked.)"""
        if metadata.adopted:
            held = await self._holdings(metadata.user)
        else:
            held = Holdings(True, {metadata.docker_name: gpus})
        return _container(metadata, metadata.status, held)

    async def _message(
        self, metadata: Metadata, container: Any = None, held: Holdings | None = None
    ) -> containers_pb2.Container:
        held = held if held is not None else await self._holdings(metadata.user)
        if metadata.pending:  # a create in progress or being undone: nothing to ask Docker
            return _container(metadata, None, held)
        if metadata.node != self.lifecycle.node:  # another node's: as that node last saw it
            return _container(metadata, metadata.status or None, held)
        # ``container`` was inspected just now (a list's, an inspect's): not asked again.
        container = container or await self.lifecycle.docker.find(metadata.container_id)
        return _container(metadata, container.status if container else None, held)

    async def _holdings(self, user: str = "") -> Holdings:
        """The GPUs each container of the fleet (or of ``user``) holds now, as the
        allocator says: a slot whose hold ended is shown no longer. Empty (and unused)
        when it cannot be asked."""
        try:
            status = await self.lifecycle.client.gpu_status(user=user)
        except Ds01Error as err:
            log.debug("listing without the allocator's view: %s", err.message)
            return Holdings(known=False)
        held = Holdings(known=True)
        for allocation in status.allocations:
            if allocation.container:
                held.by_container.setdefault(allocation.container, []).append(allocation)
        return held

    async def _run(
        self,
        context: grpc.aio.ServicerContext,
        work: Awaitable[T],
        on_leave: Callable[[], object] | None = None,
    ) -> T:
        """Run ``work`` to its end even if the caller hangs up: a create, stop or remove
        cut off halfway would leave a container without its record, or the reverse.
        ``on_leave`` is told when the caller has gone."""
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        try:
            return await answer(context, asyncio.shield(task), _status_of)
        except asyncio.CancelledError:
            task.add_done_callback(_told_nobody)
            if on_leave is not None:
                on_leave()
            raise


def _told_nobody(task: asyncio.Future[Any]) -> None:
    """Log, in one line, how work whose caller hung up failed: nobody else hears of it
    (asyncio logged each as "Task exception was never retrieved", with a traceback)."""
    if task.cancelled() or (err := task.exception()) is None:
        return
    status = _status_of(err) if isinstance(err, Exception) else None
    what = getattr(task, "get_coro", lambda: None)()
    name = getattr(what, "__qualname__", "a call")
    log.warning("%s failed after its caller hung up: %s", name, status[1] if status else err)


def _status_of(err: Exception) -> tuple[grpc.StatusCode, str] | None:
    if isinstance(err, ContainerError):
        return _CODES[err.code], err.message
    if isinstance(err, DockerUnavailable | docker.errors.DockerException):
        return grpc.StatusCode.UNAVAILABLE, f"Docker: {err}"
    return None


_EVENT_TYPES = {
    kind: containers_pb2.ContainerEventType.Value(f"CONTAINER_EVENT_TYPE_{kind.name}")
    for kind in Kind
}


def lifecycle_message(event: LifecycleEvent) -> containers_pb2.WatchContainerEventsResponse:
    return containers_pb2.WatchContainerEventsResponse(
        type=_EVENT_TYPES.get(Kind(event.kind), containers_pb2.CONTAINER_EVENT_TYPE_UNSPECIFIED),
        name=event.name,
        docker_name=event.docker_name,
        user=event.user,
        node=event.node,
        time=timestamp(event.time),
        detail=event.detail,
        revision=event.revision,
    )


def _container(metadata: Metadata, status: str | None, held: Holdings) -> containers_pb2.Container:
    message = containers_pb2.Container(
        name=metadata.name,
        docker_name=metadata.docker_name,
        id=metadata.container_id,
        user=metadata.user,
        image=metadata.image,
        workspace=metadata.workspace,
        data_dirs=metadata.data_dirs,
        notice=metadata.notice,
        container_type=metadata.container_type,
        node=metadata.node,
        created_at=timestamp(metadata.created_at),
        state=containers_pb2.CONTAINER_STATE_GONE,
    )
    if held.known:
        message.gpus.extend(held.by_container.get(metadata.docker_name, []))
    else:
        for slot in metadata.gpu_slots:
            node, _, slot_id = slot.partition("/")
            allocation = message.gpus.add()
            allocation.slot.node, allocation.slot.slot_id = node, slot_id
    if status is not None:
        message.state = _STATES.get(status, containers_pb2.CONTAINER_STATE_STOPPED)
    if metadata.pending:
        message.state = _PENDING[metadata.pending]
    return message


async def register(server: grpc.aio.Server, runtime: ServiceRuntime) -> None:
    config = runtime.config
    identity = ClientIdentity(config.pki.ca_cert, config.pki.service("containers"))
    client = Ds01Client(config, identity, timeout=60, wait_for_ready=True)
    etcd = connect(config, "containers")
    docker_host = DockerHost(config.docker_host)
    lifecycle = Lifecycle(
        node=config.node,
        docker=docker_host,
        metadata=MetadataStore(etcd, config.node),
        client=client,
        network_mode=config.containers.network_mode,
        default_gpus=config.containers.default_gpus,
        default_gpu_preference=SLOT_PREFERENCES[config.containers.default_gpu_kind],
        events=LifecycleEvents(etcd, config.node),
        account_files=AccountFiles(config.state_dir / "accounts"),
        local_limits=runtime.context.limits,
    )
    reconciler = Reconciler(
        lifecycle,
        interval=config.containers.reconcile_interval,
        ds01_metadata=config.containers.ds01_metadata_dir,
    )
    containers_pb2_grpc.add_ContainersServiceServicer_to_server(
        ContainersServicer(lifecycle, reconciler), server
    )

    async def allocations() -> list[Any]:
        return list((await client.gpu_status(node=config.node)).allocations)

    container_metrics.register(
        runtime.metrics,
        config.node,
        lifecycle.metadata.all,
        docker_host,
        allocations,
        Tallies(
            lifecycle=lifecycle.events.counts,
            reconcile=reconciler.actions,
            sweeps=lambda: (
                reconciler.sweeps,
                reconciler.sweep_seconds,
                reconciler.last_sweep_seconds,
            ),
        ),
    )
    # Creates a previous run left half-done are undone first, within seconds of start.
    runtime.run_in_background(lifecycle.repair_forever(), "create-repair")
    runtime.run_in_background(lifecycle.limits.follow_changes(), "limits-changes")
    runtime.run_in_background(reconciler.run(), "reconciler")
    runtime.needs_etcd(etcd)
    runtime.dependencies.add("docker", config.docker_host, docker_host.ping)
    runtime.needs_services(identity, "limits", "allocator")

    async def close() -> None:
        await client.close()
        await docker_host.close()
        with contextlib.suppress(Exception):
            await etcd.close()

    runtime.on_stop.append(close)


SPEC = ServiceSpec(name="containers", grpc_services=(CONTAINERS_SERVICE,), register=register)
