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
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aetcd

from ds01.allocator.placement import Plan
from ds01.allocator.records import (
    HOLDERS,
    NODES,
    RELEASED,
    SLOTS,
    USER_LOCKS,
    WAITERS,
    Holder,
    NodeRecord,
    ReleaseMark,
    SlotRecord,
    slot_key,
    split_slot_key,
)

log = logging.getLogger(__name__)

SlotKey = tuple[str, str]  # (node, slot id)


class LockTimeout(Exception):
    """Another request of the same user held the lock for too long."""


@dataclass(frozen=True)
class Snapshot:
    slots: dict[SlotKey, SlotRecord]
    holders: dict[SlotKey, Holder]
    nodes: dict[str, NodeRecord]  # nodes that are up
    waiters: list[str]  # waiter keys in serving order
    revision: int  # changes after this revision are not in the snapshot

    def held_by(self, container: str) -> list[tuple[SlotKey, Holder]]:
        return sorted(
            ((key, h) for key, h in self.holders.items() if h.container == container),
            key=lambda pair: (
                self.slots[pair[0]].order if pair[0] in self.slots else (pair[0][0], ())
            ),
        )


def connect(endpoints: tuple[str, ...]) -> aetcd.Client:
    host, _, port = endpoints[0].rpartition(":")
    return aetcd.Client(host=host, port=int(port), timeout=10)


class EtcdState:
    def __init__(self, client: aetcd.Client) -> None:
        self.client = client

    async def snapshot(self) -> Snapshot:
        slots_, holders_, nodes_, waiters_ = await asyncio.gather(
            self.client.get_prefix(SLOTS.encode()),
            self.client.get_prefix(HOLDERS.encode()),
            self.client.get_prefix(NODES.encode()),
            self.client.get_prefix(WAITERS.encode(), sort_order="ascend", sort_target="key"),
        )
        slots = {split_slot_key(SLOTS, kv.key): SlotRecord.decode(kv.value) for kv in slots_}
        holders = {
            split_slot_key(HOLDERS, kv.key): Holder.decode(kv.value, kv.mod_revision, kv.lease)
            for kv in holders_
        }
        nodes = {(r := NodeRecord.decode(kv.value)).node: r for kv in nodes_}
        waiters = [kv.key.decode() for kv in waiters_]
        revision = min(r.header.revision for r in (slots_, holders_, nodes_, waiters_))
        return Snapshot(slots, holders, nodes, waiters, revision)

    async def claim(self, plan: Plan, holder: Holder) -> bool:
        """Take every slot of ``plan`` in one transaction, or none of them."""
        tx = self.client.transactions
        compare = [tx.create(slot_key(HOLDERS, s.node, s.slot_id)) == 0 for s in plan.claim]
        compare += [
            tx.mod(slot_key(HOLDERS, s.node, s.slot_id)) == displaced.mod_revision
            for s, displaced in plan.preempt
        ]
        puts = [tx.put(slot_key(HOLDERS, s.node, s.slot_id), holder.encode()) for s in plan.slots]
        succeeded, _ = await self.client.transaction(compare=compare, success=puts, failure=[])
        return succeeded

    async def release(self, held: list[tuple[SlotKey, Holder]], mark: ReleaseMark) -> bool:
        """Delete the holder keys, marking each as released in the same transaction."""
        tx = self.client.transactions
        compare = [tx.mod(slot_key(HOLDERS, *key)) == h.mod_revision for key, h in held]
        ops = []
        for key, _holder in held:
            ops.append(tx.put(slot_key(RELEASED, *key), mark.encode()))
            ops.append(tx.delete(slot_key(HOLDERS, *key)))
        succeeded, _ = await self.client.transaction(compare=compare, success=ops, failure=[])
        if succeeded:
            await self._revoke_unused({h.lease for _, h in held})
        return succeeded

    async def rewrite(
        self, held: list[tuple[SlotKey, Holder]], holder: Holder, ttl: float | None
    ) -> bool:
        """Replace the holders of ``held`` by ``holder``: on a lease of ``ttl`` seconds (a
        hold that etcd ends by itself), or without a lease (running, or held forever)."""
        lease = await self.client.lease(max(1, round(ttl))) if ttl is not None else None
        tx = self.client.transactions
        compare = [tx.mod(slot_key(HOLDERS, *key)) == h.mod_revision for key, h in held]
        puts = [tx.put(slot_key(HOLDERS, *key), holder.encode(), lease=lease) for key, _ in held]
        succeeded, _ = await self.client.transaction(compare=compare, success=puts, failure=[])
        if not succeeded and lease is not None:
            await lease.revoke()
        if succeeded:
            await self._revoke_unused({h.lease for _, h in held})
        return succeeded

    async def _revoke_unused(self, leases: set[int]) -> None:
        """Revoke hold leases no key uses any more (the holders were rewritten or deleted)."""
        for lease in leases - {0}:
            with contextlib.suppress(Exception):
                info = await self.client.get_lease_info(lease)
                if not info.keys:
                    await self.client.revoke_lease(lease)

    @contextlib.asynccontextmanager
    async def user_lock(self, user: str, ttl: int, timeout: float) -> AsyncIterator[None]:
        """Hold the user's lock; if this process dies, etcd frees it when ``ttl`` ends."""
        lock = self.client.lock(f"{USER_LOCKS}{user}".encode(), ttl=ttl)
        if not await lock.acquire(timeout=timeout):
            raise LockTimeout(f"another allocation for {user} held the lock for {timeout:.0f}s")
        lease = lock.lease
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await lock.release()
                if lease is not None:
                    await lease.revoke()

    async def enqueue_waiter(self, node: str, priority: int, ttl: float) -> tuple[str, object]:
        """A key that sorts by priority (highest first), then arrival."""
        lease = await self.client.lease(max(2, round(ttl)))
        order = f"{1_000_000 - priority:07d}/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        key = f"{WAITERS}{order}"
        await self.client.put(key.encode(), node.encode(), lease=lease)
        return key, lease

    async def dequeue_waiter(self, key: str, lease: object) -> None:
        with contextlib.suppress(Exception):
            await self.client.delete(key.encode())
            await lease.revoke()  # type: ignore[attr-defined]

    async def wait_for_change(self, after_revision: int, timeout: float) -> None:
        """Return when a holder or waiter changed after ``after_revision``, or on timeout."""
        watches = [
            await self.client.watch_prefix(prefix.encode(), start_revision=after_revision + 1)
            for prefix in (HOLDERS, WAITERS)
        ]

        async def first_event(watch: object) -> None:
            async for _event in watch:  # type: ignore[attr-defined]
                return

        tasks = [asyncio.ensure_future(first_event(w)) for w in watches]
        try:
            await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for watch in watches:
                with contextlib.suppress(Exception):
                    await watch.cancel()


