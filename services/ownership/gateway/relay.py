"""The gateway's socket: HTTP framing with h11, one upstream connection per client
connection, streams relayed as they come, and a hijack only on Docker's 101.

The relay knows nothing of policy: it hands each request to ``admission`` and carries
out the decision. Requests of root and the configuration's admins pass unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import resource
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import h11

from ds01.client import Ds01Error
from ds01.core.audit import AuditLog
from ds01.core.unix_server import UnixServer
from ds01.ownership.enroll import peer_uid
from ds01.ownership.gateway.admission import Admission, Answer, Forward, Gateway
from ds01.ownership.gateway.policy import Caller, Refused
from ds01.ownership.gateway.routes import HIJACKING, TAR, Match, match
from ds01.ownership.gateway.strict import BadRequest
from ds01.ownership.slots import Slots

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
BUFFER = 1024 * 1024  # what a stream reader holds before it pauses its socket: streams flow
MAX_HEAD = 1024 * 1024
MAX_BODY = 256 * 1024 * 1024  # a JSON body; archives (build, load) may be this large too
MAX_JSON = 4 * 1024 * 1024
CONNECTIONS_PER_USER = 128
IDLE_TIMEOUT = 300.0  # seconds a connection may wait between requests
HEAD_TIMEOUT = 30.0  # seconds a request's head may take once it has begun
BODY_TIMEOUT = 60.0  # seconds a request may pause while it is being sent
ADMIN_RECHECK = 5.0  # seconds between asking whether an admin's open connection still is one
_TOO_MANY = (
    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: 75\r\n\r\n"
    b'{"message": "too many connections of yours are open; close some and retry"}'
)
UPLOADS_PER_USER = 2  # archives (build contexts, image loads) held in memory at once
NO_BODY = 4096  # room for a stray "{}" on routes without a body; refused after reading
MAX_KEPT = 16 * 1024 * 1024  # stream output kept for the check after a build or load
_REFUSED_TYPES = ("application/x-www-form-urlencoded", "multipart/")
_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te"})
_READS = ("GET", "HEAD")  # a read the gateway allowed is counted, never in the audit trail


@dataclass
class GatewayStats:
    """What the gateway decided since it started (the ownership service's metrics)."""

    requests: Tally[tuple[str, str]] = field(default_factory=Tally)  # (route, decision)
    denials: Tally[str] = field(default_factory=Tally)  # by reason
    connections: Tally[str] = field(default_factory=Tally)  # open now, by user


class DockerGateway:
    def __init__(
        self,
        listen: Path,
        upstream: Path,
        gateway: Gateway,
        is_admin: Callable[[str], Awaitable[bool]],
        audit: AuditLog | None = None,
    ) -> None:
        self.listen = listen
        self.upstream = upstream
        self.gateway = gateway
        self.is_admin = is_admin
        self.audit = audit
        self.stats = GatewayStats()
        self.uploads: dict[int, asyncio.Semaphore] = {}  # uid -> archives in flight
        self.slots = Slots(CONNECTIONS_PER_USER)
        self._server = UnixServer(listen, self._serve, limit=BUFFER)

    async def start(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # every connection is a descriptor: take all the system allows
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        await self._server.start()
        log.info("Docker gateway on %s -> %s", self.listen, self.upstream)

    async def stop(self) -> None:
        await self._server.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            account = self.gateway.caller(uid)  # no account, no access
        except (KeyError, OSError):
            writer.close()
            return
        user = account.user
        admin = uid == 0 or await self.is_admin(user)
        if not admin and not self.slots.take(uid):  # one user cannot starve the rest
            self.decided(user, "connect", "", "denied", "too_many_connections",
                         f"more than {CONNECTIONS_PER_USER} connections open")  # fmt: skip
            writer.write(_TOO_MANY)
            writer.close()
            return
        session = _Session(self, None if admin else account, reader, writer, user)
        self.stats.connections[user] += 1
        try:
            if admin and uid != 0:
                await self._while_admin(user, session.run())
            else:
                await session.run()
        except (OSError, EOFError, h11.ProtocolError) as err:  # a client or daemon went away
            log.debug("gateway connection of %s ended: %s", user, err)
        except Exception:
            log.exception("gateway connection of %s failed", user)
        finally:
            self.stats.connections[user] -= 1
            if not self.stats.connections[user]:
                del self.stats.connections[user]
            if not admin:
                self.slots.give(uid)
            writer.close()

    async def _while_admin(self, user: str, serving: Coroutine[Any, Any, None]) -> None:
        """Serve an admin's connection, whose requests pass unchanged, only while they
        are one: asked again every ADMIN_RECHECK seconds, it is closed (with a stream or
        an attached terminal in it) once they are not, or that cannot be told."""
        task = asyncio.ensure_future(serving)
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=ADMIN_RECHECK)
                if not task.done() and not await self.is_admin(user):
                    log.warning("%s is no longer an admin: their Docker connection is closed", user)
                    ended = "an admin's connection, closed: no longer an admin"
                    self.decided(user, "connect", "", "denied", "no_longer_admin", ended)
                    break
        finally:
            task.cancel()  # a no-op once it is done; else no admin now, or the gateway stops
            await asyncio.wait({task})  # its cleanup before the connection's
        if not task.cancelled():
            task.result()  # what it raised, for the connection's own handling

    def decided(
        self, user: str, route: str, target: str, decision: str, reason: str = "",
        message: str = "", audited: bool = True,
    ) -> None:  # fmt: skip
        """Count a decision, and put it in the audit trail unless it is a plain read."""
        self.stats.requests[(route, decision)] += 1
        if decision == "denied":
            self.stats.denials[reason] += 1
        if audited and self.audit is not None:
            self.audit.record(user, route, target, decision, message or reason)


class _Session:
    """One client connection: its requests in order, over one upstream connection."""

    def __init__(
        self,
        gateway: DockerGateway,
        caller: Caller | None,  # None: an admin, whose requests pass unchanged
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        user: str,
    ) -> None:
        self.gateway = gateway
        self.caller = caller
        self.user = user
        self.found: Match | None = None  # the route of the request being decided
        self.reader = reader
        self.writer = writer
        self.client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.upstream = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.head_only = False  # the request being answered is a HEAD
        self.uploading: asyncio.Semaphore | None = None  # held while an archive is in flight

    async def run(self) -> None:
        try:
            while True:
                try:
                    request, body = await self._read_request()
                except h11.RemoteProtocolError as err:
                    with contextlib.suppress(h11.LocalProtocolError):
                        await self._answer(err.error_status_hint, {"message": str(err)})
                    return
                if request is None:
                    return
                done = await self._handle(request, body)
                self._upload_done()
                if done or self.client.our_state is h11.MUST_CLOSE:
                    return
                self.client.start_next_cycle()
                self._next_upstream_cycle()
        finally:
            self._upload_done()
            if self.up_writer is not None:
                self.up_writer.close()

    def _upload_done(self) -> None:
        if self.uploading is not None:
            self.uploading.release()
            self.uploading = None

    def _next_upstream_cycle(self) -> None:
        """Keep the upstream connection for the next request where Docker allows it."""
        states = (self.upstream.our_state, self.upstream.their_state)
        if states == (h11.DONE, h11.DONE):
            self.upstream.start_next_cycle()
        elif states != (h11.IDLE, h11.IDLE):  # not reusable: the next request opens anew
            if self.up_writer is not None:
                self.up_writer.close()
            self.up_reader = self.up_writer = None
            self.upstream = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)

    async def _read_request(self) -> tuple[h11.Request | None, bytes]:
        request, body, limit = None, bytearray(), 0
        begun = False  # some of the head has come: the rest must follow soon
        while True:
            event = self.client.next_event()
            if event is h11.NEED_DATA:
                # an idle connection is closed after a while; a request must keep coming
                wait = BODY_TIMEOUT if request else HEAD_TIMEOUT if begun else IDLE_TIMEOUT
                try:
                    data = await asyncio.wait_for(self.reader.read(CHUNK), wait)
                except TimeoutError:
                    if request is not None or begun:
                        raise h11.RemoteProtocolError("the request stopped coming", 408) from None
                    return None, b""
                begun = begun or bool(data)
                self.client.receive_data(data)
                if not data and request is None:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
                self.head_only = event.method == b"HEAD"
                limit = self._body_limit(event)
                if limit == MAX_BODY and self.caller is not None:  # at most a few per user
                    self.uploading = self.gateway.uploads.setdefault(
                        self.caller.uid, asyncio.Semaphore(UPLOADS_PER_USER)
                    )
                    await self.uploading.acquire()
                if self.client.they_are_waiting_for_100_continue:
                    await self._send_client(h11.InformationalResponse(status_code=100))
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:  # never hold an endless upload in memory
                    raise h11.RemoteProtocolError(f"request body larger than {limit} bytes", 413)
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    def _body_limit(self, request: h11.Request) -> int:
        """How much body this request may bring, known from its head: an archive for a
        build or a load, a small JSON object for the rest (admins: any archive size)."""
        if self.caller is None:
            return MAX_BODY
        try:
            found = match(
                request.method.decode("ascii", "replace"), request.target.decode("latin-1")
            )
        except BadRequest:
            return NO_BODY
        if found is None or found.route.body is None:
            return NO_BODY
        return MAX_BODY if found.route.body == TAR else MAX_JSON

    async def _handle(self, request: h11.Request, body: bytes) -> bool:
        """Carry out one request; True when the connection must end after it."""
        method = request.method.decode("ascii", "replace")
        if self.caller is None:  # an admin's: passed unchanged, and on the record
            target = request.target.decode("latin-1")
            self.gateway.decided(self.user, f"admin {method}", target, "allowed",
                                 audited=method not in _READS)  # fmt: skip
            return await self._pass_through(request, body)
        self.found = None
        reason = ""
        try:
            decision = await self._admit(request, body)
        except (Refused, PermissionError) as refused:
            reason = "policy" if self.found else "route_not_allowed"
            decision = Answer(403, {"message": str(refused)})
        except BadRequest as bad:
            reason = "bad_request"
            decision = Answer(400, {"message": str(bad)})
        except Ds01Error as err:  # without the user's limits, nothing is made
            decision = Answer(503, {"message": f"cannot read your limits: {err.message}"})
        except (OSError, ValueError, KeyError) as err:  # the daemon or a lookup failed
            log.warning("admission of a request of %s failed: %r", self.caller.user, err)
            message = f"the gateway could not check this request ({type(err).__name__}); "
            decision = Answer(502, {"message": message + "nothing was forwarded"})
        self._count(method, decision, reason)
        if isinstance(decision, Answer):
            await self._answer(decision.status, decision.payload)
            return False
        return await self._forward(decision)

    def _count(self, method: str, decision: Answer | Forward, reason: str) -> None:
        found = self.found
        route = found.route.action if found else "unmatched"
        target = _target_of(found) if found else ""
        if isinstance(decision, Forward):
            self.gateway.decided(self.user, route, target, "allowed",
                                 audited=method not in _READS)  # fmt: skip
            return
        payload = decision.payload if isinstance(decision.payload, dict) else {}
        message = str(payload.get("message", ""))
        if reason:
            self.gateway.decided(self.user, route, target, "denied", reason, message)
        elif decision.status >= 500:
            self.gateway.decided(self.user, route, target, "failed", "", message)
        else:  # answered by the gateway itself (a filtered list, Docker's 404 wording)
            self.gateway.decided(self.user, route, target, "answered",
                                 audited=method not in _READS)  # fmt: skip

    async def _admit(self, request: h11.Request, body: bytes) -> Answer | Forward:
        assert self.caller is not None
        headers = {k.lower(): v.decode("latin-1") for k, v in request.headers}
        kind = headers.get(b"content-type", "").lower()
        if any(kind.startswith(t) for t in _REFUSED_TYPES):
            raise BadRequest(f"request bodies of type {kind} are refused; send JSON")
        if headers.get(b"content-encoding", "identity").lower() != "identity":
            raise BadRequest("compressed request bodies are refused")
        method, target = request.method.decode("ascii", "replace"), request.target.decode("latin-1")
        found = self.found = match(method, target)
        if found is None:
            if method == "GET" and re.match(r"^(/v[0-9.]+)?/containers/.+/.+/json$", target):
                # `docker inspect NAME/WITH:SLASH` asks for a container first, as Docker
                # would answer (a name cannot hold '/'): then the CLI tries images.
                return Answer(404, {"message": "No such container"})
            raise Refused("Permission denied: admins only")
        if found.route.body is None and body:
            raise BadRequest("this request carries no body")
        if found.route.body is None and body.strip():
            raise BadRequest("this request carries no body")
        upgrade = found.route.action in HIJACKING and b"upgrade" in headers
        admission = Admission(self.gateway.gateway, self.caller, found, upgrade)
        return await admission.decide(body)

    async def _pass_through(self, request: h11.Request, body: bytes) -> bool:
        framing = (b"content-length", b"transfer-encoding")  # the body is whole now
        headers = [(k, v) for k, v in request.headers if k.lower() not in framing]
        if body or request.method in (b"POST", b"PUT"):
            headers.append((b"content-length", str(len(body)).encode()))
        upgrade = any(k.lower() == b"upgrade" for k, _ in request.headers)
        await self._send_request(
            h11.Request(method=request.method, target=request.target, headers=headers), body
        )
        return await self._relay(Forward("", "", hijack=upgrade, upgrade=upgrade))

    async def _forward(self, forward: Forward) -> bool:
        headers = [(b"host", b"docker")]
        if forward.content_type:
            headers.append((b"content-type", forward.content_type.encode()))
        if forward.body or forward.method in ("POST", "PUT"):
            headers.append((b"content-length", str(len(forward.body)).encode()))
        if forward.upgrade:
            headers += [(b"connection", b"Upgrade"), (b"upgrade", b"tcp")]
        request = h11.Request(method=forward.method, target=forward.target, headers=headers)
        try:
            await self._send_request(request, forward.body)
            return await self._relay(forward)
        finally:
            if forward.cleanup is not None:
                await forward.cleanup()

    async def _send_request(self, request: h11.Request, body: bytes) -> None:
        await self._send_upstream(request)
        if body:
            await self._send_upstream(h11.Data(data=body))
        await self._send_upstream(h11.EndOfMessage())

    async def _relay(self, forward: Forward) -> bool:
        response = await self._upstream_event()
        while isinstance(response, h11.InformationalResponse) and response.status_code != 101:
            response = await self._upstream_event()
        if not isinstance(response, h11.Response | h11.InformationalResponse):
            return True  # the daemon closed
        if response.status_code == 101:
            if forward.hijack:
                await self._hijack(response)
            return True  # never asked for: refuse to relay raw bytes
        if forward.rewrite is not None:
            data = await self._whole_body()
            status, data = await forward.rewrite(response.status_code, data)
            await self._answer(status, data, response)
            return False
        if forward.hijack and _close_delimited(response):
            await self._stream_until_close(response)
            return True
        kept = bytearray()
        chunked = any(k.lower() == b"transfer-encoding" for k, _ in response.headers)
        client_gone = False

        async def send(event: Any) -> None:
            """To the client while it listens; a check after the stream runs even when
            the client hung up halfway (it must never skip the undo)."""
            nonlocal client_gone
            if client_gone:
                return
            try:
                await self._send_client(event)
            except (ConnectionError, OSError, h11.LocalProtocolError):
                if forward.finish is None:
                    raise
                client_gone = True

        await send(response)
        while True:
            event = await self._upstream_event()
            if isinstance(event, h11.Data):
                data = event.data
                if forward.finish is not None and len(kept) < MAX_KEPT:
                    kept += data
                if forward.stream_filter is not None:
                    data = await forward.stream_filter(data)
                if data:
                    await send(h11.Data(data=data))
            elif isinstance(event, h11.EndOfMessage):
                if forward.finish is not None:
                    trailer = await forward.finish(bytes(kept))
                    if trailer and chunked:
                        await send(h11.Data(data=trailer))
                await send(event)
                return client_gone
            else:
                if forward.finish is not None:
                    await forward.finish(bytes(kept))
                return True

    async def _whole_body(self) -> bytes:
        body = bytearray()
        while not isinstance(event := await self._upstream_event(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.ConnectionClosed):
                break
        return bytes(body)

    async def _hijack(self, response: Any) -> None:
        """Docker switched protocols: from now on this connection carries the stream and
        nothing else, raw both ways until either side closes."""
        self.writer.write(_head(response))
        leftover_up, _ = self.upstream.trailing_data
        leftover_client, _ = self.client.trailing_data
        self.writer.write(leftover_up)
        await self.writer.drain()
        assert self.up_writer is not None and self.up_reader is not None
        if leftover_client:
            self.up_writer.write(leftover_client)
        await asyncio.gather(
            _pipe(self.reader, self.up_writer),
            _pipe(self.up_reader, self.writer),
            return_exceptions=True,
        )

    async def _stream_until_close(self, response: Any) -> None:
        """An answer without length (a raw stream without an upgrade): the daemon's bytes
        until it closes, and nothing more from the client."""
        self.writer.write(_head(response))
        leftover_up, _ = self.upstream.trailing_data
        self.writer.write(leftover_up)
        await self.writer.drain()
        assert self.up_reader is not None
        await _pipe(self.up_reader, self.writer)

    async def _send_upstream(self, event: Any) -> None:
        if self.up_writer is None:
            self.up_reader, self.up_writer = await asyncio.open_unix_connection(
                str(self.gateway.upstream), limit=BUFFER
            )
        data = self.upstream.send(event)
        if data:
            self.up_writer.write(data)
            await self.up_writer.drain()

    async def _upstream_event(self) -> Any:
        while True:
            event = self.upstream.next_event()
            if event is not h11.NEED_DATA:
                return event
            assert self.up_reader is not None
            self.upstream.receive_data(await self.up_reader.read(CHUNK))

    async def _answer(self, status: int, payload: Any, like: Any = None) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = [
            (k, v)
            for k, v in (like.headers if like is not None else [])
            if k.lower() not in (b"content-length", b"content-type", *_HOP)
        ]
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await self._send_client(h11.Response(status_code=status, headers=headers))
        if not self.head_only:  # a HEAD answer has the headers of a body, not the body
            await self._send_client(h11.Data(data=body))
        await self._send_client(h11.EndOfMessage())

    async def _send_client(self, event: Any) -> None:
        data = self.client.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()


def _target_of(found: Match) -> str:
    """What a request names: the container, image, volume or exec in its path, or the
    name a create asks for."""
    for value in found.params.values():
        return str(value)
    return (parse_qs(found.query).get("name") or [""])[0]


def _close_delimited(response: Any) -> bool:
    names = {k.lower() for k, _ in response.headers}
    return (
        response.status_code == 200
        and b"content-length" not in names
        and b"transfer-encoding" not in names
    )


def _head(response: Any) -> bytes:
    head = f"HTTP/1.1 {response.status_code} {response.reason.decode()}\r\n".encode()
    return head + b"".join(k + b": " + v + b"\r\n" for k, v in response.headers) + b"\r\n"


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()
    finally:
        with contextlib.suppress(OSError):
            if sink.can_write_eof():
                sink.write_eof()
