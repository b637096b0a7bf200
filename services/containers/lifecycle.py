"""Creating and running containers; a failed create undoes every step it had done.

Free of gRPC: it talks to the limits and allocator services through the client
library, and to Docker, etcd and cgroups through the adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import docker.errors
import grpc

from ds01.client import Ds01Client, Ds01Error
from ds01.containers import own_events
from ds01.containers.adapters import (
    CgroupfsSlices,
    DockerHost,
    DockerUnavailable,
    Intent,
    IntentStore,
    Metadata,
    MetadataStore,
    NoAccount,
    SystemdSlices,
    host_account,
)
from ds01.containers.adoption import Seen, docker_time, gpu_references, unaccounted
from ds01.containers.events import Kind, LifecycleEvents
from ds01.containers.own_events import OwnEvents
from ds01.containers.spec import (
    Account,
    ContainerSpec,
    SpecError,
    docker_name,
    limits_of,
    named_accounts,
)
from ds01.core.account_files import AccountFiles
from ds01.core.config import Config
from ds01.core.counting import counted
from ds01.core.etcd import failure_sentence
from ds01.core.faults import fault_point
from ds01.core.limits_cache import CachedLimits, LocalAnswers
from ds01.core.naming import OWNER_LABEL, SEPARATOR, sanitize_for_systemd
from ds01.core.tasks import Abandoned, unless_set
from ds01.ownership.gateway.images import config_labels, is_id, parse_name, readable
from ds01.ownership.gateway.strict import BadRequest
from ds01.ownership.owners import user_exists

log = logging.getLogger(__name__)

DEFAULT_GRACE = 10  # seconds, Docker's own, where no sigterm_grace is configured


class Code(enum.Enum):
    INVALID = "invalid"
    NOT_FOUND = "not_found"
    EXISTS = "exists"
    DENIED = "denied"
    PRECONDITION = "precondition"
    EXHAUSTED = "exhausted"
    UNAVAILABLE = "unavailable"


class ContainerError(Exception):
    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Pending(ContainerError):
    """The name is held by a create in progress, or by one being undone."""

    def __init__(self, intent: Intent, message: str) -> None:
        super().__init__(Code.UNAVAILABLE, message)
        self.intent = intent


_FROM_GRPC = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: Code.EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION: Code.PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED: Code.DENIED,
    grpc.StatusCode.NOT_FOUND: Code.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: Code.INVALID,
}


@dataclass
class CreateRequest:
    user: str
    name: str
    image: str
    gpus: int | None = 0  # None: the host's default request
    workspace: str = ""
    data_dirs: tuple[str, ...] = ()
    start: bool = False
    container_type: str = ""
    gpu_preference: int = 0  # allocator_pb2.SlotPreference: any, MIG or full GPUs
    gpu_wait: float = 0.0  # seconds to queue for the GPUs when none is free
    all_gpus: bool = False  # as many as the user's limits allow, at least one


@dataclass
class Lifecycle:
    node: str
    docker: DockerHost
    metadata: MetadataStore
    client: Ds01Client  # limits and allocator, as svc:containers
    network_mode: str | None = None
    # What a create that names no GPU request gets (containers.default_gpus, _kind).
    default_gpus: int = 0
    default_gpu_preference: int = 0  # allocator_pb2.SlotPreference
    cgroups: CgroupfsSlices = field(default_factory=CgroupfsSlices)
    slices: SystemdSlices = field(default_factory=SystemdSlices)
    accounts: Callable[[str], Account] = host_account
    # This run of the service: intents of another owner belong to a run that died.
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)
    # One create at a time per user: the container count and the name are checked, then
    # used; two creates of one user must not both pass the check.
    _creating: dict[str, asyncio.Lock] = field(default_factory=dict)
    _in_flight: set[str] = field(default_factory=set)  # users with a create under way
    busy: Counter[str] = field(default_factory=Counter)  # containers being started, ...
    intents: IntentStore = field(init=False)
    # The limits service's answers, kept while its change stream is followed.
    # The limits service's answers where it runs in this process (else asked over gRPC).
    local_limits: LocalAnswers | None = None
    limits: CachedLimits = field(init=False)
    # Published in etcd for monitors; counted for the metrics.
    events: LifecycleEvents = field(default_factory=lambda: LifecycleEvents(None, ""))
    # The Docker events this process's own calls cause: no sweep needs to follow them.
    own_events: OwnEvents = field(default_factory=OwnEvents)
    # Each container's /etc/passwd and /etc/group, bind-mounted into it.
    account_files: AccountFiles = field(
        default_factory=lambda: AccountFiles(Config.state_dir / "accounts")
    )

    def __post_init__(self) -> None:
        self.intents = IntentStore(self.metadata.client, self.node)
        self.limits = CachedLimits(self.client, self.local_limits)
        self.events.node = self.events.node or self.node

    async def create(
        self,
        request: CreateRequest,
        abandoned: asyncio.Event | None = None,
        allocations: list[Any] | None = None,
    ) -> Metadata:
        """``allocations``: filled with those the allocator granted (see ``start``)."""
        lock = self._creating.setdefault(request.user, asyncio.Lock())
        name = _docker_name_or(request.name, request.user)
        async with lock:
            try:
                with self.own_events.calling(name, own_events.CREATE):
                    made = await self._create(request, abandoned, allocations)
            finally:
                self._in_flight.discard(request.user)
        await self.events.publish(Kind.CREATED, made, f"image {made.image}")
        if request.start:
            await self.events.publish(Kind.STARTED, made)
        return made

    async def _create(
        self,
        request: CreateRequest,
        abandoned: asyncio.Event | None,
        allocations: list[Any] | None,
    ) -> Metadata:
        step = "checking the request"
        intent: Intent | None = None
        landing: list[asyncio.Future[Any]] = []  # Docker work the undo must wait for
        try:
            if abandoned is not None and abandoned.is_set():  # gone while an earlier create ran
                raise Abandoned()
            step = "checking the container name"
            name = docker_name(request.name, request.user)
            if (pending := await self.intents.get(name)) is not None:
                raise Pending(pending, self._pending_message(pending))
            step = "looking up the host account"
            account = self.accounts(request.user)
            step = "asking Docker for its CPUs and cgroup driver"
            docker_info = await self.docker.docker_info()
            step = "reading the limits"
            limits, args = await asyncio.gather(  # args: exactly what the container gets
                self.limits.get_limits(request.user, request.container_type),
                self.limits.get_docker_args(request.user, request.container_type, docker_info),
            )
            if limits.archived:
                raise ContainerError(
                    Code.DENIED,
                    f"{request.user} is listed in archived.members: their access is "
                    "withdrawn; an admin can restore it by removing them from that file",
                )
            step = "checking the image"
            if not is_id(request.image):  # read as the gateway reads it, before Docker does
                try:
                    parse_name(request.image)
                except BadRequest as err:
                    raise ContainerError(
                        Code.INVALID, f"{err}: name it as `ds01 image ls --all` shows it"
                    ) from None
            found = await self.docker.image(request.image)
            # Another user's image is not there for this user, as through the gateway.
            if found is None or not readable(request.user, request.image, found, user_exists):
                raise ContainerError(
                    Code.PRECONDITION,
                    f"image {request.image} is not on this host: build or load it first "
                    "(`docker images` lists what is there)",
                )
            step = "checking the name and the container count"
            await self._check_room(request.user, name, limits)
            step = "checking the workspace and data directories"
            workspace, data_dirs, to_make = self._paths(account, request)
            step = "reserving the name"
            intent = Intent(
                docker_name=name,
                name=request.name,
                user=request.user,
                image=request.image,
                node=self.node,
                owner=self.instance,
                started_at=time.time(),
                made_dirs=[str(d) for d in to_make],
            )
            if not await self.intents.reserve(intent):
                intent = None  # not ours: nothing to undo
                raise await self._taken(name)
            self._in_flight.add(request.user)
            fault_point("create:reserved")
            if to_make:
                step = "making the workspace directory"
                _make_workspace(workspace, account)
                fault_point("create:workspace")
            # Docker gets the resolved path, checked again now that it exists: no symlink
            # left for it to follow, and none swapped in since the first check.
            workspace = _inside_home(workspace, account)
            gpu_env: dict[str, str] = {}
            slots: tuple[str, ...] = ()
            uuids: tuple[str, ...] = ()
            products: tuple[str, ...] = ()
            gpus, preference = request.gpus, request.gpu_preference
            if gpus is None and not request.all_gpus:
                gpus, preference = self.default_gpus, preference or self.default_gpu_preference
            if gpus or request.all_gpus:
                step = "allocating GPUs"
                intent.allocating = True
                await self.intents.update(intent)
                allocating = self.client.allocate(
                    name,
                    user=request.user,
                    slots=0 if request.all_gpus else gpus or 0,
                    preference=preference,
                    node=self.node,
                    wait_seconds=request.gpu_wait or None,
                    as_many=request.all_gpus,
                )
                # Nothing is made yet: a caller who gave up waiting wants nothing made.
                granted = await unless_set(abandoned, allocating)
                fault_point("create:allocated")
                gpu_env = dict(granted.environment)
                if allocations is not None:
                    allocations.extend(granted.allocations)
                slots = tuple(f"{a.slot.node}/{a.slot.slot_id}" for a in granted.allocations)
                uuids = tuple(a.slot.uuid for a in granted.allocations)
                products = tuple(a.slot.product for a in granted.allocations)
            step = "preparing the user's cgroup"
            await asyncio.to_thread(
                apply_user_limits, self.cgroups, self.slices, args.cgroup_parent, limits
            )
            step = "naming the user inside the container"
            intent.creating = True  # from here on, a container of the name may exist
            await self.intents.update(intent)
            # Shielded, as the create below: a container made to read the image is
            # removed by its own work or by the undo, never left behind by a cancel.
            landing.append(asyncio.ensure_future(self._account_binds(name, found["Id"], account)))
            account_binds = await asyncio.shield(landing[-1])
            fault_point("create:named")
            spec = ContainerSpec(
                name=request.name,
                image=request.image,
                account=account,
                limits=limits_of(args),
                gpu_environment=gpu_env,
                gpu_slots=slots,
                gpu_device_ids=uuids,
                workspace=workspace,
                data_dirs=data_dirs,
                network_mode=self.network_mode,
                container_type=request.container_type,
                nvidia_runtime=bool(uuids) and await self.docker.has_nvidia_runtime(),
                gpu_products=products,
                image_labels=tuple(config_labels(found)),
                account_binds=account_binds,
            )
            step = "creating the Docker container"
            # Shielded: if the caller goes away meanwhile, the create still completes in
            # its thread; the undo waits for it, then removes it by name.
            landing.append(asyncio.ensure_future(self.docker.create(spec.create_arguments())))
            container = await asyncio.shield(landing[-1])
            if container.attrs.get("Image") != found["Id"]:  # the name was moved meanwhile
                raise ContainerError(
                    Code.PRECONDITION,
                    f"image {request.image} changed while this create waited: run it again "
                    "to use the image it names now",
                )
            fault_point("create:docker-created")
            metadata = Metadata(
                docker_name=name,
                name=request.name,
                user=request.user,
                image=request.image,
                container_id=container.id,
                node=self.node,
                created_at=time.time(),
                gpu_slots=list(slots),
                workspace=str(workspace or ""),
                data_dirs=[str(d) for d in data_dirs],
                limits={
                    "cpus": spec.limits.cpus,
                    "memory": spec.limits.memory,
                    "cgroup_parent": spec.limits.cgroup_parent,  # the user's usage metrics
                },
                container_type=request.container_type,
                named=True,
                status="running" if request.start else "created",
            )
            if request.start:
                step = "starting the container"
                intent.starting = True
                await self.intents.update(intent)  # for whoever asks what the create does
                count_runtime(metadata, await self._start(container, account, metadata))
                fault_point("create:started")
            step = "recording the container's metadata"
            await self.intents.commit(intent, metadata)
            return metadata
        except BaseException as err:
            for work in landing:
                with contextlib.suppress(Exception):
                    await work  # a create still running in its thread: let it land
            left = await self.undo(intent) if intent is not None else []
            raise _failed(step, err, left) from err

    async def _account_binds(self, name: str, image_id: str, account: Account) -> tuple[str, ...]:
        """Write the container's /etc/passwd and /etc/group, the image's with the user's
        names added; their read-only binds. None where the image has something other
        than a plain file there (a symlink would lead a write elsewhere)."""
        with self.own_events.calling(name, own_events.PROBE):  # when the image is new
            labels = {OWNER_LABEL: account.user}
            passwd, group = await self.docker.image_accounts(image_id, name, labels)
        if passwd is None or group is None:
            log.warning(
                "%s: the image's /etc/passwd or /etc/group is no plain file of at most 1 MiB; "
                "users stay unnamed",
                name,
            )
            return ()
        await self._write_accounts(name, passwd, group, account)
        return tuple(self.account_files.binds(name))

    async def _write_accounts(self, name: str, passwd: str, group: str, account: Account) -> None:
        """The container's account files: the given ones with the user's names added."""
        named = named_accounts(passwd, group, account)
        await asyncio.to_thread(self.account_files.write, name, *named)

    async def _taken(self, name: str) -> ContainerError:
        """Why ``name`` could not be reserved: a container has it, or a create does."""
        intent = await self.intents.get(name)
        if intent is None:
            return ContainerError(Code.EXISTS, f"{name} exists already")
        return ContainerError(Code.UNAVAILABLE, self._pending_message(intent))

    async def undo(self, intent: Intent) -> list[str]:
        """Undo everything ``intent`` says was (or may have been) done, newest first, and
        drop it. What cannot be undone now (Docker or the allocator away) is kept in the
        intent, and the repair loop tries again until it succeeds."""
        problems = []
        if intent.creating:
            try:
                container = await self.docker.find(intent.docker_name)
                if container is not None and container.labels.get(OWNER_LABEL) == intent.user:
                    with self.own_events.calling(intent.docker_name, own_events.REMOVE):
                        await self.docker.remove(container.id)
            except Exception as err:
                problems.append(f"the Docker container: {err}")
        if not problems:  # no container of the name left to mount them
            await asyncio.to_thread(self.account_files.remove, intent.docker_name)
        if intent.allocating:
            try:
                await self._release(intent.docker_name)
            except Exception as err:
                problems.append(f"the GPU allocation: {err}")
        await _remove_dirs([Path(d) for d in intent.made_dirs])
        try:
            if problems:
                intent.undoing = True
                await self.intents.update(intent)
                log.warning("could not undo all of %s yet: %s", intent.docker_name, problems)
            else:
                await self.intents.delete(intent.docker_name)
        except Exception as err:
            problems.append(f"the record of the create: {err}")
        return problems

    async def repair(self) -> int:
        """Undo the interrupted creates of this node: those of a previous run of the
        service, and those whose own undo failed. Returns how many are left."""
        left = 0
        for listed in await self.intents.all():
            if not self._interrupted(listed):
                continue  # in progress in this process (one create per user at a time)
            if listed.owner != self.instance:
                # A dead run's: its name stays reserved until it is undone, so no create
                # here can be making that name meanwhile.
                left += await self._undo_if_unchanged(listed)
                continue
            # This run's (its own undo failed): the list is as old as its read, and the
            # create may have finished since, or be making the name anew. Under the user's
            # create lock no create of theirs is under way here. A create that holds it
            # (one waiting for a GPU may, for hours) is not waited for: the next round
            # looks again, and the other users' repairs go on meanwhile.
            lock = self._creating.setdefault(listed.user, asyncio.Lock())
            if lock.locked():
                left += 1
                continue
            async with lock:  # free: taken at once
                left += await self._undo_if_unchanged(listed)
        return left

    async def _undo_if_unchanged(self, listed: Intent) -> int:
        """Undo ``listed`` if it is still there as listed, and still interrupted; 1 if
        something of it is left to undo."""
        intent = await self.intents.get(listed.docker_name)
        same = (listed.owner, listed.user, listed.started_at)
        if intent is None or (intent.owner, intent.user, intent.started_at) != same:
            return 0  # done, or the name is a new create's now
        if not self._interrupted(intent):
            return 0
        if await self.undo(intent):
            return 1
        log.info("undid the interrupted create of %s", intent.docker_name)
        return 0

    async def repair_forever(self, interval: float = 5.0) -> None:
        """Undo interrupted creates, each ``interval``; and, until it has succeeded once,
        bring the user index up to date with the records an earlier ds01 wrote."""
        indexed = False
        while True:
            if not indexed:
                try:
                    if fixed := await self.metadata.index():
                        log.info("user index: %d container records indexed anew", fixed)
                    indexed = True
                except Exception as err:  # etcd away: next round; the repair goes on
                    log.warning("cannot bring the user index up to date yet: %s", err)
            try:
                await self.repair()
            except Exception as err:  # etcd away: next round
                log.warning("cannot repair interrupted creates yet: %s", err)
            await asyncio.sleep(interval)

    async def start(
        self, user: str, privileged: bool, name: str, allocations: list[Any] | None = None
    ) -> Metadata:
        """``allocations``: filled with the container's as the allocator gave them back to
        the call (common_pb2.Allocation): what it holds now, without asking again."""
        with self._busy(user, name, own_events.START):
            metadata = await self._own(user, privileged, name)
            container = await self.docker.find(metadata.container_id)
            if container is None:
                raise _gone(name)
            for slot in metadata.gpu_slots:
                node, _, slot_id = slot.partition("/")
                check = await self._allocator(
                    self.client.validate(metadata.docker_name, slot_id, node), "validating the GPU"
                )
                if not check.valid:
                    raise ContainerError(
                        Code.PRECONDITION,
                        f"cannot start {metadata.name}: {check.reason}. Its GPU hold has ended; "
                        f"remove it (`ds01 container remove {metadata.name}`) and create it again",
                    )
            if metadata.adopted:
                await self._check_adopted_gpus(metadata, container)
            state = await self._start(container, self.accounts(metadata.user), metadata)
            metadata = await self._record_run(metadata, state)
            if metadata.gpu_slots:
                held = await self._allocator(
                    self.client.clear_stopped(metadata.docker_name), "ending the GPU hold"
                )
                if allocations is not None:
                    allocations.extend(held)
        await self.events.publish(Kind.STARTED, metadata, _by(user, metadata))
        return metadata

    async def _record_run(self, metadata: Metadata, state: dict[str, Any]) -> Metadata:
        """The record with the run a start began or a stop ended counted (max_runtime:
        counted however it ends) and the owner's notice cleared; ``metadata`` as _own read
        it just now, so it is written back with no read before."""

        def change(record: Metadata) -> None:
            count_runtime(record, state)
            record.notice = ""

        return await self.metadata.modify(metadata, change, as_read=True) or metadata

    async def _check_adopted_gpus(self, metadata: Metadata, container: Any) -> None:
        """A container from DS01 or mlc names its GPUs itself (labels, devices,
        environment): each must be allocated to it, or it would share another's."""
        seen = Seen.of(container.attrs)
        references = gpu_references(seen.labels, seen.env, seen.device_ids)
        if not references:
            return
        status = await self._allocator(self.client.gpu_status(node=self.node), "checking GPUs")
        problem = unaccounted(metadata.docker_name, references, status.allocations)
        if problem:
            raise ContainerError(
                Code.PRECONDITION, f"cannot start {metadata.name}: {problem}; ask an admin"
            )

    async def stop(
        self,
        user: str,
        privileged: bool,
        name: str,
        grace: int = 0,
        manual: bool = True,
        exact: Metadata | None = None,
        allocations: list[Any] | None = None,
    ) -> Metadata:
        """Stop; ``manual``: by a person (not a policy), for the GPU hold that follows;
        ``exact``: the reconciler's record of the container (see ``_own``);
        ``allocations``: as for ``start``."""
        with self._busy(user, name, own_events.STOP):
            metadata = await self._own(user, privileged, name, exact=exact)
            try:  # by the recorded id: no inspect before, one after
                state = await self.docker.stop(
                    metadata.container_id, grace or await self.grace(metadata)
                )
            except docker.errors.NotFound:
                raise _gone(name) from None
            metadata = await self._record_run(metadata, state)
            if metadata.gpu_slots:
                held = await self._allocator(
                    self.client.mark_stopped(metadata.docker_name, manual), "holding the GPU"
                )
                if allocations is not None:
                    allocations.extend(held)
        await self.events.publish(Kind.STOPPED, metadata, _by(user, metadata, manual))
        return metadata

    async def remove(
        self, user: str, privileged: bool, name: str, exact: Metadata | None = None
    ) -> None:
        with self._busy(user, name, own_events.REMOVE):
            metadata = await self._own(user, privileged, name, exact=exact)
            await self.docker.remove(metadata.container_id)
            await asyncio.to_thread(self.account_files.remove, metadata.docker_name)
            if metadata.gpu_slots:
                await self._release(metadata.docker_name)
            await self.metadata.delete(metadata)
        await self.events.publish(Kind.REMOVED, metadata, _by(user, metadata, exact is None))

    async def list(self, user: str, all_users: bool) -> list[tuple[Metadata, Any]]:
        """The containers, and the creates still in progress or being undone."""
        found: list[tuple[Metadata, Any]] = [
            (self._shown(intent), None)
            for intent in await self.intents.all()
            if all_users or intent.user == user
        ]
        records = await (self.metadata.fleet() if all_users else self.metadata.of_user(user))
        for metadata in records:  # on every node
            here = metadata.node == self.node
            found.append(
                (metadata, await self.docker.find(metadata.container_id) if here else None)
            )
        return sorted(found, key=lambda pair: (pair[0].user, pair[0].name))

    async def inspect(self, user: str, privileged: bool, name: str) -> tuple[Metadata, Any]:
        try:
            metadata = await self._own(user, privileged, name)
        except Pending as pending:
            return self._shown(pending.intent), None
        return metadata, await self.docker.find(metadata.container_id)

    @contextlib.contextmanager
    def _busy(self, user: str, name: str, actions: frozenset[str]) -> Iterator[None]:
        """Mark a container a start, stop or remove of this process is working on: the
        reconciler leaves it alone meanwhile, and sweeps for none of the Docker
        ``actions`` the call causes."""
        full = name if SEPARATOR in name else _docker_name_or(name, user)
        with counted(self.busy, full), self.own_events.calling(full, actions):
            yield

    def _shown(self, intent: Intent) -> Metadata:
        return intent.shown(interrupted=self._interrupted(intent))

    def _interrupted(self, intent: Intent) -> bool:
        """Not a create this process is making now: one to undo."""
        return intent.owner != self.instance or intent.user not in self._in_flight

    def _pending_message(self, intent: Intent) -> str:
        if not self._interrupted(intent):
            return f"{intent.docker_name} is being created; try again in a moment"
        return (
            f"the create of {intent.docker_name} was interrupted and ds01 is undoing it; "
            "try again in a few seconds"
        )

    async def _own(
        self,
        user: str,
        privileged: bool,
        name: str,
        exact: Metadata | None = None,
    ) -> Metadata:
        """The record of the caller's container ``name`` (admins: a full ``name._.user``
        for others'; ``exact``: a record the caller read earlier, the reconciler's: by its
        Docker name as it is, and only while that name is still that very container's).
        Docker is not asked: the callers act on the recorded id."""
        try:
            full = (
                exact.docker_name if exact else name if "._." in name else docker_name(name, user)
            )
        except SpecError as err:
            raise ContainerError(Code.INVALID, str(err)) from err
        metadata = await self.metadata.get(full)
        if exact and metadata and metadata.container_id != exact.container_id:
            raise ContainerError(Code.NOT_FOUND, f"{full} was removed and made anew meanwhile")
        if metadata is None and not exact and "._." not in name:
            # Adopted containers keep the names they were made with (mlc: name._.uid).
            mine = [m for m in await self.metadata.of_user(user, here=True) if m.name == name]
            metadata = mine[0] if len(mine) == 1 else None
        if metadata is None:
            intent = await self.intents.get(full)
            if intent is not None and (intent.user == user or privileged):
                raise Pending(intent, self._pending_message(intent))
            raise ContainerError(Code.NOT_FOUND, f"no container {name} (`ds01 container list`)")
        if metadata.user != user and not privileged:
            raise ContainerError(Code.DENIED, f"{name} belongs to {metadata.user}")
        return metadata

    async def _start(self, container: Any, account: Account, record: Metadata) -> dict[str, Any]:
        """Start, after checking again that every bind mount is inside the owner's home
        (a path may have become a symlink since create), but for the container's own
        account files, which are written anew if they have gone. ``record``: ds01's, by
        the name ds01 made it under (its files' name, kept through a `docker rename`).
        Returns Docker's State of the container once started."""
        binds = container.attrs.get("HostConfig", {}).get("Binds") or []
        made_as = record.docker_name
        own = self.account_files.binds(made_as)
        for bind in binds:
            source = Path(bind.split(":", 1)[0])
            if bind not in own and not source.resolve().is_relative_to(account.home.resolve()):
                raise ContainerError(
                    Code.DENIED,
                    f"{source} now leads outside {account.user}'s home; not starting",
                )
        if set(own) <= set(binds) and self.account_files.missing(made_as):
            await self._write_accounts_again(container, account, made_as)
        if not record.named:  # containers ds01 adopted: named in their own /etc
            await self.docker.name_account(container, account)
        return await self.docker.start(container)

    async def _write_accounts_again(self, container: Any, account: Account, name: str) -> None:
        """The container's account files, gone from the host (a state directory wiped or
        restored): from the image's files if this process read them, else with root's
        and the user's names alone (Docker refuses to start it without them)."""
        passwd, group = self.docker.known_accounts(container.attrs.get("Image", ""))
        if passwd is None or group is None:
            log.warning("%s: account files written anew with the user's names alone", name)
            passwd, group = "root:x:0:0:root:/root:/bin/sh\n", "root:x:0:\n"
        await self._write_accounts(name, passwd, group, account)

    async def _check_room(self, user: str, name: str, limits: Any) -> None:
        counted = limits.HasField("max_containers_per_user")
        records, existing, labelled = await asyncio.gather(
            self.metadata.of_user(user, here=True),
            self.docker.find(name),
            # Containers made through the Docker gateway count too: they carry the label.
            self.docker.names_labelled(OWNER_LABEL, user) if counted else _nothing(),
        )
        recorded = {m.docker_name for m in records}
        if name in recorded or existing:
            raise ContainerError(Code.EXISTS, f"{name} exists already")
        if counted:
            allowed = limits.max_containers_per_user
            mine = recorded | set(labelled)
            if len(mine) >= allowed:
                raise ContainerError(
                    Code.EXHAUSTED,
                    f"{user} has {len(mine)} of {allowed} containers: remove one first",
                )

    def _paths(
        self, account: Account, request: CreateRequest
    ) -> tuple[Path, tuple[Path, ...], list[Path]]:
        """Workspace and data directories must lie in the user's own home. Returns the
        directories still to make, deepest first, so that they are known before made."""
        if not account.home.is_dir():  # never made here: a home is the admin's to make
            raise ContainerError(
                Code.PRECONDITION,
                f"{account.user}'s home directory {account.home} does not exist, and the "
                "workspace and data directories must be in it: ask an admin to create it",
            )
        workspace = Path(request.workspace or account.home / "workspace" / request.name)
        data = tuple(Path(d) for d in request.data_dirs)
        for path in (workspace, *data):
            if not path.is_absolute():
                raise ContainerError(Code.INVALID, f"{path}: give an absolute path")
            _inside_home(path, account)
        # Docker gets the resolved paths: no symlink left for it to follow.
        data = tuple(d.resolve() for d in data)
        for path in data:
            if not path.is_dir():
                raise ContainerError(Code.PRECONDITION, f"data directory {path} does not exist")
        to_make = [p for p in (workspace, *workspace.parents) if not p.exists()]
        return workspace, data, to_make

    async def grace(self, metadata: Metadata) -> int:
        """Seconds a stop waits for the container to exit before it kills: the limits'
        sigterm_grace (DS01's sigterm_grace_s, by container type), else DEFAULT_GRACE."""
        try:
            limits = await self.limits.get_limits(metadata.user, metadata.container_type)
        except Ds01Error as err:
            if err.code != grpc.StatusCode.INVALID_ARGUMENT or not metadata.container_type:
                log.info("stopping %s with Docker's grace: %s", metadata.docker_name, err.message)
                return DEFAULT_GRACE  # a stop never fails for want of its grace
            limits = await self.limits.get_limits(metadata.user, "")  # a type not configured
        if not limits.HasField("sigterm_grace"):
            return DEFAULT_GRACE
        return max(1, math.ceil(limits.sigterm_grace.ToTimedelta().total_seconds()))

    async def _release(self, docker_name: str) -> None:
        try:
            await self.client.release(docker_name)
        except Ds01Error as err:
            if err.code != grpc.StatusCode.NOT_FOUND:
                raise

    @staticmethod
    async def _allocator(call: Awaitable[Any], doing: str) -> Any:
        try:
            return await call
        except Ds01Error as err:
            code = _FROM_GRPC.get(err.code, Code.UNAVAILABLE)
            raise ContainerError(code, f"{doing}: {err.message}") from err


