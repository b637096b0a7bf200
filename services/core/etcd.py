"""The one way the services reach etcd: mutual TLS with a certificate per service.

etcd runs with ``--client-cert-auth`` and trusts only the etcd CA (see ``pki``), so a
local user's curl, an etcd client without a certificate and one with any certificate a
user can get (the suite's user CA included) fail the TLS handshake before any key is
read. aetcd 1.0 opens only insecure gRPC channels; ``TlsClient`` is aetcd's client with
the channel opened over TLS instead, everything else (stubs, watcher, errors) its own.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence

import aetcd
import grpc
from aetcd import rpc, watcher
from aetcd.client import _handle_errors

from ds01.core.config import Config
from ds01.core.pki import CertPaths, EtcdPki

# etcd answers within milliseconds on loopback; a call that takes longer is stuck.
CALL_TIMEOUT = 10


class TlsClient(aetcd.Client):
    """An aetcd client whose channel is TLS with this client certificate."""

    def __init__(
        self, host: str, port: int, credentials: grpc.ChannelCredentials, timeout: int
    ) -> None:
        super().__init__(host=host, port=port, timeout=timeout)
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
            target = f"{self._host}:{self._port}"
            self.channel = rpc.secure_channel(
                target, self._credentials, options=self._options.items()
            )
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


def etcd_client(
    endpoints: Sequence[str], pki: EtcdPki, identity: str, timeout: int = CALL_TIMEOUT
) -> aetcd.Client:
    """A client of the first endpoint, as ``identity`` (a service, or ``admin``)."""
    host, _, port = endpoints[0].rpartition(":")
    paths = pki.client(identity)
    credentials = grpc.ssl_channel_credentials(
        pki.ca_cert.read_bytes(),
        private_key=paths.key.read_bytes(),
        certificate_chain=paths.cert.read_bytes(),
    )
    return TlsClient(host.strip("[]"), int(port), credentials, timeout)


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
