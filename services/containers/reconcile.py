"""The lifecycle reconciler: observe Docker, compare with ds01's records and policies, act.

Runs a sweep at a fixed interval and right after any Docker container event (so a
dockerd restart is noticed at once). A sweep after events inspects only the containers
they named; the one each interval inspects every container. Each sweep is idempotent:
  * adopt ds01-labelled containers ds01 has no record of (after a crash or restore);
  * forget records, and release GPUs, of containers Docker no longer has;
  * release allocations on this node whose container is gone, and report containers
    that carry GPUs without an allocation;
  * apply the lifecycle policies: stop idle containers (warning first) and those past
    max_runtime (counted across restarts), remove containers stopped longer than
    container_hold_after_stop and created-never-started ones after
    created_container_timeout. ``ds01.protected=true`` and the ``exempt_from_idle``
    policy are honoured.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.errors
import grpc

from ds01.client import Ds01Error
from ds01.containers.adapters import Metadata
from ds01.containers.adoption import (
    GPU_ENV,
    Imported,
    Seen,
    Slot,
    docker_time,
    gpu_plan,
    made_by_gateway,
    plan_import,
)
from ds01.containers.events import Kind
from ds01.containers.gpu_activity import NvmlActivity
from ds01.containers.lifecycle import (
    Code,
    ContainerError,
    Lifecycle,
    count_runtime,
)
from ds01.core.pki import is_user_name
from ds01.core.units import parse_duration, parse_size
from ds01.v1 import common_pb2

log = logging.getLogger(__name__)

IDLE_CPU_PERCENT = 2.0  # of one core: DS01's cpu_idle_threshold
IDLE_NET_BYTES_PER_SECOND = 1024  # where no network_idle_threshold is set
WARN_FRACTION = 0.8  # warn once 80% of the idle timeout has passed
# ds01's and DS01's containers, and AIME mlc's: each is ds01's to manage.
ADOPTED_LABELS = ("ds01.managed=true", "aime.mlc.USER")
GPU_CONFLICT = "its GPUs are not allocated to it"  # an adopted container's notice
KEEPALIVE = ".keep-alive"  # in the workspace: not idle while it is fresh
KEEPALIVE_MAX = 24 * 3600.0  # DS01's fixed 24 h where keepalive_max_duration is unset
# What a container does not leave without an event that names it (start, restart, rm).
STILL = ("created", "exited", "dead")
# Seconds a sweep relies on what it kept of a container that does not run: dockerd drops
# the events of a subscriber that falls far behind, without ending its stream.
KEPT_FOR = 300.0
KEPT_STATE = ("Status", "Running", "ExitCode", "StartedAt", "FinishedAt")  # what is read
EVENT_SWEEP_GAP = 1.0  # seconds between a Docker event and the sweep it wakes
SWEEP_RETRY = 5.0  # seconds before a failed sweep of every container is tried again
SWEEP_CONCURRENCY = 8  # containers a sweep looks at at once
KEEPALIVE_SECONDS = 2.0  # for looking at a workspace, which may be on a hung network


class Action(enum.Enum):
    WARN_IDLE = "warn_idle"
    STOP_IDLE = "stop_idle"
    STOP_RUNTIME = "stop_runtime"
    REMOVE_STOPPED = "remove_stopped"
    REMOVE_NEVER_STARTED = "remove_never_started"


@dataclass(frozen=True)
class Observed:
    """One container as Docker reports it."""

    state: str  # created, running, exited, ...
    created_at: float
    started_at: float | None
    finished_at: float | None
    protected: bool


@dataclass(frozen=True)
class Policy:
    idle_timeout: float | None
    max_runtime: float | None
    container_hold_after_stop: float | None
    created_container_timeout: float | None
    exempt_from_idle: bool = False
    warn_before: float | None = None  # the idle warning this long before the stop
    # When a container counts as idle (DS01's policies):
    grace_period: float = 0.0  # after each start, never idle
    idle_window: int = 1  # idle samples in a row before it counts
    cpu_idle_percent: float = IDLE_CPU_PERCENT
    net_idle_bytes: float | None = None  # per sample; None: IDLE_NET_BYTES_PER_SECOND
    gpu_idle_percent: float | None = None  # None: the NVML adapter's own threshold
    keepalive_max: float = KEEPALIVE_MAX
    # Under high demand (this share of the node's GPU slots taken), the idle timeout is
    # multiplied by high_demand_reduction.
    high_demand_threshold: float | None = None
    high_demand_reduction: float = 1.0

    def idle_timeout_at(self, demand: float) -> float | None:
        """The idle timeout when ``demand`` of the node's GPU slots are taken."""
        if self.idle_timeout is None or self.high_demand_threshold is None:
            return self.idle_timeout
        if demand >= self.high_demand_threshold:
            return self.idle_timeout * self.high_demand_reduction
        return self.idle_timeout


