"""The ownership service's metrics: what the Docker gateway decided, and for whom."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ds01.core.metrics import ServiceMetrics
from ds01.ownership.gateway.relay import GatewayStats


def gateway_metrics(stats: GatewayStats) -> list[Metric]:
    requests = CounterMetricFamily(
        "ds01_gateway_requests",
        "Docker API requests through the gateway, by route class (container_create, "
        "container_list, ...; admin GET for admins' requests) and decision: allowed, "
        "denied, answered (by the gateway itself) or failed.",
        labels=["route", "decision"],
    )
    for (route, decision), count in sorted(stats.requests.items()):
        requests.add_metric([route, decision], count)
    denials = CounterMetricFamily(
        "ds01_gateway_denials",
        "Requests the gateway refused, by reason: policy (the request's content), "
        "route_not_allowed (admins only), bad_request, too_many_connections.",
        labels=["reason"],
    )
    for reason, count in sorted(stats.denials.items()):
        denials.add_metric([reason], count)
    connections = GaugeMetricFamily(
        "ds01_gateway_open_connections", "Connections open to the gateway, by user.",
        labels=["user"],
    )  # fmt: skip
    for user, count in sorted(stats.connections.items()):
        connections.add_metric([user], count)
    return [requests, denials, connections]


def register(metrics: ServiceMetrics, stats: GatewayStats) -> None:
    metrics.add(lambda: gateway_metrics(stats))
