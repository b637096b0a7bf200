"""The gateway against a hostile local user: raw requests on the socket, class by class,
several variants each. Every refused request must leave the victim's things untouched and
must make nothing of the attacker's; every accepted one must make only what the policy
allows, as Docker itself reports it (checked as root on the real daemon)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.gateway_audit import audit_daemon
from tests.gateway_raw import raw_as, request

pytestmark = pytest.mark.usefixtures("unix_users", "daemon_audit")

ALICE, BOB = "ds01alice", "ds01bob"


def _root(docker_socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "-H", f"unix://{docker_socket}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


class World:
    def __init__(self, socket: str, docker_socket: Path, image: str, victim: str) -> None:
        self.socket = socket
        self.docker_socket = docker_socket
        self.image = image
        self.victim = victim  # alice's container id

    async def bob(self, *connections: str) -> list[list]:
        return await raw_as(BOB, self.socket, list(connections))

    async def alice(self, *connections: str) -> list[list]:
        return await raw_as(ALICE, self.socket, list(connections))

    def root(self, *args: str) -> str:
        result = _root(self.docker_socket, *args)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def bobs_containers(self) -> list[str]:
        return self.root("ps", "-aq", "--filter", f"label=ds01.user={BOB}").split()

    async def create_as_bob(self, body: dict) -> list:
        """Send a create for bob; return the answers."""
        (answers,) = await self.bob(
            request("POST", "/v1.41/containers/create", {"Image": self.image, **body})
        )
        return answers


@pytest_asyncio.fixture(loop_scope="session")
async def world(ownership, test_image, docker_socket) -> AsyncIterator[World]:
    config, _ = ownership
    socket = str(config.ownership.proxy_socket)
    (made,) = await raw_as(
        ALICE,
        socket,
        [
            request(
                "POST",
                "/containers/create?name=victim",
                {
                    "Image": test_image,
                    "Cmd": ["sleep", "600"],
                    "HostConfig": {"NetworkMode": "none"},
                },
            )
        ],
    )
    assert made[0].status == 201, made[0].body
    victim = made[0].json()["Id"]
    world = World(socket, docker_socket, test_image, victim)
    world.root("start", victim)
    world.root("volume", "create", "--label", f"ds01.user={ALICE}", "alicevol")
    world.root("tag", test_image, f"{ALICE}/private:1")
    world.root("network", "create", "--config-only", "--label", f"ds01.user={ALICE}", "alicenet")
    yield world
    for container in world.root("ps", "-aq", "--filter", "label=ds01.user").split():
        world.root("rm", "-f", container)
    _root(docker_socket, "volume", "rm", "-f", "alicevol", "bobvol")
    _root(docker_socket, "rmi", f"{ALICE}/private:1")
    _root(docker_socket, "network", "rm", "alicenet")
    for image in world.root("images", "--format", "{{.Repository}}:{{.Tag}}").split():
        if image.startswith((f"{BOB}/", f"ds01-{BOB}/")):
            _root(docker_socket, "rmi", "-f", image)


def _statuses(answers: list) -> list[int]:
    return [a.status for a in answers]


async def assert_victim_untouched(world: World) -> None:
    state = json.loads(world.root("inspect", world.victim))[0]
    assert state["State"]["Running"], "alice's container was stopped"
    assert world.root("volume", "inspect", "-f", "{{.Name}}", "alicevol") == "alicevol"
    assert world.root("image", "inspect", "-f", "{{.Id}}", f"{ALICE}/private:1")


# --- 1. parse differentials -----------------------------------------------------------

FOLDED_CREATES = [
    {"HoſtConfig": {"Privileged": True}},
    {"hostconfig": {"Privileged": True}},
    {"HOSTCONFIG": {"CapAdd": ["ALL"]}},
    {"HostConfig": {"privileged": True}},
    {"HostConfig": {"PRIVILEGED": True}},
    {"HostConfig": {"CapAdd": None, "capAdd": ["SYS_ADMIN"]}},
    {"HostConfig": {"Binds": None, "BindS": ["/:/host"]}},
    {"HostConfig": {"Binds": None, "Bindſ": ["/:/host"]}},
    {"HostConfig": {"PidMode": "", "PIDMode": "host"}},
    {"HostConfig": {"Devices": [{"PathOnHoſt": "/dev/sda", "PathInContainer": "/dev/x"}]}},
    {"HostConfig": {"SecurityOpt": None, "SecurityOpT": ["seccomp=unconfined"]}},
    {"HostConfig": {"Privileged": False, "Privileged ": True}},
    {"Labelſ": {"ds01.user": ALICE}},
    {"uſer": "0"},
    {"HostConfig": {"Mounts": [{"Type": "bind", "Source": "/home", "Target": "/h", "type": "x"}]}},
    {"HostConfig": {"KernelMemoryTCP": 0, "KernelMemoryTcp": 1}},
]


@pytest.mark.parametrize("ascii_escapes", [True, False])
async def test_key_spellings_docker_would_fold_are_refused(world, ascii_escapes):
    connections = []
    for body in FOLDED_CREATES:
        text = json.dumps({"Image": world.image, **body}, ensure_ascii=ascii_escapes)
        connections.append(
            request(
                "POST",
                "/v1.41/containers/create",
                raw_body=text.encode(),
                headers={"Content-Type": "application/json"},
            )
        )
    duplicate = (
        f'{{"Image": "{world.image}", "HostConfig": {{"Privileged": false, "Privileged": true}}}}'
    )
    connections.append(request("POST", "/containers/create", raw_body=duplicate))
    results = await world.bob(*connections)
    for body, (answer,) in zip([*FOLDED_CREATES, "duplicate"], results, strict=True):
        assert answer.status == 400, (body, answer)
        assert (
            "unknown field" in answer.body
            or "not plain ASCII" in answer.body
            or "twice" in (answer.body)
        )
    assert world.bobs_containers() == []
    await assert_victim_untouched(world)


async def test_exec_user_and_volume_options_in_folded_spellings_are_refused(world):
    (mine,) = await world.bob(
        request(
            "POST", "/containers/create?name=bobs", {"Image": world.image, "Cmd": ["sleep", "60"]}
        )
    )
    world.root("start", mine[0].json()["Id"])
    results = await world.bob(
        request("POST", "/containers/bobs/exec", raw_body='{"Cmd":["id"],"uſer":"0"}'),
        request("POST", "/containers/bobs/exec", raw_body='{"Cmd":["id"],"USER":"0"}'),
        request("POST", "/containers/bobs/exec", raw_body='{"Cmd":["id"],"User":"x","User":"0"}'),
        request("POST", "/containers/bobs/exec", raw_body='{"Cmd":["id"],"Privileged":true}'),
        request("POST", "/containers/bobs/exec", raw_body='{"Cmd":["id"],"privileged":true}'),
        request(
            "POST",
            "/volumes/create",
            raw_body='{"Name":"bobvol","DriverOptſ":{"type":"none","o":"bind","device":"/"}}'.encode(),
        ),
        request(
            "POST",
            "/volumes/create",
            raw_body='{"Name":"bobvol","driverOpts":{"type":"none","o":"bind","device":"/"}}',
        ),
        request(
            "POST",
            "/networks/none/connect",
            raw_body=json.dumps({"container": world.victim}),
        ),
        request("POST", "/networks/none/connect", raw_body=json.dumps({"Container": world.victim})),
    )
    statuses = [answers[0].status for answers in results]
    assert statuses[:5] == [400, 400, 400, 403, 400], results
    assert statuses[5:7] == [400, 400]
    assert statuses[7] == 400 and statuses[8] == 403
    assert "volume" not in world.root("volume", "ls", "-q", "--filter", "name=bobvol")
    await assert_victim_untouched(world)


async def test_queries_and_bodies_go_would_read_differently_are_refused(world):
    victim = world.victim
    results = await world.bob(
        request("POST", f"/commit?container=bobs&repo={BOB}/x#&container={victim}", {}),
        request("POST", f"/commit?container=bobs;container={victim}&repo={BOB}/x", {}),
        request("POST", f"/commit?container=bobs&container={victim}&repo={BOB}/x", {}),
        request("POST", f"/commit?container=bobs&%63ontainer={victim}&repo={BOB}/x", {}),
        request("POST", f"/commit?Container={victim}&repo={BOB}/x", {}),
        request(
            "POST",
            f"/commit?repo={BOB}/x",
            raw_body=f"container={victim}",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        request(
            "POST",
            f"/commit?repo={BOB}/x",
            raw_body=(
                f'--b\r\nContent-Disposition: form-data; name="container"\r\n\r\n{victim}\r\n--b--'
            ),
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        ),
        request(
            "POST",
            "/containers/create",
            raw_body=b"\x1f\x8b\x08\x00",
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        ),
        request("POST", f"/commit?container={victim}&repo={BOB}/x", {}),
    )
    statuses = [answers[0].status for answers in results]
    assert statuses[:8] == [400] * 8, results
    assert statuses[8] == 403 and "owned by ds01alice" in results[8][0].body
    assert not [i for i in world.root("images", "-q", f"{BOB}/x").split() if i]
    await assert_victim_untouched(world)


# --- 2. route differentials -----------------------------------------------------------


async def test_paths_that_reach_past_an_own_container_are_for_admins(world):
    (mine,) = await world.bob(
        request(
            "POST", "/containers/create?name=bobs", {"Image": world.image, "Cmd": ["sleep", "60"]}
        )
    )
    assert mine[0].status == 201
    alias = "victim"
    connections = [
        request(method, target)
        for method, target in [
            ("GET", f"/containers/bobs/{alias}/json"),
            ("GET", f"/v1.41/containers/bobs/{alias}/json"),
            ("GET", f"/containers/bobs%2F{alias}/json"),
            ("GET", f"/containers/bobs%2f{alias}/archive?path=/"),
            ("GET", f"/containers/bobs/{alias}/export"),
            ("POST", f"/containers/bobs/{alias}/stop"),
            ("POST", f"/containers/bobs/{alias}/kill"),
            ("POST", f"/containers/bobs/{alias}/pause"),
            ("POST", f"/containers/bobs/{alias}/start"),
            ("POST", f"/containers/bobs/{alias}/attach?stream=1&stdout=1"),
            ("DELETE", f"/containers/bobs/{alias}?force=1"),
            ("DELETE", f"/containers/bobs%2F{alias}?force=1"),
            ("GET", f"//containers/{alias}/json"),
            ("GET", f"/containers/./{alias}/json"),
            ("GET", f"/containers/bobs/../{alias}/json"),
            ("GET", f"/containers/{alias}/json"),
            ("POST", f"/containers/{alias}/stop"),
            ("DELETE", f"/containers/{alias}?force=1"),
            ("GET", f"/containers/{world.victim[:12]}/logs?stdout=1"),
            ("POST", f"/containers/{alias}/update"),
            ("POST", f"/containers/{alias}/rename?name=mine"),
            ("POST", "/containers/bobs/rename?name=victim"),
            ("POST", f"/containers/bobs/rename?name=proj._.{ALICE}"),
            ("POST", f"/containers/create?name=proj._.{ALICE}"),
            ("POST", f"/containers/create?name=/proj._.{ALICE}"),
        ]
    ]
    results = await world.bob(*connections)
    statuses = [answers[0].status for answers in results]
    assert all(status in (400, 403, 404, 409) for status in statuses), list(
        zip(connections, results, strict=True)
    )
    assert statuses[-4] == 409  # the name is alice's: Docker says so, nothing renamed
    assert statuses[-3:] == [403, 403, 403]  # names in alice's convention are hers
    await assert_victim_untouched(world)


async def test_exec_ids_are_resolved_to_their_container(world):
    (made,) = await world.alice(
        request("POST", f"/containers/{world.victim}/exec", {"Cmd": ["id"]})
    )
    assert made[0].status == 201, made
    made = made[0].json()
    exec_id = made["Id"]
    results = await world.bob(
        request("POST", f"/exec/{exec_id}/start", {"Detach": True}),
        request("POST", f"/exec/{exec_id[:12]}/start", {"Detach": True}),
        request("GET", f"/exec/{exec_id}/json"),
        request("POST", f"/exec/{exec_id}/resize?h=1&w=1"),
        request("POST", f"/exec/x%2F..%2F{exec_id}/start", {"Detach": True}),
    )
    statuses = [answers[0].status for answers in results]
    assert statuses[0] == statuses[2] == statuses[3] == 403, results
    assert statuses[1] in (403, 404) and statuses[4] in (403, 404)  # Docker wants full ids


# --- 3. connection takeover -----------------------------------------------------------


async def test_a_detached_exec_start_with_upgrade_does_not_open_the_connection(world):
    (mine,) = await world.bob(
        request(
            "POST", "/containers/create?name=bobs", {"Image": world.image, "Cmd": ["sleep", "60"]}
        )
    )
    world.root("start", mine[0].json()["Id"])
    (made,) = await world.bob(request("POST", "/containers/bobs/exec", {"Cmd": ["true"]}))
    exec_id = made[0].json()["Id"]
    privileged = {"Image": world.image, "HostConfig": {"Privileged": True}}
    upgrade = {"Connection": "Upgrade", "Upgrade": "tcp"}
    pipelined = [
        request("POST", f"/exec/{exec_id}/start", {"Detach": True}, headers=upgrade, close=False)
        + request("POST", "/containers/create?name=evil", privileged),
        request("GET", "/version", headers=upgrade, close=False)
        + request("POST", "/containers/create?name=evil2", privileged),
        request("GET", "/_ping", headers={"Upgrade": "h2c", "Connection": "Upgrade"}, close=False)
        + request("POST", "/containers/create?name=evil3", privileged),
    ]
    results = await world.bob(*pipelined)
    for answers in results:
        assert len(answers) == 2, answers
        assert answers[0].status in (200, 204), answers
        assert answers[1].status == 403 and "privileged" in answers[1].body
    assert "evil" not in world.root("ps", "-a", "--format", "{{.Names}}")


# --- 4. root by other spellings, and fields never looked at -----------------------------

EXEC_USERS = [
    "0",
    "00",
    "+0",
    "-0",
    "root",
    "0:0",
    "0:35002",
    " 0",
    "4294967296",
    "nobody",
    "65534",
]


async def test_exec_as_anyone_but_the_owner_is_refused(world, unix_users):
    (mine,) = await world.bob(
        request(
            "POST", "/containers/create?name=bobs", {"Image": world.image, "Cmd": ["sleep", "60"]}
        )
    )
    world.root("start", mine[0].json()["Id"])
    results = await world.bob(
        *[request("POST", "/containers/bobs/exec", {"Cmd": ["id"], "User": u}) for u in EXEC_USERS]
    )
    for user, (answer,) in zip(EXEC_USERS, results, strict=True):
        assert answer.status == 403, (user, answer)
    ok = await world.bob(
        request("POST", "/containers/bobs/exec", {"Cmd": ["id"], "User": f"00{unix_users[BOB]}"})
    )
    exec_id = ok[0][0].json()["Id"]
    recorded = json.loads(world.root("inspect", "--type", "container", "bobs"))[0]
    assert recorded["Config"]["User"] == f"{unix_users[BOB]}:35000"
    process = json.loads(
        subprocess.run(
            [
                "curl",
                "-s",
                "--unix-socket",
                str(world.docker_socket),
                f"http://d/exec/{exec_id}/json",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )["ProcessConfig"]
    assert process["user"] == f"{unix_users[BOB]}:35000" and not process["privileged"]


CREATE_VARIANTS = [
    ({"GroupAdd": ["0"]}, "GroupAdd"),
    ({"GroupAdd": ["root"]}, "GroupAdd"),
    ({"GroupAdd": ["docker"]}, "GroupAdd"),
    ({"Ulimits": [{"Name": "nofile", "Soft": 1, "Hard": 1 << 40}]}, "ulimit"),
    ({"Ulimits": [{"Name": "rtprio", "Soft": 99, "Hard": 99}]}, "ulimit"),
    ({"OomScoreAdj": -1000}, "OomScoreAdj"),
    ({"OomKillDisable": True}, "OomKillDisable"),
    ({"PortBindings": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}}, "127.0.0.1"),
    ({"PortBindings": {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "80"}]}}, "1024"),
    ({"PublishAllPorts": True}, "PublishAllPorts"),
    ({"Tmpfs": {"/t": "suid,dev"}}, "tmpfs"),
    ({"Links": ["victim:alias"]}, "Links"),
    ({"Links": ["/victim:alias"]}, "Links"),
    ({"PidMode": "container:victim"}, "your own"),
    ({"IpcMode": "container:victim"}, "your own"),
    ({"NetworkMode": "container:victim"}, "your own"),
    ({"VolumesFrom": ["victim"]}, "your own"),
    ({"Binds": ["alicevol:/x"]}, "owned by ds01alice"),
    ({"Mounts": [{"Type": "volume", "Source": "alicevol", "Target": "/x"}]}, "ds01alice"),
    ({"Binds": ["/home/ds01bob/../../etc:/x"]}, "home"),
    ({"Binds": ["/:/host"]}, "home"),
    ({"Mounts": [{"Type": "bind", "Source": "/var/run", "Target": "/x"}]}, "home"),
    ({"NetworkMode": "alicenet"}, "network owned by ds01alice"),
    ({"Privileged": True}, "privileged"),
    ({"CapAdd": ["SYS_ADMIN"]}, "capabilities"),
    ({"Devices": [{"PathOnHost": "/dev/mem", "PathInContainer": "/dev/mem"}]}, "devices"),
    ({"SecurityOpt": ["seccomp=unconfined"]}, "security option"),
    ({"SecurityOpt": ["apparmor:unconfined"]}, "security option"),
    ({"Sysctls": {"net.ipv4.ip_forward": "1"}}, "Sysctls"),
    ({"UsernsMode": "host"}, "UsernsMode"),
    ({"CgroupnsMode": "host"}, "CgroupnsMode"),
    ({"Runtime": "runc-custom"}, "runtime"),
    ({"MaskedPaths": []}, "MaskedPaths"),
    ({"DeviceRequests": [{"Driver": "nvidia", "Count": -1}]}, "GPUs"),
    ({"Binds": ["leftover:/x"], "Privileged": True}, "privileged"),
    (
        {"Mounts": [{"Type": "volume", "Source": "leftover", "Target": "/x"}], "PidMode": "host"},
        "PidMode",
    ),
]


async def test_create_fields_that_reach_the_host_or_other_users_are_refused(world):
    results = await world.bob(
        *[
            request("POST", "/containers/create", {"Image": world.image, "HostConfig": host})
            for host, _ in CREATE_VARIANTS
        ],
        request("POST", "/containers/create", {"Image": f"{ALICE}/private:1"}),
        request(
            "POST",
            "/containers/create",
            {"Image": world.image, "Env": ["NVIDIA_VISIBLE_DEVICES=all"]},
        ),
        request(
            "POST",
            "/containers/create",
            {"Image": world.image, "NetworkingConfig": {"EndpointsConfig": {"alicenet": {}}}},
        ),
    )
    reasons = [r for _, r in CREATE_VARIANTS] + ["image owned by", "GPU", "network owned by"]
    for reason, (answer,) in zip(reasons, results, strict=True):
        assert answer.status in (403, 404), (reason, answer)
        assert reason in answer.body or answer.status == 404, (reason, answer)
    assert world.bobs_containers() == []
    assert world.root("volume", "ls", "-q", "--filter", "name=leftover") == ""  # none half-made
    await assert_victim_untouched(world)


async def test_accepted_creates_are_made_as_the_policy_says(world, unix_users):
    """What is allowed is forced into shape; Docker's own record shows the shape."""
    body = {
        "Image": world.image,
        "User": "0",
        "Cmd": ["true"],
        "HostConfig": {
            "NetworkMode": "none",
            "CpuShares": 262144,
            "NanoCpus": 10**12,
            "CgroupParent": "/",
            "Tmpfs": {"/scratch": "exec"},
            "LogConfig": {"Type": "none"},
            "OomScoreAdj": 500,
            "Ulimits": [{"Name": "nofile", "Soft": 1024, "Hard": 4096}],
            "GroupAdd": ["35000"],
            "Binds": [f"/home/{BOB}:/home/{BOB}"],
        },
    }
    (answers,) = await world.bob(request("POST", "/containers/create?name=shaped", body))
    assert answers[0].status == 201, answers
    made = json.loads(world.root("inspect", "shaped"))[0]
    host = made["HostConfig"]
    assert made["Config"]["User"] == f"{unix_users[BOB]}:35000"
    assert host["CpuShares"] == 1024 and host["CgroupParent"] == "/ds01/students/ds01bob"
    assert host["LogConfig"]["Type"] == "json-file"
    assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
    assert set(host["Tmpfs"]["/scratch"].split(",")) >= {"nosuid", "nodev", "exec"}
    assert host["CgroupnsMode"] == "private"
    # and it runs as bob, whatever the image says
    world.root("start", "shaped")
    world.root("wait", "shaped")


