import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LimitSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIMIT_SOURCE_UNSPECIFIED: _ClassVar[LimitSource]
    LIMIT_SOURCE_DEFAULT: _ClassVar[LimitSource]
    LIMIT_SOURCE_GROUP: _ClassVar[LimitSource]
    LIMIT_SOURCE_OVERRIDE: _ClassVar[LimitSource]
    LIMIT_SOURCE_CONTAINER_TYPE: _ClassVar[LimitSource]
LIMIT_SOURCE_UNSPECIFIED: LimitSource
LIMIT_SOURCE_DEFAULT: LimitSource
LIMIT_SOURCE_GROUP: LimitSource
LIMIT_SOURCE_OVERRIDE: LimitSource
LIMIT_SOURCE_CONTAINER_TYPE: LimitSource

class LimitValue(_message.Message):
    __slots__ = ("key", "value", "unlimited", "source")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNLIMITED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    unlimited: bool
    source: LimitSource
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ..., unlimited: _Optional[bool] = ..., source: _Optional[_Union[LimitSource, str]] = ...) -> None: ...

class AggregateLimits(_message.Message):
    __slots__ = ("cpus", "memory_bytes", "pids", "gpu_equivalents", "memory_high_bytes")
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    GPU_EQUIVALENTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_HIGH_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpus: float
    memory_bytes: int
    pids: int
    gpu_equivalents: float
    memory_high_bytes: int
    def __init__(self, cpus: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., pids: _Optional[int] = ..., gpu_equivalents: _Optional[float] = ..., memory_high_bytes: _Optional[int] = ...) -> None: ...

class UserLimits(_message.Message):
    __slots__ = ("user", "group", "priority", "max_gpu_equivalents", "max_gpu_slots_per_container", "allow_full_gpu", "max_cpus", "memory_bytes", "memory_swap_bytes", "shm_size_bytes", "ipc_mode", "pids_limit", "max_containers_per_user", "idle_timeout", "max_runtime", "gpu_hold_after_stop", "container_hold_after_stop", "created_container_timeout", "cgroup_parent", "aggregate", "policies", "values", "admin", "container_type", "archived", "sigterm_grace", "max_tasks")
    class PoliciesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    USER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_GPU_EQUIVALENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_GPU_SLOTS_PER_CONTAINER_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FULL_GPU_FIELD_NUMBER: _ClassVar[int]
    MAX_CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SWAP_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IPC_MODE_FIELD_NUMBER: _ClassVar[int]
    PIDS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTAINERS_PER_USER_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNTIME_FIELD_NUMBER: _ClassVar[int]
    GPU_HOLD_AFTER_STOP_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_HOLD_AFTER_STOP_FIELD_NUMBER: _ClassVar[int]
    CREATED_CONTAINER_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    CGROUP_PARENT_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_TYPE_FIELD_NUMBER: _ClassVar[int]
    ARCHIVED_FIELD_NUMBER: _ClassVar[int]
    SIGTERM_GRACE_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    user: str
    group: str
    priority: int
    max_gpu_equivalents: float
    max_gpu_slots_per_container: int
    allow_full_gpu: bool
    max_cpus: float
    memory_bytes: int
    memory_swap_bytes: int
    shm_size_bytes: int
    ipc_mode: str
    pids_limit: int
    max_containers_per_user: int
    idle_timeout: _duration_pb2.Duration
    max_runtime: _duration_pb2.Duration
    gpu_hold_after_stop: _duration_pb2.Duration
    container_hold_after_stop: _duration_pb2.Duration
    created_container_timeout: _duration_pb2.Duration
    cgroup_parent: str
    aggregate: AggregateLimits
    policies: _containers.ScalarMap[str, str]
    values: _containers.RepeatedCompositeFieldContainer[LimitValue]
    admin: bool
    container_type: str
    archived: bool
    sigterm_grace: _duration_pb2.Duration
    max_tasks: int
    def __init__(self, user: _Optional[str] = ..., group: _Optional[str] = ..., priority: _Optional[int] = ..., max_gpu_equivalents: _Optional[float] = ..., max_gpu_slots_per_container: _Optional[int] = ..., allow_full_gpu: _Optional[bool] = ..., max_cpus: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., memory_swap_bytes: _Optional[int] = ..., shm_size_bytes: _Optional[int] = ..., ipc_mode: _Optional[str] = ..., pids_limit: _Optional[int] = ..., max_containers_per_user: _Optional[int] = ..., idle_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_runtime: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., gpu_hold_after_stop: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., container_hold_after_stop: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., created_container_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., cgroup_parent: _Optional[str] = ..., aggregate: _Optional[_Union[AggregateLimits, _Mapping]] = ..., policies: _Optional[_Mapping[str, str]] = ..., values: _Optional[_Iterable[_Union[LimitValue, _Mapping]]] = ..., admin: _Optional[bool] = ..., container_type: _Optional[str] = ..., archived: _Optional[bool] = ..., sigterm_grace: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_tasks: _Optional[int] = ...) -> None: ...

