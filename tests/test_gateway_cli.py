"""The Docker gateway, used as users use it: the real docker CLI, run as real Unix
users (runuser), against a real dockerd."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.gateway_raw import raw_as, request

pytestmark = pytest.mark.usefixtures("unix_users", "daemon_audit")


async def docker_as(
    user: str, config, *args: str, stdin: str | None = None, tty: bool = False
) -> subprocess.CompletedProcess[str]:
    socket = config.ownership.proxy_socket
    command = ["docker", "-H", f"unix://{socket}", *args]
    if tty:  # a real terminal, as `docker run -it` needs
        command = ["script", "-qec", " ".join(command), "/dev/null"]
    argv = ["runuser", "-u", user, "--", *command]
    env = {**os.environ, "HOME": f"/home/{user}", "DOCKER_CONFIG": f"/home/{user}/.docker"}
    return await asyncio.to_thread(
        subprocess.run, argv, input=stdin, capture_output=True, text=True, timeout=90, env=env
    )


async def curl_as(user: str, socket: str, data: str, path: str) -> str:
    """POST ``data`` to the proxy as ``user`` with curl: raw API calls the CLI never makes."""
    argv = ["runuser", "-u", user, "--", "curl", "-s", "--unix-socket", socket]
    argv += ["-H", "Content-Type: application/json", "-d", data, f"http://docker/{path}"]
    result = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=30
    )
    return result.stdout


def _real(docker_socket: Path, *args: str) -> str:
    result = subprocess.run(
        ["docker", "-H", f"unix://{docker_socket}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


async def test_users_see_and_touch_only_their_own_containers(ownership, test_image):
    config, _ = ownership
    run = await docker_as(
        "ds01alice",
        config,
        "run",
        "-d",
        "--name",
        "alices",
        "--network=none",
        test_image,
        "sh",
        "-c",
        "echo one; sleep 600",
    )
    assert run.returncode == 0, run.stderr
    container_id = run.stdout.strip()
    try:
        mine = await docker_as("ds01alice", config, "ps", "-a", "--format", "{{.Names}}")
        theirs = await docker_as("ds01bob", config, "ps", "-a", "--format", "{{.Names}}")
        assert "alices" in mine.stdout.split()
        assert "alices" not in theirs.stdout.split()
        for reference in ("alices", container_id[:10], container_id):
            for action in (["inspect"], ["logs"], ["stop"], ["rm", "-f"], ["exec"], ["cp"]):
                args = [*action, reference]
                if action == ["exec"]:
                    args.append("true")
                if action == ["cp"]:
                    args = ["cp", f"{reference}:/etc/passwd", "/tmp/x"]
                denied = await docker_as("ds01bob", config, *args)
                assert denied.returncode != 0, args
                assert "Permission denied: container owned by ds01alice" in denied.stderr, args
        labels = await docker_as(
            "ds01alice", config, "inspect", "-f", '{{index .Config.Labels "ds01.user"}}', "alices"
        )
        assert labels.stdout.strip() == "ds01alice"
        logs = await docker_as("ds01alice", config, "logs", "alices")
        assert logs.stdout.strip() == "one"
    finally:
        await docker_as("ds01alice", config, "rm", "-f", "alices")


async def test_interactive_exec_run_and_follow_logs_work_through_the_proxy(
    ownership,
    test_image,
):
    config, _ = ownership
    await docker_as(
        "ds01alice",
        config,
        "run",
        "-d",
        "--name",
        "live",
        "--network=none",
        test_image,
        "sleep",
        "600",
    )
    try:
        echoed = await docker_as("ds01alice", config, "exec", "-i", "live", "cat", stdin="hello\n")
        assert echoed.returncode == 0, echoed.stderr
        assert echoed.stdout == "hello\n"
        tty = await docker_as(
            "ds01alice",
            config,
            "run",
            "-it",
            "--rm",
            "--network=none",
            test_image,
            "echo",
            "from-a-tty",
            tty=True,
        )
        assert "from-a-tty" in tty.stdout, tty.stderr + tty.stdout
        await docker_as(
            "ds01alice",
            config,
            "run",
            "-d",
            "--name",
            "talk",
            "--network=none",
            test_image,
            "sh",
            "-c",
            "echo first; sleep 1; echo second",
        )
        followed = await docker_as("ds01alice", config, "logs", "-f", "talk")
        assert followed.stdout.split() == ["first", "second"]
    finally:
        await docker_as("ds01alice", config, "rm", "-f", "live", "talk")


ROUNDS = 12  # the loss was one run in five: twelve clean rounds of each say it is gone


@pytest.mark.parametrize(
    "how",
    ["start --attach --interactive", "run --interactive --rm", "exec --interactive"],
)
async def test_a_short_lived_process_never_loses_its_output_when_stdin_ends_first(
    ownership, test_image, how: str
):
    """What compose's one-off ``run`` and the Dev Containers CLI's ``exec`` do: stdin is
    at its end at once, so the client half-closes the hijacked connection before the
    process prints. Such a relayed connection was once collected as garbage mid-stream
    (asyncio holds a connection's reader weakly), and the output never came."""
    config, _ = ownership
    lost = []
    await docker_as("ds01alice", config, "run", "-d", "--name", "host", test_image, "sleep", "600")
    try:
        for i in range(ROUNDS):
            word = f"said-{i}"
            if how.startswith("start"):
                made = await docker_as(
                    "ds01alice", config, "create", "-i", test_image, "echo", word
                )
                argv = ["start", "--attach", "--interactive", made.stdout.strip()]
            elif how.startswith("run"):
                argv = ["run", "--interactive", "--rm", test_image, "echo", word]
            else:
                argv = ["exec", "--interactive", "host", "echo", word]
            said = await docker_as("ds01alice", config, *argv, stdin="")
            if how.startswith("start"):  # students may keep two containers
                await docker_as("ds01alice", config, "rm", argv[-1])
            if said.stdout != f"{word}\n":
                lost.append(f"round {i}: {said.stdout!r} {said.stderr!r}")
    finally:
        await docker_as("ds01alice", config, "rm", "-f", "host")
    assert not lost, "output lost:\n" + "\n".join(lost)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["--privileged"], "privileged containers are not allowed"),
        (["--cap-add", "SYS_ADMIN"], "adding capabilities is not allowed"),
        (["--device", "/dev/null"], "host devices are not allowed"),
        (["--pid", "host"], "PidMode=host is not allowed"),
        (["--ipc", "host"], "IpcMode=host is not allowed"),
        (["--network", "host"], "NetworkMode=host is not allowed"),
        (["--uts", "host"], "UTSMode=host is not allowed"),
        (["-v", "/etc:/host-etc"], "bind mounts must lie in your home"),
        (["--mount", "type=bind,source=/root,target=/r"], "bind mounts must lie in your home"),
        (["-e", "NVIDIA_VISIBLE_DEVICES=all"], "GPU visibility is set by ds01"),
        (["--gpus", "all"], "GPUs are given by ds01"),
    ],
)
async def test_escaping_create_options_are_refused(
    ownership,
    test_image,
    options,
    reason,
):
    config, _ = ownership
    network = [] if "--network" in options else ["--network=none"]
    refused = await docker_as("ds01bob", config, "create", *network, *options, test_image, "true")
    assert refused.returncode != 0
    assert reason in refused.stderr


