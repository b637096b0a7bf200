"""The policy, checked as root on the daemon itself, independently of the gateway's own
code: what a user owns must never break it, however it was made."""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any

import docker

HOST_MODES = ("PidMode", "IpcMode", "NetworkMode", "UTSMode", "UsernsMode")


def _account(user: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


def _inside(path: str, home: str) -> bool:
    real, home = os.path.realpath(path), os.path.realpath(home)
    return os.path.commonpath([real, home]) == home


def _mounts() -> list[tuple[str, str, str]]:
    """(device, root within the filesystem, mount point) of every mount, from the kernel."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        found.append((fields[2], fields[3], fields[4]))
    return found


def _pinned_inside(pin: str, home: str) -> bool:
    """Whether ``pin`` is a bind mount, as the kernel reports it, of a place in ``home``:
    its root within the filesystem is where ``home`` lies within the same filesystem."""
    mounts = _mounts()
    entry = next((m for m in reversed(mounts) if m[2] == pin), None)
    if entry is None:
        return False  # not mounted: Docker would find an empty root-owned directory
    device, root, _ = entry
    home = os.path.realpath(home)
    holders = [m for m in mounts if m[0] == device and _inside(home, m[2]) and m[2] != pin]
    if not holders:
        return False
    _, fs_root, point = max(holders, key=lambda m: len(m[2]))
    home_in_fs = os.path.normpath(os.path.join(fs_root, os.path.relpath(home, point)))
    return os.path.commonpath([root, home_in_fs]) == home_in_fs


def container_problems(attrs: dict[str, Any], client: docker.DockerClient) -> list[str]:
    config, host = attrs["Config"], attrs["HostConfig"]
    owner = (config.get("Labels") or {}).get("ds01.user", "")
    account = _account(owner)
    name = attrs["Name"]
    if account is None:
        return [f"{name}: owner {owner!r} has no account"]
    problems = []
    uid = (config.get("User") or "0").split(":", 1)[0]
    if not uid.isdigit() or int(uid) != account.pw_uid:
        problems.append(f"{name}: runs as {config.get('User')!r}, not {owner}")
    if host.get("Privileged") or host.get("CapAdd") or host.get("Devices"):
        problems.append(f"{name}: privileged, capabilities or devices")
    if host.get("DeviceRequests") or host.get("Sysctls"):
        problems.append(f"{name}: device requests or sysctls")
    for link in host.get("Links") or []:
        target = client.api.inspect_container(link.split(":", 1)[0].lstrip("/"))
        if (target["Config"].get("Labels") or {}).get("ds01.user") != owner:
            problems.append(f"{name}: links another user's container")
    for key in HOST_MODES:
        if host.get(key) == "host":
            problems.append(f"{name}: {key}=host")
        mode = host.get(key) or ""
        if mode.startswith("container:"):
            other = client.api.inspect_container(mode.split(":", 1)[1])
            if (other["Config"].get("Labels") or {}).get("ds01.user") != owner:
                problems.append(f"{name}: {key} joins another user's container")
    for option in host.get("SecurityOpt") or []:
        if not option.startswith("no-new-privileges"):
            problems.append(f"{name}: security option {option}")
    for mount in attrs.get("Mounts") or []:
        source = mount.get("Source") or ""
        home = account.pw_dir
        if mount["Type"] == "bind" and not (_inside(source, home) or _pinned_inside(source, home)):
            problems.append(f"{name}: binds {source}")
        if mount["Type"] == "volume":
            volume = client.api.inspect_volume(mount["Name"])
            labels = volume.get("Labels") or {}
            if labels.get("ds01.user") not in (owner, None) or volume.get("Options"):
                problems.append(f"{name}: mounts volume {mount['Name']} of another or with options")
    for bindings in (host.get("PortBindings") or {}).values():
        for binding in bindings or []:
            if binding.get("HostIp") != "127.0.0.1":
                problems.append(f"{name}: publishes on {binding.get('HostIp')!r}")
    for exec_id in attrs.get("ExecIDs") or []:
        process = client.api.exec_inspect(exec_id)["ProcessConfig"]
        user = str(process.get("user") or config.get("User") or "0").split(":", 1)[0]
        if process.get("privileged") or not user.isdigit() or int(user) != account.pw_uid:
            problems.append(f"{name}: exec {exec_id[:12]} as {process.get('user')!r}")
    return problems


def audit_daemon(docker_socket: Path) -> list[str]:
    """Every policy violation among the objects users own on this daemon."""
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    problems: list[str] = []
    try:
        for summary in client.api.containers(all=True, filters={"label": "ds01.user"}):
            problems += container_problems(client.api.inspect_container(summary["Id"]), client)
        for volume in client.api.volumes(filters={"label": "ds01.user"}).get("Volumes") or []:
            if volume.get("Driver") != "local" or volume.get("Options"):
                problems.append(f"volume {volume['Name']}: driver or options")
        for network in client.api.networks(filters={"label": "ds01.user"}):
            if network.get("ConfigOnly"):
                continue  # holds settings only: nothing can run in it
            if network.get("Driver") != "bridge" or network.get("Options"):
                problems.append(f"network {network['Name']}: driver or options")
        for image in client.api.images():
            labels = image.get("Labels") or {}
            for tag in image.get("RepoTags") or []:
                first = tag.split("/", 1)[0].removeprefix("ds01-") if "/" in tag else ""
                owner = labels.get("ds01.user")
                if first and _account(first) and owner not in (None, first):
                    problems.append(f"image {tag}: labelled for {owner}")
    finally:
        client.close()
    return problems
