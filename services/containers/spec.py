"""What a ds01 container looks like to Docker: name, labels, limits, mounts, user setup.

Pure functions: the lifecycle gathers the facts (limits, GPUs, the host account), these
turn them into the arguments of Docker's create call, following AIME MLC's conventions
so that MLC's own ``mlc list`` and ``mlc open`` see and open ds01 containers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docker.types import DeviceRequest

from ds01.containers.adoption import NO_GPU_ENV, TRUSTED_LABELS, made_by_gateway
from ds01.core.docker_args import nano_cpus
from ds01.core.naming import GATEWAY_LABEL, OWNER_LABEL, SEPARATOR, docker_user

MLC_VERSION = "4"
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}")

_OURS = ("ds01.", "aime.mlc")  # label prefixes only ds01 sets on its containers


class SpecError(ValueError):
    """The request cannot become a container; the message says what to change."""


def docker_name(name: str, user: str) -> str:
    """``<name>._.<user>``, the seed's and MLC's convention."""
    if not _NAME.fullmatch(name) or SEPARATOR in name:
        raise SpecError(
            f"{name!r} is not a valid container name: use letters, digits and _ . - "
            f"(at most 63, not starting with . _ -, and without {SEPARATOR!r})"
        )
    return f"{name}{SEPARATOR}{docker_user(user)}"


def made_as(labels: Mapping[str, str]) -> str | None:
    """The Docker name a ds01 create gave the container, which names its account files
    and stays in its labels through a `docker rename`; None for a container made
    through the gateway (whose ds01 labels a user may have set)."""
    if made_by_gateway(labels):
        return None
    try:
        return docker_name(labels.get("ds01.name", ""), labels.get(OWNER_LABEL, ""))
    except SpecError:
        return None


@dataclass(frozen=True)
class Account:
    """The host account the container's user mirrors (the seed's 'I have no name!' fix)."""

    user: str
    uid: int
    gid: int
    group: str
    home: Path


@dataclass(frozen=True)
class Limits:
    cpus: float | None = None
    memory: int | None = None
    memory_swap: int | None = None
    shm_size: int | None = None
    ipc_mode: str = ""  # "host", "private", or "" for Docker's default
    pids: int | None = None
    cgroup_parent: str = ""


def limits_of(args: Any) -> Limits:
    """A GetDockerArgs answer for this host's Docker, taken as it is: the container gets
    exactly what ``ds01 limits --docker-args`` prints."""

    def given(field: str) -> Any:
        return getattr(args, field) if args.HasField(field) else None

    return Limits(
        cpus=given("cpus"),
        memory=given("memory_bytes"),
        memory_swap=given("memory_swap_bytes"),
        shm_size=given("shm_size_bytes"),
        ipc_mode=args.ipc_mode,
        pids=given("pids_limit"),
        cgroup_parent=args.cgroup_parent,
    )


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    account: Account
    limits: Limits
    gpu_environment: dict[str, str] = field(default_factory=dict)
    gpu_slots: tuple[str, ...] = ()  # "<node>/<slot id>"
    gpu_device_ids: tuple[str, ...] = ()  # UUIDs for a Docker device request, if any
    workspace: Path | None = None
    data_dirs: tuple[Path, ...] = ()
    network_mode: str | None = None
    container_type: str = ""
    nvidia_runtime: bool = False  # Docker has the NVIDIA runtime: request exactly our GPUs
    gpu_products: tuple[str, ...] = ()  # of the allocated GPUs, e.g. "A100": mlc's ARCH
    # The image's own labels: Docker copies them into the container unless it is given
    # others under the same keys, and ds01's and mlc's are ds01's alone to say.
    image_labels: tuple[str, ...] = ()
    # Read-only binds of the container's own /etc/passwd and /etc/group (AccountFiles).
    account_binds: tuple[str, ...] = ()

    @property
    def docker_name(self) -> str:
        return docker_name(self.name, self.account.user)

    def labels(self) -> dict[str, str]:
        """ds01's and MLC's labels. No value may hold a comma: MLC's parser splits on them."""
        user = self.account.user
        labels = {
            # Each label ds01 or mlc reads, set here, never the image's: what the image
            # says under those names (a committed gateway container's ds01.gateway=true,
            # say) is blanked, and ds01's own values follow.
            **dict.fromkeys((k for k in self.image_labels if k.startswith(_OURS)), ""),
            **dict.fromkeys((*TRUSTED_LABELS, GATEWAY_LABEL), ""),
            "ds01.managed": "true",
            "ds01.user": user,
            "ds01.name": self.name,
            "ds01.gpu.slots": " ".join(self.gpu_slots),
            "ds01.gpu.uuids": " ".join(self.gpu_device_ids),
            "ds01.type": self.container_type,
            "ds01.image": self.image,
            # AIME mlc's own labels, with mlc's value conventions ("-" for no mount).
            "aime.mlc": user,
            "aime.mlc.NAME": self.name,
            "aime.mlc.USER": user,
            "aime.mlc.MLC_VERSION": MLC_VERSION,
            "aime.mlc.WORK_MOUNT": str(self.workspace or "-"),
            "aime.mlc.DATA_MOUNT": " ".join(str(d) for d in self.data_dirs) or "-",
            "aime.mlc.MODELS_MOUNT": "-",
            "aime.mlc.FRAMEWORK": framework_of(self.image),
            "aime.mlc.ARCH": mlc_arch(self.gpu_products),
            "aime.mlc.GPUS": str(len(self.gpu_slots)),  # how many were asked for
        }
        for key, value in labels.items():
            if "," in value:
                raise SpecError(
                    f"label {key} would contain a comma ({value!r}); MLC cannot read it"
                )
        return labels

    def create_arguments(self) -> dict[str, Any]:
        """Keyword arguments for docker-py's ``containers.create``."""
        limits = self.limits
        mounts = []
        if self.workspace is not None:
            mounts.append(f"{self.workspace}:/workspace")
        for data in self.data_dirs:
            target = "/data" if len(self.data_dirs) == 1 else f"/data/{data.name}"
            mounts.append(f"{data}:{target}")
        mounts.extend(self.account_binds)
        arguments: dict[str, Any] = {
            "image": self.image,
            "name": self.docker_name,
            "command": ["sh", "-c", WAIT],
            # The user's own uid, no capabilities, no setuid: nothing in the container may
            # act as root, nor leave root-owned or setuid files in the user's home.
            "user": f"{self.account.uid}:{self.account.gid}",
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "labels": self.labels(),
            "environment": {"DS01_USER": self.account.user, **NO_GPU_ENV, **self.gpu_environment},
            "working_dir": "/workspace",
            "volumes": mounts,
            "cgroup_parent": limits.cgroup_parent or None,
            "pids_limit": limits.pids,
            "detach": True,
        }
        if limits.cpus is not None:
            arguments["nano_cpus"] = nano_cpus(limits.cpus)
        if limits.memory is not None:
            arguments["mem_limit"] = limits.memory
        if limits.memory_swap is not None:
            arguments["memswap_limit"] = limits.memory_swap
        if limits.ipc_mode:
            arguments["ipc_mode"] = limits.ipc_mode
        if limits.ipc_mode != "host" and limits.shm_size is not None:  # Docker refuses both
            arguments["shm_size"] = limits.shm_size
        if self.network_mode:
            arguments["network_mode"] = self.network_mode
        if self.nvidia_runtime and self.gpu_device_ids:
            arguments["device_requests"] = [
                DeviceRequest(
                    driver="nvidia", device_ids=list(self.gpu_device_ids), capabilities=[["gpu"]]
                )
            ]
        return {k: v for k, v in arguments.items() if v is not None}


