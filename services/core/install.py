"""ds01 on a host: the files ``ds01 admin install`` writes (systemd units, the Docker
socket takeover, the configuration, ds01 and ds01d on every user's PATH), written whole,
recorded in a manifest, and undone exactly by ``--uninstall``.

Every path is the host's path under ``root`` ("/" on a real host; a directory in tests,
which never touch the host's /etc).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ds01.core.pki import EtcdPki
from ds01.core.processes import etcd_tls_flags

PREFIX = "/opt/ds01"  # the virtual environment, world-readable
BIN_DIR = "/usr/local/bin"  # on every user's PATH
ETC = "/etc/ds01"
STATE = "/var/lib/ds01"
UNITS = "/etc/systemd/system"
DAEMON_SOCKET = "/run/ds01/docker-daemon.sock"  # dockerd's own, root only, after takeover
GATEWAY_SOCKET = "/run/docker.sock"  # /var/run/docker.sock: what every client uses
MANIFEST = "install.json"
CONFIG_FILES = ("ds01.yaml", "resource-limits.yaml", "inventory.yaml")
SERVICES = ("limits", "allocator", "containers", "ownership")

# Hardening each service bears. limits and allocator read files and talk gRPC and
# etcd; containers makes workspaces in /home, writes cgroups and slice drop-ins, and
# talks to Docker; ownership mounts pinned directories dockerd must see, so it stays in
# the host's mount namespace (no ProtectSystem, no PrivateTmp).
HARDENING = {
    "limits": ["ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes"],
    "allocator": ["ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes"],
    "containers": ["ProtectSystem=full", "PrivateTmp=yes"],
    "ownership": [],
}


@dataclass(frozen=True)
class File:
    path: str  # on the host
    text: str
    mode: int = 0o644
    keep: bool = False  # the admin's once there (configuration): never replaced


@dataclass(frozen=True)
class Link:
    path: str
    target: str


@dataclass(frozen=True)
class Options:
    root: Path = Path("/")
    prefix: str = PREFIX
    take_docker_socket: bool = True
    config_dir: Path = Path(__file__).resolve().parents[2] / "config"  # the repo's defaults
    etcd_port: int = 2379


@dataclass
class Manifest:
    """What install made (and so uninstall removes) and what it replaced (restored)."""

    created: list[str] = field(default_factory=list)
    replaced: dict[str, str] = field(default_factory=dict)  # path -> its saved text

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        return cls(list(data.get("created", [])), dict(data.get("replaced", {})))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_whole(
            path, json.dumps({"created": self.created, "replaced": self.replaced}, indent=2)
        )
        path.chmod(0o600)


def plan(options: Options) -> list[File | Link]:
    """Every file and link of an installation, in the order they are written."""
    prefix, root = options.prefix, options.root

    def host(path: str) -> str:  # where the unit finds it on this host (under root)
        return str(root / path.lstrip("/"))

    items: list[File | Link] = []
    for name in CONFIG_FILES:
        text = (options.config_dir / name).read_text()
        if name == "ds01.yaml":
            text = _configured(text, options)
        items.append(File(f"{ETC}/{name}", text, keep=True))
    for program in ("ds01", "ds01d"):
        items.append(Link(f"{BIN_DIR}/{program}", host(f"{prefix}/bin/{program}")))
    config = host(f"{ETC}/ds01.yaml")
    items.append(File(f"{UNITS}/ds01-etcd.service", _etcd_unit(options, host, config)))
    items.append(File(f"{UNITS}/ds01@.service", _service_unit(host(f"{prefix}/bin/ds01d"), config)))
    for service, lines in HARDENING.items():
        body = "\n".join(["[Service]", "NoNewPrivileges=yes", *lines])
        if "ProtectSystem=strict" in lines:
            body += f"\nReadWritePaths={host(STATE)}"
        items.append(File(f"{UNITS}/ds01@{service}.service.d/50-hardening.conf", body + "\n"))
    wants = " ".join(["ds01-etcd.service", *(f"ds01@{s}.service" for s in SERVICES)])
    items.append(
        File(
            f"{UNITS}/ds01.target",
            "[Unit]\nDescription=ds01: GPUs, limits and containers on a shared server\n"
            f"Wants={wants}\nAfter={wants}\n\n[Install]\nWantedBy=multi-user.target\n",
        )
    )
    if options.take_docker_socket:
        items.append(
            File(
                f"{UNITS}/docker.socket.d/50-ds01.conf",
                "# ds01: dockerd answers on a root-only socket; ds01's gateway owns\n"
                f"# {GATEWAY_SOCKET} (/var/run/docker.sock), which every client uses.\n"
                f"[Socket]\nListenStream=\nListenStream={host(DAEMON_SOCKET)}\n"
                "SocketMode=0600\nSocketUser=root\nSocketGroup=root\n",
            )
        )
    return items


def _configured(text: str, options: Options) -> str:
    """The default ds01.yaml, with the Docker sockets of the takeover."""
    if not options.take_docker_socket:
        return text
    for key, value in (("proxy_socket", GATEWAY_SOCKET), ("host", f"unix://{DAEMON_SOCKET}")):
        text, found = re.subn(rf"(?m)^  {key}: .*$", f"  {key}: {value}", text)
        if found != 1:
            raise ValueError(f"the default ds01.yaml has no one {key} line to set")
    return text


def _etcd_unit(options: Options, host: Callable[[str], str], config: str) -> str:
    pki = EtcdPki(Path(host(f"{STATE}/pki/etcd")))
    url = f"https://127.0.0.1:{options.etcd_port}"
    peer = f"https://127.0.0.1:{options.etcd_port + 1}"
    argv = [
        "/usr/bin/etcd",
        "--name=default",
        f"--data-dir={host(f'{STATE}/etcd/data')}",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        *etcd_tls_flags(pki),
    ]
    pki_init = f"{host(f'{options.prefix}/bin/ds01')} --config {config} admin pki init"
    return (
        "[Unit]\nDescription=etcd for ds01 (mutual TLS, loopback)\n"
        "After=network-online.target\nWants=network-online.target\n\n"
        f"[Service]\nExecStartPre={pki_init}\nExecStart={' '.join(argv)}\n"
        "Restart=on-failure\nRestartSec=2s\nNoNewPrivileges=yes\nPrivateTmp=yes\n"
        f"ProtectSystem=strict\nProtectHome=yes\nReadWritePaths={host(STATE)}\n"
        "LimitNOFILE=65536\n\n[Install]\nWantedBy=ds01.target\n"
    )


def _service_unit(ds01d: str, config: str) -> str:
    return (
        "[Unit]\nDescription=ds01 %i service\n"
        "After=network-online.target docker.service ds01-etcd.service\n"
        "Wants=network-online.target ds01-etcd.service\n\n"
        f"[Service]\nExecStart={ds01d} --config {config} --services %i\n"
        "Restart=on-failure\nRestartSec=2s\n"
        "RuntimeDirectory=ds01\nRuntimeDirectoryMode=0755\nRuntimeDirectoryPreserve=yes\n\n"
        "[Install]\nWantedBy=ds01.target\n"
    )


@dataclass(frozen=True)
class Change:
    verb: str  # "write", "replace", "link", "keep", "same", "remove", "restore"
    path: str

    def __str__(self) -> str:
        return f"{self.verb:8} {self.path}"


def changes(items: list[File | Link], root: Path) -> Iterator[Change]:
    """What applying ``items`` would do, one line each (``same``: nothing to do)."""
    for item in items:
        here = root / item.path.lstrip("/")
        if isinstance(item, Link):
            same = here.is_symlink() and os.readlink(here) == item.target
            yield Change("same" if same else "link", item.path)
        elif not here.exists():
            yield Change("write", item.path)
        elif item.keep:
            yield Change("keep", item.path)
        else:
            same = here.read_text() == item.text
            yield Change("same" if same else "replace", item.path)


def install(items: list[File | Link], root: Path) -> list[Change]:
    """Apply ``items`` under ``root``; a second run changes nothing."""
    manifest_path = root / STATE.lstrip("/") / MANIFEST
    manifest = Manifest.load(manifest_path)
    done = []
    for item, change in zip(items, list(changes(items, root)), strict=True):
        if change.verb in ("same", "keep"):
            continue
        here = root / item.path.lstrip("/")
        for parent in reversed(Path(item.path).parents[:-1]):  # /etc, /etc/ds01, ...
            directory = root / str(parent).lstrip("/")
            if not directory.exists():
                directory.mkdir(mode=0o755)
                manifest.created.append(str(parent))  # before what it holds: removed after
        if change.verb == "replace" and item.path not in manifest.created:
            manifest.replaced.setdefault(item.path, here.read_text())
        elif item.path not in manifest.created and item.path not in manifest.replaced:
            manifest.created.append(item.path)
        if isinstance(item, Link):
            if here.is_symlink() or here.exists():
                here.unlink()
            here.symlink_to(item.target)
        else:
            _write_whole(here, item.text)
            here.chmod(item.mode)
        done.append(change)
    manifest.save(manifest_path)
    return done


def uninstall(root: Path) -> list[Change]:
    """Remove what install made and restore what it replaced; nothing else."""
    manifest_path = root / STATE.lstrip("/") / MANIFEST
    manifest = Manifest.load(manifest_path)
    done = []
    for path, text in manifest.replaced.items():
        _write_whole(root / path.lstrip("/"), text)
        done.append(Change("restore", path))
    for path in reversed(manifest.created):
        here = root / path.lstrip("/")
        if here.is_symlink() or here.is_file():
            here.unlink()
        elif here.is_dir() and not any(here.iterdir()):
            here.rmdir()
        else:
            continue
        done.append(Change("remove", path))
    manifest_path.unlink(missing_ok=True)
    return done


def takeover_problems(root: Path) -> list[str]:
    """What an admin's own ds01.yaml (kept as it is) lacks for the socket takeover."""
    try:
        text = (root / ETC.lstrip("/") / "ds01.yaml").read_text()
    except FileNotFoundError:
        return []
    wanted = {
        "docker.host": f"unix://{DAEMON_SOCKET}",
        "ownership.proxy_socket": GATEWAY_SOCKET,
    }
    return [
        f"{ETC}/ds01.yaml: set {key} to {value} for the takeover"
        for key, value in wanted.items()
        if value not in text
    ]


def docker_group_members(root: Path) -> list[str]:
    """Who is in the ``docker`` group: each of them is root on the host."""
    try:
        lines = (root / "etc/group").read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        fields = line.split(":")
        if len(fields) == 4 and fields[0] == "docker":
            return [member for member in fields[3].split(",") if member]
    return []


def _write_whole(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)
