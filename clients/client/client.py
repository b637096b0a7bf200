"""An asyncio client for every ds01 service over mutual TLS.

Errors come back as :class:`Ds01Error` with a gRPC status code and a sentence a person
can act on; a refused TLS handshake is explained from the client's own certificate.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ds01.client.credentials import ClientIdentity, find_identity
from ds01.core.config import Config
from ds01.core.pki import SERVICES
from ds01.core.tls import certificate_problem, channel_credentials
from ds01.v1 import identity_pb2, identity_pb2_grpc

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0

# Reads may be retried when the service is briefly unavailable (a restart).
_RETRY_READS = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "grpc.health.v1.Health"},
                    {"service": "ds01.v1.IdentityService"},
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
    """A failed call: ``code`` is the gRPC status, ``message`` says what to do."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class Ds01Client:
    """One client for the whole suite; channels open on first use."""

    def __init__(
        self,
        config: Config,
        identity: ClientIdentity | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.config = config
        self.identity = identity or find_identity(config)
        self.timeout = timeout
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def __aenter__(self) -> Ds01Client:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

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
                options=[("grpc.service_config", _RETRY_READS)],
            )
        return self._channels[service]

    async def call(self, service: str, rpc: Callable[[grpc.aio.Channel], Awaitable[T]]) -> T:
        """Run ``rpc`` on the service's channel, translating failures into Ds01Error."""
        channel = self.channel(service)
        try:
            return await rpc(channel)
        except grpc.aio.AioRpcError as err:
            raise self._explain(service, err) from None

    async def health(self, service: str) -> str:
        """The service's standard health status name, such as ``SERVING``."""
        response = await self.call(
            service,
            lambda ch: health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=self.timeout
            ),
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def whoami(self, service: str = "limits") -> identity_pb2.WhoAmIResponse:
        return await self.call(
            service,
            lambda ch: identity_pb2_grpc.IdentityServiceStub(ch).WhoAmI(
                identity_pb2.WhoAmIRequest(), timeout=self.timeout
            ),
        )

    def _explain(self, service: str, err: grpc.aio.AioRpcError) -> Ds01Error:
        code = err.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            problem = certificate_problem(self.identity.ca_cert, self.identity.cert)
            if problem:
                return Ds01Error(grpc.StatusCode.UNAUTHENTICATED, _advice(problem))
            return Ds01Error(
                code,
                f"cannot reach the {service} service at {self.config.address(service)} "
                f"({err.details()}); is ds01d running? (`ds01 status` checks them all)",
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Ds01Error(code, f"the {service} service did not answer within {self.timeout}s")
        return Ds01Error(code, err.details() or code.name.lower())


def _advice(problem: str) -> str:
    return (
        f"the ds01 services refuse this client: {problem}. "
        "An admin issues certificates with `ds01 admin issue-cert USER`."
    )
