"""The allocator over mTLS on a real etcd: claims, quotas, holds, events, priorities."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aetcd
import grpc
import pytest

from ds01.allocator.events import AllocationEvent, EventHub, EventKind, Overflow, Subscription
from ds01.allocator.records import HOLDERS, Holder, slot_key
from ds01.cli import events as events_cli
from ds01.client import Ds01Client, Ds01Error
from ds01.core.etcd import connect, etcd_client
from ds01.core.identity import STREAMS_PER_USER
from ds01.core.pki import Pki
from ds01.v1 import allocator_pb2, allocator_pb2_grpc, common_pb2, limits_pb2, limits_pb2_grpc
from tests.allocator_env import HOLD_SECONDS, AllocatorEnv, etcd_revision

EVENT = allocator_pb2.AllocationEventType


async def refused(call) -> Ds01Error:
    with pytest.raises(Ds01Error) as error:
        await call
    return error.value


def slots_of(status: allocator_pb2.GetStatusResponse) -> dict[str, common_pb2.Allocation]:
    return {a.slot.slot_id: a for a in status.allocations}


async def collect(stream, count: int, timeout: float = 10) -> list:
    events = []

    async def take() -> None:
        async for event in stream:
            events.append(event)
            if len(events) == count:
                return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(take(), timeout)
    return events


async def test_allocate_gives_a_mig_slice_with_its_uuid_and_environment(env: AllocatorEnv):
    async with env.client("alice") as alice:
        granted = await alice.allocate("proj._.alice")
        again = await alice.allocate("proj._.alice")  # a retry gets the same slot
    [allocation] = granted.allocations
    assert allocation.slot.slot_id == "2:1" and allocation.slot.uuid == "MIG-0002-1"
    assert allocation.slot.mig_profile == "2g.20gb"
    assert allocation.slot.gpu_equivalents == pytest.approx(2 / 7)
    assert granted.environment["CUDA_VISIBLE_DEVICES"] == "MIG-0002-1"
    assert granted.environment["NVIDIA_VISIBLE_DEVICES"] == "MIG-0002-1"
    assert [a.slot.slot_id for a in again.allocations] == ["2:1"]


async def test_full_gpus_for_researchers_and_a_clear_refusal_for_students(env: AllocatorEnv):
    async with env.client("rita") as rita, env.client("alice") as alice:
        granted = await rita.allocate("big._.rita", slots=2, preference=2)
        error = await refused(alice.allocate("big._.alice", preference=2))
    assert sorted(a.slot.slot_id for a in granted.allocations) == ["0", "1"]
    assert granted.environment["CUDA_VISIBLE_DEVICES"] == "GPU-0000,GPU-0001"
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.message == "full GPUs are not allowed for group students"


async def test_an_allocator_beside_the_limits_service_asks_it_without_a_call(
    env: AllocatorEnv, monkeypatch: pytest.MonkeyPatch
):
    """One ds01d with both services: each Allocate's limits come from the limits service
    in the process, not over gRPC (a round trip per user, and under load a queue), and
    hold as before: the group's refusals, the quota."""
    await env.stop("allocator", "limits")
    await env.start("limits", "allocator")  # one process, as `ds01d --services all`
    asked: list[object] = []
    over_grpc = Ds01Client.get_limits

    async def counted(self: Ds01Client, *args: object, **kwargs: object) -> object:
        asked.append(args)
        return await over_grpc(self, *args, **kwargs)

    monkeypatch.setattr(Ds01Client, "get_limits", counted)
    async with env.client("rita") as rita, env.client("alice") as alice:
        full = await refused(alice.allocate("big._.alice", preference=2))
        await rita.allocate("a._.rita", preference=2)
        await rita.allocate("b._.rita", preference=2)
        quota = await refused(rita.allocate("c._.rita"))
    assert full.message == "full GPUs are not allowed for group students"
    assert quota.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota.message.startswith("rita holds 2.0 of 2.0 GPU-equivalents")
    assert asked == []


async def test_quota_is_held_across_containers(env: AllocatorEnv):
    async with env.client("rita") as rita:
        await rita.allocate("a._.rita", preference=2)
        await rita.allocate("b._.rita", preference=2)
        error = await refused(rita.allocate("c._.rita"))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.message.startswith("rita holds 2.0 of 2.0 GPU-equivalents")


