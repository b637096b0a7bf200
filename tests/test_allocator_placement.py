"""Slot choice, quotas and preemption, tested directly on snapshots (no etcd)."""

from __future__ import annotations

import contextlib
import random
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds01.allocator import placement
from ds01.allocator.cache import View
from ds01.allocator.placement import (
    AllocationRefused,
    Preference,
    Quota,
    Refusal,
    Request,
    Strategy,
    plan,
)
from ds01.allocator.records import Holder, SlotRecord

STUDENT = Quota(
    "student", 10, max_gpu_equivalents=1, max_slots_per_container=2, allow_full_gpu=False
)
RESEARCHER = Quota("researchers", 50, 2, 2, allow_full_gpu=True)


def full(node: str, index: int) -> SlotRecord:
    return SlotRecord(node, str(index), f"GPU-{index}", "A100", "", 80 << 30, 1.0)


def mig(node: str, index: int, instance: int, compute: int = 2) -> SlotRecord:
    return SlotRecord(
        node,
        f"{index}:{instance}",
        f"MIG-{index}-{instance}",
        "A100",
        f"{compute}g.20gb",
        20 << 30,
        compute / 7,
    )


def holder(user: str, container: str, priority: int = 10, stopped: float | None = None) -> Holder:
    return Holder(user, container, since=1.0, priority=priority, stopped_at=stopped)


FULLS = [full("n", i) for i in (0, 1, 2, 10)]
MIGS = [mig("n", 3, i) for i in (1, 2, 3)]


def ids(chosen) -> list[str]:
    return [s.slot_id for s in chosen.slots]


def test_least_allocated_gpu_first_ties_in_numeric_order():
    holders = {("n", "0"): holder("bob", "b")}
    chosen = plan(Request("alice", "a"), RESEARCHER, FULLS, holders, {"n"})
    assert ids(chosen) == ["1"]  # "0" is taken; "1" before "10" and "2"
    two = plan(Request("alice", "a", slots=2), RESEARCHER, FULLS, {}, {"n"})
    assert ids(two) == ["0", "1"]


@pytest.mark.parametrize("strategy", [Strategy.LEAST_ALLOCATED, Strategy.PACK])
def test_spreading_breaks_ties_at_random_but_keeps_the_strategys_order(strategy: Strategy):
    """Allocators that lost a claim to each other spread their plans over equally good
    slots; which slots are equally good is still the strategy's call."""
    slots = [mig("n", gpu, i) for gpu in (0, 1, 2) for i in (1, 2, 3)]
    holders = {("n", "0:1"): holder("bob", "b"), ("n", "1:1"): holder("bob", "c")}
    tier = {"2:1", "2:2", "2:3"} if strategy is Strategy.LEAST_ALLOCATED else {
        "0:2", "0:3", "1:2", "1:3"}  # fmt: skip
    request = Request("alice", "a", preference=Preference.MIG)

    def chosen(spread: bool) -> str:
        found = plan(request, RESEARCHER, slots, holders, {"n"}, strategy, spread=spread)
        return ids(found)[0]

    assert {chosen(spread=False) for _ in range(20)} == {min(tier)}  # numeric order
    spread = {chosen(spread=True) for _ in range(200)}
    assert spread == tier  # every equally good slot, and only those


def test_spreading_never_turns_a_grant_into_a_refusal():
    """Slots are picked greedily within the quota: a full GPU tied with MIG slices and
    picked first would leave no room for the second slot. Spread or not, two half-GPU
    slices fit a 1.0 quota."""
    half = [SlotRecord("n", f"2:{i}", f"MIG-2-{i}", "A100", "3g.40gb", 40 << 30, 0.5)
            for i in (1, 2)]  # fmt: skip
    slots = [*half, full("n", 3)]
    quota = Quota("lab", 10, max_gpu_equivalents=1.0, max_slots_per_container=2,
                  allow_full_gpu=True)  # fmt: skip
    for _ in range(200):
        chosen = plan(Request("alice", "a", slots=2), quota, slots, {}, {"n"}, spread=True)
        assert sorted(ids(chosen)) == ["2:1", "2:2"]


