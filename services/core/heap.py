"""The cyclic garbage collector, tuned for a long-running server: rare long pauses.

CPython's collector stops the event loop while it scans, and a full collection scans
every live object. With the default thresholds a process holding a fleet's state and
a thousand open streams paused for 15 to 40 ms several times a minute, and every call
and event in flight waited: most of the p99 of an event sent to 1,000 watchers.

Once a process has started, :func:`settle` freezes what start-up made (modules, the
configuration, the first state read) out of every later scan, and spaces collections
out: a full collection, the long pause, comes about 14 times less often. Young
collections stay small (a larger young generation made each middle collection pause
for 15 ms instead). Cycles made later are still collected, only less often.
"""

from __future__ import annotations

import gc

# Net allocations of tracked objects between young collections (CPython's default: 700).
YOUNG_EVERY = 2_000
# Young collections per middle one (default 10), and middle ones per full one (10).
MIDDLE_EVERY = 10
FULL_EVERY = 50


def settle() -> None:
    """Freeze the heap as it is now and space collections out; call once start-up is
    done. Garbage already made is collected first, so nothing dead is frozen."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_EVERY, MIDDLE_EVERY, FULL_EVERY)
