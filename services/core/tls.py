"""gRPC credentials for mutual TLS, and a diagnosis of client certificates.

Servers require and verify a client certificate from the suite's CA during the TLS
handshake, so a peer with no certificate, one from another CA or an expired one never
reaches a handler. (grpcio offers no "request but don't verify" mode that would let the
server answer such peers with a gRPC status, so the ds01 client checks its own
certificate first and reports those cases as UNAUTHENTICATED with the reason.)
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ds01.core.pki import CertPaths, Pki


def server_credentials(pki: Pki, service: str) -> grpc.ServerCredentials:
    paths = pki.service(service)
    return grpc.ssl_server_credentials(
        [(paths.key.read_bytes(), paths.cert.read_bytes())],
        root_certificates=pki.ca_cert.read_bytes(),
        require_client_auth=True,
    )


def server_context(pki: Pki, service: str) -> ssl.SSLContext:
    """TLS with the service's own certificate, for HTTP endpoints such as /metrics (the
    scraper verifies it with the suite's CA; no client certificate is asked for)."""
    paths = pki.service(service)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(paths.cert, paths.key)
    return context


def channel_credentials(ca_cert: Path, identity: CertPaths | None) -> grpc.ChannelCredentials:
    if identity is None:
        return grpc.ssl_channel_credentials(ca_cert.read_bytes())
    return grpc.ssl_channel_credentials(
        ca_cert.read_bytes(),
        private_key=identity.key.read_bytes(),
        certificate_chain=identity.cert.read_bytes(),
    )


def certificate_problem(ca_cert: Path, identity: CertPaths | None) -> str | None:
    """Why the servers would refuse this client certificate, or None if they should not."""
    if identity is None or not identity.cert.is_file():
        where = f" at {identity.cert}" if identity else ""
        return f"no client certificate{where}"
    if not identity.key.is_file():
        return f"no private key at {identity.key} for {identity.cert}"
    try:
        cert = x509.load_pem_x509_certificate(identity.cert.read_bytes())
        ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    except (OSError, ValueError) as err:
        return f"cannot read certificate: {err}"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return f"{identity.cert} was not issued by the ds01 CA in {ca_cert}"
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        return f"{identity.cert} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if cert.not_valid_before_utc > now:
        return f"{identity.cert} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    return None
