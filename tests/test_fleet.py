"""A fleet: two GPU nodes, each its own ds01d (limits, allocator, containers) and its
own dockerd, on one etcd cluster of three members with mutual TLS between peers and to
clients. A user's quota counts across the fleet, and listings show it; a node killed
shows down while the other keeps serving, and nothing is double-booked when it
returns; an etcd member killed changes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from aetcd.exceptions import ClientError

from ds01.client import ClientIdentity, Ds01Client, Ds01Error
from ds01.core.config import Config, ContainersConfig, InventoryConfig
from ds01.core.etcd import etcd_client
from ds01.core.pki import SERVICES, Pki, issue_client_cert
from ds01.core.processes import EtcdMember, free_port, start_dockerd, start_etcd_cluster
from ds01.core.watch import under, watching
from ds01.v1 import allocator_pb2, common_pb2
from tests.harness import (
    ANY_PORT_METRICS,
    build_test_image,
    remove_tree,
    run_cli,
    write_config_file,
)

DS01D = str(Path(sys.executable).with_name("ds01d"))
LIMITS = textwrap.dedent(
    """\
    defaults:
      max_gpu_equivalents: 2
      max_gpu_slots_per_container: 1
      allow_full_gpu: true
      priority: 10
    """
)
NODES = ("n1", "n2")
SERVICES_RUN = "limits,allocator,containers"
GPUS = 4  # per node


def inventory(node: str) -> str:
    return "gpus:\n" + "".join(
        f"  - {{index: {i}, uuid: GPU-{node}-{i}, product: A100}}\n" for i in range(GPUS)
    )


@dataclass
class Node:
    name: str
    config: Config
    config_file: Path
    log: Path
    image: str
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [DS01D, "--config", str(self.config_file), "--services", SERVICES_RUN],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def kill(self) -> None:
        """kill -9: no clean deregistration, as when a host dies."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def client(self, pki: Pki, user: str) -> Ds01Client:
        paths = pki.client(user)
        if not paths.cert.is_file():
            issue_client_cert(pki, user)
        return Ds01Client(self.config, ClientIdentity(pki.ca_cert, paths))


@dataclass
class Fleet:
    pki: Pki
    members: list[EtcdMember]
    nodes: dict[str, Node]

    async def status(self, via: str) -> allocator_pb2.GetStatusResponse:
        async with self.nodes[via].client(self.pki, "root") as root:
            return await root.gpu_status()


@pytest.fixture
def members(tmp_path: Path, pki: Pki) -> Iterator[list[EtcdMember]]:
    started = start_etcd_cluster(tmp_path / "etcd", pki.etcd)
    yield started
    for member in started:
        member.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def fleet(
    tmp_path: Path, pki: Pki, state_dir: Path, members: list[EtcdMember]
) -> AsyncIterator[Fleet]:
    (tmp_path / "resource-limits.yaml").write_text(LIMITS)
    nodes = {}
    daemons = []
    for name in NODES:
        docker_root = Path(tempfile.mkdtemp(prefix=f"ds01-{name}-", dir="/tmp"))
        daemons.append((start_dockerd(docker_root), docker_root))
        image = build_test_image(docker_root / "docker.sock")
        (tmp_path / f"{name}-inventory.yaml").write_text(inventory(name))
        config = Config(
            node=name,
            state_dir=state_dir,
            listen={s: f"127.0.0.1:{free_port()}" for s in SERVICES},
            metrics=ANY_PORT_METRICS,
            etcd_endpoints=tuple(m.endpoint for m in members),
            limits_file=tmp_path / "resource-limits.yaml",
            inventory=InventoryConfig(source="declared", file=tmp_path / f"{name}-inventory.yaml"),
            containers=ContainersConfig(network_mode="none"),
            docker_host=f"unix://{docker_root / 'docker.sock'}",
        )
        config_file = write_config_file(config, tmp_path / f"{name}.yaml")
        nodes[name] = Node(name, config, config_file, tmp_path / f"{name}.log", image)
    fleet = Fleet(pki, members, nodes)
    try:
        for node in nodes.values():
            node.start()
        await _until(fleet, lambda status: _up(status) == {"n1", "n2"}, 30)
        yield fleet
    finally:
        for node in nodes.values():
            node.kill()
        for daemon, docker_root in daemons:
            for container in _containers(docker_root):
                subprocess.run(_docker(docker_root, "rm", "-f", container), capture_output=True)
            daemon.stop()
            remove_tree(docker_root)


def _docker(docker_root: Path, *args: str) -> list[str]:
    return ["docker", "-H", f"unix://{docker_root / 'docker.sock'}", *args]


def _containers(docker_root: Path) -> list[str]:
    listed = subprocess.run(
        _docker(docker_root, "ps", "-aq"), capture_output=True, text=True, timeout=60
    )
    return listed.stdout.split()


def _up(status: allocator_pb2.GetStatusResponse) -> set[str]:
    return {n.node for n in status.nodes if n.up}


async def _until(
    fleet: Fleet,
    done: Callable[[allocator_pb2.GetStatusResponse], bool],
    seconds: float,
    via: str = "n1",
) -> allocator_pb2.GetStatusResponse:
    deadline = time.monotonic() + seconds
    while True:
        try:
            status = await fleet.status(via)
            if done(status):
                return status
        except Ds01Error:
            pass  # still starting
        if time.monotonic() > deadline:
            logs = "\n".join(n.log.read_text()[-2000:] for n in fleet.nodes.values())
            raise AssertionError(f"the fleet never got there; logs:\n{logs}")
        await asyncio.sleep(0.3)


