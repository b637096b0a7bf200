"""The lean etcd watch the allocators' view follows: every write in its ranges after its
start revision, each transaction's together, and a clear end where etcd ends it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aetcd
import grpc
import pytest
import pytest_asyncio
from aetcd.utils import prefix_range_end

from ds01.allocator.etcd_state import EtcdState, UserLock
from ds01.allocator.events import watch_allocations
from ds01.containers.events import watch_lifecycle
from ds01.core.etcd import etcd_client, etcd_status
from ds01.core.pki import Pki
from ds01.core.watch import DELETE, PUT, Compacted, WatchEnded, watching


@pytest_asyncio.fixture(loop_scope="session")
async def etcd(etcd_endpoint: str, pki: Pki) -> AsyncIterator[aetcd.Client]:
    client = etcd_client((etcd_endpoint,), pki.etcd, "admin")
    yield client
    await client.close()


def _ranges(base: str, *prefixes: str) -> list[tuple[bytes, bytes]]:
    return [((base + p).encode(), prefix_range_end((base + p).encode())) for p in prefixes]


async def _next(stream: AsyncIterator[Sequence[Any]], base: str) -> list[tuple[int, str, bytes]]:
    """The stream's next message: each event's type, key below ``base`` and value."""
    events = await asyncio.wait_for(anext(stream), 10)
    return [(e.type, e.kv.key.decode().removeprefix(base), e.kv.value) for e in events]


async def test_a_transactions_writes_in_a_range_arrive_together_and_nothing_else_does(
    etcd: aetcd.Client,
):
    base = f"/test/watch/{uuid.uuid4().hex}/"
    tx = etcd.transactions
    start = (await etcd.put(f"{base}a/0".encode(), b"before")).header.revision
    await etcd.put(f"{base}b/0".encode(), b"unwatched")
    await etcd.put(f"{base}c/0".encode(), b"early")  # after the start: replayed
    async with watching(etcd, _ranges(base, "a/", "c/"), start + 1) as stream:
        assert await _next(stream, base) == [(PUT, "c/0", b"early")]
        await etcd.transaction(
            compare=[],
            success=[tx.put(f"{base}a/1".encode(), b"x"), tx.put(f"{base}b/1".encode(), b"y"),
                     tx.delete(f"{base}a/0".encode()), tx.put(f"{base}a/2".encode(), b"z")],
            failure=[],
        )  # fmt: skip
        assert await _next(stream, base) == [
            (PUT, "a/1", b"x"),
            (DELETE, "a/0", b""),
            (PUT, "a/2", b"z"),
        ]
        await etcd.put(f"{base}b/2".encode(), b"unwatched")
        await etcd.delete(f"{base}c/0".encode())
        assert await _next(stream, base) == [(DELETE, "c/0", b"")]


async def test_a_watch_with_previous_values_tells_what_each_write_replaced(etcd: aetcd.Client):
    """What the allocation event stream reads a preemption, a hold or a release from."""
    base = f"/test/watch/{uuid.uuid4().hex}/"
    key = f"{base}a/0".encode()
    start = (await etcd.put(key, b"first")).header.revision
    async with watching(etcd, _ranges(base, "a/"), start + 1, prev_kv=True) as stream:
        await etcd.put(key, b"second")
        await etcd.delete(key)
        await etcd.put(key, b"again")
        seen = []
        while len(seen) < 3:
            seen += await asyncio.wait_for(anext(stream), 10)
    assert [(e.type, e.kv.value, e.prev_kv.value, e.HasField("prev_kv")) for e in seen] == [
        (PUT, b"second", b"first", True),
        (DELETE, b"", b"second", True),
        (PUT, b"again", b"", False),  # nothing before it
    ]


async def test_a_watch_from_compacted_history_ends_saying_so(etcd: aetcd.Client):
    base = f"/test/watch/{uuid.uuid4().hex}/"
    first = (await etcd.put(f"{base}a/0".encode(), b"x")).header.revision
    current = (await etcd.put(f"{base}a/1".encode(), b"y")).header.revision
    await etcd.compact(current)
    with pytest.raises(Compacted, match="compacted") as ended:
        async with watching(etcd, _ranges(base, "a/"), first) as stream:
            await _next(stream, base)
    assert ended.value.revision == current  # where etcd's history now begins


async def test_a_watch_whose_connection_goes_ends_at_once(etcd_endpoint: str, pki: Pki):
    client = etcd_client((etcd_endpoint,), pki.etcd, "admin")
    base = f"/test/watch/{uuid.uuid4().hex}/"
    revision = (await client.put(f"{base}a/0".encode(), b"x")).header.revision
    try:
        async with watching(client, _ranges(base, "a/"), revision + 1) as stream:
            reading = asyncio.ensure_future(anext(stream))
            await asyncio.sleep(0.1)
            await client.close()  # the channel goes, as with an etcd that went away
            with pytest.raises(WatchEnded, match="channel closed"):  # not a CancelledError
                await asyncio.wait_for(reading, 10)
    finally:
        await client.close()


@pytest.mark.parametrize(
    "unlocked",
    ["later", "before the wait", "never", "only rewritten", "before a compaction",
     "later, after a compaction"],
)  # fmt: skip
async def test_a_request_waiting_for_a_users_lock_wakes_when_it_goes_and_not_before(
    etcd: aetcd.Client, unlocked: str
):
    """Another request of the user holds the lock: the wait ends once etcd deletes the
    key (however long before the wait began, and whatever history etcd still keeps),
    else at its timeout; never an error."""
    key = f"/test/watch/{uuid.uuid4().hex}/lock".encode()
    taken = (await etcd.put(key, b"other")).header.revision
    lock = UserLock(key, b"mine", None, taken)
    if unlocked == "before the wait":
        await etcd.delete(key)
    if unlocked == "before a compaction":
        await etcd.delete(key)
    if "compaction" in unlocked:  # history no longer reaches the revision it was taken at
        await etcd.compact((await etcd.put(key + b"/next", b"x")).header.revision)

    async def change_soon() -> None:
        await asyncio.sleep(0.3)
        if unlocked.startswith("later"):
            await etcd.delete(key)
        elif unlocked == "only rewritten":  # a put is no unlock
            await etcd.put(key, b"renewed")

    changing = asyncio.ensure_future(change_soon())
    start = time.monotonic()
    await EtcdState(etcd).wait_unlocked(lock, timeout=1.5)
    waited = time.monotonic() - start
    await changing
    if unlocked.startswith("later"):
        assert 0.25 < waited < 1.0
    elif unlocked in ("never", "only rewritten"):
        assert 1.4 < waited < 2.5
    else:
        assert waited < 0.25


@pytest.mark.parametrize("follower", [watch_lifecycle, watch_allocations])
async def test_an_event_stream_whose_etcd_goes_ends_as_etcd_away(
    etcd_endpoint: str, pki: Pki, follower: Any
):
    """What ends a WatchContainerEvents or WatchAllocations stream when etcd goes: a
    failure the server answers UNAVAILABLE (resume from the last revision), never a
    CancelledError or an error of its own."""
    client = etcd_client((etcd_endpoint,), pki.etcd, "admin")
    events = follower(client)
    try:
        reading = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.2)
        await client.close()  # the channel goes, as with an etcd that went away
        with pytest.raises(Exception) as ended:
            await asyncio.wait_for(reading, 10)
        assert etcd_status(ended.value)[0] == grpc.StatusCode.UNAVAILABLE, ended.value
    finally:
        await events.aclose()
        await client.close()
