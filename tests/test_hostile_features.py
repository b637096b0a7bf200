"""Today's features against a hostile student on the shared server: GPU queue, drains,
``--gpus all`` and default GPU requests, the image check of container create, ``ds01
image``, GetDockerArgs with a caller's DockerInfo, and ``ds01 top`` with the event streams.

Every test asserts the SAFE behaviour: a failing test is a finding. The attacker is
ds01alice unless said otherwise; ds01bob is the victim (or the other way round). gRPC
calls go in with the user's own client certificate, as any user may; Docker calls go
through the ds01 gateway as the real Unix user (runuser), as any user may."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import grpc
import pytest

from ds01.client import Ds01Client, Ds01Error
from ds01.core.docker_args import DockerInfo, nano_cpus
from ds01.ownership.gateway import relay as relay_module
from ds01.v1 import allocator_pb2
from tests.allocator_env import AllocatorEnv, etcd_revision, full_stack_fixture
from tests.gateway_raw import Answer, raw_as, request
from tests.harness import GROUP, ds01_as

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB = "ds01alice", "ds01bob"
MIG = allocator_pb2.SLOT_PREFERENCE_MIG
FULL = allocator_pb2.SLOT_PREFERENCE_FULL_GPU
HOLD = 2  # seconds a stopped container's GPU is held (etcd's shortest lease)
# Students: one MIG slice per container, 1 GPU-equivalent (all three slices of GPU 2).
LIMITS = textwrap.dedent(
    f"""\
    defaults:
      max_gpu_equivalents: 1
      max_gpu_slots_per_container: 1
      allow_full_gpu: false
      gpu_hold_after_stop: {HOLD}s
      priority: 10
      max_cpus: 1.5
      memory: 512m
      pids_limit: 200
    """
)


stack = full_stack_fixture(LIMITS)


@pytest.fixture
def daemon(docker_socket: Path) -> Iterator[docker.DockerClient]:
    """The real daemon, as root, behind the gateway's back. Afterwards every container of
    the users, and every image the test made for them (named or not), is removed."""
    client = docker.DockerClient(base_url=f"unix://{docker_socket}")
    before = {image.id for image in client.images.list(all=True)}
    yield client
    for container in client.containers.list(all=True, filters={"label": "ds01.user"}):
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)
    for _attempt in range(3):  # children before their parents
        for image in client.images.list(all=True):
            ours = image.labels.get("ds01.user") in (ALICE, BOB) or any(
                t.startswith((f"{ALICE}/", f"{BOB}/", "hostile-")) for t in image.tags
            )
            if image.id not in before and ours:
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(image.id, force=True)
    client.close()


@contextlib.asynccontextmanager
async def clients(stack: AllocatorEnv, *users: str) -> AsyncIterator[list[Ds01Client]]:
    made = [stack.client(user) for user in users]
    try:
        yield made
    finally:
        for client in made:
            await client.close()


async def gateway(stack: AllocatorEnv, user: str, *requests: str) -> list[list[Answer]]:
    """Raw HTTP requests on the ds01 Docker gateway, as the Unix user ``user``."""
    return await raw_as(user, str(stack.config.ownership.proxy_socket), list(requests))


def tar_of(files: dict[str, str | bytes]) -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name, text in files.items():
            body = text.encode() if isinstance(text, str) else text
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(body), 0o644
            tar.addfile(info, io.BytesIO(body))
    return data.getvalue()


def build_request(tag: str, dockerfile: str) -> str:
    return request("POST", f"/build?t={tag}", raw_body=tar_of({"Dockerfile": dockerfile}),
                   headers={"Content-Type": "application/x-tar"})  # fmt: skip


def root_build(client: docker.DockerClient, dockerfile: str, **kwargs: Any) -> Any:
    """An image built as root on the daemon itself (no RUN: no network is needed)."""
    image, _ = client.images.build(fileobj=io.BytesIO(dockerfile.encode()), rm=True, **kwargs)
    return image


async def create(client: Ds01Client, name: str, image: str, **kwargs: Any) -> Any:
    """CreateContainer as the client's user: the container, or the Ds01Error."""
    try:
        return await client.create_container(name, image, **{"gpus": 0, **kwargs})
    except Ds01Error as err:
        return err


