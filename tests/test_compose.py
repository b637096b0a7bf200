"""compose.yaml stays in step with the suite: one container per service, plus etcd."""

from __future__ import annotations

from pathlib import Path

import yaml

from ds01.core.launcher import parse_services
from ds01.core.pki import SERVICES, Pki
from ds01.core.processes import etcd_tls_flags

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


def test_compose_etcd_answers_only_certificates_of_the_etcd_ca():
    """The same TLS flags as the etcd ``ds01d --local`` and the tests start."""
    etcd = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]["etcd"]
    command = etcd["command"]
    pki = Pki(Path("/var/lib/ds01/pki")).etcd
    assert set(etcd_tls_flags(pki)) <= set(command)
    urls = [a for a in command if "-urls=" in a or a.startswith("--initial-cluster=")]
    assert urls and all("https://127.0.0.1:" in a and "http://" not in a for a in urls)
    assert f"{pki.root}:{pki.root}:ro" in etcd["volumes"]
