"""What Docker makes of a user's limits: the one computation behind both the flags
``ds01 limits --docker-args`` prints and the containers ds01 and its gateway create.

The limits say what the configuration allows. The Docker daemon that runs the container
then decides the rest: no more CPUs than it has, a cgroup parent in its cgroup driver's
form, whole nano-CPUs, and its own defaults for what is left unset. ``DockerArgs.on_host``
writes all of that out, so the flags say what ``docker inspect`` shows. Pure: the callers
ask Docker (``DockerInfo.of`` reads its ``/info``) and the limits service.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ds01.core.units import format_size

# Docker's /dev/shm when none is asked for (dockerd's --default-shm-size).
DOCKER_SHM_SIZE = 64 * 1024**2
NANO = 10**9


def nano_cpus(cpus: float) -> int:
    """Docker's NanoCpus for a CPU count, rounded as its CLI parses --cpus: 2.01 is
    2010000000 (``int(2.01 * 1e9)`` is one short)."""
    return round(cpus * NANO)


def cgroup_parent_for(slice_name: str, driver: str) -> str:
    """The slice itself for Docker's systemd driver; ``/ds01/<group>/<user>`` for cgroupfs."""
    if driver == "systemd":
        return slice_name
    group, user = slice_name.removesuffix(".slice").removeprefix("ds01-").split("-", 1)
    return f"/ds01/{group}/{user}"


@dataclass(frozen=True)
class DockerInfo:
    """What only the Docker daemon that runs the container knows."""

    ncpu: int  # Docker refuses a larger CPU limit; 0: not known
    cgroup_driver: str  # "systemd" or "cgroupfs"

    @classmethod
    def of(cls, info: dict[str, Any]) -> DockerInfo:
        """From Docker's ``/info`` answer."""
        return cls(int(info.get("NCPU") or 0), info.get("CgroupDriver") or "cgroupfs")


@dataclass(frozen=True)
class DockerArgs:
    cpus: float | None
    memory: int | None
    memory_swap: int | None
    shm_size: int | None
    ipc_mode: str | None
    pids_limit: int | None
    cgroup_parent: str

    def on_host(self, docker: DockerInfo) -> DockerArgs:
        """What a container gets from this Docker, every value written out: the CPUs it
        has at most, whole nano-CPUs, its cgroup parent's form, and Docker's own choices
        where the limits set none (0 is Docker's "no limit"; swap twice the memory;
        /dev/shm 64m; a private IPC namespace)."""
        cpus = self.cpus or None
        if cpus is not None:
            cpus = nano_cpus(min(cpus, docker.ncpu) if docker.ncpu > 0 else cpus) / NANO
        memory = self.memory or None
        ipc = "host" if self.ipc_mode == "host" else "private"
        return dataclasses.replace(
            self,
            cpus=cpus,
            memory=memory,
            memory_swap=self.memory_swap or (2 * memory if memory else None),
            shm_size=None if ipc == "host" else self.shm_size or DOCKER_SHM_SIZE,
            ipc_mode=ipc,
            pids_limit=self.pids_limit or None,
            cgroup_parent=cgroup_parent_for(self.cgroup_parent, docker.cgroup_driver),
        )

    def flags(self) -> str:
        """The seed's flag line; ``--ipc=host`` replaces ``--shm-size``, never both."""
        flags = []
        if self.cpus is not None:
            flags.append(f"--cpus={_cpus_text(self.cpus)}")
        if self.memory is not None:
            flags.append(f"--memory={format_size(self.memory)}")
        if self.memory_swap is not None:
            flags.append(f"--memory-swap={format_size(self.memory_swap)}")
        if self.ipc_mode:
            flags.append(f"--ipc={self.ipc_mode}")
        if self.ipc_mode != "host" and self.shm_size is not None:
            flags.append(f"--shm-size={format_size(self.shm_size)}")
        if self.pids_limit is not None:
            flags.append(f"--pids-limit={self.pids_limit}")
        flags.append(f"--cgroup-parent={self.cgroup_parent}")
        return " ".join(flags)


def _cpus_text(cpus: float) -> str:
    """Exact to the nano-CPU, as Docker's CLI reads it back: 2, 0.5, 2.01."""
    whole, fraction = divmod(nano_cpus(cpus), NANO)
    return f"{whole}.{fraction:09d}".rstrip("0") if fraction else str(whole)
