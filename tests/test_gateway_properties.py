"""Generated requests (hypothesis) through the real gateway to the real daemon: whatever
the gateway forwards, Docker's own record of the result satisfies the policy, and nothing
of another user's is touched."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gateway_audit import audit_daemon
from tests.gateway_raw import raw_as, request

pytestmark = pytest.mark.usefixtures("unix_users", "daemon_audit")

ALICE, BOB = "ds01alice", "ds01bob"
FOLDS = {"s": "ſ", "k": "K", "K": "K"}


def spellings(key: str) -> st.SearchStrategy[str]:
    """The key, or one Docker's decoder would fold onto it."""
    folded = "".join(FOLDS.get(c, c) for c in key)
    return st.sampled_from([key] * 12 + [key.lower(), key.upper(), folded, key.swapcase()])


HOST_VALUES: dict[str, list] = {
    "Privileged": [True, False],
    "CapAdd": [["SYS_ADMIN"], ["ALL"], None],
    "CapDrop": [["ALL"], []],
    "Binds": [["/:/h"], ["/etc:/e"], [f"/home/{BOB}:/w"], [f"/home/{BOB}/../..:/x"]],
    "PidMode": ["host", "", "container:victim"],
    "IpcMode": ["host", "private", "shareable", "container:victim"],
    "NetworkMode": ["none", "host", "container:victim"],
    "UsernsMode": ["host", ""],
    "SecurityOpt": [["seccomp=unconfined"], ["no-new-privileges"], ["apparmor=unconfined"]],
    "Devices": [[{"PathOnHost": "/dev/mem", "PathInContainer": "/m", "CgroupPermissions": "rwm"}]],
    "GroupAdd": [["0"], ["35000"], ["docker"]],
    "OomScoreAdj": [-1000, 0, 500],
    "CpuShares": [2, 1024, 262144],
    "NanoCpus": [10**12, 10**9],
    "Memory": [0, 1 << 40, 1 << 28],
    "PidsLimit": [-1, 0, 100],
    "Tmpfs": [{"/t": "exec"}, {"/t": "suid,dev"}, {"/t": "size=1g"}],
    "Ulimits": [
        [{"Name": "nofile", "Soft": 1024, "Hard": 2048}],
        [{"Name": "core", "Soft": -1, "Hard": -1}],
    ],
    "CgroupParent": ["/", "/docker", ""],
    "Mounts": [
        [{"Type": "bind", "Source": "/", "Target": "/h"}],
        [{"Type": "bind", "Source": f"/home/{BOB}", "Target": "/w"}],
        [{"Type": "tmpfs", "Target": "/t"}],
    ],
    "PortBindings": [{"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}],
    "LogConfig": [{"Type": "none"}, {"Type": "json-file", "Config": {"max-size": "1m"}}],
    "MaskedPaths": [[]],
    "Sysctls": [{"kernel.shmmax": "1"}],
}  # fmt: skip


@st.composite
def create_bodies(draw: st.DrawFn, image: str) -> dict:
    keys = draw(st.lists(st.sampled_from(sorted(HOST_VALUES)), max_size=6, unique=True))
    host = {draw(spellings(k)): draw(st.sampled_from(HOST_VALUES[k])) for k in keys}
    body: dict = {"Image": image, "Cmd": ["id", "-u"], draw(spellings("HostConfig")): host}
    if draw(st.booleans()):
        body[draw(spellings("User"))] = draw(st.sampled_from(["0", "root", "35002", ""]))
    if draw(st.booleans()):
        body[draw(spellings("Labels"))] = {"ds01.user": ALICE, "x": "y"}
    return body


@pytest.fixture
def victim(ownership, test_image, docker_socket):
    root = ["docker", "-H", f"unix://{docker_socket}"]
    made = subprocess.run(
        [*root, "run", "-d", "--name", "victim", "--network", "none", "--label",
         f"ds01.user={ALICE}", "--user", "35001:35000", test_image, "sleep", "600"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    yield made.stdout.strip()
    subprocess.run([*root, "rm", "-f", "victim"], capture_output=True)


def _bobs(docker_socket: Path) -> list[str]:
    listed = subprocess.run(
        ["docker", "-H", f"unix://{docker_socket}", "ps", "-aq", "--filter",
         f"label=ds01.user={BOB}"],
        capture_output=True, text=True,
    )  # fmt: skip
    return listed.stdout.split()


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_whatever_the_gateway_forwards_docker_records_within_the_policy(
    ownership, test_image, docker_socket, victim, data
):
    config, _ = ownership
    bodies = data.draw(st.lists(create_bodies(test_image), min_size=12, max_size=12))
    socket = str(config.ownership.proxy_socket)
    statuses = []
    for pair in (bodies[i : i + 2] for i in range(0, len(bodies), 2)):  # students: 2 at most
        results = await raw_as(
            BOB,
            socket,
            [
                request(
                    "POST", "/v1.41/containers/create", raw_body=json.dumps(b, ensure_ascii=False)
                )
                for b in pair
            ],
        )
        try:
            made = [answers[0] for answers in results if answers[0].status == 201]
            assert len(made) == len(_bobs(docker_socket))
            statuses += [answers[0].status for answers in results]
            assert audit_daemon(docker_socket) == []
        finally:
            for container in _bobs(docker_socket):
                subprocess.run(
                    ["docker", "-H", f"unix://{docker_socket}", "rm", "-f", container],
                    capture_output=True,
                )
    assert set(statuses) <= {201, 400, 403, 404}, statuses


SEGMENTS = ["victim", "mine", "..", ".", "%2F", "%2e%2e", "json", "", "victim%2Fjson", "x"]
OPS = ["json", "stop", "kill", "archive?path=/", "export", "logs?stdout=1", "pause", "top"]


@st.composite
def hostile_targets(draw: st.DrawFn) -> tuple[str, str]:
    method = draw(st.sampled_from(["GET", "POST", "DELETE", "HEAD", "PUT"]))
    version = draw(st.sampled_from(["", "/v1.41", "/v1.41.0", "/v1.041", "/V1.41"]))
    parts = draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3))
    op = draw(st.sampled_from(OPS))
    return method, f"{version}/containers/{'/'.join(parts)}/{op}"


@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(targets=st.lists(hostile_targets(), min_size=25, max_size=25))
async def test_generated_paths_never_reach_another_users_container(
    ownership, test_image, docker_socket, victim, targets
):
    config, _ = ownership
    results = await raw_as(
        BOB, str(config.ownership.proxy_socket), [request(m, t) for m, t in targets]
    )
    for (method, target), answers in zip(targets, results, strict=True):
        status = answers[0].status if answers else 0
        assert status in (400, 403, 404, 405), (method, target, answers)
    state = json.loads(
        subprocess.run(
            ["docker", "-H", f"unix://{docker_socket}", "inspect", victim],
            capture_output=True, text=True, check=True,
        ).stdout
    )[0]["State"]  # fmt: skip
    assert state["Running"] and not state["Paused"]


COMMIT_PIECES = [
    "container=victim", "%63ontainer=victim", "container=mine%23", "Container=victim",
    "container=mine;container=victim", "repo=ds01bob/snap", "repo=ds01alice/snap", "tag=1",
    "changes=ENV+A%3D1", "changes=LABEL+ds01.user%3Dds01alice", "pause=0", "x=1", "#", "",
]  # fmt: skip


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    queries=st.lists(st.lists(st.sampled_from(COMMIT_PIECES), max_size=5), min_size=15, max_size=15)
)
async def test_generated_commit_queries_commit_only_the_callers_container(
    ownership, test_image, docker_socket, victim, queries
):
    config, _ = ownership
    root = ["docker", "-H", f"unix://{docker_socket}"]

    def images() -> set[str]:
        listed = subprocess.run(
            [*root, "images", "-aq", "--no-trunc"], capture_output=True, text=True
        )
        return set(listed.stdout.split())

    made = subprocess.run(
        [*root, "create", "--name", "mine", "--network", "none", "--label", f"ds01.user={BOB}",
         "--user", "35002:35000", test_image, "true"],
        capture_output=True, text=True,
    )  # fmt: skip
    mine = made.stdout.strip()
    before = images()
    try:
        await raw_as(
            BOB,
            str(config.ownership.proxy_socket),
            [request("POST", "/commit?" + "&".join(["container=mine", *q])) for q in queries],
        )
        for image in images() - before:
            found = json.loads(
                subprocess.run(
                    [*root, "image", "inspect", image], capture_output=True, text=True
                ).stdout
            )[0]
            assert found["Container"] == mine, found["Container"]
            assert found["Config"]["Labels"]["ds01.user"] == BOB
            assert all(tag.startswith(f"{BOB}/") for tag in found["RepoTags"] or [])
    finally:
        subprocess.run([*root, "rm", "-f", "mine"], capture_output=True)
        for image in images() - before:
            subprocess.run([*root, "rmi", "-f", image], capture_output=True)
