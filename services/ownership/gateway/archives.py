"""Tar bodies the gateway reads before Docker does: image archives and build contexts.

Forward only what was validated applies here too. An image archive's metadata is decoded
strictly (Docker folds JSON keys: ``repotags`` is ``RepoTags`` to it). A build context is
re-packed with one Dockerfile that the gateway wrote from what it parsed: one instruction
per line, no comments, no continuations, and a ``LABEL ds01.user`` after every ``FROM``,
which marks every image the build makes as the caller's and keeps one user's build cache
from answering another user's build.
"""

from __future__ import annotations

import io
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ds01.ownership.gateway.fields import ListOf, MapOf, Obj, Scalar
from ds01.ownership.gateway.policy import Refused
from ds01.ownership.gateway.strict import BadRequest, check, json_value

_MANIFEST = ListOf(
    Obj(
        {
            "Config": Scalar.STR,
            "RepoTags": ListOf(Scalar.STR),
            "Layers": ListOf(Scalar.STR),
            "Parent": Scalar.STR,
            "LayerSources": MapOf(MapOf(Scalar.STR)),
        }
    )
)
_REPOSITORIES = MapOf(MapOf(Scalar.STR))
_NAME_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
_METADATA = ("manifest.json", "repositories", "index.json")


def member_path(name: str) -> str:
    """A member's path as Docker's extraction places it ("./a/../b" is "b")."""
    return posixpath.normpath("/" + name).lstrip("/")


_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


def _open(archive: bytes, what: str) -> tarfile.TarFile:
    """A plain tar: a compressed one could unpack to far more than was sent."""
    if archive.startswith(_COMPRESSED):
        raise BadRequest(f"compressed {what}s are refused; send a plain tar")
    try:
        return tarfile.open(fileobj=io.BytesIO(archive), mode="r:")
    except tarfile.TarError as err:
        raise BadRequest(f"the {what} is not a tar archive: {err}") from None


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        if member.issparse():  # holes unpack to data that was never sent
            raise BadRequest(f"sparse archive members are refused ({member.name})")
        yield member


def image_names(archive: bytes) -> list[str]:
    """Every image name an image archive asks Docker to tag, read as strictly as Docker
    could read it: metadata files must be regular, unique and spelled exactly."""
    names: list[str] = []
    seen: set[str] = set()
    with _open(archive, "image archive") as tar:
        for member in _members(tar):
            path = member_path(member.name)
            if path not in _METADATA:
                continue
            if path in seen or not member.isfile():
                raise Refused(f"{path} appears twice or is not a regular file in the archive")
            seen.add(path)
            extracted = tar.extractfile(member)
            data = extracted.read() if extracted else b""
            names += _names_in(path, data)
    if not names:
        raise Refused("name the images you load (docker save NAME): unnamed images have no owner")
    return names


def _names_in(path: str, data: bytes) -> list[str]:
    value = json_value(data, f"{path} in the archive")
    if path == "manifest.json":
        entries = check(value, _MANIFEST, path) or []
        return [tag for entry in entries for tag in (entry or {}).get("RepoTags") or []]
    if path == "repositories":
        repositories = check(value, _REPOSITORIES, path) or {}
        return [f"{repo}:{tag}" for repo, tags in repositories.items() for tag in tags or {}]
    _exact_keys(value, path)
    found = []
    for manifest in (value or {}).get("manifests") or [] if isinstance(value, dict) else []:
        notes = manifest.get("annotations") or {} if isinstance(manifest, dict) else {}
        found += [
            note
            for key, note in notes.items()
            if key in _NAME_ANNOTATIONS and isinstance(note, str) and ("/" in note or ":" in note)
        ]
    return found


_OCI_KEYS = frozenset(
    {"schemaVersion", "mediaType", "manifests", "digest", "size", "annotations", "platform"}
    | set(_NAME_ANNOTATIONS)
)


def _exact_keys(value: Any, where: str) -> None:
    """An OCI index is free-form, but a key that folds onto one Docker reads, spelled
    otherwise, would be read by Docker and not by us: refused."""
    known = {k.lower(): k for k in _OCI_KEYS}
    if isinstance(value, dict):
        for key, item in value.items():
            if known.get(key.lower(), key) != key:
                raise Refused(f"{where}: {key!r} is spelled unlike Docker's {known[key.lower()]!r}")
            _exact_keys(item, where)
    elif isinstance(value, list):
        for item in value:
            _exact_keys(item, where)


# --- build contexts ---------------------------------------------------------------------

_INSTRUCTION = re.compile(r"^\s*(?P<word>[A-Za-z]+)(?:\s+(?P<args>.*))?$", re.DOTALL)
_DIRECTIVE = re.compile(r"^#\s*(?P<key>[a-zA-Z][a-zA-Z0-9_-]*)\s*=\s*(?P<value>.*)$")
_FROM_FLAG = re.compile(r"--from=(?P<ref>\S+)", re.IGNORECASE)
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass(frozen=True)
class Build:
    """A build context as the gateway forwards it."""

    context: bytes
    bases: list[str]  # images the build starts from or copies from


