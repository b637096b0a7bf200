"""The Docker socket filtering proxy: users talk to it instead of the real daemon.

Each connection's user is the uid the kernel reports (SO_PEERCRED). Requests are
parsed with h11 (keep-alive, pipelining, chunked and fixed bodies), checked by
``ownership.policy``, and relayed to the real socket; responses stream back, lists
and events are filtered to the caller's containers, and hijacked connections (attach,
exec, ``run -it``) become a raw two-way relay once Docker switches protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import h11

from ds01.client import Ds01Error
from ds01.ownership.enroll import peer_uid
from ds01.ownership.owners import owner_of
from ds01.ownership.policy import (
    VOLUME,
    CreateContext,
    Refused,
    UserCaps,
    admin_only,
    check_create,
    check_exec,
    check_volume_create,
    denial,
    named_volumes,
    refuse_case_twins,
    route,
)
from ds01.ownership.sync import OwnershipSync

log = logging.getLogger(__name__)

CHUNK = 65536
MAX_HEAD = 1024 * 1024
MAX_BODY = 256 * 1024 * 1024


class DockerProxy:
    def __init__(
        self,
        listen: Path,
        upstream: Path,
        owners: OwnershipSync,
        is_admin: Callable[[str], Awaitable[bool]],
        settings: Callable[[str], Awaitable[tuple[str, UserCaps]]],
    ) -> None:
        self.listen = listen
        self.upstream = upstream
        self.owners = owners
        self.is_admin = is_admin
        self.settings = settings  # user -> (cgroup parent, per-container limits)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.listen.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.listen.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.listen))
        os.chmod(self.listen, 0o666)
        log.info("Docker proxy on %s -> %s", self.listen, self.upstream)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.listen.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            user = pwd.getpwuid(uid).pw_name
        except (KeyError, OSError):
            writer.close()
            return
        admin = uid == 0 or await self.is_admin(user)
        session = _Session(self, user, admin, reader, writer)
        try:
            await session.run()
        except Exception:
            log.exception("proxy connection of %s failed", user)
        finally:
            writer.close()


class _Session:
    """One client connection: its requests, one upstream connection, in order."""

    def __init__(
        self,
        proxy: DockerProxy,
        user: str,
        admin: bool,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.user = user
        self.admin = admin
        self.reader = reader
        self.writer = writer
        self.client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.up_reader: asyncio.StreamReader | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.upstream = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)

    async def run(self) -> None:
        try:
            while True:
                request, body = await self._read_request()
                if request is None:
                    return
                hijacked = await self._handle(request, body)
                if hijacked or self.client.our_state is h11.MUST_CLOSE:
                    return
                self.client.start_next_cycle()
                self.upstream.start_next_cycle()
        finally:
            if self.up_writer is not None:
                self.up_writer.close()

    async def _read_request(self) -> tuple[h11.Request | None, bytes]:
        request, body = None, bytearray()
        while True:
            event = self.client.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(CHUNK)
                self.client.receive_data(data)
                if not data and request is None:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:  # never hold an endless upload in memory
                    raise h11.RemoteProtocolError("request body too large", 413)
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _handle(self, request: h11.Request, body: bytes) -> bool:
        target = request.target.decode()
        method = request.method.decode()
        where = route(target)
        try:
            if not self.admin:
                body = await self._authorize(method, where.path, where, body, target)
        except Refused as refused:
            await self._answer(403, {"message": str(refused)})
            return False
        if not self.admin and method == "POST" and where.path == "/containers/prune":
            await self._answer(200, await self._prune_own())
            return False
        headers = [(k, v) for k, v in request.headers if k.lower() not in (b"content-length",)]
        if body or method in ("POST", "PUT"):
            headers.append((b"content-length", str(len(body)).encode()))
        # Only attach and exec start may switch protocols: anything else asking to
        # upgrade would become an unchecked pipe to the daemon.
        hijackable = where.path.endswith(("/attach", "/start")) and (
            where.container is not None or where.exec_id is not None
        )
        upgrade = hijackable and any(k.lower() == b"upgrade" for k, _ in request.headers)
        await self._send_upstream(h11.Request(method=method, target=target, headers=headers))
        if body:
            await self._send_upstream(h11.Data(data=body))
        await self._send_upstream(h11.EndOfMessage())
        rewrite = None
        if method == "GET" and not self.admin:
            if where.path == "/containers/json":
                rewrite = self._own_only
            elif where.path.startswith("/networks"):
                rewrite = self._own_network_members
            elif where.path == "/volumes":
                rewrite = self._own_volumes
        filter_events = method == "GET" and where.path == "/events" and not self.admin
        return await self._relay_response(upgrade, rewrite, filter_events)

    async def _authorize(
        self, method: str, path: str, where: Any, body: bytes, target: str
    ) -> bytes:
        if admin_only(path):
            raise Refused("Permission denied: admins only")
        if where.exec_id:
            container = await self._exec_container(where.exec_id)
            await self._check_owner(container)
        elif where.container:
            await self._check_owner(where.container)
            if method == "POST" and path.endswith(("/start", "/restart", "/unpause")):
                await self._check_mount_sources(where.container)
        if path == "/commit":
            await self._check_owner(parse_qs(urlsplit(target).query).get("container", [""])[0])
        if (
            method == "POST"
            and path.startswith("/networks/")
            and path.endswith(("/connect", "/disconnect"))
        ):
            request = _json_object(body)
            refuse_case_twins(request)
            await self._check_owner(str(request.get("Container") or ""))
        if method == "POST" and path == "/volumes/create":
            return json.dumps(check_volume_create(_json_object(body), self.user)).encode()
        volume = VOLUME.match(path)
        if volume and volume["name"] not in ("create", "prune"):
            await self._check_volume(volume["name"], create=False)
        if method == "PUT" and path.endswith("/archive"):
            raise Refused(
                "Permission denied: copy into containers is for admins; put files in your "
                "workspace instead"
            )
        if method == "POST" and where.container and path.endswith("/exec"):
            try:
                check_exec(json.loads(body or b"{}"))
            except (ValueError, AttributeError) as err:
                raise Refused(f"the exec request is not a JSON object: {err}") from err
        if method == "POST" and path == "/containers/create":
            try:
                return await self._checked_create(body)
            except Ds01Error as err:  # without the user's limits, nothing is created
                raise Refused(f"cannot read your limits: {err.message}") from err
        return body

    async def _check_owner(self, reference: str) -> None:
        found = self.proxy.owners.lookup(reference)
        if found is None:  # not announced yet: ask the daemon, never let it through unchecked
            inspected = await self._upstream_json(f"/containers/{quote(reference)}/json")
            if inspected is None:
                return  # Docker answers "No such container", as it would to anyone
            labels = (inspected.get("Config") or {}).get("Labels") or {}
            found = owner_of(inspected.get("Id", ""), inspected.get("Name", ""), labels)
        if found.owner != self.user:
            raise Refused(denial(found.owner))

    async def _check_mount_sources(self, reference: str) -> None:
        """Docker mounts at start: a bind source that became a symlink out of the home
        since create must not be mounted."""
        inspected = await self._upstream_json(f"/containers/{quote(reference)}/json") or {}
        host = inspected.get("HostConfig") or {}
        sources = [str(b).split(":", 1)[0] for b in host.get("Binds") or []]
        sources += [
            m.get("Source", "") for m in host.get("Mounts") or [] if m.get("Type") == "bind"
        ]
        home = os.path.realpath(pwd.getpwnam(self.user).pw_dir)
        for source in sources:
            real = os.path.realpath(source)
            if source.startswith("/") and not (real == home or real.startswith(home + "/")):
                raise Refused(f"{source} now leads outside your home; not starting")

    async def _exec_container(self, exec_id: str) -> str:
        """Which container an exec belongs to, asked of the real daemon."""
        found = await self._upstream_json(f"/exec/{quote(exec_id)}/json")
        return (found or {}).get("ContainerID", "")

    async def _upstream_send(self, method: str, target: str, body: str) -> tuple[int, Any]:
        return await self._upstream_call(method, target, body)

    async def _upstream_call(self, method: str, target: str, body: str = "") -> tuple[int, Any]:
        """One request to the real daemon on a connection of its own: (status, JSON)."""
        reader, writer = await asyncio.open_unix_connection(str(self.proxy.upstream))
        try:
            head = f"{method} {target} HTTP/1.0\r\nHost: docker\r\n"
            if body:
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            writer.write(f"{head}\r\n{body}".encode())
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
            return status, json.loads(body) if body.strip() else None
        except (IndexError, ValueError):
            return 502, None

    async def _upstream_json(self, target: str) -> dict[str, Any] | None:
        """GET ``target`` from the real daemon; None unless 200 with a JSON object."""
        status, found = await self._upstream_call("GET", target)
        return found if status == 200 and isinstance(found, dict) else None

    async def _prune_own(self) -> dict[str, Any]:
        """`docker container prune`, scoped to the caller's stopped containers."""
        filters = quote(json.dumps({"status": ["exited", "created", "dead"]}))
        _, listed = await self._upstream_call("GET", f"/containers/json?all=1&filters={filters}")
        deleted = []
        for container in listed or []:
            labels = container.get("Labels") or {}
            if owner_of(container.get("Id", ""), "", labels).owner == self.user:
                status, _ = await self._upstream_call("DELETE", f"/containers/{container['Id']}")
                if status == 204:
                    deleted.append(container["Id"])
        return {"ContainersDeleted": deleted, "SpaceReclaimed": 0}

    async def _checked_create(self, body: bytes) -> bytes:
        try:
            spec = json.loads(body or b"{}")
        except ValueError as err:
            raise Refused(f"the create request is not JSON: {err}") from err
        if not isinstance(spec, dict):
            raise Refused("the create request must be a JSON object")
        owners = {}
        for ownership in self.proxy.owners.known.values():
            owners[ownership.container_id] = ownership.owner
            owners[ownership.name] = ownership.owner
        account = pwd.getpwnam(self.user)
        parent, caps = await self.proxy.settings(self.user)
        context = CreateContext(
            self.user,
            PurePosixPath(account.pw_dir),
            parent,
            owners,
            caps,
            account.pw_uid,
            account.pw_gid,
        )
        checked = check_create(spec, context)
        for name in named_volumes(checked):
            await self._check_volume(name, create=True)
        return json.dumps(checked).encode()

    async def _check_volume(self, name: str, create: bool) -> None:
        """Named volumes are their creator's; one that does not exist yet is made the
        caller's now, rather than by Docker without an owner."""
        status, found = await self._upstream_call("GET", f"/volumes/{quote(name)}")
        if status == 404 and create:
            made = json.dumps({"Name": name, "Labels": {"ds01.user": self.user}})
            await self._upstream_send("POST", "/volumes/create", made)
            return
        if status != 200 or not isinstance(found, dict):
            return  # Docker answers for itself (no such volume)
        owner = (found.get("Labels") or {}).get("ds01.user", "")
        if owner != self.user:
            raise Refused(
                f"Permission denied: volume owned by {owner}"
                if owner
                else "Permission denied: volume has no owner"
            )

    async def _send_upstream(self, event: Any) -> None:
        if self.up_writer is None:
            self.up_reader, self.up_writer = await asyncio.open_unix_connection(
                str(self.proxy.upstream)
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

    async def _relay_response(
        self,
        upgrade: bool,
        rewrite: Callable[[bytes], Awaitable[bytes]] | None,
        filter_events: bool,
    ) -> bool:
        response = await self._upstream_event()
        while isinstance(response, h11.InformationalResponse) and response.status_code != 101:
            response = await self._upstream_event()
        if upgrade and response.status_code in (101, 200):
            return await self._hijack(response)
        if response.status_code == 101:  # never asked for: refuse to relay raw bytes
            return True
        if rewrite is not None:
            body = bytearray()
            while not isinstance(event := await self._upstream_event(), h11.EndOfMessage):
                if isinstance(event, h11.Data):
                    body += event.data
            await self._answer(response.status_code, await rewrite(bytes(body)), response)
            return False
        await self._send_client(response)
        pending = b""
        while True:
            event = await self._upstream_event()
            if isinstance(event, h11.Data):
                data = event.data
                if filter_events:
                    data, pending = await self._own_events(pending + data)
                if data:
                    await self._send_client(h11.Data(data=data))
            elif isinstance(event, h11.EndOfMessage):
                await self._send_client(event)
                return False
            else:
                return True  # the daemon closed: so do we

    async def _hijack(self, response: Any) -> bool:
        """Docker switched protocols: relay raw bytes both ways until either side closes."""
        head = f"HTTP/1.1 {response.status_code} {response.reason.decode()}\r\n".encode()
        head += b"".join(k + b": " + v + b"\r\n" for k, v in response.headers) + b"\r\n"
        self.writer.write(head)
        leftover_up, _ = self.upstream.trailing_data
        leftover_client, _ = self.client.trailing_data
        self.writer.write(leftover_up)
        await self.writer.drain()
        assert self.up_writer is not None and self.up_reader is not None
        if leftover_client:
            self.up_writer.write(leftover_client)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(CHUNK):
                    sink.write(data)
                    await sink.drain()
            finally:
                with contextlib.suppress(OSError):
                    if sink.can_write_eof():
                        sink.write_eof()

        await asyncio.gather(
            pipe(self.reader, self.up_writer),
            pipe(self.up_reader, self.writer),
            return_exceptions=True,
        )
        return True

    async def _own_only(self, body: bytes) -> bytes:
        """The list entries carry their labels: the owner follows from them directly."""
        try:
            listed = json.loads(body)
        except ValueError:
            return body
        mine = [
            c
            for c in listed
            if owner_of(c.get("Id", ""), "", c.get("Labels") or {}).owner == self.user
        ]
        return json.dumps(mine).encode()

    async def _own_volumes(self, body: bytes) -> bytes:
        try:
            found = json.loads(body)
        except ValueError:
            return body
        if isinstance(found, dict) and isinstance(found.get("Volumes"), list):
            found["Volumes"] = [
                v for v in found["Volumes"] if (v.get("Labels") or {}).get("ds01.user") == self.user
            ]
        return json.dumps(found).encode()

    async def _own_network_members(self, body: bytes) -> bytes:
        """Networks list their containers: keep only the caller's."""
        try:
            found = json.loads(body)
        except ValueError:
            return body
        for network in found if isinstance(found, list) else [found]:
            members = network.get("Containers") if isinstance(network, dict) else None
            if isinstance(members, dict):
                network["Containers"] = {
                    cid: info
                    for cid, info in members.items()
                    if (known := self.proxy.owners.lookup(cid)) and known.owner == self.user
                }
        return json.dumps(found).encode()

    async def _own_events(self, data: bytes) -> tuple[bytes, bytes]:
        """Keep the events that name the caller's containers (or no container)."""
        lines = data.split(b"\n")
        pending = lines.pop()
        kept = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("Type") == "container":
                actor = event.get("Actor") or {}
                known = self.proxy.owners.lookup(actor.get("ID", ""))
                labels = actor.get("Attributes") or {}
                owner = known.owner if known else owner_of("", "", labels).owner
                if owner != self.user:
                    continue
            kept.append(line + b"\n")
        return b"".join(kept), pending

    async def _answer(self, status: int, payload: Any, like: Any = None) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = [
            (k, v)
            for k, v in (like.headers if like is not None else [])
            if k.lower() not in (b"content-length", b"transfer-encoding")
        ]
        length = str(len(body)).encode()
        headers += [(b"content-type", b"application/json"), (b"content-length", length)]
        if like is None:
            headers.append((b"api-version", b"1.41"))
        await self._send_client(h11.Response(status_code=status, headers=headers))
        await self._send_client(h11.Data(data=body))
        await self._send_client(h11.EndOfMessage())

    async def _send_client(self, event: Any) -> None:
        data = self.client.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        found = json.loads(body or b"{}")
    except ValueError as err:
        raise Refused(f"the request body is not JSON: {err}") from err
    if not isinstance(found, dict):
        raise Refused("the request body must be a JSON object")
    return found
