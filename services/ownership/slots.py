"""Connections per user on the ownership service's local sockets: one user's flood of
connections must not use up the descriptors every other user needs."""

from __future__ import annotations


class Slots:
    """At most ``limit`` open connections per uid (root is not counted)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[int, int] = {}

    def take(self, uid: int) -> bool:
        if uid == 0:
            return True
        if self.open.get(uid, 0) >= self.limit:
            return False
        self.open[uid] = self.open.get(uid, 0) + 1
        return True

    def give(self, uid: int) -> None:
        if uid != 0:
            self.open[uid] -= 1