class Collector:
    """A server stream read in the background; a failure of it is its last item."""

    def __init__(self, stream: AsyncIterator[Any]) -> None:
        self.got: list[Any] = []
        self.task = asyncio.ensure_future(self._pump(stream))

    async def _pump(self, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                self.got.append(item)
        except Ds01Error as err:
            self.got.append(err)

    async def stop(self) -> list[Any]:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        return self.got


async def collect(stream: AsyncIterator[Any], seconds: float) -> list[Any]:
    """What a server stream sends within ``seconds``."""
    collector = Collector(stream)
    await asyncio.sleep(seconds)
    return await collector.stop()


async def until(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


async def fill_mig(bob: Ds01Client, test_image: str, names: tuple[str, ...]) -> list[str]:
    """Bob takes every MIG slice (three containers, one slice each); their slot ids."""
    slots = []
    for name in names:
        made = await bob.create_container(name, test_image, gpus=1, gpu_preference=MIG)
        slots += [g.slot.slot_id for g in made.gpus]
    return slots


# --- 3. the image check of container create ----------------------------------------------


@pytest.fixture
def bobs_image(daemon: docker.DockerClient, test_image: str) -> Any:
    """Bob's private image, as his build through the gateway would leave it: his
    namespace, his owner label, content of its own (a label of his)."""
    return root_build(daemon, f"FROM {test_image}\nLABEL secret=bobs\n",
                      tag=f"{BOB}/secret:1", labels={"ds01.user": BOB})  # fmt: skip


def _references(image_id: str) -> list[str]:
    hexa = image_id.removeprefix("sha256:")
    name = f"{BOB}/secret"
    return [
        f"{name}:1",
        f"docker.io/{name}:1",
        f"index.docker.io/{name}:1",
        f"docker.io/library/../{name}:1",
        f"localhost/{name}:1",
        "DS01BOB/secret:1",
        "Ds01bob/secret:1",
        f"ds01-{BOB}/secret:1",
        f"{name}:1@sha256:{hexa}",
        f"{name}@sha256:{hexa}",
        f"{ALICE}/anything@sha256:{hexa}",
        f"sha256:{hexa}",
        hexa,
        hexa[:12],
        hexa[:8],  # shorter than ds01's id rule: Docker still resolves it as a prefix
        hexa[:4],
        f"sha256:{hexa[:8]}",
        f"{hexa[:12]}:latest",
        f" {name}:1",
        f"{name}:1 ",
        f"{name}:1\n",
        f"{name}//secret:1",
    ]


async def test_no_reference_to_another_users_image_makes_a_container(
    stack: AllocatorEnv, daemon: docker.DockerClient, bobs_image: Any, test_image: str
):
    """Every spelling Docker might resolve to Bob's image: refused, or (for names Docker
    reads otherwise) never a container of Bob's image."""
    made_from_bobs = []
    async with clients(stack, ALICE) as (alice,):
        for n, reference in enumerate(_references(bobs_image.id)):
            answer = await create(alice, f"ref{n}", reference)
            if isinstance(answer, Ds01Error):
                assert "Traceback" not in answer.message
                continue
            container = daemon.containers.get(answer.docker_name)
            if container.attrs["Image"] == bobs_image.id:
                made_from_bobs.append(reference)
            await alice.remove_container(f"ref{n}")
    assert not made_from_bobs, f"containers from {BOB}'s image by: {made_from_bobs}"
    # The control: Alice's own image, by a short id prefix Docker resolves, is hers to use.
    mine = root_build(daemon, f"FROM {test_image}\nLABEL x=1\n",
                      tag=f"{ALICE}/own:1", labels={"ds01.user": ALICE})  # fmt: skip
    async with clients(stack, ALICE) as (alice,):
        made = await alice.create_container("ownref", mine.id.removeprefix("sha256:")[:8], gpus=0)
        assert daemon.containers.get(made.docker_name).attrs["Image"] == mine.id
        await alice.remove_container("ownref")


async def test_another_users_unnamed_and_labelled_images_stay_theirs(
    stack: AllocatorEnv, daemon: docker.DockerClient, test_image: str
):
    """An image of Bob's with no name (his build's intermediate, an old build whose name
    moved on) or with a shared-looking name and his label: not Alice's to run."""
    unnamed = root_build(daemon, f"FROM {test_image}\nLABEL unnamed=1\n",
                         labels={"ds01.user": BOB})  # fmt: skip
    labelled = root_build(daemon, f"FROM {test_image}\nLABEL labelled=1\n",
                          tag="hostile-shared:1", labels={"ds01.user": BOB})  # fmt: skip
    try:
        async with clients(stack, ALICE) as (alice,):
            for n, image in enumerate((unnamed, labelled)):
                hexa = image.id.removeprefix("sha256:")
                for m, reference in enumerate((image.id, hexa[:12], hexa[:7])):
                    answer = await create(alice, f"u{n}{m}", reference)
                    assert isinstance(answer, Ds01Error), (reference, answer)
            for m, name in enumerate(("hostile-shared:1", "library/hostile-shared:1",
                                      "docker.io/library/hostile-shared:1",
                                      "index.docker.io/library/hostile-shared:1")):  # fmt: skip
                answer = await create(alice, f"u9{m}", name)
                assert isinstance(answer, Ds01Error), (name, answer)
    finally:
        daemon.images.remove(unnamed.id, force=True)


async def test_a_name_checked_at_create_cannot_be_moved_to_another_users_image(
    stack: AllocatorEnv, daemon: docker.DockerClient, test_image: str, bobs_image: Any
):
    """TOCTOU: the image is checked, then the create may wait minutes for a GPU before
    Docker is asked. Meanwhile Alice tries, through the gateway, every way to point her
    checked name at Bob's image; the container must be made from what was checked."""
    mine = root_build(daemon, f"FROM {test_image}\nLABEL mine=1\n", tag=f"{ALICE}/app:1",
                      labels={"ds01.user": ALICE})  # fmt: skip
    hexa = bobs_image.id.removeprefix("sha256:")
    async with clients(stack, ALICE, BOB) as (alice, bob):
        await fill_mig(bob, test_image, ("f1", "f2", "f3"))
        waiting = asyncio.ensure_future(
            alice.create_container(
                "late", f"{ALICE}/app:1", gpus=1, gpu_preference=MIG, gpu_wait=30
            )
        )
        await asyncio.sleep(1.5)
        assert not waiting.done(), waiting
        tags = [f"{BOB}/secret:1", bobs_image.id, hexa[:12], hexa[:8]]
        answers = await gateway(stack, ALICE, *[
            request("POST", f"/images/{ref}/tag?repo={ALICE}/app&tag=1") for ref in tags
        ], build_request(f"{ALICE}/app:1", f"FROM {BOB}/secret:1\n"),
           build_request(f"{ALICE}/app:1", f"FROM {hexa[:12]}\n"))  # fmt: skip
        assert all(a[0].status in (403, 404) for a in answers), answers
        await bob.remove_container("f2")
        made = await asyncio.wait_for(waiting, 30)
        image = daemon.containers.get(made.docker_name).attrs["Image"]
        assert image == mine.id, "the container is not of the image that was checked"
        for name in ("f1", "f3"):
            await bob.remove_container(name)
        await alice.remove_container("late")


async def test_the_create_makes_the_container_from_the_image_it_checked(
    stack: AllocatorEnv, daemon: docker.DockerClient, test_image: str
):
    """The check and Docker's create must agree on the image: Docker resolves the name
    again after the GPU wait, so a name moved meanwhile (Alice moves her own: the gateway
    lets her, both images are hers) must not give a container of an unchecked image. The
    create is refused, says why, and leaves nothing behind."""
    checked = root_build(daemon, f"FROM {test_image}\nLABEL v=1\n", tag=f"{ALICE}/moving:1",
                         labels={"ds01.user": ALICE})  # fmt: skip
    async with clients(stack, ALICE, BOB) as (alice, bob):
        await fill_mig(bob, test_image, ("g1", "g2", "g3"))
        waiting = asyncio.ensure_future(
            create(alice, "moved", f"{ALICE}/moving:1", gpus=1, gpu_preference=MIG,
                   gpu_wait=30)
        )  # fmt: skip
        await asyncio.sleep(1.5)
        (built,) = await gateway(stack, ALICE, build_request(
            f"{ALICE}/moving:1", f"FROM {test_image}\nENV V=2\n"))  # fmt: skip
        assert built[0].status == 200 and "Successfully tagged" in built[0].body, built
        await bob.remove_container("g2")
        made = await asyncio.wait_for(waiting, 30)
        try:
            if isinstance(made, Ds01Error):
                assert made.code == grpc.StatusCode.FAILED_PRECONDITION, made
                assert "changed while this create waited" in made.message, made.message
                left = daemon.containers.list(all=True, filters={"name": "moved._."})
                assert left == [], left
            else:
                image = daemon.containers.get(made.docker_name).attrs["Image"]
                assert image == checked.id, "the name was resolved again after the check"
        finally:
            for name in ("g1", "g3"):
                await bob.remove_container(name)
            if not isinstance(made, Ds01Error):
                await alice.remove_container("moved")


@pytest.mark.parametrize(
    "reference",
    ["Ds01alice/proj:1", "docker.io/library/../x", " ubuntu", "ubuntu:", "a//b", "x@sha256:zz",
     "ubuntu:\ttab", "-x", "x" * 256],
)  # fmt: skip
async def test_an_image_name_docker_would_not_read_is_refused_as_such(
    stack: AllocatorEnv, daemon: docker.DockerClient, reference: str
):
    """What the gateway's name rules refuse, create refuses before Docker reads it: an
    invalid argument that says so, never a failure of Docker's, and nothing left."""
    async with clients(stack, ALICE) as (alice,):
        made = await create(alice, "odd", reference)
    assert isinstance(made, Ds01Error), made
    assert made.code == grpc.StatusCode.INVALID_ARGUMENT, made
    assert "is not a valid image name" in made.message, made.message
    assert daemon.containers.list(all=True, filters={"name": "odd._."}) == []


# --- labels an image brings into a container of ds01 ------------------------------------


async def _image_with_gateway_label(stack: AllocatorEnv, how: str, test_image: str,
                                    daemon: docker.DockerClient) -> str:  # fmt: skip
    """An image of Alice's whose config says ds01.gateway=true, made by Alice herself
    through the gateway (commit, ONBUILD, load); its name."""
    name = f"{ALICE}/gw-{how}:1"
    if how == "commit":  # her own gateway container, committed: its labels come along
        answers = await gateway(stack, ALICE,
            request("POST", "/containers/create?name=gwsrc",
                    {"Image": test_image, "Cmd": ["true"], "HostConfig": {"NetworkMode": "none"}}),
            request("POST", f"/commit?container=gwsrc&repo={ALICE}/gw-commit&tag=1"),
            request("DELETE", "/containers/gwsrc?force=1"))  # fmt: skip
        assert answers[1][0].status == 201, answers
    elif how == "onbuild":  # a base image whose trigger sets the label in the next build
        answers = await gateway(stack, ALICE,
            build_request(f"{ALICE}/gw-base:1", f"FROM {test_image}\n"
                          "ONBUILD LABEL ds01.gateway=true ds01.protected=true\n"),
            build_request(name, f"FROM {ALICE}/gw-base:1\n"))  # fmt: skip
        assert all("Successfully tagged" in a[0].body for a in answers), answers
    else:  # a docker save of an image with that label, loaded under her name
        made = root_build(daemon, f"FROM {test_image}\nLABEL loaded=1\n", tag=name,
                          labels={"ds01.gateway": "true"})  # fmt: skip
        archive = b"".join(made.save(named=True))
        daemon.images.remove(made.id, force=True)
        (loaded,) = await gateway(stack, ALICE, request(
            "POST", "/images/load?quiet=1", raw_body=archive,
            headers={"Content-Type": "application/x-tar"}))  # fmt: skip
        assert loaded[0].status == 200 and "Permission denied" not in loaded[0].body, loaded
    labels = daemon.images.get(name).labels
    assert labels.get("ds01.gateway") == "true", labels
    return name


@pytest.mark.parametrize("how", ["commit", "onbuild", "load"])
async def test_a_ds01_container_never_takes_the_gateway_mark_from_its_image(
    stack: AllocatorEnv, daemon: docker.DockerClient, test_image: str, how: str
):
    """ds01.gateway=true tells the gateway and the reconciler "made through the gateway:
    no GPU of ds01's". A container the containers service makes (with GPUs) must never
    carry it, whatever labels its image has."""
    image = await _image_with_gateway_label(stack, how, test_image, daemon)
    async with clients(stack, ALICE) as (alice,):
        made = await alice.create_container(f"lbl-{how}", image, gpus=0)
        try:
            labels = daemon.containers.get(made.docker_name).labels
            taken = {k: v for k, v in labels.items() if k in ("ds01.gateway", "ds01.protected")}
            assert not [v for v in taken.values() if v == "true"], (
                f"the container of {image} carries {taken} from its image"
            )
        finally:
            await alice.remove_container(f"lbl-{how}")


@pytest.mark.parametrize("how", ["plain_image_control", "commit"])
async def test_a_stopped_containers_gpu_given_to_another_is_not_used_again(
    stack: AllocatorEnv, daemon: docker.DockerClient, test_image: str, how: str
):
    """Alice runs a ds01 container with a MIG slice (from the shared test image, or from
    her own committed image), stops it, and its hold ends; Bob gets the slice. Starting
    hers again must be refused by ds01 and by the gateway alike: its environment still
    names Bob's slice."""
    image = (
        test_image
        if how == "plain_image_control"
        else await _image_with_gateway_label(stack, how, test_image, daemon)
    )
    async with clients(stack, ALICE, BOB) as (alice, bob):
        made = await alice.create_container("gpujob", image, gpus=1, gpu_preference=MIG,
                                            start=True)  # fmt: skip
        [slot] = [g.slot for g in made.gpus]
        await alice.stop_container("gpujob")

        async def hold_ended() -> bool:
            status = await alice.gpu_status(user=ALICE)
            return not any(a.user == ALICE for a in status.allocations)

        await until(hold_ended, HOLD + 8, "the hold of the stopped container never ended")
        bobs = await fill_mig(bob, test_image, ("h1", "h2", "h3"))
        assert slot.slot_id in bobs
        try:
            with pytest.raises(Ds01Error):
                await alice.start_container("gpujob")  # ds01 itself checks the slot
            (started,) = await gateway(
                stack, ALICE, request("POST", f"/containers/{made.docker_name}/start")
            )
            env = daemon.containers.get(made.docker_name).attrs["Config"]["Env"]
            assert started[0].status == 403, (
                f"docker start through the gateway ran {made.docker_name} again (status "
                f"{started[0].status}) with {[e for e in env if 'VISIBLE' in e]}: "
                f"{slot.uuid} is now held by {BOB}"
            )
        finally:
            for name in ("h1", "h2", "h3"):
                await bob.remove_container(name)
            await alice.remove_container("gpujob")


# --- 1 and 2. the GPU queue, --gpus all, default requests, drains -----------------------


# (slots sent, as_many) of each waiting Allocate call mallory makes for a node that never
# comes up: it stays queued until its deadline, counted as waiting for what it says.
WAITERS = {
    "one_gpus_all_waiter_control": [(0, True)],
    "one_gpus_all_waiter_claiming_1000": [(1000, True)],
    "three_plain_waiters": [(1, False)] * 3,
}


@pytest.mark.parametrize("waiters", WAITERS.values(), ids=WAITERS.keys())
async def test_waiters_for_a_node_that_never_comes_do_not_block_everyone_else(
    stack: AllocatorEnv, waiters: list[tuple[int, bool]]
):
    """A request that waits for a node that is not there can never be served; it must not
    turn away same-priority requests for the free slices of the node that is. A --gpus all
    waiter (as_many_as_allowed) is counted by the slots it was sent, which as_many
    otherwise ignores: the cap makes it wait for one at most. Mallory and Carol need no
    account: the allocator serves any user with a certificate."""
    async with clients(stack, "mallory", "carol", ALICE) as (mallory, carol, alice):

        def wait(n: int, slots: int, as_many: bool) -> asyncio.Future[Any]:
            call = mallory.allocate(
                f"w{n}._.mallory", slots=slots, as_many=as_many, node="nowhere", wait_seconds=60
            )
            return asyncio.ensure_future(call)

        queued = [wait(n, slots, as_many) for n, (slots, as_many) in enumerate(waiters)]
        try:
            await asyncio.sleep(1.0)
            assert not any(w.done() for w in queued), queued
            queue = (await alice.gpu_queue()).waiters
            try:
                granted = await carol.allocate("c._.carol", slots=1, preference=MIG, node="n1")
            except Ds01Error as err:
                pytest.fail(
                    f"with 3 slices free, carol was refused: {err.message} (the queue: "
                    f"{[(w.user, w.node, w.slots) for w in queue]})"
                )
            assert len(granted.allocations) == 1
            await carol.release("c._.carol")
            assert all(w.slots == 1 for w in queue), queue  # the cap: one slice each
        finally:
            for waiting in queued:
                waiting.cancel()
                with contextlib.suppress(BaseException):
                    await waiting

        async def empty() -> bool:
            return not (await alice.gpu_queue()).waiters

        # Gone when their calls are: long before their deadline (60 s).
        await until(empty, 5, "the cancelled waiters stayed in the queue")


async def test_a_gpus_all_create_waits_for_what_the_cap_allows_not_what_it_says(
    stack: AllocatorEnv, test_image: str
):
    """The same through CreateContainer: all_gpus with gpus=1000 (the CLI never sends
    both, a user's own gRPC call may) queues for one slice (the cap) and gets one."""
    async with clients(stack, ALICE, BOB) as (alice, bob):
        await fill_mig(bob, test_image, ("q1", "q2", "q3"))
        waiting = asyncio.ensure_future(
            alice.create_container(
                "all", test_image, gpus=1000, all_gpus=True, gpu_preference=MIG, gpu_wait=20
            )
        )
        try:
            await asyncio.sleep(1.5)
            queue = (await bob.gpu_queue()).waiters
            assert [(w.user, w.container, w.slots) for w in queue] == [(ALICE, "", 1)], queue
            await bob.remove_container("q2")
            made = await asyncio.wait_for(waiting, 20)
            assert len(made.gpus) == 1
        finally:
            waiting.cancel()
            with contextlib.suppress(BaseException):
                await waiting
            for name in ("q1", "q3"):
                await bob.remove_container(name)
            with contextlib.suppress(Ds01Error):
                await alice.remove_container("all")


async def _give_up_by_cancel(stack: AllocatorEnv, image: str, queued: Any) -> None:
    async with clients(stack, ALICE) as (alice,):
        call = alice.create_container("late", image, gpus=1, gpu_preference=MIG, gpu_wait=600)
        waiting = asyncio.ensure_future(call)
        await queued()
        waiting.cancel()
        with contextlib.suppress(BaseException):
            await waiting


async def _give_up_by_ctrl_c(stack: AllocatorEnv, image: str, queued: Any, tty: bool) -> None:
    args = ("container", "create", "late", "--image", image, "--mig", "--wait", "10m")
    interrupt = ("timeout", "--preserve-status", "-s", "INT", "6")
    running = asyncio.ensure_future(ds01_as(stack, ALICE, *args, tty=tty, within=interrupt))
    await queued()  # well before the interrupt
    done = await running
    said = done.stdout + done.stderr
    assert done.returncode == 130 and "ds01: error: interrupted" in said, done
    assert "Traceback" not in said, done


GIVING_UP = {
    "grpc_call_cancelled": _give_up_by_cancel,
    "ctrl_c_in_a_pipe": lambda *args: _give_up_by_ctrl_c(*args, tty=False),
    "ctrl_c_on_a_terminal": lambda *args: _give_up_by_ctrl_c(*args, tty=True),
}


@pytest.mark.parametrize("give_up", GIVING_UP.values(), ids=GIVING_UP.keys())
async def test_a_create_whose_caller_gives_up_waiting_makes_nothing(
    stack: AllocatorEnv, test_image: str, give_up: Any
):
    """Alice waits for a slice and gives up. Her create leaves the queue at once (not at
    its deadline) and leaves nothing: when a slice frees later it is not taken for a
    container she no longer wants, and no create of hers stays in progress."""
    async with clients(stack, ALICE, BOB, "root") as (alice, bob, admin):
        await fill_mig(bob, test_image, ("g1", "g2", "g3"))
        try:

            async def waiters() -> list[str]:
                return [w.user for w in (await bob.gpu_queue()).waiters]

            async def queued() -> None:
                async def alice_waits() -> bool:
                    return ALICE in await waiters()

                await until(alice_waits, 10, "alice's create never reached the GPU queue")

            await give_up(stack, test_image, queued)

            async def queue_empty() -> bool:
                return not await waiters()

            await until(queue_empty, 5, "alice's abandoned create stayed in the GPU queue")
            await bob.remove_container("g2")
            await asyncio.sleep(2.0)
            status = await admin.gpu_status()  # (others' holders are not shown to bob)
            assert [a.user for a in status.allocations if a.user] == [BOB] * 2, status
            mine = await alice.list_containers()
            assert not mine, [(c.name, c.notice) for c in mine]
            # and her next create is served at once, not told one is in progress
            made = await alice.create_container("next", test_image, gpus=1, gpu_preference=MIG)
            assert len(made.gpus) == 1
            await alice.remove_container("next")
        finally:
            for name in ("g1", "g3"):
                await bob.remove_container(name)


async def test_the_gateway_keeps_a_waiting_creates_name_for_it(
    stack: AllocatorEnv, test_image: str
):
    """While alice's create of `late` waits for a GPU, no docker create or rename through
    the gateway may take its name: the reconciler can neither adopt such a container
    (the create holds the name) nor hold it to the policies, for as long as the create
    waits. Once the create is given up, the name is free again."""
    name = f"late._.{ALICE}"
    body = {"Image": test_image, "Cmd": ["true"], "HostConfig": {"NetworkMode": "none"}}
    async with clients(stack, ALICE, BOB) as (alice, bob):
        await fill_mig(bob, test_image, ("h1", "h2", "h3"))
        call = alice.create_container("late", test_image, gpus=1, gpu_preference=MIG, gpu_wait=600)
        waiting = asyncio.ensure_future(call)
        try:

            async def queued() -> bool:
                return bool((await alice.gpu_queue()).waiters)

            await until(queued, 10, "alice's create never reached the GPU queue")
            answers = await gateway(stack, ALICE,
                request("POST", f"/containers/create?name={name}", body),
                request("POST", f"/containers/create?name=/{name}", body),
                request("POST", "/containers/create?name=other", body),
                request("POST", f"/containers/other/rename?name={name}"),
                request("DELETE", "/containers/other?force=1"))  # fmt: skip
            refused = [a[0] for a in answers[:2]] + [answers[3][0]]
            assert all(a.status == 403 and "ds01 is creating" in a.body for a in refused), answers
            assert answers[2][0].status == 201 and answers[4][0].status == 204, answers
        finally:
            waiting.cancel()
            with contextlib.suppress(BaseException):
                await waiting
            for container in ("h1", "h2", "h3"):
                await bob.remove_container(container)

        async def free() -> bool:
            return not (await alice.list_containers()) and not (await alice.gpu_queue()).waiters

        await until(free, 5, "alice's create was not given up")
        (made, removed) = await gateway(stack, ALICE,
            request("POST", f"/containers/create?name={name}", body),
            request("DELETE", f"/containers/{name}?force=1"))  # fmt: skip
        assert made[0].status == 201 and removed[0].status == 204, (made, removed)


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.2])
async def test_a_waiter_that_leaves_as_its_slice_frees_keeps_nothing(
    stack: AllocatorEnv, test_image: str, delay: float
):
    """The waiting call is cancelled ``delay`` s after a slice starts to free: before,
    while or after its claim lands. Either the call got the slice (and says so) or the
    slice is not held for it: a claim its caller never received is given back. One case
    no server can tell apart: its answer, sent, crossing the cancel on the wire. A slice
    claimed before the cancel was sent may then stay held; one claimed after it, never.
    The allocation is for a container that exists (made without a GPU), so that the
    node's reconciler, which frees what containers that do not exist hold, leaves it be."""
    async with clients(stack, ALICE, BOB, "root") as (alice, bob, admin):
        await fill_mig(bob, test_image, ("s1", "s2", "s3"))
        await alice.create_container("late", test_image, gpus=0)
        name = f"late._.{ALICE}"
        try:
            call = alice.allocate(name, preference=MIG, node="n1", wait_seconds=60)
            waiting = asyncio.ensure_future(call)
            await asyncio.sleep(1.0)
            freeing = asyncio.ensure_future(bob.remove_container("s2"))
            await asyncio.sleep(delay)
            cancelled_at = time.time()
            waiting.cancel()
            await freeing
            got = None
            with contextlib.suppress(BaseException):
                got = await waiting
            await asyncio.sleep(1.5)  # a cancel swallowed is sent again within 0.5 s
            held = [a for a in (await admin.gpu_status()).allocations if a.container == name]
            if got is not None:
                assert len(held) == len(got.allocations), (got, held)
            else:
                since = [a.since.seconds + a.since.nanos / 1e9 for a in held]
                assert all(claimed < cancelled_at for claimed in since), (cancelled_at, held)
        finally:
            with contextlib.suppress(Ds01Error):
                await admin.release(name)
            await alice.remove_container("late")
            for container in ("s1", "s3"):
                await bob.remove_container(container)


