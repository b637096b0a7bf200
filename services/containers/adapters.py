"""The containers service's adapters: Docker (the calls of every start, stop and remove
asked of its API directly, the rest through the SDK in a worker thread), host accounts,
container metadata in etcd, and per-user cgroups on cgroupfs."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import io
import logging
import pwd
import re
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
import docker
import docker.errors
from docker.models.containers import Container
from docker.transport.unixconn import UnixHTTPAdapter

from ds01.containers.spec import Account, named_accounts
from ds01.core.docker_api import Daemon, Reply, container_path, image_path
from ds01.core.docker_args import DockerInfo
from ds01.core.faults import fault_point
from ds01.core.processes import docker_answers
from ds01.core.records import JsonRecord
from ds01.core.server import WORKER_THREADS

log = logging.getLogger(__name__)

METADATA = "/ds01/v1/containers/"
INFO_SECONDS = 60.0
CALL_SECONDS = 120.0  # a Docker call that takes longer (a stop, beyond its grace) is stuck
DOCKER_REFERENCE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")  # a container's name or id
MODIFY_ATTEMPTS = 5  # optimistic writes of one record that lost to another writer
IMAGES_REMEMBERED = 64  # images whose /etc/passwd and /etc/group are kept
# An image's /etc/passwd or /etc/group past this size is not read (its users stay
# unnamed): a thousand accounts take about 60 KiB.
ACCOUNT_FILE_BYTES = 1 << 20
# Connections to dockerd: one for each thread a call may run in, and the event stream's.
POOL_SIZE = WORKER_THREADS + 1
INTENTS = "/ds01/v1/intents/"  # creates in progress, written ahead of every step
# A copy of each record under its user, written in the same transaction as the record:
# a user's list and create read that user's records alone, not the fleet's.
BY_USER = "/ds01/v1/containers-by-user/"


class NoAccount(LookupError):
    pass


class DockerUnavailable(ConnectionError):
    pass


def host_account(user: str) -> Account:
    """The user's uid, gid, group name and home on this host."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise NoAccount(f"{user} has no account on this host") from None
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = user
    return Account(user, entry.pw_uid, entry.pw_gid, group, Path(entry.pw_dir))


class SocketAdapter(UnixHTTPAdapter):
    """One connection pool for dockerd's socket. docker-py keeps a pool for each request's
    whole URL, and only 25 of them: with more containers than that in turn (a sweep,
    fifty users' creates) each call opened a new connection to dockerd and closed one."""

    def get_connection(self, url: str, proxies: Any = None) -> Any:
        return super().get_connection("http+docker://localhost", proxies)


