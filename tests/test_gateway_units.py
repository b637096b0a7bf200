"""The gateway's pure stages, exhaustively: strict decoding, Go's query rules, the route
table, image names and the policy, with generated spellings (hypothesis)."""

from __future__ import annotations

import contextlib
import json
from pathlib import PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds01.ownership.gateway import fields, policy, verify
from ds01.ownership.gateway.images import Access, access, is_id, parse_name, require_writable
from ds01.ownership.gateway.policy import Caller, Caps, Found, Refused, Resolved
from ds01.ownership.gateway.routes import match
from ds01.ownership.gateway.strict import BadRequest, decode_json, encode_query, parse_query

BOB = Caller(
    "bob",
    2002,
    2000,
    frozenset({2000, 2100}),
    PurePosixPath("/home/bob"),
    "/ds01/students/bob",
    Caps(nano_cpus=8 * 10**9, memory=32 << 30, memory_swap=32 << 30, pids=4096, shm_size=1 << 30),
)
USERS = {"alice", "bob"}

# Docker's Go decoder folds keys with Unicode simple folding: these are the same key to it.
FOLDS = {"s": ["S", "ſ"], "k": ["K", "K"], "K": ["k", "K"], "S": ["s", "ſ"]}


def create(**body: object) -> bytes:
    return json.dumps({"Image": "img", **body}).encode()


def fold_variants(key: str) -> list[str]:
    variants = {key.lower(), key.upper(), key.swapcase(), key[0].lower() + key[1:]}
    for i, char in enumerate(key):
        for other in FOLDS.get(char, []):
            variants.add(key[:i] + other + key[i + 1 :])
    variants.discard(key)
    return sorted(variants)


DANGEROUS = [
    ("HostConfig", {"Privileged": True}),
    ("Labels", {"x": "y"}),
    ("User", "0"),
    ("Env", ["A=b"]),
]


@pytest.mark.parametrize(("key", "value"), DANGEROUS)
def test_every_other_spelling_of_a_key_is_refused(key, value):
    for spelled in fold_variants(key):
        with pytest.raises(BadRequest, match=r"unknown field|not plain ASCII"):
            decode_json(create(**{spelled: value}), fields.CONTAINER_CREATE, "body")


@pytest.mark.parametrize(
    "key",
    ["Privileged", "CapAdd", "Binds", "PidMode", "Devices", "SecurityOpt", "Mounts", "Sysctls"],
)
def test_host_config_keys_in_other_spellings_are_refused(key):
    for spelled in fold_variants(key):
        body = json.dumps({"Image": "i", "HostConfig": {spelled: None}}).encode()
        with pytest.raises(BadRequest):
            decode_json(body, fields.CONTAINER_CREATE, "body")


@given(st.text(alphabet="HhOoSsTtCcNnFfIiGgſKk", min_size=10, max_size=10))
@settings(max_examples=300, deadline=None)
def test_generated_spellings_pass_only_when_exact(spelling):
    body = json.dumps({"Image": "i", spelling: {}}).encode()
    if spelling == "HostConfig":
        assert decode_json(body, fields.CONTAINER_CREATE, "b")["HostConfig"] == {}
    else:
        with pytest.raises(BadRequest):
            decode_json(body, fields.CONTAINER_CREATE, "b")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"Image":"i","HostConfig":{"Privileged":false,"Privileged":true}}',
        b'{"Image":"i","Image":"j"}',
        b'{"Image":"i","Labels":{"a":"1","a":"2"}}',
        b'{"Image":"i","Labels":{"\\u017f":"x"}}',
        b'{"Image":"i","HostConfig":{"Memory":NaN}}',
        b'{"Image":"i","HostConfig":{"Memory":1e3}}',
        b'{"Image":"i","HostConfig":{"Memory":99999999999999999999}}',
        b'{"Image":"i","HostConfig":{"Privileged":"true"}}',
        b'{"Image":"i","HostConfig":{"Privileged":1}}',
        b'{"Image":"i\\u0000"}',
        b'{"Image":"\\ud800"}',
        b'["Image"]',
        b'{"Image":"i"} {"HostConfig":{"Privileged":true}}',
        b"\xff{}",
    ],
)
def test_bodies_docker_could_read_differently_are_refused(raw):
    with pytest.raises(BadRequest):
        decode_json(raw, fields.CONTAINER_CREATE, "body")


