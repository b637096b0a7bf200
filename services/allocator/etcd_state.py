"""The allocator's etcd adapter: snapshots, claiming transactions, holds, locks, nodes.

Every change to a holder key is a transaction that compares what was read (a missing
key's create revision is 0; an existing one's mod revision is unchanged), so two
allocators, on one host or several, can never both win a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Collection, Container, Mapping
from dataclasses import dataclass, field, replace

import aetcd
from aetcd.utils import prefix_range_end

from ds01.allocator.batching import TxnBatcher
from ds01.allocator.placement import FleetIndex, Plan, SlotKey
from ds01.allocator.records import (
    ALLOCATORS,
    CLAIMS,
    DRAINS,
    HOLDERS,
    NODES,
    RELEASED,
    ROOT,
    SLOTS,
    USER_LOCKS,
    WAITERS,
    DrainRecord,
    Holder,
    NodeRecord,
    ReleaseMark,
    SlotRecord,
    WaiterRecord,
    drain_key,
    slot_key,
    split_slot_key,
)
from ds01.core.leases import LeasedKey
from ds01.core.watch import DELETE, Compacted, WatchEnded, only, watching

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    slots: dict[SlotKey, SlotRecord]  # in numeric order (SlotRecord.order)
    holders: dict[SlotKey, Holder]
    nodes: dict[str, NodeRecord]  # nodes that are up
    waiters: list[tuple[str, WaiterRecord]]  # (waiter key, what it waits for), in order
    revision: int  # changes after this revision are not in the snapshot
    drains: dict[str, DrainRecord] = field(default_factory=dict)  # by target: node[/gpu]
    # Kept by a watched view: each container's slot keys (of the fleet), and the index
    # that placement over the whole fleet reads (a snapshot of the whole fleet only).
    # Like the view's slots and holders they are its live tables, not copies: read them
    # before the next await, or not at all.
    containers: Mapping[str, Collection[SlotKey]] | None = None
    fleet: FleetIndex | None = None

    def drained(self, slot: SlotRecord) -> DrainRecord | None:
        """The drain that keeps new allocations off ``slot``, if any."""
        return self.drains.get(slot.node) or self.drains.get(f"{slot.node}/{slot.gpu}")

    def drained_slots(self) -> Container[SlotKey]:
        """The slots the drains keep new allocations off, asked one at a time: a drain
        or two in a fleet costs no pass over every slot."""
        return _DrainedSlots(self) if self.drains else ()

    def held_by(self, container: str) -> list[tuple[SlotKey, Holder]]:
        """The container's holdings in the order of their slots (a slot no longer listed:
        last on its node); through the view's index of containers where there is one."""
        if self.containers is not None:
            keys = self.containers.get(container, ())
            found = [(key, self.holders[key]) for key in keys if key in self.holders]
        else:
            found = [(key, h) for key, h in self.holders.items() if h.container == container]
        slots = self.slots
        return sorted(
            found, key=lambda pair: slots[pair[0]].order if pair[0] in slots else (pair[0][0], ())
        )


class _DrainedSlots:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def __contains__(self, key: object) -> bool:
        slot = self.snapshot.slots.get(key)  # type: ignore[call-overload]
        return slot is not None and self.snapshot.drained(slot) is not None


def in_numeric_order(slots: dict[SlotKey, SlotRecord]) -> dict[SlotKey, SlotRecord]:
    """``slots`` in the order placement reads them (etcd lists "10" before "2")."""
    return dict(sorted(slots.items(), key=lambda item: item[1].order))


@dataclass(frozen=True)
class UserLock:
    key: bytes
    token: bytes
    snapshot: Snapshot | None  # None: another request holds the lock
    held_revision: int  # when held by another: the revision it was taken at

    @property
    def user(self) -> str:
        return self.key.decode().removeprefix(USER_LOCKS)


LEASE_GONE = "requested lease not found"  # etcd's words for a lease that expired
UNLOCK_TIMEOUT = 5.0  # seconds for one attempt to release a lock

