"""The gateway when the daemon fails under it: nothing stays locked or half-made."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from ds01.core.docker_api import Daemon
from ds01.ownership.gateway.admission import Gateway, UserSettings
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


@pytest.mark.parametrize(
    "partial",
    [
        "G",
        "GET /_ping HTTP/1.1\r\n",
        "GET /_ping HTTP/1.1\r\nHost: docker\r\n",
        "POST /containers/create HTTP/1.1\r\nHost: docker\r\nContent-Type: applic",
    ],
)
async def test_a_request_head_that_stops_coming_is_timed_out(
    ownership, monkeypatch: pytest.MonkeyPatch, partial: str
):
    """Half-sent heads hold a descriptor each: once a head has begun, the rest must come
    within HEAD_TIMEOUT (30 s; 1 s here), or the connection is answered 408 and closed."""
    from ds01.ownership.gateway import relay

    monkeypatch.setattr(relay, "HEAD_TIMEOUT", 1.0)
    config, _ = ownership
    started = asyncio.get_running_loop().time()
    [answers] = await raw_as("ds01alice", str(config.ownership.proxy_socket), [partial])
    assert [a.status for a in answers] == [408]
    assert "the request stopped coming" in answers[0].body
    assert asyncio.get_running_loop().time() - started < 10