class DockerHost:
    """Docker: the calls of every start, stop and remove asked of its API directly (see
    core/docker_api.py), the others through the SDK, called from a worker thread so the
    event loop never blocks."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.daemon = Daemon.at(base_url)
        self._client: docker.DockerClient | None = None
        self._connecting = asyncio.Lock()
        self._info_cache: tuple[float, dict[str, Any]] | None = None
        # An image's /etc/passwd and /etc/group, by image id, oldest first.
        self._image_accounts: dict[str, tuple[str | None, str | None]] = {}

    @property
    def client(self) -> docker.DockerClient:
        """Connected on first use: the service starts even while Docker is down."""
        if self._client is None:
            try:
                client = docker.DockerClient(
                    base_url=self.base_url, timeout=120, max_pool_size=POOL_SIZE
                )
            except docker.errors.DockerException as err:
                raise DockerUnavailable(
                    f"Docker at {self.base_url} does not answer: {err}"
                ) from err
            if self.base_url.startswith("unix://"):
                socket_url = "http+unix://" + self.base_url.removeprefix("unix://")
                adapter = SocketAdapter(socket_url, timeout=120, max_pool_size=POOL_SIZE)
                client.api.mount("http+docker://", adapter)
                # No proxy or .netrc stands between this process and a local socket:
                # requests looked for both in the environment at every call (a tenth
                # of this service's CPU under load).
                client.api.trust_env = False
            self._client = client
        return self._client

    async def run(self, work: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(work, *args, **kwargs)

    async def ping(self) -> None:
        """Return when the daemon answers /_ping; raise DockerUnavailable when not."""
        if self.base_url.startswith("unix://"):
            socket_path = Path(self.base_url.removeprefix("unix://"))
            if await asyncio.to_thread(docker_answers, socket_path):  # a 1 s bound
                return
        else:
            with contextlib.suppress(docker.errors.DockerException, OSError):
                if await self.run(lambda: self.client.ping()):
                    return
        raise DockerUnavailable(f"Docker at {self.base_url} does not answer")

    async def docker_info(self) -> DockerInfo:
        """Its CPUs and cgroup driver: what the limits service needs to answer with what
        a container here gets."""
        return DockerInfo.of(await self._info())

    async def has_nvidia_runtime(self) -> bool:
        return "nvidia" in (await self._info()).get("Runtimes", {})

    async def _info(self) -> dict[str, Any]:
        """Docker's info, asked at most once a minute: the cgroup driver and the runtimes
        change only when dockerd restarts, and the call is one of Docker's slowest."""
        if self._info_cache is None or time.monotonic() - self._info_cache[0] > INFO_SECONDS:
            self._info_cache = (time.monotonic(), await self.run(lambda: self.client.info()))
        return self._info_cache[1]

    async def _ask(self, method: str, target: str, longer: float = 0.0) -> Reply:
        """One call of Docker's API. DockerUnavailable where Docker does not answer (in
        CALL_SECONDS, ``longer`` seconds more); the SDK's NotFound (404) or APIError for a
        refusal, in Docker's words, as the SDK raised them."""
        try:
            async with asyncio.timeout(CALL_SECONDS + longer):
                reply = await self.daemon.call(method, target)
        except OSError as err:  # TimeoutError among them
            raise DockerUnavailable(
                f"Docker at {self.base_url} does not answer: {str(err) or 'no answer in time'}"
            ) from err
        if 200 <= reply.status < 300 or reply.status == 304:  # 304: started or stopped already
            return reply
        answer = reply.json()
        words = answer.get("message") if isinstance(answer, dict) else None
        refusal = docker.errors.NotFound if reply.status == 404 else docker.errors.APIError
        raise refusal(f"{reply.status} {method} {target}: {words or 'refused'}")

    async def _inspected(self, target: str) -> dict[str, Any]:
        """An inspect's answer; DockerUnavailable where it is no JSON object (a dockerd
        that went away mid-answer closes the connection early: no length says so)."""
        found = (await self._ask("GET", target)).json()
        if not isinstance(found, dict):
            raise DockerUnavailable(f"Docker at {self.base_url} cut its answer to {target} short")
        return found

    async def _inspect(self, container: str) -> dict[str, Any]:
        return await self._inspected(f"{_container_path(container)}/json")

    async def image(self, image: str) -> dict[str, Any] | None:
        """The image's inspect, or None if Docker has no image by that reference."""
        try:
            return await self._inspected(f"{image_path(image)}/json")
        except docker.errors.NotFound:
            return None

    async def find(self, name: str) -> Any | None:
        """The container by name or id, as the SDK's model of it; None if there is none."""
        try:
            attrs = await self._inspect(name)
        except docker.errors.NotFound:
            return None
        client = await self._sdk()
        return Container(attrs=attrs, client=client, collection=client.containers)

    async def _sdk(self) -> docker.DockerClient:
        """The SDK's client, connected in a worker thread (it asks Docker for its version
        at once), once however many ask together."""
        async with self._connecting:
            if self._client is None:
                await self.run(lambda: self.client)
        return self.client

    async def names_labelled(self, label: str, value: str) -> list[str]:
        """The names of every container, running or not, whose ``label`` is ``value``."""
        found = await self.run(  # sparse: the list alone, no inspect a removal could fail
            lambda: self.client.containers.list(
                all=True, sparse=True, filters={"label": f"{label}={value}"}
            )
        )
        return [c.attrs["Names"][0].lstrip("/") for c in found if c.attrs.get("Names")]

    async def create(self, arguments: dict[str, Any]) -> Any:
        return await self.run(lambda: self.client.containers.create(**arguments))

    async def start(self, container: Any) -> dict[str, Any]:
        """Start; Docker's State of the container after (StartedAt of this run)."""
        await self._ask("POST", f"{_container_path(container.id)}/start")
        return (await self._inspect(container.id))["State"]  # type: ignore[no-any-return]

    async def image_accounts(
        self, image_id: str, name: str, labels: dict[str, str]
    ) -> tuple[str | None, str | None]:
        """The image's own /etc/passwd and /etc/group ("" where it has none, None where it
        has something else there), read once per image (ids name content: they never go
        stale) through a container made to be read and removed: named ``name`` and
        labelled ``labels``, a create's own, so that its undo finds it after a crash."""
        if image_id in self._image_accounts:
            return self._image_accounts[image_id]
        arguments = {"image": image_id, "name": name, "command": ["true"], "labels": labels}
        probe = await self.create({**arguments, "network_mode": "none"})
        try:
            fault_point("create:probed")
            found = await self.accounts_in(probe)
        finally:
            await self.remove(probe.id)
        self._image_accounts[image_id] = found
        while len(self._image_accounts) > IMAGES_REMEMBERED:
            del self._image_accounts[next(iter(self._image_accounts))]
        return found

    def known_accounts(self, image_id: str) -> tuple[str | None, str | None]:
        """The image's files as this process read them; (None, None) if it did not."""
        return self._image_accounts.get(image_id, (None, None))

    async def accounts_in(self, container: Any) -> tuple[str | None, str | None]:
        """The container's /etc/passwd and /etc/group, through the archive API."""
        passwd, group = await asyncio.gather(
            self.run(_read_file, container, "/etc/passwd"),
            self.run(_read_file, container, "/etc/group"),
        )
        return passwd, group

    async def name_account(self, container: Any, account: Account) -> None:
        """Give the host uid and gid names inside a container ds01 did not make (adopted
        from DS01 or mlc) by rewriting its /etc/passwd and /etc/group through Docker's
        archive API: nothing of the image runs, as root or otherwise, and the names stay
        in the container for every later start (``mlc start`` included)."""
        passwd, group = await self.accounts_in(container)
        if passwd is None or group is None:
            log.warning(
                "%s: /etc/passwd or /etc/group is no plain file of at most 1 MiB; "
                "users stay unnamed",
                container.name,
            )
            return
        named = named_accounts(passwd, group, account)
        if named != (passwd, group):  # under / so that an image without /etc gets one too
            archive = _archive({"etc/passwd": named[0], "etc/group": named[1]})
            if not await self.run(container.put_archive, "/", archive):
                raise DockerUnavailable("Docker refused to write /etc/passwd and /etc/group")

    async def stop(self, container_id: str, grace: int) -> dict[str, Any]:
        """Stop the container, by id; Docker's State of it after (FinishedAt set).
        Raises docker.errors.NotFound where Docker has no such container."""
        target = f"{_container_path(container_id)}/stop?t={int(grace)}"
        await self._ask("POST", target, longer=grace)
        return (await self._inspect(container_id))["State"]  # type: ignore[no-any-return]

    async def remove(self, container_id: str) -> None:
        """Remove the container with its anonymous volumes, by id: one gone already is."""
        with contextlib.suppress(docker.errors.NotFound):
            await self._ask("DELETE", f"{_container_path(container_id)}?force=1&v=1")

    async def close(self) -> None:
        if self._client is not None:
            await self.run(self._client.close)