async def test_users_act_only_on_their_own_containers(env: AllocatorEnv):
    async with env.client("alice") as alice, env.client("bob") as bob:
        await alice.allocate("proj._.alice")
        for call in (
            bob.release("proj._.alice"),
            bob.mark_stopped("proj._.alice"),
            bob.allocate("proj._.alice", user="alice"),
            # Validate reads the node it names; another's container is refused on any:
            # its own node and slot, another slot, nodes where it holds nothing (one
            # unknown, others whose names begin alike).
            *(
                bob.validate("proj._.alice", slot, node=node)
                for node, slot in (
                    ("", "2:1"),
                    ("n1", "2:2"),
                    ("n2", "2:1"),
                    ("n", "2:1"),
                    ("n1x", "0"),
                    ("n10", "2:1"),
                )
            ),
        ):
            assert (await refused(call)).code == grpc.StatusCode.PERMISSION_DENIED
        theirs = slots_of(await bob.gpu_status())["2:1"]
        assert (theirs.user, theirs.container) == ("alice", "")  # who, but not what
    async with env.client("labadmin") as admin, env.service_client() as service:
        assert slots_of(await admin.gpu_status())["2:1"].container == "proj._.alice"
        assert await service.release("proj._.alice") == ["n1/2:1"]


async def test_release_frees_at_once_and_validate_notices(env: AllocatorEnv):
    async with env.client("alice") as alice, env.client("bob") as bob:
        await alice.allocate("proj._.alice")
        assert (await alice.validate("proj._.alice", "2:1")).valid
        bogus = await alice.validate("proj._.alice", "2:9")
        assert not bogus.valid and bogus.reason == "slot 2:9 no longer exists on node n1"
        await alice.release("proj._.alice")
        gone = await alice.validate("proj._.alice", "2:1")
        assert not gone.valid and "no longer allocated to proj._.alice" in gone.reason
        assert (await bob.allocate("x._.bob")).allocations[0].slot.slot_id == "2:1"
        missing = await refused(alice.release("proj._.alice"))
    assert missing.code == grpc.StatusCode.NOT_FOUND


async def test_a_hold_keeps_the_slot_then_expires_on_time(env: AllocatorEnv):
    async with env.client("alice") as alice, env.client("bob") as bob:
        await alice.allocate("proj._.alice")
        [held] = await alice.mark_stopped("proj._.alice")
        assert held.state == common_pb2.SLOT_STATE_HELD
        assert held.hold_until.ToSeconds() - held.stopped_at.ToSeconds() == HOLD_SECONDS
        # Nothing else is free for bob on MIG 2:1 while it is held: he gets 2:2.
        assert (await bob.allocate("x._.bob")).allocations[0].slot.slot_id == "2:2"
        await asyncio.sleep(HOLD_SECONDS + 1.5)
        assert slots_of(await alice.gpu_status())["2:1"].state == common_pb2.SLOT_STATE_FREE
        expired = await alice.validate("proj._.alice", "2:1")
        assert not expired.valid


async def test_clear_stopped_cancels_the_hold(env: AllocatorEnv):
    async with env.client("alice") as alice:
        await alice.allocate("proj._.alice")
        await alice.mark_stopped("proj._.alice")
        [running] = await alice.clear_stopped("proj._.alice")
        assert running.state == common_pb2.SLOT_STATE_ALLOCATED
        await asyncio.sleep(HOLD_SECONDS + 1.5)
        assert (await alice.validate("proj._.alice", "2:1")).valid


