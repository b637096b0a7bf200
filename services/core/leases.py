"""Keys on leases: kept alive while a process lives, or deleted after a retention time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aetcd

from ds01.core.etcd import failure_sentence
from ds01.core.tasks import cancel_surely

log = logging.getLogger(__name__)

ROLL = 3600.0  # seconds of writes that share one lease


class RollingLease:
    """One lease for every key written in the same hour, granted for ``retention`` plus
    that hour: each key lives at least ``retention`` seconds, at most an hour more."""

    def __init__(self, retention: float) -> None:
        self.retention = retention
        self._current: tuple[float, int] | None = None  # (granted at, lease id)

    async def put(self, client: aetcd.Client, key: bytes, value: bytes) -> None:
        await self.put_all(client, [(key, value)])

    async def put_all(self, client: aetcd.Client, items: list[tuple[bytes, bytes]]) -> None:
        """Put every (key, value) of ``items`` in one transaction: all or none."""
        now = time.monotonic()
        if self._current is None or now - self._current[0] > ROLL:
            granted = await client.lease(int(self.retention + ROLL))
            self._current = (now, granted.id)
        tx = client.transactions
        try:
            await client.transaction(
                compare=[],
                success=[tx.put(key, value, lease=self._current[1]) for key, value in items],
                failure=[],
            )
        except Exception:  # the lease may be gone (etcd restored, a long outage): a new one
            self._current = None
            raise


class LeasedKey:
    """A key on a lease this process keeps alive: etcd deletes it within ``ttl`` seconds
    of the process's (or the host's) end, and at once when it is withdrawn. Put again
    when the lease ran out (etcd was away longer than that, or restored) or the key was
    deleted under a live lease."""

    def __init__(self, client: aetcd.Client, key: bytes, value: bytes, ttl: int = 10) -> None:
        self.client = client
        self.key = key
        self.value = value
        self.ttl = ttl
        self._lease: aetcd.leases.Lease | None = None
        self._keeper: asyncio.Task[None] | None = None

    async def put(self) -> None:
        # Known before the put: a withdraw while it is under way still revokes it.
        self._lease = lease = await self.client.lease(self.ttl)
        await self.client.put(self.key, self.value, lease=lease)

    async def keep(self) -> None:
        """Put the key if it is not there, then refresh its lease a few times per ``ttl``,
        until withdrawn; a failure is logged once per reason and tried again."""
        self._keeper = asyncio.current_task()
        problem = ""
        while True:
            try:
                refreshed = await self._lease.refresh() if self._lease is not None else None
                if refreshed is None or refreshed.TTL <= 0 or not await self.client.get(self.key):
                    await self.put()
                problem = ""
            except Exception as err:  # etcd away for a while: again next round
                if failure_sentence(err) != problem:
                    problem = failure_sentence(err)
                    log.warning("cannot keep %s alive: %s", self.key.decode(), problem)
            await asyncio.sleep(self.ttl / 3)

    async def withdraw(self) -> None:
        """Stop keeping the key, and delete it now (its lease revoked)."""
        if self._keeper is not None and self._keeper is not asyncio.current_task():
            await cancel_surely(self._keeper)
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._lease.revoke()
            self._lease = None
