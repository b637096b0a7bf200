"""Soak: many users cycle create -> start -> stop -> remove through ds01 at once, beside
the bare Docker SDK at the same concurrency; then a look for what the cycles left behind.

Measured in one run, one side after the other (bare Docker first), for the same time on
the same private dockerd with the same image, limits and network (none):
  * per call (create, start, stop, remove): count, p50, p99 and the errors by message;
  * whole cycles: how many, cycles/s and the p50 of one cycle, ds01 beside bare Docker,
    printed as ratios (nothing here asserts a time). Throughput counts the cycles that
    ended while every user's loop ran (by the deadline, after which no loop begins
    another): the cycles that end after it run with fewer and fewer users, at another
    concurrency. The figure with them is printed too;
  * leaks, once every loop has stopped and every container is removed: etcd keys (GPU
    holders, container records, create intents, user locks), Docker containers labelled
    ds01.managed=true, and the soak users' cgroups;
  * a dockerd that stalls (no answer to /_ping, or no call of the loops finished, for
    30 s): its goroutine stacks, kept beside ds01d's log for a look at what it waits on.

Each ds01 user runs its own loop, with its own client and certificate, on one container
name it creates again every cycle; half of them ask for one GPU (a simulated MIG slice).
The users are real Unix accounts (ds01soak00, ds01soak01, ...) made with useradd -m at
the start and removed with userdel -r at the end. Run as root:

    .venv/bin/python bench/soak.py [--users 50] [--seconds 120]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import pwd
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import docker
import grpc
from _suite import REPO, CpuMeter, Progress, Stall, Suite, suite, watching_dockerd
from allocator import inventory, pct
from containers import bare_create

from ds01.client import ClientIdentity, Ds01Client, Ds01Error
from ds01.core.config import load_config
from ds01.core.etcd import etcd_client
from ds01.core.pki import Pki, issue_client_cert

sys.path.insert(0, str(REPO))
from tests.harness import build_test_image

PREFIX = "ds01soak"  # never ds01alice, ds01bob or ds01lab: those are the test suite's
CALLS = ("create", "start", "stop", "remove")
NAME = "soak"  # each ds01 user's one container, created again every cycle
SLICES_PER_GPU = 7  # bench/allocator.py's inventory: seven 1g.10gb slices per GPU
ETCD_PREFIXES = (
    "/ds01/v1/alloc/holders/",
    "/ds01/v1/containers/",
    "/ds01/v1/containers-by-user/",
    "/ds01/v1/intents/",
    "/ds01/v1/locks/users/",
)
# One MIG slice per user, two containers, and a stopped container frees its GPU at once.
LIMITS = (
    "defaults:\n"
    "  max_gpu_equivalents: 1\n  max_gpu_slots_per_container: 1\n  allow_full_gpu: false\n"
    "  max_cpus: 1\n  memory: 256m\n  memory_swap: 256m\n  shm_size: 32m\n"
    "  pids_limit: 128\n  max_containers_per_user: 2\n  gpu_hold_after_stop: 0\n"
    "  priority: 10\n"
)
_LOG_START = re.compile(r"^\d{4}-\d\d-\d\dT")
_LOG_RECORD = re.compile(r"^\S+ (WARNING|ERROR|CRITICAL)\s+(\S+): (.*)$")
# What differs between otherwise equal error messages: user, container, ids.
_VARYING = (
    (re.compile(rf"{PREFIX}\d+"), f"{PREFIX}NN"),
    (re.compile(r"bare-\d+-\d+"), "bare-N-N"),
    (re.compile(r"\b[0-9a-f]{12,64}\b"), "<id>"),
)


def normalized(message: str) -> str:
    for pattern, replacement in _VARYING:
        message = pattern.sub(replacement, message)
    return " ".join(message.split())[:400]


@dataclass
class Recorder:
    """What one side (ds01 or bare Docker) measured; shared by its threads or tasks."""

    calls: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CALLS})
    errors: dict[str, Counter[str]] = field(default_factory=lambda: {c: Counter() for c in CALLS})
    cycles: list[float] = field(default_factory=list)
    ended: list[float] = field(default_factory=list)  # time.monotonic() at each cycle's end
    deadline: float = 0.0  # time.monotonic(): no loop begins a cycle after it
    window: float = 0.0  # seconds from the loops' start to the deadline
    elapsed: float = 0.0  # from the loops' start to the last cycle's end
    lock: threading.Lock = field(default_factory=threading.Lock)
    progress: Progress = field(default_factory=Progress)  # watched for a stalled dockerd

    def ok(self, call: str, seconds: float) -> None:
        self.progress.done()
        with self.lock:
            self.calls[call].append(seconds)

    def failed(self, call: str, err: BaseException) -> None:
        self.progress.done()
        with self.lock:
            self.errors[call][normalized(str(err) or type(err).__name__)] += 1

    def cycle(self, seconds: float) -> None:
        with self.lock:
            self.cycles.append(seconds)
            self.ended.append(time.monotonic())

    def begin(self, seconds: float) -> None:
        """Mark the loops' start; the deadline is ``seconds`` later."""
        self.window, self.deadline = seconds, time.monotonic() + seconds

    def more(self) -> bool:
        """Whether a loop may begin another cycle: before the deadline, with dockerd not
        stalled."""
        return time.monotonic() < self.deadline and not self.progress.stalled.is_set()

    @property
    def rate(self) -> float:
        """Cycles a second while every user's loop ran: those ended by the deadline. The
        ones after it end with fewer and fewer users at work, at another concurrency."""
        done = sum(1 for end in self.ended if end <= self.deadline)
        return done / self.window if self.window else 0.0

    @property
    def rate_to_the_end(self) -> float:
        """Every cycle over the time until the last ended (this bench's figure before)."""
        return len(self.cycles) / self.elapsed if self.elapsed else 0.0


