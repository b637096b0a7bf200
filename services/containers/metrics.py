"""The containers service's metrics: this node's containers under DS01's names, what the
lifecycle and the reconciler did, users' CPU and memory, and GPU use outside ds01.

Read at each scrape: the records in etcd, Docker's list, the users' cgroups.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from ds01.containers.adapters import DockerHost, Metadata
from ds01.containers.adoption import gpu_references, made_by_gateway, unaccounted
from ds01.core.metrics import ServiceMetrics

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Unmanaged:
    """A container that uses GPUs ds01 did not allocate to it."""

    name: str
    user: str
    gpus: str  # how many, or ALL
    access: str  # device_request, runtime_env or label
    running: bool


@dataclass
class Tallies:
    """What this process did since it started, by kind (counters for Prometheus)."""

    lifecycle: Tally[str]  # created, started, stopped, idle_warning, ..., adopted
    reconcile: Tally[str]  # the reconciler's actions: warn_idle, stop_idle, ...
    sweeps: Callable[[], tuple[int, float, float]]  # how many, their seconds, the last's


def container_metrics(node: str, records: Sequence[Metadata]) -> list[Metric]:
    totals = GaugeMetricFamily(
        "ds01_containers_total",
        "ds01's containers on this node by Docker status and interface (container type).",
        labels=["node", "status", "interface"],
    )
    per_user = GaugeMetricFamily(
        "ds01_user_containers_count", "A user's containers on this node.", labels=["node", "user"]
    )
    by_kind = Tally((r.status or "unknown", r.container_type or "unknown") for r in records)
    for (status, interface), count in sorted(by_kind.items()):
        totals.add_metric([node, status, interface], count)
    for user, count in sorted(Tally(r.user for r in records).items()):
        per_user.add_metric([node, user], count)
    return [totals, per_user]


def tally_metrics(tallies: Tallies) -> list[Metric]:
    events = CounterMetricFamily(
        "ds01_lifecycle_events",
        "Container lifecycle events on this node since the service started, by event.",
        labels=["event"],
    )
    for kind, count in sorted(tallies.lifecycle.items()):
        events.add_metric([kind], count)
    actions = CounterMetricFamily(
        "ds01_reconcile_actions",
        "What the reconciler did to containers (idle warnings and stops, runtime stops, "
        "removals), by action.",
        labels=["action"],
    )
    for kind, count in sorted(tallies.reconcile.items()):
        actions.add_metric([kind], count)
    count, seconds, last = tallies.sweeps()
    sweeps = SummaryMetricFamily(
        "ds01_reconcile_sweep_seconds",
        "The reconciler's sweeps over this node's containers: how many, and their time.",
        count_value=count,
        sum_value=seconds,
    )
    latest = GaugeMetricFamily(
        "ds01_reconcile_last_sweep_seconds",
        "How long the last sweep took: it grows with the containers on the node.",
        value=last,
    )
    return [events, actions, sweeps, latest]


def find_unmanaged(attrs: Iterable[dict[str, Any]], allocations: Sequence[Any]) -> list[Unmanaged]:
    """Containers (Docker's inspect) that use GPUs not allocated to them by ds01."""
    found = []
    for container in attrs:
        config, host = container.get("Config") or {}, container.get("HostConfig") or {}
        labels = config.get("Labels") or {}
        if made_by_gateway(labels):  # the gateway voids any GPU a user's create asks for
            continue
        requests = [r for r in host.get("DeviceRequests") or [] if _is_gpu_request(r)]
        device_ids = [i for r in requests for i in r.get("DeviceIDs") or []]
        every = any(r.get("Count") == -1 for r in requests)
        references = gpu_references(labels, config.get("Env") or [], device_ids)
        if not references and not requests:
            continue
        name = (container.get("Name") or "").lstrip("/")
        if references and not every and not unaccounted(name, references, allocations):
            continue  # every GPU it names is allocated to it
        access = "device_request" if requests else "label" if _labelled(labels) else "runtime_env"
        found.append(
            Unmanaged(
                name=name,
                user=labels.get("ds01.user") or labels.get("aime.mlc.USER") or "unknown",
                gpus="ALL" if every or "all" in references else str(len(references)),
                access=access,
                running=bool((container.get("State") or {}).get("Running")),
            )
        )
    return found


def _is_gpu_request(request: dict[str, Any]) -> bool:
    capabilities = [c for group in request.get("Capabilities") or [] for c in group]
    return request.get("Driver") == "nvidia" or "gpu" in capabilities


def _labelled(labels: dict[str, str]) -> bool:
    return any(k.startswith(("ds01.gpu", "aime.mlc.GPUS")) for k in labels)


def unmanaged_metrics(node: str, unmanaged: Sequence[Unmanaged]) -> list[Metric]:
    each = GaugeMetricFamily(
        "ds01_unmanaged_gpu_container",
        "A container that uses GPUs ds01 did not allocate to it (1).",
        labels=["node", "container", "user", "gpu_count", "access_type", "running"],
    )
    for u in unmanaged:
        each.add_metric(
            [node, u.name, u.user, u.gpus, u.access, "true" if u.running else "false"], 1
        )
    count = GaugeMetricFamily(
        "ds01_unmanaged_gpu_count", "Containers using GPUs outside ds01.", labels=["node"]
    )
    count.add_metric([node], len(unmanaged))
    running = GaugeMetricFamily(
        "ds01_unmanaged_gpu_running", "Running containers using GPUs outside ds01.",
        labels=["node"],
    )  # fmt: skip
    running.add_metric([node], sum(1 for u in unmanaged if u.running))
    return [each, count, running]


def cgroup_path(parent: str) -> Path:
    """A cgroup parent as a path under a hierarchy's root: /ds01/g/u for cgroupfs, the
    nested slices for systemd (ds01-g-u.slice is ds01.slice/ds01-g.slice/...)."""
    if not parent.endswith(".slice"):
        return Path(parent.strip("/"))
    parts = parent.removesuffix(".slice").split("-")
    return Path(*("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts))))


def usage_of(parent: str, root: Path = CGROUP_ROOT) -> tuple[float | None, int | None]:
    """CPU seconds and memory bytes of a cgroup, on cgroup v2 or v1 (None: not there)."""
    relative = cgroup_path(parent)
    if (root / "cgroup.controllers").exists():
        stat = _read(root / relative / "cpu.stat")
        fields = dict(line.split() for line in stat.splitlines() if " " in line)
        cpu = int(fields["usage_usec"]) / 1e6 if "usage_usec" in fields else None
        memory = _read(root / relative / "memory.current")
    else:
        nanoseconds = _read(root / "cpuacct" / relative / "cpuacct.usage")
        cpu = int(nanoseconds) / 1e9 if nanoseconds else None
        memory = _read(root / "memory" / relative / "memory.usage_in_bytes")
    return cpu, int(memory) if memory else None


def usage_metrics(node: str, parents: dict[str, str], root: Path = CGROUP_ROOT) -> list[Metric]:
    """Each user's CPU time and memory, from the cgroup all their containers run under."""
    cpu_family = CounterMetricFamily(
        "ds01_user_cpu_usage_seconds",
        "CPU time used by all of a user's containers on this node.",
        labels=["node", "user"],
    )
    memory_family = GaugeMetricFamily(
        "ds01_user_memory_current_bytes",
        "Memory in use by all of a user's containers on this node.",
        labels=["node", "user"],
    )
    for user, parent in sorted(parents.items()):
        cpu, memory = usage_of(parent, root)
        if cpu is not None:
            cpu_family.add_metric([node, user], cpu)
        if memory is not None:
            memory_family.add_metric([node, user], memory)
    return [cpu_family, memory_family]


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:  # no such cgroup (yet)
        return ""


class InspectCache:
    """Each container's inspect, once: what says it uses GPUs (labels, environment,
    device requests) never changes after create; whether it runs comes from the list.
    Only those parts are kept: a whole inspect is tens of kilobytes in Python, times
    thousands of containers."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, Any]] = {}

    def all(self, client: Any) -> list[dict[str, Any]]:
        summaries = client.api.containers(all=True)
        found = []
        for summary in summaries:
            attrs = self._seen.get(summary["Id"])
            if attrs is None:
                try:
                    attrs = _gpu_facts(client.api.inspect_container(summary["Id"]))
                except Exception:  # removed between the list and the inspect
                    continue
                self._seen[summary["Id"]] = attrs
            found.append({**attrs, "State": {"Running": summary.get("State") == "running"}})
        listed = {s["Id"] for s in summaries}
        for gone in set(self._seen) - listed:
            del self._seen[gone]
        return found


def _gpu_facts(inspect: dict[str, Any]) -> dict[str, Any]:
    """What ``find_unmanaged`` reads of an inspect."""
    config, host = inspect.get("Config") or {}, inspect.get("HostConfig") or {}
    return {
        "Name": inspect.get("Name"),
        "Config": {"Labels": config.get("Labels"), "Env": config.get("Env")},
        "HostConfig": {"DeviceRequests": host.get("DeviceRequests")},
    }


def register(
    metrics: ServiceMetrics,
    node: str,
    records: Callable[[], Awaitable[list[Metadata]]],
    docker: DockerHost,
    allocations: Callable[[], Awaitable[list[Any]]],
    tallies: Tallies,
) -> None:
    cache = InspectCache()

    async def collect() -> Iterable[Metric]:
        mine = await records()
        attrs = await docker.run(cache.all, docker.client)
        parents = {r.user: r.limits["cgroup_parent"] for r in mine if r.limits.get("cgroup_parent")}
        return [
            *container_metrics(node, mine),
            *unmanaged_metrics(node, find_unmanaged(attrs, await allocations())),
            *usage_metrics(node, parents),
        ]

    metrics.add_async(collect)
    metrics.add(lambda: tally_metrics(tallies))
