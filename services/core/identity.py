"""Who is calling: taken from the verified client certificate, never from the request.

The transport refuses any peer without a certificate from the suite's CA (see
``ds01.core.tls``). This interceptor then turns the certificate into a
:class:`Principal` and makes it available to every handler through :func:`caller`.
If a call ever arrives without a verified certificate, it is refused with
UNAUTHENTICATED before any handler runs: the suite fails closed.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from cryptography import x509
from google.protobuf.message import Message

from ds01.core.bounds import request_problem
from ds01.core.counting import counted
from ds01.core.etcd import etcd_status
from ds01.core.messages import abort
from ds01.core.pki import SERVICE_PREFIX
from ds01.v1 import common_pb2

log = logging.getLogger(__name__)

_CALLER: contextvars.ContextVar[Principal] = contextvars.ContextVar("ds01_caller")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a user, an admin or one of the suite's services."""

    name: str
    kind: common_pb2.PrincipalKind.ValueType
    certificate_expires: dt.datetime | None = None

    @property
    def is_service(self) -> bool:
        return self.kind == common_pb2.PRINCIPAL_KIND_SERVICE

    @property
    def is_admin(self) -> bool:
        return self.kind == common_pb2.PRINCIPAL_KIND_ADMIN

    @property
    def privileged(self) -> bool:
        """Admins and the suite's services may act on anyone's things."""
        return self.is_service or self.is_admin

    def may_act_for(self, user: str) -> bool:
        """Users act only for themselves; admins and services for anyone."""
        return self.privileged or self.name == user


@dataclass
class Roles:
    """Which user names are admins: root, plus whatever ``admin_check`` says (the limits
    service points it at the access_control section of its configuration)."""

    admins: set[str] = field(default_factory=lambda: {"root"})
    admin_check: Callable[[str], bool] | None = None

    def kind_of(self, name: str) -> common_pb2.PrincipalKind.ValueType:
        if name.startswith(SERVICE_PREFIX):
            return common_pb2.PRINCIPAL_KIND_SERVICE
        if name in self.admins or (self.admin_check is not None and self.admin_check(name)):
            return common_pb2.PRINCIPAL_KIND_ADMIN
        return common_pb2.PRINCIPAL_KIND_USER


def caller() -> Principal:
    """The principal of the call being handled; only valid inside a handler."""
    try:
        return _CALLER.get()
    except LookupError:
        raise RuntimeError("caller() used outside an authenticated gRPC handler") from None


class AuthenticationError(Exception):
    """The peer presented no usable identity."""


@functools.lru_cache(maxsize=4096)
def certificate_expiry(pem: bytes) -> dt.datetime:
    """When a client certificate expires; parsed once per certificate, not per call."""
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc


def principal_from_auth_context(auth: dict[str, list[bytes]], roles: Roles) -> Principal:
    names = auth.get("x509_common_name") or []
    if len(names) != 1 or not names[0]:
        raise AuthenticationError(
            "no verified client certificate: every ds01 call needs one "
            "(`ds01 enroll` on the server gives one; admins: `ds01 admin issue-cert USER`)"
        )
    name = names[0].decode()
    expires = None
    pem = auth.get("x509_pem_cert")
    if pem:
        expires = certificate_expiry(pem[0])
        if expires <= dt.datetime.now(dt.UTC):
            raise AuthenticationError(f"client certificate of {name} expired at {expires:%c}")
    return Principal(name=name, kind=roles.kind_of(name), certificate_expires=expires)


# What a layer does around each call: a context manager made from the request and the
# call's context, entered before the handler runs and left once it has answered (or
# streamed its last answer, or failed).
Around = Callable[[Any, grpc.aio.ServicerContext], contextlib.AbstractContextManager[Any]]