# --- bare Docker SDK: one thread per user ------------------------------------------------


def timed_sync(recorder: Recorder, call: str, work: Callable[[], object]) -> bool:
    start = time.perf_counter()
    try:
        work()
    except Exception as err:
        recorder.failed(call, err)
        return False
    recorder.ok(call, time.perf_counter() - start)
    return True


def bare_cycle(client: docker.DockerClient, image: str, name: str, recorder: Recorder) -> None:
    """One create/start/stop/remove, as bench/containers.py's bare_cycle does it."""
    made: list[docker.models.containers.Container] = []
    start = time.perf_counter()

    def create() -> None:
        made.append(bare_create(client, image, name))

    if not timed_sync(recorder, "create", create):
        time.sleep(0.5)  # a failing create must not spin
        return
    container = made[0]
    ok = timed_sync(recorder, "start", container.start)
    ok = ok and timed_sync(recorder, "stop", lambda: container.stop(timeout=10))
    removed = timed_sync(recorder, "remove", lambda: container.remove(force=True))
    if ok and removed:
        recorder.cycle(time.perf_counter() - start)


def bare_worker(socket: Path, image: str, worker: int, recorder: Recorder) -> None:
    client = docker.DockerClient(base_url=f"unix://{socket}", timeout=120)
    try:
        cycle = 0
        while recorder.more():
            bare_cycle(client, image, f"bare-{worker}-{cycle}", recorder)
            cycle += 1
    finally:
        client.close()


def run_bare(
    socket: Path, image: str, workers: int, seconds: float, progress: Progress
) -> Recorder:
    recorder = Recorder(progress=progress)
    recorder.begin(seconds)
    threads = [
        threading.Thread(target=bare_worker, args=(socket, image, w, recorder))
        for w in range(workers)
    ]
    start = time.perf_counter()
    with progress.expecting():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    recorder.elapsed = time.perf_counter() - start
    return recorder


