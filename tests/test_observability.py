"""What monitors and admins read: container lifecycle events (resumable, private to their
users), the audit trail (gateway decisions, admins' and refused calls), and a real
Prometheus scraping every service after a known sequence of allocations, creates and
denials."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import docker
import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ds01.client import Ds01Error
from ds01.core.logs import JsonFormatter, TextFormatter, under_journald
from ds01.core.pki import Pki
from ds01.core.processes import free_port, spawn
from ds01.v1 import containers_pb2
from tests.allocator_env import AllocatorEnv, etcd_revision, full_stack_fixture
from tests.harness import (
    REPO,
    metrics_text,
    metrics_token,
    require_binary,
    scrape_metrics,
)

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB = "ds01alice", "ds01bob"
ALL = ("limits", "allocator", "containers", "ownership")
HOSTILE = [  # docker run arguments the gateway refuses, each for a different reason
    ["--privileged"],
    ["-v", "/etc:/x"],
    ["--pid", "host"],
    ["--cap-add", "SYS_ADMIN"],
    ["--device", "/dev/mem"],
]


# All four services in this process, the gateway's sockets where users reach them.
stack = full_stack_fixture()


def docker_as(env: AllocatorEnv, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    gateway = f"unix://{env.config.ownership.proxy_socket}"
    environment = [
        f"HOME=/home/{user}",
        f"DOCKER_CONFIG=/home/{user}/.docker",
        "PATH=/usr/bin:/bin",
    ]
    return subprocess.run(
        ["runuser", "-u", user, "--", "env", *environment, "docker", "-H", gateway, *args],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip


async def next_events(stream: Any, count: int) -> list[Any]:
    return [await asyncio.wait_for(anext(stream), 15) for _ in range(count)]


async def audit_of(env: AllocatorEnv, **wanted: str) -> list[Any]:
    """The audit records matching ``wanted``, once they are written (within seconds)."""
    async with env.client("root") as root:
        for _ in range(50):
            records = (await root.audit_records(since=time.time() - 300)).records
            found = [r for r in records if all(getattr(r, k) == v for k, v in wanted.items())]
            if found:
                return found
            await asyncio.sleep(0.2)
    return []


# -- lifecycle events ---------------------------------------------------------------------


async def test_lifecycle_events_resume_after_a_disconnect_and_lose_nothing(
    stack: AllocatorEnv, etcd_endpoint: str, test_image: str
):
    start = await etcd_revision(etcd_endpoint, stack.pki)
    async with stack.client(ALICE) as alice:
        watch = alice.watch_container_events(start)
        await alice.create_container("evts", test_image, start=True)
        [created] = await next_events(watch, 1)
        await watch.aclose()  # the monitor goes away after one event
        await alice.stop_container("evts")
        await alice.remove_container("evts")
        resumed = alice.watch_container_events(created.revision)
        rest = await next_events(resumed, 3)
        await resumed.aclose()
    kinds = [created.type, *(e.type for e in rest)]
    assert kinds == [
        containers_pb2.CONTAINER_EVENT_TYPE_CREATED,
        containers_pb2.CONTAINER_EVENT_TYPE_STARTED,
        containers_pb2.CONTAINER_EVENT_TYPE_STOPPED,
        containers_pb2.CONTAINER_EVENT_TYPE_REMOVED,
    ]
    revisions = [created.revision, *(e.revision for e in rest)]
    assert revisions == sorted(revisions) and len(set(revisions)) == 4
    for event in (created, *rest):
        assert event.user == ALICE and event.docker_name == "evts._.ds01alice"
        assert abs(event.time.ToSeconds() - time.time()) < 60


async def test_a_user_never_sees_another_users_container_names(
    stack: AllocatorEnv, etcd_endpoint: str, test_image: str
):
    start = await etcd_revision(etcd_endpoint, stack.pki)
    async with stack.client(BOB) as bob, stack.client(ALICE) as alice:
        await bob.create_container("bobs-secret", test_image)
        await alice.create_container("mine", test_image)
        await bob.remove_container("bobs-secret")
        await alice.remove_container("mine")
        seen = await next_events(alice.watch_container_events(start), 2)
        with pytest.raises(Ds01Error) as refused:
            await next_events(alice.watch_container_events(start, user=BOB), 1)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert {e.user for e in seen} == {ALICE} and {e.name for e in seen} == {"mine"}
    async with stack.client("root") as root:  # an admin sees everyone's, in order
        everyone = await next_events(root.watch_container_events(start), 4)
    assert {e.name for e in everyone} == {"mine", "bobs-secret"}
    listed = await stack.cli(ALICE, "-o", "json", "events", "--since", str(start))
    names = {json.loads(line)["container"] for line in listed.stdout.splitlines()}
    assert "bobs-secret._.ds01bob" not in names and "mine._.ds01alice" in names


async def test_ds01_events_shows_both_kinds_in_order_with_times_and_filters(
    stack: AllocatorEnv, etcd_endpoint: str, test_image: str
):
    start = await etcd_revision(etcd_endpoint, stack.pki)
    async with stack.client(ALICE) as alice:
        await alice.create_container("both", test_image, gpus=1)
        await alice.remove_container("both")
    shown = await stack.cli("root", "-o", "json", "events", "--since", str(start))
    events = [json.loads(line) for line in shown.stdout.splitlines()]
    mine = [(e["source"], e["type"]) for e in events if e["container"] == "both._.ds01alice"]
    assert mine == [
        ("allocation", "allocated"),
        ("container", "created"),
        ("allocation", "released"),
        ("container", "removed"),
    ]
    assert [e["revision"] for e in events] == sorted(e["revision"] for e in events)
    assert all(e["time"] for e in events)
    only = await stack.cli("root", "-o", "json", "events", "--since", str(start),
                           "--type", "created", "--user", ALICE)  # fmt: skip
    picked = [json.loads(line) for line in only.stdout.splitlines()]
    assert [(e["type"], e["user"]) for e in picked] == [("created", ALICE)]
    table = await stack.cli("root", "events", "--since", str(start), "--type", "removed")
    [header, row] = table.stdout.splitlines()
    assert header.split()[:3] == ["TIME", "REVISION", "EVENT"] and " removed " in row


# -- the audit trail ----------------------------------------------------------------------


async def test_denied_hostile_requests_through_the_gateway_are_on_the_record(
    stack: AllocatorEnv, test_image: str
):
    for args in HOSTILE:
        refused = await asyncio.to_thread(
            docker_as, stack, ALICE, "run", "--rm", *args, test_image, "true"
        )
        assert refused.returncode != 0, args
    plain = await asyncio.to_thread(docker_as, stack, ALICE, "ps")
    assert plain.returncode == 0, plain.stderr
    denied = await audit_of(stack, who=ALICE, action="container_create", decision="denied")
    assert len(denied) >= len(HOSTILE)
    for record in denied:
        assert record.service == "ownership" and record.node == stack.config.node
        assert record.reason  # what the user was told
    reads = await audit_of(stack, who=ALICE, action="container_list")
    assert reads == []  # a plain read of one's own things is not on the record
    shown = await stack.cli("root", "-o", "json", "admin", "audit", "--user", ALICE)
    lines = [json.loads(line) for line in shown.stdout.splitlines()]
    assert any(line["decision"] == "denied" and "privileged" in line["reason"] for line in lines)


async def test_an_admins_release_and_a_refused_one_are_on_the_record(stack: AllocatorEnv):
    async with stack.client(ALICE) as alice:
        await alice.allocate("held._.ds01alice")
    async with stack.client(BOB) as bob:
        with pytest.raises(Ds01Error):
            await bob.release("held._.ds01alice")  # not his
    released = await stack.cli("root", "gpu", "release", "held._.ds01alice")
    assert released.returncode == 0, released.stderr
    [admin] = await audit_of(stack, who="root", action="Release")
    assert (admin.target, admin.decision, admin.service) == (
        "held._.ds01alice", "allowed", "allocator"
    )  # fmt: skip
    [attempt] = await audit_of(stack, who=BOB, action="Release")
    assert attempt.decision == "denied" and "PERMISSION_DENIED" in attempt.reason
    async with stack.client(ALICE) as alice:
        with pytest.raises(Ds01Error) as refused:
            await alice.audit_records()
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED


# -- a real Prometheus --------------------------------------------------------------------


def query(port: int, expression: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())["data"]["result"]


def answers(port: int) -> bool:
    try:
        return bool(query(port, "vector(1)"))
    except OSError:
        return False


def wait_for(port: int, expression: str, check: Any, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = query(port, expression)
        except OSError:
            result = []
        if check(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


async def test_prometheus_scrapes_every_service_and_sees_what_happened(
    stack: AllocatorEnv, test_image: str, tmp_path: Path
):
    prometheus = require_binary("prometheus")
    port = free_port()
    targets = [stack.services[name].metrics_address for name in ALL]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(REPO / "deploy" / "prometheus" / "ds01-alerts.yml")],
        "scrape_configs": [
            {
                "job_name": "ds01",
                "authorization": {
                    "credentials_file": str(stack.config.state_dir / "metrics.token")
                },
                "static_configs": [{"targets": targets}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = spawn(
        "prometheus",
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        tmp_path / "prometheus.log",
        lambda: answers(port),
        timeout=60,
    )  # fmt: skip
    try:
        async with stack.client(ALICE) as alice:
            await alice.create_container("scraped", test_image, gpus=1, start=True)
        refused = await asyncio.to_thread(
            docker_as, stack, ALICE, "run", "--rm", "--privileged", test_image, "true"
        )
        assert refused.returncode != 0
        up = await asyncio.to_thread(wait_for, port, 'up{job="ds01"} == 1', lambda r: len(r) == 4)
        assert len(up) == 4, up
        held = await asyncio.to_thread(
            wait_for, port, 'ds01_gpu_allocated{container="scraped._.ds01alice"}', bool
        )
        [series] = held
        assert series["metric"]["user"] == ALICE and series["metric"]["state"] == "allocated"
        assert series["metric"]["gpu_slot"] and series["value"][1] == "1"
        users = await asyncio.to_thread(
            wait_for, port, f'ds01_user_gpus_allocated{{user="{ALICE}"}}', bool
        )
        assert users[0]["value"][1] == "1"
        running = 'ds01_containers_total{status="running"}'
        containers = await asyncio.to_thread(wait_for, port, running, bool)
        assert sum(float(r["value"][1]) for r in containers) >= 1
        denials = await asyncio.to_thread(
            wait_for, port, 'ds01_gateway_denials_total{reason="policy"}', bool
        )
        assert float(denials[0]["value"][1]) >= 1
        creates = 'grpc_server_handled_total{grpc_method="CreateContainer",grpc_code="OK"}'
        assert await asyncio.to_thread(wait_for, port, creates, bool)
        events = 'ds01_lifecycle_events_total{event="created"}'
        assert await asyncio.to_thread(wait_for, port, events, bool)
        swept = await asyncio.to_thread(wait_for, port, "ds01_reconcile_sweep_seconds_count", bool)
        assert float(swept[0]["value"][1]) >= 1  # the reconciler runs, and says how long
        last = await asyncio.to_thread(wait_for, port, "ds01_reconcile_last_sweep_seconds", bool)
        assert 0 < float(last[0]["value"][1]) < 60
        dependencies = await asyncio.to_thread(wait_for, port, "ds01_dependency_up == 0", bool, 3)
        assert dependencies == []  # everything each service needs answers
    finally:
        process.stop()


def test_the_alert_rules_pass_promtool(tmp_path: Path):
    promtool = require_binary("promtool")
    rules = REPO / "deploy" / "prometheus" / "ds01-alerts.yml"
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The shipped scrape configuration, with its token file where this host has one.
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["authorization"]["credentials_file"] == "/var/lib/ds01/metrics.token"
    (tmp_path / "metrics.token").write_text("t\n")
    job["authorization"]["credentials_file"] = str(tmp_path / "metrics.token")
    shutil.copy(rules, tmp_path / rules.name)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run([promtool, "check", "config", "prometheus.yml"], capture_output=True,
                             text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_every_dashboard_and_alert_query_names_an_exported_metric(stack: AllocatorEnv):
    exported = {"up"}
    for name in ALL:
        address = stack.services[name].metrics_address
        assert address is not None
        token = metrics_token(stack.config)
        for sample in await asyncio.to_thread(scrape_families, address, token):
            exported.add(sample)
    dashboard = json.loads((REPO / "deploy" / "grafana" / "ds01-overview.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "ds01-alerts.yml").read_text())
    expressions += [r["expr"] for group in rules["groups"] for r in group["rules"]]
    assert len(expressions) > 20
    for expression in expressions:
        named = metric_names(expression)
        assert named, expression
        assert named <= exported, (expression, named - exported)


def scrape_families(address: str, token: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text(address, token)):
        names.add(family.name)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
        names.update(family.name + s for s in suffixes.get(family.type, []))
    return names


PROMQL_WORDS = {
    "sum", "by", "on", "group_left", "rate", "histogram_quantile", "min", "max", "and", "or",
    "unless", "count", "avg", "le", "without", "ignoring", "humanizePercentage", "bool",
}  # fmt: skip


def metric_names(expression: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers outside label matchers and
    grouping clauses, that are neither functions nor keywords."""
    text = re.sub(r"\{[^}]*\}", "", expression)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return {w for w in words if w not in PROMQL_WORDS and not w.isdigit()}