async def test_gpu_requests_stay_within_the_users_own_limits(stack: AllocatorEnv, test_image: str):
    async with clients(stack, ALICE, BOB) as (alice, bob):
        refused = [
            await create(alice, "neg", test_image, gpus=-1),
            await create(alice, "negall", test_image, gpus=-1, all_gpus=True),
            await create(alice, "full", test_image, all_gpus=True, gpu_preference=FULL),
            await create(alice, "bad", test_image, all_gpus=True, gpu_preference=7),
        ]
        assert all(isinstance(r, Ds01Error) for r in refused), refused
        for call in (
            alice.allocate(f"x._.{BOB}", user=BOB, as_many=True),  # for another user
            alice.allocate(f"x._.{BOB}", as_many=True),  # a name that is another's
            alice.allocate(f"x._.{ALICE}", as_many=True, slot_ids=("2:1",), node="n1"),
            alice.allocate(f"x._.{ALICE}", as_many=True, slots=-1),
        ):
            with pytest.raises(Ds01Error):
                await call
        # --gpus all is the cap (one slice), whatever the free slots
        made = await alice.create_container("cap", test_image, all_gpus=True)
        assert len(made.gpus) == 1
        status = await bob.gpu_status()
        assert not [a for a in status.allocations if a.user and a.user != ALICE]
        assert sum(a.user == ALICE for a in status.allocations) == 1
        await alice.remove_container("cap")


