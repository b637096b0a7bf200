"""The limits service over gRPC: who may ask what, and the mapping to messages."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2

from ds01.client import Ds01Error
from ds01.core.admin_view import AdminView
from ds01.core.docker_args import DockerInfo
from ds01.core.identity import caller
from ds01.core.messages import abort
from ds01.core.pki import PkiError, validate_user_name
from ds01.core.server import ServiceRuntime, ServiceSpec
from ds01.limits import metrics as limits_metrics
from ds01.limits.config import LimitsConfig, LimitsConfigError, parse_sources, read_sources
from ds01.limits.resolve import (
    CONTAINER_TYPE,
    DEFAULT,
    GROUP,
    OVERRIDE,
    UnknownContainerType,
    UserLimits,
    resolve,
)
from ds01.limits.schema import LIMIT_KEYS, POLICY_KEYS
from ds01.limits.source import Issue
from ds01.limits.store import LimitsStore
from ds01.v1 import limits_pb2, limits_pb2_grpc

T = TypeVar("T")
LIMITS_SERVICE = limits_pb2.DESCRIPTOR.services_by_name["LimitsService"].full_name
_SOURCES = {
    DEFAULT: limits_pb2.LIMIT_SOURCE_DEFAULT,
    GROUP: limits_pb2.LIMIT_SOURCE_GROUP,
    OVERRIDE: limits_pb2.LIMIT_SOURCE_OVERRIDE,
    CONTAINER_TYPE: limits_pb2.LIMIT_SOURCE_CONTAINER_TYPE,
}
_DURATION_FIELDS = (
    "idle_timeout",
    "max_runtime",
    "gpu_hold_after_stop",
    "container_hold_after_stop",
    "created_container_timeout",
    "sigterm_grace",
)


class LocalLimits:
    """GetLimits and GetDockerArgs as this process's limits service answers them, for
    the services beside it: the same answers (the gRPC methods answer through this) and
    the same refusals, as Ds01Error, without a round trip. A user's limits are kept
    until the configuration or the admin group's members change: the allocator asks at
    every Allocate."""

    MOST_KEPT = 50_000

    def __init__(self, store: LimitsStore) -> None:
        self.store = store
        self._kept: dict[tuple[str, str], limits_pb2.UserLimits] = {}
        # What the kept answers are of: a configuration and a reading of the admin group.
        self._kept_of: tuple[LimitsConfig | None, frozenset[str]] = (None, frozenset())

    def limits(self, user: str, container_type: str = "") -> limits_pb2.UserLimits:
        """Shared: a caller never changes it."""
        config, admins = self._config(), self.store.unix_admins
        if config is not self._kept_of[0] or admins is not self._kept_of[1]:
            self._kept, self._kept_of = {}, (config, admins)
        found = self._kept.get((user, container_type))
        if found is None:
            found = limits_message(self._resolve(config, user, container_type))
            found.admin = self.store.is_admin(user)
            if len(self._kept) >= self.MOST_KEPT:
                self._kept.clear()
            self._kept[(user, container_type)] = found
        return found

    def docker_args(
        self, user: str, container_type: str = "", docker: DockerInfo | None = None
    ) -> limits_pb2.GetDockerArgsResponse:
        """``docker``: what a container on that Docker gets; None, as configured."""
        args = self._resolve(self._config(), user, container_type).docker_args()
        if docker is not None:
            args = args.on_host(docker)
        return limits_pb2.GetDockerArgsResponse(
            cpus=args.cpus,
            memory_bytes=args.memory,
            memory_swap_bytes=args.memory_swap,
            shm_size_bytes=None if args.ipc_mode == "host" else args.shm_size,
            ipc_mode=args.ipc_mode or "",
            pids_limit=args.pids_limit,
            cgroup_parent=args.cgroup_parent,
            flags=args.flags(),
        )

    def _config(self) -> LimitsConfig:
        config = self.store.config
        if config is None:
            raise Ds01Error(grpc.StatusCode.FAILED_PRECONDITION, no_configuration(self.store))
        return config

    @staticmethod
    def _resolve(config: LimitsConfig, user: str, container_type: str) -> UserLimits:
        """A login name's limits; a service's name or no login name is refused, as a
        call naming it is."""
        try:
            return resolve(config, validate_user_name(user), container_type)
        except (PkiError, UnknownContainerType) as err:
            raise Ds01Error(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None


def no_configuration(store: LimitsStore) -> str:
    problem = f": {store.error}" if store.error else ""
    return (
        f"no valid limits configuration has been loaded from {store.path}{problem}. "
        "An admin can check the file with `ds01 limits check FILE`."
    )


async def _answered(context: grpc.aio.ServicerContext, ask: Callable[[], T]) -> T:
    """What ``ask`` answers; a refusal of LocalLimits as the call's status, in its words."""
    try:
        return ask()
    except Ds01Error as err:
        await abort(context, err.code, err.message)
        raise


