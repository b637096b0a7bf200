"""Admin commands over everyone: who owns what, the emergency stop, the users."""

from __future__ import annotations

import asyncio
import json

import click

from ds01.cli.common import (
    Settings,
    as_json,
    call,
    confirmed,
    enum_word,
    fail,
    output_option,
    print_table,
)
from ds01.cli.gpu import drain_line
from ds01.cli.usage import equivalents, held_by
from ds01.client import Ds01Client, Ds01Error
from ds01.v1 import containers_pb2, ownership_pb2


@click.command()
@click.argument("container", required=False, default="")
@click.option("--user", default="", help="Only this user's containers.")
@output_option
@click.pass_obj
def owners(settings: Settings, container: str, user: str, output: str | None) -> None:
    """Who owns each container on this node (or CONTAINER), and by which label.

    \b
    Examples:
      ds01 admin owners
      ds01 admin owners --user alice
      ds01 admin owners thesis._.alice
    """

    async def work(client: Ds01Client) -> list[ownership_pb2.ContainerOwner]:
        if container:
            return [await client.get_owner(container)]
        return await client.list_owners(user)

    found = sorted(call(settings, work), key=lambda o: (o.owner, o.name))
    if (output or settings.output) == "json":
        click.echo(json.dumps([as_json(o) for o in found], indent=2))
        return
    source = ownership_pb2.OwnerSource.DESCRIPTOR
    print_table(
        ["CONTAINER", "OWNER", "BY", "DS01", "ID"],
        [
            [
                o.name,
                o.owner or "-",
                enum_word(source, o.source),
                "yes" if o.ds01_managed else "no",
                o.container_id[:12],
            ]
            for o in found
        ],
    )


@click.command("stop")
@click.option("--user", default="", help="Stop this user's running containers.")
@click.option("--all", "everyone", is_flag=True, help="Stop every running container.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask (for scripts).")
@click.option("--grace", type=click.IntRange(min=0), default=0, help="Seconds before a kill.")
@click.pass_obj
def stop_containers(settings: Settings, user: str, everyone: bool, yes: bool, grace: int) -> None:
    """Stop a user's running containers (or everyone's): DS01's emergency stop. Their GPUs
    are held for them as after any stop, and nothing is removed.

    \b
    Examples:
      ds01 admin stop --user alice
      ds01 admin stop --all --yes
    """
    if bool(user) == everyone:
        fail("say whose containers: --user USER, or --all")

    async def running(client: Ds01Client) -> list[containers_pb2.Container]:
        found = await client.list_containers(all_users=True)
        return [
            c
            for c in found
            if c.state == containers_pb2.CONTAINER_STATE_RUNNING
            and (everyone or c.user == user)
            and c.node == client.config.node
        ]

    targets = call(settings, running)
    if not targets:
        click.echo(f"no running containers of {user or 'anyone'} on this node")
        return
    names = ", ".join(c.docker_name for c in targets)
    if not yes:
        confirmed(
            f"Stop {len(targets)} container(s): {names}?",
            f"this would stop {len(targets)} container(s) ({names}): add --yes to do it",
            "nothing stopped",
        )

    async def stop_all(client: Ds01Client) -> list[str]:
        problems = []
        for target in targets:
            try:
                await client.stop_container(target.docker_name, grace)
                click.echo(f"stopped {target.docker_name} ({target.user})")
            except Ds01Error as err:
                problems.append(f"{target.docker_name}: {err.message}")
        return problems

    problems = call(settings, stop_all)
    if problems:
        fail("could not stop " + "; ".join(problems))


@click.command("users")
@output_option
@click.pass_obj
def users(settings: Settings, output: str | None) -> None:
    """Every user the groups list or who holds something: group, admin or not, and what
    each holds now (GPU-equivalents, containers).

    \b
    Example:
      ds01 admin users -o json
    """

    async def gather(client: Ds01Client) -> list[dict[str, object]]:
        groups, status, containers = await asyncio.gather(
            client.list_groups(),
            client.gpu_status(),
            client.list_containers(all_users=True),
        )
        named = {m for g in groups for m in g.members}
        names = sorted(named | {a.user for a in status.allocations if a.user}
                       | {c.user for c in containers})  # fmt: skip
        limits = await asyncio.gather(*(client.get_limits(name) for name in names))
        rows = []
        for name, found in zip(names, limits, strict=True):
            rows.append({
                "user": name,
                "group": found.group,
                "admin": found.admin,
                "gpu_equivalents": equivalents(held_by(status.allocations, name)),
                "containers": sum(1 for c in containers if c.user == name),
            })  # fmt: skip
        return rows

    rows = call(settings, gather)
    if (output or settings.output) == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    print_table(
        ["USER", "GROUP", "ADMIN", "GPU-EQUIVALENTS", "CONTAINERS"],
        [[str(r["user"]), str(r["group"]), "yes" if r["admin"] else "no",
          f"{r['gpu_equivalents']:g}", str(r["containers"])] for r in rows],
    )  # fmt: skip


def _target(text: str) -> tuple[str, int | None]:
    """``NODE`` or ``NODE/GPU`` as (node, GPU index or None)."""
    node, slash, gpu = text.partition("/")
    if not node or (slash and not gpu.isdigit()):
        fail(f"{text!r} is not NODE or NODE/GPU (a GPU index, as in `ds01 gpu status`)")
    return node, int(gpu) if slash else None


@click.command()
@click.argument("target", metavar="NODE[/GPU]")
@click.option("--reason", default="", help="Why, for the users it turns away.")
@output_option
@click.pass_obj
def drain(settings: Settings, target: str, reason: str, output: str | None) -> None:
    """No new GPU allocations on NODE, or on one GPU of it, from now on. What is
    allocated there stays, and is listed; `ds01 admin undrain` ends it.

    \b
    Examples:
      ds01 admin drain gpu01 --reason "driver update at 18:00"
      ds01 admin drain gpu01/3
    """
    node, gpu = _target(target)
    response = call(settings, lambda client: client.drain(node, gpu, reason))
    if (output or settings.output) == "json":
        click.echo(json.dumps(as_json(response), indent=2))
        return
    click.echo(drain_line(response.drain))
    if not response.allocations:
        click.echo("nothing is allocated there")
        return
    click.echo(f"{len(response.allocations)} slot(s) stay allocated until their containers end:")
    print_table(
        ["SLOT", "USER", "CONTAINER"],
        [[f"{a.slot.node}/{a.slot.slot_id}", a.user, a.container] for a in response.allocations],
    )


@click.command()
@click.argument("target", metavar="NODE[/GPU]")
@output_option
@click.pass_obj
def undrain(settings: Settings, target: str, output: str | None) -> None:
    """Allow new GPU allocations on NODE (or NODE/GPU) again.

    \b
    Examples:
      ds01 admin undrain gpu01
      ds01 admin undrain gpu01/3
    """
    node, gpu = _target(target)
    response = call(settings, lambda client: client.undrain(node, gpu))
    if (output or settings.output) == "json":
        click.echo(json.dumps(as_json(response), indent=2))
    elif response.HasField("drain"):
        click.echo(f"{target}: drain ended ({drain_line(response.drain)})")
    else:
        click.echo(f"{target} was not drained: nothing changed")
