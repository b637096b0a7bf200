"""The per-user aggregate limits on Docker's systemd driver: DS01's drop-ins."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds01.containers.adapters import SystemdSlices, slice_drop_in
from ds01.containers.lifecycle import group_slice

GiB = 1024**3


def test_the_aggregate_becomes_the_slices_properties_as_ds01_wrote_them():
    text = slice_drop_in({"cpus": 96.0, "memory": 96 * GiB, "memory_high": 86 * GiB, "pids": 12288})
    assert text.splitlines()[1:] == [
        "[Slice]",
        "CPUQuota=9600%",
        f"MemoryMax={96 * GiB}",
        f"MemoryHigh={86 * GiB}",
        "TasksMax=12288",
    ]


def test_a_drop_in_is_written_whole_and_reloaded_only_when_it_changes(tmp_path: Path):
    reloads = []
    slices = SystemdSlices(tmp_path, reload=lambda: reloads.append(1))
    name = "ds01-student-h_baker_hertie-school_lan.slice"
    slices.ensure(name, {"cpus": 2.0, "pids": 512})
    path = tmp_path / f"{name}.d" / SystemdSlices.DROP_IN
    assert "CPUQuota=200%\nTasksMax=512\n" in path.read_text()
    slices.ensure(name, {"cpus": 2.0, "pids": 512})
    assert len(reloads) == 1  # unchanged: systemd is left alone
    slices.ensure(name, {"cpus": 4.0, "pids": 512})
    assert "CPUQuota=400%" in path.read_text() and len(reloads) == 2
    assert [p.name for p in path.parent.iterdir()] == [SystemdSlices.DROP_IN]  # no partial


@pytest.mark.parametrize("name", ["../../etc/passwd", "ds01-x/y.slice", "ds01-x.service"])
def test_only_slice_names_are_written(tmp_path: Path, name: str):
    with pytest.raises(ValueError):
        SystemdSlices(tmp_path, reload=lambda: None).ensure(name, {"pids": 1})
    assert not any(tmp_path.iterdir())


def test_the_group_slice_is_the_user_slices_parent():
    user_slice = "ds01-researcher-h_baker_hertie-school_lan.slice"
    assert group_slice(user_slice, "h.baker@hertie-school.lan") == "ds01-researcher.slice"


@pytest.mark.parametrize("unified", [False, True])
def test_cgroupfs_limits_are_written_and_lifted_when_no_longer_set(tmp_path: Path, unified: bool):
    from ds01.containers.adapters import CgroupfsSlices

    if unified:
        (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    slices = CgroupfsSlices(tmp_path)
    slices.ensure("/ds01/students/alice", {"memory": GiB, "memory_high": GiB // 2, "cpus": 2.5})

    def read(controller: str, name: str) -> str:
        base = tmp_path if unified else tmp_path / controller
        return (base / "ds01/students/alice" / name).read_text()

    if unified:
        assert read("", "memory.max") == str(GiB) and read("", "cpu.max") == "250000 100000"
        assert read("", "memory.high") == str(GiB // 2) and read("", "pids.max") == "max"
    else:
        assert read("memory", "memory.limit_in_bytes") == str(GiB)
        assert read("memory", "memory.soft_limit_in_bytes") == str(GiB // 2)
        assert read("cpu", "cpu.cfs_quota_us") == "250000" and read("pids", "pids.max") == "max"
    slices.ensure("/ds01/students/alice", {})  # the configuration lifted them all
    if unified:
        assert read("", "memory.max") == "max" and read("", "cpu.max") == "max 100000"
    else:
        assert read("memory", "memory.limit_in_bytes") == "-1"
        assert read("cpu", "cpu.cfs_quota_us") == "-1"
