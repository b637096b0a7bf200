"""``ds01 container``: the seed's container-create, -run, -start, -stop and -remove."""

from __future__ import annotations

import datetime as dt
import json
import os

import click
from google.protobuf import json_format

from ds01.cli.common import Settings, call, output_option, print_table
from ds01.v1 import containers_pb2

_STATE = {
    value.number: value.name.removeprefix("CONTAINER_STATE_").lower()
    for value in containers_pb2.ContainerState.DESCRIPTOR.values
}


def _describe(container: containers_pb2.Container) -> str:
    gpus = " ".join(f"{g.slot.node}/{g.slot.slot_id}" for g in container.gpus) or "no GPU"
    return f"{container.docker_name}: {_STATE[container.state]}, {gpus}, image {container.image}"


def _print(settings: Settings, output: str | None, container: containers_pb2.Container) -> None:
    if (output or settings.output) == "json":
        click.echo(json_format.MessageToJson(container, preserving_proto_field_name=True))
    else:
        click.echo(_describe(container))


@click.group()
def container() -> None:
    """Your containers: create, run, start, stop, remove, list, inspect."""


def _create(start: bool):
    @click.argument("name")
    @click.option("--image", required=True, help="A local Docker image.")
    @click.option("--gpus", type=click.IntRange(min=0), default=0, help="GPU slots to allocate.")
    @click.option("--workspace", default="", help="Host directory for /workspace (in your home).")
    @click.option("--data", "data_dirs", multiple=True, help="Host directory for /data.")
    @click.option("--type", "container_type", default="", help="A configured container type.")
    @output_option
    @click.pass_obj
    def command(
        settings: Settings,
        name: str,
        image: str,
        gpus: int,
        workspace: str,
        data_dirs: tuple[str, ...],
        container_type: str,
        output: str | None,
    ) -> None:
        created = call(
            settings,
            lambda client: client.create_container(
                name,
                image,
                gpus,
                os.path.abspath(workspace) if workspace else "",
                tuple(os.path.abspath(d) for d in data_dirs),
                start,
                container_type,
            ),
        )
        _print(settings, output, created)

    return command


container.command("create", help="Create NAME with your limits and GPUs.")(_create(False))
container.command("run", help="Create NAME and start it.")(_create(True))


@container.command()
@click.argument("name")
@output_option
@click.pass_obj
def start(settings: Settings, name: str, output: str | None) -> None:
    """Start NAME again (its GPU must still be held for it)."""
    _print(settings, output, call(settings, lambda client: client.start_container(name)))


@container.command()
@click.argument("name")
@click.option("--grace", type=click.IntRange(min=0), default=0, help="Seconds before a kill.")
@output_option
@click.pass_obj
def stop(settings: Settings, name: str, grace: int, output: str | None) -> None:
    """Stop NAME; its GPU is held for your gpu_hold_after_stop."""
    _print(settings, output, call(settings, lambda client: client.stop_container(name, grace)))


@container.command()
@click.argument("name")
@click.pass_obj
def remove(settings: Settings, name: str) -> None:
    """Remove NAME and free its GPU at once."""
    call(settings, lambda client: client.remove_container(name))
    click.echo(f"removed {name}")


@container.command("list")
@click.option("--all", "all_users", is_flag=True, help="Everyone's (admins).")
@output_option
@click.pass_obj
def list_(settings: Settings, all_users: bool, output: str | None) -> None:
    """Your containers (admins: --all)."""
    found = call(settings, lambda client: client.list_containers(all_users=all_users))
    if (output or settings.output) == "json":
        rows = [json_format.MessageToDict(c, preserving_proto_field_name=True) for c in found]
        click.echo(json.dumps(rows, indent=2))
        return
    print_table(
        ["NAME", "USER", "STATE", "GPUS", "IMAGE", "CREATED", "NODE", "NOTICE"],
        [
            [
                c.name,
                c.user,
                _STATE[c.state],
                " ".join(g.slot.slot_id for g in c.gpus),
                c.image,
                c.created_at.ToDatetime(dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M"),
                c.node,
                c.notice,
            ]
            for c in found
        ],
    )


@container.command()
@click.argument("name")
@click.pass_obj
def inspect(settings: Settings, name: str) -> None:
    """Everything ds01 knows of NAME, as JSON."""
    found = call(settings, lambda client: client.get_container(name))
    click.echo(json_format.MessageToJson(found, preserving_proto_field_name=True))
