"""Allocator processes that serve one node split its slots between them when they race.

Each allocator plans on its own watched view, so two that plan at once may both pick the
slot that looks best, and one of them loses the claim: a round trip and a plan wasted,
and a slower answer. That happens when free slots are few and requests many, and then
breaking ties at random hardly helps (the few free slots are on the GPUs of least load,
the same for everyone). So an allocator that has lost races lately swaps each slot it
plans for a free one of the same kind from its own share (see placement.plan): the slots
of its node dealt out to that node's allocators in turn, kind by kind, in the order every
allocator's view lists them. An even deal matters: an allocator whose share is short of
what its own requests hold at once, of some kind, takes slots of that kind from the
others' shares, and races them again.
Each allocator announces itself under ALLOCATORS on a lease, so the others see it come
and go; with one allocator on a node, its share is all of that node's slots.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import aetcd

from ds01.allocator.placement import SlotKey, kind_of
from ds01.allocator.records import ALLOCATORS, SlotRecord
from ds01.core.leases import LeasedKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """One allocator process: the node it serves and an id drawn when it started."""

    node: str
    id: str

    @property
    def key(self) -> bytes:
        """Where it announces itself: the view reads node and id back from the key."""
        return f"{ALLOCATORS}{self.node}/{self.id}".encode()


def share_of(
    me: Peer, allocators: Mapping[str, Collection[str]], slots: Iterable[SlotRecord]
) -> frozenset[SlotKey] | None:
    """``me``'s share of its node's ``slots``: dealt out in turn to the node's
    allocators (as ``allocators``, node -> ids of those up, says; in order of id), kind
    by kind and each kind in numeric order, as every allocator's view lists them. So
    each share has its part of every kind of slice (a plan is only swapped for one of
    its kind), shares differ by one slot at most, and each spreads over the GPUs. None
    until ``me``'s own announcement is among them (the others do not count it yet)."""
    peers = sorted(allocators.get(me.node, ()))
    if me.id not in peers:
        return None
    dealt = sorted(slots, key=lambda slot: (kind_of(slot), slot.order))
    mine = itertools.islice(dealt, peers.index(me.id), None, len(peers))
    return frozenset((slot.node, slot.slot_id) for slot in mine)


class Presence(LeasedKey):
    """This allocator's key under ALLOCATORS, on a lease it keeps alive: the others stop
    counting it within ``ttl`` seconds of its end, and at once when it stops cleanly."""

    def __init__(self, client: aetcd.Client, node: str, ttl: int = 10) -> None:
        self.me = Peer(node, secrets.token_hex(8))
        super().__init__(client, self.me.key, b"", ttl)
        log.info("allocator %s serves node %s", self.me.id, node)
