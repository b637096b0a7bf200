"""What the Docker socket proxy lets a user do: decisions only, free of sockets and HTTP.

Fails closed: a container without an owner is an admin's; a create request that asks
for anything that escapes the container or reaches another user's things is refused.
JSON keys are matched case-insensitively, as Docker's own decoder matches them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote

# Container operations that name a container: /containers/{ref}/{op} (and DELETE /containers/{ref})
_CONTAINER = re.compile(r"^/containers/(?P<ref>[^/]+)(?:/(?P<op>.*))?$")
_EXEC = re.compile(r"^/exec/(?P<id>[^/]+)/(?P<op>.*)$")
VOLUME = re.compile(r"^/volumes/(?P<name>[^/]+)$")
_VERSION = re.compile(r"^/v[0-9.]+(?=/)")  # as Docker's router: /v{version:[0-9.]+}
# Endpoints that reach across users or the host: admins only.
_ADMIN_ONLY = (
    "/plugins",
    "/swarm",
    "/secrets",
    "/configs",
    "/services",
    "/nodes",
    "/tasks",
    "/session",
    "/grpc",
    "/system/df",
    "/volumes/prune",
    "/images/prune",
    "/networks/prune",
    "/build/prune",
)
_HOST_MODES = ("host",)


class Refused(Exception):
    """Answered with 403 and this message."""


@dataclass(frozen=True)
class Route:
    path: str  # without the API version prefix, URL-decoded
    container: str | None  # the container reference it names, if any
    exec_id: str | None


def route(target: str) -> Route:
    path = unquote(target.split("?", 1)[0])
    path = _VERSION.sub("", path) or "/"
    if path in ("/containers/json", "/containers/create", "/containers/prune"):
        return Route(path, None, None)
    match = _CONTAINER.match(path)
    if match:
        return Route(path, match["ref"], None)
    match = _EXEC.match(path)
    if match:
        return Route(path, None, match["id"])
    return Route(path, None, None)


def admin_only(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in _ADMIN_ONLY)


def denial(owner: str) -> str:
    if not owner:
        return "Permission denied: container has no owner"
    return f"Permission denied: container owned by {owner}"


def _get(mapping: Any, key: str) -> Any:
    """A key as Docker's decoder finds it: case-insensitively."""
    if not isinstance(mapping, dict):
        return None
    for name, value in mapping.items():
        if name.lower() == key.lower():
            return value
    return None


def _set(mapping: dict[str, Any], key: str, value: Any) -> None:
    for name in list(mapping):
        if name.lower() == key.lower():
            del mapping[name]
    mapping[key] = value


@dataclass(frozen=True)
class UserCaps:
    """The user's per-container limits (None: unlimited)."""

    nano_cpus: int | None = None
    memory: int | None = None
    memory_swap: int | None = None
    pids: int | None = None
    shm_size: int | None = None


@dataclass(frozen=True)
class CreateContext:
    user: str
    home: PurePosixPath
    cgroup_parent: str
    owner_of: dict[str, str]  # container id and name -> owner, for namespace joins
    caps: UserCaps = UserCaps()
    uid: int = -1
    gid: int = -1


def check_create(body: dict[str, Any], context: CreateContext) -> dict[str, Any]:
    """Refuse what escapes or crosses users; force ownership labels and the cgroup parent.

    Returns the body to send on.
    """
    refuse_case_twins(body)
    host = _get(body, "HostConfig") or {}
    if not isinstance(host, dict):
        raise Refused("HostConfig must be an object")
    for key in ("MaskedPaths", "ReadonlyPaths", "Sysctls"):
        if _get(host, key) is not None:
            raise Refused(f"{key} is for admins")
    for option in _get(host, "SecurityOpt") or []:
        if str(option).replace("=", ":") not in ("no-new-privileges", "no-new-privileges:true"):
            raise Refused(f"security option {option!r} is for admins")
    if str(_get(host, "Runtime") or "runc") != "runc":
        raise Refused("another container runtime is for admins")
    if str(_get(host, "CgroupnsMode") or "private") != "private":
        raise Refused("CgroupnsMode=host is not allowed")
    if _get(host, "Privileged"):
        raise Refused("privileged containers are not allowed")
    if _get(host, "CapAdd"):
        raise Refused("adding capabilities is not allowed")
    if _get(host, "Devices") or _get(host, "DeviceCgroupRules"):
        raise Refused("host devices are not allowed")
    if _get(host, "DeviceRequests"):
        raise Refused("GPUs are given by ds01 (ds01 container create --gpus), not requested")
    for key in ("PidMode", "IpcMode", "NetworkMode", "UTSMode", "UsernsMode", "CgroupnsMode"):
        mode = str(_get(host, key) or "")
        if mode in _HOST_MODES:
            raise Refused(f"{key}=host is not allowed")
        if mode.startswith("container:"):
            other = mode.split(":", 1)[1]
            if context.owner_of.get(other, "") != context.user:
                raise Refused(f"{key} may only join your own containers")
    endpoints = _get(_get(body, "NetworkingConfig") or {}, "EndpointsConfig") or {}
    if isinstance(endpoints, dict) and any(str(n) in _HOST_MODES for n in endpoints):
        raise Refused("NetworkMode=host is not allowed")
    for source in _get(host, "VolumesFrom") or []:
        other = str(source).split(":", 1)[0]
        if context.owner_of.get(other, "") != context.user:
            raise Refused("VolumesFrom may only name your own containers")
    binds = False
    for bind in _get(host, "Binds") or []:
        source = str(bind).split(":", 1)[0]
        _check_source(source, context)
        binds = binds or source.startswith("/")
    for mount in _get(host, "Mounts") or []:
        kind = str(_get(mount, "Type") or "volume")
        if kind == "bind":
            _check_source(str(_get(mount, "Source") or ""), context)
            binds = True
        elif kind == "volume" and _get(_get(mount, "VolumeOptions") or {}, "DriverConfig"):
            raise Refused("volumes with driver options are not allowed (they can bind host paths)")
        elif kind not in ("volume", "tmpfs"):
            raise Refused(f"mounts of type {kind} are not allowed")
    if binds:
        # A process that is root inside could leave root-owned or setuid files in the
        # home: with the home mounted, the container runs as its owner.
        _set(body, "User", f"{context.uid}:{context.gid}")
    for entry in _get(body, "Env") or []:
        if str(entry).split("=", 1)[0] in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
            raise Refused("GPU visibility is set by ds01, not by the request")
    # The image may say NVIDIA_VISIBLE_DEVICES=all: GPUs come only through ds01.
    env = [e for e in _get(body, "Env") or [] if isinstance(e, str)]
    _set(body, "Env", [*env, "NVIDIA_VISIBLE_DEVICES=void", "CUDA_VISIBLE_DEVICES="])
    labels = _get(body, "Labels") or {}
    if not isinstance(labels, dict):
        labels = {}
    # Labels ds01 trusts are ds01's to set: whatever the user sent is replaced.
    labels = {k: v for k, v in labels.items() if not k.startswith(("ds01.", "aime.mlc"))}
    labels.update({"ds01.user": context.user, "ds01.managed": "true"})
    _set(body, "Labels", labels)
    _set(host, "CgroupParent", context.cgroup_parent)
    _clamp(host, context.caps)
    _set(body, "HostConfig", host)
    return body


