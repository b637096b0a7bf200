"""Allocate in one etcd round trip, planned on a watched view, and never wrong because of
it: each test makes one allocator's view lag behind another's claims and releases (as a
slow watch would), and checks that every answer is the one a fresh read gives."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from ds01.allocator.cache import View
from ds01.allocator.placement import AllocationRefused, Preference, Refusal, gpu_of
from ds01.allocator.records import HOLDERS, SLOTS, Holder, SlotRecord, slot_key
from ds01.allocator.service import Actor
from ds01.core.audit import AUDIT
from ds01.core.etcd import connect
from tests.allocator_env import ADMIN, AllocatorEnv, AllocatorNode, allocator_nodes, etcd_revision


@pytest_asyncio.fixture(loop_scope="session")
async def pair(env: AllocatorEnv) -> AsyncIterator[tuple[AllocatorNode, AllocatorNode]]:
    """Two allocators on one etcd, as two processes or two hosts would be."""
    async with allocator_nodes(env, 2) as (first, second):
        yield first, second


async def holder_of(env: AllocatorEnv, node: str, slot_id: str) -> Holder | None:
    client = connect(env.config, "allocator")
    try:
        got = await client.get(slot_key(HOLDERS, node, slot_id))
    finally:
        await client.close()
    return Holder.decode(got.value, got.mod_revision) if got and got.value else None


async def test_the_common_case_is_one_transaction(env: AllocatorEnv, etcd_endpoint: str, pair):
    first, _second = pair
    before = await etcd_revision(etcd_endpoint, env.pki)
    [slot] = await first.allocate("alice", "quick")
    after = await etcd_revision(etcd_endpoint, env.pki)
    assert after == before + 1  # one write: no lock taken and released around it
    assert first.allocator.stats.claimed_at_once == 1
    assert first.allocator.stats.locked_fallbacks == 0
    held = await holder_of(env, env.config.node, slot)
    assert held is not None and held.container == "quick._.alice"
    assert await first.allocate("alice", "quick") == [slot]  # a retry gets the same slot


@pytest.mark.parametrize(
    ("user", "taken", "wanted"),
    [
        ("alice", [{}, {}, {}], {}),  # three 2/7 slices; a fourth passes 1.0
        ("rita", [{"preference": Preference.FULL_GPU}] * 2, {}),  # 2.0 of 2.0, then a slice
        ("rita", [{"slots": 2, "preference": Preference.FULL_GPU}], {}),
    ],
)
async def test_a_view_that_missed_the_users_claims_never_passes_the_quota(
    env: AllocatorEnv, pair, user: str, taken: list[dict], wanted: dict
):
    lagging, current = pair
    await lagging.freeze()  # sees none of what follows
    for n, kind in enumerate(taken):
        await current.allocate(user, f"got{n}", **kind)
    with pytest.raises(AllocationRefused) as refused:
        await lagging.allocate(user, "onetoomany", **wanted)
    assert refused.value.kind is Refusal.QUOTA
    assert lagging.allocator.stats.locked_fallbacks >= 1


async def test_a_view_that_missed_a_claim_on_a_slot_never_double_books_it(env: AllocatorEnv, pair):
    lagging, current = pair
    await lagging.freeze()
    taken = {
        *await current.allocate("rita", "two", slots=2, preference=Preference.FULL_GPU),
        *await current.allocate("alice", "one"),
        *await current.allocate("alice", "two"),
    }
    [slot] = await lagging.allocate("bob", "late")  # planned on a view of five free slots
    assert slot not in taken and {slot, *taken} == {"0", "1", "2:1", "2:2", "2:3"}
    held = await holder_of(env, env.config.node, slot)
    assert held is not None and held.container == "late._.bob"
    with pytest.raises(AllocationRefused) as refused:  # nothing left, whatever the view says
        await lagging.allocate("carl", "none")
    assert refused.value.kind is Refusal.NO_CAPACITY


async def test_a_view_that_missed_a_release_never_answers_with_a_slot_no_longer_held(
    env: AllocatorEnv, pair
):
    lagging, current = pair
    [slot] = await lagging.allocate("alice", "again")
    await lagging.freeze()  # still shows "again" holding its slot
    await current.allocator.release("again._.alice", ADMIN)
    assert await holder_of(env, env.config.node, slot) is None
    [regranted] = await lagging.allocate("alice", "again")
    held = await holder_of(env, env.config.node, regranted)
    assert held is not None and held.container == "again._.alice"  # truly held again


async def test_an_allocators_own_release_frees_the_slot_in_its_view_at_once(
    env: AllocatorEnv, pair
):
    """No wait for the watch: its next plans count the slot free (an allocator that lags
    its own releases takes slots from other allocators' shares, and races them). Only
    the holder released goes: a newer one in the view stays."""
    releasing, _other = pair
    await releasing.freeze()  # nothing but its own doings reaches the view
    view = releasing.cache.view
    [slot] = await releasing.allocate("alice", "brief")
    key = (env.config.node, slot)
    claimed = view.holders[key]
    [again] = await releasing.allocate("alice", "later")
    await releasing.allocator.release("brief._.alice", ADMIN)
    assert key not in view.holders and key in view.free
    later = view.holders[(env.config.node, again)]
    releasing.cache.released([((env.config.node, again), claimed)])  # an older holder
    assert view.holders[(env.config.node, again)] is later


@pytest.mark.parametrize("missed", [1, 2])
async def test_a_view_that_lost_races_settles_at_once_on_what_each_loss_taught_it(
    env: AllocatorEnv, pair, missed: int
):
    """Each lost claim tells the view who won; planning again on it costs one round
    trip, where the locked path would cost three and race as much."""
    lagging, current = pair
    await lagging.freeze()  # three MIG slices free, as far as it knows
    taken = {*[slot for n in range(missed) for slot in await current.allocate("alice", f"a{n}")]}
    [slot] = await lagging.allocate("bob", "late")
    assert slot not in taken and slot.startswith("2:")
    held = await holder_of(env, env.config.node, slot)
    assert held is not None and held.container == "late._.bob"
    assert 1 <= lagging.allocator.stats.claim_conflicts <= missed
    assert lagging.allocator.stats.locked_fallbacks == 0
    assert lagging.allocator.stats.claimed_at_once == 1


@pytest.mark.parametrize(
    ("drained", "user", "wanted", "left"),
    [
        (("n1", "2"), "alice", {}, set()),  # the MIG GPU: a student has nowhere else to go
        (("n1", ""), "rita", {"preference": Preference.FULL_GPU}, set()),  # the whole node
        (("n1", "0"), "rita", {"preference": Preference.FULL_GPU}, {"1"}),  # one of two GPUs
    ],
)
async def test_a_view_that_missed_a_drain_never_allocates_there(
    env: AllocatorEnv, pair, drained: tuple[str, str], user: str, wanted: dict, left: set[str]
):
    lagging, current = pair
    await lagging.freeze()  # plans as if nothing were drained
    await current.allocator.drain(*drained, "driver update", Actor("root", True))
    if not left:
        with pytest.raises(AllocationRefused) as refused:
            await lagging.allocate(user, "late", **wanted)
        assert refused.value.kind is Refusal.NO_CAPACITY
        assert "drained by an admin" in refused.value.message
        return
    assert set(await lagging.allocate(user, "late", **wanted)) <= left


async def test_the_view_follows_claims_releases_and_holds_of_other_allocators(
    env: AllocatorEnv, pair
):
    watching, acting = pair
    [slot] = await acting.allocate("alice", "seen")
    key = (env.config.node, slot)

    async def until(check: object) -> bool:
        for _ in range(100):
            if check():  # type: ignore[operator]
                return True
            await asyncio.sleep(0.02)
        return False

    assert await until(lambda: key in watching.cache.view.holders)
    assert await until(lambda: watching.cache.generation("alice") > 0)
    await acting.allocator.release("seen._.alice", ADMIN)
    assert await until(lambda: key not in watching.cache.view.holders)
    # Holders and claims are followed as one key range; the audit trail lies inside it
    # (and release marks): the view passes over them, waking no waiting request (its
    # revision stays), and still follows what matters.
    revision = watching.cache.view.revision
    waiting = asyncio.ensure_future(watching.cache.wait_for_change(revision, 2.0))
    client = connect(env.config, "allocator")
    try:
        for n in range(3):
            await client.put(f"{AUDIT}2026/entry{n}".encode(), b'{"who": "labadmin"}')
    finally:
        await client.close()
    await asyncio.sleep(0.5)
    assert not waiting.done() and watching.cache.view.revision == revision
    [again] = await acting.allocate("bob", "after")
    await asyncio.wait_for(waiting, 2.0)  # a holder wakes it
    after = (env.config.node, again)
    assert await until(lambda: after in watching.cache.view.holders)
    fresh = await watching.allocator.state.snapshot()
    assert watching.cache.view.holders.keys() == fresh.holders.keys()


async def test_a_view_whose_watch_ends_reads_etcd_again_and_follows_on(env: AllocatorEnv, pair):
    """When its watch ends (here its connection closes, as when etcd goes away), the view
    stops being trusted at once, then reads etcd afresh, with what was claimed in the
    gap, and follows on: it neither stops for good nor plans on a view that no longer
    moves."""
    lagging, acting = pair
    await lagging.client.close()

    async def until(check: object, tries: int = 200) -> bool:
        for _ in range(tries):
            if check():  # type: ignore[operator]
                return True
            await asyncio.sleep(0.02)
        return False

    assert await until(lambda: not lagging.cache.live, 50)
    [gap] = await acting.allocate("alice", "gap")
    key = (env.config.node, gap)
    assert await until(lambda: lagging.cache.live and key in lagging.cache.view.holders)
    assert lagging.cache.view.holders[key].container == "gap._.alice"
    [after] = await acting.allocate("bob", "after")
    assert await until(lambda: (env.config.node, after) in lagging.cache.view.holders)
    await acting.allocator.release("gap._.alice", ADMIN)
    assert await until(lambda: key not in lagging.cache.view.holders)


async def test_a_start_or_stop_on_a_lagging_view_is_made_in_etcd(env: AllocatorEnv, pair):
    """A view that has not seen another allocator's stop must not take the container for
    running already when asked to start it (nor, having missed a start, for stopped when
    asked to stop it): etcd ends as asked (else a hold's lease would end a running
    container's GPU, or a stopped one would keep it for ever), and the answer says what
    etcd has."""
    lagging, acting = pair
    name = "lag._.alice"
    [slot] = await acting.allocate("alice", "lag")
    key = (env.config.node, slot)

    async def etcd_has() -> Holder:
        [(_key, holder)] = (await acting.allocator.state.snapshot()).held_by(name)
        return holder

    for stopped_first in (False, True):  # the view shows it running, then stopped
        if stopped_first:
            await acting.allocator.mark_stopped(name, ADMIN)
        for _ in range(100):
            held = lagging.cache.view.holders.get(key)
            if held is not None and held.stopped is stopped_first:
                break
            await asyncio.sleep(0.02)
        assert held is not None and held.stopped is stopped_first
        await lagging.freeze()
        if stopped_first:
            await acting.allocator.clear_stopped(name, ADMIN)  # started behind its back
            answer = await lagging.allocator.mark_stopped(name, ADMIN)
        else:
            await acting.allocator.mark_stopped(name, ADMIN)  # stopped behind its back
            answer = await lagging.allocator.clear_stopped(name, ADMIN)
        now = await etcd_has()
        assert now.stopped is stopped_first
        assert [g.holder for g in answer] == [now]
        await lagging.thaw(env)


async def test_a_users_status_from_the_view_is_what_etcd_holds_for_that_user(
    env: AllocatorEnv, pair
):
    """A user's own status (what `container list` shows) is answered from the view, at
    a cost that follows the user's holdings: it must say what a fresh read says, for
    that user and no other, on either allocator once its view has followed."""
    first, second = pair
    for user, name in (("alice", "a1"), ("bob", "b1"), ("alice", "a2")):
        await first.allocate(user, name)
    await first.allocator.release("a2._.alice", ADMIN)
    await first.allocate("carol", "c1")
    fresh = await first.allocator.state.snapshot()
    for user in ("alice", "bob", "carol", "dave"):
        expected = {k: h for k, h in fresh.holders.items() if h.user == user}
        for node in (first, second):
            for _ in range(100):  # the second follows the first's writes by its watch
                shown = await node.allocator.status(user)
                if shown.holders == expected:
                    break
                await asyncio.sleep(0.02)
            assert shown.holders == expected
            assert set(shown.slots) == set(expected)
            assert all(shown.slots[k] == fresh.slots[k] for k in expected)


async def test_a_nodes_status_reads_that_nodes_keys_and_is_what_the_fleets_says(
    env: AllocatorEnv, pair
):
    """Each node's reconciler asks for its node's status every sweep: that reads the
    node's keys alone, and says what the whole fleet's read says of the node, for
    nodes whose names begin alike (n1, n1x, n10)."""
    first, _second = pair
    state = first.allocator.state
    here = env.config.node
    others = [f"{here}x", f"{here}0"]
    for node in others:
        for gpu in range(2):
            record = SlotRecord(node, f"{gpu}", f"GPU-{node}-{gpu}", "A100", "", 40 << 30, 1.0)
            await state.client.put(slot_key(SLOTS, node, record.slot_id), record.encode())
        holder = Holder(user="bob", container=f"{node}._.bob", since=1.0, priority=10)
        await state.client.put(slot_key(HOLDERS, node, "1"), holder.encode())
    await first.allocate("alice", "mine")
    try:
        fleet = await first.allocator.status()
        for node in (here, *others):
            shown = await first.allocator.status(node=node)
            assert shown.slots == {k: s for k, s in fleet.slots.items() if k[0] == node}
            assert shown.holders == {k: h for k, h in fleet.holders.items() if k[0] == node}
            assert shown.slots and shown.nodes == fleet.nodes
    finally:
        for node in others:
            await state.client.delete_prefix(f"{SLOTS}{node}/".encode())
            await state.client.delete_prefix(f"{HOLDERS}{node}/".encode())


async def test_what_a_container_holds_is_found_in_the_view_as_etcd_has_it(env: AllocatorEnv, pair):
    """A release, stop or start finds the container's slots through the view's index of
    containers, not by a scan of every holder in the fleet: on either allocator, once its
    view has followed, that must list what a fresh read lists, in slot order, for
    containers whose names begin alike. A stop's and a start's answers, from the view (or
    read on the container's node alone, where there is no live view), must say what a
    fresh read of the fleet says."""
    first, second = pair
    await first.allocate("alice", "two")
    await first.allocate("rita", "two", slots=2, preference=Preference.MIG)
    await first.allocate("rita", "gone", preference=Preference.FULL_GPU)
    await first.allocator.release("gone._.rita", ADMIN)
    await first.allocate("rita", "tw", preference=Preference.FULL_GPU)
    fresh = await first.allocator.state.snapshot()
    assert len(fresh.held_by("two._.rita")) == 2
    names = ("two._.rita", "tw._.rita", "two._.alice", "gone._.rita", "two", "t")
    for node in (first, second):
        for name in names:
            for _ in range(100):  # the second follows the first's writes by its watch
                if node.cache.view.snapshot().held_by(name) == fresh.held_by(name):
                    break
                await asyncio.sleep(0.02)
            assert node.cache.view.snapshot().held_by(name) == fresh.held_by(name), name
    for node, stopped, live in ((second, True, True), (first, False, False), (second, True, False),
                                (first, False, True)):  # fmt: skip
        change = node.allocator.mark_stopped if stopped else node.allocator.clear_stopped
        node.cache.live = live  # not live: as while its watch is lost
        try:
            answer = await change("two._.rita", ADMIN)
        finally:
            node.cache.live = True
        now = await first.allocator.state.snapshot()
        assert [(g.slot, g.holder) for g in answer] == [
            (now.slots[key], holder) for key, holder in now.held_by("two._.rita")
        ]
        assert all(g.holder.stopped is stopped for g in answer)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["slot", "unslot", "hold", "stop", "free"]),
                          st.sampled_from(["n1", "n10"]),
                          st.sampled_from(["0", "1:1", "1:2", "10"]),
                          st.sampled_from(["a._.alice", "b._.bob"])), max_size=40))  # fmt: skip
def test_the_views_indexes_stay_what_its_slots_and_holders_say(steps: list[tuple]):
    """Slots and holders come and go in any order (a holder may come before its slot):
    the free slots, each GPU's load and slot count, the holds that end, and each
    container's and user's keys, kept up to date one change at a time, must be what the
    records say."""
    view = View()
    for step, node, slot_id, container in steps:
        key = (node, slot_id)
        if step == "slot":
            view.set_slot(key, SlotRecord(node, slot_id, "", "A100", "", 0, 1.0))
        elif step == "unslot":
            view.drop_slot(key)
        elif step in ("hold", "stop"):  # a running container's, or a stopped one's hold
            user = container.rpartition(".")[2]
            until = 9.0 if step == "stop" else None
            view.set_holder(
                key, Holder(user, container, 1.0, 1, stopped_at=until, hold_until=until)
            )
        else:
            view.drop_holder(key)
        assert view.free == {k: s for k, s in view.slots.items() if k not in view.holders}
        assert view.gpu_load == Counter(map(gpu_of, view.holders))
        assert view.gpu_slots == Counter(map(gpu_of, view.slots))
        assert view.holds == {k: h for k, h in view.holders.items() if h.hold_until is not None}
        for name, index in (("container", view.container_keys), ("user", view.user_keys)):
            expected: dict[str, set] = {}
            for k, h in view.holders.items():
                expected.setdefault(getattr(h, name), set()).add(k)
            assert index == expected
        fleet = view.snapshot().fleet
        assert fleet is not None
        assert fleet.any_idle() == any(gpu_of(k) not in view.gpu_load for k in view.slots)


def test_the_view_keeps_slots_in_the_order_placement_reads_them():
    """Placement takes the first free slots on unused GPUs in numeric order, so the view
    must hand them over in that order, however the watch brought them: "2" before "10"."""
    view = View()
    arrived = [("b", "10"), ("a", "3:2"), ("b", "2"), ("a", "10:1"), ("a", "3:10"), ("a", "3:1")]
    for node, slot_id in arrived:
        view.set_slot((node, slot_id), SlotRecord(node, slot_id, "", "A100", "", 0, 1.0))
    numeric = ["a/3:1", "a/3:2", "a/3:10", "a/10:1", "b/2", "b/10"]
    assert [f"{n}/{s}" for n, s in view.snapshot().slots] == numeric
    assert [f"{n}/{s}" for n, s in view.snapshot("a").slots] == numeric[:4]
    view.set_slot(("b", "1"), SlotRecord("b", "1", "", "A100", "", 0, 1.0))  # one more GPU
    assert [s for n, s in view.snapshot("b").slots] == ["1", "2", "10"]
