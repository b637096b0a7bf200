"""The allocator's view of the cluster, kept current by etcd watches.

An allocation plans against this view instead of reading etcd first, and claims in one
transaction whose comparisons make a stale view harmless: a slot it takes must be free,
the user's claim generation must be the one it planned with, and the user's lock must be
free. If any comparison fails, the allocation falls back to the locked path, which reads
afresh. So the view only has to be fast, never right.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aetcd
from aetcd.utils import prefix_range_end

from ds01.allocator.etcd_state import EtcdState, SlotKey, Snapshot, in_numeric_order, waiting
from ds01.allocator.peers import Peer, share_of
from ds01.allocator.placement import FleetIndex, GpuKey, gpu_of
from ds01.allocator.records import (
    ALLOCATORS,
    CLAIMS,
    DRAINS,
    HOLDERS,
    NODES,
    SLOTS,
    WAITERS,
    DrainRecord,
    Holder,
    NodeRecord,
    SlotRecord,
    WaiterRecord,
    split_slot_key,
)
from ds01.core.watch import DELETE, watching

log = logging.getLogger(__name__)

# What the view follows, as key ranges. Holders and claim generations in one range: an
# allocation writes both in one transaction, which then reaches each allocator as one
# watch message instead of two. Between them lie the allocators that are up (kept), the
# release marks (written with a holder's delete) and the audit trail, which the view
# passes over without waking anyone.
KEPT = (HOLDERS, SLOTS, NODES, WAITERS, DRAINS, CLAIMS, ALLOCATORS)  # what the view holds
WATCHED = (
    (HOLDERS, CLAIMS),
    (SLOTS, SLOTS),
    (NODES, NODES),
    (WAITERS, WAITERS),
    (DRAINS, DRAINS),
)
RETRY = 1.0  # seconds before a lost watch is opened again


@dataclass
class View:
    """Records as of ``revision`` (each key as its last event left it), indexed so that
    a request touches its node's slots and its user's holdings, not the whole fleet."""

    slots: dict[SlotKey, SlotRecord] = field(default_factory=dict)
    holders: dict[SlotKey, Holder] = field(default_factory=dict)
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    waiters: dict[str, WaiterRecord] = field(default_factory=dict)
    drains: dict[str, DrainRecord] = field(default_factory=dict)  # by target: node[/gpu]
    generations: dict[str, int] = field(default_factory=dict)  # user -> mod revision
    revision: int = 0
    node_slots: dict[str, dict[SlotKey, SlotRecord]] = field(default_factory=dict)
    node_holders: dict[str, dict[SlotKey, Holder]] = field(default_factory=dict)
    user_keys: dict[str, set[SlotKey]] = field(default_factory=dict)
    container_keys: dict[str, set[SlotKey]] = field(default_factory=dict)
    in_order: bool = True  # slots, and each node's, are in numeric order (as planned on)
    # Placement over the whole fleet reads these instead of every slot and holder.
    free: dict[SlotKey, SlotRecord] = field(default_factory=dict)  # slots nobody holds
    gpu_load: Counter[GpuKey] = field(default_factory=Counter)  # holders per GPU, if any
    gpu_slots: Counter[GpuKey] = field(default_factory=Counter)  # slots per GPU
    holds: dict[SlotKey, Holder] = field(default_factory=dict)  # holders with an end
    allocators: dict[str, set[str]] = field(default_factory=dict)  # node -> ids of those up
    # Each allocator's share of its node, dealt again only when slots or allocators change.
    _shares: dict[Peer, frozenset[SlotKey] | None] = field(default_factory=dict, repr=False)

    def share(self, me: Peer) -> frozenset[SlotKey] | None:
        """``me``'s share of its node's slots (see peers.share_of)."""
        if me not in self._shares:
            self._shares[me] = share_of(
                me, self.allocators, self.node_slots.get(me.node, {}).values()
            )
        return self._shares[me]

    def set_allocator(self, node: str, allocator: str, up: bool) -> None:
        _member(self.allocators, node, allocator, deleted=not up)
        self._shares.clear()

    def snapshot(self, node: str = "") -> Snapshot:
        """The view as the planner reads it, for one node or for all: no copies (planning
        never awaits, so nothing changes underneath it)."""
        if not self.in_order:  # a slot was added: the inventory changed (rare)
            self.slots = in_numeric_order(self.slots)
            self.node_slots = {n: in_numeric_order(s) for n, s in self.node_slots.items()}
            self.in_order = True
        waiters = sorted(self.waiters.items())
        if node:
            slots, holders = self.node_slots.get(node, {}), self.node_holders.get(node, {})
            return Snapshot(slots, holders, self.nodes, waiters, self.revision, self.drains,
                            containers=self.container_keys)  # fmt: skip
        fleet = FleetIndex(self.free, self.gpu_load, self.gpu_slots)
        return Snapshot(self.slots, self.holders, self.nodes, waiters, self.revision,
                        self.drains, containers=self.container_keys, fleet=fleet)  # fmt: skip

    def snapshot_of_user(self, user: str) -> Snapshot:
        """The slots ``user`` holds on every node, with their holders: a user's status
        touches the user's holdings, not the fleet's slots."""
        keys = self.user_keys.get(user, ())
        holders = {key: self.holders[key] for key in keys}
        slots = in_numeric_order({key: self.slots[key] for key in keys if key in self.slots})
        waiters = sorted(self.waiters.items())
        return Snapshot(slots, holders, self.nodes, waiters, self.revision, self.drains)

    def held_by_user(self, user: str) -> float | None:
        """GPU-equivalents ``user`` holds on every node; None if a holding's slot is not
        in the view (then the sum would be short)."""
        keys = self.user_keys.get(user, ())
        if any(key not in self.slots for key in keys):
            return None
        return sum(self.slots[key].gpu_equivalents for key in keys)

    def set_slot(self, key: SlotKey, slot: SlotRecord) -> None:
        self._shares.clear()
        new = key not in self.slots
        self.in_order = self.in_order and not new
        self.slots[key] = slot
        self.node_slots.setdefault(key[0], {})[key] = slot
        if new:
            self.gpu_slots[gpu_of(key)] += 1
        if key not in self.holders:
            self.free[key] = slot

    def drop_slot(self, key: SlotKey) -> None:
        if self.slots.pop(key, None) is None:
            return
        self._shares.clear()
        self.node_slots.get(key[0], {}).pop(key, None)
        self.free.pop(key, None)
        _less(self.gpu_slots, gpu_of(key))

    def set_holder(self, key: SlotKey, holder: Holder) -> None:
        self.drop_holder(key)
        self.holders[key] = holder
        self.node_holders.setdefault(key[0], {})[key] = holder
        self.user_keys.setdefault(holder.user, set()).add(key)
        self.container_keys.setdefault(holder.container, set()).add(key)
        self.gpu_load[gpu_of(key)] += 1
        self.free.pop(key, None)
        if holder.hold_until is not None:
            self.holds[key] = holder

    def drop_holder(self, key: SlotKey) -> None:
        old = self.holders.pop(key, None)
        if old is None:
            return
        self.node_holders.get(key[0], {}).pop(key, None)
        _less(self.gpu_load, gpu_of(key))
        self.holds.pop(key, None)
        if key in self.slots:
            self.free[key] = self.slots[key]
        for index, name in ((self.user_keys, old.user), (self.container_keys, old.container)):
            keys = index.get(name)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index[name]


class ClusterCache:
    """A :class:`View` fed by one watch per prefix; ``live`` while every watch runs."""

    def __init__(self, state: EtcdState, watch_client: aetcd.Client | None = None) -> None:
        self.state = state
        # Long-lived watches on a client of their own: the allocator's short ones (a
        # user's lock) never wait behind them in one client's watch stream.
        self.watch_client = watch_client
        self.view = View()
        self.live = False
        self._task: asyncio.Task[None] | None = None
        self._changed: asyncio.Future[None] | None = None

    async def wait_for_change(self, after_revision: int, timeout: float) -> None:
        """Return when the view moves past ``after_revision``, on timeout, or when the
        view stops being live. One shared watch serves every waiting request, and the wait
        is a plain future: a cancel is never lost in it (the per-request etcd watches it
        replaced went through aetcd's wait_for, which in Python 3.11 can swallow one, and
        a waiting Allocate whose caller had left then waited on to its deadline)."""
        if self.view.revision > after_revision or not self.live:
            return
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        await asyncio.wait([self._changed], timeout=timeout)

    def _wake(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._follow())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.watch_client is not None:
            with contextlib.suppress(Exception):
                await self.watch_client.close()

    def generation(self, user: str) -> int:
        return self.view.generations.get(user, 0)

    def claimed(self, keys: list[SlotKey], holder: Holder, user: str, revision: int) -> None:
        """What this process just claimed at ``revision``: in the view at once, so that
        the same request again finds its slots (the watch brings the same soon)."""
        for key in keys:
            current = self.view.holders.get(key)
            if current is None or current.mod_revision < revision:
                self.view.set_holder(key, replace(holder, mod_revision=revision, lease=0))
        if self.view.generations.get(user, 0) < revision:
            self.view.generations[user] = revision

    def released(self, held: list[tuple[SlotKey, Holder]]) -> None:
        """Holders this process just deleted: out of the view at once, so that its next
        plans count their slots free (the watch brings the same soon). One the view has
        a newer holder of stays."""
        for key, holder in held:
            current = self.view.holders.get(key)
            if current is not None and current.mod_revision == holder.mod_revision:
                self.view.drop_holder(key)

    def observed(self, found: list[tuple[SlotKey, Holder | None]]) -> None:
        """Holders a failed claim read from etcd: newer than the view's, or the same."""
        for key, holder in found:
            current = self.view.holders.get(key)
            if holder is None:
                continue  # free after all: the generation or the lock was what changed
            if current is None or current.mod_revision < holder.mod_revision:
                self.view.set_holder(key, holder)

    async def _follow(self) -> None:
        while True:
            try:
                await self._load_and_watch()
            except asyncio.CancelledError:
                self.live = False
                raise
            except Exception as err:  # etcd away: plan on fresh reads until it is back
                if self.live:
                    log.warning("allocation cache lost its watch (%s); reading etcd", err)
                self.live = False
            await asyncio.sleep(RETRY)

    async def _load_and_watch(self) -> None:
        client = self.watch_client or self.state.client
        # Watched from a revision read first: the load may be later (an empty cluster's
        # read carries no revision of its own), and replaying events the load already
        # holds leaves the view as it was, while a skipped one would be lost.
        before = await self.state.current_revision()
        view = await self._load()
        ranges = [(first.encode(), prefix_range_end(last.encode())) for first, last in WATCHED]
        async with watching(client, ranges, before + 1) as stream:
            self.view, self.live = view, True
            try:
                async for events in stream:  # until etcd ends it: WatchEnded
                    changed = False
                    for event in events:
                        changed |= apply(view, event)
                    if changed:  # one wake for a transaction's writes
                        self._wake()
            finally:
                self.live = False
                self._wake()

    async def _load(self) -> View:
        snapshot, generations, allocators = await self.state.snapshot_for_view()
        view = View(
            nodes=dict(snapshot.nodes),
            waiters=dict(snapshot.waiters),
            drains=dict(snapshot.drains),
            generations=generations,
            revision=snapshot.revision,
        )
        for node, allocator in allocators:
            view.set_allocator(node, allocator, up=True)
        for key, slot in snapshot.slots.items():
            view.set_slot(key, slot)
        for key, holder in snapshot.holders.items():
            view.set_holder(key, holder)
        return view


