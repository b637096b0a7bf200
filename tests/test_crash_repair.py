"""Crash-safe create: the containers service is killed (SIGKILL, at a fault point) at
each step of a create; started again, it undoes the interrupted create within seconds,
and nothing is left: no container, no GPU, no record, no directory, and the name is free.
Until then, the user sees the create as interrupted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from ds01.client import Ds01Error
from ds01.containers.adapters import DockerHost, Intent, IntentStore, MetadataStore
from ds01.containers.lifecycle import Code, ContainerError, CreateRequest, Lifecycle
from ds01.containers.server import Holdings, _container
from ds01.core.etcd import connect
from ds01.core.faults import ENV as FAULT
from ds01.core.pki import Pki
from ds01.core.processes import start_dockerd
from ds01.v1 import containers_pb2
from tests.allocator_env import AllocatorEnv, make_env, make_lifecycle, own_etcd_env
from tests.harness import build_test_image, remove_tree

pytestmark = pytest.mark.usefixtures("unix_users")

DS01D = str(Path(sys.executable).with_name("ds01d"))
USER = "ds01alice"
LIMITS = """
defaults:
  max_mig_instances: 2
  max_containers_per_user: 3
  gpu_hold_after_stop: 1h
"""
REPAIR_SECONDS = 10  # documented: an interrupted create is undone within seconds of start


@pytest_asyncio.fixture(loop_scope="session")
async def env(
    tmp_path: Path, pki: Pki, state_dir: Path, etcd_endpoint: str, docker_socket: Path
) -> AsyncIterator[AllocatorEnv]:
    """limits and allocator here; the containers service is a process of its own."""
    env = await make_env(
        tmp_path, pki, state_dir, etcd_endpoint, docker_socket, LIMITS, ("limits", "allocator")
    )
    yield env
    await env.stop()


class ContainersProcess:
    def __init__(self, env: AllocatorEnv, fault: str = "") -> None:
        environ = {key: value for key, value in os.environ.items() if key != FAULT}
        if fault:
            environ[FAULT] = fault
        self.log = env.config_file.with_name(f"containers-{time.monotonic_ns()}.log")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [DS01D, "--config", str(env.config_file), "--services", "containers"],
                env=environ,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    async def serving(self, env: AllocatorEnv) -> None:
        async with env.client("root") as root:
            for _ in range(300):
                try:
                    if await root.health("containers") == "SERVING":
                        return
                except Ds01Error:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("the containers service never came up")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGUSR1)  # its threads' stacks, to the log
                time.sleep(1)
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    "ds01d did not stop on SIGTERM:\n" + self.log.read_text()[-6000:]
                ) from None


async def _leftovers(env: AllocatorEnv, docker_socket: Path, name: str) -> list[str]:
    """Everything of container ``name`` that is still anywhere."""
    found = []
    etcd = connect(env.config, "containers")
    docker = DockerHost(f"unix://{docker_socket}")
    try:
        if await IntentStore(etcd, env.config.node).get(name):
            found.append("intent")
        if await MetadataStore(etcd, env.config.node).get(name):
            found.append("record")
        if await docker.find(name):
            found.append("Docker container")
    finally:
        await docker.close()
        await etcd.close()
    async with env.client("root") as root:
        held = [a for a in (await root.gpu_status()).allocations if a.container == name]
    if held:
        found.append("GPU allocation")
    if Path(f"/home/{USER}/workspace/crash").exists():
        found.append("workspace directory")
    if (env.config.state_dir / "accounts" / name).exists():
        found.append("account files")
    return found


@pytest.mark.parametrize(
    "point",
    [
        "create:reserved",
        "create:workspace",
        "create:allocated",
        "create:probed",
        "create:named",
        "create:docker-created",
        "create:started",
    ],
)
async def test_a_create_killed_at_any_step_is_undone_within_seconds_of_restart(
    env: AllocatorEnv, docker_socket: Path, test_image: str, point: str
):
    name = f"crash._.{USER}"
    workspace = Path(f"/home/{USER}/workspace/crash")
    shutil.rmtree(workspace, ignore_errors=True)  # kept by the last test's remove, rightly
    doomed = ContainersProcess(env, fault=point)
    try:
        await doomed.serving(env)
        async with env.client(USER) as alice:
            with pytest.raises(Ds01Error) as lost:
                await alice.create_container("crash", test_image, gpus=1, start=True)
        assert lost.value.code == grpc.StatusCode.UNAVAILABLE
        assert doomed.process.wait(10) == -signal.SIGKILL  # it died right there
        assert "intent" in await _leftovers(env, docker_socket, name)
    finally:
        doomed.stop()
    restarted = ContainersProcess(env)
    try:
        await restarted.serving(env)
        started = time.monotonic()
        while (left := await _leftovers(env, docker_socket, name)) and (
            time.monotonic() - started < REPAIR_SECONDS
        ):
            await asyncio.sleep(0.2)
        assert left == [], f"left after {REPAIR_SECONDS}s: {left}"
        async with env.client(USER) as alice:  # the name is free: the retry works
            again = await alice.create_container("crash", test_image, gpus=1, start=True)
            assert again.state == containers_pb2.CONTAINER_STATE_RUNNING
            await alice.remove_container("crash")
    finally:
        restarted.stop()


async def test_an_interrupted_create_is_shown_as_such_until_it_is_undone(
    env: AllocatorEnv, docker_socket: Path, test_image: str, tmp_path: Path
):
    """An intent left by a dead run while Docker cannot be reached to undo it: list,
    inspect, a retry and a remove say what is going on; once Docker answers again, the
    repair finishes it and the name is free."""
    name = f"ghost._.{USER}"
    etcd = connect(env.config, "containers")
    lifecycle = make_lifecycle(env, tmp_path / "no-docker.sock", etcd)  # Docker is away
    ghost = Intent(name, "ghost", USER, test_image, env.config.node, "a-dead-run", time.time())
    ghost.creating = True
    try:
        assert await lifecycle.intents.reserve(ghost)
        assert await lifecycle.repair() == 1  # cannot undo yet: kept, marked as undoing
        assert (await lifecycle.intents.get(name)).undoing
        listed = [(m.name, m.pending, m.notice) for m, _ in await lifecycle.list(USER, False)]
        assert listed == [
            (
                "ghost",
                "interrupted",
                "its create was interrupted; ds01 is undoing it, then the name is free",
            )
        ]
        shown, _ = await lifecycle.inspect(USER, False, "ghost")
        assert (
            _container(shown, None, Holdings(known=True)).state
            == containers_pb2.CONTAINER_STATE_INTERRUPTED
        )
        for attempt in (
            lifecycle.create(CreateRequest(USER, "ghost", test_image)),
            lifecycle.remove(USER, False, "ghost"),
            lifecycle.start(USER, False, "ghost"),
        ):
            with pytest.raises(ContainerError) as refused:
                await attempt
            assert refused.value.code is Code.UNAVAILABLE, refused.value.message
            assert "was interrupted and ds01 is undoing it; try again" in refused.value.message
        with pytest.raises(ContainerError) as others:  # bob learns nothing of alice's
            await lifecycle.inspect("ds01bob", False, name)
        assert others.value.code is Code.NOT_FOUND
        lifecycle.docker = DockerHost(f"unix://{docker_socket}")  # Docker is back
        assert await lifecycle.repair() == 0
        assert await lifecycle.list(USER, False) == []
    finally:
        await lifecycle.intents.delete(name)
        await lifecycle.client.close()
        await etcd.close()


def _once_before(target: object, method: str, fault: Callable[[], None]) -> None:
    """A fault point in this process: ``fault()`` runs once, right before ``method``."""
    original = getattr(target, method)
    fired: list[bool] = []

    async def wrapped(*args: object, **kwargs: object) -> object:
        if not fired:
            fired.append(True)
            await asyncio.to_thread(fault)
        return await original(*args, **kwargs)

    setattr(target, method, wrapped)


async def _repaired(lifecycle: Lifecycle, seconds: float) -> int:
    """Run the repair as its loop does until nothing is left, or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while (left := await _safely(lifecycle.repair())) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    return left


