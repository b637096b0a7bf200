"""What every admission step shares: the gateway's context, the request as read, and the
lookups that resolve a reference through the daemon, afresh for each request."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import pwd
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Protocol
from urllib.parse import quote

from ds01.core.account_files import AccountFiles
from ds01.core.docker_api import Daemon, container_path
from ds01.ownership.gateway import filters, images, policy
from ds01.ownership.gateway.decisions import (
    JSON,
    Answer,
    Decision,
    Forward,
    NotFound,
    UserSettings,
)
from ds01.ownership.gateway.images import (
    OWNER_LABEL,
    Access,
    access,
    named_for_another,
)
from ds01.ownership.gateway.pins import Pins
from ds01.ownership.gateway.policy import Caller, Found, Refused, denial
from ds01.ownership.gateway.routes import TAR, Match, Route
from ds01.ownership.gateway.strict import decode_json, encode_json, encode_query, parse_query
from ds01.ownership.owners import owner_of, user_exists

ACCOUNT_TTL = 5.0


class GpuCheck(Protocol):
    """The allocator's word on a container's GPUs, asked before a start through the
    gateway (``mlc start``, ``docker start``)."""

    async def check(self, container: str, slots: list[str]) -> str | None:
        """Why a slot is no longer the container's, or None when all still are."""
        ...

    async def check_references(self, container: str, references: list[str]) -> str | None:
        """For a container ds01 adopted (DS01's, mlc's): why a GPU its labels, devices or
        environment name is not allocated to it, or None when each is."""
        ...

    async def started(self, container: str) -> None:
        """The container runs again: its slots are no longer only held."""
        ...


@dataclass
class Gateway:
    """What every request's admission shares."""

    daemon: Daemon
    settings: Callable[[str], Awaitable[UserSettings]]
    container_owner: Callable[[str], Awaitable[str | None]]  # id -> owner, for listings
    pins: Pins | None = None  # where bind sources are pinned (None: forwarded as paths)
    # Where ds01's containers have their /etc/passwd and /etc/group (bind-mounted).
    account_files: AccountFiles | None = None
    gpus: GpuCheck | None = None  # the allocator, for containers that carry GPUs
    # Whether a ds01 create holds a container name (it may wait for GPUs for hours).
    create_pending: Callable[[str], Awaitable[bool]] | None = None
    creating: dict[str, asyncio.Lock] = field(default_factory=dict)
    accounts: dict[int, tuple[float, Caller]] = field(default_factory=dict)

    def caller(self, uid: int) -> Caller:
        """The account behind a uid (looked up again after a few seconds: groups change)."""
        cached = self.accounts.get(uid)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        account = pwd.getpwuid(uid)
        groups = frozenset(os.getgrouplist(account.pw_name, account.pw_gid))
        home = PurePosixPath(os.path.realpath(account.pw_dir))
        found = Caller(account.pw_name, uid, account.pw_gid, groups, home)
        self.accounts[uid] = (time.monotonic() + ACCOUNT_TTL, found)
        return found


