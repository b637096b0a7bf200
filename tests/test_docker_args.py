"""`ds01 limits --docker-args` prints what containers get: the flags, read field by field,
against Docker's inspect of containers made by `ds01 container create` and by a plain
`docker create` through the gateway, run as real users against all four services.

Each flag the line leaves out is read as no setting at all, so a value Docker fills in on
its own (swap, /dev/shm, the IPC namespace) must be written out to match."""

from __future__ import annotations

import asyncio
import subprocess
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import docker
import pytest

from ds01.core.docker_args import DOCKER_SHM_SIZE, DockerArgs, DockerInfo, nano_cpus
from ds01.ownership.server import caps_of
from ds01.v1 import limits_pb2
from tests.allocator_env import AllocatorEnv, full_stack_fixture
from tests.harness import ds01_as

ALICE, BOB = "ds01alice", "ds01bob"
MiB, GiB = 1024**2, 1024**3

# Two configurations, one user each (this host's Docker has fewer CPUs than either).
LIMITS = textwrap.dedent(
    """\
    defaults:
      max_gpu_equivalents: 1
      max_gpu_slots_per_container: 1
      priority: 10
    default_group: students
    groups:
      students:              # ds01alice: more CPUs than the host has, swap left to Docker
        max_cpus: 64
        memory: 1g
        shm_size: 256m
        pids_limit: 300
      researchers:           # ds01bob: a fraction float arithmetic rounds down, swap set
        members: [ds01bob]
        max_cpus: 1.005
        memory: 768m
        memory_swap: 1g
        ipc_mode: private
    """
)
FIELDS = ("NanoCpus", "CpuQuota", "CpuPeriod", "Memory", "MemorySwap", "ShmSize", "PidsLimit",
          "IpcMode", "CgroupParent")  # fmt: skip

pytestmark = pytest.mark.usefixtures("unix_users")


def _bytes(text: str) -> int:
    """A size as Docker's CLI reads it: 512m, 1g, or bytes."""
    unit = text[-1].lower() if text[-1].isalpha() else "b"
    number = text[:-1] if text[-1].isalpha() else text
    return int(Decimal(number) * 1024 ** "bkmgt".index(unit))


def printed_host_config(flags: str) -> dict[str, Any]:
    """The HostConfig the flag line states, each flag it leaves out read as unset."""
    given = dict(flag.removeprefix("--").split("=", 1) for flag in flags.split())
    return {
        "NanoCpus": int(Decimal(given.get("cpus", "0")) * 10**9),  # exactly, as Docker's CLI
        "CpuQuota": 0,
        "CpuPeriod": 0,
        "Memory": _bytes(given.get("memory", "0")),
        "MemorySwap": _bytes(given.get("memory-swap", "0")),
        "ShmSize": _bytes(given.get("shm-size", "0")),
        "PidsLimit": int(given["pids-limit"]) if "pids-limit" in given else None,
        "IpcMode": given.get("ipc", ""),
        "CgroupParent": given.get("cgroup-parent", ""),
    }


def real_host_config(docker_socket: Path, name: str) -> dict[str, Any]:
    """Docker's own view of a container, asked as root on the daemon itself."""
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    try:
        host = client.api.inspect_container(name)["HostConfig"]
    finally:
        client.close()
    return {key: host.get(key) for key in FIELDS}


stack = full_stack_fixture(LIMITS)


async def printed(env: AllocatorEnv, user: str) -> str:
    """`ds01 limits --docker-args`, run by the user."""
    done = await ds01_as(env, user, "limits", "--docker-args")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def docker_as(env: AllocatorEnv, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The docker CLI, run by the user on the gateway's socket."""
    socket = env.config.ownership.proxy_socket
    home = [f"HOME=/home/{user}", f"DOCKER_CONFIG=/home/{user}/.docker"]
    argv = ["runuser", "-u", user, "--", "env", *home, "docker", "-H", f"unix://{socket}", *args]
    return await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=90, cwd="/"
    )


@pytest.mark.integration
async def test_ds01_container_create_gets_exactly_the_printed_flags(
    stack: AllocatorEnv, docker_socket: Path, test_image: str
):
    for user, parent in ((ALICE, "students"), (BOB, "researchers")):
        flags = await printed(stack, user)
        made = await ds01_as(stack, user, "container", "create", "box", "--image", test_image)
        assert made.returncode == 0, made.stderr
        real = await asyncio.to_thread(real_host_config, docker_socket, f"box._.{user}")
        assert printed_host_config(flags) == real, (user, flags)
        assert real["CgroupParent"] == f"/ds01/{parent}/{user}"  # this Docker: cgroupfs


@pytest.mark.integration
async def test_a_plain_docker_create_through_the_gateway_gets_the_printed_flags(
    stack: AllocatorEnv, docker_socket: Path, test_image: str
):
    for user in (ALICE, BOB):
        flags = await printed(stack, user)
        made = await docker_as(stack, user, "create", "--name", f"plain-{user}", "--network=none",
                               test_image, "true")  # fmt: skip
        assert made.returncode == 0, made.stderr
        real = await asyncio.to_thread(real_host_config, docker_socket, made.stdout.strip())
        assert printed_host_config(flags) == real, (user, flags)


