"""Limits configuration and resolution, tested directly (no gRPC)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds01.core.naming import sanitize_for_systemd
from ds01.limits.config import LimitsConfigError, SourceFiles, load_limits, parse_sources
from ds01.limits.resolve import (
    DEFAULT,
    GROUP,
    OVERRIDE,
    group_of,
    is_admin,
    resolve,
    unix_group_members,
)
from ds01.limits.schema import ALIASES, LIMIT_KEYS
from tests.limits_fixtures import RESOURCE_LIMITS, write_config

GiB = 1024**3


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def parse(text: str, members: dict[str, str] | None = None, overrides: str | None = None):
    return parse_sources(
        SourceFiles(
            ("resource-limits.yaml", text),
            {g: (f"groups/{g}.members", t) for g, t in (members or {}).items()},
            ("user-overrides.yaml", overrides) if overrides is not None else None,
        )
    )


def issues_of(text: str, **kwargs) -> list[str]:
    with pytest.raises(LimitsConfigError) as refused:
        parse(text, **kwargs)
    return [str(i) for i in refused.value.issues]


def test_sanitization_follows_the_seed():
    assert sanitize_for_systemd("h.baker@hertie-school.lan") == "h_baker_hertie-school_lan"


def test_seed_researcher_gets_group_values_over_defaults(config_path: Path):
    alice = resolve(load_limits(config_path), "alice")
    assert alice.group == "researchers" and alice.priority == 50
    assert alice.value("max_gpu_equivalents") == 2  # max_mig_instances alias
    assert alice.value("max_gpu_slots_per_container") == 1  # alias, from defaults
    assert alice.settings["max_cpus"].source == GROUP
    assert alice.settings["pids_limit"].source == DEFAULT
    assert alice.value("memory") == 64 * GiB
    assert alice.docker_args().flags() == (
        "--cpus=16 --memory=64g --memory-swap=64g --shm-size=16g --pids-limit=4096 "
        "--cgroup-parent=ds01-researchers-alice.slice"
    )


def test_unlisted_users_get_the_default_group(config_path: Path):
    config = load_limits(config_path)
    nobody = resolve(config, "student42")
    assert nobody.group == "students"
    assert nobody.docker_args().flags() == (
        "--cpus=8 --memory=32g --memory-swap=32g --shm-size=16g --pids-limit=4096 "
        "--cgroup-parent=ds01-students-student42.slice"
    )


def test_default_group_is_student_when_unset():
    config = parse("defaults: {max_cpus: 2}\n")
    assert resolve(config, "x").group == "student"
    assert resolve(config, "x").cgroup_parent == "ds01-student-x.slice"


def test_member_files_with_comments_are_unioned_with_inline_members(config_path: Path):
    config = load_limits(config_path)
    assert config.groups["researchers"].members == ("alice", "h_baker_hertie-school_lan", "carol")
    assert config.groups["faculty"].members == ("carol", "d.jones@uni.example")
    assert config.groups["admin"].members == ("labadmin",)


def test_ldap_names_match_by_raw_or_sanitized_name(config_path: Path):
    config = load_limits(config_path)
    baker = resolve(config, "h.baker@hertie-school.lan")
    assert baker.group == "researchers"  # listed as h_baker_hertie-school_lan
    assert baker.cgroup_parent == "ds01-researchers-h_baker_hertie-school_lan.slice"
    jones = resolve(config, "d.jones@uni.example")
    assert jones.group == "faculty"
    assert jones.cgroup_parent == "ds01-faculty-d_jones_uni_example.slice"


def test_first_group_in_file_order_wins_for_a_user_in_two_groups(config_path: Path):
    assert group_of(load_limits(config_path), "carol") == "researchers"


def test_null_means_unlimited_and_absent_falls_back(config_path: Path):
    carol_as_faculty = resolve(load_limits(config_path), "d.jones@uni.example")
    faculty = carol_as_faculty.settings
    # null in the group: unlimited, though the defaults say 1
    assert faculty["max_gpu_equivalents"].value is None
    assert faculty["max_gpu_equivalents"].source == GROUP
    # absent in group and override: falls back to the defaults
    assert faculty["pids_limit"].value == 4096 and faculty["pids_limit"].source == DEFAULT


def test_override_on_top_of_group_key_by_key(config_path: Path):
    jones = resolve(load_limits(config_path), "d.jones@uni.example")
    assert jones.settings["max_cpus"].value == 48 and jones.settings["max_cpus"].source == OVERRIDE
    assert jones.settings["memory"].value is None and jones.settings["memory"].source == OVERRIDE
    assert jones.priority == 80  # from the group, not overridden
    assert jones.value("allow_full_gpu") is True
    # The override's shm_size beats the group's ipc_mode: host.
    assert jones.docker_args().flags() == (
        "--cpus=48 --shm-size=8g --pids-limit=4096 "
        "--cgroup-parent=ds01-faculty-d_jones_uni_example.slice"
    )


def test_group_ipc_host_replaces_the_default_shm_size(config_path: Path):
    carol = resolve(load_limits(config_path), "carl")  # not listed: students
    assert "--shm-size=16g" in carol.docker_args().flags()
    faculty_only = parse(RESOURCE_LIMITS, members={"faculty": "erin\n"})
    erin = resolve(faculty_only, "erin").docker_args().flags()
    assert "--ipc=host" in erin and "--shm-size" not in erin


def test_policies_layer_global_group_override(config_path: Path):
    config = load_limits(config_path)
    assert resolve(config, "alice").policies == {
        "warn_before_idle_stop": 2 * 3600,  # override: 2h
        "exempt_from_idle": True,  # group
    }
    assert resolve(config, "student1").policies == {
        "warn_before_idle_stop": 3600,
        "exempt_from_idle": False,
    }


def test_aggregate_is_the_overrides_else_the_groups(config_path: Path):
    config = load_limits(config_path)
    assert resolve(config, "alice").aggregate == {"cpus": 32, "memory": 128 * GiB, "pids": 8192}
    assert resolve(config, "student1").aggregate is None
    text = RESOURCE_LIMITS.replace(
        "  alice:\n    policies:", "  alice:\n    aggregate: {cpus: 4}\n    policies:"
    )
    assert text != RESOURCE_LIMITS
    with_override = parse(text, members={"researchers": "alice\n"})
    assert resolve(with_override, "alice").aggregate == {"cpus": 4}


def test_the_override_file_wins_over_inline_overrides():
    text = "user_overrides:\n  bob: {max_cpus: 2, memory: 4g}\n"
    config = parse(text, overrides="bob:\n  max_cpus: 6\n")
    bob = resolve(config, "bob")
    assert bob.value("max_cpus") == 6 and bob.value("memory") == 4 * GiB


def test_admins_come_from_access_control_and_the_admin_group(config_path: Path):
    config = load_limits(config_path)
    assert is_admin(config, "root") and is_admin(config, "labadmin")
    assert not is_admin(config, "alice")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("defaults: {max_cpus: 8\n", "resource-limits.yaml:2: not valid YAML"),
        ("defaults:\n  max_cpu: 8\n", "resource-limits.yaml:2: defaults.max_cpu: unknown key"),
        ("defaults:\n  max_cpus: eight\n", "defaults.max_cpus: expected a number, got 'eight'"),
        ("defaults:\n  memory: -4g\n", "defaults.memory: '-4g' is not a size"),
        ("defaults:\n  memory: 4 parsecs\n", "'4 parsecs' is not a size"),
        ("defaults:\n  pids_limit: -1\n", "defaults.pids_limit: must not be negative"),
        ("defaults:\n  idle_timeout: soon\n", "'soon' is not a duration"),
        ("defaults:\n  allow_full_gpu: maybe\n", "expected true or false"),
        ("defaults:\n  priority: null\n", "defaults.priority: cannot be null"),
        (
            "groups:\n  g:\n    ipc_mode: host\n    shm_size: 1g\n",
            "resource-limits.yaml:4: groups.g.shm_size: ipc_mode: host and shm_size cannot",
        ),
        ("defaults:\n  max_mig_instances: 1\n  max_gpu_equivalents: 2\n", "a second time"),
        ("groupz: {}\n", "resource-limits.yaml:1: groupz: unknown key 'groupz' (did you mean"),
        ("groups:\n  g:\n    members: alice\n", "groups.g.members: must be a list"),
        ("gpu_allocation:\n  strategy: random\n", "expected one of least_allocated, pack"),
        ("defaults:\n  memory: 1g\n  memory: 2g\n", "resource-limits.yaml:3: defaults.memory: "),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_broken_files_are_refused_with_file_line_and_key(text: str, expected: str):
    assert any(expected in issue for issue in issues_of(text)), issues_of(text)


def test_member_file_for_an_undefined_group_is_refused():
    issues = issues_of("groups: {students: {}}\n", members={"reserchers": "alice\n"})
    assert issues == [
        "groups/reserchers.members: member file for group 'reserchers', which "
        "resource-limits.yaml does not define: add groups.reserchers there or remove this file"
    ]


def test_every_problem_is_reported_at_once():
    text = "defaults:\n  max_cpus: -1\n  memory: lots\nfoo: 1\n"
    issues = issues_of(text, overrides="bob:\n  shm_size: huge\n")
    assert len(issues) == 4
    assert any(i.startswith("user-overrides.yaml:2: bob.shm_size:") for i in issues)


def test_every_alias_means_its_canonical_key():
    for old, new in ALIASES.items():
        config = parse(f"defaults:\n  {old}: 3\n")
        assert resolve(config, "u").value(new) == 3


# --- property: any configuration loads or is refused with issues, never an exception ---

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["16g", "72h", "-1", "1.5t", "host", "private", "pack", "0", "1e400"]),
)
_keys = st.one_of(
    st.sampled_from([*LIMIT_KEYS, *ALIASES, "members", "aggregate", "policies", "memory_max"]),
    st.text(max_size=10),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)),
    max_leaves=20,
)
_configs = st.fixed_dictionaries(
    {},
    optional={
        "defaults": st.dictionaries(_keys, _scalars, max_size=6),
        "default_group": _values,
        "groups": st.dictionaries(st.text(max_size=8), _values, max_size=4),
        "policies": _values,
        "container_types": _values,
        "enforcement": _values,
        "access_control": st.dictionaries(
            st.sampled_from(["admin_users", "admin_group", "x"]), _values
        ),
        "gpu_allocation": _values,
        "user_overrides": st.dictionaries(st.text(max_size=8), _values, max_size=3),
        "other": _values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=_configs,
    members=st.dictionaries(st.text(min_size=1, max_size=6), st.text(max_size=40), max_size=2),
    overrides=st.one_of(st.none(), _values.map(yaml.safe_dump)),
    user=st.text(min_size=1, max_size=20),
)
def test_any_configuration_loads_or_is_refused_never_crashes(config, members, overrides, user):
    text = yaml.safe_dump(config)
    try:
        loaded = parse(text, members=members, overrides=overrides)
    except LimitsConfigError as err:
        assert err.issues and all(str(i) for i in err.issues)
        return
    resolved = resolve(loaded, user)
    resolved.docker_args().flags()
    assert set(resolved.settings) == set(LIMIT_KEYS)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_loads_or_is_refused_never_crashes(text):
    try:
        parse(text)
    except LimitsConfigError as err:
        assert err.issues


def test_alias_bombs_and_deep_nesting_are_refused_quickly():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for level in "bcdefghij":
        previous = chr(ord(level) - 1)
        bomb += (
            f"{level}: &{level} [*{previous}, *{previous}, *{previous}, *{previous}, *{previous}]\n"
        )
    bomb += "defaults:\n  max_cpus: *j\n"
    assert any("alias bomb" in issue for issue in issues_of(bomb))
    assert any("nested too deeply" in issue for issue in issues_of("a: " + "[" * 5000))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("defaults:\n  priority: 3000000000\n", "defaults.priority: 3000000000 is out of range"),
        ("defaults:\n  max_containers_per_user: 2147483648\n", "is too large"),
        ("defaults:\n  memory: 99999999999999999999t\n", "defaults.memory: "),
        ("defaults:\n  idle_timeout: .inf\n", "defaults.idle_timeout: "),
        ("defaults:\n  idle_timeout: .nan\n", "defaults.idle_timeout: "),
        ("defaults:\n  max_runtime: 99999999999999999w\n", "longer than a century"),
        ("defaults:\n  max_cpus: .inf\n", "expected a finite number"),
        ("groups:\n  g:\n    aggregate: {pids: 100000000000000000000000}\n", "is too large"),
    ],
)
def test_values_that_cannot_be_served_are_refused(text: str, expected: str):
    """Every accepted value must fit the message fields it is served in."""
    assert any(expected in issue for issue in issues_of(text)), issues_of(text)


def test_an_empty_limits_file_is_refused_not_served_as_unlimited():
    assert issues_of("") == [
        "resource-limits.yaml: the file is empty: it must at least have defaults"
    ]
    assert issues_of("# only a comment\n") == issues_of("")


def test_memory_above_swap_or_swap_without_memory_is_refused():
    text = "defaults:\n  memory: 32g\n  memory_swap: 32g\ngroups:\n  big:\n    memory: 64g\n"
    assert issues_of(text) == [
        "resource-limits.yaml:6: groups.big.memory: memory (64g) is larger than memory_swap "
        "(32g); Docker refuses that: set memory_swap as well"
    ]
    lone = "defaults:\n  memory_swap: 8g\n"
    assert any("Docker needs both" in issue for issue in issues_of(lone))


def test_special_files_beside_the_config_are_refused_without_blocking(tmp_path: Path):
    import os
    import threading

    path = write_config(tmp_path)
    os.mkfifo(tmp_path / "groups" / "faculty.members.fifo")
    (tmp_path / "groups" / "faculty.members").unlink()
    os.symlink("/dev/zero", tmp_path / "groups" / "faculty.members")
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(_load_or_issues(path)), daemon=True)
    reader.start()
    reader.join(5)
    assert result, "reading the configuration blocked"
    assert any("faculty.members: not a regular file" in str(i) for i in result[0])


def _load_or_issues(path: Path) -> list:
    try:
        load_limits(path)
    except LimitsConfigError as err:
        return err.issues
    return []


def test_admin_membership_matches_raw_names_only():
    config = parse(
        "access_control: {admin_group: admin}\ngroups:\n  admin:\n    members: [h_baker_x_org]\n"
    )
    assert is_admin(config, "h_baker_x_org")
    assert not is_admin(config, "h.baker@x.org")  # sanitizes to the same name
    # Nor the admin group's limits: sanitized names collide (h.baker_x.org too).
    assert group_of(config, "h.baker@x.org") == "student"
    other = parse("groups:\n  researchers:\n    members: [h_baker_x_org]\n")
    assert group_of(other, "h.baker@x.org") == "researchers"  # other groups: the seed's


def test_a_container_type_applies_between_group_and_override(config_path: Path):
    text = RESOURCE_LIMITS + "container_types:\n  batch: {idle_timeout: null, max_cpus: 4}\n"
    text = text.replace(
        "user_overrides:\n  alice:\n", "user_overrides:\n  alice:\n    max_cpus: 12\n"
    )
    config = parse(text, members={"researchers": "alice\ncarol\n"})
    carol = resolve(config, "carol", "batch")
    assert carol.settings["idle_timeout"].unlimited and carol.value("max_cpus") == 4
    assert carol.settings["max_cpus"].source == "container_type"
    assert carol.value("memory") == 64 * GiB  # the group's, untouched by the type
    assert resolve(config, "alice", "batch").value("max_cpus") == 12  # the override wins
    with pytest.raises(ValueError, match="unknown container type 'gpu'; configured: batch"):
        resolve(config, "carol", "gpu")


@pytest.mark.parametrize(
    "name",
    ['"adm\\0in"', '"adm:in"', '"adm\\nin"', '"  "', '" admin"', '"admin "', "12", "[admin]"],
)
def test_an_admin_group_no_system_could_name_is_refused_with_its_line(name: str):
    """Such a name is refused where it is written, not read and then asked of NSS
    (which a NUL byte makes raise): a broken file never replaces a working one."""
    issues = issues_of(f"access_control:\n  admin_group: {name}\n")
    assert any("access_control.admin_group" in i and "must be a group name" in i for i in issues)
    assert all("resource-limits.yaml:2" in i for i in issues if "admin_group" in i)


@pytest.mark.parametrize("none", ['""', "", "null"])
def test_an_admin_group_left_empty_names_none(none: str):
    """An empty admin_group names no group, as a missing one does: it was read so
    before, and a file that says it keeps working."""
    config = parse(RESOURCE_LIMITS.replace("admin_group: admin", f"admin_group: {none}"))
    assert config.admin_group is None
    assert not is_admin(config, "alice") and is_admin(config, "root")


def test_a_group_nss_cannot_read_makes_nobody_an_admin(caplog: pytest.LogCaptureFixture):
    """An NSS failure other than 'no such group' fails closed, in words."""
    assert unix_group_members("adm\0in") == frozenset()
    assert "cannot read the members of group" in caplog.text


def test_an_account_named_like_the_admin_group_is_no_admin():
    """Admins are who the configuration names: a primary group of the admin group's name
    (a user-private group) is not membership; a supplementary member is an admin."""
    group, lookalike, member = "ds01adm", "ds01adm", "ds01admmember"
    subprocess.run(["useradd", "-U", "-M", lookalike], check=True, capture_output=True)
    subprocess.run(["useradd", "-M", member], check=True, capture_output=True)
    try:
        config = parse(f"access_control: {{admin_group: {group}}}\n")
        assert not is_admin(config, lookalike)  # its primary group has the name: not enough
        assert not is_admin(config, member)
        subprocess.run(["usermod", "-aG", group, member], check=True, capture_output=True)
        assert is_admin(config, member)
    finally:
        subprocess.run(["userdel", member], capture_output=True)
        subprocess.run(["userdel", lookalike], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
