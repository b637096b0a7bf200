"""A running DS01 lab's configuration, unchanged: DS01's current resource-limits.yaml
(from ds01-infra, in shared/reference) with member files, overrides and an archive of
our own, read with DS01's meaning; and DS01's identity rules."""

from __future__ import annotations

import asyncio
import shutil
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from ds01.client import Ds01Error
from ds01.core.pki import Pki
from ds01.limits.config import LimitsConfigError, load_limits
from ds01.limits.resolve import GROUP, OVERRIDE, is_admin, resolve
from tests.allocator_env import AllocatorEnv
from tests.harness import run_cli
from tests.limits_fixtures import start_limits
from tests.test_limits_config import issues_of, parse

REFERENCE = Path(__file__).resolve().parent / "data" / "ds01-reference"  # DS01's, unchanged
H, M, GiB = 3600, 60, 1024**3

MEMBERS = {
    "student": "228755@hertie-school.lan\njudy          # listed without the realm\n",
    "researcher": "h_baker       # DS01's sanitized name of h.baker@hertie-school.lan\n",
    "faculty": "w.lowe@hertie-school.lan\n",
    "admin": "datasciencelab\n",
    "archived": "204214@hertie-school.lan  # graduated\n",
}
OVERRIDES = textwrap.dedent(
    """\
    h_baker:                         # keyed by the sanitized name
      idle_timeout_h: null
      max_runtime_h: 96
    """
)


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """DS01's file as the lab has it, beside its member files and overrides."""
    shutil.copy(REFERENCE / "resource-limits.yaml", tmp_path / "resource-limits.yaml")
    (tmp_path / "groups").mkdir()
    for group, text in MEMBERS.items():
        (tmp_path / "groups" / f"{group}.members").write_text(text)
    (tmp_path / "user-overrides.yaml").write_text(OVERRIDES)
    return tmp_path / "resource-limits.yaml"


def test_ds01s_current_file_is_read_without_a_problem_and_notes_what_ds01_ignores(lab: Path):
    config = load_limits(lab)  # raises with every problem if there is one
    noted = {note.key for note in config.notes}
    assert noted == {"bare_metal_access", "access_control.wrapper", "enforcement.cgroup_driver"}
    assert all(note.message.startswith("read, not used: ") for note in config.notes)
    assert config.archived == {"204214@hertie-school.lan"}
    assert config.admin_users == {"datasciencelab"} and config.admin_group == "ds01-admin"
    assert config.infrastructure_prefixes[:2] == ("ds01-prometheus", "ds01-grafana")
    assert config.infrastructure_label == "ds01.protected"
    assert config.enforcement == {"aggregate_limits": True}


# Each group's values as DS01's file defines them: defaults, then the group.
GROUPS = {
    "student": {
        "user": "228755@hertie-school.lan",
        "max_gpu_equivalents": 2.0,
        "max_gpu_slots_per_container": 2,
        "max_cpus": 32,
        "memory": 32 * GiB,
        "shm_size": 16 * GiB,
        "pids_limit": 4096,
        "max_containers_per_user": 3,
        "max_runtime": 24 * H,
        "idle_timeout": 0.5 * H,
        "gpu_hold_after_stop": 0.25 * H,
        "container_hold_after_stop": 0.5 * H,
        "max_tasks": 32768,
        "aggregate": {
            "cpus": 96.0,
            "memory": 96 * GiB,
            "memory_high": 86 * GiB,
            "pids": 12288,
            "gpu_equivalents": 2.0,
        },
        "idle_detection_window": 3,
        "cpu_idle_threshold": 2.0,
    },
    "researcher": {
        "user": "h.baker@hertie-school.lan",
        "max_gpu_equivalents": 4.0,
        "max_gpu_slots_per_container": 3,
        "max_cpus": 48,
        "memory": 64 * GiB,
        "shm_size": 32 * GiB,
        "max_containers_per_user": 5,
        "max_tasks": 65536,
        "aggregate": {
            "cpus": 240.0,
            "memory": 320 * GiB,
            "memory_high": 288 * GiB,
            "pids": 327680,
            "gpu_equivalents": 4.0,
        },
        "idle_detection_window": 4,
        "cpu_idle_threshold": 3.0,
    },
    "faculty": {
        "user": "w.lowe@hertie-school.lan",
        "max_gpu_slots_per_container": 4,
        "max_cpus": 64,
        "memory": 128 * GiB,
        "max_runtime": 72 * H,
        "idle_timeout": 2 * H,
        "aggregate": {
            "cpus": 320.0,
            "memory": 640 * GiB,
            "memory_high": 576 * GiB,
            "pids": 327680,
            "gpu_equivalents": 4.0,
        },
    },
    "admin": {
        "user": "datasciencelab",
        "max_gpu_equivalents": None,
        "max_gpu_slots_per_container": None,
        "max_runtime": 24 * H,
        "idle_timeout": 1 * H,
        "gpu_hold_after_stop": 1 * H,
        "max_containers_per_user": 10,
        "max_tasks": None,
        "aggregate": None,
    },
}
POLICY_KEYS = ("idle_detection_window", "cpu_idle_threshold")


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_group_gets_the_values_ds01s_file_defines(lab: Path, group: str):
    expected = dict(GROUPS[group])
    user = expected.pop("user")
    aggregate = expected.pop("aggregate", "absent")
    policies = {key: expected.pop(key) for key in POLICY_KEYS if key in expected}
    limits = resolve(load_limits(lab), user)
    assert limits.group == group
    if user != "h.baker@hertie-school.lan":  # h_baker has an override on top
        assert {key: limits.value(key) for key in expected} == expected
    if aggregate != "absent":
        assert limits.aggregate == aggregate
    assert {key: limits.policies[key] for key in policies} == policies


