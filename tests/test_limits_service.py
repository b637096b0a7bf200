"""The limits service over mTLS: answers, permissions, hot reload and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from ds01.client import ClientIdentity, Ds01Client, Ds01Error
from ds01.core import keepalive
from ds01.core.config import Config
from ds01.core.docker_args import DockerInfo
from ds01.core.identity import Roles
from ds01.core.limits_cache import CachedLimits
from ds01.core.pki import (
    SERVICES,
    Pki,
    PkiError,
    is_user_name,
    issue_client_cert,
    validate_user_name,
)
from ds01.core.processes import free_port
from ds01.core.server import RunningService, ServiceContext, start_service
from ds01.limits import resolve as resolve_module
from ds01.limits import store as store_module
from ds01.limits.server import SPEC, LocalLimits
from ds01.limits.store import LimitsStore
from ds01.v1 import limits_pb2
from tests.harness import Partition, run_cli
from tests.limits_fixtures import RESOURCE_LIMITS, SEED_BLOCK_ALICE, start_limits, write_config


@dataclass
class LimitsEnv:
    config: Config
    config_file: Path
    limits_file: Path
    pki: Pki
    service: RunningService

    def client(self, user: str) -> Ds01Client:
        paths = self.pki.client(user)
        if not paths.cert.is_file():
            issue_client_cert(self.pki, user)
        return Ds01Client(self.config, ClientIdentity(self.pki.ca_cert, paths))

    async def cli(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        return await run_cli(self.config_file, self.pki, user, *args)


@pytest_asyncio.fixture(loop_scope="session")
async def env(tmp_path: Path, pki: Pki, state_dir: Path) -> AsyncIterator[LimitsEnv]:
    limits_file = write_config(tmp_path / "etc")
    config_file = tmp_path / "ds01.yaml"
    config, service = await start_limits(state_dir, limits_file, config_file)
    yield LimitsEnv(config, config_file, limits_file, pki, service)
    await service.stop(grace=0)


async def eventually(check, timeout: float = 3.0):
    """Poll ``check`` until it returns a truthy value; reloads are asynchronous."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.05)


async def test_cli_prints_the_seed_block(env: LimitsEnv):
    result = await env.cli("alice", "limits")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == SEED_BLOCK_ALICE


async def test_cli_docker_args_line(env: LimitsEnv):
    result = await env.cli("root", "limits", "student1", "--docker-args")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "--cpus=8 --memory=32g --memory-swap=32g --shm-size=16g --pids-limit=4096 "
        "--cgroup-parent=ds01-students-student1.slice"
    )


async def test_cli_json_names_the_source_of_each_value(env: LimitsEnv):
    import json

    result = await env.cli("alice", "limits", "--output", "json")
    data = json.loads(result.stdout)
    assert data["group"] == "researchers"
    assert data["limits"]["max_cpus"] == {"value": 16, "unlimited": False, "source": "group"}
    assert data["limits"]["pids_limit"]["source"] == "default"
    assert data["policies"] == {"warn_before_idle_stop": "2h", "exempt_from_idle": "true"}
    aggregate = {"cpus": 32.0, "memory_bytes": 128 * 1024**3, "pids": 8192}  # numbers, not strings
    assert {k: v for k, v in data["aggregate"].items() if v is not None} == aggregate


LISTED_AND_NOT = ["student1", "alice", "carol", "d.jones@uni.example", "h.baker@hertie-school.lan",
                  "labadmin", "root", "someone-listed-nowhere"]  # fmt: skip
NO_LOGIN_NAMES = ["svc:allocator", "svc:", "../alice", "alice/../root", "-rf", ".hidden",
                  "@lab", "a b", "alice\n", "x" * 129, "ålice"]  # fmt: skip


