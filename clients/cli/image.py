"""``ds01 image``: the seed's image-create, -list and -delete, in the caller's own
namespace, through this host's Docker gateway (which decides what is whose).

A user owns the images named ``<user>/...`` and ``ds01-<user>/...``; any other name
(``ubuntu:22.04``) is a shared base image that everyone may build on and only admins
may write; other users' images are invisible. A NAME without a namespace means the
caller's: ``proj:v1`` is ``<user>/proj:v1``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pwd
import re
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import click
import docker
import requests
from docker.errors import APIError, DockerException

from ds01.cli.common import AliasGroup, Settings, fail, output_option, print_table, run

_ID = re.compile(r"(?:sha256:)?[a-f0-9]{12,64}")


def _me() -> str:
    """The caller as the gateway knows them: the account of this process's uid."""
    return pwd.getpwuid(os.getuid()).pw_name


def _own(name: str, user: str) -> bool:
    """Whether ``name`` (as Docker lists it) lies in ``user``'s namespace."""
    first, slash, _rest = name.partition("/")
    return bool(slash) and first in (user, f"ds01-{user}")


def _in_namespace(name: str, user: str) -> str:
    """NAME as the caller means it: one without a namespace is theirs."""
    return name if "/" in name else f"{user}/{name}"


def _tagged(name: str) -> str:
    """NAME with Docker's default tag, as builds and listings spell it."""
    return name if ":" in name.rsplit("/", 1)[-1] or "@" in name else f"{name}:latest"


def _reason(err: APIError) -> str:
    return str(err.explanation or err).strip().rstrip(".")


@contextmanager
def _gateway(settings: Settings) -> Iterator[docker.APIClient]:
    """A Docker API client on this host's ds01 gateway; every failure one clear line."""
    socket = run(settings.config).ownership.proxy_socket
    if not socket.exists():
        fail(f"the ds01 Docker gateway is not running here ({socket} is missing): ask an admin")
    try:
        api = docker.APIClient(base_url=f"unix://{socket}", version="auto", timeout=120)
    except DockerException as err:
        fail(f"cannot reach the ds01 Docker gateway at {socket} ({err}): ask an admin")
    try:
        yield api
    except requests.RequestException as err:
        fail(f"the ds01 Docker gateway at {socket} did not answer ({err}): try again, or "
             "ask an admin")  # fmt: skip
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    finally:
        api.close()


def _inspect(api: docker.APIClient, name: str) -> dict[str, Any] | None:
    """The image NAME as the gateway shows it to the caller (None: none they may see)."""
    try:
        return api.inspect_image(name)
    except APIError as err:
        if err.status_code == 404:
            return None
        raise


@click.group(cls=AliasGroup, aliases={"ls": "list", "rm": "remove"})
def image() -> None:
    """Your Docker images: build, list (also ls), remove (also rm). Yours are named
    USER/NAME or ds01-USER/NAME; a NAME without a namespace is yours. Other names are
    shared base images, which everyone may build on and only admins change.

    \b
    Examples:
      ds01 image build proj:v1 .
      ds01 image ls
      ds01 image rm proj:v1
    """


def _build_args(
    _ctx: click.Context, _param: click.Parameter, given: tuple[str, ...]
) -> dict[str, str]:
    found = {}
    for item in given:
        key, equals, value = item.partition("=")
        if not key:
            raise click.BadParameter(f"{item!r}: write KEY=VALUE")
        if not equals:
            if key not in os.environ:
                raise click.BadParameter(f"{key} has no value and is not set in your environment")
            value = os.environ[key]
        found[key] = value
    return found


