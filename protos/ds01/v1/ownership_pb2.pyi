from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OwnerSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OWNER_SOURCE_UNSPECIFIED: _ClassVar[OwnerSource]
    OWNER_SOURCE_DS01_LABEL: _ClassVar[OwnerSource]
    OWNER_SOURCE_MLC_LABEL: _ClassVar[OwnerSource]
    OWNER_SOURCE_DEVCONTAINER: _ClassVar[OwnerSource]
    OWNER_SOURCE_NONE: _ClassVar[OwnerSource]

class OwnerEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OWNER_EVENT_TYPE_UNSPECIFIED: _ClassVar[OwnerEventType]
    OWNER_EVENT_TYPE_SET: _ClassVar[OwnerEventType]
    OWNER_EVENT_TYPE_REMOVED: _ClassVar[OwnerEventType]
OWNER_SOURCE_UNSPECIFIED: OwnerSource
OWNER_SOURCE_DS01_LABEL: OwnerSource
OWNER_SOURCE_MLC_LABEL: OwnerSource
OWNER_SOURCE_DEVCONTAINER: OwnerSource
OWNER_SOURCE_NONE: OwnerSource
OWNER_EVENT_TYPE_UNSPECIFIED: OwnerEventType
OWNER_EVENT_TYPE_SET: OwnerEventType
OWNER_EVENT_TYPE_REMOVED: OwnerEventType

class ContainerOwner(_message.Message):
    __slots__ = ("container_id", "name", "owner", "source", "ds01_managed")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DS01_MANAGED_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    name: str
    owner: str
    source: OwnerSource
    ds01_managed: bool
    def __init__(self, container_id: _Optional[str] = ..., name: _Optional[str] = ..., owner: _Optional[str] = ..., source: _Optional[_Union[OwnerSource, str]] = ..., ds01_managed: _Optional[bool] = ...) -> None: ...

class GetOwnerRequest(_message.Message):
    __slots__ = ("container",)
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    container: str
    def __init__(self, container: _Optional[str] = ...) -> None: ...

class GetOwnerResponse(_message.Message):
    __slots__ = ("owner",)
    OWNER_FIELD_NUMBER: _ClassVar[int]
    owner: ContainerOwner
    def __init__(self, owner: _Optional[_Union[ContainerOwner, _Mapping]] = ...) -> None: ...

class ListOwnersRequest(_message.Message):
    __slots__ = ("owner",)
    OWNER_FIELD_NUMBER: _ClassVar[int]
    owner: str
    def __init__(self, owner: _Optional[str] = ...) -> None: ...

class ListOwnersResponse(_message.Message):
    __slots__ = ("owners",)
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    owners: _containers.RepeatedCompositeFieldContainer[ContainerOwner]
    def __init__(self, owners: _Optional[_Iterable[_Union[ContainerOwner, _Mapping]]] = ...) -> None: ...

class WatchOwnersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchOwnersResponse(_message.Message):
    __slots__ = ("type", "owner")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    type: OwnerEventType
    owner: ContainerOwner
    def __init__(self, type: _Optional[_Union[OwnerEventType, str]] = ..., owner: _Optional[_Union[ContainerOwner, _Mapping]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    def __init__(self, csr_pem: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_certificate_pem")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_certificate_pem: bytes
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_certificate_pem: _Optional[bytes] = ...) -> None: ...
