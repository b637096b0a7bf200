"""An asyncio client for every ds01 service over mutual TLS.

Errors come back as :class:`Ds01Error` with a gRPC status code and a sentence a person
can act on; a refused TLS handshake is explained from the client's own certificate.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ds01.client.credentials import ClientIdentity, find_identity
from ds01.core import keepalive
from ds01.core.config import Config
from ds01.core.docker_args import DockerInfo
from ds01.core.messages import ANSWERED, RESUME_AFTER
from ds01.core.pki import SERVICES
from ds01.core.tls import certificate_problem, channel_credentials
from ds01.v1 import (
    allocator_pb2,
    allocator_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    containers_pb2,
    containers_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    limits_pb2,
    limits_pb2_grpc,
    ownership_pb2,
    ownership_pb2_grpc,
    status_pb2,
    status_pb2_grpc,
)

T = TypeVar("T")
_IdentityStub = identity_pb2_grpc.IdentityServiceStub
_StatusStub = status_pb2_grpc.StatusServiceStub
_AuditStub = audit_pb2_grpc.AuditServiceStub
_LimitsStub = limits_pb2_grpc.LimitsServiceStub
_AllocatorStub = allocator_pb2_grpc.AllocatorServiceStub
_ContainersStub = containers_pb2_grpc.ContainersServiceStub
_OwnershipStub = ownership_pb2_grpc.OwnershipServiceStub

DEFAULT_TIMEOUT = 10.0

# Reads may be retried when a service is briefly unavailable (starting, restarting).
_RETRY_READS = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "grpc.health.v1.Health"},
                    {"service": "ds01.v1.IdentityService"},
                    {"service": "ds01.v1.LimitsService", "method": "GetLimits"},
                    {"service": "ds01.v1.LimitsService", "method": "GetDockerArgs"},
                    {"service": "ds01.v1.AllocatorService", "method": "GetStatus"},
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


class Ds01Error(Exception):
    """A failed call: ``code`` is the gRPC status, ``message`` says what to do;
    ``resume_after``, on a live stream its service ended because it fell behind, the
    revision to follow on after."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        advice: str = "",
        resume_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.resume_after = resume_after
        self.message = f"{message}; {advice}" if advice else message
        self.problem = message  # without the advice: for a caller that advises itself

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class Ds01Client:
    """One client for the whole suite; channels open on first use."""

    def __init__(
        self,
        config: Config,
        identity: ClientIdentity | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        wait_for_ready: bool = False,
    ) -> None:
        """``wait_for_ready``: a call waits, within its deadline, for a service that is
        starting or restarting instead of failing at once. The services call each other
        this way; people's commands fail fast and say which service is not there."""
        self.config = config
        self.identity = identity or find_identity(config)
        self.timeout = timeout
        self._interceptors = [_WaitForReady(), _WaitForReadyStream()] if wait_for_ready else []
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Stubs by service and kind: making one registers every method of its service
        # with the channel, a cost worth paying once per client, not once per call.
        self._stubs: dict[tuple[str, type], Any] = {}

    async def __aenter__(self) -> Ds01Client:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()

    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}")
        if service not in self._channels:
            problem = certificate_problem(self.identity.ca_cert, self.identity.cert)
            if problem:
                raise Ds01Error(grpc.StatusCode.UNAUTHENTICATED, _advice(problem))
            credentials = channel_credentials(self.identity.ca_cert, self.identity.cert)
            self._channels[service] = grpc.aio.secure_channel(
                self.config.address(service),
                credentials,
                options=[("grpc.service_config", _RETRY_READS), *keepalive.client_options()],
                interceptors=self._interceptors,
            )
        return self._channels[service]

    def stub(self, service: str, kind: type) -> Any:
        """``kind(channel)`` for the service's channel, made once."""
        made = self._stubs.get((service, kind))
        if made is None:
            made = self._stubs[(service, kind)] = kind(self.channel(service))
        return made

    async def call(self, service: str, rpc: Callable[[grpc.aio.Channel], Awaitable[T]]) -> T:
        """Run ``rpc`` on the service's channel, translating failures into Ds01Error."""
        channel = self.channel(service)
        try:
            return await rpc(channel)
        except grpc.aio.AioRpcError as err:
            raise self._explain(service, err) from None

    async def unary(
        self, service: str, stub: type, method: str, request: Any, wait: float = 0.0
    ) -> Any:
        """Call ``stub(channel).method(request)`` on ``service`` with the default deadline,
        longer by ``wait`` seconds for a request that may queue that long."""
        timeout = self.timeout + wait
        call = getattr(self.stub(service, stub), method)
        return await self.call(service, lambda _channel: call(request, timeout=timeout))

    async def health(self, service: str) -> str:
        """The service's standard health status name, such as ``SERVING``."""
        request = health_pb2.HealthCheckRequest()
        response = await self.unary(service, health_pb2_grpc.HealthStub, "Check", request)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def service_status(self, service: str) -> status_pb2.GetServiceStatusResponse:
        """What ``service`` needs (etcd, Docker, fellow services) and whether it has it."""
        request = status_pb2.GetServiceStatusRequest()
        return await self.unary(service, _StatusStub, "GetServiceStatus", request)

    async def audit_records(
        self, user: str = "", since: float | None = None, page_size: int = 0
    ) -> audit_pb2.ListAuditRecordsResponse:
        """The fleet's audit trail from ``since`` (epoch seconds) on; admins only."""
        request = audit_pb2.ListAuditRecordsRequest(user=user, page_size=page_size)
        if since is not None:
            request.since.FromSeconds(int(since))
        return await self.unary("limits", _AuditStub, "ListAuditRecords", request)

    async def whoami(self, service: str = "limits") -> identity_pb2.WhoAmIResponse:
        request = identity_pb2.WhoAmIRequest()
        return await self.unary(service, _IdentityStub, "WhoAmI", request)

    async def get_limits(self, user: str = "", container_type: str = "") -> limits_pb2.UserLimits:
        request = limits_pb2.GetLimitsRequest(user=user, container_type=container_type)
        return (await self.unary("limits", _LimitsStub, "GetLimits", request)).limits

    async def get_docker_args(
        self, user: str = "", container_type: str = "", docker: DockerInfo | None = None
    ) -> limits_pb2.GetDockerArgsResponse:
        """With ``docker``, exactly what a container on that Docker gets; without, the
        limits as configured."""
        request = limits_pb2.GetDockerArgsRequest(
            user=user,
            container_type=container_type,
            docker=limits_pb2.DockerInfo(ncpu=docker.ncpu, cgroup_driver=docker.cgroup_driver)
            if docker is not None
            else None,
        )
        return await self.unary("limits", _LimitsStub, "GetDockerArgs", request)

    async def list_groups(self) -> list[limits_pb2.Group]:
        request = limits_pb2.ListGroupsRequest()
        return list((await self.unary("limits", _LimitsStub, "ListGroups", request)).groups)

    async def validate_config(
        self, text: str | None = None, file_name: str = ""
    ) -> limits_pb2.ValidateConfigResponse:
        """Check candidate limits text, or (without text) the configuration being served."""
        request = limits_pb2.ValidateConfigRequest(text=text, file_name=file_name)
        return await self.unary("limits", _LimitsStub, "ValidateConfig", request)

    async def allocate(
        self,
        container: str,
        user: str = "",
        slots: int = 0,
        gpu_equivalents: float = 0.0,
        preference: int = 0,
        node: str = "",
        wait_seconds: float | None = None,
        slot_ids: tuple[str, ...] = (),
        as_many: bool = False,
    ) -> allocator_pb2.AllocateResponse:
        """``as_many``: all the user's limits allow (at least one); ``slots`` is ignored."""
        request = allocator_pb2.AllocateRequest(
            as_many_as_allowed=as_many,
            user=user,
            container=container,
            slots=slots,
            gpu_equivalents=gpu_equivalents,
            preference=preference,
            node=node,
            slot_ids=slot_ids,
        )
        if wait_seconds:
            request.wait_until.FromNanoseconds(time.time_ns() + int(wait_seconds * 1e9))
        return await self.unary(
            "allocator", _AllocatorStub, "Allocate", request, wait=wait_seconds or 0.0
        )

    async def release(self, container: str) -> list[str]:
        request = allocator_pb2.ReleaseRequest(container=container)
        response = await self.unary("allocator", _AllocatorStub, "Release", request)
        return list(response.released_slots)

    async def mark_stopped(
        self, container: str, manual: bool = False
    ) -> list[common_pb2.Allocation]:
        request = allocator_pb2.MarkStoppedRequest(container=container, manual=manual)
        response = await self.unary("allocator", _AllocatorStub, "MarkStopped", request)
        return list(response.allocations)

    async def clear_stopped(self, container: str) -> list[common_pb2.Allocation]:
        request = allocator_pb2.ClearStoppedRequest(container=container)
        response = await self.unary("allocator", _AllocatorStub, "ClearStopped", request)
        return list(response.allocations)

    async def validate(
        self, container: str, slot_id: str, node: str = ""
    ) -> allocator_pb2.ValidateResponse:
        request = allocator_pb2.ValidateRequest(container=container, slot_id=slot_id, node=node)
        return await self.unary("allocator", _AllocatorStub, "Validate", request)

    async def gpu_status(self, user: str = "", node: str = "") -> allocator_pb2.GetStatusResponse:
        request = allocator_pb2.GetStatusRequest(user=user, node=node)
        return await self.unary("allocator", _AllocatorStub, "GetStatus", request)

    async def gpu_queue(self) -> allocator_pb2.ListWaitersResponse:
        request = allocator_pb2.ListWaitersRequest()
        return await self.unary("allocator", _AllocatorStub, "ListWaiters", request)

    async def drain(
        self, node: str, gpu: int | None = None, reason: str = ""
    ) -> allocator_pb2.DrainResponse:
        request = allocator_pb2.DrainRequest(node=node, gpu=gpu, reason=reason)
        return await self.unary("allocator", _AllocatorStub, "Drain", request)

    async def undrain(self, node: str, gpu: int | None = None) -> allocator_pb2.UndrainResponse:
        request = allocator_pb2.UndrainRequest(node=node, gpu=gpu)
        return await self.unary("allocator", _AllocatorStub, "Undrain", request)

    def watch_allocations(
        self, since_revision: int = 0
    ) -> AsyncIterator[allocator_pb2.WatchAllocationsResponse]:
        """Every allocation event after ``since_revision`` (0: from now on)."""
        request = allocator_pb2.WatchAllocationsRequest(since_revision=since_revision)
        stub = self.stub("allocator", _AllocatorStub)
        return self._follow("allocator", stub.WatchAllocations(request))

    def watch_container_events(
        self, since_revision: int = 0, user: str = ""
    ) -> AsyncIterator[containers_pb2.WatchContainerEventsResponse]:
        """Every container lifecycle event after ``since_revision`` (0: from now on)."""
        request = containers_pb2.WatchContainerEventsRequest(
            since_revision=since_revision, user=user
        )
        stub = self.stub("containers", _ContainersStub)
        return self._follow("containers", stub.WatchContainerEvents(request))

    async def create_container(
        self,
        name: str,
        image: str,
        gpus: int | None = 0,
        workspace: str = "",
        data_dirs: tuple[str, ...] = (),
        start: bool = False,
        container_type: str = "",
        gpu_preference: int = 0,
        gpu_wait: float = 0.0,
        all_gpus: bool = False,
    ) -> containers_pb2.Container:
        """``gpus``: None asks for the host's default; ``all_gpus``: all the caller's
        limits allow. ``gpu_wait``: seconds to queue for the GPUs (the call waits as
        long, too)."""
        request = containers_pb2.CreateContainerRequest(
            name=name,
            image=image,
            gpus=gpus,
            workspace=workspace,
            data_dirs=data_dirs,
            start=start,
            container_type=container_type,
            gpu_preference=gpu_preference,
            all_gpus=all_gpus,
        )
        request.gpu_wait.FromNanoseconds(int(gpu_wait * 1e9))
        response = await self.unary(
            "containers", _ContainersStub, "CreateContainer", request, wait=gpu_wait
        )
        return response.container

    async def start_container(self, name: str) -> containers_pb2.Container:
        request = containers_pb2.StartContainerRequest(name=name)
        return (await self._containers("StartContainer", request)).container

    async def stop_container(self, name: str, grace_seconds: int = 0) -> containers_pb2.Container:
        request = containers_pb2.StopContainerRequest(name=name, grace_seconds=grace_seconds)
        return (await self._containers("StopContainer", request)).container

    async def remove_container(self, name: str) -> None:
        await self._containers("RemoveContainer", containers_pb2.RemoveContainerRequest(name=name))

    async def list_containers(
        self, user: str = "", all_users: bool = False
    ) -> list[containers_pb2.Container]:
        request = containers_pb2.ListContainersRequest(user=user, all_users=all_users)
        return list((await self._containers("ListContainers", request)).containers)

    async def get_container(self, name: str) -> containers_pb2.Container:
        request = containers_pb2.GetContainerRequest(name=name)
        return (await self._containers("GetContainer", request)).container

    async def get_owner(self, container: str) -> ownership_pb2.ContainerOwner:
        """Who owns ``container`` (an id, an id prefix or a name) by its labels."""
        request = ownership_pb2.GetOwnerRequest(container=container)
        return (await self.unary("ownership", _OwnershipStub, "GetOwner", request)).owner

    async def list_owners(self, owner: str = "") -> list[ownership_pb2.ContainerOwner]:
        """Every container on the node with its owner (users: their own)."""
        request = ownership_pb2.ListOwnersRequest(owner=owner)
        return list((await self.unary("ownership", _OwnershipStub, "ListOwners", request)).owners)

    def watch_owners(self) -> AsyncIterator[ownership_pb2.WatchOwnersResponse]:
        """Each container's owner as it is set or removed, from now on (services and
        admins)."""
        stub = self.stub("ownership", _OwnershipStub)
        return self._follow("ownership", stub.WatchOwners(ownership_pb2.WatchOwnersRequest()))

    async def import_containers(self, dry_run: bool) -> list[containers_pb2.ImportedContainer]:
        """Adopt (or, dry_run, plan adopting) a DS01 host's containers; admins only."""
        request = containers_pb2.ImportContainersRequest(dry_run=dry_run)
        return list((await self._containers("ImportContainers", request)).containers)

    async def _containers(self, method: str, request: Any) -> Any:
        return await self.unary("containers", _ContainersStub, method, request)

    def watch_limits(self, user: str = "") -> AsyncIterator[limits_pb2.WatchLimitsResponse]:
        """Each reload that changes limits (the user's, or anyone's for admins)."""
        stub = self.stub("limits", _LimitsStub)
        return self._follow("limits", stub.WatchLimits(limits_pb2.WatchLimitsRequest(user=user)))

    async def _follow(self, service: str, stream: Any) -> AsyncIterator[Any]:
        """Relay a server stream, translating its failure; cancel it when abandoned."""
        try:
            async for item in stream:
                yield item
        except grpc.aio.AioRpcError as err:
            raise self._explain(service, err) from None
        finally:
            stream.cancel()

    def _explain(self, service: str, err: grpc.aio.AioRpcError) -> Ds01Error:
        code = err.code()
        trailing = err.trailing_metadata()
        if trailing and trailing.get(ANSWERED[0]) == ANSWERED[1]:  # the service's own sentence
            resume = trailing.get(RESUME_AFTER)
            after = int(resume) if isinstance(resume, str) and resume.isdigit() else None
            return Ds01Error(code, err.details() or code.name.lower(), resume_after=after)
        if code == grpc.StatusCode.UNAVAILABLE:
            problem = certificate_problem(self.identity.ca_cert, self.identity.cert)
            if problem:
                return Ds01Error(grpc.StatusCode.UNAUTHENTICATED, _advice(problem))
            return Ds01Error(
                code,
                f"cannot reach the {service} service at {self.config.address(service)} "
                f"({err.details()})",
                "is ds01d running? (`ds01 status` checks them all)",
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Ds01Error(code, f"the {service} service did not answer within {self.timeout:g}s")
        return Ds01Error(code, err.details() or code.name.lower())


class _WaitForReady(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(details._replace(wait_for_ready=True), request)


class _WaitForReadyStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(details._replace(wait_for_ready=True), request)


def _advice(problem: str) -> str:
    return (
        f"the ds01 services refuse this client: {problem}. "
        "Run `ds01 enroll` on the server (or ask an admin: `ds01 admin issue-cert USER`)."
    )