async def _safely(repair: Awaitable[int]) -> int:
    try:
        return await repair
    except Exception:  # etcd still on its way back: the loop tries again
        return 1


async def test_etcd_stopped_during_a_create_then_restarted_leaves_nothing(
    pki: Pki, state_dir: Path, docker_socket: Path, test_image: str, tmp_path: Path
):
    async with own_etcd_env(tmp_path, pki, state_dir) as own:
        etcd = connect(own.env.config, "containers")
        lifecycle = make_lifecycle(own.env, docker_socket, etcd)
        _once_before(lifecycle.intents, "update", own.stop)  # after the name is reserved
        try:
            with pytest.raises(ContainerError) as failed:
                await lifecycle.create(CreateRequest(USER, "blip", test_image, gpus=1))
            assert failed.value.code is Code.UNAVAILABLE
            assert failed.value.message.startswith(
                "create failed while allocating GPUs: etcd is unreachable"
            ), failed.value.message
            assert "ds01 keeps undoing what is left" in failed.value.message
            await own.start()
            assert await _repaired(lifecycle, 15) == 0
            assert await lifecycle.list(USER, False) == []
            # As a user would: once the allocator reaches etcd again (its health says so).
            assert await own.env.services["allocator"].ready(timeout=20)
            made = await lifecycle.create(CreateRequest(USER, "blip", test_image, gpus=1))
            assert made.gpu_slots
            await lifecycle.remove(USER, False, "blip")
        finally:
            await lifecycle.client.close()
            await lifecycle.docker.close()
            await etcd.close()


