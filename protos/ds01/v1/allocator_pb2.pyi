import datetime

from ds01.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SlotPreference(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLOT_PREFERENCE_UNSPECIFIED: _ClassVar[SlotPreference]
    SLOT_PREFERENCE_ANY: _ClassVar[SlotPreference]
    SLOT_PREFERENCE_FULL_GPU: _ClassVar[SlotPreference]
    SLOT_PREFERENCE_MIG: _ClassVar[SlotPreference]

class AllocationEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALLOCATION_EVENT_TYPE_UNSPECIFIED: _ClassVar[AllocationEventType]
    ALLOCATION_EVENT_TYPE_ALLOCATED: _ClassVar[AllocationEventType]
    ALLOCATION_EVENT_TYPE_RELEASED: _ClassVar[AllocationEventType]
    ALLOCATION_EVENT_TYPE_HELD: _ClassVar[AllocationEventType]
    ALLOCATION_EVENT_TYPE_HOLD_CLEARED: _ClassVar[AllocationEventType]
    ALLOCATION_EVENT_TYPE_HOLD_EXPIRED: _ClassVar[AllocationEventType]
    ALLOCATION_EVENT_TYPE_PREEMPTED: _ClassVar[AllocationEventType]
SLOT_PREFERENCE_UNSPECIFIED: SlotPreference
SLOT_PREFERENCE_ANY: SlotPreference
SLOT_PREFERENCE_FULL_GPU: SlotPreference
SLOT_PREFERENCE_MIG: SlotPreference
ALLOCATION_EVENT_TYPE_UNSPECIFIED: AllocationEventType
ALLOCATION_EVENT_TYPE_ALLOCATED: AllocationEventType
ALLOCATION_EVENT_TYPE_RELEASED: AllocationEventType
ALLOCATION_EVENT_TYPE_HELD: AllocationEventType
ALLOCATION_EVENT_TYPE_HOLD_CLEARED: AllocationEventType
ALLOCATION_EVENT_TYPE_HOLD_EXPIRED: AllocationEventType
ALLOCATION_EVENT_TYPE_PREEMPTED: AllocationEventType

class AllocateRequest(_message.Message):
    __slots__ = ("user", "container", "slots", "gpu_equivalents", "preference", "wait_until", "node", "slot_ids", "as_many_as_allowed")
    USER_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    GPU_EQUIVALENTS_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    WAIT_UNTIL_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SLOT_IDS_FIELD_NUMBER: _ClassVar[int]
    AS_MANY_AS_ALLOWED_FIELD_NUMBER: _ClassVar[int]
    user: str
    container: str
    slots: int
    gpu_equivalents: float
    preference: SlotPreference
    wait_until: _timestamp_pb2.Timestamp
    node: str
    slot_ids: _containers.RepeatedScalarFieldContainer[str]
    as_many_as_allowed: bool
    def __init__(self, user: _Optional[str] = ..., container: _Optional[str] = ..., slots: _Optional[int] = ..., gpu_equivalents: _Optional[float] = ..., preference: _Optional[_Union[SlotPreference, str]] = ..., wait_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., node: _Optional[str] = ..., slot_ids: _Optional[_Iterable[str]] = ..., as_many_as_allowed: _Optional[bool] = ...) -> None: ...

class AllocateResponse(_message.Message):
    __slots__ = ("allocations", "environment")
    class EnvironmentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    allocations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Allocation]
    environment: _containers.ScalarMap[str, str]
    def __init__(self, allocations: _Optional[_Iterable[_Union[_common_pb2.Allocation, _Mapping]]] = ..., environment: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("container",)
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    container: str
    def __init__(self, container: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released_slots",)
    RELEASED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    released_slots: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, released_slots: _Optional[_Iterable[str]] = ...) -> None: ...

class MarkStoppedRequest(_message.Message):
    __slots__ = ("container", "manual")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    MANUAL_FIELD_NUMBER: _ClassVar[int]
    container: str
    manual: bool
    def __init__(self, container: _Optional[str] = ..., manual: _Optional[bool] = ...) -> None: ...

class MarkStoppedResponse(_message.Message):
    __slots__ = ("allocations",)
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    allocations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Allocation]
    def __init__(self, allocations: _Optional[_Iterable[_Union[_common_pb2.Allocation, _Mapping]]] = ...) -> None: ...

class ClearStoppedRequest(_message.Message):
    __slots__ = ("container",)
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    container: str
    def __init__(self, container: _Optional[str] = ...) -> None: ...

