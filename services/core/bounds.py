"""Bounds on what a request may carry, checked before any handler runs.

A name a user sends ends up in etcd keys and values, Docker names and log lines; an
oversized one once made etcd refuse a claim after the user's lock was taken. Every
string field of every request is bounded here, by its field name, so a new field is
bounded too without anyone remembering to.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

# Names: users, containers, nodes, slots, groups, container types.
NAME_LIMIT = 256
FIELD_LIMITS = {
    "image": 512,  # registry/namespace/name:tag@sha256:digest
    "workspace": 4096,  # paths: PATH_MAX
    "data_dirs": 4096,
    "file_name": 4096,
    "text": 1024 * 1024,  # a resource-limits.yaml to validate
}
MAX_ITEMS = 64  # entries of a repeated field
# The largest message a server takes in (gRPC's default, said once): anything larger is
# RESOURCE_EXHAUSTED from gRPC itself; below it, the field bounds answer INVALID_ARGUMENT.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def request_problem(message: Message, prefix: str = "") -> str | None:
    """What makes ``message`` too large, in words, or None when it is within bounds."""
    for field, value in message.ListFields():
        name = prefix + field.name
        repeated = field.is_repeated
        if repeated and len(value) > MAX_ITEMS:
            return f"{name} has {len(value)} entries; at most {MAX_ITEMS} are allowed"
        if _is_map(field):
            values = [*value.keys(), *value.values()]
        else:
            values = list(value) if repeated else [value]
        for item in values:
            problem = _item_problem(field, name, item)
            if problem:
                return problem
    return None


def _item_problem(field: FieldDescriptor, name: str, item: object) -> str | None:
    if isinstance(item, str):
        limit = FIELD_LIMITS.get(field.name, NAME_LIMIT)
        if len(item) > limit:
            return f"{name} is {len(item)} characters long; at most {limit} are allowed"
    elif isinstance(item, Message):
        return request_problem(item, prefix=f"{name}.")
    return None


def _is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return entry is not None and entry.GetOptions().map_entry
