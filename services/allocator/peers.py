"""Allocator processes that serve one node split its slots between them when they race.

Each allocator plans on its own watched view, so two that plan at once may both pick the
slot that looks best, and one of them loses the claim: a round trip and a plan wasted,
and a slower answer. That happens when free slots are few and requests many, and then
breaking ties at random hardly helps (the few free slots are on the GPUs of least load,
the same for everyone). So an allocator that has lost races lately swaps each slot it
plans for a free one of the same kind from its own share (see placement.plan): the slots
of its node that fall to it among that node's allocators, by a hash of the slot's key
that every allocator computes alike. Each allocator announces itself under ALLOCATORS on
a lease, so the others see it come and go; with one allocator on a node, its share is
all of that node's slots.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import aetcd

from ds01.allocator.records import ALLOCATORS
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


@dataclass(frozen=True)
class Share:
    """The slots an allocator swaps its plans into while it contends: those of its node
    whose hash falls to it (``index``) among the node's ``of`` allocators, by id."""

    node: str
    index: int
    of: int

    def __contains__(self, key: object) -> bool:
        return (
            isinstance(key, tuple)
            and key[0] == self.node
            and _slot_hash(key[0], key[1]) % self.of == self.index
        )


def share_of(me: Peer, allocators: Mapping[str, Collection[str]]) -> Share | None:
    """``me``'s share of its node, as ``allocators`` (node -> ids of those up) say; None
    until its own announcement is among them (the others do not count it yet)."""
    peers = sorted(allocators.get(me.node, ()))
    if me.id not in peers:
        return None
    return Share(me.node, peers.index(me.id), len(peers))


@functools.lru_cache(maxsize=1 << 16)
def _slot_hash(node: str, slot_id: str) -> int:
    """The same in every process (Python's own hash() of a str is not)."""
    digest = hashlib.blake2b(f"{node}/{slot_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Presence(LeasedKey):
    """This allocator's key under ALLOCATORS, on a lease it keeps alive: the others stop
    counting it within ``ttl`` seconds of its end, and at once when it stops cleanly."""

    def __init__(self, client: aetcd.Client, node: str, ttl: int = 10) -> None:
        self.me = Peer(node, secrets.token_hex(8))
        super().__init__(client, self.me.key, b"", ttl)
        log.info("allocator %s serves node %s", self.me.id, node)
