"""Which certificate the client presents.

In order: ``$DS01_CERT``/``$DS01_KEY``/``$DS01_CA``; the user's own directory
``~/.config/ds01/tls`` (``client.crt``, ``client.key``, ``ca.crt``), which enrollment
fills by itself on first use and renews when a third of the lifetime is left; then, for
admins on the server itself, the state directory's ``pki/clients/<user>.crt``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ds01.core.config import Config
from ds01.core.pki import CertPaths, write_private


@dataclass(frozen=True)
class ClientIdentity:
    ca_cert: Path
    cert: CertPaths | None


def user_tls_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "ds01" / "tls"


class EnrollmentError(Exception):
    """The enrollment socket refused or could not be reached; the message says why."""


def enroll(socket_path: Path, directory: Path | None = None) -> ClientIdentity:
    """Ask the local enrollment socket for a certificate; the kernel tells it who we are.

    The key never leaves this process: only a signing request is sent. Files are 0600.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, getpass.getuser())]))
        .sign(key, hashes.SHA256())
    )
    request = json.dumps({"csr": csr.public_bytes(serialization.Encoding.PEM).decode()})
    try:
        with socket.socket(socket.AF_UNIX) as connection:
            connection.settimeout(15)
            connection.connect(str(socket_path))
            connection.sendall(request.encode() + b"\n")
            answer = json.loads(connection.makefile("rb").readline() or b"{}")
    except (OSError, ValueError) as err:
        raise EnrollmentError(f"cannot enroll through {socket_path}: {err}") from err
    if "certificate" not in answer:
        raise EnrollmentError(f"enrollment refused: {answer.get('error', 'no answer')}")
    directory = directory or user_tls_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise EnrollmentError(_no_place(directory, err)) from err
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(directory / "client.key", key_pem)
    write_private(directory / "client.crt", answer["certificate"].encode())
    write_private(directory / "ca.crt", answer["ca"].encode())
    return ClientIdentity(
        directory / "ca.crt", CertPaths(directory / "client.crt", directory / "client.key")
    )


def _no_place(directory: Path, err: OSError) -> str:
    """Why a certificate cannot be kept, and what to do, in one sentence."""
    home = Path.home()
    if not home.is_dir() and directory.is_relative_to(home):
        return (
            f"your home directory {home} does not exist, and ds01 keeps your certificate in "
            f"it ({directory}): ask an admin to create your home, or set XDG_CONFIG_HOME to "
            "a directory of your own"
        )
    return f"cannot keep your certificate in {directory}: {err.strerror or err}"


def certificate_expiry(cert_path: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(cert_path.read_bytes()).not_valid_after_utc


def needs_renewal(cert_path: Path) -> bool:
    """True once less than a third of the certificate's lifetime is left (or it is unreadable)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return True
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < lifetime / 3


def find_identity(config: Config, user: str | None = None) -> ClientIdentity:
    env_cert, env_key = os.environ.get("DS01_CERT"), os.environ.get("DS01_KEY")
    env_ca = os.environ.get("DS01_CA")
    if env_cert and env_key:
        return ClientIdentity(
            Path(env_ca) if env_ca else config.pki.ca_cert, CertPaths(Path(env_cert), Path(env_key))
        )
    own = user_tls_dir()
    cached = own / "client.crt"
    issued = config.pki.client(user or getpass.getuser())
    # One root issued (ds01 admin issue-cert), if this user may read it: in a state dir
    # that is root's alone, it is not theirs to use, and they enroll instead.
    usable = all(os.access(path, os.R_OK) for path in (issued.cert, issued.key))
    if config.ownership.enroll_socket.exists() and (
        (not cached.is_file() and not usable) or (cached.is_file() and needs_renewal(cached))
    ):
        # First use, or renewal: enroll by ourselves (keep a still-valid one on failure).
        with contextlib.suppress(EnrollmentError):
            return enroll(config.ownership.enroll_socket, own)
    if cached.is_file():
        return ClientIdentity(own / "ca.crt", CertPaths(cached, own / "client.key"))
    if usable:
        return ClientIdentity(config.pki.ca_cert, issued)
    return ClientIdentity(config.pki.ca_cert if not env_ca else Path(env_ca), None)
