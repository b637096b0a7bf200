"""``ds01 container``: the seed's container-create, -run, -start, -stop and -remove, and
the ways into a container (open, exec, logs, stats) through this host's Docker gateway."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Awaitable, Sequence
from typing import Any, NoReturn

import click
from click.shell_completion import CompletionItem
from rich.console import Console

from ds01.cli.common import (
    AliasGroup,
    Settings,
    as_json,
    call,
    confirmed,
    enum_word,
    fail,
    output_option,
    print_table,
)
from ds01.client import Ds01Client
from ds01.core.units import parse_duration
from ds01.v1 import allocator_pb2, containers_pb2


def _state(number: int) -> str:
    return enum_word(containers_pb2.ContainerState.DESCRIPTOR, number)


def _describe(container: containers_pb2.Container) -> str:
    gpus = " ".join(f"{g.slot.node}/{g.slot.slot_id}" for g in container.gpus) or "no GPU"
    return f"{container.docker_name}: {_state(container.state)}, {gpus}, image {container.image}"


def _print(settings: Settings, output: str | None, container: containers_pb2.Container) -> None:
    if (output or settings.output) == "json":
        click.echo(json.dumps(as_json(container), indent=2))
    else:
        click.echo(_describe(container))


def _complete_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """The caller's container names, for the shell's completion (none if ds01 cannot be
    asked within a second or two: completion never hangs a shell)."""
    settings = Settings(ctx.find_root().params.get("config_path"), "table")

    async def names() -> list[str]:
        async with Ds01Client(settings.config(), timeout=2) as client:
            return [c.name for c in await client.list_containers()]

    try:
        found = asyncio.run(names())
    except Exception:
        return []
    return [CompletionItem(name) for name in sorted(found) if name.startswith(incomplete)]


# A login shell: bash where the image has it, else sh.
SHELL = ("sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi")


@click.group(cls=AliasGroup, aliases={"ls": "list", "ps": "list", "rm": "remove"})
def container() -> None:
    """Your containers: create, run, open, exec, logs, stats, start, stop, remove, list
    (also ls and ps), inspect.

    \b
    Examples:
      ds01 container run thesis --image pytorch:latest --gpus 1
      ds01 container open thesis
      ds01 container rm thesis
    """


def _seconds(_ctx: click.Context, _param: click.Parameter, text: str | None) -> float:
    try:
        return parse_duration(text) if text else 0.0
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


class GpuCount(click.ParamType):
    """``--gpus``: a number of slots, or ``all`` (as many as your limits allow)."""

    name = "N|all"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int) or value == "all":
            return value
        if str(value).isdigit():
            return int(value)
        self.fail(f"{value!r} is not a number of GPU slots or 'all'", param, ctx)


def _create(start: bool):
    @click.argument("name", metavar="NAME")
    @click.option("--image", required=True, help="A local Docker image.")
    @click.option("--gpus", type=GpuCount(), default=None,
                  help="GPU slots, or all your limits allow (default: the host's, often 1; "
                  "0: none).")  # fmt: skip
    @click.option("--mig", "preference", flag_value=allocator_pb2.SLOT_PREFERENCE_MIG,
                  help="MIG slices only (one, unless --gpus says more).")  # fmt: skip
    @click.option("--full", "preference", flag_value=allocator_pb2.SLOT_PREFERENCE_FULL_GPU,
                  help="Whole GPUs only (one, unless --gpus says more).")  # fmt: skip
    @click.option("--wait", "wait", metavar="DURATION", callback=_seconds,
                  help="Queue this long for a free GPU (90s, 10m, 2h).")  # fmt: skip
    @click.option("--workspace", default="", help="Host directory for /workspace (in your home).")
    @click.option("--data", "data_dirs", multiple=True, help="Host directory for /data.")
    @click.option("--type", "container_type", default="", help="A configured container type.")
    @output_option
    @click.pass_obj
    def command(
        settings: Settings,
        name: str,
        image: str,
        gpus: int | str | None,
        preference: int | None,
        wait: float,
        workspace: str,
        data_dirs: tuple[str, ...],
        container_type: str,
        output: str | None,
    ) -> None:
        count = None if gpus == "all" else gpus
        if count is None and preference:
            count = 1  # --mig or --full alone: one of that kind

        async def work(client: Ds01Client) -> containers_pb2.Container:
            made = client.create_container(
                name,
                image,
                count,
                os.path.abspath(workspace) if workspace else "",
                tuple(os.path.abspath(d) for d in data_dirs),
                start,
                container_type,
                gpu_preference=preference or 0,
                gpu_wait=wait,
                all_gpus=gpus == "all",
            )
            return await _with_progress(client, name, made, "creating and starting" if start
                                        else "creating")  # fmt: skip

        _print(settings, output, call(settings, work))

    return command


async def _with_progress(client: Ds01Client, name: str, work: Awaitable[Any], doing: str) -> Any:
    """On a terminal, a line that says what a slow call is doing: waiting in the GPU
    queue (and where in it) or the step itself; in pipes, nothing."""
    if not sys.stderr.isatty():
        return await work
    task = asyncio.ensure_future(work)
    started = time.monotonic()
    with Console(stderr=True).status(f"{doing} {name}: {CHECKING}…") as status:
        me = ""  # the name the queue knows the caller by (the certificate's)
        while not (await asyncio.wait({task}, timeout=1.0))[0]:
            try:  # slow answers must not hold back the create's own
                me = me or await asyncio.wait_for(_identity(client), LOOKUP_SECONDS)
                place, step = await asyncio.wait_for(
                    asyncio.gather(_queue_place(client, name, me), _step(client, name)),
                    LOOKUP_SECONDS,
                )
            except TimeoutError:
                continue
            waited = f"{time.monotonic() - started:.0f} s"
            status.update(
                f"waiting for a GPU: number {place[0]} of {place[1]} in the queue ({waited})"
                if place
                else f"{name}: {step or CHECKING} ({waited})"
            )
    return task.result()


# Before a create is recorded (and so has a step to tell) it checks the request.
CHECKING = "checking the image and your limits"
LOOKUP_SECONDS = 2.0  # the most a progress line's lookups may take


async def _identity(client: Ds01Client) -> str:
    try:
        return (await client.whoami()).name
    except Exception:  # the answer to the create itself is what counts
        return ""


async def _step(client: Ds01Client, name: str) -> str:
    """What the services say a create of ``name`` is doing now ("" if they cannot)."""
    try:
        return (await client.get_container(name)).notice
    except Exception:  # not recorded yet, or the services are busy: the answer counts
        return ""


async def _queue_place(client: Ds01Client, name: str, me: str) -> tuple[int, int] | None:
    """(position, queue length) of the create of ``name`` by ``me``, if it waits."""
    try:
        waiters = (await client.gpu_queue()).waiters
    except Exception:  # the answer to the create itself is what counts
        return None
    for waiter in waiters:
        if waiter.user == me and waiter.container.split("._.")[0] == name:
            return waiter.position, len(waiters)
    return None


container.command(
    "create",
    help="""Create NAME with your limits and GPUs (not started).

