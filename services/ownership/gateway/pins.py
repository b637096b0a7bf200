"""Bind sources pinned by the gateway, so Docker never follows a path its user controls.

Docker resolves a bind source when it mounts it, at every start, restarts by a restart
policy included, as root. A user who swaps a directory of their home for a symlink at the
right moment would have a victim's container root or a volume mounted into their own. So
the gateway opens the source itself, walking down from the home without following any
symlink, bind-mounts exactly that directory or file onto a fresh root-owned path, and
hands Docker that path. What is mounted there cannot change afterwards; if the pin is
gone (a reboot), Docker finds an empty root-owned directory, never the user's path.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import stat
import time
from pathlib import Path, PurePosixPath

from ds01.ownership.gateway.policy import Refused

log = logging.getLogger(__name__)

PINS_LABEL = "ds01.pins"  # the tokens of a container's pinned bind sources, space separated
_MS_BIND = 4096
_MNT_DETACH = 2
_FRESH = 30.0  # seconds a pin without a container is kept: another process's create
PINS_PER_USER = 256  # live pins of one user: each is a mount in the host's table
_libc = ctypes.CDLL(None, use_errno=True)


class Pins:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pending: set[str] = set()  # pinned for a create that has not finished
        self.owners: dict[str, int] = {}  # token -> uid, for the per-user count

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # root's only: nobody browses other users' pins
        for record in self.root.glob("*.json"):
            try:
                self.owners[record.stem] = int(json.loads(record.read_text())["uid"])
            except (OSError, ValueError, KeyError):
                continue

    def done(self, token: str) -> None:
        """Its create has finished: from now on its container's label keeps it."""
        self.pending.discard(token)

    def owns(self, path: str) -> bool:
        return PurePosixPath(path).parent == PurePosixPath(self.root)

    def pin(self, home: PurePosixPath, source: str, uid: int) -> str:
        """Pin ``source`` (a real path inside ``home``); the path to hand Docker."""
        if sum(1 for owner in self.owners.values() if owner == uid) >= PINS_PER_USER:
            raise Refused(f"you have {PINS_PER_USER} bind mounts in use: remove containers first")
        token = secrets.token_hex(16)
        self.pending.add(token)
        self.owners[token] = uid
        record = {"source": source, "home": str(home), "uid": uid}
        (self.root / f"{token}.json").write_text(json.dumps(record))
        try:
            self._mount(token, record)
        except BaseException:
            self.unpin(token)
            raise
        return str(self.root / token)

    def repin(self, path: str) -> None:
        """Mount a pin again (after a reboot, say), walking from the home afresh."""
        token = PurePosixPath(path).name
        if _mounted(path):
            return
        try:
            record = json.loads((self.root / f"{token}.json").read_text())
        except (OSError, ValueError):
            message = f"the bind source behind {path} is not known; recreate the container"
            raise Refused(message) from None
        self._mount(token, record)

    def unpin(self, token: str) -> None:
        self.pending.discard(token)
        self.owners.pop(token, None)
        target = self.root / token
        if _libc.umount2(str(target).encode(), _MNT_DETACH) != 0:
            code = ctypes.get_errno()
            if code not in (errno.EINVAL, errno.ENOENT):
                log.warning("cannot unmount pin %s: %s", target, os.strerror(code))
        for leftover in (target, self.root / f"{token}.json"):
            try:
                leftover.rmdir() if leftover.is_dir() else leftover.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                log.warning("cannot remove pin %s: %s", leftover, err)

    def sweep(self, in_use: set[str]) -> int:
        """Unpin what no container refers to any more (old enough not to be a create in
        progress). Returns how many went."""
        gone = 0
        for record in self.root.glob("*.json"):
            token = record.stem
            if token in in_use or token in self.pending:
                continue
            if time.time() - record.stat().st_mtime < _FRESH:
                continue
            self.unpin(token)
            gone += 1
        return gone

    def release_all(self) -> None:
        """Unpin everything (a host being taken down; the tests' teardown)."""
        for record in self.root.glob("*.json"):
            self.unpin(record.stem)

    def _mount(self, token: str, record: dict[str, object]) -> None:
        home, source = PurePosixPath(str(record["home"])), PurePosixPath(str(record["source"]))
        descriptor = _open_beneath(home, source)
        try:
            target = self.root / token
            if stat.S_ISDIR(os.fstat(descriptor).st_mode):
                target.mkdir(mode=0o700, exist_ok=True)
            else:
                target.touch(mode=0o600, exist_ok=True)
            proc = f"/proc/self/fd/{descriptor}".encode()
            if _libc.mount(proc, str(target).encode(), None, _MS_BIND, None) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"cannot pin {source}: {os.strerror(code)}")
        finally:
            os.close(descriptor)


def _mounted(path: str) -> bool:
    """Whether something is mounted at ``path``, as the kernel lists it (a bind mount on
    the same filesystem looks like any directory to stat)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            point = line.split(" ", 5)[4]
            if re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), point) == path:
                return True
    return False


def _open_beneath(home: PurePosixPath, source: PurePosixPath) -> int:
    """An O_PATH descriptor of ``source``, reached from ``home`` one name at a time without
    following a symlink: if any part was swapped for one since it was checked, refused."""
    try:
        relative = source.relative_to(home)
    except ValueError:
        raise Refused(f"bind mounts must lie in your home {home}, not {source}") from None
    descriptor = os.open(home, os.O_PATH | os.O_DIRECTORY)
    try:
        for part in relative.parts:
            child = os.open(part, os.O_PATH | os.O_NOFOLLOW, dir_fd=descriptor)
            os.close(descriptor)
            descriptor = child
            mode = os.fstat(descriptor).st_mode
            if stat.S_ISLNK(mode):
                raise Refused(f"{source} changed while it was checked (a symlink); not mounted")
        mode = os.fstat(descriptor).st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise Refused(f"{source} is neither a directory nor a file")
        return descriptor
    except FileNotFoundError:
        os.close(descriptor)
        raise Refused(f"bind source {source} does not exist: make it first") from None
    except BaseException:
        os.close(descriptor)
        raise