def aggregate_of(limits: Any) -> dict[str, float | int]:
    """The user's aggregate limits (a GetLimits answer) as CgroupfsSlices writes them."""
    return {
        key: getattr(limits.aggregate, field)
        for key, field in (
            ("memory", "memory_bytes"),
            ("memory_high", "memory_high_bytes"),
            ("cpus", "cpus"),
            ("pids", "pids"),
        )
        if limits.aggregate.HasField(field)
    }


def apply_user_limits(
    cgroups: CgroupfsSlices, slices: SystemdSlices, parent: str, limits: Any
) -> None:
    """The cgroup parent of a user's containers (as GetDockerArgs gives it for this
    Docker: a systemd slice's name, or a cgroupfs path) made, with the user's aggregate
    limits and the group's max_tasks (DS01's TasksMax) applied; limits the configuration
    no longer sets are lifted. For the containers service and the gateway alike. It
    writes files: call it in a thread."""
    tasks = {"pids": limits.max_tasks} if limits.HasField("max_tasks") else {}
    if not parent.startswith("/"):  # a systemd slice
        slices.ensure(parent, aggregate_of(limits))
        slices.ensure(group_slice(parent, limits.user), tasks)
    else:
        cgroups.ensure(parent, aggregate_of(limits))
        cgroups.ensure(str(PurePosixPath(parent).parent), tasks)