# What a snapshot reads: not the release marks or the locks.
_SNAPSHOT_PREFIXES = (SLOTS, HOLDERS, NODES, WAITERS, DRAINS)


class _Decoder:
    """Turns key-values into records, decoding each version of a key only once."""

    def __init__(self) -> None:
        self._seen: dict[tuple[bytes, int], object] = {}

    def snapshot(self, ranges: list[list], revision: int) -> Snapshot:
        slots_kvs, holder_kvs, node_kvs, waiter_kvs, drain_kvs = ranges
        seen: dict[tuple[bytes, int], object] = {}
        slots = {
            split_slot_key(SLOTS, kv.key): self._decode(seen, kv, SlotRecord.decode)
            for kv in slots_kvs
        }
        holders = {
            split_slot_key(HOLDERS, kv.key): self._decode(
                seen, kv, lambda _value, kv=kv: Holder.of(kv)
            )
            for kv in holder_kvs
        }
        nodes = {
            (record := self._decode(seen, kv, NodeRecord.decode)).node: record for kv in node_kvs
        }
        self._seen = seen  # forget versions no longer current
        waiters = sorted((kv.key.decode(), waiting(kv.value)) for kv in waiter_kvs)
        drains = {(d := DrainRecord.decode(kv.value)).target: d for kv in drain_kvs}
        return Snapshot(in_numeric_order(slots), holders, nodes, waiters, revision, drains)  # type: ignore[arg-type]

    def _decode(self, seen: dict, kv: object, decode: object) -> object:
        version = (kv.key, kv.mod_revision)  # type: ignore[attr-defined]
        record = self._seen.get(version)
        if record is None:
            record = decode(kv.value)  # type: ignore[attr-defined, operator]
        seen[version] = record
        return record


def waiting(value: bytes) -> WaiterRecord:
    """A waiter's record; one slot on any node, of any kind, where it cannot be read."""
    try:
        return WaiterRecord.decode(value)
    except (ValueError, TypeError):
        return WaiterRecord(node="", slots=1)


def _ranges(responses: list) -> list[list]:
    """The key-values of each range read in a transaction's responses."""
    return [[get for _value, get in response] for response in responses]


