"""The suite's private certificate authorities.

Every gRPC port uses mutual TLS, so every party needs a certificate signed by one CA:
the services (``svc:<name>``, usable as server and client), and each user (their login
name as common name). etcd has a CA of its own: the suite's CA signs a certificate for
every user who asks, so etcd trusting it would let every user in. The etcd CA signs
only etcd's server certificate and one client certificate per service (and one for the
administrator's etcdctl). Keys are written mode 0600 and never overwritten by accident.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICE_PREFIX = "svc:"
SERVICES = ("limits", "allocator", "containers", "ownership")
# Who may hold an etcd client certificate: the services, and root's etcdctl.
ETCD_CLIENTS = (*SERVICES, "admin")
CA_DAYS = 3650
SERVICE_DAYS = 825
CLIENT_DAYS = 365

# Login names as Linux, LDAP and AD produce them: h.baker@hertie-school.lan included.
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]{0,127}")


class PkiError(Exception):
    """A PKI operation cannot proceed; the message says what to do."""


@dataclass(frozen=True)
class CertPaths:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A CA's directory: its certificate and key, and what it signed below them."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    def exists(self) -> bool:
        return self.ca_cert.is_file() and self.ca_key.is_file()


@dataclass(frozen=True)
class Pki(Authority):
    """The files of the suite's CA under ``<state dir>/pki``."""

    def service(self, name: str) -> CertPaths:
        return CertPaths(
            self.root / "services" / f"{name}.crt", self.root / "services" / f"{name}.key"
        )

    def client(self, user: str) -> CertPaths:
        return CertPaths(
            self.root / "clients" / f"{user}.crt", self.root / "clients" / f"{user}.key"
        )

    @property
    def etcd(self) -> EtcdPki:
        return EtcdPki(self.root / "etcd")


@dataclass(frozen=True)
class EtcdPki(Authority):
    """etcd's own CA under ``<state dir>/pki/etcd``: nothing here is ever given to a user."""

    @property
    def server(self) -> CertPaths:
        """etcd's certificate for clients and for its peers."""
        return CertPaths(self.root / "server.crt", self.root / "server.key")

    def client(self, name: str) -> CertPaths:
        return CertPaths(
            self.root / "clients" / f"{name}.crt", self.root / "clients" / f"{name}.key"
        )


def is_user_name(user: str) -> bool:
    """A login name as ds01 accepts one (letters, digits and . _ @ -)."""
    return bool(_USER_NAME.fullmatch(user))


def validate_user_name(user: str) -> str:
    """Refuse names that are not login names, including the reserved service prefix."""
    if user.startswith(SERVICE_PREFIX):
        raise PkiError(
            f"{user!r}: names starting with {SERVICE_PREFIX!r} are reserved for services"
        )
    if not is_user_name(user):
        raise PkiError(
            f"{user!r} is not a valid user name: use letters, digits and . _ @ - "
            "(at most 128 characters, not starting with . @ or -)"
        )
    return user


def init_pki(
    pki: Pki, *, force: bool = False, hosts: tuple[str, ...] = (), admin: str | None = None
) -> list[Path]:
    """Create the CA, one certificate per service and, if named, one for ``admin``;
    then etcd's CA with etcd's server certificate and one client certificate per service.

    Returns the files written. An existing CA is kept unless ``force`` is given,
    because replacing it invalidates every certificate already handed out.
    """
    server_hosts = ("localhost", "127.0.0.1", "::1", socket.gethostname(), *hosts)
    written: list[Path] = []
    ca_key, ca_cert = _ca(pki, "ds01 CA", force, written)
    for service in SERVICES:
        paths = pki.service(service)
        if force or not paths.cert.is_file():
            cert, key = _sign(
                ca_key,
                ca_cert,
                SERVICE_PREFIX + service,
                days=SERVICE_DAYS,
                server_hosts=server_hosts,
            )
            written += _write_pair(paths.cert, paths.key, cert, key)
    if admin and (force or not pki.client(admin).cert.is_file()):
        paths = issue_client_cert(pki, admin)
        written += [paths.cert, paths.key]
    etcd = pki.etcd
    etcd_key, etcd_cert = _ca(etcd, "ds01 etcd CA", force, written)
    if force or not etcd.server.cert.is_file():
        cert, key = _sign(etcd_key, etcd_cert, "etcd", days=SERVICE_DAYS, server_hosts=server_hosts)
        written += _write_pair(etcd.server.cert, etcd.server.key, cert, key)
    for name in ETCD_CLIENTS:
        paths = etcd.client(name)
        if force or not paths.cert.is_file():
            cert, key = _sign(etcd_key, etcd_cert, SERVICE_PREFIX + name, days=SERVICE_DAYS)
            written += _write_pair(paths.cert, paths.key, cert, key)
    return written


def _ca(
    authority: Authority, common_name: str, force: bool, written: list[Path]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA of ``authority``, created (and its files added to ``written``) if needed."""
    if authority.exists() and not force:
        return _load_pair(authority.ca_cert, authority.ca_key)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    written += _write_pair(authority.ca_cert, authority.ca_key, ca_cert, ca_key)
    return ca_key, ca_cert


def issue_client_cert(
    pki: Pki,
    user: str,
    *,
    days: float = CLIENT_DAYS,
    out: CertPaths | None = None,
    not_before: dt.datetime | None = None,
) -> CertPaths:
    """Sign a client certificate whose common name is ``user``."""
    validate_user_name(user)
    ca_key, ca_cert = load_ca(pki)
    cert, key = _sign(ca_key, ca_cert, user, days=days, not_before=not_before)
    paths = out or pki.client(user)
    _write_pair(paths.cert, paths.key, cert, key)
    return paths


def load_ca(pki: Pki) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if not pki.exists():
        raise PkiError(f"no CA in {pki.root}: run `ds01 admin pki init` first")
    return _load_pair(pki.ca_cert, pki.ca_key)


def _load_pair(
    cert_path: Path, key_path: Path
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path}: expected an EC private key")
    return key, x509.load_pem_x509_certificate(cert_path.read_bytes())


def _sign(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    days: float,
    server_hosts: tuple[str, ...] = (),
    not_before: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (_now() - dt.timedelta(minutes=5))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if server_hosts:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(h) for h in dict.fromkeys(server_hosts)]),
            critical=False,
        )
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> list[Path]:
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(key_path, key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return [cert_path, key_path]


def write_private(path: Path, data: bytes) -> None:
    """Write a secret so that it is never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
