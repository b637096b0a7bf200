"""Faults without fallout: bounded requests, locks released on every path, and errors
that say what failed, on the real etcd and services."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from aetcd.exceptions import ConnectionFailedError

from ds01.allocator.etcd_state import EtcdState
from ds01.allocator.placement import Request
from ds01.allocator.server import RemoteLimits
from ds01.allocator.service import Actor, Allocator
from ds01.client import Ds01Client, Ds01Error
from ds01.core import keepalive
from ds01.core import server as service_server
from ds01.core.bounds import MAX_ITEMS, NAME_LIMIT, request_problem
from ds01.core.etcd import connect, etcd_client
from ds01.core.pki import Pki
from ds01.core.processes import ManagedProcess
from ds01.core.watch import under, watching
from ds01.v1 import containers_pb2, limits_pb2
from tests.allocator_env import AllocatorEnv, OwnEtcd, own_etcd_env
from tests.harness import DS01, Partition

HUGE = "x" * (3 * 1024 * 1024)  # the 3 MB container name of the report


async def refusal(call) -> Ds01Error:
    with pytest.raises(Ds01Error) as error:
        await call
    return error.value


def _oversized(client: Ds01Client) -> dict[str, tuple[object, str]]:
    """Each request field a user fills, too large, with the field the refusal names."""
    long = "y" * (NAME_LIMIT + 1)
    return {
        "3 MB container to Allocate": (client.allocate(HUGE + "._.alice"), "container"),
        "long container to Allocate": (client.allocate(long + "._.alice"), "container"),
        "long user to Allocate": (client.allocate("a._.alice", user=long), "user"),
        "long node to Allocate": (client.allocate("a._.alice", node=long), "node"),
        "long container to Release": (client.release(long), "container"),
        "long user to GetLimits": (client.get_limits(user=long), "user"),
        "long type to GetLimits": (client.get_limits(container_type=long), "container_type"),
        "long user to GetStatus": (client.gpu_status(user=long), "user"),
        "huge config to ValidateConfig": (client.validate_config("#" * 1_100_000), "text"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "3 MB container to Allocate",
        "long container to Allocate",
        "long user to Allocate",
        "long node to Allocate",
        "long container to Release",
        "long user to GetLimits",
        "long type to GetLimits",
        "long user to GetStatus",
        "huge config to ValidateConfig",
    ],
)
async def test_oversized_fields_are_refused_before_any_work(env: AllocatorEnv, case: str):
    async with env.client("alice") as alice:
        calls = _oversized(alice)
        call, field = calls.pop(case)
        for other, _ in calls.values():  # only one of them is awaited
            other.close()  # type: ignore[attr-defined]
        error = await refusal(call)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.message.startswith(f"request refused: {field} is "), error.message
        assert "characters long; at most" in error.message
        # Nothing was locked: the next request of the same user is served at once.
        started = time.monotonic()
        granted = await alice.allocate("after._.alice")
        assert granted.allocations and time.monotonic() - started < 3


def test_repeated_fields_and_maps_are_bounded_in_count_and_in_each_entry():
    many = [f"/home/alice/d{i}" for i in range(MAX_ITEMS + 1)]
    assert request_problem(containers_pb2.CreateContainerRequest(data_dirs=many)) == (
        f"data_dirs has {MAX_ITEMS + 1} entries; at most {MAX_ITEMS} are allowed"
    )
    one_long = containers_pb2.CreateContainerRequest(data_dirs=["/a", "d" * 5000])
    assert (
        request_problem(one_long) == "data_dirs is 5000 characters long; at most 4096 are allowed"
    )
    nested = limits_pb2.UserLimits(policies={"k" * 300: "v"})
    assert request_problem(nested) == "policies is 300 characters long; at most 256 are allowed"
    inner = containers_pb2.Container(gpus=[{"slot": {"node": "n" * 257}}])
    assert (
        request_problem(inner) == "gpus.slot.node is 257 characters long; at most 256 are allowed"
    )
    fine = containers_pb2.CreateContainerRequest(name="c", image="i", data_dirs=many[:MAX_ITEMS])
    assert request_problem(fine) is None


async def test_an_unknown_preference_is_an_invalid_argument(env: AllocatorEnv):
    async with env.client("alice") as alice:
        error = await refusal(alice.allocate("p._.alice", preference=99))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message.startswith("preference 99 is not one of SLOT_PREFERENCE_")


async def _allocator(env: AllocatorEnv, state: EtcdState) -> Allocator:
    return Allocator(state, RemoteLimits(env.service_client("allocator")))


async def test_a_claim_etcd_refuses_after_the_lock_is_taken_releases_the_lock(
    env: AllocatorEnv,
):
    """The report's reproduction, below the gRPC bounds: etcd refuses the claim of a
    3 MB name (too large a request) after the user's lock was taken."""
    client = connect(env.config, "allocator")
    try:
        allocator = await _allocator(env, EtcdState(client, lock_ttl=10))
        alice = Actor("alice", False)
        with pytest.raises(Exception, match=r"too large|larger than max"):
            await allocator.allocate(Request("alice", HUGE + "._.alice"), alice)
        started = time.monotonic()
        granted = await allocator.allocate(Request("alice", "next._.alice"), alice)
        assert granted and time.monotonic() - started < 3, "alice stayed locked"
    finally:
        await client.close()


