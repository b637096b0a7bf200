"""The containers service on a real private dockerd and etcd, with real Unix users."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import grpc
import pytest
import pytest_asyncio

from ds01.client import Ds01Error
from ds01.containers.adoption import TRUSTED_LABELS, Seen, Slot, container_type_of, gpu_plan
from ds01.containers.lifecycle import ContainerError, CreateRequest
from ds01.core.config import OwnershipConfig
from ds01.core.etcd import connect
from ds01.core.pki import Pki
from ds01.v1 import common_pb2, containers_pb2
from tests.allocator_env import AllocatorEnv, make_env, make_lifecycle
from tests.harness import GID, GROUP, USERS, remove_managed_containers

MiB = 1024 * 1024

LIMITS = textwrap.dedent(
    """\
    defaults:
      max_gpu_equivalents: 1
      max_gpu_slots_per_container: 1
      max_cpus: 1
      memory: 256m
      memory_swap: 256m
      shm_size: 32m
      pids_limit: 128
      max_containers_per_user: 2
      gpu_hold_after_stop: 2s
      priority: 10
      max_tasks: 2048          # DS01: the whole group's tasks
      sigterm_grace_s: 7       # DS01's spelling: seconds a stop waits, then kills
    default_group: students
    groups:
      students:
        aggregate: {memory_max: 1g, memory_high: 768m, cpu_quota: "200%", tasks_max: 512}
    """
)
READ_LIMITS = (
    "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes;"
    " cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max;"
    " df -k /dev/shm | tail -1"
)


@pytest_asyncio.fixture(loop_scope="session")
async def env(
    tmp_path: Path,
    pki: Pki,
    state_dir: Path,
    etcd_endpoint: str,
    docker_socket: Path,
    test_image: str,
    unix_users: dict[str, int],
) -> AsyncIterator[AllocatorEnv]:
    env = await make_env(tmp_path, pki, state_dir, etcd_endpoint, docker_socket, LIMITS)
    yield env
    await env.stop()
    await asyncio.to_thread(remove_managed_containers, docker_socket)
    for user in unix_users:
        shutil.rmtree(Path("/home") / user / "workspace", ignore_errors=True)


def docker_exec(docker_socket: Path, name: str, *command: str, user: str = "") -> str:
    argv = ["docker", "-H", f"unix://{docker_socket}", "exec"]
    argv += ["-u", user] if user else []
    result = subprocess.run([*argv, name, *command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def name_inside(docker_socket: Path, container: str) -> str:
    """`whoami` inside, as ds01alice's uid and the lab group, as `mlc open` runs it."""
    user = f"{USERS['ds01alice']}:{GID}"
    who = await asyncio.to_thread(docker_exec, docker_socket, container, "whoami", user=user)
    return who.strip()


async def test_the_full_lifecycle(env: AllocatorEnv, docker_socket: Path, test_image: str):
    async with env.client("ds01alice") as alice:
        created = await alice.create_container("proj", test_image, gpus=1, start=True)
        assert created.docker_name == "proj._.ds01alice"
        assert created.state == containers_pb2.CONTAINER_STATE_RUNNING
        assert [g.slot.slot_id for g in created.gpus] == ["2:1"]
        assert created.gpus[0].state == common_pb2.SLOT_STATE_ALLOCATED
        assert created.gpus[0].slot.uuid == "MIG-0002-1"
        name = created.docker_name

        # Limits, read from inside the container.
        memory, pids, shm = (
            await asyncio.to_thread(docker_exec, docker_socket, name, "sh", "-c", READ_LIMITS)
        ).splitlines()
        assert int(memory) == 256 * MiB and pids.strip() == "128"
        assert shm.split()[1] == str(32 * 1024)  # /dev/shm size in KiB
        # The user exists inside with the host uid, gid and names: no "I have no name!".
        who = await asyncio.to_thread(
            docker_exec,
            docker_socket,
            name,
            "sh",
            "-c",
            "id; whoami; pwd",
            user=f"{USERS['ds01alice']}:{GID}",
        )
        assert who.splitlines() == [
            f"uid={USERS['ds01alice']}(ds01alice) gid={GID}({GROUP}) groups={GID}({GROUP})",
            "ds01alice",
            "/workspace",
        ]
        env_vars = await asyncio.to_thread(docker_exec, docker_socket, name, "env")
        assert "CUDA_VISIBLE_DEVICES=MIG-0002-1" in env_vars
        assert "NVIDIA_VISIBLE_DEVICES=MIG-0002-1" in env_vars

        stopped = await alice.stop_container("proj")
        assert stopped.state == containers_pb2.CONTAINER_STATE_STOPPED
        held = {a.slot.slot_id: a for a in (await alice.gpu_status()).allocations}["2:1"]
        assert held.state == common_pb2.SLOT_STATE_HELD and held.container == name
        # The answers show each call's outcome as the allocator's status does.
        assert [(g.slot.slot_id, g.state) for g in stopped.gpus] == [("2:1", held.state)]
        assert stopped.gpus[0].hold_until == held.hold_until

        started = await alice.start_container("proj")
        assert started.state == containers_pb2.CONTAINER_STATE_RUNNING
        running = {a.slot.slot_id: a for a in (await alice.gpu_status()).allocations}["2:1"]
        assert running.state == common_pb2.SLOT_STATE_ALLOCATED
        assert [(g.slot.slot_id, g.state) for g in started.gpus] == [("2:1", running.state)]

        await alice.remove_container("proj")
        assert await alice.list_containers() == []
        free = {a.slot.slot_id: a for a in (await alice.gpu_status()).allocations}["2:1"]
        assert free.state == common_pb2.SLOT_STATE_FREE

    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    try:
        assert not client.containers.list(all=True, filters={"name": name})
    finally:
        client.close()