def warm_up(socket: Path, image: str) -> None:
    """One bare cycle, not counted: the first create on a fresh dockerd is slow."""
    client = docker.DockerClient(base_url=f"unix://{socket}", timeout=120)
    try:
        bare_cycle(client, image, "bare-warm-up", Recorder())
    finally:
        client.close()


def remove_bare_left(socket: Path, progress: Progress) -> int:
    """Remove what failed bare cycles left; returns how many there were."""
    client = docker.DockerClient(base_url=f"unix://{socket}", timeout=120)
    try:
        with progress.expecting():
            left = client.containers.list(all=True, filters={"name": "bare-"})
            for container in left:
                container.remove(force=True)
                progress.done()
        return len(left)
    finally:
        client.close()


# --- ds01: one asyncio loop (task) per user, each with its own client --------------------


async def timed(recorder: Recorder, call: str, work: Awaitable[object]) -> Exception | None:
    start = time.perf_counter()
    try:
        await work
    except Exception as err:
        recorder.failed(call, err)
        return err
    recorder.ok(call, time.perf_counter() - start)
    return None


async def ds01_cycle(client: Ds01Client, image: str, gpus: int, recorder: Recorder) -> None:
    start = time.perf_counter()
    err = await timed(recorder, "create", client.create_container(NAME, image, gpus=gpus))
    if err is not None:
        if isinstance(err, Ds01Error) and err.code == grpc.StatusCode.ALREADY_EXISTS:
            with contextlib.suppress(Ds01Error):  # left by a failed remove: clear the name
                await client.remove_container(NAME)
        await asyncio.sleep(0.5)  # a failing create must not spin
        return
    ok = await timed(recorder, "start", client.start_container(NAME)) is None
    ok = ok and await timed(recorder, "stop", client.stop_container(NAME)) is None
    removed = await timed(recorder, "remove", client.remove_container(NAME)) is None
    if ok and removed:
        recorder.cycle(time.perf_counter() - start)


async def ds01_user(
    config_path: Path,
    identity: ClientIdentity,
    image: str,
    gpus: int,
    recorder: Recorder,
) -> None:
    async with Ds01Client(load_config(config_path), identity, timeout=120) as client:
        while recorder.more():
            await ds01_cycle(client, image, gpus, recorder)


async def run_ds01(
    config_path: Path,
    identities: dict[str, ClientIdentity],
    image: str,
    seconds: float,
    progress: Progress,
) -> Recorder:
    """Every other user (the first, the third, ...) asks for one GPU."""
    recorder = Recorder(progress=progress)
    recorder.begin(seconds)
    start = time.perf_counter()
    with progress.expecting():
        await asyncio.gather(
            *(
                ds01_user(config_path, identity, image, 1 - i % 2, recorder)
                for i, identity in enumerate(identities.values())
            )
        )
    recorder.elapsed = time.perf_counter() - start
    return recorder


async def remove_ds01_left(config_path: Path, identity: ClientIdentity) -> int:
    """Remove a user's containers that failed cycles left; returns how many there were."""
    async with Ds01Client(load_config(config_path), identity, timeout=120) as client:
        left = await client.list_containers()
        for container in left:
            with contextlib.suppress(Ds01Error):
                await client.remove_container(container.name)
    return len(left)


async def wait_ready(config_path: Path, pki: Pki) -> None:
    """Until the containers service serves and the allocator's node is up."""
    identity = ClientIdentity(pki.ca_cert, pki.client("root"))
    async with Ds01Client(load_config(config_path), identity, timeout=10) as client:
        for _ in range(300):
            with contextlib.suppress(Ds01Error):
                if await client.health("containers") == "SERVING" and any(
                    node.up for node in (await client.gpu_status()).nodes
                ):
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError("ds01 was not ready 30 s after it started")


# --- leaks ------------------------------------------------------------------------------


