"""Ownership from the Docker event stream, and enrollment by kernel-vouched uid."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from ds01.client import ClientIdentity, Ds01Client
from ds01.containers.adapters import DockerHost
from ds01.core.config import Config
from ds01.core.etcd import etcd_client
from ds01.core.pki import Pki, issue_client_cert
from ds01.core.processes import free_port
from ds01.ownership.owners import DEVCONTAINER, NONE, Ownership, owner_of
from ds01.ownership.sync import OwnershipSync, OwnerStore
from ds01.v1 import ownership_pb2, ownership_pb2_grpc


def test_owner_comes_from_ds01_then_mlc_then_devcontainer_labels():
    exists = {"carol"}.__contains__
    assert (
        owner_of("1", "/a", {"ds01.user": "alice", "aime.mlc.USER": "x"}, exists).owner == "alice"
    )
    assert owner_of("1", "a", {"aime.mlc.USER": "bob"}, exists).owner == "bob"
    dev = owner_of("1", "a", {"devcontainer.local_folder": "/home/carol/proj"}, exists)
    assert (dev.owner, dev.source) == ("carol", DEVCONTAINER)
    for folder in ("/home/nobody/proj", "/home/carol/../root/x", "/srv/carol/proj"):
        orphan = owner_of("1", "a", {"devcontainer.local_folder": folder}, exists)
        assert (orphan.owner, orphan.source) == ("", NONE)


def _client(config: Config, pki: Pki, user: str) -> Ds01Client:
    if not pki.client(user).cert.is_file():
        issue_client_cert(pki, user)
    return Ds01Client(config, ClientIdentity(pki.ca_cert, pki.client(user)))


async def _get_owner(client: Ds01Client, reference: str) -> ownership_pb2.ContainerOwner:
    request = ownership_pb2.GetOwnerRequest(container=reference)
    stub = ownership_pb2_grpc.OwnershipServiceStub
    return (await client.unary("ownership", stub, "GetOwner", request)).owner


def _docker(socket: Path, *args: str) -> str:
    result = subprocess.run(
        ["docker", "-H", f"unix://{socket}", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


async def test_a_container_made_directly_against_docker_is_owned_at_once(
    ownership, pki, docker_socket, test_image
):
    config, _ = ownership
    async with _client(config, pki, "root") as admin, _client(config, pki, "alice") as alice:
        started = time.monotonic()
        container_id = await asyncio.to_thread(
            _docker,
            docker_socket,
            "create",
            "--name",
            "direct",
            "--network=none",
            "--label",
            "ds01.user=alice",
            test_image,
            "true",
        )
        for _ in range(100):
            try:
                owner = await _get_owner(admin, "direct")
                break
            except Exception:
                await asyncio.sleep(0.02)
        print(f"owner known {time.monotonic() - started:.3f}s after docker create returned")
        assert (owner.owner, owner.container_id) == ("alice", container_id)
        # References resolve as Docker resolves them: full id, prefix, name, '/name'.
        for reference in (container_id, container_id[:8], "direct", "/direct"):
            assert (await _get_owner(alice, reference)).owner == "alice"
        await asyncio.to_thread(_docker, docker_socket, "rename", "direct", "renamed")
        await asyncio.sleep(0.5)
        assert (await _get_owner(alice, "renamed")).container_id == container_id
        await asyncio.to_thread(_docker, docker_socket, "rm", "renamed")
        await asyncio.sleep(0.5)
        with pytest.raises(Exception) as gone:
            await _get_owner(admin, container_id)
    assert getattr(gone.value, "code", None) == grpc.StatusCode.NOT_FOUND


async def test_an_unlabelled_container_has_no_owner_and_is_hidden_from_users(
    ownership, pki, docker_socket, test_image
):
    config, _ = ownership
    await asyncio.to_thread(
        _docker, docker_socket, "create", "--name", "nolabel", "--network=none", test_image, "true"
    )
    await asyncio.sleep(0.5)
    try:
        async with _client(config, pki, "root") as admin, _client(config, pki, "bob") as bob:
            owner = await _get_owner(admin, "nolabel")
            assert (owner.owner, owner.source) == ("", ownership_pb2.OWNER_SOURCE_NONE)
            with pytest.raises(Exception) as hidden:
                await _get_owner(bob, "nolabel")
        assert hidden.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        await asyncio.to_thread(_docker, docker_socket, "rm", "nolabel")


# What a user's process sends, with nothing but the standard library: the test's own
# CSR claims to be alice; the kernel says the caller is ds01bob.
ASK = """
import json, socket, sys
with socket.socket(socket.AF_UNIX) as s:
    s.connect(sys.argv[1])
    s.sendall(json.dumps({"csr": sys.stdin.read()}).encode() + b"\\n")
    print(s.makefile("rb").readline().decode())