async def test_each_user_of_one_image_is_named_in_their_own_container_only(
    env: AllocatorEnv, docker_socket: Path, test_image: str
):
    """The image's own /etc/passwd is read once and kept: every later container of the
    image must still get its own user's names, and never an earlier user's."""
    made = {}
    for user in ("ds01alice", "ds01bob", "ds01alice"):
        async with env.client(user) as client:
            name = f"named{len(made)}"
            created = await client.create_container(name, test_image, start=True)
            made[name] = (user, created.docker_name)
    for user, container in made.values():
        other = "ds01bob" if user == "ds01alice" else "ds01alice"
        passwd = await asyncio.to_thread(
            docker_exec, docker_socket, container, "cat", "/etc/passwd"
        )
        group = await asyncio.to_thread(docker_exec, docker_socket, container, "cat", "/etc/group")
        names = [line.split(":")[0] for line in passwd.splitlines()]
        assert names.count(user) == 1 and other not in names, passwd
        assert f"{GROUP}:x:{GID}:" in group
        assert "root" in names  # the image's own accounts stay


async def test_labels_follow_ds01_and_mlc_conventions(
    env: AllocatorEnv, docker_socket: Path, test_image: str
):
    async with env.client("ds01alice") as alice:
        await alice.create_container("labels", test_image, gpus=1)
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    try:
        container = client.containers.get("labels._.ds01alice")
        labels = container.labels
        host_config = container.attrs["HostConfig"]
    finally:
        client.close()
    assert labels["ds01.user"] == labels["aime.mlc.USER"] == labels["aime.mlc"] == "ds01alice"
    assert labels["ds01.managed"] == "true" and labels["aime.mlc.NAME"] == "labels"
    assert labels["aime.mlc.WORK_MOUNT"] == "/home/ds01alice/workspace/labels"
    assert not any("," in value for value in labels.values())
    assert host_config["CgroupParent"] == "/ds01/students/ds01alice"
    # The user's slice carries the aggregate limits, written by the service (cgroupfs).
    unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    memory = Path("/sys/fs/cgroup") / ("" if unified else "memory") / "ds01/students/ds01alice"
    limit = (memory / ("memory.max" if unified else "memory.limit_in_bytes")).read_text()
    assert int(limit) == 1024 * MiB
    high = (memory / ("memory.high" if unified else "memory.soft_limit_in_bytes")).read_text()
    assert int(high) == 768 * MiB
    cpu = Path("/sys/fs/cgroup") / ("" if unified else "cpu") / "ds01/students/ds01alice"
    quota = (
        (cpu / "cpu.max").read_text().split()[0]
        if unified
        else (cpu / "cpu.cfs_quota_us").read_text()
    )
    assert int(quota) == 200_000  # "200%": two CPUs for all of alice's containers
    pids = Path("/sys/fs/cgroup") / ("" if unified else "pids") / "ds01/students"
    assert int((pids / "pids.max").read_text()) == 2048  # max_tasks, on the group
    assert int((pids / "ds01alice" / "pids.max").read_text()) == 512  # aggregate tasks_max
    assert host_config["NanoCpus"] == 1_000_000_000 and host_config["PidsLimit"] == 128
    etcd = connect(env.config, "containers")
    lifecycle = make_lifecycle(env, docker_socket, etcd)
    try:
        record = await lifecycle.metadata.get("labels._.ds01alice")
        assert record and await lifecycle.grace(record) == 7  # sigterm_grace_s: stops wait
    finally:
        await lifecycle.client.close()
        await lifecycle.docker.close()
        await etcd.close()


async def test_a_stopped_containers_gpu_hold_expires_and_start_says_so(
    env: AllocatorEnv, test_image: str
):
    async with env.client("ds01alice") as alice:
        await alice.create_container("hold", test_image, gpus=1, start=True)
        await alice.stop_container("hold", grace_seconds=1)
        await asyncio.sleep(3.5)  # gpu_hold_after_stop is 2s
        with pytest.raises(Ds01Error) as refused:
            await alice.start_container("hold")
        await alice.remove_container("hold")
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "Its GPU hold has ended" in refused.value.message


