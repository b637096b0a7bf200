"""compose.yaml brought up for real: Debian's docker-compose builds the ds01 image from the
Dockerfile and starts etcd and the four services against a private dockerd; then real
users use it from the host as they would on a lab server.

The base images are stood in for by images of this host's own Python and etcd (no
registry answers here; tests/images.py), named through compose's DS01_BASE_IMAGE and
DS01_ETCD_IMAGE, as an air-gapped lab would name its mirror's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ds01.core.pki import SERVICES, Pki, init_pki
from ds01.core.processes import free_port, start_dockerd
from tests.harness import REPO, build_test_image, remove_tree, require_binary
from tests.images import build_etcd_image, build_python_image

pytestmark = pytest.mark.usefixtures("unix_users")

DS01 = str(REPO / ".venv" / "bin" / "ds01")
PROJECT = "ds01stack"
ALICE = "ds01alice"


@dataclass
class Stack:
    root: Path
    config_file: Path
    gateway: Path
    daemon: Path
    env: dict[str, str]
    image: str

    def compose(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
        argv = ["docker-compose", "-p", PROJECT, *args]
        return subprocess.run(
            argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def docker(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = ["docker", "-H", f"unix://{self.daemon}", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    def as_user(self, user: str, *argv: str) -> subprocess.CompletedProcess[str]:
        env = [f"HOME=/home/{user}", f"DOCKER_CONFIG=/home/{user}/.docker", "PATH=/usr/bin:/bin"]
        return subprocess.run(
            ["runuser", "-u", user, "--", "env", *env, *argv],
            capture_output=True,
            text=True,
            timeout=90,
            cwd="/",
        )

    def ds01(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.as_user(user, DS01, "--config", str(self.config_file), *args)


@contextmanager
def shared_mount(path: Path) -> Iterator[None]:
    """``path`` as a mount point that propagates, as every path is on a systemd host (the
    gateway's pins must reach dockerd; /home is followed for automounted homes)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _write_config(root: Path, etcd_port: int) -> Path:
    etc, run = root / "etc", root / "run"
    for name in ("resource-limits.yaml", "inventory.yaml"):
        shutil.copy(REPO / "config" / name, etc / name)
    config = {
        "node": "compose1",
        "state_dir": str(root / "state"),
        "listen": {s: f"127.0.0.1:{free_port()}" for s in SERVICES},
        "etcd": {"endpoints": [f"127.0.0.1:{etcd_port}"]},
        "limits_file": "resource-limits.yaml",  # beside ds01.yaml, inside and out
        "inventory": {"source": "declared", "file": "inventory.yaml"},
        "ownership": {
            "enroll_socket": str(run / "enroll.sock"),
            "proxy_socket": str(run / "docker.sock"),
        },
        "docker": {"host": f"unix://{run / 'docker-daemon.sock'}"},
    }
    path = etc / "ds01.yaml"
    path.write_text(yaml.safe_dump(config))
    for file in etc.iterdir():
        file.chmod(0o644)
    return path


def _health(stack: Stack) -> dict[str, str]:
    listed = stack.docker("ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}")
    names = [line.split()[-1] for line in listed.stdout.splitlines()[1:]]
    health = {}
    for name in names:
        state = json.loads(stack.docker("inspect", "--format", "{{json .State}}", name).stdout)
        health[name.split("_")[1]] = state.get("Health", {}).get("Status", state["Status"])
    return health


def _wait_until_settled(stack: Stack, timeout: float = 120) -> None:
    """`up -d` returns once the last container starts; health checks take a few periods."""
    deadline = time.monotonic() + timeout
    while "starting" in _health(stack).values() and time.monotonic() < deadline:
        time.sleep(1)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    for program in ("docker-compose", "etcdctl"):
        require_binary(program)
    root = Path(tempfile.mkdtemp(prefix="ds01-compose-", dir="/tmp"))
    root.chmod(0o755)  # users reach the sockets and the configuration, as in /run and /etc
    for name in ("etc", "state/pins", "state/etcd", "state/container-metadata", "run"):
        (root / name).mkdir(parents=True)
    (root / "run").chmod(0o755)
    daemon = root / "run" / "docker-daemon.sock"
    dockerd = start_dockerd(root / "docker", socket_path=daemon)
    init_pki(Pki(root / "state" / "pki"), admin="root")
    etcd_port = free_port()
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{daemon}",
        "DS01_CONFIG_DIR": str(root / "etc"),
        "DS01_STATE_DIR": str(root / "state"),
        "DS01_RUN_DIR": str(root / "run"),
        "DS01_ETCD_PORT": str(etcd_port),
        "DS01_ETCD_PEER_PORT": str(free_port()),
        "DS01_BASE_IMAGE": build_python_image(daemon, "ds01-test/python:3.11"),
        "DS01_ETCD_IMAGE": build_etcd_image(daemon, "ds01-test/etcd:3.4"),
    }
    stack = Stack(
        root=root,
        config_file=_write_config(root, etcd_port),
        gateway=root / "run" / "docker.sock",
        daemon=daemon,
        env=env,
        image=build_test_image(daemon),
    )
    try:
        with shared_mount(root / "state" / "pins"), shared_mount(Path("/home")):
            up = stack.compose("up", "-d", "--build")
            assert up.returncode == 0, up.stdout + up.stderr
            _wait_until_settled(stack)
            yield stack
            stack.compose("down", "--timeout", "5")
    finally:
        dockerd.stop(timeout=30)
        remove_tree(root)


