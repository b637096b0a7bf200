"""The lifecycle reconciler: observe Docker, compare with ds01's records and policies, act.

Runs a sweep at a fixed interval and right after any Docker container event (so a
dockerd restart is noticed at once). Each sweep is idempotent:
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
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import docker.errors
import grpc

from ds01.client import Ds01Error
from ds01.containers.adapters import Metadata
from ds01.containers.gpu_activity import NvmlActivity
from ds01.containers.lifecycle import ContainerError, Lifecycle, count_runtime, docker_time
from ds01.v1 import common_pb2

log = logging.getLogger(__name__)

IDLE_CPU_FRACTION = 0.02  # under 2% of one core
IDLE_NET_BYTES_PER_SECOND = 1024
WARN_FRACTION = 0.8  # warn once 80% of the idle timeout has passed


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


def decide(
    observed: Observed,
    policy: Policy,
    runtime_before: float,
    idle_for: float,
    stop_at: float | None,
    now: float,
) -> Action | None:
    """What the lifecycle policies ask for now, if anything (pure). ``stop_at`` is the
    idle stop the owner was warned of (None: no warning yet): an idle container is
    never stopped without one, given at an earlier sweep."""
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
    if policy.idle_timeout is not None and not policy.exempt_from_idle:
        if stop_at is None and idle_for > policy.idle_timeout * WARN_FRACTION:
            return Action.WARN_IDLE
        if stop_at is not None and now >= stop_at and idle_for > policy.idle_timeout:
            return Action.STOP_IDLE
    return None


@dataclass
class _Activity:
    """The last usage sample of a container, and since when it has been idle."""

    cpu: float
    net: float
    at: float
    started: str  # Docker's StartedAt of the run sampled
    idle_since: float | None = None
    stop_at: float | None = None  # the idle stop its owner was warned of


@dataclass
class Reconciler:
    lifecycle: Lifecycle
    interval: float = 30.0
    gpus: NvmlActivity = field(default_factory=NvmlActivity)
    activity: dict[str, _Activity] = field(default_factory=dict)
    sweeps: int = 0
    unallocated: set[str] = field(default_factory=set)  # carry GPUs, hold no allocation
    gpu_states: dict[str, int] = field(default_factory=dict)  # container -> SlotState
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Containers that started or died: their runs are counted at once, not at a sweep.
    _runs: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._follow_docker_events, args=(loop,), daemon=True).start()
        accounting = asyncio.ensure_future(self._count_runs())
        try:
            while True:
                try:
                    await self.sweep()
                except Exception:  # a failed sweep is retried; the loop never dies
                    log.exception("reconcile sweep failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
                self._wake.clear()
        finally:
            accounting.cancel()

    def _follow_docker_events(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake the sweep on every container event; reconnect when dockerd restarts."""
        while True:
            try:
                events = self.lifecycle.docker.client.events(
                    decode=True, filters={"type": "container"}
                )
                loop.call_soon_threadsafe(self._wake.set)  # (re)connected: look again
                for event in events:
                    loop.call_soon_threadsafe(self._on_event, event)
            except Exception as err:
                log.info("Docker event stream interrupted (%s); reconnecting", err)
            if loop.is_closed():
                return
            time.sleep(1)

    def _on_event(self, event: dict[str, Any]) -> None:
        self._wake.set()
        if event.get("Action") in ("start", "die"):
            name = event.get("Actor", {}).get("Attributes", {}).get("name")
            if name:
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
        await lifecycle.metadata.modify(record, lambda current: count_runtime(current, state))

    async def sweep(self, now: float | None = None) -> None:
        lifecycle = self.lifecycle
        now = time.time() if now is None else now
        # The order of these reads is what makes the sweep safe without any settle time:
        # a create writes its intent before its allocation and its container, and
        # replaces the intent with its record in one step. So an allocation or a
        # container seen here belongs to an intent or a record read after it, and a
        # record read before the container list has its container in that list.
        allocations = await self._allocations()
        recorded = {m.docker_name: m.container_id for m in await lifecycle.metadata.all()}
        containers = {
            c.name: c
            for c in await lifecycle.docker.run(
                lambda: lifecycle.docker.client.containers.list(
                    all=True, filters={"label": "ds01.managed=true"}, ignore_removed=True
                )
            )
        }
        listed = {c.id for c in containers.values()}
        creating = {intent.docker_name for intent in await lifecycle.intents.all()}
        records = {m.docker_name: m for m in await lifecycle.metadata.all()}
        # A start, stop or remove under way: never adopted or forgotten meanwhile, but its
        # policies still apply (else calling start again and again would dodge them).
        busy = set(lifecycle.busy)
        known = set(recorded) | set(containers) | creating | busy | set(records)  # GPUs
        for name, container in list(containers.items()):
            record = records.get(name)
            if name in creating or recorded.get(name) != (record and record.container_id):
                del containers[name]  # in flux: being created or undone, removed, made anew
            elif record is None and name not in busy:
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
        held = await self._release_orphaned_allocations(allocations, known)
        unallocated = {
            name
            for name, container in containers.items()
            if container.labels.get("ds01.gpu.uuids") and held is not None and name not in held
        }
        for name in sorted(unallocated - self.unallocated):  # once, not every sweep
            log.warning("%s carries GPUs but holds no allocation: check it", name)
        self.unallocated = unallocated
        self.gpu_states = held or {}
        policies: dict[tuple[str, str], Policy] = {}
        for name, container in containers.items():
            record = records[name]
            try:  # one broken container must not keep the policies from the others
                key = (record.user, record.container_type)
                if key not in policies:
                    policies[key] = await self._policy(*key)
                await self._apply(container, record, policies[key], now)
            except (docker.errors.NotFound, ValueError):  # removed while being reconciled
                log.debug("%s changed while being reconciled", name)
            except Exception as err:
                log.warning("cannot reconcile %s: %s", name, err)
        self.sweeps += 1

    async def _adopt(self, container: Any, now: float) -> Metadata | None:
        if await self.lifecycle.docker.find(container.id) is None:
            return None  # listed, then removed (an undo, a remove): nothing to adopt
        labels = container.labels
        name = labels.get("ds01.name") or container.name.split("._.", 1)[0]
        record = Metadata(
            docker_name=container.name,
            name=name,
            user=labels.get("ds01.user", ""),
            image=labels.get("aime.mlc.FRAMEWORK", ""),
            container_id=container.id,
            node=self.lifecycle.node,
            created_at=now,
            gpu_slots=labels.get("ds01.gpu.slots", "").split(),
            workspace=labels.get("aime.mlc.WORK_MOUNT", ""),
            container_type=labels.get("ds01.type", ""),
        )
        if not await self.lifecycle.metadata.put_new(record):
            return None  # a create or a record has the name by now: not an orphan
        log.warning("adopted %s of %s, which ds01 had no record of", container.name, record.user)
        return record

    async def _forget(self, record: Metadata) -> None:
        current = await self.lifecycle.metadata.get(record.docker_name)
        if current is None or current.container_id != record.container_id:
            return  # its remove finished meanwhile, or the name was taken anew
        if record.gpu_slots:
            with contextlib.suppress(Ds01Error):
                await self.lifecycle._release(record.docker_name)
        await self.lifecycle.metadata.delete(record.docker_name)
        self.activity.pop(record.docker_name, None)
        log.warning("%s is gone from Docker: its record and GPUs are released", record.docker_name)

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
        limits = await self.lifecycle.client.get_limits(user, container_type)

        def seconds(key: str) -> float | None:
            return (
                getattr(limits, key).ToTimedelta().total_seconds() if limits.HasField(key) else None
            )

        return Policy(
            idle_timeout=seconds("idle_timeout"),
            max_runtime=seconds("max_runtime"),
            container_hold_after_stop=seconds("container_hold_after_stop"),
            created_container_timeout=seconds("created_container_timeout"),
            exempt_from_idle=limits.policies.get("exempt_from_idle", "") == "true",
        )

    async def _apply(self, container: Any, record: Metadata, policy: Policy, now: float) -> None:
        docker = self.lifecycle.docker
        await docker.run(container.reload)
        state = container.attrs["State"]
        counted = await self.lifecycle.metadata.modify(  # each run, however it ended
            record, lambda current: count_runtime(current, state)
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
            protected=container.labels.get("ds01.protected") == "true",
        )
        activity = (
            await self._sample(container, state.get("StartedAt", ""), now)
            if container.status == "running"
            else None
        )
        idle_for = now - activity.idle_since if activity and activity.idle_since else 0.0
        action = decide(
            observed,
            policy,
            record.runtime_before,
            idle_for,
            activity.stop_at if activity else None,
            now,
        )
        if action is None:
            return
        who = f"{record.docker_name} ({record.user})"
        try:
            if action is Action.WARN_IDLE and activity is not None:
                # At the idle timeout, but never before the next sweep: the owner has at
                # least a sweep's time to see the warning and act on it.
                activity.stop_at = max(
                    now + (policy.idle_timeout or 0) - idle_for, now + self.interval
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
            elif action in (Action.STOP_IDLE, Action.STOP_RUNTIME):
                log.warning("stopping %s: %s", who, action.value)
                await self.lifecycle.stop(record.user, True, record.docker_name)
                self.activity.pop(record.docker_name, None)
            else:
                log.warning("removing %s: %s", who, action.value)
                await self.lifecycle.remove(record.user, True, record.docker_name)
        except ContainerError as err:
            log.warning("could not act on %s (%s): %s", who, action.value, err.message)

    async def _match_gpu_hold(self, status: str, record: Metadata) -> None:
        """A container that exited by itself gets its GPU hold; one started outside ds01
        (docker start) ends it, as ds01's own stop and start do."""
        allocation = self.gpu_states.get(record.docker_name)
        client = self.lifecycle.client
        try:
            if status in ("exited", "dead") and allocation == common_pb2.SLOT_STATE_ALLOCATED:
                await client.mark_stopped(record.docker_name)
            elif status == "running" and allocation == common_pb2.SLOT_STATE_HELD:
                await client.clear_stopped(record.docker_name)
        except Ds01Error as err:
            if err.code != grpc.StatusCode.NOT_FOUND:
                raise
            log.debug("%s: its allocation went meanwhile (%s)", record.docker_name, err.message)

    async def _sample(self, container: Any, started: str, now: float) -> _Activity:
        """CPU and network use since the last sweep, from Docker's stats."""
        stats = await self.lifecycle.docker.run(
            lambda: container.stats(stream=False, one_shot=True)
        )
        cpu = stats.get("cpu_stats", {}).get("cpu_usage", {}).get("total_usage", 0) / 1e9
        net = sum(
            n.get("rx_bytes", 0) + n.get("tx_bytes", 0)
            for n in (stats.get("networks") or {}).values()
        )
        uuids = container.labels.get("ds01.gpu.uuids", "").split()
        gpu_busy = await asyncio.to_thread(self.gpus.busy, uuids)
        last = self.activity.get(container.name)
        if last is not None and last.started != started:
            last = None  # a new run: usage from before it says nothing
        current = _Activity(cpu=cpu, net=net, at=now, started=started)
        if last is not None and now > last.at:
            elapsed = now - last.at
            idle = (
                not gpu_busy
                and (cpu - last.cpu) / elapsed < IDLE_CPU_FRACTION
                and (net - last.net) / elapsed < IDLE_NET_BYTES_PER_SECOND
            )
            if idle:
                current.idle_since = last.idle_since or last.at
                current.stop_at = last.stop_at
        self.activity[container.name] = current
        return current
