"""Prometheus metrics of one ds01 service: its registry, its /metrics endpoint, and what
every service reports (gRPC calls, dependencies, what runs where).

Each service has its own registry and port (DS01's exporter port, 9101, is the
allocator's, whose GPU metrics carry DS01's names), so the same metrics come out whether
the services share a process (``ds01d --services all``) or not (systemd, compose).
State that lives in etcd or Docker is read when Prometheus scrapes, on the service's own
event loop, never on a timer: a scrape sees the state of that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from ds01.core.config import Config
from ds01.core.dependencies import Dependencies
from ds01.core.identity import Around
from ds01.core.tls import server_context

log = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds: from a cached limits answer (sub-millisecond) to a queued allocation.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TOKEN_FILE = "metrics.token"  # in the state dir, unless metrics.token_file says where
SCRAPE_TIMEOUT = 5.0  # seconds a scrape waits for the service's loop to read its state
CONNECTION_TIMEOUT = 10.0  # seconds a connection to /metrics may stay silent
STOP_POLL = 0.05  # seconds a stop may wait for the serving thread to notice


class ServiceMetrics:
    """The metrics of one service, in a registry of its own."""

    def __init__(self, service: str, node: str, version: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the service starts
        self.handled = Counter(
            "grpc_server_handled_total",
            "gRPC calls completed, by service, method and status code.",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=self.registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from a gRPC call's arrival to its last answer (streams: until they end).",
            ["grpc_service", "grpc_method", "grpc_code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        info = GaugeMetricFamily(
            "ds01_exporter_info",
            "Which ds01 service and version this endpoint is (always 1).",
            labels=["version", "service", "node"],
        )
        info.add_metric([version, service, node], 1)
        self.add(lambda: [info])

    def add(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Report what ``collect`` returns at each scrape (it runs in the HTTP thread)."""
        self.registry.register(_Collector(collect))

    def add_async(self, collect: Callable[[], Awaitable[Iterable[Metric]]]) -> None:
        """Like :meth:`add`, for state read on the service's loop (etcd, Docker)."""

        def run() -> Iterable[Metric]:
            if self.loop is None or self.loop.is_closed():
                return []
            future = asyncio.run_coroutine_threadsafe(collect(), self.loop)  # type: ignore[arg-type]
            try:
                return future.result(SCRAPE_TIMEOUT)
            except Exception as err:  # the scrape goes on; the gap shows in Prometheus
                future.cancel()
                log.warning("%s metrics: cannot read the state: %r", self.service, err)
                return []

        self.add(run)

    def follow(self, dependencies: Dependencies) -> None:
        def collect() -> Iterator[Metric]:
            up = GaugeMetricFamily(
                "ds01_dependency_up",
                "Whether what the service needs (etcd, dockerd, a fellow service) answered "
                "its last check (1) or not (0).",
                labels=["service", "dependency", "target"],
            )
            for d in dependencies.items:
                up.add_metric([self.service, d.name, d.target], 1 if d.available else 0)
            yield up

        self.add(collect)

    def timing(self) -> CallTiming:
        """The layer that counts and times each call (see ``CallInterceptor``)."""
        return CallTiming(self)


class _Collector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class CallTiming:
    """Counts and times every call by service, method and the status it ended with."""

    SKIPPED: tuple[str, ...] = ()

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def around(self, method: str) -> Around:
        service, _, name = method.lstrip("/").rpartition("/")
        handled, handling = self.metrics.handled, self.metrics.handling
        children: dict[str, tuple[Any, Any]] = {}  # by status: labels() once, not per call

        def series(status: str) -> tuple[Any, Any]:
            found = children.get(status)
            if found is None:
                found = children[status] = (
                    handled.labels(service, name, status),
                    handling.labels(service, name, status),
                )
            return found

        @contextlib.contextmanager
        def recorded(_request: Any, context: grpc.aio.ServicerContext) -> Iterator[None]:
            started, code = time.perf_counter(), grpc.StatusCode.UNKNOWN
            try:
                yield
                code = context.code() or grpc.StatusCode.OK
            except (asyncio.CancelledError, GeneratorExit):  # the caller went away
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:  # an abort set the code; anything else is UNKNOWN
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                count, timing = series(_status(code).name)
                count.inc()
                timing.observe(time.perf_counter() - started)

        return recorded