"""


def _csr_claiming(user: str) -> str:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def test_enrollment_gives_a_local_user_a_certificate_for_that_user_only(
    ownership, unix_users
):
    config, _ = ownership
    socket_path = config.ownership.enroll_socket
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o666
    result = await asyncio.to_thread(
        subprocess.run,
        ["runuser", "-u", "ds01bob", "--", "/usr/bin/python3", "-c", ASK, str(socket_path)],
        input=_csr_claiming("alice"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
    assert cert.subject.rfc4514_string() == "CN=ds01bob"  # not the alice it claimed
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() <= 25 * 3600  # short-lived


async def test_the_client_enrolls_by_itself_and_keeps_its_files_private(
    ownership, pki, tmp_path, monkeypatch
):
    """No certificate yet: the client library enrolls on first use, then is served."""
    from ds01.client import find_identity

    config, _ = ownership
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("DS01_CERT", raising=False)
    monkeypatch.setattr("getpass.getuser", lambda: "nobody-without-cert")
    identity = await asyncio.to_thread(find_identity, config)
    assert identity.cert is not None
    for path in (identity.cert.cert, identity.cert.key, identity.ca_cert):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    async with Ds01Client(config, identity) as client:
        me = await client.whoami("ownership")
    assert me.name == "root"  # the kernel's uid for this test process


async def test_references_resolve_as_docker_resolves_them_through_renames_and_removes():
    """Full id, then exact name (one optional '/'), then a unique id prefix; a rename
    frees the old name and a remove forgets both, as Docker's own lookup does."""
    sync = OwnershipSync(docker=None, store=None)  # type: ignore[arg-type]  # memory alone
    first, second = "ab" + "1" * 62, "ac" + "2" * 62
    named_like_an_id = Ownership(second, "ab", "bob", "ds01", True)
    sync._remember(Ownership(first, "one", "alice", "ds01", True))
    sync._remember(named_like_an_id)
    assert sync.lookup(first).owner == "alice"
    assert sync.lookup("one") is sync.lookup("/one") is sync.known[first]
    assert sync.lookup("//one") is None  # Docker strips one '/', not more
    assert sync.lookup("ab") is named_like_an_id  # a name before an id prefix
    assert sync.lookup("ac").owner == "bob" and sync.lookup("a") is None  # ambiguous
    sync._remember(Ownership(first, "renamed", "alice", "ds01", True))
    assert sync.lookup("one") is None and sync.lookup("renamed").container_id == first
    sync._forget(first)
    assert sync.lookup("renamed") is None and sync.lookup(first) is None
    assert sync.lookup("ab") is named_like_an_id


async def test_owners_are_known_from_docker_while_etcd_is_away(pki, docker_socket, test_image):
    """The map is read from Docker into memory first: GetOwner answers from there even
    when etcd cannot take the map (a later resync writes it)."""
    container_id = await asyncio.to_thread(
        _docker, docker_socket, "create", "--name", "etcdless", "--network=none",
        "--label", "ds01.user=alice", test_image, "true",
    )  # fmt: skip
    nowhere = etcd_client([f"127.0.0.1:{free_port()}"], pki.etcd, "ownership", timeout=2)
    docker_host = DockerHost(f"unix://{docker_socket}")
    sync = OwnershipSync(docker_host, OwnerStore(nowhere, "n1"))
    try:
        with pytest.raises(Exception):  # noqa: B017  (whatever etcd's client raises)
            await sync.resync()
        assert sync.resyncs == 1
        assert sync.lookup("etcdless").owner == "alice"
        assert sync.lookup(container_id[:12]).container_id == container_id
    finally:
        await asyncio.to_thread(_docker, docker_socket, "rm", "etcdless")
        await docker_host.close()
        await nowhere.close()
