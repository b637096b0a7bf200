"""What a service cannot work without, checked every few seconds.

The standard health check answers SERVING only while every dependency answers, so a
load balancer, systemd or `ds01 status` never sends users to a service whose etcd,
Docker or fellow service is away; ``GetServiceStatus`` says which one and why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from ds01.core.etcd import failure_sentence
from ds01.core.messages import timestamp
from ds01.v1 import status_pb2, status_pb2_grpc

log = logging.getLogger(__name__)

CHECK_INTERVAL = 2.0  # seconds between rounds of checks
CHECK_TIMEOUT = 2.0  # seconds one check may take before it counts as not answering

# A check returns when the dependency answers and raises (with a sentence) when not.
Check = Callable[[], Awaitable[None]]


@dataclass
class Dependency:
    name: str
    target: str
    check: Check
    available: bool = False
    detail: str = "not checked yet"
    checked_at: float | None = None

    async def refresh(self) -> None:
        try:
            await asyncio.wait_for(self.check(), CHECK_TIMEOUT)
        except Exception as err:
            detail = _sentence(self.name, err)
            if self.available:  # lost: worth a warning, once
                log.warning("%s at %s is not available: %s", self.name, self.target, detail)
            elif self.detail != detail:  # not there yet (starting up), or a new reason
                log.info("waiting for %s at %s: %s", self.name, self.target, detail)
            self.available, self.detail = False, detail
        else:
            if not self.available and self.checked_at is not None:
                log.info("%s at %s is available again", self.name, self.target)
            self.available, self.detail = True, ""
        self.checked_at = time.time()


def _sentence(name: str, err: Exception) -> str:
    if isinstance(err, TimeoutError):
        return f"{name} did not answer within {CHECK_TIMEOUT:.0f}s"
    return failure_sentence(err, otherwise=f"{name} failed")


@dataclass
class Dependencies:
    """A service's dependencies; each round of checks sets its health to match."""

    items: list[Dependency] = field(default_factory=list)
    health: HealthServicer | None = None
    services: Sequence[str] = ()

    def add(self, name: str, target: str, check: Check) -> None:
        self.items.append(Dependency(name, target, check))

    @property
    def ready(self) -> bool:
        return all(d.available for d in self.items)

    async def attach(self, health: HealthServicer, services: Sequence[str]) -> None:
        """Report through ``health`` from now on: NOT_SERVING until the first round of
        checks has passed, SERVING at once for a service that needs nothing."""
        self.health, self.services = health, services
        await self._publish()

    async def check_all(self) -> bool:
        """Check every dependency now and set the health; whether all answered."""
        await asyncio.gather(*(d.refresh() for d in self.items))
        await self._publish()
        return self.ready

    async def _publish(self) -> None:
        if self.health is None:
            return
        status = health_pb2.HealthCheckResponse.NOT_SERVING
        if self.ready:
            status = health_pb2.HealthCheckResponse.SERVING
        for name in ("", *self.services):
            await self.health.set(name, status)

    async def follow(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(CHECK_INTERVAL)

    async def wait_ready(self, timeout: float) -> bool:
        """Check until every dependency answers, for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not await self.check_all() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.ready

    def message(self, service: str) -> status_pb2.GetServiceStatusResponse:
        return status_pb2.GetServiceStatusResponse(
            service=service,
            ready=self.ready,
            dependencies=[
                status_pb2.Dependency(
                    name=d.name,
                    target=d.target,
                    available=d.available,
                    detail=d.detail,
                    checked_at=timestamp(d.checked_at),
                )
                for d in self.items
            ],
        )


class StatusServicer(status_pb2_grpc.StatusServiceServicer):
    def __init__(self, service: str, dependencies: Dependencies) -> None:
        self.service = service
        self.dependencies = dependencies

    async def GetServiceStatus(
        self, request: status_pb2.GetServiceStatusRequest, context: grpc.aio.ServicerContext
    ) -> status_pb2.GetServiceStatusResponse:
        return self.dependencies.message(self.service)
