"""What the allocator keeps in etcd: one key per thing, JSON values.

/ds01/v1/nodes/<node>                  registration, on a lease the node keeps alive
/ds01/v1/slots/<node>/<slot>           inventory: a full GPU or a MIG instance
/ds01/v1/alloc/holders/<node>/<slot>   who holds the slot; created only if absent.
                                       While a stopped container's hold runs, the
                                       key is on a lease of the hold's length, so
                                       etcd frees the slot on time by itself.
/ds01/v1/alloc/released/<node>/<slot>  written in the same transaction as a release,
                                       so the event stream can tell a release from
                                       a hold that expired
/ds01/v1/locks/users/<user>            per-user lock around "check quota, claim"
/ds01/v1/waiters/<order>               Allocate calls waiting for a slot, in serving
                                       order (priority, then arrival)
/ds01/v1/drains/<node>[/<gpu>]         no new allocations on a node or one of its GPUs
/ds01/v1/allocators/<node>/<id>        an allocator process that is up, on its lease
                                       (see peers.py)
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from typing import Any

from ds01.core.records import JsonRecord, fields_of

ROOT = "/ds01/v1/"
NODES = ROOT + "nodes/"
SLOTS = ROOT + "slots/"
ALLOC = ROOT + "alloc/"
HOLDERS = ALLOC + "holders/"
RELEASED = ALLOC + "released/"
USER_LOCKS = ROOT + "locks/users/"
WAITERS = ROOT + "waiters/"
DRAINS = ROOT + "drains/"
ALLOCATORS = ROOT + "allocators/"
# One key per user, written by every claim for that user: a claim planned on an older
# view compares its revision, so no two claims can both pass one quota check.
CLAIMS = ROOT + "claims/users/"


def slot_key(prefix: str, node: str, slot_id: str) -> bytes:
    return f"{prefix}{node}/{slot_id}".encode()


def split_slot_key(prefix: str, key: bytes) -> tuple[str, str]:
    node, _, slot_id = key.decode()[len(prefix) :].partition("/")
    return node, slot_id


def _slot_order(slot_id: str) -> tuple[int, ...]:
    """Numeric order: "2" before "10", "0:2" before "0:10"."""
    return tuple(int(part) if part.isdigit() else -1 for part in slot_id.split(":"))


@dataclass(frozen=True)
class SlotRecord(JsonRecord):
    node: str
    slot_id: str
    uuid: str
    product: str
    mig_profile: str
    memory_bytes: int
    gpu_equivalents: float

    # Computed once per record: placement reads them for every slot of the fleet.
    @functools.cached_property
    def gpu(self) -> str:
        return self.slot_id.split(":", 1)[0]

    @functools.cached_property
    def is_mig(self) -> bool:
        return ":" in self.slot_id

    @functools.cached_property
    def order(self) -> tuple[str, tuple[int, ...]]:
        return (self.node, _slot_order(self.slot_id))


@dataclass(frozen=True)
class Holder:
    user: str
    container: str
    since: float  # epoch seconds
    priority: int
    stopped_at: float | None = None
    hold_until: float | None = None  # None while running, or for an indefinite hold
    # From etcd, not stored in the value:
    mod_revision: int = 0
    lease: int = 0

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def encode(self) -> bytes:
        data = fields_of(self)
        del data["mod_revision"], data["lease"]
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, mod_revision: int = 0, lease: int = 0) -> Holder:
        fields: dict[str, Any] = json.loads(data)
        return cls(**fields, mod_revision=mod_revision, lease=lease)

    @classmethod
    def of(cls, kv: Any) -> Holder:
        """The holder an etcd key-value holds, with its revision and lease."""
        return cls.decode(kv.value, kv.mod_revision, kv.lease)

    def running(self) -> Holder:
        return replace(self, stopped_at=None, hold_until=None)


@dataclass(frozen=True)
class NodeRecord(JsonRecord):
    node: str
    inventory_source: str
    simulated: bool
    registered_at: float


@dataclass(frozen=True)
class ReleaseMark(JsonRecord):
    container: str
    user: str
    by: str  # who released it: a user, an admin or svc:<service>
    reason: str = "released"
    at: float = 0.0  # when (epoch seconds); 0 in marks written before it was kept


@dataclass(frozen=True)
class WaiterRecord(JsonRecord):
    """An Allocate call queued for slots: who, for what, since and until when."""

    node: str
    slots: int
    user: str = ""  # empty in records written before the queue was shown
    container: str = ""
    preference: str = "any"
    priority: int = 0
    since: float = 0.0
    until: float = 0.0


@dataclass(frozen=True)
class DrainRecord(JsonRecord):
    """No new allocations on ``node`` (every GPU, when ``gpu`` is empty) or on one GPU
    of it; what is allocated there stays."""

    node: str
    gpu: str
    by: str
    reason: str
    since: float

    @property
    def target(self) -> str:
        return f"{self.node}/{self.gpu}" if self.gpu else self.node


def drain_key(node: str, gpu: str = "") -> bytes:
    return f"{DRAINS}{node}/{gpu}".encode() if gpu else f"{DRAINS}{node}".encode()
