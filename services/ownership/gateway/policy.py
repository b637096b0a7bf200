"""What a non-admin may ask of Docker: pure decisions on checked request values.

Nothing here sees bytes, sockets or the daemon: every function takes the decoded request,
the caller and what the daemon said about the objects it names, and returns the value to
forward (with ds01's own settings forced in) or raises ``Refused``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from ds01.containers.adoption import GPU_ENV, NO_GPU_ENV
from ds01.core.naming import GATEWAY_LABEL, SEPARATOR, belongs_to, docker_user
from ds01.ownership.gateway.images import OWNER_LABEL

MANAGED_LABEL = "ds01.managed"
LOG_DRIVER = "json-file"
MAX_MOUNTS = 32  # each bind is a mount on the host: a table every user shares
CPU_SHARES = 1024  # Docker's default weight: nobody gets more than an equal share
MAX_NOFILE = 1 << 20
NO_NEW_PRIVILEGES = "no-new-privileges"
SHARED_NETWORKS = frozenset({"none", "bridge", "default"})
_PORT = re.compile(r"(?P<low>[0-9]{1,5})(?:-(?P<high>[0-9]{1,5}))?")
_SIZE = re.compile(r"(?P<n>[0-9]{1,19})(?P<unit>[kmg]?)", re.IGNORECASE)
_TMPFS_FLAGS = frozenset({"ro", "rw", "exec", "noexec", "nosuid", "nodev"})
_BIND_MODES = frozenset({"ro", "rw", "nocopy"})


class Refused(Exception):
    """Answered with 403 and this message."""


@dataclass(frozen=True)
class Caps:
    """The user's per-container limits (None: unlimited)."""

    nano_cpus: int | None = None
    memory: int | None = None
    memory_swap: int | None = None
    pids: int | None = None
    shm_size: int | None = None


@dataclass(frozen=True)
class Caller:
    user: str
    uid: int
    gid: int
    groups: frozenset[int]  # the user's host groups, primary included
    home: PurePosixPath  # resolved
    cgroup_parent: str = ""
    caps: Caps = Caps()

    @property
    def user_spec(self) -> str:
        return f"{self.uid}:{self.gid}"


@dataclass(frozen=True)
class Found:
    """An object the daemon resolved: its full id and its owner ("" for nobody)."""

    id: str
    owner: str
    shared: bool = False  # a shared image or a predefined network: everyone may use it
    name: str = ""
    onbuild: tuple[str, ...] = ()  # an image's ONBUILD triggers


@dataclass
class Resolved:
    """What the daemon said about every object a request names."""

    containers: dict[str, Found] = field(default_factory=dict)
    networks: dict[str, Found] = field(default_factory=dict)
    volumes: dict[str, Found | None] = field(default_factory=dict)  # None: not there yet
    paths: dict[str, str] = field(default_factory=dict)  # bind source -> real path ("": none)
    image: Found | None = None


@dataclass
class Named:
    """The objects a create request names, for the daemon to resolve before the policy."""

    containers: set[str] = field(default_factory=set)
    networks: set[str] = field(default_factory=set)
    volumes: set[str] = field(default_factory=set)
    paths: set[str] = field(default_factory=set)
    image: str = ""


def admit_name(name: str, caller: Caller) -> str:
    """A container name in the ``<name>._.<user>`` convention is that user's alone: a name
    ending in someone else's would block their `ds01 container create` and fool `mlc`."""
    if SEPARATOR in name.lstrip("/") and not belongs_to(name.lstrip("/"), caller.user):
        raise Refused(f"names ending in {SEPARATOR}<user> are that user's; use {SEPARATOR}"
                      f"{docker_user(caller.user)} or no {SEPARATOR!r}")  # fmt: skip
    return name


def denial(kind: str, owner: str) -> str:
    if not owner:
        return f"Permission denied: {kind} has no owner"
    return f"Permission denied: {kind} owned by {owner}"


def require_own(kind: str, found: Found, caller: Caller) -> None:
    if found.owner != caller.user:
        raise Refused(denial(kind, found.owner))


# --- container create --------------------------------------------------------------------


