"""The suite configuration file: defaults that work, and errors that say where."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds01.core.config import Config, ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def test_missing_default_file_gives_single_machine_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("DS01_CONFIG", raising=False)
    monkeypatch.setattr("ds01.core.config.DEFAULT_CONFIG_PATH", tmp_path / "absent.yaml")
    config = load_config()
    assert config.address("limits") == "127.0.0.1:50051"
    assert config.etcd_endpoints == ("127.0.0.1:2379",)
    assert config.state_dir == Path("/var/lib/ds01")
    assert config.pki.root == Path("/var/lib/ds01/pki")


def test_the_shipped_file_loads_with_paths_beside_it():
    config = load_config(REPO / "config" / "ds01.yaml")
    assert config.limits_file == REPO / "config" / "resource-limits.yaml"
    assert config.inventory.file == REPO / "config" / "inventory.yaml"
    assert config == Config(
        node=config.node,
        source=config.source,
        limits_file=config.limits_file,
        inventory=config.inventory,
    )


def test_an_explicitly_named_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"absent\.yaml: configuration file not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen:\n  limits: 127.0.0.1\n", "key listen.limits: '127.0.0.1' is not HOST:PORT"),
        ("listen:\n  limits: 127.0.0.1:99999\n", "key listen.limits: .* port must be a number"),
        ("listen:\n  limitz: 127.0.0.1:1\n", "key listen.limitz: unknown key"),
        ("stat_dir: /tmp\n", "key stat_dir: unknown key"),
        ("etcd:\n  endpoints: []\n", "key etcd.endpoints: needs at least one"),
        ("etcd:\n  endpoints: [5]\n", "key etcd.endpoints: must be a list of strings"),
        ("inventory:\n  source: gpu\n", "key inventory.source: 'gpu' is not one of"),
        ("docker:\n  host: /var/run/docker.sock\n", "key docker.host: .* use unix://"),
        ("log_level: loud\n", "key log_level: 'loud' is not one of"),
        ("node: rack1/gpu-01\n", "key node: 'rack1/gpu-01' is not a host name"),
        ("node: ../etc\n", "key node: '../etc' is not a host name"),
        ("node: gpu 01\n", "key node: 'gpu 01' is not a host name"),
        ("node: -gpu\n", "key node: '-gpu' is not a host name"),
        ('node: "gpu\\n01"\n', r"key node: 'gpu\\n01' is not a host name"),
        ("node: ''\n", "key node: must be a non-empty string"),
        ("node: 7\n", "key node: must be a non-empty string"),
        ("listen: [1, 2]\n", "key 'listen' must be a mapping"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("listen:\n  limits: [oops\n", r"line \d+ is not valid YAML"),
    ],
)
def test_bad_files_name_file_key_and_problem(text: str, message: str):
    file = Path("/etc/ds01/ds01.yaml")
    with pytest.raises(ConfigError, match=message) as error:
        parse_config(text, file)
    assert str(error.value).startswith(f"{file}:")


@pytest.mark.parametrize("node", ["gpu-node-01", "gpu-node-01.lab.example.org", "n1", "DGX_A"])
def test_host_names_are_node_names(node: str):
    assert parse_config(f"node: {node}\n", Path("/etc/ds01/ds01.yaml")).node == node


def test_etcd_endpoint_may_be_written_as_https_url():
    config = parse_config("etcd:\n  endpoints: https://127.0.0.1:2379\n", Path("/x/ds01.yaml"))
    assert config.etcd_endpoints == ("127.0.0.1:2379",)


def test_an_etcd_endpoint_without_tls_is_refused():
    file = Path("/x/ds01.yaml")
    with pytest.raises(ConfigError) as error:
        parse_config("etcd:\n  endpoints: [http://127.0.0.1:2379]\n", file)
    assert str(error.value) == (
        f"{file}: key etcd.endpoints[0]: 'http://127.0.0.1:2379': ds01 reaches etcd only "
        "over mutual TLS; write https://127.0.0.1:2379 or HOST:PORT"
    )
