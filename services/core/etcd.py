"""The one way the services reach etcd: mutual TLS with a certificate per service.

etcd runs with ``--client-cert-auth`` and trusts only the etcd CA (see ``pki``), so a
local user's curl, an etcd client without a certificate and one with any certificate a
user can get (the suite's user CA included) fail the TLS handshake before any key is
read. aetcd 1.0 opens only insecure gRPC channels; ``TlsClient`` is aetcd's client with
the channel opened over TLS instead, everything else (stubs, errors) its own. Watches go
through ``ds01.core.watch``, not aetcd's watcher, which this client does not start.
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import aetcd
import grpc
from aetcd import rpc
from aetcd.client import _handle_errors

from ds01.core import keepalive
from ds01.core.config import Config
from ds01.core.pki import CertPaths, EtcdPki

# etcd answers within milliseconds on loopback; a call that takes longer is stuck.
CALL_TIMEOUT = 10


class TlsClient(aetcd.Client):
    """An aetcd client whose channel is TLS with this client certificate."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials,
        timeout: int,
        options: dict[str, Any],
    ) -> None:
        host, _, port = target.rpartition(":")
        super().__init__(host=host, port=int(port), timeout=timeout, options=options)
        self._target = target
        self._credentials = credentials

    @_handle_errors
    async def connect(self) -> None:
        """aetcd's connect, with ``secure_channel`` where it calls ``insecure_channel``."""
        if self._connected.is_set():
            return
        if self._is_connecting:
            await super().connect()  # waits for the task that is connecting
            return
        try:
            self._is_connecting = True
            target = self._target
            self.channel = rpc.secure_channel(
                target, self._credentials, options=self._options.items()
            )
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._connected.set()
        finally:
            self._is_connecting = False


def etcd_client(
    endpoints: Sequence[str], pki: EtcdPki, identity: str, timeout: int = CALL_TIMEOUT
) -> aetcd.Client:
    """A client of the etcd cluster at ``endpoints`` (HOST:PORT each), as ``identity``
    (a service, or ``admin``). gRPC keeps to one member and moves to the next when it
    goes away, so a member lost costs no call; every member shows etcd's one server
    certificate, checked against the first endpoint's host."""
    paths = pki.client(identity)
    credentials = grpc.ssl_channel_credentials(
        pki.ca_cert.read_bytes(),
        private_key=paths.key.read_bytes(),
        certificate_chain=paths.cert.read_bytes(),
    )
    # A watch sends nothing after it starts: without pings, a member that vanished
    # without a word would leave the allocators' view and event streams waiting on it.
    options: dict[str, Any] = dict(keepalive.client_options())
    if len(endpoints) == 1:
        return TlsClient(endpoints[0], credentials, timeout, options)
    name = endpoints[0].rpartition(":")[0].strip("[]")
    options |= {"grpc.ssl_target_name_override": name, "grpc.default_authority": name}
    return TlsClient(_address_list(endpoints), credentials, timeout, options)


def _address_list(endpoints: Sequence[str]) -> str:
    """gRPC's target for several addresses: ipv4:A:P,B:P (or ipv6:[A]:P,...), every
    host name resolved now."""
    addresses = []
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        for family, *_, address in socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM
        ):
            ip = address[0]
            addresses.append(
                (family, f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
            )
    if not addresses:
        raise ValueError(f"none of the etcd endpoints {', '.join(endpoints)} resolves")
    family = addresses[0][0]
    same = [a for f, a in dict.fromkeys(addresses) if f == family]
    return ("ipv6:" if family == socket.AF_INET6 else "ipv4:") + ",".join(same)


# etcd's answers that a request itself was wrong (too many operations in a transaction,
# a value too large, a lease that exists already): a fault of ds01's, not an outage.
ETCD_REFUSALS = (
    aetcd.exceptions.InvalidArgumentError,
    aetcd.exceptions.PreconditionFailedError,
    aetcd.exceptions.DuplicateLeaseError,
)


def etcd_status(err: Exception) -> tuple[grpc.StatusCode, str] | None:
    """An etcd failure as the status a caller can act on; None if ``err`` is not one."""
    if not isinstance(err, aetcd.exceptions.ClientError):
        return None
    details = str(err) or type(err).__name__
    if isinstance(
        err, aetcd.exceptions.ConnectionFailedError | aetcd.exceptions.ConnectionTimeoutError
    ):
        return grpc.StatusCode.UNAVAILABLE, f"etcd is unreachable ({details}); retry in a moment"
    if isinstance(err, aetcd.exceptions.UnauthenticatedError):
        return (
            grpc.StatusCode.UNAVAILABLE,
            f"etcd refused this service's certificate ({details}); check pki/etcd",
        )
    if isinstance(err, ETCD_REFUSALS):  # what this service asked is wrong: no retry mends it
        return grpc.StatusCode.INTERNAL, f"etcd refused what ds01 asked of it: {details}"
    return grpc.StatusCode.UNAVAILABLE, f"etcd could not complete the request: {details}"


def failure_sentence(err: BaseException, otherwise: str = "an internal error") -> str:
    """What went wrong, in words: etcd's sentence for an etcd failure, else the error's
    own message (``otherwise`` when it has none)."""
    status = etcd_status(err) if isinstance(err, Exception) else None
    if status is not None:
        return status[1]
    return getattr(err, "message", None) or str(err) or otherwise


def connect(config: Config, service: str) -> aetcd.Client:
    """The etcd client of ``service``, with that service's own certificate."""
    return etcd_client(config.etcd_endpoints, config.pki.etcd, service)


def etcd_healthy(endpoint: str, pki: EtcdPki, timeout: float = 0.5) -> bool:
    """Whether the etcd at HOST:PORT answers /health to our admin certificate."""
    return _health(f"https://{endpoint}/health", timeout, _tls_context(pki, pki.client("admin")))


def etcd_answers_plain(endpoint: str, timeout: float = 0.5) -> bool:
    """Whether an etcd without TLS answers at HOST:PORT (one ds01 must not use)."""
    return _health(f"http://{endpoint}/health", timeout, None)


def _health(url: str, timeout: float, context: ssl.SSLContext | None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return json.loads(response.read()).get("health") == "true"
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _tls_context(pki: EtcdPki, identity: CertPaths) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(identity.cert), str(identity.key))
    return context
