"""A user's effective limits: defaults, then their group, then their override, key by key."""

from __future__ import annotations

import grp
import logging
import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ds01.core.docker_args import DockerArgs
from ds01.core.naming import sanitize_for_systemd
from ds01.limits.config import (
    ARCHIVED,
    SHARED_MEMORY_KEYS,
    Layer,
    LimitsConfig,
    group_of,
    override_of,
)
from ds01.limits.schema import LIMIT_KEYS

log = logging.getLogger(__name__)

DEFAULT, GROUP, CONTAINER_TYPE, OVERRIDE = "default", "group", "container_type", "override"
# Limits DS01 also writes under policies (sigterm_grace_s, created_container_timeout_m):
# the policy applies where no layer sets the limit.
POLICY_FALLBACKS = ("sigterm_grace", "created_container_timeout")
# What a key is when no layer sets it: unlimited, except these.
BUILTIN = {"priority": 0, "allow_full_gpu": False}


def slice_name(group: str, user: str) -> str:
    return f"ds01-{sanitize_for_systemd(group)}-{sanitize_for_systemd(user)}.slice"


@dataclass(frozen=True)
class Setting:
    value: Any  # None: unlimited
    source: str  # default, group or override

    @property
    def unlimited(self) -> bool:
        return self.value is None


@dataclass(frozen=True)
class UserLimits:
    user: str
    group: str
    container_type: str
    settings: dict[str, Setting]  # every key of LIMIT_KEYS
    policies: dict[str, Any]
    aggregate: Layer | None
    cgroup_parent: str
    archived: bool = False  # listed in archived.members: no GPUs, no containers

    def value(self, key: str) -> Any:
        return self.settings[key].value

    @property
    def priority(self) -> int:
        return self.value("priority")

    def docker_args(self) -> DockerArgs:
        """As configured; ``on_host`` makes it what a container on a given Docker gets."""
        return DockerArgs(
            cpus=self.value("max_cpus"),
            memory=self.value("memory"),
            memory_swap=self.value("memory_swap"),
            shm_size=self.value("shm_size"),
            ipc_mode=self.value("ipc_mode"),
            pids_limit=self.value("pids_limit"),
            cgroup_parent=self.cgroup_parent,
        )


class UnknownContainerType(ValueError):
    pass


def resolve(config: LimitsConfig, user: str, container_type: str = "") -> UserLimits:
    """Defaults, then the user's group, then the container type, then the override."""
    group_name = group_of(config, user)
    group = config.groups.get(group_name)
    override = override_of(config, user)
    layers: list[tuple[str, Layer]] = [(DEFAULT, config.defaults)]
    if group:
        layers.append((GROUP, group.layer))
    if container_type:
        if container_type not in config.container_types:
            known = ", ".join(config.container_types) or "none"
            raise UnknownContainerType(
                f"unknown container type {container_type!r}; configured: {known}"
            )
        layers.append((CONTAINER_TYPE, config.container_types[container_type]))
    if override:
        layers.append((OVERRIDE, override.layer))
    settings = {key: Setting(BUILTIN.get(key), DEFAULT) for key in LIMIT_KEYS}
    for source, layer in layers:
        for key, value in layer.items():
            settings[key] = Setting(value, source)
    _settle_shared_memory(settings, layers)
    archived = group_name == ARCHIVED
    if archived:  # access withdrawn: whatever a layer says, nothing may be taken
        for key in ("max_gpu_equivalents", "max_containers_per_user"):
            settings[key] = Setting(0, GROUP)
    policies = dict(config.policies)
    aggregate = None
    if group:
        policies.update(group.policies)
        aggregate = group.aggregate
    if override:
        policies.update(override.policies)
        aggregate = override.aggregate if override.aggregate is not None else aggregate
    for key in POLICY_FALLBACKS:  # DS01 also sets these as policies, below any layer
        if settings[key].value is None and policies.get(key) is not None:
            settings[key] = Setting(policies[key], DEFAULT)
    if config.enforcement.get("aggregate_limits") is False:
        aggregate = None
    return UserLimits(
        user=user,
        group=group_name,
        container_type=container_type,
        settings=settings,
        policies=policies,
        aggregate=aggregate,
        cgroup_parent=slice_name(group_name, user),
        archived=archived,
    )


def _settle_shared_memory(settings: dict[str, Setting], layers: list[tuple[str, Layer]]) -> None:
    """ipc_mode and shm_size are one choice, made by the most specific layer that sets
    either: a group with ``ipc_mode: host`` beats the defaults' shm_size, and an override's
    shm_size beats the group's ``ipc_mode: host``."""
    for source, layer in reversed(layers):
        if any(key in layer for key in SHARED_MEMORY_KEYS):
            if layer.get("ipc_mode") == "host":
                settings["shm_size"] = Setting(None, source)
            else:
                settings["ipc_mode"] = Setting(layer.get("ipc_mode"), source)
            return


def is_admin(config: LimitsConfig, user: str, unix_members: Collection[str] | None = None) -> bool:
    """root, access_control.admin_users, and members of the admin group: the ds01 group
    of that name in the configuration, or supplementary members of the Linux group of that
    name. A primary group does not count: an account named like the admin group gets a
    user-private group of that very name. Every service asks this one function (through
    the limits service). ``unix_members``: the Linux group's members as last read (the
    limits service reads them once a minute, and reports who joined or left); None reads
    them now."""
    if user == "root" or user in config.admin_users:
        return True
    group = config.admin_group
    if not group:
        return False
    # Raw names only: sanitizing is lossy, and h.baker_x must not pass for h_baker_x.
    if group in config.groups and user in config.groups[group].member_set:
        return True
    return user in (unix_group_members(group) if unix_members is None else unix_members)


NSS_TIMEOUT = 5.0  # seconds NSS may take to list a group (an LDAP server's answer)


@dataclass
class _Lookup:
    group: str
    thread: threading.Thread
    found: list[frozenset[str]]


_last: list[_Lookup] = []  # the last lookup started: hung while its thread is alive
_starting = threading.Lock()


def unix_group_members(group: str) -> frozenset[str]:
    """The supplementary members of the Linux group ``group``; none if there is no such
    group, or NSS (LDAP perhaps) cannot say within NSS_TIMEOUT: nobody is an admin by a
    group unread, and an NSS that stops answering holds up no reload of the files. One
    lookup at a time: a caller while one is under way waits for its answer."""
    with _starting:
        lookup = _last[0] if _last else None
        if lookup is None or not lookup.thread.is_alive() or lookup.group != group:
            found: list[frozenset[str]] = []
            thread = threading.Thread(
                target=lambda: found.append(_members(group)), name="nss-group", daemon=True
            )
            lookup = _Lookup(group, thread, found)
            _last[:] = [lookup]
            thread.start()
    lookup.thread.join(NSS_TIMEOUT)
    if lookup.thread.is_alive():
        log.warning(
            "NSS did not list group %r's members within %s s; none count as admins",
            group,
            NSS_TIMEOUT,
        )
    return lookup.found[0] if lookup.found else frozenset()


def _members(group: str) -> frozenset[str]:
    try:
        return frozenset(grp.getgrnam(group).gr_mem)
    except KeyError:
        return frozenset()
    except Exception as err:  # OSError, a name NSS refuses: fail closed, say why
        log.warning("cannot read the members of group %r (%s); none count as admins", group, err)
        return frozenset()
