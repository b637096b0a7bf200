"""What every ds01 command shares: settings, the client, and failing with one clear line."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from ds01.client import Ds01Client, Ds01Error
from ds01.core.config import Config, ConfigError, load_config
from ds01.core.pki import PkiError


@dataclass
class Settings:
    config_path: Path | None
    output: str

    def config(self) -> Config:
        return load_config(self.config_path)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"ds01: error: {message}", err=True)
    sys.exit(code)


def run(work: Callable[[], Any]) -> Any:
    """Run a command body, turning every expected failure into one clear line."""
    try:
        return work()
    except Ds01Error as err:
        fail(f"{err.message} [{err.code.name}]")
    except ConfigError as err:
        fail(f"configuration: {err}", code=2)
    except PkiError as err:
        fail(str(err))
    except PermissionError as err:
        fail(f"{err.filename}: permission denied; ask an admin for access, or run this as the "
             "file's owner")  # fmt: skip
    except KeyboardInterrupt:
        # The calls in flight are cancelled: a create still waiting for its GPU gives up
        # and leaves nothing; one past that point completes on the server.
        fail("interrupted (what the services had begun may still complete: "
             "`ds01 container list` shows where things stand)", code=130)  # fmt: skip


def call(settings: Settings, work: Callable[[Ds01Client], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``work`` with a client for the configured suite."""

    async def main() -> Any:
        async with Ds01Client(settings.config()) as client:
            return await work(client)

    return run(lambda: asyncio.run(main()))


def output_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--output table|json`` on a command, defaulting to ``ds01 --output``."""
    return click.option(
        "--output",
        "-o",
        type=click.Choice(["table", "json"]),
        default=None,
        help="Output format (default: the global --output).",
    )(command)


_PLAIN = {
    "google.protobuf.Timestamp": lambda m: m.ToJsonString(),  # RFC 3339
    "google.protobuf.Duration": lambda m: m.ToTimedelta().total_seconds(),  # seconds
}
_WRAPPERS = ("Int64Value", "UInt64Value", "Int32Value", "UInt32Value", "DoubleValue",
             "FloatValue", "BoolValue", "StringValue")  # fmt: skip


def as_json(message: Message) -> dict[str, Any]:
    """A message as the tables show it: enums as their words (``running``, not
    ``CONTAINER_STATE_RUNNING``), 64-bit numbers as numbers (protobuf's JSON makes them
    strings), durations in seconds, times in RFC 3339; every field, unset ones as null."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _plain(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_plain(field, v) for v in value]
        elif field.has_presence and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _plain(field, value)
    return out


def _plain(field: FieldDescriptor, value: Any) -> Any:
    if field.enum_type is not None:
        return enum_word(field.enum_type, value)
    if field.message_type is None:
        return value
    name = field.message_type.full_name
    if name in _PLAIN:
        return _PLAIN[name](value)
    if name.removeprefix("google.protobuf.") in _WRAPPERS:
        return value.value
    return as_json(value)


def enum_word(enum: EnumDescriptor, number: int) -> str:
    """``CONTAINER_STATE_RUNNING`` as ``running``: the value without its type's prefix."""
    prefix = enum.values[0].name.removesuffix("UNSPECIFIED")
    found = enum.values_by_number.get(number)
    return found.name.removeprefix(prefix).lower() if found else str(number)


def confirmed(question: str, unasked: str, declined: str) -> None:
    """Go on only when the person at the terminal says yes to ``question``; without a
    terminal to ask on, fail with ``unasked`` (which names the flag for scripts)."""
    if not sys.stdin.isatty():
        fail(unasked)
    if not click.confirm(question, default=False):
        fail(declined)


class DefaultCommandGroup(click.Group):
    """A group whose first argument may be an argument of its default command:
    ``ds01 limits alice`` runs ``ds01 limits show alice``."""

    def __init__(self, *args: Any, default_command: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


class AliasGroup(click.Group):
    """A group that also answers to the names docker users type (``ls``, ``rm``)."""

    def __init__(self, *args: Any, aliases: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aliases = aliases

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, self.aliases.get(cmd_name, cmd_name))

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        _name, command, rest = super().resolve_command(ctx, args)
        return (command.name if command else None), command, rest


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A rich table on a terminal; plain aligned columns (never cut) in pipes and files."""
    if sys.stdout.isatty():
        table = Table(*headers)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    for line in (headers, *rows):
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