def group_slice(slice_name: str, user: str) -> str:
    """ds01-<group>-<user>.slice -> ds01-<group>.slice: the parent systemd makes of it."""
    return slice_name.removesuffix(f"-{sanitize_for_systemd(user)}.slice") + ".slice"


def _by(user: str, metadata: Metadata, manual: bool = True) -> str:
    """Who acted, for the event: a person, or a policy of the reconciler."""
    if not manual:
        return "by policy"
    return "" if user == metadata.user else f"by {user}"


def count_runtime(metadata: Metadata, state: dict[str, Any]) -> bool:
    """Add every finished run to ``metadata.runtime_before``, each once, however it ended:
    a stop by ds01 or by docker, a crash, a dockerd restart, or a ``docker restart`` (a
    new run that replaced one ds01 saw begin). Returns whether ``metadata`` changed."""
    started_text = state.get("StartedAt", "")
    started, finished = docker_time(started_text), docker_time(state.get("FinishedAt"))
    changed = False
    if state.get("Status") and metadata.status != state["Status"]:
        metadata.status, changed = state["Status"], True  # what other nodes list
    seen = metadata.run_start
    if seen and seen not in (started_text, metadata.counted_start):
        # The run ds01 saw begin was replaced: it ended at Docker's FinishedAt if that
        # lies between the two starts, else (runs missed in between) by the new start.
        begun = docker_time(seen)
        end = (
            finished
            if begun and finished and begun <= finished <= (started or finished)
            else started
        )
        if begun is not None and end is not None and end > begun:
            metadata.runtime_before += end - begun
        metadata.counted_start, changed = seen, True
    if state.get("Running"):
        if metadata.run_start != started_text:
            metadata.run_start, changed = started_text, True
        return changed
    if started is None or finished is None or finished < started:
        return changed
    if started_text == metadata.counted_start:
        return changed
    metadata.runtime_before += finished - started
    metadata.counted_start, metadata.run_start = started_text, ""
    return True


