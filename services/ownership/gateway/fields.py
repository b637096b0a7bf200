"""Docker's exact field names for every JSON body the gateway accepts, and their types.

Docker's Go decoder matches keys case-insensitively with Unicode folding; the gateway
instead accepts only the exact spelling of each field listed here, refuses any other key,
and forwards a body re-encoded from what it accepted. A field Docker knows but this table
does not is refused: new fields are added here deliberately, with a policy for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Scalar(Enum):
    STR = "a string"
    INT = "an integer"
    BOOL = "true or false"
    NUM = "a number"
    STRS = "a string or a list of strings"  # Go's strslice.StrSlice


@dataclass(frozen=True)
class Obj:
    """A Go struct: only these keys, each with its type."""

    fields: dict[str, Schema]


@dataclass(frozen=True)
class MapOf:
    """A Go map[string]T: free keys (plain ASCII), values of one type."""

    value: Schema


@dataclass(frozen=True)
class ListOf:
    item: Schema


Schema = Scalar | Obj | MapOf | ListOf

S, I, B, STRS = Scalar.STR, Scalar.INT, Scalar.BOOL, Scalar.STRS  # noqa: E741
STRINGS = ListOf(S)
STRING_MAP = MapOf(S)
EMPTY = Obj({})

_THROTTLE = ListOf(Obj({"Path": S, "Rate": I}))
RESOURCES: dict[str, Schema] = {
    "CpuShares": I,
    "Memory": I,
    "NanoCpus": I,
    "CgroupParent": S,
    "BlkioWeight": I,
    "BlkioWeightDevice": ListOf(Obj({"Path": S, "Weight": I})),
    "BlkioDeviceReadBps": _THROTTLE,
    "BlkioDeviceWriteBps": _THROTTLE,
    "BlkioDeviceReadIOps": _THROTTLE,
    "BlkioDeviceWriteIOps": _THROTTLE,
    "CpuPeriod": I,
    "CpuQuota": I,
    "CpuRealtimePeriod": I,
    "CpuRealtimeRuntime": I,
    "CpusetCpus": S,
    "CpusetMems": S,
    "Devices": ListOf(Obj({"PathOnHost": S, "PathInContainer": S, "CgroupPermissions": S})),
    "DeviceCgroupRules": STRINGS,
    "DeviceRequests": ListOf(
        Obj(
            {
                "Driver": S,
                "Count": I,
                "DeviceIDs": STRINGS,
                "Capabilities": ListOf(STRINGS),
                "Options": STRING_MAP,
            }
        )
    ),
    "KernelMemory": I,
    "KernelMemoryTCP": I,
    "MemoryReservation": I,
    "MemorySwap": I,
    "MemorySwappiness": I,
    "OomKillDisable": B,
    "PidsLimit": I,
    "Ulimits": ListOf(Obj({"Name": S, "Soft": I, "Hard": I})),
    "CpuCount": I,
    "CpuPercent": I,
    "IOMaximumIOps": I,
    "IOMaximumBandwidth": I,
}

RESTART_POLICY = Obj({"Name": S, "MaximumRetryCount": I})

MOUNT = Obj(
    {
        "Type": S,
        "Source": S,
        "Target": S,
        "ReadOnly": B,
        "Consistency": S,
        "BindOptions": Obj(
            {
                "Propagation": S,
                "NonRecursive": B,
                "CreateMountpoint": B,
                "ReadOnlyNonRecursive": B,
                "ReadOnlyForceRecursive": B,
            }
        ),
        "VolumeOptions": Obj(
            {
                "NoCopy": B,
                "Labels": STRING_MAP,
                "Subpath": S,
                "DriverConfig": Obj({"Name": S, "Options": STRING_MAP}),
            }
        ),
        "ImageOptions": Obj({"Subpath": S}),
        "TmpfsOptions": Obj({"SizeBytes": I, "Mode": I, "Options": ListOf(STRINGS)}),
    }
)

HOST_CONFIG = Obj(
    {
        "Binds": STRINGS,
        "ContainerIDFile": S,
        "LogConfig": Obj({"Type": S, "Config": STRING_MAP}),
        "NetworkMode": S,
        "PortBindings": MapOf(ListOf(Obj({"HostIp": S, "HostPort": S}))),
        "RestartPolicy": RESTART_POLICY,
        "AutoRemove": B,
        "VolumeDriver": S,
        "VolumesFrom": STRINGS,
        "ConsoleSize": ListOf(I),
        "Annotations": STRING_MAP,
        "CapAdd": STRINGS,
        "CapDrop": STRINGS,
        "CgroupnsMode": S,
        "Dns": STRINGS,
        "DnsOptions": STRINGS,
        "DnsSearch": STRINGS,
        "ExtraHosts": STRINGS,
        "GroupAdd": STRINGS,
        "IpcMode": S,
        "Cgroup": S,
        "Links": STRINGS,
        "OomScoreAdj": I,
        "PidMode": S,
        "Privileged": B,
        "PublishAllPorts": B,
        "ReadonlyRootfs": B,
        "SecurityOpt": STRINGS,
        "StorageOpt": STRING_MAP,
        "Tmpfs": STRING_MAP,
        "UTSMode": S,
        "UsernsMode": S,
        "ShmSize": I,
        "Sysctls": STRING_MAP,
        "Runtime": S,
        "Isolation": S,
        "Mounts": ListOf(MOUNT),
        "MaskedPaths": STRINGS,
        "ReadonlyPaths": STRINGS,
        "Init": B,
        **RESOURCES,
    }
)

HEALTHCHECK = Obj(
    {
        "Test": STRINGS,
        "Interval": I,
        "Timeout": I,
        "StartPeriod": I,
        "StartInterval": I,
        "Retries": I,
    }
)

CONFIG: dict[str, Schema] = {
    "Hostname": S,
    "Domainname": S,
    "User": S,
    "AttachStdin": B,
    "AttachStdout": B,
    "AttachStderr": B,
    "ExposedPorts": MapOf(EMPTY),
    "Tty": B,
    "OpenStdin": B,
    "StdinOnce": B,
    "Env": STRINGS,
    "Cmd": STRS,
    "Healthcheck": HEALTHCHECK,
    "ArgsEscaped": B,
    "Image": S,
    "Volumes": MapOf(EMPTY),
    "WorkingDir": S,
    "Entrypoint": STRS,
    "NetworkDisabled": B,
    "MacAddress": S,
    "OnBuild": STRINGS,
    "Labels": STRING_MAP,
    "StopSignal": S,
    "StopTimeout": I,
    "Shell": STRS,
}

ENDPOINT = Obj(
    {
        "IPAMConfig": Obj({"IPv4Address": S, "IPv6Address": S, "LinkLocalIPs": STRINGS}),
        "Links": STRINGS,
        "Aliases": STRINGS,
        "DriverOpts": STRING_MAP,
        "GwPriority": I,
        "MacAddress": S,
        "NetworkID": S,
        "EndpointID": S,
        "Gateway": S,
        "IPAddress": S,
        "IPPrefixLen": I,
        "IPv6Gateway": S,
        "GlobalIPv6Address": S,
        "GlobalIPv6PrefixLen": I,
        "DNSNames": STRINGS,
    }
)

CONTAINER_CREATE = Obj(
    {
        **CONFIG,
        "HostConfig": HOST_CONFIG,
        "NetworkingConfig": Obj({"EndpointsConfig": MapOf(ENDPOINT)}),
    }
)
CONTAINER_CONFIG = Obj(CONFIG)  # the body of a commit
CONTAINER_UPDATE = Obj({**RESOURCES, "RestartPolicy": RESTART_POLICY})

EXEC_CREATE = Obj(
    {
        "AttachStdin": B,
        "AttachStdout": B,
        "AttachStderr": B,
        "ConsoleSize": ListOf(I),
        "Detach": B,
        "DetachKeys": S,
        "Tty": B,
        "Env": STRINGS,
        "Cmd": STRS,
        "Privileged": B,
        "User": S,
        "WorkingDir": S,
    }
)
EXEC_START = Obj({"Detach": B, "Tty": B, "ConsoleSize": ListOf(I)})

VOLUME_CREATE = Obj(
    {
        "Name": S,
        "Driver": S,
        "DriverOpts": STRING_MAP,
        "Labels": STRING_MAP,
        "ClusterVolumeSpec": MapOf(S),
    }
)

NETWORK_CREATE = Obj(
    {
        "Name": S,
        "CheckDuplicate": B,
        "Driver": S,
        "Scope": S,
        "EnableIPv4": B,
        "EnableIPv6": B,
        "IPAM": Obj(
            {
                "Driver": S,
                "Config": ListOf(
                    Obj(
                        {
                            "Subnet": S,
                            "IPRange": S,
                            "Gateway": S,
                            "AuxiliaryAddresses": STRING_MAP,
                        }
                    )
                ),
                "Options": STRING_MAP,
            }
        ),
        "Internal": B,
        "Attachable": B,
        "Ingress": B,
        "ConfigOnly": B,
        "ConfigFrom": Obj({"Network": S}),
        "Options": STRING_MAP,
        "Labels": STRING_MAP,
    }
)
NETWORK_CONNECT = Obj({"Container": S, "EndpointConfig": ENDPOINT})
NETWORK_DISCONNECT = Obj({"Container": S, "Force": B})
