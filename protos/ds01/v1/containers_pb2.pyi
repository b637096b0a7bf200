import datetime

from ds01.v1 import allocator_pb2 as _allocator_pb2
from ds01.v1 import common_pb2 as _common_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContainerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTAINER_STATE_UNSPECIFIED: _ClassVar[ContainerState]
    CONTAINER_STATE_CREATED: _ClassVar[ContainerState]
    CONTAINER_STATE_RUNNING: _ClassVar[ContainerState]
    CONTAINER_STATE_STOPPED: _ClassVar[ContainerState]
    CONTAINER_STATE_GONE: _ClassVar[ContainerState]
    CONTAINER_STATE_CREATING: _ClassVar[ContainerState]
    CONTAINER_STATE_INTERRUPTED: _ClassVar[ContainerState]

class ContainerEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTAINER_EVENT_TYPE_UNSPECIFIED: _ClassVar[ContainerEventType]
    CONTAINER_EVENT_TYPE_CREATED: _ClassVar[ContainerEventType]
    CONTAINER_EVENT_TYPE_STARTED: _ClassVar[ContainerEventType]
    CONTAINER_EVENT_TYPE_STOPPED: _ClassVar[ContainerEventType]
    CONTAINER_EVENT_TYPE_IDLE_WARNING: _ClassVar[ContainerEventType]
    CONTAINER_EVENT_TYPE_IDLE_STOP: _ClassVar[ContainerEventType]
    CONTAINER_EVENT_TYPE_RUNTIME_EXCEEDED: _ClassVar[ContainerEventType]
    CONTAINER_EVENT_TYPE_REMOVED: _ClassVar[ContainerEventType]
    CONTAINER_EVENT_TYPE_ADOPTED: _ClassVar[ContainerEventType]
CONTAINER_STATE_UNSPECIFIED: ContainerState
CONTAINER_STATE_CREATED: ContainerState
CONTAINER_STATE_RUNNING: ContainerState
CONTAINER_STATE_STOPPED: ContainerState
CONTAINER_STATE_GONE: ContainerState
CONTAINER_STATE_CREATING: ContainerState
CONTAINER_STATE_INTERRUPTED: ContainerState
CONTAINER_EVENT_TYPE_UNSPECIFIED: ContainerEventType
CONTAINER_EVENT_TYPE_CREATED: ContainerEventType
CONTAINER_EVENT_TYPE_STARTED: ContainerEventType
CONTAINER_EVENT_TYPE_STOPPED: ContainerEventType
CONTAINER_EVENT_TYPE_IDLE_WARNING: ContainerEventType
CONTAINER_EVENT_TYPE_IDLE_STOP: ContainerEventType
CONTAINER_EVENT_TYPE_RUNTIME_EXCEEDED: ContainerEventType
CONTAINER_EVENT_TYPE_REMOVED: ContainerEventType
CONTAINER_EVENT_TYPE_ADOPTED: ContainerEventType

