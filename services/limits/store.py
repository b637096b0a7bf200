"""The configuration being served, reloaded when its files change.

A reload that fails keeps the last good configuration serving and records the problems
for ValidateConfig and ``ds01 limits check``. Subscribers learn which users' limits a
successful reload changed, and who joined or left the admin group's Linux members,
which are read at each reload and once a minute: every answer the services keep is
then as fresh as the change stream, for as long as nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ds01.limits.config import (
    MEMBERS_DIR,
    OVERRIDES_FILE,
    LimitsConfig,
    LimitsConfigError,
    load_limits,
)
from ds01.limits.resolve import is_admin, resolve, unix_group_members
from ds01.limits.source import Issue

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.2  # changes are served within a second
# Seconds between readings of the admin group's Linux members: NSS (LDAP) can be slow,
# and nothing tells of a change there.
UNIX_GROUP_EVERY = 60.0
# A name no group or override can list: how every unlisted user resolves.
_UNLISTED = "\x00unlisted"


@dataclass(frozen=True)
class Change:
    """What one successful reload, or one reading of the admin group, changed."""

    users: frozenset[str]  # listed users (members or overrides) whose limits changed,
    # or who joined or left the admin group's Linux members
    default_users_changed: bool  # every user listed nowhere resolves differently now
    digest: str


def listed_users(config: LimitsConfig) -> set[str]:
    """Every name the configuration lists, as written (raw or sanitized)."""
    users = set(config.overrides) | set(config.archived)
    for group in config.groups.values():
        users.update(group.members)
    return users


def changed_users(
    old: LimitsConfig, new: LimitsConfig, admins_moved: frozenset[str] = frozenset()
) -> Change:
    users = listed_users(old) | listed_users(new)
    return Change(
        users=frozenset(u for u in users if resolve(old, u) != resolve(new, u)) | admins_moved,
        default_users_changed=resolve(old, _UNLISTED) != resolve(new, _UNLISTED),
        digest=new.digest,
    )


class LimitsStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.config: LimitsConfig | None = None
        self.error: LimitsConfigError | None = None
        self._signature: tuple[object, ...] | None = None
        self._subscribers: set[asyncio.Queue[Change]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # The admin group's Linux members as last read, for the configuration served;
        # replaced (never changed) when they change, so it names a reading.
        self.unix_admins: frozenset[str] = frozenset()

    def is_admin(self, user: str) -> bool:
        config = self.config
        return user == "root" or (config is not None and is_admin(config, user, self.unix_admins))

    def read_admin_group(self) -> Change | None:
        """Read the admin group's Linux members now; what changed, if anyone joined or
        left (published like a reload's)."""
        config = self.config
        if config is None:
            return None
        moved = self._take_admins(config)
        if not moved:
            return None
        change = Change(moved, False, config.digest)
        self._publish(change)
        return change

    def _take_admins(self, config: LimitsConfig) -> frozenset[str]:
        """Read ``config``'s admin group's Linux members and keep them (before ``config``
        serves: its admins come with it); who joined or left since the last reading."""
        members = _unix_admins(config)
        moved = members ^ self.unix_admins
        if moved:
            log.info(
                "admin group %s: %s joined, %s left",
                config.admin_group,
                ", ".join(sorted(members - self.unix_admins)) or "nobody",
                ", ".join(sorted(self.unix_admins - members)) or "nobody",
            )
            self.unix_admins = members
        return moved

    def signature(self) -> tuple[object, ...]:
        """Cheap fingerprint of every file the configuration is read from."""
        paths = [self.path, self.path.parent / OVERRIDES_FILE]
        members = self.path.parent / MEMBERS_DIR
        with contextlib.suppress(OSError):
            paths += sorted(members.iterdir())
        return tuple(_stat(p) for p in paths)

    def reload(self) -> Change | None:
        """Read the files now. Returns what changed, or None if nothing or it failed."""
        try:
            new = load_limits(self.path)
        except Exception as err:  # nothing a file contains may stop the service
            if not isinstance(err, LimitsConfigError):
                log.exception("unexpected failure reading %s", self.path)
                err = LimitsConfigError([Issue(str(self.path), 0, "", f"cannot be read: {err!r}")])
            if self.error is None or err.issues != self.error.issues:
                serving = (
                    f"still serving {self.config.digest}" if self.config else "nothing to serve"
                )
                log.error("limits configuration refused (%s):\n%s", serving, err)
            self.error = err
            return None
        moved = self._take_admins(new)
        old, self.config, self.error = self.config, new, None
        try:
            change = self._what_changed(old, new, moved)
        except Exception:  # whatever it was, what other services keep must go
            log.exception("cannot tell what limits configuration %s changed", new.digest)
            listed = listed_users(new) | (listed_users(old) if old else set())
            change = Change(frozenset(listed) | moved, True, new.digest)
        if change is not None:
            self._publish(change)
        return change

    def _what_changed(
        self, old: LimitsConfig | None, new: LimitsConfig, moved: frozenset[str]
    ) -> Change | None:
        if old is None:
            # First configuration (perhaps after a broken start): everyone's limits are new.
            log.info("limits configuration %s loaded from %s", new.digest, self.path)
            return Change(frozenset(listed_users(new)), True, new.digest)
        if old.digest != new.digest:
            change = changed_users(old, new, moved)
            log.info(
                "limits configuration %s loaded; changed: %s%s",
                new.digest,
                ", ".join(sorted(change.users)) or "no listed user",
                " and every unlisted user" if change.default_users_changed else "",
            )
            return change
        if moved:  # the same text: only the admin group's members changed
            return Change(moved, False, new.digest)
        return None

    def poll(self) -> Change | None:
        signature = self.signature()
        if signature == self._signature:
            return None
        self._signature = signature
        return self.reload()

    async def run(
        self,
        interval: float = POLL_INTERVAL,
        after_poll: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Poll the files until cancelled; polling a few stat() calls is cheap and,
        unlike inotify, sees files replaced by editors, config management and mounts.
        The admin group's members are read every UNIX_GROUP_EVERY seconds."""
        self._loop = asyncio.get_running_loop()
        group_read = time.monotonic()
        while True:
            try:
                await asyncio.to_thread(self.poll)
                if time.monotonic() - group_read >= UNIX_GROUP_EVERY:
                    group_read = time.monotonic()
                    await asyncio.to_thread(self.read_admin_group)
                if after_poll is not None:
                    await after_poll()
            except Exception:  # one failed round must not end reloads for good
                log.exception("reading the limits configuration failed; trying again")
            await asyncio.sleep(interval)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[Change]]:
        queue: asyncio.Queue[Change] = asyncio.Queue(maxsize=256)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def _publish(self, change: Change) -> None:
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._deliver, change)

    def _deliver(self, change: Change) -> None:
        for queue in list(self._subscribers):
            if queue.full():  # a stalled watcher loses its oldest news, not the service
                queue.get_nowait()
            queue.put_nowait(change)


def _unix_admins(config: LimitsConfig) -> frozenset[str]:
    """The Linux members of ``config``'s admin group (none where it names none)."""
    return unix_group_members(config.admin_group) if config.admin_group else frozenset()


def _stat(path: Path) -> object:
    try:
        st = os.stat(path)
    except OSError:
        return (str(path), None)
    return (str(path), st.st_mtime_ns, st.st_size, st.st_ino)
