"""/metrics of each service: DS01's names for who holds which GPU, gRPC calls by method
and status, dependencies, and an endpoint that is safe off loopback."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ds01.allocator.etcd_state import Snapshot
from ds01.allocator.records import Holder
from ds01.allocator.server import HolderTypes
from ds01.client import Ds01Error
from ds01.containers.adapters import METADATA, Metadata, record_key
from ds01.core.config import ConfigError, parse_config
from ds01.core.etcd import connect
from ds01.core.metrics import MetricsEndpoint, ServiceMetrics
from ds01.core.pki import Pki
from ds01.core.tls import server_context
from tests.allocator_env import AllocatorEnv
from tests.harness import metrics_token, scrape_metrics


def value(samples: dict, name: str, **labels: str) -> float | None:
    found = [v for have, v in samples.get(name, []) if labels.items() <= have.items()]
    return sum(found) if found else None


async def scrape_off_loop(env: AllocatorEnv, service: str) -> dict[str, list[tuple[dict, float]]]:
    """A scrape reads etcd on the service's loop: it must come from another thread."""
    address = env.services[service].metrics_address
    assert address is not None
    return await asyncio.to_thread(scrape_metrics, address, metrics_token(env.config))


async def test_allocations_show_with_ds01s_names_and_labels(env: AllocatorEnv):
    async with env.client("alice") as alice:
        await alice.allocate("proj._.alice")
    samples = await scrape_off_loop(env, "allocator")
    [(labels, one)] = samples["ds01_gpu_allocated"]
    assert one == 1
    assert labels["user"] == "alice" and labels["container"] == "proj._.alice"
    assert labels["gpu_slot"] == "2.1" and labels["state"] == "allocated"  # DS01's "2.1"
    assert labels["node"] == env.config.node
    assert value(samples, "ds01_user_gpus_allocated", user="alice") == 1
    assert value(samples, "ds01_user_gpu_equivalents", user="alice") == pytest.approx(2 / 7)
    assert value(samples, "ds01_gpu_equivalents", state="allocated") == pytest.approx(2 / 7)
    assert value(samples, "ds01_node_up", node=env.config.node) == 1
    assert value(samples, "ds01_allocators", node=env.config.node) == 1  # it announced itself
    migs = {labels["mig_uuid"] for labels, _ in samples["ds01_mig_slot_info"]}
    assert "MIG-0002-1" in migs
    assert value(samples, "ds01_exporter_info", service="allocator") == 1
    # One claim, sent alone: one etcd transaction (batches show as fewer than writes).
    assert value(samples, "ds01_allocator_etcd_writes_total") == 1
    assert value(samples, "ds01_allocator_etcd_write_transactions_total") == 1


async def test_grpc_calls_are_counted_by_method_and_status(env: AllocatorEnv):
    before = await scrape_off_loop(env, "allocator")
    async with env.client("alice") as alice:
        await alice.allocate("one._.alice")
        with pytest.raises(Ds01Error):
            await alice.allocate("one._.bob")  # not hers to name: refused
    after = await scrape_off_loop(env, "allocator")

    def grown(code: str) -> float:
        name = "grpc_server_handled_total"
        labels = {"grpc_method": "Allocate", "grpc_code": code}
        return (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)

    assert grown("OK") == 1
    assert grown("INVALID_ARGUMENT") == 1
    timed = value(after, "grpc_server_handling_seconds_count", grpc_method="Allocate")
    assert timed is not None and timed >= 2
    assert value(after, "ds01_dependency_up", dependency="etcd") == 1


