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
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

# Seconds a call is remembered after it ended, for its events to arrive: Docker sends
# them on a stream of their own, which lags behind the call's answer under load. An
# event is the call's if Docker stamped it while the call ran (the same host's clock),
# so a `docker stop` behind ds01's back a moment after ds01's own is seen all the same.
KEEP = 60.0
SLACK = 0.05  # seconds: the clocks' reading at either end of a call

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
    started: float  # time.time()
    ended: float = float("inf")  # while under way, never


@dataclass
class OwnEvents:
    """The calls ds01 is making, or made within KEEP seconds, by container name."""

    _calls: dict[str, list[_Call]] = field(default_factory=dict)
    # The calls that ended, in the order they ended: the oldest are forgotten first,
    # without a look at the others (a busy node makes thousands a minute).
    _ended: deque[tuple[str, _Call]] = field(default_factory=deque)

    @contextlib.contextmanager
    def calling(self, name: str, actions: frozenset[str]) -> Iterator[None]:
        """Around a call that acts on container ``name`` with Docker ``actions``."""
        self._forget_old()
        call = _Call(actions, time.time())
        self._calls.setdefault(name, []).append(call)
        try:
            yield
        finally:
            call.ended = time.time()
            self._ended.append((name, call))

    def caused(self, name: str, action: str, when: float) -> bool:
        """Whether a Docker event ``action`` on container ``name``, stamped ``when``
        (seconds since the epoch), happened during a ds01 call whose kind causes it."""
        return any(
            action in call.actions and call.started - SLACK <= when <= call.ended + SLACK
            for call in self._calls.get(name, ())
        )

    def _forget_old(self) -> None:
        oldest = time.time() - KEEP
        while self._ended and self._ended[0][1].ended <= oldest:
            name, call = self._ended.popleft()
            calls = self._calls[name]
            calls.remove(call)
            if not calls:
                del self._calls[name]
