"""The allocator's operations, free of gRPC: quota, lock, plan, claim; holds; release."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Container, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from ds01.allocator.cache import ClusterCache
from ds01.allocator.etcd_state import EtcdState, SlotKey, Snapshot
from ds01.allocator.peers import Peer
from ds01.allocator.placement import (
    AllocationRefused,
    Plan,
    Quota,
    Refusal,
    Request,
    Strategy,
    checked,
    plan,
    plan_exact,
)
from ds01.allocator.records import DrainRecord, Holder, ReleaseMark, SlotRecord, WaiterRecord
from ds01.core.naming import belongs_to, docker_user
from ds01.core.pki import SERVICE_PREFIX
from ds01.core.tasks import landed

log = logging.getLogger(__name__)

CLAIM_ATTEMPTS = 20  # a lost race re-reads and re-plans; each loss means someone else won
# Claims planned on the watched view before the locked path takes over: each loss costs
# one round trip and teaches the view who won; the locked path costs three and, on a
# nearly full fleet, loses races as often (measured: bench/allocator.py, 64 clients).
AT_ONCE_ATTEMPTS = 4
MAX_WAIT = 24 * 3600.0  # seconds an Allocate may queue
MAX_WAITING_PER_USER = 4  # queued requests of one user at a time: the queue is shared
WAITER_TTL = 9.0  # seconds a waiter's record outlives its last renewal
CONTENDED_FOR = 10.0  # seconds plans spread after a claim lost to another allocator
CHANGE_POLL = 1.0  # seconds between looks at etcd for a waiter when no watched view is live


class LimitsSource(Protocol):
    async def quota(self, user: str) -> Quota: ...

    async def hold_seconds(self, user: str, manual: bool = False) -> float | None:
        """gpu_hold_after_stop; None holds indefinitely."""
        ...


class NotPermitted(Exception):
    """The actor may not act on this container."""


class NotFound(Exception):
    """No such container or slot."""


class StillInUse(Exception):
    """The container still exists, with the slot in its environment."""


@dataclass(frozen=True)
class Actor:
    """Who asks: a user acts on their own containers; services and admins on any."""

    name: str
    privileged: bool


@dataclass(frozen=True)
class Granted:
    slot: SlotRecord
    holder: Holder


def is_service(name: str) -> bool:
    return name.startswith(SERVICE_PREFIX)


def environment(granted: list[Granted]) -> dict[str, str]:
    """What the container is given: only its own devices, MIG UUIDs for MIG slices."""
    uuids = ",".join(g.slot.uuid for g in granted)
    return {"CUDA_VISIBLE_DEVICES": uuids, "NVIDIA_VISIBLE_DEVICES": uuids}


LOST = object()  # a claim planned on the view lost a slot to another allocator


@dataclass
class AllocatorStats:
    """Counts since the process started, for the metrics."""

    preemptions: int = 0  # held slots of stopped containers given to another
    lock_waits: int = 0  # requests that found their user's lock taken and waited
    claim_conflicts: int = 0  # claims that lost to another process and were planned again
    claimed_at_once: int = 0  # claims in one round trip, planned on the watched view
    locked_fallbacks: int = 0  # requests the view could not settle: the locked path took them


class Allocator:
    def __init__(
        self,
        state: EtcdState,
        limits: LimitsSource,
        strategy: Strategy = Strategy.LEAST_ALLOCATED,
        container_exists: Callable[[str, set[str]], Awaitable[bool]] | None = None,
        cache: ClusterCache | None = None,
        me: Peer | None = None,
    ) -> None:
        # Whether a container of that name is recorded on one of those nodes.
        self.container_exists = container_exists
        self.state = state
        self.cache = cache  # the watched view: one round trip in the common case
        self.me = me  # this process among the allocators, as announced (see peers.py)
        self.limits = limits
        self.strategy = strategy
        self.lock_ttl = state.lock_ttl
        # Slots this process is claiming right now: its other requests plan around them
        # instead of all picking the same best slot and losing the transaction.
        self._in_flight: dict[SlotKey, Holder] = {}
        # Until then, plans spread over equally good slots and swap into this process's
        # share of its node: another allocator took a slot this one planned, and the
        # two would otherwise keep planning alike.
        self._contended_until = 0.0
        self.stats = AllocatorStats()

    async def allocate(
        self, request: Request, actor: Actor, wait_until: float | None = None
    ) -> list[Granted]:
        """Claim slots for ``request.container``; the same call again returns the same slots."""
        if not actor.privileged and actor.name != request.user:
            raise NotPermitted(f"{actor.name} may not allocate GPUs for {request.user}")
        if request.slot_ids and not actor.privileged:
            raise NotPermitted(
                f"{actor.name} may not name exact slots: only services and admins adopt"
            )
        # Adopted containers keep their names (mlc's name._.uid); any other must say whose.
        if not request.slot_ids and not belongs_to(request.container, request.user):
            # The name says whose it is, so nobody can take or squat another's name.
            raise AllocationRefused(
                Refusal.INVALID,
                f"container {request.container!r} must be named <name>._."
                f"{docker_user(request.user)} to hold GPUs for {request.user}",
            )
        quota = await self.limits.quota(request.user)
        if quota.archived and not request.slot_ids:
            raise NotPermitted(
                f"{request.user} is listed in archived.members: their access is withdrawn; "
                "an admin can restore it by removing them from that file"
            )
        if wait_until is None or wait_until <= time.time():
            return await self._allocate_now(request, quota, waiter=None)
        if wait_until - time.time() > MAX_WAIT:
            raise AllocationRefused(
                Refusal.INVALID, f"a request may wait at most {MAX_WAIT / 3600:g} hours"
            )
        # What no state of the cluster could grant is refused before it queues: a waiter
        # holds back what it wants from everyone behind it.
        wanted = checked(request, quota) if not request.slot_ids else len(request.slot_ids)
        return await self._allocate_waiting(request, quota, wait_until, max(1, wanted))

    async def _allocate_now(
        self, request: Request, quota: Quota, waiter: str | None
    ) -> list[Granted]:
        if waiter is None and self.cache is not None and self.cache.live:
            # Again after losing a slot to another allocator: the view knows who has it.
            for _attempt in range(AT_ONCE_ATTEMPTS):
                granted = await self._allocate_at_once(request, quota, self.cache)
                if granted is not LOST:
                    break
            if isinstance(granted, list):
                return granted
            self.stats.locked_fallbacks += 1
        return await self._allocate_locked(request, quota, waiter)

    def _holders(self, snapshot: Snapshot) -> dict[SlotKey, Holder]:
        """The snapshot's holders and this process's claims still on their way to etcd
        (a copy of the fleet's holders only while there are such claims)."""
        if not self._in_flight:
            return snapshot.holders
        return {**self._in_flight, **snapshot.holders}

    def _share(self) -> Container[SlotKey]:
        """This process's share of its node's slots, as the watched view knows the
        node's allocators; none where it does not."""
        if self.me is None or self.cache is None:
            return ()
        return self.cache.view.share(self.me) or ()

    def _lost(self) -> None:
        self.stats.claim_conflicts += 1
        self._contended_until = time.monotonic() + CONTENDED_FOR

    async def _allocate_at_once(
        self, request: Request, quota: Quota, cache: ClusterCache
    ) -> list[Granted] | object | None:
        """The common case in one etcd round trip: plan on the watched view and claim
        with comparisons that make a stale view harmless (see ClusterCache). None when
        the view cannot settle it (a refusal, a retry); LOST when another allocator took
        a planned slot first (the view now knows). The locked path decides what the view
        cannot, on a fresh read, so every answer given stays as before."""
        generation = cache.generation(request.user)
        view = cache.view
        held = view.held_by_user(request.user)
        if held is None or request.container in view.container_keys or request.slot_ids:
            return None  # the view lacks a slot, or the container holds some: read afresh
        try:  # on its node's slots alone when it names one (the containers service does)
            chosen = self._plan(request, quota, view.snapshot(request.node), None, held)
        except (AllocationRefused, NotPermitted):
            return None
        if isinstance(chosen, list):
            return None
        holder = Holder(request.user, request.container, time.time(), quota.priority)
        keys = [(s.node, s.slot_id) for s in chosen.slots]
        self._in_flight.update(dict.fromkeys(keys, holder))
        try:
            revision = await self.state.claim_at_once(chosen, holder, request.user, generation)
        finally:
            for key in keys:
                self._in_flight.pop(key, None)
        if isinstance(revision, list):  # lost: what etcd has instead goes into the view
            cache.observed(revision)
            if any(found is not None for _key, found in revision):  # a slot, not the lock
                self._lost()
            return LOST
        cache.claimed(keys, holder, request.user, revision)
        _log_preemptions(chosen, request.container)
        self.stats.preemptions += len(chosen.preempt)
        self.stats.claimed_at_once += 1
        return [Granted(slot, holder) for slot in chosen.slots]

    async def _allocate_locked(
        self, request: Request, quota: Quota, waiter: str | None
    ) -> list[Granted]:
        """Lock the user and read, plan, claim and unlock: two etcd round trips."""
        deadline = time.monotonic() + self.lock_ttl + 5
        for attempt in range(CLAIM_ATTEMPTS):
            if attempt:  # lost to another process: back off a random moment, then re-plan
                await asyncio.sleep(random.uniform(0, 0.005 * attempt))
            lock = await self.state.lock_and_read(request.user)
            if lock.snapshot is not None:
                try:
                    chosen = self._plan(request, quota, lock.snapshot, waiter)
                except BaseException:
                    await self.state.unlock(lock)
                    raise
                if isinstance(chosen, list):  # the container already holds these
                    await self.state.unlock(lock)
                    return chosen
                holder = Holder(request.user, request.container, time.time(), quota.priority)
                keys = [(s.node, s.slot_id) for s in chosen.slots]
                self._in_flight.update(dict.fromkeys(keys, holder))
                try:
                    claimed = await self.state.claim(chosen, holder, lock)
                except BaseException:  # etcd failed, timed out or the call was cancelled
                    self.state.unlock_soon(lock)
                    raise
                finally:
                    for key in keys:
                        self._in_flight.pop(key, None)
                if claimed:
                    _log_preemptions(chosen, request.container)
                    self.stats.preemptions += len(chosen.preempt)
                    return [Granted(slot, holder) for slot in chosen.slots]
                self._lost()
                continue
            # Another request of this user holds the lock (or a dead process still does,
            # until its lease runs out): wait for it outside this process's claim queue.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AllocationRefused(
                    Refusal.NO_CAPACITY,
                    f"another allocation for {request.user} held the lock too long; try again",
                )
            self.stats.lock_waits += 1
            await self.state.wait_unlocked(lock, remaining)
        raise AllocationRefused(
            Refusal.NO_CAPACITY, "the slots kept being taken by others; try again"
        )

    def _plan(
        self,
        request: Request,
        quota: Quota,
        snapshot: Snapshot,
        waiter: str | None,
        held: float | None = None,
    ) -> Plan | list[Granted]:
        """``held``: what the user holds on every node, when ``snapshot`` is one node's."""
        existing = snapshot.held_by(request.container)
        if existing:
            self._check_owner(existing, Actor(request.user, False))
            return _granted(snapshot, existing)
        if request.slot_ids:  # adopting slots in use: no quota, no queue
            return plan_exact(request, snapshot.slots, self._holders(snapshot))
        drained = snapshot.drained_slots()
        holders = self._holders(snapshot)
        index = snapshot.fleet
        if index is not None and holders is not snapshot.holders:  # claims in flight
            index = index.with_held(key for key in self._in_flight if key not in snapshot.holders)
        spread = time.monotonic() < self._contended_until
        chosen = plan(
            request,
            quota,
            snapshot.slots.values(),
            holders,
            set(snapshot.nodes),
            self.strategy,
            held,
            drained,
            spread=spread,
            in_order=True,  # a Snapshot's slots are
            index=index,
            share=self._share() if spread else (),
        )
        # Waiters served before this request that want what it would take: slots of the
        # same kind (full GPU or MIG slice) on the same node. One for another node, or for
        # the other kind, holds nothing back here.
        nodes = {slot.node for slot in chosen.slots}
        kinds = {slot.is_mig for slot in chosen.slots}
        ahead = [
            w.slots
            for w in _waiting_ahead(snapshot.waiters, waiter, quota.priority)
            if (not w.node or w.node in nodes) and _competes(w.preference, kinds)
        ]
        if ahead:  # counted among the free slots alone where the view keeps them
            unheld = snapshot.fleet.free if snapshot.fleet is not None else snapshot.slots
            free = sum(
                1
                for key, slot in unheld.items()
                if key[0] in snapshot.nodes
                and key[0] in nodes
                and key not in snapshot.holders
                and key not in self._in_flight
                and key not in drained
                and slot.is_mig in kinds
            )
            if free - sum(ahead) < len(chosen.slots):
                raise AllocationRefused(
                    Refusal.NO_CAPACITY,
                    f"{len(ahead)} waiting request(s) with the same or a higher "
                    "priority are served first",
                )
        return chosen

    async def _allocate_waiting(
        self, request: Request, quota: Quota, deadline: float, wanted: int
    ) -> list[Granted]:
        """Queue by priority, then arrival: a waiter may claim only what the waiters ahead
        of it leave free, so it never takes a slot from a higher-priority or earlier one."""
        queued = [w for w in await self.state.waiters() if w.user == request.user]
        if len(queued) >= MAX_WAITING_PER_USER:
            raise AllocationRefused(
                Refusal.QUOTA,
                f"{request.user} already waits for a GPU {len(queued)} times (at most "
                f"{MAX_WAITING_PER_USER}): let one be served or give up first",
            )
        waiter = WaiterRecord(
            node=request.node,
            slots=wanted,
            user=request.user,
            container=request.container,
            preference=request.preference.value,
            priority=quota.priority,
            since=time.time(),
            until=deadline,
        )
        # On a lease this loop renews: a waiter whose call is gone (cancelled, its
        # process dead) leaves the queue within WAITER_TTL, not at its deadline.
        enqueued = asyncio.ensure_future(self.state.enqueue_waiter(waiter, WAITER_TTL))
        try:
            key, lease = await asyncio.shield(enqueued)
            while True:
                await self.state.renew(lease)
                snapshot = await self.state.snapshot()
                # To its end even if the caller leaves meanwhile: a claim cut off may
                # still commit, and only a claim that has landed can be given back.
                attempt = asyncio.ensure_future(self._allocate_now(request, quota, key))
                try:
                    return await asyncio.shield(attempt)
                except asyncio.CancelledError:
                    await landed(attempt)
                    raise
                except AllocationRefused as refused:
                    if refused.kind is not Refusal.NO_CAPACITY:
                        raise
                    last = refused
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise AllocationRefused(
                        Refusal.NO_CAPACITY, f"waited until the deadline: {last.message}"
                    )
                await self._wait_for_change(snapshot.revision, min(remaining, WAITER_TTL / 3))
        finally:
            # To the end even if the caller's cancel comes again: a waiter left queued
            # holds back what it wanted until its lease runs out.
            await asyncio.shield(self._dequeue(enqueued))

    async def _dequeue(self, enqueued: asyncio.Future[tuple[str, object]]) -> None:
        with contextlib.suppress(Exception):
            await self.state.dequeue_waiter(*await enqueued)

    async def give_back(self, container: str, since: float) -> None:
        """Release what ``container`` was granted from ``since`` on: the caller who asked
        has gone (a grant it never received, or a claim cut off that landed anyway)."""
        held = [
            (key, holder)
            for key, holder in (await self.state.snapshot()).held_by(container)
            if holder.since >= since
        ]
        if not held:
            return
        user = held[0][1].user  # the caller, who gave up: the release is theirs
        mark = ReleaseMark(container, user, by=user, reason="caller gone", at=time.time())
        if await self.state.release(held, mark):
            log.info("gave back %s's GPUs: the call that got them was gone", container)

    async def _wait_for_change(self, after_revision: int, timeout: float) -> None:
        """Until holders or waiters may have changed: told by the watched view while it
        is live, else (etcd away, or no view) a short poll."""
        if self.cache is not None and self.cache.live:
            await self.cache.wait_for_change(after_revision, timeout)
        else:
            await asyncio.sleep(min(timeout, CHANGE_POLL))

    async def release(self, container: str, actor: Actor) -> list[str]:
        """A slot belongs to one container: while that container exists it keeps the GPU
        in its environment, so only admins and the services may free the slot under it."""
        exists = self.container_exists

        async def change(held: list[tuple[SlotKey, Holder]]) -> Holder | None:
            # Asked of the nodes the slots are on (a container's GPUs are its node's):
            # one read, however large the fleet.
            nodes = {node for (node, _), _ in held}
            if not actor.privileged and exists is not None and await exists(container, nodes):
                name = container.rsplit("._.", 1)[0]
                raise StillInUse(
                    f"{container} still exists and has this GPU in its environment: remove "
                    f"it (`ds01 container remove {name}`) to free the GPU, or stop it "
                    f"(`ds01 container stop {name}`) to hold it only for a while"
                )
            holder = held[0][1]
            mark = ReleaseMark(container=container, user=holder.user, by=actor.name, at=time.time())
            return holder if await self.state.release(held, mark) else None

        held, _ended = await self._change(container, actor, change)
        if self.cache is not None:
            self.cache.released(held)
        return [f"{node}/{slot_id}" for (node, slot_id), _ in held]

    async def mark_stopped(
        self, container: str, actor: Actor, manual: bool = False
    ) -> list[Granted]:
        """Keep the slots for the user's gpu_hold_after_stop (or, after a person's stop,
        gpu_hold_after_manual_stop); etcd ends the hold on time."""
        now = time.time()

        async def change(held: list[tuple[SlotKey, Holder]]) -> Holder | None:
            if held[0][1].stopped:  # already held: the hold keeps its original end
                return await self.state.unchanged(held)
            seconds = await self.limits.hold_seconds(held[0][1].user, manual)
            until = now + seconds if seconds is not None else None
            holder = replace(held[0][1], stopped_at=now, hold_until=until)
            return await self.state.rewrite(held, holder, seconds)

        return await self._granted_after(container, *await self._change(container, actor, change))

    async def clear_stopped(self, container: str, actor: Actor) -> list[Granted]:
        async def change(held: list[tuple[SlotKey, Holder]]) -> Holder | None:
            if not held[0][1].stopped:
                return await self.state.unchanged(held)
            return await self.state.rewrite(held, held[0][1].running(), None)

        return await self._granted_after(container, *await self._change(container, actor, change))

    async def expire_overdue(self, now: float | None = None) -> int:
        """End holds whose time is up but whose lease still runs: etcd restarts every
        lease's time to live when it restarts or changes leader. Returns how many ended."""
        now = time.time() if now is None else now
        # From the watched view's holds while it is live: every allocator sweeps each
        # second, and a pass over the fleet's holders each time would follow the fleet's
        # size. A stale holder only fails the comparison of its expiry; the next sweep
        # sees it.
        cache = self.cache
        if cache is not None and cache.live:
            holders: Mapping[SlotKey, Holder] = cache.view.holds
        else:
            holders = (await self.state.snapshot()).holders
        overdue = [
            (key, holder)
            for key, holder in holders.items()
            if holder.hold_until is not None and holder.hold_until < now
        ]
        return sum([await self.state.expire(key, holder) for key, holder in overdue])

    async def _granted_after(
        self, container: str, changed: list[tuple[SlotKey, Holder]], holder: Holder
    ) -> list[Granted]:
        """What ``container`` holds after a change left ``holder`` under each of its
        ``changed`` holdings (all it holds: a change takes every one): each slot's record
        from the watched view, as an allocation's answer has it. Where the view lacks one,
        read afresh from etcd on their nodes alone (a container's slots are its node's)."""
        view = self.cache.view if self.cache is not None and self.cache.live else None
        if view is not None and all(key in view.slots for key, _ in changed):
            return [Granted(view.slots[key], holder) for key, _ in changed]
        granted: list[Granted] = []
        for node in sorted({node for (node, _slot), _holder in changed}):
            snapshot = await self.state.snapshot(node)
            granted += _granted(snapshot, snapshot.held_by(container))
        return granted

    async def validate(self, container: str, node: str, slot_id: str, actor: Actor) -> str | None:
        """None if the slot exists and is still this container's; else why not. Read on
        ``node`` alone (the nodes' records, with whether each is up, are read whole); for
        a user, the whole fleet too where the container holds nothing on ``node``, to
        know whose it is. The common answer, yes, reads the slot's three keys alone."""
        slot, holder, up = await self.state.slot_state(node, slot_id)
        if slot is not None and up and holder is not None and holder.container == container:
            self._check_owner([((node, slot_id), holder)], actor)
            return None
        snapshot = await self.state.snapshot(node)
        held = snapshot.held_by(container)
        if not held and not actor.privileged:  # whose it is, though its slots are elsewhere
            held = (await self.state.snapshot()).held_by(container)
        if held:
            self._check_owner(held, actor)
        if (node, slot_id) not in snapshot.slots:
            return f"slot {slot_id} no longer exists on node {node}"
        if node not in snapshot.nodes:
            return f"node {node} is down"
        holder = snapshot.holders.get((node, slot_id))
        if holder is None:
            return f"slot {slot_id} on {node} is no longer allocated to {container}"
        if holder.container != container:
            # Only its owner and admins learn the other container's name: a service
            # asking for a user would pass it on to that user.
            if holder.user == actor.name or (actor.privileged and not is_service(actor.name)):
                return f"slot {slot_id} on {node} now belongs to {holder.container}"
            return f"slot {slot_id} on {node} now belongs to another container"
        return None

    async def queue(self) -> list[WaiterRecord]:
        """Who waits for slots, in the order they will be served."""
        return await self.state.waiters()

    async def drain(self, node: str, gpu: str, reason: str, actor: Actor) -> DrainRecord:
        """No new allocations on ``node`` (or its GPU ``gpu``) from now on; what is
        allocated there stays. Admins only: a drain turns every user away."""
        self._check_admin(actor, "drain")
        await self._check_target(node, gpu)
        record = DrainRecord(node, gpu, actor.name, reason, time.time())
        return await self.state.drain(record)

    async def undrain(self, node: str, gpu: str, actor: Actor) -> DrainRecord | None:
        """Allocations on that target again; the drain it had, or None if none."""
        self._check_admin(actor, "undrain")
        return await self.state.undrain(node, gpu)

    @staticmethod
    def _check_admin(actor: Actor, what: str) -> None:
        if not actor.privileged or is_service(actor.name):
            raise NotPermitted(f"only admins may {what} nodes and GPUs; {actor.name} is not one")

    async def _check_target(self, node: str, gpu: str) -> None:
        """A drain names a node with slots, and a GPU that node has: a typo must not
        record a drain that keeps nothing off anything."""
        slots = (await self.state.snapshot()).slots.values()
        nodes = sorted({s.node for s in slots})
        if node not in nodes:
            raise NotFound(f"no node {node!r} has GPUs here; known: {', '.join(nodes) or 'none'}")
        gpus = sorted({s.gpu for s in slots if s.node == node}, key=lambda g: (len(g), g))
        if gpu and gpu not in gpus:
            raise NotFound(f"node {node} has no GPU {gpu}; it has GPUs {', '.join(gpus)}")

    async def observed(self) -> Snapshot:
        """The fleet as the watched view has it while the view is live (no etcd read:
        what a metrics scrape reports, on every allocator of the fleet), else read."""
        cache = self.cache
        if cache is not None and cache.live:
            return cache.view.snapshot()
        return await self.state.snapshot()

    async def status(self, user: str = "", node: str = "") -> Snapshot:
        """The fleet's slots and holders, or a node's, or those ``user`` holds. A user's
        own (what `container list` shows) come from the watched view while it is live,
        at a cost that follows the user's holdings; everything else is read from etcd,
        as the reconciler's release of orphaned allocations needs it (a node's: that
        node's keys alone)."""
        cache = self.cache
        if user and cache is not None and cache.live:
            snapshot = cache.view.snapshot_of_user(user)
        else:
            snapshot = await self.state.snapshot(node)
        if not user and not node:
            return snapshot
        return replace(
            snapshot,
            slots={k: s for k, s in snapshot.slots.items() if not node or k[0] == node},
            holders={
                k: h
                for k, h in snapshot.holders.items()
                if (not node or k[0] == node) and (not user or h.user == user)
            },
        )

    async def _change(
        self,
        container: str,
        actor: Actor,
        change: Callable[[list[tuple[SlotKey, Holder]]], Awaitable[Holder | None]],
    ) -> tuple[list[tuple[SlotKey, Holder]], Holder]:
        """Apply ``change`` to the container's holder keys, re-reading on a lost race;
        the keys as they were, and the holder the change left under them (a release: the
        one it ended). ``change`` answers None where a key had changed meanwhile. The
        first try takes the keys from the watched view: ``change`` compares their
        revisions, so a stale view only costs the fresh read that follows."""
        cache = self.cache
        if cache is not None and cache.live:
            held = cache.view.snapshot().held_by(container)  # by the view's index
            owners = {h.user for _, h in held}
            allowed = len(owners) == 1 and (actor.privileged or owners == {actor.name})
            # Else the fresh read decides, and says why.
            if allowed and (after := await change(held)) is not None:
                return held, after
        for _attempt in range(CLAIM_ATTEMPTS):
            held = (await self.state.snapshot()).held_by(container)
            if not held:
                raise NotFound(f"container {container} holds no GPU")
            self._check_owner(held, actor)
            if (after := await change(held)) is not None:
                return held, after
            await asyncio.sleep(0)
        raise AllocationRefused(Refusal.NO_CAPACITY, f"{container} kept changing; try again")

    @staticmethod
    def _check_owner(held: list[tuple[SlotKey, Holder]], actor: Actor) -> None:
        owners = {holder.user for _, holder in held}
        owner = held[0][1].user
        if len(owners) > 1:  # cannot happen with names tied to users; never act on a mix
            raise NotPermitted(f"{held[0][1].container} is held by several users: {owners}")
        if not actor.privileged and owner != actor.name:
            raise NotPermitted(
                f"{actor.name} may not act on {held[0][1].container}, owned by {owner}"
            )


