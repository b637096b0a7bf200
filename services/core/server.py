"""What every ds01 gRPC server has: mTLS, the caller interceptor, health, reflection.

A service package describes itself with a :class:`ServiceSpec`; :func:`start_service`
turns it into a listening server. The same code runs one service per process (compose)
or several in one process (``ds01d --services all``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any, TypeVar

import aetcd
import grpc
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from ds01.client import ClientIdentity, Ds01Client
from ds01.core import keepalive
from ds01.core.audit import AuditLog
from ds01.core.audit_service import AuditServicer, CallAudit
from ds01.core.bounds import MAX_MESSAGE_BYTES
from ds01.core.config import Config
from ds01.core.dependencies import CHECK_TIMEOUT, Dependencies, StatusServicer
from ds01.core.etcd import connect, etcd_status
from ds01.core.identity import CallInterceptor, Roles, caller
from ds01.core.limits_cache import LocalAnswers
from ds01.core.messages import abort
from ds01.core.metrics import MetricsEndpoint, ServiceMetrics, start_endpoint
from ds01.core.tls import server_credentials
from ds01.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    status_pb2,
    status_pb2_grpc,
)

log = logging.getLogger(__name__)
STOP_STEP_TIMEOUT = 10.0  # seconds one step of stopping a service may take
# Threads for Docker SDK calls and file work: asyncio's default pool (cores + 4) would
# queue fifty users' creates behind each other on a small host.
WORKER_THREADS = 64
# Calls that have arrived but that the event loop has not taken up yet. Past gRPC's
# default (1,000) it cancels new calls at random: a thousand monitors reconnecting at
# once after a restart lost some of their streams.
PENDING_CALLS = 20_000
T = TypeVar("T")
VERSION = metadata.version("ds01")

IDENTITY_SERVICE = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name
STATUS_SERVICE = status_pb2.DESCRIPTOR.services_by_name["StatusService"].full_name
AUDIT_SERVICE = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name


@dataclass
class ServiceContext:
    """What the services of one process share."""

    config: Config
    roles: Roles
    # The limits service's answers, where it runs in this process (it starts first).
    limits: LocalAnswers | None = None


@dataclass
class ServiceRuntime:
    """What one service's wiring gets: the shared context, its health, its clean-up."""

    context: ServiceContext
    health: HealthServicer
    metrics: ServiceMetrics
    audit: AuditLog
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # What the service needs; its health says SERVING only while all of them answer.
    dependencies: Dependencies = field(default_factory=Dependencies)

    @property
    def config(self) -> Config:
        return self.context.config

    def needs_etcd(self, client: aetcd.Client) -> None:
        async def check() -> None:
            await client.get(b"/ds01/v1/")

        self.dependencies.add("etcd", self.config.etcd_endpoints[0], check)

    def needs_services(self, identity: ClientIdentity, *names: str) -> None:
        """Fellow services, asked for their health without waiting: a check says what
        is missing now."""
        client = Ds01Client(self.config, identity, timeout=CHECK_TIMEOUT)

        def check(name: str) -> Callable[[], Awaitable[None]]:
            async def healthy() -> None:
                state = await client.health(name)
                if state != "SERVING":
                    raise RuntimeError(f"the {name} service reports {state}")

            return healthy

        for name in names:
            self.dependencies.add(name, self.config.address(name), check(name))
        self.on_stop.append(client.close)

    def run_in_background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``work`` while the service runs; it is cancelled when the service stops."""
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(_log_crash)

        async def cancel() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        self.on_stop.append(cancel)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())


@dataclass(frozen=True)
class ServiceSpec:
    """A service package's description of itself."""

    name: str
    # Full names of the gRPC services it serves, e.g. "ds01.v1.LimitsService".
    grpc_services: tuple[str, ...]
    # Adds its servicers to the server; may report NOT_SERVING through runtime.health.
    register: Callable[[grpc.aio.Server, ServiceRuntime], Awaitable[None]]


class ServiceStartError(Exception):
    """A service could not start; the message says why and what to do."""