def _container_path(reference: str) -> str:
    """The API path of the container Docker could have by that name or id; NotFound,
    before Docker is asked, for a reference no container can have: Docker's router
    would read one with a '/' as another path (a '..' climbs to another object)."""
    if not DOCKER_REFERENCE.fullmatch(reference):
        raise docker.errors.NotFound(
            f"no container is named {reference!r}: Docker's names and ids are letters, "
            "digits, '_', '.' and '-'"
        )
    return container_path(reference)


@dataclass
class Metadata(JsonRecord):
    """What ds01 remembers of a container, beside Docker's own record."""

    docker_name: str
    name: str
    user: str
    image: str
    container_id: str
    node: str
    created_at: float
    gpu_slots: list[str] = field(default_factory=list)
    workspace: str = ""
    data_dirs: list[str] = field(default_factory=list)
    limits: dict[str, Any] = field(default_factory=dict)
    runtime_before: float = 0.0  # seconds of finished runs (for max_runtime)
    counted_start: str = ""  # Docker's StartedAt of the last run added to runtime_before
    run_start: str = ""  # Docker's StartedAt of the run ds01 last saw running
    named: bool = False  # the user's names were written into its /etc at create
    container_type: str = ""  # container_types.<type> of the limits configuration
    adopted: bool = False  # found in Docker (a DS01 or mlc host's), not made by ds01
    status: str = ""  # Docker's status as its node last saw it: for the other nodes
    notice: str = ""  # the reconciler's warning to the owner, e.g. of an idle stop to come
    # Never stored: "creating" or "interrupted" when this stands for a create's intent.
    pending: str = ""


