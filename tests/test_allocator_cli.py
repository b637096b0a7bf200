"""`ds01 gpu ...` and `ds01 events`, through the real CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from ds01.cli import events as events_cli
from ds01.client import Ds01Error
from tests.allocator_env import AllocatorEnv, etcd_revision


async def test_gpu_commands_allocate_hold_validate_and_release(env: AllocatorEnv):
    allocated = await env.cli("root", "gpu", "allocate", "proj._.alice", "--user", "alice")
    assert allocated.returncode == 0, allocated.stderr
    assert allocated.stdout.splitlines() == [
        "n1/2:1 MIG-0002-1",
        "CUDA_VISIBLE_DEVICES=MIG-0002-1",
        "NVIDIA_VISIBLE_DEVICES=MIG-0002-1",
    ]
    held = await env.cli("alice", "gpu", "mark-stopped", "proj._.alice")
    assert held.returncode == 0 and held.stdout.startswith("n1/2:1 held until ")
    status = await env.cli("alice", "gpu", "status")
    assert "simulated (declared inventory)" in status.stdout
    row = next(line for line in status.stdout.splitlines() if " 2:1 " in line)
    assert "held" in row and "alice" in row and "proj._.alice" in row
    ok = await env.cli("alice", "gpu", "validate", "proj._.alice", "2:1")
    assert ok.returncode == 0 and ok.stdout.strip() == "2:1 is proj._.alice's"
    denied = await env.cli("bob", "gpu", "release", "proj._.alice")
    assert denied.returncode == 1
    assert "bob may not act on proj._.alice, owned by alice [PERMISSION_DENIED]" in denied.stderr
    released = await env.cli("alice", "gpu", "release", "proj._.alice")
    assert released.stdout.strip() == "released n1/2:1"
    gone = await env.cli("alice", "gpu", "validate", "proj._.alice", "2:1")
    assert gone.returncode == 1 and "no longer allocated" in gone.stdout


async def test_quota_errors_reach_the_user_in_words(env: AllocatorEnv):
    first = await env.cli("alice", "gpu", "allocate", "a._.alice", "--full")
    assert first.returncode == 1
    assert first.stderr.strip() == (
        "ds01: error: full GPUs are not allowed for group students [FAILED_PRECONDITION]"
    )


async def test_events_since_a_revision_print_the_history_as_json(
    env: AllocatorEnv, etcd_endpoint: str
):
    start = await etcd_revision(etcd_endpoint, env.pki)
    async with env.client("alice") as alice:
        await alice.allocate("ev._.alice")
        await alice.release("ev._.alice")
    result = await env.cli("root", "-o", "json", "events", "--since", str(start))
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    mine = [e for e in lines if e["container"] == "ev._.alice"]
    assert [(e["source"], e["type"]) for e in mine] == [
        ("allocation", "allocated"),
        ("allocation", "released"),
    ]
    assert mine[0]["revision"] < mine[1]["revision"]
    assert mine[1]["detail"] == "by alice"
    for event in mine:  # each with its time, in this host's zone
        moment = dt.datetime.fromisoformat(event["time"])
        assert moment.tzinfo is not None
        assert abs(moment.timestamp() - time.time()) < 60


async def test_events_follow_streams_new_events(env: AllocatorEnv):
    import os
    import signal

    from tests.harness import DS01

    paths = env.pki.client("root")
    process = await asyncio.create_subprocess_exec(
        DS01,
        "--config",
        str(env.config_file),
        "events",
        "--follow",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "DS01_CERT": str(paths.cert), "DS01_KEY": str(paths.key)},
    )
    try:
        await asyncio.sleep(1.5)
        async with env.client("bob") as bob:
            await bob.allocate("f._.bob")
        header = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        assert header.split()[:5] == ["TIME", "REVISION", "EVENT", "USER", "CONTAINER"]
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        assert line.split()[3:7] == ["allocated", "bob", "f._.bob", "n1/2:1"], line
        assert line.startswith(f"{dt.date.today():%Y-%m-%d} ")
    finally:
        process.send_signal(signal.SIGINT)
        await process.wait()


async def test_gpu_queue_shows_who_waits_in_the_order_they_will_be_served(env: AllocatorEnv):
    async with env.client("alice") as alice, env.client("bob") as bob, env.client("carl") as carl:
        for client, name in ((alice, "a._.alice"), (bob, "b._.bob"), (carl, "c._.carl")):
            await client.allocate(name)  # every MIG slice a student may have
        empty = await env.cli("dave", "gpu", "queue")
        assert empty.stdout.strip() == "nobody is waiting for a GPU"
        async with env.client("dave") as dave, env.client("ray") as ray:
            low = asyncio.ensure_future(dave.allocate("d._.dave", wait_seconds=20))
            await asyncio.sleep(0.3)
            high = asyncio.ensure_future(ray.allocate("r._.ray", preference=3, wait_seconds=20))
            await asyncio.sleep(0.3)
            # The researcher came later but is served first; dave sees his own container
            # name and not ray's.
            table = await env.cli("dave", "gpu", "queue")
            assert table.returncode == 0, table.stderr
            rows = [line.split() for line in table.stdout.splitlines()[1:]]
            assert [row[:5] for row in rows] == [
                ["1", "ray", "-", "1", "mig"],
                ["2", "dave", "d._.dave", "1", "any"],
            ]
            listed = json.loads((await env.cli("root", "gpu", "queue", "-o", "json")).stdout)
            assert [(w["position"], w["user"], w["container"]) for w in listed] == [
                (1, "ray", "r._.ray"),
                (2, "dave", "d._.dave"),
            ]
            assert [w["priority"] for w in listed] == [50, 10]
            for waiter in listed:
                since = dt.datetime.fromisoformat(waiter["since"])
                until = dt.datetime.fromisoformat(waiter["wait_until"])
                assert 0 < until.timestamp() - since.timestamp() <= 21
            await alice.release("a._.alice")
            await asyncio.wait_for(high, 5)
            after = json.loads((await env.cli("dave", "gpu", "queue", "-o", "json")).stdout)
            assert [(w["position"], w["user"]) for w in after] == [(1, "dave")]
            await bob.release("b._.bob")
            await asyncio.wait_for(low, 5)
    done = await env.cli("dave", "gpu", "queue", "-o", "json")
    assert json.loads(done.stdout) == []


async def test_a_drained_gpu_takes_no_new_allocation_and_keeps_what_it_has(env: AllocatorEnv):
    async with env.client("alice") as alice, env.client("bob") as bob:
        await alice.allocate("a._.alice")  # on GPU 2, the MIG one
        drained = await env.cli("labadmin", "admin", "drain", "n1/2", "--reason", "reset")
        assert drained.returncode == 0, drained.stderr
        assert drained.stdout.startswith("node n1 GPU 2: drained by labadmin since ")
        assert drained.stdout.splitlines()[0].endswith(": reset")
        assert "n1/2:1  alice  a._.alice" in drained.stdout  # what stays, listed
        # Nobody gets a slice there any more, waiting or not; alice keeps hers.
        refused = await env.cli("bob", "gpu", "allocate", "b._.bob")
        assert refused.returncode == 1
        assert "every MIG slot on any node that is up is drained by an admin" in refused.stderr
        waiting = asyncio.ensure_future(bob.allocate("b._.bob", wait_seconds=20))
        await alice.release("a._.alice")
        await asyncio.sleep(1.0)
        assert not waiting.done()  # the freed slice is on the drained GPU
        status = await env.cli("bob", "gpu", "status")
        assert "node n1 GPU 2: drained by labadmin since " in status.stdout
        row = next(line for line in status.stdout.splitlines() if " 2:1 " in line)
        assert "free, drained" in row
        shown = json.loads((await env.cli("bob", "gpu", "status", "-o", "json")).stdout)
        assert [(d["node"], d["gpu"], d["by"]) for d in shown["drains"]] == [("n1", 2, "labadmin")]
        assert {a["slot"]["slot_id"] for a in shown["allocations"] if a["drained"]} == {
            "2:1", "2:2", "2:3"
        }  # fmt: skip
        # Draining again changes nothing: the first reason and time stay.
        again = await env.cli("labadmin", "admin", "drain", "n1/2", "--reason", "other")
        assert again.stdout.splitlines()[0] == drained.stdout.splitlines()[0]
        ended = await env.cli("labadmin", "admin", "undrain", "n1/2")
        assert ended.returncode == 0 and ended.stdout.startswith("n1/2: drain ended")
        granted = await asyncio.wait_for(waiting, 10)  # the waiter gets it at once
        assert granted.allocations[0].slot.slot_id.startswith("2:")
    noop = await env.cli("labadmin", "admin", "undrain", "n1/2")
    assert noop.stdout.strip() == "n1/2 was not drained: nothing changed"


async def test_only_admins_drain_and_a_drain_must_name_what_exists(env: AllocatorEnv):
    cases = [
        ("bob", "n1", "only admins may drain nodes and GPUs; bob is not one [PERMISSION_DENIED]"),
        ("bob", "n1/0", "only admins may drain"),
        ("labadmin", "nowhere", "no node 'nowhere' has GPUs here; known: n1 [NOT_FOUND]"),
        ("labadmin", "n1/7", "node n1 has no GPU 7; it has GPUs 0, 1, 2 [NOT_FOUND]"),
        ("labadmin", "n1/x", "'n1/x' is not NODE or NODE/GPU"),
        ("labadmin", "/0", "'/0' is not NODE or NODE/GPU"),
    ]
    for user, target, message in cases:
        result = await env.cli(user, "admin", "drain", target)
        assert result.returncode != 0, (target, result.stdout)
        assert message in result.stderr, (target, result.stderr)
    denied = await env.cli("bob", "admin", "undrain", "n1")
    assert "only admins may undrain" in denied.stderr
    shown = json.loads((await env.cli("bob", "gpu", "status", "-o", "json")).stdout)
    assert shown["drains"] == []  # no refused attempt left a drain behind


BEHIND = "this watcher fell behind"
# How a following stream ends, after how many of its events, as the service ends it:
# (code, resume_after given, events before the end).
CUTS = {
    "fell behind, after an event": (grpc.StatusCode.RESOURCE_EXHAUSTED, True, 1),
    "fell behind, mid-transaction": (grpc.StatusCode.RESOURCE_EXHAUSTED, True, 2),
    "fell behind, before any event": (grpc.StatusCode.RESOURCE_EXHAUSTED, True, 0),
    "its service away, after an event": (grpc.StatusCode.UNAVAILABLE, False, 1),
    "its service away, mid-transaction": (grpc.StatusCode.UNAVAILABLE, False, 2),
}


@pytest.mark.parametrize("cut", CUTS)
async def test_events_follow_goes_on_from_a_stream_its_service_ended_and_loses_nothing(
    cut: str, monkeypatch: pytest.MonkeyPatch
):
    """A live stream whose reader fell behind (a paused pager stops ``ds01 events -f``
    reading) is ended by its service with the revision to resume after, and the command
    ended with the error; it follows on at once now, as after an outage, from the last
    event it had: nothing twice, nothing missed, and one warning for each cut. One
    transaction's events share a revision: a stream cut between them was opened again
    after that revision, and the rest were never printed; it is opened from just before
    it, skipping what was printed."""
    code, resumable, before = CUTS[cut]
    # An outage is waited out (RESUME_EVERY); a stream that fell behind goes on at once.
    away = code == grpc.StatusCode.UNAVAILABLE
    monkeypatch.setattr(events_cli, "RESUME_EVERY", 0 if away else 60)
    history = [_event(5, "1:1"), _event(6, "2:1"), _event(6, "2:2"), _event(7, "3:1")]
    first = 3  # the stream's own start: the revision of a status read as it began
    opened: list[int] = []

    async def stream(since: int) -> AsyncIterator[events_cli.Event]:
        opened.append(since)
        for n, event in enumerate(e for e in history if e.revision > since):
            if len(opened) == 1 and n == before:
                after = (event.revision - 1) if resumable else None
                raise Ds01Error(code, BEHIND, resume_after=after)
            yield event

    queue: asyncio.Queue[events_cli.Event | Exception] = asyncio.Queue()
    await asyncio.wait_for(events_cli._pump(stream, first, lambda e: e, queue, True), 5)
    printed = [queue.get_nowait() for _ in range(queue.qsize())]
    every = [e.slot for e in history]
    assert [getattr(e, "slot", "cut") for e in printed] == [*every[:before], "cut", *every[before:]]
    assert opened == [first, history[before - 1].revision - 1 if before else first]


@pytest.mark.parametrize("since", [0, 3])
async def test_events_follow_gives_up_on_a_refusal_it_cannot_follow_on_from(since: int):
    """Not every RESOURCE_EXHAUSTED is a stream to follow on: too many streams open is a
    refusal, with no revision to resume after; the command ends with it, asking once."""
    opened: list[int] = []

    async def stream(since: int) -> AsyncIterator[events_cli.Event]:
        opened.append(since)
        raise Ds01Error(grpc.StatusCode.RESOURCE_EXHAUSTED, "alice has 64 event streams open")
        yield  # an async generator, as the client's streams are

    queue: asyncio.Queue[events_cli.Event | Exception] = asyncio.Queue()
    await asyncio.wait_for(events_cli._pump(stream, since, lambda e: e, queue, True), 5)
    (ended,) = [queue.get_nowait() for _ in range(queue.qsize())]
    assert isinstance(ended, Ds01Error) and ended.resume_after is None
    assert opened == [since]


def _event(revision: int, slot: str) -> events_cli.Event:
    return events_cli.Event("allocation", "allocated", "", revision, "alice", "x._.alice",
                            "n1", slot, "")  # fmt: skip
