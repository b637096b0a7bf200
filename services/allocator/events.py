"""The allocation event stream: an etcd watch on the holder keys, told in words.

Every event carries the etcd revision it happened at, so a client that reconnects
with the last revision it saw receives everything after it, or learns clearly that
etcd compacted that history away.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd

from ds01.allocator.records import ALLOC, HOLDERS, RELEASED, Holder, ReleaseMark, split_slot_key
from ds01.core.watch import DELETE, PUT, Compacted, under, watching

T = TypeVar("T")


class EventKind(enum.Enum):
    ALLOCATED = "allocated"
    RELEASED = "released"
    HELD = "held"
    HOLD_CLEARED = "hold_cleared"
    HOLD_EXPIRED = "hold_expired"
    PREEMPTED = "preempted"


@dataclass(frozen=True, eq=False)
class AllocationEvent:
    """One change to a slot's holder. Each is made once per process and shared by every
    stream, so it is known by identity: hashing it (to find its message) costs nothing."""

    kind: EventKind
    node: str
    slot_id: str
    holder: Holder  # the new holder, or the last one for releases and expiries
    revision: int
    previous: Holder | None = None  # the displaced holder of a preemption
    released_by: str = ""
    released_at: float = 0.0  # for a release: when, as its mark says

    @property
    def time(self) -> float:
        """When it happened, as the records say; now if they do not say (a hold cleared,
        an expiry noticed, a release marked before its time was kept)."""
        moments = {
            EventKind.ALLOCATED: self.holder.since,
            EventKind.PREEMPTED: self.holder.since,
            EventKind.HELD: self.holder.stopped_at,
            EventKind.HOLD_EXPIRED: self.holder.hold_until,
            EventKind.RELEASED: self.released_at,
        }
        return moments.get(self.kind) or time.time()

    @property
    def users(self) -> set[str]:
        """Whose business the event is: the holder, and a displaced holder."""
        return {self.holder.user} | ({self.previous.user} if self.previous else set())


class HistoryCompacted(Exception):
    def __init__(self, compact_revision: int) -> None:
        self.revision = compact_revision
        super().__init__(
            f"etcd has compacted the history before revision {compact_revision}; "
            "read the current state (GetStatus) and watch again from its revision"
        )
        self.compact_revision = compact_revision


_NOBODY = Holder(user="", container="", since=0, priority=0)


class EventTranslator:
    """Turns raw etcd events into allocation events.

    A release writes a mark beside the holder key in the same transaction, just
    before deleting it; a holder key deleted without a mark was a hold whose lease
    etcd expired.
    """

    def __init__(self) -> None:
        self._marks: dict[tuple[str, str], tuple[int, ReleaseMark]] = {}

    def translate(self, event: Any) -> AllocationEvent | None:
        """``event``: etcd's ``mvccpb.Event``, with the value before it (see watching())."""
        key = event.kv.key.decode()
        revision = event.kv.mod_revision
        if key.startswith(RELEASED):
            if event.type == PUT:
                slot = split_slot_key(RELEASED, event.kv.key)
                self._marks[slot] = (revision, ReleaseMark.decode(event.kv.value))
            return None
        node, slot_id = split_slot_key(HOLDERS, event.kv.key)
        previous = (
            Holder.of(event.prev_kv) if event.HasField("prev_kv") and event.prev_kv.value else None
        )
        if event.type == DELETE:
            mark = self._marks.pop((node, slot_id), None)
            holder = previous or _NOBODY
            if mark is not None and mark[0] == revision:
                return AllocationEvent(
                    EventKind.RELEASED, node, slot_id, holder, revision,
                    released_by=mark[1].by, released_at=mark[1].at,
                )  # fmt: skip
            kind = EventKind.HOLD_EXPIRED if holder.stopped else EventKind.RELEASED
            return AllocationEvent(kind, node, slot_id, holder, revision)
        holder = Holder.of(event.kv)
        if previous is None:
            return AllocationEvent(EventKind.ALLOCATED, node, slot_id, holder, revision)
        if previous.container != holder.container:
            return AllocationEvent(
                EventKind.PREEMPTED, node, slot_id, holder, revision, previous=previous
            )
        if holder.stopped and not previous.stopped:
            return AllocationEvent(EventKind.HELD, node, slot_id, holder, revision)
        if previous.stopped and not holder.stopped:
            return AllocationEvent(EventKind.HOLD_CLEARED, node, slot_id, holder, revision)
        return None