async def test_only_admins_drain_and_a_drain_shows_no_ones_container(
    stack: AllocatorEnv, test_image: str
):
    async with clients(stack, ALICE, BOB, "root") as (alice, bob, root):
        await bob.create_container("held", test_image, gpus=1, gpu_preference=MIG)
        try:
            for call in (
                alice.drain("n1"),
                alice.drain("n1", 2, "mine now"),
                alice.undrain("n1"),
                alice.drain("nowhere"),
            ):
                with pytest.raises(Ds01Error) as refused:
                    await call
                assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
                assert "held" not in refused.value.message
            drained = await root.drain("n1", 2, "maintenance")
            assert drained.drain.by == "root"
            shown = await alice.gpu_status()
            assert [d.node for d in shown.drains] == ["n1"]
            assert "held._." not in str(shown)
            with pytest.raises(Ds01Error):  # and no user gets a drained slice
                await alice.allocate(f"d._.{ALICE}", preference=MIG, node="n1")
        finally:
            await root.undrain("n1", 2)
            await bob.remove_container("held")


# --- 6. what others see: top, queue, status, event streams -------------------------------


async def test_top_queue_status_and_streams_show_no_other_users_container_names(
    stack: AllocatorEnv, test_image: str, etcd_endpoint: str
):
    since = await etcd_revision(etcd_endpoint, stack.pki)
    secret = "zebrafish"  # in every container name of Bob's
    async with clients(stack, ALICE, BOB) as (alice, bob):
        alice_allocs = Collector(alice.watch_allocations())
        alice_events = Collector(alice.watch_container_events())
        await asyncio.sleep(0.5)
        # Two slices for Bob, the third for Alice: Bob's quota has room for a waiting one.
        await fill_mig(bob, test_image, tuple(f"{secret}{n}" for n in range(2)))
        await alice.create_container("mine", test_image, gpus=1, gpu_preference=MIG)
        waiting = asyncio.ensure_future(
            bob.create_container(
                f"{secret}-wait", test_image, gpus=1, gpu_preference=MIG, gpu_wait=20
            )
        )
        await asyncio.sleep(1.5)
        await bob.stop_container(f"{secret}1")
        seen: dict[str, str] = {}
        for args in (["top", "-o", "json"], ["gpu", "queue", "-o", "json"],
                     ["gpu", "status", "-o", "json"], ["gpu", "queue"], ["gpu", "status"],
                     ["container", "ls", "-o", "json"], ["usage", "-o", "json"]):  # fmt: skip
            done = await stack.cli(ALICE, *args)
            seen[" ".join(args)] = done.stdout + done.stderr
        seen["ListWaiters"] = str(await alice.gpu_queue())
        seen["GetStatus(user=bob)"] = str(await alice.gpu_status(user=BOB))
        seen["WatchAllocations replay"] = str(await collect(alice.watch_allocations(since), 1.5))
        seen["WatchContainerEvents replay"] = str(
            await collect(alice.watch_container_events(since), 1.5)
        )
        denied = await collect(alice.watch_container_events(since, user=BOB), 1.5)
        assert denied and isinstance(denied[-1], Ds01Error), denied
        for call in (alice.list_containers(user=BOB), alice.list_containers(all_users=True)):
            with pytest.raises(Ds01Error):
                await call
        await alice.remove_container("mine")
        await asyncio.wait_for(waiting, 20)
        await asyncio.sleep(1)
        seen["WatchAllocations live"] = str(await alice_allocs.stop())
        seen["WatchContainerEvents live"] = str(await alice_events.stop())
        for name in (f"{secret}0", f"{secret}1", f"{secret}-wait"):
            await bob.remove_container(name)
    leaks = sorted(where for where, text in seen.items() if secret in text)
    assert not leaks, f"{BOB}'s container names shown to {ALICE} in: {leaks}"
    assert BOB in seen["ListWaiters"] or BOB in seen["gpu queue -o json"]  # who waits: shown