\b
Examples:
  ds01 container create thesis --image pytorch:latest
  ds01 container create big --image $USER/proj:v1 --gpus all --wait 30m
""",
)(_create(False))
container.command(
    "run",
    help="""Create NAME and start it.

\b
Examples:
  ds01 container run thesis --image pytorch:latest --mig
  ds01 container run cpu-only --image ubuntu:22.04 --gpus 0 --data ~/datasets
""",
)(_create(True))


@container.command()
@click.argument("name", shell_complete=_complete_names)
@output_option
@click.pass_obj
def start(settings: Settings, name: str, output: str | None) -> None:
    """Start NAME again (its GPU must still be held for it).

    \b
    Examples:
      ds01 container start thesis
    """
    _print(settings, output, call(settings, lambda client: client.start_container(name)))


@container.command()
@click.argument("name", shell_complete=_complete_names)
@click.option("--grace", type=click.IntRange(min=0), default=0, help="Seconds before a kill.")
@output_option
@click.pass_obj
def stop(settings: Settings, name: str, grace: int, output: str | None) -> None:
    """Stop NAME; its GPU is held for your gpu_hold_after_stop.

    \b
    Example:
      ds01 container stop thesis
    """
    stopped = call(settings, lambda client: client.stop_container(name, grace))
    _print(settings, output, stopped)
    if (output or settings.output) != "json" and stopped.gpus:
        click.echo(_hold_note(stopped))


def _hold_note(stopped: containers_pb2.Container) -> str:
    """How long a stopped container's GPU stays its own, and how to keep it."""
    ends = [g.hold_until.ToDatetime(dt.UTC) for g in stopped.gpus if g.HasField("hold_until")]
    if len(ends) < len(stopped.gpus):
        return "its GPU stays held for it until you remove it"
    until = min(ends).astimezone()
    left = until - dt.datetime.now(dt.UTC)
    return (
        f"its GPU stays held for it until {until:%Y-%m-%d %H:%M} ({_duration(left)} from now); "
        f"`ds01 container start {stopped.name}` before then keeps it"
    )


def _duration(span: dt.timedelta) -> str:
    minutes = max(0, round(span.total_seconds() / 60))
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


@container.command()
@click.argument("name", shell_complete=_complete_names)
@click.option("-f", "--force", is_flag=True, help="Remove it even if it runs (as docker rm -f).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask (for scripts): the same as --force.")
@click.pass_obj
def remove(settings: Settings, name: str, force: bool, yes: bool) -> None:
    """Remove NAME and free its GPU at once; a running NAME only after you confirm.

    \b
    Examples:
      ds01 container rm thesis
      ds01 container rm -f thesis
    """

    async def work(client: Ds01Client) -> None:
        found = await client.get_container(name)
        if found.state == containers_pb2.CONTAINER_STATE_RUNNING and not (force or yes):
            confirmed(
                f"{name} is running. Stop and remove it?",
                f"{name} is running: stop it first, or remove it anyway with --force",
                "nothing removed",
            )
        await client.remove_container(name)

    call(settings, work)
    click.echo(f"removed {name}")