async def test_owner_labels_sent_by_the_user_are_overwritten(ownership, test_image):
    config, _ = ownership
    made = await docker_as(
        "ds01bob",
        config,
        "create",
        "--name",
        "sneaky",
        "--network=none",
        "--label",
        "ds01.user=ds01alice",
        "--label",
        "ds01.protected=true",
        test_image,
        "true",
    )
    assert made.returncode == 0, made.stderr
    try:
        labels = await docker_as(
            "ds01bob", config, "inspect", "-f", "{{json .Config.Labels}}", "sneaky"
        )
        assert '"ds01.user":"ds01bob"' in labels.stdout
        assert "ds01.protected" not in labels.stdout
    finally:
        await docker_as("ds01bob", config, "rm", "sneaky")


async def test_an_unlabelled_container_is_denied_to_users_and_visible_to_root(
    ownership,
    test_image,
    docker_socket,
):
    config, _ = ownership
    await asyncio.to_thread(
        _real, docker_socket, "create", "--name", "orphan", "--network=none", test_image, "true"
    )
    try:
        await asyncio.sleep(0.5)
        denied = await docker_as("ds01alice", config, "inspect", "orphan")
        assert "Permission denied: container has no owner" in denied.stderr
        as_root = await docker_as("root", config, "ps", "-a", "--format", "{{.Names}}")
        assert "orphan" in as_root.stdout.split()
    finally:
        await asyncio.to_thread(_real, docker_socket, "rm", "orphan")


