"""The lifecycle reconciler: policy decisions, and sweeps on a real dockerd and etcd.

Sweeps are driven with an explicit ``now`` so that hours of policy pass in a moment;
everything else (Docker, etcd, the limits and allocator services) is real.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import docker
import pytest
import pytest_asyncio

from ds01.containers import own_events, reconcile
from ds01.containers.adoption import Seen, gpu_references
from ds01.containers.lifecycle import CreateRequest
from ds01.containers.own_events import OwnEvents
from ds01.containers.reconcile import (
    EVENT_SWEEP_GAP,
    Action,
    Observed,
    Policy,
    Reconciler,
    _Activity,
    _beyond_the_list,
    _completed,
    _kept_alive,
    _listed,
    _workspace_of,
    decide,
    policy_of,
)
from ds01.core.etcd import connect
from ds01.core.pki import Pki
from ds01.v1 import common_pb2
from tests.allocator_env import AllocatorEnv, make_env, make_lifecycle
from tests.harness import remove_tree

LIMITS = textwrap.dedent(
    """\
    defaults:
      max_gpu_equivalents: 1
      max_gpu_slots_per_container: 1
      memory: 256m
      memory_swap: 256m
      max_containers_per_user: 5
      idle_timeout: 60s
      max_runtime: 600s
      gpu_hold_after_stop: 1h
      container_hold_after_stop: 30s
      created_container_timeout: 30s
      priority: 10
    container_types:
      batch: {idle_timeout: null}    # long jobs are never stopped for idleness
    """
)
POLICY_LIMITS = {
    "idle_timeout": 60,
    "max_runtime": 600,
    "container_hold_after_stop": 30,
    "created_container_timeout": 30,
}
POLICY = Policy(**POLICY_LIMITS)
RUNNING = Observed("running", created_at=0, started_at=1000, finished_at=None, protected=False)


@pytest.mark.parametrize(
    ("observed", "policy", "runtime_before", "idle_for", "stop_at", "expected"),
    [
        (RUNNING, POLICY, 0, 10, None, None),
        (RUNNING, POLICY, 0, 50, None, Action.WARN_IDLE),
        (RUNNING, POLICY, 0, 50, 1110, None),
        (RUNNING, POLICY, 0, 61, 1100, Action.STOP_IDLE),
        (RUNNING, POLICY, 0, 61, 1101, None),  # idle long enough, but warned of a later stop
        (RUNNING, POLICY, 0, 999, None, Action.WARN_IDLE),  # never a stop without a warning
        (RUNNING, POLICY, 550, 0, None, Action.STOP_RUNTIME),  # 550 before + 100 now
        (RUNNING, Policy(60, 600, 30, 30, exempt_from_idle=True), 0, 999, None, None),
        (Observed("running", 0, 1000, None, protected=True), POLICY, 9999, 999, None, None),
        (Observed("exited", 0, 900, 1100 - 31, False), POLICY, 0, 0, None, Action.REMOVE_STOPPED),
        (Observed("exited", 0, 900, 1100 - 29, False), POLICY, 0, 0, None, None),
        (
            Observed("created", 1100 - 31, None, None, False),
            POLICY,
            0,
            0,
            None,
            Action.REMOVE_NEVER_STARTED,
        ),
        (Observed("exited", 0, 900, 0, False), Policy(None, None, None, None), 0, 0, None, None),
    ],
)
def test_policy_decisions(observed, policy, runtime_before, idle_for, stop_at, expected):
    assert decide(observed, policy, runtime_before, idle_for, stop_at, now=1100) == expected


DS01_POLICIES = {  # as the limits service sends DS01's policies
    "high_demand_threshold": "0.8",
    "high_demand_idle_reduction": "0.5",
    "gpu_idle_threshold": "5",
    "cpu_idle_threshold": "3",
    "network_idle_threshold": "1m",
    "idle_detection_window": "3",
    "grace_period": "30m",
    "keepalive_max_duration": "24h",
    "warn_before_idle_stop": "10s",
}


def test_ds01s_policies_are_read_from_the_limits_services_text():
    policy = policy_of(DS01_POLICIES, **POLICY_LIMITS)
    assert (policy.idle_window, policy.grace_period, policy.keepalive_max) == (3, 1800, 86400)
    assert (policy.cpu_idle_percent, policy.gpu_idle_percent) == (3.0, 5.0)
    assert policy.net_idle_bytes == 1024 * 1024 and policy.warn_before == 10
    assert policy_of({}, **POLICY_LIMITS) == POLICY  # nothing set: as before


@pytest.mark.parametrize(
    ("demand", "idle_for", "stop_at", "expected"),
    [
        (0.5, 40, None, None),  # normal demand: 60 s timeout, warned 10 s before
        (0.5, 51, None, Action.WARN_IDLE),
        (0.8, 21, None, Action.WARN_IDLE),  # high demand: 60 s x 0.5 = 30 s
        (0.8, 31, 1100, Action.STOP_IDLE),
        (0.5, 31, 1100, None),  # the same idle time under normal demand
    ],
)
def test_high_demand_shortens_the_idle_timeout(demand, idle_for, stop_at, expected):
    policy = policy_of(DS01_POLICIES, **POLICY_LIMITS)
    assert decide(RUNNING, policy, 0, idle_for, stop_at, now=1100, demand=demand) == expected


def test_idle_counts_only_after_the_detection_window():
    samples = [_Activity(cpu=0, net=0, at=at, started="s") for at in (0, 30, 60, 90)]
    for last, current in itertools.pairwise(samples):
        current.follow_idle(last, window=3)
    assert [s.idle_since for s in samples] == [None, None, None, 0]  # since the streak began


def test_a_fresh_keep_alive_file_in_the_workspace_keeps_a_container_from_idling(
    tmp_path: Path,
):
    assert not _kept_alive(str(tmp_path), 3600, time.time())
    keep = tmp_path / ".keep-alive"
    keep.touch()
    assert _kept_alive(str(tmp_path), 3600, time.time())
    assert not _kept_alive(str(tmp_path), 3600, time.time() + 7200)  # older than the max
    # A modification time in the future changes nothing: the change time counts.
    os.utime(keep, (time.time() + 10**9, time.time() + 10**9))
    assert not _kept_alive(str(tmp_path), 3600, time.time() + 7200)
    keep.unlink()
    keep.symlink_to("/proc/self")  # the link itself is looked at, never its target
    assert _kept_alive(str(tmp_path), 3600, time.time())
    assert not _kept_alive(str(tmp_path), 3600, time.time() + 7200)
    assert not _kept_alive("", 3600, time.time())


@pytest_asyncio.fixture(loop_scope="session")
async def world(
    tmp_path: Path,
    pki: Pki,
    state_dir: Path,
    etcd_endpoint: str,
    docker_socket: Path,
    test_image: str,
    unix_users: dict[str, int],
) -> AsyncIterator[tuple[AllocatorEnv, Reconciler]]:
    env = await make_env(tmp_path, pki, state_dir, etcd_endpoint, limits=LIMITS)
    etcd = connect(env.config, "containers")
    lifecycle = make_lifecycle(env, docker_socket, etcd)
    yield env, Reconciler(lifecycle)
    for record in await lifecycle.metadata.all():
        await lifecycle.remove(record.user, True, record.docker_name)
    await lifecycle.client.close()
    await lifecycle.docker.close()
    await etcd.close()
    await env.stop()


async def _create(reconciler: Reconciler, image: str, name: str, start: bool = True) -> str:
    request = CreateRequest("ds01alice", name, image, gpus=1, start=start)
    return (await reconciler.lifecycle.create(request)).docker_name


async def _state(reconciler: Reconciler, name: str) -> str | None:
    container = await reconciler.lifecycle.docker.find(name)  # inspected afresh
    return container.status if container else None


async def _slot_state(env: AllocatorEnv) -> int:
    async with env.client("root") as admin:
        status = await admin.gpu_status()
    return {a.slot.slot_id: a.state for a in status.allocations}["2:1"]


async def test_sweeps_over_unchanged_containers_write_nothing_and_are_timed(world, test_image):
    """At thousands of containers a sweep that rewrote every record would be thousands
    of etcd writes, and as many events for every watcher, each time it looked; one that
    read each record again, after the one read of them all, thousands of reads."""
    _env, reconciler = world
    metadata = reconciler.lifecycle.metadata
    names = [await _create(reconciler, test_image, "busy"),
             await _create(reconciler, test_image, "later", start=False)]  # fmt: skip
    now = time.time()
    await reconciler.sweep(now)

    async def revisions() -> list[int]:
        return [(await metadata.client.get(metadata._key(n))).mod_revision for n in names]

    before = await revisions()
    reads = 0
    read_one = metadata.client.get

    async def counted(key: bytes) -> object:
        nonlocal reads
        reads += key.startswith(metadata._key("").rstrip(b"/"))
        return await read_one(key)

    metadata.client.get = counted  # type: ignore[method-assign]
    try:
        for later in (1, 2, 3):
            await reconciler.sweep(now + later)
    finally:
        del metadata.client.get
    assert await revisions() == before
    assert reads == 0  # the records as the sweep listed them
    assert reconciler.sweeps == 4
    assert 0 < reconciler.last_sweep_seconds <= reconciler.sweep_seconds


async def test_an_idle_container_is_warned_then_stopped_and_its_gpu_held(world, test_image):
    env, reconciler = world
    name = await _create(reconciler, test_image, "idle")
    now = time.time()
    await reconciler.sweep(now)  # first usage sample
    await reconciler.sweep(now + 50)  # idle 50 s: a warning
    stop_at = reconciler.activity[name].stop_at
    assert stop_at == now + 50 + reconciler.interval  # at least a sweep's time to react
    assert await _state(reconciler, name) == "running"
    [record] = await reconciler.lifecycle.metadata.all()
    assert record.notice.startswith("idle for 50s: stops at ")  # shown by `container list`
    await reconciler.sweep(now + 70)  # idle 70 s > 60 s, but the warning said later
    assert await _state(reconciler, name) == "running"
    await reconciler.sweep(stop_at)
    assert await _state(reconciler, name) == "exited"
    [record] = await reconciler.lifecycle.metadata.all()
    assert record.notice == ""
    assert await _slot_state(env) == common_pb2.SLOT_STATE_HELD


async def test_an_idle_container_first_seen_past_its_timeout_is_warned_before_it_stops(
    world, test_image
):
    _env, reconciler = world
    name = await _create(reconciler, test_image, "quiet")
    now = time.time()
    await reconciler.sweep(now)
    await reconciler.sweep(now + 500)  # long idle, long unobserved: a warning, no stop
    assert await _state(reconciler, name) == "running"
    assert reconciler.activity[name].stop_at == now + 500 + reconciler.interval
    await reconciler.sweep(now + 500 + reconciler.interval)
    assert await _state(reconciler, name) == "exited"


async def test_a_container_past_max_runtime_is_stopped(world, test_image):
    _env, reconciler = world
    name = await _create(reconciler, test_image, "long")
    await reconciler.sweep(time.time() + 601)
    assert await _state(reconciler, name) == "exited"


async def test_a_call_under_way_does_not_shield_a_container_from_its_policies(world, test_image):
    """Its owner calling start again and again keeps the container busy in ds01: it is
    never adopted or forgotten meanwhile, but max_runtime still applies."""
    _env, reconciler = world
    name = await _create(reconciler, test_image, "dodger")
    reconciler.lifecycle.busy[name] += 1  # as during one of those calls
    try:
        await reconciler.sweep(time.time() + 601)
    finally:
        reconciler.lifecycle.busy[name] -= 1
    assert await _state(reconciler, name) == "exited"


async def test_stopped_and_never_started_containers_are_removed_after_their_time(world, test_image):
    env, reconciler = world
    stopped = await _create(reconciler, test_image, "stopped")
    await reconciler.lifecycle.stop("ds01alice", False, "stopped", grace=1)
    never = await _create(reconciler, test_image, "never", start=False)
    await reconciler.sweep(time.time() + 10)
    assert await _state(reconciler, stopped) == "exited" and await _state(reconciler, never)
    await reconciler.sweep(time.time() + 31)
    assert await _state(reconciler, stopped) is None and await _state(reconciler, never) is None
    assert await reconciler.lifecycle.metadata.all() == []
    assert await _slot_state(env) == common_pb2.SLOT_STATE_FREE


async def test_a_sweep_never_acts_on_a_name_made_anew_since_it_listed_the_records(
    world, test_image
):
    """A sweep over thousands of containers takes seconds: one it listed (and inspected)
    may be removed and made anew under its name before the sweep reaches it. The new
    container is then left alone: not removed, and its GPU not put on hold."""
    env, reconciler = world
    lifecycle = reconciler.lifecycle
    policy = await reconciler._policy("ds01alice", "")
    for name in ("never", "stopped"):
        full = await _create(reconciler, test_image, name, start=name == "stopped")
        if name == "stopped":
            await lifecycle.stop("ds01alice", False, name, grace=1)
        listed = await lifecycle.metadata.get(full)  # as the sweep read the records
        inspected = await lifecycle.docker.find(full)  # and then inspected it
        reconciler.gpu_states = {full: common_pb2.SLOT_STATE_ALLOCATED}  # as it read them
        await lifecycle.remove("ds01alice", False, name)
        await _create(reconciler, test_image, name)  # anew, running, with the GPU
        await reconciler._apply(inspected, listed, policy, time.time() + 3600)
        assert await _state(reconciler, full) == "running"
        assert await _slot_state(env) == common_pb2.SLOT_STATE_ALLOCATED  # no hold
        await lifecycle.remove("ds01alice", False, name)


async def test_after_a_crash_records_allocations_and_containers_are_reconciled(
    world, test_image, docker_socket
):
    env, reconciler = world
    lifecycle = reconciler.lifecycle
    kept = await _create(reconciler, test_image, "kept")
    await lifecycle.metadata.delete(await lifecycle.metadata.get(kept))  # the record was lost
    gone = await _create(reconciler, test_image, "gone", start=False)
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    try:
        client.containers.get(gone).remove(force=True)  # removed behind ds01's back
    finally:
        client.close()
    async with env.client("ds01bob") as bob:
        await bob.allocate("ghost._.ds01bob")  # an allocation whose container never came
    await reconciler.sweep()  # at once: no settle time
    records = {r.docker_name: r for r in await lifecycle.metadata.all()}
    assert kept in records and records[kept].gpu_slots == ["n1/2:1"]  # adopted from labels
    assert gone not in records
    async with env.client("root") as admin:
        held = {a.container for a in (await admin.gpu_status()).allocations if a.container}
    assert held == {kept}  # gone's and ghost's GPUs were released


async def test_a_container_type_changes_the_policy(world, test_image, docker_socket):
    _env, reconciler = world
    request = CreateRequest("ds01alice", "job", test_image, start=True, container_type="batch")
    name = (await reconciler.lifecycle.create(request)).docker_name
    now = time.time()
    for later in (0, 70, 140):
        await reconciler.sweep(now + later)
    assert await _state(reconciler, name) == "running"
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    try:
        assert client.containers.get(name).labels["ds01.type"] == "batch"
    finally:
        client.close()


async def test_a_container_whose_gpu_works_is_not_idle(world, test_image):
    """Quiet CPU and network, but NVML shows a compute process on its MIG slice."""
    from ds01.containers.gpu_activity import NvmlActivity
    from tests.fake_pynvml import NVML_DEVICE_MIG_ENABLE, FakeGpu, FakeMig, make_module

    _env, reconciler = world
    mig = FakeMig(1, "MIG-0002-1", "A100 MIG 2g.20gb", 2, 19968, processes=[4242])
    gpu = FakeGpu("GPU-0002", "A100", 80 << 30, mig_mode=NVML_DEVICE_MIG_ENABLE, migs={0: mig})
    reconciler.gpus = NvmlActivity(make_module([gpu]))
    name = await _create(reconciler, test_image, "training")
    now = time.time()
    for later in (0, 50, 70):
        await reconciler.sweep(now + later)
    assert await _state(reconciler, name) == "running"
    mig.processes.clear()  # the job ended: now it is idle
    for later in (80, 150, 150 + reconciler.interval):  # idle, warned, stopped
        await reconciler.sweep(now + later)
    assert await _state(reconciler, name) == "exited"


async def test_the_reconciler_follows_docker_through_a_dockerd_restart(
    world, etcd_endpoint, tmp_path_factory
):
    """Docker events wake the sweep; after dockerd restarts, the event stream is
    re-opened, the run the restart ended counts toward max_runtime, and a container
    removed behind ds01's back is noticed at once."""
    from ds01.core.processes import start_dockerd
    from tests.harness import build_test_image

    env, _ = world
    root = Path(tempfile.mkdtemp(prefix="ds01-restart-", dir="/tmp"))
    daemon = start_dockerd(root)
    etcd = connect(env.config, "containers")
    lifecycle = make_lifecycle(env, root / "docker.sock", etcd)
    reconciler = Reconciler(lifecycle, interval=3600)  # only events can wake it
    task = None
    try:
        image = build_test_image(root / "docker.sock")
        request = CreateRequest("ds01bob", "svc", image, start=True)
        name = (await lifecycle.create(request)).docker_name
        task = asyncio.ensure_future(reconciler.run())
        await asyncio.sleep(1.5)  # the first sweep has seen the run begin
        daemon.stop()  # without live-restore, this ends the run
        daemon = start_dockerd(root)  # the same data: the container is still there
        before = reconciler.sweeps
        for _ in range(100):
            if reconciler.sweeps > before:
                break
            await asyncio.sleep(0.1)
        assert reconciler.sweeps > before, "no sweep after dockerd came back"
        [record] = await lifecycle.metadata.all()
        assert record.docker_name == name
        assert record.runtime_before >= 1.5, record  # the run the restart ended counts
        client = docker.DockerClient(base_url=f"unix://{root / 'docker.sock'}")
        try:
            client.containers.get(name).remove(force=True)
        finally:
            client.close()
        for _ in range(100):
            if not await lifecycle.metadata.all():
                break
            await asyncio.sleep(0.1)
        assert await lifecycle.metadata.all() == []
    finally:
        if task is not None:
            task.cancel()
        await lifecycle.client.close()
        await lifecycle.docker.close()
        await etcd.close()
        daemon.stop()
        remove_tree(root)