class EtcdState:
    def __init__(self, client: aetcd.Client, lock_ttl: int = 10) -> None:
        self.client = client
        self.lock_ttl = lock_ttl
        self._lease: aetcd.leases.Lease | None = None
        self._session_lock = asyncio.Lock()
        self._keepalive: asyncio.Future[None] | None = None
        self._decoder = _Decoder()
        self.batched = TxnBatcher(client)  # claims and releases under way at once
        self._unlocking: set[asyncio.Future[None]] = set()  # locks still to be released

    def _reads(self, node: str = "") -> list:
        """The snapshot's range reads; ``node``: that node's slots and holders alone."""
        tx = self.client.transactions
        prefixes = [
            f"{p}{node}/" if node and p in (SLOTS, HOLDERS) else p for p in _SNAPSHOT_PREFIXES
        ]
        return [tx.get(p.encode(), prefix_range_end(p.encode())) for p in prefixes]

    async def snapshot(self, node: str = "") -> Snapshot:
        """Slots, holders, nodes, waiters and drains in one consistent read; ``node``: of
        that node's slots and holders only, at a cost that follows the node, not the
        fleet (each node's reconciler asks every sweep)."""
        reads = self._reads(node)
        _, responses = await self.client.transaction(compare=[], success=reads, failure=[])
        # A node's few records are decoded afresh: the shared cache holds the fleet's.
        decoder = _Decoder() if node else self._decoder
        return decoder.snapshot(_ranges(responses), await self._revision(responses))

    async def slot_state(
        self, node: str, slot_id: str
    ) -> tuple[SlotRecord | None, Holder | None, bool]:
        """One slot's record and holder, and whether its node is up, in one consistent
        read of three keys: what a start checks of each of its container's slots."""
        tx = self.client.transactions
        keys = (slot_key(SLOTS, node, slot_id), slot_key(HOLDERS, node, slot_id),
                f"{NODES}{node}".encode())  # fmt: skip
        _, responses = await self.client.transaction(
            compare=[], success=[tx.get(key) for key in keys], failure=[]
        )
        slot_kvs, holder_kvs, node_kvs = _ranges(responses)
        slot = SlotRecord.decode(slot_kvs[0].value) if slot_kvs else None
        holder = Holder.of(holder_kvs[0]) if holder_kvs else None
        return slot, holder, bool(node_kvs)

    async def _revision(self, responses: list) -> int:
        """The revision a transaction read at: every Get it returned carries it."""
        for response in responses:
            for _value, get in response:
                return get.header.revision
        return await self.current_revision()  # every range was empty: a later revision

    async def current_revision(self) -> int:
        """etcd's revision now, from an empty range read (no values travel)."""
        return (await self.client.get_prefix(f"{ROOT}revision-probe/".encode())).header.revision

    async def snapshot_for_view(self) -> tuple[Snapshot, dict[str, int], list[tuple[str, str]]]:
        """What a watched view starts from, read together: a snapshot, each user's claim
        generation (mod revision), and the allocators that are up, as (node, id)."""
        tx = self.client.transactions
        claims, allocators = (tx.get(p.encode(), prefix_range_end(p.encode()))
                              for p in (CLAIMS, ALLOCATORS))  # fmt: skip
        _, responses = await self.client.transaction(
            compare=[], success=[*self._reads(), claims, allocators], failure=[]
        )
        ranges = _ranges(responses)
        generations = {kv.key.decode().removeprefix(CLAIMS): kv.mod_revision for kv in ranges[-2]}
        up = [split_slot_key(ALLOCATORS, kv.key) for kv in ranges[-1]]
        snapshot = self._decoder.snapshot(ranges[:-2], await self._revision(responses))
        return snapshot, generations, up

    async def claim_at_once(
        self, plan: Plan, holder: Holder, user: str, generation: int
    ) -> int | list[tuple[SlotKey, Holder | None]]:
        """Claim without taking the user's lock: one transaction that holds only if the
        lock is free, the user's claims are still at ``generation`` and every slot is as
        planned. The revision it committed at; if it did not hold, the planned slots'
        holders as etcd has them (for the view: another allocator was faster)."""
        tx = self.client.transactions
        lock, claims = f"{USER_LOCKS}{user}".encode(), f"{CLAIMS}{user}".encode()
        compare = [tx.create(lock) == 0, tx.mod(claims) == generation]
        compare += self._slot_compares(plan)
        keys = [slot_key(HOLDERS, s.node, s.slot_id) for s in plan.slots]
        puts = [tx.put(key, holder.encode()) for key in keys]
        succeeded, responses = await self.batched.transaction(
            compare=compare, success=[*puts, tx.put(claims, b"")], failure=[tx.get(k) for k in keys]
        )
        if succeeded:
            return responses[-1].response_put.header.revision
        found = []
        for slot, response in zip(plan.slots, responses, strict=True):
            kv = response[0][1] if response else None
            holder_now = Holder.of(kv) if kv else None
            found.append(((slot.node, slot.slot_id), holder_now))
        return found

    def _slot_compares(self, plan: Plan) -> list:
        """Free slots still free, displaced holders still as read, and no drain on any
        planned slot's node or GPU (a drain that commits first wins the race)."""
        tx = self.client.transactions
        compare = [tx.create(slot_key(HOLDERS, s.node, s.slot_id)) == 0 for s in plan.claim]
        compare += [
            tx.mod(slot_key(HOLDERS, s.node, s.slot_id)) == displaced.mod_revision
            for s, displaced in plan.preempt
        ]
        drains = {drain_key(s.node) for s in plan.slots} | {
            drain_key(s.node, s.gpu) for s in plan.slots
        }
        compare += [tx.create(key) == 0 for key in sorted(drains)]
        return compare

    async def lock_and_read(self, user: str) -> UserLock:
        """Take the user's lock and read a snapshot, in one transaction.

        The lock key lives on this process's session lease: if the process dies, etcd
        deletes it when the lease runs out, and the next request proceeds.
        """
        key = f"{USER_LOCKS}{user}".encode()
        token = uuid.uuid4().bytes
        try:
            session = await self._session()
            try:
                won, responses = await self._take(key, token, session)
            except aetcd.exceptions.ClientError as err:
                if LEASE_GONE not in str(err):
                    raise
                # The session lease ran out while etcd was out of reach (a partition
                # longer than lock_ttl): its locks are gone with it; start a new one.
                await self._end_session(session)
                won, responses = await self._take(key, token, await self._session())
        except BaseException:  # etcd may have taken the lock before the answer was lost
            self.unlock_soon(UserLock(key, token, None, 0))
            raise
        if not won:
            held = responses[0][0][1] if responses and responses[0] else None
            return UserLock(key, token, None, held.mod_revision if held else 0)
        revision = responses[0].response_put.header.revision
        return UserLock(key, token, self._decoder.snapshot(_ranges(responses[1:]), revision), 0)

    async def _take(self, key: bytes, token: bytes, session: aetcd.leases.Lease) -> tuple:
        tx = self.client.transactions
        return await self.client.transaction(
            compare=[tx.create(key) == 0],
            success=[tx.put(key, token, lease=session), *self._reads()],
            failure=[tx.get(key)],
        )

    async def unlock(self, lock: UserLock) -> None:
        """Release ``lock`` if it is still ours; when etcd cannot be reached, keep trying
        in the background, so that a failure never leaves the user locked out."""
        try:
            await self._unlock_once(lock)
        except Exception as err:
            log.warning("cannot release the lock of %s yet (%s); retrying", lock.user, err)
            self.unlock_soon(lock)

    def unlock_soon(self, lock: UserLock) -> None:
        """Release ``lock`` in the background, for paths that are failing or cancelled."""
        task = asyncio.ensure_future(self._unlock_until_done(lock))
        self._unlocking.add(task)
        task.add_done_callback(self._unlocking.discard)

    async def _unlock_until_done(self, lock: UserLock) -> None:
        delay = 0.1
        while True:
            try:
                await self._unlock_once(lock)
                return
            except Exception as err:
                log.debug("lock of %s not released yet: %s", lock.user, err)
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)

    async def _unlock_once(self, lock: UserLock) -> None:
        tx = self.client.transactions
        await asyncio.wait_for(
            self.client.transaction(
                compare=[tx.value(lock.key) == lock.token],
                success=[tx.delete(lock.key)],
                failure=[],
            ),
            UNLOCK_TIMEOUT,
        )

    async def wait_unlocked(self, lock: UserLock, timeout: float) -> None:
        """Return once the lock another request holds is deleted, or after ``timeout``.
        Bounded as a whole, the watch's creation included: the caller tries again."""
        with contextlib.suppress(TimeoutError, WatchEnded):
            async with asyncio.timeout(max(0.1, timeout)):
                await self._gone(lock.key, lock.held_revision)

    async def _gone(self, key: bytes, held_at: int) -> None:
        """Return once ``key``, as etcd had it at revision ``held_at``, is deleted."""
        after = held_at + 1
        while True:
            try:
                async with watching(self.client, [only(key)], after) as stream:
                    async for events in stream:
                        if any(event.type == DELETE for event in events):
                            return
            except Compacted as err:  # history no longer reaches back: etcd's key says
                now = await self.client.get(key)
                if now is None or now.mod_revision != held_at:
                    return
                after = err.revision

    async def claim(self, plan: Plan, holder: Holder, lock: UserLock) -> bool:
        """Take every slot of ``plan`` in one transaction, or none of them; either way
        the user's lock is released in the same transaction."""
        tx = self.client.transactions
        compare = [tx.value(lock.key) == lock.token, *self._slot_compares(plan)]
        puts = [tx.put(slot_key(HOLDERS, s.node, s.slot_id), holder.encode()) for s in plan.slots]
        claims = tx.put(f"{CLAIMS}{lock.user}".encode(), b"")  # a newer generation: see CLAIMS
        unlock = tx.txn(
            compare=[tx.value(lock.key) == lock.token], success=[tx.delete(lock.key)], failure=[]
        )
        succeeded, _ = await self.client.transaction(
            compare=compare, success=[*puts, claims, tx.delete(lock.key)], failure=[unlock]
        )
        return succeeded

    async def _session(self) -> aetcd.leases.Lease:
        async with self._session_lock:  # one lease at a time, however many ask at once
            if self._lease is None:
                self._lease = await self.client.lease(self.lock_ttl)
                self._keepalive = asyncio.ensure_future(self._keep_session(self._lease))
            return self._lease

    async def _end_session(self, lease: aetcd.leases.Lease) -> None:
        """Forget ``lease`` (etcd dropped it) unless a newer one replaced it already."""
        async with self._session_lock:
            if self._lease is lease:
                self._lease = None
                if self._keepalive is not None:
                    self._keepalive.cancel()

    async def _keep_session(self, lease: aetcd.leases.Lease) -> None:
        while True:
            await asyncio.sleep(self.lock_ttl / 3)
            try:
                await lease.refresh()
                alive = await lease.remaining_ttl() > 0
            except Exception as err:
                log.warning("session lease refresh failed: %s", err)
                alive = False
            if not alive:  # a new lease next time; locks on the old one are gone with it
                if self._lease is lease:
                    self._lease = None
                return

    async def close(self) -> None:
        for task in self._unlocking:  # the session lease ends below, and its locks with it
            task.cancel()
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._lease.revoke()
            self._lease = None

    def _as_read(self, held: list[tuple[SlotKey, Holder]]) -> list:
        """Comparisons that hold while every holder key of ``held`` is as it was read."""
        tx = self.client.transactions
        return [tx.mod(slot_key(HOLDERS, *key)) == h.mod_revision for key, h in held]

    async def release(self, held: list[tuple[SlotKey, Holder]], mark: ReleaseMark) -> bool:
        """Delete the holder keys, marking each as released in the same transaction."""
        tx = self.client.transactions
        compare = self._as_read(held)
        ops = []
        for key, _holder in held:
            ops.append(tx.put(slot_key(RELEASED, *key), mark.encode()))
            ops.append(tx.delete(slot_key(HOLDERS, *key)))
        succeeded, _ = await self.batched.transaction(compare=compare, success=ops, failure=[])
        if succeeded:
            await self._revoke_unused({h.lease for _, h in held})
        return succeeded

    async def unchanged(self, held: list[tuple[SlotKey, Holder]]) -> Holder | None:
        """The holder of ``held`` if etcd still has every key of it as it was read (a view
        may lag: a change it finds already made must be so in etcd too); else None."""
        succeeded, _ = await self.client.transaction(
            compare=self._as_read(held), success=[], failure=[]
        )
        return held[0][1] if succeeded else None

    async def rewrite(
        self, held: list[tuple[SlotKey, Holder]], holder: Holder, ttl: float | None
    ) -> Holder | None:
        """Replace the holders of ``held`` by ``holder``: on a lease of ``ttl`` seconds (a
        hold that etcd ends by itself), or without a lease (running, or held forever).
        The holder as etcd now has it (its revision and lease); None where one of
        ``held`` had changed."""
        lease = await self.client.lease(max(1, round(ttl))) if ttl is not None else None
        tx = self.client.transactions
        compare = self._as_read(held)
        puts = [tx.put(slot_key(HOLDERS, *key), holder.encode(), lease=lease) for key, _ in held]
        succeeded, responses = await self.client.transaction(
            compare=compare, success=puts, failure=[]
        )
        if not succeeded:
            if lease is not None:
                await lease.revoke()
            return None
        await self._revoke_unused({h.lease for _, h in held})
        revision = responses[-1].response_put.header.revision
        return replace(holder, mod_revision=revision, lease=lease.id if lease else 0)

    async def expire(self, key: SlotKey, holder: Holder) -> bool:
        """End an overdue hold, as the lease would have: no release mark, so the event
        stream reports it as an expiry."""
        tx = self.client.transactions
        holder_key = slot_key(HOLDERS, *key)
        succeeded, _ = await self.client.transaction(
            compare=[tx.mod(holder_key) == holder.mod_revision],
            success=[tx.delete(holder_key)],
            failure=[],
        )
        if succeeded:
            await self._revoke_unused({holder.lease})
        return succeeded

    async def _revoke_unused(self, leases: set[int]) -> None:
        """Revoke hold leases no key uses any more (the holders were rewritten or deleted)."""
        for lease in leases - {0}:
            with contextlib.suppress(Exception):
                info = await self.client.get_lease_info(lease)
                if not info.keys:
                    await self.client.revoke_lease(lease)

    async def enqueue_waiter(self, waiter: WaiterRecord, ttl: float) -> tuple[str, object]:
        """A key that sorts by priority (highest first), then arrival; its value says how
        many slots the waiter needs, so others may take what it cannot use."""
        lease = await self.client.lease(max(2, round(ttl)))
        order = f"{1_000_000 - waiter.priority:07d}/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        key = f"{WAITERS}{order}"
        await self.client.put(key.encode(), waiter.encode(), lease=lease)
        return key, lease

    async def waiters(self) -> list[WaiterRecord]:
        """Every queued Allocate call, in serving order."""
        found = await self.client.get_prefix(WAITERS.encode())
        ordered = sorted(found, key=lambda kv: kv.key)
        return [WaiterRecord.decode(kv.value) for kv in ordered]

    async def drain(self, record: DrainRecord) -> DrainRecord:
        """Record ``record`` unless that target is drained already: the first drain's
        reason and time stay, so draining twice changes nothing."""
        tx = self.client.transactions
        key = drain_key(record.node, record.gpu)
        succeeded, responses = await self.client.transaction(
            compare=[tx.create(key) == 0], success=[tx.put(key, record.encode())],
            failure=[tx.get(key)],
        )  # fmt: skip
        if succeeded:
            return record
        return DrainRecord.decode(responses[0][0][0])

    async def undrain(self, node: str, gpu: str) -> DrainRecord | None:
        """End the drain of that target; the record it had, or None if it had none."""
        deleted = await self.client.delete(drain_key(node, gpu), prev_kv=True)
        return DrainRecord.decode(deleted.prev_kv.value) if deleted and deleted.prev_kv else None

    async def renew(self, lease: object) -> None:
        """Keep a waiter's lease alive; a failure is the next read's to report."""
        with contextlib.suppress(Exception):
            await lease.refresh()  # type: ignore[attr-defined]

    async def dequeue_waiter(self, key: str, lease: object) -> None:
        with contextlib.suppress(Exception):
            await self.client.delete(key.encode())
            await lease.revoke()  # type: ignore[attr-defined]


class NodeRegistration:
    """Keeps this node's registration alive and its slots recorded.

    The node key lives on a lease this process refreshes; if the process (or the host)
    dies the node shows as down, and its slots stay recorded with their holders.
    """

    def __init__(
        self, client: aetcd.Client, record: NodeRecord, slots: list[SlotRecord], ttl: int = 10
    ) -> None:
        self.client = client
        self.record = record
        self.slots = slots
        self.node_key = LeasedKey(client, f"{NODES}{record.node}".encode(), record.encode(), ttl)

    async def register(self) -> None:
        current = await self.client.get_prefix(f"{SLOTS}{self.record.node}/".encode())
        recorded = {kv.key: kv.value for kv in current}
        wanted = {slot_key(SLOTS, s.node, s.slot_id): s.encode() for s in self.slots}
        for key, value in wanted.items():
            if recorded.get(key) != value:
                await self.client.put(key, value)
        for key in recorded.keys() - wanted.keys():
            await self.client.delete(key)  # gone from the inventory: Validate says so
        await self.node_key.put()

    async def keep_alive(self) -> None:
        await self.node_key.keep()
