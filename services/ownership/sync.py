"""The container -> owner map in etcd, kept from Docker's event stream.

A full resync runs at start and each time the event stream is re-opened (a dockerd
restart), then every create, rename and destroy updates one key: ownership is known as
soon as Docker announces the container, with no polling.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aetcd

from ds01.containers.adapters import DockerHost
from ds01.ownership.owners import Ownership, owner_of

log = logging.getLogger(__name__)

OWNERS = "/ds01/v1/owners/"
RESYNC_RETRY = 2.0  # seconds before a failed update is made good by a resync


class OwnerStore:
    def __init__(self, client: aetcd.Client, node: str) -> None:
        self.client = client
        self.prefix = f"{OWNERS}{node}/"

    async def put(self, ownership: Ownership) -> None:
        await self.client.put(f"{self.prefix}{ownership.container_id}".encode(), ownership.encode())

    async def delete(self, container_id: str) -> None:
        await self.client.delete(f"{self.prefix}{container_id}".encode())

    async def all(self) -> list[Ownership]:
        found = await self.client.get_prefix(self.prefix.encode())
        return [Ownership.decode(kv.value) for kv in found]


class OwnershipSync:
    def __init__(
        self,
        docker: DockerHost,
        store: OwnerStore,
        on_destroy: Callable[[dict[str, str]], Awaitable[None]] | None = None,
    ) -> None:
        self.on_destroy = on_destroy  # told a removed container's labels
        self.docker = docker
        self.store = store
        self.resyncs = 0
        # In memory too: a lookup by id or name costs a dict read, however many
        # containers the node has.
        self.known: dict[str, Ownership] = {}  # container id -> ownership
        self._names: dict[str, str] = {}  # container name -> id

    def lookup(self, reference: str) -> Ownership | None:
        """As Docker resolves a reference: full id, name (with or without '/'), then a
        unique id prefix. None if not known (yet)."""
        if reference in self.known:
            return self.known[reference]
        named = self._names.get(reference.removeprefix("/"))
        if named is not None:
            return self.known[named]
        matches = [o for i, o in self.known.items() if reference and i.startswith(reference)]
        return matches[0] if len(matches) == 1 else None

    def _remember(self, ownership: Ownership) -> None:
        previous = self.known.get(ownership.container_id)
        if previous is not None:
            self._forget_name(previous)
        self.known[ownership.container_id] = ownership
        self._names[ownership.name] = ownership.container_id

    def _forget(self, container_id: str) -> None:
        previous = self.known.pop(container_id, None)
        if previous is not None:
            self._forget_name(previous)

    def _forget_name(self, ownership: Ownership) -> None:
        if self._names.get(ownership.name) == ownership.container_id:
            del self._names[ownership.name]

    async def resync(self) -> None:
        """Docker's containers into memory (GetOwner answers from then on), then into
        etcd."""
        containers = await self.docker.run(
            lambda: self.docker.client.containers.list(all=True, sparse=True)
        )
        current = {
            c.id: owner_of(c.id, _name(c.attrs), c.attrs.get("Labels") or {}) for c in containers
        }
        self.known, self._names = {}, {}
        for ownership in current.values():
            self._remember(ownership)
        self.resyncs += 1
        for ownership in await self.store.all():
            if ownership.container_id not in current:
                await self.store.delete(ownership.container_id)
        for ownership in current.values():
            await self.store.put(ownership)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        threading.Thread(target=self._pump, args=(loop, events), daemon=True).start()
        retry_due = False  # one retry at a time, however many updates failed
        while True:
            event = await events.get()
            try:
                if event is None:  # the stream (re)opened, or a retry: from the truth
                    retry_due = False
                    await self.resync()
                else:
                    await self._apply(event)
            except Exception:  # Docker or etcd away: from the truth again, until it works
                log.exception("ownership update failed; resyncing in %.0f s", RESYNC_RETRY)
                if not retry_due:
                    retry_due = True
                    loop.call_later(RESYNC_RETRY, events.put_nowait, None)

    async def _apply(self, event: dict[str, Any]) -> None:
        action = event.get("Action", "")
        actor = event.get("Actor", {})
        container_id = actor.get("ID") or event.get("id", "")
        attributes = actor.get("Attributes", {})
        if action == "destroy":
            self._forget(container_id)
            await self.store.delete(container_id)
            if self.on_destroy is not None:
                await self.on_destroy(attributes)
        elif action == "create" or action.startswith("rename"):
            labels = {k: v for k, v in attributes.items() if k not in ("name", "image", "oldName")}
            ownership = owner_of(container_id, attributes.get("name", ""), labels)
            self._remember(ownership)
            await self.store.put(ownership)

    def _pump(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Any]) -> None:
        while not loop.is_closed():
            try:
                stream = self.docker.client.events(
                    decode=True, since=int(time.time()), filters={"type": "container"}
                )
                loop.call_soon_threadsafe(events.put_nowait, None)
                for event in stream:
                    if event.get("Action") in ("create", "destroy") or str(
                        event.get("Action", "")
                    ).startswith("rename"):
                        loop.call_soon_threadsafe(events.put_nowait, event)
            except Exception as err:
                log.info("Docker event stream interrupted (%s); reconnecting", err)
            time.sleep(0.5)


def _name(attrs: dict[str, Any]) -> str:
    names = attrs.get("Names") or [attrs.get("Name", "")]
    return (names[0] or "").lstrip("/")
