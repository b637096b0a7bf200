"""``ds01 limits``: what may I (or, for admins, anyone) use, and is this file right?"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click
import docker
import requests
from docker.errors import DockerException

from ds01.cli.common import (
    DefaultCommandGroup,
    Settings,
    as_json,
    call,
    enum_word,
    fail,
    output_option,
    run,
)
from ds01.client import Ds01Client
from ds01.core.docker_args import DockerInfo
from ds01.v1 import common_pb2, limits_pb2

DOCKER_API = "1.41"  # any Docker since 20.10 answers /info in this version

# The seed's block, in the seed's order: (label, key).
SEED_BLOCK = (
    # The seed said "Max MIG Instances"; the quota is in GPU-equivalents (a full GPU is
    # 1, a 2g.20gb slice of a 7-slice GPU 0.29), and slots are counted per container.
    ("Max GPU-equivalents", "max_gpu_equivalents"),
    ("Max GPU Slots per Container", "max_gpu_slots_per_container"),
    ("Max CPUs", "max_cpus"),
    ("Memory", "memory"),
    ("Shared Memory", "shm_size"),
    ("Max Containers", "max_containers_per_user"),
    ("Idle Timeout", "idle_timeout"),
    ("GPU Hold After Stop", "gpu_hold_after_stop"),
    ("Container Hold After Stop", "container_hold_after_stop"),
    ("Max Runtime", "max_runtime"),
)


def render_block(limits: limits_pb2.UserLimits) -> str:
    """The block ``get_resource_limits.py USER`` printed."""
    values = {v.key: v for v in limits.values}
    lines = [f"User: {limits.user}", f"Group: {limits.group}", f"Priority: {limits.priority}"]
    for label, key in SEED_BLOCK:
        value = values[key]
        text = "unlimited" if value.unlimited else value.value
        if key == "shm_size" and limits.ipc_mode == "host":
            text = "host IPC (--ipc=host)"
        lines.append(f"{label}: {text}")
    return "\n".join(lines)


def _number_or_text(text: str) -> int | float | str:
    """A configured value as JSON: 16 a number, 64g or 72h the text it was written as."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def limits_json(limits: limits_pb2.UserLimits) -> dict[str, object]:
    return {
        "user": limits.user,
        "group": limits.group,
        "priority": limits.priority,
        "cgroup_parent": limits.cgroup_parent,
        "limits": {
            v.key: {
                "value": None if v.unlimited else _number_or_text(v.value),
                "unlimited": v.unlimited,
                "source": enum_word(limits_pb2.LimitSource.DESCRIPTOR, v.source),
            }
            for v in limits.values
        },
        "policies": dict(limits.policies),
        "aggregate": as_json(limits.aggregate),
    }


@click.group(cls=DefaultCommandGroup, default_command="show")
def limits() -> None:
    """What a user may use: `ds01 limits [USER]`, `ds01 limits check [FILE]`.

    \b
    Examples:
      ds01 limits
      ds01 limits --docker-args
      ds01 limits check /tmp/resource-limits.yaml
    """


@limits.command(hidden=True)
@click.argument("user", required=False, default="")
@click.option(
    "--docker-args",
    is_flag=True,
    help="Print the Docker create flags instead: what a container here gets.",
)
@click.option("--type", "container_type", default="", help="With a container type applied.")
@output_option
@click.pass_obj
def show(
    settings: Settings, user: str, docker_args: bool, container_type: str, output: str | None
) -> None:
    """Your limits, or USER's (admins).

    \b
    Examples:
      ds01 limits
      ds01 limits alice -o json
      ds01 limits --docker-args --type jupyter
    """
    wanted_json = (output or settings.output) == "json"
    if docker_args:
        here = _docker_info(settings)
        args = call(settings, lambda client: client.get_docker_args(user, container_type, here))
        if wanted_json:
            click.echo(json.dumps(as_json(args), indent=2))
        else:
            click.echo(args.flags)
        return
    resolved = call(settings, lambda client: client.get_limits(user, container_type))
    if wanted_json:
        click.echo(json.dumps(limits_json(resolved), indent=2))
    else:
        click.echo(render_block(resolved))


