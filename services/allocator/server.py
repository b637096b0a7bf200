"""The allocator service over gRPC: wiring, permissions, and errors people can act on."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import asdict, replace
from typing import TypeVar

import aetcd
import grpc

from ds01.allocator import metrics as allocation_metrics
from ds01.allocator.cache import ClusterCache
from ds01.allocator.etcd_state import EtcdState, NodeRegistration, Snapshot
from ds01.allocator.events import (
    AllocationEvent,
    EventHub,
    EventKind,
    HistoryCompacted,
    Overflow,
    from_oldest_kept,
    watch_allocations,
)
from ds01.allocator.inventory import load_inventory
from ds01.allocator.peers import Presence
from ds01.allocator.placement import (
    AllocationRefused,
    Preference,
    Quota,
    Refusal,
    Request,
    Strategy,
)
from ds01.allocator.records import DrainRecord, Holder, NodeRecord, SlotRecord
from ds01.allocator.service import (
    Actor,
    Allocator,
    Granted,
    NotFound,
    NotPermitted,
    StillInUse,
    environment,
)
from ds01.client import ClientIdentity, Ds01Client, Ds01Error
from ds01.containers.adapters import METADATA, Metadata, record_key
from ds01.core.admin_view import AdminView
from ds01.core.etcd import connect, failure_sentence
from ds01.core.identity import caller
from ds01.core.limits_cache import CachedLimits, LocalAnswers
from ds01.core.messages import SLOT_PREFERENCES, abort, timestamp
from ds01.core.server import ServiceRuntime, ServiceSpec, answer
from ds01.core.tasks import cancellable
from ds01.core.units import parse_duration
from ds01.v1 import allocator_pb2, allocator_pb2_grpc, common_pb2, limits_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")

LIMITS_TIMEOUT = 5.0  # seconds the allocator waits for the limits service

ALLOCATOR_SERVICE = allocator_pb2.DESCRIPTOR.services_by_name["AllocatorService"].full_name
_PREFERENCES = {
    allocator_pb2.SLOT_PREFERENCE_UNSPECIFIED: Preference.ANY,
    allocator_pb2.SLOT_PREFERENCE_ANY: Preference.ANY,
    allocator_pb2.SLOT_PREFERENCE_FULL_GPU: Preference.FULL_GPU,
    allocator_pb2.SLOT_PREFERENCE_MIG: Preference.MIG,
}
_EVENT_TYPES = {
    EventKind.ALLOCATED: allocator_pb2.ALLOCATION_EVENT_TYPE_ALLOCATED,
    EventKind.RELEASED: allocator_pb2.ALLOCATION_EVENT_TYPE_RELEASED,
    EventKind.HELD: allocator_pb2.ALLOCATION_EVENT_TYPE_HELD,
    EventKind.HOLD_CLEARED: allocator_pb2.ALLOCATION_EVENT_TYPE_HOLD_CLEARED,
    EventKind.HOLD_EXPIRED: allocator_pb2.ALLOCATION_EVENT_TYPE_HOLD_EXPIRED,
    EventKind.PREEMPTED: allocator_pb2.ALLOCATION_EVENT_TYPE_PREEMPTED,
}
_REFUSAL_CODES = {
    Refusal.QUOTA: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.NO_CAPACITY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refusal.NOT_ALLOWED: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.TAKEN: grpc.StatusCode.ALREADY_EXISTS,
}


class RemoteLimits:
    """Quotas and roles from the limits service, asked as ``svc:allocator`` (and kept
    while its change stream is open: see ``CachedLimits``)."""

    def __init__(self, client: Ds01Client, local: LocalAnswers | None = None) -> None:
        self.client = client
        self.cache = CachedLimits(client, local)

    async def follow_changes(self) -> None:
        await self.cache.follow_changes()

    async def limits(self, user: str) -> limits_pb2.UserLimits:
        return await self.cache.get_limits(user)

    async def quota(self, user: str) -> Quota:
        limits = await self.limits(user)
        # The quota, and the aggregate's gpu_limit (DS01 checks both): the smaller wins.
        bounds = []
        if limits.HasField("max_gpu_equivalents"):
            bounds.append(limits.max_gpu_equivalents)
        if limits.aggregate.HasField("gpu_equivalents"):
            bounds.append(limits.aggregate.gpu_equivalents)
        return Quota(
            group=limits.group,
            priority=limits.priority,
            max_gpu_equivalents=min(bounds) if bounds else None,
            max_slots_per_container=(
                limits.max_gpu_slots_per_container
                if limits.HasField("max_gpu_slots_per_container")
                else None
            ),
            allow_full_gpu=limits.allow_full_gpu,
            archived=limits.archived,
        )

    async def hold_seconds(self, user: str, manual: bool = False) -> float | None:
        limits = await self.limits(user)
        if manual and limits.policies.get("gpu_hold_after_manual_stop"):
            return parse_duration(limits.policies["gpu_hold_after_manual_stop"])
        if not limits.HasField("gpu_hold_after_stop"):
            return None
        return limits.gpu_hold_after_stop.ToTimedelta().total_seconds()

    async def is_admin(self, user: str) -> bool:
        return await self.cache.is_admin(user)


class AllocatorServicer(allocator_pb2_grpc.AllocatorServiceServicer):
    def __init__(self, allocator: Allocator, limits: RemoteLimits, node: str) -> None:
        self.allocator = allocator
        self.limits = limits
        self.node = node
        self.hub = EventHub(allocator.state.client)

    async def Allocate(
        self, request: allocator_pb2.AllocateRequest, context: grpc.aio.ServicerContext
    ) -> allocator_pb2.AllocateResponse:
        actor = await self._actor(context)
        if not request.container:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "name the container")
        preference = _PREFERENCES.get(request.preference)
        if preference is None:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"preference {request.preference} is not one of "
                + ", ".join(allocator_pb2.SlotPreference.Name(p) for p in _PREFERENCES),
            )
        wanted = Request(
            user=request.user or actor.name,
            container=request.container,
            slots=request.slots,
            gpu_equivalents=request.gpu_equivalents,
            preference=preference,
            node=request.node,
            slot_ids=tuple(request.slot_ids),
            as_many=request.as_many_as_allowed,
        )
        wait_until = (
            request.wait_until.ToDatetime().timestamp() if request.HasField("wait_until") else None
        )
        work = self.allocator.allocate(wanted, actor, wait_until)
        if wait_until:  # a waiting call ends with its caller, and gives back what it got
            since = time.time()
            give_back = functools.partial(self.allocator.give_back, wanted.container, since)
            work = cancellable(work, dropped=give_back)
        granted = await self._run(context, work)
        return allocator_pb2.AllocateResponse(
            allocations=[allocation_message(g.slot, g.holder, True) for g in granted],
            environment=environment(granted),
        )

    async def Release(
        self, request: allocator_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> allocator_pb2.ReleaseResponse:
        actor = await self._actor(context)
        released = await self._run(context, self.allocator.release(request.container, actor))
        return allocator_pb2.ReleaseResponse(released_slots=released)

    async def MarkStopped(
        self, request: allocator_pb2.MarkStoppedRequest, context: grpc.aio.ServicerContext
    ) -> allocator_pb2.MarkStoppedResponse:
        actor = await self._actor(context)
        # A person calling here stops by hand, whatever they say; a service tells.
        manual = request.manual or not actor.privileged
        granted = await self._run(
            context, self.allocator.mark_stopped(request.container, actor, manual)
        )
        return allocator_pb2.MarkStoppedResponse(allocations=_messages(granted))

    async def ClearStopped(
        self, request: allocator_pb2.ClearStoppedRequest, context: grpc.aio.ServicerContext
    ) -> allocator_pb2.ClearStoppedResponse:
        actor = await self._actor(context)
        granted = await self._run(context, self.allocator.clear_stopped(request.container, actor))
        return allocator_pb2.ClearStoppedResponse(allocations=_messages(granted))

    async def Validate(
        self, request: allocator_pb2.ValidateRequest, context: grpc.aio.ServicerContext
    ) -> allocator_pb2.ValidateResponse:
        actor = await self._actor(context)
        node = request.node or self.node
        reason = await self._run(
            context, self.allocator.validate(request.container, node, request.slot_id, actor)
        )
        return allocator_pb2.ValidateResponse(valid=reason is None, reason=reason or "")

    async def GetStatus(
        self, request: allocator_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> allocator_pb2.GetStatusResponse:
        actor = await self._actor(context)
        snapshot = await self._run(context, self.allocator.status(request.user, request.node))
        response = allocator_pb2.GetStatusResponse(revision=snapshot.revision)
        for key, slot in sorted(snapshot.slots.items(), key=lambda item: item[1].order):
            holder = snapshot.holders.get(key)
            if request.user and holder is None:
                continue
            holder = _visible(holder, actor) if holder else None
            message = allocation_message(slot, holder, slot.node in snapshot.nodes)
            message.drained = snapshot.drained(slot) is not None
            response.allocations.append(message)
        for _target, drain in sorted(snapshot.drains.items()):
            if not request.node or drain.node == request.node:
                response.drains.append(drain_message(drain))
        for name in sorted({s.node for s in snapshot.slots.values()} | set(snapshot.nodes)):
            record = snapshot.nodes.get(name)
            response.nodes.append(
                allocator_pb2.NodeStatus(
                    node=name,
                    up=record is not None,
                    inventory_source=record.inventory_source if record else "",
                    simulated=record.simulated if record else False,
                )
            )
        return response

    async def WatchAllocations(
        self, request: allocator_pb2.WatchAllocationsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[allocator_pb2.WatchAllocationsResponse]:
        actor = await self._actor(context)
        view = AdminView(caller(), actor.privileged, self.limits.is_admin, "allocations")
        if request.since_revision:  # a replay from etcd's history, then live
            try:
                client = self.allocator.state.client
                watch = functools.partial(watch_allocations, client)
                async for event in from_oldest_kept(watch, request.since_revision):
                    if await view.shows(context, event.users):
                        yield event_message(event, actor)
            except HistoryCompacted as err:
                await abort(context, grpc.StatusCode.OUT_OF_RANGE, str(err))
            return
        async with self.hub.subscribe() as events:
            # Headers now, not with the first event: the watcher knows its watch is live
            # (nothing after this can be missed), and the first event costs no more to
            # send to a thousand watchers than the next ones.
            await context.send_initial_metadata(())
            while True:
                item = await events.get()
                if isinstance(item, Overflow):
                    await abort(
                        context,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"this watcher fell behind; resume with since_revision={item.revision}",
                        resume_after=item.revision,
                    )
                if isinstance(item, Exception):
                    await abort(context, grpc.StatusCode.UNAVAILABLE, f"etcd watch failed: {item}")
                if await view.shows(context, item.users):
                    yield shared_event_message(item, None if actor.privileged else actor.name)

    async def ListWaiters(
        self, request: allocator_pb2.ListWaitersRequest, context: grpc.aio.ServicerContext
    ) -> allocator_pb2.ListWaitersResponse:
        actor = await self._actor(context)
        waiters = await self._run(context, self.allocator.queue())
        response = allocator_pb2.ListWaitersResponse()
        for position, waiter in enumerate(waiters, start=1):
            mine = actor.privileged or waiter.user == actor.name
            response.waiters.append(
                allocator_pb2.Waiter(
                    position=position,
                    user=waiter.user,
                    container=waiter.container if mine else "",
                    slots=waiter.slots,
                    preference=SLOT_PREFERENCES.get(waiter.preference, 0),
                    priority=waiter.priority,
                    node=waiter.node,
                    since=timestamp(waiter.since or None),
                    wait_until=timestamp(waiter.until or None),
                )
            )
        return response

    async def Drain(
        self, request: allocator_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> allocator_pb2.DrainResponse:
        actor = await self._actor(context)
        if not request.node:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "name the node to drain")
        gpu = _gpu_of(request)
        drain = await self._run(
            context, self.allocator.drain(request.node, gpu, request.reason, actor)
        )
        snapshot = await self._run(context, self.allocator.status(node=request.node))
        staying = [
            allocation_message(snapshot.slots[key], holder, request.node in snapshot.nodes)
            for key, holder in sorted(snapshot.holders.items())
            if key in snapshot.slots and (not drain.gpu or snapshot.slots[key].gpu == drain.gpu)
        ]
        return allocator_pb2.DrainResponse(drain=drain_message(drain), allocations=staying)

    async def Undrain(
        self, request: allocator_pb2.UndrainRequest, context: grpc.aio.ServicerContext
    ) -> allocator_pb2.UndrainResponse:
        actor = await self._actor(context)
        ended = await self._run(
            context, self.allocator.undrain(request.node, _gpu_of(request), actor)
        )
        return allocator_pb2.UndrainResponse(drain=drain_message(ended) if ended else None)

    async def _actor(self, context: grpc.aio.ServicerContext) -> Actor:
        principal = caller()
        privileged = principal.privileged
        if not privileged:
            privileged = await self._run(context, self.limits.is_admin(principal.name))
        return Actor(principal.name, privileged)

    async def _run(self, context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
        return await answer(context, work, _status_of)


def _status_of(err: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The domain's refusals as gRPC statuses."""
    if isinstance(err, AllocationRefused):
        return _REFUSAL_CODES[err.kind], err.message
    if isinstance(err, NotPermitted):
        return grpc.StatusCode.PERMISSION_DENIED, str(err)
    if isinstance(err, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(err)
    if isinstance(err, StillInUse):
        return grpc.StatusCode.FAILED_PRECONDITION, str(err)
    if isinstance(err, Ds01Error):  # from the limits service
        if err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return grpc.StatusCode.UNAVAILABLE, f"the limits service did not answer: {err.message}"
        return err.code, err.message
    return None


def slot_message(slot: SlotRecord) -> common_pb2.GpuSlot:
    return common_pb2.GpuSlot(
        node=slot.node,
        slot_id=slot.slot_id,
        uuid=slot.uuid,
        product=slot.product,
        mig_profile=slot.mig_profile,
        memory_bytes=slot.memory_bytes,
        gpu_equivalents=slot.gpu_equivalents,
    )


def allocation_message(
    slot: SlotRecord, holder: Holder | None, node_up: bool
) -> common_pb2.Allocation:
    if holder is None:
        state = common_pb2.SLOT_STATE_FREE if node_up else common_pb2.SLOT_STATE_NODE_DOWN
        return common_pb2.Allocation(slot=slot_message(slot), state=state)
    return holding_message(slot_message(slot), holder, node_up)


def drain_message(drain: DrainRecord) -> allocator_pb2.Drain:
    return allocator_pb2.Drain(
        node=drain.node,
        gpu=int(drain.gpu) if drain.gpu else None,
        by=drain.by,
        reason=drain.reason,
        since=timestamp(drain.since),
    )


def _gpu_of(request: allocator_pb2.DrainRequest | allocator_pb2.UndrainRequest) -> str:
    """The GPU index as the drain's key spells it; "" for the whole node."""
    return str(request.gpu) if request.HasField("gpu") else ""


def holding_message(
    slot: common_pb2.GpuSlot, holder: Holder, node_up: bool = True
) -> common_pb2.Allocation:
    if not node_up:
        state = common_pb2.SLOT_STATE_NODE_DOWN
    elif holder.stopped:
        state = common_pb2.SLOT_STATE_HELD
    else:
        state = common_pb2.SLOT_STATE_ALLOCATED
    return common_pb2.Allocation(
        slot=slot,
        state=state,
        user=holder.user,
        container=holder.container,
        since=timestamp(holder.since),
        stopped_at=timestamp(holder.stopped_at),
        hold_until=timestamp(holder.hold_until),
        priority=holder.priority,
    )


def _messages(granted: list[Granted]) -> list[common_pb2.Allocation]:
    return [allocation_message(g.slot, g.holder, True) for g in granted]


def event_message(event: AllocationEvent, actor: Actor) -> allocator_pb2.WatchAllocationsResponse:
    slot = common_pb2.GpuSlot(node=event.node, slot_id=event.slot_id)
    message = allocator_pb2.WatchAllocationsResponse(
        type=_EVENT_TYPES[event.kind],
        allocation=holding_message(slot, _visible(event.holder, actor)),
        revision=event.revision,
        released_by=event.released_by,
        time=timestamp(event.time),
    )
    if event.kind in (EventKind.RELEASED, EventKind.HOLD_EXPIRED):
        message.allocation.state = common_pb2.SLOT_STATE_FREE
    if event.previous is not None:
        message.previous.CopyFrom(holding_message(slot, _visible(event.previous, actor)))
    return message


@functools.lru_cache(maxsize=4096)
def shared_event_message(
    event: AllocationEvent, viewer: str | None
) -> allocator_pb2.WatchAllocationsResponse:
    """One message per event and viewer (None: every admin and service), shared by all
    live streams of that viewer: a thousand watchers cost one message, not a thousand.
    Never changed once made."""
    return event_message(event, Actor(viewer or "", viewer is None))


class HolderTypes:
    """The type of each container that holds a slot (its `interface` in DS01's metrics),
    read from its record once per allocation: a scrape reads the records it has not
    seen, where the fleet's records would be thousands each time."""

    BATCH = 100  # reads in one transaction (etcd allows 128 operations)
    # Scrapes between two readings of every holder's record: a container made anew can
    # inherit its name's allocation (and its since) when a release failed; it shows its
    # own type after this many scrapes at most.
    FRESH_FOR = 20

    def __init__(self, etcd: aetcd.Client) -> None:
        self.etcd = etcd
        self.known: dict[tuple[str, str, float], str] = {}  # (node, name, since) -> type
        self.scrapes = 0

    async def __call__(self, snapshot: Snapshot) -> dict[str, str]:
        self.scrapes += 1
        if self.scrapes % self.FRESH_FOR == 0:
            self.known.clear()
        holding = {(key[0], h.container, h.since) for key, h in snapshot.holders.items()}
        missing = sorted(holding - self.known.keys())
        tx = self.etcd.transactions
        for start in range(0, len(missing), self.BATCH):
            batch = missing[start : start + self.BATCH]
            reads = [tx.get(record_key(METADATA, node, name)) for node, name, _ in batch]
            _, responses = await self.etcd.transaction(compare=[], success=reads, failure=[])
            for wanted, response in zip(batch, responses, strict=True):
                if response:  # no record yet (a create allocates first): asked again
                    record = Metadata.decode(response[0][0])
                    self.known[wanted] = record.container_type or "unknown"
        self.known = {k: v for k, v in self.known.items() if k in holding}
        return {name: kind for (_node, name, _since), kind in self.known.items()}


def _visible(holder: Holder, actor: Actor) -> Holder:
    """Users see who holds a slot, but not another user's container names."""
    if actor.privileged or holder.user == actor.name:
        return holder
    return replace(holder, container="")


async def register(server: grpc.aio.Server, runtime: ServiceRuntime) -> None:
    config = runtime.config
    etcd = connect(config, "allocator")
    identity = ClientIdentity(config.pki.ca_cert, config.pki.service("allocator"))
    # Within a user's own deadline (10 s by default), so that the allocator can say which
    # service did not answer before the user's call runs out.
    limits = RemoteLimits(
        Ds01Client(config, identity, timeout=LIMITS_TIMEOUT, wait_for_ready=True),
        local=runtime.context.limits,
    )
    state = EtcdState(etcd, lock_ttl=config.allocator.lock_ttl)
    cache = ClusterCache(state, watch_client=connect(config, "allocator"))
    cache.start()
    presence = Presence(etcd, config.node)

    async def container_exists(name: str, nodes: set[str]) -> bool:
        """Whether the containers service has a record of ``name`` on one of ``nodes``."""
        found = await asyncio.gather(*(etcd.get(record_key(METADATA, n, name)) for n in nodes))
        return any(found)

    allocator = Allocator(
        state,
        limits,
        strategy=Strategy(config.allocator.strategy),
        container_exists=container_exists,
        cache=cache,
        me=presence.me,
    )
    allocator_pb2_grpc.add_AllocatorServiceServicer_to_server(
        AllocatorServicer(allocator, limits, config.node), server
    )

    allocation_metrics.register(runtime.metrics, allocator, HolderTypes(etcd))
    registration = _Registration(config.node)
    runtime.needs_etcd(etcd)
    runtime.needs_services(identity, "limits")
    runtime.dependencies.add("inventory", config.node, registration.check)
    runtime.run_in_background(registration.keep(runtime, etcd), f"node-{config.node}")
    runtime.run_in_background(limits.follow_changes(), "limits-changes")
    runtime.run_in_background(_expire_overdue_holds(allocator), "hold-sweeper")
    runtime.run_in_background(presence.keep(), "presence")

    async def close() -> None:
        await presence.withdraw()
        await cache.close()
        await state.close()
        await limits.client.close()
        with contextlib.suppress(Exception):
            await etcd.close()

    runtime.on_stop.append(close)


async def _expire_overdue_holds(allocator: Allocator, interval: float = 1.0) -> None:
    """Backstop for hold leases that etcd renewed by restarting (see expire_overdue)."""
    while True:
        await asyncio.sleep(interval)
        try:
            ended = await allocator.expire_overdue()
        except Exception as err:  # etcd away: try again next round
            log.warning("hold sweep failed: %s", err)
            continue
        if ended:
            log.info("ended %d overdue GPU hold(s)", ended)


class _Registration:
    """This node's inventory in etcd, kept registered; a dependency of the service."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.problem: str | None = "not registered yet"

    async def check(self) -> None:
        if self.problem:
            raise RuntimeError(f"node {self.node}: {self.problem}")

    async def keep(self, runtime: ServiceRuntime, etcd: object) -> None:
        """Register this node's inventory, then keep the registration alive. Until etcd
        and the inventory answer, the service reports NOT_SERVING and retries."""
        while True:
            try:
                inventory = await asyncio.to_thread(load_inventory, runtime.config)
                slots = [SlotRecord(node=self.node, **asdict(s)) for s in inventory.slots()]
                record = NodeRecord(self.node, inventory.source, inventory.simulated, time.time())
                registration = NodeRegistration(etcd, record, slots)  # type: ignore[arg-type]
                await registration.register()
                log.info("node %s registered: %s", self.node, inventory.describe())
                self.problem = None
                await registration.keep_alive()
            except Exception as err:  # keep trying: etcd or the driver may come later
                problem = f"cannot register: {failure_sentence(err)}"
                if problem != self.problem:  # once per reason, not every 2 s
                    log.error("node %s: %s", self.node, problem)
                self.problem = problem
                await asyncio.sleep(2)


SPEC = ServiceSpec(name="allocator", grpc_services=(ALLOCATOR_SERVICE,), register=register)