admin_stack = full_stack_fixture(LIMITS + f"access_control:\n  admin_users: [root, {ALICE}]\n")


async def test_an_admin_removed_sees_nothing_more_of_others_on_streams_opened_before(
    admin_stack: AllocatorEnv, test_image: str, etcd_endpoint: str
):
    """Rights are checked as a call starts, and a stream stays open for days (its pings
    keep it so): an admin removed from the configuration kept every user's allocations,
    container events, limits changes and container owners on each stream opened while
    they were one.
    Each of them, live or replaying, of everyone or of one other user, now ends
    PERMISSION_DENIED and shows nothing of another's made after the removal."""
    stack, secret = admin_stack, "zebrafish"
    since = await etcd_revision(etcd_endpoint, stack.pki)
    async with clients(stack, ALICE, BOB) as (alice, bob):
        collectors = {
            "WatchAllocations live": Collector(alice.watch_allocations()),
            "WatchAllocations replay": Collector(alice.watch_allocations(since)),
            "WatchContainerEvents live": Collector(alice.watch_container_events()),
            "WatchContainerEvents replay": Collector(alice.watch_container_events(since)),
            "WatchContainerEvents of bob": Collector(alice.watch_container_events(user=BOB)),
            "WatchLimits of everyone": Collector(alice.watch_limits()),
            "WatchLimits of bob": Collector(alice.watch_limits(BOB)),
            "WatchOwners": Collector(alice.watch_owners()),
        }
        await asyncio.sleep(0.5)
        await bob.create_container("before", test_image, gpus=1, gpu_preference=MIG)
        try:

            async def shown_as_admin() -> bool:
                return all(
                    "before" in str(c.got) for k, c in collectors.items() if "Limits" not in k
                )

            await until(shown_as_admin, 10, "an admin's streams to show bob's container")
            stack.config.limits_file.write_text(LIMITS)  # alice is an admin no more

            async def removed() -> bool:
                return not (await alice.get_limits()).admin

            await until(removed, 10, "the edit to apply")
            await bob.create_container(secret, test_image, gpus=1, gpu_preference=MIG)
            await asyncio.sleep(1.5)
            for name, collector in collectors.items():
                got = await collector.stop()
                assert secret not in str(got), f"{name} showed bob's container to a non-admin"
                ended = got[-1] if got else None
                assert isinstance(ended, Ds01Error), f"{name} stayed open: {got}"
                assert ended.code == grpc.StatusCode.PERMISSION_DENIED, (name, ended)
                assert "no longer an admin" in ended.message
        finally:
            for name in ("before", secret):
                with contextlib.suppress(Ds01Error):
                    await bob.remove_container(name)


