"""The clients users run, through the gateway, as their owners: Debian's docker-compose,
the Dev Containers CLI (what VS Code runs underneath) and the docker CLI calls AIME's
``mlc`` makes. Each keeps working for its owner and stays out of everyone else's things."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import docker as docker_sdk
import pytest

from ds01.containers.spec import Account, ContainerSpec, Limits
from tests.gateway_audit import audit_daemon
from tests.harness import GID, GROUP, require_binary

pytestmark = pytest.mark.usefixtures("unix_users", "daemon_audit")

BOB = "ds01bob"


async def as_user(
    user: str, socket: Path, argv: list[str], cwd: Path | None = None, timeout: int = 180
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": f"/home/{user}",
        "USER": user,
        "DOCKER_HOST": f"unix://{socket}",
        "DOCKER_CONFIG": f"/home/{user}/.docker",
        "DOCKER_BUILDKIT": "0",
        "COMPOSE_DOCKER_CLI_BUILD": "1",
    }
    command = ["runuser", "-u", user, "--", "env", *[f"{k}={v}" for k, v in env.items()], *argv]
    return await asyncio.to_thread(
        subprocess.run, command, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def own_dir(user: str, name: str) -> Path:
    path = Path(f"/home/{user}/{name}")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    shutil.chown(path, user, user if _has_group(user) else None)
    return path


def _has_group(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def chown_tree(path: Path, user: str) -> None:
    for item in [path, *path.rglob("*")]:
        shutil.chown(item, user)


async def test_docker_compose_up_exec_run_logs_down(ownership, test_image, docker_socket):
    require_binary("docker-compose")
    config, _ = ownership
    socket = config.ownership.proxy_socket
    project = own_dir(BOB, "composeproj")
    (project / "app").mkdir()
    (project / "app" / "Dockerfile").write_text(f"FROM {test_image}\nRUN echo built > /built\n")
    # Every service on network_mode none: compose then makes no network (no bridges here).
    (project / "docker-compose.yml").write_text(
        f"""version: "3.8"
services:
  web:
    image: {test_image}
    command: ["sh", "-c", "echo serving; sleep 600"]
    network_mode: none
    volumes: ["data:/data"]
  builder:
    build: ./app
    image: {BOB}/builder:1
    command: ["sh", "-c", "cat /built; sleep 600"]
    network_mode: none
volumes:
  data: {{}}
