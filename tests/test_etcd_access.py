"""etcd answers only ds01's services: a local user's curl, an etcd client without a
certificate and one with any certificate a user could hold or make are refused, on the
client port and the peer port; the services keep working when etcd restarts."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aetcd
import grpc
import pytest
import pytest_asyncio

from ds01.client import Ds01Error
from ds01.core.etcd import TlsClient, etcd_client
from ds01.core.pki import CertPaths, Pki, init_pki, issue_client_cert
from ds01.core.processes import ManagedProcess
from tests.allocator_env import AllocatorEnv, OwnEtcd, own_etcd_env

USER = "ds01alice"
SECRET_KEY = b"/ds01/v1/probe/secret"
SECRET = b"only-the-services-may-read-this"
PLANTED = b"/ds01/v1/probe/planted"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def stranger_certs(pki: Pki, unix_users: dict[str, int]) -> Iterator[dict[str, CertPaths | None]]:
    """Every certificate a hostile user could show, in files that user can read."""
    root = Path(tempfile.mkdtemp(prefix="ds01-stranger-", dir="/tmp"))
    other = Pki(root / "other")
    init_pki(other)  # a CA of the user's own making, with certificates named like ds01's
    own = issue_client_cert(
        pki, USER, out=CertPaths(root / "own.crt", root / "own.key")
    )  # what enrollment hands the user: signed by the suite's CA
    stolen_grpc = CertPaths(root / "grpc.crt", root / "grpc.key")
    shutil.copy(pki.service("allocator").cert, stolen_grpc.cert)  # a service's gRPC identity
    shutil.copy(pki.service("allocator").key, stolen_grpc.key)
    certs: dict[str, CertPaths | None] = {
        "no certificate": None,
        "the user's own ds01 certificate": own,
        "a service's gRPC certificate (suite CA)": stolen_grpc,
        "svc:allocator from another CA": other.etcd.client("allocator"),
        "etcd server certificate from another CA": other.etcd.server,
    }
    subprocess.run(["chown", "-R", USER, str(root)], check=True)
    root.chmod(0o755)
    yield certs
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def secret(etcd_endpoint: str, pki: Pki) -> Iterator[None]:
    async def put() -> None:
        async with etcd_client((etcd_endpoint,), pki.etcd, "admin") as client:
            await client.put(SECRET_KEY, SECRET)
            await client.delete(PLANTED)

    asyncio.run(put())
    yield


def _peer_port(etcd_process: tuple[str, ManagedProcess]) -> int:
    for arg in etcd_process[1].process.args:
        if str(arg).startswith("--listen-peer-urls="):
            return int(str(arg).rpartition(":")[2])
    raise AssertionError("etcd was started without a peer URL")


def _requests(client_port: int, peer_port: int) -> list[tuple[str, list[str]]]:
    read = json.dumps({"key": _b64(SECRET_KEY)})
    read_all = json.dumps({"key": _b64(b"/"), "range_end": _b64(b"\0")})
    plant = json.dumps({"key": _b64(PLANTED), "value": _b64(b"x")})
    wipe = json.dumps({"key": _b64(SECRET_KEY)})
    requests = []
    for scheme in ("https", "http"):
        base = f"{scheme}://127.0.0.1:{client_port}"
        requests += [
            (f"{scheme} read", ["-X", "POST", "-d", read, f"{base}/v3/kv/range"]),
            (f"{scheme} read all", ["-X", "POST", "-d", read_all, f"{base}/v3/kv/range"]),
            (f"{scheme} put", ["-X", "POST", "-d", plant, f"{base}/v3/kv/put"]),
            (f"{scheme} delete", ["-X", "POST", "-d", wipe, f"{base}/v3/kv/deleterange"]),
            (f"{scheme} v3beta read", ["-X", "POST", "-d", read, f"{base}/v3beta/kv/range"]),
            (f"{scheme} health", [f"{base}/health"]),
            (f"{scheme} metrics", [f"{base}/metrics"]),
            (f"{scheme} version", [f"{base}/version"]),
            (f"{scheme} members", [f"{base}/v3/cluster/member/list", "-X", "POST", "-d", "{}"]),
        ]
        peer = f"{scheme}://127.0.0.1:{peer_port}"
        requests += [
            (f"peer {scheme} members", [f"{peer}/members"]),
            (f"peer {scheme} version", [f"{peer}/version"]),
            (f"peer {scheme} raft", ["-X", "POST", "-d", "x", f"{peer}/raft"]),
        ]
    return requests


def _curl_as_user(identity: CertPaths | None, args: list[str]) -> subprocess.CompletedProcess:
    argv = ["runuser", "-u", USER, "--", "curl", "-sS", "-k", "--max-time", "5"]
    if identity is not None:
        argv += ["--cert", str(identity.cert), "--key", str(identity.key)]
    return subprocess.run(argv + args, capture_output=True, text=True, timeout=30)


async def _read_back(endpoint: str, pki: Pki) -> tuple[bytes | None, bytes | None]:
    async with etcd_client((endpoint,), pki.etcd, "admin") as client:
        secret, planted = await client.get(SECRET_KEY), await client.get(PLANTED)
    return (secret.value if secret else None), (planted.value if planted else None)


@pytest.mark.parametrize(
    "identity",
    [
        "no certificate",
        "the user's own ds01 certificate",
        "a service's gRPC certificate (suite CA)",
        "svc:allocator from another CA",
        "etcd server certificate from another CA",
    ],
)
def test_a_local_user_with_curl_gets_nothing_from_etcd(
    identity: str,
    stranger_certs: dict[str, CertPaths | None],
    etcd_process: tuple[str, ManagedProcess],
    pki: Pki,
    secret: None,
):
    endpoint = etcd_process[0]
    client_port = int(endpoint.rpartition(":")[2])
    answered = []
    for what, args in _requests(client_port, _peer_port(etcd_process)):
        result = _curl_as_user(stranger_certs[identity], args)
        out = result.stdout
        # Go answers plain HTTP on a TLS port with a fixed 400; nothing of etcd's own.
        if _b64(SECRET) in out or '"header"' in out or "etcd" in out.lower() or "{" in out:
            answered.append(f"{what}: {out[:200]!r}")
    assert not answered, "etcd answered a local user:\n" + "\n".join(answered)
    # Nothing was written or deleted either.
    assert asyncio.run(_read_back(endpoint, pki)) == (SECRET, None)


async def _try(client: aetcd.Client) -> str:
    try:
        async with client:
            value = await asyncio.wait_for(client.get(SECRET_KEY), 10)
    except (aetcd.exceptions.ClientError, grpc.RpcError, TimeoutError, OSError) as err:
        return f"refused: {type(err).__name__}"
    return f"answered: {value!r}"


@pytest.mark.parametrize(
    "identity",
    [
        "the user's own ds01 certificate",
        "a service's gRPC certificate (suite CA)",
        "svc:allocator from another CA",
        "etcd server certificate from another CA",
    ],
)
async def test_an_etcd_client_without_an_etcd_ca_certificate_is_refused(
    identity: str,
    stranger_certs: dict[str, CertPaths | None],
    etcd_endpoint: str,
    pki: Pki,
    secret: None,
):
    paths = stranger_certs[identity]
    assert paths is not None
    for trusted in (pki.etcd.ca_cert, paths.cert):  # the real CA, or the user's own
        credentials = grpc.ssl_channel_credentials(
            trusted.read_bytes(),
            private_key=paths.key.read_bytes(),
            certificate_chain=paths.cert.read_bytes(),
        )
        outcome = await _try(TlsClient(etcd_endpoint, credentials, 5, {}))
        assert outcome.startswith("refused"), f"{identity}, trusting {trusted.name}: {outcome}"


async def test_an_etcd_client_without_tls_is_refused(etcd_endpoint: str, secret: None):
    host, _, port = etcd_endpoint.rpartition(":")
    outcome = await _try(aetcd.Client(host=host, port=int(port), timeout=5))
    assert outcome.startswith("refused"), outcome


async def test_the_services_own_certificates_are_answered(etcd_endpoint: str, pki: Pki):
    """The other side of the refusals: each service, and root's admin identity, get in."""
    for identity in ("limits", "allocator", "containers", "ownership", "admin"):
        outcome = await _try(etcd_client((etcd_endpoint,), pki.etcd, identity, timeout=5))
        assert outcome.startswith("answered"), f"{identity}: {outcome}"


