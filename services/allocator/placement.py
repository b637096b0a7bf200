"""Choosing slots for a request: quotas, full-or-MIG, placement order and preemption.

Pure functions over a snapshot of the inventory and the holders; the etcd transaction
that claims the chosen slots is what makes the choice safe under races.
"""

from __future__ import annotations

import contextlib
import enum
import random
from collections import Counter
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, replace

from ds01.allocator.records import Holder, SlotRecord

EPSILON = 1e-9


class Preference(enum.Enum):
    ANY = "any"
    FULL_GPU = "full"
    MIG = "mig"


class Strategy(enum.Enum):
    LEAST_ALLOCATED = "least_allocated"
    PACK = "pack"


class Refusal(enum.Enum):
    QUOTA = "quota"  # RESOURCE_EXHAUSTED: over the user's own limits, waiting won't help
    NO_CAPACITY = "no_capacity"  # RESOURCE_EXHAUSTED: nothing free now; waiting may help
    NOT_ALLOWED = "not_allowed"  # FAILED_PRECONDITION: the group may not have this kind
    INVALID = "invalid"  # INVALID_ARGUMENT
    TAKEN = "taken"  # ALREADY_EXISTS: an exact slot asked for is another container's


class AllocationRefused(Exception):
    def __init__(self, kind: Refusal, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Request:
    user: str
    container: str
    slots: int = 0  # how many; 0 means "enough for gpu_equivalents", or one
    gpu_equivalents: float = 0.0
    preference: Preference = Preference.ANY
    node: str = ""  # empty: any node that is up
    slot_ids: tuple[str, ...] = ()  # exactly these, on node: adopting what is in use
    as_many: bool = False  # all the quota allows, at least one: `slots` is ignored


@dataclass(frozen=True)
class Quota:
    group: str
    priority: int
    max_gpu_equivalents: float | None  # None: unlimited
    max_slots_per_container: int | None
    allow_full_gpu: bool
    archived: bool = False  # access withdrawn (archived.members)


@dataclass(frozen=True)
class Plan:
    claim: tuple[SlotRecord, ...]  # free slots to take
    preempt: tuple[tuple[SlotRecord, Holder], ...]  # held slots of lower-priority users

    @property
    def slots(self) -> tuple[SlotRecord, ...]:
        return self.claim + tuple(slot for slot, _ in self.preempt)

    @property
    def weight(self) -> float:
        return sum(slot.gpu_equivalents for slot in self.slots)


SlotKey = tuple[str, str]  # (node, slot id)
GpuKey = tuple[str, str]  # (node, GPU index)


def gpu_of(key: SlotKey) -> GpuKey:
    """The GPU a slot is on: GPU 3 for slot "3:2" (a MIG slice) and for slot "3"."""
    return key[0], key[1].split(":", 1)[0]


@dataclass(frozen=True)
class FleetIndex:
    """What a view of the whole fleet keeps current as slots and holders come and go, so
    that placement over the fleet reads the free slots and each GPU's load instead of
    every slot and holder (a busy fleet of 5,600 slots has a few hundred free ones)."""

    free: Mapping[SlotKey, SlotRecord]  # slots that nobody holds
    load: Mapping[GpuKey, int]  # holders on each GPU that has any
    slots: Mapping[GpuKey, int]  # slots on each GPU

    def with_held(self, keys: Iterable[SlotKey]) -> FleetIndex:
        """The index with ``keys`` held too: claims still on their way to etcd."""
        load = Counter(self.load)
        load.update(gpu_of(key) for key in keys)
        return replace(self, load=load)

    def any_idle(self) -> bool:
        """Whether some GPU has slots and no holder."""
        return any(gpu not in self.load for gpu in self.slots)


def plan_exact(
    request: Request,
    slots: dict[tuple[str, str], SlotRecord],
    holders: dict[tuple[str, str], Holder],
) -> Plan:
    """Exactly the slots a container already uses: granted if nobody else holds them."""
    chosen = []
    for slot_id in request.slot_ids:
        key = (request.node, slot_id)
        if key not in slots:
            raise AllocationRefused(
                Refusal.INVALID, f"there is no slot {slot_id} on {request.node or 'no node'}"
            )
        holder = holders.get(key)
        if holder is not None and holder.container != request.container:
            raise AllocationRefused(
                Refusal.TAKEN,
                f"slot {slot_id} on {request.node} is held by {holder.container} "
                f"({holder.user}) already; ds01 does not grant it to {request.container} too",
            )
        chosen.append(slots[key])
    return Plan(claim=tuple(chosen), preempt=())


def plan(
    request: Request,
    quota: Quota,
    slots: Iterable[SlotRecord],
    holders: dict[tuple[str, str], Holder],
    nodes_up: set[str],
    strategy: Strategy = Strategy.LEAST_ALLOCATED,
    held: float | None = None,
    drained: Container[tuple[str, str]] = (),
    spread: bool = False,
    in_order: bool = False,
    index: FleetIndex | None = None,
    share: Container[SlotKey] = (),
) -> Plan:
    """The slots ``request`` gets, or AllocationRefused saying why not. ``in_order``:
    ``slots`` come in numeric order (``SlotRecord.order``), as a Snapshot keeps them, so
    least-allocated placement may stop at the first free slots on unused GPUs. ``held``: the
    GPU-equivalents the user holds, when ``slots`` and ``holders`` are not all of them.
    ``drained``: slots that take no new allocation (what is held there still counts).
    ``spread``: for an allocator that contends with others for slots: ties between
    equally good slots are broken at random, not in numeric order, and each slot chosen
    outside its ``share`` (see peers.py) is swapped for a free one of the same kind in
    it, on the same node, so that allocators seldom plan the same slot. Slots are picked
    greedily within the quota, so another order may fit less: what spreading cannot
    grant, or --gpus all, is planned as without it. ``index``:
    of the whole fleet's ``slots`` and ``holders`` (claims in flight included), for
    choosing among the free slots alone."""
    slots = list(slots)
    arguments = (request, quota, slots, holders, nodes_up, strategy, held, drained)
    if spread and not request.as_many:
        with contextlib.suppress(AllocationRefused):
            return _plan(*arguments, spread=True, in_order=in_order, index=index, share=share)
    return _plan(*arguments, spread=False, in_order=in_order, index=index)


def _plan(
    request: Request,
    quota: Quota,
    slots: list[SlotRecord],
    holders: dict[tuple[str, str], Holder],
    nodes_up: set[str],
    strategy: Strategy,
    held: float | None,
    drained: Container[tuple[str, str]],
    spread: bool,
    in_order: bool,
    index: FleetIndex | None,
    share: Container[SlotKey] = (),
) -> Plan:
    many = request.as_many
    wanted = checked(request, quota)  # what no state of the cluster could grant
    if many:
        request = _as_many(request, quota, slots)
        wanted = checked(request, quota)
    if held is None:
        weights = {(s.node, s.slot_id): s.gpu_equivalents for s in slots}
        held = sum(weights.get(key, 0.0) for key, h in holders.items() if h.user == request.user)
    held_by_user = held
    budget = None
    if quota.max_gpu_equivalents is not None:
        budget = quota.max_gpu_equivalents - held_by_user
    shortcut = in_order and strategy is Strategy.LEAST_ALLOCATED and not spread and not many
    if shortcut and (index is None or index.any_idle()):
        busy = set(index.load) if index is not None else set(_gpu_load(holders))
        idle = _on_idle_gpus(request, quota, slots, busy, nodes_up, drained, budget, wanted)
        if idle is not None:
            return idle
    if index is not None and not many:
        chosen = _among_free(request, quota, index, holders, nodes_up, drained, strategy,
                             budget, wanted, spread, share)  # fmt: skip
        if chosen is not None:
            return chosen
    fits = [slot for slot in slots if _may_take(slot, request, quota, nodes_up)]
    if request.node and request.node not in nodes_up:
        raise AllocationRefused(Refusal.NO_CAPACITY, f"node {request.node} is down")
    where = f"node {request.node}" if request.node else "any node that is up"
    if not fits:
        raise AllocationRefused(Refusal.NO_CAPACITY, f"no {_kind_name(request, quota)} on {where}")
    eligible = [slot for slot in fits if (slot.node, slot.slot_id) not in drained]
    if not eligible:
        raise AllocationRefused(
            Refusal.NO_CAPACITY,
            f"every {_kind_name(request, quota)[:-1]} on {where} is drained by an admin "
            "(no new allocations there): `ds01 gpu status` shows the drains",
        )

    # Only slots that fit what is left of the quota, in the strategy's order among them:
    # a free MIG slice within the quota beats a least-allocated full GPU beyond it.
    fitting = [s for s in eligible if budget is None or s.gpu_equivalents <= budget + EPSILON]
    if not fitting:
        smallest = min(s.gpu_equivalents for s in eligible)
        raise AllocationRefused(
            Refusal.QUOTA,
            f"{request.user} holds {held_by_user:.1f} of {quota.max_gpu_equivalents:.1f} "
            f"GPU-equivalents; the smallest {_kind_name(request, quota)[:-1]} here needs "
            f"{smallest:.2f} more. Nothing fits until one of their containers is stopped "
            "or removed.",
        )
    chosen = _choose(fitting, holders, request, quota, strategy, budget, spread, share)
    if _enough(chosen.slots, wanted, request.gpu_equivalents):
        return chosen
    if many and chosen.slots:  # fewer than the cap: what fits, free ones first
        return Plan(chosen.claim, ()) if chosen.claim else chosen
    beyond = _choose(eligible, holders, request, quota, strategy, None, spread)
    if budget is not None and _enough(beyond.slots, wanted, request.gpu_equivalents):
        raise AllocationRefused(
            Refusal.QUOTA,
            f"{request.user} holds {held_by_user:.1f} of {quota.max_gpu_equivalents:.1f} "
            f"GPU-equivalents; this request needs {beyond.weight:.2f} more. "
            f"{_what_fits(eligible, budget)}",
        )
    in_use = sum(1 for s in eligible if (s.node, s.slot_id) in holders)
    stopped = sum(1 for s in eligible if holders.get((s.node, s.slot_id), _RUNNING).stopped)
    closed = len(fits) - len(eligible)
    raise AllocationRefused(
        Refusal.NO_CAPACITY,
        f"not enough free {_kind_name(request, quota)}: {in_use} of {len(eligible)} in use "
        f"({stopped} held for stopped containers)" + (f"; {closed} drained" if closed else ""),
    )


def _on_idle_gpus(
    request: Request,
    quota: Quota,
    slots: list[SlotRecord],
    busy: set[GpuKey],
    nodes_up: set[str],
    drained: Container[tuple[str, str]],
    budget: float | None,
    wanted: int,
) -> Plan | None:
    """What least-allocated placement picks while enough slots are free on GPUs that
    nobody uses: the first such slots in numeric order, found without looking at the
    rest of the fleet. None when there are not enough: the full search decides then.

    Greedy least-allocated placement takes an unused GPU's slot whenever one is left,
    the first in numeric order, so while they last the two choose alike. ``busy``: the
    GPUs that somebody holds a slot of (changed here)."""
    chosen: list[SlotRecord] = []
    spent = 0.0
    for slot in slots:
        gpu = (slot.node, slot.gpu)
        if (
            gpu in busy
            or not _may_take(slot, request, quota, nodes_up)
            or (slot.node, slot.slot_id) in drained
            or (budget is not None and spent + slot.gpu_equivalents > budget + EPSILON)
        ):
            continue
        chosen.append(slot)
        spent += slot.gpu_equivalents
        busy.add(gpu)
        if _enough(chosen, wanted, request.gpu_equivalents):
            return Plan(tuple(chosen), ())
    return None


def _among_free(
    request: Request,
    quota: Quota,
    index: FleetIndex,
    holders: dict[tuple[str, str], Holder],
    nodes_up: set[str],
    drained: Container[tuple[str, str]],
    strategy: Strategy,
    budget: float | None,
    wanted: int,
    spread: bool,
    share: Container[SlotKey],
) -> Plan | None:
    """What the full search grants while free slots are enough, chosen among the free
    slots alone, with each GPU's load from the index: the same slots (or, spread, the
    same draw), since the full search ranks the free ones that fit the same way. None
    when they are not enough (or none was chosen): the full search decides then (a
    preemption, or a refusal that counts every slot)."""
    candidates = [
        slot
        for key, slot in index.free.items()
        if key not in holders  # a claim in flight
        and key not in drained
        and _may_take(slot, request, quota, nodes_up)
        and (budget is None or slot.gpu_equivalents <= budget + EPSILON)
    ]
    equivalents = request.gpu_equivalents
    claim = _claim(candidates, index.load, wanted, equivalents, strategy, budget, spread, share)
    return Plan(tuple(claim), ()) if claim and _enough(claim, wanted, equivalents) else None


def checked(request: Request, quota: Quota) -> int:
    """How many slots ``request`` wants (0: enough for its GPU-equivalents), or
    AllocationRefused where no state of the cluster could grant it."""
    if request.slots < 0 or request.gpu_equivalents < 0 or 0 < request.gpu_equivalents <= EPSILON:
        raise AllocationRefused(Refusal.INVALID, "ask for a positive number of slots")
    wanted = 1 if request.as_many else request.slots or (0 if request.gpu_equivalents else 1)
    if quota.max_slots_per_container is not None and wanted > quota.max_slots_per_container:
        raise AllocationRefused(
            Refusal.QUOTA,
            f"a container of group {quota.group} may have at most "
            f"{quota.max_slots_per_container} GPU slot(s); {wanted} were asked for",
        )
    if request.preference is Preference.FULL_GPU and not quota.allow_full_gpu:
        raise AllocationRefused(
            Refusal.NOT_ALLOWED, f"full GPUs are not allowed for group {quota.group}"
        )
    return wanted


def _as_many(request: Request, quota: Quota, slots: list[SlotRecord]) -> Request:
    """``--gpus all``: the per-container cap, or every slot there is without one."""
    cap = quota.max_slots_per_container
    return replace(request, slots=cap if cap is not None else max(1, len(slots)),
                   gpu_equivalents=0.0, as_many=False)  # fmt: skip


def _choose(
    candidates: list[SlotRecord],
    holders: dict[tuple[str, str], Holder],
    request: Request,
    quota: Quota,
    strategy: Strategy,
    budget: float | None,
    spread: bool = False,
    share: Container[SlotKey] = (),
) -> Plan:
    """Free slots first, then slots held for lower-priority users' stopped containers."""
    wanted = request.slots or (0 if request.gpu_equivalents else 1)
    free = [s for s in candidates if (s.node, s.slot_id) not in holders]
    claim = _claim(free, _gpu_load(holders), wanted, request.gpu_equivalents, strategy,
                   budget, spread, share)  # fmt: skip
    preempt: list[tuple[SlotRecord, Holder]] = []
    if not _enough(claim, wanted, request.gpu_equivalents):
        left = None if budget is None else budget - sum(s.gpu_equivalents for s in claim)
        preempt = [
            (slot, held)
            for slot, held in _preemptible(candidates, holders, quota.priority)
            if left is None or slot.gpu_equivalents <= left + EPSILON
        ]
        preempt = preempt[: _still_needed(claim, preempt, wanted, request.gpu_equivalents)]
    return Plan(tuple(claim), tuple(preempt))


def _claim(
    free: list[SlotRecord],
    load: Mapping[GpuKey, int],
    wanted: int,
    equivalents: float,
    strategy: Strategy,
    budget: float | None,
    spread: bool,
    share: Container[SlotKey],
) -> list[SlotRecord]:
    """The free slots to claim: picked (spread: ties at random), then swapped into this
    process's ``share`` where it has one."""
    claim = _pick(free, load, wanted, equivalents, strategy, budget, spread)
    if spread and not _enough(claim, wanted, equivalents):
        # Picked greedily within the quota, a random order may fit less than the
        # strategy's: it must never cost a stopped container its hold.
        claim = _pick(free, load, wanted, equivalents, strategy, budget)
    if share:
        claim = _into_share(claim, free, share, load, strategy)
    return claim


def _what_fits(eligible: list[SlotRecord], budget: float) -> str:
    """What the user could still get: the kinds of slot within what is left of the quota."""
    kinds = sorted(
        {(s.gpu_equivalents, s.mig_profile or "full GPU") for s in eligible},
        reverse=True,
    )
    fits = [name for weight, name in kinds if weight <= budget + EPSILON]
    return f"Within what is left ({max(budget, 0):.2f}) fits: {', '.join(dict.fromkeys(fits))}."


_RUNNING = Holder(user="", container="", since=0, priority=0)


def _may_take(slot: SlotRecord, request: Request, quota: Quota, nodes_up: set[str]) -> bool:
    """Whether ``request`` may have ``slot`` at all: on a node that is up (the one it
    names, if any), and of a kind it and its group may have. Drains are apart."""
    return (
        slot.node in nodes_up
        and (not request.node or slot.node == request.node)
        and _kind_fits(slot, request.preference, quota.allow_full_gpu)
    )


def _gpu_load(holders: dict[tuple[str, str], Holder]) -> Counter[GpuKey]:
    """Slots held on each (node, GPU)."""
    return Counter(map(gpu_of, holders))


def _kind_fits(slot: SlotRecord, preference: Preference, allow_full: bool) -> bool:
    if preference is Preference.MIG:
        return slot.is_mig
    if preference is Preference.FULL_GPU:
        return not slot.is_mig
    return slot.is_mig or allow_full


def _kind_name(request: Request, quota: Quota) -> str:
    if request.preference is Preference.MIG or not quota.allow_full_gpu:
        return "MIG slots"
    if request.preference is Preference.FULL_GPU:
        return "full GPUs"
    return "GPU slots"


def _enough(chosen: Iterable[SlotRecord], wanted: int, equivalents: float) -> bool:
    chosen = list(chosen)
    if wanted:
        return len(chosen) >= wanted
    return sum(s.gpu_equivalents for s in chosen) >= equivalents - EPSILON


def _pick(
    free: list[SlotRecord],
    held: Mapping[GpuKey, int],
    wanted: int,
    equivalents: float,
    strategy: Strategy,
    budget: float | None = None,
    spread: bool = False,
) -> list[SlotRecord]:
    """Least-allocated GPU first (ties in numeric order, or at random to ``spread``),
    or most-allocated for pack; with a ``budget``, only slots that keep the total
    within it. ``held``: slots held on each GPU."""
    load = Counter(held)
    remaining = sorted(free, key=lambda s: s.order)
    tie = {id(s): random.random() if spread else n for n, s in enumerate(remaining)}
    chosen: list[SlotRecord] = []
    spent = 0.0
    sign = -1 if strategy is Strategy.PACK else 1
    while remaining and not _enough(chosen, wanted, equivalents):
        best = min(remaining, key=lambda s: (sign * load[(s.node, s.gpu)], tie[id(s)]))
        remaining.remove(best)
        if budget is not None and spent + best.gpu_equivalents > budget + EPSILON:
            continue
        chosen.append(best)
        spent += best.gpu_equivalents
        load[(best.node, best.gpu)] += 1
    return chosen


def _into_share(
    claim: list[SlotRecord],
    free: list[SlotRecord],
    share: Container[SlotKey],
    held: Mapping[GpuKey, int],
    strategy: Strategy,
) -> list[SlotRecord]:
    """``claim`` with each slot outside ``share`` swapped for a free slot of the share
    that is of the same kind and on the same node, where there is one (the least
    allocated GPU of the share first, or for pack the most): the same sizes, so the same
    quota, preemptions, kinds and nodes as the claim it replaces."""
    taken = {id(slot) for slot in claim}
    # In numeric order, whatever order ``free`` came in: the same draws for the same choices.
    spare = sorted(
        (s for s in free if (s.node, s.slot_id) in share and id(s) not in taken),
        key=lambda s: s.order,
    )
    if not spare:
        return claim
    load = Counter(held)
    sign = -1 if strategy is Strategy.PACK else 1
    swapped = []
    for slot in claim:
        kind = kind_of(slot)
        alike = [] if (slot.node, slot.slot_id) in share else [
            s for s in spare if s.node == slot.node and kind_of(s) == kind]  # fmt: skip
        if alike:
            slot = min(alike, key=lambda s: (sign * load[(s.node, s.gpu)], random.random()))
            spare.remove(slot)
        swapped.append(slot)
        load[(slot.node, slot.gpu)] += 1
    return swapped


def kind_of(slot: SlotRecord) -> tuple[str, str, int, float]:
    """What makes two slots interchangeable for whoever gets one."""
    return slot.product, slot.mig_profile, slot.memory_bytes, slot.gpu_equivalents


def _preemptible(
    eligible: list[SlotRecord], holders: dict[tuple[str, str], Holder], priority: int
) -> list[tuple[SlotRecord, Holder]]:
    """Slots only held for a stopped container of a lower-priority user: lowest priority,
    then longest stopped, first."""
    found = [
        (slot, holder)
        for slot in eligible
        if (holder := holders.get((slot.node, slot.slot_id))) is not None
        and holder.stopped
        and holder.priority < priority
    ]
    return sorted(found, key=lambda pair: (pair[1].priority, pair[1].stopped_at, pair[0].order))


def _still_needed(
    claim: list[SlotRecord],
    candidates: list[tuple[SlotRecord, Holder]],
    wanted: int,
    equivalents: float,
) -> int:
    taken: list[SlotRecord] = list(claim)
    for count, (slot, _holder) in enumerate(candidates, start=1):
        taken.append(slot)
        if _enough(taken, wanted, equivalents):
            return count
    return len(candidates)