async def etcd_left(endpoint: str, pki: Pki) -> dict[str, list[str]]:
    etcd = etcd_client((endpoint,), pki.etcd, "admin")
    try:
        return {
            prefix: [kv.key.decode() for kv in await etcd.get_prefix(prefix.encode())]
            for prefix in ETCD_PREFIXES
        }
    finally:
        await etcd.close()


def docker_left(socket: Path) -> list[str]:
    client = docker.DockerClient(base_url=f"unix://{socket}", timeout=120)
    try:
        found = client.containers.list(all=True, filters={"label": "ds01.managed=true"})
        return [container.name for container in found]
    finally:
        client.close()


def cgroup_roots() -> list[Path]:
    """ds01's cgroupfs trees: one on cgroup v2, one per controller on v1."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return [base / "ds01"]
    return sorted(base.glob("*/ds01"))


def soak_cgroups(users: list[str]) -> tuple[list[Path], list[Path]]:
    """The soak users' own directories (<root>/<group>/<user>) and those below them."""
    wanted = set(users)
    own = [d for root in cgroup_roots() for d in root.glob(f"*/{PREFIX}*") if d.name in wanted]
    below = [c for d in own for c in d.rglob("*") if c.is_dir()]
    return own, below


def has_processes(directory: Path) -> bool:
    try:
        return bool((directory / "cgroup.procs").read_text().strip())
    except OSError:
        return False


@dataclass
class Leaks:
    etcd: dict[str, list[str]]
    containers: list[str]
    busy_cgroups: list[str]
    container_cgroups: list[str]
    user_cgroups: int  # the users' own (empty) directories: Docker leaves cgroup parents

    @property
    def found(self) -> dict[str, list[str]]:
        items = {f"etcd {prefix}": keys for prefix, keys in self.etcd.items()}
        items["Docker containers labelled ds01.managed=true"] = self.containers
        items["soak cgroups holding processes"] = self.busy_cgroups
        items["soak container cgroups left"] = self.container_cgroups
        return items


async def look_for_leaks(running: Suite, users: list[str]) -> Leaks:
    assert running.docker_socket is not None
    own, below = soak_cgroups(users)
    return Leaks(
        etcd=await etcd_left(running.etcd_endpoint, running.pki),
        containers=await asyncio.to_thread(docker_left, running.docker_socket),
        busy_cgroups=[str(d) for d in own + below if has_processes(d)],
        container_cgroups=[str(d) for d in below],
        user_cgroups=len(own),
    )


# --- ds01d's log ---------------------------------------------------------------------------


def log_records(text: str) -> list[tuple[str, str]]:
    """(first line, last line of what follows it: a traceback's exception) per record."""
    records: list[tuple[str, str]] = []
    for line in text.splitlines():
        if _LOG_START.match(line):
            records.append((line, ""))
        elif records and line.strip():
            records[-1] = (records[-1][0], line.strip())
    return records


def log_summary(path: Path) -> Counter[str]:
    """ds01d's warnings and errors, counted by message."""
    found: Counter[str] = Counter()
    for first, last in log_records(path.read_text(errors="replace")):
        if match := _LOG_RECORD.match(first):
            level, logger, message = match.groups()
            cause = f" <- {last}" if last else ""
            found[normalized(f"{level} {logger}: {message}{cause}")] += 1
    return found


def print_log_summary(path: Path) -> None:
    found = log_summary(path)
    print(f"ds01d warnings and errors, by message ({sum(found.values())}; log {path}):")
    for message, count in found.most_common(25):
        print(f"  x{count}: {message}")
    if len(found) > 25:
        print(f"  ... and {len(found) - 25} other messages")


# --- accounts -----------------------------------------------------------------------------


def account_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def add_accounts(users: list[str], made: list[str]) -> None:
    """useradd -m each user; ``made`` lists those made, for the finally that removes them."""
    taken = [user for user in users if account_exists(user)]
    if taken:
        raise SystemExit(
            f"accounts {', '.join(taken)} exist already (an earlier soak killed before its "
            "cleanup?): remove them with userdel -r, then run again"
        )
    for user in users:
        subprocess.run(["useradd", "-m", user], check=True, capture_output=True)
        made.append(user)