def test_a_checked_body_keeps_docker_zero_values():
    body = create(HostConfig={"Privileged": False, "CapAdd": None}, Cmd="true")
    decoded = decode_json(body, fields.CONTAINER_CREATE, "b")
    assert decoded["HostConfig"] == {"Privileged": False, "CapAdd": None}
    assert decoded["Cmd"] == ["true"]  # Go's StrSlice takes a string too


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("container=a;container=b", "';'"),
        ("container=a&container=b", "twice"),
        ("container=a&%63ontainer=b", "twice"),
        ("contaıner=b", "unknown"),
        ("Container=b", "unknown"),
        ("container=%zz", "percent"),
        ("container=%ff", "UTF-8"),
        ("container=a%00", "NUL"),
    ],
)
def test_queries_are_read_with_gos_rules_and_refused_where_they_could_differ(query, problem):
    with pytest.raises(BadRequest, match=problem):
        parse_query(query, ["container", "repo"])


def test_a_query_is_decoded_as_go_decodes_it():
    assert parse_query("repo=a+b%2Fc&container=x", ["repo", "container"]) == {
        "repo": ["a b/c"],
        "container": ["x"],
    }


@pytest.mark.parametrize(
    "target",
    [
        "/containers/own/alias/json",
        "/containers/own%2Falias/json",
        "/containers/own/alias",
        "/containers/own/alias/archive?path=/",
        "/v1.41/containers/own/alias/stop",
        "//containers/own/json",
        "/containers/./own/json",
        "/plugins",
        "/swarm/init",
        "/containers/own/attach/ws",
        "/system/df",
        "/session",
    ],
)
def test_routes_outside_the_table_are_for_admins(target):
    for method in ("GET", "POST", "DELETE"):
        assert match(method, target) is None, (method, target)
    for prune in ("/build/prune", "/images/prune", "/volumes/prune", "/networks/prune"):
        assert match("POST", prune) is None


@pytest.mark.parametrize("target", ["/v1.41.0/info", "/v01.41/info", "/vx/info", "/info#x"])
def test_odd_version_prefixes_and_fragments_are_refused(target):
    with contextlib.suppress(BadRequest):
        assert match("GET", target) is None


def test_routes_name_their_objects():
    found = match("POST", "/v1.47/containers/abc/exec")
    assert found and found.route.action == "exec_create" and found.params == {"container": "abc"}
    found = match("DELETE", "/images/ds01-bob/proj:v1")
    assert found and found.params == {"image": "ds01-bob/proj:v1"}
    assert match("PUT", "/containers/abc/archive") is None  # copying in is for admins


@pytest.mark.parametrize(
    ("name", "user", "ok"),
    [
        ("bob/proj:v1", "bob", True),
        ("ds01-bob/proj", "bob", True),
        ("docker.io/bob/proj", "bob", True),
        ("alice/proj", "bob", False),
        ("ubuntu:22.04", "bob", False),
        ("library/ubuntu", "bob", False),
        ("registry.example.org/bob/proj", "bob", False),
        ("localhost/bob/x", "bob", False),
        ("bobby/proj", "bob", False),
        ("ds01-bobby/proj", "bob", False),
        ("bob/proj@sha256:" + "a" * 64, "bob", False),
    ],
)
def test_users_write_images_only_in_their_namespace(name, user, ok):
    if ok:
        assert require_writable(name, user)
    else:
        with pytest.raises((PermissionError, BadRequest)):
            require_writable(name, user)


def test_image_access_follows_tags_and_labels():
    exists = USERS.__contains__
    assert access("bob", ["ubuntu:22.04"], {}, exists) is Access.SHARED
    assert access("bob", ["bob/x:1"], {}, exists) is Access.OWN
    assert access("bob", ["alice/x:1"], {}, exists) is Access.PRIVATE
    assert access("bob", [], {"ds01.user": "alice"}, exists) is Access.PRIVATE
    assert access("bob", ["nobody/x:1"], {}, exists) is Access.SHARED  # not a local user
    assert parse_name("docker.io/library/ubuntu").tagged() == "ubuntu:latest"


@pytest.mark.parametrize(
    "reference",
    ["Alice/x", "ALICE/x:1", "Ubuntu", "alice/X", "a//b", "ubuntu:", "x@sha256:zz", " ubuntu",
     "ubuntu\n", "alice/x:1\n", "bob/private\n", f"x@sha256:{'a' * 64}\n"],
)  # fmt: skip
def test_an_image_name_docker_would_refuse_is_refused_as_docker_would(reference: str):
    assert not is_id(reference)
    """A first part without '.' or ':' is a path's part, lower case as every other (Docker:
    "repository name must be lowercase"): never read as a registry and let through."""
    with pytest.raises(BadRequest, match="is not a valid image name"):
        parse_name(reference)