"""
    )
    chown_tree(project, BOB)
    compose = ["docker-compose", "-p", "bobproj"]
    try:
        # students may have two containers (config/resource-limits.yaml): one at a time here
        up = await as_user(BOB, socket, [*compose, "up", "-d", "web"], cwd=project)
        assert up.returncode == 0, up.stderr + up.stdout
        ps = await as_user(BOB, socket, [*compose, "ps"], cwd=project)
        assert "bobproj_web_1" in ps.stdout and "Up" in ps.stdout, ps.stdout + ps.stderr
        said = await as_user(BOB, socket, [*compose, "exec", "-T", "web", "id", "-u"], cwd=project)
        assert said.stdout.strip() == "35002", said.stderr
        ran = await as_user(
            BOB, socket, [*compose, "run", "--rm", "-T", "web", "echo", "one-off"], cwd=project
        )
        assert "one-off" in ran.stdout, ran.stderr
        built = await as_user(BOB, socket, [*compose, "up", "-d", "builder"], cwd=project)
        assert built.returncode == 0, built.stderr + built.stdout
        await asyncio.sleep(1)
        logs = await as_user(BOB, socket, [*compose, "logs", "--no-color"], cwd=project)
        assert "serving" in logs.stdout and "built" in logs.stdout, logs.stdout + logs.stderr
        volume = subprocess.run(
            ["docker", "-H", f"unix://{docker_socket}", "volume", "inspect", "bobproj_data"],
            capture_output=True,
            text=True,
        )
        assert json.loads(volume.stdout)[0]["Labels"]["ds01.user"] == BOB
        assert audit_daemon(docker_socket) == []
    finally:
        down = await as_user(BOB, socket, [*compose, "down", "-v", "--rmi", "local"], cwd=project)
    assert down.returncode == 0, down.stderr
    left = subprocess.run(
        ["docker", "-H", f"unix://{docker_socket}", "ps", "-aq", "--filter", "label=ds01.user"],
        capture_output=True,
        text=True,
    )
    assert left.stdout.strip() == ""


async def test_dev_containers_cli_up_and_exec(ownership, test_image, docker_socket, unix_users):
    require_binary("devcontainer")
    config, _ = ownership
    socket = config.ownership.proxy_socket
    workspace = own_dir(BOB, "devproj")
    (workspace / ".devcontainer").mkdir()
    (workspace / ".devcontainer" / "devcontainer.json").write_text(
        json.dumps({"image": test_image, "runArgs": ["--network=none"]})
    )
    chown_tree(workspace, BOB)
    folder = ["--workspace-folder", str(workspace)]
    up = await as_user(BOB, socket, ["devcontainer", "up", *folder, "--docker-path", "docker"])
    try:
        assert up.returncode == 0, up.stderr[-3000:] + up.stdout[-2000:]
        result = json.loads(up.stdout.strip().splitlines()[-1])
        assert result["outcome"] == "success", result
        who = await as_user(BOB, socket, ["devcontainer", "exec", *folder, "id", "-u"])
        assert who.returncode == 0, who.stderr[-3000:]
        assert who.stdout.strip().splitlines()[-1] == str(unix_users[BOB])
        seen = await as_user(
            BOB,
            socket,
            ["devcontainer", "exec", *folder, "ls", "-a", f"/workspaces/{workspace.name}"],
        )
        assert ".devcontainer" in seen.stdout, seen.stderr[-2000:]
        assert audit_daemon(docker_socket) == []
    finally:
        found = subprocess.run(
            ["docker", "-H", f"unix://{docker_socket}", "ps", "-aq", "--filter",
             f"label=devcontainer.local_folder={workspace}"],
            capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
        for container in found:
            subprocess.run(
                ["docker", "-H", f"unix://{docker_socket}", "rm", "-f", container],
                capture_output=True,
            )


async def test_the_docker_calls_mlc_makes_work_on_ds01_containers(
    ownership, test_image, docker_socket, unix_users
):
    """ds01 creates MLC-labelled containers; mlc's list, start, open (exec as the user),
    top, stop, stats and remove then run through the gateway."""
    config, _ = ownership
    socket = config.ownership.proxy_socket
    uid = unix_users[BOB]
    name = f"proj._.{BOB}"
    labels = {
        "ds01.user": BOB,
        "ds01.managed": "true",
        "aime.mlc": BOB,
        "aime.mlc.NAME": "proj",
        "aime.mlc.USER": BOB,
        "aime.mlc.FRAMEWORK": "Pytorch-2.1",
    }
    root = ["docker", "-H", f"unix://{docker_socket}"]
    label_args = [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]
    made = subprocess.run(
        [*root, "create", "--name", name, "--network", "none", "--user", f"{uid}:35000",
         "--cap-drop", "ALL", "--security-opt", "no-new-privileges", *label_args,
         test_image, "sleep", "600"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    docker = ["docker"]
    try:
        listed = await as_user(
            BOB, socket,
            [*docker, "container", "ps", "-a", f"--filter=label=aime.mlc.USER={BOB}",
             "--format", "{{.Names}}"],
        )  # fmt: skip
        assert listed.stdout.split() == [name], listed.stderr
        assert (await as_user(BOB, socket, [*docker, "container", "start", name])).returncode == 0
        opened = await as_user(
            BOB,
            socket,
            [*docker, "exec", "-e DISPLAY=:0", "--user", f"{uid}:35000", name, "id", "-u"],
        )  # fmt: skip  (mlc passes "-e DISPLAY=..." as one argument, as here)
        assert opened.stdout.split() == [str(uid)], opened.stderr
        top = await as_user(BOB, socket, [*docker, "top", name, "-o", "pid"])
        assert top.returncode == 0 and "PID" in top.stdout, top.stderr
        info = await as_user(
            BOB, socket,
            [*docker, "container", "ls", "-a", "--filter", f"label=aime.mlc={BOB}",
             "--format", "{{json .}}"],
        )  # fmt: skip
        assert json.loads(info.stdout)["Names"] == name, info.stderr
        stats = await as_user(
            BOB, socket, [*docker, "stats", "--no-stream", "--format", "{{json .}}"]
        )
        assert stats.returncode == 0 and name in stats.stdout, stats.stderr
        assert (await as_user(BOB, socket, [*docker, "container", "stop", name])).returncode == 0
        # mlc create commits into the framework image's repository: only the user's own
        # namespace may be written, so the image mlc would remove is refused elsewhere.
        commit = await as_user(BOB, socket, [*docker, "commit", name, f"{BOB}/proj:snapshot"])
        assert commit.returncode == 0, commit.stderr
        foreign = await as_user(BOB, socket, [*docker, "commit", name, f"{test_image}-{BOB}"])
        assert "Permission denied" in foreign.stderr
        shared = await as_user(BOB, socket, [*docker, "image", "rm", test_image])
        assert "Permission denied" in shared.stderr
        assert (await as_user(BOB, socket, [*docker, "container", "rm", name])).returncode == 0
        gone = await as_user(BOB, socket, [*docker, "image", "rm", f"{BOB}/proj:snapshot"])
        assert gone.returncode == 0, gone.stderr
        privileged = await as_user(
            BOB, socket,
            [*docker, "run", "--privileged", "--network", "host", test_image, "true"],
        )  # fmt: skip
        assert "Permission denied" in privileged.stderr or "not allowed" in privileged.stderr
    finally:
        subprocess.run([*root, "rm", "-f", name], capture_output=True)
        subprocess.run([*root, "rmi", f"{BOB}/proj:snapshot"], capture_output=True)


MLC_COLUMNS = (  # what `mlc list -a` reads from each container's labels
    "NAME", "USER", "FRAMEWORK", "ARCH", "WORK_MOUNT", "DATA_MOUNT", "MODELS_MOUNT", "GPUS",
    "MLC_VERSION",
)  # fmt: skip


def mlc_labels(listed: str) -> list[dict[str, str]]:
    """mlc's own reading of `docker container ls --format '{{json .}}'`: the Labels
    column split on commas, then on the first '='."""
    rows = []
    for line in listed.splitlines():
        labels = json.loads(line)["Labels"]
        rows.append(dict(pair.split("=", 1) for pair in labels.split(",") if "=" in pair))
    return rows


async def test_mlcs_queries_see_every_column_of_a_users_ds01_containers_and_nothing_else(
    ownership, test_image, docker_socket, unix_users
):
    """The label filters and the Labels parsing of mlc 2.x, run as the users through
    the gateway, on a container exactly as ds01 creates it."""
    config, _ = ownership
    socket = config.ownership.proxy_socket
    alice = "ds01alice"
    workspace = own_dir(alice, "mlcproj")
    spec = ContainerSpec(
        name="mlcproj",
        image=test_image,
        account=Account(alice, unix_users[alice], GID, GROUP, Path(f"/home/{alice}")),
        limits=Limits(),  # no GPU: the gateway would ask the allocator at start
        workspace=workspace,
        network_mode="none",
    )
    root = ["docker", "-H", f"unix://{docker_socket}"]
    sdk = docker_sdk.DockerClient(base_url=f"unix://{docker_socket}")
    try:
        sdk.containers.create(**spec.create_arguments())  # exactly as ds01 creates it
    finally:
        sdk.close()
    name = spec.docker_name
    query = ["container", "ls", "-a", "--format", "{{json .}}", "--filter"]
    try:
        mine = await as_user(alice, socket, ["docker", *query, f"label=aime.mlc={alice}"])
        [row] = mlc_labels(mine.stdout)
        assert {column: row[f"aime.mlc.{column}"] for column in MLC_COLUMNS} == {
            "NAME": "mlcproj",
            "USER": alice,
            "FRAMEWORK": f"{test_image.rsplit('/', 1)[-1].replace(':', '-')}",
            "ARCH": "-",
            "WORK_MOUNT": str(workspace),
            "DATA_MOUNT": "-",
            "MODELS_MOUNT": "-",
            "GPUS": "0",
            "MLC_VERSION": "4",
        }
        by_user = await as_user(
            alice, socket, ["docker", "container", "ps", "-a",
                            f"--filter=label=aime.mlc.USER={alice}", "--format", "{{.Names}}"],
        )  # fmt: skip
        assert by_user.stdout.split() == [name]
        for step in (["container", "start", name], ["container", "stop", name]):
            done = await as_user(alice, socket, ["docker", *step])
            assert done.returncode == 0, done.stderr
        # Bob's filters, for alice's containers or for everyone's, never show them.
        for label in (f"label=aime.mlc={alice}", "label=aime.mlc", f"label=aime.mlc.USER={alice}"):
            seen = await as_user(BOB, socket, ["docker", *query, label])
            assert name not in seen.stdout, (label, seen.stdout)
        for step in (
            ["container", "start", name],
            ["container", "stop", name],
            ["container", "rm", name],
            ["exec", name, "true"],
        ):
            refused = await as_user(BOB, socket, ["docker", *step])
            assert refused.returncode != 0, step
        removed = await as_user(alice, socket, ["docker", "container", "rm", name])
        assert removed.returncode == 0, removed.stderr
    finally:
        subprocess.run([*root, "rm", "-f", name], capture_output=True)