def _holders(status: allocator_pb2.GetStatusResponse) -> dict[str, str]:
    return {f"{a.slot.node}/{a.slot.slot_id}": a.container for a in status.allocations}


async def test_two_nodes_on_one_etcd_cluster_serve_one_fleet(fleet: Fleet, unix_users):
    pki, n1, n2 = fleet.pki, fleet.nodes["n1"], fleet.nodes["n2"]
    # Either node's allocator places on any node; the quota counts the whole fleet.
    async with n2.client(pki, "alice") as alice_via_n2, n1.client(pki, "alice") as alice:
        on_n1 = await alice_via_n2.allocate("a._.alice", node="n1")
        on_n2 = await alice.allocate("b._.alice", node="n2")
        assert on_n1.allocations[0].slot.node == "n1" and on_n2.allocations[0].slot.node == "n2"
        with pytest.raises(Ds01Error) as over:
            await alice.allocate("c._.alice")
        assert over.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Limits are served by each node, with the same answers.
        assert await alice.get_limits() == await alice_via_n2.get_limits()
        # Given back now: a node's reconciler frees allocations that no container
        # holds, at a sweep whose moment this test does not choose.
        for name in ("a._.alice", "b._.alice"):
            await alice.release(name)

    # A container on each node: the listings show the whole fleet, with each node.
    for node in (n1, n2):  # a real account: workspaces are made as their users
        async with node.client(pki, "ds01alice") as user:
            await user.create_container(f"on{node.name}", node.image, start=True)
    listed = await run_cli(n1.config_file, pki, "root", "-o", "json", "container", "list", "--all")
    assert listed.returncode == 0, listed.stderr
    fleet_view = {(c["name"], c["node"], c["state"]) for c in json.loads(listed.stdout)}
    assert fleet_view == {
        ("onn1", "n1", "running"),
        ("onn2", "n2", "running"),
    }
    table = await run_cli(n2.config_file, pki, "ds01alice", "container", "list")
    assert [line.split()[0] for line in table.stdout.splitlines()[1:]] == ["onn1", "onn2"]

    shown = await run_cli(n1.config_file, pki, "root", "gpu", "status")
    assert shown.returncode == 0, shown.stderr
    assert "node n1: up" in shown.stdout and "node n2: up" in shown.stdout
    rows = [line.split() for line in shown.stdout.splitlines() if line.startswith("n")]
    assert {(row[0], row[1]) for row in rows if row[0] in NODES} == {
        (node, str(i)) for node in NODES for i in range(GPUS)
    }
    held_before = _holders(await fleet.status("n1"))

    # n2's host dies: its slots show down once its registration lapses; n1 serves on.
    n2.kill()
    down = await _until(fleet, lambda status: _up(status) == {"n1"}, 30)
    states = {f"{a.slot.node}/{a.slot.slot_id}": a.state for a in down.allocations}
    assert {states[f"n2/{i}"] for i in range(GPUS)} == {common_pb2.SLOT_STATE_NODE_DOWN}
    async with n1.client(pki, "bob") as bob:
        granted = await bob.allocate("x._.bob")
        assert granted.allocations[0].slot.node == "n1"  # never a slot of the node down
        with pytest.raises(Ds01Error) as refused:
            await bob.allocate("y._.bob", node="n2")
        assert "n2" in refused.value.message

    # n2 comes back: what was held there is held still, and nobody gets it twice.
    n2.start()
    back = await _until(fleet, lambda status: _up(status) == {"n1", "n2"}, 30)
    assert {k: v for k, v in _holders(back).items() if k.startswith("n2/") and v} == {
        k: v for k, v in held_before.items() if k.startswith("n2/") and v
    }
    async with n2.client(pki, "carol") as carol:
        got = await carol.allocate("z._.carol", node="n2")
        assert _holders(back)[f"n2/{got.allocations[0].slot.slot_id}"] == ""  # was free

    # One etcd member killed: both nodes keep serving, reads and claims alike.
    fleet.members[0].stop()
    try:
        for node in (n1, n2):
            async with node.client(pki, "dave") as dave:
                granted = await dave.allocate(f"d{node.name}._.dave", node=node.name)
                assert granted.allocations[0].slot.node == node.name
        assert _up(await fleet.status("n2")) == {"n1", "n2"}
    finally:
        fleet.members[0].start(pki.etcd)


async def test_a_watch_on_a_member_cut_off_from_the_quorum_ends(
    members: list[EtcdMember], pki: Pki
):
    """A member that lost the others still answers pings, so its watches stayed open
    with nothing to send: an allocator's view and event streams went quiet and stale.
    Watches ask etcd to end them when their member has no leader (as etcd's own client
    does): the watch ends as etcd gone away, and is opened again elsewhere."""
    client = etcd_client([members[0].endpoint], pki.etcd, "allocator")
    try:
        async with watching(client, [under(b"/probe/")], 0) as batches:
            following = asyncio.ensure_future(anext(batches))
            await asyncio.sleep(1)
            assert not following.done(), "a watch on a healthy cluster ended"
            for member in members[1:]:
                member.stop()
            with pytest.raises(ClientError, match="no leader"):
                await asyncio.wait_for(following, 30)
    finally:
        await client.close()