async def test_services_beside_it_get_the_answers_a_call_gets(env: LimitsEnv):
    """What the allocator and containers services in the same ds01d are told without a
    call: exactly what GetLimits and GetDockerArgs answer over mTLS, refusals included
    (their code and words), for every kind of user the configuration lists or not, and
    for names no login has (a service's among them)."""
    local = env.service.runtime.context.limits
    assert local is not None
    docker = DockerInfo(ncpu=4, cgroup_driver="systemd")
    identity = ClientIdentity(env.pki.ca_cert, env.pki.service("allocator"))
    async with Ds01Client(env.config, identity) as service:
        for user in [*LISTED_AND_NOT, *NO_LOGIN_NAMES]:
            for kind in ("", "no-such-type"):
                calls = (service.get_limits(user, kind), service.get_docker_args(user, kind),
                         service.get_docker_args(user, kind, docker))  # fmt: skip
                answers = [await _answer_of(call) for call in calls]
                here = [
                    _told(local.limits, user, kind),
                    _told(local.docker_args, user, kind),
                    _told(local.docker_args, user, kind, docker),
                ]
                assert here == answers, (user, kind)
                if kind or user in NO_LOGIN_NAMES:
                    assert answers[0][0] == grpc.StatusCode.INVALID_ARGUMENT


async def _answer_of(call: Awaitable[object]) -> object:
    try:
        return await call
    except Ds01Error as err:
        return err.code, err.problem


def _told(ask: Callable[..., object], *args: object) -> object:
    try:
        return ask(*args)
    except Ds01Error as err:
        return err.code, err.problem


def test_without_a_configuration_services_beside_it_are_refused_in_words(tmp_path: Path):
    broken = tmp_path / "resource-limits.yaml"
    broken.write_text("defaults: [not, a, mapping\n")
    store = LimitsStore(broken)
    store.poll()
    with pytest.raises(Ds01Error) as refused:
        LocalLimits(store).limits("alice")
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.problem.startswith(
        f"no valid limits configuration has been loaded from {broken}"
    )


async def test_users_see_only_their_own_limits(env: LimitsEnv):
    denied = await env.cli("bob", "limits", "alice")
    assert denied.returncode == 1
    assert "bob may not see the limits of alice" in denied.stderr
    assert "[PERMISSION_DENIED]" in denied.stderr
    for admin in ("root", "labadmin"):  # access_control.admin_users, the admin group
        allowed = await env.cli(admin, "limits", "alice")
        assert allowed.returncode == 0 and "Group: researchers" in allowed.stdout


async def test_get_limits_reports_unlimited_and_ipc_host(env: LimitsEnv):
    async with env.client("root") as client:
        jones = await client.get_limits("d.jones@uni.example")
        carol = await client.get_docker_args("erin")  # unlisted: students
    values = {v.key: v for v in jones.values}
    assert (
        values["memory"].unlimited and values["memory"].source == limits_pb2.LIMIT_SOURCE_OVERRIDE
    )
    assert not jones.HasField("memory_bytes") and jones.max_cpus == 48
    assert values["max_gpu_equivalents"].unlimited
    assert jones.cgroup_parent == "ds01-faculty-d_jones_uni_example.slice"
    assert carol.shm_size_bytes == 16 * 1024**3 and carol.ipc_mode == ""


async def test_services_must_name_the_user(env: LimitsEnv):
    identity = ClientIdentity(env.pki.ca_cert, env.pki.service("allocator"))
    async with Ds01Client(env.config, identity) as client:
        assert (await client.get_limits("alice")).group == "researchers"
        with pytest.raises(Ds01Error) as refused:
            await client.get_limits()
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_groups_shows_members_to_admins_only(env: LimitsEnv):
    async with env.client("root") as admin, env.client("alice") as alice:
        as_admin = {g.name: g for g in await admin.list_groups()}
        as_user = {g.name: g for g in await alice.list_groups()}
    assert list(as_admin) == ["students", "researchers", "faculty", "admin"]
    assert as_admin["researchers"].priority == 50
    assert "alice" in as_admin["researchers"].members
    assert all(not g.members for g in as_user.values())