def test_top_level_policies_are_read_with_their_units(lab: Path):
    policies = resolve(load_limits(lab), "judy").policies
    assert policies == {
        "high_demand_threshold": 0.8,
        "high_demand_idle_reduction": 0.5,
        "gpu_idle_threshold": 5,
        "cpu_idle_threshold": 2.0,
        "network_idle_threshold": 1048576,
        "idle_detection_window": 3,
        "grace_period": 30 * M,  # grace_period_m: 30
        "keepalive_max_duration": 24 * H,
        "sigterm_grace": 60,
        "gpu_hold_after_manual_stop": 15 * M,
        "created_container_timeout": 30 * M,
    }
    limits = resolve(load_limits(lab), "judy")
    # Policies DS01 also uses as limits fill in where no layer sets the limit.
    assert limits.value("sigterm_grace") == 60 and limits.value("created_container_timeout") == 1800


@pytest.mark.parametrize(
    ("container_type", "idle", "runtime", "grace"),
    [
        ("devcontainer", None, 168 * H, 30),  # idle_timeout_h: null: never idle-stopped
        ("compose", 0.5 * H, 72 * H, 45),
        ("docker", 0.5 * H, 48 * H, 60),
        ("api", None, 24 * H, 30),
        ("unknown", 0.25 * H, 24 * H, 30),
    ],
)
def test_container_types_set_their_lifecycle_with_units(
    lab: Path, container_type: str, idle: float | None, runtime: float, grace: float
):
    limits = resolve(load_limits(lab), "judy", container_type)
    values = (limits.value("idle_timeout"), limits.value("max_runtime"))
    assert values == (idle, runtime)
    assert limits.value("sigterm_grace") == grace


@pytest.mark.parametrize(
    ("login", "group"),
    [
        ("judy@hertie-school.lan", "student"),  # an LDAP login, listed as judy
        ("judy", "student"),
        ("228755@hertie-school.lan", "student"),  # listed with the realm: exact
        ("228755", "student"),  # not listed: the default group, student too
        ("h.baker@hertie-school.lan", "researcher"),  # listed by DS01's sanitized name
        ("h.baker", "researcher"),
        ("w.lowe@hertie-school.lan", "faculty"),
        ("w.lowe@other.realm", "student"),  # listed with one realm: not another's
        ("204214@hertie-school.lan", "archived"),
        ("204214", "student"),  # archived with the realm: that login only
        ("nobody@hertie-school.lan", "student"),
    ],
)
def test_logins_resolve_to_groups_as_ds01_resolves_them(lab: Path, login: str, group: str):
    assert resolve(load_limits(lab), login).group == group


def test_an_override_keyed_by_the_sanitized_name_applies_over_the_group(lab: Path):
    baker = resolve(load_limits(lab), "h.baker@hertie-school.lan")
    assert baker.group == "researcher"
    assert baker.settings["idle_timeout"].source == OVERRIDE and baker.value("idle_timeout") is None
    assert baker.value("max_runtime") == 96 * H
    assert baker.settings["max_cpus"].source == GROUP and baker.value("max_cpus") == 48
    assert baker.cgroup_parent == "ds01-researcher-h_baker_hertie-school_lan.slice"  # seed's