def resolved(**extra: object) -> Resolved:
    found = Resolved(
        paths={
            "/home/bob/w": "/home/bob/w",
            "/home/bob/link": "/etc",
            "/etc": "/etc",
            "/home/bob/missing": "",
        }
    )
    found.containers = {
        "mine": Found("m" * 64, "bob"),
        "theirs": Found("t" * 64, "alice"),
        "orphan": Found("o" * 64, ""),
    }
    found.volumes = {"bobvol": Found("bobvol", "bob"), "alicevol": Found("alicevol", "alice")}
    found.networks = {"alicenet": Found("n" * 64, "alice"), "bobnet": Found("b" * 64, "bob")}
    for key, value in extra.items():
        setattr(found, key, value)
    return found


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ({"Privileged": True}, "privileged"),
        ({"CapAdd": ["SYS_ADMIN"]}, "capabilities"),
        ({"Devices": [{"PathOnHost": "/dev/sda"}]}, "devices"),
        ({"DeviceCgroupRules": ["a *:* rwm"]}, "devices"),
        ({"DeviceRequests": [{"Count": -1}]}, "GPUs"),
        ({"PidMode": "host"}, "PidMode=host"),
        ({"IpcMode": "host"}, "IpcMode=host"),
        ({"NetworkMode": "host"}, "NetworkMode=host"),
        ({"UTSMode": "host"}, "UTSMode"),
        ({"UsernsMode": "host"}, "UsernsMode"),
        ({"CgroupnsMode": "host"}, "CgroupnsMode"),
        ({"PidMode": "container:theirs"}, "your own"),
        ({"IpcMode": "container:orphan"}, "your own"),
        ({"NetworkMode": "container:theirs"}, "your own"),
        ({"VolumesFrom": ["theirs:ro"]}, "your own"),
        ({"Binds": ["/etc:/x"]}, "home"),
        ({"Binds": ["/home/bob/link:/x"]}, "home"),
        ({"Binds": ["alicevol:/x"]}, "volume owned by alice"),
        ({"Binds": ["/home/bob/w:/x:rshared"]}, "bind option"),
        ({"Binds": ["/home/bob/w:/x:z"]}, "bind option"),
        ({"Binds": ["/home/bob/missing:/x"]}, "does not exist"),
        ({"Mounts": [{"Type": "bind", "Source": "/etc", "Target": "/x"}]}, "home"),
        ({"Mounts": [{"Type": "volume", "Source": "alicevol", "Target": "/x"}]}, "alice"),
        ({"Mounts": [{"Type": "image", "Source": "img", "Target": "/x"}]}, "type image"),
        (
            {"Mounts": [{"Type": "volume", "Target": "/x", "VolumeOptions": {"DriverConfig": {}}}]},
            None,
        ),
        (
            {
                "Mounts": [
                    {
                        "Type": "volume",
                        "Target": "/x",
                        "VolumeOptions": {"DriverConfig": {"Name": "local"}},
                    }
                ]
            },
            "driver options",
        ),
        (
            {
                "Mounts": [
                    {
                        "Type": "bind",
                        "Source": "/home/bob/w",
                        "Target": "/x",
                        "BindOptions": {"CreateMountpoint": True},
                    }
                ]
            },
            "CreateMountpoint",
        ),
        ({"GroupAdd": ["0"]}, "GroupAdd"),
        ({"GroupAdd": ["docker"]}, "GroupAdd"),
        ({"GroupAdd": ["root"]}, "GroupAdd"),
        ({"Ulimits": [{"Name": "nofile", "Soft": 1, "Hard": 1 << 40}]}, "ulimit"),
        ({"Ulimits": [{"Name": "rtprio", "Soft": 99, "Hard": 99}]}, "ulimit"),
        ({"Ulimits": [{"Name": "nproc", "Soft": -1, "Hard": -1}]}, "ulimit"),
        ({"OomScoreAdj": -1000}, "OomScoreAdj"),
        ({"OomKillDisable": True}, "OomKillDisable"),
        ({"Links": ["theirs:alias"]}, "Links"),
        ({"Links": ["mine:a/b"]}, "alias"),
        ({"PortBindings": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}}, "127.0.0.1"),
        ({"PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": "80"}]}}, "1024"),
        ({"PortBindings": {"80/tcp": [{"HostIp": "::", "HostPort": "8080"}]}}, "127.0.0.1"),
        ({"PortBindings": {"80/tcp": [{"HostPort": "1000-2000"}]}}, "1024"),
        ({"PublishAllPorts": True}, "PublishAllPorts"),
        ({"Tmpfs": {"/t": "suid"}}, "tmpfs option"),
        ({"Tmpfs": {"/t": "size=50%"}}, "tmpfs size"),
        ({"Tmpfs": {"/t": "size=64m\n"}}, "tmpfs size"),  # a pattern's $ passes a last \n
        ({"PortBindings": {"80/tcp": [{"HostPort": "8080\n"}]}}, "1024"),
        ({"PortBindings": {"80/tcp": [{"HostPort": "2000-3000\n"}]}}, "1024"),
        ({"SecurityOpt": ["seccomp=unconfined"]}, "security option"),
        ({"SecurityOpt": ["apparmor=unconfined"]}, "security option"),
        ({"SecurityOpt": ["label=disable"]}, "security option"),
        ({"MaskedPaths": []}, "MaskedPaths"),
        ({"ReadonlyPaths": []}, "ReadonlyPaths"),
        ({"Sysctls": {"kernel.x": "1"}}, "Sysctls"),
        ({"Annotations": {"cdi.k8s.io/x": "nvidia.com/gpu=all"}}, "Annotations"),
        ({"Runtime": "nvidia"}, "runtime"),
        ({"VolumeDriver": "custom"}, "volume drivers"),
        ({"BlkioDeviceReadBps": [{"Path": "/dev/sda", "Rate": 1}]}, "admins"),
        ({"CpuRealtimeRuntime": 1000}, "admins"),
        ({"Cgroup": "container:theirs"}, "Cgroup"),
    ],
)
def test_create_refusals(host, reason):
    body = {"Image": "img", "HostConfig": host}
    if reason is None:  # an empty DriverConfig is no driver option at all
        policy.admit_create(body, BOB, resolved())
        return
    with pytest.raises(Refused, match=reason):
        policy.admit_create(body, BOB, resolved())


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"Env": ["NVIDIA_VISIBLE_DEVICES=all"]}, "GPU visibility"),
        ({"Env": ["CUDA_VISIBLE_DEVICES=0"]}, "GPU visibility"),
        (
            {"NetworkingConfig": {"EndpointsConfig": {"alicenet": {}}}},
            "network owned by alice",
        ),
        ({"NetworkingConfig": {"EndpointsConfig": {"host": {}}}}, "host"),
        (
            {"NetworkingConfig": {"EndpointsConfig": {"bobnet": {"Links": ["theirs"]}}}},
            "endpoint Links",
        ),
        (
            {"NetworkingConfig": {"EndpointsConfig": {"bobnet": {"DriverOpts": {"a": "b"}}}}},
            "driver options",
        ),
    ],
)
def test_create_refusals_outside_the_host_config(body, reason):
    with pytest.raises(Refused, match=reason):
        policy.admit_create({"Image": "img", **body}, BOB, resolved())


