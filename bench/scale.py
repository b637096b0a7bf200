"""Cost curves: how each cost grows with the fleet, measured on simulated fleets in a
real etcd, in one run, printed as a ratio per tenfold step (nothing here asserts a time).

  * nodes: 1, 10, 100 GPU hosts of 8 GPUs, each split 7 ways (56 to 5,600 slots); the
    other nodes' slots and registrations are written as their allocators would;
  * users: 100, 1,000, 10,000 in a group's member file;
  * watchers: 200, 1,000 (and 2,000 with --watchers-max 2000) allocation streams.

At each size: Allocate p50/p99 on this node (as the containers service asks; with a
release each time), GetStatus of the whole fleet, GetLimits, event fan-out p99 and the
memory of the ds01 process. Not here: the gateway's `docker ps` filtering and the
reconcile sweep at 2,000 containers need that many real Docker containers.

    .venv/bin/python bench/scale.py [--cycles 100]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from pathlib import Path

from _suite import suite
from allocator import fan_out, inventory, pct

from ds01.allocator.records import NODES, SLOTS, NodeRecord, SlotRecord, slot_key
from ds01.client import ClientIdentity, Ds01Client, Ds01Error
from ds01.core.config import load_config
from ds01.core.etcd import etcd_client
from ds01.core.pki import Pki

GPUS_PER_NODE = 8
NODES_STEPS = (1, 10, 100)
USERS_STEPS = (100, 1_000, 10_000)
HERE = "node000"  # the node whose ds01d runs; the others are records in etcd


def limits(users: int) -> str:
    members = ", ".join(f"u{n}" for n in range(users))
    return (
        "defaults:\n  max_gpu_equivalents: null\n  max_gpu_slots_per_container: null\n"
        "  allow_full_gpu: true\n  priority: 10\n"
        f"groups:\n  lab:\n    priority: 20\n    members: [{members}]\n"
    )


async def add_nodes(endpoint: str, pki: Pki, first: int, last: int) -> None:
    """Register nodes ``first``..``last`` - 1 with 8 MIG GPUs each, on one long lease."""
    etcd = etcd_client((endpoint,), pki.etcd, "admin")
    lease = await etcd.lease(3600)
    for n in range(first, last):
        node = f"node{n:03d}"
        for gpu in range(GPUS_PER_NODE):
            for instance in range(1, 8):
                record = SlotRecord(node, f"{gpu}:{instance}", f"MIG-{node}-{gpu}-{instance}",
                                    "A100 (simulated)", "1g.10gb", 10 << 30, 1 / 7)  # fmt: skip
                await etcd.put(slot_key(SLOTS, node, record.slot_id), record.encode())
        status = NodeRecord(node, "declared", True, time.time())
        await etcd.put(f"{NODES}{node}".encode(), status.encode(), lease=lease)


async def timed(call: object, count: int) -> list[float]:
    samples = []
    for n in range(count):
        start = time.perf_counter()
        await call(n)  # type: ignore[operator]
        samples.append(time.perf_counter() - start)
    return samples


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def show(title: str, steps: tuple[int, ...], rows: dict[str, list[float]], unit: str) -> None:
    print(title)
    for name, values in rows.items():
        cells = "   ".join(f"{v:8.2f} {unit}" for v in values)
        growth = "   ".join(f"{b / a:5.2f}x" for a, b in itertools.pairwise(values))
        print(f"  {name:<34} {cells}   per tenfold step: {growth}")
    print(f"  (at {', '.join(str(s) for s in steps)})")


async def measure(running: object, cycles: int, watchers_max: int, server_pid: int) -> None:
    config = load_config(running.config_path)  # type: ignore[attr-defined]
    pki, endpoint = running.pki, running.etcd_endpoint  # type: ignore[attr-defined]
    identity = ClientIdentity(pki.ca_cert, pki.service("containers"))
    nodes_rows: dict[str, list[float]] = {"Allocate p50": [], "Allocate p99": [],
                                          "GetStatus p50 (whole fleet)": [],
                                          "ds01d memory (MiB)": []}  # fmt: skip
    async with Ds01Client(config, identity, timeout=60) as client:
        for _ in range(100):  # this node registered, as its allocator does
            if any(n.up for n in (await client.gpu_status()).nodes):
                break
            await asyncio.sleep(0.1)
        registered = 1
        for nodes in NODES_STEPS:
            await add_nodes(endpoint, pki, registered, nodes)
            registered = nodes
            await asyncio.sleep(1)  # the allocator's view follows

            async def cycle(n: int) -> None:
                await client.allocate(f"s{n}._.u{n % 50}", user=f"u{n % 50}", node=HERE)
                await client.release(f"s{n}._.u{n % 50}")

            await timed(cycle, 10)  # warm-up
            samples = await timed(cycle, cycles)
            status = await timed(lambda _n: client.gpu_status(), max(10, cycles // 10))
            nodes_rows["Allocate p50"].append(statistics.median(samples) * 1e3)
            nodes_rows["Allocate p99"].append(pct(samples, 99) * 1e3)
            nodes_rows["GetStatus p50 (whole fleet)"].append(statistics.median(status) * 1e3)
            nodes_rows["ds01d memory (MiB)"].append(rss_mib(server_pid))
        show("nodes (56, 560, 5,600 slots); Allocate includes its Release:", NODES_STEPS,
             {k: v for k, v in nodes_rows.items() if "memory" not in k}, "ms")  # fmt: skip
        show("", NODES_STEPS, {"ds01d memory": nodes_rows["ds01d memory (MiB)"]}, "MiB")

        user_rows: dict[str, list[float]] = {"GetLimits p50": [], "ds01d memory": []}
        limits_file = Path(config.limits_file)
        for users in USERS_STEPS:
            limits_file.write_text(limits(users))
            for _ in range(100):  # the limits service reloads the file by itself
                if (await client.get_limits(f"u{users - 1}")).group == "lab":
                    break
                await asyncio.sleep(0.1)
            got = await timed(lambda n, users=users: client.get_limits(f"u{n * 7919 % users}"),
                              cycles)  # fmt: skip
            user_rows["GetLimits p50"].append(statistics.median(got) * 1e3)
            user_rows["ds01d memory"].append(rss_mib(server_pid))
        show("users in member files:", USERS_STEPS,
             {"GetLimits p50": user_rows["GetLimits p50"]}, "ms")  # fmt: skip
        show("", USERS_STEPS, {"ds01d memory": user_rows["ds01d memory"]}, "MiB")

        fan_rows: dict[str, list[float]] = {"event fan-out p99": []}
        steps = tuple(w for w in (200, 1_000, 2_000) if w <= watchers_max)
        done: list[int] = []
        for watchers in steps:
            try:
                delays = await fan_out(client, watchers, 10, tag=f"w{watchers}-")
            except (TimeoutError, Ds01Error) as err:  # the bench's own client gave out
                print(f"  {watchers} watchers: not measured ({type(err).__name__}: {err})")
                break
            fan_rows["event fan-out p99"].append(pct(delays, 99) * 1e3)
            done.append(watchers)
        show("allocation watchers (one client process):", tuple(done), fan_rows, "ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--watchers-max", type=int, default=1_000)
    args = parser.parse_args()
    with suite("limits,allocator", limits(100), inventory(GPUS_PER_NODE), etcd=True,
               node=HERE) as running:  # fmt: skip
        asyncio.run(measure(running, args.cycles, args.watchers_max, running.server_pid))


if __name__ == "__main__":
    main()