class Request:
    """One request of one non-admin caller: what every admission step shares."""

    def __init__(self, gateway: Gateway, caller: Caller, found: Match, upgrade: bool) -> None:
        self.gateway = gateway
        self.daemon = gateway.daemon
        self.caller = caller
        self.match = found
        self.route: Route = found.route
        self.upgrade = upgrade
        self.query = parse_query(found.query, self.route.query, self.route.repeat)

    async def decide(self, body: bytes) -> Decision:
        handler = getattr(self, f"_{self.route.action}")
        try:
            return await handler(body)
        except NotFound as missing:
            return Answer(404, {"message": str(missing)})

    # --- helpers ---------------------------------------------------------------------

    def _json(self, body: bytes) -> Any:
        schema = self.route.body
        assert schema is not None and schema != TAR
        return decode_json(body, schema, "the request body")  # type: ignore[arg-type]

    def _target(self, path: str, query: dict[str, list[str]] | None = None) -> str:
        query = self.query if query is None else query
        encoded = encode_query(query)
        return f"{self.match.prefix()}{path}" + (f"?{encoded}" if encoded else "")

    def _forward(self, path: str, body: Any = None, **extra: Any) -> Forward:
        """The request, rebuilt: canonical path, re-encoded query and body."""
        data = b"" if body is None else encode_json(body)
        content_type = JSON if body is not None else None
        return Forward(self.route.method, self._target(path), data, content_type, **extra)

    def _listing(self, path: str, keep: Callable[[bytes], bytes | Awaitable[bytes]]) -> Forward:
        """Forward, then cut Docker's answer down to what ``keep`` leaves of it."""

        async def rewrite(status: int, data: bytes) -> tuple[int, bytes]:
            if status != 200:
                return status, data
            kept = keep(data)
            return status, await kept if inspect.isawaitable(kept) else kept

        return self._forward(path, rewrite=rewrite)

    def _forward_archive(self, path: str, archive: bytes) -> Forward:
        """A tar body as Docker expects it; what it made is checked when it is done."""
        forward = self._forward(path)
        forward.body, forward.content_type = archive, "application/x-tar"
        forward.finish = self._check_made_images
        return forward

    def _path(self, **ids: str) -> str:
        """The route's pattern with each reference replaced by the resolved id."""
        path = self.route.pattern
        for name, value in ids.items():
            path = path.replace(f"{{{name}}}", quote(value, safe="/:@"))
        return path

    async def _own_container(self, reference: str) -> dict[str, Any]:
        found, _ = await self._own_container_raw(reference)
        return found

    async def _own_container_raw(self, reference: str) -> tuple[dict[str, Any], bytes]:
        """The caller's container as Docker resolves ``reference`` now, with the inspect's
        own bytes."""
        found, raw, owner = await self._container_found(reference)
        if owner != self.caller.user:
            raise Refused(denial("container", owner))
        return found, raw

    async def _container_found(self, reference: str) -> tuple[dict[str, Any], bytes, str]:
        """Docker's inspect of ``reference``, its bytes and its owner. A reference holding
        '/' is never asked: Docker's router would read it as a link alias."""
        if "/" in reference:
            raise NotFound(f"No such container: {reference}")
        reply = await self.daemon.call("GET", f"{container_path(reference)}/json")
        found = reply.json() if reply.status == 200 else None
        if not isinstance(found, dict):
            raise NotFound(f"No such container: {reference}")
        return found, reply.body, owner_of("", "", images.config_labels(found)).owner

    async def _labelled_owner(
        self, lookup: Callable[[str], Awaitable[dict[str, Any] | None]], reference: str
    ) -> str | None:
        """A volume's or network's owner label ("" for none), None when there is none."""
        found = await lookup(reference)
        return None if found is None else policy.owner_label(found)

    async def _settings(self) -> Caller:
        """The caller with their cgroup parent and limits, for what they make."""
        self.settings = await self.gateway.settings(self.caller.user)
        return dataclasses.replace(
            self.caller, cgroup_parent=self.settings.cgroup_parent, caps=self.settings.caps
        )

    async def _image_found(self, reference: str) -> Found:
        named = named_for_another(reference, self.caller.user, user_exists)
        if named:  # another user's name, whatever it holds
            return Found("", named)
        found = await self.daemon.image(reference)
        if found is None:
            raise NotFound(f"No such image: {reference}")
        tags = found.get("RepoTags") or []
        labels = images.config_labels(found)
        kind = access(self.caller.user, tags, labels, user_exists, unowned=Access.PRIVATE)
        owner = self.caller.user if kind is Access.OWN else labels.get(OWNER_LABEL, "")
        if kind is Access.PRIVATE and not owner:
            owner = next((t.split("/", 1)[0].removeprefix("ds01-") for t in tags if "/" in t), "")
        onbuild = tuple((found.get("Config") or {}).get("OnBuild") or ())
        return Found(found["Id"], owner, shared=kind is Access.SHARED, onbuild=onbuild)

    async def _visible_image(self, reference: str) -> Found:
        """An image the caller may read. Another user's looks like no image at all: its
        name, or an id prefix, must not tell what others have."""
        found = await self._image_found(reference)
        if not (found.shared or found.owner == self.caller.user):
            raise NotFound(f"No such image: {reference}")
        return found

    async def _network_found(self, reference: str) -> Found:
        found = await self.daemon.network(reference) if "/" not in reference else None
        if found is None:
            raise NotFound(f"network {reference} not found")
        owner = policy.owner_label(found)
        shared = not owner and found.get("Name") in filters.PREDEFINED_NETWORKS - {"host"}
        return Found(found["Id"], owner, shared=shared)


def existing(path: str) -> str:
    """The real path, or "" where there is nothing (Docker would make it, as root) or it
    cannot be resolved (a symlink loop, a path swapped while it was read)."""
    try:
        return os.path.realpath(path, strict=True)
    except (OSError, ValueError):
        return ""


def inside(source: str, home: PurePosixPath) -> bool:
    real = existing(source)
    return bool(real) and policy.within(real, home)