# (name, labels, alice's?) made as root on the daemon: each rule that names an owner.
LISTED = (
    ("ps-ds01", {"ds01.user": "ds01alice", "x": "1"}, True),
    ("ps-mlc", {"aime.mlc.USER": "ds01alice"}, True),
    ("ps-dev", {"devcontainer.local_folder": "/home/ds01alice/proj"}, True),
    ("ps-mlc-bob", {"aime.mlc.USER": "ds01alice", "ds01.user": "ds01bob", "x": "1"}, False),
    ("ps-dev-up", {"devcontainer.local_folder": "/home/ds01alice/../ds01bob"}, False),
    ("ps-dev-bob", {"devcontainer.local_folder": "/home/ds01bob/proj"}, False),
    ("ps-bob", {"ds01.user": "ds01bob", "x": "1"}, False),
    ("ps-none", {"x": "1"}, False),
)


async def test_docker_ps_lists_the_callers_containers_by_every_owner_rule(
    ownership, test_image, docker_socket
):
    """The gateway asks Docker for each owner rule's label and keeps the caller's: what
    Docker filters and what ds01 keeps must together be exactly the caller's containers,
    with the caller's own filters and limit applied as Docker applies them."""
    config, _ = ownership
    for name, labels, _alices in LISTED:
        flags = [f"--label={k}={v}" for k, v in labels.items()]
        await asyncio.to_thread(_real, docker_socket, "create", "--name", name, *flags,
                                "--network=none", test_image, "true")  # fmt: skip
    try:

        async def names(*args: str) -> set[str]:
            listed = await docker_as("ds01alice", config, "ps", "-a", *args, "--format",
                                     "{{.Names}}")  # fmt: skip
            assert listed.returncode == 0, listed.stderr
            return {n for n in listed.stdout.split() if n.startswith("ps-")}

        assert await names() == {name for name, _, alices in LISTED if alices}
        assert await names("--filter", "label=x=1") == {"ps-ds01"}
        assert await names("--filter", "name=ps-mlc") == {"ps-mlc"}  # ps-mlc-bob is bob's
        assert await names("--filter", "label=ds01.user=ds01bob") == set()
        assert await names("--filter", "label=aime.mlc.USER=ds01alice") == {"ps-mlc"}
        assert len(await names("-n", "2")) == 2
        socket = str(config.ownership.proxy_socket)
        sent = {
            "/containers/json?all=1&filters=" + quote('{"label":{"x=1":true}}'): 200,
            "/v1.41/containers/json?all=1&filters=" + quote('{"name":["ps-dev"]}'): 200,
            "/containers/json?all=1&filters=notjson": 400,
            "/containers/json?all=1&filters=" + quote("[1]"): 400,
            "/containers/json?all=1&filters=" + quote('{"label":"x=1"}'): 400,
            "/containers/json?all=1&filters=" + quote('{"a":["b"],"c":{"d":true}}'): 400,
            "/containers/json?all=1&filters=" + quote('{"nosuchfilter":["b"]}'): 400,
            "/containers/json?all=1&limit=abc": 400,
        }
        answers = await raw_as("ds01alice", socket, [request("GET", t) for t in sent])
        for (target, status), [answer] in zip(sent.items(), answers, strict=True):
            assert answer.status == status, (target, answer)
            if status == 400:
                assert answer.json()["message"], target
        assert [c["Names"] for c in answers[0][0].json()] == [["/ps-ds01"]]
        assert [c["Names"] for c in answers[1][0].json()] == [["/ps-dev"]]
    finally:
        await asyncio.to_thread(_real, docker_socket, "rm", *(n for n, _, _ in LISTED))