async def test_a_watcher_that_resumes_from_its_last_revision_misses_nothing(env: AllocatorEnv):
    async with env.client("labadmin") as admin, env.client("alice") as alice:
        stream = admin.watch_allocations()
        first_events = asyncio.ensure_future(collect(stream, 2))
        await asyncio.sleep(0.3)
        await alice.allocate("one._.alice")
        await alice.mark_stopped("one._.alice")
        seen = await first_events
        await stream.aclose()  # the watcher goes away...
        assert [e.type for e in seen] == [
            EVENT.ALLOCATION_EVENT_TYPE_ALLOCATED,
            EVENT.ALLOCATION_EVENT_TYPE_HELD,
        ]
        await alice.clear_stopped("one._.alice")  # ...and misses these
        await alice.release("one._.alice")
        await alice.allocate("two._.alice")
        resumed = await collect(admin.watch_allocations(since_revision=seen[-1].revision), 3)
    assert [(e.type, e.allocation.container) for e in resumed] == [
        (EVENT.ALLOCATION_EVENT_TYPE_HOLD_CLEARED, "one._.alice"),
        (EVENT.ALLOCATION_EVENT_TYPE_RELEASED, "one._.alice"),
        (EVENT.ALLOCATION_EVENT_TYPE_ALLOCATED, "two._.alice"),
    ]
    assert resumed[1].released_by == "alice"
    assert [e.revision for e in resumed] == sorted(e.revision for e in resumed)


async def test_a_live_watch_says_it_is_live_before_any_event(env: AllocatorEnv):
    """A monitor can wait for the stream's headers instead of sleeping and hoping: they
    come as soon as the watch is registered, and nothing allocated after them is missed."""
    async with env.client("labadmin") as admin, env.client("alice") as alice:
        for attempt in range(10):  # each opens the only stream: a new etcd watch
            stub = allocator_pb2_grpc.AllocatorServiceStub(admin.channel("allocator"))
            call = stub.WatchAllocations(allocator_pb2.WatchAllocationsRequest())
            await asyncio.wait_for(call.initial_metadata(), 5)  # no event has happened
            await alice.allocate(f"live{attempt}._.alice")  # at once: no sleep
            event = await asyncio.wait_for(call.read(), 5)
            call.cancel()
            assert (event.type, event.allocation.container) == (
                EVENT.ALLOCATION_EVENT_TYPE_ALLOCATED,
                f"live{attempt}._.alice",
            )
            await alice.release(f"live{attempt}._.alice")


async def test_a_subscription_misses_nothing_committed_after_it_returns(env: AllocatorEnv):
    """What the live stream's headers promise rests on this: once subscribe() returns,
    etcd has the hub's watch, so a write committed right after is in the queue."""
    watcher, writer = connect(env.config, "allocator"), connect(env.config, "allocator")
    hub = EventHub(watcher)
    holder = Holder("alice", "early._.alice", 1.0, 10)
    try:
        for attempt in range(10):  # each subscribes alone: a new watch each time
            key = slot_key(HOLDERS, "hub-node", f"9:{attempt}")
            async with hub.subscribe() as events:
                await writer.put(key, holder.encode())  # at once: no sleep
                event = await asyncio.wait_for(events.get(), 5)
            assert (event.kind, event.slot_id) == (EventKind.ALLOCATED, f"9:{attempt}")
            await writer.delete(key)
    finally:
        await watcher.close()
        await writer.close()


@dataclass
class SmallHub:
    """An event hub that cuts a stream off once 3 events wait for it, a writer, and five
    slots' keys for one holder to take."""

    hub: EventHub
    writer: aetcd.Client
    holder: Holder
    keys: list[bytes]


@contextlib.asynccontextmanager
async def small_hub(env: AllocatorEnv, gpu: int, container: str) -> AsyncIterator[SmallHub]:
    watcher, writer = connect(env.config, "allocator"), connect(env.config, "allocator")
    hub = EventHub(watcher)
    hub.QUEUE = 3
    keys = [slot_key(HOLDERS, "hub-node", f"{gpu}:{n}") for n in range(5)]
    try:
        yield SmallHub(hub, writer, Holder("alice", container, 1.0, 10), keys)
    finally:
        for key in keys:
            await writer.delete(key)
        await watcher.close()
        await writer.close()


async def test_a_watcher_that_falls_behind_is_cut_off_without_holding_back_the_others(
    env: AllocatorEnv,
):
    """A stream that stops reading is ended with the revision to resume from once QUEUE
    events wait for it, and ended for good; one that reads gets every event meanwhile."""
    async with (
        small_hub(env, 8, "behind._.alice") as small,
        small.hub.subscribe() as idle,
        small.hub.subscribe() as reader,
    ):
        revisions, seen = [], []
        for key in small.keys:
            written = await small.writer.put(key, small.holder.encode())
            revisions.append(written.header.revision)
            seen.append(await asyncio.wait_for(reader.get(), 5))
        assert [(e.slot_id, e.revision) for e in seen] == [
            (f"8:{n}", revision) for n, revision in enumerate(revisions)
        ]
        ended = await asyncio.wait_for(idle.get(), 5)
        assert ended == Overflow(revisions[0] - 1)  # what the stream tells its watcher
        assert await asyncio.wait_for(idle.get(), 5) == ended  # and nothing after it


