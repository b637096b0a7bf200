"""Switching over from DS01 (and AIME mlc): the containers such a host already has are
adopted as first-class ds01 containers, their GPUs become allocations, and a GPU two of
them claim is never granted twice. Real etcd, dockerd and services; GPUs declared."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import grpc
import pytest
import pytest_asyncio

from ds01.client import Ds01Error
from ds01.containers.adoption import (
    Seen,
    Slot,
    container_type_of,
    gpu_plan,
    gpu_references,
    owner_of,
    slots_for,
    unaccounted,
)
from ds01.containers.lifecycle import ContainerError
from ds01.containers.reconcile import Reconciler
from ds01.core.etcd import connect
from ds01.core.pki import Pki
from ds01.v1 import common_pb2
from tests.allocator_env import AllocatorEnv, make_env, make_lifecycle

pytestmark = pytest.mark.usefixtures("unix_users")

SLOTS = [Slot("0", "GPU-0000"), Slot("1", "GPU-0001"), Slot("2:1", "MIG-0002-1")]


@pytest.mark.parametrize(
    ("labels", "env", "device_ids", "expected"),
    [
        ({"ds01.gpu.uuids": "MIG-0002-1,GPU-0001"}, [], [], ("MIG-0002-1", "GPU-0001")),
        ({"ds01.gpu.uuids": "MIG-0002-1 GPU-0001"}, [], [], ("MIG-0002-1", "GPU-0001")),
        ({"ds01.gpu.uuid": "GPU-0000"}, [], [], ("GPU-0000",)),
        ({"ds01.gpu_slot": "GPU-0001"}, [], [], ("GPU-0001",)),  # DS01's wrapper
        ({"ds01.gpu.allocated": "2.1"}, [], [], ("2.1",)),  # DS01's slot id
        ({}, [], ["GPU-0001"], ("GPU-0001",)),  # a device request
        ({}, ["NVIDIA_VISIBLE_DEVICES=GPU-0000"], [], ("GPU-0000",)),
        ({}, ["CUDA_VISIBLE_DEVICES=0,1"], [], ("0", "1")),
        # Docker keeps the last of a repeated variable: ds01's gateway appends void.
        ({}, ["NVIDIA_VISIBLE_DEVICES=GPU-0000", "NVIDIA_VISIBLE_DEVICES=void"], [], ()),
        ({}, ["NVIDIA_VISIBLE_DEVICES=none", "CUDA_VISIBLE_DEVICES="], [], ()),
        ({}, ["PATH=/bin"], [], ()),
    ],
)
def test_the_gpus_a_container_says_it_uses(labels, env, device_ids, expected):
    assert gpu_references(labels, env, device_ids) == expected


@pytest.mark.parametrize(
    ("references", "found", "unknown"),
    [
        (("MIG-0002-1",), ["2:1"], []),
        (("2.1", "0"), ["2:1", "0"], []),  # DS01's GPU.INSTANCE is ds01's GPU:INSTANCE
        (("GPU-0001", "1"), ["1"], []),  # one GPU named twice
        (("all",), [], ["all"]),
        (("GPU-9999", "7"), [], ["GPU-9999", "7"]),
    ],
)
def test_references_map_to_this_nodes_slots(references, found, unknown):
    assert slots_for(references, SLOTS) == (found, unknown)


@pytest.mark.parametrize(
    ("labels", "name", "expected"),
    [
        ({"ds01.container_type": "api"}, "x", "api"),
        ({"ds01.interface": "api"}, "x", "api"),
        ({"devcontainer.local_folder": "/home/a/p"}, "x", "devcontainer"),
        ({"com.docker.compose.project": "p"}, "p-web-1", "compose"),
        ({"aime.mlc.USER": "a"}, "proj._.1001", ""),  # mlc: the user's own limits
        ({}, "proj._.alice", ""),
        ({}, "quirky_name", "docker"),
        # Through the gateway, ds01's type labels can only be the image's: not believed.
        ({"ds01.gateway": "true", "ds01.container_type": "api"}, "x", "docker"),
        ({"ds01.gateway": "true", "ds01.interface": "api"}, "x", "docker"),
        ({"ds01.gateway": "true", "ds01.type": "batch"}, "x", "docker"),
        ({"ds01.gateway": "true", "devcontainer.local_folder": "/h/a"}, "x", "devcontainer"),
    ],
)
def test_container_types_are_detected_as_ds01_detects_them(labels, name, expected):
    assert container_type_of(labels, name) == expected


def test_the_owner_is_ds01s_label_then_mlcs():
    assert owner_of({"ds01.user": "a", "aime.mlc.USER": "b"}) == "a"
    assert owner_of({"aime.mlc.USER": "b"}) == "b"
    assert owner_of({"devcontainer.local_folder": "/home/c"}) == ""


@pytest_asyncio.fixture(loop_scope="session")
async def host(
    tmp_path: Path, pki: Pki, state_dir: Path, etcd_endpoint: str, docker_socket: Path
) -> AsyncIterator[tuple[AllocatorEnv, Reconciler, docker.DockerClient]]:
    env = await make_env(tmp_path, pki, state_dir, etcd_endpoint)
    etcd = connect(env.config, "containers")
    lifecycle = make_lifecycle(env, docker_socket, etcd)
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    yield env, Reconciler(lifecycle), client
    for label in ("ds01.managed=true", "aime.mlc.USER"):
        for container in client.containers.list(all=True, filters={"label": label}):
            container.remove(force=True)
    client.close()
    for record in await lifecycle.metadata.all():
        await lifecycle.metadata.delete(record)
    await lifecycle.client.close()
    await lifecycle.docker.close()
    await etcd.close()
    await env.stop()


def ds01_container(client, image: str, name: str, labels: dict[str, str], env=()) -> None:
    """A container as DS01 or mlc made it: straight on dockerd, labelled their way."""
    client.containers.create(
        image,
        ["sleep", "3600"],
        name=name,
        labels=labels,
        environment=list(env),
        network_mode="none",
    )


async def test_a_ds01_hosts_containers_are_adopted_with_their_gpus_never_twice(
    host, test_image: str, tmp_path: Path
):
    env, reconciler, client = host
    mlc = {"aime.mlc": "ds01alice", "aime.mlc.NAME": "proj", "aime.mlc.USER": "ds01alice"}
    ds01_container(
        client,
        test_image,
        "proj._.1001",
        {
            **mlc,
            "ds01.managed": "true",
            "ds01.user": "ds01alice",
            "ds01.gpu.uuid": "MIG-0002-1",
            "aime.mlc.WORK_MOUNT": "/home/ds01alice/workspace/proj",
        },
    )
    ds01_container(
        client,
        test_image,
        "train._.ds01bob",
        {"ds01.managed": "true", "ds01.user": "ds01bob", "ds01.gpu.allocated": "0"},
    )
    ds01_container(  # claims alice's MIG slice too: a conflict for the admin
        client,
        test_image,
        "clash._.ds01bob",
        {"ds01.managed": "true", "ds01.user": "ds01bob", "ds01.gpu.uuids": "MIG-0002-1"},
    )
    ds01_container(  # plain mlc, its GPU only in its environment
        client,
        test_image,
        "notebook._.1001",
        {**mlc, "aime.mlc.NAME": "notebook"},
        env=["NVIDIA_VISIBLE_DEVICES=GPU-0001"],
    )
    await reconciler.sweep()

    async with env.client("root") as admin:
        held = {
            a.slot.slot_id: a.container
            for a in (await admin.gpu_status()).allocations
            if a.container
        }
    assert held == {"2:1": "proj._.1001", "0": "train._.ds01bob", "1": "notebook._.1001"}
    assert "clash._.ds01bob" in reconciler.conflicts
    assert "held by proj._.1001" in reconciler.conflicts["clash._.ds01bob"]
    lifecycle = reconciler.lifecycle
    clash, _ = await lifecycle.inspect("ds01bob", False, "clash")
    assert clash.notice.startswith("its GPUs are not allocated to it") and not clash.gpu_slots
    with pytest.raises(ContainerError) as refused:  # its labels would share alice's slice
        await lifecycle.start("ds01bob", False, "clash")
    assert "its GPU 2:1 is held by proj._.1001" in refused.value.message

    # First-class: by plain name, with image, workspace and GPU recorded.
    proj, container = await lifecycle.inspect("ds01alice", False, "proj")
    assert (proj.docker_name, proj.image, proj.gpu_slots) == (
        "proj._.1001",
        test_image,
        [f"{env.config.node}/2:1"],
    )
    assert proj.workspace == "/home/ds01alice/workspace/proj" and container is not None
    names = sorted(m.name for m, _ in await lifecycle.list("ds01alice", False))
    assert names == ["notebook", "proj"]
    await lifecycle.start("ds01alice", False, "proj")
    assert (await lifecycle.stop("ds01alice", False, "proj", grace=1)).name == "proj"
    with pytest.raises(ContainerError):  # bob can neither see nor touch it
        await lifecycle.inspect("ds01bob", False, "proj")
    await lifecycle.remove("ds01alice", False, "proj")
    assert client.containers.list(all=True, filters={"name": "proj._.1001"}) == []
    async with env.client("root") as admin:
        freed = {a.slot.slot_id: a.container for a in (await admin.gpu_status()).allocations}
    assert freed["2:1"] == ""

    # Now the slice is free, the next sweep does not hand it to the clash on its own:
    # it stays the admin's call (the container was adopted without it).
    await reconciler.sweep()
    clash, _ = await lifecycle.inspect("ds01bob", False, "clash")
    assert not clash.gpu_slots


async def test_only_services_and_admins_may_allocate_exact_slots(host):
    env, _reconciler, _client = host
    async with env.client("alice") as alice:
        with pytest.raises(Ds01Error) as refused:
            await alice.allocate("x._.alice", slot_ids=("0",), node=env.config.node)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED


@pytest_asyncio.fixture(loop_scope="session")
async def ds01_host(
    tmp_path: Path, pki: Pki, state_dir: Path, etcd_endpoint: str, docker_socket: Path
) -> AsyncIterator[tuple[AllocatorEnv, Path, docker.DockerClient]]:
    """ds01's services on a host where DS01 ran: its metadata files, its users' homes."""
    metadata = tmp_path / "container-metadata"
    metadata.mkdir()
    env = await make_env(  # the containers service starts once the dry run is done
        tmp_path / "etc",
        pki,
        state_dir,
        etcd_endpoint,
        docker_socket,
        services=("limits", "allocator"),
        ds01_metadata=metadata,
    )
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    yield env, metadata, client
    await env.stop()
    for label in ("ds01.managed=true", "aime.mlc.USER"):
        for container in client.containers.list(all=True, filters={"label": label}):
            container.remove(force=True)
    client.close()


async def test_import_ds01_reports_then_adopts_a_ds01_hosts_containers(
    ds01_host, test_image: str, tmp_path: Path
):
    env, metadata, client = ds01_host
    mlc = {"aime.mlc": "ds01alice", "aime.mlc.USER": "ds01alice"}
    made = [  # oldest first
        ("proj._.1001", {**mlc, "aime.mlc.NAME": "proj", "ds01.gpu.uuid": "MIG-0002-1"}, []),
        ("train._.ds01bob", {"ds01.managed": "true", "ds01.user": "ds01bob",
                             "ds01.gpu.allocated": "0"}, []),
        ("clash._.ds01bob", {"ds01.managed": "true", "ds01.user": "ds01bob",
                             "ds01.gpu.uuids": "MIG-0002-1"}, []),
        ("old._.ds01bob", {"ds01.managed": "true", "ds01.user": "ds01bob"}, []),
        ("cpu._.1001", {**mlc, "aime.mlc.NAME": "cpu"}, []),
        ("every._.ds01bob", {"ds01.managed": "true", "ds01.user": "ds01bob"},
         ["NVIDIA_VISIBLE_DEVICES=all"]),
    ]  # fmt: skip
    for name, labels, environment in made:
        ds01_container(client, test_image, name, labels, environment)
    # DS01's allocator recorded old's GPU only in its metadata file.
    (metadata / "old._.ds01bob.json").write_text(
        json.dumps({"container": "old._.ds01bob", "user": "ds01bob", "gpu_id": "1"})
    )
    # A user DS01 put in the default group, whom ds01 finds under the seed's slice name.
    home = tmp_path / "home"
    (home / "h.baker@lab").mkdir(parents=True)
    members = env.config.limits_file.parent / "groups"
    members.mkdir()
    (members / "researchers.members").write_text("h_baker_lab\n")

    planned = await env.cli("root", "-o", "json", "admin", "import-ds01", "--dry-run",
                            "--home", str(home))  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    rows = {c["docker_name"]: c for c in plan["containers"]}
    assert list(rows) == [name for name, _, _ in made]  # oldest first
    assert rows["proj._.1001"]["gpu_slots"] == ["n1/2:1"]
    assert rows["train._.ds01bob"]["gpu_slots"] == ["n1/0"]
    assert rows["clash._.ds01bob"]["conflict"] == "slot 2:1 is held by proj._.1001"
    assert rows["old._.ds01bob"]["gpu_slots"] == ["n1/1"]  # from DS01's metadata file
    assert rows["cpu._.1001"]["gpu_slots"] == []
    assert rows["every._.ds01bob"]["unknown_gpus"] == ["all"]
    assert not any(c.get("adopted") for c in plan["containers"])
    assert plan["group_changes"] == [
        {"user": "h.baker@lab", "ds01_group": "students", "group": "researchers"}
    ]
    async with env.client("root") as admin:  # a dry run changes nothing
        assert not [a for a in (await admin.gpu_status()).allocations if a.container]

    await env.start("containers")  # the switch: its reconciler adopts them at once
    imported = await env.cli("root", "admin", "import-ds01", "--home", str(home))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.splitlines()[-1] == (
        "6 container(s) adopted, 1 GPU conflict(s), 1 user(s) change group"
    )
    async with env.client("root") as admin:
        held = {a.slot.slot_id: a.container for a in (await admin.gpu_status()).allocations}
    assert {slot: name for slot, name in held.items() if name} == {
        "2:1": "proj._.1001", "0": "train._.ds01bob", "1": "old._.ds01bob"
    }  # fmt: skip
    listed = await env.cli("ds01alice", "-o", "json", "container", "list")
    assert sorted(c["name"] for c in json.loads(listed.stdout)) == ["cpu", "proj"]
    stopped = await env.cli("ds01bob", "container", "stop", "old")
    assert stopped.returncode == 0, stopped.stderr
    again = await env.cli("root", "-o", "json", "admin", "import-ds01", "--dry-run",
                          "--home", str(home))  # fmt: skip
    assert json.loads(again.stdout)["containers"] == []  # nothing left to adopt
    table = imported.stdout.splitlines()
    assert any(line.startswith("clash._.ds01bob") and "held by proj._.1001" in line
               for line in table), imported.stdout  # fmt: skip
    refused = await env.cli("ds01alice", "admin", "import-ds01", "--dry-run")
    assert refused.returncode == 1 and "only admins import" in refused.stderr


def test_a_gateway_containers_labels_and_environment_never_speak_for_gpus():
    """Labels a user's image carries reach the container's labels: on a container made
    through the gateway, none of them names a GPU ds01 would then allocate."""
    attrs = {
        "Name": "/sneaky",
        "Config": {
            "Labels": {
                "ds01.gateway": "true",
                "ds01.user": "mallory",
                "ds01.gpu.allocated": "0 1",
                "ds01.gpu.slots": "n1/0",
                "ds01.gpu.uuids": "GPU-0000",
            },
            "Env": ["NVIDIA_VISIBLE_DEVICES=GPU-0001"],
        },
    }
    assert gpu_plan(Seen.of(attrs), SLOTS, None) == ([], [])
    assert gpu_references(attrs["Config"]["Labels"], attrs["Config"]["Env"], []) == ()


def test_the_gateway_marks_its_containers_over_whatever_the_image_says(host, test_image):
    """Docker lays the create's labels over the image's: the gateway's mark wins."""
    from ds01.ownership.gateway.policy import own_labels

    _env, _reconciler, client = host
    image, _ = client.images.build(
        fileobj=io.BytesIO(
            f"FROM {test_image}\nLABEL ds01.gateway=false ds01.gpu.allocated=0\n".encode()
        ),
        tag="ds01-test/labelled:latest",
        rm=True,
    )
    asked = {"ds01.gateway": "false", "ds01.gpu.uuids": "GPU-0000", "mine": "x"}
    labels = own_labels(asked, "mallory", managed=True)
    assert labels == {"mine": "x", "ds01.user": "mallory", "ds01.managed": "true",
                      "ds01.gateway": "true"}  # fmt: skip
    made = client.containers.create(image.id, ["true"], labels=labels, network_mode="none")
    try:
        merged = made.labels
        assert merged["ds01.gateway"] == "true" and merged["ds01.gpu.allocated"] == "0"
        assert gpu_plan(Seen.of(made.attrs), SLOTS, None) == ([], [])
    finally:
        made.remove(force=True)
        client.images.remove(image.id, force=True)