async def test_users_cannot_touch_each_others_containers(env: AllocatorEnv, test_image: str):
    async with env.client("ds01alice") as alice, env.client("ds01bob") as bob:
        await alice.create_container("mine", test_image)
        for call in (
            bob.stop_container("mine._.ds01alice"),
            bob.remove_container("mine._.ds01alice"),
            bob.get_container("mine._.ds01alice"),
            bob.list_containers(user="ds01alice"),
        ):
            with pytest.raises(Ds01Error) as refused:
                await call
            assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert await bob.list_containers() == []
        await alice.remove_container("mine")


async def test_limits_on_count_images_and_names_are_explained(env: AllocatorEnv, test_image: str):
    async with env.client("ds01alice") as alice:
        with pytest.raises(Ds01Error) as missing:
            await alice.create_container("x", "no-such-image:1")
        await alice.create_container("one", test_image)
        await alice.create_container("two", test_image)
        with pytest.raises(Ds01Error) as too_many:
            await alice.create_container("three", test_image)
        with pytest.raises(Ds01Error) as twice:
            await alice.create_container("two", test_image)
        with pytest.raises(Ds01Error) as bad_name:
            await alice.create_container("../etc", test_image)
        for name in ("one", "two"):
            await alice.remove_container(name)
    assert missing.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "image no-such-image:1 is not on this host" in missing.value.message
    assert too_many.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ds01alice has 2 of 2 containers" in too_many.value.message
    assert twice.value.code in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert bad_name.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_docker_gets_the_workspace_with_no_symlink_left_to_follow(
    env: AllocatorEnv, docker_socket: Path, test_image: str
):
    """A workspace given through a symlink (inside the home) is mounted by its real
    path, so that swapping the link later changes nothing Docker mounts."""
    home = Path("/home/ds01alice")
    real, link = home / "real-ws", home / "link-ws"
    real.mkdir(exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(real)
    try:
        async with env.client("ds01alice") as alice:
            await alice.create_container("linked", test_image, workspace=str(link))
            client = docker.DockerClient(base_url=f"unix://{docker_socket}")
            try:
                mounts = client.containers.get("linked._.ds01alice").attrs["Mounts"]
            finally:
                client.close()
            await alice.remove_container("linked")
        assert [m["Source"] for m in mounts if m["Destination"] == "/workspace"] == [str(real)]
    finally:
        link.unlink(missing_ok=True)
        real.rmdir()


async def test_a_workspace_outside_the_users_home_is_refused(env: AllocatorEnv, test_image: str):
    async with env.client("ds01alice") as alice:
        with pytest.raises(Ds01Error) as refused:
            await alice.create_container("escape", test_image, workspace="/etc")
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "/etc is outside ds01alice's home" in refused.value.message


@pytest.mark.parametrize("step", ["allocate", "cgroup", "create", "metadata", "start"])
async def test_a_failure_at_any_create_step_leaves_nothing_behind(
    env: AllocatorEnv, docker_socket: Path, test_image: str, etcd_endpoint: str, step: str
):
    """The domain, driven directly on the real Docker, etcd and services, with one step
    made to fail."""
    etcd = connect(env.config, "containers")
    lifecycle = make_lifecycle(env, docker_socket, etcd)
    target, method = {
        "allocate": (lifecycle.client, "allocate"),
        "cgroup": (lifecycle.cgroups, "ensure"),
        "create": (lifecycle.docker, "create"),
        "metadata": (lifecycle.intents, "commit"),
        "start": (lifecycle.docker, "start"),
    }[step]

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"injected failure in {step}")

    async def fail_async(*args: object, **kwargs: object) -> None:
        fail()

    setattr(target, method, fail if step == "cgroup" else fail_async)
    request = CreateRequest(user="ds01alice", name="doomed", image=test_image, gpus=1, start=True)
    try:
        with pytest.raises(ContainerError) as failed:
            await lifecycle.create(request)
        assert f"injected failure in {step}" in failed.value.message
        assert failed.value.message.endswith("nothing was left behind")
        assert await lifecycle.metadata.all() == []
        assert await lifecycle.intents.all() == []
        async with env.client("ds01alice") as alice:
            slots = (await alice.gpu_status()).allocations
        assert all(a.state == common_pb2.SLOT_STATE_FREE for a in slots)
        assert await lifecycle.docker.find("doomed._.ds01alice") is None
        assert not Path("/home/ds01alice/workspace/doomed").exists()
    finally:
        await lifecycle.client.close()
        await lifecycle.docker.close()
        await etcd.close()


async def test_the_cli_runs_lists_stops_and_removes(env: AllocatorEnv, test_image: str):
    run = await env.cli("ds01bob", "container", "run", "web", "--image", test_image, "--gpus", "1")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"web._.ds01bob: running, n1/2:1, image {test_image}"
    listed = await env.cli("ds01bob", "container", "list")
    assert listed.stdout.splitlines()[1].split()[:4] == ["web", "ds01bob", "running", "2:1"]
    stop = await env.cli("ds01bob", "container", "stop", "web", "--grace", "1")
    assert stop.stdout.strip().startswith("web._.ds01bob: stopped")
    denied = await env.cli("ds01alice", "container", "remove", "web._.ds01bob")
    assert denied.returncode == 1 and "belongs to ds01bob [PERMISSION_DENIED]" in denied.stderr
    removed = await env.cli("ds01bob", "container", "remove", "web")
    assert removed.stdout.strip() == "removed web"