@pytest.mark.parametrize("given_before", [1, 0])
async def test_a_watcher_cut_off_for_falling_behind_is_told_where_to_follow_on(
    env: AllocatorEnv, monkeypatch: pytest.MonkeyPatch, given_before: int
):
    """A live stream cut off because its reader fell QUEUE events behind ends
    RESOURCE_EXHAUSTED with the revision to resume after, in words and for programs
    (``Ds01Error.resume_after``, set on no other refusal): resuming there, the library
    user gets the event it was cut at and what came after. `ds01 events -f` follows on
    by itself, at once, from the last it had: nothing twice, nothing missed."""
    offer = Subscription.offer

    def falls_behind(self: Subscription, batch: list[AllocationEvent], most: int) -> bool:
        """Every stream is as far behind as the hub allows when the "cut" event comes."""
        if any(event.holder.container == "cut._.alice" for event in batch):
            self.end(Overflow(batch[0].revision - 1))
            return False
        return offer(self, batch, most)

    monkeypatch.setattr(Subscription, "offer", falls_behind)
    names = [*["before._.alice"][:given_before], "cut._.alice", "after._.bob"]
    got: list[Any] = []

    async def read_live() -> None:
        try:
            async for event in admin.watch_allocations():  # live: the hub's
                got.append(event.allocation.container)
        except Ds01Error as err:
            got.append(err)

    async with env.client("labadmin") as admin:
        queue: asyncio.Queue[events_cli.Event | Exception] = asyncio.Queue()
        following = [  # and as `ds01 events -f` from now on
            asyncio.ensure_future(read_live()),
            asyncio.ensure_future(
                events_cli._pump(admin.watch_allocations, 0, events_cli.allocation_event,
                                 queue, True)
            ),
        ]  # fmt: skip
        try:
            await asyncio.sleep(0.5)  # both are open
            for name in names:
                await admin.allocate(name, user=name.split("._.")[1])
            await asyncio.wait_for(following[0], 10)
            *before, ended = got
            assert before == names[:given_before]
            assert isinstance(ended, Ds01Error), got
            assert ended.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"since_revision={ended.resume_after}" in ended.message
            resumed = await collect(admin.watch_allocations(ended.resume_after), 2, 5)
            assert [e.allocation.container for e in resumed] == names[given_before:]
            printed: list[Any] = []
            while sum(isinstance(e, events_cli.Event) for e in printed) < len(names):
                printed.append(await asyncio.wait_for(queue.get(), 10))
            assert [getattr(e, "container", "cut") for e in printed] == [
                *names[:given_before],
                "cut",
                *names[given_before:],
            ]
            assert not following[1].done()  # still following
        finally:
            for task in following:
                task.cancel()


async def test_a_message_of_more_events_than_the_queue_cuts_off_no_watcher_that_keeps_up(
    env: AllocatorEnv,
):
    """etcd hands a watch that catches up up to a thousand revisions in one message, and
    one transaction's slots come together: a message of more than QUEUE events reaches
    each stream whole (it cut off every stream, fast or not, and all of them replayed
    from etcd at once); only what still waits from earlier messages counts."""
    async with (
        small_hub(env, 9, "batch._.alice") as small,
        small.hub.subscribe() as first,
        small.hub.subscribe() as second,
    ):
        value = small.holder.encode()
        puts = [small.writer.transactions.put(key, value) for key in small.keys]
        await small.writer.transaction(compare=[], success=puts, failure=[])
        for stream in (first, second):
            got = [await asyncio.wait_for(stream.get(), 5) for _ in small.keys]
            assert [getattr(e, "slot_id", e) for e in got] == [f"9:{n}" for n in range(5)]
            assert len({e.revision for e in got}) == 1  # one transaction's, together