@pytest.mark.parametrize("strategy", [Strategy.LEAST_ALLOCATED, Strategy.PACK])
def test_an_allocator_that_contends_takes_its_share_first_then_the_strategys_best(
    strategy: Strategy,
):
    """A slot of its share, of the same kind, replaces one of a better GPU elsewhere
    (the others take that one), in the strategy's order within the share; once the share
    is used up, the rest as before. Without contention the share changes nothing."""
    slots = [mig("n", gpu, i) for gpu in (0, 1, 2) for i in (1, 2, 3)]
    holders = {("n", "1:1"): holder("bob", "b"), ("n", "2:1"): holder("bob", "c"),
               ("n", "2:2"): holder("bob", "d")}  # fmt: skip
    share = {("n", "0:3"), ("n", "1:2"), ("n", "1:3")}
    request = Request("alice", "a", preference=Preference.MIG)

    def chosen(spread: bool, held: dict = holders, wanted: Request = request) -> list[str]:
        found = plan(wanted, RESEARCHER, slots, held, {"n"}, strategy, spread=spread, share=share)
        return ids(found)

    best = {Strategy.LEAST_ALLOCATED: "0:1", Strategy.PACK: "2:3"}[strategy]
    assert {chosen(spread=False)[0] for _ in range(20)} == {best}
    # Within the share: the least allocated GPU (0, none held) or the most (1, one held).
    mine = {Strategy.LEAST_ALLOCATED: {"0:3"}, Strategy.PACK: {"1:2", "1:3"}}[strategy]
    assert {chosen(spread=True)[0] for _ in range(200)} == mine
    two = chosen(spread=True, wanted=Request("alice", "a", slots=2, preference=Preference.MIG))
    assert set(two) <= {key[1] for key in share}  # both from the share while it has them
    used_up = {**holders, **{key: holder("carl", "e") for key in share}}
    rest = {s.slot_id for s in slots} - {key[1] for key in used_up}
    assert {chosen(spread=True, held=used_up)[0] for _ in range(50)} <= rest
    assert chosen(spread=True, held=used_up)  # a full share refuses nothing


def test_a_share_never_turns_a_grant_into_a_refusal():
    """Taken greedily, a share's full GPU would leave no room in a 1.0 quota for a second
    slot; the two half-GPU slices outside the share still fit, and are granted."""
    half = [SlotRecord("n", f"2:{i}", f"MIG-2-{i}", "A100", "3g.40gb", 40 << 30, 0.5)
            for i in (1, 2)]  # fmt: skip
    slots = [*half, full("n", 3)]
    quota = Quota("lab", 10, max_gpu_equivalents=1.0, max_slots_per_container=2,
                  allow_full_gpu=True)  # fmt: skip
    request = Request("alice", "a", slots=2)
    for _ in range(50):
        chosen = plan(request, quota, slots, {}, {"n"}, spread=True, share={("n", "3")})
        assert sorted(ids(chosen)) == ["2:1", "2:2"]


def test_least_allocated_spreads_mig_slices_over_gpus():
    slots = [mig("n", 0, 1), mig("n", 0, 2), mig("n", 1, 1), mig("n", 1, 2)]
    holders = {("n", "0:1"): holder("bob", "b")}
    chosen = plan(Request("alice", "a"), STUDENT, slots, holders, {"n"})
    assert ids(chosen) == ["1:1"]  # GPU 1 has nothing allocated


def test_pack_fills_partly_used_gpus_first():
    slots = [mig("n", 0, 1), mig("n", 0, 2), mig("n", 1, 1), mig("n", 1, 2)]
    holders = {("n", "1:1"): holder("bob", "b")}
    chosen = plan(Request("alice", "a"), STUDENT, slots, holders, {"n"}, Strategy.PACK)
    assert ids(chosen) == ["1:2"]


def test_students_get_mig_slices_only_and_are_told_why_not_full_gpus():
    chosen = plan(Request("alice", "a"), STUDENT, FULLS + MIGS, {}, {"n"})
    assert ids(chosen) == ["3:1"]
    with pytest.raises(AllocationRefused) as refused:
        plan(Request("alice", "a", preference=Preference.FULL_GPU), STUDENT, FULLS, {}, {"n"})
    assert refused.value.kind is Refusal.NOT_ALLOWED
    assert refused.value.message == "full GPUs are not allowed for group student"


