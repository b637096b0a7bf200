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