async def test_nothing_in_the_container_acts_as_root_on_the_users_files(
    env: AllocatorEnv, docker_socket: Path, test_image: str
):
    async with env.client("ds01alice") as alice:
        await alice.create_container("safe", test_image, start=True)
        name = "safe._.ds01alice"
        # A plain `docker exec` is the user, not root.
        uid = await asyncio.to_thread(docker_exec, docker_socket, name, "id", "-u")
        assert uid.strip() == str(USERS["ds01alice"])
        # Even an exec as uid 0 has no capabilities: the user's workspace is out of reach,
        # so no root-owned or setuid file can be planted in the home.
        result = await asyncio.to_thread(
            subprocess.run,
            [
                "docker",
                "-H",
                f"unix://{docker_socket}",
                "exec",
                "-u",
                "0",
                name,
                "sh",
                "-c",
                "touch /workspace/rootsh && chmod 4755 /workspace/rootsh",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert not Path("/home/ds01alice/workspace/safe/rootsh").exists()
        await alice.remove_container("safe")


async def test_a_workspace_turned_into_a_symlink_after_create_is_not_mounted(
    env: AllocatorEnv, test_image: str
):
    async with env.client("ds01alice") as alice:
        await alice.create_container("swap", test_image)
        workspace = Path("/home/ds01alice/workspace/swap")
        workspace.rmdir()
        workspace.symlink_to("/etc")  # what a user could do between create and start
        try:
            with pytest.raises(Ds01Error) as refused:
                await alice.start_container("swap")
        finally:
            workspace.unlink()
            await alice.remove_container("swap")
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "leads outside ds01alice's home" in refused.value.message


async def test_parallel_creates_of_one_user_respect_the_count_and_the_name(
    env: AllocatorEnv, test_image: str
):
    async with env.client("ds01bob") as bob:
        results = await asyncio.gather(
            *(bob.create_container(f"p{i}", test_image) for i in range(4)),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, Exception) for r in results) == 2  # max_containers: 2
        for container in await bob.list_containers():
            await bob.remove_container(container.name)
        twins = await asyncio.gather(
            *(bob.create_container("twin", test_image, gpus=1) for _ in range(2)),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, Exception) for r in twins) == 1
        slots = {a.container: a.state for a in (await bob.gpu_status()).allocations}
        assert slots.get("twin._.ds01bob") == common_pb2.SLOT_STATE_ALLOCATED  # kept
        await bob.remove_container("twin")


HOSTILE_SH = (  # leaves a mark of whoever ran it; run as root, a setuid root shell
    "#!/bin/busybox sh\n"
    "me=$(/bin/busybox id -u)\n"
    "/bin/busybox touch /workspace/drop/ran-as-$me 2>/dev/null\n"
    'if [ "$me" = 0 ]; then /bin/busybox cp /bin/busybox /workspace/drop/rootshell; '
    "/bin/busybox chmod 4755 /workspace/drop/rootshell; fi\n"
    'exec /bin/busybox sh "$@"\n'
)


async def test_no_program_of_the_image_runs_as_root_and_names_outlive_a_restart(
    env: AllocatorEnv, docker_socket: Path, test_image: str, unix_users: dict[str, int]
):
    """An image whose /bin/sh plants a setuid copy of itself in /workspace: run by ds01,
    it runs only as the user (the names are written with the archive API, not by a shell
    as root), and a start by anyone else (`mlc start`) still finds the user named."""
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    try:  # the test image, with /bin/sh replaced by the script above
        maker = client.containers.create(test_image, "true", network_mode="none")
        script = io.BytesIO()
        with tarfile.open(fileobj=script, mode="w") as tar:
            info = tarfile.TarInfo("sh")
            info.size, info.mode = len(HOSTILE_SH), 0o755
            tar.addfile(info, io.BytesIO(HOSTILE_SH.encode()))
        assert maker.put_archive("/bin", script.getvalue())
        maker.commit("ds01-test/hostile")
        maker.remove()
    finally:
        client.close()
    workspace = Path("/home/ds01alice/workspace/evil")
    drop = workspace / "drop"  # the user's own: writable by anyone, root without capabilities too
    drop.mkdir(parents=True, exist_ok=True)
    for path in (workspace.parent, workspace, drop):
        shutil.chown(path, "ds01alice", GROUP)
    drop.chmod(0o777)
    async with env.client("ds01alice") as alice:
        await alice.create_container("evil", "ds01-test/hostile", start=True)
        await asyncio.sleep(1)
        ran = sorted(p.name for p in drop.glob("ran-as-*"))
        assert ran == [f"ran-as-{unix_users['ds01alice']}"]  # the image's code ran: as alice
        assert not (drop / "rootshell").exists()
        for path in Path("/home/ds01alice").rglob("*"):
            assert path.lstat().st_uid != 0, f"{path} is root's"
        await alice.stop_container("evil")
        subprocess.run(  # as `mlc start` would: straight to Docker, no ds01 in between
            ["docker", "-H", f"unix://{docker_socket}", "start", "evil._.ds01alice"], check=True
        )
        assert await name_inside(docker_socket, "evil._.ds01alice") == "ds01alice"
        await alice.remove_container("evil")