def test_quota_counts_gpu_equivalents_across_containers():
    holders = {("n", "0"): holder("alice", "first"), ("n", "1"): holder("alice", "second")}
    with pytest.raises(AllocationRefused) as refused:
        plan(Request("alice", "third"), RESEARCHER, FULLS, holders, {"n"})
    assert refused.value.kind is Refusal.QUOTA
    assert refused.value.message.startswith("alice holds 2.0 of 2.0 GPU-equivalents")


def test_mig_weights_fill_a_quota_exactly():
    # 3 slices of 2/7 = 6/7 <= 1.0; a fourth would be 8/7.
    holders = {("n", f"3:{i}"): holder("alice", f"c{i}") for i in (1, 2, 3)}
    slots = [*MIGS, mig("n", 4, 1)]
    with pytest.raises(AllocationRefused) as refused:
        plan(Request("alice", "c4"), STUDENT, slots, holders, {"n"})
    assert refused.value.message.startswith("alice holds 0.9 of 1.0")


def test_gpu_equivalents_request_takes_enough_slices():
    chosen = plan(Request("alice", "a", gpu_equivalents=0.5), RESEARCHER, MIGS, {}, {"n"})
    assert ids(chosen) == ["3:1", "3:2"]  # 4/7 >= 0.5


def test_slots_per_container_limit():
    with pytest.raises(AllocationRefused, match="at most 2 GPU slot"):
        plan(Request("alice", "a", slots=3), RESEARCHER, FULLS, {}, {"n"})


def test_no_capacity_says_how_many_are_in_use_and_held():
    holders = {
        ("n", "3:1"): holder("bob", "b"),
        ("n", "3:2"): holder("carol", "c", stopped=5.0),
        ("n", "3:3"): holder("dave", "d", priority=50, stopped=5.0),
    }
    with pytest.raises(AllocationRefused) as refused:
        plan(Request("erin", "e"), STUDENT, MIGS, holders, {"n"})
    assert refused.value.kind is Refusal.NO_CAPACITY
    assert "3 of 3 in use (2 held for stopped containers)" in refused.value.message


def test_higher_priority_takes_the_held_slot_of_a_lower_priority_user():
    holders = {
        ("n", "3:1"): holder("bob", "running", priority=10),
        ("n", "3:2"): holder("carol", "stopped-late", priority=10, stopped=9.0),
        ("n", "3:3"): holder("dave", "stopped-early", priority=10, stopped=2.0),
    }
    chosen = plan(Request("alice", "a"), RESEARCHER, MIGS, holders, {"n"})
    assert chosen.claim == ()
    [(slot, displaced)] = chosen.preempt
    assert (slot.slot_id, displaced.container) == ("3:3", "stopped-early")


def test_equal_priority_never_preempts_and_running_is_never_preempted():
    holders = {
        ("n", "3:1"): holder("bob", "running", priority=10),
        ("n", "3:2"): holder("carol", "held", priority=50, stopped=1.0),
        ("n", "3:3"): holder("dave", "held2", priority=50, stopped=1.0),
    }
    with pytest.raises(AllocationRefused) as refused:
        plan(Request("alice", "a"), RESEARCHER, MIGS, holders, {"n"})
    assert refused.value.kind is Refusal.NO_CAPACITY


def test_slots_of_nodes_that_are_down_are_not_given_out():
    slots = [full("down", 0), full("up", 0)]
    chosen = plan(Request("alice", "a"), RESEARCHER, slots, {}, {"up"})
    assert [(s.node, s.slot_id) for s in chosen.slots] == [("up", "0")]
    with pytest.raises(AllocationRefused):
        plan(Request("alice", "a", node="down"), RESEARCHER, slots, {}, {"up"})


HALF = Quota("half", 20, max_gpu_equivalents=0.5, max_slots_per_container=2, allow_full_gpu=True)


