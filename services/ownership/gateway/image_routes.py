"""Admission of image requests: images are read where shared or owned, and written only in
the caller's namespace; builds, loads and imports are checked again from Docker's report."""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import quote

from ds01.core.docker_api import image_path
from ds01.ownership.gateway import archives, filters, images, policy
from ds01.ownership.gateway.decisions import Decision, message, one
from ds01.ownership.gateway.images import (
    OWNER_LABEL,
    Access,
    ImageName,
    access,
    is_id,
    namespace_owner,
    parse_name,
    require_writable,
)
from ds01.ownership.gateway.policy import Caps, Refused
from ds01.ownership.gateway.request import Request
from ds01.ownership.gateway.strict import BadRequest, encode_query, go_bool
from ds01.ownership.owners import user_exists

log = logging.getLogger(__name__)


class ImageRoutes(Request):
    async def _image_list(self, body: bytes) -> Decision:
        user = self.caller.user
        return self._listing("/images/json", lambda data: filters.images(data, user))

    async def _image_read(self, body: bytes) -> Decision:
        reference = self.match.params["image"]
        found = await self._visible_image(reference)
        if self.route.pattern.endswith("/get") and not is_id(reference):
            return self._forward(self._path(image=parse_name(reference).tagged()))
        if self.route.pattern.endswith("/json"):  # other users' names of it stay hidden
            user = self.caller.user
            return self._listing(self._path(image=found.id), lambda d: filters.image(d, user))
        return self._forward(self._path(image=found.id))

    async def _images_save(self, body: bytes) -> Decision:
        names = []
        for reference in self.query.get("names", []):
            await self._visible_image(reference)
            names.append(reference if is_id(reference) else parse_name(reference).tagged())
        self.query["names"] = names
        return self._forward("/images/get")

    async def _image_tag(self, body: bytes) -> Decision:
        source = await self._visible_image(self.match.params["image"])
        repo = one(self.query, "repo")
        tag = one(self.query, "tag") or "latest"
        name = require_writable(f"{repo}:{tag}", self.caller.user)
        self.query = {"repo": [name.repository], "tag": [tag]}

        async def rewrite(status: int, data: bytes) -> tuple[int, bytes]:
            if status != 201:
                return status, data
            made = await self.daemon.image(str(name)) or {}
            if made.get("Id") != source.id:
                await self.daemon.delete(f"/images/{quote(str(name), safe='/:')}")
                return 403, message("Permission denied: Docker tagged something else; undone")
            return status, data

        return self._forward(self._path(image=source.id), rewrite=rewrite)

    async def _image_delete(self, body: bytes) -> Decision:
        reference = self.match.params["image"]
        if is_id(reference):
            visible = await self._visible_image(reference)  # another's: as if none
            found = await self.daemon.image(visible.id) or {}
            if visible.owner != self.caller.user or not all(
                _writable(tag, self.caller.user) for tag in found.get("RepoTags") or []
            ):
                raise Refused("Permission denied: remove a shared image's name, not the image")
            return self._forward(self._path(image=visible.id))
        name = require_writable(reference, self.caller.user)
        return self._forward(self._path(image=name.tagged()))

    async def _image_create(self, body: bytes) -> Decision:
        """Pull a shared image; import only into one's own namespace, and only from the
        request body (a URL would be fetched by the daemon)."""
        if one(self.query, "fromSrc"):
            return await self._import(body)
        if body:
            raise BadRequest("a pull carries no body")
        image = one(self.query, "fromImage")
        name = parse_name(image + (f":{one(self.query, 'tag')}" if self.query.get("tag") else ""))
        if name.domain is not None:  # the daemon would connect wherever the name says
            raise Refused("pulls from registries other than Docker Hub are for admins")
        owner = namespace_owner(name, user_exists)
        if owner not in (None, self.caller.user):
            raise Refused(f"Permission denied: {name.repository} is {owner}'s namespace")
        return self._forward("/images/create")

    async def _import(self, body: bytes) -> Decision:
        if one(self.query, "fromSrc") != "-":
            raise Refused("import reads the archive from the request only, not from a URL")
        name = self._target_name()
        changes = policy.admit_changes(self.query.get("changes", []))
        self.query["changes"] = [*changes, f'LABEL {OWNER_LABEL}="{self.caller.user}"']
        self.query["repo"], self.query["tag"] = [name.repository], [name.tag or "latest"]
        return self._forward_archive("/images/create", body)

    async def _image_load(self, body: bytes) -> Decision:
        for name in archives.image_names(body):
            require_writable(name, self.caller.user)
        return self._forward_archive("/images/load", body)

    def _target_name(self) -> ImageName:
        """The name a commit or import writes: ``repo`` (which may carry the tag) and
        ``tag``, as Docker joins them; the caller's to write or refused."""
        repo, tag = one(self.query, "repo"), one(self.query, "tag")
        name = require_writable(repo, self.caller.user)
        if tag and name.tag:
            raise BadRequest("give the tag in repo or in tag, not in both")
        return require_writable(
            f"{name.repository}:{tag or name.tag or 'latest'}", self.caller.user
        )

    async def _check_made_images(self, output: bytes) -> bytes | None:
        """After a load or import, from Docker's own report (nothing of the caller's runs
        in those, so every line is Docker's): every name it tagged must be the caller's to
        write, and labelled for nobody else; a name it took from someone is given back."""
        wrong: list[str] = []
        renamed: dict[str, str] = {}  # name -> the image it named before
        for said in _messages(output):
            found = _RENAMED.search(said)
            if found:
                renamed[found["name"]] = found["old"]
            for made in _MADE.findall(said):
                if not _writable(made, self.caller.user) or not await self._labelled_theirs(made):
                    wrong.append(made)
                    await self._give_back(made, renamed.get(made))
        return _undone(wrong, self.caller.user)

    async def _labelled_theirs(self, name: str) -> bool:
        """An image made for the caller carries no other user's owner label."""
        found = await self.daemon.image(name) or {}
        owner = images.config_labels(found).get(OWNER_LABEL)
        return owner in (None, self.caller.user)

    async def _give_back(self, name: str, previous: str | None) -> None:
        """Remove ``name`` from what was made, and point it at its old image again."""
        await self.daemon.delete(f"{image_path(name)}?noprune=1")
        if previous:
            tagged = parse_name(name)
            query = encode_query({"repo": [tagged.repository], "tag": [tagged.tag or "latest"]})
            await self.daemon.call("POST", f"/images/{quote(previous, safe=':')}/tag?{query}")

    async def _check_built(self, tags: list[str]) -> bytes | None:
        """After a build, from the names the gateway itself let it write, never from its
        output (a RUN step prints whatever it likes there): each must name an image with
        the caller's label that stands only on images they may read, or it is untagged."""
        wrong = []
        for tag in tags:
            made = await self.daemon.image(tag)
            if made is not None and not await self._built_by_the_rules(made):
                wrong.append(tag)
                await self.daemon.delete(f"/images/{quote(tag, safe='/:')}?noprune=1")
        return _undone(wrong, self.caller.user)

    async def _built_by_the_rules(self, made: dict[str, Any]) -> bool:
        if images.config_labels(made).get(OWNER_LABEL) != self.caller.user:
            return False
        parent, seen = made.get("Parent") or "", 0
        while parent and seen < 1000:
            above = await self.daemon.image(parent) or {}
            tags = above.get("RepoTags") or []
            labels = images.config_labels(above)
            if access(self.caller.user, tags, labels, user_exists) is Access.PRIVATE:
                return False  # stands on an image that is not the caller's to read
            parent, seen = above.get("Parent") or "", seen + 1
        return True

    async def _commit(self, body: bytes) -> Decision:
        found = await self._own_container(one(self.query, "container"))
        self.query["container"] = [found["Id"]]
        if one(self.query, "repo"):
            name = self._target_name()
            self.query["repo"], self.query["tag"] = [name.repository], [name.tag or "latest"]
        changes = policy.admit_changes(self.query.get("changes", []))
        self.query["changes"] = [*changes, f'LABEL {OWNER_LABEL}="{self.caller.user}"']
        config = self._json(body)
        if config is not None:
            config["Labels"] = policy.own_labels(config.get("Labels"), self.caller.user)
            config.pop("User", None)
        user = self.caller.user

        async def rewrite(status: int, data: bytes) -> tuple[int, bytes]:
            if status != 201:
                return status, data
            image_id = str((json.loads(data) or {}).get("Id", ""))
            made = await self.daemon.image(image_id) or {}
            labels = images.config_labels(made)
            tags = made.get("RepoTags") or []
            if labels.get(OWNER_LABEL) != user or any(
                access(user, [t], {}, user_exists) is not Access.OWN for t in tags
            ):
                await self.daemon.delete(f"/images/{image_id}?force=1")
                return 403, message("Permission denied: the committed image was not yours")
            return status, data

        return self._forward("/commit", config, rewrite=rewrite)

    async def _build(self, body: bytes) -> Decision:
        caller = await self._settings()
        query = self.query
        for key in ("remote", "session", "outputs", "cachefrom", "squash"):
            if go_bool(one(query, key)) or (key != "squash" and one(query, key)):
                raise Refused(f"build option {key} is for admins")
        if one(query, "version") not in ("", "1"):
            raise Refused("BuildKit builds are for admins; build with DOCKER_BUILDKIT=0")
        if go_bool(one(query, "pull")):
            raise Refused("build --pull is for admins: it rewrites shared base images")
        if one(query, "networkmode") not in ("", "default", "none"):
            raise Refused("builds run on the default network or none")
        if one(query, "isolation") not in ("", "default"):
            raise Refused("another isolation is for admins")
        query["t"] = [require_writable(t, caller.user).tagged() for t in query.get("t", [])]
        labels = _json_param(query, "labels", dict) or {}
        query["labels"] = [json.dumps(policy.own_labels(labels, caller.user))]
        ulimits = _json_param(query, "ulimits", list) or []
        query["ulimits"] = [json.dumps([policy.admit_ulimit(u, caller.caps) for u in ulimits])]
        query["cgroupparent"] = [caller.cgroup_parent]
        _clamp_build(query, caller.caps)
        dockerfile = archives.member_path(one(query, "dockerfile") or "Dockerfile")
        build = archives.build_context(body, dockerfile, caller.user)
        query["dockerfile"] = [dockerfile]
        for base in build.bases:
            found = await self._visible_image(base)
            if archives.onbuild_copies(found.onbuild):
                raise Refused(f"{base} has ONBUILD triggers that copy from other images")
        forward = self._forward_archive("/build", build.context)
        built = query["t"]
        forward.finish = lambda _output: self._check_built(built)
        return forward