class CallLayer(Protocol):
    """Work done around every call of the methods it does not skip: timing, the audit."""

    SKIPPED: tuple[str, ...]  # method name prefixes it leaves alone

    def around(self, method: str) -> Around: ...


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call, exposes the caller through :func:`caller`, and runs
    each layer around it: ``outer`` layers around the authentication (they see refused
    calls too), ``inner`` ones inside it (they know the caller).

    One interceptor that wraps each method once: grpc.aio consults every interceptor on
    every call, and each wrapping of an answer stream was one more async generator that
    each message of it passed through (a thousand watchers, a thousand times each)."""

    # Health checks and reflection carry no user data; they still require mTLS at
    # the transport, but need no principal.
    SKIPPED = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(
        self, roles: Roles, outer: Iterable[CallLayer] = (), inner: Iterable[CallLayer] = ()
    ) -> None:
        self.roles = roles
        self.streams = StreamCounts()
        self.outer = tuple(outer)
        self.inner = tuple(inner)
        # By method: the handler grpc found for it, and that handler wrapped. Only
        # methods a servicer registered get here, so this never grows past them.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is None or known[0] is not handler:
            known = self._wrapped[method] = (handler, self._wrap(handler, method))
        return known[1]

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        outer = _all_around(layer.around(method) for layer in self.outer if _applies(layer, method))
        inner = _all_around(layer.around(method) for layer in self.inner if _applies(layer, method))
        if method.startswith(self.SKIPPED):
            return rebuild_handler(handler, *_plain(outer, inner))
        return rebuild_handler(handler, *_authenticated(self, outer, inner, method))

    def authenticate(self, context: grpc.aio.ServicerContext) -> Principal:
        return principal_from_auth_context(context.auth_context(), self.roles)


def _nothing_around(_request: Any, _context: grpc.aio.ServicerContext) -> Any:
    return contextlib.nullcontext()


def _applies(layer: CallLayer, method: str) -> bool:
    return not (layer.SKIPPED and method.startswith(layer.SKIPPED))


def _all_around(arounds: Iterable[Around]) -> Around:
    """One context manager for several, entered in order and left in reverse."""
    found = tuple(arounds)
    if not found:
        return _nothing_around
    if len(found) == 1:
        return found[0]

    @contextlib.contextmanager
    def stacked(request: Any, context: grpc.aio.ServicerContext) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for around in found:
                stack.enter_context(around(request, context))
            yield

    return stacked


async def _internal(context: grpc.aio.ServicerContext, err: Exception, method: str) -> None:
    """A failure no handler knew: logged once with its traceback, answered as INTERNAL
    with a sentence, never as UNKNOWN with a Python class name. Statuses the handler
    chose (an abort) pass through; etcd out of reach or failing (an event stream's watch
    that it ended included) is UNAVAILABLE, which a caller retries."""
    if isinstance(err, grpc.aio.AbortError):
        raise err
    status = etcd_status(err)
    if status is not None and status[0] == grpc.StatusCode.UNAVAILABLE:
        log.warning("%s for %s ended: %s", method, _CALLER.get().name, status[1])
        await abort(context, *status)
    log.error("unexpected failure in %s for %s", method, _CALLER.get().name, exc_info=err)
    await abort(
        context,
        grpc.StatusCode.INTERNAL,
        "an internal error ended this call (the service log has the details); please report it",
    )


# Answer streams (event watches) one user may hold open on one service at a time. Each
# costs the service work on every event, and some an etcd watch of their own: without a
# bound, one user's thousands of streams would slow every other user's events and calls.
# Admins and the suite's services (monitoring among them) are not bounded.
STREAMS_PER_USER = 64


class TooManyStreams(Exception):
    """A user has as many answer streams open as one user may."""


class StreamCounts:
    """Open answer streams by user, on one server."""

    def __init__(self, limit: int = STREAMS_PER_USER) -> None:
        self.limit = limit
        self.open: Counter[str] = Counter()

    @contextlib.contextmanager
    def held(self, principal: Principal) -> Iterator[None]:
        """One stream of ``principal`` for as long as it is open; TooManyStreams past the
        limit (users only)."""
        name = principal.name
        if principal.privileged:
            yield
            return
        if self.open[name] >= self.limit:
            raise TooManyStreams(
                f"{name} has {self.limit} event streams open on this service already, the "
                "most one user may; close one (a `ds01 events --follow` left running?)"
            )
        with counted(self.open, name):
            yield


Unary = Callable[..., Awaitable[Any]]
Streaming = Callable[..., AsyncIterator[Any]]


def _plain(outer: Around, inner: Around) -> tuple[Callable[[Unary], Unary], Callable[..., Any]]:
    """The layers around a method that needs no caller (health, reflection)."""

    def unary(behavior: Unary) -> Unary:
        @functools.wraps(behavior)
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with outer(request, context), inner(request, context):
                return await behavior(request, context)

        return wrapper

    def streaming(behavior: Streaming) -> Callable[..., Awaitable[None]]:
        @functools.wraps(behavior)
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> None:
            with outer(request, context), inner(request, context):
                await _write_all(behavior(request, context), context)

        return wrapper

    return unary, streaming


def _authenticated(
    interceptor: CallInterceptor, outer: Around, inner: Around, method: str
) -> tuple[Callable[[Unary], Unary], Callable[..., Any]]:
    """The layers around a method whose every call must say who calls."""
    streams = interceptor.streams

    async def enter(
        request: Any, context: grpc.aio.ServicerContext
    ) -> contextvars.Token[Principal]:
        try:
            principal = interceptor.authenticate(context)
        except AuthenticationError as err:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, str(err))
            raise  # abort raises; this line only satisfies the type checker
        problem = request_problem(request) if isinstance(request, Message) else None
        if problem:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"request refused: {problem}")
        return _CALLER.set(principal)

    def unary(behavior: Unary) -> Unary:
        @functools.wraps(behavior)
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with outer(request, context):
                token = await enter(request, context)
                try:
                    with inner(request, context):
                        return await behavior(request, context)
                except Exception as err:
                    await _internal(context, err, method)
                finally:
                    _CALLER.reset(token)

        return wrapper

    def streaming(behavior: Streaming) -> Callable[..., Awaitable[None]]:
        @functools.wraps(behavior)
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> None:
            with outer(request, context):
                token = await enter(request, context)
                try:
                    with streams.held(_CALLER.get()), inner(request, context):
                        await _write_all(behavior(request, context), context)
                except TooManyStreams as err:
                    await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
                except Exception as err:
                    await _internal(context, err, method)
                finally:
                    _CALLER.reset(token)

        return wrapper

    return unary, streaming


async def _write_all(responses: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
    """Send each answer of a stream as its handler yields it, and close the handler here,
    in this call's task, once the stream ends for whatever reason (the client gone
    included): its cleanup runs now, knowing the caller, not later in a task of its own."""
    async with contextlib.aclosing(responses):  # type: ignore[type-var]
        async for response in responses:
            await context.write(response)


def rebuild_handler(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Any], Any],
    streaming: Callable[[Any], Any],
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour wrapped: ``unary`` for calls answered once,
    ``streaming`` for answer streams (what interceptors of grpc.aio must rebuild)."""
    common = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **common)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **common)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **common)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **common)
