"""What GPUs a node has, as schedulable slots.

Two sources sit behind one interface: NVML on a real GPU host, and a declared YAML file
for hosts without GPUs (development, CI, the local default). The declared source always
says it is simulated, so nobody mistakes it for hardware.

Slot ids follow the seed: ``"0"`` is full GPU 0, ``"0:1"`` MIG instance 1 of GPU 0. A GPU
in MIG mode offers only its MIG instances. A slot's GPU-equivalent weight is 1.0 for a
full GPU and the instance's compute slices over the GPU's slices for MIG.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import yaml

from ds01.core.config import Config
from ds01.core.units import parse_size

_MIG_PROFILE = re.compile(r"(?P<slices>\d+)g\.(?P<memory>\d+)gb")
DEFAULT_SLICES = 7


class InventoryError(Exception):
    """The inventory cannot be read; the message names the file and the entry."""


@dataclass(frozen=True)
class MigInstance:
    instance_id: int
    profile: str
    uuid: str
    memory_bytes: int
    compute_slices: int


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    product: str
    memory_bytes: int
    mig_enabled: bool
    mig_slices: int = DEFAULT_SLICES
    mig_instances: tuple[MigInstance, ...] = ()


@dataclass(frozen=True)
class Slot:
    slot_id: str
    uuid: str
    product: str
    mig_profile: str
    memory_bytes: int
    gpu_equivalents: float


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...]
    source: str  # "nvml" or "declared"
    simulated: bool
    origin: str  # the file or library it came from

    def slots(self) -> list[Slot]:
        slots: list[Slot] = []
        for gpu in self.gpus:
            if not gpu.mig_enabled:
                slots.append(Slot(str(gpu.index), gpu.uuid, gpu.product, "", gpu.memory_bytes, 1.0))
                continue
            for mig in gpu.mig_instances:
                slots.append(
                    Slot(
                        f"{gpu.index}:{mig.instance_id}",
                        mig.uuid,
                        gpu.product,
                        mig.profile,
                        mig.memory_bytes,
                        mig.compute_slices / gpu.mig_slices,
                    )
                )
        return slots

    def describe(self) -> str:
        mig = sum(1 for g in self.gpus if g.mig_enabled)
        kind = "simulated (declared in" if self.simulated else f"{self.source} ("
        return (
            f"{len(self.gpus)} GPUs, {mig} in MIG mode, {len(self.slots())} slots; "
            f"{kind} {self.origin})"
        )


class InventorySource(Protocol):
    def load(self) -> Inventory: ...


@dataclass(frozen=True)
class DeclaredInventory:
    """GPUs declared in a YAML file, for hosts without NVIDIA GPUs."""

    path: Path

    def load(self) -> Inventory:
        try:
            raw = yaml.safe_load(self.path.read_text())
        except OSError as err:
            raise InventoryError(f"{self.path}: cannot read: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise InventoryError(f"{self.path}: not valid YAML: {err}") from err
        if not isinstance(raw, dict) or not isinstance(raw.get("gpus"), list):
            raise InventoryError(f"{self.path}: expected a mapping with a list under 'gpus'")
        gpus = tuple(_declared_gpu(self.path, i, entry) for i, entry in enumerate(raw["gpus"]))
        indexes = [g.index for g in gpus]
        if len(set(indexes)) != len(indexes):
            raise InventoryError(f"{self.path}: gpus: an index is declared twice: {indexes}")
        uuids = [s.uuid for s in Inventory(gpus, "declared", True, "").slots()]
        if len(set(uuids)) != len(uuids):
            raise InventoryError(f"{self.path}: gpus: a UUID is declared twice")
        return Inventory(gpus, "declared", True, str(self.path))


def _declared_gpu(path: Path, i: int, entry: Any) -> Gpu:
    where = f"{path}: gpus[{i}]"
    if not isinstance(entry, dict):
        raise InventoryError(f"{where}: expected a mapping")
    try:
        index = int(entry["index"])
        uuid = str(entry["uuid"])
        product = str(entry.get("product", "NVIDIA GPU (simulated)"))
        memory = parse_size(str(entry.get("memory", "80g")))
        mig = entry.get("mig") or {}
        slices = int(mig.get("slices", DEFAULT_SLICES)) if mig else DEFAULT_SLICES
        instances = (
            tuple(
                _declared_mig(where, j, inst, slices)
                for j, inst in enumerate(mig.get("instances", []))
            )
            if mig
            else ()
        )
    except KeyError as err:
        raise InventoryError(f"{where}: missing key {err.args[0]!r}") from err
    except (TypeError, ValueError, AttributeError) as err:
        raise InventoryError(f"{where}: {err}") from err
    return Gpu(index, uuid, product, memory, bool(mig), slices, instances)


def _declared_mig(where: str, j: int, inst: Any, slices: int) -> MigInstance:
    where = f"{where}.mig.instances[{j}]"
    if not isinstance(inst, dict):
        raise InventoryError(f"{where}: expected a mapping")
    profile = str(inst.get("profile", ""))
    match = _MIG_PROFILE.fullmatch(profile)
    if not match:
        raise InventoryError(f"{where}: profile {profile!r} is not like '2g.20gb'")
    compute = int(match["slices"])
    if compute > slices:
        raise InventoryError(f"{where}: {profile} needs {compute} of only {slices} slices")
    return MigInstance(
        instance_id=int(inst["id"]),
        profile=profile,
        uuid=str(inst["uuid"]),
        memory_bytes=int(match["memory"]) * 1024**3,
        compute_slices=compute,
    )


class NvmlInventory:
    """The GPUs the NVIDIA driver reports, through NVML (the pynvml module).

    Only NVML calls are used, never nvidia-smi text. MIG instances are found through
    the MIG device handles of each GPU whose current MIG mode is enabled.
    """

    origin = "NVML"

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nvml = nvml

    def load(self) -> Inventory:
        nvml = self._nvml or importlib.import_module("pynvml")
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            raise InventoryError(f"NVML is not available: {err}") from err
        try:
            gpus = tuple(
                self._gpu(nvml, index, nvml.nvmlDeviceGetHandleByIndex(index))
                for index in range(nvml.nvmlDeviceGetCount())
            )
        except nvml.NVMLError as err:
            raise InventoryError(f"NVML failed while listing GPUs: {err}") from err
        finally:
            nvml.nvmlShutdown()
        return Inventory(gpus, "nvml", False, self.origin)

    def _gpu(self, nvml: ModuleType, index: int, handle: Any) -> Gpu:
        product = _text(nvml.nvmlDeviceGetName(handle))
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
        try:
            current_mode, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:  # GPUs without MIG support answer NOT_SUPPORTED
            current_mode = 0
        if current_mode != nvml.NVML_DEVICE_MIG_ENABLE:
            return Gpu(index, uuid, product, memory, mig_enabled=False)
        slices = int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)) or DEFAULT_SLICES
        instances = []
        for mig_index in range(slices):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, mig_index)
            except nvml.NVMLError:  # an empty MIG slot
                continue
            attributes = nvml.nvmlDeviceGetAttributes(mig)
            compute = int(attributes.gpuInstanceSliceCount)
            memory_mb = int(attributes.memorySizeMB)
            name = _text(nvml.nvmlDeviceGetName(mig))
            match = _PROFILE_IN_NAME.search(name)
            profile = match.group(1) if match else f"{compute}g.{round(memory_mb / 1024)}gb"
            instances.append(
                MigInstance(
                    instance_id=int(nvml.nvmlDeviceGetGpuInstanceId(mig)),
                    profile=profile,
                    uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                    memory_bytes=memory_mb * 1024 * 1024,
                    compute_slices=compute,
                )
            )
        instances.sort(key=lambda m: m.instance_id)
        return Gpu(index, uuid, product, memory, True, slices, tuple(instances))


_PROFILE_IN_NAME = re.compile(r"(\d+g\.\d+gb)")


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def load_inventory(config: Config) -> Inventory:
    """The node's inventory from the configured source.

    ``auto`` uses NVML when an NVIDIA driver answers, else the declared file.
    """
    if config.inventory.source == "nvml":
        return NvmlInventory().load()
    if config.inventory.source == "auto":
        try:
            inventory = NvmlInventory().load()
        except InventoryError:
            inventory = None
        if inventory is not None and inventory.gpus:
            return inventory
    return DeclaredInventory(config.inventory.file).load()
