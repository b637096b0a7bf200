"""Listings and event streams, cut down to what the caller owns.

Container, volume and network ids never change owner (the owner is a label fixed at
create), so an id's owner may be remembered; a name is always resolved afresh.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from ds01.ownership.gateway.images import OWNER_LABEL, Access, access, visible_tags
from ds01.ownership.gateway.strict import BadRequest
from ds01.ownership.owners import owner_of, user_exists

PREDEFINED_NETWORKS = frozenset({"none", "host", "bridge"})
OwnerOf = Callable[[str], Awaitable[str | None]]  # container id -> owner (None: unknown)


def _load(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def owner_queries(user: str) -> tuple[str, ...]:
    """Label filters that together match every container ``user`` may own (a superset:
    each owner rule of ``owner_of``, asked for apart, as Docker ANDs a filter's labels)."""
    return (f"{OWNER_LABEL}={user}", f"aime.mlc.USER={user}", "devcontainer.local_folder")


def docker_filters(text: str) -> dict[str, list[str]]:
    """A ``filters`` query value as Docker's filters.FromJSON reads it: an object of
    string lists, or the older object of objects of booleans (each key is a value, its
    boolean ignored). Anything else Docker refuses too."""
    if not text:
        return {}
    try:
        found = json.loads(text)
    except ValueError:
        raise BadRequest('filters is not JSON: send an object such as {"label": ["a=b"]}') from None
    if not isinstance(found, dict):
        raise BadRequest("filters must be a JSON object of lists")
    values = [v for v in found.values() if v is not None]
    if all(isinstance(v, list) and all(isinstance(i, str) for i in v) for v in values):
        return {k: list(v or []) for k, v in found.items()}
    if all(isinstance(v, dict) and all(isinstance(b, bool) for b in v.values()) for v in values):
        return {k: list(v or {}) for k, v in found.items()}
    raise BadRequest("filters must map each key to a list of strings")


def container_owner(labels: dict[str, str] | None) -> str:
    return owner_of("", "", labels or {}).owner


def images(body: bytes, user: str) -> bytes:
    """Shared base images and the caller's own; other users' tags never show."""
    listed = _load(body)
    if not isinstance(listed, list):
        return b"[]"
    kept = []
    for image in listed:
        tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]
        labels = image.get("Labels") or {}
        if access(user, tags, labels, user_exists, Access.PRIVATE) is Access.PRIVATE:
            continue
        kept.append(_own_names(image, user))
    return json.dumps(kept).encode()


def image(body: bytes, user: str) -> bytes:
    """An image's inspect, without the names other users gave it."""
    found = _load(body)
    return json.dumps(_own_names(found, user)).encode() if isinstance(found, dict) else body


def _own_names(image: dict[str, Any], user: str) -> dict[str, Any]:
    for key in ("RepoTags", "RepoDigests"):
        if isinstance(image.get(key), list):
            image[key] = visible_tags(user, image[key], user_exists)
    return image


def volumes(body: bytes, user: str) -> bytes:
    found = _load(body)
    if not isinstance(found, dict):
        return b'{"Volumes":[],"Warnings":null}'
    found["Volumes"] = [
        v for v in found.get("Volumes") or [] if (v.get("Labels") or {}).get(OWNER_LABEL) == user
    ]
    return json.dumps(found).encode()


async def networks(body: bytes, user: str, owner: OwnerOf) -> bytes:
    """The caller's networks and the predefined ones, each listing only the caller's
    containers."""
    found = _load(body)
    single = isinstance(found, dict)
    kept = []
    for network in [found] if single else found if isinstance(found, list) else []:
        if not network_visible(network, user):
            continue
        members = network.get("Containers")
        if isinstance(members, dict):
            network["Containers"] = {
                cid: info for cid, info in members.items() if await owner(cid) == user
            }
        kept.append(network)
    if single:
        return json.dumps(kept[0] if kept else {}).encode()
    return json.dumps(kept).encode()


def network_visible(network: dict[str, Any], user: str) -> bool:
    owner = (network.get("Labels") or {}).get(OWNER_LABEL)
    return owner == user or (owner is None and network.get("Name") in PREDEFINED_NETWORKS)


class EventFilter:
    """One event stream's filter: keeps the caller's containers, images, volumes and
    networks, drops every other event type."""

    def __init__(
        self,
        user: str,
        volume_owner: Callable[[str], Awaitable[str | None]],
        network_owner: Callable[[str], Awaitable[str | None]],
    ) -> None:
        self.user = user
        self.volume_owner = volume_owner
        self.network_owner = network_owner
        self.known: dict[tuple[str, str], str] = {}  # (type, id) -> owner, ids only
        self.pending = b""

    async def feed(self, data: bytes) -> bytes:
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        kept = [line + b"\n" for line in lines if line.strip() and await self._keep(line)]
        return b"".join(kept)

    async def _keep(self, line: bytes) -> bool:
        event = _load(line)
        if not isinstance(event, dict):
            return False
        kind = event.get("Type")
        actor = event.get("Actor") or {}
        actor_id, attributes = str(actor.get("ID") or ""), actor.get("Attributes") or {}
        if kind == "container":
            return container_owner(attributes) == self.user
        if kind == "image":
            name = str(attributes.get("name") or actor_id)
            tags = [name] if ":" in name and not name.startswith("sha256:") else []
            return access(self.user, tags, attributes, user_exists) is Access.OWN
        if kind in ("volume", "network"):
            return await self._owner(kind, actor_id) == self.user
        return False

    async def _owner(self, kind: str, actor_id: str) -> str | None:
        key = (kind, actor_id)
        if key not in self.known:
            lookup = self.volume_owner if kind == "volume" else self.network_owner
            owner = await lookup(actor_id)
            if owner is None:
                return None  # gone before we asked, and never seen: not shown
            self.known[key] = owner
        return self.known[key]
