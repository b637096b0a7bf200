"""`ds01 gpu ...` and `ds01 events`, through the real CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time

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