@dataclass
class Intent(JsonRecord):
    """A create in progress, written to etcd before each of its side effects. If the
    creating process dies, whoever finds the intent knows exactly what to undo."""

    docker_name: str
    name: str
    user: str
    image: str
    node: str
    owner: str  # the containers service instance that is creating it
    started_at: float
    made_dirs: list[str] = field(default_factory=list)  # directories it is about to make
    allocating: bool = False  # it has asked for (or holds) GPUs under docker_name
    creating: bool = False  # it has asked Docker for a container named docker_name
    starting: bool = False  # the container is made; it is being started
    undoing: bool = False  # its own undo failed: the repair loop takes over

    @property
    def step(self) -> str:
        """Where the create is, in words, from what it recorded before each side effect."""
        if self.starting:
            return "being created: starting it"
        if self.creating:
            return "being created: Docker is making it"
        if self.allocating:
            return "being created: getting its GPUs (or waiting for one)"
        return "being created"

    def shown(self, interrupted: bool) -> Metadata:
        """How list and inspect show it: a container that is not there yet."""
        return Metadata(
            docker_name=self.docker_name,
            name=self.name,
            user=self.user,
            image=self.image,
            container_id="",
            node=self.node,
            created_at=self.started_at,
            pending="interrupted" if interrupted else "creating",
            notice=(
                "its create was interrupted; ds01 is undoing it, then the name is free"
                if interrupted
                else self.step
            ),
        )


def record_key(prefix: str, node: str, docker_name: str) -> bytes:
    """The etcd key of a container's record or intent (``docker_name`` empty: all of a
    node's)."""
    return f"{prefix}{node}/{docker_name}".encode()


def user_key(user: str, node: str = "", docker_name: str = "") -> bytes:
    """The key of a record's copy in its user's index (a prefix: all of the user's, or
    the user's on ``node``)."""
    if "/" in user:  # the prefix of one user would then cover another's
        raise ValueError(f"user name {user!r} contains '/'")
    return f"{BY_USER}{user}/{node}{'/' if node else ''}{docker_name}".encode()