async def test_a_sweep_after_docker_events_inspects_only_the_containers_they_name(
    world, test_image, docker_socket
):
    """On a busy node Docker's events never pause, and each burst wakes a sweep: one
    that inspected every container would cost dockerd an inspect per container per
    second. A sweep after events inspects the containers they named; the sweep of each
    interval still inspects every one."""
    _env, reconciler = world
    lifecycle = reconciler.lifecycle
    made = []
    for name in ("quiet1", "quiet2", "busy"):
        request = CreateRequest("ds01alice", name, test_image, gpus=0, start=True)
        made.append((await lifecycle.create(request)).docker_name)
    *quiet, busy = made
    reconciler.interval = 8.0
    async with _running(reconciler):
        with _counted_inspects(lifecycle) as inspected:
            # The first sweeps inspect everything: the one at the start, and the one once
            # Docker's event stream is open (what happened before it was missed).
            await asyncio.sleep(2.5)
            assert all(inspected[name] >= 1 for name in made), inspected
            before = dict(inspected)
            client = docker.DockerClient(base_url=f"unix://{docker_socket}")
            try:
                client.containers.get(busy).kill()  # not through ds01: Docker's events tell
            finally:
                client.close()
            await asyncio.sleep(3.0)
            assert inspected[busy] > before[busy], inspected  # the event's sweep looked at it
            assert all(inspected[n] == before[n] for n in quiet), inspected  # and only at it
            [record] = [m for m in await lifecycle.metadata.all() if m.docker_name == busy]
            assert record.status == "exited", record
            await asyncio.sleep(6.0)  # past the interval: a sweep of everything
            assert all(inspected[n] > before[n] for n in quiet), inspected


