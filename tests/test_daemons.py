"""The real etcd and dockerd the fixtures start behave as the services will rely on."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import docker

from ds01.core.etcd import etcd_client
from ds01.core.pki import Pki

MEMORY_LIMIT = 64 * 1024 * 1024
# cgroup v2 and cgroup v1 spell the limit differently; a container sees one of them.
READ_MEMORY_LIMIT = (
    "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes"
)


async def test_an_etcd_lease_expires_and_takes_its_key(etcd_endpoint: str, pki: Pki):
    client = etcd_client((etcd_endpoint,), pki.etcd, "admin")
    try:
        lease = await client.lease(1)
        await client.put(b"/ds01/test/held", b"slot 0", lease=lease)
        assert (await client.get(b"/ds01/test/held")).value == b"slot 0"
        for _ in range(60):
            if await client.get(b"/ds01/test/held") is None:
                break
            await asyncio.sleep(0.1)
        assert await client.get(b"/ds01/test/held") is None
        assert await lease.remaining_ttl() == -1  # the lease itself is gone too
    finally:
        await client.close()


def test_container_reads_its_memory_limit_from_inside(
    docker_client: docker.DockerClient, test_image: str
):
    output = docker_client.containers.run(
        test_image,
        ["sh", "-c", READ_MEMORY_LIMIT],
        mem_limit=MEMORY_LIMIT,
        network_mode="none",
        remove=True,
    )
    assert int(output.decode().strip()) == MEMORY_LIMIT


def test_the_real_docker_cli_talks_to_the_private_daemon(docker_socket: Path, test_image: str):
    result = subprocess.run(
        [
            "docker",
            "-H",
            f"unix://{docker_socket}",
            "run",
            "--rm",
            "--network=none",
            "--pids-limit=64",
            "--cpus=0.5",
            "--shm-size=8m",
            test_image,
            "echo",
            "hello",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello"