class MetadataStore:
    """Container records of one node. Each record is written together with its copy in
    the user's index, in one transaction, so the two never differ."""

    def __init__(self, client: aetcd.Client, node: str) -> None:
        self.client = client
        self.node = node

    def _key(self, docker_name: str) -> bytes:
        return record_key(METADATA, self.node, docker_name)

    def _copy_key(self, metadata: Metadata) -> bytes:
        return user_key(metadata.user, self.node, metadata.docker_name)

    def writes(self, metadata: Metadata) -> list[Any]:
        """The transaction operations that store ``metadata`` and its index copy."""
        tx, value = self.client.transactions, metadata.encode()
        return [
            tx.put(self._key(metadata.docker_name), value),
            tx.put(self._copy_key(metadata), value),
        ]

    async def modify(
        self, metadata: Metadata, change: Callable[[Metadata], object], as_read: bool = False
    ) -> Metadata | None:
        """Apply ``change`` to the stored record of this very container and write it back
        only if nobody wrote it meanwhile (see ``_rewrite``). A change that changes
        nothing writes nothing: a sweep over thousands of unchanged containers costs etcd
        only reads. ``as_read``: ``metadata`` is the record as a sweep read it, tried
        first without reading it again; then an unchanged record costs etcd nothing."""
        tx = self.client.transactions

        def changed(current: Metadata, read: bytes) -> list[Any]:
            before = self._copy_key(current)
            change(current)
            if current.encode() == read:
                return []
            moved = [tx.delete(before)] if self._copy_key(current) != before else []
            return [*moved, *self.writes(current)]

        return await self._rewrite(metadata, changed, metadata.encode() if as_read else None)

    async def _rewrite(
        self,
        metadata: Metadata,
        operations: Callable[[Metadata, bytes], list[Any]],
        read: bytes | None,
    ) -> Metadata | None:
        """The stored record of this very container, with ``operations(current, read)``
        committed only if it is still as read (``read``: the bytes the caller read, tried
        first), re-read and retried on a conflict. None when there is no such record: a
        remove deleted it, or a container was made anew under the name (never touched)."""
        key, tx = self._key(metadata.docker_name), self.client.transactions
        for _attempt in range(MODIFY_ATTEMPTS):
            if read is None:
                found = await self.client.get(key)
                if found is None:
                    return None
                read = found.value
            current = Metadata.decode(read)
            if current.container_id != metadata.container_id:
                return None
            writes = operations(current, read)
            if not writes:
                return current
            written, _ = await self.client.transaction(
                compare=[tx.value(key) == read], success=writes, failure=[]
            )
            if written:
                return current
            read = None
        return None

    async def put_new(self, metadata: Metadata) -> bool:
        """Write a record for a container ds01 did not make, unless a record or a create
        holds the name by now."""
        key, tx = self._key(metadata.docker_name), self.client.transactions
        intent = record_key(INTENTS, self.node, metadata.docker_name)
        succeeded, _ = await self.client.transaction(
            compare=[tx.create(key) == 0, tx.create(intent) == 0],
            success=self.writes(metadata),
            failure=[],
        )
        return succeeded

    async def get(self, docker_name: str) -> Metadata | None:
        found = await self.client.get(self._key(docker_name))
        return Metadata.decode(found.value) if found else None

    async def delete(self, metadata: Metadata) -> None:
        """Delete the record of this very container and its copy; never the record of a
        container made anew under the same name."""
        key, tx = self._key(metadata.docker_name), self.client.transactions

        def deleted(current: Metadata, _read: bytes) -> list[Any]:
            return [tx.delete(key), tx.delete(self._copy_key(current))]

        # Tried as given first: callers have just read it.
        await self._rewrite(metadata, deleted, metadata.encode())

    async def all(self) -> list[Metadata]:
        found = await self.client.get_prefix(record_key(METADATA, self.node, ""))
        return [Metadata.decode(kv.value) for kv in found]

    async def fleet(self) -> list[Metadata]:
        """The records of every node."""
        found = await self.client.get_prefix(METADATA.encode())
        return [Metadata.decode(kv.value) for kv in found]

    async def of_user(self, user: str, here: bool = False) -> list[Metadata]:
        """The user's records on every node (``here``: on this node), read from the
        user's index: the cost follows the user's containers, not the fleet's."""
        if "/" in user:  # no such user's record is ever indexed (an admin's odd --user)
            return []
        found = await self.client.get_prefix(user_key(user, self.node if here else ""))
        return [Metadata.decode(kv.value) for kv in found]

    async def index(self) -> int:
        """Bring the user index up to date with this node's records: records written by
        an earlier ds01 have no copy yet, and one that deleted a record left its copy.
        Each write is conditional on the record as read, so a concurrent change wins. The
        fleet's copies are read as keys alone; a copy that is there but out of date is
        rewritten by the record's next change. Returns how many copies were written or
        removed."""
        tx = self.client.transactions
        # With the bytes as stored: a record an earlier ds01 wrote may have fewer fields,
        # and the writes below hold only while it is exactly as read.
        stored = await self.client.get_prefix(record_key(METADATA, self.node, ""))
        records = {(m := Metadata.decode(kv.value)).docker_name: (m, kv.value) for kv in stored}
        found = await self.client.get_prefix(BY_USER.encode(), keys_only=True)
        copies = {kv.key for kv in found if kv.key.decode().split("/")[-2] == self.node}
        fixed = 0
        for name, (record, read) in records.items():
            try:
                copy = self._copy_key(record)
            except ValueError as err:  # an owner no user can have: listed by admins only
                log.warning("%s is left out of the user index: %s", name, err)
                continue
            if copy in copies:
                copies.discard(copy)
                continue
            written, _ = await self.client.transaction(
                compare=[tx.value(self._key(name)) == read], success=self.writes(record), failure=[]
            )
            fixed += written
        for stale in copies:  # no record, or the record is now another user's
            name = stale.decode().rsplit("/", 1)[1]
            key, read = self._key(name), records[name][1] if name in records else None
            unchanged = tx.create(key) == 0 if read is None else tx.value(key) == read
            written, _ = await self.client.transaction(
                compare=[unchanged], success=[tx.delete(stale)], failure=[]
            )
            fixed += written
        return fixed


