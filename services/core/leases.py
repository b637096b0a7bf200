"""Keys that etcd deletes after a retention time, without a lease grant per key."""

from __future__ import annotations

import time

import aetcd

ROLL = 3600.0  # seconds of writes that share one lease


class RollingLease:
    """One lease for every key written in the same hour, granted for ``retention`` plus
    that hour: each key lives at least ``retention`` seconds, at most an hour more."""

    def __init__(self, retention: float) -> None:
        self.retention = retention
        self._current: tuple[float, int] | None = None  # (granted at, lease id)

    async def put(self, client: aetcd.Client, key: bytes, value: bytes) -> None:
        now = time.monotonic()
        if self._current is None or now - self._current[0] > ROLL:
            granted = await client.lease(int(self.retention + ROLL))
            self._current = (now, granted.id)
        try:
            await client.put(key, value, lease=self._current[1])
        except Exception:  # the lease may be gone (etcd restored, a long outage): a new one
            self._current = None
            raise