# One Docker API connection kept open as a Unix user: ``list`` lists every container on
# each line read from stdin; ``events`` follows /events. Each answer is a JSON line.
HELD = r"""
import http.client, json, socket, sys
class Unix(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("docker", timeout=60)
        self.unix_path, self.auto_open = path, 0  # never a second connection
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.unix_path)
def say(item):
    print(json.dumps(item), flush=True)
connection = Unix(sys.argv[1])
connection.connect()
try:
    if sys.argv[2] == "list":
        for _ in sys.stdin:
            connection.request("GET", "/containers/json?all=1")
            answer = connection.getresponse()
            say({"names": [n for c in json.loads(answer.read()) for n in c["Names"]]})
    else:
        connection.request("GET", "/events")
        answer = connection.getresponse()
        say({"status": answer.status})
        for line in answer:
            say({"event": line.decode()})
    say({"closed": "at its end"})
except Exception as err:
    say({"closed": repr(err)})
"""


async def held_connection(user: str, socket: str, mode: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "runuser", "-u", user, "--", "/usr/bin/python3", "-c", HELD, socket, mode,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


async def said(process: asyncio.subprocess.Process) -> dict[str, Any]:
    assert process.stdout is not None
    return json.loads(await asyncio.wait_for(process.stdout.readline(), 20))


async def test_an_admin_removed_keeps_no_docker_connection_opened_as_one(
    admin_stack: AllocatorEnv, test_image: str, monkeypatch: pytest.MonkeyPatch
):
    """An admin's connection to the Docker gateway passes every request unchanged (the
    daemon's whole API: root on the host), and was decided once, as it opened: a
    removed admin who kept one open kept all of it, a stream of everyone's events
    included. It is closed once they are no admin (asked every 5 s; 0.3 s here), so
    neither a next request on it nor its stream shows anything more."""
    monkeypatch.setattr(relay_module, "ADMIN_RECHECK", 0.3)
    stack, secret = admin_stack, "zebrafish"
    socket = str(stack.config.ownership.proxy_socket)
    async with clients(stack, ALICE, BOB) as (alice, bob):
        await bob.create_container("before", test_image, gpus=0)
        lister = await held_connection(ALICE, socket, "list")
        events = await held_connection(ALICE, socket, "events")
        assert lister.stdin is not None
        try:
            lister.stdin.write(b"\n")
            assert any("before._." in name for name in (await said(lister))["names"])
            assert (await said(events))["status"] == 200
            stack.config.limits_file.write_text(LIMITS)  # alice is an admin no more

            async def removed() -> bool:
                return not (await alice.get_limits()).admin

            await until(removed, 10, "the edit to apply")
            await asyncio.sleep(1.5)  # a recheck or more after the edit
            await bob.create_container(secret, test_image, gpus=0)
            lister.stdin.write(b"\n")
            after = await said(lister)
            assert "closed" in after and secret not in str(after), after
            followed = [await said(events)]
            while "closed" not in followed[-1]:
                followed.append(await said(events))
            assert secret not in str(followed), followed
        finally:
            for process in (lister, events):  # runuser and the client it runs
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
            for name in ("before", secret):
                with contextlib.suppress(Ds01Error):
                    await bob.remove_container(name)


# --- 5. GetDockerArgs with a caller's DockerInfo ----------------------------------------


async def test_a_callers_docker_info_changes_nothing_but_their_own_answer(
    stack: AllocatorEnv, daemon: docker.DockerClient, test_image: str
):
    real = DockerInfo.of(daemon.info())
    hostile = [
        DockerInfo(-5, "cgroupfs"),
        DockerInfo(0, "systemd"),
        DockerInfo(2**31 - 1, ""),
        DockerInfo(1, "../../../../sys/fs/cgroup"),
        DockerInfo(64, "systemd\n--privileged"),
    ]
    async with clients(stack, ALICE, BOB) as (alice, bob):
        before = {u: await c.get_docker_args(docker=real) for u, c in ((ALICE, alice), (BOB, bob))}
        for info in hostile:
            with contextlib.suppress(Ds01Error):
                await alice.get_docker_args(docker=info)
            for other in (BOB, "root"):
                with pytest.raises(Ds01Error) as refused:
                    await alice.get_docker_args(other, docker=info)
                assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        after = {u: await c.get_docker_args(docker=real) for u, c in ((ALICE, alice), (BOB, bob))}
        assert after == before
        expected = before[ALICE]
        # The containers service and the gateway ask Docker themselves.
        made = await alice.create_container("dargs", test_image, gpus=0)
        (gw,) = await gateway(stack, ALICE, request(
            "POST", "/containers/create?name=dargs-gw",
            {"Image": test_image, "Cmd": ["true"],
             "HostConfig": {"NetworkMode": "none"}}))  # fmt: skip
        assert gw[0].status == 201, gw
        try:
            for name in (made.docker_name, "dargs-gw"):
                host = daemon.containers.get(name).attrs["HostConfig"]
                got = (host["NanoCpus"], host["Memory"], host["PidsLimit"], host["CgroupParent"])
                want = (nano_cpus(expected.cpus), expected.memory_bytes, expected.pids_limit,
                        expected.cgroup_parent)  # fmt: skip
                assert got == want, (name, got)
        finally:
            await alice.remove_container("dargs")
            daemon.containers.get("dargs-gw").remove(force=True)


# --- 4. ds01 image: the CLI runs as the user, the gateway decides ------------------------


async def test_ds01_image_build_reads_nothing_the_user_cannot(
    stack: AllocatorEnv, daemon: docker.DockerClient, test_image: str
):
    context = Path(f"/home/{ALICE}/hostilectx")
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {test_image}\nCOPY leak /leak\n")
    (context / "leak").symlink_to("/etc/shadow")
    for item in (context, context / "Dockerfile"):
        shutil.chown(item, ALICE, GROUP)
    try:
        by_file = await ds01_as(stack, ALICE, "image", "build", "x", str(context),
                                "-f", "/etc/shadow")  # fmt: skip
        assert by_file.returncode != 0 and "root:" not in by_file.stdout + by_file.stderr
        linked = await ds01_as(stack, ALICE, "image", "build", "leaky", str(context))
        if linked.returncode == 0:
            box = daemon.containers.create(f"{ALICE}/leaky:latest", network_mode="none")
            try:
                stream, _ = box.get_archive("/leak")
                content = b"".join(stream)
            finally:
                box.remove(force=True)
            assert b"root:" not in content, "the image holds the host's /etc/shadow"
        # Bob's ds01 image commands never reach or show Alice's things.
        mine = root_build(daemon, f"FROM {test_image}\nLABEL a=1\n", tag=f"{ALICE}/p:1",
                          labels={"ds01.user": ALICE})  # fmt: skip
        hexa = mine.id.removeprefix("sha256:")
        targets = (["-f", hexa[:12]], [f"{ALICE}/p:1"], [f"docker.io/{ALICE}/p:1"],
                   ["-f", mine.id])  # fmt: skip
        for args in (["image", "rm", *target] for target in targets):
            done = await ds01_as(stack, BOB, *args)
            assert done.returncode == 1, (args, done.stdout)
        listed = await ds01_as(stack, BOB, "image", "ls", "--all", "-o", "json")
        assert ALICE not in listed.stdout and hexa[:12] not in listed.stdout
        assert daemon.images.get(mine.id).tags == [f"{ALICE}/p:1"]
    finally:
        shutil.rmtree(context, ignore_errors=True)


def test_the_cli_is_not_privileged():
    """``ds01`` and its interpreter run with the user's own rights: no setuid or setgid
    bit, no file capabilities (only the gateway decides what a user's Docker call may do)."""
    bin_dir = Path(__file__).resolve().parent.parent / ".venv" / "bin"
    for path in (bin_dir / "ds01", (bin_dir / "python").resolve()):
        assert not path.stat().st_mode & 0o6000, path
        if shutil.which("getcap"):
            caps = subprocess.run(["getcap", str(path)], capture_output=True, text=True)
            assert not caps.stdout.strip(), caps.stdout