def test_etcd_keys_are_readable_by_root_only(pki: Pki, unix_users: dict[str, int]):
    keys = sorted(pki.etcd.root.rglob("*.key"))
    assert {k.stem for k in keys} >= {"ca", "server", "admin", "allocator", "ownership"}
    for key in keys:
        assert key.stat().st_mode & 0o777 == 0o600, key
        assert key.stat().st_uid == 0, key
        result = subprocess.run(
            ["runuser", "-u", USER, "--", "cat", str(key)], capture_output=True, text=True
        )
        assert result.returncode != 0 and "PRIVATE KEY" not in result.stdout, key


@pytest_asyncio.fixture(loop_scope="session")
async def own_etcd(tmp_path: Path, pki: Pki, state_dir: Path) -> AsyncIterator[OwnEtcd]:
    async with own_etcd_env(tmp_path, pki, state_dir) as own:
        yield own


async def _allocate_within(
    env: AllocatorEnv, container: str, seconds: float, errors: list[str] | None = None
) -> list[str]:
    deadline = time.monotonic() + seconds
    while True:
        try:
            async with env.client("alice") as alice:
                granted = await alice.allocate(container)
            return [a.slot.slot_id for a in granted.allocations]
        except Ds01Error as err:
            if errors is not None:
                errors.append(str(err))
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_the_services_keep_working_across_an_etcd_restart(own_etcd: OwnEtcd):
    env = own_etcd.env
    before = await _allocate_within(env, "before._.alice", 5)
    own_etcd.stop()
    await asyncio.sleep(12)  # longer than the node's 10 s registration lease
    await own_etcd.start()
    errors: list[str] = []
    after = await _allocate_within(env, "after._.alice", 30, errors)
    assert before and after and set(before).isdisjoint(after)  # the first slot stayed held
    # While etcd comes back, a call may say so; it never says the node is down or the
    # GPUs are gone.
    assert all(e.startswith("UNAVAILABLE: etcd") for e in errors), errors
    async with env.client("alice") as alice:
        status = await alice.gpu_status()
    held = {a.container: a.slot.slot_id for a in status.allocations if a.user}
    assert held == {"before._.alice": before[0], "after._.alice": after[0]}