def remove_accounts(users: list[str]) -> None:
    for user in users:
        done = subprocess.run(["userdel", "-r", user], capture_output=True, text=True)
        if done.returncode != 0 and account_exists(user):
            print(f"userdel -r {user} failed: {done.stderr.strip()}", file=sys.stderr)


def remove_user_cgroups(users: list[str]) -> None:
    """The empty cgroup directories Docker made for the soak users, deepest first."""
    own, below = soak_cgroups(users)
    for directory in sorted(own + below, key=lambda d: len(d.parts), reverse=True):
        with contextlib.suppress(OSError):
            directory.rmdir()


# --- the run and its report ---------------------------------------------------------------


@dataclass
class Outcome:
    bare: Recorder
    ours: Recorder
    bare_left: int
    ours_left: int
    leaks: Leaks
    later: Leaks | None  # looked again after a while, when the first look found some
    busy: dict[str, str]  # each side: the cores each process kept busy (CpuMeter)


class Stalled(Exception):
    """dockerd stalled: nothing this run measured compares with another run."""

    def __init__(self, stall: Stall) -> None:
        kept = stall.stacks or "none written; its log is beside where they would be"
        super().__init__(
            f"dockerd stalled {stall.at:.0f} s into the run; its goroutine stacks: {kept}"
        )


async def measure(running: Suite, users: list[str], seconds: float, keep: Path) -> Outcome:
    progress = Progress()
    with watching_dockerd(running, keep, progress) as stalls:
        outcome = await measure_sides(running, users, seconds, progress)
    if stalls or outcome is None:  # the watch ended with its stall recorded
        raise Stalled(stalls[0])
    return outcome


async def measure_sides(
    running: Suite, users: list[str], seconds: float, progress: Progress
) -> Outcome | None:
    assert running.docker_socket is not None
    socket = running.docker_socket
    image = await asyncio.to_thread(build_test_image, socket)
    identities = {
        user: ClientIdentity(running.pki.ca_cert, issue_client_cert(running.pki, user))
        for user in users
    }
    await wait_ready(running.config_path, running.pki)
    await asyncio.to_thread(warm_up, socket, image)
    meter = CpuMeter(running.processes)
    bare = await asyncio.to_thread(run_bare, socket, image, len(users), seconds, progress)
    busy = {"bare": meter.report()}
    bare_left = await asyncio.to_thread(remove_bare_left, socket, progress)
    if progress.stalled.is_set():
        return None  # nothing more to measure
    meter = CpuMeter(running.processes)
    ours = await run_ds01(running.config_path, identities, image, seconds, progress)
    busy["ds01"] = meter.report()
    left = await asyncio.gather(
        *(remove_ds01_left(running.config_path, identity) for identity in identities.values())
    )
    leaks = await look_for_leaks(running, users)
    later = None
    if any(leaks.found.values()):
        await asyncio.sleep(10)  # the repair loop runs every 5 s; hold leases last 1 s
        later = await look_for_leaks(running, users)
    return Outcome(bare, ours, bare_left, sum(left), leaks, later, busy)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.1f}"


def print_calls(side: str, recorder: Recorder) -> None:
    for call in CALLS:
        samples, errors = recorder.calls[call], sum(recorder.errors[call].values())
        if samples:
            p50, p99 = ms(statistics.median(samples)), ms(pct(samples, 99))
        else:
            p50 = p99 = f"{'-':>9}"
        print(f"  {side:<5} {call:<7} {len(samples) + errors:7d} {p50} {p99} {errors:7d}")


def print_errors(side: str, recorder: Recorder) -> None:
    for call in CALLS:
        for message, count in recorder.errors[call].most_common():
            print(f"  {side} {call} x{count}: {message}")


