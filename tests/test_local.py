"""The local default, end to end: `ds01d --local` brings the suite up, `ds01 status`
sees it healthy over mTLS, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ds01.core.etcd import etcd_answers_plain
from ds01.core.processes import free_port, spawn
from tests.harness import remove_tree, require_binary

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def local_config() -> Iterator[Path]:
    require_binary("etcd")
    require_binary("dockerd")
    with tempfile.TemporaryDirectory(prefix="ds01-local-", dir="/tmp") as tmp:
        state = Path(tmp) / "state"
        config = Path(tmp) / "ds01.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "state_dir": str(state),
                    "listen": {
                        s: f"127.0.0.1:{free_port()}"
                        for s in ("limits", "allocator", "containers", "ownership")
                    },
                    "etcd": {"endpoints": [f"127.0.0.1:{free_port()}"]},
                    "limits_file": str(REPO / "config" / "resource-limits.yaml"),
                    "inventory": {"file": str(REPO / "config" / "inventory.yaml")},
                    "docker": {"host": f"unix://{state}/docker/docker.sock"},
                    "ownership": {
                        "enroll_socket": f"{state}/enroll.sock",
                        "proxy_socket": f"{state}/proxy.sock",
                    },
                }
            )
        )
        yield config
        remove_tree(state / "docker")


def test_local_default_comes_up_healthy_and_ctrl_c_leaves_nothing(local_config: Path):
    env = {**os.environ, "DS01_CONFIG": str(local_config)}
    daemon = subprocess.Popen(
        [str(BIN / "ds01d"), "--local", "--services", "all"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    banner: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = daemon.stdout.readline()
            if not line:
                break
            banner.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        text = "".join(banner)
        assert "ds01 is up" in text, text
        assert "simulated" in text and "4 GPUs, 2 in MIG mode" in text
        assert "(mutual TLS, data" in text, text  # the etcd it started
        started = descendants(daemon.pid)
        assert len(started) >= 2, "etcd and dockerd should run under ds01d"

        status = subprocess.run(
            [str(BIN / "ds01"), "-o", "json", "status"], env=env, capture_output=True, text=True
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count('"SERVING"') == 4
        whoami = subprocess.run(
            [str(BIN / "ds01"), "whoami"], env=env, capture_output=True, text=True
        )
        assert whoami.stdout.startswith("root (admin)"), whoami.stdout + whoami.stderr

        daemon.send_signal(signal.SIGINT)
        assert daemon.wait(timeout=60) == 0
        assert not [pid for pid in started if alive(pid)], "processes left behind"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_local_refuses_an_etcd_that_answers_without_tls(local_config: Path):
    """An old or hand-started etcd without TLS is never used: every user could write it."""
    endpoint = yaml.safe_load(local_config.read_text())["etcd"]["endpoints"][0]
    peer = f"http://127.0.0.1:{free_port()}"
    data = local_config.parent / "plain-etcd"
    plain = spawn(
        "etcd",
        [
            "etcd",
            f"--data-dir={data}",
            f"--listen-client-urls=http://{endpoint}",
            f"--advertise-client-urls=http://{endpoint}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
        ],
        local_config.parent / "plain-etcd.log",
        lambda: etcd_answers_plain(endpoint),
    )
    try:
        result = subprocess.run(
            [str(BIN / "ds01d"), "--config", str(local_config), "--local"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        plain.stop()
    assert result.returncode == 1
    assert f"an etcd without TLS answers at {endpoint}" in result.stderr, result.stderr


def test_bad_config_stops_start_up_naming_file_and_key(tmp_path: Path):
    config = tmp_path / "ds01.yaml"
    config.write_text("etcd:\n  endpoints: [localhost]\n")
    result = subprocess.run(
        [str(BIN / "ds01d"), "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert f"{config}: key etcd.endpoints[0]: 'localhost' is not HOST:PORT" in result.stderr


def test_unknown_service_names_are_refused():
    result = subprocess.run(
        [str(BIN / "ds01d"), "--services", "limits,gpu"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "unknown service gpu" in result.stderr