def _open(client: Ds01Client, service: str) -> grpc.aio.Call:
    """One answer stream of ``service``, raw, so that its headers can be awaited."""
    if service == "allocator":
        stub = allocator_pb2_grpc.AllocatorServiceStub(client.channel("allocator"))
        return stub.WatchAllocations(allocator_pb2.WatchAllocationsRequest())
    limits = limits_pb2_grpc.LimitsServiceStub(client.channel("limits"))
    return limits.WatchLimits(limits_pb2.WatchLimitsRequest())


async def _ended(call: grpc.aio.Call) -> grpc.StatusCode | None:
    """How ``call`` ended once its headers came (None: it is live)."""
    await asyncio.wait_for(call.initial_metadata(), 10)
    if not call.done():
        await asyncio.sleep(0.05)  # a refusal follows its headers at once
    return await call.code() if call.done() else None


@pytest.mark.parametrize("service", ["allocator", "limits"])
async def test_one_user_cannot_hold_more_than_64_event_streams(env: AllocatorEnv, service: str):
    """Every open stream costs the service work on each event (and some an etcd watch):
    a hostile user opening thousands would slow everyone's. Past 64, a user's new stream
    is refused with a sentence; others' (another user's, an admin's, a service's) are not
    counted with theirs, and closing one makes room."""
    async with (
        env.client("alice") as alice,
        env.client("bob") as bob,
        env.client("labadmin") as admin,
    ):
        held = [_open(alice, service) for _ in range(STREAMS_PER_USER)]
        try:
            assert [await _ended(c) for c in held] == [None] * STREAMS_PER_USER
            refused = _open(alice, service)
            assert await _ended(refused) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"alice has {STREAMS_PER_USER} event streams open" in await refused.details()
            others = [_open(bob, service), *(_open(admin, service) for _ in range(3))]
            assert [await _ended(c) for c in others] == [None] * 4
            held.pop().cancel()
            await asyncio.sleep(0.2)  # the service sees it closed
            again = _open(alice, service)
            assert await _ended(again) is None
            held += [again, *others]
        finally:
            for call in held:
                call.cancel()


async def test_two_thousand_watchers_connecting_at_once_all_get_their_streams(
    env: AllocatorEnv,
):
    """What a restart brings: every monitor reconnects at the same moment. None of their
    streams may be dropped, and one event reaches them all."""
    async with env.client("labadmin") as admin, env.client("alice") as alice:
        stub = allocator_pb2_grpc.AllocatorServiceStub(admin.channel("allocator"))
        calls = [stub.WatchAllocations(allocator_pb2.WatchAllocationsRequest())
                 for _ in range(2_000)]  # fmt: skip
        try:
            await asyncio.wait_for(asyncio.gather(*(c.initial_metadata() for c in calls)), 60)
            ended = [(await c.code()).name for c in calls if c.done()]
            assert not ended, f"{len(ended)} of 2,000 streams ended: {Counter(ended)}"
            await alice.allocate("storm._.alice")
            events = await asyncio.wait_for(asyncio.gather(*(c.read() for c in calls)), 60)
            assert {e.allocation.container for e in events} == {"storm._.alice"}
        finally:
            for call in calls:
                call.cancel()
        await alice.release("storm._.alice")


async def test_resuming_from_compacted_history_is_a_clear_error(
    env: AllocatorEnv, etcd_endpoint: str
):
    async with env.client("alice") as alice:
        await alice.allocate("a._.alice")
        first = await alice.release("a._.alice")
        assert first
        etcd = connect(env.config, "allocator")
        try:
            current = (await etcd.get_prefix(b"/ds01/")).header.revision
            await etcd.compact(current)
        finally:
            await etcd.close()
        error = await refused(collect(alice.watch_allocations(since_revision=2), 1))
        # Revision 1 asks for the oldest history kept (`ds01 events` without --since):
        # after a compaction that is where etcd's history now begins.
        oldest = alice.watch_allocations(since_revision=1)
        await alice.allocate("b._.alice")
        seen = [(await asyncio.wait_for(anext(oldest), 10)).allocation.container]
        while seen[-1] != "b._.alice":  # what the compaction kept comes first
            seen.append((await asyncio.wait_for(anext(oldest), 10)).allocation.container)
        await oldest.aclose()
    assert error.code == grpc.StatusCode.OUT_OF_RANGE
    assert "compacted the history" in error.message
    assert len(seen) <= 2  # at most the release at the compacted revision, then b


