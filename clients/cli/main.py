"""The ``ds01`` command line."""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from pathlib import Path
from typing import Any

import click
import grpc

from ds01.cli.admin_tools import drain, owners, stop_containers, undrain, users
from ds01.cli.audit import audit
from ds01.cli.common import Settings, call, enum_word, fail, print_table, run
from ds01.cli.container import container
from ds01.cli.events import events
from ds01.cli.gpu import gpu
from ds01.cli.image import image
from ds01.cli.install import install_command
from ds01.cli.limits import limits
from ds01.cli.migrate import import_ds01
from ds01.cli.top import top
from ds01.cli.usage import usage
from ds01.client import Ds01Client, Ds01Error, EnrollmentError, enroll
from ds01.client.credentials import certificate_expiry
from ds01.core.pki import SERVICES, CertPaths, init_pki, issue_client_cert
from ds01.v1 import common_pb2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False, readable=False),  # ours to report
    envvar="DS01_CONFIG",
    help="Suite configuration (default: /etc/ds01/ds01.yaml).",
)
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table",
              help="Tables for people, JSON for scripts (every command).")  # fmt: skip
@click.version_option(package_name="ds01", prog_name="ds01", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, output: str) -> None:
    """ds01: GPUs, limits and containers on a shared GPU server."""
    ctx.obj = Settings(config_path, output)


cli.add_command(limits)
cli.add_command(gpu)
cli.add_command(events)
cli.add_command(container)
cli.add_command(image)
cli.add_command(usage)
cli.add_command(top)


@cli.command()
@click.option(
    "--service",
    "only",
    type=click.Choice(SERVICES),
    default=None,
    help="Only this service (a health check for compose or systemd).",
)
@click.pass_obj
def status(settings: Settings, only: str | None) -> None:
    """Health of every ds01 service, checked over mutual TLS; exits 1 unless serving.

    \b
    Examples:
      ds01 status
      ds01 status --service allocator   # a health check for systemd or compose
    """

    async def check(client: Ds01Client, service: str) -> dict[str, Any]:
        needs: list[dict[str, Any]] = []
        try:
            state = await client.health(service)
            needs = [
                {"name": d.name, "target": d.target, "available": d.available, "detail": d.detail}
                for d in (await client.service_status(service)).dependencies
            ]
            detail = "; ".join(f"{d['name']}: {d['detail']}" for d in needs if not d["available"])
        except Ds01Error as err:
            if err.code == grpc.StatusCode.UNAUTHENTICATED:
                raise  # the same for every service: say it once
            state, detail = err.code.name, err.problem
        address = client.config.address(service)
        return {"service": service, "address": address, "status": state, "needs": needs,
                "detail": detail}  # fmt: skip

    async def check_all(client: Ds01Client) -> list[dict[str, Any]]:
        # At once: a service that is down costs its connection timeout once, not four times.
        services = [only] if only else SERVICES
        return list(await asyncio.gather(*(check(client, s) for s in services)))

    rows = call(settings, check_all)
    if settings.output == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        print_table(
            ["SERVICE", "ADDRESS", "STATUS", "NEEDS", "DETAIL"],
            [
                [r["service"], r["address"], r["status"], _needs(r["needs"]), r["detail"]]
                for r in rows
            ],
        )
    down = [row["service"] for row in rows if row["status"] != "SERVING"]
    if down:
        if settings.output != "json":
            click.echo(_advice_for(down), err=True)
        sys.exit(1)


def _advice_for(down: list[str]) -> str:
    return (
        f"not serving: {', '.join(down)}. On the server, an admin looks at "
        "`systemctl status ds01.target` and `journalctl -u 'ds01@*'`"
    )


def _needs(needs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{d['name']} {'ok' if d['available'] else 'DOWN'}" for d in needs) or "-"


@cli.command()
@click.pass_obj
def whoami(settings: Settings) -> None:
    """Who the ds01 services take you for (from your client certificate).

    \b
    Examples:
      ds01 whoami
    """
    response = call(settings, lambda client: client.whoami())
    kind = enum_word(common_pb2.PrincipalKind.DESCRIPTOR, response.kind)
    expires = (
        response.certificate_expires.ToDatetime().isoformat(timespec="seconds") + "Z"
        if response.HasField("certificate_expires")
        else "unknown"
    )
    if settings.output == "json":
        click.echo(json.dumps({"name": response.name, "kind": kind, "expires": expires}))
    else:
        click.echo(f"{response.name} ({kind}), certificate valid until {expires}")


@cli.command("enroll")
@click.pass_obj
def enroll_command(settings: Settings) -> None:
    """Get (or renew) your client certificate from this host's enrollment socket.

    \b
    Examples:
      ds01 enroll
    """
    config = run(settings.config)
    try:
        identity = enroll(config.ownership.enroll_socket)
    except EnrollmentError as err:
        fail(str(err))
    assert identity.cert is not None
    expires = certificate_expiry(identity.cert.cert).astimezone()
    click.echo(
        f"certificate in {identity.cert.cert} (mode 0600), valid until "
        f"{expires:%Y-%m-%d %H:%M %Z}; ds01 renews it by itself when a third is left"
    )


@cli.group()
def admin() -> None:
    """Administration on the server itself (needs access to the state directory).

    \b
    Examples:
      ds01 admin users
      ds01 admin drain gpu01/3 --reason reset
      ds01 admin stop --user alice
    """


@admin.group()
def pki() -> None:
    """The suite's certificate authority.

    \b
    Examples:
      ds01 admin pki init
    """


@pki.command("init")
@click.option(
    "--force", is_flag=True, help="Replace the CA: every issued certificate stops working."
)
@click.option("--host", "hosts", multiple=True, help="Extra name or IP for service certificates.")
@click.pass_obj
def pki_init(settings: Settings, force: bool, hosts: tuple[str, ...]) -> None:
    """Create the CA, the service certificates and one for you, in the state directory.

    \b
    Examples:
      ds01 admin pki init
      ds01 admin pki init --host gpu01.lab.example --host 10.0.0.5
    """
    config = run(settings.config)
    written = run(lambda: init_pki(config.pki, force=force, hosts=hosts, admin=getpass.getuser()))
    if not written:
        click.echo(f"PKI already present in {config.pki.root} (use --force to replace the CA)")
        return
    click.echo(f"PKI in {config.pki.root}:")
    for path in written:
        click.echo(f"  {path}")


@admin.command("issue-cert")
@click.argument("user")
@click.option("--days", type=click.FloatRange(min=0, min_open=True), default=365,
              show_default=True, help="How long it is valid.")  # fmt: skip
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write client.crt, client.key and ca.crt here (default: the state directory).",
)
@click.pass_obj
def issue_cert(settings: Settings, user: str, days: float, out_dir: Path | None) -> None:
    """Issue a client certificate for USER.

    \b
    Examples:
      ds01 admin issue-cert alice
      ds01 admin issue-cert labbot --days 30 --out ./labbot-certs
    """
    config = run(settings.config)
    out = CertPaths(out_dir / "client.crt", out_dir / "client.key") if out_dir else None
    paths = run(lambda: issue_client_cert(config.pki, user, days=days, out=out))
    if out_dir:
        (out_dir / "ca.crt").write_bytes(config.pki.ca_cert.read_bytes())
    click.echo(f"certificate for {user}: {paths.cert} (key {paths.key}, mode 0600)")


admin.add_command(import_ds01)
admin.add_command(owners)
admin.add_command(stop_containers)
admin.add_command(users)
admin.add_command(drain)
admin.add_command(undrain)
admin.add_command(audit)
admin.add_command(install_command)


def main() -> None:
    cli()