def _log_preemptions(chosen: Plan, container: str) -> None:
    for slot, displaced in chosen.preempt:
        log.info(
            "%s:%s taken from stopped %s (%s, priority %d) for %s",
            slot.node,
            slot.slot_id,
            displaced.container,
            displaced.user,
            displaced.priority,
            container,
        )


def _granted(snapshot: Snapshot, held: list[tuple[SlotKey, Holder]]) -> list[Granted]:
    return [Granted(snapshot.slots[key], holder) for key, holder in held if key in snapshot.slots]


def _waiting_ahead(
    waiters: list[tuple[str, WaiterRecord]], mine: str | None, priority: int
) -> list[WaiterRecord]:
    """The waiters to serve before this request: those queued before it, or, for a
    request that does not wait, those of the same or a higher priority (waiter keys start
    with 1_000_000 - priority: a smaller number is a higher priority)."""
    keys = [key for key, _ in waiters]
    if mine in keys:
        return [waiter for _, waiter in waiters[: keys.index(mine)]]
    return [
        waiter for key, waiter in waiters if int(key.rsplit("/", 2)[-2]) <= 1_000_000 - priority
    ]


def _competes(preference: str, kinds: set[bool]) -> bool:
    """Whether a waiter of this preference could take slots of these kinds (is_mig)."""
    if preference == "mig":
        return True in kinds
    if preference == "full":
        return False in kinds
    return True