# --- into a container, through this host's Docker gateway ----------------------------------


def _reached(settings: Settings, name: str, start: bool) -> containers_pb2.Container:
    """NAME, checked to be on this host and running (started first when ``start``)."""

    async def work(client: Ds01Client) -> containers_pb2.Container:
        found = await client.get_container(name)
        if found.node and found.node != client.config.node:
            fail(f"{name} is on {found.node}: log in there to reach it")
        if found.state != containers_pb2.CONTAINER_STATE_RUNNING:
            if not start:
                fail(f"{name} is {_state(found.state)}: `ds01 container open {name}` starts it")
            if sys.stderr.isatty():
                click.echo(f"starting {name}…", err=True)
            found = await client.start_container(name)
        return found

    return call(settings, work)


def _docker(settings: Settings, *args: str) -> NoReturn:
    """Become ``docker ARGS`` on the gateway's socket: the gateway checks that the
    container is the caller's, as it does for the caller's own docker commands."""
    gateway = settings.config().ownership.proxy_socket
    if not gateway.exists():
        fail(f"the ds01 Docker gateway is not running here ({gateway} is missing): ask an admin")
    argv = ["docker", "-H", f"unix://{gateway}", *args]
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        fail("the docker command is not installed here: install docker-ce-cli or docker.io")


def _exec(settings: Settings, found: containers_pb2.Container, command: Sequence[str]) -> NoReturn:
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    where = ["-w", "/workspace"] if found.workspace else []
    _docker(settings, "exec", "-it" if terminal else "-i", *where, found.docker_name, *command)


_PASSED_ON = {"ignore_unknown_options": True}


@container.command("open", context_settings=_PASSED_ON)
@click.argument("name", shell_complete=_complete_names)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def open_(settings: Settings, name: str, command: tuple[str, ...]) -> None:
    """Start NAME if need be and open a shell in it (or run COMMAND), as you, in
    /workspace, with a terminal when you have one.

    \b
    Examples:
      ds01 container open thesis
      ds01 container open thesis -- python train.py
    """
    _exec(settings, _reached(settings, name, start=True), command or SHELL)


@container.command("exec", context_settings=_PASSED_ON)
@click.argument("name", shell_complete=_complete_names)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def exec_(settings: Settings, name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in the running NAME, as you, in /workspace.

    \b
    Example:
      ds01 container exec thesis -- nvidia-smi
    """
    _exec(settings, _reached(settings, name, start=False), command)


@container.command()
@click.argument("name", shell_complete=_complete_names)
@click.option("-f", "--follow", is_flag=True, help="Keep printing what it writes.")
@click.option("--tail", default="all", show_default=True, help="Only the last N lines.")
@click.option("-t", "--timestamps", is_flag=True, help="Each line with its time.")
@click.pass_obj
def logs(settings: Settings, name: str, follow: bool, tail: str, timestamps: bool) -> None:
    """What NAME's main process wrote (stdout and stderr).

    \b
    Example:
      ds01 container logs -f --tail 100 thesis
    """
    found = call(settings, lambda client: client.get_container(name))
    flags = ["--tail", tail, *(["--follow"] if follow else []), *(["-t"] if timestamps else [])]
    _docker(settings, "logs", *flags, found.docker_name)


@container.command()
@click.argument("name", shell_complete=_complete_names)
@click.option("--no-stream", is_flag=True, help="One reading, then exit (always so in a pipe).")
@click.pass_obj
def stats(settings: Settings, name: str, no_stream: bool) -> None:
    """NAME's CPU, memory, network and disk use, live on a terminal.

    \b
    Example:
      ds01 container stats thesis
    """
    found = _reached(settings, name, start=False)
    once = no_stream or not sys.stdout.isatty()
    _docker(settings, "stats", *(["--no-stream"] if once else []), found.docker_name)


@container.command("list")
@click.option("--all", "all_users", is_flag=True, help="Everyone's (admins).")
@output_option
@click.pass_obj
def list_(settings: Settings, all_users: bool, output: str | None) -> None:
    """Your containers (admins: --all, named as every other command takes them).

    \b
    Examples:
      ds01 container ls
      ds01 container ls --all -o json
    """
    found = call(settings, lambda client: client.list_containers(all_users=all_users))
    if (output or settings.output) == "json":
        click.echo(json.dumps([as_json(c) for c in found], indent=2))
        return
    print_table(
        ["NAME", "USER", "STATE", "GPUS", "IMAGE", "CREATED", "NODE", "NOTICE"],
        [
            [
                c.docker_name if all_users else c.name,  # NAME._.USER: another's, exactly
                c.user,
                _state(c.state),
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
@click.argument("name", shell_complete=_complete_names)
@click.pass_obj
def inspect(settings: Settings, name: str) -> None:
    """Everything ds01 knows of NAME, as JSON.

    \b
    Examples:
      ds01 container inspect thesis
    """
    found = call(settings, lambda client: client.get_container(name))
    click.echo(json.dumps(as_json(found), indent=2))
