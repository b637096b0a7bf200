"""Enrollment: a local user gets a short-lived client certificate for themselves.

A Unix socket that anyone on the host may connect to. The kernel tells us the peer's
uid (SO_PEERCRED); that uid's login name is the certificate's common name, whatever
the request says. One JSON line in, one JSON line out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import pwd
import socket
import struct
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ds01.core.pki import Pki, load_ca, validate_user_name
from ds01.core.unix_server import UnixServer
from ds01.ownership.slots import Slots

log = logging.getLogger(__name__)

CERT_HOURS = 24
MAX_REQUEST = 16 * 1024


def peer_uid(sock: socket.socket) -> int:
    """The uid the kernel reports for the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def sign_csr(pki: Pki, csr_pem: bytes, user: str, hours: float = CERT_HOURS) -> bytes:
    """A client certificate for ``user`` on the CSR's key; the CSR's subject is ignored."""
    validate_user_name(user)
    csr = x509.load_pem_x509_csr(csr_pem)
    if not csr.is_signature_valid:
        raise ValueError("the request's signature does not match its key")
    ca_key, ca_cert = load_ca(pki)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, user)]))
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=hours))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


ENROLLMENTS_PER_USER = 4


class EnrollmentServer:
    def __init__(self, pki: Pki, path: Path) -> None:
        self.pki = pki
        self.path = path
        self.slots = Slots(ENROLLMENTS_PER_USER)
        self._server = UnixServer(path, self._serve)

    async def start(self) -> None:
        await self._server.start()
        log.info("enrollment on %s", self.path)

    async def stop(self) -> None:
        await self._server.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
        except OSError:
            writer.close()
            return
        if not self.slots.take(uid):  # a few at a time per user: enrolling takes one
            writer.close()
            return
        try:
            await self._enroll(uid, reader, writer)
        finally:
            self.slots.give(uid)

    async def _enroll(
        self, uid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            if len(line) > MAX_REQUEST:
                raise ValueError("request too large")
            try:
                user = pwd.getpwuid(uid).pw_name
            except KeyError:
                raise ValueError(f"uid {uid} has no login name on this host") from None
            request = json.loads(line)
            certificate = sign_csr(self.pki, request["csr"].encode(), user)
            answer = {
                "user": user,
                "certificate": certificate.decode(),
                "ca": self.pki.ca_cert.read_text(),
            }
            log.info("enrolled %s (uid %d)", user, uid)
        except Exception as err:  # the caller gets the reason, never a traceback
            answer = {"error": str(err) or type(err).__name__}
        writer.write(json.dumps(answer).encode() + b"\n")
        await writer.drain()
        writer.close()
