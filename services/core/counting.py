"""Things under way, counted by key (a user's open streams, the containers being
started or stopped): the table holds only what is under way now."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator


@contextlib.contextmanager
def counted(table: Counter[str], key: str) -> Iterator[None]:
    """``key`` counted once more in ``table`` while the block runs; gone at zero."""
    table[key] += 1
    try:
        yield
    finally:
        table[key] -= 1
        if not table[key]:
            del table[key]