async def test_limits_check_reports_every_problem_with_file_and_line(
    env: LimitsEnv, tmp_path: Path
):
    candidate = tmp_path / "new-limits.yaml"
    candidate.write_text(RESOURCE_LIMITS.replace("max_cpus: 16", "max_cpus: sixteen"))
    result = await env.cli("root", "limits", "check", str(candidate))
    assert result.returncode == 1
    line = RESOURCE_LIMITS.splitlines().index("    max_cpus: 16") + 1
    assert f"{candidate}:{line}: groups.researchers.max_cpus: expected a number" in result.stdout
    good = tmp_path / "good.yaml"
    good.write_text(RESOURCE_LIMITS)
    ok = await env.cli("root", "limits", "check", str(good))
    assert ok.returncode == 0 and f"{good}: OK" in ok.stdout
    assert (await env.cli("alice", "limits", "check", str(good))).returncode == 1  # admins only


async def test_hot_reload_of_a_good_then_a_broken_file_while_clients_call(env: LimitsEnv):
    async with env.client("alice") as alice, env.client("root") as root:
        before = await alice.get_limits()
        assert before.max_cpus == 16
        stop = asyncio.Event()
        failures: list[Exception] = []
        calls = 0

        async def hammer() -> None:
            nonlocal calls
            while not stop.is_set():
                try:
                    limits = await alice.get_limits()
                    assert limits.max_cpus in (16, 20)
                    calls += 1
                except Exception as err:  # any failure during reload is a bug
                    failures.append(err)
                await asyncio.sleep(0)

        callers = [asyncio.create_task(hammer()) for _ in range(4)]
        try:
            # A good change is served within a second.
            env.limits_file.write_text(RESOURCE_LIMITS.replace("max_cpus: 16", "max_cpus: 20"))

            async def reloaded():
                return (await alice.get_limits()).max_cpus == 20

            assert await eventually(reloaded, timeout=1.0)
            # A broken file is refused; the last good configuration keeps serving.
            env.limits_file.write_text(RESOURCE_LIMITS.replace("max_cpus: 16", "max_cpus: -3"))

            async def refused():
                return not (await root.validate_config()).valid

            assert await eventually(refused)
            [issue] = (await root.validate_config()).issues
            assert (issue.file, issue.key) == (str(env.limits_file), "groups.researchers.max_cpus")
            assert issue.line == 27 and issue.message == "must not be negative, got -3"
            assert (await alice.get_limits()).max_cpus == 20
            health = await alice.health("limits")
            assert health == "SERVING"
        finally:
            stop.set()
            await asyncio.gather(*callers)
            env.limits_file.write_text(RESOURCE_LIMITS)
    assert not failures, failures[:3]
    assert calls > 20


async def test_member_file_changes_are_picked_up_and_watchers_told(env: LimitsEnv):
    async with env.client("alice") as alice, env.client("root") as root:
        mine = alice.watch_limits()
        everyone = root.watch_limits()
        for stream in (mine, everyone):  # subscribed once the greeting arrives
            greeting = await anext(stream)
            assert not greeting.users and greeting.digest
        next_mine = asyncio.ensure_future(anext(mine))
        next_everyone = asyncio.ensure_future(anext(everyone))
        # alice leaves researchers: she falls back to the default group.
        members = env.limits_file.parent / "groups" / "researchers.members"
        members.write_text(members.read_text().replace("alice\n", "# alice left\n"))
        try:
            change = await asyncio.wait_for(next_everyone, 3)
            assert "alice" in change.users and "carol" not in change.users
            own = await asyncio.wait_for(next_mine, 3)
            assert list(own.users) == ["alice"]
            assert (await alice.get_limits()).group == "students"
        finally:
            for stream in (mine, everyone):
                with contextlib.suppress(Exception):
                    await stream.aclose()
            write_config(env.limits_file.parent)


ADMIN_GROUP, ADMIN_TO_BE = "ds01gadm", "ds01gadmx"


