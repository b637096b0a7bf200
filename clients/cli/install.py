"""``ds01 admin install``: ds01 on this host, for every user, under systemd."""

from __future__ import annotations

import subprocess
from pathlib import Path

import click

from ds01.cli.common import fail
from ds01.core.install import (
    PREFIX,
    Options,
    changes,
    docker_group_members,
    install,
    plan,
    takeover_problems,
    uninstall,
)


@click.command("install")
@click.option("--dry-run", is_flag=True, help="Print every file and change; change nothing.")
@click.option("--uninstall", "remove", is_flag=True, help="Undo exactly what install did.")
@click.option(
    "--docker-socket/--no-docker-socket",
    default=True,
    show_default=True,
    help="Move dockerd to a root-only socket and give /var/run/docker.sock to ds01.",
)
@click.option(
    "--remove-docker-group-members",
    is_flag=True,
    help="Take every user out of the docker group (each of them is root on the host).",
)
@click.option("--yes", is_flag=True, help="Do not ask before removing group members.")
@click.option("--prefix", default=PREFIX, show_default=True, help="Where ds01 is installed.")
@click.option(
    "--config-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="The default configuration to install (default: the source tree's config/).",
)
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("/"),
    help="Write under this directory instead of / (for packaging and tests).",
)
def install_command(
    dry_run: bool,
    remove: bool,
    docker_socket: bool,
    remove_docker_group_members: bool,
    yes: bool,
    prefix: str,
    config_dir: Path | None,
    root: Path,
) -> None:
    """Install ds01's systemd units, configuration and commands (run as root).

    Writes /etc/ds01 (never replacing an admin's files), ds01 and ds01d in
    /usr/local/bin, units ds01.target, ds01-etcd.service and ds01@.service (one instance
    per service) in /etc/systemd/system, and, with the socket takeover, a docker.socket
    drop-in that moves dockerd to a root-only socket. Running it twice is harmless.

    \b
    Examples:
      make install                 # what runs this, with the venv in /opt/ds01
      ds01 admin install --dry-run
      ds01 admin install --uninstall
    """
    systemd = root == Path("/") and _systemd_runs()
    if remove:
        if dry_run:
            fail("--uninstall --dry-run: nothing to show; the manifest lists what it made")
        if systemd:
            _systemctl("disable", "ds01.target")
        for change in uninstall(root):
            click.echo(change)
        if systemd:
            _systemctl("daemon-reload")
        return
    config_dir = config_dir or Options.config_dir
    if not (config_dir / "ds01.yaml").is_file():
        fail(f"no default configuration in {config_dir}: give --config-dir (the source's config/)")
    options = Options(
        root=root, prefix=prefix, take_docker_socket=docker_socket, config_dir=config_dir
    )
    items = plan(options)
    if dry_run:
        for change in changes(items, root):
            click.echo(change)
    else:
        done = install(items, root)
        for change in done:
            click.echo(change)
        if not done:
            click.echo("nothing to change: ds01 is installed as planned")
    for problem in takeover_problems(root) if docker_socket else []:
        click.echo(f"warning: {problem}", err=True)
    _docker_group(root, remove_docker_group_members and not dry_run, yes)
    if systemd and not dry_run:
        _systemctl("daemon-reload")
        _systemctl("enable", "ds01.target")
        click.echo(
            "start ds01 with: systemctl restart docker.socket docker.service && "
            "systemctl start ds01.target"
        )


def _docker_group(root: Path, remove: bool, yes: bool) -> None:
    members = docker_group_members(root)
    if not members:
        return
    click.echo(
        f"warning: {', '.join(members)} {'is' if len(members) == 1 else 'are'} in the docker "
        "group, which is root on this host and passes by ds01",
        err=True,
    )
    if not remove:
        click.echo("  take them out with --remove-docker-group-members", err=True)
        return
    if not yes and not click.confirm(f"remove {', '.join(members)} from the docker group?"):
        return
    chroot = [] if root == Path("/") else ["-Q", str(root.resolve())]
    for member in members:
        result = subprocess.run(
            ["gpasswd", *chroot, "-d", member, "docker"], capture_output=True, text=True
        )
        if result.returncode != 0:
            fail(f"gpasswd could not remove {member}: {result.stderr.strip()}")
        click.echo(f"removed  {member} from the docker group")


def _systemd_runs() -> bool:
    result = subprocess.run(["systemctl", "is-system-running"], capture_output=True, text=True)
    return result.stdout.strip() not in ("offline", "")


def _systemctl(*args: str) -> None:
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        click.echo(f"warning: systemctl {' '.join(args)}: {result.stderr.strip()}", err=True)