def _clamp(host: dict[str, Any], caps: UserCaps) -> None:
    """No more than the user's limits: an absent or larger request gets the limit."""
    for key, cap in (
        ("NanoCpus", caps.nano_cpus),
        ("Memory", caps.memory),
        ("MemorySwap", caps.memory_swap),
        ("PidsLimit", caps.pids),
        ("ShmSize", caps.shm_size),
    ):
        if cap is None:
            continue
        asked = _get(host, key)
        if not isinstance(asked, int) or isinstance(asked, bool) or asked <= 0 or asked > cap:
            _set(host, key, cap)
    if _get(host, "CpuQuota") or _get(host, "CpuPeriod"):
        _set(host, "CpuQuota", 0)  # NanoCpus carries the CPU limit
        _set(host, "CpuPeriod", 0)


def _check_source(source: str, context: CreateContext) -> None:
    if not source.startswith("/"):
        return  # a named volume
    path = PurePosixPath(os.path.realpath(source))  # symlinks resolved, as Docker will
    home = PurePosixPath(os.path.realpath(context.home))
    if not (path == home or home in path.parents):
        raise Refused(f"bind mounts must lie in your home {context.home}, not {source}")


def refuse_case_twins(value: Any) -> None:
    """Docker's decoder lets the last of two keys that differ only in case win, so a
    check that reads the first could be fooled: refuse such objects, at any depth."""
    if isinstance(value, dict):
        seen: set[str] = set()
        for key, item in value.items():
            if str(key).lower() in seen:
                raise Refused(f"the key {key!r} appears twice (in different case)")
            seen.add(str(key).lower())
            refuse_case_twins(item)
    elif isinstance(value, list):
        for item in value:
            refuse_case_twins(item)


def check_volume_create(body: dict[str, Any], user: str) -> dict[str, Any]:
    """A local volume with driver options can bind any host path; a volume is its
    creator's (labelled like containers). Returns the body to send on."""
    refuse_case_twins(body)
    if _get(body, "DriverOpts") or str(_get(body, "Driver") or "local") != "local":
        raise Refused("volumes with driver options or other drivers are for admins")
    labels = _get(body, "Labels") or {}
    labels = {k: v for k, v in labels.items() if not k.startswith("ds01.")}
    _set(body, "Labels", {**labels, "ds01.user": user})
    return body


def named_volumes(body: dict[str, Any]) -> list[str]:
    """The named volumes a create request mounts (bind sources are paths)."""
    host = _get(body, "HostConfig") or {}
    names = [str(b).split(":", 1)[0] for b in _get(host, "Binds") or []]
    for mount in _get(host, "Mounts") or []:
        if str(_get(mount, "Type") or "volume") == "volume":
            names.append(str(_get(mount, "Source") or ""))
    return [n for n in names if n and not n.startswith("/")]


def check_exec(body: dict[str, Any]) -> None:
    """Users exec as themselves or the image's user, never as root."""
    refuse_case_twins(body)
    user = str(_get(body, "User") or "")
    if user.split(":", 1)[0] in ("0", "root"):
        raise Refused("Permission denied: exec as root is for admins")
    if _get(body, "Privileged"):
        raise Refused("Permission denied: privileged exec is for admins")
