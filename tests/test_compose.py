"""compose.yaml stays in step with the suite: one container per service, plus etcd."""

from __future__ import annotations

from pathlib import Path

import yaml

from ds01.core.launcher import parse_services
from ds01.core.pki import SERVICES

REPO = Path(__file__).resolve().parent.parent


def test_compose_runs_each_service_in_its_own_container():
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"etcd", *SERVICES}
    for name in SERVICES:
        command = services[name]["command"]
        assert parse_services(command[command.index("--services") + 1]) == [name]
        assert services[name]["network_mode"] == "host"  # no bridges, loopback only
        assert "/var/lib/ds01/pki:/var/lib/ds01/pki:ro" in services[name]["volumes"]