class ClearStoppedResponse(_message.Message):
    __slots__ = ("allocations",)
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    allocations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Allocation]
    def __init__(self, allocations: _Optional[_Iterable[_Union[_common_pb2.Allocation, _Mapping]]] = ...) -> None: ...

class ValidateRequest(_message.Message):
    __slots__ = ("container", "node", "slot_id")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    container: str
    node: str
    slot_id: str
    def __init__(self, container: _Optional[str] = ..., node: _Optional[str] = ..., slot_id: _Optional[str] = ...) -> None: ...

class ValidateResponse(_message.Message):
    __slots__ = ("valid", "reason")
    VALID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    reason: str
    def __init__(self, valid: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("user", "node")
    USER_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    user: str
    node: str
    def __init__(self, user: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node", "up", "inventory_source", "simulated")
    NODE_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    node: str
    up: bool
    inventory_source: str
    simulated: bool
    def __init__(self, node: _Optional[str] = ..., up: _Optional[bool] = ..., inventory_source: _Optional[str] = ..., simulated: _Optional[bool] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("allocations", "nodes", "revision", "drains")
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DRAINS_FIELD_NUMBER: _ClassVar[int]
    allocations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Allocation]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    revision: int
    drains: _containers.RepeatedCompositeFieldContainer[Drain]
    def __init__(self, allocations: _Optional[_Iterable[_Union[_common_pb2.Allocation, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., revision: _Optional[int] = ..., drains: _Optional[_Iterable[_Union[Drain, _Mapping]]] = ...) -> None: ...

class WatchAllocationsRequest(_message.Message):
    __slots__ = ("since_revision",)
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    since_revision: int
    def __init__(self, since_revision: _Optional[int] = ...) -> None: ...

class WatchAllocationsResponse(_message.Message):
    __slots__ = ("type", "allocation", "revision", "previous", "released_by", "time")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    RELEASED_BY_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    type: AllocationEventType
    allocation: _common_pb2.Allocation
    revision: int
    previous: _common_pb2.Allocation
    released_by: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, type: _Optional[_Union[AllocationEventType, str]] = ..., allocation: _Optional[_Union[_common_pb2.Allocation, _Mapping]] = ..., revision: _Optional[int] = ..., previous: _Optional[_Union[_common_pb2.Allocation, _Mapping]] = ..., released_by: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Waiter(_message.Message):
    __slots__ = ("position", "user", "container", "slots", "preference", "priority", "node", "since", "wait_until")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    WAIT_UNTIL_FIELD_NUMBER: _ClassVar[int]
    position: int
    user: str
    container: str
    slots: int
    preference: SlotPreference
    priority: int
    node: str
    since: _timestamp_pb2.Timestamp
    wait_until: _timestamp_pb2.Timestamp
    def __init__(self, position: _Optional[int] = ..., user: _Optional[str] = ..., container: _Optional[str] = ..., slots: _Optional[int] = ..., preference: _Optional[_Union[SlotPreference, str]] = ..., priority: _Optional[int] = ..., node: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., wait_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListWaitersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWaitersResponse(_message.Message):
    __slots__ = ("waiters",)
    WAITERS_FIELD_NUMBER: _ClassVar[int]
    waiters: _containers.RepeatedCompositeFieldContainer[Waiter]
    def __init__(self, waiters: _Optional[_Iterable[_Union[Waiter, _Mapping]]] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("node", "gpu", "by", "reason", "since")
    NODE_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    node: str
    gpu: int
    by: str
    reason: str
    since: _timestamp_pb2.Timestamp
    def __init__(self, node: _Optional[str] = ..., gpu: _Optional[int] = ..., by: _Optional[str] = ..., reason: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("node", "gpu", "reason")
    NODE_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node: str
    gpu: int
    reason: str
    def __init__(self, node: _Optional[str] = ..., gpu: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("drain", "allocations")
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    ALLOCATIONS_FIELD_NUMBER: _ClassVar[int]
    drain: Drain
    allocations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Allocation]
    def __init__(self, drain: _Optional[_Union[Drain, _Mapping]] = ..., allocations: _Optional[_Iterable[_Union[_common_pb2.Allocation, _Mapping]]] = ...) -> None: ...

class UndrainRequest(_message.Message):
    __slots__ = ("node", "gpu")
    NODE_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    node: str
    gpu: int
    def __init__(self, node: _Optional[str] = ..., gpu: _Optional[int] = ...) -> None: ...

class UndrainResponse(_message.Message):
    __slots__ = ("drain",)
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    drain: Drain
    def __init__(self, drain: _Optional[_Union[Drain, _Mapping]] = ...) -> None: ...