def framework_of(image: str) -> str:
    """mlc's FRAMEWORK, <framework>-<version>, from an image reference as well as one
    can: pytorch/pytorch:2.1.0-cuda12 -> pytorch-2.1.0-cuda12 (the image itself is in
    ds01.image)."""
    reference = image.split("@", 1)[0]
    repository, _, tag = reference.rpartition(":")
    if not repository or "/" in tag:  # no tag: the colon was a registry's port
        repository, tag = reference, "latest"
    return f"{repository.rsplit('/', 1)[-1]}-{tag}"


# mlc's ARCH by GPU generation; a product not listed is plain CUDA.
_ARCHES = (
    (("B100", "B200", "GB200", "RTX PRO 6000"), "CUDA_BLACKWELL"),
    (("H100", "H200", "GH200", "H800"), "CUDA_HOPPER"),
    (("L4", "L40", "RTX 40", "RTX 6000 Ada", "RTX 5000 Ada"), "CUDA_ADA"),
    (("A100", "A30", "A40", "A10", "A16", "A800", "RTX A", "RTX 30"), "CUDA_AMPERE"),
)


def mlc_arch(products: tuple[str, ...]) -> str:
    """mlc's ARCH label for the container's GPUs ("-" without any)."""
    if not products:
        return "-"
    for prefixes, arch in _ARCHES:
        if any(p in products[0] for p in prefixes):
            return arch
    return "CUDA"


# The main process: waits, and ends at once on SIGTERM (a fast `docker stop`).
WAIT = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"


def named_accounts(passwd: str, group: str, account: Account) -> tuple[str, str]:
    """/etc/passwd and /etc/group of an image with the host uid and gid given names, group
    first, as the files are (any image: busybox or Debian); unchanged where a name for the
    number is there already. The service writes them on the host (bind-mounted into the
    container) or with Docker's archive API, so no program of the image ever runs as
    root for it."""
    if not any(_field(line, 2) == str(account.gid) for line in group.splitlines()):
        group = _line_added(group, f"{_name(account.group)}:x:{account.gid}:")
    if not any(_field(line, 2) == str(account.uid) for line in passwd.splitlines()):
        entry = f"{_name(account.user)}:x:{account.uid}:{account.gid}::/workspace:/bin/sh"
        passwd = _line_added(passwd, entry)
    return passwd, group


def _field(line: str, index: int) -> str:
    fields = line.split(":")
    return fields[index] if len(fields) > index else ""


def _name(name: str) -> str:
    """A name as passwd and group files can hold it: no ':' and no line breaks."""
    return "".join(c if c.isprintable() and c not in ":," else "_" for c in name)


def _line_added(text: str, line: str) -> str:
    return text + ("" if not text or text.endswith("\n") else "\n") + line + "\n"