def test_placement_picks_what_fits_the_quota_before_the_strategys_favourite():
    """0.5 GPU-equivalents, one slot, no preference: the least allocated slot is a full GPU
    (1.0), beyond the quota; a free MIG slice (2/7) fits, and is given."""
    holders = {("n", "3:1"): holder("bob", "b")}  # GPU 3 is partly used
    chosen = plan(Request("alice", "a"), HALF, FULLS + MIGS, holders, {"n"})
    assert ids(chosen) == ["3:2"]
    packed = plan(Request("alice", "a"), HALF, FULLS + MIGS, holders, {"n"}, Strategy.PACK)
    assert ids(packed) == ["3:2"]
    # Two slots within 0.5: two slices of 2/7 would be 4/7 > 0.5, so only one fits.
    with pytest.raises(AllocationRefused) as refused:
        plan(Request("alice", "a", slots=2), HALF, FULLS + MIGS, {}, {"n"})
    assert refused.value.kind is Refusal.QUOTA
    assert refused.value.message == (
        "alice holds 0.0 of 0.5 GPU-equivalents; this request needs 2.00 more. "
        "Within what is left (0.50) fits: 2g.20gb."
    )


def test_the_strategys_order_holds_among_the_slots_that_fit():
    slots = [full("n", 0), mig("n", 1, 1), mig("n", 1, 2), mig("n", 2, 1), mig("n", 2, 2)]
    holders = {("n", "2:1"): holder("bob", "b")}
    spread = plan(Request("alice", "a"), HALF, slots, holders, {"n"})
    assert ids(spread) == ["1:1"]  # GPU 1 is the least allocated GPU with a slice that fits
    packed = plan(Request("alice", "a"), HALF, slots, holders, {"n"}, Strategy.PACK)
    assert ids(packed) == ["2:2"]


def test_a_refusal_says_what_would_fit():
    taken = {("n", f"3:{i}"): holder("bob", f"b{i}") for i in (1, 2, 3)}
    with pytest.raises(AllocationRefused) as refused:
        plan(Request("alice", "a"), HALF, FULLS + MIGS, taken, {"n"})
    assert refused.value.kind is Refusal.QUOTA
    assert refused.value.message == (
        "alice holds 0.0 of 0.5 GPU-equivalents; this request needs 1.00 more. "
        "Within what is left (0.50) fits: 2g.20gb."
    )
    at_quota = {("n", "3:1"): holder("alice", "a1")}
    with pytest.raises(AllocationRefused) as full_quota:
        plan(Request("alice", "a2"), HALF, [full("n", 0), mig("n", 3, 1)], at_quota, {"n"})
    assert full_quota.value.kind is Refusal.QUOTA
    assert full_quota.value.message == (
        "alice holds 0.3 of 0.5 GPU-equivalents; the smallest GPU slot here needs 0.29 more. "
        "Nothing fits until one of their containers is stopped or removed."
    )


def test_preemption_stays_within_the_quota():
    stopped = {
        ("n", "0"): holder("bob", "b0", priority=5, stopped=1.0),
        ("n", "3:1"): holder("bob", "b1", priority=5, stopped=2.0),
    }
    slots = [full("n", 0), mig("n", 3, 1)]
    chosen = plan(Request("alice", "a"), HALF, slots, stopped, {"n"})
    assert [s.slot_id for s, _ in chosen.preempt] == ["3:1"]  # the full GPU would not fit


