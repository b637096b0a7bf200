"""The allocator's metrics: who holds which GPU slot, under DS01's exporter names.

Every allocator of a fleet reports the whole fleet, labelled by node, as its watched
view has it at the scrape (read from etcd while the view is not live). A scrape reads
from etcd only the records of containers that hold a slot and that it has not seen yet,
for their type, never the fleet's slots or records.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import replace

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ds01.allocator.batching import TxnBatcher
from ds01.allocator.etcd_state import Snapshot
from ds01.allocator.records import SlotRecord
from ds01.allocator.service import Allocator, AllocatorStats
from ds01.core.metrics import ServiceMetrics

# What each holding container is, by its Docker name (from the containers' records).
ContainerTypes = Callable[[Snapshot], Awaitable[dict[str, str]]]


def gpu_slot(slot: SlotRecord) -> str:
    """DS01's slot notation: "2" for a whole GPU, "2.0" for MIG instance 0 of GPU 2."""
    return slot.slot_id.replace(":", ".")


def register(metrics: ServiceMetrics, allocator: Allocator, types: ContainerTypes) -> None:
    async def collect() -> Iterable[Metric]:
        observed = await allocator.observed()
        # The view goes on changing while the types are read: report it as it was.
        snapshot = replace(observed, holders=dict(observed.holders))
        return allocation_metrics(snapshot, await types(snapshot))

    metrics.add_async(collect)
    metrics.add(lambda: allocator_counters(allocator.stats, allocator.state.batched))
    if allocator.cache is not None:
        cache = allocator.cache
        metrics.add(lambda: allocators_up(cache.view.allocators if cache.live else None))


def allocation_metrics(snapshot: Snapshot, types: dict[str, str]) -> list[Metric]:
    allocated = GaugeMetricFamily(
        "ds01_gpu_allocated",
        "A GPU slot held by a container (1): running (state=allocated) or stopped and "
        "held for it (state=held).",
        labels=["node", "gpu_slot", "container", "user", "interface", "state"],
    )
    equivalents = GaugeMetricFamily(
        "ds01_gpu_equivalents",
        "GPU-equivalents (a full GPU is 1, a MIG slice its share) by node and slot state: "
        "allocated, held, free, or down (its node is not registered).",
        labels=["node", "state"],
    )
    slots = GaugeMetricFamily(
        "ds01_gpu_slots", "GPU slots by node and state (as ds01_gpu_equivalents).",
        labels=["node", "state"],
    )  # fmt: skip
    user_slots = GaugeMetricFamily(
        "ds01_user_gpus_allocated", "GPU slots a user holds (running or held).", labels=["user"]
    )
    user_equivalents = GaugeMetricFamily(
        "ds01_user_gpu_equivalents",
        "GPU-equivalents a user holds: what their quota (max_gpu_equivalents) counts.",
        labels=["user"],
    )
    gpu_info = GaugeMetricFamily(
        "ds01_gpu_slot_info",
        "Each physical GPU (1), for joins with DCGM's metrics by gpu_uuid.",
        labels=["node", "gpu", "slot", "gpu_uuid", "mig_enabled"],
    )
    mig_info = GaugeMetricFamily(
        "ds01_mig_slot_info",
        "Each MIG instance (1), for joins with DCGM's metrics by mig_uuid.",
        labels=["node", "gpu", "slot", "mig_uuid", "profile"],
    )
    node_up = GaugeMetricFamily(
        "ds01_node_up", "Whether a GPU node's allocator has it registered (1) or not (0).",
        labels=["node"],
    )  # fmt: skip
    by_state: Tally[tuple[str, str]] = Tally()
    count: Tally[tuple[str, str]] = Tally()
    per_user: Tally[str] = Tally()
    per_user_eq: Tally[str] = Tally()
    gpus: dict[tuple[str, str], tuple[str, bool]] = {}
    for key, slot in sorted(snapshot.slots.items(), key=lambda item: item[1].order):
        holder = snapshot.holders.get(key)
        if slot.node not in snapshot.nodes:
            state = "down"
        elif holder is None:
            state = "free"
        else:
            state = "held" if holder.stopped else "allocated"
        by_state[(slot.node, state)] += slot.gpu_equivalents
        count[(slot.node, state)] += 1
        if holder is not None:
            interface = types.get(holder.container, "unknown")
            labels = [slot.node, gpu_slot(slot), holder.container, holder.user, interface]
            allocated.add_metric([*labels, "held" if holder.stopped else "allocated"], 1)
            per_user[holder.user] += 1
            per_user_eq[holder.user] += slot.gpu_equivalents
        if slot.is_mig:
            mig_info.add_metric(
                [slot.node, slot.gpu, gpu_slot(slot), slot.uuid, slot.mig_profile], 1
            )
            gpus.setdefault((slot.node, slot.gpu), ("", True))
        else:
            gpus[(slot.node, slot.gpu)] = (slot.uuid, False)
    for (node, gpu), (uuid, mig) in gpus.items():
        gpu_info.add_metric([node, gpu, gpu, uuid, "true" if mig else "false"], 1)
    for (node, state), value in sorted(by_state.items()):
        equivalents.add_metric([node, state], value)
        slots.add_metric([node, state], count[(node, state)])
    for user in sorted(per_user):
        user_slots.add_metric([user], per_user[user])
        user_equivalents.add_metric([user], per_user_eq[user])
    for node in sorted({s.node for s in snapshot.slots.values()} | set(snapshot.nodes)):
        node_up.add_metric([node], 1 if node in snapshot.nodes else 0)
    waiters = GaugeMetricFamily(
        "ds01_allocation_waiters", "Requests queued for a GPU (--wait), all nodes."
    )
    waiters.add_metric([], len(snapshot.waiters))
    holds = GaugeMetricFamily(
        "ds01_gpu_holds", "GPU slots held for stopped containers (gpu_hold_after_stop)."
    )
    holds.add_metric([], sum(1 for h in snapshot.holders.values() if h.stopped))
    return [allocated, equivalents, slots, user_slots, user_equivalents, gpu_info, mig_info,
            node_up, waiters, holds]  # fmt: skip


