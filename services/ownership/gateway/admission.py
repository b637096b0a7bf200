"""The admission chain for one request of a non-admin: route, resolve, decode, decide,
and what to forward (or answer) -- with the check of Docker's view that follows.

Every handler returns a ``Forward`` built only from values the gateway validated (the
canonical path with full ids, a re-encoded query and body, its own headers), or an
``Answer``. Nothing of the caller's request bytes reaches the daemon.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import pwd
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

from ds01.ownership.gateway import archives, filters, policy, verify
from ds01.ownership.gateway.daemon import Daemon
from ds01.ownership.gateway.images import (
    OWNER_LABEL,
    Access,
    ImageName,
    access,
    is_id,
    namespace_owner,
    parse_name,
    require_writable,
)
from ds01.ownership.gateway.pins import PINS_LABEL, Pins
from ds01.ownership.gateway.policy import Caller, Caps, Found, Refused, Resolved, denial
from ds01.ownership.gateway.routes import TAR, Match, Route
from ds01.ownership.gateway.strict import (
    BadRequest,
    decode_json,
    encode_json,
    encode_query,
    go_bool,
    parse_query,
)
from ds01.ownership.owners import owner_of, user_exists

log = logging.getLogger(__name__)

JSON = "application/json"
ACCOUNT_TTL = 5.0
Rewrite = Callable[[int, bytes], Awaitable[tuple[int, bytes]]]


@dataclass(frozen=True)
class UserSettings:
    """What the limits say of a user, for containers made through the gateway."""

    cgroup_parent: str
    caps: Caps
    max_containers: int | None = None


@dataclass
class Forward:
    method: str
    target: str
    body: bytes = b""
    content_type: str | None = None
    hijack: bool = False  # attach or exec start: may become a raw stream (101, or no length)
    upgrade: bool = False  # ask Docker to switch protocols (the client asked)
    rewrite: Rewrite | None = None  # the whole answer, checked and filtered
    stream_filter: Callable[[bytes], Awaitable[bytes]] | None = None
    finish: Callable[[bytes], Awaitable[bytes | None]] | None = None  # after a stream
    cleanup: Callable[[], Awaitable[None]] | None = None  # always, once the forward ended


@dataclass
class Answer:
    status: int
    payload: Any


Decision = Forward | Answer


class NotFound(Exception):
    """Answered 404 with Docker's own wording."""


@dataclass
class Gateway:
    """What every request's admission shares."""

    daemon: Daemon
    settings: Callable[[str], Awaitable[UserSettings]]
    container_owner: Callable[[str], Awaitable[str | None]]  # id -> owner, for listings
    pins: Pins | None = None  # where bind sources are pinned (None: forwarded as paths)
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


