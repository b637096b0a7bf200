"""Mutual TLS on every port: who gets in, who is refused, and what they are told."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ds01.client import ClientIdentity, Ds01Client, Ds01Error
from ds01.core.config import Config
from ds01.core.identity import CallInterceptor, Roles, caller
from ds01.core.pki import SERVICES, CertPaths, Pki, init_pki, issue_client_cert
from ds01.core.server import IdentityServicer
from ds01.core.tls import channel_credentials
from ds01.v1 import common_pb2, identity_pb2, identity_pb2_grpc


def _identity(pki: Pki, paths: CertPaths | None) -> ClientIdentity:
    return ClientIdentity(pki.ca_cert, paths)


@pytest.fixture(scope="module")
def bad_identities(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertPaths]:
    """A certificate from another CA and one that expired yesterday."""
    other = Pki(tmp_path_factory.mktemp("other-ca"))
    init_pki(other)
    foreign = issue_client_cert(other, "alice")
    expired = issue_client_cert(
        pki,
        "mallory",
        days=1,
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
    )
    return {"other CA": foreign, "expired": expired}


async def test_every_service_answers_health_over_mtls(suite_config: Config, pki: Pki, suite):
    async with Ds01Client(suite_config, _identity(pki, pki.client("alice"))) as client:
        for service in SERVICES:
            assert await client.health(service) == "SERVING"


async def test_whoami_reports_the_certificate_common_name(suite_config: Config, pki: Pki, suite):
    async with Ds01Client(suite_config, _identity(pki, pki.client("alice"))) as client:
        me = await client.whoami("allocator")
    assert me.name == "alice"
    assert me.kind == common_pb2.PRINCIPAL_KIND_USER
    assert me.service == "allocator"
    assert me.certificate_expires.ToDatetime(dt.UTC) > dt.datetime.now(dt.UTC)


async def test_services_and_admins_are_recognised(suite_config: Config, pki: Pki, suite):
    async with Ds01Client(suite_config, _identity(pki, pki.service("containers"))) as client:
        service = await client.whoami("limits")
    async with Ds01Client(suite_config, _identity(pki, pki.client("root"))) as client:
        admin = await client.whoami("limits")
    assert (service.name, service.kind) == ("svc:containers", common_pb2.PRINCIPAL_KIND_SERVICE)
    assert (admin.name, admin.kind) == ("root", common_pb2.PRINCIPAL_KIND_ADMIN)


@pytest.mark.parametrize("case", ["no certificate", "other CA", "expired"])
async def test_bad_client_certificates_never_reach_a_handler(
    suite_config: Config, pki: Pki, suite, bad_identities, case: str
):
    """The server refuses the TLS handshake itself: a raw gRPC client gets nothing."""
    paths = bad_identities.get(case)
    credentials = channel_credentials(pki.ca_cert, paths)
    async with grpc.aio.secure_channel(suite_config.address("limits"), credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await identity_pb2_grpc.IdentityServiceStub(channel).WhoAmI(
                identity_pb2.WhoAmIRequest(), timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no certificate", "no client certificate"),
        ("other CA", "was not issued by the ds01 CA"),
        ("expired", "expired at"),
    ],
)
async def test_ds01_client_reports_bad_certificates_as_unauthenticated(
    suite_config: Config, pki: Pki, suite, bad_identities, case: str, reason: str
):
    identity = _identity(pki, bad_identities.get(case))
    async with Ds01Client(suite_config, identity) as client:
        with pytest.raises(Ds01Error) as refused:
            await client.health("limits")
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert reason in refused.value.message
    assert "ds01 admin issue-cert" in refused.value.message


async def test_interceptor_refuses_calls_without_a_verified_certificate(pki: Pki):
    """Defence in depth: even on a port that forgot to require client certificates,
    no handler runs for a caller without one."""
    server = grpc.aio.server(interceptors=[CallInterceptor(Roles())])
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(IdentityServicer("test"), server)
    health = health_pb2_grpc.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    paths = pki.service("limits")
    no_client_auth = grpc.ssl_server_credentials(
        [(paths.key.read_bytes(), paths.cert.read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", no_client_auth)
    await server.start()
    try:
        credentials = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await identity_pb2_grpc.IdentityServiceStub(channel).WhoAmI(
                    identity_pb2.WhoAmIRequest(), timeout=5
                )
    finally:
        await server.stop(0)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no verified client certificate" in refused.value.details()


async def test_reflection_lists_each_service_contract(suite_config: Config, pki: Pki, suite):
    identity = pki.client("alice")
    credentials = channel_credentials(pki.ca_cert, identity)
    expected = {
        "limits": "ds01.v1.LimitsService",
        "allocator": "ds01.v1.AllocatorService",
        "containers": "ds01.v1.ContainersService",
        "ownership": "ds01.v1.OwnershipService",
    }
    for service, contract in expected.items():
        async with grpc.aio.secure_channel(suite_config.address(service), credentials) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            async for response in stub.ServerReflectionInfo(iter([request])):
                names = {s.name for s in response.list_services_response.service}
                break
        assert {contract, "grpc.health.v1.Health", "ds01.v1.IdentityService"} <= names


async def test_health_names_each_contract(suite_config: Config, pki: Pki, suite):
    credentials = channel_credentials(pki.ca_cert, pki.client("alice"))
    async with grpc.aio.secure_channel(suite_config.address("allocator"), credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        serving = await stub.Check(
            health_pb2.HealthCheckRequest(service="ds01.v1.AllocatorService")
        )
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Check(health_pb2.HealthCheckRequest(service="ds01.v1.Nope"))
    assert serving.status == health_pb2.HealthCheckResponse.SERVING
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_private_keys_are_readable_by_their_owner_only(pki: Pki):
    keys = [pki.ca_key, pki.client("alice").key, *(pki.service(s).key for s in SERVICES)]
    assert all(Path(k).stat().st_mode & 0o777 == 0o600 for k in keys)


async def test_a_stream_its_client_left_ends_in_its_own_call_and_frees_its_place(
    pki: Pki, caplog: pytest.LogCaptureFixture
):
    """A watcher that goes away mid-stream: the handler's cleanup runs at once, knowing
    its caller, the stream no longer counts against the user's streams, and nothing is
    logged as an error (asyncio used to close such streams later in a task of its own,
    where the caller was unknown, and logged "Task exception was never retrieved")."""
    interceptor = CallInterceptor(Roles())
    cleaned: list[str] = []

    async def events(request: bytes, context: grpc.aio.ServicerContext):
        try:
            while True:
                yield b"event"
                await asyncio.sleep(0.01)
        finally:
            cleaned.append(caller().name)

    handler = grpc.method_handlers_generic_handler(
        "test.Events", {"Watch": grpc.unary_stream_rpc_method_handler(events)}
    )
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers((handler,))
    paths = pki.service("limits")
    credentials = grpc.ssl_server_credentials(
        [(paths.key.read_bytes(), paths.cert.read_bytes())],
        root_certificates=pki.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        client = channel_credentials(pki.ca_cert, pki.client("alice"))
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", client) as channel:
            stream = channel.unary_stream("/test.Events/Watch")(b"")
            assert [await stream.read(), await stream.read()] == [b"event", b"event"]
            assert interceptor.streams.open == {"alice": 1}
            stream.cancel()
            for _ in range(200):
                if cleaned and not interceptor.streams.open:
                    break
                await asyncio.sleep(0.01)
    finally:
        await server.stop(0)
    assert cleaned == ["alice"]
    assert not interceptor.streams.open
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
