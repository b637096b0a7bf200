"""One etcd watch stream over several key ranges, its events handed over as etcd sent
them.

aetcd's watcher wraps every event in objects of its own and passes each through a
coroutine and a queue. The allocators' view and their event stream, which follow every
claim and release, paid that for each of them, in every allocator. Here a message's events are
handed over together, as the protobuf ``mvccpb.Event`` etcd sent (``type``, ``kv.key``,
``kv.value``, ``kv.mod_revision``, ``kv.lease``), and the stream is one gRPC call that
ends with its context: nothing is left to cancel on an etcd that went away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import aetcd
import grpc
from aetcd import exceptions, rpc
from aetcd.utils import prefix_range_end

PUT, DELETE = rpc.Event.PUT, rpc.Event.DELETE
# As etcd's own client asks: a member cut off from the others' quorum ends the watch
# ("no leader") instead of keeping it open, answering pings, with no events to send.
_HAS_LEADER = ("hasleader", "true")


class WatchEnded(exceptions.ClientError):
    """etcd ended the stream or one of its watches (a compacted start revision, a
    member that went away): what follows it must be read afresh. An etcd failure like
    the others: a call it ends answers UNAVAILABLE (see ``etcd_status``)."""


class Compacted(WatchEnded):
    """The start revision is older than the history etcd keeps, which now begins at
    ``revision``."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"etcd ended a watch: compacted at revision {revision}")
        self.revision = revision


def under(prefix: bytes) -> tuple[bytes, bytes]:
    """The range of every key that begins with ``prefix``."""
    return prefix, prefix_range_end(prefix)


def only(key: bytes) -> tuple[bytes, bytes]:
    """The range of ``key`` alone (etcd reads an empty range end so)."""
    return key, b""


@contextlib.asynccontextmanager
async def watching(
    client: aetcd.Client,
    ranges: Sequence[tuple[bytes, bytes]],
    start_revision: int,
    prev_kv: bool = False,
) -> AsyncIterator[AsyncIterator[Sequence[Any]]]:
    """Watch each ``(first key, range end)`` from ``start_revision`` on (0: from now);
    entered once etcd has created every watch, so nothing written after
    ``start_revision`` is missed. The stream yields each message's events (one
    transaction's writes in a range arrive together), with each key's value before it
    where ``prev_kv``; it raises WatchEnded when etcd ends it (Compacted where its
    history no longer reaches ``start_revision``)."""
    await client.connect()
    call = rpc.WatchStub(client.channel).Watch(metadata=(*(client.metadata or ()), _HAS_LEADER))
    try:
        for first, end in ranges:
            create = rpc.WatchCreateRequest(
                key=first, range_end=end, start_revision=start_revision, prev_kv=prev_kv
            )
            with _ended_in_words():
                await call.write(rpc.WatchRequest(create_request=create))
        early: list[Sequence[Any]] = []  # a watch's events may come before the next is made
        created = 0
        while created < len(ranges):
            response = await _read(call)
            created += response.created
            if response.events:
                early.append(response.events)
        yield _events(call, early)
    finally:
        call.cancel()


async def _events(call: Any, early: list[Sequence[Any]]) -> AsyncIterator[Sequence[Any]]:
    for events in early:
        yield events
    while True:
        response = await _read(call)
        if response.events:  # else a progress notification
            yield response.events


async def _read(call: Any) -> Any:
    """The stream's next message; WatchEnded if etcd ended the stream or a watch."""
    with _ended_in_words():
        response = await call.read()
    if response is grpc.aio.EOF:
        raise WatchEnded("etcd ended the watch stream")
    if response.compact_revision:
        raise Compacted(response.compact_revision)
    if response.canceled:
        raise WatchEnded(f"etcd ended a watch: {response.cancel_reason or 'cancelled'}")
    return response


@contextlib.contextmanager
def _ended_in_words() -> Iterator[None]:
    """A failed read or write of the stream as aetcd's errors, or WatchEnded."""
    try:
        yield
    except grpc.aio.AioRpcError as err:
        exceptions._handle_exception(err)  # aetcd's errors, as its own calls raise them
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the reader is being cancelled
        # gRPC cancels the calls of a channel that closes, and says so with the
        # reader's own CancelledError: a follower would take it for its own end.
        raise WatchEnded("the watch stream's channel closed") from None
