"""`ds01 admin` PKI commands, through the installed console script."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from ds01.core.pki import SERVICES
from ds01.core.processes import free_port

REPO = Path(__file__).resolve().parent.parent
DS01 = str(REPO / ".venv" / "bin" / "ds01")


def ds01(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DS01, "--config", str(config), *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "ds01.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state")}))
    return path


def test_pki_init_creates_ca_service_and_admin_certificates_once(config_file: Path):
    first = ds01(config_file, "admin", "pki", "init")
    assert first.returncode == 0, first.stderr
    pki = config_file.parent / "state" / "pki"
    ca = (pki / "ca.crt").read_bytes()
    for name in ("limits", "allocator", "containers", "ownership"):
        cert = x509.load_pem_x509_certificate((pki / "services" / f"{name}.crt").read_bytes())
        assert cert.subject.rfc4514_string() == f"CN=svc:{name}"
    assert (pki / "clients" / "root.crt").is_file()
    again = ds01(config_file, "admin", "pki", "init")
    assert again.returncode == 0 and "already present" in again.stdout
    assert (pki / "ca.crt").read_bytes() == ca  # never replaced without --force


def test_issue_cert_writes_a_certificate_for_that_user_only(config_file: Path, tmp_path: Path):
    assert ds01(config_file, "admin", "pki", "init").returncode == 0
    out = tmp_path / "for-h.baker"
    result = ds01(
        config_file, "admin", "issue-cert", "h.baker@hertie-school.lan", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate((out / "client.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=h.baker@hertie-school.lan"
    assert (out / "client.key").stat().st_mode & 0o777 == 0o600
    assert (out / "ca.crt").read_bytes() == (tmp_path / "state" / "pki" / "ca.crt").read_bytes()


@pytest.mark.parametrize("user", ["svc:limits", "-rf", "a b", "x" * 200])
def test_issue_cert_refuses_names_that_are_not_users(config_file: Path, user: str):
    assert ds01(config_file, "admin", "pki", "init").returncode == 0
    result = ds01(config_file, "admin", "issue-cert", "--", user)
    assert result.returncode == 1
    assert result.stderr.startswith("ds01: error:") and "Traceback" not in result.stderr


def test_issue_cert_without_a_ca_says_what_to_run(config_file: Path):
    result = ds01(config_file, "admin", "issue-cert", "alice")
    assert result.returncode == 1
    assert "run `ds01 admin pki init` first" in result.stderr


def test_a_broken_config_is_reported_not_raised(tmp_path: Path):
    config = tmp_path / "ds01.yaml"
    config.write_text("listen:\n  limits: nowhere\n")
    result = ds01(config, "status")
    assert result.returncode == 2
    assert f"{config}: key listen.limits: 'nowhere' is not HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("program", ["ds01", "ds01d"])
def test_version_names_the_program_and_the_installed_version(program: str):
    from importlib.metadata import version

    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / program), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{program} {version('ds01')}"


def test_status_with_every_service_down_says_so_and_what_an_admin_looks_at(tmp_path: Path):
    ports = {s: f"127.0.0.1:{free_port()}" for s in SERVICES}  # nothing listens there
    config = tmp_path / "ds01.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "listen": ports}))
    assert ds01(config, "admin", "pki", "init").returncode == 0
    down = ds01(config, "status")
    assert down.returncode == 1
    rows = down.stdout.splitlines()[1:]
    assert [row.split()[:3] for row in rows] == [[s, ports[s], "UNAVAILABLE"] for s in SERVICES]
    assert all("cannot reach the" in row and "ds01 status" not in row for row in rows)
    assert down.stderr.startswith(f"not serving: {', '.join(SERVICES)}.")
    assert "systemctl status ds01.target" in down.stderr
    as_json = ds01(config, "-o", "json", "status")
    assert as_json.returncode == 1 and as_json.stderr == ""
    assert [r["status"] for r in yaml.safe_load(as_json.stdout)] == ["UNAVAILABLE"] * 4
    other = ds01(config, "limits")  # any other command points to status
    assert "is ds01d running? (`ds01 status` checks them all)" in other.stderr
