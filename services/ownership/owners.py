"""Who owns a container, from its labels: never trusted beyond what labels can say.

``ds01.user`` (set by ds01 and, later, forced by the proxy), else MLC's
``aime.mlc.USER``, else a VS Code dev container's ``devcontainer.local_folder`` under
``/home/<user>/`` when that user exists. Otherwise the container has no owner and only
admins may touch it: the seed's fail-open was a hole.
"""

from __future__ import annotations

import pwd
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from ds01.core.records import JsonRecord

DS01_LABEL = "ds01_label"
MLC_LABEL = "mlc_label"
DEVCONTAINER = "devcontainer"
NONE = "none"


@dataclass(frozen=True)
class Ownership(JsonRecord):
    container_id: str
    name: str
    owner: str  # empty when nobody owns it
    source: str
    managed: bool


def user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def owner_of(
    container_id: str,
    name: str,
    labels: dict[str, str],
    exists: Callable[[str], bool] = user_exists,
) -> Ownership:
    name = name.lstrip("/")
    managed = labels.get("ds01.managed") == "true"
    if labels.get("ds01.user"):
        return Ownership(container_id, name, labels["ds01.user"], DS01_LABEL, managed)
    if labels.get("aime.mlc.USER"):
        return Ownership(container_id, name, labels["aime.mlc.USER"], MLC_LABEL, managed)
    folder = labels.get("devcontainer.local_folder", "")
    parts = PurePosixPath(folder).parts
    if len(parts) >= 3 and parts[:2] == ("/", "home") and ".." not in parts and exists(parts[2]):
        return Ownership(container_id, name, parts[2], DEVCONTAINER, managed)
    return Ownership(container_id, name, "", NONE, managed)
