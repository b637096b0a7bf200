"""Allocators that serve one node see each other come and go, and split its slots between
them once they race: each then takes slots of its own share first, and loses no more
claims to the others while its share has room."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from ds01.allocator import service
from ds01.allocator.peers import Peer, share_of
from ds01.allocator.placement import kind_of
from ds01.allocator.records import HOLDERS, SlotRecord, slot_key
from ds01.core import watch
from ds01.core.pki import Pki
from tests.allocator_env import AllocatorEnv, AllocatorNode, allocator_nodes, make_env

# Nobody's quota is in the way: only which slot each allocator picks is asked about.
UNLIMITED = (
    "defaults:\n  max_gpu_equivalents: null\n  max_gpu_slots_per_container: null\n"
    "  allow_full_gpu: true\n  priority: 10\n"
)
# Seven GPUs of seven 1g.10gb slices: 49 slots.
SEVEN_BY_SEVEN = "gpus:\n" + "".join(
    f"  - index: {gpu}\n    uuid: GPU-{gpu}\n    mig:\n      instances:\n"
    + "".join(
        f"        - {{id: {i}, profile: 1g.10gb, uuid: MIG-{gpu}-{i}}}\n" for i in range(1, 8)
    )
    for gpu in range(7)
)


@pytest_asyncio.fixture(loop_scope="session")
async def env(
    tmp_path: Path, pki: Pki, state_dir: Path, etcd_endpoint: str
) -> AsyncIterator[AllocatorEnv]:
    env = await make_env(tmp_path, pki, state_dir, etcd_endpoint, limits=UNLIMITED,
                         inventory=SEVEN_BY_SEVEN)  # fmt: skip
    yield env
    await env.stop()


PROFILES = [("1g.10gb", 1 / 7), ("2g.20gb", 2 / 7), ("3g.40gb", 3 / 7), ("", 1.0)]


def slice_of(gpu: int, index: int, profile: int) -> SlotRecord:
    name, weight = PROFILES[profile]  # "": a whole GPU, of its own kind
    return SlotRecord("gpu-01", f"{gpu}:{index}", f"MIG-{gpu}-{index}", "A100", name, 10 << 30,
                      weight)  # fmt: skip


node_slots = st.lists(
    st.tuples(st.integers(0, 15), st.integers(0, 7), st.integers(0, 3)),
    unique_by=lambda s: (s[0], s[1]),
    max_size=60,
).map(lambda found: [slice_of(*s) for s in found])


@given(
    ids=st.lists(st.text("0123456789abcdef", min_size=1, max_size=16), min_size=1, max_size=6,
                 unique=True),
    slots=node_slots,
)  # fmt: skip
def test_the_allocators_of_a_node_split_each_kind_of_its_slots_evenly(
    ids: list[str], slots: list[SlotRecord]
):
    """Every slot to one allocator, and every kind of slot shared out evenly: a plan is
    only swapped for a slot of its kind, so a share short of one kind would race."""
    allocators = {"gpu-01": set(ids), "gpu-02": {"other"}}
    keys = {(slot.node, slot.slot_id) for slot in slots}
    shares = [share_of(Peer("gpu-01", me), allocators, reversed(slots)) for me in ids]
    assert sorted(k for share in shares for k in share) == sorted(keys)  # each once
    for kind in {kind_of(slot) for slot in slots}:
        alike = {(slot.node, slot.slot_id) for slot in slots if kind_of(slot) == kind}
        sizes = [len(share & alike) for share in shares]
        assert max(sizes) - min(sizes) <= 1, (kind, sizes)
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1
    assert share_of(Peer("gpu-01", "not-announced"), allocators, slots) is None
    assert share_of(Peer("gpu-03", ids[0]), allocators, slots) is None


@pytest.mark.parametrize("allocators", [2, 3, 4, 7])
def test_each_share_holds_every_kind_of_slice_on_every_gpu(allocators: int):
    """Eight A100s split 3g+2g+1g+1g (as a lab splits them): each allocator's share
    has every kind of slice, and spreads over the GPUs as the node's slots do."""
    ids = {f"allocator-{n}" for n in range(allocators)}
    slots = [slice_of(gpu, i, p) for gpu in range(8) for i, p in enumerate((2, 1, 0, 0))]
    for me in ids:
        share = share_of(Peer("gpu-01", me), {"gpu-01": ids}, slots)
        mine = [slot for slot in slots if (slot.node, slot.slot_id) in share]
        assert {kind_of(slot) for slot in mine} == {kind_of(slot) for slot in slots}
        assert len({slot.slot_id.split(":")[0] for slot in mine}) >= min(8, len(mine) // 2)


async def _until(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.05)
    return False


def _seen(node: AllocatorNode, of: str) -> set[str]:
    """The allocators of node ``of`` that are up, as ``node``'s view has them now."""
    return node.cache.view.allocators.get(of, set())


async def test_allocators_see_each_other_come_and_go(env: AllocatorEnv):
    node = env.config.node
    async with allocator_nodes(env, 3, announce=True, ttl=2) as (watching, leaving, dying):
        # The service's own allocator is one of them: it announced itself at start.
        assert await _until(lambda: len(_seen(watching, node)) == 4, 2.0)
        assert {leaving.presence.me.id, dying.presence.me.id} <= _seen(watching, node)

        await leaving.presence.withdraw()  # a clean stop: gone at once
        assert await _until(lambda: leaving.presence.me.id not in _seen(watching, node), 1.0)

        dying.keeping.cancel()  # kill -9: its key stays until its lease runs out
        await asyncio.sleep(0.5)
        assert dying.presence.me.id in _seen(watching, node)
        assert await _until(lambda: dying.presence.me.id not in _seen(watching, node), 5.0)
        assert leaving.presence.me.id not in _seen(watching, node)  # and it stayed away

        await env.stop("allocator")  # the service withdraws as it stops
        assert await _until(lambda: _seen(watching, node) == {watching.presence.me.id}, 1.0)


@pytest.mark.parametrize("lost", ["lease", "key"])
async def test_an_allocator_whose_announcement_was_lost_makes_it_again(
    env: AllocatorEnv, lost: str
):
    """etcd away longer than the lease, or restored from a backup (the lease is gone), or
    an admin's delete (the key is): announced again within a third of the lease."""
    async with allocator_nodes(env, 2, announce=True, ttl=3) as (watching, gone):
        key = gone.presence.me.key
        announced = await watching.client.get(key)
        since = announced.mod_revision + 1
        async with watch.watching(watching.client, [watch.only(key)], since) as events:
            if lost == "lease":
                await watching.client.revoke_lease(announced.lease)
            else:
                await watching.client.delete(key)
            kinds = []
            async with asyncio.timeout(2.5):
                async for written in events:
                    kinds += [event.type for event in written]
                    if len(kinds) >= 2:
                        break
        assert kinds == [watch.DELETE, watch.PUT]
        assert await _until(lambda: gone.presence.me.id in _seen(watching, env.config.node), 1.0)


async def _lose_a_race(env: AllocatorEnv, racers: list[AllocatorNode], winner: AllocatorNode):
    """Each of ``racers`` plans on a view that missed the winner's claim, and loses it."""
    for racer in racers:
        await racer.freeze()
    [taken] = await winner.allocate("wanda", "first")
    for n, racer in enumerate(racers):
        before = racer.allocator.stats.claim_conflicts
        [got] = await racer.allocate("lou", f"late{n}")
        assert got != taken and racer.allocator.stats.claim_conflicts == before + 1
        await racer.thaw(env)


@pytest.fixture(autouse=True)
def contended_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long enough for a slow machine to act while the allocators still contend."""
    monkeypatch.setattr(service, "CONTENDED_FOR", 120.0)


async def test_allocators_that_lost_a_race_split_the_node_and_race_no_more(env: AllocatorEnv):
    node = env.config.node
    async with (
        allocator_nodes(env, 2, announce=True) as (first, second),
        allocator_nodes(env, 1) as [winner],  # announces nothing: it has no share
    ):
        await _lose_a_race(env, [first, second], winner)
        view = first.cache.view
        shares = [view.share(racer.presence.me) for racer in (first, second)]
        free = [[key for key in view.free if key in share] for share in shares]
        burst = min(8, *map(len, free))
        assert burst >= 3  # 49 slots over three allocators (the service's is the third)

        async def claim(racer: int, n: int) -> tuple[str, str]:
            [slot] = await (first, second)[racer].allocate(f"u{n}", f"burst{racer}-{n}")
            return node, slot

        before = [racer.allocator.stats.claim_conflicts for racer in (first, second)]
        got = await asyncio.gather(*(claim(racer, n) for n in range(burst) for racer in (0, 1)))
        after = [racer.allocator.stats.claim_conflicts for racer in (first, second)]
        assert after == before  # no claim lost: each took its own share
        assert set(got[0::2]) <= set(free[0]) and set(got[1::2]) <= set(free[1])
        assert len(set(got)) == 2 * burst  # and each slot went once, as etcd holds it
        for key in got:
            assert await first.client.get(slot_key(HOLDERS, *key)) is not None


async def test_a_full_share_refuses_nothing(env: AllocatorEnv):
    """Once its share is taken, a contending allocator takes slots outside it."""
    node = env.config.node
    async with (
        allocator_nodes(env, 2, announce=True) as (first, _second),
        allocator_nodes(env, 1) as [winner],
    ):
        await _lose_a_race(env, [first], winner)
        share = first.cache.view.share(first.presence.me)
        mine = [key for key in first.cache.view.free if key in share]
        got = [(node, (await first.allocate(f"f{n}", f"f{n}"))[0]) for n in range(len(mine))]
        assert sorted(got) == sorted(mine)
        [beyond] = await first.allocate("g", "beyond")
        assert (node, beyond) not in share
