"""Allocate+release through the allocator service, beside what it is built from.

Measured in one run on this machine, printed as ratios (nothing here asserts a time):
  * one raw etcd transaction (compare create_revision == 0, put): the floor;
  * Allocate and Release over mTLS at 1, 16 and 64 concurrent clients, once each client
    has made its first cycle (those, made all at once by users their allocator has not
    seen, are shown apart);
  * the seed's design for reference: flock around a JSON state file;
  * one allocation event fanned out to 200 watchers (DESIGN.md: p99 under 50 ms).

    .venv/bin/python bench/allocator.py [--cycles 300]
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import statistics
import time
from pathlib import Path

import grpc
from _suite import CpuMeter, compare_metrics, scraping, suite

from ds01.client import ClientIdentity, Ds01Client
from ds01.core import heap
from ds01.core.config import load_config
from ds01.core.etcd import etcd_client
from ds01.core.pki import Pki
from ds01.v1 import allocator_pb2, allocator_pb2_grpc

UNLIMITED = (
    "defaults:\n  max_gpu_equivalents: null\n  max_gpu_slots_per_container: null\n"
    "  allow_full_gpu: true\n  priority: 10\n"
)


def inventory(gpus: int) -> str:
    """``gpus`` GPUs in MIG mode with seven 1g.10gb slices each."""
    lines = ["gpus:"]
    for gpu in range(gpus):
        lines += [f"  - index: {gpu}", f"    uuid: GPU-{gpu}", "    mig:", "      instances:"]
        lines += [
            f"        - {{id: {i}, profile: 1g.10gb, uuid: MIG-{gpu}-{i}}}" for i in range(1, 8)
        ]
    return "\n".join(lines) + "\n"


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def line(name: str, samples: list[float], per_second: float | None = None) -> str:
    rate = f"   {per_second:9.1f}/s" if per_second else ""
    return (
        f"  {name:<44} p50 {statistics.median(samples) * 1e3:7.2f} ms"
        f"   p99 {pct(samples, 99) * 1e3:7.2f} ms{rate}"
    )


async def raw_txn(endpoint: str, pki: Pki, count: int) -> list[float]:
    """One transaction over the same mutual TLS the allocator uses."""
    etcd = etcd_client((endpoint,), pki.etcd, "admin")
    samples = []
    try:
        for i in range(count):
            key = f"/bench/raw/{i}".encode()
            start = time.perf_counter()
            await etcd.transaction(
                compare=[etcd.transactions.create(key) == 0],
                success=[etcd.transactions.put(key, b"x")],
                failure=[],
            )
            samples.append(time.perf_counter() - start)
            await etcd.delete(key)
    finally:
        await etcd.close()
    return samples


async def raw_cycles(endpoint: str, pki: Pki, clients: int, total: int) -> float:
    """Cycles per second of a raw claim transaction and a delete, ``clients`` at once over
    one client: what etcd and this machine sustain at that concurrency, the ceiling of
    allocate + release."""
    etcd = etcd_client((endpoint,), pki.etcd, "admin")
    tx = etcd.transactions

    async def worker(w: int) -> None:
        for n in range(total // clients):
            key = f"/bench/raw/{w}/{n}".encode()
            await etcd.transaction(compare=[tx.create(key) == 0], success=[tx.put(key, b"x")],
                                   failure=[])  # fmt: skip
            await etcd.delete(key)

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        return (total // clients * clients) / (time.perf_counter() - start)
    finally:
        await etcd.close()


def seed_flock(path: Path, count: int) -> list[float]:
    """The seed: flock, read the JSON state, add an allocation, write it back."""
    path.write_text(json.dumps({"allocations": {}}))
    samples = []
    for i in range(count):
        start = time.perf_counter()
        with path.open("r+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            state = json.load(f)
            state["allocations"][f"c{i}"] = {"user": "u", "gpu_id": "0", "stopped_at": None}
            f.seek(0)
            json.dump(state, f)
            f.truncate()
        samples.append(time.perf_counter() - start)
    return samples


async def cycles(
    client: Ds01Client | list[Ds01Client], clients: int, total: int
) -> tuple[list, list, float]:
    """``clients`` concurrent allocate+release loops, spread over the given clients (one
    per allocator process)."""
    allocate, release = [], []
    spread = client if isinstance(client, list) else [client]

    async def worker(w: int) -> None:
        client = spread[w % len(spread)]
        for n in range(total // clients):
            container = f"b{w}-{n}._.u{w}"
            start = time.perf_counter()
            await client.allocate(container, user=f"u{w}")
            middle = time.perf_counter()
            await client.release(container)
            allocate.append(middle - start)
            release.append(time.perf_counter() - middle)

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    return allocate, release, len(allocate) / (time.perf_counter() - start)


async def fan_out(client: Ds01Client, watchers: int, events: int, tag: str = "") -> list[float]:
    """Delay from a committed allocation to its event at each of ``watchers`` streams;
    ``tag`` names the containers apart from an earlier run's (which still hold theirs)."""
    # The watchers stand for processes of their own; in this one process the collector's
    # pauses would hold them all at once, so it collects as ds01d does.
    heap.settle()
    received: list[float] = []
    sent: dict[str, float] = {}
    ready = asyncio.Barrier(watchers + 1)
    # Every stream stays open until all have had every event: a thousand watchers that
    # hang up while the last event is on its way to the others are a load of the bench's
    # own making, which no fleet's independent watchers put on the last event.
    finished = asyncio.Barrier(watchers + 1)

    cut: list[str] = []  # the status of each stream the server ended early

    async def watch() -> None:
        stub = allocator_pb2_grpc.AllocatorServiceStub(client.channel("allocator"))
        stream = stub.WatchAllocations(allocator_pb2.WatchAllocationsRequest())
        try:
            await stream.initial_metadata()  # the watch is live: it will miss nothing
            await ready.wait()
            seen = 0
            while seen < events:
                event = await stream.read()
                if event == grpc.aio.EOF:
                    raise grpc.aio.AioRpcError(await stream.code(), None, None)
                if event.type == allocator_pb2.ALLOCATION_EVENT_TYPE_ALLOCATED:
                    received.append(time.perf_counter() - sent[event.allocation.container])
                    seen += 1
            await finished.wait()
        except grpc.aio.AioRpcError as err:
            cut.append(err.code().name)
            await ready.abort()
            await finished.abort()
        except asyncio.BrokenBarrierError:
            pass  # another stream was cut: this run is over
        finally:
            stream.cancel()

    tasks = [asyncio.ensure_future(watch()) for _ in range(watchers)]
    try:
        await asyncio.wait_for(ready.wait(), 60)
        for n in range(events):
            container = f"fan{tag}{n}._.u0"
            sent[container] = time.perf_counter()
            await client.allocate(container, user="u0")
            await asyncio.sleep(0.05)
        await asyncio.wait_for(finished.wait(), 60)
    except asyncio.BrokenBarrierError:
        await asyncio.gather(*tasks)
        raise RuntimeError(
            f"the allocator ended a stream early ({', '.join(sorted(set(cut)))}) "
            f"with {watchers} open"
        ) from None
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return received