async def test_a_researcher_takes_a_students_held_slot_and_the_student_is_told(env: AllocatorEnv):
    async with env.client("alice") as alice, env.client("bob") as bob, env.client("carl") as carl:
        for client, name in ((alice, "a._.alice"), (bob, "b._.bob"), (carl, "c._.carl")):
            await client.allocate(name)  # all three MIG slices
        await alice.mark_stopped("a._.alice")
        events = asyncio.ensure_future(collect(alice.watch_allocations(), 1))
        await asyncio.sleep(0.3)
        async with env.client("ray") as ray:
            granted = await ray.allocate("r._.ray", preference=3)  # MIG only: none free
        [preempted] = await events
    assert granted.allocations[0].slot.slot_id == "2:1"
    assert preempted.type == EVENT.ALLOCATION_EVENT_TYPE_PREEMPTED
    assert (preempted.previous.user, preempted.previous.container) == ("alice", "a._.alice")
    async with env.client("dave") as dave:
        error = await refused(dave.allocate("d._.dave"))  # same priority: no preemption
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_waiters_are_served_by_priority_then_arrival(env: AllocatorEnv):
    async with env.client("alice") as alice, env.client("bob") as bob, env.client("carl") as carl:
        for client, name in ((alice, "a._.alice"), (bob, "b._.bob"), (carl, "c._.carl")):
            await client.allocate(name)
        async with env.client("dave") as dave, env.client("ray") as ray:
            low = asyncio.ensure_future(dave.allocate("d._.dave", wait_seconds=10))
            await asyncio.sleep(0.3)
            high = asyncio.ensure_future(ray.allocate("r._.ray", preference=3, wait_seconds=10))
            await asyncio.sleep(0.3)
            assert not low.done() and not high.done()
            await alice.release("a._.alice")
            granted = await asyncio.wait_for(high, 5)  # higher priority, though later
            assert granted.allocations[0].slot.slot_id == "2:1"
            assert not low.done()
            await bob.release("b._.bob")
            assert (await asyncio.wait_for(low, 5)).allocations[0].slot.slot_id == "2:2"


async def test_a_waiter_gives_up_at_its_deadline(env: AllocatorEnv):
    async with env.client("rita") as rita, env.client("ray") as ray:
        await rita.allocate("r._.rita", slots=2, preference=2)
        started = time.monotonic()
        error = await refused(ray.allocate("w._.ray", preference=2, wait_seconds=1.5))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "waited until the deadline" in error.message
    assert 1.2 < time.monotonic() - started < 8


async def test_a_hold_expires_while_every_ds01_process_is_stopped(
    env: AllocatorEnv, etcd_endpoint: str
):
    start = await etcd_revision(etcd_endpoint, env.pki)
    async with env.client("alice") as alice:
        granted = await alice.allocate("proj._.alice")
        await alice.mark_stopped("proj._.alice")
    await env.stop("allocator", "limits")
    await asyncio.sleep(HOLD_SECONDS + 2)  # nothing of ds01 runs while the hold ends
    await env.start("limits", "allocator")
    async with env.client("labadmin") as admin:
        slot = slots_of(await admin.gpu_status())[granted.allocations[0].slot.slot_id]
        assert slot.state == common_pb2.SLOT_STATE_FREE
        # The stream still has the expiry, which happened while nothing ran.
        history = await collect(admin.watch_allocations(since_revision=start), 3, timeout=5)
    assert [e.type for e in history] == [
        EVENT.ALLOCATION_EVENT_TYPE_ALLOCATED,
        EVENT.ALLOCATION_EVENT_TYPE_HELD,
        EVENT.ALLOCATION_EVENT_TYPE_HOLD_EXPIRED,
    ]
    assert history[-1].allocation.container == "proj._.alice"


