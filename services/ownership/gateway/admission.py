"""The admission chain for one request of a non-admin: route, resolve, decode, decide,
and what to forward (or answer) -- with the check of Docker's view that follows.

Every handler returns a ``Forward`` built only from values the gateway validated (the
canonical path with full ids, a re-encoded query and body, its own headers), or an
``Answer``. Nothing of the caller's request bytes reaches the daemon. Containers, exec
and events are here; images in ``image_routes``, volumes and networks in
``storage_routes``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

from ds01.containers.adoption import Seen, gpu_references, made_by_gateway
from ds01.containers.spec import made_as
from ds01.ownership.gateway import filters, images, policy, verify
from ds01.ownership.gateway.decisions import (
    JSON,
    Answer,
    Decision,
    Forward,
    NotFound,
    UserSettings,
    message,
    one,
)
from ds01.ownership.gateway.image_routes import ImageRoutes
from ds01.ownership.gateway.images import OWNER_LABEL
from ds01.ownership.gateway.pins import PINS_LABEL
from ds01.ownership.gateway.policy import Found, Refused, Resolved
from ds01.ownership.gateway.request import Gateway, existing, inside
from ds01.ownership.gateway.storage_routes import StorageRoutes
from ds01.ownership.gateway.strict import BadRequest, encode_json, go_bool

log = logging.getLogger(__name__)

GPU_SLOTS_LABEL = "ds01.gpu.slots"  # "<node>/<slot> ...", set by ds01's containers service

__all__ = ["Admission", "Answer", "Decision", "Forward", "Gateway", "UserSettings"]


class Admission(ImageRoutes, StorageRoutes):
    """One request of one non-admin caller, decided by the route's own handler."""

    # --- the daemon ----------------------------------------------------------------

    async def _pass(self, body: bytes) -> Decision:
        value = self._json(body) if self.route.body is not None else None
        return self._forward(self.match.route.pattern, value)

    async def _events(self, body: bytes) -> Decision:
        events = filters.EventFilter(
            self.caller.user,
            functools.partial(self._labelled_owner, self.daemon.volume),
            functools.partial(self._labelled_owner, self.daemon.network),
        )
        return self._forward("/events", stream_filter=events.feed)

    # --- containers ------------------------------------------------------------------

    async def _container_list(self, body: bytes) -> Decision:
        """Docker filters by the owner labels itself, one list per owner rule, and ds01
        keeps the caller's of what it lists. Docker's own filter is what keeps
        ``docker ps`` as fast at thousands of containers as at ten."""
        user, asked = self.caller.user, filters.docker_filters(one(self.query, "filters"))
        limit = _whole(one(self.query, "limit") or "0", "limit")

        async def candidates(label: str) -> tuple[int, Any]:
            wanted = {**asked, "label": [*asked.get("label", []), label]}
            query = {**self.query, "filters": [json.dumps(wanted)]}
            reply = await self.daemon.call("GET", self._target("/containers/json", query))
            return reply.status, reply.json()

        answers = await asyncio.gather(*map(candidates, filters.owner_queries(user)))
        for status, payload in answers:
            if status != 200:
                return Answer(status, payload)  # Docker's own refusal of the query
            if not isinstance(payload, list):
                return Answer(502, {"message": "the daemon's container list is not a list"})
        found = {c["Id"]: c for _, listed in answers for c in listed if isinstance(c, dict)}
        mine = [c for c in found.values() if filters.container_owner(c.get("Labels")) == user]
        mine.sort(key=lambda c: c.get("Created") or 0, reverse=True)  # Docker's order
        return Answer(200, mine[:limit] if limit > 0 else mine)

    async def _container(self, body: bytes) -> Decision:
        found = await self._own_container(self.match.params["container"])
        return self._forward(self._path(container=found["Id"]))

    async def _container_rename(self, body: bytes) -> Decision:
        await self._free_name(policy.admit_name(one(self.query, "name"), self.caller))
        return await self._container(body)

    async def _free_name(self, name: str) -> None:
        """A name a ds01 create holds is that create's: a container made under it
        meanwhile could be neither adopted nor held to the policies while it waits."""
        pending = self.gateway.create_pending
        if name and pending is not None and await pending(name.lstrip("/")):
            raise Refused(
                f"ds01 is creating a container named {name.lstrip('/')} (it may be waiting "
                "for a GPU): let that create finish or give it up, then try again"
            )

    async def _container_delete(self, body: bytes) -> Decision:
        if go_bool(one(self.query, "link")):  # removes a link name, which may be anyone's
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
        accounts = self.gateway.account_files
        labels = images.config_labels(found)
        name = made_as(labels)  # a ds01 create's, renamed since or not
        own_files = accounts.sources(name) if accounts and name else []
        for mount in found.get("Mounts") or []:
            source = mount.get("Source") or ""
            if mount.get("Type") != "bind":
                continue
            if source in own_files and mount.get("RW") is False:  # as ds01 binds them
                if not existing(source):
                    raise Refused(
                        f"{source} is gone: `ds01 container start` writes the container's "
                        "account files anew and starts it"
                    )
                continue
            if pins is not None and pins.owns(source):
                await asyncio.to_thread(pins.repin, source)  # after a reboot: walked afresh
                continue
            if not existing(source):
                raise Refused(f"{source} does not exist (any more); not starting")
            if not inside(source, self.caller.home):
                raise Refused(f"{source} now leads outside your home; not starting")
        slots = [] if made_by_gateway(labels) else labels.get(GPU_SLOTS_LABEL, "").split()
        seen = Seen.of(found)
        references = list(gpu_references(labels, seen.env, seen.device_ids))
        gpus = self.gateway.gpus
        if not slots and not references:
            return self._forward(self._path(container=found["Id"]))
        name = seen.name
        if gpus is None:
            raise Refused(f"{name} uses GPUs and ds01 cannot check them here; not starting")
        if slots:
            gone = await gpus.check(name, slots)
        else:  # adopted from DS01 or mlc: what it names must be allocated to it
            gone = await gpus.check_references(name, references)
        if gone:  # its environment still names the GPU: it would share it with the next
            raise Refused(
                f"{name} cannot start: {gone}. Its GPU is no longer its own; remove it and "
                "create it again (ds01 container remove, ds01 container run)"
            )

        async def started(status: int, data: bytes) -> tuple[int, bytes]:
            if status in (204, 304):  # running again: its GPU is no longer only held
                await gpus.started(name)
            return status, data

        return self._forward(self._path(container=found["Id"]), rewrite=started)

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
        await self._free_name(policy.admit_name(one(self.query, "name"), self.caller))
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
                return 403, message(
                    "Permission denied: Docker read the request differently from ds01 "
                    f"({'; '.join(wrong) or 'no container'}); nothing was created"
                )
            kept = True
            return status, data

        async def cleanup() -> None:
            """However the forward ended: volumes and pins made for a create that did not
            stand are removed, and the user's next create may go."""
            try:
                if not kept:
                    self._unpin(tokens)
                    await self._remove_volumes(made_volumes)
                elif self.gateway.pins is not None:
                    for token in tokens:
                        self.gateway.pins.done(token)
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
        resolved = Resolved(paths={path: existing(path) for path in named.paths})

        async def container(reference: str) -> None:
            found, _, owner = await self._container_found(reference)
            resolved.containers[reference] = Found(found["Id"], owner, name=found["Name"])

        async def network(reference: str) -> None:
            resolved.networks[reference] = await self._network_found(reference)

        async def volume(name: str) -> None:
            owner = await self._labelled_owner(self.daemon.volume, name)
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
                return 403, message(f"Permission denied: {'; '.join(wrong)}")
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


def _whole(text: str, name: str) -> int:
    """A query's integer, as Go's strconv.Atoi reads it (a sign, then digits)."""
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise BadRequest(f"{name} must be a whole number, not {text!r}")
    return int(text)
