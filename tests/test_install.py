"""`make install` and `ds01 admin install`, into a private root directory (never the
host's /etc): a ds01 every user can run, systemd units that verify, the Docker socket
takeover, the docker group warned about, a second run that changes nothing, and an
uninstall that undoes exactly what install did."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ds01.core.config import load_config
from ds01.core.install import (
    DAEMON_SOCKET,
    GATEWAY_SOCKET,
    SERVICES,
    Options,
    install,
    plan,
)
from ds01.core.pki import Pki
from ds01.core.processes import docker_answers, spawn
from tests.allocator_env import start_gateway
from tests.harness import REPO, remove_tree, require_binary, write_config_file

DS01 = str(REPO / ".venv" / "bin" / "ds01")
ADMINS_OWN = "# the admin's own configuration: install keeps it\nnode: gpu7\n"
THEIR_DROP_IN = "[Socket]\nSocketMode=0660\n"  # what the host had before: restored
GROUP = "root:x:0:\ndocker:x:999:ds01alice,ds01bob\n"


def make(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", *args, f"ROOT={root}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    """A host's root as `make install` found it: an admin's ds01.yaml, a docker.socket
    drop-in of the same name, two users in the docker group."""
    path = Path(tempfile.mkdtemp(prefix="ds01-root-", dir="/tmp"))
    path.chmod(0o755)  # the users below must reach the installed ds01
    (path / "etc" / "ds01").mkdir(parents=True)
    (path / "etc" / "ds01" / "ds01.yaml").write_text(ADMINS_OWN)
    (path / "etc" / "group").write_text(GROUP)
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    drop_in = path / "etc" / "systemd" / "system" / "docker.socket.d" / "50-ds01.conf"
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text(THEIR_DROP_IN)
    installed = make(path, "install")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_dry_run_names_every_change_and_makes_none(tmp_path: Path):
    result = subprocess.run(
        [DS01, "admin", "install", "--dry-run", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    written = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("write")}
    assert {
        "/etc/ds01/ds01.yaml",
        "/etc/systemd/system/ds01.target",
        "/etc/systemd/system/ds01-etcd.service",
        "/etc/systemd/system/ds01@.service",
        "/etc/systemd/system/docker.socket.d/50-ds01.conf",
    } <= written
    assert "link     /usr/local/bin/ds01" in result.stdout
    assert list(tmp_path.iterdir()) == []


async def test_every_user_runs_the_installed_ds01(root: Path, ownership, unix_users):
    """A fresh non-root user, nothing set up: `ds01 whoami` and `ds01 limits` work."""
    config, _ = ownership
    config_file = write_config_file(config, root / "suite.yaml")
    config_file.chmod(0o644)
    program = root / "usr/local/bin/ds01"
    assert os.readlink(program) == str(root / "opt/ds01/bin/ds01")
    python = (root / "opt/ds01/bin/python3").resolve()
    assert python.is_relative_to("/usr"), python  # the distribution's, not a pyenv
    for user in ("ds01alice", "ds01bob"):
        home = Path(f"/home/{user}")
        shutil.rmtree(home / ".config" / "ds01", ignore_errors=True)
        env = {"PATH": f"{root / 'usr/local/bin'}:/usr/bin:/bin", "HOME": str(home)}
        for args in (["--version"], ["whoami"], ["limits"]):
            result = await asyncio.to_thread(  # off the loop that serves enrollment
                subprocess.run,
                ["runuser", "-u", user, "--", "env", *[f"{k}={v}" for k, v in env.items()],
                 "ds01", "--config", str(config_file), *args],
                capture_output=True, text=True, timeout=60, cwd="/",
            )  # fmt: skip
            assert result.returncode == 0, (args, result.stderr)
        assert f"User: {user}" in result.stdout  # the limits block names them


def test_the_units_verify_and_take_the_docker_socket(root: Path):
    units = root / "etc/systemd/system"
    names = ["ds01.target", "ds01-etcd.service", *(f"ds01@{s}.service" for s in SERVICES)]
    verified = subprocess.run(
        [require_binary("systemd-analyze"), "verify", "--man=no", *names],
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr
    template = (units / "ds01@.service").read_text()
    assert f"ExecStart={root}/opt/ds01/bin/ds01d --config {root}/etc/ds01/ds01.yaml" in template
    assert "After=network-online.target docker.service ds01-etcd.service" in template
    assert "Restart=on-failure" in template
    hardening = (units / "ds01@limits.service.d/50-hardening.conf").read_text()
    assert "ProtectSystem=strict" in hardening and "NoNewPrivileges=yes" in hardening
    # The gateway mounts pinned directories dockerd must see: no private mount namespace.
    assert "Protect" not in (units / "ds01@ownership.service.d/50-hardening.conf").read_text()
    takeover = (units / "docker.socket.d/50-ds01.conf").read_text()
    assert f"ListenStream={root}{DAEMON_SOCKET}" in takeover and "SocketMode=0600" in takeover
    assert "SocketGroup=root" in takeover  # not docker: that group is root on the host


def test_an_admins_files_are_kept_and_what_they_lack_is_said(root: Path):
    assert (root / "etc/ds01/ds01.yaml").read_text() == ADMINS_OWN
    assert (root / "etc/ds01/resource-limits.yaml").exists()  # missing ones are installed
    again = make(root, "install")
    assert again.returncode == 0, again.stderr
    assert "nothing to change: ds01 is installed as planned" in again.stdout
    assert f"set docker.host to unix://{DAEMON_SOCKET}" in again.stderr
    assert f"set ownership.proxy_socket to {GATEWAY_SOCKET}" in again.stderr
    assert "ds01alice, ds01bob are in the docker group" in again.stderr


def test_docker_group_members_are_removed_when_asked(root: Path):
    result = subprocess.run(
        [DS01, "admin", "install", "--root", str(root), "--remove-docker-group-members", "--yes"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "docker:x:999:" in (root / "etc/group").read_text().splitlines()
    assert "removed  ds01alice from the docker group" in result.stdout


def test_uninstall_undoes_exactly_what_install_did(root: Path, unix_users):
    made = [p for p in root.rglob("*") if p.is_file() or p.is_symlink()]
    assert made
    removed = make(root, "uninstall")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    left = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if (p.is_file() or p.is_symlink())
        and not p.name.startswith(".pwd")  # gpasswd's lock and backups, not install's
        and not p.name.endswith("-")
    )
    # What was there before install, as it was (the group file keeps its removals:
    # taking users out of the docker group is not undone).
    assert left == [
        "etc/ds01/ds01.yaml",
        "etc/group",
        "etc/passwd",
        "etc/systemd/system/docker.socket.d/50-ds01.conf",
        "suite.yaml",
    ]
    assert (root / "etc/systemd/system/docker.socket.d/50-ds01.conf").read_text() == THEIR_DROP_IN
    assert not (root / "usr").exists() and not (root / "opt/ds01").exists()
    assert stat.S_ISDIR((root / "etc/ds01").stat().st_mode)


def test_the_installed_default_configuration_is_valid_and_takes_the_socket(tmp_path: Path):
    install(plan(Options(root=tmp_path)), tmp_path)
    config = load_config(tmp_path / "etc/ds01/ds01.yaml")
    assert config.docker_host == f"unix://{DAEMON_SOCKET}"
    assert str(config.ownership.proxy_socket) == GATEWAY_SOCKET


def test_make_runs_venv_is_the_distributions_python_every_user_can_run():
    """`make run` and `make test` use .venv: built from /usr/bin/python3, never from a
    Python under root's home that no other user may enter."""
    python = (REPO / ".venv" / "bin" / "python3").resolve()
    assert python.is_relative_to("/usr"), python
    assert python.stat().st_mode & 0o005 == 0o005  # world-readable and -executable


