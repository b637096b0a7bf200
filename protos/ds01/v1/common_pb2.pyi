import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SlotState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLOT_STATE_UNSPECIFIED: _ClassVar[SlotState]
    SLOT_STATE_FREE: _ClassVar[SlotState]
    SLOT_STATE_ALLOCATED: _ClassVar[SlotState]
    SLOT_STATE_HELD: _ClassVar[SlotState]
    SLOT_STATE_NODE_DOWN: _ClassVar[SlotState]

class PrincipalKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRINCIPAL_KIND_UNSPECIFIED: _ClassVar[PrincipalKind]
    PRINCIPAL_KIND_USER: _ClassVar[PrincipalKind]
    PRINCIPAL_KIND_ADMIN: _ClassVar[PrincipalKind]
    PRINCIPAL_KIND_SERVICE: _ClassVar[PrincipalKind]
SLOT_STATE_UNSPECIFIED: SlotState
SLOT_STATE_FREE: SlotState
SLOT_STATE_ALLOCATED: SlotState
SLOT_STATE_HELD: SlotState
SLOT_STATE_NODE_DOWN: SlotState
PRINCIPAL_KIND_UNSPECIFIED: PrincipalKind
PRINCIPAL_KIND_USER: PrincipalKind
PRINCIPAL_KIND_ADMIN: PrincipalKind
PRINCIPAL_KIND_SERVICE: PrincipalKind

class GpuSlot(_message.Message):
    __slots__ = ("node", "slot_id", "uuid", "product", "mig_profile", "memory_bytes", "gpu_equivalents")
    NODE_FIELD_NUMBER: _ClassVar[int]
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    MIG_PROFILE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_EQUIVALENTS_FIELD_NUMBER: _ClassVar[int]
    node: str
    slot_id: str
    uuid: str
    product: str
    mig_profile: str
    memory_bytes: int
    gpu_equivalents: float
    def __init__(self, node: _Optional[str] = ..., slot_id: _Optional[str] = ..., uuid: _Optional[str] = ..., product: _Optional[str] = ..., mig_profile: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., gpu_equivalents: _Optional[float] = ...) -> None: ...

class Allocation(_message.Message):
    __slots__ = ("slot", "state", "user", "container", "since", "stopped_at", "hold_until", "priority", "drained")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    STOPPED_AT_FIELD_NUMBER: _ClassVar[int]
    HOLD_UNTIL_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    slot: GpuSlot
    state: SlotState
    user: str
    container: str
    since: _timestamp_pb2.Timestamp
    stopped_at: _timestamp_pb2.Timestamp
    hold_until: _timestamp_pb2.Timestamp
    priority: int
    drained: bool
    def __init__(self, slot: _Optional[_Union[GpuSlot, _Mapping]] = ..., state: _Optional[_Union[SlotState, str]] = ..., user: _Optional[str] = ..., container: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stopped_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., hold_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., priority: _Optional[int] = ..., drained: _Optional[bool] = ...) -> None: ...