@pytest.mark.parametrize("when", ["create", "start"])
async def test_dockerd_restarted_during_a_create_leaves_nothing(
    env: AllocatorEnv, test_image: str, when: str
):
    """Docker goes away before the container is made, or after (then the undo cannot
    remove it): the failed undo is retried once Docker is back, until nothing is left."""
    root = Path(tempfile.mkdtemp(prefix="ds01-restart-", dir="/tmp"))
    daemon = [start_dockerd(root)]
    etcd = connect(env.config, "containers")
    lifecycle = make_lifecycle(env, root / "docker.sock", etcd)
    try:
        image = build_test_image(root / "docker.sock")
        _once_before(lifecycle.docker, when, daemon[0].stop)
        with pytest.raises(ContainerError) as failed:
            await lifecycle.create(CreateRequest(USER, "dockerless", image, gpus=1, start=True))
        assert failed.value.code is Code.UNAVAILABLE
        assert "Docker" in failed.value.message, failed.value.message
        if when == "start":  # the container exists and could not be removed
            assert "ds01 keeps undoing what is left" in failed.value.message
            [shown] = await lifecycle.list(USER, False)
            assert shown[0].pending == "interrupted"
        daemon.append(await asyncio.to_thread(start_dockerd, root))
        assert await _repaired(lifecycle, 20) == 0
        assert await lifecycle.docker.find("dockerless._.ds01alice") is None
        async with env.client("root") as admin:
            held = [a for a in (await admin.gpu_status()).allocations if a.container]
        assert held == []
        assert not Path(f"/home/{USER}/workspace/dockerless").exists()
    finally:
        await lifecycle.client.close()
        await lifecycle.docker.close()
        await etcd.close()
        daemon[-1].stop()
        remove_tree(root)


class _HeldIntents(IntentStore):
    """The intents store with two moments held open, as a slow host holds them: a create
    just after it has written that it is creating the container, and a repair between
    reading the list of intents and acting on it."""

    def __init__(self, store: IntentStore) -> None:
        super().__init__(store.client, store.node)
        self.creating_written = asyncio.Event()
        self.create_may_go = asyncio.Event()
        self.listed: list[Intent] = []
        self.read = asyncio.Event()
        self.repair_may_go = asyncio.Event()

    async def update(self, intent: Intent) -> None:
        await super().update(intent)
        if intent.creating and not intent.starting:
            self.creating_written.set()
            await self.create_may_go.wait()
            self.create_may_go.clear()

    async def all(self) -> list[Intent]:
        self.listed = await super().all()
        self.read.set()
        await self.repair_may_go.wait()
        return self.listed