def test_logs_carry_zoned_times_json_fields_and_journald_priorities(tmp_path: Path):
    record = logging.LogRecord(
        "ds01.audit", logging.WARNING, __file__, 1, "audit: %s", ("x",), None
    )
    record.audit = {"who": "alice", "decision": "denied"}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "warning" and entry["message"] == "audit: x"
    assert entry["audit"] == {"who": "alice", "decision": "denied"}
    assert entry["time"][-6] in "+-" and entry["time"][-3] == ":"  # 2026-...T16:08:16.123+00:00
    text = TextFormatter(journald=False).format(record)
    assert text.split()[0][-6] in "+-" and "WARNING ds01.audit: audit: x" in text
    assert TextFormatter(journald=True).format(record).startswith("<4>WARNING ")
    stream = open(tmp_path / "journal", "w")  # noqa: SIM115 - closed below
    try:
        info = os.fstat(stream.fileno())
        os.environ["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        assert under_journald(stream)
        os.environ["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino + 1}"
        assert not under_journald(stream)
    finally:
        del os.environ["JOURNAL_STREAM"]
        stream.close()


# -- what the containers service reports ----------------------------------------------------


def run_outside_ds01(docker_socket: Path, image: str, name: str, env: list[str]) -> None:
    """A container made on dockerd's own socket (an admin, or a tool that bypasses ds01)."""
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    try:
        client.containers.run(image, ["sleep", "600"], name=name, environment=env,
                              network_mode="none", detach=True)  # fmt: skip
    finally:
        client.close()


def remove_outside_ds01(docker_socket: Path, *names: str) -> None:
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    try:
        for name in names:
            client.containers.get(name).remove(force=True)
    finally:
        client.close()


async def test_gpu_use_outside_ds01_is_reported_and_ds01s_own_is_not(
    stack: AllocatorEnv, docker_socket: Path, test_image: str
):
    address = stack.services["containers"].metrics_address
    assert address is not None
    async with stack.client(ALICE) as alice:
        await alice.create_container("legit", test_image, gpus=1, start=True)
    outside = {  # GPUs named by the variables the NVIDIA runtime reads, as tools set them
        "rogue-all": ["NVIDIA_VISIBLE_DEVICES=all"],
        "rogue-uuid": ["CUDA_VISIBLE_DEVICES=GPU-5e6b0c1a-0000-4000-8000-000000000000"],
    }
    for name, env in outside.items():
        await asyncio.to_thread(run_outside_ds01, docker_socket, test_image, name, env)
    try:
        samples = await asyncio.to_thread(scrape_metrics, address, metrics_token(stack.config))
    finally:
        await asyncio.to_thread(remove_outside_ds01, docker_socket, *outside)
    rogue = {labels["container"]: labels for labels, _ in samples["ds01_unmanaged_gpu_container"]}
    assert set(rogue) == set(outside), rogue  # ds01's own container is not among them
    assert rogue["rogue-all"]["gpu_count"] == "ALL"
    assert rogue["rogue-uuid"]["running"] == "true"
    assert samples["ds01_unmanaged_gpu_running"][0][1] == 2
    cpu = dict((labels["user"], value) for labels, value in samples.get(
        "ds01_user_cpu_usage_seconds_total", []))  # fmt: skip
    memory = dict((labels["user"], value) for labels, value in samples.get(
        "ds01_user_memory_current_bytes", []))  # fmt: skip
    assert cpu.get(ALICE, 0) > 0 and memory.get(ALICE, 0) > 0  # her cgroup, her usage
    running = [v for labels, v in samples["ds01_containers_total"] if labels["status"] == "running"]
    assert sum(running) >= 1


@pytest.mark.parametrize(
    "target",
    ["evil\naudit: root Release x: allowed", "a\rb", "\x1b[2Jcleared", "tab\there", "nul\x00"],
)
def test_an_audit_line_cannot_be_forged_with_control_characters(target: str):
    from ds01.core.audit import AuditRecord

    line = AuditRecord(0.0, "n1", "ownership", "alice", "container_create", target, "denied",
                       f"refused: {target}").line()  # fmt: skip
    assert line.isprintable(), line
    assert line.startswith("alice container_create ") and line.count(": denied") == 1


async def test_a_burst_of_audit_records_reaches_etcd_whole_in_order_and_in_few_writes(
    etcd_endpoint: str, pki: Pki
):
    """Records queued while the writer is busy go to etcd together: a burst of 200 (a
    busy hour of a lab's calls) is all there, in the order recorded, in a handful of
    transactions rather than one each; a caller's long name or sentence is cut, so no
    write is too large for etcd and holds back the records after it."""
    from ds01.core.audit import AUDIT, AuditLog, AuditRecord
    from ds01.core.etcd import etcd_client

    service = f"audit-burst-{os.getpid()}-{time.monotonic_ns()}"
    audit = AuditLog("n1", service, lambda: etcd_client((etcd_endpoint,), pki.etcd, "admin"))
    huge = "RUN " + "x" * 30_000  # a refusal quoting a user's Dockerfile line
    for n in range(200):  # 64 of them long enough together to pass etcd's 1.5 MiB
        audit.record(f"user{n}", "build", "?name=" + "n" * 1_000_000 if n == 5 else f"c{n}",
                     "denied", huge if n < 64 else "")  # fmt: skip
    writer = asyncio.ensure_future(audit.run())
    reader = etcd_client((etcd_endpoint,), pki.etcd, "admin")
    try:
        for _ in range(200):
            kvs = await reader.get_prefix(AUDIT.encode())
            found = [(AuditRecord.decode(kv.value), kv.mod_revision) for kv in kvs]
            found = [(r, revision) for r, revision in found if r.service == service]
            if len(found) == 200:
                break
            await asyncio.sleep(0.05)
    finally:
        writer.cancel()
        await reader.close()
        await audit.close()
    assert [r.who for r, _ in found] == [f"user{n}" for n in range(200)]
    assert found[0][0].reason.startswith("RUN xxx") and len(found[0][0].reason) < 1100
    assert "more characters" in found[5][0].target and len(found[5][0].target) < 1100
    assert len({revision for _, revision in found}) <= 4  # 64 a write at most: not 200