async def test_a_session_lease_that_ran_out_unseen_does_not_fail_the_next_allocate(
    env: AllocatorEnv,
):
    """After a partition longer than lock_ttl, etcd has dropped the allocator's session
    lease before the allocator noticed: the next Allocate starts a new session."""
    client = connect(env.config, "allocator")
    state = EtcdState(client, lock_ttl=30)  # its keepalive would notice only much later
    try:
        allocator = await _allocator(env, state)
        alice = Actor("alice", False)
        assert await allocator.allocate(Request("alice", "before._.alice"), alice)
        session = await state._session()
        await client.revoke_lease(session.id)  # what etcd does when the lease runs out
        assert await allocator.allocate(Request("alice", "after._.alice"), alice)
    finally:
        await state.close()
        await client.close()


@pytest_asyncio.fixture(loop_scope="session")
async def own_etcd(tmp_path: Path, pki: Pki, state_dir: Path) -> AsyncIterator[OwnEtcd]:
    async with own_etcd_env(tmp_path, pki, state_dir) as own:
        yield own


class _EtcdStopsDuringClaim(EtcdState):
    """A fault point: etcd goes away between taking the lock and the (first) claim."""

    def __init__(self, *args, etcd: ManagedProcess, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.etcd: ManagedProcess | None = etcd

    async def claim(self, plan, holder, lock):  # type: ignore[no-untyped-def]
        if self.etcd is not None:
            await asyncio.to_thread(self.etcd.stop)
            self.etcd = None
        return await super().claim(plan, holder, lock)


async def test_an_etcd_outage_during_a_claim_leaves_no_user_locked(own_etcd: OwnEtcd):
    env = own_etcd.env
    client = connect(env.config, "allocator")
    state = _EtcdStopsDuringClaim(client, lock_ttl=30, etcd=own_etcd.process)
    try:
        allocator = await _allocator(env, state)
        alice = Actor("alice", False)
        with pytest.raises(Exception):  # noqa: B017 - whichever etcd failure it is
            await allocator.allocate(Request("alice", "first._.alice"), alice)
        async with env.client("alice") as user:  # the service says what failed
            error = await refusal(user.allocate("during._.alice"))
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.message.startswith("etcd is unreachable"), error.message
        await own_etcd.start()
        # The lock lives on a 30 s session lease that stays alive: only its release
        # (retried in the background) lets alice in again well before that.
        deadline = time.monotonic() + 15
        while True:
            try:
                started = time.monotonic()
                granted = await allocator.allocate(Request("alice", "later._.alice"), alice)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        # Served, and not after waiting out the lock: it was released, not expired.
        assert granted and time.monotonic() - started < 5
    finally:
        await state.close()
        await client.close()


async def _serving(env: AllocatorEnv, service: str) -> tuple[str, dict[str, str]]:
    """The health of ``service`` and what it says of each dependency."""
    async with env.client("alice") as alice:
        health = await alice.health(service)
        status = await alice.service_status(service)
    return health, {d.name: d.detail or "ok" for d in status.dependencies}


ALL_OK = ("SERVING", {"etcd": "ok", "limits": "ok", "inventory": "ok"})


async def _allocator_when(
    env: AllocatorEnv, done: Callable[[str, dict[str, str]], bool], seconds: float
) -> tuple[str, dict[str, str]]:
    """The allocator's health and needs once ``done(health, needs)`` holds (or time is up)."""
    deadline = time.monotonic() + seconds
    while not done(*(seen := await _serving(env, "allocator"))) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return seen


async def test_a_call_waits_for_a_service_that_starts_late(env: AllocatorEnv):
    """The unlucky start order: limits comes up after the allocator. The allocator says
    NOT_SERVING and why, and a user's Allocate waits for limits instead of failing."""
    await env.stop("allocator")  # in a process of its own: it asks limits over gRPC
    await env.start("allocator")
    await env.stop("limits")
    health, needs = await _allocator_when(
        env, lambda h, n: h == "NOT_SERVING" and n["limits"] != "ok", 10
    )
    assert health == "NOT_SERVING"
    assert needs["limits"].startswith("cannot reach the limits service"), needs
    async with env.client("alice") as alice:
        pending = asyncio.ensure_future(alice.allocate("late._.alice"))
        await asyncio.sleep(2)
        assert not pending.done(), "Allocate should wait for limits, not fail"
        await env.start("limits")
        granted = await asyncio.wait_for(pending, 15)
    assert granted.allocations
    assert await _allocator_when(env, lambda *seen: seen == ALL_OK, 10) == ALL_OK


async def test_health_and_status_follow_etcd_through_an_outage(own_etcd: OwnEtcd):
    env = own_etcd.env
    assert await _allocator_when(env, lambda *seen: seen == ALL_OK, 10) == ALL_OK
    own_etcd.stop()
    health, needs = await _allocator_when(
        env, lambda h, n: h == "NOT_SERVING" and n["etcd"] != "ok", 10
    )  # health and status are two calls: wait until both have seen the round
    assert health == "NOT_SERVING"
    assert needs["etcd"].startswith("etcd is unreachable"), needs
    assert needs["limits"] == "ok"  # only what is missing is named
    await own_etcd.start()
    assert await _allocator_when(env, lambda *seen: seen == ALL_OK, 15) == ALL_OK


@pytest.mark.parametrize("resumed", [False, True], ids=["live", "resumed from a revision"])
async def test_an_event_stream_whose_etcd_goes_away_ends_unavailable_in_words(
    own_etcd: OwnEtcd, resumed: bool
):
    """A watcher learns that etcd went (UNAVAILABLE: retry, resuming from the last
    revision it saw), not of an internal error to report, and not by silence."""
    env = own_etcd.env
    async with env.client("labadmin") as admin, env.client("alice") as alice:
        await alice.allocate("first._.alice")
        # Resumed: a replay from etcd's history, on a watch of the stream's own.
        stream = admin.watch_allocations(since_revision=1 if resumed else 0)
        reading = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.5)
        own_etcd.stop()
        with pytest.raises(Ds01Error) as ended:
            while True:  # whatever was on its way before etcd went, then the end
                await asyncio.wait_for(reading, 15)
                reading = asyncio.ensure_future(anext(stream))
    assert ended.value.code == grpc.StatusCode.UNAVAILABLE, ended.value
    assert "etcd" in ended.value.message
    await own_etcd.start()