# --- 4b. images, builds, volumes, networks ----------------------------------------------


async def test_images_of_other_users_and_shared_images_cannot_be_rewritten(world):
    image = world.image
    results = await world.bob(
        request("POST", f"/images/{image}/tag?repo={ALICE}/private&tag=1"),
        request("POST", f"/images/{image}/tag?repo=ds01-test/busybox&tag=latest"),
        request("POST", f"/images/{image}/tag?repo=ubuntu&tag=22.04"),
        request("POST", f"/images/{ALICE}/private:1/tag?repo={BOB}/stolen&tag=1"),
        request("DELETE", f"/images/{ALICE}/private:1"),
        request("DELETE", f"/images/{image}"),
        request("DELETE", f"/images/{image}?force=1"),
        request("GET", f"/images/{ALICE}/private:1/json"),
        request("GET", f"/images/{ALICE}/private:1/get"),
        request("GET", f"/images/get?names={ALICE}/private:1"),
        request("GET", f"/images/{ALICE}/private:1/history"),
        request("POST", f"/images/create?fromImage={ALICE}/private&tag=1"),
        request("POST", f"/images/create?fromSrc=http://127.0.0.1:1/x.tar&repo={BOB}/x"),
        request("POST", f"/images/create?fromSrc=-&repo={ALICE}/x", raw_body=b""),
    )
    statuses = [answers[0].status for answers in results]
    assert all(status in (403, 404) for status in statuses), results
    # another user's image looks like none at all: no probing for names or id prefixes
    assert statuses[3] == statuses[7] == statuses[8] == statuses[10] == 404, results
    (own,) = await world.bob(request("POST", f"/images/{image}/tag?repo={BOB}/mine&tag=1"))
    assert own[0].status == 201
    listed = await world.bob(request("GET", "/images/json"))
    tags = [t for i in listed[0][0].json() for t in i["RepoTags"]]
    assert f"{BOB}/mine:1" in tags and image in tags and f"{ALICE}/private:1" not in tags
    (gone,) = await world.bob(request("DELETE", f"/images/{BOB}/mine:1"))
    assert gone[0].status == 200
    await assert_victim_untouched(world)
    assert world.root("image", "inspect", "-f", "{{.Id}}", image)