def test_a_create_is_forwarded_with_ds01s_settings_and_resolved_references():
    body = {
        "Image": "img",
        "User": "0",
        "Labels": {"ds01.user": "alice", "aime.mlc.USER": "alice", "keep": "me"},
        "HostConfig": {
            "Binds": ["/home/bob/w:/w:ro", "bobvol:/v"],
            "PidMode": "container:mine",
            "VolumesFrom": ["mine:ro"],
            "NanoCpus": 64 * 10**9,
            "CpuShares": 262144,
            "CgroupParent": "/",
            "Tmpfs": {"/t": "exec,size=64m"},
            "PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]},
            "GroupAdd": ["2100"],
            "LogConfig": {"Type": "syslog", "Config": {"syslog-address": "tcp://x"}},
        },
        "NetworkingConfig": {"EndpointsConfig": {"bobnet": {"Aliases": ["a"]}}},
    }
    out = policy.admit_create(body, BOB, resolved())
    host = out["HostConfig"]
    assert out["User"] == "2002:2000"
    assert out["Labels"] == {
        "keep": "me",
        "ds01.user": "bob",
        "ds01.managed": "true",
        "ds01.gateway": "true",  # its other ds01 labels are the image's: never trusted
    }
    assert host["Binds"] == ["bobvol:/v"]  # a path becomes a mount: Docker never makes it
    assert host["Mounts"] == [
        {"Type": "bind", "Source": "/home/bob/w", "Target": "/w", "ReadOnly": True}
    ]
    assert host["PidMode"] == "container:" + "m" * 64
    assert host["VolumesFrom"] == ["m" * 64 + ":ro"]
    assert host["NanoCpus"] == 8 * 10**9 and host["CpuShares"] == 1024
    assert host["CgroupParent"] == "/ds01/students/bob"
    assert host["Tmpfs"] == {"/t": f"exec,nosuid,nodev,size={64 << 20}"}
    assert host["PortBindings"] == {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]}
    assert host["LogConfig"] == {"Type": "json-file", "Config": {}}
    assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
    assert list(out["NetworkingConfig"]["EndpointsConfig"]) == ["b" * 64]
    assert "NVIDIA_VISIBLE_DEVICES=void" in out["Env"]