async def test_a_container_that_does_not_run_is_asked_about_again_only_after_an_event(
    world, test_image, docker_socket
):
    """A stopped or never started container changes only with an event that names it:
    while Docker's event stream is open, the sweep of each interval reads what the last
    inspect said of it instead of asking dockerd again (of thousands of stopped
    containers, their inspects were nearly all of a sweep). Its policies apply all the
    same. An event that names it, or a break in the stream, and it is inspected again."""
    _env, reconciler = world
    lifecycle = reconciler.lifecycle
    stopped = await _create(reconciler, test_image, "stopped")
    await lifecycle.stop("ds01alice", False, "stopped", grace=1)
    never = await _create(reconciler, test_image, "never", start=False)
    running = await _create(reconciler, test_image, "running")
    reconciler.interval = 3600  # only events, and this test, sweep
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    try:
        async with _running(reconciler):
            with _counted_inspects(lifecycle) as inspected:
                await _events_followed(reconciler)
                assert all(inspected[n] >= 1 for n in (stopped, never, running)), inspected
                before = dict(inspected)
                await reconciler.sweep()  # of everything, as at each interval
                assert inspected[running] == before[running] + 1  # a running one, always
                assert (inspected[stopped], inspected[never]) == (before[stopped], before[never])

                await lifecycle.start("ds01alice", False, "stopped")  # ds01's own calls: they
                await lifecycle.stop("ds01alice", False, "stopped", grace=1)  # wake no sweep
                before = dict(inspected)
                await reconciler.sweep()
                assert inspected[stopped] == before[stopped] + 1  # but it is asked about again

                container = client.containers.get(stopped)  # behind ds01's back: a run between
                container.start()  # two sweeps
                container.stop(timeout=1)
                await asyncio.sleep(EVENT_SWEEP_GAP + 1.5)  # the sweep the events wake
                assert inspected[stopped] > before[stopped], inspected
                before = dict(inspected)
                await reconciler.sweep()
                assert (inspected[stopped], inspected[never]) == (before[stopped], before[never])

                reconciler._events.close()  # the stream breaks: what it missed is unknown
                await asyncio.sleep(1.0 + EVENT_SWEEP_GAP + 1.5)  # reconnected: all looked at
                assert inspected[stopped] > before[stopped] and inspected[never] > before[never]

                before = dict(inspected)  # past their time: decided on what was kept, and
                await reconciler.sweep(time.time() + 31)  # asked once more before the remove
                assert (inspected[stopped], inspected[never]) == (before[stopped] + 1,
                                                                  before[never] + 1)  # fmt: skip
                assert await _state(reconciler, stopped) is None
                assert await _state(reconciler, never) is None
                assert await _state(reconciler, running) == "running"
    finally:
        client.close()