def _context(dockerfile: str) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def test_classic_builds_stay_in_the_callers_namespace_network_and_cgroup(world):
    image = world.image
    plain = _context(f"FROM {image}\nRUN id\n")

    def build(query: str, context: bytes = plain) -> str:
        return request(
            "POST",
            f"/build?{query}",
            raw_body=context,
            headers={"Content-Type": "application/x-tar"},
        )

    results = await world.bob(
        build(f"t={ALICE}/private:1"),
        build("t=ds01-test/busybox:latest"),
        build(f"t={BOB}/x&networkmode=host"),
        build(f"t={BOB}/x&networkmode=container:{world.victim}"),
        build(f"t={BOB}/x&version=2"),
        build(f"t={BOB}/x&remote=http://127.0.0.1:1/ctx.tar"),
        build(f"t={BOB}/x&pull=1"),
        build(f"t={BOB}/x", _context(f"FROM {ALICE}/private:1\n")),
        build(f"t={BOB}/x", _context(f"FROM {image}\nCOPY --from={ALICE}/private:1 / /x\n")),
        build(f"t={BOB}/x", _context(f"ARG B={ALICE}/private:1\nFROM $B\n")),
        build(f"t={BOB}/x", _context(f"FROM \\\n {ALICE}/private:1\n")),
        build(f"t={BOB}/x&t={ALICE}/y"),
    )
    statuses = [answers[0].status for answers in results]
    assert all(status in (403, 404) for status in statuses), results
    (ok,) = await world.bob(
        build(f"t={BOB}/built:1&cgroupparent=/&memory=0&labels=" + '{"ds01.user":"ds01alice"}')
    )
    assert ok[0].status == 200 and "Successfully tagged" in ok[0].body, ok
    labels = json.loads(
        world.root("image", "inspect", "-f", "{{json .Config.Labels}}", f"{BOB}/built:1")
    )
    assert labels["ds01.user"] == BOB
    await assert_victim_untouched(world)