async def watch_allocations(
    client: aetcd.Client, since_revision: int = 0
) -> AsyncIterator[AllocationEvent]:
    """Events after ``since_revision`` (0: from now on), in revision order, forever."""
    async for batch in allocation_batches(client, since_revision):
        for event in batch:
            yield event


async def allocation_batches(
    client: aetcd.Client, since_revision: int = 0, ready: asyncio.Future[None] | None = None
) -> AsyncIterator[list[AllocationEvent]]:
    """The events of each message etcd sends (one or more whole revisions: a watch that
    catches up gets up to a thousand at once), as ``watch_allocations``. ``ready`` is
    resolved once etcd has the watch: nothing after that is missed."""
    start = since_revision + 1 if since_revision > 0 else 0
    translator = EventTranslator()
    try:
        async with watching(client, [under(ALLOC.encode())], start, prev_kv=True) as stream:
            if ready is not None and not ready.done():
                ready.set_result(None)
            async for events in stream:
                batch = [e for e in map(translator.translate, events) if e is not None]
                if batch:
                    yield batch
    except Compacted as err:
        raise HistoryCompacted(err.revision) from err


async def from_oldest_kept(
    watch: Callable[[int], AsyncIterator[T]], since_revision: int
) -> AsyncIterator[T]:
    """``watch(since_revision)``; revision 1 asks for the oldest history etcd keeps, so a
    compacted history begins where etcd's does instead of failing."""
    try:
        async for event in watch(since_revision):
            yield event
    except HistoryCompacted as err:
        if since_revision > 1:
            raise
        async for event in watch(err.revision - 1):
            yield event


@dataclass(frozen=True)
class Overflow:
    """A subscriber fell too far behind; it can resume after ``revision``."""

    revision: int


class Subscription:
    """What one live stream has yet to send, in order, and how it ended.

    The hub appends without waiting; the stream takes. A stream that has nothing to send
    waits on a future of its own, woken once per batch of events however many it brings:
    a thousand of these cost the hub a thousand appends per event, and little more.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: collections.deque[AllocationEvent] = collections.deque()
        self._last: Overflow | Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def get(self) -> AllocationEvent | Overflow | Exception:
        """The next event; once the stream is ended, why, every time it is asked."""
        while not self._pending and self._last is None:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._pending.popleft() if self._pending else self._last  # type: ignore[return-value]

    def offer(self, batch: list[AllocationEvent], most: int) -> bool:
        """Add one message's events, or end the stream if ``most`` from earlier ones are
        still waiting (a message larger than that cuts off no stream that keeps up);
        False once it is ended."""
        if self._last is not None:
            return False
        if len(self._pending) >= most:
            # Resume just before the oldest event it has not received.
            self.end(Overflow(self._pending[0].revision - 1))
            return False
        self._pending.extend(batch)
        self._wake()
        return True

    def end(self, last: Overflow | Exception) -> None:
        """Make ``last`` the only thing left to take."""
        self._pending.clear()
        self._last = last
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class EventHub:
    """One etcd watch per process, shared by every live WatchAllocations stream.

    Translating each event once instead of once per watcher keeps delivery to many
    watchers fast. A subscriber that falls more than QUEUE events behind (not counting
    the message being handed out) is cut off with the revision to resume from, instead
    of holding the others back.
    """

    QUEUE = 1024

    def __init__(self, client: aetcd.Client) -> None:
        self.client = client
        self._subscribers: set[Subscription] = set()
        self._pump: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None  # resolved once etcd has the watch

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        """Every event from the moment this returns: etcd has the watch by then (or the
        subscription holds why it could not)."""
        subscription = Subscription(asyncio.get_running_loop())
        self._subscribers.add(subscription)
        if self._pump is None or self._pump.done():
            self._ready = asyncio.get_running_loop().create_future()
            self._pump = asyncio.create_task(self._run(self._ready), name="allocation-events")
        ready = self._ready
        try:
            if ready is not None:  # shared: one subscriber leaving cancels no other's
                await asyncio.shield(ready)
            yield subscription
        finally:
            self._subscribers.discard(subscription)
            if not self._subscribers and self._pump is not None:
                self._pump.cancel()
                self._pump = None

    async def _run(self, ready: asyncio.Future[None]) -> None:
        try:
            async for batch in allocation_batches(self.client, ready=ready):
                ended = [s for s in self._subscribers if not s.offer(batch, self.QUEUE)]
                self._subscribers.difference_update(ended)
        except Exception as err:  # etcd went away: every subscriber learns it
            for subscription in self._subscribers:
                subscription.end(err)
            self._subscribers.clear()
        finally:
            if not ready.done():  # no watch: the subscriptions say why
                ready.set_result(None)
