"""Default deny: the one table of Docker Engine API routes a non-admin may call.

Each route names the objects its path refers to, the query parameters it takes, the body
it carries and the admission step that decides it. A request that matches no route is for
admins. Paths are matched after the version prefix (``/v1.41``) is taken off, the way
Docker's router takes it off; object references never contain ``/`` except image names,
which Docker's router also reads greedily.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from ds01.ownership.gateway import fields
from ds01.ownership.gateway.fields import Schema
from ds01.ownership.gateway.strict import BadRequest

TAR = "tar"  # a body Docker reads as a tar archive (build context, image load/import)
_VERSION = re.compile(r"/v(?P<version>[0-9][0-9.]*)(?P<rest>/.*)")
_PARAMS = {
    "container": r"(?P<container>[^/]+)",
    "exec": r"(?P<exec>[^/]+)",
    "volume": r"(?P<volume>[^/]+)",
    "network": r"(?P<network>[^/]+)",
    "image": r"(?P<image>.+)",
}
_FILTERS = ("filters",)
_LOGS = ("follow", "stdout", "stderr", "since", "until", "timestamps", "tail", "details")
_ATTACH = ("detachKeys", "logs", "stream", "stdin", "stdout", "stderr")
BUILD_QUERY = (
    "dockerfile",
    "t",
    "extrahosts",
    "remote",
    "q",
    "nocache",
    "cachefrom",
    "pull",
    "rm",
    "forcerm",
    "memory",
    "memswap",
    "cpushares",
    "cpusetcpus",
    "cpuperiod",
    "cpuquota",
    "buildargs",
    "shmsize",
    "squash",
    "labels",
    "networkmode",
    "platform",
    "target",
    "outputs",
    "version",
    "ulimits",
    "cgroupparent",
    "isolation",
    "session",
    "buildid",
)


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    action: str
    query: tuple[str, ...] = ()
    repeat: tuple[str, ...] = ()
    body: Schema | str | None = None
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        expanded = re.sub(r"\{(\w+)\}", lambda m: _PARAMS[m[1]], self.pattern)
        object.__setattr__(self, "regex", re.compile(f"^{expanded}$"))


ROUTES: tuple[Route, ...] = (
    # The daemon itself.
    Route("GET", "/_ping", "pass"),
    Route("HEAD", "/_ping", "pass"),
    Route("GET", "/version", "pass"),
    Route("GET", "/info", "pass"),
    Route("GET", "/events", "events", ("since", "until", "filters")),
    # Containers.
    Route("GET", "/containers/json", "container_list",
          ("all", "limit", "size", "trunc_cmd", "before", "since", *_FILTERS)),
    Route("POST", "/containers/create", "container_create", ("name", "platform"),
          body=fields.CONTAINER_CREATE),
    Route("POST", "/containers/prune", "container_prune", _FILTERS),
    Route("GET", "/containers/{container}/json", "container_inspect", ("size",)),
    Route("GET", "/containers/{container}/top", "container", ("ps_args",)),
    Route("GET", "/containers/{container}/logs", "container", _LOGS),
    Route("GET", "/containers/{container}/changes", "container"),
    Route("GET", "/containers/{container}/export", "container"),
    Route("GET", "/containers/{container}/stats", "container", ("stream", "one-shot")),
    Route("POST", "/containers/{container}/resize", "container", ("h", "w")),
    Route("POST", "/containers/{container}/start", "container_start", ("detachKeys",)),
    Route("POST", "/containers/{container}/stop", "container", ("t", "signal")),
    Route("POST", "/containers/{container}/restart", "container_start", ("t", "signal")),
    Route("POST", "/containers/{container}/kill", "container", ("signal",)),
    Route("POST", "/containers/{container}/update", "container_update",
          body=fields.CONTAINER_UPDATE),
    Route("POST", "/containers/{container}/rename", "container_rename", ("name",)),
    Route("POST", "/containers/{container}/pause", "container"),
    Route("POST", "/containers/{container}/unpause", "container_start"),
    Route("POST", "/containers/{container}/attach", "attach", _ATTACH),
    Route("POST", "/containers/{container}/wait", "container", ("condition",)),
    Route("DELETE", "/containers/{container}", "container_delete", ("v", "force", "link")),
    Route("HEAD", "/containers/{container}/archive", "container", ("path",)),
    Route("GET", "/containers/{container}/archive", "container", ("path",)),
    Route("POST", "/containers/{container}/exec", "exec_create", body=fields.EXEC_CREATE),
    Route("POST", "/exec/{exec}/start", "exec_start", body=fields.EXEC_START),
    Route("POST", "/exec/{exec}/resize", "exec", ("h", "w")),
    Route("GET", "/exec/{exec}/json", "exec"),
    # Images: read any shared image, write only in one's own namespace.
    Route("GET", "/images/json", "image_list",
          ("all", "filters", "shared-size", "digests", "manifests")),
    Route("POST", "/build", "build", BUILD_QUERY, repeat=("t", "cachefrom"), body=TAR),
    Route("POST", "/images/create", "image_create",
          ("fromImage", "fromSrc", "repo", "tag", "message", "changes", "platform"),
          repeat=("changes",), body=TAR),
    Route("POST", "/images/load", "image_load", ("quiet", "platform"), body=TAR),
    Route("GET", "/images/get", "images_save", ("names", "platform"), repeat=("names",)),
    Route("POST", "/commit", "commit",
          ("container", "repo", "tag", "comment", "author", "pause", "changes"),
          repeat=("changes",), body=fields.CONTAINER_CONFIG),
    Route("GET", "/images/{image}/json", "image_read", ("manifests",)),
    Route("GET", "/images/{image}/history", "image_read", ("platform",)),
    Route("GET", "/images/{image}/get", "image_read", ("platform",)),
    Route("POST", "/images/{image}/tag", "image_tag", ("repo", "tag")),
    Route("DELETE", "/images/{image}", "image_delete", ("force", "noprune", "platforms")),
    # Volumes and networks: their creator's.
    Route("GET", "/volumes", "volume_list", _FILTERS),
    Route("POST", "/volumes/create", "volume_create", body=fields.VOLUME_CREATE),
    Route("GET", "/volumes/{volume}", "volume"),
    Route("DELETE", "/volumes/{volume}", "volume", ("force",)),
    Route("GET", "/networks", "network_list", _FILTERS),
    Route("POST", "/networks/create", "network_create", body=fields.NETWORK_CREATE),
    Route("GET", "/networks/{network}", "network_read", ("verbose", "scope")),
    Route("DELETE", "/networks/{network}", "network"),
    Route("POST", "/networks/{network}/connect", "network_connect", body=fields.NETWORK_CONNECT),
    Route("POST", "/networks/{network}/disconnect", "network_connect",
          body=fields.NETWORK_DISCONNECT),
)  # fmt: skip

HIJACKING = frozenset({"attach", "exec_start"})


@dataclass(frozen=True)
class Match:
    route: Route
    version: str | None  # "1.41", or None when the client sent no version prefix
    params: dict[str, str]
    query: str

    def prefix(self) -> str:
        return f"/v{self.version}" if self.version else ""


def split_target(target: str) -> tuple[str | None, str, str]:
    """(API version, decoded path without it, raw query) as Docker's router reads them."""
    if "#" in target:
        raise BadRequest("'#' in a request target is refused")
    raw_path, _, query = target.partition("?")
    if not raw_path.startswith("/"):
        raise BadRequest("the request target must be an absolute path")
    path = unquote(raw_path, errors="strict")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in path):
        raise BadRequest("control characters or spaces in the path are refused")
    version = None
    found = _VERSION.fullmatch(path)
    if found:
        version, path = found["version"], found["rest"]
        if not re.fullmatch(r"1\.[0-9]{1,2}", version):
            raise BadRequest(f"API version {version!r} is not one Docker serves")
    return version, path, query


def match(method: str, target: str) -> Match | None:
    """The route a request takes, or None: then it is for admins."""
    version, path, query = split_target(target)
    for route in ROUTES:
        if route.method != method:
            continue
        found = route.regex.match(path)
        if found:
            return Match(route, version, found.groupdict(), query)
    return None
