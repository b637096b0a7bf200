"""Docker events that ds01's own calls cause, told apart from everyone else's.

The reconciler sweeps after Docker's events, so that what happens behind ds01's back (a
``docker stop`` through the gateway, a crash, a remove) is acted on at once. The events
of ds01's own creates, starts, stops and removes need no sweep: the call that caused
them has done what a sweep would do. On a busy node they were most of the events, and
their sweeps cost more than the calls.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

# Seconds after a call during which its events may still arrive: Docker sends them on
# a stream of their own, which may lag behind the call's answer. Meanwhile the same
# action behind ds01's back goes unnoticed until the next full sweep; a different one
# (a `docker stop` after ds01's start, a `docker rm` after its create) never does, nor
# any after ds01's next call on that container.
SETTLE = 5.0

# The actions of Docker's container events that each call causes (``archive-path``
# and ``extract-to-dir``: reading an image's accounts, naming an adopted container's).
CREATE = frozenset({"create", "start"})
PROBE = frozenset({"create", "archive-path", "destroy"})  # a new image's accounts read
START = frozenset({"start", "archive-path", "extract-to-dir"})
STOP = frozenset({"kill", "die", "stop"})
REMOVE = frozenset({"kill", "die", "destroy"})


@dataclass
class _Call:
    actions: frozenset[str]
    until: float = float("inf")  # monotonic; while under way, never past


@dataclass
class OwnEvents:
    """The calls ds01 is making, or made within SETTLE seconds, by container name."""

    settle: float = SETTLE
    _calls: dict[str, list[_Call]] = field(default_factory=dict)

    @contextlib.contextmanager
    def calling(self, name: str, actions: frozenset[str]) -> Iterator[None]:
        """Around a call that acts on container ``name`` with Docker ``actions``. The
        calls on ``name`` that have ended are over: what follows them is this call's, or
        someone else's (a `docker stop` after ds01's stop and start must wake a sweep)."""
        self._forget_settled()
        call = _Call(actions)
        under_way = [c for c in self._calls.get(name, ()) if c.until == float("inf")]
        self._calls[name] = [*under_way, call]
        try:
            yield
        finally:
            call.until = time.monotonic() + self.settle
            # Calls that ended before this one are over too (a create's reading of a
            # new image, inside it): only this one's events may still be coming.
            self._calls[name] = [c for c in self._calls.get(name, ()) if c.until >= call.until]

    def caused(self, name: str, action: str) -> bool:
        """Whether a Docker event ``action`` on container ``name`` is one of a ds01 call's:
        one made now, or that ended under SETTLE seconds ago, whose kind causes it."""
        now = time.monotonic()
        return any(
            action in call.actions and call.until > now for call in self._calls.get(name, ())
        )

    def _forget_settled(self) -> None:
        now = time.monotonic()
        for name in list(self._calls):
            left = [call for call in self._calls[name] if call.until > now]
            if left:
                self._calls[name] = left
            else:
                del self._calls[name]