async def test_an_image_without_etc_still_gets_its_user_named(
    env: AllocatorEnv, docker_socket: Path, test_image: str, unix_users: dict[str, int]
):
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    try:  # the test image without /etc at all
        maker = client.containers.create(test_image, "true", network_mode="none")
        exported = b"".join(maker.export())
        maker.remove()
        kept = io.BytesIO()
        with (
            tarfile.open(fileobj=io.BytesIO(exported)) as source,
            tarfile.open(fileobj=kept, mode="w") as tar,
        ):
            for member in source:
                if member.name.lstrip("./").startswith("etc"):
                    continue
                tar.addfile(member, source.extractfile(member) if member.isfile() else None)
        client.api.import_image_from_data(kept.getvalue(), repository="ds01-test/noetc", tag="1")
    finally:
        client.close()
    async with env.client("ds01alice") as alice:
        await alice.create_container("bare", "ds01-test/noetc:1", start=True)
        assert await name_inside(docker_socket, "bare._.ds01alice") == "ds01alice"
        await alice.remove_container("bare")


async def test_the_users_names_live_in_files_of_the_host_that_go_with_the_container(
    env: AllocatorEnv, docker_socket: Path, test_image: str, unix_users: dict[str, int]
):
    """The container's /etc/passwd and /etc/group are files ds01 keeps on the host for
    it, mounted read-only: nothing is written into the container. If they go, the Docker
    gateway's start says how to mend it, and ds01's start writes them anew; they go with
    the container, whether ds01 removes it or Docker does behind ds01's back."""
    files = env.config.state_dir / "accounts" / "names._.ds01alice"
    async with docker_gateway(env) as gateway:
        async with env.client("ds01alice") as alice:
            await alice.create_container("names", test_image, start=True)
            passwd = (files / "passwd").read_text()
            assert f"ds01alice:x:{unix_users['ds01alice']}:{GID}:" in passwd
            assert passwd.startswith("root:")  # the image's own accounts stay
            for path in (files, files / "passwd", files / "group"):
                assert (path.stat().st_uid, path.stat().st_mode & 0o022) == (0, 0), path
            inside = await asyncio.to_thread(
                docker_exec, docker_socket, "names._.ds01alice", "cat", "/etc/passwd"
            )
            assert inside == passwd
            write = await asyncio.to_thread(
                subprocess.run,
                ["docker", "-H", f"unix://{docker_socket}", "exec", "-u", "0",
                 "names._.ds01alice", "sh", "-c", "echo x >> /etc/passwd"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert write.returncode != 0 and "Read-only" in write.stderr, write
            await alice.stop_container("names")
            shutil.rmtree(files)  # a state directory wiped
            started = await gateway_start(gateway, "ds01alice", "names._.ds01alice")
            assert started.returncode != 0 and "ds01 container start" in started.stderr, started
            await alice.start_container("names")  # writes them anew
            assert await name_inside(docker_socket, "names._.ds01alice") == "ds01alice"
            await alice.remove_container("names")
            assert not files.exists()
            await alice.create_container("names", test_image, start=True)
            assert files.is_dir()
        await asyncio.to_thread(  # behind ds01's back: its reconciler notices
            subprocess.run,
            ["docker", "-H", f"unix://{docker_socket}", "rm", "-f", "names._.ds01alice"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        for _ in range(100):
            if not files.exists():
                break
            await asyncio.sleep(0.1)
        assert not files.exists()


async def test_a_renamed_container_keeps_its_account_files_as_its_own(
    env: AllocatorEnv, docker_socket: Path, test_image: str, unix_users: dict[str, int]
):
    """A `docker rename` through the gateway leaves the container's binds of its account
    files (named after the name ds01 made it under) its own: ds01 and the gateway both
    still start it, and ds01 writes them anew under that name if they have gone."""
    files = env.config.state_dir / "accounts" / "named._.ds01alice"
    async with docker_gateway(env) as gateway, env.client("ds01alice") as alice:
        await alice.create_container("named", test_image)
        renamed = await asyncio.to_thread(
            subprocess.run,
            ["runuser", "-u", "ds01alice", "--", "docker", "-H", gateway, "rename",
             "named._.ds01alice", "moved._.ds01alice"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert renamed.returncode == 0, renamed
        started = await gateway_start(gateway, "ds01alice", "moved._.ds01alice")
        assert started.returncode == 0, started
        assert await name_inside(docker_socket, "moved._.ds01alice") == "ds01alice"
        await alice.stop_container("named")  # ds01 knows it by the name it made it under
        shutil.rmtree(files)
        await alice.start_container("named")
        assert (files / "passwd").is_file()
        assert await name_inside(docker_socket, "moved._.ds01alice") == "ds01alice"
        await alice.remove_container("named")
        assert not files.exists()


@pytest.mark.parametrize(
    ("variant", "bind", "refused"),
    [
        ("its own files, read-only", "forged._.ds01alice/passwd:/etc/passwd:ro", ""),
        ("its own files, writable", "forged._.ds01alice/passwd:/etc/passwd", "outside"),
        ("another's files", "other._.ds01alice/passwd:/etc/passwd:ro", "outside"),
        ("its own directory", "forged._.ds01alice:/mnt:ro", "outside"),
    ],
)
async def test_the_gateway_lets_only_a_containers_own_account_files_through_as_ds01_binds_them(
    env: AllocatorEnv, docker_socket: Path, test_image: str, variant: str, bind: str, refused: str
):
    """A container whose labels name it a ds01 create's (as an adopted one's may) has
    its own account files let through at a gateway start only as ds01 binds them: that
    very file, read-only. Anything else of the accounts directory is a bind outside the
    home, refused."""
    accounts = env.config.state_dir / "accounts"
    async with docker_gateway(env) as gateway, env.client("ds01alice") as alice:
        await alice.create_container("forged", test_image)
        await alice.create_container("other", test_image)
        try:
            await asyncio.to_thread(
                subprocess.run,
                ["docker", "-H", f"unix://{docker_socket}", "create", "--name",
                 "rogue._.ds01alice", "--label", "ds01.managed=true",
                 "--label", "ds01.user=ds01alice", "--label", "ds01.name=forged",
                 "--network", "none", "-v", f"{accounts}/{bind}", test_image,
                 "sleep", "600"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            started = await gateway_start(gateway, "ds01alice", "rogue._.ds01alice")
            if refused:
                assert started.returncode != 0 and refused in started.stderr, (variant, started)
            else:
                assert started.returncode == 0, (variant, started)
        finally:
            await asyncio.to_thread(
                subprocess.run,
                ["docker", "-H", f"unix://{docker_socket}", "rm", "-f", "rogue._.ds01alice"],
                capture_output=True, timeout=60,
            )  # fmt: skip
            for name in ("forged", "other"):
                await alice.remove_container(name)


def _member(name: str, text: str = "", link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    if link:
        info.type, info.linkname = tarfile.SYMTYPE, link
        return info, b""
    data = text.encode()
    info.size, info.mode = len(data), 0o644
    return info, data


# Over 2 MiB of accounts (Docker itself reads the file at start: lines of a sane length).
HUGE = "root:x:0:0:root:/root:/bin/sh\n" + "".join(
    f"user{n}:x:{100000 + n}:{100000 + n}::/nonexistent:/bin/false\n" for n in range(50_000)
)


@pytest.mark.parametrize(
    ("variant", "members"),
    [
        ("huge-passwd", [_member("etc/passwd", HUGE)]),
        ("huge-group", [_member("etc/group", HUGE)]),
        ("passwd-a-symlink", [_member("etc/passwd", link="/etc/hostname")]),
    ],
)
async def test_an_image_whose_account_files_are_odd_is_used_but_never_copied(
    env: AllocatorEnv,
    docker_socket: Path,
    test_image: str,
    variant: str,
    members: list[tuple[tarfile.TarInfo, bytes]],
):
    """A user's image decides what its /etc/passwd is: megabytes of it would be read into
    the service's memory and copied to the host for each of its containers; a symlink
    would lead elsewhere. Such an image is used as it is: its users stay unnamed, and
    nothing of it is copied."""
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    image = f"ds01-test/odd-accounts:{variant}"
    try:
        maker = client.containers.create(test_image, "true", network_mode="none")
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            for info, data in members:
                tar.addfile(info, io.BytesIO(data))
        assert maker.put_archive("/", archive.getvalue())
        maker.commit(*image.split(":"))
        maker.remove()
    finally:
        client.close()
    async with env.client("ds01alice") as alice:
        made = await alice.create_container("odd", image, start=True)
        try:
            assert made.state == containers_pb2.CONTAINER_STATE_RUNNING
            assert not (env.config.state_dir / "accounts" / "odd._.ds01alice").exists()
        finally:
            await alice.remove_container("odd")


async def test_a_slot_belongs_to_one_container(
    env: AllocatorEnv, docker_socket: Path, test_image: str, unix_users: dict[str, int]
):
    """While a container exists, its user cannot free the GPU under it; once an admin
    does, the container starts neither through ds01 nor through the Docker gateway, and the
    next container to get the slot is the only one with it."""
    async with (
        docker_gateway(env) as gateway,
        env.client("ds01alice") as alice,
        env.client("root") as admin,
    ):
        made = await alice.create_container("gpu1", test_image, gpus=1, start=True)
        slot = made.gpus[0].slot.slot_id
        with pytest.raises(Ds01Error) as refused:
            await alice.release("gpu1._.ds01alice")
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "ds01 container remove gpu1" in refused.value.message
        await alice.stop_container("gpu1")
        [held] = (await alice.get_container("gpu1")).gpus
        assert (held.slot.slot_id, held.state) == (slot, common_pb2.SLOT_STATE_HELD)
        assert await admin.release("gpu1._.ds01alice")  # an admin may
        [listed] = [c for c in await alice.list_containers() if c.name == "gpu1"]
        assert list(listed.gpus) == []  # its hold ended: no GPU shown any more
        with pytest.raises(Ds01Error) as again:
            await alice.start_container("gpu1")
        assert again.value.code in (
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.NOT_FOUND,
        )
        started = await gateway_start(gateway, "ds01alice", "gpu1._.ds01alice")
        assert started.returncode != 0 and "no longer its own" in started.stderr, started
        async with env.client("ds01bob") as bob:  # the freed slot goes to bob
            taken = await bob.create_container("bobs", test_image, gpus=1, start=True)
            assert taken.gpus[0].slot.slot_id == slot
            with pytest.raises(Ds01Error) as moved:
                await alice.start_container("gpu1")
            assert "now belongs to another container" in moved.value.message
            assert "bob" not in moved.value.message  # nothing of another user's
            await bob.remove_container("bobs")
        other = await alice.create_container("gpu2", test_image, gpus=1, start=True)
        assert other.gpus[0].slot.slot_id == slot
        holders = [
            a.container
            for a in (await admin.gpu_status()).allocations
            if a.slot.slot_id == slot and a.container
        ]
        assert holders == ["gpu2._.ds01alice"]
        await alice.remove_container("gpu2")
        await alice.remove_container("gpu1")


async def gateway_start(gateway: str, user: str, container: str) -> subprocess.CompletedProcess:
    """`docker start` through the gateway, as ``user`` (`mlc start` does the same)."""
    argv = ["runuser", "-u", user, "--", "docker", "-H", gateway, "start", container]
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60)


@contextlib.asynccontextmanager
async def docker_gateway(env: AllocatorEnv) -> AsyncIterator[str]:
    """The ownership service with its Docker gateway, for this test alone: its -H URL."""
    run = Path(tempfile.mkdtemp(prefix="ds01-gateway-", dir="/tmp"))
    run.chmod(0o755)
    env.config = dataclasses.replace(
        env.config,
        ownership=OwnershipConfig(
            enroll_socket=run / "enroll.sock", proxy_socket=run / "docker.sock"
        ),
    )
    await env.start("ownership")
    try:
        yield f"unix://{run / 'docker.sock'}"
    finally:
        await env.stop("ownership")
        shutil.rmtree(run, ignore_errors=True)


# One error vocabulary: each failure, the status code and the sentence a user gets.
VOCABULARY = [
    (
        "an oversized name",
        lambda alice, image: alice.create_container("x" * 300, image),
        grpc.StatusCode.INVALID_ARGUMENT,
        "request refused: name is 300 characters long; at most 256 are allowed",
    ),
    (
        "a name Docker cannot take",
        lambda alice, image: alice.create_container("my proj", image),
        grpc.StatusCode.INVALID_ARGUMENT,
        "create failed while checking the container name: ",
    ),
    (
        "an image that is not there",
        lambda alice, image: alice.create_container("ok", "nosuch/image:1"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "create failed while checking the image: image nosuch/image:1 is not on this host",
    ),
    (
        "an unknown slot preference",
        lambda alice, image: alice.allocate("p._.ds01alice", preference=99),
        grpc.StatusCode.INVALID_ARGUMENT,
        "preference 99 is not one of SLOT_PREFERENCE_UNSPECIFIED",
    ),
    (
        "a GPU for another user's name",
        lambda alice, image: alice.allocate("job._.ds01bob"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "container 'job._.ds01bob' must be named <name>._.ds01alice",
    ),
    (
        "a container that does not exist",
        lambda alice, image: alice.start_container("nosuch"),
        grpc.StatusCode.NOT_FOUND,
        "no container nosuch (`ds01 container list`)",
    ),
    (
        "another user's containers",
        lambda alice, image: alice.list_containers(all_users=True),
        grpc.StatusCode.PERMISSION_DENIED,
        "only admins may list other users' containers",
    ),
]


@pytest.mark.parametrize(
    ("failure", "call", "code", "sentence"), VOCABULARY, ids=[row[0] for row in VOCABULARY]
)
async def test_each_failure_has_its_code_and_sentence(
    env: AllocatorEnv, test_image: str, failure: str, call, code, sentence: str
):
    async with env.client("ds01alice") as alice:
        with pytest.raises(Ds01Error) as error:
            await call(alice, test_image)
    assert error.value.code == code, error.value
    assert error.value.message.startswith(sentence), error.value.message
    assert "Traceback" not in error.value.message and "Error:" not in error.value.message


async def test_a_service_that_does_not_answer_is_named(env: AllocatorEnv, test_image: str):
    """Limits stopped: the allocator says that limits did not answer (before the user's
    own deadline); containers stopped: the client says it cannot reach containers."""
    await env.stop("allocator")  # in a process of its own: it asks limits over gRPC
    await env.start("allocator")
    await env.stop("limits")
    try:
        async with env.client("ds01alice") as alice:
            with pytest.raises(Ds01Error) as limits_down:
                await alice.allocate("w._.ds01alice")
        assert limits_down.value.code == grpc.StatusCode.UNAVAILABLE
        assert limits_down.value.message.startswith(
            "the limits service did not answer: the limits service did not answer within 5s"
        ), limits_down.value.message
    finally:
        await env.start("limits")
    await env.stop("containers")
    try:
        async with env.client("ds01alice") as alice:
            with pytest.raises(Ds01Error) as containers_down:
                await alice.create_container("c", test_image)
        assert containers_down.value.code == grpc.StatusCode.UNAVAILABLE
        assert containers_down.value.message.startswith(
            f"cannot reach the containers service at {env.config.address('containers')}"
        )
    finally:
        await env.start("containers")


async def test_a_caller_that_hangs_up_never_leaves_half_a_container(
    env: AllocatorEnv, docker_socket: Path, test_image: str
):
    """Creates and removes whose callers give up after a fraction of a second run to
    their end anyway: afterwards every name has both its record and its container, or
    neither."""
    from ds01.client import ClientIdentity, Ds01Client

    env.client("ds01alice")  # issues her certificate
    identity = ClientIdentity(env.pki.ca_cert, env.pki.client("ds01alice"))
    names = ("hang1", "hang2")
    async with Ds01Client(env.config, identity, timeout=0.05) as hasty:
        await hasty.call("containers", lambda channel: channel.channel_ready())
        for name in names:
            with pytest.raises(Ds01Error) as gave_up:
                await hasty.create_container(name, test_image, gpus=1, start=True)
            assert gave_up.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(5)  # the creates run to their end on their own
    async with (
        env.client("ds01alice") as alice,
        Ds01Client(env.config, identity, timeout=0.05) as hasty,
    ):
        made = {c.name: c for c in await alice.list_containers()}
        for name in names:
            assert made[name].state == containers_pb2.CONTAINER_STATE_RUNNING, made
            assert await env_docker_find(docker_socket, f"{name}._.ds01alice")
        await hasty.call("containers", lambda channel: channel.channel_ready())
        # A remove takes Docker less than the deadline: Docker is held still meanwhile,
        # so that each remove is in its hands when its caller gives up.
        dockerd = int((docker_socket.parent / "docker.pid").read_text())
        os.kill(dockerd, signal.SIGSTOP)
        try:
            for name in names:
                with pytest.raises(Ds01Error) as gave_up:
                    await hasty.remove_container(name)
                assert gave_up.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            os.kill(dockerd, signal.SIGCONT)
        await asyncio.sleep(5)  # and the removes too
        listed = {c.name for c in await alice.list_containers()}
        assert not listed & set(names)
        for name in names:
            assert not await env_docker_find(docker_socket, f"{name}._.ds01alice")
        held = [a for a in (await alice.gpu_status()).allocations if a.user == "ds01alice"]
        assert held == []


async def env_docker_find(docker_socket: Path, name: str) -> bool:
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    try:
        return bool(client.containers.list(all=True, filters={"name": f"^{name}$"}))
    finally:
        client.close()


async def test_an_images_own_labels_and_gpu_environment_never_speak_for_a_ds01_container(
    env: AllocatorEnv, docker_socket: Path, test_image: str
):
    """A user's image may carry DS01's GPU, type and protection labels and a GPU
    environment: the container ds01 makes from it has none of them."""
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    claims = " ".join(f"{key}=GPU-0000" for key in TRUSTED_LABELS if key != "ds01.protected")
    dockerfile = (
        f"FROM {test_image}\nLABEL {claims} ds01.protected=true\n"
        "ENV NVIDIA_VISIBLE_DEVICES=all CUDA_VISIBLE_DEVICES=0\n"
    )
    image, _ = await asyncio.to_thread(  # off the loop that serves ds01 in this test
        client.images.build,
        fileobj=io.BytesIO(dockerfile.encode()),
        tag="ds01alice/claims:latest",
        rm=True,
    )
    try:
        async with env.client("ds01alice") as alice:
            made = await alice.create_container("claims", image.id, start=True)
        container = await asyncio.to_thread(client.containers.get, made.docker_name)
        labels = container.labels
        assert {key: labels[key] for key in TRUSTED_LABELS} == dict.fromkeys(TRUSTED_LABELS, "")
        seen = Seen.of(container.attrs)
        assert gpu_plan(seen, [Slot("0", "GPU-0000")], None) == ([], [])
        assert container_type_of(labels, container.name) == ""
        inside = await asyncio.to_thread(docker_exec, docker_socket, made.docker_name, "env")
        assert "NVIDIA_VISIBLE_DEVICES=void" in inside.splitlines()
        assert "CUDA_VISIBLE_DEVICES=" in inside.splitlines()
    finally:
        await asyncio.to_thread(_remove_all, client, "claims._.", image.id)
        client.close()


def _remove_all(client: docker.DockerClient, name: str, image: str) -> None:
    for found in client.containers.list(all=True, filters={"name": name}):
        found.remove(force=True)
    client.images.remove(image, force=True)