@pytest.mark.parametrize("then", ["finished", "made anew"])
async def test_a_repair_never_undoes_a_create_that_finished_after_it_read_the_intents(
    env: AllocatorEnv, docker_socket: Path, test_image: str, then: str
):
    """The repair reads every intent, then undoes the interrupted ones. A create in
    flight at the read may finish before the repair acts on it (and its name may be a
    new create's by then): what it finished must stay, container and GPU."""
    name = f"race._.{USER}"
    etcd = connect(env.config, "containers")
    lifecycle = make_lifecycle(env, docker_socket, etcd)
    held = lifecycle.intents = _HeldIntents(lifecycle.intents)
    request = CreateRequest(USER, "race", test_image, gpus=1)
    try:
        creating = asyncio.ensure_future(lifecycle.create(request))
        await asyncio.wait_for(held.creating_written.wait(), 30)
        repairing = asyncio.ensure_future(lifecycle.repair())
        await asyncio.wait_for(held.read.wait(), 10)
        assert [i.docker_name for i in held.listed] == [name]  # read while in flight
        held.create_may_go.set()
        await asyncio.wait_for(creating, 30)
        if then == "made anew":
            await lifecycle.remove(USER, False, "race")
            held.creating_written.clear()
            creating = asyncio.ensure_future(lifecycle.create(request))
            await asyncio.wait_for(held.creating_written.wait(), 30)
        held.repair_may_go.set()
        await asyncio.sleep(0.5)  # the repair acts now, on what it read
        held.create_may_go.set()
        made = await asyncio.wait_for(creating, 30)
        await asyncio.wait_for(repairing, 30)
        container = await lifecycle.docker.find(name)
        assert container is not None and container.id == made.container_id
        status = await lifecycle.client.gpu_status(user=USER)
        assert [a.container for a in status.allocations] == [name]
        assert (await lifecycle.metadata.get(name)) is not None
    finally:
        held.create_may_go.set()
        held.repair_may_go.set()
        with contextlib.suppress(ContainerError):
            await lifecycle.remove(USER, False, "race")
        await held.delete(name)
        await lifecycle.client.close()
        await etcd.close()


async def test_a_repair_does_not_wait_for_a_create_of_the_same_user(
    env: AllocatorEnv, docker_socket: Path, test_image: str
):
    """A dead run left an intent of alice's; alice is creating another container now
    (a create may wait hours for a GPU). The repair undoes the dead run's intent at once,
    without waiting for her create, and leaves her create alone."""
    etcd = connect(env.config, "containers")
    lifecycle = make_lifecycle(env, docker_socket, etcd)
    held = lifecycle.intents = _HeldIntents(lifecycle.intents)
    held.repair_may_go.set()  # this test holds the create alone
    ghost = Intent(f"ghost._.{USER}", "ghost", USER, test_image, env.config.node, "a-dead-run",
                   time.time())  # fmt: skip
    try:
        assert await held.reserve(ghost)
        creating = asyncio.ensure_future(lifecycle.create(CreateRequest(USER, "live", test_image)))
        await asyncio.wait_for(held.creating_written.wait(), 30)
        assert await asyncio.wait_for(lifecycle.repair(), 10) == 0
        assert await held.get(ghost.docker_name) is None  # undone
        held.create_may_go.set()
        made = await asyncio.wait_for(creating, 30)
        assert (await lifecycle.docker.find(made.docker_name)) is not None
    finally:
        held.create_may_go.set()
        with contextlib.suppress(ContainerError):
            await lifecycle.remove(USER, False, "live")
        await held.delete(ghost.docker_name)
        await lifecycle.client.close()
        await etcd.close()


@pytest.mark.parametrize("slow", ["probe", "create"])
async def test_a_create_cancelled_while_docker_works_leaves_nothing(
    env: AllocatorEnv, docker_socket: Path, test_image: str, slow: str
):
    """A create cancelled (the service stopping) while Docker still makes a container in
    its worker thread, the one made to read a new image or the user's own: the undo waits
    for it to land, then removes it. Nothing with the name is left behind."""
    etcd = connect(env.config, "containers")
    lifecycle = make_lifecycle(env, docker_socket, etcd)
    docker = lifecycle.docker
    real = docker.create
    calls: list[dict[str, object]] = []

    async def slow_create(arguments: dict[str, object]) -> object:
        calls.append(arguments)
        is_probe = arguments.get("command") == ["true"]
        if is_probe == (slow == "probe"):

            def made_late() -> object:
                time.sleep(1.0)
                return docker.client.containers.create(**arguments)

            return await docker.run(made_late)
        return await real(arguments)

    docker.create = slow_create  # type: ignore[method-assign]
    name = f"late-{slow}._.{USER}"
    try:
        create = asyncio.ensure_future(
            lifecycle.create(CreateRequest(USER, f"late-{slow}", test_image, gpus=0))
        )
        for _ in range(100):  # the slow create is in Docker's hands
            if len(calls) == (1 if slow == "probe" else 2):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        create.cancel()
        with contextlib.suppress(asyncio.CancelledError, ContainerError):
            await create
        await asyncio.sleep(1.5)  # past the slow create's landing
        assert await docker.find(name) is None
        assert await lifecycle.list(USER, False) == []
        assert not (env.config.state_dir / "accounts" / name).exists()
    finally:
        await lifecycle.client.close()
        await docker.close()
        await etcd.close()
