"""create+start+stop+remove through ds01, beside the same with the bare Docker SDK.

Both run in this run on the same private dockerd with the same image, limits and
network; printed as a ratio and as milliseconds ds01 adds. Nothing asserts a time.

    .venv/bin/python bench/containers.py [--cycles 10]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import docker
from _suite import REPO, suite

from ds01.client import ClientIdentity, Ds01Client
from ds01.core.config import load_config

sys.path.insert(0, str(REPO))
from tests.harness import build_test_image

LIMITS = (
    "defaults:\n  max_cpus: 1\n  memory: 256m\n  memory_swap: 256m\n  shm_size: 32m\n"
    "  pids_limit: 128\n  max_containers_per_user: null\n  priority: 10\n"
)


# What a ds01 container runs, waiting for its stop: the bare side runs the same.
COMMAND = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done"]


def bare_create(client: docker.DockerClient, image: str, name: str) -> Any:
    """A container with the limits of LIMITS, made with the bare Docker SDK."""
    return client.containers.create(
        image,
        COMMAND,
        name=name,
        nano_cpus=10**9,
        mem_limit=256 << 20,
        memswap_limit=256 << 20,
        shm_size=32 << 20,
        pids_limit=128,
        network_mode="none",
        detach=True,
    )


def bare_cycles(socket: Path, image: str, cycles: int) -> list[float]:
    client = docker.DockerClient(base_url=f"unix://{socket}")
    samples = []
    try:
        for i in range(cycles):
            start = time.perf_counter()
            container = bare_create(client, image, f"bare{i}")
            container.start()
            container.stop(timeout=10)
            container.remove(force=True)
            samples.append(time.perf_counter() - start)
    finally:
        client.close()
    return samples


async def ds01_cycles(config_path: Path, identity: ClientIdentity, image: str, n: int) -> list:
    samples = []
    async with Ds01Client(load_config(config_path), identity, timeout=120) as client:
        for i in range(n):
            start = time.perf_counter()
            await client.create_container(f"bench{i}", image, start=True)
            await client.stop_container(f"bench{i}")
            await client.remove_container(f"bench{i}")
            samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10)
    args = parser.parse_args()
    with suite("limits,allocator,containers", LIMITS, etcd=True, docker=True) as running:
        assert running.docker_socket is not None
        image = build_test_image(running.docker_socket)
        identity = ClientIdentity(running.pki.ca_cert, running.pki.client("root"))
        bare_cycles(running.docker_socket, image, 1)  # warm-up
        bare = bare_cycles(running.docker_socket, image, args.cycles)
        ours = asyncio.run(ds01_cycles(running.config_path, identity, image, args.cycles))
    shutil.rmtree(Path.home() / "workspace", ignore_errors=True)
    bare_p50, ours_p50 = statistics.median(bare), statistics.median(ours)
    print(f"create+start+stop+remove, {args.cycles} cycles each, same image and limits:")
    print(f"  bare Docker SDK   p50 {bare_p50 * 1e3:8.1f} ms")
    print(f"  through ds01      p50 {ours_p50 * 1e3:8.1f} ms")
    print(f"  ratio {ours_p50 / bare_p50:.2f}x, ds01 adds {(ours_p50 - bare_p50) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