def decide(
    observed: Observed,
    policy: Policy,
    runtime_before: float,
    idle_for: float,
    stop_at: float | None,
    now: float,
    demand: float = 0.0,
) -> Action | None:
    """What the lifecycle policies ask for now, if anything (pure). ``stop_at`` is the
    idle stop the owner was warned of (None: no warning yet): an idle container is
    never stopped without one, given at an earlier sweep. ``demand``: the share of the
    node's GPU slots taken."""
    if observed.protected:
        return None
    if observed.state == "created":
        timeout = policy.created_container_timeout
        if timeout is not None and now - observed.created_at > timeout:
            return Action.REMOVE_NEVER_STARTED
        return None
    if observed.state in ("exited", "dead"):
        hold = policy.container_hold_after_stop
        if hold is not None and observed.finished_at and now - observed.finished_at > hold:
            return Action.REMOVE_STOPPED
        return None
    if observed.state != "running":
        return None
    running = runtime_before + (now - (observed.started_at or now))
    if policy.max_runtime is not None and running > policy.max_runtime:
        return Action.STOP_RUNTIME
    timeout = policy.idle_timeout_at(demand)
    if timeout is not None and not policy.exempt_from_idle:
        warn_at = timeout * WARN_FRACTION
        if policy.warn_before is not None:
            warn_at = max(0.0, timeout - policy.warn_before)
        if stop_at is None and idle_for > warn_at:
            return Action.WARN_IDLE
        if stop_at is not None and now >= stop_at and idle_for > timeout:
            return Action.STOP_IDLE
    return None


def policy_of(policies: Mapping[str, str], **limits: float | None) -> Policy:
    """The lifecycle policy of a user's container: its limits, and the policies the
    limits service sends as text (30m, 1m, 0.8, true)."""

    def get(key: str, parse: Callable[[str], Any], default: Any) -> Any:
        text = policies.get(key, "")
        return parse(text) if text else default

    return Policy(
        **limits,  # type: ignore[arg-type]
        exempt_from_idle=get("exempt_from_idle", lambda t: t == "true", False),
        warn_before=get("warn_before_idle_stop", parse_duration, None),
        grace_period=get("grace_period", parse_duration, 0.0),
        idle_window=get("idle_detection_window", int, 1),
        cpu_idle_percent=get("cpu_idle_threshold", float, IDLE_CPU_PERCENT),
        net_idle_bytes=get("network_idle_threshold", parse_size, None),
        gpu_idle_percent=get("gpu_idle_threshold", float, None),
        keepalive_max=get("keepalive_max_duration", parse_duration, KEEPALIVE_MAX),
        high_demand_threshold=get("high_demand_threshold", float, None),
        high_demand_reduction=get("high_demand_idle_reduction", float, 1.0),
    )


def _slots(allocations: list[Any], node: str) -> list[Slot]:
    return [Slot(a.slot.slot_id, a.slot.uuid) for a in allocations if a.slot.node == node]


def _created(container: Any) -> float:
    created = container.attrs.get("Created")
    if isinstance(created, int | float):  # a list entry's: seconds
        return float(created)
    return docker_time(created) or 0.0


async def _each(names: list[str], work: Callable[[str], Awaitable[None]]) -> None:
    """``work`` on each name, SWEEP_CONCURRENCY at a time: a sweep over thousands of
    containers waits on Docker and etcd for each, and the waits overlap."""
    gate = asyncio.Semaphore(SWEEP_CONCURRENCY)

    async def one(name: str) -> None:
        async with gate:
            await work(name)

    await asyncio.gather(*map(one, names))


@contextlib.contextmanager
def _reconciling(name: str) -> Iterator[None]:
    """Log what goes wrong with one container, and go on with the others."""
    try:
        yield
    except (docker.errors.NotFound, ValueError):  # removed while being reconciled
        log.debug("%s changed while being reconciled", name)
    except Exception as err:
        log.warning("cannot reconcile %s: %s", name, err)


def _listed(summary: dict[str, Any]) -> dict[str, Any]:
    """A list entry in the shape of an inspect, as far as a sweep reads it before it
    inspects a container it looks at closer (its policies, an adoption)."""
    names = summary.get("Names") or [""]
    return {
        "Id": summary["Id"],
        "Name": next((n for n in names if n.count("/") == 1), names[0]),  # not a link's
        "Created": summary.get("Created"),
        "Config": {"Labels": summary.get("Labels") or {}},
        "State": {"Status": summary.get("State", "")},
        "Mounts": summary.get("Mounts") or [],
    }


def _beyond_the_list(inspected: dict[str, Any]) -> dict[str, Any]:
    """What a sweep reads of an inspect that ``_listed`` has not, and no more (an
    environment may hold secrets): the run's times and end, the created time to the
    nanosecond, and what adoption reads of its GPUs."""
    config = inspected.get("Config") or {}
    state = inspected.get("State") or {}
    gpus = tuple(f"{key}=" for key in GPU_ENV)
    return {
        "Created": inspected.get("Created"),
        "State": {key: state.get(key) for key in KEPT_STATE if key in state},
        "Config": {"Env": [e for e in config.get("Env") or () if e.startswith(gpus)],
                   "Image": config.get("Image")},
        "HostConfig": {"DeviceRequests": (inspected.get("HostConfig") or {}).get("DeviceRequests")},
    }  # fmt: skip