def _json_param(query: dict[str, list[str]], key: str, kind: type) -> Any:
    text = one(query, key)
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise BadRequest(f"the query parameter {key} is not JSON") from None
    if value is not None and not isinstance(value, kind):
        raise BadRequest(f"the query parameter {key} must be a JSON {kind.__name__}")
    return value


def _clamp_build(query: dict[str, list[str]], caps: Caps) -> None:
    """A build's containers stay within the user's per-container limits."""

    def number(key: str) -> int:
        text = one(query, key) or "0"
        if not re.fullmatch(r"-?[0-9]{1,19}", text):
            raise BadRequest(f"the query parameter {key} must be a number")
        return int(text)

    for key, cap in (
        ("memory", caps.memory),
        ("memswap", caps.memory_swap),
        ("shmsize", caps.shm_size),
    ):
        if cap is not None and not 0 < number(key) <= cap:
            query[key] = [str(cap)]
    if not 0 <= number("cpushares") <= policy.CPU_SHARES:
        query["cpushares"] = [str(policy.CPU_SHARES)]
    if caps.nano_cpus is not None:
        query["cpuperiod"] = ["100000"]
        query["cpuquota"] = [str(caps.nano_cpus * 100000 // 10**9)]


_RENAMED = re.compile(
    r"The image (?P<name>\S+) already exists, renaming the old one with ID (?P<old>\S+)"
)
_MADE = re.compile(r"(?:Loaded image: |Successfully tagged )(\S+)")


def _undone(wrong: list[str], user: str) -> bytes | None:
    """The error line appended to the stream when something made had to be undone."""
    if not wrong:
        return None
    text = f"Permission denied: undone: {', '.join(wrong)}"
    log.warning("%s: %s", user, text)
    return json.dumps({"errorDetail": {"message": text}, "error": text}).encode() + b"\n"


def _messages(output: bytes) -> list[str]:
    """The text of each JSON progress message Docker streamed."""
    found = []
    for line in output.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict):
            found.append(str(message.get("stream") or message.get("status") or ""))
    return found


def _writable(name: str, user: str) -> bool:
    try:
        require_writable(name, user)
    except (PermissionError, BadRequest):
        return name.startswith("sha256:")  # an id is no name
    return True