async def test_events_follow_resumes_where_it_was_once_etcd_is_back(own_etcd: OwnEtcd):
    """`ds01 events -f` says that etcd went away, then goes on from the last event it
    printed: nothing printed twice, nothing that happened since missed."""
    env = own_etcd.env
    paths = env.pki.client("root")
    process = await asyncio.create_subprocess_exec(
        DS01, "--config", str(env.config_file), "events", "--follow", "--type", "allocated",
        "--type", "released", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DS01_CERT": str(paths.cert), "DS01_KEY": str(paths.key)},
    )  # fmt: skip

    async def line() -> str:
        return (await asyncio.wait_for(process.stdout.readline(), 20)).decode()

    try:
        assert (await line()).startswith("TIME")
        await asyncio.sleep(1.0)  # the stream is open
        async with env.client("alice") as alice:
            await alice.allocate("before._.alice")
            assert line_of(await line()) == ["allocated", "alice", "before._.alice"]
            own_etcd.stop()
            warning = (await asyncio.wait_for(process.stderr.readline(), 20)).decode()
            assert "following on once it is back" in warning, warning
            await own_etcd.start()
            await _allocator_when(env, lambda *seen: seen == ALL_OK, 15)
            await alice.release("before._.alice")  # while the command may still be away
            await alice.allocate("after._.alice")
            assert line_of(await line()) == ["released", "alice", "before._.alice"]
            assert line_of(await line()) == ["allocated", "alice", "after._.alice"]
    finally:
        process.send_signal(signal.SIGINT)
        await process.wait()