async def test_volumes_and_networks_belong_to_their_creator(world):
    results = await world.bob(
        request("POST", "/volumes/create", {"Name": "alicevol"}),
        request("GET", "/volumes/alicevol"),
        request("DELETE", "/volumes/alicevol?force=1"),
        request(
            "POST",
            "/volumes/create",
            {"Name": "bobvol", "DriverOpts": {"type": "proc", "device": "proc"}},
        ),
        request(
            "POST",
            "/volumes/create",
            {
                "Name": "bobvol",
                "Driver": "local",
                "DriverOpts": {"type": "overlay", "o": "lowerdir=/"},
            },
        ),
        request("GET", "/networks/alicenet"),
        request("DELETE", "/networks/alicenet"),
        request("POST", "/networks/alicenet/connect", {"Container": "bobs"}),
        request(
            "POST",
            "/networks/create",
            {"Name": "mac", "Driver": "macvlan", "Options": {"parent": "lo"}},
        ),
        request(
            "POST",
            "/networks/create",
            {"Name": "br", "Options": {"com.docker.network.bridge.name": "lo"}},
        ),
        request(
            "POST",
            "/networks/create",
            {"Name": "br", "IPAM": {"Config": [{"Subnet": "127.0.0.0/8"}]}},
        ),
        request("POST", "/networks/create", {"Name": "cfg", "ConfigOnly": True}),
    )
    statuses = [answers[0].status for answers in results]
    assert statuses == [403] * 12, results
    (made,) = await world.bob(
        request("POST", "/volumes/create", {"Name": "bobvol", "Labels": {"ds01.user": ALICE}})
    )
    assert made[0].status == 201 and made[0].json()["Labels"]["ds01.user"] == BOB
    listed = await world.bob(request("GET", "/volumes"), request("GET", "/networks"))
    names = [v["Name"] for v in listed[0][0].json()["Volumes"]]
    assert names == ["bobvol"]
    networks = [n["Name"] for n in listed[1][0].json()]
    assert "alicenet" not in networks and "none" in networks
    await assert_victim_untouched(world)