@pytest.mark.parametrize(
    ("quota", "slots", "holders", "expected"),
    [
        # The per-container cap, when the quota allows it.
        (RESEARCHER, FULLS, {}, ["0", "1"]),
        # What is left of the quota: one full GPU held already, one more fits.
        (RESEARCHER, FULLS, {("n", "0"): holder("alice", "x", 50)}, ["1"]),
        # Fewer free than the cap: what is free.
        (RESEARCHER, FULLS[:1], {}, ["0"]),
        # Slices: the cap (2) within the quota (1.0 = three 2/7 slices).
        (STUDENT, MIGS, {}, ["3:1", "3:2"]),
        # No cap: all that fits the quota (three 2/7 slices in 1.0).
        (Quota("open", 10, 1, None, allow_full_gpu=False), MIGS, {}, ["3:1", "3:2", "3:3"]),
        # Free slots only while one is free: a held slot is not taken to make more.
        (
            Quota("high", 90, None, 3, allow_full_gpu=True),
            FULLS[:2],
            {("n", "1"): holder("low", "l", 10, stopped=5.0)},
            ["0"],
        ),
        # None free: a preemptible held slot, as for any request.
        (
            Quota("high", 90, None, 3, allow_full_gpu=True),
            FULLS[:1],
            {("n", "0"): holder("low", "l", 10, stopped=5.0)},
            ["0"],
        ),
    ],
)
def test_all_gpus_takes_what_the_limits_allow_and_at_least_one(quota, slots, holders, expected):
    chosen = plan(Request("alice", "a", slots=1, as_many=True), quota, slots, holders, {"n"})
    assert ids(chosen) == expected


def test_all_gpus_is_refused_in_words_when_nothing_fits():
    held = {("n", "0"): holder("alice", "x", 50), ("n", "1"): holder("alice", "y", 50)}
    with pytest.raises(AllocationRefused) as refused:
        plan(Request("alice", "a", as_many=True), RESEARCHER, FULLS, held, {"n"})
    assert refused.value.kind is Refusal.QUOTA
    assert "holds 2.0 of 2.0 GPU-equivalents" in refused.value.message
    capped = Quota("none", 10, 1, 0, allow_full_gpu=True)
    with pytest.raises(AllocationRefused) as refused:
        plan(Request("alice", "a", as_many=True), capped, FULLS, {}, {"n"})
    assert "at most 0 GPU slot(s)" in refused.value.message


def _fleet(draw: st.DrawFn) -> list[SlotRecord]:
    """Up to three nodes of GPUs 0..11, each whole or split into up to three slices, in
    numeric order (as a snapshot keeps them)."""
    slots = []
    for node in ("n1", "n10", "n2")[: draw(st.integers(1, 3))]:
        for gpu in sorted(draw(st.sets(st.integers(0, 11), min_size=1, max_size=6))):
            split = draw(st.integers(0, 3))
            slots += [mig(node, gpu, i + 1) for i in range(split)] or [full(node, gpu)]
    return sorted(slots, key=lambda s: s.order)


@st.composite
def _situations(draw: st.DrawFn) -> tuple:
    slots = _fleet(draw)
    keys = [(s.node, s.slot_id) for s in slots]
    held = draw(st.sets(st.sampled_from(keys), max_size=len(keys)))
    users = ("alice", "bob")
    holders = {key: holder(draw(st.sampled_from(users)), f"c{n}", stopped=draw(
        st.sampled_from([None, 1.0]))) for n, key in enumerate(sorted(held))}  # fmt: skip
    nodes_up = {s.node for s in slots} - draw(st.sets(st.sampled_from(["n1", "n2"])))
    drained = draw(st.sets(st.sampled_from(keys), max_size=3))
    request = Request(
        "alice", "new", slots=draw(st.integers(0, 3)),
        gpu_equivalents=draw(st.sampled_from([0.0, 1e-10, 0.5, 1.0, 1.5])),
        preference=draw(st.sampled_from(list(Preference))),
        node=draw(st.sampled_from(["", "n1", "n2"])),
    )  # fmt: skip
    quota = Quota("lab", 20, draw(st.sampled_from([None, 1.0, 2.0, 4.0])),
                  draw(st.sampled_from([None, 1, 2, 3])), draw(st.booleans()))  # fmt: skip
    return request, quota, slots, holders, nodes_up, drained


@settings(max_examples=400, deadline=None)
@given(_situations())
def test_the_shortcut_over_idle_gpus_chooses_as_the_full_search_does(situation: tuple):
    """Least-allocated placement stops at the first free slots on unused GPUs instead
    of ranking the whole fleet: every answer (grant or refusal) must be the same."""
    request, quota, slots, holders, nodes_up, drained = situation

    def outcome(shortcut: bool) -> object:
        with contextlib.ExitStack() as stack:
            if not shortcut:
                stack.enter_context(
                    mock.patch.object(placement, "_on_idle_gpus", return_value=None)
                )
            try:
                chosen = plan(
                    request, quota, slots, holders, nodes_up, drained=drained, in_order=True
                )
            except AllocationRefused as refused:
                return refused.kind, refused.message
            return ids(chosen), [s.slot_id for s, _ in chosen.preempt]

    assert outcome(shortcut=True) == outcome(shortcut=False)


