"""The gateway when the daemon fails under it: nothing stays locked or half-made."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from ds01.ownership.gateway.admission import Gateway, UserSettings
from ds01.ownership.gateway.daemon import Daemon
from ds01.ownership.gateway.policy import Caps
from ds01.ownership.gateway.relay import DockerGateway
from tests.gateway_raw import raw_as, request

pytestmark = pytest.mark.usefixtures("unix_users")


async def test_a_create_the_daemon_never_answers_releases_the_user_and_its_volumes(
    tmp_path: Path, docker_socket: Path, test_image: str
):
    """Lookups reach the daemon, the forward does not: the user's next create is not
    stuck behind the first, and the volume made for it is gone again."""

    async def settings(user: str) -> UserSettings:
        return UserSettings(f"/ds01/test/{user}", Caps(), max_containers=5)

    async def owner(container_id: str) -> str | None:
        return None

    async def is_admin(user: str) -> bool:
        return False

    run = Path("/tmp") / f"ds01-gw-{tmp_path.name}"
    run.mkdir(mode=0o755, exist_ok=True)
    listen = run / "gateway.sock"
    gateway = DockerGateway(
        listen,
        tmp_path / "no-daemon.sock",  # forwards go nowhere
        Gateway(Daemon(docker_socket), settings, owner),
        is_admin,
    )
    await gateway.start()
    try:
        body = {"Image": test_image, "HostConfig": {"Binds": ["faultvol:/v"]}}
        first = request("POST", "/containers/create?name=f1", body)
        second = request("POST", "/containers/create?name=f2", body)
        answers = await asyncio.wait_for(raw_as("ds01bob", str(listen), [first, second]), 60)
        assert len(answers) == 2  # both came back: the second was not left waiting
        listed = subprocess.run(
            ["curl", "-s", "--unix-socket", str(docker_socket), "http://d/volumes"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        volumes = json.loads(listed.stdout)["Volumes"] or []
        assert "faultvol" not in [v["Name"] for v in volumes]
    finally:
        await gateway.stop()
        listen.unlink(missing_ok=True)
        run.rmdir()
