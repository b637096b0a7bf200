"""GetLimits latency and throughput, beside the seed's way of answering the same question.

The seed ran ``python3 get_resource_limits.py USER``: a fresh interpreter that parses the
YAML for every query. Both are measured in this run on this machine and printed as a
ratio; nothing here asserts a time.

    .venv/bin/python bench/limits.py [--queries 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _suite import suite

from ds01.client import ClientIdentity, Ds01Client
from ds01.core.config import load_config
from ds01.core.pki import Pki

REPO = Path(__file__).resolve().parent.parent
LIMITS = REPO / "config" / "resource-limits.yaml"

# What the seed's script did per query: start Python, parse the YAML, layer the values.
SEED_QUERY = """
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
user = sys.argv[2]
limits = dict(config.get("defaults", {}))
for name, group in (config.get("groups") or {}).items():
    if user in (group.get("members") or []):
        limits.update({k: v for k, v in group.items() if k != "members"})
        break
limits.update((config.get("user_overrides") or {}).get(user, {}))
print(limits)
"""


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def seed_latencies(runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", SEED_QUERY, str(LIMITS), "alice"],
            check=True,
            capture_output=True,
        )
        samples.append(time.perf_counter() - start)
    return samples


async def ds01_latencies(client: Ds01Client, queries: int, concurrency: int) -> tuple[list, float]:
    samples: list[float] = []
    per_worker = queries // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            start = time.perf_counter()
            await client.get_limits("alice")
            samples.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, len(samples) / (time.perf_counter() - start)


async def measure(config_path: Path, pki: Pki, queries: int) -> dict[int, tuple[list, float]]:
    config = load_config(config_path)
    identity = ClientIdentity(pki.ca_cert, pki.client("root"))
    async with Ds01Client(config, identity) as client:
        for _ in range(50):  # warm up the channel and the server
            await client.get_limits("alice")
        return {c: await ds01_latencies(client, queries, c) for c in (1, 16)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--seed-runs", type=int, default=30)
    args = parser.parse_args()
    with suite("limits", LIMITS.read_text()) as running:
        results = asyncio.run(measure(running.config_path, running.pki, args.queries))
    seed = seed_latencies(args.seed_runs)
    seed_p50 = statistics.median(seed)
    print(f"seed (fresh python3 + YAML parse per query), {len(seed)} runs:")
    print(
        f"  p50 {seed_p50 * 1e3:8.2f} ms   p99 {percentile(seed, 99) * 1e3:8.2f} ms"
        f"   {1 / statistics.mean(seed):8.1f} queries/s"
    )
    for concurrency, (samples, throughput) in results.items():
        p50 = statistics.median(samples)
        print(f"ds01 GetLimits over mTLS, {len(samples)} queries, {concurrency} concurrent:")
        print(
            f"  p50 {p50 * 1e3:8.2f} ms   p99 {percentile(samples, 99) * 1e3:8.2f} ms"
            f"   {throughput:8.1f} queries/s"
        )
        print(
            f"  ratio: p50 {seed_p50 / p50:6.1f}x lower than the seed, "
            f"throughput {throughput * statistics.mean(seed):6.1f}x the seed's"
        )


if __name__ == "__main__":
    main()