@image.command()
@click.argument("name")
@click.argument("context", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("-f", "--file", "dockerfile", metavar="DOCKERFILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="The Dockerfile (default: CONTEXT/Dockerfile).")  # fmt: skip
@click.option("--build-arg", "build_args", metavar="KEY=VALUE", multiple=True,
              callback=_build_args,
              help="A build argument (ARG in the Dockerfile); KEY alone takes your "
                   "environment's value. May be repeated.")  # fmt: skip
@click.option("--no-cache", is_flag=True, help="Run every step afresh, reusing no layer.")
@click.pass_obj
def build(
    settings: Settings,
    name: str,
    context: Path,
    dockerfile: Path | None,
    build_args: dict[str, str],
    no_cache: bool,
) -> None:
    """Build NAME from the directory CONTEXT (default: here). NAME without a namespace
    goes into yours: proj:v1 is USER/proj:v1. FROM may name your images and the shared
    ones.

    \b
    Examples:
      ds01 image build proj:v1 .
      ds01 image build proj:v2 ~/src/proj -f ~/src/proj/Dockerfile.gpu --build-arg CUDA=12.4
    """
    user = _me()
    tag = _tagged(_in_namespace(name, user))
    if not context.is_dir():
        fail(f"the build context {context} is not a directory you can read")
    if dockerfile is None and not (context / "Dockerfile").is_file():
        fail(f"there is no Dockerfile in {context}: write one, or name it with -f")
    if dockerfile is not None and not dockerfile.is_file():
        fail(f"there is no Dockerfile at {dockerfile}")
    if not docker.utils.match_tag(tag):
        fail(f"{name} is not an image name: lowercase letters, digits, '.', '_' and '-', "
             "then :TAG if you like (such as proj:v1)")  # fmt: skip
    with _gateway(settings) as api:
        try:
            archive, in_archive = _context(context, dockerfile)
            stream = api.build(
                fileobj=archive,
                custom_context=True,
                tag=tag,
                dockerfile=in_archive,
                buildargs=build_args or None,
                nocache=no_cache,
                # No intermediate container left behind, even by a failed step: each would
                # count against the user's containers.
                rm=True,
                forcerm=True,
                decode=True,
            )
            for message in stream:
                _show(message, tag)
        except APIError as err:
            hint = "" if _own(tag, user) else (
                f"; a NAME without a namespace, such as {tag.rsplit('/', 1)[-1]}, "
                f"builds into yours ({user}/...)"
            )  # fmt: skip
            fail(f"cannot build {tag}: {_reason(err)}{hint}")
        except DockerException as err:  # docker-py's own checks, such as the name's form
            fail(f"cannot build {tag}: {err}")
        except OSError as err:  # a file of the context that cannot be read
            fail(f"cannot read the build context: {err}")


def _context(context: Path, dockerfile: Path | None) -> tuple[IO[bytes], str]:
    """The build context as docker build sends it (.dockerignore applied), and the
    Dockerfile's path in it: one from outside the context travels inside it under a
    name of its own (docker-py would send that name and the file's text as two
    dockerfile parameters, which the gateway rightly refuses)."""
    root = context.resolve()
    ignore = root / ".dockerignore"
    exclude = [
        line.strip()
        for line in (ignore.read_text().splitlines() if ignore.is_file() else [])
        if line.strip() and not line.strip().startswith("#")
    ]
    if dockerfile is None:
        return docker.utils.tar(str(root), exclude=exclude), "Dockerfile"
    path = dockerfile.resolve()
    if path.is_relative_to(root):
        name = str(path.relative_to(root))
        return docker.utils.tar(str(root), exclude=exclude, dockerfile=(name, None)), name
    name = f".dockerfile.{secrets.token_hex(16)}"
    text = path.read_text()
    return docker.utils.tar(str(root), exclude=exclude, dockerfile=(name, text)), name


def _show(message: dict[str, Any], tag: str) -> None:
    """One message of the build's stream, printed as docker build prints it."""
    error = message.get("error") or (message.get("errorDetail") or {}).get("message")
    if error:
        sys.stdout.flush()
        fail(f"the build of {tag} failed: {str(error).strip()}")
    if "stream" in message:
        sys.stdout.write(str(message["stream"]))
    elif "status" in message:
        said = " ".join(str(message[k]) for k in ("id", "status", "progress") if message.get(k))
        sys.stdout.write(said + "\n")
    sys.stdout.flush()


def _listed(found: list[dict[str, Any]], user: str, shared: bool) -> list[dict[str, Any]]:
    """One row per name, as docker images: the caller's names (and, when ``shared``, the
    shared ones), and the caller's unnamed images (name None), newest first."""
    rows = []
    for item in found:
        names = [t for t in item.get("RepoTags") or [] if t != "<none>:<none>"]
        kept = [n for n in names if shared or _own(n, user)]
        labels = item.get("Labels") or {}
        if not names and labels.get("ds01.user") == user:
            kept = [None]
        for name in kept:
            rows.append({
                "name": name,
                "id": str(item.get("Id", "")).removeprefix("sha256:")[:12],
                "created": dt.datetime.fromtimestamp(int(item.get("Created") or 0), dt.UTC),
                "size": int(item.get("Size") or 0),
            })  # fmt: skip
    rows.sort(key=lambda r: (-r["created"].timestamp(), r["name"] or ""))
    return rows


def _human(size: int) -> str:
    """Bytes as docker images shows them: decimal units, three significant digits."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.3g}{unit}"
        value /= 1000
    raise AssertionError("unreachable")


@image.command("list", short_help="Your images (--all: the shared ones too).")
@click.option("--all", "shared", is_flag=True, help="The shared base images too.")
@output_option
@click.pass_obj
def list_(settings: Settings, shared: bool, output: str | None) -> None:
    """Your images; with --all also the shared base images you may build on.

    \b
    Examples:
      ds01 image ls
      ds01 image ls --all -o json
    """
    user = _me()
    with _gateway(settings) as api:
        try:
            # Not api.images(): it sends a query parameter Docker's API does not have.
            answer = api.get(f"{api.base_url}/v{api.api_version}/images/json")
            answer.raise_for_status()
        except requests.HTTPError as err:
            fail(f"cannot list images: {err.response.text.strip() or err}")
        rows = _listed(answer.json(), user, shared)
    if (output or settings.output) == "json":
        plain = [{**r, "created": r["created"].isoformat().replace("+00:00", "Z")} for r in rows]
        click.echo(json.dumps(plain, indent=2))
        return
    print_table(
        ["NAME", "ID", "CREATED", "SIZE"],
        [
            [
                r["name"] or "<none>:<none>",
                r["id"],
                r["created"].astimezone().strftime("%Y-%m-%d %H:%M"),
                _human(r["size"]),
            ]
            for r in rows
        ],
    )


def _resolve(api: docker.APIClient, name: str, user: str) -> str:
    """The image NAME means: an id or a name with a namespace as given (the gateway
    decides); a bare name the caller's own first, else a shared one of that name."""
    if _ID.fullmatch(name) or "/" in name:
        return name
    candidates = [f"{user}/{name}", f"ds01-{user}/{name}", name]
    for candidate in candidates:
        if _inspect(api, candidate) is not None:
            return candidate
    fail(f"no image {name}: neither {user}/{name} nor a shared {name} is here "
         "(`ds01 image ls --all` lists what you may use)")  # fmt: skip


@image.command(short_help="Remove one of your images.")
@click.argument("name")
@click.option("-f", "--force", is_flag=True,
              help="Remove it even if a container uses it (as docker rmi -f).")  # fmt: skip
@click.pass_obj
def remove(settings: Settings, name: str, force: bool) -> None:
    """Remove your image NAME; one without a namespace is looked for in yours first.
    The image goes once its last name does; shared images are an admin's to remove.

    \b
    Examples:
      ds01 image rm proj:v1
      ds01 image rm -f ds01-alice/old:2
    """
    user = _me()
    with _gateway(settings) as api:
        target = _resolve(api, name, user)
        try:
            done = api.remove_image(target, force=force)
        except APIError as err:
            if err.status_code == 404:
                fail(f"no such image: {target} (`ds01 image ls` lists yours)")
            if err.status_code == 409:
                fail(f"cannot remove {target}: {_reason(err)}; remove the container first "
                     "(`ds01 container ls`), or use --force")  # fmt: skip
            if err.status_code == 403 and not (_own(target, user) or _ID.fullmatch(target)):
                fail(f"cannot remove {target}: Permission denied: it is not in your namespace "
                     f"({user}/NAME or ds01-{user}/NAME); another user's image is theirs to "
                     "remove, a shared one an admin's (`ds01 image ls` lists yours)")  # fmt: skip
            fail(f"cannot remove {target}: {_reason(err)}")
    for line in done or []:
        for key, value in line.items():
            click.echo(f"{key}: {value}")