def test_archived_users_may_take_nothing(lab: Path):
    archived = resolve(load_limits(lab), "204214@hertie-school.lan")
    assert archived.archived
    assert archived.value("max_gpu_equivalents") == 0
    assert archived.value("max_containers_per_user") == 0
    assert not resolve(load_limits(lab), "judy").archived


def test_admins_are_named_exactly(lab: Path):
    config = load_limits(lab)
    assert is_admin(config, "datasciencelab")
    # Sanitizing is lossy: DS01's matching rules never make anyone an admin.
    for lookalike in ("datasciencelab@evil.realm", "data.sciencelab", "datasciencelab_"):
        assert not is_admin(config, lookalike)
        # Nor the admin group's limits: its members count by their exact names only.
        assert resolve(config, lookalike).group == "student"


def test_aggregate_limits_can_be_switched_off(lab: Path):
    text = lab.read_text().replace("aggregate_limits: true", "aggregate_limits: false")
    assert text != lab.read_text()
    lab.write_text(text)
    assert resolve(load_limits(lab), "judy").aggregate is None


BASE = "defaults:\n  max_cpus: 4\n"


@pytest.mark.parametrize(
    ("line", "key", "seconds"),
    [
        ("idle_timeout_h: 48", "idle_timeout", 48 * H),  # the seed's era
        ("idle_timeout_h: 0.5", "idle_timeout", 30 * M),
        ("max_runtime_m: 90", "max_runtime", 90 * M),
        ("sigterm_grace_s: 45", "sigterm_grace", 45),
        ("gpu_hold_after_stop_h: null", "gpu_hold_after_stop", None),
        ("gpu_hold_after_stop_h: never", "gpu_hold_after_stop", None),  # DS01's word
        ("container_hold_after_stop: 2h", "container_hold_after_stop", 2 * H),  # ds01's
        ("created_container_timeout: 0", "created_container_timeout", 0),
    ],
)
def test_unit_suffixes_are_read_in_their_unit(line: str, key: str, seconds: float | None):
    config = parse(f"{BASE}  {line}\n")
    assert resolve(config, "anyone").value(key) == seconds


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("idle_timeout: 48", "48 has no unit: write 48h, 48m or 48s"),
        ("max_runtime: 2.5", "2.5 has no unit"),
        ("max_runtime_h: '24h'", "expected a number of hours, got '24h'"),
        ("idle_timeout_m: -5", "must not be negative"),
        ("max_runtime_h: 1000000", "longer than a century"),
        ("idle_timeout_x: 5", "unknown key 'idle_timeout_x'"),
        ("max_cpus_h: 5", "unknown key 'max_cpus_h'"),  # only durations take a unit
    ],
)
def test_wrong_durations_are_refused_with_what_to_write(line: str, problem: str):
    assert any(problem in issue for issue in issues_of(f"{BASE}  {line}\n")), issues_of(
        f"{BASE}  {line}\n"
    )


def test_one_duration_set_twice_in_two_spellings_is_refused():
    issues = issues_of(f"{BASE}  idle_timeout: 1h\n  idle_timeout_h: 2\n")
    assert any("sets idle_timeout a second time (already set as idle_timeout)" in i for i in issues)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("policies:\n  grace_period_m: soon\n", "expected a number of minutes"),
        ("policies:\n  high_demand_threshold: 80\n", "between 0 and 1"),
        ("policies:\n  gpu_idle_threshold: 150\n", "between 0 and 100"),
        ("policies:\n  idle_detection_window: 0\n", "must be at least 1"),
        ("policies:\n  idle_detction_window: 3\n", "did you mean idle_detection_window"),
        ("groups:\n  g:\n    aggregate: {cpu_quota: lots}\n", "a quota such as 9600%"),
        ("enforcement:\n  aggregate_limits: maybe\n", "expected true or false"),
        ("monitoring:\n  infrastructure_label: [a]\n", "must be a label name"),
    ],
)
def test_policy_aggregate_and_section_values_are_checked(text: str, problem: str):
    issues = issues_of(BASE + text)
    assert any(problem in issue for issue in issues), issues