async def test_cross_user_endpoints_are_admins_only_and_prune_is_scoped(ownership, test_image):
    config, _ = ownership
    for args in (["swarm", "init"], ["plugin", "ls"], ["system", "df"], ["volume", "prune", "-f"]):
        refused = await docker_as("ds01bob", config, *args)
        assert "Permission denied: admins only" in refused.stderr, args
    for user, name in (("ds01alice", "keepme"), ("ds01bob", "dropme")):
        made = await docker_as(
            user, config, "create", "--name", name, "--network=none", test_image, "true"
        )
        assert made.returncode == 0, made.stderr
    try:
        pruned = await docker_as("ds01bob", config, "container", "prune", "-f")
        assert pruned.returncode == 0, pruned.stderr
        alices = await docker_as("ds01alice", config, "ps", "-a", "--format", "{{.Names}}")
        bobs = await docker_as("ds01bob", config, "ps", "-a", "--format", "{{.Names}}")
        assert "keepme" in alices.stdout.split() and "dropme" not in bobs.stdout.split()
    finally:
        await docker_as("ds01alice", config, "rm", "-f", "keepme")
        await docker_as("ds01bob", config, "rm", "-f", "dropme")


async def test_limits_are_clamped_and_the_cgroup_parent_forced(ownership, test_image):
    """config/resource-limits.yaml: students get 8 CPUs, 32g and 4096 pids."""
    config, _ = ownership
    made = await docker_as(
        "ds01bob",
        config,
        "create",
        "--name",
        "greedy",
        "--network=none",
        "--cpus",
        "64",
        "--pids-limit",
        "100000",
        "--cgroup-parent",
        "/",
        test_image,
        "true",
    )
    assert made.returncode == 0, made.stderr
    try:
        host = await docker_as(
            "ds01bob",
            config,
            "inspect",
            "-f",
            "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.HostConfig.PidsLimit}} "
            "{{.HostConfig.CgroupParent}}",
            "greedy",
        )
        cpus = min(8, len(os.sched_getaffinity(0)))  # and never more than the host has
        assert host.stdout.split() == [
            str(cpus * 10**9),
            str(32 * 1024**3),
            "4096",
            "/ds01/students/ds01bob",
        ]
    finally:
        await docker_as("ds01bob", config, "rm", "greedy")


async def test_another_users_exec_id_is_refused(ownership, test_image):
    config, _ = ownership
    socket = str(config.ownership.proxy_socket)
    await docker_as(
        "ds01alice",
        config,
        "run",
        "-d",
        "--name",
        "execd",
        "--network=none",
        test_image,
        "sleep",
        "600",
    )
    try:
        created = await curl_as("ds01alice", socket, '{"Cmd": ["true"]}', "containers/execd/exec")
        exec_id = json.loads(created)["Id"]
        started = await curl_as("ds01bob", socket, '{"Detach": true}', f"exec/{exec_id}/start")
        assert json.loads(started) == {"message": "Permission denied: container owned by ds01alice"}
    finally:
        await docker_as("ds01alice", config, "rm", "-f", "execd")