async def test_what_a_sweep_kept_of_a_container_is_asked_about_again_after_a_while(
    world, test_image, monkeypatch
):
    """dockerd drops the events of a subscriber that falls far behind without ending its
    stream: what a sweep kept of a stopped container goes stale at last."""
    monkeypatch.setattr(reconcile, "KEPT_FOR", 3.0)
    _env, reconciler = world
    stopped = await _create(reconciler, test_image, "stopped")
    await reconciler.lifecycle.stop("ds01alice", False, "stopped", grace=1)
    reconciler.interval = 3600
    async with _running(reconciler):
        with _counted_inspects(reconciler.lifecycle) as inspected:
            await _events_followed(reconciler)
            before = inspected[stopped]
            await reconciler.sweep()
            assert inspected[stopped] == before  # kept
            await asyncio.sleep(3.5)
            await reconciler.sweep()
            assert inspected[stopped] == before + 1  # kept too long: asked again


def test_what_a_sweep_keeps_of_an_inspect_reads_as_the_inspect_does(test_image, docker_socket):
    """A sweep reads a kept container as its list entry completed with what was kept of
    its inspect: its policies, its GPUs (adoption) and its age must read as from the
    inspect itself, for a container of ds01's that ran, one of DS01's with GPUs in its
    devices and environment, and one never started. Nothing else of its environment is
    kept (it may hold secrets)."""
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    gpus = docker.types.DeviceRequest(device_ids=["0", "GPU-2"], capabilities=[["gpu"]])
    workspace = tempfile.mkdtemp(prefix="ds01-kept-")
    made = [
        client.containers.create(test_image, "true", name="own._.ds01alice",
                                 labels={"ds01.user": "ds01alice", "ds01.protected": "true"},
                                 volumes={workspace: {"bind": "/workspace", "mode": "rw"}},
                                 environment={"API_TOKEN": "s3cret"}, network_mode="none"),
        client.containers.create(test_image, "true", name="mlc._.1001", device_requests=[gpus],
                                 environment={"NVIDIA_VISIBLE_DEVICES": "1,MIG-2-1",
                                              "CUDA_VISIBLE_DEVICES": "0", "HF_TOKEN": "x"},
                                 labels={"aime.mlc.USER": "ds01alice", "aime.mlc.NAME": "mlc"},
                                 network_mode="none"),
    ]  # fmt: skip
    try:
        made[0].start()
        made[0].wait()
        for container in made:
            [summary] = client.api.containers(all=True, filters={"id": container.id})
            inspected = client.api.inspect_container(container.id)
            read = _completed(_listed(summary), _beyond_the_list(inspected))
            kept, full = Seen.of(read), Seen.of(inspected)
            assert replace(kept, env=()) == replace(full, env=())
            assert gpu_references(kept.labels, kept.env, kept.device_ids) == gpu_references(
                full.labels, full.env, full.device_ids)  # fmt: skip
            for field in ("Status", "Running", "ExitCode", "StartedAt", "FinishedAt"):
                assert read["State"][field] == inspected["State"][field], field
            assert read["Created"] == inspected["Created"]
            assert read["Config"]["Labels"] == inspected["Config"]["Labels"]
            assert [m["Destination"] for m in read["Mounts"]] == [
                m["Destination"] for m in inspected["Mounts"]]  # fmt: skip
            assert not any("TOKEN" in entry for entry in read["Config"]["Env"])
        assert sorted(Seen.of(read).env) == [  # the GPU environment of DS01's is kept
            "CUDA_VISIBLE_DEVICES=0", "NVIDIA_VISIBLE_DEVICES=1,MIG-2-1"]  # fmt: skip
    finally:
        for container in made:
            container.remove(force=True)
        client.close()
        remove_tree(Path(workspace))


