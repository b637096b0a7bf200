"""``ds01 admin import-ds01``: switch a running DS01 host over to ds01."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click
import docker
import docker.errors

from ds01.allocator.inventory import InventoryError, load_inventory
from ds01.cli.common import Settings, as_json, call, fail, output_option, print_table, run
from ds01.client import Ds01Client
from ds01.containers.adoption import Seen, plan_import
from ds01.containers.adoption import Slot as AdoptSlot
from ds01.containers.reconcile import ADOPTED_LABELS
from ds01.core.config import Config
from ds01.limits.config import LimitsConfig, LimitsConfigError, ds01_group_of, group_of, load_limits
from ds01.v1 import containers_pb2


@click.command("import-ds01")
@click.option("--dry-run", is_flag=True, help="Only say what importing would do.")
@click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("/home"),
    show_default=True,
    help="Where DS01 found its users: one directory each.",
)
@output_option
@click.pass_obj
def import_ds01(settings: Settings, dry_run: bool, home: Path, output: str | None) -> None:
    """Adopt a DS01 (or mlc) host's containers with their GPUs, and list the users
    whose group ds01's rules change.

    Containers are adopted oldest first; a GPU that two of them use goes to the older
    one, and the other is listed with the conflict, for you to settle.

    \b
    Examples:
      ds01 admin import-ds01 --dry-run
      ds01 admin import-ds01
    """
    config = run(settings.config)
    found = _plan_here(config) if dry_run else None  # before ds01 runs: from Docker itself
    if found is None:
        found = call(settings, lambda client: client.import_containers(dry_run))
    try:
        limits = load_limits(config.limits_file)
    except LimitsConfigError as err:
        fail(f"{config.limits_file} has problems ({len(err.issues)}): `ds01 limits check`")
    users = {c.user for c in found} | _listed_users(limits) | _home_users(home)
    changes = [
        (user, ds01_group_of(limits, user), group_of(limits, user))
        for user in sorted(users)
        if ds01_group_of(limits, user) != group_of(limits, user)
    ]
    if (output or settings.output) == "json":
        containers = [as_json(c) for c in found]
        groups = [{"user": u, "ds01_group": old, "group": new} for u, old, new in changes]
        click.echo(json.dumps({"containers": containers, "group_changes": groups}, indent=2))
        return
    verb = "would adopt" if dry_run else "adopted"
    if found:
        print_table(
            ["CONTAINER", "USER", "TYPE", "GPUS", "PROBLEM", verb.upper()],
            [
                [
                    c.docker_name,
                    c.user,
                    c.container_type or "-",
                    " ".join(c.gpu_slots) or "-",
                    _problem(c.conflict, list(c.unknown_gpus)),
                    "yes" if c.adopted or dry_run else "no",
                ]
                for c in found
            ],
        )
    else:
        click.echo("no containers to adopt: ds01 has a record of every one")
    if changes:
        click.echo("")
        print_table(
            ["USER", "GROUP UNDER DS01", "GROUP UNDER ds01"],
            [[user, old, new] for user, old, new in changes],
        )
    conflicts = sum(1 for c in found if c.conflict)
    click.echo(
        f"{len(found)} container(s) {verb}, {conflicts} GPU conflict(s), "
        f"{len(changes)} user(s) change group"
    )


def _plan_here(config: Config) -> list[containers_pb2.ImportedContainer] | None:
    """The dry run from this host's Docker and inventory, for a host where ds01 does not
    run yet (None where its containers service answers: it knows what is recorded)."""
    if _containers_service_answers(config):
        return None
    try:
        client = docker.DockerClient(base_url=config.docker_host)
        try:
            seen = {
                c.id: Seen.of(c.attrs)
                for label in ADOPTED_LABELS
                for c in client.containers.list(all=True, filters={"label": label})
            }
        finally:
            client.close()
        inventory = load_inventory(config)
    except (docker.errors.DockerException, InventoryError) as err:
        fail(f"cannot read this host's containers or GPUs: {err}")
    slots = [AdoptSlot(slot.slot_id, slot.uuid) for slot in inventory.slots()]
    metadata = config.containers.ds01_metadata_dir
    planned = plan_import(
        [c for c in seen.values() if c.user],
        config.node,
        slots,
        {},
        metadata if metadata.is_dir() else None,
    )
    return [containers_pb2.ImportedContainer(**vars(entry)) for entry in planned]


def _containers_service_answers(config: Config) -> bool:
    async def ask() -> None:
        async with Ds01Client(config) as client:
            await client.health("containers")

    try:
        asyncio.run(ask())
    except Exception:  # not running, not reachable, no certificate yet: all mean no
        return False
    return True


def _problem(conflict: str, unknown: list[str]) -> str:
    problems = [conflict] if conflict else []
    if unknown:
        problems.append(f"GPUs not on this node: {' '.join(unknown)}")
    return "; ".join(problems) or "-"


def _listed_users(config: LimitsConfig) -> set[str]:
    members = {user for group in config.groups.values() for user in group.members}
    return members | set(config.overrides) | set(config.archived)


def _home_users(home: Path) -> set[str]:
    try:
        return {entry.name for entry in home.iterdir() if entry.is_dir()}
    except OSError:
        return set()