class IntentStore:
    """Intents of one node: reserved with the name, committed with the metadata."""

    def __init__(self, client: aetcd.Client, node: str) -> None:
        self.client = client
        self.node = node

    def _key(self, docker_name: str) -> bytes:
        return record_key(INTENTS, self.node, docker_name)

    async def reserve(self, intent: Intent) -> bool:
        """Write the intent if neither a create nor a container holds the name."""
        key, tx = self._key(intent.docker_name), self.client.transactions
        succeeded, _ = await self.client.transaction(
            compare=[
                tx.create(key) == 0,
                tx.create(record_key(METADATA, self.node, intent.docker_name)) == 0,
            ],
            success=[tx.put(key, intent.encode())],
            failure=[],
        )
        return succeeded

    async def update(self, intent: Intent) -> None:
        await self.client.put(self._key(intent.docker_name), intent.encode())

    async def commit(self, intent: Intent, metadata: Metadata) -> None:
        """The create is done: its metadata replaces its intent in one transaction."""
        tx = self.client.transactions
        await self.client.transaction(
            compare=[],
            success=[
                *MetadataStore(self.client, self.node).writes(metadata),
                tx.delete(self._key(intent.docker_name)),
            ],
            failure=[],
        )

    async def get(self, docker_name: str) -> Intent | None:
        found = await self.client.get(self._key(docker_name))
        return Intent.decode(found.value) if found else None

    async def delete(self, docker_name: str) -> None:
        await self.client.delete(self._key(docker_name))

    async def all(self) -> list[Intent]:
        found = await self.client.get_prefix(record_key(INTENTS, self.node, ""))
        return [Intent.decode(kv.value) for kv in found]


def slice_drop_in(aggregate: dict[str, float | int]) -> str:
    """A slice's aggregate limits as a systemd drop-in, as DS01 wrote them."""
    properties = {
        "cpus": lambda v: f"CPUQuota={round(float(v) * 100)}%",
        "memory": lambda v: f"MemoryMax={int(v)}",
        "memory_high": lambda v: f"MemoryHigh={int(v)}",
        "pids": lambda v: f"TasksMax={int(v)}",
    }
    lines = [properties[key](value) for key, value in aggregate.items() if key in properties]
    return "# Written by ds01 from resource-limits.yaml; rewritten on change.\n[Slice]\n" + (
        "".join(f"{line}\n" for line in lines)
    )


