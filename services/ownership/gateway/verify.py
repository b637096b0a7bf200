"""Docker's own view, checked after the fact: the last line of defence.

The gateway decodes strictly and forwards only what it checked, but a differential nobody
thought of could still make Docker build something else. So after every create or change
the gateway inspects the result and runs these pure checks on Docker's answer; any
violation undoes what was made before anything can run.
"""

from __future__ import annotations

import os
from typing import Any

from ds01.ownership.gateway.images import OWNER_LABEL, config_labels
from ds01.ownership.gateway.policy import (
    CPU_SHARES,
    LOG_DRIVER,
    NO_NEW_PRIVILEGES,
    Caller,
    owner_label,
    ulimit_caps,
    within,
)

_ALLOWED_IPC = ("", "private", "shareable", "none")


def container_violations(
    inspect: dict[str, Any],
    caller: Caller,
    own_containers: set[str],
    own_volumes: set[str],
    pinned: frozenset[str] = frozenset(),
) -> list[str]:
    """How Docker's container breaks the policy (empty: it does not)."""
    config = inspect.get("Config") or {}
    host = inspect.get("HostConfig") or {}
    wrong: list[str] = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            wrong.append(what)

    def joins_own(mode: str) -> bool:
        return mode.split(":", 1)[1] in own_containers

    expect(config.get("User") == caller.user_spec, f"runs as {config.get('User')!r}")
    expect(config_labels(inspect).get(OWNER_LABEL) == caller.user, "owner label")
    expect(not host.get("Privileged"), "privileged")
    expect(not host.get("CapAdd"), "added capabilities")
    expect("ALL" in (host.get("CapDrop") or []), "capabilities not dropped")
    for key in ("Devices", "DeviceRequests", "DeviceCgroupRules", "Sysctls"):
        expect(not host.get(key), key)
    for link in host.get("Links") or []:  # "/<target name>:/<this name>/<alias>"
        expect(link.split(":", 1)[0].lstrip("/") in own_containers, f"link {link}")
    expect(host.get("SecurityOpt") == [NO_NEW_PRIVILEGES], f"SecurityOpt {host.get('SecurityOpt')}")
    expect((host.get("Runtime") or "runc") == "runc", "runtime")
    expect(host.get("MaskedPaths") != [], "MaskedPaths cleared")
    expect(host.get("ReadonlyPaths") != [], "ReadonlyPaths cleared")
    for key in ("UTSMode", "UsernsMode"):
        expect(not host.get(key), key)
    expect(host.get("CgroupnsMode") == "private", f"CgroupnsMode {host.get('CgroupnsMode')}")
    pid, ipc, net = (
        host.get("PidMode") or "",
        host.get("IpcMode") or "",
        host.get("NetworkMode") or "",
    )
    expect(pid == "" or (pid.startswith("container:") and joins_own(pid)), f"PidMode {pid}")
    expect(
        ipc in _ALLOWED_IPC or (ipc.startswith("container:") and joins_own(ipc)), f"IpcMode {ipc}"
    )
    expect(net != "host", "NetworkMode host")
    expect(not net.startswith("container:") or joins_own(net), f"NetworkMode {net}")
    expect(not host.get("OomKillDisable"), "OomKillDisable")
    expect((host.get("OomScoreAdj") or 0) >= 0, "OomScoreAdj")
    expect(not host.get("PublishAllPorts"), "PublishAllPorts")
    expect((host.get("CpuShares") or 0) <= CPU_SHARES, "CpuShares")
    expect(host.get("CgroupParent") == caller.cgroup_parent, "cgroup parent")
    expect((host.get("LogConfig") or {}).get("Type") == LOG_DRIVER, "log driver")
    for group in host.get("GroupAdd") or []:
        expect(group.isdigit() and int(group) in caller.groups, f"GroupAdd {group}")
    caps = caller.caps
    for key, cap in (
        ("NanoCpus", caps.nano_cpus),
        ("Memory", caps.memory),
        ("PidsLimit", caps.pids),
        ("ShmSize", caps.shm_size),
    ):
        value = host.get(key) or 0
        expect(cap is None or 0 < value <= cap, f"{key} {value} beyond {cap}")
    limits = ulimit_caps(caps)
    for ulimit in host.get("Ulimits") or []:
        most = limits.get(ulimit.get("Name"), 0)
        expect(most is None or 0 <= (ulimit.get("Hard") or 0) <= most, f"ulimit {ulimit}")
    for bindings in (host.get("PortBindings") or {}).values():
        for binding in bindings or []:
            expect(binding.get("HostIp") == "127.0.0.1", "port on a public address")
            port = (binding.get("HostPort") or "0").split("-")[0]
            expect(not port.isdigit() or int(port) == 0 or int(port) >= 1024, "low port")
    for path, options in (host.get("Tmpfs") or {}).items():
        flags = set((options or "").split(","))
        expect({"nosuid", "nodev"} <= flags, f"tmpfs {path} without nosuid,nodev")
    for mount in inspect.get("Mounts") or []:
        kind = mount.get("Type")
        if kind == "bind":
            source = mount.get("Source") or ""
            real = os.path.realpath(source)
            expect(source in pinned or within(real, caller.home), f"bind {source}")
        elif kind == "volume":
            name = mount.get("Name") or ""
            anonymous = len(name) == 64 and all(c in "0123456789abcdef" for c in name)
            expect(name in own_volumes or anonymous, f"volume {name}")
            expect((mount.get("Driver") or "local") == "local", f"volume driver of {name}")
        elif kind != "tmpfs":
            wrong.append(f"mount of type {kind}")
    return wrong


def exec_violations(inspect: dict[str, Any], caller: Caller) -> list[str]:
    process = inspect.get("ProcessConfig") or {}
    wrong = []
    uid = str(process.get("user") or "").split(":", 1)[0]
    if not uid.isdigit() or int(uid) != caller.uid:
        wrong.append(f"exec runs as {process.get('user')!r}")
    if process.get("privileged"):
        wrong.append("privileged exec")
    return wrong


def volume_violations(inspect: dict[str, Any], caller: Caller) -> list[str]:
    wrong = []
    if (inspect.get("Driver") or "") != "local":
        wrong.append(f"driver {inspect.get('Driver')}")
    if inspect.get("Options"):
        wrong.append(f"options {inspect.get('Options')}")
    if owner_label(inspect) != caller.user:
        wrong.append("owner label")
    return wrong


# Options Docker itself puts on a plain bridge network.
_DOCKER_NETWORK_OPTIONS = frozenset(
    {"com.docker.network.enable_ipv4", "com.docker.network.enable_ipv6"}
)


def network_violations(inspect: dict[str, Any], caller: Caller) -> list[str]:
    wrong = []
    if inspect.get("Driver") != "bridge":
        wrong.append(f"driver {inspect.get('Driver')}")
    extra = set(inspect.get("Options") or {}) - _DOCKER_NETWORK_OPTIONS
    if extra:
        wrong.append(f"options {sorted(extra)}")
    if inspect.get("EnableIPv6") or inspect.get("Attachable") or inspect.get("Ingress"):
        wrong.append("IPv6, attachable or ingress")
    if owner_label(inspect) != caller.user:
        wrong.append("owner label")
    return wrong
