"""Starting and stopping the suite's own etcd and dockerd.

Used by ``ds01d --local`` and by the test fixtures, so that both run the real daemons
the same way. Children are told by the kernel to stop if this process dies
(PR_SET_PDEATHSIG, through setpriv), so even a killed supervisor leaves no daemon behind.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ds01.core.etcd import etcd_healthy
from ds01.core.pki import EtcdPki


class ProcessError(Exception):
    """A daemon could not be started; the message says why and where its log is."""


def _die_with_parent(argv: list[str]) -> list[str]:
    """Have the kernel send SIGTERM to the child when its parent dies. Done with
    util-linux's setpriv rather than a preexec_fn: forking a process that runs gRPC
    threads and then running Python in the child can crash the child."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; always reaps the child."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(
    name: str,
    argv: list[str],
    log_path: Path,
    ready: Callable[[], bool],
    timeout: float = 30.0,
) -> ManagedProcess:
    """Start ``argv`` with its output in ``log_path`` and wait until ``ready()``."""
    if shutil.which(argv[0]) is None:
        raise ProcessError(f"{argv[0]} is not installed (make setup installs it)")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            _die_with_parent(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the supervisor, which stops us in order
        )
    managed = ManagedProcess(name, process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not managed.running():
            raise ProcessError(
                f"{name} exited with code {process.returncode} during start-up; "
                f"log {log_path}:\n{managed.log_tail()}"
            )
        if ready():
            return managed
        time.sleep(0.05)
    managed.stop()
    raise ProcessError(f"{name} was not ready after {timeout:.0f}s; log {log_path}")


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now, below the kernel's ephemeral range, and not handed
    out before by this process. A port the kernel picks (bind to 0) is an ephemeral one:
    an outgoing connection could take it before the caller binds it (seen in CI)."""
    below = _ephemeral_start()
    for _ in range(500):
        port = random.randrange(max(1024, below - 12000), below)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # a crowded host: the kernel's choice after all
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def start_etcd(
    data_dir: Path, client_port: int, pki: EtcdPki, peer_port: int | None = None
) -> ManagedProcess:
    """A single-member etcd on loopback with its data in ``data_dir``.

    Clients and peers alike must show a certificate of etcd's own CA: without one,
    nothing is answered, not even /health.
    """
    peer_port = peer_port or free_port()
    cluster = f"default=https://127.0.0.1:{peer_port}"
    argv = _etcd_argv("default", data_dir, client_port, peer_port, cluster, pki)
    endpoint = f"127.0.0.1:{client_port}"
    return spawn("etcd", argv, data_dir.parent / "etcd.log", lambda: etcd_healthy(endpoint, pki))


@dataclass
class EtcdMember:
    name: str
    endpoint: str  # 127.0.0.1:PORT for clients
    argv: list[str]
    log: Path
    process: ManagedProcess | None = None

    def start(self, pki: EtcdPki, wait: bool = True) -> None:
        """Start (or start again, on its data) this member."""
        ready = (lambda: etcd_healthy(self.endpoint, pki)) if wait else (lambda: True)
        self.process = spawn(f"etcd {self.name}", self.argv, self.log, ready)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


def start_etcd_cluster(root: Path, pki: EtcdPki, members: int = 3) -> list[EtcdMember]:
    """An etcd cluster of ``members`` on loopback: mutual TLS to clients and between
    peers, with etcd's own CA; returns once every member answers healthy."""
    ports = [(free_port(), free_port()) for _ in range(members)]
    cluster = ",".join(f"m{i}=https://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
    started = [
        EtcdMember(
            f"m{i}",
            f"127.0.0.1:{client}",
            _etcd_argv(f"m{i}", root / f"m{i}" / "data", client, peer, cluster, pki),
            root / f"m{i}" / "etcd.log",
        )
        for i, (client, peer) in enumerate(ports)
    ]
    for member in started:  # none is healthy before a quorum is up: start all, then wait
        member.start(pki, wait=False)
    deadline = time.monotonic() + 30
    while not all(etcd_healthy(m.endpoint, pki) for m in started):
        if time.monotonic() > deadline:
            for member in started:
                member.stop()
            raise ProcessError(f"the etcd cluster in {root} did not become healthy")
        time.sleep(0.2)
    return started


def _etcd_argv(
    name: str, data_dir: Path, client_port: int, peer_port: int, cluster: str, pki: EtcdPki
) -> list[str]:
    client = f"https://127.0.0.1:{client_port}"
    peer = f"https://127.0.0.1:{peer_port}"
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return [
        "etcd",
        f"--name={name}",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster={cluster}",
        *etcd_tls_flags(pki),
        "--log-outputs=stderr",
    ]


def etcd_tls_flags(pki: EtcdPki) -> list[str]:
    """etcd's flags for mutual TLS to clients and peers, with etcd's own CA."""
    server = pki.server
    return [
        "--client-cert-auth",
        f"--trusted-ca-file={pki.ca_cert}",
        f"--cert-file={server.cert}",
        f"--key-file={server.key}",
        "--peer-client-cert-auth",
        f"--peer-trusted-ca-file={pki.ca_cert}",
        f"--peer-cert-file={server.cert}",
        f"--peer-key-file={server.key}",
    ]


def docker_answers(socket_path: Path) -> bool:
    """Whether a Docker daemon answers /_ping on a Unix socket."""
    if not socket_path.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1.0)
            s.connect(str(socket_path))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = s.recv(64).split(b"\r\n", 1)[0].split(b" ")
            return len(status_line) > 1 and status_line[1] == b"200"
    except OSError:
        return False


def start_dockerd(root: Path, socket_path: Path | None = None) -> ManagedProcess:
    """A private dockerd under ``root``: no bridge, no iptables, no NAT, ever."""
    socket_path = socket_path or root / "docker.sock"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = [
        "dockerd",
        f"--host=unix://{socket_path}",
        f"--data-root={root / 'data'}",
        f"--exec-root={root / 'exec'}",
        f"--pidfile={root / 'docker.pid'}",
        "--bridge=none",
        "--iptables=false",
        "--ip-forward=false",
        "--ip-masq=false",
    ]
    return spawn(
        "dockerd", argv, root / "dockerd.log", lambda: docker_answers(socket_path), timeout=60
    )