async def test_a_limits_reload_applies_to_the_next_allocation(env: AllocatorEnv):
    async with env.client("alice") as alice:
        denied = await refused(alice.allocate("full._.alice", preference=2))
        assert denied.code == grpc.StatusCode.FAILED_PRECONDITION  # the answer is now cached
        limits_file = env.config.limits_file
        limits_file.write_text(
            limits_file.read_text().replace("allow_full_gpu: false", "allow_full_gpu: true")
        )
        for _ in range(60):
            if (await alice.get_limits()).allow_full_gpu:
                break
            await asyncio.sleep(0.05)
        granted = None
        for _ in range(20):  # the change reaches the allocator's cache as an event
            with contextlib.suppress(Ds01Error):
                granted = await alice.allocate("full._.alice", preference=2)
                break
            await asyncio.sleep(0.05)
    assert granted is not None and granted.allocations[0].slot.slot_id == "0"


async def test_a_node_that_stops_renewing_shows_down_and_keeps_its_slots(
    etcd_endpoint: str, pki: Pki
):
    from ds01.allocator.etcd_state import EtcdState, NodeRegistration
    from ds01.allocator.records import NodeRecord, SlotRecord

    client = etcd_client((etcd_endpoint,), pki.etcd, "allocator")
    slot = SlotRecord("ghost", "0", "GPU-g", "A100", "", 1, 1.0)
    registration = NodeRegistration(
        client, NodeRecord("ghost", "declared", True, time.time()), [slot], ttl=2
    )
    try:
        await registration.register()
        state = EtcdState(client)
        assert "ghost" in (await state.snapshot()).nodes
        # The node's process dies: nobody refreshes its lease.
        for _ in range(50):
            snapshot = await state.snapshot()
            if "ghost" not in snapshot.nodes:
                break
            await asyncio.sleep(0.1)
        assert "ghost" not in snapshot.nodes
        assert snapshot.slots[("ghost", "0")] == slot  # still recorded
    finally:
        await client.delete_prefix(b"/ds01/v1/slots/ghost/")
        await client.close()


@pytest.mark.parametrize("lost", ["lease", "key"])
async def test_a_node_whose_registration_was_lost_registers_again(
    etcd_endpoint: str, pki: Pki, lost: str
):
    """etcd away longer than the lease, or restored from a backup (the lease is gone), or
    an admin's delete (the key is): the node is up again within a third of its lease."""
    from ds01.allocator.etcd_state import EtcdState, NodeRegistration
    from ds01.allocator.records import NODES, NodeRecord, SlotRecord

    client = etcd_client((etcd_endpoint,), pki.etcd, "allocator")
    slot = SlotRecord("phoenix", "0", "GPU-p", "A100", "", 1, 1.0)
    registration = NodeRegistration(
        client, NodeRecord("phoenix", "declared", True, time.time()), [slot], ttl=3
    )
    keeping = None
    try:
        await registration.register()
        keeping = asyncio.ensure_future(registration.keep_alive())
        registered = await client.get(f"{NODES}phoenix".encode())
        if lost == "lease":
            await client.revoke_lease(registered.lease)
        else:
            await client.delete(registered.key)
        state = EtcdState(client)
        assert "phoenix" not in (await state.snapshot()).nodes
        for _ in range(30):
            if "phoenix" in (await state.snapshot()).nodes:
                break
            await asyncio.sleep(0.1)
        assert "phoenix" in (await state.snapshot()).nodes
    finally:
        if keeping is not None:
            keeping.cancel()
        await client.delete_prefix(b"/ds01/v1/slots/phoenix/")
        await client.delete(f"{NODES}phoenix".encode())
        await client.close()


async def test_a_waiter_leaves_what_it_cannot_use_to_others(env: AllocatorEnv):
    """A researcher waiting for two full GPUs while one is free does not block a student's
    MIG slice, nor another researcher's single free GPU once the waiter's needs are met."""
    async with env.client("rita") as rita, env.client("ray") as ray, env.client("alice") as alice:
        await rita.allocate("one._.rita", preference=2)  # GPU 0 taken; GPU 1 free
        big = asyncio.ensure_future(
            ray.allocate("big._.ray", slots=2, preference=2, wait_seconds=10)
        )
        await asyncio.sleep(0.5)
        assert not big.done()
        # 1 full GPU + 3 MIG slices free, the waiter wants 2: a slice is still given out.
        assert (await alice.allocate("small._.alice")).allocations[0].slot.slot_id == "2:1"
        await rita.release("one._.rita")
        granted = await asyncio.wait_for(big, 5)
    assert sorted(a.slot.slot_id for a in granted.allocations) == ["0", "1"]


