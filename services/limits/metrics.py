"""The limits service's metrics: who is in which group (DS01's names), for joins such as
GPU-equivalents per group, and whether the configuration in force is the one on disk."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from ds01.core.metrics import ServiceMetrics
from ds01.limits.config import LimitsConfig
from ds01.limits.store import LimitsStore


def group_metrics(config: LimitsConfig) -> list[Metric]:
    info = GaugeMetricFamily(
        "ds01_user_group_info",
        "A user listed in a group's member list (1); the first group listing them wins.",
        labels=["user", "group"],
    )
    members = GaugeMetricFamily(
        "ds01_group_members_total", "Users a group lists (first listing wins).", labels=["group"]
    )
    placed: set[str] = set()
    for group in config.groups.values():
        mine = [u for u in dict.fromkeys(group.members) if u not in placed]
        placed.update(mine)
        for user in mine:
            info.add_metric([user, group.name], 1)
        members.add_metric([group.name], len(mine))
    return [info, members]


def register(metrics: ServiceMetrics, store: LimitsStore) -> None:
    def collect() -> Iterator[Metric]:
        loaded = GaugeMetricFamily(
            "ds01_limits_config_valid",
            "Whether the limits files on disk were read without error (0: the service "
            "keeps serving the last good configuration; `ds01 limits check` says why).",
        )
        loaded.add_metric([], 0 if store.error else 1)
        yield loaded
        if store.config is not None:
            yield from group_metrics(store.config)

    metrics.add(collect)