class Admission:
    """One request of one non-admin caller."""

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
        reply = await self.daemon.call("GET", f"/containers/{quote(reference, safe='')}/json")
        found = reply.json() if reply.status == 200 and "/" not in reference else None
        if not isinstance(found, dict):
            raise NotFound(f"No such container: {reference}")
        owner = owner_of(found.get("Id", ""), "", (found.get("Config") or {}).get("Labels") or {})
        if owner.owner != self.caller.user:
            raise Refused(denial("container", owner.owner))
        return found, reply.body

    async def _settings(self) -> Caller:
        settings = await self.gateway.settings(self.caller.user)
        self.settings = settings
        return policy.Caller(
            self.caller.user,
            self.caller.uid,
            self.caller.gid,
            self.caller.groups,
            self.caller.home,
            settings.cgroup_parent,
            settings.caps,
        )

    # --- the daemon ----------------------------------------------------------------

    async def _pass(self, body: bytes) -> Decision:
        value = self._json(body) if self.route.body is not None else None
        return self._forward(self.match.route.pattern, value)

    async def _events(self, body: bytes) -> Decision:
        async def volume_owner(name: str) -> str | None:
            found = await self.daemon.volume(name)
            return None if found is None else (found.get("Labels") or {}).get(OWNER_LABEL, "")

        async def network_owner(ref: str) -> str | None:
            found = await self.daemon.network(ref)
            return None if found is None else (found.get("Labels") or {}).get(OWNER_LABEL, "")

        events = filters.EventFilter(self.caller.user, volume_owner, network_owner)
        return self._forward("/events", stream_filter=events.feed)

    # --- containers ------------------------------------------------------------------

    async def _container_list(self, body: bytes) -> Decision:
        user = self.caller.user
        return self._listing("/containers/json", lambda data: filters.containers(data, user))

    async def _container(self, body: bytes) -> Decision:
        found = await self._own_container(self.match.params["container"])
        return self._forward(self._path(container=found["Id"]))

    async def _container_rename(self, body: bytes) -> Decision:
        policy.admit_name(_one(self.query, "name"), self.caller)
        return await self._container(body)

    async def _container_delete(self, body: bytes) -> Decision:
        if go_bool(_one(self.query, "link")):  # removes a link name, which may be anyone's
            raise Refused("removing links is for admins")
        self.query.pop("link", None)
        return await self._container(body)

    async def _container_inspect(self, body: bytes) -> Decision:
        found, raw = await self._own_container_raw(self.match.params["container"])
        if not self.query:  # the inspect the gateway just made is Docker's answer
            return Answer(200, raw)
        return self._forward(self._path(container=found["Id"]))

    async def _container_start(self, body: bytes) -> Decision:
        """Docker mounts at start: a bind source that became a symlink out of the home
        since create must not be mounted."""
        found = await self._own_container(self.match.params["container"])
        pins = self.gateway.pins
        for mount in found.get("Mounts") or []:
            source = mount.get("Source") or ""
            if mount.get("Type") != "bind":
                continue
            if pins is not None and pins.owns(source):
                await asyncio.to_thread(pins.repin, source)  # after a reboot: walked afresh
                continue
            if not _existing(source):
                raise Refused(f"{source} does not exist (any more); not starting")
            if not _inside(source, self.caller.home):
                raise Refused(f"{source} now leads outside your home; not starting")
        return self._forward(self._path(container=found["Id"]))

    async def _container_update(self, body: bytes) -> Decision:
        found = await self._own_container(self.match.params["container"])
        caller = await self._settings()
        return self._forward(
            self._path(container=found["Id"]), policy.admit_update(self._json(body), caller)
        )

    async def _container_prune(self, body: bytes) -> Decision:
        """`docker container prune`, scoped to the caller's stopped containers."""
        wanted = json.dumps({"status": ["exited", "created", "dead"]})
        listed = await self.daemon.get(f"/containers/json?all=1&filters={quote(wanted)}") or []
        deleted = []
        for container in listed:
            if filters.container_owner(container.get("Labels")) != self.caller.user:
                continue
            if await self.daemon.delete(f"/containers/{container['Id']}") == 204:
                deleted.append(container["Id"])
        return Answer(200, {"ContainersDeleted": deleted, "SpaceReclaimed": 0})

    async def _container_create(self, body: bytes) -> Decision:
        policy.admit_name(_one(self.query, "name"), self.caller)
        request = self._json(body) or {}
        caller = await self._settings()
        lock = self.gateway.creating.setdefault(caller.user, asyncio.Lock())
        await lock.acquire()  # one create at a time per user: the count stays true
        tokens: list[str] = []
        try:
            resolved, made_volumes = await self._resolve_create(request)
            admitted = policy.admit_create(request, caller, resolved)
            pinned = await self._pin_binds(admitted, tokens)
            await self._make_volumes(made_volumes)
        except BaseException:
            self._unpin(tokens)
            lock.release()
            raise
        own_containers = {
            key
            for found in resolved.containers.values()
            if found.owner == caller.user
            for key in (found.id, found.name.lstrip("/"))
        }
        own_volumes = set(resolved.volumes) | made_volumes
        kept = False  # a container was made and passed the check

        async def rewrite(status: int, data: bytes) -> tuple[int, bytes]:
            nonlocal kept
            if status != 201:
                return status, data
            container_id = str((json.loads(data) or {}).get("Id", ""))
            made = await self.daemon.container(container_id) or {}
            wrong = verify.container_violations(made, caller, own_containers, own_volumes, pinned)
            if wrong or not made:
                await self.daemon.delete(f"/containers/{container_id}?force=1&v=1")
                log.warning("%s: Docker's view broke the policy: %s", caller.user, wrong)
                return 403, _message(
                    "Permission denied: Docker read the request differently from ds01 "
                    f"({'; '.join(wrong) or 'no container'}); nothing was created"
                )
            kept = True
            return status, data

        async def cleanup() -> None:
            """However the forward ended: volumes made for a create that did not stand are
            removed, and the user's next create may go."""
            try:
                if not kept:
                    self._unpin(tokens)
                    await self._remove_volumes(made_volumes)
            finally:
                lock.release()

        return self._forward("/containers/create", admitted, rewrite=rewrite, cleanup=cleanup)

    async def _pin_binds(self, admitted: dict[str, Any], tokens: list[str]) -> frozenset[str]:
        """Every bind source of the create, pinned: Docker gets a root-owned path that shows
        exactly the directory checked, whatever becomes of the user's path later."""
        pins = self.gateway.pins
        if pins is None:
            return frozenset()
        pinned = []
        for mount in admitted["HostConfig"].get("Mounts") or []:
            if mount.get("Type") == "bind":
                path = await asyncio.to_thread(
                    pins.pin, self.caller.home, mount["Source"], self.caller.uid
                )
                tokens.append(PurePosixPath(path).name)
                mount["Source"] = path
                pinned.append(path)
        if tokens:
            admitted["Labels"][PINS_LABEL] = " ".join(tokens)
        return frozenset(pinned)

    def _unpin(self, tokens: list[str]) -> None:
        for token in tokens:
            assert self.gateway.pins is not None
            self.gateway.pins.unpin(token)

    async def _check_room(self) -> None:
        most = self.settings.max_containers
        if most is None:
            return
        wanted = json.dumps({"label": [f"{OWNER_LABEL}={self.caller.user}"]})
        listed = await self.daemon.get(f"/containers/json?all=1&filters={quote(wanted)}") or []
        if len(listed) >= most:
            raise Refused(
                f"{self.caller.user} has {len(listed)} of {most} containers: remove one first"
            )

    async def _resolve_create(self, request: dict[str, Any]) -> tuple[Resolved, set[str]]:
        """Docker's answer for every object the request names, asked all at once; and the
        named volumes that do not exist yet (made for the caller once the policy allows)."""
        named = policy.named_in_create(request)
        resolved = Resolved(paths={path: _existing(path) for path in named.paths})

        async def container(reference: str) -> None:
            found = await self.daemon.container(reference) if "/" not in reference else None
            if found is None:
                raise NotFound(f"No such container: {reference}")
            labels = (found.get("Config") or {}).get("Labels") or {}
            owner = owner_of("", "", labels).owner
            resolved.containers[reference] = Found(found["Id"], owner, name=found["Name"])

        async def network(reference: str) -> None:
            resolved.networks[reference] = await self._network_found(reference)

        async def volume(name: str) -> None:
            found = await self.daemon.volume(name)
            owner = None if found is None else (found.get("Labels") or {}).get(OWNER_LABEL, "")
            resolved.volumes[name] = None if owner is None else Found(name, owner)

        async def image(reference: str) -> None:
            resolved.image = await self._visible_image(reference)

        await asyncio.gather(
            self._check_room(),
            *map(container, named.containers),
            *map(network, named.networks),
            *map(volume, named.volumes),
            *([image(named.image)] if named.image else []),
        )
        missing = {name for name, found in resolved.volumes.items() if found is None}
        return resolved, missing

    async def _make_volumes(self, names: set[str]) -> None:
        """The caller's now, rather than Docker's without an owner; all or none."""
        made: set[str] = set()
        try:
            for name in sorted(names):
                await self._make_volume(name)
                made.add(name)
        except BaseException:
            await self._remove_volumes(made)
            raise

    async def _make_volume(self, name: str) -> None:
        made = {"Name": name, "Driver": "local", "Labels": {OWNER_LABEL: self.caller.user}}
        reply = await self.daemon.call("POST", "/volumes/create", encode_json(made), JSON)
        if reply.status != 201:
            raise BadRequest(f"volume {name}: {(reply.json() or {}).get('message', reply.status)}")

    async def _remove_volumes(self, names: set[str]) -> None:
        for name in names:
            await self.daemon.delete(f"/volumes/{quote(name, safe='')}")

    # --- exec and attach -------------------------------------------------------------

    async def _exec_create(self, body: bytes) -> Decision:
        found = await self._own_container(self.match.params["container"])
        caller = self.caller

        async def rewrite(status: int, data: bytes) -> tuple[int, bytes]:
            if status != 201:
                return status, data
            made = await self.daemon.exec(str((json.loads(data) or {}).get("Id", ""))) or {}
            wrong = verify.exec_violations(made, caller)
            if wrong:
                return 403, _message(f"Permission denied: {'; '.join(wrong)}")
            return status, data

        admitted = policy.admit_exec(self._json(body), caller)
        return self._forward(self._path(container=found["Id"]), admitted, rewrite=rewrite)

    async def _own_exec(self) -> dict[str, Any]:
        reference = self.match.params["exec"]
        found = await self.daemon.exec(reference) if "/" not in reference else None
        if found is None:
            raise NotFound(f"No such exec instance: {reference}")
        await self._own_container(str(found.get("ContainerID", "")))
        return found

    async def _exec(self, body: bytes) -> Decision:
        found = await self._own_exec()
        return self._forward(self._path(exec=found["ID"]))

    async def _exec_start(self, body: bytes) -> Decision:
        """Checked again just before it runs: Docker's own record of the exec."""
        found = await self._own_exec()
        wrong = verify.exec_violations(found, self.caller)
        if wrong:
            raise Refused(f"Permission denied: {'; '.join(wrong)}")
        request = self._json(body) or {}
        hijack = not request.get("Detach")
        return self._forward(
            self._path(exec=found["ID"]), request, hijack=hijack, upgrade=hijack and self.upgrade
        )

    async def _attach(self, body: bytes) -> Decision:
        found = await self._own_container(self.match.params["container"])
        return self._forward(self._path(container=found["Id"]), hijack=True, upgrade=self.upgrade)

    # --- images ----------------------------------------------------------------------

    async def _image_found(self, reference: str) -> Found:
        if not is_id(reference):
            named = namespace_owner(parse_name(reference), user_exists)
            if named not in (None, self.caller.user):  # another user's name, whatever it holds
                return Found("", named)
        found = await self.daemon.image(reference)
        if found is None:
            raise NotFound(f"No such image: {reference}")
        tags = found.get("RepoTags") or []
        labels = (found.get("Config") or {}).get("Labels") or {}
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

    async def _image_list(self, body: bytes) -> Decision:
        user = self.caller.user
        return self._listing("/images/json", lambda data: filters.images(data, user))

    async def _image_read(self, body: bytes) -> Decision:
        reference = self.match.params["image"]
        found = await self._visible_image(reference)
        if self.route.pattern.endswith("/get") and not is_id(reference):
            return self._forward(self._path(image=parse_name(reference).tagged()))
        if self.route.pattern.endswith("/json"):  # other users' names of it stay hidden
            user = self.caller.user
            return self._listing(self._path(image=found.id), lambda d: filters.image(d, user))
        return self._forward(self._path(image=found.id))

    async def _images_save(self, body: bytes) -> Decision:
        names = []
        for reference in self.query.get("names", []):
            await self._visible_image(reference)
            names.append(reference if is_id(reference) else parse_name(reference).tagged())
        self.query["names"] = names
        return self._forward("/images/get")

    async def _image_tag(self, body: bytes) -> Decision:
        source = await self._visible_image(self.match.params["image"])
        repo = _one(self.query, "repo")
        tag = _one(self.query, "tag") or "latest"
        name = require_writable(f"{repo}:{tag}", self.caller.user)
        self.query = {"repo": [name.repository], "tag": [tag]}

        async def rewrite(status: int, data: bytes) -> tuple[int, bytes]:
            if status != 201:
                return status, data
            made = await self.daemon.image(str(name)) or {}
            if made.get("Id") != source.id:
                await self.daemon.delete(f"/images/{quote(str(name), safe='/:')}")
                return 403, _message("Permission denied: Docker tagged something else; undone")
            return status, data

        return self._forward(self._path(image=source.id), rewrite=rewrite)

    async def _image_delete(self, body: bytes) -> Decision:
        reference = self.match.params["image"]
        if is_id(reference):
            visible = await self._visible_image(reference)  # another's: as if none
            found = await self.daemon.image(visible.id) or {}
            if visible.owner != self.caller.user or not all(
                _writable(tag, self.caller.user) for tag in found.get("RepoTags") or []
            ):
                raise Refused("Permission denied: remove a shared image's name, not the image")
            return self._forward(self._path(image=visible.id))
        name = require_writable(reference, self.caller.user)
        return self._forward(self._path(image=name.tagged()))

    async def _image_create(self, body: bytes) -> Decision:
        """Pull a shared image; import only into one's own namespace, and only from the
        request body (a URL would be fetched by the daemon)."""
        if _one(self.query, "fromSrc"):
            return await self._import(body)
        if body:
            raise BadRequest("a pull carries no body")
        image = _one(self.query, "fromImage")
        name = parse_name(image + (f":{_one(self.query, 'tag')}" if self.query.get("tag") else ""))
        if name.domain is not None:  # the daemon would connect wherever the name says
            raise Refused("pulls from registries other than Docker Hub are for admins")
        owner = namespace_owner(name, user_exists)
        if owner not in (None, self.caller.user):
            raise Refused(f"Permission denied: {name.repository} is {owner}'s namespace")
        return self._forward("/images/create")

    async def _import(self, body: bytes) -> Decision:
        if _one(self.query, "fromSrc") != "-":
            raise Refused("import reads the archive from the request only, not from a URL")
        name = self._target_name()
        changes = policy.admit_changes(self.query.get("changes", []))
        self.query["changes"] = [*changes, f'LABEL {OWNER_LABEL}="{self.caller.user}"']
        self.query["repo"], self.query["tag"] = [name.repository], [name.tag or "latest"]
        return self._forward_archive("/images/create", body)

    async def _image_load(self, body: bytes) -> Decision:
        for name in archives.image_names(body):
            require_writable(name, self.caller.user)
        return self._forward_archive("/images/load", body)

    def _target_name(self) -> ImageName:
        """The name a commit or import writes: ``repo`` (which may carry the tag) and
        ``tag``, as Docker joins them; the caller's to write or refused."""
        repo, tag = _one(self.query, "repo"), _one(self.query, "tag")
        name = require_writable(repo, self.caller.user)
        if tag and name.tag:
            raise BadRequest("give the tag in repo or in tag, not in both")
        return require_writable(
            f"{name.repository}:{tag or name.tag or 'latest'}", self.caller.user
        )

    async def _check_made_images(self, output: bytes) -> bytes | None:
        """After a build, load or import, from Docker's own report: every name it tagged
        must be the caller's to write (a name it took from someone is given back), and a
        built image must carry the caller's label and stand only on images they may read.
        Anything else is undone."""
        wrong: list[str] = []
        renamed: dict[str, str] = {}  # name -> the image it named before
        for message in _messages(output):
            found = _RENAMED.search(message)
            if found:
                renamed[found["name"]] = found["old"]
            for made in _MADE.findall(message):
                if not _writable(made, self.caller.user) or not await self._labelled_theirs(made):
                    wrong.append(made)
                    await self._give_back(made, renamed.get(made))
            built = _BUILT.search(message)
            if built:
                wrong += await self._check_built(built["id"])
        if not wrong:
            return None
        text = f"Permission denied: undone: {', '.join(wrong)}"
        log.warning("%s: %s", self.caller.user, text)
        return json.dumps({"errorDetail": {"message": text}, "error": text}).encode() + b"\n"

    async def _labelled_theirs(self, name: str) -> bool:
        """An image made for the caller carries no other user's owner label."""
        found = await self.daemon.image(name) or {}
        owner = ((found.get("Config") or {}).get("Labels") or {}).get(OWNER_LABEL)
        return owner in (None, self.caller.user)

    async def _give_back(self, name: str, previous: str | None) -> None:
        """Remove ``name`` from what was made, and point it at its old image again."""
        await self.daemon.delete(f"/images/{quote(name, safe='/:@')}?noprune=1")
        if previous:
            tagged = parse_name(name)
            query = encode_query({"repo": [tagged.repository], "tag": [tagged.tag or "latest"]})
            await self.daemon.call("POST", f"/images/{quote(previous, safe=':')}/tag?{query}")

    async def _check_built(self, image_id: str) -> list[str]:
        """The built image is the caller's, and no image under it is someone else's."""
        made = await self.daemon.image(image_id) or {}
        labels = (made.get("Config") or {}).get("Labels") or {}
        wrong = [] if labels.get(OWNER_LABEL) == self.caller.user else [f"{image_id} (label)"]
        parent, seen = made.get("Parent") or "", 0
        while parent and seen < 1000 and not wrong:
            above = await self.daemon.image(parent) or {}
            tags = above.get("RepoTags") or []
            above_labels = (above.get("Config") or {}).get("Labels") or {}
            if access(self.caller.user, tags, above_labels, user_exists) is Access.PRIVATE:
                wrong.append(f"{image_id} (stands on an image that is not yours)")
            parent, seen = above.get("Parent") or "", seen + 1
        if wrong:
            for tag in made.get("RepoTags") or []:
                await self.daemon.delete(f"/images/{quote(tag, safe='/:')}?noprune=1")
            await self.daemon.delete(f"/images/{image_id}?force=1")
        return wrong

    async def _commit(self, body: bytes) -> Decision:
        found = await self._own_container(_one(self.query, "container"))
        self.query["container"] = [found["Id"]]
        if _one(self.query, "repo"):
            name = self._target_name()
            self.query["repo"], self.query["tag"] = [name.repository], [name.tag or "latest"]
        changes = policy.admit_changes(self.query.get("changes", []))
        self.query["changes"] = [*changes, f'LABEL {OWNER_LABEL}="{self.caller.user}"']
        config = self._json(body)
        if config is not None:
            config["Labels"] = policy.own_labels(config.get("Labels"), self.caller.user)
            config.pop("User", None)
        user = self.caller.user

        async def rewrite(status: int, data: bytes) -> tuple[int, bytes]:
            if status != 201:
                return status, data
            image_id = str((json.loads(data) or {}).get("Id", ""))
            made = await self.daemon.image(image_id) or {}
            labels = (made.get("Config") or {}).get("Labels") or {}
            tags = made.get("RepoTags") or []
            if labels.get(OWNER_LABEL) != user or any(
                access(user, [t], {}, user_exists) is not Access.OWN for t in tags
            ):
                await self.daemon.delete(f"/images/{image_id}?force=1")
                return 403, _message("Permission denied: the committed image was not yours")
            return status, data

        return self._forward("/commit", config, rewrite=rewrite)

    async def _build(self, body: bytes) -> Decision:
        caller = await self._settings()
        query = self.query
        for key in ("remote", "session", "outputs", "cachefrom", "squash"):
            if go_bool(_one(query, key)) or (key != "squash" and _one(query, key)):
                raise Refused(f"build option {key} is for admins")
        if _one(query, "version") not in ("", "1"):
            raise Refused("BuildKit builds are for admins; build with DOCKER_BUILDKIT=0")
        if go_bool(_one(query, "pull")):
            raise Refused("build --pull is for admins: it rewrites shared base images")
        if _one(query, "networkmode") not in ("", "default", "none"):
            raise Refused("builds run on the default network or none")
        if _one(query, "isolation") not in ("", "default"):
            raise Refused("another isolation is for admins")
        query["t"] = [require_writable(t, caller.user).tagged() for t in query.get("t", [])]
        labels = _json_param(query, "labels", dict) or {}
        query["labels"] = [json.dumps(policy.own_labels(labels, caller.user))]
        ulimits = _json_param(query, "ulimits", list) or []
        query["ulimits"] = [json.dumps([policy.admit_ulimit(u, caller.caps) for u in ulimits])]
        query["cgroupparent"] = [caller.cgroup_parent]
        _clamp_build(query, caller.caps)
        dockerfile = archives.member_path(_one(query, "dockerfile") or "Dockerfile")
        build = archives.build_context(body, dockerfile, caller.user)
        query["dockerfile"] = [dockerfile]
        for base in build.bases:
            found = await self._visible_image(base)
            if archives.onbuild_copies(found.onbuild):
                raise Refused(f"{base} has ONBUILD triggers that copy from other images")
        return self._forward_archive("/build", build.context)

    # --- volumes and networks --------------------------------------------------------

    async def _volume_list(self, body: bytes) -> Decision:
        user = self.caller.user
        return self._listing("/volumes", lambda data: filters.volumes(data, user))

    async def _volume(self, body: bytes) -> Decision:
        name = self.match.params["volume"]
        found = await self.daemon.volume(name)
        if found is None:
            raise NotFound(f"get {name}: no such volume")
        owner = (found.get("Labels") or {}).get(OWNER_LABEL, "")
        if owner != self.caller.user:
            raise Refused(denial("volume", owner))
        return self._forward(self._path(volume=found["Name"]))

    async def _volume_create(self, body: bytes) -> Decision:
        request = policy.admit_volume_create(self._json(body), self.caller)
        name = request.get("Name") or ""
        if name:
            existing = await self.daemon.volume(name)
            if existing is not None:
                owner = (existing.get("Labels") or {}).get(OWNER_LABEL, "")
                if owner != self.caller.user:
                    raise Refused(denial("volume", owner))
        caller = self.caller

        async def rewrite(status: int, data: bytes) -> tuple[int, bytes]:
            made = json.loads(data) if status == 201 else None
            if isinstance(made, dict):
                wrong = verify.volume_violations(made, caller)
                if wrong:
                    if (made.get("Labels") or {}).get(OWNER_LABEL) == caller.user:
                        await self.daemon.delete(f"/volumes/{quote(made['Name'], safe='')}")
                    return 403, _message(f"Permission denied: {'; '.join(wrong)}")
            return status, data

        return self._forward("/volumes/create", request, rewrite=rewrite)

    async def _network_found(self, reference: str) -> Found:
        found = await self.daemon.network(reference) if "/" not in reference else None
        if found is None:
            raise NotFound(f"network {reference} not found")
        owner = (found.get("Labels") or {}).get(OWNER_LABEL, "")
        shared = not owner and found.get("Name") in filters.PREDEFINED_NETWORKS - {"host"}
        return Found(found["Id"], owner, shared=shared)

    async def _network_list(self, body: bytes) -> Decision:
        user, owner = self.caller.user, self.gateway.container_owner
        return self._listing("/networks", lambda data: filters.networks(data, user, owner))

    async def _network_read(self, body: bytes) -> Decision:
        found = await self._network_found(self.match.params["network"])
        if not (found.shared or found.owner == self.caller.user):
            raise Refused(denial("network", found.owner))
        user, owner = self.caller.user, self.gateway.container_owner
        path = self._path(network=found.id)
        return self._listing(path, lambda data: filters.networks(data, user, owner))

    async def _network(self, body: bytes) -> Decision:
        found = await self._network_found(self.match.params["network"])
        policy.require_own("network", found, self.caller)
        return self._forward(self._path(network=found.id))

    async def _network_create(self, body: bytes) -> Decision:
        request = policy.admit_network_create(self._json(body), self.caller)
        caller = self.caller

        async def rewrite(status: int, data: bytes) -> tuple[int, bytes]:
            if status != 201:
                return status, data
            network_id = str((json.loads(data) or {}).get("Id", ""))
            made = await self.daemon.network(network_id) or {}
            wrong = verify.network_violations(made, caller)
            if wrong:
                await self.daemon.delete(f"/networks/{network_id}")
                return 403, _message(f"Permission denied: {'; '.join(wrong)}; removed")
            return status, data

        return self._forward("/networks/create", request, rewrite=rewrite)

    async def _network_connect(self, body: bytes) -> Decision:
        found = await self._network_found(self.match.params["network"])
        if not (found.shared or found.owner == self.caller.user):
            raise Refused(denial("network", found.owner))
        request = self._json(body) or {}
        container = await self._own_container(request.get("Container") or "")
        request["Container"] = container["Id"]
        if request.get("EndpointConfig") is not None:
            request["EndpointConfig"] = policy.admit_endpoint(request["EndpointConfig"])
        return self._forward(self._path(network=found.id), request)