async def _nothing() -> list[str]:
    return []


async def _remove_dirs(made: list[Path]) -> None:
    for directory in made:  # deepest first; only if still empty
        with contextlib.suppress(OSError):
            directory.rmdir()


def _docker_name_or(name: str, user: str) -> str:
    """The Docker name, or the name as given when it is no valid one (nothing to mark)."""
    try:
        return docker_name(name, user)
    except SpecError:
        return name


def _gone(name: str) -> ContainerError:
    return ContainerError(
        Code.NOT_FOUND, f"{name} is recorded but Docker no longer has it; remove it"
    )


def _inside_home(path: Path, account: Account) -> Path:
    """``path`` resolved, if it lies in the user's own home; refused otherwise."""
    resolved = path.resolve()
    if not resolved.is_relative_to(account.home.resolve()):
        raise ContainerError(Code.DENIED, f"{path} is outside {account.user}'s home {account.home}")
    return resolved


def _make_workspace(workspace: Path, account: Account) -> None:
    workspace.mkdir(parents=True, mode=0o750)
    _chown_tree(workspace, account)


def _chown_tree(path: Path, account: Account) -> None:
    home = account.home.resolve()
    current = path.resolve()
    while current != home and current.is_relative_to(home):
        os.chown(current, account.uid, account.gid)
        current = current.parent


def _failed(step: str, err: BaseException, left: list[str]) -> ContainerError:
    if isinstance(err, ContainerError):
        code, why = err.code, err.message
    elif isinstance(err, Ds01Error):
        code, why = _FROM_GRPC.get(err.code, Code.UNAVAILABLE), err.message
    elif isinstance(err, SpecError):
        code, why = Code.INVALID, str(err)
    elif isinstance(err, NoAccount):
        code, why = Code.PRECONDITION, str(err)
    elif isinstance(err, DockerUnavailable):
        code, why = Code.UNAVAILABLE, str(err)
    elif isinstance(err, docker.errors.DockerException):
        code, why = Code.UNAVAILABLE, f"Docker: {err}"
    elif isinstance(err, asyncio.CancelledError):
        code, why = Code.UNAVAILABLE, "the call was cancelled"
    elif isinstance(err, Abandoned):
        code, why = Code.UNAVAILABLE, "its caller gave up waiting"
    else:
        code, why = Code.UNAVAILABLE, failure_sentence(err)
    message = f"create failed while {step}: {why}"
    if left:
        message += f"; ds01 keeps undoing what is left ({'; '.join(left)})"
    else:
        message += "; nothing was left behind"
    return ContainerError(code, message)
