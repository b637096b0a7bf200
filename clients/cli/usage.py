"""``ds01 usage``: what I use now next to what I may use (DS01's check-limits)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import click

from ds01.cli.common import Settings, call, output_option
from ds01.client import Ds01Client
from ds01.v1 import common_pb2, containers_pb2, limits_pb2


def _limit(limits: limits_pb2.UserLimits, key: str) -> float | None:
    """A numeric limit; None when unlimited (or not numeric)."""
    for value in limits.values:
        if value.key == key and not value.unlimited:
            try:
                return float(value.value)
            except ValueError:
                return None
    return None


def held_by(allocations: Sequence[common_pb2.Allocation], user: str) -> list[Any]:
    """The slots ``user``'s containers hold, running or stopped."""
    return [a for a in allocations if a.user == user and a.container]


def equivalents(held: Sequence[common_pb2.Allocation]) -> float:
    return round(sum(a.slot.gpu_equivalents for a in held), 4)


def _until(stamp: Any) -> str:
    return stamp.ToDatetime(dt.UTC).astimezone().isoformat(timespec="seconds")


async def gather(client: Ds01Client, user: str) -> dict[str, Any]:
    """One user's usage, read from the three services that know it."""
    limits, status, containers = await asyncio.gather(
        client.get_limits(user),
        client.gpu_status(user=user),
        client.list_containers(user=user),
    )
    who = limits.user
    mine = held_by(status.allocations, who)
    holds = [a for a in mine if a.state == common_pb2.SLOT_STATE_HELD]
    running = [c for c in containers if c.state == containers_pb2.CONTAINER_STATE_RUNNING]
    return {
        "user": who,
        "group": limits.group,
        "priority": limits.priority,
        "gpu_equivalents": {
            "used": equivalents(mine),
            "limit": _limit(limits, "max_gpu_equivalents"),
        },
        "gpu_slots": [f"{a.slot.node}/{a.slot.slot_id}" for a in mine],
        "containers": {
            "count": len(containers),
            "running": len(running),
            "limit": _limit(limits, "max_containers_per_user"),
        },
        "holds": [
            {
                "container": a.container,
                "slot": f"{a.slot.node}/{a.slot.slot_id}",
                "until": _until(a.hold_until) if a.HasField("hold_until") else None,
            }
            for a in holds
        ],
        "notices": [{"container": c.name, "notice": c.notice} for c in containers if c.notice],
    }


def _of(used: float, limit: float | None) -> str:
    return f"{used:g} of {'unlimited' if limit is None else f'{limit:g}'}"


def render(usage: dict[str, Any]) -> list[str]:
    gpus, boxes = usage["gpu_equivalents"], usage["containers"]
    slots = usage["gpu_slots"]
    lines = [
        f"{usage['user']} (group {usage['group']}, priority {usage['priority']})",
        f"  GPU-equivalents  {_of(gpus['used'], gpus['limit'])}"
        + (f"  ({len(slots)} slot{'s' * (len(slots) != 1)}: {' '.join(slots)})" if slots else ""),
        f"  containers       {_of(boxes['count'], boxes['limit'])} ({boxes['running']} running)",
    ]
    for hold in usage["holds"]:
        until = hold["until"][:16].replace("T", " ") if hold["until"] else "until removed"
        lines.append(f"  held for stopped {hold['container']}: {hold['slot']} until {until}")
    for notice in usage["notices"]:
        lines.append(f"  notice           {notice['container']}: {notice['notice']}")
    return lines


@click.command()
@click.option("--user", default="", help="Another user's usage (admins).")
@output_option
@click.pass_obj
def usage(settings: Settings, user: str, output: str | None) -> None:
    """What you use now next to what you may use: GPU-equivalents, slots, containers,
    the GPUs held for your stopped containers and until when, and idle warnings.

    \b
    Examples:
      ds01 usage
      ds01 usage --user alice -o json
    """
    found = call(settings, lambda client: gather(client, user))
    if (output or settings.output) == "json":
        click.echo(json.dumps(found, indent=2))
    else:
        click.echo("\n".join(render(found)))