@dataclass
class RunningService:
    spec: ServiceSpec
    server: grpc.aio.Server
    address: str
    runtime: ServiceRuntime
    metrics_endpoint: MetricsEndpoint | None = None
    _stopped: bool = field(default=False, init=False)

    @property
    def metrics_address(self) -> str | None:
        """Where Prometheus scrapes this service (None: metrics are off)."""
        return self.metrics_endpoint.address if self.metrics_endpoint else None

    @property
    def health(self) -> HealthServicer:
        return self.runtime.health

    async def ready(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until everything the service needs answers."""
        return await self.runtime.dependencies.wait_ready(timeout)

    async def stop(self, grace: float = 2.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self._bounded(self.health.enter_graceful_shutdown(), "health shutdown")
        await self._bounded(self.server.stop(grace), "the gRPC server's stop", grace)
        if self.metrics_endpoint is not None:
            await self._bounded(asyncio.to_thread(self.metrics_endpoint.stop), "metrics")
        for hook in reversed(self.runtime.on_stop):
            await self._bounded(hook(), getattr(hook, "__qualname__", repr(hook)))

    async def _bounded(self, step: Awaitable[object], what: str, extra: float = 0.0) -> None:
        """One step of stopping, given STOP_STEP_TIMEOUT: a step that waits on something
        gone (etcd, another service) must not keep the service, or systemd, waiting."""
        try:
            await asyncio.wait_for(step, STOP_STEP_TIMEOUT + extra)
        except TimeoutError:
            log.warning("stopping %s: %s took over %g s; going on without it",
                        self.spec.name, what, STOP_STEP_TIMEOUT + extra)  # fmt: skip


class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(self, service: str) -> None:
        self.service = service

    async def WhoAmI(
        self, request: identity_pb2.WhoAmIRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.WhoAmIResponse:
        principal = caller()
        response = identity_pb2.WhoAmIResponse(
            name=principal.name, kind=principal.kind, service=self.service
        )
        if principal.certificate_expires:
            expires = timestamp_pb2.Timestamp()
            expires.FromDatetime(principal.certificate_expires)
            response.certificate_expires.CopyFrom(expires)
        return response


async def start_service(
    spec: ServiceSpec, context: ServiceContext, address: str | None = None
) -> RunningService:
    """Start ``spec`` on ``address`` (default: from the config) with mutual TLS."""
    config = context.config
    address = address or config.address(spec.name)
    if not config.pki.service(spec.name).cert.is_file():
        raise ServiceStartError(
            f"{spec.name}: no certificate in {config.pki.root}: run `ds01 admin pki init`"
        )
    metrics = ServiceMetrics(spec.name, config.node, VERSION)
    audit = AuditLog(config.node, spec.name, lambda: connect(config, spec.name))
    server = grpc.aio.server(
        # Metrics time every call, refused ones included; the audit trail needs the
        # caller, whom authentication establishes.
        interceptors=[
            CallInterceptor(
                context.roles,
                outer=[metrics.timing()] if config.metrics.listen.get(spec.name) else [],
                inner=[CallAudit(audit)],
            )
        ],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.server.max_pending_requests", PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
            *keepalive.server_options(),
        ],
    )
    health = HealthServicer()
    runtime = ServiceRuntime(context, health, metrics, audit)
    metrics.follow(runtime.dependencies)
    runtime.run_in_background(audit.run(), f"{spec.name}-audit")
    runtime.on_stop.append(audit.close)
    await spec.register(server, runtime)
    await runtime.dependencies.attach(health, spec.grpc_services)
    if runtime.dependencies.items:
        runtime.run_in_background(runtime.dependencies.follow(), f"{spec.name}-dependencies")
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(IdentityServicer(spec.name), server)
    status_pb2_grpc.add_StatusServiceServicer_to_server(
        StatusServicer(spec.name, runtime.dependencies), server
    )
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(config, spec.name), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *spec.grpc_services,
            IDENTITY_SERVICE,
            STATUS_SERVICE,
            AUDIT_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        port = server.add_secure_port(address, server_credentials(config.pki, spec.name))
    except RuntimeError as err:
        port = 0
        log.debug("bind %s failed: %s", address, err)
    if port == 0:
        for hook in reversed(runtime.on_stop):
            await hook()
        raise ServiceStartError(
            f"{spec.name}: cannot listen on {address}: the address is in use or not local; "
            f"change listen.{spec.name} in {config.source or 'the config'}"
        )
    host = address.rpartition(":")[0]
    bound = f"{host}:{port}"
    await server.start()
    log.info("%s serving on %s (mutual TLS)", spec.name, bound)
    metrics.loop = asyncio.get_running_loop()
    return RunningService(
        spec=spec,
        server=server,
        address=bound,
        runtime=runtime,
        metrics_endpoint=start_endpoint(metrics, config),
    )


def contract_only_spec(
    name: str, messages: ModuleType, stubs: ModuleType, service: str
) -> ServiceSpec:
    """A spec serving a contract whose methods are not built yet: they answer UNIMPLEMENTED.

    Health and reflection already work, so clients and tools can discover the service.
    """
    servicer = getattr(stubs, f"{service}Servicer")
    add = getattr(stubs, f"add_{service}Servicer_to_server")

    async def register(server: grpc.aio.Server, _runtime: ServiceRuntime) -> None:
        add(servicer(), server)

    return ServiceSpec(
        name=name,
        grpc_services=(messages.DESCRIPTOR.services_by_name[service].full_name,),
        register=register,
    )


async def answer(
    context: grpc.aio.ServicerContext,
    work: Awaitable[T],
    status_of: Callable[[Exception], tuple[grpc.StatusCode, str] | None],
) -> T:
    """Await a handler's ``work``; a failure ``status_of`` knows becomes that gRPC status
    with its sentence, as does etcd out of reach. Anything else propagates, to be
    logged and answered INTERNAL (an etcd refusal of what ds01 asked among them)."""
    try:
        return await work
    except Exception as err:
        status = status_of(err) or etcd_status(err)
        if status is None or status[0] == grpc.StatusCode.INTERNAL:
            raise
        await abort(context, *status)
        raise  # abort raises; this only satisfies type checkers
