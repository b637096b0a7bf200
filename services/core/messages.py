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
# Set on a live stream ended because its watcher fell behind: the revision to resume
# after, so that a client can follow on by itself (and tell it from other refusals).
RESUME_AFTER = "ds01-resume-after"


async def abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    resume_after: int | None = None,
) -> None:
    """End the call with ``code`` and ``message``, marked as the service's own answer
    (and, for a stream a client may follow on from, the revision to resume after)."""
    resume = () if resume_after is None else ((RESUME_AFTER, str(resume_after)),)
    context.set_trailing_metadata((ANSWERED, *resume))
    await context.abort(code, message)
