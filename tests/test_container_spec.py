"""The Docker create arguments, tested directly."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds01.containers.adapters import Intent
from ds01.containers.adoption import TRUSTED_LABELS
from ds01.containers.spec import Account, ContainerSpec, Limits, SpecError, docker_name

ALICE = Account("h.baker@uni.org", 5001, 5025, "lab", Path("/home/h.baker"))


def spec(**changes) -> ContainerSpec:
    fields = {
        "name": "proj",
        "image": "img:1",
        "account": ALICE,
        "limits": Limits(cpus=2, memory=1 << 30, memory_swap=1 << 30, shm_size=1 << 28, pids=99),
        "gpu_environment": {"CUDA_VISIBLE_DEVICES": "MIG-a,MIG-b"},
        "gpu_slots": ("n1/2:1", "n1/2:2"),
        "gpu_device_ids": ("MIG-a", "MIG-b"),
    }
    return ContainerSpec(**{**fields, **changes})


def test_names_follow_the_mlc_convention_with_docker_safe_users():
    assert spec().docker_name == "proj._.h.baker_uni.org"
    for bad in ("", "-x", "a._.b", "a/b", "x" * 64, "proj\n", "proj\n._.bob"):
        with pytest.raises(SpecError):
            docker_name(bad, "alice")


def test_shm_size_or_ipc_host_never_both():
    shm = spec().create_arguments()
    assert shm["shm_size"] == 1 << 28 and "ipc_mode" not in shm
    host = spec(limits=Limits(shm_size=1 << 28, ipc_mode="host")).create_arguments()
    assert host["ipc_mode"] == "host" and "shm_size" not in host


def test_a_device_request_for_exactly_the_allocated_gpus_with_the_nvidia_runtime():
    assert "device_requests" not in spec().create_arguments()
    [request] = spec(nvidia_runtime=True).create_arguments()["device_requests"]
    assert request["Driver"] == "nvidia" and request["DeviceIDs"] == ["MIG-a", "MIG-b"]


def test_labels_never_hold_a_comma():
    assert spec().labels()["ds01.gpu.slots"] == "n1/2:1 n1/2:2"
    with pytest.raises(SpecError, match="comma"):
        spec(image="img:1,2").labels()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, {"FRAMEWORK": "img-1", "GPUS": "2", "ARCH": "-", "DATA_MOUNT": "-"}),
        ({"gpu_products": ("A100-SXM4-80GB",)}, {"ARCH": "CUDA_AMPERE"}),
        ({"gpu_products": ("NVIDIA H200",)}, {"ARCH": "CUDA_HOPPER"}),
        ({"gpu_products": ("NVIDIA L40S",)}, {"ARCH": "CUDA_ADA"}),
        ({"gpu_products": ("Tesla V100",)}, {"ARCH": "CUDA"}),
        ({"image": "pytorch/pytorch:2.1.0-cuda12"}, {"FRAMEWORK": "pytorch-2.1.0-cuda12"}),
        ({"image": "registry:5000/lab/tf"}, {"FRAMEWORK": "tf-latest"}),
        ({"image": "img@sha256:ab12"}, {"FRAMEWORK": "img-latest"}),
        ({"gpu_slots": ()}, {"GPUS": "0"}),
        ({"data_dirs": (Path("/d/a"), Path("/d/b"))}, {"DATA_MOUNT": "/d/a /d/b"}),
        ({}, {"MODELS_MOUNT": "-", "WORK_MOUNT": "-", "MLC_VERSION": "4"}),
    ],
)
def test_mlc_labels_follow_mlcs_own_value_conventions(changes, expected):
    labels = spec(**changes).labels()
    assert {key: labels[f"aime.mlc.{key}"] for key in expected} == expected
    assert labels["ds01.image"] == changes.get("image", "img:1")  # the image itself


def test_names_are_added_group_first_once_and_only_where_missing():
    from ds01.containers.spec import named_accounts

    passwd, group = named_accounts("root:x:0:0:root:/root:/bin/sh", "root:x:0:\n", ALICE)
    assert group == "root:x:0:\nlab:x:5025:\n"
    assert passwd.endswith("\nh.baker@uni.org:x:5001:5025::/workspace:/bin/sh\n")
    assert named_accounts(passwd, group, ALICE) == (passwd, group)  # nothing twice
    taken = named_accounts("other:x:5001:1::/:/bin/sh\n", "g:x:5025:\n", ALICE)
    assert taken == ("other:x:5001:1::/:/bin/sh\n", "g:x:5025:\n")  # the image's names stay
    odd = Account("a:b\nc", 7, 8, "g:1", Path("/home/x"))
    passwd, group = named_accounts("", "", odd)
    assert passwd == "a_b_c:x:7:8::/workspace:/bin/sh\n" and group == "g_1:x:8:\n"


@pytest.mark.parametrize("key", TRUSTED_LABELS)
def test_every_label_adoption_believes_is_ds01s_never_the_images(key: str):
    """Docker lays the create's labels over the image's: each one set here wins. A
    container without GPUs or a type says so in every one of them."""
    bare = spec(container_type="", gpu_slots=(), gpu_device_ids=(), gpu_environment={})
    assert bare.labels()[key] == ""
    assert key in spec().labels()


@pytest.mark.parametrize(
    ("gpus", "nvidia", "cuda"),
    [
        ({}, "void", ""),  # the image's NVIDIA_VISIBLE_DEVICES=all never reaches it
        ({"NVIDIA_VISIBLE_DEVICES": "MIG-a", "CUDA_VISIBLE_DEVICES": "MIG-a"}, "MIG-a", "MIG-a"),
    ],
)
def test_gpu_visibility_is_ds01s_with_or_without_gpus(gpus, nvidia, cuda):
    environment = spec(gpu_environment=gpus).create_arguments()["environment"]
    assert (environment["NVIDIA_VISIBLE_DEVICES"], environment["CUDA_VISIBLE_DEVICES"]) == (
        nvidia,
        cuda,
    )


@pytest.mark.parametrize(
    ("phase", "said"),
    [
        ({}, "being created"),
        ({"allocating": True}, "being created: getting its GPUs (or waiting for one)"),
        ({"allocating": True, "creating": True}, "being created: Docker is making it"),
        ({"creating": True, "starting": True}, "being created: starting it"),
    ],
)
def test_a_create_in_progress_says_which_step_it_is_at(phase: dict[str, bool], said: str):
    intent = Intent("p._.alice", "p", "alice", "img", "n1", "run", 0.0, **phase)
    assert intent.shown(interrupted=False).notice == said
    assert "undoing it" in intent.shown(interrupted=True).notice