@pytest.mark.parametrize("watched", [False, True], ids=["read", "watched-view"])
async def test_an_overdue_hold_is_ended_even_if_its_lease_was_renewed(
    env: AllocatorEnv, etcd_endpoint: str, watched: bool
):
    """etcd restarts a lease's time to live when it restarts; hold_until still rules,
    found by a read or (every allocator, each second) in the watched view."""
    from dataclasses import replace

    from ds01.allocator.cache import ClusterCache
    from ds01.allocator.etcd_state import EtcdState
    from ds01.allocator.service import Allocator

    start = await etcd_revision(etcd_endpoint, env.pki)
    async with env.client("alice") as alice:
        await alice.allocate("late._.alice")
    client = connect(env.config, "allocator")
    try:
        state = EtcdState(client)
        held = (await state.snapshot()).held_by("late._.alice")
        overdue = replace(held[0][1], stopped_at=time.time() - 60, hold_until=time.time() - 1)
        assert await state.rewrite(held, overdue, ttl=3600)  # a lease that would run an hour
        cache = ClusterCache(state) if watched else None
        if cache is not None:
            cache.start()
            for _ in range(100):
                if cache.live and any(h.stopped for h in cache.view.holders.values()):
                    break
                await asyncio.sleep(0.05)
        allocator = Allocator(state, limits=None, cache=cache)  # type: ignore[arg-type]
        assert await allocator.expire_overdue() == 1
        assert not (await state.snapshot()).held_by("late._.alice")
    finally:
        if cache is not None:
            await cache.close()
        await client.close()
    async with env.client("labadmin") as admin:
        history = await collect(admin.watch_allocations(since_revision=start), 3, timeout=3)
    assert [e.type for e in history][-1] == EVENT.ALLOCATION_EVENT_TYPE_HOLD_EXPIRED


async def test_container_names_say_whose_they_are(env: AllocatorEnv):
    async with env.client("alice") as alice, env.client("bob") as bob:
        squat = await refused(alice.allocate("train._.bob"))
        assert squat.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "must be named <name>._.alice to hold GPUs for alice" in squat.message
        await alice.allocate("job._.alice")
        # Bob's watcher learns that a slot went to alice, but not her container's name.
        events = asyncio.ensure_future(collect(bob.watch_allocations(), 1, timeout=3))
        await asyncio.sleep(0.3)
        async with env.client("ray") as ray:
            await alice.mark_stopped("job._.alice")
            await ray.allocate("r._.ray", preference=3)
            await ray.allocate("r2._.ray", preference=3)  # preempts nothing of bob's
        assert await events == []
        await bob.allocate("b._.bob")
        status = {a.slot.slot_id: a for a in (await bob.gpu_status()).allocations}
    assert all(a.container in ("", "b._.bob") for a in status.values())


async def test_one_user_waits_a_few_times_at_most_and_a_day_at_most(env: AllocatorEnv):
    """The queue is shared: a user's waiting requests hold back what they want from
    everyone behind them, so one user may queue four at a time, each for a day at most."""
    async with env.client("alice") as alice, env.client("bob") as bob, env.client("carl") as c:
        for client, name in ((alice, "a._.alice"), (bob, "b._.bob"), (c, "c._.carl")):
            await client.allocate(name)  # every MIG slice a student may have
        async with env.client("dave") as dave:
            waiting = [
                asyncio.ensure_future(dave.allocate(f"w{n}._.dave", wait_seconds=20))
                for n in range(4)
            ]
            await asyncio.sleep(1.0)
            fifth = await refused(dave.allocate("w5._.dave", wait_seconds=20))
            assert fifth.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "dave already waits for a GPU 4 times (at most 4)" in fifth.message
            long = await refused(bob.allocate("l._.bob", wait_seconds=25 * 3600))
            assert long.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "at most 24 hours" in long.message
            await alice.release("a._.alice")
            done, rest = await asyncio.wait(waiting, timeout=10, return_when="FIRST_COMPLETED")
            assert [len(d.result().allocations) for d in done] == [1]  # the first in line
            for call in rest:
                call.cancel()
