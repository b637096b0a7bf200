"""A throwaway ds01 deployment for the benchmarks: PKI, config and ds01d in a temp dir."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ds01.core.pki import Pki, init_pki
from ds01.core.processes import (
    ManagedProcess,
    docker_answers,
    free_port,
    start_dockerd,
    start_etcd,
)

REPO = Path(__file__).resolve().parent.parent


SERVICES = ("limits", "allocator", "containers", "ownership")


@dataclass
class Suite:
    root: Path
    config_path: Path
    pki: Pki
    etcd_endpoint: str
    docker_socket: Path | None
    metrics: dict[str, int]  # each service's /metrics port; empty when metrics are off
    server_pid: int = 0  # ds01d's
    # One configuration per allocator process (the first is config_path's ds01d).
    allocator_configs: list[Path] = field(default_factory=list)
    processes: dict[str, int] = field(default_factory=dict)  # name -> pid, for CpuMeter


class CpuMeter:
    """CPU time of named processes (and this one) between two readings: where a run's
    time went on a machine whose cores are all busy."""

    def __init__(self, processes: dict[str, int]) -> None:
        self.processes = {**processes, "this bench (its clients)": os.getpid()}
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.started = self._read()
        self.at = time.perf_counter()

    def _read(self) -> dict[str, float]:
        used = {}
        for name, pid in self.processes.items():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                used[name] = (int(fields[11]) + int(fields[12])) / self.ticks  # utime, stime
        return used

    def report(self) -> str:
        """Cores each process kept busy since this meter was made, and all together."""
        now, wall = self._read(), time.perf_counter() - self.at
        cores = {n: (now[n] - self.started.get(n, 0.0)) / wall for n in now}
        parts = ", ".join(f"{name} {used:.2f}" for name, used in cores.items())
        return f"cores busy: {parts}; all {sum(cores.values()):.2f} of {os.cpu_count()}"


@contextlib.contextmanager
def in_background(work: Callable[[threading.Event], None]) -> Iterator[None]:
    """Run ``work`` in a thread while the block runs; the event it gets is set at the
    block's end, and the thread joined."""
    done = threading.Event()
    thread = threading.Thread(target=work, args=(done,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@dataclass
class Stall:
    """dockerd stopped answering: when, and where its goroutine stacks were kept."""

    at: float  # seconds into the watch
    stacks: Path | None


@dataclass
class Progress:
    """When a bench's Docker calls last finished, while it expects them to."""

    expected: bool = False
    last: float = 0.0  # time.monotonic()
    stalled: threading.Event = field(default_factory=threading.Event)  # make no new calls

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        self.last, self.expected = time.monotonic(), True
        try:
            yield
        finally:
            self.expected = False

    def done(self) -> None:
        self.last = time.monotonic()

    def quiet(self) -> float:
        """Seconds since a call last finished, while calls are expected; else 0."""
        return time.monotonic() - self.last if self.expected else 0.0


@contextlib.contextmanager
def watching_dockerd(
    running: Suite, keep: Path, progress: Progress, patience: float = 30.0
) -> Iterator[list[Stall]]:
    """Watch the bench's dockerd every 2 s. When it has not answered /_ping, or no call
    of the bench has finished, for ``patience`` seconds, ask it for its goroutine stacks
    (SIGUSR1) and copy them, with its log, to ``keep``: what a stalled dockerd waits on
    is lost once the bench ends. (A dockerd whose containers are stuck answers /_ping
    all the same: only its calls on those containers hang.) Then ``progress.stalled`` is
    set: the bench makes no new calls. Yields the stalls seen (one at most)."""
    assert running.docker_socket is not None
    docker_root = running.docker_socket.parent
    stalls: list[Stall] = []
    began = time.monotonic()

    def watch(done: threading.Event) -> None:
        answered = time.monotonic()
        while not done.wait(2.0):
            now = time.monotonic()
            if docker_answers(running.docker_socket):
                answered = now
            if now - answered >= patience or progress.quiet() >= patience:
                since = min(answered, now - progress.quiet()) - began
                progress.stalled.set()
                stalls.append(Stall(since, _dump_stacks(docker_root, keep)))
                print(f"dockerd stalled; its goroutine stacks: {stalls[0].stacks}", flush=True)
                return

    with in_background(watch):
        yield stalls


def _dump_stacks(docker_root: Path, keep: Path) -> Path | None:
    """dockerd's goroutine stacks (it writes them under its exec root) and log, copied to
    ``keep``; the stacks' copy, if it wrote any within 10 s."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((docker_root / "docker.pid").read_text()), signal.SIGUSR1)
    keep.mkdir(parents=True, exist_ok=True)
    for _ in range(20):
        time.sleep(0.5)
        if found := sorted(docker_root.rglob("goroutine-stacks-*.log")):
            time.sleep(1.0)  # written at once, but let it finish
            shutil.copy(found[-1], keep / found[-1].name)
            shutil.copy(docker_root / "dockerd.log", keep / "dockerd.log")
            return keep / found[-1].name
    with contextlib.suppress(OSError):
        shutil.copy(docker_root / "dockerd.log", keep / "dockerd.log")
    return None


@contextlib.contextmanager
def scraping(running: Suite, interval: float = 1.0) -> Iterator[list[int]]:
    """Scrape every /metrics each ``interval`` seconds, as Prometheus would (but more
    often than its default 15 s), while the bench runs; yields the scrape count."""
    count = [0]

    def scrape(done: threading.Event) -> None:
        while running.metrics and not done.wait(interval):
            token = (running.root / "metrics.token").read_text().strip()
            for port in running.metrics.values():
                request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
                request.add_header("Authorization", f"Bearer {token}")
                with contextlib.suppress(OSError), urllib.request.urlopen(request, timeout=5):
                    count[0] += 1

    with in_background(scrape):
        yield count


@contextlib.contextmanager
def suite(
    services: str,
    limits: str,
    inventory: str = "gpus: []\n",
    etcd: bool = False,
    docker: bool = False,
    server_log: Path | None = None,
    metrics: bool = False,
    node: str | None = None,
    allocators: int = 1,
    containers: dict[str, object] | None = None,
) -> Iterator[Suite]:
    """Start ``ds01d --services SERVICES`` (and an etcd / a private dockerd) for a bench.

    ``server_log``: a file for ds01d's log (its stderr) instead of this terminal;
    ``metrics``: each service serves /metrics (off: no metrics code runs at all);
    ``allocators``: that many allocator processes in all, each on its own port;
    ``containers``: the containers section of the configuration (network mode none)."""
    with tempfile.TemporaryDirectory(prefix="ds01-bench-", dir="/tmp") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # local users reach the proxy and enrollment sockets in it
        daemons: list[ManagedProcess] = []
        pki = Pki(root / "pki")
        init_pki(pki, admin="root")
        etcd_port = free_port()
        if etcd:
            daemons.append(start_etcd(root / "etcd" / "data", etcd_port, pki.etcd))
        socket = None
        if docker:
            daemons.append(start_dockerd(root / "docker"))
            socket = root / "docker" / "docker.sock"
        (root / "resource-limits.yaml").write_text(limits)
        (root / "inventory.yaml").write_text(inventory)
        ports = {s: free_port() for s in SERVICES} if metrics else {}
        listen = {s: f"127.0.0.1:{ports[s]}" if metrics else "off" for s in SERVICES}
        config_path = root / "ds01.yaml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    **({"node": node} if node else {}),
                    "state_dir": tmp,
                    "listen": {s: f"127.0.0.1:{free_port()}" for s in SERVICES},
                    "etcd": {"endpoints": [f"127.0.0.1:{etcd_port}"]},
                    "limits_file": "resource-limits.yaml",
                    "inventory": {"source": "declared", "file": "inventory.yaml"},
                    "containers": {"network_mode": "none", **(containers or {})},
                    "ownership": {
                        "enroll_socket": str(root / "run" / "enroll.sock"),
                        "proxy_socket": str(root / "run" / "docker.sock"),
                    },
                    "docker": {"host": f"unix://{socket}" if socket else "unix:///none"},
                    "metrics": {"listen": listen},
                    "log_level": "warning",
                }
            )
        )
        log = server_log.open("ab") if server_log else None
        configs = [config_path, *_more_allocators(config_path, allocators - 1)]
        ds01d = str(REPO / ".venv" / "bin" / "ds01d")
        servers = [
            subprocess.Popen(
                [ds01d, "--config", str(c), "--services", services if n == 0 else "allocator"],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            for n, c in enumerate(configs)
        ]
        try:
            time.sleep(1.5)
            endpoint = f"127.0.0.1:{etcd_port}"
            processes = {d.name: d.pid for d in daemons}
            processes |= {f"ds01d {services}": servers[0].pid}
            processes |= {f"allocator {n + 1}": p.pid for n, p in enumerate(servers[1:], 1)}
            yield Suite(root, config_path, pki, endpoint, socket, ports, servers[0].pid, configs,
                        processes)  # fmt: skip
        finally:
            for server in reversed(servers):  # the limits service last: others follow it
                server.terminate()
                server.wait()
            if log:
                log.close()
            for daemon in reversed(daemons):
                daemon.stop()
            if socket:
                subprocess.run(["umount", "-R", str(root / "docker" / "exec")], capture_output=True)


def _more_allocators(config_path: Path, count: int) -> list[Path]:
    """Configurations for ``count`` more allocator processes: the same etcd, node and
    files, each on a port of its own, metrics off."""
    base = yaml.safe_load(config_path.read_text())
    made = []
    for n in range(count):
        config = {**base, "listen": {**base["listen"], "allocator": f"127.0.0.1:{free_port()}"},
                  "metrics": {"listen": dict.fromkeys(SERVICES, "off")}}  # fmt: skip
        path = config_path.with_name(f"ds01-allocator{n + 2}.yaml")
        path.write_text(yaml.safe_dump(config))
        made.append(path)
    return made


def compare_metrics(measure: Callable[[bool], dict[str, float]], metrics: str, rounds: int) -> None:
    """Run ``measure`` without metrics and with them (``metrics``: compare, on or off),
    alternating for ``rounds`` rounds so that the machine's drift falls on both sides;
    then print each figure's median per side. Metrics must not slow the hot paths:
    each figure within 5% of its value without."""
    sides = {"compare": (False, True), "on": (True,), "off": (False,)}[metrics]
    runs: dict[bool, list[dict[str, float]]] = {side: [] for side in sides}
    for round_ in range(rounds if len(sides) == 2 else 1):
        for side in sides:
            print(
                f"--- round {round_ + 1}, metrics {'on, scraped every second' if side else 'off'}"
            )
            runs[side].append(measure(side))
    if len(sides) < 2:
        return
    print(f"metrics on / off, medians of {rounds} alternating rounds (target: within 5%):")
    for key in runs[False][0]:
        off = statistics.median(r[key] for r in runs[False])
        on = statistics.median(r[key] for r in runs[True])
        print(f"  {key:<44} off {off:8.2f}   on {on:8.2f}   = {on / off - 1:+.1%}")
