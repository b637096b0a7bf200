"""Conversions between Python values and protobuf well-known types, and statuses."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2

from ds01.v1 import allocator_pb2

# The kinds of GPU slot in words (the allocator's Preference values, the containers
# service's default_gpu_kind) and as the protos spell them.
SLOT_PREFERENCES = {
    "any": allocator_pb2.SLOT_PREFERENCE_ANY,
    "mig": allocator_pb2.SLOT_PREFERENCE_MIG,
    "full": allocator_pb2.SLOT_PREFERENCE_FULL_GPU,
}


def timestamp(epoch: float | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp for epoch seconds; None stays None (an unset field)."""
    if epoch is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(epoch * 1e9))
    return stamp


# Set on every status a ds01 service answers itself, so that a client can tell "the
# service said UNAVAILABLE (its etcd is down)" from "the service cannot be reached".
ANSWERED = ("ds01-answered", "1")


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End the call with ``code`` and ``message``, marked as the service's own answer."""
    context.set_trailing_metadata((ANSWERED,))
    await context.abort(code, message)