class NodeRegistration:
    """Keeps this node's registration alive and its slots recorded.

    The node key lives on a lease this process refreshes; if the process (or the host)
    dies the node shows as down, and its slots stay recorded with their holders.
    """

    def __init__(self, client: aetcd.Client, record: NodeRecord, slots: list[SlotRecord]):
        self.client = client
        self.record = record
        self.slots = slots
        self.ttl = 10

    async def register(self) -> None:
        current = await self.client.get_prefix(f"{SLOTS}{self.record.node}/".encode())
        recorded = {kv.key: kv.value for kv in current}
        wanted = {slot_key(SLOTS, s.node, s.slot_id): s.encode() for s in self.slots}
        for key, value in wanted.items():
            if recorded.get(key) != value:
                await self.client.put(key, value)
        for key in recorded.keys() - wanted.keys():
            await self.client.delete(key)  # gone from the inventory: Validate says so
        await self._put_node()

    async def _put_node(self) -> None:
        self.lease = await self.client.lease(self.ttl)
        await self.client.put(
            f"{NODES}{self.record.node}".encode(), self.record.encode(), lease=self.lease
        )

    async def keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                remaining = await self.lease.remaining_ttl()
                node = await self.client.get(f"{NODES}{self.record.node}".encode())
                if remaining <= 0 or node is None:
                    await self._put_node()
                else:
                    await self.lease.refresh()
            except Exception as err:  # etcd away for a while: try again next round
                log.warning("node %s: keep-alive failed: %s", self.record.node, err)