async def test_events_follow_that_printed_nothing_yet_misses_nothing_while_away(
    env: AllocatorEnv,
):
    """`ds01 events -f` (from now on) cut off before it had printed anything went on from
    its own return, and what happened while it was away was never printed. It begins
    at a revision read as it starts, and goes on from there."""
    paths = env.pki.client("root")
    process = await asyncio.create_subprocess_exec(
        DS01, "--config", str(env.config_file), "events", "--follow", "--type", "allocated",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DS01_CERT": str(paths.cert), "DS01_KEY": str(paths.key)},
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    other = EtcdState(connect(env.config, "allocator"))
    try:
        assert (await asyncio.wait_for(process.stdout.readline(), 20)).startswith(b"TIME")
        await asyncio.sleep(1.0)  # the stream is open
        await env.stop("allocator")
        warning = ""
        while "following on once it is back" not in warning:  # past gRPC's own log lines
            warning = (await asyncio.wait_for(process.stderr.readline(), 20)).decode()
            assert warning, "no warning that the stream was cut"
        # Meanwhile another allocator process (one on the same etcd) books a slot.
        alice = Actor("alice", False)
        await (await _allocator(env, other)).allocate(Request("alice", "away._.alice"), alice)
        await env.start("allocator")
        printed = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        assert line_of(printed) == ["allocated", "alice", "away._.alice"]
    finally:
        process.send_signal(signal.SIGINT)
        await process.wait()
        await other.close()


def line_of(printed: str) -> list[str]:
    """An events line's type, user and container."""
    return printed.split()[3:6]


@pytest.mark.parametrize("hangs", ["hook", "server"])
async def test_a_stop_step_that_hangs_never_keeps_a_service_from_stopping(
    env: AllocatorEnv, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    hangs: str,
):  # fmt: skip
    """A step of stopping that waits on something gone (etcd, another service) is given
    up after STOP_STEP_TIMEOUT, with a warning that names it; the other steps still run."""
    monkeypatch.setattr(service_server, "STOP_STEP_TIMEOUT", 0.5)
    allocator = env.services["allocator"]
    gone = asyncio.Event()
    ran: list[str] = []

    async def after() -> None:
        ran.append("after")

    if hangs == "hook":
        allocator.runtime.on_stop[:0] = [after]  # runs last: stops go in reverse
        allocator.runtime.on_stop.append(gone.wait)
    else:
        allocator.runtime.on_stop.append(after)
        real_stop = allocator.server.stop
        monkeypatch.setattr(allocator.server, "stop", lambda grace: gone.wait())
    started = time.monotonic()
    await env.stop("allocator")
    assert time.monotonic() - started < 5
    assert ran == ["after"]
    what = "Event.wait" if hangs == "hook" else "the gRPC server's stop"
    assert f"stopping allocator: {what} took over 0.5 s" in caplog.text, caplog.text
    if hangs == "server":
        await real_stop(0)  # what the test kept from stopping


async def test_status_lists_what_each_service_needs(env: AllocatorEnv):
    result = await env.cli("alice", "-o", "json", "status")
    rows = {row["service"]: row for row in json.loads(result.stdout)}
    assert rows["limits"]["status"] == "SERVING" and rows["limits"]["needs"] == []
    allocator = rows["allocator"]
    assert allocator["status"] == "SERVING", allocator
    assert [(n["name"], n["available"]) for n in allocator["needs"]] == [
        ("etcd", True),
        ("limits", True),
        ("inventory", True),
    ]
    assert allocator["needs"][0]["target"] == env.config.etcd_endpoints[0]
    # This env runs no containers service: that row says it cannot be reached.
    assert rows["containers"]["status"] == "UNAVAILABLE"
    assert rows["containers"]["detail"].startswith("cannot reach the containers service")
    assert result.returncode == 1
    table = await env.cli("alice", "status")
    assert "etcd ok, limits ok, inventory ok" in table.stdout, table.stdout


class _CutDuringClaim(EtcdState):
    """A fault point: this allocator is cut off from etcd after taking the user's lock,
    as its first claim goes out."""

    def __init__(self, *args, partition: Partition, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.partition: Partition | None = partition

    async def claim(self, plan, holder, lock):  # type: ignore[no-untyped-def]
        if self.partition is not None:
            self.partition.cut()
            self.partition = None
        return await super().claim(plan, holder, lock)


async def test_an_allocator_cut_off_from_etcd_holds_nobody_up_and_books_nothing_late(
    env: AllocatorEnv, etcd_endpoint: str
):
    """etcd stays up; one allocator (A) loses it mid-claim, holding alice's lock. The
    other (B) serves alice once A's session lease runs out. A's claim, delivered after
    the partition heals, is refused by etcd (A's lock is gone); A plans again under a
    new lock, so alice never holds more than her quota; and A serves others again."""
    ttl = 2
    async with Partition(etcd_endpoint) as partition:
        cut_client = etcd_client([partition.endpoint], env.config.pki.etcd, "allocator")
        direct = connect(env.config, "allocator")
        a_state = _CutDuringClaim(cut_client, lock_ttl=ttl, partition=partition)
        b_state = EtcdState(direct, lock_ttl=ttl)
        try:
            a, b = await _allocator(env, a_state), await _allocator(env, b_state)
            alice = Actor("alice", False)
            stuck = asyncio.ensure_future(a.allocate(Request("alice", "lost._.alice"), alice))
            await asyncio.sleep(0.5)
            assert not stuck.done()  # A waits on etcd: its claim is held in the partition
            started = time.monotonic()
            granted = await asyncio.wait_for(
                b.allocate(Request("alice", "served._.alice"), alice), ttl + 10
            )
            assert granted and time.monotonic() - started < ttl + 6, "alice stayed locked"
            partition.heal()
            with contextlib.suppress(Exception):  # granted anew under a lock, or refused
                await asyncio.wait_for(stuck, 15)
            status = await b.status(user="alice")
            assert "served._.alice" in {h.container for h in status.holders.values()}
            used = sum(status.slots[key].gpu_equivalents for key in status.holders)
            assert used <= 1.0, status.holders  # alice's quota, held through it all
            bob = Actor("bob", False)
            again = await asyncio.wait_for(a.allocate(Request("bob", "back._.bob"), bob), 15)
            assert again
        finally:
            await a_state.close()
            await b_state.close()
            await cut_client.close()
            await direct.close()


async def test_a_watch_on_an_etcd_member_gone_silent_ends(
    env: AllocatorEnv, etcd_endpoint: str, monkeypatch: pytest.MonkeyPatch
):
    """A watch sends nothing after it starts. An etcd member cut off without a word (a
    host powered off: nothing refused, nothing arrives) left the allocators' view and
    event streams waiting on it for as long as TCP takes; its pings go unanswered now,
    so the watch ends as an etcd gone away and is opened again. While pings are
    answered, a quiet watch stays open (etcd accepts one each 5 s: every 20 s in
    service, 6 s here)."""
    monkeypatch.setattr(keepalive, "PING_EVERY_MS", 6_000)
    monkeypatch.setattr(keepalive, "PING_ANSWER_MS", 1_000)
    async with Partition(etcd_endpoint) as partition:
        client = etcd_client([partition.endpoint], env.config.pki.etcd, "allocator")
        try:
            async with watching(client, [under(b"/probe/")], 0) as batches:
                following = asyncio.ensure_future(anext(batches))
                await asyncio.sleep(7.5)  # a ping at 6 s, answered
                assert not following.done(), "a quiet watch was ended"
                partition.cut()
                with pytest.raises(ConnectionFailedError):
                    await asyncio.wait_for(following, 10)
        finally:
            await client.close()
