"""The limits service's answers, kept by the services that ask for them on every call.

The allocator asks for a user's limits at each Allocate, the containers service for
limits and Docker arguments at each create and for policies at each sweep: each answer
is one more gRPC round trip on the same host. Answers are kept only while a WatchLimits
stream is open, and all of them are dropped on every change it reports, so a reload
applies to the next request. The stream reports every change an answer could see: a
reload, and who joined or left the admin group's Linux members (which the limits
service reads once a minute). A stream whose server vanished without a word ends
within half a minute (keepalive pings, see ``keepalive``), and all is dropped with it.
No answer is kept past RESYNC_AFTER all the same, as informers resync. Where the limits
service runs in the same process, its answers are asked of it directly
(``LocalAnswers``): no round trip, nothing to keep.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Protocol, TypeVar

from ds01.client import Ds01Client, Ds01Error
from ds01.core.docker_args import DockerInfo
from ds01.v1 import limits_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_ANSWERS = 50_000  # (user, container type) pairs kept; past that, all are dropped
RECONNECT_SECONDS = 1.0
RESYNC_AFTER = 600.0  # seconds an answer is kept at most, changes reported or not


class LocalAnswers(Protocol):
    """The limits service of this process, answering as over gRPC (its refusals as
    Ds01Error, with the same code and words)."""

    def limits(self, user: str, container_type: str = "") -> limits_pb2.UserLimits: ...

    def docker_args(
        self, user: str, container_type: str = "", docker: DockerInfo | None = None
    ) -> limits_pb2.GetDockerArgsResponse: ...


class CachedLimits:
    """GetLimits and GetDockerArgs through ``client``, answered from memory where the
    same question was answered since the last change; by ``local`` where the limits
    service runs in this process."""

    def __init__(self, client: Ds01Client, local: LocalAnswers | None = None) -> None:
        self.client = client
        self.local = local
        self._answers: dict[Hashable, tuple[float, Any]] = {}  # key -> (kept until, answer)
        self._watching = False
        # Changes seen: an answer asked for before a change and received after it is
        # not kept (it may predate the change).
        self._changes = 0
        # Questions on their way, by (key, changes seen when asked): asked once however
        # many ask at once, and never answered by a request begun before a change.
        self._asking: dict[tuple[Hashable, int], asyncio.Future[Any]] = {}

    async def follow_changes(self) -> None:
        """Keep the change stream open; without it, nothing is kept. Asked locally,
        nothing is kept anyway."""
        while self.local is None:
            try:
                async for _change in self.client.watch_limits():
                    self._forget()
                    self._watching = True
            except Ds01Error as err:
                log.warning("limits change stream lost (%s); not caching limits", err.message)
            finally:  # lost, or no longer followed: nothing may be kept meanwhile
                self._watching = False
                self._forget()
            await asyncio.sleep(RECONNECT_SECONDS)

    async def get_limits(self, user: str, container_type: str = "") -> limits_pb2.UserLimits:
        if self.local is not None:
            return self.local.limits(user, container_type)
        return await self._answer(
            ("limits", user, container_type),
            lambda: self.client.get_limits(user, container_type),
        )

    async def is_admin(self, user: str) -> bool:
        """Whether ``user`` is an admin now; Ds01Error when that cannot be told (each
        caller decides whether to fail closed or end its call)."""
        return (await self.get_limits(user)).admin

    async def get_docker_args(
        self, user: str, container_type: str, docker: DockerInfo
    ) -> limits_pb2.GetDockerArgsResponse:
        if self.local is not None:
            return self.local.docker_args(user, container_type, docker)
        return await self._answer(
            ("docker-args", user, container_type, docker),
            lambda: self.client.get_docker_args(user, container_type, docker),
        )

    async def _answer(self, key: Hashable, ask: Callable[[], Awaitable[T]]) -> T:
        kept = self._answers.get(key)
        if kept is not None and kept[0] > time.monotonic():
            return kept[1]
        # A burst for one user (Allocates right after a change dropped what was kept)
        # makes one request, not one each.
        flight = (key, self._changes)
        asking = self._asking.get(flight)
        if asking is None:
            asking = asyncio.ensure_future(self._ask(key, ask))
            self._asking[flight] = asking
            asking.add_done_callback(lambda done: self._landed(flight, done))
        return await asyncio.shield(asking)

    def _landed(self, flight: tuple[Hashable, int], done: asyncio.Future[Any]) -> None:
        del self._asking[flight]
        if not done.cancelled():
            done.exception()  # told to every asker; none left is no unread error

    async def _ask(self, key: Hashable, ask: Callable[[], Awaitable[T]]) -> T:
        changes = self._changes
        answer = await ask()
        if self._watching and changes == self._changes:
            if len(self._answers) >= MAX_ANSWERS:
                self._answers.clear()
            self._answers[key] = (time.monotonic() + RESYNC_AFTER, answer)
        return answer

    def _forget(self) -> None:
        self._answers.clear()
        self._changes += 1
