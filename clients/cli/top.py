"""``ds01 top``: the GPU host at a glance (DS01's dashboard), kept current by the event
streams: slots and their holders, users, containers and who waits for a GPU."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table

from ds01.cli.common import Settings, as_json, call, enum_word, fail, output_option
from ds01.cli.gpu import slot_state
from ds01.client import Ds01Client
from ds01.v1 import allocator_pb2, common_pb2, containers_pb2

_COUNTS = ("gpu_equivalents", "slots", "containers", "running", "waiting")
SETTLE = 0.2  # seconds to gather a burst of events into one redraw
QUEUE_REFRESH = 5.0  # seconds: joining the queue sends no event, so it is read this often


@dataclass
class Overview:
    """One consistent look at the host, from the services that know each part."""

    status: allocator_pb2.GetStatusResponse
    containers: list[containers_pb2.Container]
    waiters: list[allocator_pb2.Waiter]
    everyone: bool  # an admin's view: every user's containers
    at: dt.datetime

    def users(self) -> list[dict[str, Any]]:
        """Per user: GPU-equivalents and slots held, containers (own view: only mine)."""
        rows: dict[str, dict[str, Any]] = defaultdict(lambda: dict.fromkeys(_COUNTS, 0))
        for allocation in self.status.allocations:
            if allocation.user:
                row = rows[allocation.user]
                row["gpu_equivalents"] = round(
                    row["gpu_equivalents"] + allocation.slot.gpu_equivalents, 4
                )
                row["slots"] += 1
        for container in self.containers:
            row = rows[container.user]
            row["containers"] += 1
            row["running"] += container.state == containers_pb2.CONTAINER_STATE_RUNNING
        for waiter in self.waiters:
            rows[waiter.user]["waiting"] += 1
        return [{"user": user, **row} for user, row in sorted(rows.items())]

    def as_json(self) -> dict[str, Any]:
        status = as_json(self.status)
        return {
            "time": self.at.isoformat(timespec="seconds"),
            "revision": status["revision"],
            "nodes": status["nodes"],
            "drains": status["drains"],
            "slots": status["allocations"],
            "users": self.users(),
            "containers": [as_json(c) for c in self.containers],
            "waiters": [as_json(w) for w in self.waiters],
        }


async def overview(client: Ds01Client, everyone: bool) -> Overview:
    status, containers, queue = await asyncio.gather(
        client.gpu_status(),
        client.list_containers(all_users=everyone),
        client.gpu_queue(),
    )
    now = dt.datetime.now().astimezone()
    return Overview(status, containers, list(queue.waiters), everyone, now)


async def _is_admin(client: Ds01Client) -> bool:
    kind = (await client.whoami()).kind
    return kind in (common_pb2.PRINCIPAL_KIND_ADMIN, common_pb2.PRINCIPAL_KIND_SERVICE)


def _since(stamp: Any, now: dt.datetime) -> str:
    """How long ago, in the largest unit that says it: 3m, 2h, 4d."""
    seconds = max(0, (now - stamp.ToDatetime(dt.UTC)).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


def render(view: Overview) -> Group:
    """The screen: slots, users, containers and the queue, one table each."""
    slots = Table("SLOT", "PROFILE", "STATE", "USER", "CONTAINER", "FOR", title="GPU slots",
                  title_justify="left")  # fmt: skip
    for a in view.status.allocations:
        since = _since(a.since, view.at) if a.HasField("since") else ""
        slots.add_row(f"{a.slot.node}/{a.slot.slot_id}", a.slot.mig_profile or "full GPU",
                      slot_state(a), a.user, a.container, since)  # fmt: skip
    users = Table("USER", "GPU-EQ", "SLOTS", "CONTAINERS", "RUNNING", "WAITING",
                  title="Users", title_justify="left")  # fmt: skip
    for row in view.users():
        users.add_row(row["user"], f"{row['gpu_equivalents']:g}", str(row["slots"]),
                      str(row["containers"]), str(row["running"]), str(row["waiting"]))  # fmt: skip
    containers = Table("CONTAINER", "USER", "STATE", "GPUS", "UP", "NOTICE",
                       title="Containers" if view.everyone else "Your containers",
                       title_justify="left")  # fmt: skip
    cstate = containers_pb2.ContainerState.DESCRIPTOR
    for c in view.containers:
        up = _since(c.started_at, view.at) if c.HasField("started_at") else ""
        gpus = " ".join(f"{g.slot.node}/{g.slot.slot_id}" for g in c.gpus) or "-"
        containers.add_row(c.docker_name if view.everyone else c.name, c.user,
                           enum_word(cstate, c.state), gpus, up, c.notice)  # fmt: skip
    queue = Table("#", "USER", "CONTAINER", "WANTS", "WAITING", title="Queue",
                  title_justify="left")  # fmt: skip
    kind = allocator_pb2.SlotPreference.DESCRIPTOR
    for w in view.waiters:
        queue.add_row(str(w.position), w.user, w.container or "-",
                      f"{w.slots} {enum_word(kind, w.preference)}",
                      _since(w.since, view.at))  # fmt: skip
    header = f"ds01 top, {view.at:%H:%M:%S} (etcd revision {view.status.revision}); Ctrl-C ends"
    drains = [f"drained: {d.node}" + (f"/{d.gpu}" if d.HasField("gpu") else "")
              + (f" ({d.reason})" if d.reason else "") for d in view.status.drains]  # fmt: skip
    return Group(header, *drains, slots, users, containers, queue)


async def _changes(client: Ds01Client) -> AsyncIterator[None]:
    """One item per burst of allocation or container events, and one every
    QUEUE_REFRESH seconds (a request joining the queue sends none)."""
    changed = asyncio.Event()

    async def follow(stream: AsyncIterator[Any]) -> None:
        async for _event in stream:
            changed.set()

    streams = [client.watch_allocations(), client.watch_container_events()]
    pumps = [asyncio.ensure_future(follow(s)) for s in streams]
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), QUEUE_REFRESH)
            for pump in pumps:
                if pump.done():
                    pump.result()  # a stream that failed says why
                    fail("an event stream ended: the services restarted; run ds01 top again")
            await asyncio.sleep(SETTLE)
            changed.clear()
            yield None
    finally:
        for pump in pumps:
            pump.cancel()


@click.command()
@output_option
@click.pass_obj
def top(settings: Settings, output: str | None) -> None:
    """A live overview of this host: GPU slots and their holders, users, containers
    (admins: everyone's) and the GPU queue, redrawn when something changes.

    \b
    Examples:
      ds01 top
      ds01 top -o json    # one snapshot, for scripts
    """

    async def snapshot(client: Ds01Client) -> None:
        view = await overview(client, await _is_admin(client))
        click.echo(json.dumps(view.as_json(), indent=2))

    async def live(client: Ds01Client) -> None:
        everyone = await _is_admin(client)
        with Live(render(await overview(client, everyone)), auto_refresh=False) as screen:
            async for _ in _changes(client):
                screen.update(render(await overview(client, everyone)), refresh=True)

    if (output or settings.output) == "json":
        call(settings, snapshot)
        return
    with contextlib.suppress(KeyboardInterrupt):
        call(settings, live)
