"""What a stream shows as its watcher's rights change (core/admin_view.py), every kind
of watcher against every kind of owner: the decision the three event streams share."""

from __future__ import annotations

import grpc
import pytest

from ds01.core.admin_view import AdminView
from ds01.core.identity import Principal
from ds01.v1 import common_pb2

DENIED, AWAY = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE
A, B = "alice", "bob"
USER, ADMIN, SERVICE = (
    common_pb2.PRINCIPAL_KIND_USER,
    common_pb2.PRINCIPAL_KIND_ADMIN,
    common_pb2.PRINCIPAL_KIND_SERVICE,
)


class Ended(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Call:
    """What AdminView asks of a gRPC call: to end it (a real one raises too)."""

    def set_trailing_metadata(self, metadata: object) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Ended(code, message)


def view(name: str, kind: int, admin_at_open: bool, admin_now: bool | None) -> tuple:
    asked: list[str] = []

    async def still_admin(user: str) -> bool:
        asked.append(user)
        if admin_now is None:
            raise ConnectionError("the limits service is away")
        return admin_now

    return AdminView(Principal(name, kind), admin_at_open, still_admin, "allocations"), asked


# (watcher, kind, admin when the stream opened, admin now (None: cannot be told),
#  owners of the thing, shown / how the stream ends, asked again)
CASES = {
    "a user's own": (A, USER, False, False, {A}, True, False),
    "a user's own, with another's inside": (A, USER, False, False, {A, B}, True, False),
    "another's, to a user": (A, USER, False, False, {B}, False, False),
    "nobody's, to a user": (A, USER, False, False, set(), False, False),
    "an admin's own": (A, ADMIN, True, False, {A}, True, False),
    "another's, to an admin still": (A, ADMIN, True, True, {B}, True, True),
    "own with another's, to an admin still": (A, ADMIN, True, True, {A, B}, True, True),
    "another's, to an admin no more": (A, ADMIN, True, False, {B}, DENIED, True),
    "own with another's, to an admin no more": (A, ADMIN, True, False, {A, B}, DENIED, True),
    "everyone's, to an admin no more": (A, ADMIN, True, False, {""}, DENIED, True),
    "another's, limits away": (A, ADMIN, True, None, {B}, AWAY, True),
    "an admin by limits only": (A, USER, True, False, {B}, DENIED, True),
    "another's, to a service": ("svc:containers", SERVICE, True, None, {B}, True, False),
    "another's, to root, limits away": ("root", ADMIN, True, None, {B}, True, False),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
async def test_a_stream_shows_another_users_things_only_to_an_admin_still(case: str):
    name, kind, at_open, now, owners, expected, asks = CASES[case]
    watcher, asked = view(name, kind, at_open, now)
    if isinstance(expected, bool):
        assert await watcher.shows(Call(), owners) is expected
    else:
        with pytest.raises(Ended) as ended:
            await watcher.shows(Call(), owners)
        assert ended.value.code == expected
        assert name in str(ended.value) and "allocations" in str(ended.value)
    assert asked == ([name] if asks else [])