def print_cycles(bare: Recorder, ours: Recorder) -> None:
    print("whole cycles (create+start+stop+remove, all four succeeded):")
    for side, recorder in (("bare", bare), ("ds01", ours)):
        p50 = ms(statistics.median(recorder.cycles)) if recorder.cycles else f"{'-':>9}"
        print(
            f"  {side:<5} {recorder.rate:5.2f} cycles/s while every user ran"
            f" ({recorder.rate * recorder.window:.0f} in {recorder.window:g} s);"
            f" {recorder.rate_to_the_end:5.2f}/s with the {len(recorder.cycles)} that ended"
            f" by {recorder.elapsed:.1f} s   p50 {p50} ms"
        )
    if bare.cycles and ours.cycles:
        ratio = statistics.median(ours.cycles) / statistics.median(bare.cycles)
        print(
            f"  ratio ds01/bare: throughput {ours.rate / bare.rate:.2f}x while every user ran"
            f" ({ours.rate_to_the_end / bare.rate_to_the_end:.2f}x with the cycles after the"
            f" deadline, when fewer users are left), cycle p50 {ratio:.2f}x"
        )


def print_leaks(title: str, leaks: Leaks) -> None:
    print(title)
    for what, items in leaks.found.items():
        print(f"  {what:<45} {len(items):5d}")
        for item in items[:20]:
            print(f"      {item}")
        if len(items) > 20:
            print(f"      ... and {len(items) - 20} more")
    print(
        f"  (not counted: the soak users' own cgroup directories, Docker's parents, one per"
        f" controller on cgroup v1: {leaks.user_cgroups}; removed after userdel)"
    )
    if not any(leaks.found.values()):
        print("no leaks")


def report(users: int, seconds: float, outcome: Outcome) -> None:
    gpu_users = (users + 1) // 2
    print(
        f"soak: {users} concurrent users, {seconds:g} s per side (bare Docker, then ds01),"
        f" one private dockerd, network none; {gpu_users} ds01 users ask for one GPU"
    )
    print(f"  {'side':<5} {'call':<7} {'calls':>7} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}")
    print_calls("bare", outcome.bare)
    print_calls("ds01", outcome.ours)
    print_cycles(outcome.bare, outcome.ours)
    for side, busy in outcome.busy.items():  # dockerd's: without containerd and the shims
        print(f"  {side:<5} {busy}")
    if any(sum(r.errors[c].values()) for r in (outcome.bare, outcome.ours) for c in CALLS):
        print("errors, by message:")
        print_errors("bare", outcome.bare)
        print_errors("ds01", outcome.ours)
    print(
        f"containers left by failed cycles, removed after the loops: "
        f"bare {outcome.bare_left}, ds01 {outcome.ours_left}"
    )
    print_leaks("leaks, after every loop stopped and every container was removed:", outcome.leaks)
    if outcome.later is not None:
        print_leaks("leaks, looked again 10 s later:", outcome.later)


def soak(users: list[str], seconds: float) -> None:
    gpus = math.ceil(len(users) / 2 / SLICES_PER_GPU) + 1  # a spare GPU of slices
    run = f"/tmp/ds01-soak-{time.strftime('%Y%m%d-%H%M%S')}"
    log = Path(f"{run}.log")
    with suite(
        "limits,allocator,containers",
        LIMITS,
        inventory=inventory(gpus),
        etcd=True,
        docker=True,
        server_log=log,
    ) as running:
        try:
            outcome = asyncio.run(measure(running, users, seconds, Path(f"{run}-dockerd")))
        except Stalled as stalled:
            print(stalled)
            print_log_summary(log)
            sys.exit(1)
    report(len(users), seconds, outcome)
    print_log_summary(log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=120)
    args = parser.parse_args()
    users = [f"{PREFIX}{i:02d}" for i in range(args.users)]
    made: list[str] = []
    try:
        add_accounts(users, made)
        soak(users, args.seconds)
    finally:
        remove_accounts(made)
        remove_user_cgroups(made)


if __name__ == "__main__":
    main()
