"""Which certificate the client presents.

In order: ``$DS01_CERT``/``$DS01_KEY``/``$DS01_CA``; the user's own directory
``~/.config/ds01/tls`` (``client.crt``, ``client.key``, ``ca.crt``, written by
enrollment); then, for admins on the server itself, the state directory's
``pki/clients/<user>.crt``.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from pathlib import Path

from ds01.core.config import Config
from ds01.core.pki import CertPaths


@dataclass(frozen=True)
class ClientIdentity:
    ca_cert: Path
    cert: CertPaths | None


def user_tls_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "ds01" / "tls"


def find_identity(config: Config, user: str | None = None) -> ClientIdentity:
    env_cert, env_key = os.environ.get("DS01_CERT"), os.environ.get("DS01_KEY")
    env_ca = os.environ.get("DS01_CA")
    if env_cert and env_key:
        return ClientIdentity(
            Path(env_ca) if env_ca else config.pki.ca_cert, CertPaths(Path(env_cert), Path(env_key))
        )
    own = user_tls_dir()
    if (own / "client.crt").is_file():
        return ClientIdentity(own / "ca.crt", CertPaths(own / "client.crt", own / "client.key"))
    issued = config.pki.client(user or getpass.getuser())
    if issued.cert.is_file():
        return ClientIdentity(config.pki.ca_cert, issued)
    return ClientIdentity(config.pki.ca_cert if not env_ca else Path(env_ca), None)