# --- 5. accounting, 6. leaks ------------------------------------------------------------


async def test_gateway_creates_count_against_max_containers(world):
    """config/resource-limits.yaml: students may have 2 containers."""
    body = {"Image": world.image, "Cmd": ["true"], "HostConfig": {"NetworkMode": "none"}}
    results = await world.bob(
        *[request("POST", f"/containers/create?name=c{i}", body) for i in range(3)]
    )
    statuses = [answers[0].status for answers in results]
    assert statuses == [201, 201, 403], results
    assert "2 of 2 containers" in results[2][0].body


async def test_event_streams_and_listings_show_only_the_callers_things(world):
    (mine,) = await world.bob(
        request("POST", "/containers/create?name=bobs", {"Image": world.image, "Cmd": ["true"]})
    )
    assert mine[0].status == 201
    world.root("volume", "create", "--label", f"ds01.user={ALICE}", "alicevol2")
    world.root("tag", world.image, f"{ALICE}/other:1")
    world.root("rmi", f"{ALICE}/other:1")
    world.root("volume", "rm", "alicevol2")
    await asyncio.sleep(1.1)
    (events,) = await world.bob(request("GET", f"/events?since=0&until={int(time.time())}"))
    assert events[0].status == 200
    lines = [json.loads(line) for line in events[0].body.splitlines() if line.strip()]
    assert lines, "bob sees his own create"
    for event in lines:
        text = json.dumps(event)
        assert ALICE not in text and "victim" not in text and world.victim not in text, event
    kinds = {event["Type"] for event in lines}
    assert kinds <= {"container", "image", "volume", "network"}
    assert any(e["Type"] == "container" and e["Action"] == "create" for e in lines)


async def test_the_daemon_holds_nothing_that_breaks_the_policy(world):
    """Run after the hostile requests of this module's world: as root, on the daemon."""
    assert audit_daemon(world.docker_socket) == []


# --- 7. images made from archives and builds (red-team round two) ----------------------