@settings(max_examples=400, deadline=None)
@given(_situations(), st.sampled_from(list(Strategy)), st.booleans(), st.data())
def test_placement_among_the_free_slots_chooses_as_the_full_search_does(
    situation: tuple, strategy: Strategy, spread: bool, data: st.DataObject
):
    """Placement over a whole fleet reads the free slots and each GPU's load from the
    view's index instead of ranking every slot and holder: every answer (grant,
    preemption or refusal) must be the one the full search gives, with claims of this
    process in flight (held, but not yet in the view) or without; spreading draws the
    same random numbers for the same choices (so preempts as often), and swaps into a
    share alike."""
    request, quota, slots, holders, nodes_up, drained = situation
    share = data.draw(st.sets(st.sampled_from([(s.node, s.slot_id) for s in slots])))
    view = View()
    for slot in slots:
        view.set_slot((slot.node, slot.slot_id), slot)
    in_flight = (
        data.draw(st.sets(st.sampled_from(sorted(holders)), max_size=2)) if holders else set()
    )
    for key, held in holders.items():
        if key not in in_flight:
            view.set_holder(key, held)
    index = view.snapshot().fleet
    assert index is not None
    if in_flight:
        index = index.with_held(in_flight)

    def outcome(index: placement.FleetIndex | None) -> object:
        random.seed(1)
        try:
            chosen = plan(request, quota, slots, holders, nodes_up, strategy, drained=drained,
                          spread=spread, in_order=True, index=index, share=share)  # fmt: skip
        except AllocationRefused as refused:
            return refused.kind, refused.message
        return ids(chosen), [s.slot_id for s, _ in chosen.preempt]

    assert outcome(index) == outcome(None)


@settings(max_examples=400, deadline=None)
@given(_situations(), st.sampled_from(list(Strategy)), st.data())
def test_a_share_changes_which_slots_a_plan_takes_never_what_it_grants_or_preempts(
    situation: tuple, strategy: Strategy, data: st.DataObject
):
    """An allocator that contends swaps slots of its plan for free ones of its share:
    the same answer in every other way (refusal and its words, how many slots of which
    kind on which node, whom it preempts), with only free slots it may take swapped in."""
    request, quota, slots, holders, nodes_up, drained = situation
    share = data.draw(st.sets(st.sampled_from([(s.node, s.slot_id) for s in slots])))
    by_key = {(s.node, s.slot_id): s for s in slots}

    def outcome(share: set) -> object:
        random.seed(1)  # the same draws for the same choices, share or not
        try:
            chosen = plan(request, quota, slots, holders, nodes_up, strategy, drained=drained,
                          spread=True, in_order=True, share=share)  # fmt: skip
        except AllocationRefused as refused:
            return refused.kind, refused.message
        return chosen

    without, within = outcome(set()), outcome(share)
    if not isinstance(without, placement.Plan):
        assert within == without
        return
    assert isinstance(within, placement.Plan)
    assert within.preempt == without.preempt
    kinds = sorted((s.node, placement.kind_of(s)) for s in without.claim)
    assert sorted((s.node, placement.kind_of(s)) for s in within.claim) == kinds
    assert len({(s.node, s.slot_id) for s in within.claim}) == len(within.claim)
    for slot in set(within.claim) - set(without.claim):
        key = (slot.node, slot.slot_id)
        assert key in share and key not in holders and key not in drained
        assert by_key[key] == slot and slot.node in nodes_up