class GetLimitsRequest(_message.Message):
    __slots__ = ("user", "container_type")
    USER_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_TYPE_FIELD_NUMBER: _ClassVar[int]
    user: str
    container_type: str
    def __init__(self, user: _Optional[str] = ..., container_type: _Optional[str] = ...) -> None: ...

class GetLimitsResponse(_message.Message):
    __slots__ = ("limits",)
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    limits: UserLimits
    def __init__(self, limits: _Optional[_Union[UserLimits, _Mapping]] = ...) -> None: ...

class DockerInfo(_message.Message):
    __slots__ = ("ncpu", "cgroup_driver")
    NCPU_FIELD_NUMBER: _ClassVar[int]
    CGROUP_DRIVER_FIELD_NUMBER: _ClassVar[int]
    ncpu: int
    cgroup_driver: str
    def __init__(self, ncpu: _Optional[int] = ..., cgroup_driver: _Optional[str] = ...) -> None: ...

class GetDockerArgsRequest(_message.Message):
    __slots__ = ("user", "container_type", "docker")
    USER_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_TYPE_FIELD_NUMBER: _ClassVar[int]
    DOCKER_FIELD_NUMBER: _ClassVar[int]
    user: str
    container_type: str
    docker: DockerInfo
    def __init__(self, user: _Optional[str] = ..., container_type: _Optional[str] = ..., docker: _Optional[_Union[DockerInfo, _Mapping]] = ...) -> None: ...

class GetDockerArgsResponse(_message.Message):
    __slots__ = ("cpus", "memory_bytes", "memory_swap_bytes", "shm_size_bytes", "ipc_mode", "pids_limit", "cgroup_parent", "flags")
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SWAP_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IPC_MODE_FIELD_NUMBER: _ClassVar[int]
    PIDS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CGROUP_PARENT_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    cpus: float
    memory_bytes: int
    memory_swap_bytes: int
    shm_size_bytes: int
    ipc_mode: str
    pids_limit: int
    cgroup_parent: str
    flags: str
    def __init__(self, cpus: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., memory_swap_bytes: _Optional[int] = ..., shm_size_bytes: _Optional[int] = ..., ipc_mode: _Optional[str] = ..., pids_limit: _Optional[int] = ..., cgroup_parent: _Optional[str] = ..., flags: _Optional[str] = ...) -> None: ...

class ListGroupsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Group(_message.Message):
    __slots__ = ("name", "priority", "members")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    priority: int
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., priority: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class ListGroupsResponse(_message.Message):
    __slots__ = ("groups",)
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[Group]
    def __init__(self, groups: _Optional[_Iterable[_Union[Group, _Mapping]]] = ...) -> None: ...

class ValidateConfigRequest(_message.Message):
    __slots__ = ("text", "file_name")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    text: str
    file_name: str
    def __init__(self, text: _Optional[str] = ..., file_name: _Optional[str] = ...) -> None: ...

class ConfigIssue(_message.Message):
    __slots__ = ("file", "line", "key", "message")
    FILE_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    file: str
    line: int
    key: str
    message: str
    def __init__(self, file: _Optional[str] = ..., line: _Optional[int] = ..., key: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ValidateConfigResponse(_message.Message):
    __slots__ = ("valid", "issues", "serving_digest", "notes")
    VALID_FIELD_NUMBER: _ClassVar[int]
    ISSUES_FIELD_NUMBER: _ClassVar[int]
    SERVING_DIGEST_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    issues: _containers.RepeatedCompositeFieldContainer[ConfigIssue]
    serving_digest: str
    notes: _containers.RepeatedCompositeFieldContainer[ConfigIssue]
    def __init__(self, valid: _Optional[bool] = ..., issues: _Optional[_Iterable[_Union[ConfigIssue, _Mapping]]] = ..., serving_digest: _Optional[str] = ..., notes: _Optional[_Iterable[_Union[ConfigIssue, _Mapping]]] = ...) -> None: ...

class WatchLimitsRequest(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: str
    def __init__(self, user: _Optional[str] = ...) -> None: ...

class WatchLimitsResponse(_message.Message):
    __slots__ = ("users", "digest", "default_users_changed")
    USERS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_USERS_CHANGED_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedScalarFieldContainer[str]
    digest: str
    default_users_changed: bool
    def __init__(self, users: _Optional[_Iterable[str]] = ..., digest: _Optional[str] = ..., default_users_changed: _Optional[bool] = ...) -> None: ...
