"""Cost curves: how each cost grows with the fleet, measured on simulated fleets in a
real etcd, in one run, printed as a ratio per tenfold step (nothing here asserts a time).

  * nodes: 1, 10, 100 GPU hosts of 8 GPUs, each split 7 ways (56 to 5,600 slots); the
    other nodes' slots, registrations and holders (all but one slice of each GPU held:
    a busy fleet) are written as their allocators would;
  * users: 100, 1,000, 10,000 in a group's member file;
  * watchers: 200, 1,000 (and 2,000 with --watchers-max 2000) allocation streams.

  * containers: 20, 200, 2,000 on one node's private dockerd, made as the gateway makes
    them (its labels, a `<name>._.<user>` name), of 1,000 users; one real Unix user
    (ds01scale, made with useradd and removed at the end) owns two of them.

At each size: Allocate p50/p99 on this node (as the containers service asks; with a
release each time) and on any node (placement over the whole fleet, with idle GPUs and
with none), the Release alone, a container's stop and start (MarkStopped and
ClearStopped), GetStatus of the whole fleet, GetLimits, event fan-out p99, the
gateway's `docker ps -a` as that user beside the same request to dockerd itself (all
containers, and one of the label filters the gateway sends, which Docker applies by
reading every container: that part of the gateway's cost is Docker's), the
reconcile sweep (its own metric: the first after the new containers were adopted, which
inspects each of them, and those after it, which ask Docker only about containers that
run or that an event named), and the memory of the ds01 process. Run as root:

    .venv/bin/python bench/scale.py [--cycles 100] [--containers-max 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import docker
from _suite import REPO, CpuMeter, Suite, suite
from allocator import fan_out, inventory, pct
from soak import add_accounts, remove_accounts

from ds01.allocator.records import HOLDERS, NODES, SLOTS, Holder, NodeRecord, SlotRecord, slot_key
from ds01.client import ClientIdentity, Ds01Client, Ds01Error
from ds01.core.config import load_config
from ds01.core.etcd import etcd_client
from ds01.core.pki import Pki, issue_client_cert

sys.path.insert(0, str(REPO))
from tests.harness import build_test_image

GPUS_PER_NODE = 8
NODES_STEPS = (1, 10, 100)
USERS_STEPS = (100, 1_000, 10_000)
HERE = "node000"  # the node whose ds01d runs; the others are records in etcd
CONTAINER_STEPS = (20, 200, 2_000)
SCALE_USER = "ds01scale"  # owns two containers at every size; the others are u0..u999
SWEEPS = 3  # sweeps timed at each size (the reconciler's own metric)
# A sweep each 10 s (a lab's default is 30 s): at 2,000 containers a sweep takes seconds,
# and sweeps back to back would time the user's own calls against a node that never
# rests. Adoption does not wait for it: the sweeps Docker's events bring adopt.
SWEEP_INTERVAL = 10

# `docker ps -a`'s request, repeated on one connection; the standard library only, so that
# it runs as any user with the system Python.
LISTING = r"""
import http.client, json, socket, sys, time
class Unix(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=300)
        self.unix_path = path
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(300)
        self.sock.connect(self.unix_path)
connection, seconds = Unix(sys.argv[1]), []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    connection.request("GET", "/containers/json?all=1" + sys.argv[3])
    answer = connection.getresponse()
    body = answer.read()
    seconds.append(time.perf_counter() - start)
    if answer.status != 200:
        sys.exit(f"{answer.status}: {body[:300]!r}")