@pytest.mark.parametrize(
    "user", ["0", "00", "+0", "-0", "root", "0:0", " 0", "0 ", "2002x", "4294967296", "bob", "2003"]
)
def test_exec_runs_only_as_the_owner_by_number(user):
    with pytest.raises(Refused):
        policy.admit_exec({"User": user, "Cmd": ["id"]}, BOB)


def test_exec_spellings_of_the_owner_are_forwarded_canonical():
    assert policy.admit_exec({"User": "002002"}, BOB)["User"] == "2002:2000"
    assert policy.admit_exec({"User": "2002:2100"}, BOB)["User"] == "2002:2100"
    assert policy.admit_exec({}, BOB)["User"] == "2002:2000"
    with pytest.raises(Refused, match="group"):
        policy.admit_exec({"User": "2002:0"}, BOB)
    with pytest.raises(Refused, match="privileged"):
        policy.admit_exec({"Privileged": True}, BOB)


@pytest.mark.parametrize(
    "body",
    [
        {"Driver": "local", "DriverOpts": {"type": "none", "o": "bind", "device": "/"}},
        {"DriverOpts": {"type": "proc", "device": "proc"}},
        {"DriverOpts": {"type": "overlay", "o": "lowerdir=/,upperdir=/tmp/u,workdir=/tmp/w"}},
        {"DriverOpts": {"type": "ext4", "device": "/dev/sda1"}},
        {"Driver": "nfs"},
        {"ClusterVolumeSpec": {"x": "y"}},
    ],
)
def test_volumes_with_options_or_drivers_are_refused(body):
    with pytest.raises(Refused):
        policy.admit_volume_create(body, BOB)


@pytest.mark.parametrize(
    "body",
    [
        {"Name": "n", "Driver": "macvlan", "Options": {"parent": "eth0"}},
        {"Name": "n", "Driver": "ipvlan"},
        {"Name": "n", "Driver": "host"},
        {"Name": "n", "Options": {"com.docker.network.bridge.name": "eth0"}},
        {"Name": "n", "IPAM": {"Config": [{"Subnet": "10.0.0.0/8"}]}},
        {"Name": "n", "EnableIPv6": True},
        {"Name": "n", "ConfigOnly": True},
        {"Name": "n", "ConfigFrom": {"Network": "x"}},
        {"Name": "n", "Scope": "swarm"},
        {"Driver": "bridge"},
    ],
)
def test_networks_beyond_a_plain_bridge_are_refused(body):
    with pytest.raises(Refused):
        policy.admit_network_create(body, BOB)


@pytest.mark.parametrize(
    "change",
    [
        "LABEL ds01.user=alice",
        'LABEL "ds01.user"=alice',
        "LABEL ds01\\.user=alice",
        "label aime.mlc.USER=alice",
        "LABEL $X=alice",
        "ONBUILD RUN id",
        "VOLUME /x",
        "RUN id",
        "FROM alice/x",
    ],
)
def test_commit_and_import_changes_that_could_claim_ownership_are_refused(change):
    with pytest.raises(Refused):
        policy.admit_changes([change])


def inspect(**host: object) -> dict:
    base = {
        "Privileged": False,
        "CapDrop": ["ALL"],
        "SecurityOpt": ["no-new-privileges"],
        "CgroupnsMode": "private",
        "CgroupParent": "/ds01/students/bob",
        "LogConfig": {"Type": "json-file"},
        "NanoCpus": 10**9,
        "Memory": 1 << 30,
        "PidsLimit": 100,
        "ShmSize": 1 << 20,
    }
    return {
        "Config": {"User": "2002:2000", "Labels": {"ds01.user": "bob"}},
        "HostConfig": {**base, **host},
        "Mounts": [],
    }


def test_dockers_view_passes_when_it_matches_the_policy():
    assert verify.container_violations(inspect(), BOB, set(), set()) == []