def test_metrics_off_loopback_need_a_token_or_tls(tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    for listen in ("0.0.0.0:9101", "192.0.2.7:9101", "[::]:9101", "gpu7.lab:9101"):
        with pytest.raises(ConfigError, match="not loopback"):
            parse_config(f"metrics: {{listen: {{allocator: '{listen}'}}}}", tmp_path / "a.yaml")
        for extra in (f"token_file: {token}", "tls: true"):
            text = f"metrics: {{listen: {{allocator: '{listen}'}}, {extra}}}"
            assert parse_config(text, tmp_path / "a.yaml").metrics.listen["allocator"] == listen
    config = parse_config("metrics: {listen: {allocator: off}}", tmp_path / "a.yaml")
    assert config.metrics.listen["allocator"] is None
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config("metrics: {token_file: nowhere}", tmp_path / "a.yaml")


def test_a_token_protected_endpoint_refuses_scrapes_without_it():
    metrics = ServiceMetrics("limits", "n1", "0.1.0")
    endpoint = MetricsEndpoint(metrics, "127.0.0.1:0", token="s3cret")
    address = endpoint.start()
    try:
        for wrong in (None, "wrong", "S3CRET", "s3cre", "s3cret2"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                scrape_metrics(address, wrong)
            assert refused.value.code == 401
        assert value(scrape_metrics(address, "s3cret"), "ds01_exporter_info", service="limits") == 1
    finally:
        endpoint.stop()


def test_a_tls_endpoint_serves_https_with_the_services_certificate(pki: Pki):
    metrics = ServiceMetrics("allocator", "n1", "0.1.0")
    endpoint = MetricsEndpoint(metrics, "127.0.0.1:0", tls=server_context(pki, "allocator"))
    address = endpoint.start()
    try:
        trusted = ssl.create_default_context(cafile=str(pki.ca_cert))
        with urllib.request.urlopen(f"https://{address}/metrics", context=trusted) as answer:
            assert b"ds01_exporter_info" in answer.read()
        with pytest.raises(OSError):  # plain HTTP gets nothing
            urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read()
        with pytest.raises(OSError):  # nor a client that trusts another CA
            urllib.request.urlopen(f"https://{address}/metrics", timeout=5).read()
    finally:
        endpoint.stop()


@pytest.mark.usefixtures("unix_users")
async def test_a_local_user_cannot_read_the_metrics_on_loopback(env: AllocatorEnv):
    """They name every user's containers: by default a token is asked even on loopback,
    and it lives in a file only root (and its group) may read."""
    address = env.services["allocator"].metrics_address
    assert address is not None
    token_file = env.config.state_dir / "metrics.token"
    assert token_file.stat().st_mode & 0o777 == 0o640 and token_file.stat().st_uid == 0
    for header in ([], ["-H", "Authorization: Bearer guess"], ["-H", "Authorization: Basic x"]):
        argv = ["runuser", "-u", "ds01alice", "--", "curl", "-s", "-o", "/dev/null",
                "-w", "%{http_code}", *header, f"http://{address}/metrics"]  # fmt: skip
        answer = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True)
        assert answer.stdout == "401", (header, answer.stdout, answer.stderr)
    stolen = await asyncio.to_thread(
        subprocess.run, ["runuser", "-u", "ds01alice", "--", "cat", str(token_file)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert stolen.returncode != 0 and "Permission denied" in stolen.stderr


def test_anonymous_metrics_are_for_loopback_only(tmp_path: Path):
    config = parse_config("metrics: {anonymous: true}", tmp_path / "a.yaml")
    assert config.metrics.anonymous
    with pytest.raises(ConfigError, match="anonymous is for loopback"):
        parse_config(
            "metrics: {anonymous: true, tls: true, listen: {limits: '0.0.0.0:9102'}}",
            tmp_path / "a.yaml",
        )
    metrics = ServiceMetrics("limits", "n1", "0.1.0")
    endpoint = MetricsEndpoint(metrics, "127.0.0.1:0")  # what anonymous: true starts
    address = endpoint.start()
    try:
        assert value(scrape_metrics(address), "ds01_exporter_info", service="limits") == 1
    finally:
        endpoint.stop()


async def test_each_holders_type_is_read_once_and_follows_a_container_made_anew(
    env: AllocatorEnv,
):
    """The `interface` of ds01_gpu_allocated: read from the holders' records (in batches
    that etcd accepts), not from the fleet's, and read again when a name is made anew."""
    etcd = connect(env.config, "allocator")
    types = HolderTypes(etcd)
    node = "typed-node"

    async def record(name: str, kind: str) -> None:
        made = Metadata(name, name, "alice", "img", "id", node, 1.0, container_type=kind)
        await etcd.put(record_key(METADATA, node, name), made.encode())

    def snapshot(holders: dict[str, float]) -> Snapshot:
        held = {(node, f"0:{n}"): Holder("alice", name, since, 10)
                for n, (name, since) in enumerate(holders.items())}  # fmt: skip
        return Snapshot({}, held, {}, [], 0)

    try:
        names = [f"c{n}._.alice" for n in range(250)]  # more than one transaction holds
        for n, name in enumerate(names[:-1]):
            await record(name, "batch" if n % 2 else "")
        seen = await types(snapshot(dict.fromkeys(names, 1.0)))
        assert len(seen) == 249 and names[-1] not in seen  # its create has not committed
        assert seen[names[1]] == "batch" and seen[names[0]] == "unknown"
        await record(names[-1], "notebook")  # committed now
        await record(names[1], "notebook")  # c1 removed and made anew, with another type
        again = await types(snapshot({**dict.fromkeys(names, 1.0), names[1]: 2.0}))
        assert again[names[-1]] == "notebook" and again[names[1]] == "notebook"
        assert again[names[3]] == "batch"
        assert await types(snapshot({names[3]: 1.0})) == {names[3]: "batch"}
        # Made anew while its release failed, it inherits the allocation (and its since):
        # its own type shows within FRESH_FOR scrapes.
        await record(names[3], "notebook")
        shown = [(await types(snapshot({names[3]: 1.0})))[names[3]]
                 for _ in range(HolderTypes.FRESH_FOR)]  # fmt: skip
        assert shown[-1] == "notebook"
    finally:
        await etcd.delete_prefix(record_key(METADATA, node, ""))
        await etcd.close()
