"""``ds01 image build|list|remove``, run as real users through the real ds01 CLI against
the real Docker gateway: images land in their builder's namespace, stay invisible and
out of reach to everyone else, and every refusal is one clear line."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.allocator_env import AllocatorEnv, full_stack_fixture
from tests.harness import GROUP, ds01_as

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB = "ds01alice", "ds01bob"
LIMITS = textwrap.dedent(
    """\
    defaults:
      max_gpu_equivalents: 1
      max_gpu_slots_per_container: 1
      priority: 10
    """
)
# Every name these tests may make; none may outlive a test.
MADE = (f"{ALICE}/proj:v1", f"{ALICE}/proj:latest", f"{ALICE}/x:latest",
        f"{ALICE}/broken:latest", f"{BOB}/proj:v1", f"ds01-{ALICE}/x:latest",
        "library/ubuntu:x", "ubuntu:x")  # fmt: skip


stack = full_stack_fixture(LIMITS)


@pytest.fixture
def daemon(docker_socket: Path) -> Iterator[docker.DockerClient]:
    """The real daemon, behind the gateway's back: what Docker itself holds."""
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    yield client
    for name in MADE:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(name, force=True)
    client.close()


def held(client: docker.DockerClient, name: str) -> docker.models.images.Image | None:
    try:
        return client.images.get(name)
    except docker.errors.ImageNotFound:
        return None


def project(user: str, dockerfile: str, name: str = "imgctx") -> Path:
    """A build context in ``user``'s home, theirs, with a Dockerfile."""
    path = Path(f"/home/{user}/{name}")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    (path / "Dockerfile").write_text(dockerfile)
    (path / "hello.txt").write_text("from the context\n")
    for item in (path, *path.iterdir()):
        shutil.chown(item, user, GROUP)
    return path


