"""Conversions between Python values and protobuf well-known types."""

from __future__ import annotations

from google.protobuf import timestamp_pb2


def timestamp(epoch: float | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp for epoch seconds; None stays None (an unset field)."""
    if epoch is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(epoch * 1e9))
    return stamp