def _tar(files: dict[str, bytes | str], links: dict[str, str] | None = None) -> bytes:
    """A tar archive of ``files`` (and symlinks), members in the order given."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            raw = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def _saved(world: World, image: str) -> bytes:
    """``docker save`` of an image, as root: a real archive to doctor."""
    result = subprocess.run(
        ["docker", "-H", f"unix://{world.docker_socket}", "save", image],
        capture_output=True,
        check=True,
    )
    return result.stdout


def _doctored(archive: bytes, manifest: str | None = None, extra: dict | None = None) -> bytes:
    """The archive with its manifest.json replaced (text as given) and members added."""
    import io
    import tarfile

    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(archive)) as source,
        tarfile.open(fileobj=out, mode="w") as tar,
    ):
        for member in source:
            data = source.extractfile(member).read() if member.isfile() else None
            if member.name == "manifest.json" and manifest is not None:
                data = manifest.encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
        for name, text in (extra or {}).items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return out.getvalue()


async def test_image_archives_cannot_name_other_users_or_shared_images(world):
    world.root("tag", world.image, f"{BOB}/evil:1")
    archive = _saved(world, f"{BOB}/evil:1")
    world.root("rmi", f"{BOB}/evil:1")
    import tarfile as tarmodule

    with tarmodule.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        entry = json.loads(tar.extractfile("manifest.json").read())[0]
    victim_before = world.root("image", "inspect", "-f", "{{.Id}}", f"{ALICE}/private:1")

    def manifest(**extra: object) -> str:
        return json.dumps([{**entry, "RepoTags": [f"{BOB}/ok:1"], **extra}], ensure_ascii=False)

    variants = [
        _doctored(archive, manifest(repotags=[f"{ALICE}/private:1"])),
        _doctored(archive, manifest(REPOTAGS=[f"{ALICE}/private:1"])),
        _doctored(archive, manifest(**{"RepoTagſ": [world.image]})),  # not a kwarg: NFKC
        _doctored(archive, manifest().replace('"RepoTags"', '"RepoTags": ["x/y:1"], "RepoTags"')),
        _doctored(archive, json.dumps([{**entry, "RepoTags": [f"{ALICE}/private:1"]}])),
        _doctored(archive, None, {"repositories": json.dumps({ALICE + "/private": {"1": "x"}})}),
        _doctored(archive, None, {"./manifest.json": manifest(RepoTags=[world.image])}),
        _doctored(
            archive,
            None,
            {
                "index.json": json.dumps(
                    {"manifests": [{"ANNOTATIONS": {"io.containerd.image.name": world.image}}]}
                )
            },
        ),
        _tar(
            {"other.json": manifest(RepoTags=[f"{ALICE}/private:1"])},
            {"manifest.json": "other.json"},
        ),
    ]
    results = await world.bob(
        *[
            request(
                "POST",
                "/images/load?quiet=1",
                raw_body=v,
                headers={"Content-Type": "application/x-tar"},
            )
            for v in variants
        ]
    )
    statuses = [answers[0].status for answers in results]
    assert statuses == [400] * 4 + [403] * 5, results
    assert world.root("image", "inspect", "-f", "{{.Id}}", f"{ALICE}/private:1") == victim_before
    (ok,) = await world.bob(
        request("POST", "/images/load?quiet=1", raw_body=_doctored(archive, manifest()),
                headers={"Content-Type": "application/x-tar"})
    )  # fmt: skip
    assert ok[0].status == 200 and f"Loaded image: {BOB}/ok:1" in ok[0].body, ok


async def test_a_name_docker_took_from_someone_is_given_back(world, unix_users):
    """The check after a load, on its own: should Docker ever tag a name the archive did
    not show us, the name goes back to the image it named before, hang-up or not."""
    from ds01.core.docker_api import Daemon
    from ds01.ownership.gateway.admission import Admission, Gateway
    from ds01.ownership.gateway.routes import match

    original = world.root("image", "inspect", "-f", "{{.Id}}", f"{ALICE}/private:1")
    world.root("tag", world.image, f"{BOB}/evil:1")
    evil = world.root("image", "inspect", "-f", "{{.Id}}", f"{BOB}/evil:1")
    world.root("commit", world.victim, f"{BOB}/evil:1")  # another image under bob's name
    evil = world.root("image", "inspect", "-f", "{{.Id}}", f"{BOB}/evil:1")
    world.root("tag", evil, f"{ALICE}/private:1")  # what a fooled load would leave behind
    gateway = Gateway(Daemon(world.docker_socket), None, None)  # type: ignore[arg-type]
    admission = Admission(
        gateway, gateway.caller(unix_users[BOB]), match("POST", "/images/load"), False
    )
    renamed = f"The image {ALICE}/private:1 already exists, renaming the old one with ID "
    report = (
        json.dumps({"stream": f"{renamed}{original} to empty string\n"})
        + "\n"
        + json.dumps({"stream": f"Loaded image: {ALICE}/private:1\n"})
        + "\n"
    ).encode()
    trailer = await admission._check_made_images(report)
    assert trailer and b"Permission denied" in trailer
    assert world.root("image", "inspect", "-f", "{{.Id}}", f"{ALICE}/private:1") == original
    world.root("rmi", "-f", f"{BOB}/evil:1")


async def test_builds_cannot_hide_a_base_image_from_the_gateway(world):
    secret = f"FROM {ALICE}/private:1\nRUN id\n"
    contexts = [
        _tar({"Dockerfile": "\ufeff" + secret}),
        _tar({"Dockerfile": f"FROM {world.image}\n# comment \\\n{secret}"}),
        _tar({"Dockerfile": f"FROM {world.image}\n", "./Dockerfile": secret}),
        _tar({"Dockerfile": f"FROM {world.image}\n", "x/../Dockerfile": secret}),
        _tar({"Dockerfile": secret.replace("\n", "\r\n")}),
        _tar({"Dockerfile": f"from\t{ALICE}/private:1\n"}),
        _tar({"Dockerfile": f"FROM \\\n\n {ALICE}/private:1\n"}),
        _tar({"Dockerfile": f"FROM {world.image}\nCOPY --from={ALICE}/private:1 / /x\n"}),
        _tar({"Dockerfile": f"FROM {world.image}\nonbuild COPY --from={ALICE}/private:1 / /x\n"}),
        _tar({"Dockerfile": f"FROM {world.image}\nADD http://127.0.0.1:1/x /x\n"}),
        _tar({"Dockerfile": f"FROM {world.image}\nLABEL ds01.user={ALICE}\n"}),
        _tar({"Dockerfile": f"FROM {world.image}\nLABEL d\\s01.user={ALICE}\n"}),
        _tar({"real": secret}, {"Dockerfile": "real"}),
    ]
    results = await world.bob(
        *[
            request(
                "POST",
                f"/build?t={BOB}/f1",
                raw_body=c,
                headers={"Content-Type": "application/x-tar"},
            )
            for c in contexts
        ]
    )
    statuses = [answers[0].status for answers in results]
    assert all(status in (403, 404) for status in statuses), results
    assert world.root("images", "-q", f"{BOB}/f1") == ""


def _image_labels(world: World, image: str) -> dict[str, str]:
    found = world.root("image", "inspect", "-f", "{{json .Config.Labels}}", image)
    return json.loads(found or "null") or {}


async def test_builds_share_no_cache_and_leave_no_unowned_images(world):
    """Each build is its owner's to its last intermediate image: another user's identical
    build runs afresh, and sees none of the first one's images."""
    dockerfile = f"FROM {world.image}\nRUN head -c 16 /dev/urandom | od -An -x > /key\n"
    context = _tar({"Dockerfile": dockerfile})
    build = request(
        "POST",
        f"/build?t={ALICE}/keyed:1",
        raw_body=context,
        headers={"Content-Type": "application/x-tar"},
    )
    (first,) = await world.alice(build)
    assert first[0].status == 200 and "Successfully tagged" in first[0].body, first
    (second,) = await world.bob(build.replace(f"t={ALICE}/", f"t={BOB}/"))
    assert second[0].status == 200 and "Using cache" not in second[0].body, second
    keys = [
        world.root("run", "--rm", "--network", "none", image, "cat", "/key")
        for image in (f"{ALICE}/keyed:1", f"{BOB}/keyed:1")
    ]
    assert keys[0] != keys[1]
    everything = world.root("images", "-aq", "--no-trunc").split()
    alices = [i for i in everything if _image_labels(world, i).get("ds01.user") == ALICE]
    assert len(alices) >= 2  # the intermediate images are hers too
    listed = await world.bob(request("GET", "/images/json?all=1"))
    shown = {i["Id"] for i in listed[0][0].json()}
    assert not shown & set(alices)
    attempts = await world.bob(
        *[request("GET", f"/images/{i}/json") for i in alices],
        *[request("POST", f"/images/{i}/tag?repo={BOB}/stolen&tag=1") for i in alices],
    )
    assert {answers[0].status for answers in attempts} == {404}  # as if there were none
    world.root("rmi", f"{ALICE}/keyed:1", f"{BOB}/keyed:1")