@pytest.mark.parametrize(
    "host",
    [
        {"Privileged": True},
        {"CapAdd": ["SYS_ADMIN"]},
        {"CapDrop": []},
        {"PidMode": "host"},
        {"IpcMode": "host"},
        {"NetworkMode": "host"},
        {"PidMode": "container:" + "t" * 64},
        {"UsernsMode": "host"},
        {"CgroupnsMode": "host"},
        {"SecurityOpt": ["seccomp=unconfined"]},
        {"Devices": [{"PathOnHost": "/dev/sda"}]},
        {"CgroupParent": "/"},
        {"Memory": 0},
        {"PortBindings": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "80"}]}},
        {"Tmpfs": {"/t": "exec"}},
        {"MaskedPaths": []},
        {"OomScoreAdj": -1000},
        {"GroupAdd": ["0"]},
        {"LogConfig": {"Type": "syslog"}},
    ],
)
def test_dockers_view_that_breaks_the_policy_is_caught(host):
    assert verify.container_violations(inspect(**host), BOB, set(), set())


def test_dockers_view_of_user_and_mounts_is_checked():
    wrong_user = inspect()
    wrong_user["Config"]["User"] = "0"
    assert verify.container_violations(wrong_user, BOB, set(), set())
    outside = inspect()
    outside["Mounts"] = [{"Type": "bind", "Source": "/etc"}]
    assert verify.container_violations(outside, BOB, set(), set())
    theirs = inspect()
    theirs["Mounts"] = [{"Type": "volume", "Name": "alicevol", "Driver": "local"}]
    assert verify.container_violations(theirs, BOB, set(), {"bobvol"})
    assert verify.exec_violations({"ProcessConfig": {"user": "0"}}, BOB)
    assert verify.exec_violations({"ProcessConfig": {"user": "2002", "privileged": True}}, BOB)
    assert not verify.exec_violations({"ProcessConfig": {"user": "2002:2000"}}, BOB)
    assert verify.volume_violations({"Driver": "local", "Options": {"device": "/"}}, BOB)
    assert verify.network_violations({"Driver": "macvlan", "Labels": {"ds01.user": "bob"}}, BOB)


@pytest.mark.parametrize(
    ("name", "ok"),
    [("proj._.bob", True), ("plain", True), ("", True), ("proj._.alice", False),
     ("/proj._.alice", False), ("a._.bob._.alice", False), ("proj._.bobby", False)],
)  # fmt: skip
def test_names_in_another_users_convention_are_theirs(name, ok):
    if ok:
        assert policy.admit_name(name, BOB) == name
    else:
        with pytest.raises(Refused, match="that user's"):
            policy.admit_name(name, BOB)


QUERY_PIECES = [
    "container=mine", "container=theirs", "repo=bob/x", "tag=1", "%63ontainer=theirs",
    "container=a%3Bcontainer%3Dtheirs", "Container=theirs", "container", "=x", ";", "#", "+",
    "%", "%2", "%zz", "changes=ENV+A%3D1", "changes=CMD+id", "x=y", "&",
]  # fmt: skip


@given(st.lists(st.sampled_from(QUERY_PIECES), max_size=6))
@settings(max_examples=400, deadline=None)
def test_generated_queries_are_refused_or_read_once_and_reencoded_the_same(pieces):
    raw = "&".join(pieces)
    allowed = ("container", "repo", "tag", "changes")
    try:
        parsed = parse_query(raw, allowed, repeatable=("changes",))
    except BadRequest:
        return
    assert set(parsed) <= set(allowed)
    assert all(len(v) == 1 for k, v in parsed.items() if k != "changes")
    encoded = encode_query(parsed)
    assert ";" not in encoded and "#" not in encoded
    assert parse_query(encoded, allowed, repeatable=("changes",)) == parsed


def test_a_path_that_cannot_be_resolved_is_no_bind_source(tmp_path):
    from ds01.ownership.gateway.request import existing, inside

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert existing(str(loop)) == "" and existing(str(tmp_path / "missing")) == ""
    assert not inside(str(loop), PurePosixPath(tmp_path))
    assert existing(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("reference", [f"{'a' * 12}\n", f"sha256:{'b' * 64}\n", "0123456789ab\n"])
def test_an_image_id_with_a_last_newline_is_no_id(reference: str):
    """Read as an id it would reach no one's image by name checks; Docker reads no id."""
    assert not is_id(reference) and is_id(reference.rstrip("\n"))
