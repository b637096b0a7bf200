"""A throwaway ds01 deployment for the benchmarks: PKI, config and ds01d in a temp dir."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from ds01.core.pki import Pki, init_pki
from ds01.core.processes import ManagedProcess, free_port, start_dockerd, start_etcd

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Suite:
    root: Path
    config_path: Path
    pki: Pki
    etcd_endpoint: str
    docker_socket: Path | None


@contextlib.contextmanager
def suite(
    services: str,
    limits: str,
    inventory: str = "gpus: []\n",
    etcd: bool = False,
    docker: bool = False,
    server_log: Path | None = None,
) -> Iterator[Suite]:
    """Start ``ds01d --services SERVICES`` (and an etcd / a private dockerd) for a bench.

    ``server_log``: a file for ds01d's log (its stderr) instead of this terminal."""
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
        config_path = root / "ds01.yaml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "state_dir": tmp,
                    "listen": {
                        s: f"127.0.0.1:{free_port()}"
                        for s in ("limits", "allocator", "containers", "ownership")
                    },
                    "etcd": {"endpoints": [f"127.0.0.1:{etcd_port}"]},
                    "limits_file": "resource-limits.yaml",
                    "inventory": {"source": "declared", "file": "inventory.yaml"},
                    "containers": {"network_mode": "none"},
                    "ownership": {
                        "enroll_socket": str(root / "run" / "enroll.sock"),
                        "proxy_socket": str(root / "run" / "docker.sock"),
                    },
                    "docker": {"host": f"unix://{socket}" if socket else "unix:///none"},
                    "log_level": "warning",
                }
            )
        )
        log = server_log.open("ab") if server_log else None
        server = subprocess.Popen(
            [
                str(REPO / ".venv" / "bin" / "ds01d"),
                "--config",
                str(config_path),
                "--services",
                services,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            time.sleep(1.5)
            yield Suite(root, config_path, pki, f"127.0.0.1:{etcd_port}", socket)
        finally:
            server.terminate()
            server.wait()
            if log:
                log.close()
            for daemon in reversed(daemons):
                daemon.stop()
            if socket:
                subprocess.run(["umount", "-R", str(root / "docker" / "exec")], capture_output=True)