print(json.dumps({"seconds": seconds, "listed": len(json.loads(body))}))
"""


def limits(users: int) -> str:
    members = ", ".join(f"u{n}" for n in range(users))
    return (
        "defaults:\n  max_gpu_equivalents: null\n  max_gpu_slots_per_container: null\n"
        "  allow_full_gpu: true\n  priority: 10\n"
        f"groups:\n  lab:\n    priority: 20\n    members: [{members}]\n"
    )


async def add_nodes(endpoint: str, pki: Pki, first: int, last: int) -> None:
    """Register nodes ``first``..``last`` - 1 with 8 MIG GPUs each, on one long lease, and
    hold all but one slice of each of their GPUs, as a busy fleet's allocators would."""
    etcd = etcd_client((endpoint,), pki.etcd, "admin")
    tx = etcd.transactions
    lease = await etcd.lease(3600)
    for n in range(first, last):
        node = f"node{n:03d}"
        writes = []
        for gpu in range(GPUS_PER_NODE):
            for instance in range(1, 8):
                slot_id = f"{gpu}:{instance}"
                record = SlotRecord(node, slot_id, f"MIG-{node}-{gpu}-{instance}",
                                    "A100 (simulated)", "1g.10gb", 10 << 30, 1 / 7)  # fmt: skip
                writes.append(tx.put(slot_key(SLOTS, node, slot_id), record.encode()))
                if instance < 7:
                    user = f"u{(n * 56 + gpu * 7 + instance) % 100}"
                    holder = Holder(user, f"h{node}-{gpu}-{instance}._.{user}", time.time(), 20)
                    writes.append(tx.put(slot_key(HOLDERS, node, slot_id), holder.encode()))
        for start in range(0, len(writes), 100):  # etcd takes at most 128 in one
            await etcd.transaction(compare=[], success=writes[start : start + 100], failure=[])
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
                                          "Allocate p50 (any node)": [],
                                          "Allocate p50 (any node, none idle)": [],
                                          "Release p50": [],
                                          "MarkStopped+ClearStopped p50": [],
                                          "GetStatus p50 (whole fleet)": [],
                                          "GetStatus p50 (one user's GPUs)": [],
                                          "GetStatus p50 (one node)": [],
                                          "ds01d memory (MiB)": []}  # fmt: skip
    async with Ds01Client(config, identity, timeout=60) as client:
        for _ in range(100):  # this node registered, as its allocator does
            if any(n.up for n in (await client.gpu_status()).nodes):
                break
            await asyncio.sleep(0.1)
        registered = 1
        releases: list[float] = []  # each cycle's Release alone
        for nodes in NODES_STEPS:
            await add_nodes(endpoint, pki, registered, nodes)
            registered = nodes
            await asyncio.sleep(1)  # the allocator's view follows

            async def cycle(n: int) -> None:
                await client.allocate(f"s{n}._.u{n % 50}", user=f"u{n % 50}", node=HERE)
                start = time.perf_counter()
                await client.release(f"s{n}._.u{n % 50}")
                releases.append(time.perf_counter() - start)

            async def anywhere(n: int) -> None:  # placement over the whole fleet
                await client.allocate(f"a{n}._.u{n % 50}", user=f"u{n % 50}")
                await client.release(f"a{n}._.u{n % 50}")

            await timed(cycle, 10)  # warm-up
            releases.clear()
            samples = await timed(cycle, cycles)
            released = list(releases)
            fleet = await timed(anywhere, cycles)
            # A fleet with no idle GPU left (this node's each hold one slice too): the
            # choice is among the free slices of busy GPUs, the least-allocated first.
            for gpu in range(GPUS_PER_NODE):
                await client.allocate(f"busy{gpu}._.u99", user="u99", node=HERE)
            busy = await timed(anywhere, cycles)
            for gpu in range(GPUS_PER_NODE):
                await client.release(f"busy{gpu}._.u99")
            status = await timed(lambda _n: client.gpu_status(), max(10, cycles // 10))
            # What `ds01 container list` asks: the user's own, whatever the fleet holds.
            await client.allocate("held._.u1", user="u1", node=HERE)
            mine = await timed(lambda _n: client.gpu_status(user="u1"), max(10, cycles // 10))

            async def stop_and_start(_n: int) -> None:  # what a container's stop and start ask
                await client.mark_stopped("held._.u1")
                await client.clear_stopped("held._.u1")

            paused = await timed(stop_and_start, cycles)
            await client.release("held._.u1")
            # What each node's reconciler asks every sweep.
            node = await timed(lambda _n: client.gpu_status(node=HERE), max(10, cycles // 10))
            nodes_rows["Allocate p50"].append(statistics.median(samples) * 1e3)
            nodes_rows["Allocate p99"].append(pct(samples, 99) * 1e3)
            nodes_rows["Allocate p50 (any node)"].append(statistics.median(fleet) * 1e3)
            nodes_rows["Allocate p50 (any node, none idle)"].append(statistics.median(busy) * 1e3)
            nodes_rows["Release p50"].append(statistics.median(released) * 1e3)
            nodes_rows["MarkStopped+ClearStopped p50"].append(statistics.median(paused) * 1e3)
            nodes_rows["GetStatus p50 (whole fleet)"].append(statistics.median(status) * 1e3)
            nodes_rows["GetStatus p50 (one user's GPUs)"].append(statistics.median(mine) * 1e3)
            nodes_rows["GetStatus p50 (one node)"].append(statistics.median(node) * 1e3)
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
        cores: list[str] = []
        for watchers in steps:
            meter = CpuMeter({"ds01d": server_pid})
            try:
                delays = await fan_out(client, watchers, 10, tag=f"w{watchers}-")
            except (TimeoutError, RuntimeError, Ds01Error) as err:  # not all streams held
                print(f"  {watchers} watchers: not measured ({type(err).__name__}: {err})")
                break
            cores.append(f"  {watchers} watchers: {meter.report()}")
            fan_rows["event fan-out p99"].append(pct(delays, 99) * 1e3)
            done.append(watchers)
        show("allocation watchers (one client process):", tuple(done), fan_rows, "ms")
        print("\n".join(cores))


def listing(
    socket: Path, count: int, user: str | None = None, query: str = ""
) -> tuple[list[float], int]:
    """``count`` container listings on ``socket`` as ``user`` (root: None), with
    ``query`` added (``&filters=...``), and how many containers the last one showed."""
    who = ["runuser", "-u", user, "--"] if user else []
    argv = [*who, "/usr/bin/python3", "-c", LISTING, str(socket), str(count), query]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"listing as {user or 'root'} failed: {done.stderr.strip()}")
    result = json.loads(done.stdout)
    return result["seconds"], result["listed"]


def add_containers(client: docker.DockerClient, image: str, first: int, last: int) -> None:
    """Containers ``first``..``last`` - 1, created (not started) as the gateway makes them."""

    def make(n: int) -> None:
        owner = SCALE_USER if n < 2 else f"u{n % 1000}"
        labels = {"ds01.user": owner, "ds01.managed": "true", "ds01.gateway": "true"}
        client.containers.create(image, "true", name=f"c{n}._.{owner}", labels=labels,
                                 network_mode="none")  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(make, range(first, last)))


def scrape(running: Suite, service: str) -> dict[str, float]:
    """One service's /metrics, each series by its full name (labels included)."""
    token = (running.root / "metrics.token").read_text().strip()
    request = urllib.request.Request(f"http://127.0.0.1:{running.metrics[service]}/metrics")
    request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=300) as answer:
        text = answer.read().decode()
    series = (line.rsplit(" ", 1) for line in text.splitlines() if line[:1] not in ("#", ""))
    return {name: float(value) for name, value in series}


def wait_for(condition: object, what: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        time.sleep(1)


def sweep_seconds(running: Suite, sweeps: int) -> float:
    """The mean time of the next ``sweeps`` sweeps, from the reconciler's metric."""
    count, total = "ds01_reconcile_sweep_seconds_count", "ds01_reconcile_sweep_seconds_sum"
    before = scrape(running, "containers")
    wait_for(lambda: scrape(running, "containers")[count] >= before[count] + sweeps, "sweeps")
    after = scrape(running, "containers")
    return (after[total] - before[total]) / (after[count] - before[count])


async def own_calls(
    running: Suite, identity: ClientIdentity, image: str, count: int
) -> tuple[list[float], list[float]]:
    """That user's own calls to ds01, as `ds01 container list` and `create` make them:
    what one request touches should not grow with the node's other containers."""
    async with Ds01Client(load_config(running.config_path), identity, timeout=120) as client:
        listed = await timed(lambda _n: client.list_containers(), count)
        created = []
        for _ in range(max(3, count // 4)):
            start = time.perf_counter()
            await client.create_container("probe", image, gpus=0)
            created.append(time.perf_counter() - start)
            await client.remove_container("probe")
    return listed, created


def measure_containers(running: Suite, largest: int, listings: int) -> None:
    assert running.docker_socket is not None
    client = docker.DockerClient(base_url=f"unix://{running.docker_socket}", max_pool_size=16)
    image = build_test_image(running.docker_socket)
    gateway = running.root / "run" / "docker.sock"
    rows: dict[str, list[float]] = {"docker ps -a via the gateway p50": [],
                                    "docker ps -a on dockerd itself p50": [],
                                    "the same, the user's label only, p50": [],
                                    "ds01 container list p50": [],
                                    "ds01 container create p50": [],
                                    "reconcile sweep, first after adoption": [],
                                    "reconcile sweep, then (mean of 3)": []}  # fmt: skip
    identity = ClientIdentity(running.pki.ca_cert, issue_client_cert(running.pki, SCALE_USER))
    memory: list[float] = []
    made = 0
    steps = tuple(n for n in CONTAINER_STEPS if n <= largest)
    for step in steps:
        add_containers(client, image, made, step)
        made = step

        def recorded(step: int = step) -> bool:
            metrics = scrape(running, "containers")
            return (
                sum(v for k, v in metrics.items() if k.startswith("ds01_containers_total")) >= step
            )

        wait_for(recorded, f"the reconciler to adopt {step} containers")
        # The sweeps first: the user's calls are timed on a node at rest, not in the
        # storm of adopting a thousand containers at once.
        first = sweep_seconds(running, 1)
        sweep = sweep_seconds(running, SWEEPS)
        through, mine = listing(gateway, listings, SCALE_USER)
        bare, everyone = listing(running.docker_socket, listings)
        # What Docker itself spends on one of the label filters the gateway asks for:
        # it reads every container to apply one, so that part grows with the node.
        label = quote(json.dumps({"label": [f"ds01.user={SCALE_USER}"]}))
        filtered, labelled = listing(running.docker_socket, listings, query=f"&filters={label}")
        assert (mine, everyone, labelled) == (2, step, 2), (
            f"listed {mine} of {SCALE_USER}'s, {everyone} in all"
        )
        rows["docker ps -a via the gateway p50"].append(statistics.median(through) * 1e3)
        rows["docker ps -a on dockerd itself p50"].append(statistics.median(bare) * 1e3)
        rows["the same, the user's label only, p50"].append(statistics.median(filtered) * 1e3)
        listed, created = asyncio.run(own_calls(running, identity, image, listings))
        rows["ds01 container list p50"].append(statistics.median(listed) * 1e3)
        rows["ds01 container create p50"].append(statistics.median(created) * 1e3)
        rows["reconcile sweep, first after adoption"].append(first * 1e3)
        rows["reconcile sweep, then (mean of 3)"].append(sweep * 1e3)
        memory.append(rss_mib(running.server_pid))
    show("containers on the node (a user with 2 of them lists theirs):", steps, rows, "ms")
    show("", steps, {"ds01d memory (4 services)": memory}, "MiB")
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--watchers-max", type=int, default=1_000)
    parser.add_argument("--containers-max", type=int, default=2_000, help="0: not measured")
    parser.add_argument("--listings", type=int, default=20, help="docker ps -a at each size")
    args = parser.parse_args()
    if args.cycles:
        with suite("limits,allocator", limits(100), inventory(GPUS_PER_NODE), etcd=True,
                   node=HERE) as running:  # fmt: skip
            asyncio.run(measure(running, args.cycles, args.watchers_max, running.server_pid))
    if not args.containers_max:
        return
    made: list[str] = []
    try:
        add_accounts([SCALE_USER], made)
        log = Path("/tmp/ds01-bench-scale.log")  # the adoptions' warnings, one a container
        with suite("limits,allocator,containers,ownership", limits(1000), etcd=True,
                   docker=True, metrics=True, node=HERE, server_log=log,
                   containers={"reconcile_interval": SWEEP_INTERVAL}) as running:  # fmt: skip
            measure_containers(running, args.containers_max, args.listings)
        print(f"(ds01d's log: {log})")
    finally:
        remove_accounts(made)


if __name__ == "__main__":
    main()
