"""What a container that ds01 did not make says about itself, read from its labels,
environment and device requests: whose it is, its type, and which GPUs it uses.

DS01's containers (and AIME mlc's, and ones from before a crash) carry this in their
labels; ds01 adopts them as first-class containers, with their GPUs as allocations.
Pure functions: the reconciler does the Docker and allocator calls.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ds01.core.naming import SEPARATOR

# DS01's labels for a container's GPUs, most exact first: UUIDs, then slot ids.
_UUID_LABELS = ("ds01.gpu.uuids", "ds01.gpu.uuid", "ds01.gpu_slot")
_SLOT_LABELS = ("ds01.gpu.allocated",)
_GPU_ENV = ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
_NO_GPU = {"", "void", "none", "nodevfiles"}
_TYPE_LABELS = ("ds01.container_type", "ds01.type", "ds01.interface")


@dataclass(frozen=True)
class Slot:
    """A slot of this node as the allocator lists it."""

    slot_id: str  # "0" (a full GPU) or "2:1" (a MIG slice)
    uuid: str  # GPU-... or MIG-...


def owner_of(labels: Mapping[str, str]) -> str:
    """ds01's and DS01's owner label, else mlc's ("" when neither says)."""
    return labels.get("ds01.user") or labels.get("aime.mlc.USER") or ""


def container_type_of(labels: Mapping[str, str], name: str) -> str:
    """DS01's container type: its label, else what made the container. Containers made
    by ds01, DS01 or mlc have none: the user's own limits apply (DS01's "atomic")."""
    for key in _TYPE_LABELS:
        if labels.get(key):
            return labels[key]
    if any(key.startswith("devcontainer.") for key in labels):
        return "devcontainer"
    if any(key.startswith("com.docker.compose.") for key in labels):
        return "compose"
    if SEPARATOR in name or "aime.mlc" in labels:
        return ""
    return "docker"


def gpu_references(
    labels: Mapping[str, str], env: Sequence[str], device_ids: Iterable[str]
) -> tuple[str, ...]:
    """The GPUs a container says it uses: UUIDs or DS01 slot ids (0, 1.2), from DS01's
    labels, else its device requests, else its visibility environment (Docker keeps the
    last of a repeated variable, as here)."""
    for key in (*_UUID_LABELS, *_SLOT_LABELS):
        if labels.get(key):
            return _split(labels[key])
    requested = tuple(device_ids)
    if requested:
        return requested
    values = dict(entry.split("=", 1) for entry in env if "=" in entry)
    for key in _GPU_ENV:
        if key in values and values[key].strip().lower() not in _NO_GPU:
            return _split(values[key])
    return ()


def slots_for(references: Sequence[str], slots: Sequence[Slot]) -> tuple[list[str], list[str]]:
    """Slot ids for the references, and the references that match no slot of this node
    ("all", an index or UUID that does not exist here)."""
    by_uuid = {slot.uuid: slot.slot_id for slot in slots}
    ids = {slot.slot_id for slot in slots}
    found: list[str] = []
    unknown: list[str] = []
    for reference in references:
        slot_id = by_uuid.get(reference) or _ds01_slot_id(reference)
        if slot_id in ids and slot_id not in found:
            found.append(slot_id)
        elif slot_id not in found:
            unknown.append(reference)
    return found, unknown


def _ds01_slot_id(reference: str) -> str:
    """DS01 wrote a MIG slice as GPU.INSTANCE (1.2); ds01 writes 1:2."""
    if re.fullmatch(r"\d+\.\d+", reference):
        return reference.replace(".", ":")
    return reference


def _split(value: str) -> tuple[str, ...]:
    return tuple(part for part in re.split(r"[,\s]+", value.strip()) if part)