def instructions(text: str) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as Docker's parser reads them: a byte-order mark is
    dropped, parser directives and comments are skipped (also inside a continuation), and
    a line ending in a backslash continues on the next non-comment line."""
    text = text.removeprefix("\ufeff")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    found: list[tuple[str, str]] = []
    directives = True
    pending = ""
    for line in lines:
        stripped = line.strip()
        if directives and stripped.startswith("#"):
            directive = _DIRECTIVE.match(stripped)
            if directive and directive["key"].lower() == "escape":
                raise Refused("the escape directive is not supported by the gateway")
            if directive:
                continue
        directives = False
        if stripped.startswith("#") or (pending and not stripped):
            continue  # comments, and empty lines inside a continuation, are dropped
        if not stripped and not pending:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        logical, pending = pending + line, ""
        parsed = _INSTRUCTION.match(logical)
        if not parsed:
            raise Refused(f"cannot read the Dockerfile line {logical.strip()!r}")
        found.append((parsed["word"].upper(), (parsed["args"] or "").strip()))
    if pending.strip():
        parsed = _INSTRUCTION.match(pending)
        if not parsed:
            raise Refused(f"cannot read the Dockerfile line {pending.strip()!r}")
        found.append((parsed["word"].upper(), (parsed["args"] or "").strip()))
    return found


def build_context(archive: bytes, dockerfile: str, user: str) -> Build:
    """The context with exactly one Dockerfile, the gateway's own rendering of it."""
    wanted = member_path(dockerfile)
    if not wanted or wanted.startswith("../") or wanted == "..":
        raise Refused("the Dockerfile must lie inside the build context")
    text = None
    output = io.BytesIO()
    with (
        _open(archive, "build context") as tar,
        tarfile.open(fileobj=output, mode="w", format=tarfile.PAX_FORMAT) as packed,
    ):
        for member in _members(tar):  # streamed across: never more than the archive sent
            if member_path(member.name) == wanted:
                if text is not None or not member.isfile():
                    raise Refused(f"{dockerfile} appears twice or is not a regular file")
                extracted = tar.extractfile(member)
                text = (extracted.read() if extracted else b"").decode("utf-8", "replace")
                continue
            packed.addfile(member, tar.extractfile(member) if member.isfile() else None)
        if text is None:
            raise BadRequest(f"no {dockerfile} in the build context")
        rendered, bases = render(instructions(text), user)
        info = tarfile.TarInfo(wanted)
        body = rendered.encode()
        info.size, info.mode = len(body), 0o644
        packed.addfile(info, io.BytesIO(body))
    return Build(output.getvalue(), bases)


def render(steps: list[tuple[str, str]], user: str) -> tuple[str, list[str]]:
    """The Dockerfile to forward, and the images it names."""
    out: list[str] = []
    stages: set[str] = set()  # stages already complete: only those can be copied from
    current: str | None = None
    count = 0
    bases: list[str] = []
    for word, args in steps:
        names_image = word == "FROM" or (
            word in ("COPY", "ADD", "ONBUILD") and _FROM_FLAG.search(args)
        )
        if "$" in args and names_image:
            raise Refused(f"{word} with variables is not supported by the gateway: {args!r}")
        if word == "FROM":
            if current is not None:
                stages.add(current)  # the previous stage is complete now
            words = [w for w in args.split() if not w.startswith("--")]
            if not words:
                raise Refused("FROM names no image")
            if words[0].lower() not in stages and words[0].lower() != "scratch":
                bases.append(words[0])
            current = words[2].lower() if len(words) >= 3 and words[1].lower() == "as" else None
            stages.add(str(count))
            count += 1
            if current is None:
                current = f"#{count}"  # unnamed: copied from by its index only
            out += [f"FROM {args}", f'LABEL ds01.user="{user}"']
            continue
        if word == "ONBUILD" and _FROM_FLAG.search(args):
            raise Refused("ONBUILD with --from is for admins")
        if word == "ADD" and any(_URL.match(part) for part in args.split()):
            raise Refused("ADD from a URL is for admins: download in a RUN step instead")
        if word == "LABEL" and (
            re.search(r"(^|\s)[\"']?(ds01|aime)", args, re.IGNORECASE) or re.search(r"[\\$]", args)
        ):
            raise Refused("ds01 and MLC labels are ds01's to set (and LABEL takes no \\ or $)")
        for copied in _FROM_FLAG.finditer(args):
            ref = copied["ref"].strip("\"'").lower()
            if ref == current or (ref.isdigit() and int(ref) >= count - 1):
                # Docker knows only completed stages: it would look this name up as an image
                raise Refused(f"--from={ref} names a stage that is not complete yet")
            if ref not in stages:
                bases.append(copied["ref"].strip("\"'"))
        out.append(f"{word} {args}".rstrip())
    if not any(word == "FROM" for word, _ in steps):
        raise Refused("the Dockerfile has no FROM")
    return "\n".join(out) + "\n", bases


def onbuild_copies(triggers: list[str] | None) -> bool:
    """Whether a base image's ONBUILD triggers copy from another image."""
    return any(_FROM_FLAG.search(trigger) for trigger in triggers or [])