class SystemdSlices:
    """Per-user slices for Docker's systemd driver: the aggregate limits as a drop-in
    that systemd applies whenever the slice is loaded (DS01's way), and a daemon-reload
    when one changed, for a slice that is active already."""

    DROP_IN = "50-ds01-limits.conf"

    def __init__(
        self,
        units: Path = Path("/etc/systemd/system"),
        reload: Callable[[], None] | None = None,
    ) -> None:
        self.units = units
        self.reload = reload or _daemon_reload

    def ensure(self, slice_name: str, aggregate: dict[str, float | int]) -> None:
        if "/" in slice_name or not slice_name.endswith(".slice"):
            raise ValueError(f"{slice_name!r} is not a slice name")
        path = self.units / f"{slice_name}.d" / self.DROP_IN
        text = slice_drop_in(aggregate)
        with contextlib.suppress(OSError):
            if path.read_text() == text:
                return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(text)
        partial.replace(path)  # whole or not at all: systemd never reads half a file
        self.reload()


def _daemon_reload() -> None:
    """Have systemd read the changed drop-ins (where systemd runs at all)."""
    try:
        result = subprocess.run(
            ["systemctl", "daemon-reload"], capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError:  # in a container (compose): the host's systemd reads them later
        log.warning("no systemctl here: run `systemctl daemon-reload` on the host to apply")
        return
    if result.returncode != 0:
        log.warning("systemctl daemon-reload failed: %s", result.stderr.strip())


class CgroupfsSlices:
    """Per-user cgroups for Docker's cgroupfs driver, with the user's aggregate limits.

    Docker puts each container under ``/ds01/<group>/<user>``; the limits written on that
    directory bound the sum of all the user's containers. Works on cgroup v1 (one tree
    per controller) and v2 (one unified tree).
    """

    def __init__(self, root: Path = Path("/sys/fs/cgroup")) -> None:
        self.root = root

    def ensure(self, parent: str, aggregate: dict[str, float | int]) -> None:
        """Write ``aggregate`` on the cgroup; a limit it does not set is lifted."""
        unified = (self.root / "cgroup.controllers").exists()
        relative = parent.strip("/")
        unlimited = "max" if unified else "-1"

        def value(key: str) -> str:
            return str(int(aggregate[key])) if key in aggregate else unlimited

        quota = int(float(aggregate["cpus"]) * 100_000) if "cpus" in aggregate else None
        settings: list[tuple[str, str, str]] = [  # (v1 controller, file, value)
            ("memory", "memory.max" if unified else "memory.limit_in_bytes", value("memory")),
            # throttled above memory_high; killed only above memory
            ("memory", "memory.high" if unified else "memory.soft_limit_in_bytes",
             value("memory_high")),
            ("pids", "pids.max", value("pids") if "pids" in aggregate else "max"),
        ]  # fmt: skip
        if unified:
            settings.append(("cpu", "cpu.max", f"{'max' if quota is None else quota} 100000"))
        else:
            settings.append(("cpu", "cpu.cfs_period_us", "100000"))
            settings.append(("cpu", "cpu.cfs_quota_us", str(-1 if quota is None else quota)))
        for controller, name, value_text in settings:
            directory = self.root / relative if unified else self.root / controller / relative
            directory.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(value_text)


def _read_file(container: Any, path: str) -> str | None:
    """A regular file of the container, through the archive API ("" if there is none;
    None if it is something else: a symlink would lead the write elsewhere; or larger
    than ACCOUNT_FILE_BYTES, which an image of the user's could make it)."""
    try:
        stream, stat = container.get_archive(path)
    except docker.errors.NotFound:
        return ""
    if stat.get("size", 0) > ACCOUNT_FILE_BYTES:
        stream.close()  # not read: this process's memory, and a copy per container on disk
        return None
    data = b"".join(stream)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.next()
        if member is None or not member.isfile():
            return None
        extracted = tar.extractfile(member)
        return extracted.read().decode("utf-8", "replace") if extracted else ""


def _archive(files: dict[str, str]) -> bytes:
    """Files owned by root, mode 0644, as a tar for put_archive."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in sorted({name.rsplit("/", 1)[0] for name in files if "/" in name}):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), 0o644, 0, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