@pytest.fixture
def group_file(tmp_path: Path) -> Iterator[Path]:
    """A limits file whose admin group is a Linux group (of no members yet); one user
    outside it."""
    subprocess.run(["groupadd", ADMIN_GROUP], check=True, capture_output=True)
    subprocess.run(["useradd", "-M", ADMIN_TO_BE], check=True, capture_output=True)
    limits_file = write_config(tmp_path / "etc")
    limits_file.write_text(
        RESOURCE_LIMITS.replace("admin_group: admin", f"admin_group: {ADMIN_GROUP}")
    )
    try:
        yield limits_file
    finally:
        subprocess.run(["userdel", ADMIN_TO_BE], capture_output=True)
        subprocess.run(["groupdel", ADMIN_GROUP], capture_output=True)


@pytest_asyncio.fixture(loop_scope="session")
async def group_env(
    tmp_path: Path, pki: Pki, state_dir: Path, group_file: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[LimitsEnv]:
    """A limits service on ``group_file``, reading the group every 0.2 s instead of
    every minute."""
    monkeypatch.setattr(store_module, "UNIX_GROUP_EVERY", 0.2)
    config_file = tmp_path / "ds01.yaml"
    config, service = await start_limits(state_dir, group_file, config_file)
    yield LimitsEnv(config, config_file, group_file, pki, service)
    await service.stop()


def test_an_nss_that_stops_answering_holds_up_no_reload_and_makes_nobody_an_admin(
    group_file: Path, monkeypatch: pytest.MonkeyPatch
):
    """An LDAP server that stops answering without refusing (nslcd waits for ever by
    default) left the reloads waiting on it: an edit of the files never applied, and
    the members last read stayed admins. A lookup now has NSS_TIMEOUT; what NSS does
    not say by then counts as no members, and while it hangs no other is started."""
    subprocess.run(["usermod", "-aG", ADMIN_GROUP, ADMIN_TO_BE], check=True, capture_output=True)
    store = LimitsStore(group_file)
    assert store.poll() is not None and store.is_admin(ADMIN_TO_BE)
    monkeypatch.setattr(resolve_module, "NSS_TIMEOUT", 0.3)
    answers, asked, real = threading.Event(), [], grp.getgrnam

    def hanging(name: str) -> grp.struct_group:
        asked.append(name)
        answers.wait(30)
        return real(name)

    monkeypatch.setattr(grp, "getgrnam", hanging)
    started = time.monotonic()
    change = store.read_admin_group()
    assert change is not None and change.users == {ADMIN_TO_BE}  # reported as gone
    assert not store.is_admin(ADMIN_TO_BE)
    group_file.write_text(
        group_file.read_text().replace("max_containers_per_user: 3", "max_containers_per_user: 4")
    )
    assert store.poll() is not None, "an edit waited on NSS"
    assert time.monotonic() - started < 5 and not store.is_admin(ADMIN_TO_BE)
    assert asked == [ADMIN_GROUP], "a second lookup was started while one hangs"
    answers.set()  # NSS answers again: the next reading finds the member
    for _ in range(50):
        if not resolve_module._last[-1].thread.is_alive():
            break
        time.sleep(0.05)
    assert store.read_admin_group() is not None and store.is_admin(ADMIN_TO_BE)


async def test_who_joins_or_leaves_the_admin_group_is_told_and_answered_within_its_reading(
    group_env: LimitsEnv,
):
    """Services keep limits answers until the change stream reports a change (see
    CachedLimits): joining or leaving the admin group's Linux members, which no file
    shows, is reported on it, and the answers in the process follow at once."""
    user = ADMIN_TO_BE
    local = group_env.service.runtime.context.limits
    assert local is not None
    async with group_env.client("root") as root, group_env.client(user) as them:
        everyone = root.watch_limits()
        assert not (await anext(everyone)).users  # subscribed
        try:
            assert not (await root.get_limits(user)).admin and not local.limits(user).admin
            for joined, command in ((True, ["usermod", "-aG", ADMIN_GROUP, user]),
                                    (False, ["gpasswd", "-d", user, ADMIN_GROUP])):  # fmt: skip
                subprocess.run(command, check=True, capture_output=True)
                change = await asyncio.wait_for(anext(everyone), 5)
                assert list(change.users) == [user] and change.digest
                assert (await root.get_limits(user)).admin is joined
                assert local.limits(user).admin is joined  # kept answers dropped
                # What an admin may see, they see now: the groups' members.
                seen = {g.name: g for g in await them.list_groups()}
                assert ("alice" in seen["researchers"].members) is joined
        finally:
            await everyone.aclose()


def test_the_admin_group_read_again_unchanged_reports_nothing(tmp_path: Path):
    """A reading that finds the same members is no change: nothing is published, so no
    service drops what it keeps once a minute for nothing."""
    limits_file = write_config(tmp_path / "etc")
    store = LimitsStore(limits_file)
    assert store.poll() is not None
    assert store.read_admin_group() is None
    limits_file.touch()  # a reload of the same text, the same members: no change either
    assert store.poll() is None


async def test_an_edit_whose_changes_cannot_be_told_still_goes_out_as_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Whatever fails in telling what an edit changed, the edit applies and a change
    goes out, of every unlisted user: the services that keep answers drop them all,
    instead of keeping the old ones (a removed admin's included) until their resync."""
    limits_file = write_config(tmp_path / "etc")
    store = LimitsStore(limits_file)
    store._loop = asyncio.get_running_loop()  # as run() sets it
    assert store.poll() is not None
    await asyncio.sleep(0.05)  # the first load's change is delivered: not awaited below

    def broken(*_args: object) -> None:
        raise RuntimeError("a bug in comparing configurations")

    monkeypatch.setattr(store_module, "changed_users", broken)
    with store.subscribe() as changes:
        limits_file.write_text(
            limits_file.read_text().replace(
                "max_containers_per_user: 3", "max_containers_per_user: 4"
            )
        )
        change = store.poll()
        assert change is not None and change.default_users_changed
        assert await asyncio.wait_for(changes.get(), 2) == change
        assert store.config is not None and store.config.digest == change.digest


async def test_a_failed_round_of_reading_does_not_end_the_reloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Reloads (and admin-group readings) go on after a round that failed: one error
    must not leave the service on its last configuration, and its admins, for good."""
    store = LimitsStore(write_config(tmp_path / "etc"))
    real, rounds = store.poll, []

    def failing_once() -> object:
        rounds.append(None)
        if len(rounds) == 1:
            raise OSError("the disk hiccuped")
        return real()

    monkeypatch.setattr(store, "poll", failing_once)
    reading = asyncio.ensure_future(store.run(interval=0.05))
    try:
        for _ in range(100):
            if store.config is not None:
                break
            await asyncio.sleep(0.05)
        assert store.config is not None and len(rounds) > 1
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading


async def test_a_change_stream_to_a_service_gone_silent_ends_and_nothing_is_kept(
    tmp_path: Path, pki: Pki, state_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """Answers kept by another process (CachedLimits) are only as fresh as its change
    stream. A limits service cut off without a word (nothing refused, nothing arrives:
    a host powered off) leaves the stream's pings unanswered: it ends, and nothing is
    kept. While the service answers them, a quiet stream stays open (a ping a second
    here, the most gRPC sends; every 20 s in service: the server accepts them)."""
    monkeypatch.setattr(keepalive, "PING_EVERY_MS", 300)
    monkeypatch.setattr(keepalive, "PING_ANSWER_MS", 300)
    limits_file = write_config(tmp_path / "etc")
    config, service = await start_limits(state_dir, limits_file, tmp_path / "ds01.yaml")
    try:
        async with Partition(config.address("limits")) as partition:
            relayed = replace(config, listen={**config.listen, "limits": partition.endpoint})
            cache = CachedLimits(
                Ds01Client(relayed, ClientIdentity(pki.ca_cert, pki.service("containers")))
            )
            following = asyncio.ensure_future(cache.follow_changes())

            async def watching() -> bool:
                return cache._watching

            async def ended() -> bool:
                return not cache._watching

            try:
                assert await eventually(watching)
                await cache.get_limits("alice")
                await asyncio.sleep(5)  # four pings or more, each answered
                assert cache._watching and cache._answers, "a quiet stream was ended"
                partition.cut()
                assert await eventually(ended, timeout=5), "a dead stream went unnoticed"
                assert not cache._answers
            finally:
                following.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await following
                await cache.client.close()
    finally:
        await service.stop(grace=0)


async def test_the_stream_of_a_client_gone_silent_is_let_go(
    tmp_path: Path, pki: Pki, state_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """A service pings the clients of its open calls: the change stream of a client
    gone without a word (its host powered off) no longer holds its subscription, and its
    place among its user's streams, for gRPC's two hours (a minute in service; its
    pings every 0.9 s here)."""
    monkeypatch.setattr(keepalive, "PING_EVERY_MS", 300)
    monkeypatch.setattr(keepalive, "PING_ANSWER_MS", 300)
    limits_file = write_config(tmp_path / "etc")
    config, service = await start_limits(state_dir, limits_file, tmp_path / "ds01.yaml")
    local = service.runtime.context.limits
    assert local is not None
    try:
        async with Partition(config.address("limits")) as partition:
            relayed = replace(config, listen={**config.listen, "limits": partition.endpoint})
            async with Ds01Client(
                relayed, ClientIdentity(pki.ca_cert, pki.service("containers"))
            ) as client:
                stream = client.watch_limits()
                await anext(stream)  # subscribed

                async def subscribed() -> int:
                    return len(local.store._subscribers)

                await asyncio.sleep(3)  # pings both ways, answered
                assert await subscribed() == 1, "a live stream was let go"
                partition.cut()

                async def let_go() -> bool:
                    return await subscribed() == 0

                assert await eventually(let_go, timeout=5), "a silent client's stream stayed"
                with contextlib.suppress(Ds01Error):
                    await stream.aclose()
    finally:
        await service.stop(grace=0)


async def test_a_member_file_for_an_undefined_group_is_refused(env: LimitsEnv):
    stray = env.limits_file.parent / "groups" / "visitors.members"
    stray.write_text("zoe\n")
    async with env.client("root") as root:
        try:

            async def refused():
                return not (await root.validate_config()).valid

            assert await eventually(refused)
            issues = (await root.validate_config()).issues
            assert issues[0].file == str(stray)
            assert "group 'visitors'" in issues[0].message
            assert (await root.get_limits("alice")).group == "researchers"  # still serving
        finally:
            stray.unlink()


async def test_a_service_started_on_a_broken_file_is_not_serving(
    tmp_path: Path, pki: Pki, state_dir: Path
):
    limits_file = tmp_path / "resource-limits.yaml"
    limits_file.write_text("defaults: [\n")
    config = Config(
        state_dir=state_dir,
        listen={s: f"127.0.0.1:{free_port()}" for s in SERVICES},
        limits_file=limits_file,
    )
    service = await start_service(SPEC, ServiceContext(config=config, roles=Roles()))
    try:
        identity = ClientIdentity(pki.ca_cert, pki.client("alice"))
        async with Ds01Client(config, identity) as client:
            with pytest.raises(Ds01Error) as refused:
                await client.get_limits()
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "not valid YAML" in refused.value.message
        async with Ds01Client(config, ClientIdentity(pki.ca_cert, pki.client("root"))) as root:
            watch = root.watch_limits()
            assert (await anext(watch)).digest == ""  # nothing served yet
            told = asyncio.ensure_future(anext(watch))
            limits_file.write_text(RESOURCE_LIMITS)
            change = await asyncio.wait_for(told, 3)
            assert change.default_users_changed and "alice" in change.users
        async with Ds01Client(config, identity) as client:

            async def recovered():
                with contextlib.suppress(Ds01Error):
                    return (await client.get_limits()).group == "students"

            assert await eventually(recovered)
    finally:
        await service.stop(grace=0)


@pytest.mark.parametrize("name", NO_LOGIN_NAMES)
def test_a_name_no_login_has_is_refused_everywhere_names_are_checked(name: str):
    """Certificates, enrollment, limits and adoption all ask is_user_name: a name with a
    last newline (which a pattern's $ lets through) is no login name either."""
    assert not is_user_name(name)
    with pytest.raises(PkiError):
        validate_user_name(name)