async def test_binds_never_make_root_owned_directories(world, unix_users):
    missing = f"/home/{BOB}/not-there-yet"
    hosts = [
        {"Binds": [f"{missing}:/x"]},
        {"Binds": [f"{missing}/deeper:/x"]},
        {"Mounts": [{"Type": "bind", "Source": missing, "Target": "/x"}]},
        {"Binds": [f"/home/{BOB}:/x:z"]},
    ]
    results = await world.bob(
        *[
            request("POST", "/containers/create", {"Image": world.image, "HostConfig": h})
            for h in hosts
        ]
    )
    assert [answers[0].status for answers in results] == [403, 403, 403, 403], results
    assert not Path(missing).exists()
    made = Path(f"/home/{BOB}/made")
    made.mkdir(exist_ok=True)
    (made / "mine.txt").write_text("mine\n")
    (ok,) = await world.bob(
        request("POST", "/containers/create?name=bound", {"Image": world.image,
                "Cmd": ["ls", "/x"], "HostConfig": {"Binds": [f"{made}:/x:ro"],
                "RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 3}}})
    )  # fmt: skip
    assert ok[0].status == 201, ok
    host = json.loads(world.root("inspect", "bound"))[0]["HostConfig"]
    pin = host["Mounts"][0]["Source"]
    assert not host.get("Binds") and pin != str(made)  # Docker got the gateway's pin
    # The user swaps the checked directory for a symlink to somewhere else entirely.
    made.rename(made.with_name("made.old"))
    made.symlink_to("/etc")
    try:
        (started,) = await world.bob(request("POST", "/containers/bound/start"))
        assert started[0].status == 204, started
        world.root("wait", "bound")
        assert world.root("logs", "bound") == "mine.txt"  # the directory checked, not /etc
        # After a reboot the pin is gone: it is walked again from the home, and refused.
        subprocess.run(["umount", pin], check=True)
        (again,) = await world.bob(request("POST", "/containers/bound/start"))
        assert again[0].status == 403 and "symlink" in again[0].body, again
    finally:
        made.unlink()
        shutil.rmtree(made.with_name("made.old"))


async def test_names_other_users_gave_a_shared_image_stay_hidden(world):
    world.root("tag", world.image, f"{ALICE}/alias:1")
    try:
        (found,) = await world.bob(request("GET", f"/images/{world.image}/json"))
        assert found[0].status == 200
        assert f"{ALICE}/alias:1" not in found[0].body and world.image in found[0].body
    finally:
        world.root("rmi", f"{ALICE}/alias:1")
    results = await world.bob(
        request(
            "POST", "/auth", {"username": "u", "password": "p", "serveraddress": "127.0.0.1:1"}
        ),
        request("GET", "/images/search?term=x"),
        request("POST", "/images/create?fromImage=127.0.0.1:1/x&tag=1"),
        request("POST", "/images/create?fromImage=registry.example.org/x&tag=1"),
    )
    assert [answers[0].status for answers in results] == [403] * 4, results


async def test_bodies_are_bounded_by_their_route(world):
    """A route without a body takes none; a JSON route a small object; only archives may
    be large. What does not fit is refused before it is held in memory."""
    big_json = json.dumps({"Image": world.image, "Labels": {"x": "y" * (5 << 20)}})
    results = await world.bob(
        request("POST", "/containers/create", raw_body=big_json),
        request("POST", f"/containers/{world.victim}/stop", raw_body="x" * 10000),
        request("POST", "/containers/prune", raw_body='{"a": 1}'),
        request("GET", "/containers/json", raw_body="{}"),
    )
    statuses = [answers[0].status for answers in results]
    assert statuses == [413, 413, 400, 400], results
    await assert_victim_untouched(world)


async def test_builds_copy_only_from_completed_stages(world):
    """The classic builder looks a stage that is not complete yet up as an image (an id
    prefix of anyone's): only earlier stages may be copied from."""
    base = world.image
    refused = [
        f"FROM {base} AS a\nCOPY --from=a /etc/passwd /s\n",
        f"FROM {base} AS A\nCOPY --from=a /etc/passwd /s\n",
        f"FROM {base}\nCOPY --from=0 /etc/passwd /s\n",
        f"FROM {base} AS a\nFROM {base}\nCOPY --from=1 /etc/passwd /s\n",
        f"FROM {base}\nCOPY --from=later /etc/passwd /s\nFROM {base} AS later\n",
    ]
    allowed = (
        f"FROM {base} AS first\nRUN echo one > /one\n"
        f"FROM {base}\nCOPY --from=first /one /one\nCOPY --from=0 /one /zero\n"
    )

    def build(dockerfile: str, tag: str) -> str:
        return request(
            "POST",
            f"/build?t={BOB}/{tag}",
            raw_body=_tar({"Dockerfile": dockerfile}),
            headers={"Content-Type": "application/x-tar"},
        )

    results = await world.bob(*[build(d, "stage") for d in refused], build(allowed, "staged"))
    statuses = [answers[0].status for answers in results[:-1]]
    assert statuses == [403] * (len(refused) - 1) + [404], results  # "later": no such image
    assert results[-1][0].status == 200 and "Successfully tagged" in results[-1][0].body, results
    assert world.root("run", "--rm", "--network", "none", f"{BOB}/staged", "cat", "/zero") == "one"
    world.root("rmi", f"{BOB}/staged")


async def test_compressed_archives_are_refused(world):
    import bz2
    import gzip
    import lzma

    context = _tar({"Dockerfile": f"FROM {world.image}\n", "big": b"\0" * (1 << 20)})
    packed = [gzip.compress(context), bz2.compress(context), lzma.compress(context)]
    results = await world.bob(
        *[
            request(
                "POST",
                f"/build?t={BOB}/bomb",
                raw_body=p,
                headers={"Content-Type": "application/x-tar"},
            )
            for p in packed
        ],
        *[
            request(
                "POST", "/images/load", raw_body=p, headers={"Content-Type": "application/x-tar"}
            )
            for p in packed
        ],
    )
    assert [answers[0].status for answers in results] == [400] * 6, results
    assert all("compressed" in answers[0].body for answers in results)


async def test_an_image_labelled_for_someone_else_is_not_loaded(world):
    world.root("commit", "-c", f"LABEL ds01.user={ALICE}", world.victim, f"{BOB}/vlabel:1")
    archive = _saved(world, f"{BOB}/vlabel:1")
    world.root("rmi", f"{BOB}/vlabel:1")
    (loaded,) = await world.bob(
        request(
            "POST", "/images/load", raw_body=archive, headers={"Content-Type": "application/x-tar"}
        )
    )
    assert "Permission denied" in loaded[0].body, loaded
    assert world.root("images", "-q", f"{BOB}/vlabel") == ""


async def test_import_takes_the_tag_from_repo_or_tag(world):
    archive = _tar({"hello": "world"})
    results = await world.bob(
        request("POST", f"/images/create?fromSrc=-&repo={BOB}/im:1", raw_body=archive),
        request("POST", f"/images/create?fromSrc=-&repo={BOB}/im&tag=2", raw_body=archive),
        request("POST", f"/images/create?fromSrc=-&repo={BOB}/im:1&tag=2", raw_body=archive),
    )
    assert [answers[0].status for answers in results] == [200, 200, 400], results
    for tag in ("1", "2"):
        labels = _image_labels(world, f"{BOB}/im:{tag}")
        assert labels["ds01.user"] == BOB
        world.root("rmi", f"{BOB}/im:{tag}")


# Holds 128 idle connections open as one user, then tries one more; stdlib only.
_HOG = r"""
import socket, sys, time
path = sys.argv[1]
held = []
for _ in range(128):
    s = socket.socket(socket.AF_UNIX); s.connect(path); held.append(s)
time.sleep(0.5)
extra = socket.socket(socket.AF_UNIX); extra.connect(path); extra.settimeout(10)
print(extra.recv(200).split(b"\r\n")[0].decode(), flush=True)
sys.stdin.readline()  # hold them until told
"""


async def test_one_user_cannot_take_every_connection(world):
    hog = await asyncio.create_subprocess_exec(
        "runuser", "-u", BOB, "--", "/usr/bin/python3", "-c", _HOG, world.socket,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert hog.stdout is not None
        line = await asyncio.wait_for(hog.stdout.readline(), 30)
        assert line.decode().strip() == "HTTP/1.1 429 Too Many Requests"
        (answers,) = await world.alice(request("GET", "/_ping"))
        assert answers[0].status == 200  # everyone else is still served
    finally:
        assert hog.stdin is not None
        hog.stdin.write(b"\n")
        await hog.wait()
    (answers,) = await world.bob(request("GET", "/_ping"))
    assert answers[0].status == 200  # and the user's own slots come back


async def test_images_are_removed_by_id_only_by_their_owner(world):
    world.root("commit", world.victim, f"{ALICE}/byid:1")
    theirs = world.root("image", "inspect", "-f", "{{.Id}}", f"{ALICE}/byid:1")
    shared = world.root("image", "inspect", "-f", "{{.Id}}", world.image)
    (made,) = await world.bob(request("POST", f"/images/{world.image}/tag?repo={BOB}/own&tag=1"))
    assert made[0].status == 201
    world.root("commit", world.victim, f"{BOB}/byid:1")  # an image of bob's alone
    own = world.root("image", "inspect", "-f", "{{.Id}}", f"{BOB}/byid:1")
    results = await world.bob(
        request("DELETE", f"/images/{theirs}?force=1"),
        request("DELETE", f"/images/{theirs[7:19]}?force=1"),
        request("DELETE", f"/images/{shared}?force=1"),
        request("DELETE", f"/images/{own}"),
    )
    assert [answers[0].status for answers in results] == [404, 404, 403, 200], results
    assert "ds01alice" not in results[0][0].body + results[1][0].body  # no names told
    assert world.root("image", "inspect", "-f", "{{.Id}}", f"{ALICE}/byid:1") == theirs
    world.root("rmi", f"{ALICE}/byid:1", f"{BOB}/own:1")


def _pin_mounts() -> list[str]:
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if "/pins/" in line.split()[4]
    ]


async def test_pins_go_with_their_container_and_are_counted(world, monkeypatch):
    from ds01.ownership.gateway import pins as pins_module

    source = Path(f"/home/{BOB}/pinned")
    source.mkdir(exist_ok=True)
    shutil.chown(source, BOB)
    body = {"Image": world.image, "Cmd": ["true"], "HostConfig": {"Binds": [f"{source}:/x"]}}
    before = set(_pin_mounts())
    (made,) = await world.bob(request("POST", "/containers/create?name=pinned", body))
    assert made[0].status == 201
    pin = json.loads(world.root("inspect", "pinned"))[0]["Mounts"][0]["Source"]
    assert pin in _pin_mounts()
    (gone,) = await world.bob(request("DELETE", "/containers/pinned"))
    assert gone[0].status == 204
    for _ in range(50):  # the destroy event unpins it: unmounted, then its directory removed
        if pin not in _pin_mounts() and not Path(pin).exists():
            break
        await asyncio.sleep(0.1)
    assert pin not in _pin_mounts() and not Path(pin).exists()
    many = {**body, "HostConfig": {"Binds": [f"{source}:/x{i}" for i in range(33)]}}
    monkeypatch.setattr(pins_module, "PINS_PER_USER", 3)
    four = {**body, "HostConfig": {"Binds": [f"{source}:/x{i}" for i in range(4)]}}
    results = await world.bob(
        request("POST", "/containers/create", many), request("POST", "/containers/create", four)
    )
    assert [answers[0].status for answers in results] == [403, 403], results
    assert "at most 32 mounts" in results[0][0].body and "bind mounts in use" in results[1][0].body
    assert set(_pin_mounts()) == before  # nothing pinned for a refused create
    source.rmdir()


async def test_enrollment_takes_a_few_connections_per_user(world, ownership):
    config, _ = ownership
    enroll = str(config.ownership.enroll_socket)
    hog = r"""
import socket, sys
held = [socket.socket(socket.AF_UNIX) for _ in range(4)]
for s in held: s.connect(sys.argv[1])
extra = socket.socket(socket.AF_UNIX); extra.connect(sys.argv[1]); extra.settimeout(5)
print("closed" if extra.recv(10) == b"" else "open", flush=True)
"""
    result = await asyncio.to_thread(
        subprocess.run,
        ["runuser", "-u", BOB, "--", "/usr/bin/python3", "-c", hog, enroll],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.stdout.strip() == "closed", result.stderr


async def test_what_a_build_prints_is_never_taken_for_dockers_report(world):
    """RUN output shares the stream with Docker's own report lines: printing them must not
    make the gateway untag, retag or remove anyone's image."""
    victim = world.root("image", "inspect", "-f", "{{.Id}}", f"{ALICE}/private:1")
    shared = world.root("image", "inspect", "-f", "{{.Id}}", world.image)
    lines = [
        f"Successfully tagged {ALICE}/private:1",
        f"The image {ALICE}/private:1 already exists, renaming the old one with ID {shared} to"
        " empty string",
        f"Loaded image: {ALICE}/private:1",
        f"Successfully built {victim.removeprefix('sha256:')[:12]}",
        f"Successfully built {shared.removeprefix('sha256:')[:12]}",
    ]
    steps = "".join(f'RUN echo "{line}"\n' for line in lines)
    context = _tar({"Dockerfile": f"FROM {world.image}\n{steps}"})
    (built,) = await world.bob(
        request("POST", f"/build?t={BOB}/printer", raw_body=context,
                headers={"Content-Type": "application/x-tar"})
    )  # fmt: skip
    assert built[0].status == 200 and "Permission denied" not in built[0].body, built
    assert world.root("image", "inspect", "-f", "{{.Id}}", f"{ALICE}/private:1") == victim
    assert world.root("image", "inspect", "-f", "{{.Id}}", world.image) == shared
    world.root("rmi", f"{BOB}/printer")
