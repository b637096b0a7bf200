"""Work that waits for a caller ends when the caller leaves, even when a cancel is lost.

The lost cancel is made on purpose here: work that catches the first CancelledError and
waits on, as an await that completes in the same moment as the cancel does.
"""

from __future__ import annotations

import asyncio

import pytest

from ds01.core.tasks import Abandoned, cancellable, unless_set


class Work:
    """Waits up to 60 s; swallows the first ``swallow`` cancels it gets."""

    def __init__(self, swallow: int) -> None:
        self.swallow = swallow
        self.ended = asyncio.Event()
        self.cancels = 0

    async def run(self) -> str:
        try:
            for _ in range(600):
                try:
                    await asyncio.sleep(0.1)
                except asyncio.CancelledError:
                    self.cancels += 1
                    if self.cancels > self.swallow:
                        raise
            return "done"
        finally:
            self.ended.set()


@pytest.mark.parametrize("swallow", [0, 1, 3])
async def test_a_cancelled_caller_ends_work_that_swallows_cancels(swallow: int):
    work = Work(swallow)
    caller = asyncio.ensure_future(cancellable(work.run()))
    await asyncio.sleep(0.05)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, 5)
    assert work.ended.is_set() and work.cancels == swallow + 1


async def test_work_that_ends_by_itself_answers_through_cancellable():
    async def quick() -> str:
        await asyncio.sleep(0.01)
        return "answer"

    assert await cancellable(quick()) == "answer"


@pytest.mark.parametrize("swallow", [0, 2])
async def test_abandoned_work_is_ended_and_says_so(swallow: int):
    work, abandoned = Work(swallow), asyncio.Event()
    caller = asyncio.ensure_future(unless_set(abandoned, work.run()))
    await asyncio.sleep(0.05)
    abandoned.set()
    with pytest.raises(Abandoned):
        await asyncio.wait_for(caller, 5)
    assert work.ended.is_set()


async def test_work_that_fails_before_it_is_abandoned_fails_as_it_did():
    async def failing() -> str:
        raise ValueError("no slot")

    with pytest.raises(ValueError, match="no slot"):
        await unless_set(asyncio.Event(), failing())


async def test_a_cancelled_caller_of_unless_set_ends_the_work_too():
    work = Work(swallow=1)
    caller = asyncio.ensure_future(unless_set(asyncio.Event(), work.run()))
    await asyncio.sleep(0.05)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, 5)
    assert work.ended.is_set()


@pytest.mark.parametrize("failure", ["container", "docker", "unexpected"])
async def test_a_call_its_caller_hung_up_on_says_in_one_log_line_how_it_failed(
    failure: str, caplog: pytest.LogCaptureFixture
):
    """A start or create runs on after its caller has gone; when it then fails, nobody is
    left to tell but the log: one warning that names the work and the failure, and no
    "Task exception was never retrieved" with a traceback."""
    import gc

    from ds01.containers.adapters import DockerUnavailable
    from ds01.containers.lifecycle import Code, ContainerError
    from ds01.containers.server import ContainersServicer

    failures = {
        "container": ContainerError(Code.PRECONDITION, "cannot start web: its GPU hold ended"),
        "docker": DockerUnavailable("Docker at unix:///x does not answer"),
        "unexpected": RuntimeError("cannot start web: out of luck"),
    }

    async def start_web() -> None:
        await asyncio.sleep(0.05)
        raise failures[failure]

    servicer = ContainersServicer(lifecycle=None, reconciler=None)  # type: ignore[arg-type]
    call = asyncio.ensure_future(servicer._run(None, start_web()))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    call.cancel()  # the caller hangs up
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.sleep(0.1)
    gc.collect()
    said = [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert len(said) == 1, said
    assert "start_web failed after its caller hung up: " in said[0]
    assert "cannot start web" in said[0] or "does not answer" in said[0]