@contextlib.asynccontextmanager
async def _running(reconciler: Reconciler) -> AsyncIterator[None]:
    """The reconciler's loop, as the service runs it, while inside."""
    task = asyncio.ensure_future(reconciler.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _events_followed(reconciler: Reconciler) -> None:
    """Until Docker's event stream is open and the sweep it brings has run."""
    for _ in range(100):
        if reconciler._following and reconciler.sweeps >= 2:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the reconciler never followed Docker's events")


@contextlib.contextmanager
def _counted_inspects(lifecycle: object) -> Iterator[collections.Counter[str]]:
    """How often each container is inspected (its model reloaded) while inside."""
    inspected: collections.Counter[str] = collections.Counter()
    run = lifecycle.docker.run  # type: ignore[attr-defined]

    async def counting(work, *args, **kwargs):
        if getattr(work, "__name__", "") == "reload":
            inspected[work.__self__.name] += 1
        return await run(work, *args, **kwargs)

    lifecycle.docker.run = counting  # type: ignore[attr-defined]
    try:
        yield inspected
    finally:
        lifecycle.docker.run = run  # type: ignore[attr-defined]


@pytest.mark.parametrize("behind_its_back", ["stop", "kill", "remove"])
async def test_ds01s_own_calls_wake_no_sweep_and_anything_else_does_at_once(
    world, test_image, docker_socket, behind_its_back: str
):
    """The Docker events of ds01's own create, start, stop and remove wake no sweep: the
    call did what the sweep would (on a busy node those sweeps cost more than the calls).
    The same act behind ds01's back is seen within the sweep gap: the GPU hold begins, or
    the record goes."""
    env, reconciler = world
    lifecycle = reconciler.lifecycle
    reconciler.interval = 3600  # only events wake it
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    try:
        async with _running(reconciler):
            await asyncio.sleep(2.5)  # its first sweeps: at the start, once events flow
            quiet = reconciler.sweeps
            name = await _create(reconciler, test_image, "own")
            await lifecycle.stop("ds01alice", False, "own", grace=1)
            await lifecycle.start("ds01alice", False, "own")
            await asyncio.sleep(EVENT_SWEEP_GAP + 1.5)
            assert reconciler.sweeps == quiet, "a sweep followed ds01's own calls"
            [record] = await lifecycle.metadata.all()
            assert record.run_start, record  # the run ds01 began is counted all the same
            container = client.containers.get(name)
            if behind_its_back == "remove":
                container.remove(force=True)
            else:
                getattr(container, behind_its_back)()
            for _ in range(50):
                if reconciler.sweeps > quiet:
                    break
                await asyncio.sleep(0.1)
            assert reconciler.sweeps > quiet, f"no sweep after a `docker {behind_its_back}`"
            await asyncio.sleep(0.5)  # the sweep under way ends
            if behind_its_back == "remove":
                assert await lifecycle.metadata.all() == []
            else:
                assert await _slot_state(env) == common_pb2.SLOT_STATE_HELD
    finally:
        client.close()


def test_own_events_are_those_docker_stamped_while_a_call_of_their_kind_ran():
    events = OwnEvents()
    with events.calling("web._.alice", own_events.STOP):
        during = time.time()
        assert events.caused("web._.alice", "die", during)
        assert not events.caused("web._.alice", "start", during)  # a crash after a start
        assert not events.caused("db._.alice", "die", during)  # another container's
    time.sleep(0.2)
    after = time.time()
    assert events.caused("web._.alice", "stop", during)  # arriving late, still its own
    assert not events.caused("web._.alice", "die", after)  # after it: anyone's
    with events.calling("db._.alice", own_events.CREATE):
        with events.calling("db._.alice", own_events.PROBE):  # a call inside another
            reading = time.time()
        assert events.caused("db._.alice", "destroy", reading)
    time.sleep(0.2)
    assert not events.caused("db._.alice", "destroy", time.time())  # later: anyone's


def test_own_calls_are_forgotten_keep_seconds_after_they_ended(monkeypatch):
    clock = SimpleNamespace(time=lambda: now)  # the host's clock, as own_events reads it
    monkeypatch.setattr(own_events, "time", clock)
    now = 1000.0
    events = OwnEvents()
    with events.calling("web._.alice", own_events.STOP):
        pass
    with (
        events.calling("db._.alice", own_events.STOP),
        events.calling("db._.alice", own_events.REMOVE),  # ends first
    ):
        pass
    now += own_events.KEEP / 2
    with events.calling("web._.alice", own_events.START):  # forgets nothing yet
        pass
    assert events.caused("web._.alice", "die", 1000.0)
    assert events.caused("db._.alice", "destroy", 1000.0)
    now += own_events.KEEP / 2 + 1
    with events.calling("job._.bob", own_events.START):  # the first three are past KEEP
        pass
    assert not events.caused("web._.alice", "die", 1000.0)
    assert not events.caused("db._.alice", "destroy", 1000.0)
    assert not events.caused("db._.alice", "die", 1000.0)
    assert events.caused("web._.alice", "start", 1000.0 + own_events.KEEP / 2)  # kept


async def test_a_container_with_gpus_but_no_allocation_is_reported(world, test_image):
    env, reconciler = world
    name = await _create(reconciler, test_image, "rogue")
    async with env.client("root") as admin:
        await admin.release(name)  # its allocation vanished, its GPUs did not
    await reconciler.sweep()
    assert reconciler.unallocated == set()  # as a create racing the sweep would look
    await reconciler.sweep()
    assert reconciler.unallocated == {name}  # still so: reported


async def test_a_container_that_exits_by_itself_gets_its_gpu_hold_and_its_runtime_counted(
    world, test_image, docker_socket
):
    env, reconciler = world
    name = await _create(reconciler, test_image, "selfexit")
    await asyncio.sleep(1.1)
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    try:
        client.containers.get(name).stop(timeout=1)  # not through ds01
    finally:
        client.close()
    await reconciler.sweep()
    assert await _slot_state(env) == common_pb2.SLOT_STATE_HELD
    [record] = await reconciler.lifecycle.metadata.all()
    assert record.runtime_before >= 1.0  # the run counts toward max_runtime
    await reconciler.sweep()
    [again] = await reconciler.lifecycle.metadata.all()
    assert again.runtime_before == record.runtime_before  # counted once


async def test_runs_hidden_by_docker_restarts_still_count_toward_max_runtime(
    world, test_image, docker_socket
):
    """Two `docker restart`s between sweeps: each run before them counts, through the
    Docker events the reconciler follows (no sweep runs here)."""
    _env, reconciler = world
    reconciler.interval = 3600  # only events act
    name = await _create(reconciler, test_image, "restarted")
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    try:
        async with _running(reconciler):
            await asyncio.sleep(1.5)  # the first sweep has seen the first run begin
            for _ in range(2):
                await asyncio.sleep(1.0)
                await asyncio.to_thread(client.containers.get(name).restart, timeout=0)
            await asyncio.sleep(1.5)
            [record] = await reconciler.lifecycle.metadata.all()
            assert record.runtime_before >= 2.0, record  # both runs before the restarts
            assert record.runtime_before < 6.0, record  # and nothing counted twice
    finally:
        client.close()


async def test_sweeps_during_quick_create_remove_cycles_of_one_name_touch_nothing(
    world, test_image, caplog: pytest.LogCaptureFixture
):
    """What bench/soak.py found: a user re-creating one name while the reconciler sweeps
    back to back. No sweep may adopt, forget or free what a create or remove is doing."""
    _env, reconciler = world
    reconciler.interval = 0.01  # sweep as often as it can
    lifecycle = reconciler.lifecycle
    async with _running(reconciler):
        with caplog.at_level(logging.WARNING, logger="ds01.containers.reconcile"):
            for _ in range(6):
                made = await lifecycle.create(
                    CreateRequest("ds01alice", "churn", test_image, gpus=1, start=True)
                )
                assert made.gpu_slots
                await lifecycle.stop("ds01alice", False, "churn", grace=1)
                await lifecycle.start("ds01alice", False, "churn")  # its GPU is still its
                await lifecycle.remove("ds01alice", False, "churn")
        assert reconciler.sweeps > 6
        acted = [r.getMessage() for r in caplog.records if "churn" in r.getMessage()]
        assert not acted, "the sweeps acted on a cycle"


def _seen_container(labels: dict[str, str], mount: str = "") -> SimpleNamespace:
    mounts = [{"Type": "bind", "Source": mount, "Destination": "/workspace"}] if mount else []
    return SimpleNamespace(labels=labels, attrs={"Mounts": mounts})


@pytest.mark.parametrize(
    ("labels", "mount", "expected"),
    [
        ({"aime.mlc.WORK_MOUNT": "/home/a/w"}, "", "/home/a/w"),  # mlc's, without a mount
        ({"aime.mlc.WORK_MOUNT": "/home/a/w"}, "/home/a/real", "/home/a/real"),  # Docker's
        ({"aime.mlc.WORK_MOUNT": "-"}, "", ""),
        # Through the gateway the label is the image's: it may name anyone's directory.
        ({"ds01.gateway": "true", "aime.mlc.WORK_MOUNT": "/home/bob/w"}, "", ""),
        ({"ds01.gateway": "true", "aime.mlc.WORK_MOUNT": "/home/bob/w"}, "/pins/x", "/pins/x"),
    ],
)
def test_the_workspace_a_keep_alive_is_looked_for_in_is_the_containers_own(labels, mount, expected):
    assert _workspace_of(_seen_container(labels, mount)) == expected
