from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import docker
import pytest
import pytest_asyncio

from ds01.core.config import Config, InventoryConfig, OwnershipConfig
from ds01.core.identity import Roles
from ds01.core.launcher import service_spec
from ds01.core.pki import SERVICES, Pki, init_pki, issue_client_cert
from ds01.core.processes import ManagedProcess, free_port
from ds01.core.server import RunningService, ServiceContext, start_service
from ds01.ownership.gateway.pins import Pins
from tests.allocator_env import AllocatorEnv, make_env, start_gateway
from tests.gateway_audit import audit_daemon
from tests.harness import (
    ANY_PORT_METRICS,
    GID,
    GROUP,
    USERS,
    build_test_image,
    require_binary,
    running_dockerd,
    running_etcd,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def etcd_process(pki: Pki) -> Iterator[tuple[str, ManagedProcess]]:
    with running_etcd(pki.etcd) as running:
        yield running


@pytest.fixture(scope="session")
def etcd_endpoint(etcd_process: tuple[str, ManagedProcess]) -> str:
    return etcd_process[0]


@pytest.fixture(scope="session")
def docker_socket() -> Iterator[Path]:
    with running_dockerd() as (socket_path, _process):
        yield socket_path


@pytest.fixture(scope="session")
def docker_client(docker_socket: Path) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def test_image(docker_socket: Path) -> str:
    return build_test_image(docker_socket)


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
def pki(state_dir: Path) -> Pki:
    pki = Pki(state_dir / "pki")
    init_pki(pki, admin="root")
    issue_client_cert(pki, "alice")
    return pki


@pytest.fixture(scope="session")
def suite_docker() -> Iterator[Path]:
    """A dockerd of the suite fixture's own: one containers service per Docker daemon, as
    on a real node (another node's reconciler would adopt the tests' containers)."""
    with running_dockerd() as (socket_path, _process):
        yield socket_path


@pytest.fixture(scope="session")
def suite_config(state_dir: Path, pki: Pki, etcd_endpoint: str, suite_docker: Path) -> Config:
    return Config(
        node="test-node",
        state_dir=state_dir,
        listen={s: f"127.0.0.1:{free_port()}" for s in SERVICES},
        metrics=ANY_PORT_METRICS,
        etcd_endpoints=(etcd_endpoint,),
        limits_file=REPO / "config" / "resource-limits.yaml",
        inventory=InventoryConfig(source="declared", file=REPO / "config" / "inventory.yaml"),
        ownership=OwnershipConfig(
            enroll_socket=state_dir / "enroll.sock", proxy_socket=state_dir / "docker.sock"
        ),
        docker_host=f"unix://{suite_docker}",
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def suite(suite_config: Config) -> AsyncIterator[dict[str, RunningService]]:
    """All four services, in this process, on free loopback ports with mutual TLS."""
    context = ServiceContext(config=suite_config, roles=Roles())
    running = {name: await start_service(service_spec(name), context) for name in SERVICES}
    for service in running.values():
        assert await service.ready(timeout=20), f"{service.spec.name} is not ready"
    yield running
    for service in running.values():
        await service.stop(grace=0)
    Pins(suite_config.state_dir / "pins").release_all()


@pytest_asyncio.fixture(loop_scope="session")
async def env(
    tmp_path: Path, pki: Pki, state_dir: Path, etcd_endpoint: str
) -> AsyncIterator[AllocatorEnv]:
    """limits and allocator services on a wiped etcd (test files may override it)."""
    env = await make_env(tmp_path, pki, state_dir, etcd_endpoint)
    yield env
    await env.stop()


@pytest.fixture(scope="session")
def unix_users() -> Iterator[dict[str, int]]:
    """Real accounts, as on a lab server: a shared group with an unusual GID."""
    require_binary("useradd")
    subprocess.run(["groupadd", "-g", str(GID), GROUP], check=False, capture_output=True)
    for user, uid in USERS.items():
        subprocess.run(
            ["useradd", "-m", "-u", str(uid), "-g", GROUP, user], check=False, capture_output=True
        )
    yield USERS
    for user in USERS:
        subprocess.run(["userdel", "-r", user], check=False, capture_output=True)
    subprocess.run(["groupdel", GROUP], check=False, capture_output=True)


@pytest.fixture
def limits_file() -> Path:
    """The limits the ownership fixture serves (a test may override this fixture)."""
    return REPO / "config" / "resource-limits.yaml"


@pytest_asyncio.fixture(loop_scope="session")
async def ownership(
    tmp_path: Path,
    pki: Pki,
    state_dir: Path,
    etcd_endpoint: str,
    docker_socket: Path,
    limits_file: Path,
) -> AsyncIterator[tuple[Config, RunningService]]:
    run_dir = Path(tempfile.mkdtemp(prefix="ds01-run-", dir="/tmp"))
    run_dir.chmod(0o755)  # like /run/ds01: every local user may reach the socket
    config, (limits, service) = await start_gateway(
        state_dir, pki, etcd_endpoint, docker_socket, limits_file, run_dir
    )
    await asyncio.sleep(0.5)  # the first resync
    yield config, service
    await service.stop(grace=0)
    await limits.stop(grace=0)
    Pins(state_dir / "pins").release_all()  # no mount of a user's directory outlives a test
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon_audit(docker_socket: Path) -> Iterator[None]:
    """At the end of the suite, checked as root on the daemon itself: nothing a user owns
    breaks the gateway's policy, whichever test made it."""
    yield
    problems = audit_daemon(docker_socket)
    assert not problems, "the daemon holds objects that break the policy:\n" + "\n".join(problems)


# Before pytest-timeout ends a hung test (its ``timeout`` in pyproject.toml), every
# unfinished asyncio task prints where it waits: the thread stacks alone show an idle loop.
TASK_DUMP_AFTER = 150.0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    timer = threading.Timer(TASK_DUMP_AFTER, _dump_tasks, args=(item,))
    timer.daemon = True
    timer.start()
    try:
        return (yield)
    finally:
        timer.cancel()


def _dump_tasks(item: pytest.Item) -> None:
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)
    out = sys.stderr
    tasks = [t for t in gc.get_objects() if isinstance(t, asyncio.Task) and not t.done()]
    print(f"\n{item.nodeid} runs for {TASK_DUMP_AFTER:g} s; {len(tasks)} tasks:", file=out)
    for task in tasks:
        print(f"{task.get_name()}:", file=out)
        for line in _awaiting(task.get_coro()):
            print(f"    {line}", file=out)
    # A fixture's teardown is an async generator a task awaits through an asend object,
    # which hides the generator: print every suspended one's chain too.
    for generator in gc.get_objects():
        if isinstance(generator, types.AsyncGeneratorType) and generator.ag_await is not None:
            print(f"async generator {generator.ag_code.co_qualname}:", file=out)
            for line in _awaiting(generator):
                print(f"    {line}", file=out)
    out.flush()
    if capture is not None:
        capture.resume_global_capture()


def _awaiting(awaitable: object) -> list[str]:
    """Where a task waits, outermost first: each coroutine's line, down to the future."""
    lines = []
    while awaitable is not None:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None)
        if frame is None:
            lines.append(repr(awaitable)[:300])
            break
        lines.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "ag_await", None)
    return lines


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With CI=true a skipped test is a failed run: nothing may pass vacuously."""
    if os.environ.get("CI") == "true" and _skipped:
        print(f"\nCI=true but {len(_skipped)} test(s) were skipped: {', '.join(_skipped)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
