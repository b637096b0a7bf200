"""compose.yaml stays in step with the suite: one container per service, plus etcd."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from ds01.core.config import Config
from ds01.core.launcher import parse_services
from ds01.core.pki import SERVICES, Pki
from ds01.core.processes import etcd_tls_flags
from tests.allocator_env import AllocatorEnv
from tests.harness import require_binary

REPO = Path(__file__).resolve().parent.parent


def _compose(*files: str) -> dict:
    """compose.yaml as Debian's docker-compose reads it, with the defaults of a host
    (no DS01_* variables set)."""
    require_binary("docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DS01_", "DOCKER_"))}
    argv = ["docker-compose", *(arg for f in files or ["compose.yaml"] for arg in ("-f", f))]
    result = subprocess.run(
        [*argv, "config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, (files, result.stderr)
    return yaml.safe_load(result.stdout)


def test_compose_runs_each_service_in_its_own_container():
    services = _compose()["services"]
    assert set(services) == {"etcd", *SERVICES}
    for name in SERVICES:
        command = services[name]["command"]
        assert parse_services(command[command.index("--services") + 1]) == [name]
        assert services[name]["network_mode"] == "host"  # no bridges, loopback only
        assert "/var/lib/ds01/pki:/var/lib/ds01/pki:ro" in services[name]["volumes"]


def test_compose_etcd_answers_only_certificates_of_the_etcd_ca():
    """The same TLS flags as the etcd ``ds01d --local`` and the tests start."""
    etcd = _compose()["services"]["etcd"]
    command = etcd["command"]
    pki = Pki(Path("/var/lib/ds01/pki")).etcd
    assert set(etcd_tls_flags(pki)) <= set(command)
    urls = [a for a in command if "-urls=" in a or a.startswith("--initial-cluster=")]
    assert urls and all("https://127.0.0.1:" in a and "http://" not in a for a in urls)
    assert f"{pki.root}:{pki.root}:ro" in etcd["volumes"]


def test_the_gpu_file_gives_nvml_to_the_allocator_and_the_containers_service():
    services = _compose("compose.yaml", "compose.gpu.yaml")["services"]
    for name in ("allocator", "containers"):
        assert services[name]["runtime"] == "nvidia"
        assert services[name]["environment"]["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "runtime" not in services["ownership"]


def test_the_gateway_gets_mount_rights_not_privileged_mode():
    """CAP_SYS_ADMIN for its pins, nothing else: no devices, no host PID namespace."""
    ownership = _compose()["services"]["ownership"]
    assert not ownership.get("privileged") and "pid" not in ownership
    assert ownership["cap_add"] == ["SYS_ADMIN"]
    pins = Config().state_dir / "pins"
    assert f"{pins}:{pins}:rshared" in ownership["volumes"]  # dockerd must see the pins


def test_each_service_is_healthy_over_mtls_and_starts_after_what_it_needs():
    services = _compose()["services"]
    needs = {
        "limits": {"etcd"},
        "allocator": {"etcd", "limits"},
        "containers": {"etcd", "limits", "allocator"},
        "ownership": {"etcd", "limits"},
    }
    for name in SERVICES:
        test = services[name]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "ds01"] and test[-3:] == ["status", "--service", name]
        depends = services[name]["depends_on"]
        assert set(depends) == needs[name]
        assert all(d["condition"] == "service_healthy" for d in depends.values())
    assert "endpoint" in services["etcd"]["healthcheck"]["test"]


def test_the_services_see_what_they_read_on_the_host():
    services = _compose()["services"]
    for name in SERVICES:
        volumes = services[name]["volumes"]
        assert {"/etc/passwd:/etc/passwd:ro", "/etc/group:/etc/group:ro"} <= set(volumes)
    for name in ("containers", "ownership"):
        mounts = {v.split(":")[1] for v in services[name]["volumes"]}
        assert {"/home", "/sys/fs/cgroup"} <= mounts


def test_etcd_keeps_its_data_where_make_run_does():
    etcd = _compose()["services"]["etcd"]
    data = Config().state_dir / "etcd" / "data"  # make run: the state dir's etcd/data
    assert f"--data-dir={data}" in etcd["command"]
    assert any(v.startswith(f"{data.parent}:{data.parent}") for v in etcd["volumes"])


async def test_status_of_one_service_is_a_health_check(env: AllocatorEnv):
    serving = await env.cli("root", "status", "--service", "limits")
    assert serving.returncode == 0, serving.stderr
    assert "limits" in serving.stdout and "allocator" not in serving.stdout
    absent = await env.cli("root", "status", "--service", "containers")  # not running here
    assert absent.returncode == 1