def _docker_info(settings: Settings) -> DockerInfo | None:
    """This host's Docker, asked through the gateway as the caller's docker is: its CPUs
    and cgroup driver decide what a container gets. None, said on stderr, when it does not
    answer: the flags are then the limits as configured."""
    socket = run(settings.config).ownership.proxy_socket
    try:
        api = docker.APIClient(base_url=f"unix://{socket}", version=DOCKER_API, timeout=10)
        with contextlib.closing(api):
            return DockerInfo.of(api.info())
    except (DockerException, requests.RequestException, OSError) as err:
        click.echo(
            f"ds01: note: the Docker gateway at {socket} did not answer ({err}); these are the "
            "limits as configured: a container gets no more CPUs than the host has and, "
            "where Docker uses cgroupfs, the cgroup parent /ds01/<group>/<user>",
            err=True,
        )
        return None


@limits.command()
@click.argument("file", required=False, type=click.Path(path_type=Path, dir_okay=False))
@output_option
@click.pass_obj
def check(settings: Settings, file: Path | None, output: str | None) -> None:
    """Check FILE before installing it, or (without FILE) the served configuration.

    FILE is checked together with the member and override files beside the served
    resource-limits.yaml, as it would be once installed. Exits 1 if it has problems.

    \b
    Examples:
      ds01 limits check
      ds01 limits check /tmp/resource-limits.yaml -o json
    """
    text = None
    if file is not None:
        try:
            text = file.read_text()
        except OSError as err:
            fail(f"{file}: cannot read: {err.strerror}")
    result = call(settings, lambda client: client.validate_config(text, str(file or "")))
    if (output or settings.output) == "json":
        click.echo(json.dumps(as_json(result), indent=2))
    else:
        for issue in result.issues:
            click.echo(_issue_line(issue))
        for note in result.notes:
            click.echo(f"note: {_issue_line(note)}")
        serving = result.serving_digest or "nothing"
        noted = f", {len(result.notes)} note(s)" if result.notes else ""
        if file is not None:
            verdict = f"OK{noted}" if result.valid else f"{len(result.issues)} problem(s)"
            click.echo(f"{file}: {verdict} (now serving {serving})")
        else:
            verdict = f"OK{noted}" if result.valid else "the files on disk are refused"
            click.echo(f"served configuration: {serving}; {verdict}")
    if not result.valid:
        sys.exit(1)


def _issue_line(issue: limits_pb2.ConfigIssue) -> str:
    where = f"{issue.file}:{issue.line}" if issue.line else issue.file
    key = f" {issue.key}:" if issue.key else ""
    return f"{where}:{key} {issue.message}"


@limits.command()
@output_option
@click.pass_obj
def groups(settings: Settings, output: str | None) -> None:
    """The configured groups (members are shown to admins).

    \b
    Examples:
      ds01 limits groups
    """
    found = call(settings, lambda client: client.list_groups())
    if (output or settings.output) == "json":
        click.echo(json.dumps([as_json(g) for g in found], indent=2))
        return
    for group in found:
        members = f": {', '.join(group.members)}" if group.members else ""
        click.echo(f"{group.name} (priority {group.priority}){members}")


@limits.command()
@click.argument("user", required=False, default="")
@click.pass_obj
def watch(settings: Settings, user: str) -> None:
    """Your limits now (or USER's), then a line and the new limits whenever a reload
    changes them; admins without USER: a line for every change. Ctrl-C ends.

    \b
    Example:
      ds01 limits watch
    """

    async def follow(client: Ds01Client) -> None:
        admin = (await client.whoami()).kind == common_pb2.PRINCIPAL_KIND_ADMIN
        one = bool(user) or not admin  # one user's limits, shown again at each change
        async for change in client.watch_limits(user):
            if not change.users and not change.default_users_changed:  # the greeting
                if one:
                    click.echo(render_block(await client.get_limits(user)))
                whose = "" if one else "every user's limits, "
                click.echo(f"(watching {whose}configuration {change.digest}; Ctrl-C ends)")
            else:
                users = ", ".join(change.users)
                if change.default_users_changed:
                    users = f"{users} and every unlisted user" if users else "every unlisted user"
                click.echo(f"{change.digest}: limits changed for {users}")
                if one:
                    click.echo(render_block(await client.get_limits(user)))
            sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt):
        call(settings, follow)