def _host(body: dict[str, Any]) -> dict[str, Any]:
    return body.get("HostConfig") or {}


def _mode_target(mode: str | None) -> str | None:
    """The container a ``container:<ref>`` mode joins."""
    if mode and mode.startswith("container:"):
        return mode.split(":", 1)[1]
    return None


def _bind(spec: str) -> tuple[str, str, str]:
    """(source, target, mode) of a Binds entry, as Docker splits it on Linux."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise Refused(f"bind {spec!r} must be SOURCE:TARGET[:MODE]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def named_in_create(body: dict[str, Any]) -> Named:
    host = _host(body)
    named = Named(image=body.get("Image") or "")
    for key in ("NetworkMode", "PidMode", "IpcMode"):
        target = _mode_target(host.get(key))
        if target:
            named.containers.add(target)
    for source in host.get("VolumesFrom") or []:
        named.containers.add(source.split(":", 1)[0])
    for link in host.get("Links") or []:
        named.containers.add(link.split(":", 1)[0].lstrip("/"))
    network = host.get("NetworkMode") or ""
    if network and _mode_target(network) is None and network not in ("host", *SHARED_NETWORKS):
        named.networks.add(network)
    endpoints = (body.get("NetworkingConfig") or {}).get("EndpointsConfig") or {}
    named.networks.update(n for n in endpoints if n not in ("host", *SHARED_NETWORKS))
    for spec in host.get("Binds") or []:
        source = spec.split(":", 1)[0]
        (named.paths if source.startswith("/") else named.volumes).add(source)
    for mount in host.get("Mounts") or []:
        source = mount.get("Source") or ""
        if (mount.get("Type") or "volume") == "bind":
            named.paths.add(source)
        elif mount.get("Type") in (None, "", "volume") and source:
            named.volumes.add(source)
    return named


def admit_create(body: dict[str, Any], caller: Caller, resolved: Resolved) -> dict[str, Any]:
    """The create request to forward, or Refused."""
    body = dict(body)
    host = dict(_host(body))
    _refuse_escapes(host)
    _check_namespaces(host, caller, resolved)
    host["NetworkMode"] = _network_mode(host.get("NetworkMode") or "", caller, resolved)
    if len(host.get("Mounts") or []) + len(host.get("Binds") or []) > MAX_MOUNTS:
        raise Refused(f"at most {MAX_MOUNTS} mounts per container")
    mounts = [_admit_mount(m, caller, resolved) for m in host.get("Mounts") or []]
    host["Binds"], path_mounts = _admit_binds(host.get("Binds") or [], caller, resolved)
    host["Mounts"] = mounts + path_mounts
    host["VolumesFrom"] = [
        _volumes_from(s, caller, resolved) for s in host.get("VolumesFrom") or []
    ]
    host["Links"] = [_link(link, caller, resolved) for link in host.get("Links") or []]
    host["GroupAdd"] = _group_add(host.get("GroupAdd") or [], caller)
    host["PortBindings"] = _ports(host.get("PortBindings") or {})
    host["Tmpfs"] = {p: _tmpfs(o, caller.caps) for p, o in (host.get("Tmpfs") or {}).items()}
    host["Ulimits"] = [admit_ulimit(u, caller.caps) for u in host.get("Ulimits") or []]
    host["OomScoreAdj"] = _at_least_zero(host.get("OomScoreAdj"), "OomScoreAdj")
    host["LogConfig"] = {"Type": LOG_DRIVER, "Config": {}}
    host["CgroupnsMode"] = "private"  # not the host's, whatever the daemon's default
    host["CapDrop"] = ["ALL"]
    host["SecurityOpt"] = [NO_NEW_PRIVILEGES]
    host["CgroupParent"] = caller.cgroup_parent
    host.update(clamp_resources(host, caller.caps))
    endpoints = (body.get("NetworkingConfig") or {}).get("EndpointsConfig") or {}
    if endpoints:
        body["NetworkingConfig"] = {
            "EndpointsConfig": {
                _network_ref(name, caller, resolved): admit_endpoint(settings)
                for name, settings in endpoints.items()
            }
        }
    body["HostConfig"] = host
    body["User"] = caller.user_spec  # every container runs as its owner
    body["Env"] = _env(body.get("Env") or [])
    body["Labels"] = own_labels(body.get("Labels"), caller.user, managed=True)
    if resolved.image is not None:
        require_own_or_shared("image", resolved.image, caller)
    return body


def _refuse_escapes(host: dict[str, Any]) -> None:
    """Fields whose only non-default values reach the host or other users."""
    if host.get("Privileged"):
        raise Refused("privileged containers are not allowed")
    if host.get("CapAdd"):
        raise Refused("adding capabilities is not allowed")
    if host.get("Devices") or host.get("DeviceCgroupRules"):
        raise Refused("host devices are not allowed")
    if host.get("DeviceRequests"):
        raise Refused("GPUs are given by ds01 (ds01 container create --gpus), not requested")
    if host.get("PublishAllPorts"):
        raise Refused("PublishAllPorts would publish on every host address; publish on 127.0.0.1")
    if host.get("OomKillDisable"):
        raise Refused("OomKillDisable is not allowed")
    for key in ("UTSMode", "UsernsMode", "Cgroup"):
        if host.get(key):
            raise Refused(f"{key}={host[key]} is not allowed")
    if (host.get("CgroupnsMode") or "private") != "private":
        raise Refused(f"CgroupnsMode={host['CgroupnsMode']} is not allowed")
    for key in ("MaskedPaths", "ReadonlyPaths"):
        if host.get(key) is not None:
            raise Refused(f"{key} is for admins")
    for key in ("Sysctls", "StorageOpt", "Annotations"):
        if host.get(key):
            raise Refused(f"{key} is for admins")
    for option in host.get("SecurityOpt") or []:
        if option.replace("=", ":") not in (NO_NEW_PRIVILEGES, f"{NO_NEW_PRIVILEGES}:true"):
            raise Refused(f"security option {option!r} is for admins")
    if (host.get("Runtime") or "runc") != "runc":
        raise Refused("another container runtime is for admins")
    if (host.get("Isolation") or "default") != "default":
        raise Refused("another isolation is for admins")
    if (host.get("VolumeDriver") or "local") != "local":
        raise Refused("volume drivers are for admins")
    if host.get("ContainerIDFile"):
        raise Refused("ContainerIDFile is written by the client, not sent")
    for key in (
        "BlkioWeight",
        "BlkioWeightDevice",
        "BlkioDeviceReadBps",
        "BlkioDeviceWriteBps",
        "BlkioDeviceReadIOps",
        "BlkioDeviceWriteIOps",
        "CpuRealtimePeriod",
        "CpuRealtimeRuntime",
        "KernelMemory",
        "KernelMemoryTCP",
        "CpuCount",
        "CpuPercent",
        "IOMaximumIOps",
        "IOMaximumBandwidth",
    ):
        if host.get(key):
            raise Refused(f"{key} is for admins")


def _check_namespaces(host: dict[str, Any], caller: Caller, resolved: Resolved) -> None:
    for key in ("PidMode", "IpcMode"):
        mode = host.get(key) or ""
        target = _mode_target(mode)
        if target is not None:
            found = resolved.containers[target]
            if found.owner != caller.user:
                raise Refused(f"{key} may only join your own containers")
            host[key] = f"container:{found.id}"
        elif mode == "host":
            raise Refused(f"{key}=host is not allowed")
        elif key == "PidMode" and mode:
            raise Refused(f"PidMode={mode} is not allowed")
        elif key == "IpcMode" and mode not in ("", "private", "shareable", "none"):
            raise Refused(f"IpcMode={mode} is not allowed")


def _network_mode(mode: str, caller: Caller, resolved: Resolved) -> str:
    if mode == "host":
        raise Refused("NetworkMode=host is not allowed")
    target = _mode_target(mode)
    if target is not None:
        found = resolved.containers[target]
        if found.owner != caller.user:
            raise Refused("NetworkMode may only join your own containers")
        return f"container:{found.id}"
    if mode in ("", *SHARED_NETWORKS):
        return mode
    return _network_ref(mode, caller, resolved)


def _network_ref(name: str, caller: Caller, resolved: Resolved) -> str:
    if name == "host":
        raise Refused("NetworkMode=host is not allowed")
    if name in SHARED_NETWORKS:
        return name
    found = resolved.networks[name]
    if not (found.shared or found.owner == caller.user):
        raise Refused(denial("network", found.owner))
    return found.id


def admit_endpoint(settings: dict[str, Any] | None) -> dict[str, Any] | None:
    if settings is None:
        return None
    if settings.get("Links"):
        raise Refused("endpoint Links are for admins; name your own containers in HostConfig")
    if settings.get("DriverOpts"):
        raise Refused("network driver options are for admins")
    return settings


def _admit_source(source: str, caller: Caller, resolved: Resolved) -> str:
    """A bind source, resolved: inside the home, and forwarded as the real path so
    Docker has no symlink left to follow."""
    if not source.startswith("/"):
        raise Refused(f"bind source {source!r} must be an absolute path")
    real = resolved.paths[source]
    if real and not within(real, caller.home):
        raise Refused(f"bind mounts must lie in your home {caller.home}, not {source}")
    if not real:
        raise Refused(f"bind source {source} does not exist: make it first")
    return real


def _admit_volume(name: str, caller: Caller, resolved: Resolved) -> str:
    found = resolved.volumes.get(name)
    if found is not None and found.owner != caller.user:
        raise Refused(denial("volume", found.owner))
    return name


def _admit_binds(
    binds: list[str], caller: Caller, resolved: Resolved
) -> tuple[list[str], list[dict[str, Any]]]:
    """Volume binds stay binds; a path bind becomes a bind mount, for which Docker never
    creates a missing source (as root) the way it does for a ``-v`` path."""
    volumes, mounts = [], []
    for spec in binds:
        source, target, mode = _bind(spec)
        flags = set(filter(None, mode.split(",")))
        if source.startswith("/"):
            if flags - {"ro", "rw"}:
                raise Refused(f"bind option {mode!r} is not allowed for a path (use ro or rw)")
            real = _admit_source(source, caller, resolved)
            mounts.append(
                {"Type": "bind", "Source": real, "Target": target, "ReadOnly": "ro" in flags}
            )
        else:
            if flags - _BIND_MODES:
                raise Refused(f"bind option {mode!r} is not allowed (use ro, rw or nocopy)")
            _admit_volume(source, caller, resolved)
            volumes.append(spec)
    return volumes, mounts


def _admit_mount(mount: dict[str, Any], caller: Caller, resolved: Resolved) -> dict[str, Any]:
    mount = dict(mount)
    kind = mount.get("Type") or "volume"
    if kind == "bind":
        options = mount.get("BindOptions") or {}
        if options.get("Propagation") or options.get("CreateMountpoint"):
            raise Refused("bind propagation and CreateMountpoint are for admins")
        mount["Source"] = _admit_source(mount.get("Source") or "", caller, resolved)
    elif kind == "volume":
        options = mount.get("VolumeOptions") or {}
        if options.get("DriverConfig"):
            raise Refused("volumes with driver options are not allowed (they can bind host paths)")
        if options.get("Subpath"):
            raise Refused("volume subpaths are for admins")
        if mount.get("Source"):
            _admit_volume(mount["Source"], caller, resolved)
    elif kind == "tmpfs":
        options = dict(mount.get("TmpfsOptions") or {})
        if options.get("Options"):
            raise Refused("tmpfs mount options are for admins; use HostConfig.Tmpfs")
        if mount.get("Source"):
            raise Refused("a tmpfs mount has no source")
        options["SizeBytes"] = _capped_size(options.get("SizeBytes") or 0, caller.caps)
        mount["TmpfsOptions"] = options
    else:
        raise Refused(f"mounts of type {kind} are not allowed")
    return mount


def _link(spec: str, caller: Caller, resolved: Resolved) -> str:
    """A legacy link (compose's one-off `run` sends them): only to one's own containers,
    by the id Docker resolved, under an alias without a path."""
    name, _, alias = spec.partition(":")
    alias = alias or name.lstrip("/")
    if "/" in alias or not alias:
        raise Refused(f"link alias {alias!r} may not contain '/'")
    found = resolved.containers[name.lstrip("/")]
    if found.owner != caller.user:
        raise Refused("Links may only name your own containers")
    return f"{found.id}:{alias}"


def _volumes_from(spec: str, caller: Caller, resolved: Resolved) -> str:
    name, _, mode = spec.partition(":")
    if mode not in ("", "ro", "rw"):
        raise Refused(f"VolumesFrom mode {mode!r} is not allowed")
    found = resolved.containers[name]
    if found.owner != caller.user:
        raise Refused("VolumesFrom may only name your own containers")
    return f"{found.id}:{mode}" if mode else found.id


def _group_add(groups: list[str], caller: Caller) -> list[str]:
    """Only the caller's own host groups, by number: a name would be looked up in the
    image's /etc/group, which the image's author wrote."""
    for group in groups:
        if not group.isdigit() or int(group) not in caller.groups:
            raise Refused(
                f"GroupAdd {group!r}: only your own host groups, by number "
                f"({', '.join(str(g) for g in sorted(caller.groups))})"
            )
    return [str(int(g)) for g in groups]


def _ports(bindings: dict[str, Any]) -> dict[str, Any]:
    admitted: dict[str, Any] = {}
    for port, hosts in bindings.items():
        admitted[port] = []
        for binding in hosts or []:
            binding = binding or {}
            if (binding.get("HostIp") or "127.0.0.1") != "127.0.0.1":
                raise Refused("ports may be published on 127.0.0.1 only")
            host_port = binding.get("HostPort") or ""
            if host_port:
                found = _PORT.fullmatch(host_port)
                ports = [int(p) for p in (found["low"], found["high"]) if p] if found else []
                if not ports or min(ports) < 1024 or max(ports) > 65535:
                    raise Refused(f"host port {host_port!r}: only ports 1024-65535")
            admitted[port].append({"HostIp": "127.0.0.1", "HostPort": host_port})
    return admitted


def _size(text: str) -> int:
    found = _SIZE.fullmatch(text)
    if not found:
        raise Refused(f"tmpfs size {text!r}: give bytes or a k, m or g size")
    return int(found["n"]) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[found["unit"].lower()]


def _capped_size(size: int, caps: Caps) -> int:
    if caps.memory is not None and (size <= 0 or size > caps.memory):
        return caps.memory
    return size


def _tmpfs(options: str, caps: Caps) -> str:
    """tmpfs is forced nosuid,nodev, its size within the memory limit."""
    flags, size, extra = [], 0, []
    for option in filter(None, (options or "").split(",")):
        key, _, value = option.partition("=")
        if key == "size":
            size = _size(value)
        elif key == "mode" and re.fullmatch(r"[0-7]{3,4}", value):
            extra.append(option)
        elif option in _TMPFS_FLAGS:
            flags.append(option)
        else:
            raise Refused(f"tmpfs option {option!r} is not allowed")
    size = _capped_size(size, caps)
    kept = [f for f in flags if f not in ("nosuid", "nodev")]
    return ",".join([*kept, "nosuid", "nodev", *extra, *([f"size={size}"] if size else [])])


def ulimit_caps(caps: Caps) -> dict[str, int | None]:
    """The most each ulimit may be (None: any finite value)."""
    return {
        "nofile": MAX_NOFILE,
        "nproc": caps.pids or MAX_NOFILE,
        "memlock": caps.memory,
        "stack": caps.memory,
        "core": caps.memory,
        "cpu": None,
        "fsize": None,
        "sigpending": MAX_NOFILE,
        "msgqueue": 1 << 24,
    }


def admit_ulimit(ulimit: dict[str, Any], caps: Caps) -> dict[str, Any]:
    name = ulimit.get("Name") or ""
    limits = ulimit_caps(caps)
    if name not in limits:
        raise Refused(f"ulimit {name!r} is not allowed ({', '.join(limits)})")
    soft, hard = ulimit.get("Soft") or 0, ulimit.get("Hard") or 0
    most = limits[name]
    if soft < 0 or hard < 0 or soft > hard or (most is not None and hard > most):
        top = "any finite value" if most is None else f"at most {most}"
        raise Refused(f"ulimit {name}={soft}:{hard}: soft <= hard, {top}")
    return {"Name": name, "Soft": soft, "Hard": hard}


def _at_least_zero(value: int | None, key: str) -> int:
    if value is not None and not 0 <= value <= 1000:
        raise Refused(f"{key} must lie between 0 and 1000")
    return value or 0


def clamp_resources(request: dict[str, Any], caps: Caps) -> dict[str, Any]:
    """No more than the user's limits: an absent or larger request gets the limit."""
    clamped: dict[str, Any] = {}
    for key, cap in (
        ("NanoCpus", caps.nano_cpus),
        ("Memory", caps.memory),
        ("MemorySwap", caps.memory_swap),
        ("PidsLimit", caps.pids),
        ("ShmSize", caps.shm_size),
    ):
        asked = request.get(key)
        if cap is not None and (not asked or asked <= 0 or asked > cap):
            clamped[key] = cap
    if request.get("CpuQuota") or request.get("CpuPeriod"):
        clamped["CpuQuota"] = clamped["CpuPeriod"] = 0  # NanoCpus carries the CPU limit
    shares = request.get("CpuShares") or 0
    if shares < 0 or shares > CPU_SHARES:
        clamped["CpuShares"] = CPU_SHARES
    reservation = request.get("MemoryReservation") or 0
    if caps.memory is not None and reservation > caps.memory:
        clamped["MemoryReservation"] = caps.memory
    return clamped


def _env(env: list[str]) -> list[str]:
    for entry in env:
        if entry.split("=", 1)[0] in GPU_ENV:
            raise Refused("GPU visibility is set by ds01, not by the request")
    # The image may say NVIDIA_VISIBLE_DEVICES=all: GPUs come only through ds01.
    return [*env, *(f"{key}={value}" for key, value in NO_GPU_ENV.items())]


def owner_label(found: dict[str, Any]) -> str:
    """The owner a volume or network was labelled with ("" for none)."""
    return (found.get("Labels") or {}).get(OWNER_LABEL, "")


def within(path: str | PurePosixPath, home: PurePosixPath) -> bool:
    """Whether a resolved ``path`` is ``home`` or lies below it."""
    path = PurePosixPath(path)
    return path == home or home in path.parents


def own_labels(labels: dict[str, str] | None, user: str, managed: bool = False) -> dict[str, str]:
    """Labels ds01 trusts are ds01's to set: what the caller sent under them is dropped."""
    kept = {k: v for k, v in (labels or {}).items() if not k.startswith(("ds01.", "aime.mlc"))}
    kept[OWNER_LABEL] = user
    if managed:
        kept[MANAGED_LABEL] = "true"
        kept[GATEWAY_LABEL] = "true"
    return kept


def require_own_or_shared(kind: str, found: Found, caller: Caller) -> None:
    if not (found.shared or found.owner == caller.user):
        raise Refused(denial(kind, found.owner))


# --- exec, update, volumes, networks ------------------------------------------------------


def admit_exec(body: dict[str, Any] | None, caller: Caller) -> dict[str, Any]:
    """An exec runs as the container's owner: any User that does not resolve, by number,
    to the owner's uid is refused (a name is looked up in the image's own /etc/passwd)."""
    body = dict(body or {})
    if body.get("Privileged"):
        raise Refused("Permission denied: privileged exec is for admins")
    asked = body.get("User") or ""
    if asked:
        uid, _, gid = asked.partition(":")
        if not uid.isdigit() or int(uid) != caller.uid:
            raise Refused(
                f"Permission denied: exec runs as you ({caller.user}, uid {caller.uid}); "
                f"exec as {asked!r} is for admins"
            )
        if gid and (not gid.isdigit() or int(gid) not in caller.groups):
            raise Refused(f"Permission denied: group {gid!r} is not one of yours")
    # GPU variables in an exec's environment reach no device: the devices were chosen
    # when the container was made. Clients pass the container's own environment back.
    body["User"] = _numeric(asked) if ":" in asked else caller.user_spec
    return body


def _numeric(spec: str) -> str:
    uid, _, gid = spec.partition(":")
    return f"{int(uid)}:{int(gid)}"


def admit_update(body: dict[str, Any] | None, caller: Caller) -> dict[str, Any]:
    body = dict(body or {})
    _refuse_escapes(body)
    if body.get("CgroupParent"):
        raise Refused("the cgroup parent is ds01's")
    for key in ("NanoCpus", "Memory", "MemorySwap", "PidsLimit"):
        cap = getattr(caller.caps, _CAP_FIELDS[key])
        asked = body.get(key)
        if cap is not None and asked is not None and (asked <= 0 or asked > cap):
            raise Refused(f"{key}={asked} is beyond your limit {cap}")
    body.update(clamp_resources({k: v for k, v in body.items() if k != "ShmSize"}, Caps()))
    return body


_CAP_FIELDS = {
    "NanoCpus": "nano_cpus",
    "Memory": "memory",
    "MemorySwap": "memory_swap",
    "PidsLimit": "pids",
}


def admit_volume_create(body: dict[str, Any] | None, caller: Caller) -> dict[str, Any]:
    """A local volume with driver options can bind any host path; a volume is its
    creator's (labelled like containers)."""
    body = dict(body or {})
    if (body.get("Driver") or "local") != "local" or body.get("DriverOpts"):
        raise Refused("volumes with driver options or other drivers are for admins")
    if body.get("ClusterVolumeSpec"):
        raise Refused("cluster volumes are for admins")
    body["Driver"] = "local"
    body["Labels"] = own_labels(body.get("Labels"), caller.user)
    return body


def admit_network_create(body: dict[str, Any] | None, caller: Caller) -> dict[str, Any]:
    """Users get a plain bridge with Docker's own addressing: a subnet of their choosing
    could shadow a route the host needs."""
    body = dict(body or {})
    if not body.get("Name"):
        raise Refused("a network needs a name")
    if (body.get("Driver") or "bridge") != "bridge":
        raise Refused("only bridge networks are for users; other drivers are for admins")
    if body.get("Options"):
        raise Refused("network driver options are for admins")
    ipam = body.get("IPAM") or {}
    if (ipam.get("Driver") or "default") != "default" or ipam.get("Config") or ipam.get("Options"):
        raise Refused("network addressing (IPAM) is for admins")
    for key in ("EnableIPv6", "Ingress", "ConfigOnly", "Attachable"):
        if body.get(key):
            raise Refused(f"{key} networks are for admins")
    if body.get("ConfigFrom"):
        raise Refused("ConfigFrom is for admins")
    if (body.get("Scope") or "local") != "local":
        raise Refused("only local networks are for users")
    body["Driver"] = "bridge"
    body["Labels"] = own_labels(body.get("Labels"), caller.user)
    return body


_CHANGE = re.compile(r"^\s*(?P<word>[A-Za-z]+)\b(?P<rest>.*)$", re.DOTALL)
_CHANGES_ALLOWED = frozenset({"ENV", "LABEL", "WORKDIR", "CMD", "ENTRYPOINT", "EXPOSE", "USER"})


def admit_changes(changes: list[str]) -> list[str]:
    """Dockerfile instructions for commit and import: no ds01 or MLC labels, no ONBUILD
    or VOLUME tricks."""
    for change in changes:
        for line in change.splitlines():
            found = _CHANGE.match(line)
            if not line.strip():
                continue
            if not found or found["word"].upper() not in _CHANGES_ALLOWED:
                raise Refused(
                    f"change {line.strip()!r}: only {', '.join(sorted(_CHANGES_ALLOWED))}"
                )
            plain = re.sub(r"[\\\"'\s]", "", found["rest"]).lower()
            if found["word"].upper() == "LABEL" and ("$" in plain or re.search("ds01|aime", plain)):
                raise Refused("ds01 and MLC labels are ds01's to set (and no $ in LABEL)")
    return changes