def test_every_service_comes_up_healthy_with_no_network_of_its_own(stack: Stack):
    """Health is gRPC health over mutual TLS from inside each container (etcdctl for etcd);
    the start conditions held, since `up` waits for each one's dependencies to be healthy."""
    health = _health(stack)
    assert health == dict.fromkeys(["etcd", *SERVICES], "healthy"), health
    networks = stack.docker("network", "ls", "--format", "{{.Name}}").stdout.split()
    assert sorted(networks) == ["host", "none"]  # no bridge: every service on the host's


def test_a_user_enrolls_and_reads_limits_and_gpus_from_the_composed_services(
    stack: Stack, request: pytest.FixtureRequest
):
    shutil.rmtree(f"/home/{ALICE}/.config/ds01", ignore_errors=True)
    request.addfinalizer(  # the composed stack's CA is gone after this module
        lambda: shutil.rmtree(f"/home/{ALICE}/.config/ds01", ignore_errors=True)
    )
    whoami = stack.ds01(ALICE, "whoami")
    assert whoami.returncode == 0 and ALICE in whoami.stdout, whoami.stderr
    limits = stack.ds01(ALICE, "limits")
    assert limits.returncode == 0 and f"User: {ALICE}" in limits.stdout, limits.stderr
    gpus = stack.ds01(ALICE, "gpu", "status")
    assert gpus.returncode == 0 and "compose1" in gpus.stdout, gpus.stderr


def test_a_users_docker_cli_goes_through_the_composed_gateway_and_pins_reach_dockerd(
    stack: Stack,
):
    """A bind of the user's own directory works: the gateway, in its container, pins the
    source with a mount that propagates to the host, where dockerd finds it."""
    data = Path(f"/home/{ALICE}/compose-data")
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    (data / "hello").write_text("from alice's home\n")
    for path in (data, data / "hello"):
        shutil.chown(path, ALICE)
    gateway = f"unix://{stack.gateway}"
    run = stack.as_user(
        ALICE, "docker", "-H", gateway, "run", "--rm", "--network", "none",
        "-v", f"{data}:/data", stack.image, "cat", "/data/hello",
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout == "from alice's home\n", run.stderr
    others = stack.as_user(ALICE, "docker", "-H", gateway, "run", "--rm", "-v", "/etc:/x",
                           stack.image, "true")  # fmt: skip
    assert others.returncode != 0 and "home" in others.stderr
    direct = stack.as_user(ALICE, "docker", "-H", f"unix://{stack.daemon}", "ps")
    assert direct.returncode != 0 and "permission denied" in direct.stderr.lower()
    shutil.rmtree(data)


def test_the_composed_containers_service_creates_and_starts_a_users_container(stack: Stack):
    created = stack.ds01(ALICE, "container", "create", "stackbox", "--image", stack.image)
    assert created.returncode == 0, created.stderr
    try:
        started = stack.ds01(ALICE, "container", "start", "stackbox")
        assert started.returncode == 0, started.stderr
        listed = stack.ds01(ALICE, "container", "list", "-o", "json")
        rows = {row["name"]: row for row in json.loads(listed.stdout)}
        assert "running" in json.dumps(rows["stackbox"]).lower(), rows
        seen = stack.as_user(ALICE, "docker", "-H", f"unix://{stack.gateway}", "ps")
        assert "stackbox" in seen.stdout, seen.stderr
    finally:
        removed = stack.ds01(ALICE, "container", "remove", "--force", "stackbox")
        assert removed.returncode == 0, removed.stderr
