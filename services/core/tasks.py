"""Cancels that land: for work that may wait long on behalf of a caller who can leave.

asyncio delivers a cancel once, and an await that completes in the same moment can
swallow it: Python 3.11's ``wait_for`` returns the inner result instead, and a grpc.aio
unary call returns its answer when the cancel meets the answer on its way in. A waiting
Allocate whose caller left then waited on to its deadline, holding its place in the
GPU queue. Here the waiting work runs in a task of its own, and its cancel is sent
again until the task has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

CANCEL_AGAIN = 0.5  # seconds before a cancel the work swallowed is sent again


async def cancel_surely(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and return once it has ended, cancelling it again while it runs."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=CANCEL_AGAIN)


async def cancellable(work: Awaitable[T]) -> T:
    """Await ``work``; if this await is cancelled, ``work`` ends too, for sure, before
    the cancel goes on (a second cancel meanwhile leaves the ending to the background)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.shield(cancel_surely(task))
        raise


class Abandoned(Exception):
    """The one who asked for the work has gone: it was stopped before its end."""


async def unless_set(abandoned: asyncio.Event | None, work: Awaitable[T]) -> T:
    """``work``'s result, or :class:`Abandoned` (with ``work`` surely ended) once
    ``abandoned`` is set first."""
    if abandoned is None:
        return await work
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(abandoned.wait())
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            await asyncio.shield(cancel_surely(task))
    if task.cancelled() or abandoned.is_set():
        if not task.cancelled():
            task.exception()  # retrieved: what the work came to no longer matters
        raise Abandoned()
    return task.result()
