"""``ds01 events``: allocation and container lifecycle events, in one order, with times.

Both kinds are etcd revisions of one cluster, so sorting by revision is the order in
which they happened. Without ``--follow`` the command prints what etcd keeps (or what
came after ``--since REV``) and ends after a quiet second.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

import click
import grpc

from ds01.cli.common import Settings, call, output_option
from ds01.client import Ds01Client, Ds01Error
from ds01.v1 import allocator_pb2, containers_pb2

ALLOCATION_TYPES = {
    v.number: v.name.removeprefix("ALLOCATION_EVENT_TYPE_").lower()
    for v in allocator_pb2.AllocationEventType.DESCRIPTOR.values
    if v.number
}
CONTAINER_TYPES = {
    v.number: v.name.removeprefix("CONTAINER_EVENT_TYPE_").lower()
    for v in containers_pb2.ContainerEventType.DESCRIPTOR.values
    if v.number
}
QUIET = 1.0  # seconds without an event that end a replay (without --follow)
RESUME_EVERY = 2.0  # seconds between tries to follow a stream again that its service ended
OLDEST = 1  # "--since 0" and no --since: from the oldest revision etcd still keeps


@dataclass(frozen=True)
class Event:
    """One line of ``ds01 events``, whichever stream it came from."""

    source: str  # allocation or container
    type: str
    time: str  # RFC 3339, local zone
    revision: int
    user: str
    container: str
    node: str
    slot: str
    detail: str

    def line(self) -> str:
        moment = self.time[:19].replace("T", " ")
        where = f"{self.node}/{self.slot}" if self.slot else self.node
        return (
            f"{moment}  {self.revision:>8}  {self.type:<16} {self.user:<12} "
            f"{self.container:<28} {where:<14} {self.detail}"
        ).rstrip()


HEADER = f"{'TIME':<19}  {'REVISION':>8}  {'EVENT':<16} {'USER':<12} {'CONTAINER':<28} " + (
    f"{'WHERE':<14} DETAIL"
)


def _time(message: Any) -> str:
    if not message.seconds and not message.nanos:
        return ""
    return message.ToDatetime(tzinfo=dt.UTC).astimezone().isoformat(timespec="seconds")


def allocation_event(event: allocator_pb2.WatchAllocationsResponse) -> Event:
    a = event.allocation
    details = []
    if event.HasField("previous"):
        details.append(f"displaced {event.previous.container} of {event.previous.user}")
    if event.released_by:
        details.append(f"by {event.released_by}")
    return Event(
        source="allocation",
        type=ALLOCATION_TYPES.get(event.type, "unknown"),
        time=_time(event.time),
        revision=event.revision,
        user=a.user,
        container=a.container,
        node=a.slot.node,
        slot=a.slot.slot_id,
        detail="; ".join(details),
    )


def container_event(event: containers_pb2.WatchContainerEventsResponse) -> Event:
    return Event(
        source="container",
        type=CONTAINER_TYPES.get(event.type, "unknown"),
        time=_time(event.time),
        revision=event.revision,
        user=event.user,
        container=event.docker_name or event.name,
        node=event.node,
        slot="",
        detail=event.detail,
    )


async def _pump(
    open_stream: Callable[[int], AsyncIterator[Any]],
    since: int,
    convert: Callable[[Any], Event],
    queue: asyncio.Queue[Event | Exception],
    follow: bool,
) -> None:
    """Every event of one stream into ``queue``, and the error that ends it. Following, a
    stream that ends UNAVAILABLE (its service, or the service's etcd, went away) is
    opened again every RESUME_EVERY seconds until it is back, and one its service ended
    because it fell behind at once; either from just before the last revision it gave:
    one transaction's events share a revision, and a stream cut between them would
    otherwise lose the rest. Those of it already given are skipped, so nothing comes
    twice and nothing is missed; the error is put once per outage, for a warning."""
    told, given = False, set[Event]()  # given: the events of revision ``since`` put
    while True:
        try:
            # (Not from revision 1, which asks for the oldest history etcd keeps.)
            back = since - 1 if given and since > 2 else since
            async for message in open_stream(back):
                event = convert(message)
                if event.revision == since and event in given:  # put before the cut
                    continue
                if event.revision != since:
                    given.clear()
                given.add(event)
                since, told = event.revision, False
                await queue.put(event)
            return
        except Ds01Error as err:
            if not told:
                await queue.put(err)
                told = True
            if not follow:
                return
            if err.resume_after is not None:  # it fell behind: on at once, from here
                since = since or err.resume_after  # (the service's word if none came yet)
                continue
            if err.code != grpc.StatusCode.UNAVAILABLE:
                return
        await asyncio.sleep(RESUME_EVERY)


def _container_events(client: Ds01Client, user: str, since: int) -> AsyncIterator[Any]:
    return client.watch_container_events(since, user)


@click.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they happen.")
@click.option(
    "--since",
    type=click.IntRange(min=0),
    default=None,
    help="Only events after this etcd revision (each line shows its own); 0: everything "
    "etcd keeps, as without --since (with --follow alone: from now on).",
)
@click.option(
    "--type",
    "types",
    multiple=True,
    type=click.Choice(sorted({*ALLOCATION_TYPES.values(), *CONTAINER_TYPES.values()})),
    help="Only events of this type (repeatable).",
)
@click.option("--user", default="", help="Only this user's events (admins; users see their own).")
@output_option
@click.pass_obj
def events(
    settings: Settings,
    follow: bool,
    since: int | None,
    types: tuple[str, ...],
    user: str,
    output: str | None,
) -> None:
    """GPU allocation and container lifecycle events, oldest first, with their times.

    \b
    Examples:
      ds01 events
      ds01 events --follow --type allocated --type released
      ds01 events --since 1234 -o json
    """
    as_json = (output or settings.output) == "json"
    # --follow alone: what happens from now on (as docker events); otherwise the history.
    revision = 0 if since is None and follow else since or OLDEST
    wanted = set(types)

    async def stream(client: Ds01Client) -> None:
        start = revision
        if not start:
            # "Now" as a revision: a stream opened again before it printed anything goes
            # on from here, not from its return (what happened meanwhile would be lost).
            with contextlib.suppress(Ds01Error):
                me = (await client.whoami("allocator")).name  # one user: cheap on any fleet
                start = (await client.gpu_status(user=me)).revision
        queue: asyncio.Queue[Event | Exception] = asyncio.Queue()
        pumps = []
        if not wanted or wanted & set(ALLOCATION_TYPES.values()):
            allocations = client.watch_allocations
            pumps.append(
                asyncio.create_task(_pump(allocations, start, allocation_event, queue, follow))
            )
        if not wanted or wanted & set(CONTAINER_TYPES.values()):
            lifecycle = functools.partial(_container_events, client, user)
            pumps.append(
                asyncio.create_task(_pump(lifecycle, start, container_event, queue, follow))
            )
        history: list[Event] = []
        if not as_json:
            click.echo(HEADER)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), None if follow else QUIET)
                except TimeoutError:
                    break
                if isinstance(item, Ds01Error) and item.resume_after is not None and follow:
                    click.echo(
                        "ds01: warning: events came faster than they were printed and the "
                        "service ended the stream; following on from the last one printed",
                        err=True,
                    )
                    continue
                if isinstance(item, Ds01Error) and item.code == grpc.StatusCode.UNAVAILABLE:
                    # One service away: the other's events still come, with a word.
                    back = "; following on once it is back" if follow else ""
                    click.echo(f"ds01: warning: {item.message}{back}", err=True)
                    continue
                if isinstance(item, Exception):
                    raise item
                if (wanted and item.type not in wanted) or (user and item.user != user):
                    continue
                if follow:
                    click.echo(json.dumps(asdict(item)) if as_json else item.line())
                else:
                    history.append(item)
        finally:
            for pump in pumps:
                pump.cancel()
        for item in sorted(history, key=lambda e: e.revision):
            click.echo(json.dumps(asdict(item)) if as_json else item.line())

    with contextlib.suppress(KeyboardInterrupt):
        call(settings, stream)