async def test_the_takeover_puts_dockerd_behind_root_and_every_client_behind_the_gateway(
    pki: Pki, state_dir: Path, etcd_endpoint: str, limits_file: Path, unix_users
):
    """The installed docker.socket drop-in, with dockerd socket-activated as systemd would
    (a private dockerd and root): users reach Docker only through the gateway."""
    root = Path(tempfile.mkdtemp(prefix="ds01-takeover-", dir="/tmp"))
    root.chmod(0o755)
    install(plan(Options(root=root)), root)
    drop_in = (root / "etc/systemd/system/docker.socket.d/50-ds01.conf").read_text()
    listen = Path(drop_in.split("ListenStream=")[-1].splitlines()[0])
    mode = int(drop_in.split("SocketMode=")[1].splitlines()[0], 8)
    assert listen == root / DAEMON_SOCKET.lstrip("/")
    listen.parent.mkdir(parents=True, exist_ok=True)
    listen.parent.chmod(0o755)  # /run/ds01: users reach enrollment there
    data = root / "var/lib/docker"
    dockerd = spawn(
        "dockerd",
        [require_binary("systemd-socket-activate"), "-l", str(listen), "dockerd", "-H", "fd://",
         f"--data-root={data}", f"--exec-root={root / 'run/docker-exec'}",
         f"--pidfile={root / 'run/docker.pid'}", "--bridge=none", "--iptables=false",
         "--ip-forward=false", "--ip-masq=false"],
        root / "dockerd.log",
        lambda: docker_answers(listen),
        timeout=60,
    )  # fmt: skip
    listen.chmod(mode)  # SocketMode=, as systemd sets it
    gateway_socket = root / GATEWAY_SOCKET.lstrip("/")
    _config, running = await start_gateway(
        state_dir, pki, etcd_endpoint, listen, limits_file, listen.parent, gateway_socket
    )
    try:
        await asyncio.sleep(0.5)

        async def docker_as(user: str, socket: Path) -> subprocess.CompletedProcess[str]:
            return await asyncio.to_thread(
                subprocess.run,
                ["runuser", "-u", user, "--", "docker", "-H", f"unix://{socket}", "ps"],
                capture_output=True, text=True, timeout=60, cwd="/",
            )  # fmt: skip

        through = await docker_as("ds01alice", gateway_socket)
        assert through.returncode == 0, through.stderr  # /var/run/docker.sock: the gateway
        around = await docker_as("ds01alice", listen)
        assert around.returncode != 0 and "permission denied" in around.stderr.lower()
        assert stat.S_IMODE(listen.stat().st_mode) == 0o600 and listen.stat().st_uid == 0
    finally:
        for service in running:
            await service.stop(grace=0)
        dockerd.stop()
        remove_tree(root)
