"""The audit trail: one structured record per decision an admin needs after an incident.

Every gateway decision other than a plain read of the caller's own things, and every
admin action over gRPC (and every refused one), becomes a record: who, what, target,
decision, reason. Each is one log line (fields of their own with ``log_format: json``)
and a key in etcd, kept for ``RETENTION`` seconds, so ``ds01 admin audit`` reads the
whole fleet's trail from any service. Writing never delays the decision: records are
queued and written by a task of their own; if etcd is away, the log line remains.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aetcd

from ds01.core.leases import RollingLease
from ds01.core.records import JsonRecord, fields_of

log = logging.getLogger("ds01.audit")

AUDIT = "/ds01/v1/audit/"
RETENTION = 90 * 86400  # seconds a record is kept in etcd (the log keeps its own)
QUEUED = 10_000  # records waiting for etcd at most; beyond, only the log line is kept
WRITTEN_AT_ONCE = 64  # records in one transaction at most (etcd allows 128 operations)
# A record's target and reason at most: 64 records of the longest stay far within the
# 1.5 MiB etcd takes in one request.
FIELD_CHARACTERS = 1024


@dataclass(frozen=True)
class AuditRecord(JsonRecord):
    time: float  # epoch seconds
    node: str
    service: str  # ownership (the gateway), allocator, containers, limits
    who: str  # the caller's login name
    action: str  # a gateway route (container_create) or a gRPC method (Release)
    target: str  # what it acted on: a container, image, user; "" when nothing named
    decision: str  # allowed, denied or failed
    reason: str = ""  # why it was denied or failed (the caller's message)

    def line(self) -> str:
        """One line, whatever a caller put in a name: control characters (a newline in
        a create's ?name=, an ANSI escape) are written as escapes, never forge a line."""
        who, action, target, reason = map(_printable, (self.who, self.action, self.target,
                                                       self.reason))  # fmt: skip
        text = f"{who} {action} {target or '-'}: {self.decision}"
        return f"{text} ({reason})" if reason else text


def _cut(text: str) -> str:
    """``text`` within FIELD_CHARACTERS: a caller's name or sentence (a 1 MiB ?name=, a
    Dockerfile line quoted in a refusal) must not flood the log, nor make a write of
    queued records too large for etcd, which would hold back every record after it."""
    if len(text) <= FIELD_CHARACTERS:
        return text
    return f"{text[:FIELD_CHARACTERS]}... ({len(text) - FIELD_CHARACTERS} more characters)"


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def record_key(record: AuditRecord, sequence: int) -> bytes:
    """Ordered by time, so a read from a moment on is one range read."""
    stamp = int(record.time * 1e9)
    return f"{AUDIT}{stamp:020d}/{record.node}/{record.service}/{sequence}".encode()


class AuditLog:
    """Where one service's records go: the log at once, etcd soon after."""

    def __init__(self, node: str, service: str, etcd: Callable[[], aetcd.Client] | None) -> None:
        self.node = node
        self.service = service
        self._etcd = etcd  # opened on the first record: most services record seldom
        self._client: aetcd.Client | None = None
        self._queue: asyncio.Queue[AuditRecord] = asyncio.Queue(QUEUED)
        self._sequence = itertools.count()
        self._lease = RollingLease(RETENTION)

    def record(self, who: str, action: str, target: str, decision: str, reason: str = "") -> None:
        entry = AuditRecord(time.time(), self.node, self.service, who, action, _cut(target),
                            decision, _cut(reason))  # fmt: skip
        log.info("audit: %s", entry.line(), extra={"audit": fields_of(entry)})
        if self._etcd is None:
            return
        try:
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            log.warning("audit queue full: %s is in the log only", entry.line())

    async def run(self) -> None:
        """Write queued records to etcd, for as long as the service runs: those queued
        while a write was under way go together in the next (one transaction)."""
        while True:
            entries = [await self._queue.get()]
            while len(entries) < WRITTEN_AT_ONCE and not self._queue.empty():
                entries.append(self._queue.get_nowait())
            items = [(record_key(e, next(self._sequence)), e.encode()) for e in entries]
            while True:
                try:
                    await self._write(items)
                    break
                except Exception as err:  # etcd away: keep the order, try again
                    log.warning("cannot write %d audit record(s) to etcd yet: %s", len(items), err)
                    await asyncio.sleep(2)

    async def _write(self, items: list[tuple[bytes, bytes]]) -> None:
        assert self._etcd is not None
        if self._client is None:
            self._client = self._etcd()
        await self._lease.put_all(self._client, items)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


async def read_audit(
    client: aetcd.Client, since: float = 0.0, user: str = "", limit: int = 1000
) -> list[AuditRecord]:
    """Records from ``since`` on (epoch seconds), oldest first; the newest ``limit``."""
    start = f"{AUDIT}{int(since * 1e9):020d}".encode()
    end = AUDIT[:-1].encode() + b"0"  # just past the prefix ('/' + 1)
    found = await client.get_range(start, end)
    records = [AuditRecord.decode(kv.value) for kv in found]
    if user:
        records = [r for r in records if r.who == user or r.target == user]
    return records[-limit:] if limit else records