ROWS = [  # as the allocator's GetStatus lists this node
    common_pb2.Allocation(slot=common_pb2.GpuSlot(slot_id=slot, uuid=uuid), container=holder)
    for slot, uuid, holder in [
        ("0", "GPU-0000", "a._.x"),
        ("1", "GPU-0001", ""),
        ("2:1", "MIG-0002-1", "b._.y"),
    ]
]


@pytest.mark.parametrize(
    ("references", "problem"),
    [
        (("GPU-0000",), ""),
        (("0",), ""),
        (("GPU-0001",), "its GPU 1 is free: not allocated to it"),
        (("MIG-0002-1",), "its GPU 2:1 is held by b._.y: not allocated to it"),
        (("all",), "it names GPUs ds01 does not account for here (all)"),
        (("GPU-0000", "7"), "it names GPUs ds01 does not account for here (7)"),
    ],
)
def test_an_adopted_container_starts_only_on_gpus_allocated_to_it(references, problem):
    assert unaccounted("a._.x", references, ROWS) == problem


@pytest.mark.parametrize("owner", ["a/b", "../ds01alice", "ds01alice/..", " ds01alice", "-x"])
async def test_a_container_whose_owner_is_no_user_name_is_not_adopted_and_stops_no_sweep(
    host, test_image: str, owner: str
):
    """An owner label no login name can have (made on dockerd, or on a DS01 host) would
    make keys of another shape: the container is left to admins, and the others on the
    node are adopted and swept as ever."""
    _env, reconciler, client = host
    ds01_container(client, test_image, "odd", {"ds01.managed": "true", "ds01.user": owner})
    ds01_container(client, test_image, "fine._.ds01bob", {"ds01.managed": "true",
                                                          "ds01.user": "ds01bob"})  # fmt: skip
    for _sweep in range(2):
        await reconciler.sweep()
    records = {r.docker_name: r.user for r in await reconciler.lifecycle.metadata.all()}
    assert records == {"fine._.ds01bob": "ds01bob"}
    assert reconciler.sweeps == 2
