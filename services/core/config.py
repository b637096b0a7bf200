"""The suite's one configuration file.

Every key has a default that works on a single machine, so an empty or missing file
is a valid configuration. A file that is present but wrong stops start-up with a
message naming the file, the key and what is wrong: a typo must never silently fall
back to a default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ds01.core.pki import SERVICES, Pki

ENV_CONFIG = "DS01_CONFIG"
DEFAULT_CONFIG_PATH = Path("/etc/ds01/ds01.yaml")
DEFAULT_PORTS = {"limits": 50051, "allocator": 50052, "containers": 50053, "ownership": 50054}
# /metrics for Prometheus: the allocator (GPU metrics, DS01's names) keeps DS01's 9101.
METRICS_PORTS = {"allocator": 9101, "limits": 9102, "containers": 9103, "ownership": 9104}
LOG_FORMATS = ("text", "json")
INVENTORY_SOURCES = ("auto", "declared", "nvml")


class ConfigError(Exception):
    """The configuration file is unusable; the message names file, key and problem."""


@dataclass(frozen=True)
class InventoryConfig:
    source: str = "auto"
    file: Path = Path("/etc/ds01/inventory.yaml")


@dataclass(frozen=True)
class AllocatorConfig:
    # least_allocated spreads containers over GPUs; pack fills partly used GPUs first.
    strategy: str = "least_allocated"
    # Seconds before etcd frees a per-user lock whose holder died.
    lock_ttl: int = 10


@dataclass(frozen=True)
class ContainersConfig:
    # Docker network mode for new containers; unset: Docker's default network.
    network_mode: str | None = None
    # Seconds between lifecycle sweeps (Docker events also start one at once).
    reconcile_interval: float = 30.0
    # DS01's records of its containers' GPUs, read when its containers are adopted.
    ds01_metadata_dir: Path = Path("/var/lib/ds01/container-metadata")
    # GPU slots a create gets when it does not say (`ds01 container create` without
    # --gpus, --mig or --full), and of which kind: any, mig or full. DS01 gave one.
    default_gpus: int = 1
    default_gpu_kind: str = "any"


@dataclass(frozen=True)
class OwnershipConfig:
    # Where local users get their client certificate (any user may connect).
    enroll_socket: Path = Path("/run/ds01/enroll.sock")
    # The filtering Docker socket users' docker CLI, VS Code and compose talk to.
    proxy_socket: Path = Path("/run/ds01/docker.sock")


@dataclass(frozen=True)
class MetricsConfig:
    # Each service's /metrics address; None: that service exports none.
    listen: Mapping[str, str | None] = field(
        default_factory=lambda: {s: f"127.0.0.1:{p}" for s, p in METRICS_PORTS.items()}
    )
    # The bearer token Prometheus must send; unset: <state_dir>/metrics.token, made by
    # the first service that starts (mode 0640: root's, and its group's).
    token_file: Path | None = None
    tls: bool = False  # HTTPS with each service's own certificate
    # Serve without a token (loopback only): any local user then reads every user's
    # container names and usage.
    anonymous: bool = False


@dataclass(frozen=True)
class Config:
    node: str = field(default_factory=socket.gethostname)
    state_dir: Path = Path("/var/lib/ds01")
    listen: Mapping[str, str] = field(
        default_factory=lambda: {s: f"127.0.0.1:{p}" for s, p in DEFAULT_PORTS.items()}
    )
    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    limits_file: Path = Path("/etc/ds01/resource-limits.yaml")
    inventory: InventoryConfig = InventoryConfig()
    allocator: AllocatorConfig = AllocatorConfig()
    containers: ContainersConfig = ContainersConfig()
    ownership: OwnershipConfig = OwnershipConfig()
    docker_host: str = "unix:///var/run/docker.sock"
    metrics: MetricsConfig = MetricsConfig()
    log_level: str = "info"
    log_format: str = "text"
    source: Path | None = None

    @property
    def pki(self) -> Pki:
        return Pki(self.state_dir / "pki")

    def address(self, service: str) -> str:
        return self.listen[service]


def load_config(path: Path | str | None = None) -> Config:
    """Load the file at ``path``, ``$DS01_CONFIG`` or /etc/ds01/ds01.yaml.

    Only an explicitly named file must exist; the default location may be absent.
    """
    explicit = path or os.environ.get(ENV_CONFIG)
    file = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    if not file.exists():
        if explicit:
            raise ConfigError(f"{file}: configuration file not found")
        return Config()
    try:
        text = file.read_text()
    except PermissionError as err:
        raise ConfigError(
            f"{file}: cannot read it (permission denied): it holds no secrets, so ask an "
            "admin to make it readable to all (chmod 644)"
        ) from err
    except OSError as err:
        raise ConfigError(f"{file}: cannot read: {err.strerror}") from err
    return parse_config(text, file)


def parse_config(text: str, file: Path) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"{file}:{line} is not valid YAML: {err}") from err
    if raw is None:
        raw = {}
    reader = _Reader(file, raw, "")
    base = file.parent
    config = Config(
        node=reader.str("node", Config().node, check=_check_node),
        state_dir=reader.path("state_dir", Config.state_dir, base),
        listen=_read_listen(reader.section("listen")),
        etcd_endpoints=_read_endpoints(reader.section("etcd")),
        limits_file=reader.path("limits_file", Config.limits_file, base),
        inventory=_read_inventory(reader.section("inventory"), base),
        allocator=_read_allocator(reader.section("allocator")),
        containers=_read_containers(reader.section("containers"), base),
        ownership=_read_ownership(reader.section("ownership"), base),
        docker_host=reader.choice_str("docker", "host", Config.docker_host, _check_docker_host),
        metrics=_read_metrics(reader.section("metrics"), base),
        log_level=reader.one_of("log_level", "info", ("debug", "info", "warning", "error")),
        log_format=reader.one_of("log_format", "text", LOG_FORMATS),
        source=file,
    )
    reader.reject_unknown()
    return config


def _read_listen(reader: _Reader) -> dict[str, str]:
    listen = dict(Config().listen)
    for service in SERVICES:
        listen[service] = reader.str(service, listen[service], check=_check_address)
    reader.reject_unknown()
    return listen


def _read_endpoints(reader: _Reader) -> tuple[str, ...]:
    endpoints = reader.list_of_str("endpoints", list(Config.etcd_endpoints))
    for i, endpoint in enumerate(endpoints):
        if endpoint.startswith("http://"):
            raise reader.error(
                f"endpoints[{i}]",
                f"{endpoint!r}: ds01 reaches etcd only over mutual TLS; write "
                f"https://{endpoint.removeprefix('http://')} or HOST:PORT",
            )
        problem = _check_address(endpoint.removeprefix("https://"))
        if problem:
            raise reader.error(f"endpoints[{i}]", problem)
    if not endpoints:
        raise reader.error("endpoints", "needs at least one etcd endpoint")
    reader.reject_unknown()
    return tuple(e.removeprefix("https://") for e in endpoints)


def _read_inventory(reader: _Reader, base: Path) -> InventoryConfig:
    inventory = InventoryConfig(
        source=reader.one_of("source", "auto", INVENTORY_SOURCES),
        file=reader.path("file", InventoryConfig.file, base),
    )
    reader.reject_unknown()
    return inventory


def _read_allocator(reader: _Reader) -> AllocatorConfig:
    allocator = AllocatorConfig(
        strategy=reader.one_of("strategy", "least_allocated", ("least_allocated", "pack")),
        lock_ttl=reader.whole("lock_ttl", AllocatorConfig.lock_ttl, minimum=2, maximum=300),
    )
    reader.reject_unknown()
    return allocator


def _read_containers(reader: _Reader, base: Path) -> ContainersConfig:
    mode = reader.str("network_mode", "")
    interval = reader.whole("reconcile_interval", 30, minimum=1, maximum=3600)
    metadata = reader.path("ds01_metadata_dir", ContainersConfig.ds01_metadata_dir, base)
    containers = ContainersConfig(
        network_mode=mode or None,
        reconcile_interval=interval,
        ds01_metadata_dir=metadata,
        default_gpus=reader.whole("default_gpus", 1, minimum=0, maximum=64),
        default_gpu_kind=reader.one_of("default_gpu_kind", "any", ("any", "mig", "full")),
    )
    reader.reject_unknown()
    return containers


def _read_ownership(reader: _Reader, base: Path) -> OwnershipConfig:
    ownership = OwnershipConfig(
        enroll_socket=reader.path("enroll_socket", OwnershipConfig.enroll_socket, base),
        proxy_socket=reader.path("proxy_socket", OwnershipConfig.proxy_socket, base),
    )
    reader.reject_unknown()
    return ownership


def _read_metrics(reader: _Reader, base: Path) -> MetricsConfig:
    listen_reader = reader.section("listen")
    listen: dict[str, str | None] = dict(MetricsConfig().listen)
    for service in SERVICES:
        value = listen_reader.raw.get(service, listen[service])
        listen_reader.used.add(service)
        if value in (False, "off", None):  # YAML reads a bare off as False
            listen[service] = None
            continue
        listen[service] = listen_reader.str(service, value, check=_check_metrics_address)
    listen_reader.reject_unknown()
    token = reader.str("token_file", "")
    metrics = MetricsConfig(
        listen=listen,
        token_file=reader.path("token_file", Path(), base) if token else None,
        tls=reader.flag("tls", False),
        anonymous=reader.flag("anonymous", False),
    )
    if metrics.token_file is not None and not metrics.token_file.is_file():
        raise reader.error("token_file", f"{metrics.token_file} does not exist")
    for service, address in listen.items():
        open_to_network = address is not None and not _loopback(address)
        if open_to_network and metrics.anonymous:
            raise reader.error(
                "anonymous", f"metrics.listen.{service} is {address}: anonymous is for loopback"
            )
        if open_to_network and metrics.token_file is None and not metrics.tls:
            raise reader.error(
                f"listen.{service}",
                f"{address} is not loopback: anyone on the network could read who holds "
                "which GPU; set metrics.token_file or metrics.tls: true, or listen on 127.0.0.1",
            )
    reader.reject_unknown()
    return metrics


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_metrics_address(value: str) -> str | None:
    """HOST:PORT; port 0 takes any free port (the log says which)."""
    host, sep, port = value.rpartition(":")
    if sep and host and port == "0":
        return None
    return _check_address(value)


_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def _check_node(value: str) -> str | None:
    """A node's name is part of etcd keys (``/ds01/v1/slots/<node>/<slot>``), labels and
    metrics: a host name, which never holds a slash or a space."""
    if _NODE_NAME.fullmatch(value):
        return None
    return (
        f"{value!r} is not a host name: use letters, digits, '.', '-' and '_', starting "
        "with a letter or digit (this host's own name is the default)"
    )


def _check_address(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        return f"{value!r} is not HOST:PORT"
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f"{value!r}: port must be a number from 1 to 65535"
    return None


def _check_docker_host(value: str) -> str | None:
    if value.startswith("unix://") or value.startswith("tcp://127."):
        return None
    return f"{value!r}: use unix:///path/to/docker.sock (or tcp://127.x.x.x:PORT)"


class _Reader:
    """Reads one mapping of the file, remembering which keys were used."""

    def __init__(self, file: Path, raw: Any, prefix: str) -> None:
        self.file = file
        self.prefix = prefix
        if not isinstance(raw, dict):
            where = f"key {prefix.rstrip('.')!r}" if prefix else "top level"
            raise ConfigError(f"{file}: {where} must be a mapping, got {type(raw).__name__}")
        self.raw = raw
        self.used: set[str] = set()

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.file}: key {self.prefix}{key!s}: {problem}")

    def _get(self, key: str) -> Any:
        self.used.add(key)
        return self.raw.get(key)

    def section(self, key: str) -> _Reader:
        value = self._get(key)
        return _Reader(self.file, {} if value is None else value, f"{self.prefix}{key}.")

    def str(self, key: str, default: str, check: Callable[[str], str | None] | None = None) -> str:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        problem = check(value) if check else None
        if problem:
            raise self.error(key, problem)
        return value

    def whole(self, key: str, default: int, minimum: int, maximum: int) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be a whole number, got {value!r}")
        if not minimum <= value <= maximum:
            raise self.error(key, f"must be from {minimum} to {maximum}, got {value}")
        return value

    def choice_str(
        self, section: str, key: str, default: str, check: Callable[[str], str | None]
    ) -> str:
        sub = self.section(section)
        value = sub.str(key, default, check)
        sub.reject_unknown()
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def one_of(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.str(key, default)
        if value not in choices:
            raise self.error(key, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def path(self, key: str, default: Path, base: Path) -> Path:
        value = self.str(key, str(default))
        try:
            return (base / Path(value).expanduser()).resolve()
        except (ValueError, RuntimeError, OSError) as err:
            raise self.error(key, f"{value!r} is not a usable path: {err}") from err

    def list_of_str(self, key: str, default: list[str]) -> list[str]:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"must be a list of strings, got {value!r}")
        return value

    def reject_unknown(self) -> None:
        unknown = sorted(str(k) for k in self.raw if k not in self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key (check the spelling)")