async def test_nothing_runs_as_root_over_the_users_home(ownership, test_image, unix_users):
    """With the home mounted, the container runs as its owner; exec as root and copying
    into containers (which would write as root) are refused."""
    config, _ = ownership
    made = await docker_as(
        "ds01bob",
        config,
        "run",
        "-d",
        "--name",
        "homely",
        "--network=none",
        "-u",
        "0",
        "-v",
        "/home/ds01bob:/home/ds01bob",
        test_image,
        "sleep",
        "600",
    )
    assert made.returncode == 0, made.stderr
    try:
        who = await docker_as("ds01bob", config, "exec", "homely", "id", "-u")
        assert who.stdout.strip() == str(unix_users["ds01bob"])
        as_root = await docker_as("ds01bob", config, "exec", "-u", "0", "homely", "id")
        assert "exec as '0' is for admins" in as_root.stderr
        copied = await docker_as("ds01bob", config, "cp", "/etc/hostname", "homely:/tmp/x")
        assert "Permission denied: admins only" in copied.stderr
    finally:
        await docker_as("ds01bob", config, "rm", "-f", "homely")


async def test_named_volumes_belong_to_their_creator(ownership, test_image):
    config, _ = ownership
    made = await docker_as("ds01alice", config, "volume", "create", "alicedata")
    assert made.returncode == 0, made.stderr
    try:
        listed = await docker_as("ds01bob", config, "volume", "ls", "-q")
        assert "alicedata" not in listed.stdout.split()
        mounted = await docker_as(
            "ds01bob", config, "create", "--network=none", "-v", "alicedata:/d", test_image, "true"
        )
        assert "Permission denied: volume owned by ds01alice" in mounted.stderr
        removed = await docker_as("ds01bob", config, "volume", "rm", "alicedata")
        assert "Permission denied: volume owned by ds01alice" in removed.stderr
        own = await docker_as(
            "ds01bob",
            config,
            "run",
            "--rm",
            "--network=none",
            "-v",
            "bobdata:/d",
            test_image,
            "true",
        )
        assert own.returncode == 0, own.stderr
        mine = await docker_as("ds01bob", config, "volume", "ls", "-q")
        assert "bobdata" in mine.stdout.split()  # created for bob, so still his
    finally:
        await docker_as("root", config, "volume", "rm", "-f", "alicedata", "bobdata")


class TestAggregateLimits:
    """With an aggregate cap on all of a student's containers."""

    @pytest.fixture
    def limits_file(self, tmp_path: Path) -> Path:
        """The shipped limits, with an aggregate cap on all of a student's containers."""
        text = (Path(__file__).parent.parent / "config" / "resource-limits.yaml").read_text()
        text = text.replace(
            "  students:\n    priority: 10\n",
            "  students:\n    priority: 10\n"
            "    aggregate: {memory_max: 3g, max_cpus: 2, tasks_max: 700}\n",
        )
        (tmp_path / "resource-limits.yaml").write_text(text)
        return tmp_path / "resource-limits.yaml"

    async def test_gateway_creates_get_the_users_aggregate_cgroup_limits(
        self, ownership, test_image
    ):
        """The per-user cgroup holds the sum of all the user's containers, however made."""
        config, _ = ownership
        made = await docker_as(
            "ds01bob", config, "run", "-d", "--name", "capped", "--network=none", test_image,
            "sleep", "60",
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        try:
            unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()
            root = Path("/sys/fs/cgroup")
            memory = root / ("" if unified else "memory") / "ds01/students/ds01bob"
            pids = root / ("" if unified else "pids") / "ds01/students/ds01bob"
            limit = (memory / ("memory.max" if unified else "memory.limit_in_bytes")).read_text()
            assert int(limit) == 3 * 1024**3
            assert (pids / "pids.max").read_text().strip() == "700"
        finally:
            await docker_as("ds01bob", config, "rm", "-f", "capped")