class LimitsServicer(limits_pb2_grpc.LimitsServiceServicer):
    def __init__(self, store: LimitsStore) -> None:
        self.store = store
        self.answers = LocalLimits(store)

    async def GetLimits(
        self, request: limits_pb2.GetLimitsRequest, context: grpc.aio.ServicerContext
    ) -> limits_pb2.GetLimitsResponse:
        await self._config(context)
        user = await self._subject(request.user, context)
        limits = await _answered(context, lambda: self.answers.limits(user, request.container_type))
        return limits_pb2.GetLimitsResponse(limits=limits)

    async def GetDockerArgs(
        self, request: limits_pb2.GetDockerArgsRequest, context: grpc.aio.ServicerContext
    ) -> limits_pb2.GetDockerArgsResponse:
        await self._config(context)
        user = await self._subject(request.user, context)
        on = request.docker if request.HasField("docker") else None
        docker = DockerInfo(on.ncpu, on.cgroup_driver) if on is not None else None
        return await _answered(
            context, lambda: self.answers.docker_args(user, request.container_type, docker)
        )

    async def ListGroups(
        self, request: limits_pb2.ListGroupsRequest, context: grpc.aio.ServicerContext
    ) -> limits_pb2.ListGroupsResponse:
        config = await self._config(context)
        privileged = caller().privileged
        default_priority = config.defaults.get("priority", 0)
        return limits_pb2.ListGroupsResponse(
            groups=[
                limits_pb2.Group(
                    name=group.name,
                    priority=group.layer.get("priority", default_priority),
                    # Who is in which group is the admins' business.
                    members=group.members if privileged else (),
                )
                for group in config.groups.values()
            ]
        )

    async def ValidateConfig(
        self, request: limits_pb2.ValidateConfigRequest, context: grpc.aio.ServicerContext
    ) -> limits_pb2.ValidateConfigResponse:
        if not caller().privileged:
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "only admins may check the limits configuration",
            )
        serving = self.store.config.digest if self.store.config else ""
        notes: tuple[Issue, ...] = ()
        if request.HasField("text"):
            issues, notes = await asyncio.to_thread(
                _check_text, self.store, request.text, request.file_name
            )
        else:
            issues = self.store.error.issues if self.store.error else []
            notes = self.store.config.notes if self.store.config else ()
            if self.store.config is None and not issues:
                issues = [Issue(str(self.store.path), 0, "", "not loaded yet")]
        return limits_pb2.ValidateConfigResponse(
            valid=not issues,
            issues=[_config_issue(i) for i in issues],
            notes=[_config_issue(i) for i in notes],
            serving_digest=serving,
        )

    async def WatchLimits(
        self, request: limits_pb2.WatchLimitsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[limits_pb2.WatchLimitsResponse]:
        principal = caller()
        user = request.user
        if user or not principal.privileged:
            user = await self._subject(user, context)
        view = AdminView(principal, principal.privileged, self._is_admin, "limits")
        with self.store.subscribe() as changes:
            last = resolve(self.store.config, user) if user and self.store.config else None
            serving = self.store.config.digest if self.store.config else ""
            yield limits_pb2.WatchLimitsResponse(digest=serving)
            while True:
                change = await changes.get()
                if not await view.shows(context, (user,)):
                    continue
                if not user:
                    yield limits_pb2.WatchLimitsResponse(
                        users=sorted(change.users),
                        digest=change.digest,
                        default_users_changed=change.default_users_changed,
                    )
                    continue
                current = resolve(self.store.config, user)
                if current != last:
                    last = current
                    yield limits_pb2.WatchLimitsResponse(users=[user], digest=change.digest)

    async def _is_admin(self, user: str) -> bool:
        return self.store.is_admin(user)

    async def _config(self, context: grpc.aio.ServicerContext) -> LimitsConfig:
        config = self.store.config
        if config is None:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, no_configuration(self.store))
        return config

    async def _subject(self, requested: str, context: grpc.aio.ServicerContext) -> str:
        """The user a request is about: the caller unless named; others need a privilege."""
        principal = caller()
        if not requested and principal.is_service:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "services must name the user")
        user = requested or principal.name
        try:
            validate_user_name(user)
        except PkiError as err:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if not principal.may_act_for(user):
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal.name} may not see the limits of {user}: users see their own, "
                "admins anyone's",
            )
        return user