class Container(_message.Message):
    __slots__ = ("name", "docker_name", "id", "user", "image", "state", "gpus", "created_at", "started_at", "stopped_at", "workspace", "data_dirs", "notice", "container_type", "node")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOCKER_NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    STOPPED_AT_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    DATA_DIRS_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_TYPE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    docker_name: str
    id: str
    user: str
    image: str
    state: ContainerState
    gpus: _containers.RepeatedCompositeFieldContainer[_common_pb2.Allocation]
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    stopped_at: _timestamp_pb2.Timestamp
    workspace: str
    data_dirs: _containers.RepeatedScalarFieldContainer[str]
    notice: str
    container_type: str
    node: str
    def __init__(self, name: _Optional[str] = ..., docker_name: _Optional[str] = ..., id: _Optional[str] = ..., user: _Optional[str] = ..., image: _Optional[str] = ..., state: _Optional[_Union[ContainerState, str]] = ..., gpus: _Optional[_Iterable[_Union[_common_pb2.Allocation, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stopped_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., workspace: _Optional[str] = ..., data_dirs: _Optional[_Iterable[str]] = ..., notice: _Optional[str] = ..., container_type: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class CreateContainerRequest(_message.Message):
    __slots__ = ("name", "image", "gpus", "workspace", "data_dirs", "start", "container_type", "gpu_preference", "gpu_wait", "all_gpus")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    DATA_DIRS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_TYPE_FIELD_NUMBER: _ClassVar[int]
    GPU_PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    GPU_WAIT_FIELD_NUMBER: _ClassVar[int]
    ALL_GPUS_FIELD_NUMBER: _ClassVar[int]
    name: str
    image: str
    gpus: int
    workspace: str
    data_dirs: _containers.RepeatedScalarFieldContainer[str]
    start: bool
    container_type: str
    gpu_preference: _allocator_pb2.SlotPreference
    gpu_wait: _duration_pb2.Duration
    all_gpus: bool
    def __init__(self, name: _Optional[str] = ..., image: _Optional[str] = ..., gpus: _Optional[int] = ..., workspace: _Optional[str] = ..., data_dirs: _Optional[_Iterable[str]] = ..., start: _Optional[bool] = ..., container_type: _Optional[str] = ..., gpu_preference: _Optional[_Union[_allocator_pb2.SlotPreference, str]] = ..., gpu_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., all_gpus: _Optional[bool] = ...) -> None: ...

class CreateContainerResponse(_message.Message):
    __slots__ = ("container",)
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    container: Container
    def __init__(self, container: _Optional[_Union[Container, _Mapping]] = ...) -> None: ...

class StartContainerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class StartContainerResponse(_message.Message):
    __slots__ = ("container",)
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    container: Container
    def __init__(self, container: _Optional[_Union[Container, _Mapping]] = ...) -> None: ...

class StopContainerRequest(_message.Message):
    __slots__ = ("name", "grace_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    grace_seconds: int
    def __init__(self, name: _Optional[str] = ..., grace_seconds: _Optional[int] = ...) -> None: ...

class StopContainerResponse(_message.Message):
    __slots__ = ("container",)
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    container: Container
    def __init__(self, container: _Optional[_Union[Container, _Mapping]] = ...) -> None: ...

class RemoveContainerRequest(_message.Message):
    __slots__ = ("name", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    force: bool
    def __init__(self, name: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RemoveContainerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListContainersRequest(_message.Message):
    __slots__ = ("user", "all_users")
    USER_FIELD_NUMBER: _ClassVar[int]
    ALL_USERS_FIELD_NUMBER: _ClassVar[int]
    user: str
    all_users: bool
    def __init__(self, user: _Optional[str] = ..., all_users: _Optional[bool] = ...) -> None: ...

class ListContainersResponse(_message.Message):
    __slots__ = ("containers",)
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    containers: _containers.RepeatedCompositeFieldContainer[Container]
    def __init__(self, containers: _Optional[_Iterable[_Union[Container, _Mapping]]] = ...) -> None: ...

class GetContainerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetContainerResponse(_message.Message):
    __slots__ = ("container",)
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    container: Container
    def __init__(self, container: _Optional[_Union[Container, _Mapping]] = ...) -> None: ...

class ImportContainersRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class ImportedContainer(_message.Message):
    __slots__ = ("docker_name", "user", "container_type", "image", "gpu_slots", "conflict", "unknown_gpus", "adopted")
    DOCKER_NAME_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_TYPE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    GPU_SLOTS_FIELD_NUMBER: _ClassVar[int]
    CONFLICT_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_GPUS_FIELD_NUMBER: _ClassVar[int]
    ADOPTED_FIELD_NUMBER: _ClassVar[int]
    docker_name: str
    user: str
    container_type: str
    image: str
    gpu_slots: _containers.RepeatedScalarFieldContainer[str]
    conflict: str
    unknown_gpus: _containers.RepeatedScalarFieldContainer[str]
    adopted: bool
    def __init__(self, docker_name: _Optional[str] = ..., user: _Optional[str] = ..., container_type: _Optional[str] = ..., image: _Optional[str] = ..., gpu_slots: _Optional[_Iterable[str]] = ..., conflict: _Optional[str] = ..., unknown_gpus: _Optional[_Iterable[str]] = ..., adopted: _Optional[bool] = ...) -> None: ...

class ImportContainersResponse(_message.Message):
    __slots__ = ("containers",)
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    containers: _containers.RepeatedCompositeFieldContainer[ImportedContainer]
    def __init__(self, containers: _Optional[_Iterable[_Union[ImportedContainer, _Mapping]]] = ...) -> None: ...

class WatchContainerEventsRequest(_message.Message):
    __slots__ = ("since_revision", "user")
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    since_revision: int
    user: str
    def __init__(self, since_revision: _Optional[int] = ..., user: _Optional[str] = ...) -> None: ...

class WatchContainerEventsResponse(_message.Message):
    __slots__ = ("type", "name", "docker_name", "user", "node", "time", "detail", "revision")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOCKER_NAME_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    type: ContainerEventType
    name: str
    docker_name: str
    user: str
    node: str
    time: _timestamp_pb2.Timestamp
    detail: str
    revision: int
    def __init__(self, type: _Optional[_Union[ContainerEventType, str]] = ..., name: _Optional[str] = ..., docker_name: _Optional[str] = ..., user: _Optional[str] = ..., node: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., detail: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...