def one_clear_line(done: subprocess.CompletedProcess[str], *said: str) -> None:
    """Refused: exit 1, and one line on stderr that says each of ``said``."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith("ds01: error: "), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    for text in said:
        assert text in done.stderr, (text, done.stderr)


def names(listed: subprocess.CompletedProcess[str]) -> list[str]:
    assert listed.returncode == 0, listed.stderr
    return [line.split()[0] for line in listed.stdout.splitlines()[1:]]


async def test_a_user_builds_lists_runs_and_removes_an_image_of_their_own(
    stack: AllocatorEnv, test_image: str, daemon: docker.DockerClient
):
    context = project(ALICE, "FROM scratch\n")  # not this one: -f names the Dockerfile
    elsewhere = project(ALICE, textwrap.dedent(f"""\
        FROM {test_image}
        ARG GREETING=unset
        COPY hello.txt /hello.txt
        RUN echo "$GREETING" > /greeting
        """), name="dockerfiles")  # fmt: skip
    built = await ds01_as(stack, ALICE, "image", "build", "proj:v1", str(context),
                          "-f", str(elsewhere / "Dockerfile"), "--build-arg",
                          "GREETING=hi there", "--no-cache")  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    # Docker's progress, as docker build prints it, ending in the name it went to.
    assert re.search(rf"^Step 1/\d+ : FROM {test_image}$", built.stdout, re.M), built.stdout
    assert f"Successfully tagged {ALICE}/proj:v1" in built.stdout, built.stdout
    made = held(daemon, f"{ALICE}/proj:v1")
    assert made is not None and made.labels.get("ds01.user") == ALICE
    assert held(daemon, "proj:v1") is None  # no bare name was made

    # The table: hers, not the shared base image (unless asked for).
    table = await ds01_as(stack, ALICE, "image", "list")
    assert table.stdout.splitlines()[0].split() == ["NAME", "ID", "CREATED", "SIZE"]
    assert names(table) == [f"{ALICE}/proj:v1"]
    row = table.stdout.splitlines()[1].split()
    short = made.id.removeprefix("sha256:")[:12]
    assert row[1] == short and row[4].endswith("B"), row  # NAME ID DAY TIME SIZE
    assert dt.datetime.strptime(f"{row[2]} {row[3]}", "%Y-%m-%d %H:%M")
    every = await ds01_as(stack, ALICE, "image", "ls", "--all")
    assert set(names(every)) == {f"{ALICE}/proj:v1", test_image}

    # JSON: the table's words in lowercase, numbers as numbers, times in ISO 8601.
    for args in (["image", "list", "-o", "json"], ["-o", "json", "image", "ls"]):
        listed = await ds01_as(stack, ALICE, *args)
        assert listed.returncode == 0, listed.stderr
        [found] = json.loads(listed.stdout)
        assert found == {"name": f"{ALICE}/proj:v1", "id": short,
                         "created": found["created"], "size": made.attrs["Size"]}  # fmt: skip
        assert isinstance(found["size"], int) and found["size"] > 0
        created = dt.datetime.fromisoformat(found["created"])
        assert abs(created - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)

    # A container from her image has what the build put there.
    ran = await ds01_as(stack, ALICE, "container", "run", "fromimg", "--image",
                        f"{ALICE}/proj:v1")  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    said = await ds01_as(stack, ALICE, "container", "exec", "fromimg", "--",
                         "cat", "/greeting", "/hello.txt")  # fmt: skip
    assert said.stdout == "hi there\nfrom the context\n", said.stderr
    # In use: not removed, and told why and what to do.
    in_use = await ds01_as(stack, ALICE, "image", "rm", "proj:v1")
    one_clear_line(in_use, f"cannot remove {ALICE}/proj:v1", "remove the container first",
                   "--force")  # fmt: skip
    assert held(daemon, f"{ALICE}/proj:v1") is not None
    gone = await ds01_as(stack, ALICE, "container", "rm", "-f", "fromimg")
    assert gone.returncode == 0, gone.stderr

    # The bare name finds hers; the image is gone from her list and from Docker.
    removed = await ds01_as(stack, ALICE, "image", "rm", "proj:v1")
    assert removed.returncode == 0, removed.stderr
    assert f"Untagged: {ALICE}/proj:v1" in removed.stdout and "Deleted: sha256:" in removed.stdout
    assert held(daemon, f"{ALICE}/proj:v1") is None and held(daemon, made.id) is None
    assert names(await ds01_as(stack, ALICE, "image", "list")) == []
    assert json.loads((await ds01_as(stack, ALICE, "image", "ls", "-o", "json")).stdout) == []
    again = await ds01_as(stack, ALICE, "image", "remove", "proj:v1")
    one_clear_line(again, "no image proj:v1", f"neither {ALICE}/proj:v1 nor a shared proj:v1")


async def test_another_users_image_is_invisible_and_out_of_reach(
    stack: AllocatorEnv, test_image: str, daemon: docker.DockerClient
):
    context = project(ALICE, f"FROM {test_image}\nCOPY hello.txt /hello.txt\n")
    built = await ds01_as(stack, ALICE, "image", "build", "proj:v1", str(context))
    assert built.returncode == 0, built.stdout + built.stderr
    alices = held(daemon, f"{ALICE}/proj:v1")
    assert alices is not None
    base = held(daemon, test_image)
    assert base is not None

    # Bob's lists, and his plain docker through the gateway, never show it.
    assert names(await ds01_as(stack, BOB, "image", "ls")) == []
    assert names(await ds01_as(stack, BOB, "image", "ls", "--all")) == [test_image]
    shown = json.loads((await ds01_as(stack, BOB, "image", "ls", "--all", "-o", "json")).stdout)
    assert [i["name"] for i in shown] == [test_image]
    gateway = stack.config.ownership.proxy_socket
    plain = await asyncio.to_thread(
        subprocess.run,
        ["runuser", "-u", BOB, "--", "docker", "-H", f"unix://{gateway}", "images",
         "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert ALICE not in plain.stdout and alices.short_id[7:] not in plain.stdout, plain.stdout

    # He cannot remove it: by its name, by its id, or by the bare name (his own first).
    by_name = await ds01_as(stack, BOB, "image", "rm", f"{ALICE}/proj:v1")
    one_clear_line(by_name, f"cannot remove {ALICE}/proj:v1: Permission denied: it is not in "
                   f"your namespace ({BOB}/NAME or ds01-{BOB}/NAME)")  # fmt: skip
    by_id = await ds01_as(stack, BOB, "image", "rm", "-f", alices.id)
    one_clear_line(by_id, "no such image")
    bare = await ds01_as(stack, BOB, "image", "rm", "proj:v1")
    one_clear_line(bare, "no image proj:v1", f"neither {BOB}/proj:v1 nor a shared proj:v1")
    # Nor a shared base image, which everyone builds on.
    shared = await ds01_as(stack, BOB, "image", "rm", test_image)
    one_clear_line(shared, f"cannot remove {test_image}: Permission denied", "a shared one an "
                   "admin's")  # fmt: skip
    assert held(daemon, test_image).id == base.id

    # He cannot build into her namespace, nor over a shared name: refused before any
    # build, with what to do instead.
    for name in (f"{ALICE}/x", f"ds01-{ALICE}/x", test_image, "library/ubuntu:x"):
        refused = await ds01_as(stack, BOB, "image", "build", name, str(context))
        tagged = name if ":" in name else f"{name}:latest"
        one_clear_line(refused, f"cannot build {tagged}: Permission denied",
                       f"must be named {BOB}/NAME[:TAG] or ds01-{BOB}/NAME[:TAG]",
                       f"a NAME without a namespace, such as {tagged.rsplit('/', 1)[-1]}, "
                       f"builds into yours ({BOB}/...)")  # fmt: skip
        assert "Step 1/" not in refused.stdout, (name, refused.stdout)
    for name in (f"{ALICE}/x:latest", f"ds01-{ALICE}/x:latest", "ubuntu:x"):
        assert held(daemon, name) is None, name
    assert held(daemon, test_image).id == base.id
    assert held(daemon, f"{ALICE}/proj:v1").id == alices.id  # all of it untouched

    # A bare name is his own: the same build lands in his namespace, beside hers.
    his = await ds01_as(stack, BOB, "image", "build", "proj:v1", str(context))
    assert his.returncode == 0, his.stdout + his.stderr
    assert names(await ds01_as(stack, BOB, "image", "ls")) == [f"{BOB}/proj:v1"]
    assert names(await ds01_as(stack, ALICE, "image", "ls")) == [f"{ALICE}/proj:v1"]


async def test_build_mistakes_are_one_clear_line(
    stack: AllocatorEnv, test_image: str, daemon: docker.DockerClient
):
    empty = project(ALICE, "")
    (empty / "Dockerfile").unlink()
    missing = await ds01_as(stack, ALICE, "image", "build", "x", str(empty))
    one_clear_line(missing, f"there is no Dockerfile in {empty}", "-f")
    failing = project(ALICE, f"FROM {test_image}\nRUN false\n")
    broken = await ds01_as(stack, ALICE, "image", "build", "broken", str(failing))
    one_clear_line(broken, f"the build of {ALICE}/broken:latest failed",
                   "returned a non-zero code: 1")  # fmt: skip
    assert re.search(r"^Step \d+/\d+ : RUN false$", broken.stdout, re.M)  # progress up to it
    assert held(daemon, f"{ALICE}/broken:latest") is None
    # Nor the container of the step that failed: it would count as one of hers.
    left = await asyncio.to_thread(daemon.containers.list, all=True)
    assert [c.name for c in left if c.labels.get("ds01.user") == ALICE] == []
    invisible = project(ALICE, f"FROM {BOB}/proj:v1\n")
    hidden = await ds01_as(stack, ALICE, "image", "build", "x", str(invisible))
    one_clear_line(hidden, f"cannot build {ALICE}/x:latest", f"{BOB}/proj:v1")
    bad = await ds01_as(stack, ALICE, "image", "build", "Proj", str(failing))
    one_clear_line(bad, "Proj is not an image name: lowercase letters")


async def test_no_one_creates_a_container_from_another_users_image(
    stack: AllocatorEnv, test_image: str, daemon: docker.DockerClient
):
    """``ds01 container create`` reads images as the gateway does: another user's image
    is not there for you, by any of the names Docker would resolve to it."""
    context = project(ALICE, f"FROM {test_image}\nCOPY hello.txt /hello.txt\n")
    built = await ds01_as(stack, ALICE, "image", "build", "proj:v1", str(context))
    assert built.returncode == 0, built.stdout + built.stderr
    alices = held(daemon, f"{ALICE}/proj:v1")
    assert alices is not None
    # An image with a shared-looking name whose label says whose it is, and one with no
    # name and no owner at all (made behind the gateway's back).
    labelled, _ = await asyncio.to_thread(
        daemon.images.build, path=str(context), tag="ubuntu:x", labels={"ds01.user": ALICE},
        rm=True, forcerm=True,
    )  # fmt: skip
    unnamed, _ = await asyncio.to_thread(
        daemon.images.build, path=str(context), buildargs={"X": "1"}, nocache=True, rm=True,
        forcerm=True,
    )  # fmt: skip
    references = [
        f"{ALICE}/proj:v1",
        f"docker.io/{ALICE}/proj:v1",
        f"ds01-{ALICE}/proj:v1",
        alices.id,  # sha256:...
        alices.id.removeprefix("sha256:"),
        alices.id.removeprefix("sha256:")[:12],
        "ubuntu:x",
        labelled.id.removeprefix("sha256:")[:12],
        unnamed.id,
    ]
    for reference in references:
        refused = await ds01_as(stack, BOB, "container", "create", "s", "--image", reference,
                                "--gpus", "0")  # fmt: skip
        one_clear_line(refused, f"image {reference} is not on this host")
    assert not await asyncio.to_thread(daemon.containers.list, all=True, filters={"name": "s._."})
    # Her own image, by each of its names, is hers to use.
    for n, reference in enumerate((f"{ALICE}/proj:v1", alices.id[:19])):
        made = await ds01_as(stack, ALICE, "container", "create", f"c{n}", "--image", reference,
                             "--gpus", "0")  # fmt: skip
        assert made.returncode == 0, made.stderr
        assert (await ds01_as(stack, ALICE, "container", "rm", f"c{n}")).returncode == 0
    await asyncio.to_thread(daemon.images.remove, unnamed.id, force=True)