def _check_text(
    store: LimitsStore, text: str, file_name: str
) -> tuple[list[Issue], tuple[Issue, ...]]:
    """The problems of a candidate configuration, and its notes."""
    try:
        config = parse_sources(read_sources(store.path, text, file_name or str(store.path)))
    except LimitsConfigError as err:
        return err.issues, ()
    return [], config.notes


def _config_issue(issue: Issue) -> limits_pb2.ConfigIssue:
    return limits_pb2.ConfigIssue(
        file=issue.file, line=issue.line, key=issue.key, message=issue.message
    )


def limits_message(limits: UserLimits) -> limits_pb2.UserLimits:
    message = limits_pb2.UserLimits(
        user=limits.user,
        group=limits.group,
        priority=limits.priority,
        allow_full_gpu=limits.value("allow_full_gpu"),
        ipc_mode=limits.value("ipc_mode") or "",
        cgroup_parent=limits.cgroup_parent,
        container_type=limits.container_type,
        policies={key: _policy_text(key, value) for key, value in limits.policies.items()},
        archived=limits.archived,
    )
    for field, key in (
        ("max_gpu_equivalents", "max_gpu_equivalents"),
        ("max_gpu_slots_per_container", "max_gpu_slots_per_container"),
        ("max_cpus", "max_cpus"),
        ("memory_bytes", "memory"),
        ("memory_swap_bytes", "memory_swap"),
        ("shm_size_bytes", "shm_size"),
        ("pids_limit", "pids_limit"),
        ("max_containers_per_user", "max_containers_per_user"),
        ("max_tasks", "max_tasks"),
    ):
        if limits.value(key) is not None:
            setattr(message, field, limits.value(key))
    for key in _DURATION_FIELDS:
        if limits.value(key) is not None:
            getattr(message, key).CopyFrom(_duration(limits.value(key)))
    if limits.aggregate:
        for key, value in limits.aggregate.items():
            if value is not None:
                field = f"{key}_bytes" if key in ("memory", "memory_high") else key
                setattr(message.aggregate, field, value)
    for key, kind in LIMIT_KEYS.items():
        setting = limits.settings[key]
        if key == "ipc_mode":  # not a limit: unset means Docker's private namespace
            text, unlimited = setting.value or "private", False
        elif setting.unlimited:
            text, unlimited = "", True
        else:
            text, unlimited = kind.format(setting.value), False
        message.values.append(
            limits_pb2.LimitValue(
                key=key, value=text, unlimited=unlimited, source=_SOURCES[setting.source]
            )
        )
    return message


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(dt.timedelta(seconds=seconds))
    return duration


def _policy_text(key: str, value: Any) -> str:
    """A policy as the reconciler reads it back: true/false, 30m, 1m (bytes), 0.8."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return POLICY_KEYS[key].format(value) if key in POLICY_KEYS else str(value)


async def register(server: grpc.aio.Server, runtime: ServiceRuntime) -> None:
    store = LimitsStore(runtime.config.limits_file)
    await asyncio.to_thread(store.poll)
    runtime.context.roles.admin_check = store.is_admin
    servicer = LimitsServicer(store)
    runtime.context.limits = servicer.answers  # the services beside it ask it directly
    limits_pb2_grpc.add_LimitsServiceServicer_to_server(servicer, server)
    limits_metrics.register(runtime.metrics, store)

    async def report_health() -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        status = serving if store.config else health_pb2.HealthCheckResponse.NOT_SERVING
        await runtime.health.set(LIMITS_SERVICE, status)

    await report_health()
    runtime.run_in_background(store.run(after_poll=report_health), "limits-reload")


SPEC = ServiceSpec(name="limits", grpc_services=(LIMITS_SERVICE,), register=register)
