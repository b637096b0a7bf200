"""A stand-in for the pynvml module, mirroring the NVML calls and signatures ds01 uses.

It is installed as ``sys.modules["pynvml"]``: the one place GPUs are faked. Handles
are opaque objects; errors are NVMLError with NVML's return codes, as the real module
raises them (NOT_SUPPORTED for MIG on GPUs without it, NOT_FOUND for empty MIG slots).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

NVML_SUCCESS = 0
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class Memory:
    total: int
    free: int
    used: int = 0


@dataclass
class Attributes:
    multiprocessorCount: int
    sharedCopyEngineCount: int
    sharedDecoderCount: int
    sharedEncoderCount: int
    sharedJpegCount: int
    sharedOfaCount: int
    gpuInstanceSliceCount: int
    computeInstanceSliceCount: int
    memorySizeMB: int


@dataclass
class FakeMig:
    gpu_instance_id: int
    uuid: str
    name: str
    slices: int
    memory_mb: int
    processes: list[int] = field(default_factory=list)


@dataclass
class Utilization:
    gpu: int
    memory: int


@dataclass
class FakeGpu:
    uuid: str
    name: str
    memory: int
    processes: list[int] = field(default_factory=list)  # pids running compute work
    utilization: int = 0
    mig_mode: int | None = NVML_DEVICE_MIG_DISABLE  # None: MIG not supported
    max_mig: int = 7
    migs: dict[int, FakeMig] = field(default_factory=dict)  # MIG device index -> instance


def make_module(gpus: list[FakeGpu], driver_loaded: bool = True) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    state = {"initialized": 0}

    def check() -> None:
        if not state["initialized"]:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)

    def nvmlInit() -> None:
        if not driver_loaded:
            raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
        state["initialized"] += 1

    def nvmlShutdown() -> None:
        check()
        state["initialized"] -= 1

    def nvmlDeviceGetCount() -> int:
        check()
        return len(gpus)

    def nvmlDeviceGetHandleByIndex(index: int) -> FakeGpu:
        check()
        return gpus[index]

    def nvmlDeviceGetName(handle: FakeGpu | FakeMig) -> str:
        return handle.name

    def nvmlDeviceGetUUID(handle: FakeGpu | FakeMig) -> str:
        return handle.uuid

    def nvmlDeviceGetMemoryInfo(handle: FakeGpu | FakeMig, version: int | None = None) -> Memory:
        total = handle.memory if isinstance(handle, FakeGpu) else handle.memory_mb * 1024**2
        return Memory(total=total, free=total)

    def nvmlDeviceGetMigMode(device: FakeGpu) -> list[int]:
        if device.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return [device.mig_mode, device.mig_mode]

    def nvmlDeviceGetMaxMigDeviceCount(device: FakeGpu) -> int:
        return device.max_mig

    def nvmlDeviceGetMigDeviceHandleByIndex(device: FakeGpu, index: int) -> FakeMig:
        if index not in device.migs:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return device.migs[index]

    def nvmlDeviceGetHandleByUUID(uuid: str) -> FakeGpu | FakeMig:
        check()
        for gpu in gpus:
            if gpu.uuid == uuid:
                return gpu
            for mig in gpu.migs.values():
                if mig.uuid == uuid:
                    return mig
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetComputeRunningProcesses(handle: FakeGpu | FakeMig) -> list[int]:
        return list(getattr(handle, "processes", []))

    def nvmlDeviceGetUtilizationRates(handle: FakeGpu | FakeMig) -> Utilization:
        if isinstance(handle, FakeMig):
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)  # as NVML answers for MIG devices
        return Utilization(gpu=handle.utilization, memory=0)

    def nvmlDeviceGetGpuInstanceId(device: FakeMig) -> int:
        return device.gpu_instance_id

    def nvmlDeviceGetAttributes(device: FakeMig) -> Attributes:
        return Attributes(
            14 * device.slices, 1, 1, 0, 0, 0, device.slices, device.slices, device.memory_mb
        )

    for name, value in list(locals().items()):
        if name.startswith("nvml"):
            setattr(module, name, value)
    module.NVMLError = NVMLError
    for name, value in globals().items():
        if name.startswith("NVML_"):
            setattr(module, name, value)
    return module
