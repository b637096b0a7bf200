"""Reading and checking a DS01 limits configuration.

The configuration is ``resource-limits.yaml`` plus, in the same directory, the member
files ``groups/<group>.members`` and ``user-overrides.yaml``. Every problem in any of
them is collected with its file and line, so an admin sees all of them at once; a
configuration with any problem is refused whole.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds01.core.naming import sanitize_for_systemd
from ds01.core.units import format_size
from ds01.limits.schema import (
    AGGREGATE_ALIASES,
    AGGREGATE_KEYS,
    AGGREGATE_SPELLINGS,
    ALIASES,
    ENFORCEMENT_KEYS,
    GPU_ALLOCATION_KEYS,
    LIMIT_KEYS,
    POLICY_KEYS,
    UNLIMITED_WORDS,
    Kind,
    suffixed,
)
from ds01.limits.source import Document, Issue, KeyPath, YamlError, load_document

DEFAULT_GROUP = "student"
MEMBERS_DIR = "groups"
MEMBERS_SUFFIX = ".members"
OVERRIDES_FILE = "user-overrides.yaml"

ARCHIVED = "archived"  # groups/archived.members: users whose access is withdrawn
DS01_ADMIN_GROUP = "admin"  # DS01's group of unlimited users

TOP_LEVEL_KEYS = (
    "defaults",
    "default_group",
    "groups",
    "policies",
    "container_types",
    "enforcement",
    "access_control",
    "gpu_allocation",
    "user_overrides",
    "monitoring",
    "bare_metal_access",
)
GROUP_EXTRA_KEYS = ("members", "aggregate", "policies")
OVERRIDE_EXTRA_KEYS = ("aggregate", "policies")
ACCESS_CONTROL_KEYS = ("admin_users", "admin_group", "wrapper")
MONITORING_KEYS = ("infrastructure_containers", "infrastructure_label")

# Keys of DS01's format that mean nothing in ds01's design: read, and listed by
# `ds01 limits check` as notes (never as problems), with why.
_NOT_ENFORCED = "DS01 lists it as not implemented; ds01 does not enforce it either"
NOTES: dict[str, str] = {
    "bare_metal_access": "ds01 does not gate GPU use outside containers (DS01's login "
    "script did); the section is not used",
    "access_control.wrapper": "ds01's Docker gateway replaces DS01's docker wrapper, and "
    "always enforces; the wrapper's settings are not used",
    "enforcement.cgroup_driver": "ds01 follows the cgroup driver Docker reports",
    "gpu_allocation.slots_per_gpu": "ds01 takes slots per GPU from the inventory",
    "gpu_allocation.mig_instances_per_gpu": "ds01 takes slots per GPU from the inventory",
    "gpu_allocation.allocation_method": "ds01 always allocates when a container is made",
    "gpu_allocation.mig_strategy": "ds01 reads MIG from the inventory (NVML)",
    "gpu_allocation.mig_gpus": "ds01 reads MIG from the inventory (NVML); it never "
    "changes MIG settings",
    "gpu_allocation.respect_reservations": _NOT_ENFORCED,
    **{
        f"{layer}.{key}": _NOT_ENFORCED
        for layer in ("limits", "aggregate")
        for key in (
            "gpu_memory",
            "io_read_bps",
            "io_write_bps",
            "ulimit_nofile",
            "storage_workspace",
            "storage_data",
            "storage_tmp",
        )
    },
    **{
        f"policies.{key}": _NOT_ENFORCED
        for key in (
            "auto_stop_idle",
            "checkpoint_warning",
            "require_workspace_mount",
            "enforce_storage_quotas",
            "soft_limit_threshold",
            "graceful_errors",
            "suggest_alternatives",
        )
    },
}

Layer = dict[str, Any]  # canonical key -> parsed value; None means unlimited


class LimitsConfigError(Exception):
    """The configuration has problems; ``issues`` lists every one of them."""

    def __init__(self, issues: list[Issue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


@dataclass(frozen=True)
class Group:
    name: str
    layer: Layer
    members: tuple[str, ...]  # as listed, in file order
    aggregate: Layer | None
    policies: dict[str, Any]
    # For membership tests: a lookup per request, whatever the size of the member files.
    member_set: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "member_set", frozenset(self.members))


@dataclass(frozen=True)
class Override:
    layer: Layer
    aggregate: Layer | None
    policies: dict[str, Any]


@dataclass(frozen=True)
class LimitsConfig:
    defaults: Layer
    default_group: str
    groups: dict[str, Group]  # in file order: the first group listing a user wins
    overrides: dict[str, Override]
    policies: dict[str, Any] = field(default_factory=dict)
    container_types: dict[str, Layer] = field(default_factory=dict)
    enforcement: dict[str, Any] = field(default_factory=dict)
    admin_users: frozenset[str] = frozenset()
    admin_group: str | None = None
    gpu_allocation: dict[str, Any] = field(default_factory=dict)
    archived: frozenset[str] = frozenset()  # as listed in archived.members
    # monitoring: containers that are the lab's infrastructure, never a user's.
    infrastructure_prefixes: tuple[str, ...] = ()
    infrastructure_label: str = ""
    notes: tuple[Issue, ...] = ()  # keys read that mean nothing in ds01, with why
    digest: str = ""


@dataclass(frozen=True)
class SourceFiles:
    """The text of every file a configuration is made of."""

    main: tuple[str, str]  # (file name, text)
    members: dict[str, tuple[str, str]]  # group -> (file name, text)
    overrides: tuple[str, str] | None

    def digest(self) -> str:
        sha = hashlib.sha256()
        for name, text in (self.main, *self.members.values(), *filter(None, [self.overrides])):
            sha.update(name.encode() + b"\0" + text.encode() + b"\0")
        return sha.hexdigest()[:16]


def read_sources(
    path: Path, main_text: str | None = None, main_name: str | None = None
) -> SourceFiles:
    """Read ``path`` (or use ``main_text``, called ``main_name``, in its place) and the
    member and override files beside it."""
    issues: list[Issue] = []
    if main_text is None:
        main_text = _read(path, issues)
    members: dict[str, tuple[str, str]] = {}
    members_dir = path.parent / MEMBERS_DIR
    if members_dir.is_dir():
        for file in sorted(members_dir.glob(f"*{MEMBERS_SUFFIX}")):
            members[file.name.removesuffix(MEMBERS_SUFFIX)] = (str(file), _read(file, issues))
    overrides_path = path.parent / OVERRIDES_FILE
    overrides = (
        (str(overrides_path), _read(overrides_path, issues)) if overrides_path.exists() else None
    )
    if issues:
        raise LimitsConfigError(issues)
    return SourceFiles((main_name or str(path), main_text or ""), members, overrides)


MAX_FILE_BYTES = 4 * 1024 * 1024


def _read(path: Path, issues: list[Issue]) -> str:
    """Read a regular file of sane size; never block on a FIFO or stream a device."""
    try:
        if path.exists() and not path.is_file():
            issues.append(Issue(str(path), 0, "", "not a regular file"))
            return ""
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            issues.append(Issue(str(path), 0, "", f"larger than {MAX_FILE_BYTES} bytes"))
            return ""
        return data.decode()
    except FileNotFoundError:
        issues.append(Issue(str(path), 0, "", "file not found"))
    except (OSError, UnicodeDecodeError) as err:
        issues.append(Issue(str(path), 0, "", f"cannot read: {err}"))
    return ""


def load_limits(path: Path) -> LimitsConfig:
    return parse_sources(read_sources(path))


def parse_sources(sources: SourceFiles) -> LimitsConfig:
    """Check every file; return the configuration, or raise with every problem found."""
    issues: list[Issue] = []
    main = _document(*sources.main, issues)
    overrides_doc = _document(*sources.overrides, issues) if sources.overrides else None
    if main is None:
        raise LimitsConfigError(issues)
    if main.data is None:
        # Most often a file caught half-written; serving "no limits, no admins" is worse.
        issues.append(Issue(main.file, 0, "", "the file is empty: it must at least have defaults"))
        raise LimitsConfigError(issues)
    checker = _Checker(main, issues)
    config = checker.config(sources, overrides_doc)
    if not issues:
        issues += _docker_conflicts(config, main)
    if issues:
        raise LimitsConfigError(issues)
    return config


def listed_as(user: str) -> tuple[str, ...]:
    """The names a configuration may list ``user`` under, most exact first: the login
    itself; without its realm (DS01 matches the LDAP login judy@hertie-school.lan to
    the member judy); DS01's sanitized name (h.baker@... -> h_baker); and the seed's
    slice spelling (h_baker_hertie-school_lan)."""
    local = user.split("@", 1)[0]
    names = (user, local, local.replace(".", "_"), sanitize_for_systemd(user))
    return tuple(dict.fromkeys(n for n in names if n))


def is_archived(config: LimitsConfig, user: str) -> bool:
    return any(name in config.archived for name in listed_as(user))


def group_of(config: LimitsConfig, user: str) -> str:
    """The group of the most exact name the user is listed under; between groups that
    list the same name, the first in file order. Archived users are in no group. The
    admin groups (access_control.admin_group, and DS01's ``admin``) take their members by
    their exact names only: a login of another realm, or one that only sanitizes alike,
    never gets the admins' limits."""
    if is_archived(config, user):
        return ARCHIVED
    admins = {DS01_ADMIN_GROUP, config.admin_group}
    for name in listed_as(user):
        for group in config.groups.values():
            exact_only = group.name in admins and name != user
            if name in group.member_set and not exact_only:
                return group.name
    return config.default_group


def ds01_group_of(config: LimitsConfig, user: str) -> str:
    """The group DS01 itself gave ``user``, for import reports: "override" for a user
    with an override (DS01 applied defaults and the override, not the group), else the
    first group in file order listing the login or DS01's sanitized name, else the
    default group. DS01 kept archived users in their groups."""
    local = user.split("@", 1)[0].replace(".", "_")
    if user in config.overrides or local in config.overrides:
        return "override"
    for group in config.groups.values():
        if user in group.member_set or local in group.member_set:
            return group.name
    return config.default_group


def override_of(config: LimitsConfig, user: str) -> Override | None:
    """The override keyed by the most exact name the user is listed under."""
    for name in listed_as(user):
        if name in config.overrides:
            return config.overrides[name]
    return None


def _docker_conflicts(config: LimitsConfig, main: Document) -> list[Issue]:
    """Combinations of layers Docker would refuse at create time, found before they serve.

    Docker wants --memory whenever --memory-swap is given, and swap >= memory.
    """
    contexts: list[tuple[KeyPath, list[Layer]]] = [(("defaults",), [config.defaults])]
    for group in config.groups.values():
        contexts.append((("groups", group.name), [config.defaults, group.layer]))
    for user, override in config.overrides.items():
        group = config.groups.get(group_of(config, user))
        layers = [config.defaults, *([group.layer] if group else []), override.layer]
        contexts.append((("user_overrides", user), layers))
    issues = []
    for path, layers in contexts:
        memory, swap = (_effective(layers, key) for key in ("memory", "memory_swap"))
        if swap is not None and memory is None:
            problem = "memory_swap is set but memory is unlimited; Docker needs both"
        elif swap is not None and memory is not None and swap < memory:
            problem = (
                f"memory ({format_size(memory)}) is larger than memory_swap "
                f"({format_size(swap)}); Docker refuses that: set memory_swap as well"
            )
        else:
            continue
        issues.append(main.issue((*path, "memory"), problem))
    return issues


def _effective(layers: list[Layer], key: str) -> Any:
    value = None
    for layer in layers:
        if key in layer:
            value = layer[key]
    return value


def _document(file: str, text: str, issues: list[Issue]) -> Document | None:
    try:
        return load_document(text, file)
    except YamlError as err:
        issues.append(err.issue)
        return None


def parse_members(file: str, text: str, issues: list[Issue]) -> list[str]:
    """One user a line; ``#`` starts a comment anywhere on a line."""
    users = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if len(entry.split()) > 1:
            issues.append(Issue(file, number, "", f"one user per line, got {entry!r}"))
            continue
        users.append(entry)
    return users


class _Checker:
    """Walks one parsed document, collecting issues as it builds the configuration."""

    def __init__(self, doc: Document, issues: list[Issue]) -> None:
        self.doc = doc
        self.issues = issues
        self.notes: list[Issue] = []

    def problem(self, path: KeyPath, message: str, doc: Document | None = None) -> None:
        self.issues.append((doc or self.doc).issue(path, message))

    def note(self, path: KeyPath, message: str, doc: Document | None = None) -> None:
        self.notes.append((doc or self.doc).issue(path, f"read, not used: {message}"))

    def mapping(self, value: Any, path: KeyPath, doc: Document | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(path, f"must be a mapping, got {_describe(value)}", doc)
            return {}
        return value

    def unknown(
        self,
        raw: dict[str, Any],
        allowed: tuple[str, ...],
        path: KeyPath,
        doc: Document | None = None,
    ) -> None:
        for key in raw:
            if key not in allowed:
                self.problem((*path, key), _unknown_key(key, allowed), doc)

    def config(self, sources: SourceFiles, overrides_doc: Document | None) -> LimitsConfig:
        top = self.mapping(self.doc.data, ())
        self.unknown(top, TOP_LEVEL_KEYS, ())
        defaults = self.layer(top.get("defaults"), ("defaults",), ())
        groups = self.groups(top.get("groups"), sources)
        default_group = top.get("default_group", DEFAULT_GROUP)
        if not isinstance(default_group, str) or not default_group:
            self.problem(
                ("default_group",), f"must be a group name, got {_describe(default_group)}"
            )
            default_group = DEFAULT_GROUP
        access = self.mapping(top.get("access_control"), ("access_control",))
        self.unknown(access, ACCESS_CONTROL_KEYS, ("access_control",))
        if "wrapper" in access:
            self.note(("access_control", "wrapper"), NOTES["access_control.wrapper"])
        admin_group = access.get("admin_group")
        if admin_group == "":  # names none, as a missing key does (read so before)
            admin_group = None
        if admin_group is not None and not _is_group_name(admin_group):
            self.problem(
                ("access_control", "admin_group"),
                "must be a group name (printable, no ':', no spaces around it), got "
                + _describe(admin_group),
            )
            admin_group = None
        if "bare_metal_access" in top:
            self.note(("bare_metal_access",), NOTES["bare_metal_access"])
        monitoring = self.mapping(top.get("monitoring"), ("monitoring",))
        self.unknown(monitoring, MONITORING_KEYS, ("monitoring",))
        label = monitoring.get("infrastructure_label") or ""
        if not isinstance(label, str):
            self.problem(("monitoring", "infrastructure_label"), "must be a label name")
            label = ""
        return LimitsConfig(
            defaults=defaults,
            default_group=default_group,
            groups=groups,
            overrides=self.overrides(top.get("user_overrides"), overrides_doc),
            policies=self.policies(top.get("policies"), ("policies",)),
            container_types={
                str(name): self.layer(raw, ("container_types", name), ())
                for name, raw in self.mapping(
                    top.get("container_types"), ("container_types",)
                ).items()
            },
            enforcement=self.keyed(
                top.get("enforcement"), ("enforcement",), ENFORCEMENT_KEYS, {}, None, "enforcement"
            ),
            admin_users=frozenset(
                self.names(access.get("admin_users"), ("access_control", "admin_users"))
            ),
            admin_group=admin_group,
            gpu_allocation=self.keyed(
                top.get("gpu_allocation"),
                ("gpu_allocation",),
                GPU_ALLOCATION_KEYS,
                {},
                None,
                "gpu_allocation",
            ),
            archived=self.archived(sources),
            infrastructure_prefixes=tuple(
                self.names(
                    monitoring.get("infrastructure_containers"),
                    ("monitoring", "infrastructure_containers"),
                )
            ),
            infrastructure_label=label,
            notes=tuple(self.notes),
            digest=sources.digest(),
        )

    def archived(self, sources: SourceFiles) -> frozenset[str]:
        if ARCHIVED not in sources.members:
            return frozenset()
        return frozenset(parse_members(*sources.members[ARCHIVED], self.issues))

    def policies(self, raw: Any, path: KeyPath, doc: Document | None = None) -> dict[str, Any]:
        return self.keyed(raw, path, POLICY_KEYS, {}, doc, "policies")

    def layer(
        self,
        raw: Any,
        path: KeyPath,
        extra: tuple[str, ...],
        doc: Document | None = None,
    ) -> Layer:
        """The limit keys of one layer, aliases resolved; ``extra`` keys are left alone."""
        raw = self.mapping(raw, path, doc)
        limits = {k: v for k, v in raw.items() if k not in extra}
        layer = self.keyed(limits, path, LIMIT_KEYS, ALIASES, doc, "limits")
        if layer.get("ipc_mode") == "host" and layer.get("shm_size") is not None:
            self.problem(
                (*path, "shm_size"),
                "ipc_mode: host and shm_size cannot be set together (Docker refuses "
                "--ipc=host with --shm-size); keep one of them",
                doc,
            )
        return layer

    def keyed(
        self,
        raw: Any,
        path: KeyPath,
        kinds: dict[str, Kind],
        aliases: dict[str, str],
        doc: Document | None = None,
        section: str = "",
        spellings: dict[str, Kind] | None = None,
    ) -> Layer:
        """The keys of one mapping, read into their canonical names. A key may be an
        alias, or a duration key with a unit suffix (``idle_timeout_h``); ``section``
        names the keys that are read without meaning (NOTES) and ``spellings`` the
        aliases whose value is written differently."""
        layer: Layer = {}
        seen_as: dict[str, str] = {}
        for key, value in self.mapping(raw, path, doc).items():
            canonical = aliases.get(key, key)
            kind = (spellings or {}).get(key) or kinds.get(canonical)
            if kind is None and (found := suffixed(str(key), kinds, aliases)):
                canonical, kind = found
            if kind is None:
                if f"{section}.{key}" in NOTES:
                    self.note((*path, key), NOTES[f"{section}.{key}"], doc)
                else:
                    self.problem((*path, key), _unknown_key(key, (*kinds, *aliases)), doc)
                continue
            if isinstance(value, str) and value.strip().lower() in UNLIMITED_WORDS:
                value = None
            if canonical in seen_as:
                self.problem(
                    (*path, key),
                    f"sets {canonical} a second time (already set as {seen_as[canonical]})",
                    doc,
                )
                continue
            seen_as[canonical] = key
            if value is None:
                if kind.nullable:
                    layer[canonical] = None
                else:
                    self.problem((*path, key), f"cannot be null: expected a {kind.name}", doc)
                continue
            try:
                layer[canonical] = kind.parse(value)
            except ValueError as err:
                self.problem((*path, key), str(err), doc)
        return layer

    def names(self, raw: Any, path: KeyPath) -> list[str]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.problem(path, f"must be a list of user names, got {_describe(raw)}")
            return []
        names = []
        for i, item in enumerate(raw):
            if isinstance(item, bool) or not isinstance(item, str | int) or str(item) == "":
                self.problem((*path, i), f"must be a user name, got {_describe(item)}")
            else:
                names.append(str(item))
        return names

    def aggregate(self, raw: Any, path: KeyPath, doc: Document | None = None) -> Layer | None:
        if raw is None:
            return None
        return self.keyed(
            raw, path, AGGREGATE_KEYS, AGGREGATE_ALIASES, doc, "aggregate", AGGREGATE_SPELLINGS
        )

    def groups(self, raw: Any, sources: SourceFiles) -> dict[str, Group]:
        groups: dict[str, Group] = {}
        for name, body in self.mapping(raw, ("groups",)).items():
            path: KeyPath = ("groups", name)
            body = self.mapping(body, path)
            members = self.names(body.get("members"), (*path, "members"))
            if name in sources.members:
                file, text = sources.members[name]
                members += parse_members(file, text, self.issues)
            groups[name] = Group(
                name=name,
                layer=self.layer(body, path, GROUP_EXTRA_KEYS),
                members=tuple(dict.fromkeys(members)),
                aggregate=self.aggregate(body.get("aggregate"), (*path, "aggregate")),
                policies=self.policies(body.get("policies"), (*path, "policies")),
            )
        for name, (file, _text) in sources.members.items():
            if name not in groups and name != ARCHIVED:
                self.issues.append(
                    Issue(
                        file,
                        0,
                        "",
                        f"member file for group {name!r}, which {Path(self.doc.file).name} "
                        f"does not define: add groups.{name} there or remove this file",
                    )
                )
        return groups

    def overrides(self, inline: Any, file_doc: Document | None) -> dict[str, Override]:
        """Inline ``user_overrides`` and user-overrides.yaml; key by key, the file wins."""
        result = {
            user: self.override(body, ("user_overrides", user))
            for user, body in self.mapping(inline, ("user_overrides",)).items()
        }
        if file_doc is None:
            return result
        raw, prefix = self.mapping(file_doc.data, (), file_doc), ()
        if set(raw) == {"user_overrides"}:
            prefix = ("user_overrides",)
            raw = self.mapping(raw["user_overrides"], prefix, file_doc)
        for user, body in raw.items():
            from_file = self.override(body, (*prefix, user), file_doc)
            result[user] = _merge(result[user], from_file) if user in result else from_file
        return result

    def override(self, raw: Any, path: KeyPath, doc: Document | None = None) -> Override:
        body = self.mapping(raw, path, doc)
        return Override(
            layer=self.layer(body, path, OVERRIDE_EXTRA_KEYS, doc),
            aggregate=self.aggregate(body.get("aggregate"), (*path, "aggregate"), doc),
            policies=self.policies(body.get("policies"), (*path, "policies"), doc),
        )


SHARED_MEMORY_KEYS = ("ipc_mode", "shm_size")


def _merge(base: Override, top: Override) -> Override:
    layer = dict(base.layer)
    if any(k in top.layer for k in SHARED_MEMORY_KEYS):
        # ipc_mode and shm_size are one choice: the layer on top makes it whole.
        for key in SHARED_MEMORY_KEYS:
            layer.pop(key, None)
    layer.update(top.layer)
    return Override(
        layer=layer,
        aggregate=top.aggregate if top.aggregate is not None else base.aggregate,
        policies={**base.policies, **top.policies},
    )


def _unknown_key(key: str, allowed: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown key {key!r}{hint}"


def _is_group_name(value: object) -> bool:
    """What /etc/group or a directory can name: not empty, printable, no ':' (the
    field separator), nothing NSS would refuse (a NUL byte, a newline), and no spaces
    around it (a group that could only be a typo: it would make nobody an admin)."""
    return (
        isinstance(value, str)
        and value.isprintable()
        and ":" not in value
        and bool(value)
        and value == value.strip()
    )


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)
