"""What a stream shows an admin, asked again as it goes.

Rights are checked when a call starts, and a stream can stay open for days (its pings
keep it so): an admin removed from the configuration or the admin group kept, on every
stream opened before, the view of everyone's allocations, containers and limits. So
each thing of another user's is shown to an admin only after asking again whether they
still are one (an answer kept until limits change: a lookup), and the stream ends
PERMISSION_DENIED once they are not. The suite's services are what their certificates
say, and are not asked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection

import grpc

from ds01.core.identity import Principal
from ds01.core.messages import abort


class AdminView:
    def __init__(
        self,
        principal: Principal,
        admin: bool,
        still_admin: Callable[[str], Awaitable[bool]],
        what: str,
    ) -> None:
        """``admin``: whether ``principal`` was allowed everyone's things when the stream
        opened; ``still_admin`` asks whether a user is an admin now; ``what``: the things
        the stream shows, for the words that end it."""
        self.name = principal.name
        # Services, and root, are admins whatever the configuration says: not asked.
        self.fixed = principal.is_service or principal.name == "root"
        self.admin = admin or self.fixed
        self._still_admin = still_admin
        self._what = what

    async def shows(self, context: grpc.aio.ServicerContext, owners: Collection[str]) -> bool:
        """Whether a thing of ``owners`` goes to this watcher: their own always (with what
        it holds of others' hidden unless they are an admin still), another's to a
        service or to an admin who still is one. Ends the stream when an admin is no
        longer one, or it cannot be told (it fails closed)."""
        own = self.name in owners
        if own and all(owner == self.name for owner in owners):
            return True
        if not self.admin:
            return own
        if self.fixed:
            return True
        try:
            still = await self._still_admin(self.name)
        except Exception as err:
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"cannot tell whether {self.name} is still an admin ({err}); this stream "
                f"showed every user's {self._what}: open it again",
            )
        if not still:
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{self.name} is no longer an admin: this stream showed every user's "
                f"{self._what}; open it again to follow your own",
            )
        return True
