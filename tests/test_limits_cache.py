"""The limits service's answers as the allocator and the containers service keep them:
asked once while nothing changes, asked again after a change is reported (a reload here;
the admin group's members in test_limits_service), and always while the change stream
is not followed."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from ds01.client import Ds01Error
from ds01.core import limits_cache
from ds01.core.limits_cache import CachedLimits
from tests.allocator_env import AllocatorEnv


class Asked:
    """The real client's GetLimits, counted, and held while ``hold`` is clear."""

    def __init__(self, cache: CachedLimits) -> None:
        self.count: Counter[str] = Counter()
        self.hold = asyncio.Event()
        self.hold.set()
        real = cache.client.get_limits

        async def get_limits(user: str = "", container_type: str = "") -> object:
            self.count[user] += 1
            answer = await real(user, container_type)
            await self.hold.wait()
            return answer

        cache.client.get_limits = get_limits  # type: ignore[method-assign]


@pytest_asyncio.fixture(loop_scope="session")
async def cache(env: AllocatorEnv) -> AsyncIterator[CachedLimits]:
    cache = CachedLimits(env.service_client("containers"))
    following = asyncio.ensure_future(cache.follow_changes())
    for _ in range(100):
        if cache._watching:
            break
        await asyncio.sleep(0.05)
    assert cache._watching
    yield cache
    following.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await following
    await cache.client.close()


async def _reload(env: AllocatorEnv, old: str, new: str) -> None:
    limits_file = env.config.limits_file
    limits_file.write_text(limits_file.read_text().replace(old, new))


async def test_an_answer_is_asked_once_until_a_reload_changes_it(
    env: AllocatorEnv, cache: CachedLimits
):
    asked = Asked(cache)
    first = await cache.get_limits("alice")
    assert await cache.get_limits("alice") == first
    assert asked.count == {"alice": 1}
    await _reload(env, "priority: 10", "priority: 11")
    try:
        for _ in range(100):
            if (await cache.get_limits("alice")).priority == 11:
                break
            await asyncio.sleep(0.05)
        assert (await cache.get_limits("alice")).priority == 11  # the next request has it
    finally:
        await _reload(env, "priority: 11", "priority: 10")


async def test_many_asking_at_once_ask_once(cache: CachedLimits):
    """A burst for one user (Allocates right after a change dropped what was kept, or
    the same admin's streams each asking again) makes one GetLimits, not one each; a
    refusal reaches each of them alike."""
    asked = Asked(cache)
    asked.hold.clear()
    answers = [asyncio.ensure_future(cache.get_limits("alice")) for _ in range(20)]
    await asyncio.sleep(0.2)
    asked.hold.set()
    got = await asyncio.gather(*answers)
    assert asked.count == {"alice": 1} and all(answer == got[0] for answer in got)
    refused = await asyncio.gather(
        *(cache.get_limits("no/such") for _ in range(5)), return_exceptions=True
    )
    assert asked.count["no/such"] == 1
    assert all(isinstance(r, Ds01Error) and "no/such" in r.message for r in refused), refused


async def test_an_answer_is_asked_again_after_ten_minutes_however_quiet(
    cache: CachedLimits, monkeypatch: pytest.MonkeyPatch
):
    """The resync: a change stream whose peer vanished without a word keeps nothing
    for ever."""
    monkeypatch.setattr(limits_cache, "RESYNC_AFTER", 0.3)
    asked = Asked(cache)
    await cache.get_limits("alice")
    await cache.get_limits("alice")
    await asyncio.sleep(0.4)
    await cache.get_limits("alice")
    assert asked.count == {"alice": 2}


async def test_an_answer_that_a_reload_overtook_is_not_kept(env: AllocatorEnv, cache: CachedLimits):
    asked = Asked(cache)
    asked.hold.clear()
    answer = asyncio.ensure_future(cache.get_limits("alice"))
    await asyncio.sleep(0.2)  # asked, its answer held back on its way
    changes = cache._changes
    await _reload(env, "priority: 10", "priority: 12")
    try:
        for _ in range(100):
            if cache._changes > changes:
                break
            await asyncio.sleep(0.05)
        assert cache._changes > changes
        asked.hold.set()
        await answer  # older than the reload, perhaps
        assert (await cache.get_limits("alice")).priority == 12
        assert asked.count == {"alice": 2}
    finally:
        await _reload(env, "priority: 12", "priority: 10")


async def test_nothing_is_kept_while_the_changes_are_not_followed(env: AllocatorEnv):
    cache = CachedLimits(env.service_client("containers"))
    asked = Asked(cache)
    try:
        await cache.get_limits("alice")
        await cache.get_limits("alice")
    finally:
        await cache.client.close()
    assert asked.count == {"alice": 2}