def _less(counts: Counter[GpuKey], gpu: GpuKey) -> None:
    """One fewer on ``gpu``; a GPU with none left is not listed (idle: not in the load)."""
    counts[gpu] -= 1
    if counts[gpu] <= 0:
        del counts[gpu]


def apply(view: View, event: Any) -> bool:
    """One watch event into the view (the events of one key come in revision order).
    False for a key the view does not keep (a release mark or an audit record inside
    its watched ranges): the view, its revision included, stays as it was, and no
    waiting request wakes for it."""
    kv = event.kv  # an etcd mvccpb.Event, as watching() hands it over
    key = kv.key.decode()
    if not key.startswith(KEPT):
        return False
    deleted = event.type == DELETE
    view.revision = max(view.revision, kv.mod_revision)
    if key.startswith(HOLDERS):
        slot = split_slot_key(HOLDERS, kv.key)
        current = view.holders.get(slot)
        if current is not None and current.mod_revision > kv.mod_revision:
            return True  # this process's own claim, already in the view, is newer
        if deleted:
            view.drop_holder(slot)
        else:
            view.set_holder(slot, Holder.of(kv))
    elif key.startswith(SLOTS):
        where = split_slot_key(SLOTS, kv.key)
        if deleted:
            view.drop_slot(where)
        else:
            view.set_slot(where, SlotRecord.decode(kv.value))
    elif key.startswith(NODES):
        _keyed(view.nodes, key.removeprefix(NODES), deleted, NodeRecord.decode, kv.value)
    elif key.startswith(WAITERS):
        _keyed(view.waiters, key, deleted, waiting, kv.value)
    elif key.startswith(DRAINS):
        _keyed(view.drains, key.removeprefix(DRAINS), deleted, DrainRecord.decode, kv.value)
    elif key.startswith(ALLOCATORS):
        view.set_allocator(*split_slot_key(ALLOCATORS, kv.key), up=not deleted)
    elif key.startswith(CLAIMS):
        user = key.removeprefix(CLAIMS)
        if deleted:
            view.generations.pop(user, None)
        else:
            view.generations[user] = max(view.generations.get(user, 0), kv.mod_revision)
    return True


def _keyed(table: dict, key: object, deleted: bool, decode: Callable[[bytes], object],
           value: bytes) -> None:  # fmt: skip
    if deleted:
        table.pop(key, None)
    else:
        table[key] = decode(value)


def _member(sets: dict[str, set[str]], name: str, member: str, deleted: bool) -> None:
    """``member`` into or out of the set of ``name`` (a set that empties goes)."""
    if not deleted:
        sets.setdefault(name, set()).add(member)
    elif member in sets.get(name, ()):
        sets[name].discard(member)
        if not sets[name]:
            del sets[name]
