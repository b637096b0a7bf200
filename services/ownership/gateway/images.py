"""Image names and who may write them: a user owns ``<user>/...`` and ``ds01-<user>/...``.

Any other name belongs to nobody in particular (a shared base image such as
``ubuntu:22.04``): users may read and run those, and only admins may write them. An
image carrying another user's namespace, or labelled ``ds01.user`` for another user, is
private to that user.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ds01.core.naming import OWNER_LABEL
from ds01.ownership.gateway.strict import BadRequest

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9-]+)*(?::[0-9]+)?)"
_NAME = re.compile(
    rf"(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?"
)
_ID = re.compile(r"(?:sha256:)?[a-f0-9]{1,64}")


class Access(Enum):
    OWN = "own"
    SHARED = "shared"
    PRIVATE = "private"  # another user's


@dataclass(frozen=True)
class ImageName:
    """A reference in Docker's familiar form: ``alice/proj:v1``, ``ubuntu:22.04``."""

    path: str  # without the docker.io/ or library/ Docker adds
    tag: str | None
    digest: str | None
    domain: str | None  # a registry other than Docker Hub

    @property
    def repository(self) -> str:
        return f"{self.domain}/{self.path}" if self.domain else self.path

    def __str__(self) -> str:
        text = self.repository
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def tagged(self) -> str:
        """The name with Docker's default tag, as RepoTags spell it."""
        return str(self) if self.tag or self.digest else f"{self.repository}:latest"


def parse_name(reference: str) -> ImageName:
    found = _NAME.fullmatch(reference)
    if not found or len(reference) > 255:
        raise BadRequest(f"{reference!r} is not a valid image name")
    domain, path = found["domain"], found["path"]
    if domain is not None and "." not in domain and ":" not in domain and domain != "localhost":
        if not re.fullmatch(_COMPONENT, domain):  # a path's part, lower case, as Docker reads it
            raise BadRequest(f"{reference!r} is not a valid image name")
        path, domain = f"{domain}/{path}", None  # "alice/proj": a path, not a registry
    if domain in ("docker.io", "index.docker.io"):
        domain = None
    if domain is None and path.startswith("library/"):
        path = path.removeprefix("library/")
    return ImageName(path, found["tag"], found["digest"], domain)


def is_id(reference: str) -> bool:
    return bool(_ID.fullmatch(reference)) and (
        reference.startswith("sha256:") or len(reference) >= 12
    )


def namespace_owner(name: ImageName, exists: Callable[[str], bool]) -> str | None:
    """The local user whose namespace ``name`` lies in, if any."""
    if name.domain is not None:
        return None
    first = name.path.split("/", 1)[0]
    if "/" not in name.path:
        return None
    user = first.removeprefix("ds01-")
    return user if exists(user) else None


def writable(name: ImageName, user: str) -> bool:
    """May ``user`` create or remove this name (tag, build, commit, load, import)?"""
    if name.domain is not None or "/" not in name.path:
        return False
    return name.path.split("/", 1)[0] in (user, f"ds01-{user}")


def require_writable(reference: str, user: str) -> ImageName:
    name = parse_name(reference)
    if name.digest or not writable(name, user):
        raise PermissionError(
            f"Permission denied: images you make must be named {user}/NAME[:TAG] or "
            f"ds01-{user}/NAME[:TAG], not {reference}"
        )
    return name


def access(
    user: str,
    tags: list[str],
    labels: dict[str, str],
    exists: Callable[[str], bool],
    unowned: Access = Access.SHARED,
) -> Access:
    """What ``user`` may do with an image that carries these tags and labels.

    ``unowned`` answers for an image with neither a name nor an owner label: an
    intermediate image of somebody's build, say, which users are not shown."""
    label_owner = labels.get(OWNER_LABEL) or None
    owners = {namespace_owner(_lenient(t), exists) for t in tags}
    if owners - {None}:  # a namespace says whose it is; a label inside an image could lie
        label_owner = None
    if label_owner == user or user in owners:
        return Access.OWN
    if label_owner is not None or (tags and None not in owners):
        return Access.PRIVATE
    return Access.SHARED if tags else unowned


def named_for_another(reference: str, user: str, exists: Callable[[str], bool]) -> str | None:
    """The other user whose namespace ``reference`` names, if any: such a name is theirs
    whatever image it points at (an id names nobody)."""
    if is_id(reference):
        return None
    named = namespace_owner(parse_name(reference), exists)
    return named if named not in (None, user) else None


def config_labels(inspect: dict[str, Any]) -> dict[str, str]:
    """The labels of a container's or an image's inspect (under Config)."""
    return (inspect.get("Config") or {}).get("Labels") or {}


def readable(
    user: str, reference: str, inspect: dict[str, Any], exists: Callable[[str], bool]
) -> bool:
    """May ``user`` run (or build from) the image ``reference`` found as ``inspect``:
    their own or a shared one, never another user's, by name or by id."""
    if named_for_another(reference, user, exists):
        return False
    tags = inspect.get("RepoTags") or []
    kind = access(user, tags, config_labels(inspect), exists, unowned=Access.PRIVATE)
    return kind is not Access.PRIVATE


def visible_tags(user: str, tags: list[str], exists: Callable[[str], bool]) -> list[str]:
    """The tags ``user`` may see: their own and the shared ones."""
    return [t for t in tags if namespace_owner(_lenient(t), exists) in (None, user)]


def _lenient(tag: str) -> ImageName:
    try:
        return parse_name(tag)
    except BadRequest:
        return ImageName(tag, None, None, "unparsable")