def test_keys_without_meaning_in_ds01_are_notes_and_never_problems():
    config = parse(
        BASE
        + "  io_read_bps: 500M\n"
        + "policies:\n  auto_stop_idle: true\n"
        + "gpu_allocation:\n  mig_strategy: auto\n  strategy: pack\n"
    )
    assert {n.key for n in config.notes} == {
        "defaults.io_read_bps",
        "policies.auto_stop_idle",
        "gpu_allocation.mig_strategy",
    }
    assert config.gpu_allocation == {"strategy": "pack"}


def test_a_broken_reference_copy_is_refused_whole(lab: Path):
    """The drop-in never lowers the bar: one wrong value still refuses the file."""
    lab.write_text(lab.read_text().replace("max_runtime_h: 48 ", "max_runtime_h: forever ", 1))
    with pytest.raises(LimitsConfigError) as refused:
        load_limits(lab)
    assert [i.key for i in refused.value.issues] == ["groups.researcher.max_runtime_h"]


@pytest_asyncio.fixture(loop_scope="session")
async def serving(tmp_path: Path, pki: Pki, state_dir: Path, lab: Path) -> AsyncIterator[Path]:
    """The limits service, serving the lab's files; returns ds01.yaml."""
    config_file = tmp_path / "ds01.yaml"
    _config, service = await start_limits(state_dir, lab, config_file)
    yield config_file
    await service.stop(grace=0)


async def test_ds01_limits_check_serves_ds01s_file_and_lists_its_notes(
    serving: Path, pki: Pki, lab: Path
):
    served = await run_cli(serving, pki, "root", "limits", "check")
    assert served.returncode == 0, served.stdout + served.stderr
    assert served.stdout.strip().endswith("; OK, 3 note(s)"), served.stdout
    notes = [line for line in served.stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == 3 and any("bare_metal_access: read, not used" in n for n in notes)
    candidate = await run_cli(serving, pki, "root", "limits", "check", str(lab))
    assert candidate.returncode == 0 and f"{lab}: OK, 3 note(s)" in candidate.stdout
    block = await run_cli(serving, pki, "root", "limits", "judy@hertie-school.lan")
    assert block.returncode == 0, block.stderr
    assert block.stdout.splitlines()[:6] == [
        "User: judy@hertie-school.lan",
        "Group: student",
        "Priority: 0",
        "Max GPU-equivalents: 2",
        "Max GPU Slots per Container: 2",
        "Max CPUs: 32",
    ]
    assert "Max Runtime: 24h" in block.stdout and "Idle Timeout: 30m" in block.stdout


async def test_an_archived_user_is_refused_gpus_with_why(env: AllocatorEnv):
    """Archiving takes effect on the next reload, as DS01's README promises for
    revoking access; GPUs already held are not taken away by it."""
    async with env.client("alice") as alice:
        assert (await alice.allocate("before._.alice")).allocations
        groups = env.config.limits_file.parent / "groups"
        groups.mkdir(exist_ok=True)
        (groups / "archived.members").write_text("alice  # left the lab\n")
        for _ in range(100):
            if (await alice.get_limits()).archived:
                break
            await asyncio.sleep(0.1)
        with pytest.raises(Ds01Error) as refused:
            await alice.allocate("after._.alice")
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "archived.members" in refused.value.message
        held = [a.container for a in (await alice.gpu_status()).allocations if a.container]
        assert held == ["before._.alice"]


async def test_a_persons_stop_holds_the_gpu_for_gpu_hold_after_manual_stop(env: AllocatorEnv):
    """DS01's policies.gpu_hold_after_manual_stop_m: after its owner's stop the GPU is
    held that long; after an exit or a policy's stop, gpu_hold_after_stop applies."""
    text = env.config.limits_file.read_text()
    env.config.limits_file.write_text(text + "policies:\n  gpu_hold_after_manual_stop_m: 30\n")
    async with env.client("alice") as alice, env.service_client("containers") as service:
        for _ in range(100):
            if (await alice.get_limits()).policies.get("gpu_hold_after_manual_stop") == "30m":
                break
            await asyncio.sleep(0.1)
        for name in ("manual._.alice", "exited._.alice"):
            await service.allocate(name, user="alice")
        [manual] = await service.mark_stopped("manual._.alice", manual=True)
        [exited] = await service.mark_stopped("exited._.alice")
    held = manual.hold_until.seconds - manual.stopped_at.seconds
    assert 29 * M <= held <= 30 * M
    assert exited.hold_until.seconds - exited.stopped_at.seconds <= 3  # HOLD_SECONDS
