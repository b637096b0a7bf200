"""ds01d's collector settings: fewer pauses, and still no garbage kept."""

from __future__ import annotations

import gc
import weakref

from ds01.core import heap


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_cycles_made_after_settling_are_still_freed_without_asking():
    before = gc.get_threshold()
    try:
        heap.settle()
        made = [weakref.ref(_Cycle()) for _ in range(50_000)]
        alive = sum(ref() is not None for ref in made)
        # Young collections run every YOUNG_EVERY net allocations: at most the last
        # batch of cycles can still be waiting.
        assert alive <= 2 * heap.YOUNG_EVERY, f"{alive} of {len(made)} cycles were kept"
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