@pytest.mark.parametrize("strategy", [Strategy.LEAST_ALLOCATED, Strategy.PACK])
def test_a_share_of_other_kinds_of_slot_changes_nothing(strategy: Strategy):
    """A share of a 4g slice beside a plan of two 3g ones in a 0.9 quota (taking the 4g
    would leave room only by preempting); a share of 1g slices beside a plan with a
    whole GPU for one GPU-equivalent (seven slices where one GPU was asked for)."""
    three = [SlotRecord("n", f"2:{i}", f"M-{i}", "A100", "3g.40gb", 40 << 30, 3 / 7)
             for i in (1, 2)]  # fmt: skip
    four = SlotRecord("n", "3:1", "M-4", "A100", "4g.40gb", 40 << 30, 4 / 7)
    stopped = {("n", "4:1"): holder("bob", "b", priority=1, stopped=1.0)}
    tight = Quota("lab", 10, 0.9, 2, allow_full_gpu=True)
    slices = [mig("n", 1, i, compute=1) for i in range(1, 8)]
    cases = [
        (Request("alice", "a", slots=2), tight, [*three, four, mig("n", 4, 1, 1)], stopped,
         {("n", "3:1")}),
        (Request("alice", "a", gpu_equivalents=1.0), RESEARCHER, [full("n", 0), *slices], {},
         {("n", s.slot_id) for s in slices}),
    ]  # fmt: skip
    for request, quota, slots, holders, share in cases:
        for seed in range(30):
            chosen = []
            for given_share in (set(), share):
                random.seed(seed)
                chosen.append(plan(request, quota, slots, holders, {"n"}, strategy,
                                   spread=True, share=given_share))  # fmt: skip
            assert chosen[0] == chosen[1]
    assert not chosen[0].preempt


def test_spreading_never_preempts_where_the_strategys_order_needs_not():
    """Picked greedily within a 1.0 quota, a random order that starts with a free half
    GPU finds the other free slot too big, and would take a stopped lower-priority
    user's half; the strategy's order takes the whole free GPU and preempts nobody.
    With the fleet index or without, draw for draw."""
    slots = [full("n", 0), mig("n", 1, 1, compute=3), mig("n", 2, 1, compute=3)]
    holders = {("n", "2:1"): holder("bob", "b", priority=1, stopped=1.0)}
    view = View()
    for slot in slots:
        view.set_slot((slot.node, slot.slot_id), slot)
    view.set_holder(("n", "2:1"), holders[("n", "2:1")])
    quota = Quota("lab", 10, 1.0, None, allow_full_gpu=True)
    request = Request("alice", "new", gpu_equivalents=0.8)
    for seed in range(30):
        for index in (view.snapshot().fleet, None):
            random.seed(seed)
            chosen = plan(request, quota, slots, holders, {"n"}, spread=True, in_order=True,
                          index=index)  # fmt: skip
            assert ids(chosen) == ["0"] and not chosen.preempt


@pytest.mark.parametrize("equivalents", [-0.5, 1e-12, 1e-9])
def test_a_request_for_no_gpu_at_all_is_refused_in_words(equivalents: float):
    """A share of a GPU too small to need a slice would be granted no slot, and the
    caller told it succeeded: it is refused as invalid, whatever is free."""
    for slots, holders in ((FULLS, {}), (FULLS, {("n", "0"): holder("alice", "a")})):
        with pytest.raises(AllocationRefused) as refused:
            plan(Request("alice", "new", gpu_equivalents=equivalents), RESEARCHER, slots,
                 holders, {"n"})  # fmt: skip
        assert refused.value.kind is Refusal.INVALID


def test_slots_not_said_to_be_in_numeric_order_are_placed_in_numeric_order():
    """The shortcut reads slots in the order a snapshot keeps them; slots not said to be
    in that order (etcd lists "10" before "2") are ordered first: GPU 2 before GPU 10."""
    slots = [full("n", 10), full("n", 2), mig("n", 3, 10), mig("n", 3, 2)]
    assert ids(plan(Request("alice", "a"), RESEARCHER, slots, {}, {"n"})) == ["2"]
    migs = plan(Request("alice", "a", preference=Preference.MIG), RESEARCHER, slots, {}, {"n"})
    assert ids(migs) == ["3:2"]
    ordered = sorted(slots, key=lambda s: s.order)
    chosen = plan(Request("alice", "a"), RESEARCHER, ordered, {}, {"n"}, in_order=True)
    assert ids(chosen) == ["2"]