def _completed(listed: dict[str, Any], beyond: dict[str, Any]) -> dict[str, Any]:
    """A list entry (``_listed``) with what ``_beyond_the_list`` kept of its inspect."""
    return {**listed, **beyond, "Config": {**listed.get("Config", {}), **beyond["Config"]}}


def _workspace_of(container: Any) -> str:
    """The host directory Docker mounts at /workspace, else mlc's WORK_MOUNT label. A
    gateway container's label is its image's: a .keep-alive looked for there could be
    anyone's, so only its mount counts."""
    for mount in container.attrs.get("Mounts") or []:
        if mount.get("Destination") == "/workspace" and mount.get("Type") == "bind":
            return str(mount.get("Source", ""))
    label = container.labels.get("aime.mlc.WORK_MOUNT", "")
    if label in ("", "-") or made_by_gateway(container.labels):
        return ""
    return label


def _kept_alive(workspace: str, keepalive_max: float, now: float) -> bool:
    """A ``.keep-alive`` file in the workspace, touched within ``keepalive_max``. The
    file itself is looked at (never a link's target), and its change time, which no
    user can set (a modification time can be set in the future)."""
    if not workspace:
        return False
    try:
        touched = os.lstat(Path(workspace) / KEEPALIVE).st_ctime
    except OSError:
        return False
    return 0 <= now - touched < keepalive_max


async def _kept_alive_soon(workspace: str, keepalive_max: float, now: float) -> bool:
    """_kept_alive off the event loop, and bounded: a hung network home says no."""
    try:
        return await asyncio.wait_for(
            asyncio.to_thread(_kept_alive, workspace, keepalive_max, now), KEEPALIVE_SECONDS
        )
    except TimeoutError:
        return False


@dataclass
class _Activity:
    """The last usage sample of a container, and since when it has been idle."""

    cpu: float
    net: float
    at: float
    started: str  # Docker's StartedAt of the run sampled
    idle_since: float | None = None  # set once idle_window samples in a row were idle
    streak_since: float | None = None  # the start of the current run of idle samples
    streak: int = 0
    stop_at: float | None = None  # the idle stop its owner was warned of

    def follow_idle(self, last: _Activity, window: int) -> None:
        """This sample was idle, after ``last``: idle counts (since the first sample of
        the streak) once ``window`` samples in a row were idle."""
        self.streak = last.streak + 1
        self.streak_since = last.at if last.streak_since is None else last.streak_since
        if self.streak >= window:
            self.idle_since = self.streak_since
            self.stop_at = last.stop_at


