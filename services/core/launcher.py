"""``ds01d``: runs one or more ds01 services in one process.

``ds01d --services limits,allocator`` runs those two; ``--services all`` runs the four.
``--local`` makes the process the whole single-machine deployment: it creates the PKI
if there is none, starts an etcd (data in the state dir) unless one answers already,
and a private dockerd unless the configured Docker socket answers. Ctrl-C (or SIGTERM)
stops the services, then the daemons it started, and leaves no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import getpass
import importlib
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click

from ds01.allocator.inventory import InventoryError, load_inventory
from ds01.core import heap
from ds01.core.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from ds01.core.etcd import etcd_answers_plain, etcd_healthy
from ds01.core.identity import Roles
from ds01.core.logs import setup_logging
from ds01.core.pki import SERVICES, init_pki
from ds01.core.processes import (
    ManagedProcess,
    ProcessError,
    docker_answers,
    start_dockerd,
    start_etcd,
)
from ds01.core.server import (
    WORKER_THREADS,
    RunningService,
    ServiceContext,
    ServiceSpec,
    ServiceStartError,
    start_service,
)

log = logging.getLogger("ds01d")

STOP_SECONDS = 20.0  # the longest a stop may take before ds01d exits regardless


def service_spec(name: str) -> ServiceSpec:
    return importlib.import_module(f"ds01.{name}.server").SPEC


def parse_services(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(SERVICES)
    unknown = [n for n in names if n not in SERVICES]
    if unknown or not names:
        raise click.BadParameter(
            f"unknown service {', '.join(unknown) or '(none)'}; choose from "
            f"{', '.join(SERVICES)} or all",
            param_hint="--services",
        )
    return [name for name in SERVICES if name in names]  # each after those it asks


@dataclass
class LocalDeps:
    """The daemons ``--local`` started itself, to be stopped in reverse order."""

    config: Config
    started: list[ManagedProcess] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def start(self) -> None:
        written = init_pki(self.config.pki, admin=getpass.getuser())
        if written:
            self.notes.append(f"created certificates in {self.config.pki.root}")
        endpoint = self.config.etcd_endpoints[0]
        etcd_pki = self.config.pki.etcd
        if etcd_healthy(endpoint, etcd_pki):
            self.notes.append(f"etcd       {endpoint} (already running, mutual TLS)")
        elif etcd_answers_plain(endpoint):
            raise ProcessError(
                f"an etcd without TLS answers at {endpoint}: every local user could read and "
                "write ds01's state there. Stop it, or configure another etcd endpoint; "
                "ds01d --local then starts one that requires the certificates in "
                f"{etcd_pki.root}"
            )
        else:
            host, _, port = endpoint.rpartition(":")
            if not host.startswith("127.") and host != "localhost":
                raise ProcessError(
                    f"etcd at {endpoint} does not answer to the certificates in "
                    f"{etcd_pki.root}, and is not local"
                )
            etcd = start_etcd(self.config.state_dir / "etcd" / "data", int(port), etcd_pki)
            self.started.append(etcd)
            self.notes.append(
                f"etcd       {endpoint} (mutual TLS, data {self.config.state_dir / 'etcd'})"
            )
        socket_path = Path(self.config.docker_host.removeprefix("unix://"))
        if not self.config.docker_host.startswith("unix://"):
            self.notes.append(f"docker     {self.config.docker_host} (not managed by ds01d)")
        elif docker_answers(socket_path):
            self.notes.append(f"docker     {self.config.docker_host} (already running)")
        else:
            dockerd = start_dockerd(self.config.state_dir / "docker", socket_path)
            self.started.append(dockerd)
            self.notes.append(
                f"docker     {self.config.docker_host} (private dockerd, data "
                f"{self.config.state_dir / 'docker'})"
            )

    def stop(self) -> None:
        for process in reversed(self.started):
            log.info("stopping %s (pid %d)", process.name, process.pid)
            process.stop()
        self.started.clear()


async def serve(config: Config, names: list[str], local: bool) -> int:
    deps = LocalDeps(config)
    running: list[RunningService] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="ds01"))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if local:
            await asyncio.to_thread(deps.start)
        context = ServiceContext(config=config, roles=Roles())
        for name in names:
            running.append(await start_service(service_spec(name), context))
        for service in running:  # the first check of what each one needs
            await service.ready(timeout=10)
        heap.settle()
        print(_summary(config, running, deps.notes, foreground=local), flush=True)
        await stop.wait()
        log.info("stopping")
        _exit_if_still_stopping_after(STOP_SECONDS)
        return 0
    except (ServiceStartError, ProcessError, InventoryError) as err:
        log.error("%s", err)
        return 1
    finally:
        for service in reversed(running):
            await service.stop()
        await asyncio.to_thread(deps.stop)


def _exit_if_still_stopping_after(seconds: float) -> None:
    """A stop that hangs (a Docker call that never returns holds a worker thread, which
    the interpreter waits for at exit) ends after ``seconds`` with the stacks in the log,
    not at systemd's SIGKILL minutes later."""

    def expire() -> None:
        log.error("still stopping after %.0fs: every thread's stack follows, then exit", seconds)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def _waiting(service: RunningService) -> str:
    missing = [d for d in service.runtime.dependencies.items if not d.available]
    if not missing:
        return ""
    return "  (not serving yet: " + "; ".join(f"{d.name}: {d.detail}" for d in missing) + ")"


def _summary(
    config: Config, running: list[RunningService], notes: list[str], foreground: bool
) -> str:
    """What runs where; for the local default (a person at a terminal), what to do next."""
    lines = [f"ds01 is up on node {config.node} (mutual TLS on every port)"]
    lines += [f"  {s.spec.name:<10} {s.address}{_waiting(s)}" for s in running]
    lines += [f"  {note}" for note in notes]
    try:
        lines.append(f"  gpus       {load_inventory(config).describe()}")
    except InventoryError as err:
        lines.append(f"  gpus       inventory unavailable: {err}")
    if not foreground:  # under systemd or compose: the log needs no advice
        return "\n".join(lines)
    default = config.source in (None, DEFAULT_CONFIG_PATH)
    config_hint = "" if default else f"DS01_CONFIG={config.source} "
    config_hint += str(Path(sys.argv[0]).with_name("ds01"))
    lines += [
        "",
        "Next, in another terminal:",
        f"  {config_hint} status     # health of every service over mTLS",
        f"  {config_hint} whoami     # who the services take you for",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Suite configuration (default: $DS01_CONFIG or /etc/ds01/ds01.yaml).",
)
@click.option("--services", default="all", show_default=True, help="Comma-separated, or all.")
@click.option("--local", is_flag=True, help="Also create the PKI and start etcd and dockerd.")
@click.version_option(package_name="ds01", prog_name="ds01d", message="%(prog)s %(version)s")
def main(config_path: Path | None, services: str, local: bool) -> None:
    """Run ds01 services."""
    names = parse_services(services)
    try:
        config = load_config(config_path)
    except ConfigError as err:
        click.echo(f"ds01d: configuration error: {err}", err=True)
        sys.exit(2)
    setup_logging(config.log_level, config.log_format)
    # `kill -USR1 <pid>` prints every thread's stack to the log: what a stuck ds01d waits on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(serve(config, names, local)))
