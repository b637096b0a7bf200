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
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

CANCEL_AGAIN = 0.5  # seconds before a cancel the work swallowed is sent again


async def cancel_surely(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and return once it has ended, cancelling it again while it runs."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=CANCEL_AGAIN)


async def landed(task: asyncio.Future[Any]) -> None:
    """Return once ``task`` has ended, whatever it came to, through any further cancels
    of the one waiting (who is being cancelled, and only lets ``task`` finish first)."""
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([task])
    _retrieve(task)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark what ``task`` came to as seen: nobody who wanted it waits for it any more."""
    if not task.cancelled():
        task.exception()


async def cancellable(
    work: Awaitable[T], dropped: Callable[[], Awaitable[object]] | None = None
) -> T:
    """Await ``work``; if this await is cancelled, ``work`` ends too, for sure, and then
    ``dropped`` undoes what it did, whatever it came to (an answer nobody will read, or
    a step cut off halfway), before the cancel goes on. A second cancel meanwhile leaves
    both to the background."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.shield(_end(task, dropped))
        raise


async def _end(task: asyncio.Future[Any], dropped: Callable[[], Awaitable[object]] | None) -> None:
    await cancel_surely(task)
    _retrieve(task)
    if dropped is not None:
        try:
            await dropped()
        except Exception:  # logged, not raised: the caller has gone
            log.exception("could not undo what a call whose caller left had done")


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
        _retrieve(task)  # what the work came to no longer matters
        raise Abandoned()
    return task.result()