async def measure(
    config_path: Path,
    pki: Pki,
    endpoint: str,
    total: int,
    allocator_configs: list[Path],
    processes: dict[str, int],
) -> dict[str, float]:
    """Print one run's figures; the ratios that metrics must not move."""
    config = load_config(config_path)
    identity = ClientIdentity(pki.ca_cert, pki.service("containers"))
    raw = await raw_txn(endpoint, pki, total)
    others = [Ds01Client(load_config(p), identity, timeout=60) for p in allocator_configs[1:]]
    async with Ds01Client(config, identity, timeout=60) as client:
        for _ in range(100):
            if any(n.up for n in (await client.gpu_status()).nodes):
                break
            await asyncio.sleep(0.1)
        everyone = [client, *others]
        await cycles(everyone, 4, 40)  # warm-up
        results, busy, cold = {}, {}, {}
        for c in (1, 16, 64):
            # Each client's first cycle, all at once, by users their allocator has not
            # seen (limits to ask for, perhaps of another process): shown apart, so the
            # steady state is measured from a burst every run starts with, not within it.
            cold[c] = (await cycles(everyone, c, c))[0]
            meter = CpuMeter(processes)
            results[c] = await cycles(everyone, c, max(total, c * 4))
            busy[c] = meter.report()
        for other in others:
            await other.close()
        ceilings = {c: await raw_cycles(endpoint, pki, c, max(total, c * 4)) for c in results}
        fan = await fan_out(client, 200, 20)
    seed = seed_flock(Path(config_path).parent / "gpu-state.json", total)

    raw_p50 = statistics.median(raw)
    ratios = {}
    for clients, (allocate, _release, rate) in results.items():
        ratios[f"Allocate p50 / raw txn, {clients} clients"] = statistics.median(allocate) / raw_p50
        ratios[f"Allocate p50 (ms), {clients} clients"] = statistics.median(allocate) * 1e3
        ratios[f"Allocate throughput (/s), {clients} clients"] = rate
    ratios["event to 200 watchers, p99 (ms)"] = pct(fan, 99) * 1e3
    print("allocate + release, measured in this run:")
    print(line("raw etcd txn (create_revision == 0, put)", raw))
    print(line("seed: flock + JSON read/modify/write", seed))
    for clients, (allocate, release, rate) in results.items():
        print(line(f"Allocate, {clients} concurrent clients", allocate, rate))
        print(line("  first Allocate of each client, at once", cold[clients]))
        print(line(f"Release, {clients} concurrent clients", release))
        ratio = statistics.median(allocate) / raw_p50
        print(f"    ratio: Allocate p50 = {ratio:.1f}x one raw etcd txn (target <= 3x)")
        share = rate / ceilings[clients]
        print(
            f"    allocate+release {rate:.0f}/s = {share:.0%} of raw txn+delete cycles at "
            f"{clients} clients ({ceilings[clients]:.0f}/s; target >= 30%)"
        )
        print(f"    {busy[clients]}")
    print(line("event to 200 watchers (delivery delay)", fan))
    print(f"    {len(fan)} deliveries; p99 {pct(fan, 99) * 1e3:.1f} ms (target < 50 ms)")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument(
        "--metrics", choices=["compare", "on", "off"], default="compare",
        help="compare: alternate runs without metrics and with /metrics scraped every second",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the comparison")
    parser.add_argument("--allocators", type=int, default=1,
                        help="allocator processes; clients are spread over them")  # fmt: skip
    args = parser.parse_args()

    def run(metrics: bool) -> dict[str, float]:
        # 10 GPUs x 7 slices = 70 slots: 64 clients each hold one at a time.
        with (
            suite("limits,allocator", UNLIMITED, inventory(10), etcd=True,
                  metrics=metrics, allocators=args.allocators) as running,
            scraping(running),
        ):  # fmt: skip
            return asyncio.run(
                measure(running.config_path, running.pki, running.etcd_endpoint, args.cycles,
                        running.allocator_configs, running.processes)
            )  # fmt: skip

    compare_metrics(run, args.metrics, args.rounds)


if __name__ == "__main__":
    main()