@pytest.mark.integration
async def test_the_printed_flags_given_to_docker_make_the_same_container(
    stack: AllocatorEnv, docker_socket: Path, test_image: str
):
    """The line is Docker's own syntax: docker create with it makes what ds01 makes."""
    for user in (ALICE, BOB):
        flags = await printed(stack, user)
        made = await ds01_as(stack, user, "container", "create", "box", "--image", test_image)
        assert made.returncode == 0, made.stderr
        name = f"replay-{user}"
        argv = ["docker", "-H", f"unix://{docker_socket}", "create", "--name", name,
                "--network=none", *flags.split(), test_image, "true"]  # fmt: skip
        replayed = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True)
        try:
            assert replayed.returncode == 0, (flags, replayed.stderr)
            replay = await asyncio.to_thread(real_host_config, docker_socket, name)
            ds01 = await asyncio.to_thread(real_host_config, docker_socket, f"box._.{user}")
            assert replay == ds01, flags
        finally:
            remove = ["docker", "-H", f"unix://{docker_socket}", "rm", "-f", name]
            await asyncio.to_thread(subprocess.run, remove, capture_output=True)


# --- the shared function, on hosts this machine is not --------------------------------------


CONFIGURED = DockerArgs(
    cpus=2.01,
    memory=4 * GiB,
    memory_swap=None,
    shm_size=None,
    ipc_mode=None,
    pids_limit=4096,
    cgroup_parent="ds01-students-alice.slice",
)


def test_systemd_keeps_the_slice_and_cgroupfs_gets_a_path():
    systemd = CONFIGURED.on_host(DockerInfo(ncpu=96, cgroup_driver="systemd"))
    cgroupfs = CONFIGURED.on_host(DockerInfo(ncpu=96, cgroup_driver="cgroupfs"))
    assert systemd.cgroup_parent == "ds01-students-alice.slice"
    assert cgroupfs.cgroup_parent == "/ds01/students/alice"


def test_docker_caps_cpus_at_its_own_and_keeps_whole_nano_cpus():
    few = CONFIGURED.on_host(DockerInfo(ncpu=2, cgroup_driver="systemd"))
    many = CONFIGURED.on_host(DockerInfo(ncpu=96, cgroup_driver="systemd"))
    assert few.cpus == 2 and "--cpus=2 " in few.flags()
    assert nano_cpus(many.cpus) == 2_010_000_000  # int(2.01 * 1e9) would be 2009999999
    assert "--cpus=2.01 " in many.flags()
    assert nano_cpus(1.123456789) == 1_123_456_789


def test_dockers_defaults_are_written_out():
    made = CONFIGURED.on_host(DockerInfo(ncpu=96, cgroup_driver="cgroupfs"))
    assert made.memory_swap == 8 * GiB  # Docker: twice the memory when unset
    assert made.shm_size == DOCKER_SHM_SIZE == 64 * MiB
    assert made.ipc_mode == "private"
    assert made.flags() == (
        "--cpus=2.01 --memory=4g --memory-swap=8g --ipc=private --shm-size=64m "
        "--pids-limit=4096 --cgroup-parent=/ds01/students/alice"
    )


def test_ipc_host_has_no_shm_size_and_zero_means_what_docker_makes_of_it():
    host_ipc = DockerArgs(cpus=0, memory=0, memory_swap=None, shm_size=None, ipc_mode="host",
                          pids_limit=0, cgroup_parent="ds01-g-u.slice")  # fmt: skip
    made = host_ipc.on_host(DockerInfo(ncpu=8, cgroup_driver="systemd"))
    assert (made.cpus, made.memory, made.memory_swap, made.pids_limit) == (None,) * 4
    assert made.flags() == "--ipc=host --cgroup-parent=ds01-g-u.slice"
    zero_shm = DockerArgs(None, None, None, 0, None, None, "ds01-g-u.slice")
    assert zero_shm.on_host(DockerInfo(8, "systemd")).shm_size == DOCKER_SHM_SIZE


def test_docker_info_is_read_from_dockers_own_answer():
    assert DockerInfo.of({"NCPU": 16, "CgroupDriver": "systemd"}) == DockerInfo(16, "systemd")
    assert DockerInfo.of({}) == DockerInfo(0, "cgroupfs")
    unknown = CONFIGURED.on_host(DockerInfo.of({}))  # NCPU unknown: no cap of ours
    assert unknown.cpus == 2.01


def test_gateway_ceilings_are_the_printed_values_where_the_configuration_sets_them():
    def answer(limits: limits_pb2.UserLimits) -> limits_pb2.GetDockerArgsResponse:
        made = DockerArgs(
            cpus=limits.max_cpus if limits.HasField("max_cpus") else None,
            memory=limits.memory_bytes or None,
            memory_swap=limits.memory_swap_bytes or None,
            shm_size=limits.shm_size_bytes or None,
            ipc_mode=None,
            pids_limit=None,
            cgroup_parent="ds01-g-u.slice",
        ).on_host(DockerInfo(4, "cgroupfs"))
        return limits_pb2.GetDockerArgsResponse(
            cpus=made.cpus, memory_bytes=made.memory, memory_swap_bytes=made.memory_swap,
            shm_size_bytes=made.shm_size, ipc_mode=made.ipc_mode,
        )  # fmt: skip

    unset = limits_pb2.UserLimits(max_cpus=2.01, memory_bytes=GiB)
    caps = caps_of(unset, answer(unset))
    # Docker's own defaults: what a request naming none gets, not a ceiling.
    assert (caps.nano_cpus, caps.memory, caps.memory_swap, caps.shm_size) == (
        2_010_000_000, GiB, None, None
    )  # fmt: skip
    configured = limits_pb2.UserLimits(
        max_cpus=64, memory_bytes=GiB, memory_swap_bytes=2 * GiB, shm_size_bytes=256 * MiB
    )
    caps = caps_of(configured, answer(configured))
    assert (caps.nano_cpus, caps.memory_swap, caps.shm_size) == (4 * 10**9, 2 * GiB, 256 * MiB)