@dataclass
class Reconciler:
    lifecycle: Lifecycle
    interval: float = 30.0
    gpus: NvmlActivity = field(default_factory=NvmlActivity)
    activity: dict[str, _Activity] = field(default_factory=dict)
    sweeps: int = 0
    sweep_seconds: float = 0.0  # all sweeps together, for the metrics
    last_sweep_seconds: float = 0.0
    unallocated: set[str] = field(default_factory=set)  # carry GPUs, hold no allocation
    unadoptable: set[str] = field(default_factory=set)  # ids whose owner is no user name
    _suspects: set[tuple[str, str]] = field(default_factory=set)  # so in the last sweep
    demand: float = 0.0  # the share of this node's GPU slots taken, at the last sweep
    gpu_uuids: dict[str, list[str]] = field(default_factory=dict)  # container -> its GPUs
    # Adopted containers whose GPUs another container holds: the allocator's answer.
    conflicts: dict[str, str] = field(default_factory=dict)
    unknown_gpus: dict[str, list[str]] = field(default_factory=dict)  # not on this node
    ds01_metadata: Path | None = None  # DS01's container-metadata directory, if any
    gpu_states: dict[str, int] = field(default_factory=dict)  # container -> SlotState
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Containers Docker's events named since the last sweep: on a busy node, a sweep
    # inspects these, not every container (inspects are what a sweep costs dockerd).
    _named: set[str] = field(default_factory=set)
    # What a sweep reads of the inspect of each container that does not run, beyond
    # Docker's list (``_beyond_the_list``), as last inspected while Docker's event stream
    # was open (name -> (id, when, that)): until an event names the container or the stream
    # breaks, none of it can change, so the sweep of each interval reads it here instead
    # of asking Docker again (of thousands of stopped containers, their inspects were
    # nearly all of that sweep's time). At most KEPT_FOR seconds, whatever the stream said.
    _kept: dict[str, tuple[str, float, dict[str, Any]]] = field(default_factory=dict)
    _following: bool = False  # Docker's event stream is open
    # Inspects under way (name -> token): one that an event overtook keeps nothing.
    _inspecting: dict[str, object] = field(default_factory=dict)
    _full_due: float = 0.0  # monotonic time of the next sweep that inspects everything
    _sweeping: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Containers that started or died: their runs are counted at once, not at a sweep.
    _runs: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    actions: Counter[str] = field(default_factory=Counter)  # what it did, for the metrics
    _events: Any = None  # Docker's event stream while run() runs; closed when it ends
    _stopped: bool = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._follow_docker_events, args=(loop,), daemon=True).start()
        accounting = asyncio.ensure_future(self._count_runs())
        try:
            while True:
                only = None
                if time.monotonic() < self._full_due:
                    only, self._named = self._named, set()
                else:
                    self._named.clear()
                    self._full_due = time.monotonic() + self.interval
                try:
                    await self.sweep(only=only)
                except Exception:  # a failed sweep is retried; the loop never dies
                    log.exception("reconcile sweep failed")
                    if only is None:
                        retry = time.monotonic() + min(self.interval, SWEEP_RETRY)
                        self._full_due = min(self._full_due, retry)
                    else:
                        self._named |= only  # looked at in the next sweep
                with contextlib.suppress(TimeoutError):  # until the next full sweep at most
                    due = max(0.0, self._full_due - time.monotonic())
                    await asyncio.wait_for(self._wake.wait(), due)
                    # Docker's events come in bursts (a create alone is several), and on
                    # a busy node without pause: one sweep for each burst.
                    await asyncio.sleep(min(EVENT_SWEEP_GAP, self.interval))
                self._wake.clear()
        finally:
            accounting.cancel()
            self._not_following()  # a sweep called after this one (an import) asks Docker
            self._stopped = True  # the thread following Docker's events ends too
            if self._events is not None:
                with contextlib.suppress(Exception):
                    self._events.close()

    def _follow_docker_events(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake the sweep on every container event; reconnect when dockerd restarts."""
        while not self._stopped:
            try:
                # From before the stream opens: dockerd subscribes it only after answering,
                # and replays what came between (it keeps the latest events).
                since = int(time.time()) - 1
                self._events = events = self.lifecycle.docker.client.events(
                    decode=True, filters={"type": "container"}, since=since
                )
                loop.call_soon_threadsafe(self._look_again)  # (re)connected
                for event in events:
                    loop.call_soon_threadsafe(self._on_event, event)
            except Exception as err:
                if not self._stopped:
                    log.info("Docker event stream interrupted (%s); reconnecting", err)
            if loop.is_closed() or self._stopped:
                return
            loop.call_soon_threadsafe(self._not_following)
            time.sleep(1)

    def _look_again(self) -> None:
        """Inspect every container at once: events may have been missed."""
        self._forget_kept()
        self._following = True
        self._full_due = 0.0
        self._wake.set()

    def _not_following(self) -> None:
        """Events go unseen until the stream is open again: nothing kept holds now."""
        self._following = False
        self._forget_kept()

    def _forget_kept(self, names: Iterable[str] | None = None) -> None:
        """What was kept of ``names`` (None: of every container)."""
        if names is None:
            self._kept.clear()
            self._inspecting.clear()
        for name in names or ():
            self._kept.pop(name, None)
            self._inspecting.pop(name, None)

    def _on_event(self, event: dict[str, Any]) -> None:
        attributes = event.get("Actor", {}).get("Attributes", {})
        name = attributes.get("name")
        # Whatever it was (ds01's own calls too), the container is inspected again.
        self._forget_kept(filter(None, (name, attributes.get("oldName", "").lstrip("/"))))
        action = event.get("Action", "")
        when = event.get("timeNano", 0) / 1e9
        if name and when and self.lifecycle.own_events.caused(name, action, when):
            return  # ds01's own call did what a sweep would, and counted the run
        self._wake.set()
        if not name:
            self._full_due = 0.0  # an event that names no container: look at all
            self._forget_kept()
            return
        self._named.add(name)
        if action in ("start", "die"):
            self._runs.put_nowait(name)

    async def _count_runs(self) -> None:
        """Count each run as it starts and ends: a ``docker restart`` between two sweeps
        can never hide a run from max_runtime."""
        while True:
            name = await self._runs.get()
            try:  # records are written optimistically: a sweep at the same time is fine
                await self.count_run(name)
            except Exception as err:  # the sweep counts it later
                log.debug("cannot count the run of %s now: %s", name, err)

    async def count_run(self, docker_name: str) -> None:
        lifecycle = self.lifecycle
        record = await lifecycle.metadata.get(docker_name)
        container = await lifecycle.docker.find(record.container_id) if record else None
        if record is None or container is None:
            return
        state = container.attrs["State"]  # as Docker says now: find inspects it afresh
        await lifecycle.metadata.modify(  # the record was read just now
            record, lambda current: count_runtime(current, state), as_read=True
        )

    async def sweep(self, now: float | None = None, only: set[str] | None = None) -> None:
        """``only``: inspect (and apply policies to) these containers alone; adoption,
        forgetting and GPU releases still look at everything listed."""
        async with self._sweeping:  # the loop's, an import's: one at a time
            started = time.perf_counter()
            await self._sweep(now, only)
            self.last_sweep_seconds = time.perf_counter() - started
            self.sweep_seconds += self.last_sweep_seconds

    async def _sweep(self, now: float | None, only: set[str] | None) -> None:
        lifecycle = self.lifecycle
        now = time.time() if now is None else now
        # The order of these reads is what makes the sweep safe without any settle time:
        # a create writes its intent before its allocation and its container, and
        # replaces the intent with its record in one step. So an allocation or a
        # container seen here belongs to an intent or a record read after it, and a
        # record read before the container list has its container in that list.
        allocations = await self._allocations()
        recorded = {m.docker_name: m.container_id for m in await lifecycle.metadata.all()}
        containers = {c.name: c for c in await self._labelled()}
        listed = {c.id for c in containers.values()}
        creating = {intent.docker_name for intent in await lifecycle.intents.all()}
        records = {m.docker_name: m for m in await lifecycle.metadata.all()}
        # A start, stop or remove under way: never adopted or forgotten meanwhile, but its
        # policies still apply (else calling start again and again would dodge them).
        busy = set(lifecycle.busy)
        known = set(recorded) | set(containers) | creating | busy | set(records)  # GPUs
        # Oldest first: of two containers that claim one GPU, the one that had it first
        # is adopted with it.
        for name, container in sorted(containers.items(), key=lambda c: _created(c[1])):
            record = records.get(name)
            if name in creating or recorded.get(name) != (record and record.container_id):
                del containers[name]  # in flux: being created or undone, removed, made anew
            elif record is None and name not in busy:
                adopted = None
                with _reconciling(name):  # one that cannot be adopted stops no others
                    adopted = await self._adopt(container, now)
                if adopted is None:
                    del containers[name]
                else:
                    records[name] = adopted
            elif record is None or record.container_id != container.id:
                del containers[name]  # a remove under way, or a record of another container
        for name, record in list(records.items()):
            if name in containers:
                continue
            # Forgotten only when the same record was there before Docker's list and its
            # container is not in it: a record newer than the list is left be.
            in_flux = name in creating or name in busy
            if recorded.get(name) == record.container_id not in listed and not in_flux:
                await self._forget(record)
            del records[name]
        if allocations:
            taken = [a for a in allocations if a.state != common_pb2.SLOT_STATE_FREE]
            self.demand = len(taken) / len(allocations)
            self.gpu_uuids = {}
            for allocation in taken:
                self.gpu_uuids.setdefault(allocation.container, []).append(allocation.slot.uuid)
        held = await self._release_orphaned_allocations(allocations, known)
        suspects = {
            (name, container.id)
            for name, container in containers.items()
            if container.labels.get("ds01.gpu.uuids")
            and not made_by_gateway(container.labels)
            and held is not None
            and name not in held
        }
        # A create that commits after this sweep read the allocations is allocated in the
        # next sweep's reading: only a container unallocated in two sweeps running is.
        unallocated = {name for name, _id in suspects & self._suspects}
        self._suspects = suspects
        for name in sorted(unallocated - self.unallocated):  # once, not every sweep
            log.warning("%s carries GPUs but holds no allocation: check it", name)
        self.unallocated = unallocated
        self.gpu_states = held or {}
        if only is not None:
            containers = {name: c for name, c in containers.items() if name in only}
        if only is None:  # what was kept of names no longer listed is of nothing now
            self._forget_kept(set(self._kept) - set(containers))
        inspected, kept = await self._inspected(containers)  # created to the nanosecond, too
        # Oldest first, one at a time: of two adopted containers that use one GPU, the
        # one that had it first gets it.
        for name, container in sorted(inspected.items(), key=lambda c: _created(c[1])):
            record = records[name]
            if record.adopted and not record.gpu_slots and GPU_CONFLICT not in record.notice:
                # Until they are allocated (or found taken): tried again every sweep.
                with _reconciling(name):
                    records[name] = await self._adopt_gpus(container, record, allocations)
        policies: dict[tuple[str, str], asyncio.Future[Policy]] = {}

        async def apply(name: str) -> None:
            record = records[name]
            key = (record.user, record.container_type)
            if key not in policies:  # asked once a sweep for each user and type
                policies[key] = asyncio.ensure_future(self._policy(*key))
            with _reconciling(name):  # one broken container must not stop the others
                await self._apply(inspected[name], record, await policies[key], now,
                                  kept=name in kept)  # fmt: skip

        await _each(list(inspected), apply)
        self.sweeps += 1

    async def _inspected(self, containers: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
        """Each listed container as Docker inspects it now, or, where nothing of it can
        have changed, as kept (see ``_kept``; their names apart); one removed meanwhile,
        or that Docker cannot inspect now, is left out of this sweep."""
        found, kept = {}, set()

        async def inspect(name: str) -> None:
            with _reconciling(name):
                container = containers[name]
                if self._from_kept(name, container):
                    found[name] = container
                    kept.add(name)
                    return
                token = self._inspecting[name] = object()
                try:
                    await self.lifecycle.docker.run(container.reload)
                finally:
                    overtaken = self._inspecting.get(name) is not token  # by an event
                    if not overtaken:
                        del self._inspecting[name]
                found[name] = container
                if self._following and not overtaken and container.status in STILL:
                    beyond = _beyond_the_list(container.attrs)
                    self._kept[name] = (container.id, time.monotonic(), beyond)
                elif not overtaken:
                    self._kept.pop(name, None)

        await _each(list(containers), inspect)
        return found, kept

    def _from_kept(self, name: str, container: Any) -> bool:
        """Complete the listed ``container`` with what was kept of its inspect, if that
        is of this very container in the status Docker lists it in now."""
        known = self._kept.get(name)
        if not self._following or known is None or known[0] != container.id:
            return False
        _id, since, kept = known
        listed = container.attrs["State"]["Status"]
        if kept["State"].get("Status") != listed or time.monotonic() - since > KEPT_FOR:
            return False
        container.attrs = _completed(container.attrs, kept)
        return True

    async def _adopt(self, container: Any, now: float) -> Metadata | None:
        """Make a container ds01 has no record of first-class: its record (owner, type,
        image, workspace); its GPUs follow in the sweep (``_adopt_gpus``)."""
        container = await self.lifecycle.docker.find(container.id)
        if container is None:
            return None  # listed, then removed (an undo, a remove): nothing to adopt
        seen = Seen.of(container.attrs)
        if not seen.user:
            return None
        if not is_user_name(seen.user):
            if container.id not in self.unadoptable:  # said once, not every sweep
                self.unadoptable.add(container.id)
                log.warning("%s is not adopted: its owner %r is no user name", seen.name, seen.user)
            return None
        record = Metadata(
            docker_name=seen.name,
            name=seen.labels.get("ds01.name")
            or seen.labels.get("aime.mlc.NAME")
            or seen.name.split("._.", 1)[0],
            user=seen.user,
            image=seen.image,
            container_id=container.id,
            node=self.lifecycle.node,
            created_at=now,
            workspace=_workspace_of(container),
            container_type=seen.container_type,
            adopted=True,
        )
        if not await self.lifecycle.metadata.put_new(record):
            return None  # a create or a record has the name by now: not an orphan
        log.warning("adopted %s of %s, which ds01 had no record of", container.name, record.user)
        await self.lifecycle.events.publish(Kind.ADOPTED, record, seen.container_type)
        return record

    async def _adopt_gpus(
        self, container: Any, record: Metadata, allocations: list[Any] | None
    ) -> Metadata:
        """The GPUs an adopted container uses, allocated to it and recorded; a GPU that
        another container holds is never granted twice: the owner and the admin are
        told. Tried again at the next sweep while the allocator cannot answer."""
        if allocations is None:
            return record
        node = self.lifecycle.node
        found, unknown = gpu_plan(
            Seen.of(container.attrs), _slots(allocations, node), self.ds01_metadata
        )
        if unknown and record.docker_name not in self.unknown_gpus:
            log.warning(
                "%s uses GPUs ds01 cannot find on %s (%s): check it",
                record.docker_name,
                node,
                " ".join(unknown),
            )
        if unknown:
            self.unknown_gpus[record.docker_name] = unknown
        if not found:
            return record
        try:
            await self.lifecycle.client.allocate(
                record.docker_name, user=record.user, node=node, slot_ids=tuple(found)
            )
        except Ds01Error as err:
            if err.code not in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.INVALID_ARGUMENT):
                log.info("%s: its GPUs wait for the allocator: %s", record.docker_name, err.message)
                return record
            self.conflicts[record.docker_name] = err.message
            log.warning("%s: %s: %s", record.docker_name, GPU_CONFLICT, err.message)
            notice = f"{GPU_CONFLICT} ({err.message}): ask an admin"
            return (
                await self.lifecycle.metadata.modify(
                    record, lambda current: setattr(current, "notice", notice)
                )
                or record
            )
        slots = [f"{node}/{slot_id}" for slot_id in found]
        return (
            await self.lifecycle.metadata.modify(
                record, lambda current: setattr(current, "gpu_slots", slots)
            )
            or record
        )

    async def import_containers(self, dry_run: bool) -> list[Imported]:
        """The containers adopted from a DS01 or mlc host: what adopting those ds01 has
        no record of would give each (``dry_run``), or, after adopting them now, every
        adopted container with what it got."""
        allocations = await self._allocations()
        if allocations is None:
            raise ContainerError(Code.UNAVAILABLE, "the allocator cannot be asked: try again")
        node = self.lifecycle.node
        if dry_run:
            recorded = {m.docker_name for m in await self.lifecycle.metadata.all()}
            docker = self.lifecycle.docker
            inspected = [await docker.find(c.id) for c in await self._labelled()]
            waiting = [Seen.of(c.attrs) for c in inspected if c is not None]
            return plan_import(
                [c for c in waiting if c.name not in recorded and c.user],
                node,
                _slots(allocations, node),
                {a.slot.slot_id: a.container for a in allocations if a.container},
                self.ds01_metadata,
            )
        await self.sweep()
        return [
            Imported(
                record.docker_name,
                record.user,
                record.container_type,
                record.image,
                gpu_slots=list(record.gpu_slots),
                conflict=self.conflicts.get(record.docker_name, ""),
                unknown_gpus=self.unknown_gpus.get(record.docker_name, []),
                adopted=True,
            )
            for record in sorted(await self.lifecycle.metadata.all(), key=lambda r: r.created_at)
            if record.adopted
        ]

    async def _labelled(self) -> list[Any]:
        """Every container of ds01, DS01 or mlc, running or not, as Docker lists them
        (``_listed``): one request, where an inspect of each took thousands."""
        docker = self.lifecycle.docker
        found: dict[str, Any] = {}
        for label in ADOPTED_LABELS:
            listed = await docker.run(
                lambda label=label: docker.client.api.containers(all=True, filters={"label": label})
            )
            models = docker.client.containers
            found.update((s["Id"], models.prepare_model(_listed(s))) for s in listed)
        return list(found.values())

    async def _current(self, record: Metadata) -> Metadata | None:
        """The record as stored now, if it is still this very container's: a sweep's
        copy is as old as the sweep, and the name may have been removed or made anew."""
        current = await self.lifecycle.metadata.get(record.docker_name)
        return current if current and current.container_id == record.container_id else None

    async def _forget(self, record: Metadata) -> None:
        current = await self._current(record)
        if current is None:
            return  # its remove finished meanwhile, or the name was taken anew
        if record.gpu_slots:
            with contextlib.suppress(Ds01Error):
                await self.lifecycle._release(record.docker_name)
        await self.lifecycle.metadata.delete(current)
        await asyncio.to_thread(self.lifecycle.account_files.remove, record.docker_name)
        self.activity.pop(record.docker_name, None)
        log.warning("%s is gone from Docker: its record and GPUs are released", record.docker_name)
        await self.lifecycle.events.publish(Kind.REMOVED, record, "removed outside ds01")

    async def _allocations(self) -> list[Any] | None:
        """This node's allocations; None if the allocator could not be asked."""
        try:
            status = await self.lifecycle.client.gpu_status(node=self.lifecycle.node)
        except Ds01Error as err:
            log.warning("cannot read GPU allocations: %s", err.message)
            return None
        return list(status.allocations)

    async def _release_orphaned_allocations(
        self, allocations: list[Any] | None, known: set[str]
    ) -> dict[str, int] | None:
        """Release allocations whose container is gone; return the state of each
        container's allocation (None if the allocator could not be asked)."""
        if allocations is None:
            return None
        for allocation in allocations:
            if allocation.container and allocation.container not in known:
                with contextlib.suppress(Ds01Error):
                    await self.lifecycle.client.release(allocation.container)
                    log.warning(
                        "released %s/%s: its container %s no longer exists",
                        allocation.slot.node,
                        allocation.slot.slot_id,
                        allocation.container,
                    )
        return {a.container: a.state for a in allocations if a.container}

    async def _policy(self, user: str, container_type: str) -> Policy:
        try:
            limits = await self.lifecycle.limits.get_limits(user, container_type)
        except Ds01Error as err:  # a type the configuration does not list: the user's own
            if not container_type or err.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            limits = await self.lifecycle.limits.get_limits(user, "")

        def seconds(key: str) -> float | None:
            return (
                getattr(limits, key).ToTimedelta().total_seconds() if limits.HasField(key) else None
            )

        return policy_of(
            limits.policies,
            idle_timeout=seconds("idle_timeout"),
            max_runtime=seconds("max_runtime"),
            container_hold_after_stop=seconds("container_hold_after_stop"),
            created_container_timeout=seconds("created_container_timeout"),
        )

    async def _apply(
        self, container: Any, record: Metadata, policy: Policy, now: float, kept: bool = False
    ) -> None:
        """``container`` as Docker inspected it just now, or (``kept``) as the sweep kept
        it: then what it would do is decided again on a fresh inspect before it is done
        (a run whose events dockerd dropped must not end in a remove, say)."""
        state = container.attrs["State"]
        counted = await self.lifecycle.metadata.modify(  # each run, however it ended
            record, lambda current: count_runtime(current, state), as_read=True
        )
        if counted is None:
            return  # removed or made anew meanwhile: nothing of it to act on
        record = counted
        await self._match_gpu_hold(container.status, record)
        observed = Observed(
            state=container.status,
            created_at=record.created_at,
            started_at=docker_time(state.get("StartedAt")),
            finished_at=docker_time(state.get("FinishedAt")),
            # Only a container the admin made (never one whose image says so).
            protected=container.labels.get("ds01.protected") == "true"
            and not made_by_gateway(container.labels),
        )
        activity = (
            await self._sample(container, observed, policy, now)
            if container.status == "running"
            else None
        )
        idle_for = now - activity.idle_since if activity and activity.idle_since else 0.0
        if idle_for and await _kept_alive_soon(record.workspace, policy.keepalive_max, now):
            idle_for = 0.0
        action = decide(
            observed,
            policy,
            record.runtime_before,
            idle_for,
            activity.stop_at if activity else None,
            now,
            self.demand,
        )
        if action is None:
            return
        if kept:
            await self.lifecycle.docker.run(container.reload)
            return await self._apply(container, record, policy, now)
        if (current := await self._current(record)) is None:
            return  # removed, or made anew, since the sweep listed the records
        record = current
        who = f"{record.docker_name} ({record.user})"
        self.actions[action.value] += 1
        events = self.lifecycle.events
        try:
            if action is Action.WARN_IDLE and activity is not None:
                # At the idle timeout, but never before the next sweep: the owner has at
                # least a sweep's time to see the warning and act on it.
                activity.stop_at = max(
                    now + (policy.idle_timeout_at(self.demand) or 0) - idle_for,
                    now + self.interval,
                )
                notice = (
                    f"idle for {idle_for:.0f}s: stops at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(activity.stop_at))}"
                    " unless used"
                )
                await self.lifecycle.metadata.modify(  # watchers of etcd see it too
                    record, lambda current: setattr(current, "notice", notice)
                )
                log.warning("%s: %s", who, notice)
                await events.publish(Kind.IDLE_WARNING, record, notice)
            elif action in (Action.STOP_IDLE, Action.STOP_RUNTIME):
                log.warning("stopping %s: %s", who, action.value)
                stopping = Kind.IDLE_STOP if action is Action.STOP_IDLE else Kind.RUNTIME_EXCEEDED
                await events.publish(stopping, record)
                await self.lifecycle.stop(
                    record.user, True, record.docker_name, manual=False, exact=record
                )
                self.activity.pop(record.docker_name, None)
            else:
                log.warning("removing %s: %s", who, action.value)
                await self.lifecycle.remove(record.user, True, record.docker_name, exact=record)
        except ContainerError as err:
            log.warning("could not act on %s (%s): %s", who, action.value, err.message)

    async def _match_gpu_hold(self, status: str, record: Metadata) -> None:
        """A container that exited by itself gets its GPU hold; one started outside ds01
        (docker start) ends it, as ds01's own stop and start do."""
        allocation = self.gpu_states.get(record.docker_name)
        client = self.lifecycle.client
        stopped = status in ("exited", "dead") and allocation == common_pb2.SLOT_STATE_ALLOCATED
        started = status == "running" and allocation == common_pb2.SLOT_STATE_HELD
        if not (stopped or started) or await self._current(record) is None:
            return  # in step; or the name's allocation is another container's by now
        try:
            if stopped:
                await client.mark_stopped(record.docker_name)
            else:
                await client.clear_stopped(record.docker_name)
        except Ds01Error as err:
            if err.code != grpc.StatusCode.NOT_FOUND:
                raise
            log.debug("%s: its allocation went meanwhile (%s)", record.docker_name, err.message)

    async def _sample(
        self, container: Any, observed: Observed, policy: Policy, now: float
    ) -> _Activity:
        """CPU, network and GPU use since the last sweep, from Docker's stats and NVML,
        judged by the policy's thresholds; idle counts after ``idle_window`` idle
        samples in a row, and never within ``grace_period`` of the start. Samples are
        half a sweep interval apart at least: sweeps that Docker events bring closer
        together do not make a detection window shorter."""
        started = container.attrs["State"].get("StartedAt", "")
        last = self.activity.get(container.name)
        if last is not None and last.started == started and now - last.at < self.interval / 2:
            return last
        stats = await self.lifecycle.docker.run(
            lambda: container.stats(stream=False, one_shot=True)
        )
        cpu = stats.get("cpu_stats", {}).get("cpu_usage", {}).get("total_usage", 0) / 1e9
        net = sum(
            n.get("rx_bytes", 0) + n.get("tx_bytes", 0)
            for n in (stats.get("networks") or {}).values()
        )
        # Its GPUs as the allocator has them (a label may be its image's, and adopted
        # containers name theirs other ways).
        uuids = self.gpu_uuids.get(container.name, [])
        gpu_busy = await asyncio.to_thread(self.gpus.busy, uuids, policy.gpu_idle_percent)
        if last is not None and last.started != started:
            last = None  # a new run: usage from before it says nothing
        current = _Activity(cpu=cpu, net=net, at=now, started=started)
        in_grace = now - (observed.started_at or now) < policy.grace_period
        if last is not None and now > last.at and not in_grace:
            elapsed = now - last.at
            # network_idle_threshold is bytes per sweep interval, whatever the spacing.
            per_interval = (net - last.net) * self.interval / elapsed
            net_limit = policy.net_idle_bytes
            if net_limit is None:
                net_limit = IDLE_NET_BYTES_PER_SECOND * self.interval
            idle = (
                not gpu_busy
                and (cpu - last.cpu) / elapsed * 100 < policy.cpu_idle_percent
                and per_interval < net_limit
            )
            if idle:
                current.follow_idle(last, policy.idle_window)
        self.activity[container.name] = current
        return current
