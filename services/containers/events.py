"""Container lifecycle events, published in etcd beside the allocation events.

Each event is one key under ``/ds01/v1/lifecycle/``, written with a lease that keeps it
for ``RETENTION``. A watcher resumes from the etcd revision of the last event it saw,
as with allocation events: a replay from etcd's history, then live. Publishing never
fails the action it reports: an event etcd did not take is logged and counted anyway.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import aetcd

from ds01.allocator.events import HistoryCompacted
from ds01.containers.adapters import Metadata
from ds01.core.leases import RollingLease
from ds01.core.records import JsonRecord
from ds01.core.watch import PUT, Compacted, under, watching

log = logging.getLogger(__name__)

LIFECYCLE = "/ds01/v1/lifecycle/"
RETENTION = 7 * 86400  # seconds an event stays readable


class Kind(enum.StrEnum):
    CREATED = "created"
    STARTED = "started"
    STOPPED = "stopped"
    IDLE_WARNING = "idle_warning"
    IDLE_STOP = "idle_stop"
    RUNTIME_EXCEEDED = "runtime_exceeded"
    REMOVED = "removed"
    ADOPTED = "adopted"


@dataclass(frozen=True)
class LifecycleEvent(JsonRecord):
    kind: str
    node: str
    name: str  # as its user names it
    docker_name: str
    user: str
    time: float  # epoch seconds
    detail: str = ""  # who or what did it, and why: "by alice", "idle for 3600s"
    revision: int = 0  # etcd's, filled in when read


def event_key(event: LifecycleEvent, sequence: int) -> bytes:
    return f"{LIFECYCLE}{event.node}/{int(event.time * 1e9):020d}-{sequence}".encode()


@dataclass
class LifecycleEvents:
    """Publishes one node's events and counts them (the ``ds01_lifecycle_events`` metric)."""

    client: aetcd.Client | None
    node: str
    counts: Counter[str] = field(default_factory=Counter)
    _sequence: itertools.count[int] = field(default_factory=itertools.count)
    _lease: RollingLease = field(default_factory=lambda: RollingLease(RETENTION))

    async def publish(self, kind: Kind, record: Metadata, detail: str = "") -> None:
        self.counts[kind.value] += 1
        event = LifecycleEvent(kind.value, self.node, record.name, record.docker_name,
                               record.user, time.time(), detail)  # fmt: skip
        log.info("%s %s (%s)%s", kind.value, record.docker_name, record.user,
                 f": {detail}" if detail else "")  # fmt: skip
        if self.client is None:
            return
        try:
            await self._lease.put(self.client, event_key(event, next(self._sequence)),
                                  event.encode())  # fmt: skip
        except Exception as err:  # the action happened; only its event is missing
            log.warning("lifecycle event %s of %s not published: %s", kind.value,
                        record.docker_name, err)  # fmt: skip


async def watch_lifecycle(
    client: aetcd.Client, since_revision: int = 0
) -> AsyncIterator[LifecycleEvent]:
    """Events after ``since_revision`` (0: from now on), in revision order, forever."""
    start = since_revision + 1 if since_revision > 0 else 0
    try:
        async with watching(client, [under(LIFECYCLE.encode())], start) as stream:
            async for events in stream:
                for raw in events:
                    if raw.type == PUT:
                        found = LifecycleEvent.decode(raw.kv.value)
                        yield replace(found, revision=raw.kv.mod_revision)
    except Compacted as err:
        raise HistoryCompacted(err.revision) from err
