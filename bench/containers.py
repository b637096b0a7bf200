"""create+start+stop+remove through ds01, beside the same with the bare Docker SDK.

Both run in this run on the same private dockerd with the same image, limits and
network; printed as a ratio and as milliseconds ds01 adds. Nothing asserts a time.

    .venv/bin/python bench/containers.py [--cycles 20]
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
from _suite import REPO, Suite, suite

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


def bare_cycle(client: docker.DockerClient, image: str, name: str) -> tuple[float, float]:
    """One cycle with the bare SDK: the seconds of create+start, then of stop+remove."""
    start = time.perf_counter()
    container = bare_create(client, image, name)
    container.start()
    started = time.perf_counter()
    container.stop(timeout=10)
    container.remove(force=True)
    return started - start, time.perf_counter() - started


async def ds01_cycle(client: Ds01Client, image: str, name: str) -> tuple[float, float]:
    """The same cycle through ds01's containers service."""
    start = time.perf_counter()
    await client.create_container(name, image, start=True)
    started = time.perf_counter()
    await client.stop_container(name)
    await client.remove_container(name)
    return started - start, time.perf_counter() - started


async def cycles(running: Suite, image: str, count: int) -> dict[str, list[tuple[float, float]]]:
    """``count`` cycles on each side, alternating, so that the machine's drift falls on
    both alike."""
    assert running.docker_socket is not None
    identity = ClientIdentity(running.pki.ca_cert, running.pki.client("root"))
    bare = docker.DockerClient(base_url=f"unix://{running.docker_socket}")
    samples: dict[str, list[tuple[float, float]]] = {"bare": [], "ds01": []}
    async with Ds01Client(load_config(running.config_path), identity, timeout=120) as ours:
        for i in range(-2, count):  # two of each to warm up
            bare_seconds = await asyncio.to_thread(bare_cycle, bare, image, f"bare{i + 2}")
            ds01_seconds = await ds01_cycle(ours, image, f"bench{i + 2}")
            if i >= 0:
                samples["bare"].append(bare_seconds)
                samples["ds01"].append(ds01_seconds)
    bare.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    args = parser.parse_args()
    with suite("limits,allocator,containers", LIMITS, etcd=True, docker=True) as running:
        assert running.docker_socket is not None
        image = build_test_image(running.docker_socket)
        samples = asyncio.run(cycles(running, image, args.cycles))
    shutil.rmtree(Path.home() / "workspace", ignore_errors=True)
    print(f"{args.cycles} cycles on each side, alternating; same image, limits and network:")
    print(f"  {'':<22}{'bare Docker SDK':>18}{'through ds01':>16}{'ds01 adds':>12}")
    for step, label in ((0, "create+start p50"), (1, "stop+remove p50")):
        bare = statistics.median(s[step] for s in samples["bare"]) * 1e3
        ours = statistics.median(s[step] for s in samples["ds01"]) * 1e3
        print(f"  {label:<22}{bare:15.1f} ms{ours:13.1f} ms{ours - bare:+9.1f} ms")
    print("  (target: create+start adds <= 50 ms)")


if __name__ == "__main__":
    main()