def _status(code: Any) -> grpc.StatusCode:
    """grpc.aio reports a code set by abort() as a StatusCode or, in some versions, its int."""
    if isinstance(code, grpc.StatusCode):
        return code
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


class MetricsEndpoint:
    """``GET /metrics`` over HTTP in a thread of its own, so a slow scrape never holds the
    service's loop. Off loopback it needs TLS (the service's own certificate) or a bearer
    token, so nobody on the network reads who holds which GPU."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        address: str,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.metrics = metrics
        self.address = address
        self.token = token
        self.tls = tls
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Listen; the bound HOST:PORT (port 0 in the config takes any free port)."""
        host, _, port = self.address.rpartition(":")
        app = _with_token(make_wsgi_app(self.metrics.registry), self.token)
        server_class = ThreadingWSGIServer if self.tls is None else _TlsServer
        server = make_server(host.strip("[]"), int(port), app, server_class, handler_class=_Quiet)
        if isinstance(server, _TlsServer) and self.tls is not None:
            server.context = self.tls
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            args=(STOP_POLL,),
            name=f"{self.metrics.service}-metrics",
            daemon=True,
        )
        self._thread.start()
        return f"{host}:{server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _TlsServer(ThreadingWSGIServer):
    """HTTPS whose handshakes happen in each connection's own thread: a client that
    connects and stays silent holds up nobody's scrape."""

    context: ssl.SSLContext

    def get_request(self) -> tuple[Any, Any]:
        connection, address = self.socket.accept()
        connection.settimeout(CONNECTION_TIMEOUT)
        wrapped = self.context.wrap_socket(
            connection, server_side=True, do_handshake_on_connect=False
        )
        return wrapped, address


class _Quiet(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT  # a silent connection ends; its thread with it

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()  # here, in this connection's thread

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


def _with_token(app: Callable[..., Any], token: str | None) -> Callable[..., Any]:
    if token is None:
        return app
    expected = f"Bearer {token}".encode()

    def checked(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        given = environ.get("HTTP_AUTHORIZATION", "").encode()
        if not hmac.compare_digest(given, expected):
            start_response("401 Unauthorized", [("WWW-Authenticate", 'Bearer realm="ds01"')])
            return [b"a bearer token is required (metrics.token_file)\n"]
        return app(environ, start_response)

    return checked


def token_of(path: Path) -> str:
    """The token in ``path``; made there first (mode 0640) if the file does not exist."""
    with contextlib.suppress(FileExistsError):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def start_endpoint(metrics: ServiceMetrics, config: Config) -> MetricsEndpoint | None:
    """The service's /metrics as ds01.yaml sets it (``metrics``), started; None if off."""
    address = config.metrics.listen.get(metrics.service)
    if not address:
        return None
    token = None
    if not config.metrics.anonymous:
        token = token_of(config.metrics.token_file or config.state_dir / TOKEN_FILE)
    tls = server_context(config.pki, metrics.service) if config.metrics.tls else None
    endpoint = MetricsEndpoint(metrics, address, token, tls)
    try:
        bound = endpoint.start()
    except OSError as err:  # the service still serves; Prometheus will report it down
        log.error(
            "%s: cannot serve metrics on %s (%s): change metrics.listen.%s",
            metrics.service, address, err.strerror, metrics.service,
        )  # fmt: skip
        return None
    log.info("%s metrics on %s://%s/metrics", metrics.service, "https" if tls else "http", bound)
    endpoint.address = bound
    return endpoint