def _existing(path: str) -> str:
    """The real path, or "" where there is nothing (Docker would make it, as root)."""
    real = os.path.realpath(path)
    return real if os.path.lexists(real) else ""


def _inside(source: str, home: PurePosixPath) -> bool:
    real = PurePosixPath(os.path.realpath(source))
    return real == home or home in real.parents


def _message(text: str) -> bytes:
    return json.dumps({"message": text}).encode()


def _one(query: dict[str, list[str]], key: str) -> str:
    return (query.get(key) or [""])[0]


def _json_param(query: dict[str, list[str]], key: str, kind: type) -> Any:
    text = _one(query, key)
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise BadRequest(f"the query parameter {key} is not JSON") from None
    if value is not None and not isinstance(value, kind):
        raise BadRequest(f"the query parameter {key} must be a JSON {kind.__name__}")
    return value


def _clamp_build(query: dict[str, list[str]], caps: Caps) -> None:
    """A build's containers stay within the user's per-container limits."""

    def number(key: str) -> int:
        text = _one(query, key) or "0"
        if not re.fullmatch(r"-?[0-9]{1,19}", text):
            raise BadRequest(f"the query parameter {key} must be a number")
        return int(text)

    for key, cap in (
        ("memory", caps.memory),
        ("memswap", caps.memory_swap),
        ("shmsize", caps.shm_size),
    ):
        if cap is not None and not 0 < number(key) <= cap:
            query[key] = [str(cap)]
    if not 0 <= number("cpushares") <= policy.CPU_SHARES:
        query["cpushares"] = [str(policy.CPU_SHARES)]
    if caps.nano_cpus is not None:
        query["cpuperiod"] = ["100000"]
        query["cpuquota"] = [str(caps.nano_cpus * 100000 // 10**9)]


_RENAMED = re.compile(
    r"The image (?P<name>\S+) already exists, renaming the old one with ID (?P<old>\S+)"
)
_MADE = re.compile(r"(?:Loaded image: |Successfully tagged )(\S+)")
_BUILT = re.compile(r"Successfully built (?P<id>[0-9a-f]{12,64})")


def _messages(output: bytes) -> list[str]:
    """The text of each JSON progress message Docker streamed."""
    found = []
    for line in output.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict):
            found.append(str(message.get("stream") or message.get("status") or ""))
    return found


def _writable(name: str, user: str) -> bool:
    try:
        require_writable(name, user)
    except (PermissionError, BadRequest):
        return name.startswith("sha256:")  # an id is no name
    return True