def allocator_counters(stats: AllocatorStats, batched: TxnBatcher) -> list[Metric]:
    return [
        CounterMetricFamily(
            "ds01_allocator_etcd_writes",
            "Claims and releases this allocator sent to etcd.",
            value=batched.requests,
        ),
        CounterMetricFamily(
            "ds01_allocator_etcd_write_transactions",
            "etcd transactions those went in: claims and releases under way at once share one.",
            value=batched.transactions,
        ),
        CounterMetricFamily(
            "ds01_preemptions",
            "Held slots of stopped containers given to another request, by this allocator.",
            value=stats.preemptions,
        ),
        CounterMetricFamily(
            "ds01_allocator_lock_waits",
            "Requests that waited for another request of the same user (the user's lock).",
            value=stats.lock_waits,
        ),
        CounterMetricFamily(
            "ds01_allocator_claim_conflicts",
            "Claims that lost a slot to another allocator and were planned again.",
            value=stats.claim_conflicts,
        ),
        CounterMetricFamily(
            "ds01_allocator_claims_at_once",
            "Allocations claimed in one etcd round trip, planned on the watched view.",
            value=stats.claimed_at_once,
        ),
        CounterMetricFamily(
            "ds01_allocator_locked_fallbacks",
            "Allocations the watched view could not settle (a refusal, a retry, a lost "
            "comparison), decided on the locked path with a fresh read.",
            value=stats.locked_fallbacks,
        ),
    ]


def allocators_up(allocators: Mapping[str, Collection[str]] | None) -> list[Metric]:
    """None while the watched view is not live: nothing then, rather than a stale count."""
    family = GaugeMetricFamily(
        "ds01_allocators",
        "Allocator processes up on each node, as announced in etcd; those of one node split "
        "its slots between them when they race for the same ones.",
        labels=["node"],
    )
    for node, ids in sorted((allocators or {}).items()):
        family.add_metric([node], len(ids))
    return [family]
