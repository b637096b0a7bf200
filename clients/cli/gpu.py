"""``ds01 gpu`` and ``ds01 events``: who holds which GPU, and what happens to them."""

from __future__ import annotations

import datetime as dt
import json
import sys

import click
from google.protobuf.message import Message

from ds01.cli.common import Settings, as_json, call, enum_word, output_option, print_table
from ds01.v1 import allocator_pb2, common_pb2


def slot_state(allocation: common_pb2.Allocation) -> str:
    """The slot's state as the JSON spells it (``node_down``), and whether drained."""
    word = enum_word(common_pb2.SlotState.DESCRIPTOR, allocation.state)
    return word + (", drained" if allocation.drained else "")


def _when(message: Message, field: str) -> str:
    if not message.HasField(field):
        return ""
    stamp = getattr(message, field).ToDatetime(dt.UTC).astimezone()
    return stamp.strftime("%Y-%m-%d %H:%M:%S")


def drain_line(drain: allocator_pb2.Drain) -> str:
    """``node a GPU 0: drained by root since ...: reason``, as status and admin say it."""
    target = f"node {drain.node}" + (f" GPU {drain.gpu}" if drain.HasField("gpu") else "")
    why = f": {drain.reason}" if drain.reason else ""
    return f"{target}: drained by {drain.by} since {_when(drain, 'since')}{why}"


def _json(message: Message) -> str:
    return json.dumps(as_json(message), indent=2)


@click.group()
def gpu() -> None:
    """GPU and MIG slots: status and the queue for everyone; allocation commands for admins
    and services.

    \b
    Examples:
      ds01 gpu status
      ds01 gpu queue
    """


@gpu.command()
@click.option("--user", default="", help="Only slots this user holds.")
@click.option("--node", default="", help="Only this node's slots.")
@output_option
@click.pass_obj
def status(settings: Settings, user: str, node: str, output: str | None) -> None:
    """Every slot: profile, state, user, container, since; and what admins drained.

    \b
    Examples:
      ds01 gpu status
      ds01 gpu status --user alice -o json
    """
    response = call(settings, lambda client: client.gpu_status(user, node))
    if (output or settings.output) == "json":
        click.echo(_json(response))
        return
    for n in response.nodes:
        source = "simulated (declared inventory)" if n.simulated else n.inventory_source
        click.echo(f"node {n.node}: {'up' if n.up else 'DOWN'}, {source or 'unknown source'}")
    for drain in response.drains:
        click.echo(drain_line(drain))
    rows = []
    for a in response.allocations:
        profile = a.slot.mig_profile or f"full GPU ({a.slot.product})"
        held = a.state == common_pb2.SLOT_STATE_HELD
        hold = _when(a, "hold_until") or ("until cleared" if held else "")
        state = slot_state(a)
        since = _when(a, "since")
        rows.append([a.slot.node, a.slot.slot_id, profile, state, a.user, a.container, since, hold])
    headers = ["NODE", "SLOT", "PROFILE", "STATE", "USER", "CONTAINER", "SINCE", "HELD UNTIL"]
    print_table(headers, rows)


@gpu.command()
@output_option
@click.pass_obj
def queue(settings: Settings, output: str | None) -> None:
    """Who waits for a GPU, in the order they will be served: by priority, then arrival.
    Other users' container names are not shown.

    \b
    Examples:
      ds01 gpu queue
      ds01 gpu queue -o json
    """
    waiters = call(settings, lambda client: client.gpu_queue()).waiters
    if (output or settings.output) == "json":
        click.echo(json.dumps([as_json(w) for w in waiters], indent=2))
        return
    if not waiters:
        click.echo("nobody is waiting for a GPU")
        return
    kind = allocator_pb2.SlotPreference.DESCRIPTOR
    rows = [
        [
            str(w.position),
            w.user,
            w.container or "-",
            f"{w.slots} {enum_word(kind, w.preference)}",
            str(w.priority),
            w.node or "any",
            _when(w, "since"),
            _when(w, "wait_until"),
        ]
        for w in waiters
    ]
    headers = ["#", "USER", "CONTAINER", "WANTS", "PRIORITY", "NODE", "SINCE", "UNTIL"]
    print_table(headers, rows)


@gpu.command()
@click.argument("container")
@click.option("--user", default="", help="The container's owner (default: you).")
@click.option("--slots", type=click.IntRange(min=0), default=0, help="How many slots.")
@click.option("--gpu-equivalents", type=click.FloatRange(min=0), default=0.0,
              help="How much GPU, in whole GPUs (a 1g.10gb slice of an A100 is 1/7).")  # fmt: skip
@click.option("--full", "kind", flag_value=allocator_pb2.SLOT_PREFERENCE_FULL_GPU,
              help="Whole GPUs only.")  # fmt: skip
@click.option("--mig", "kind", flag_value=allocator_pb2.SLOT_PREFERENCE_MIG,
              help="MIG slices only.")  # fmt: skip
@click.option("--node", default="", help="On this node (default: any).")
@click.option("--wait", type=click.FloatRange(min=0), default=None, help="Seconds to queue.")
@output_option
@click.pass_obj
def allocate(
    settings: Settings,
    container: str,
    user: str,
    slots: int,
    gpu_equivalents: float,
    kind: int | None,
    node: str,
    wait: float | None,
    output: str | None,
) -> None:
    """Claim GPU slots for CONTAINER (named NAME._.USER).

    \b
    Examples:
      ds01 gpu allocate proj._.alice --mig
      ds01 gpu allocate proj._.alice --user alice --slots 2 --full --wait 600
    """
    response = call(
        settings,
        lambda client: client.allocate(
            container, user, slots, gpu_equivalents, kind or 0, node, wait
        ),
    )
    if (output or settings.output) == "json":
        click.echo(_json(response))
        return
    for a in response.allocations:
        click.echo(f"{a.slot.node}/{a.slot.slot_id} {a.slot.uuid}")
    for key, value in sorted(response.environment.items()):
        click.echo(f"{key}={value}")


def _container_command(name: str, doc: str, run: str) -> None:
    @gpu.command(name=name, help=f"{doc}\n\n\b\nExample:\n  ds01 gpu {name} proj._.alice")
    @click.argument("container")
    @click.pass_obj
    def command(settings: Settings, container: str) -> None:
        result = call(settings, lambda client: getattr(client, run)(container))
        for item in result:
            if isinstance(item, str):
                click.echo(f"released {item}")
            else:
                until = _when(item, "hold_until") or "until cleared"
                state = slot_state(item)
                held = f" until {until}" if item.state == common_pb2.SLOT_STATE_HELD else ""
                click.echo(f"{item.slot.node}/{item.slot.slot_id} {state}{held}")


_container_command("release", "Free CONTAINER's slots at once.", "release")
_container_command(
    "mark-stopped", "Hold CONTAINER's slots for the owner's gpu_hold_after_stop.", "mark_stopped"
)
_container_command("clear-stopped", "End the hold: CONTAINER runs again.", "clear_stopped")


@gpu.command()
@click.argument("container")
@click.argument("slot")
@click.option("--node", default="", help="The node the slot is on (default: any).")
@click.pass_obj
def validate(settings: Settings, container: str, slot: str, node: str) -> None:
    """Whether SLOT still exists and is still CONTAINER's (exit 1 if not).

    \b
    Examples:
      ds01 gpu validate proj._.alice 2:1
    """
    result = call(settings, lambda client: client.validate(container, slot, node))
    if result.valid:
        click.echo(f"{slot} is {container}'s")
        return
    click.echo(result.reason)
    sys.exit(1)
