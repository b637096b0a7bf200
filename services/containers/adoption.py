"""What a container that ds01 did not make says about itself, read from its labels,
environment and device requests: whose it is, its type, and which GPUs it uses.

DS01's containers (and AIME mlc's, and ones from before a crash) carry this in their
labels; ds01 adopts them as first-class containers, with their GPUs as allocations.
Pure functions: the reconciler does the Docker and allocator calls.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds01.core.naming import GATEWAY_LABEL, SEPARATOR

# DS01's labels for a container's GPUs, most exact first: UUIDs, then slot ids.
_UUID_LABELS = ("ds01.gpu.uuids", "ds01.gpu.uuid", "ds01.gpu_slot")
_SLOT_LABELS = ("ds01.gpu.allocated",)
GPU_ENV = ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
# No GPU at all, whatever the image's own environment says (NVIDIA_VISIBLE_DEVICES=all
# would give every GPU where the NVIDIA runtime is Docker's default).
NO_GPU_ENV = {"NVIDIA_VISIBLE_DEVICES": "void", "CUDA_VISIBLE_DEVICES": ""}
_NO_GPU = {"", "void", "none", "nodevfiles"}
_TYPE_LABELS = ("ds01.container_type", "ds01.type", "ds01.interface")
# The labels adoption believes of a container not made through the gateway. ds01's
# containers service sets each on what it makes, so that none comes from the image.
TRUSTED_LABELS = (*_UUID_LABELS, *_SLOT_LABELS, *_TYPE_LABELS, "ds01.protected")


@dataclass(frozen=True)
class Slot:
    """A slot of this node as the allocator lists it."""

    slot_id: str  # "0" (a full GPU) or "2:1" (a MIG slice)
    uuid: str  # GPU-... or MIG-...


@dataclass(frozen=True)
class Seen:
    """What adoption reads of a container: a view of Docker's inspect of it."""

    name: str
    created: float  # epoch seconds
    labels: Mapping[str, str]
    env: tuple[str, ...]
    device_ids: tuple[str, ...]
    image: str  # as ds01 recorded it (ds01.image), else as Docker has it

    @classmethod
    def of(cls, attrs: Mapping[str, Any]) -> Seen:
        config = attrs.get("Config") or {}
        labels = config.get("Labels") or {}
        requests = (attrs.get("HostConfig") or {}).get("DeviceRequests") or []
        return cls(
            name=str(attrs.get("Name", "")).lstrip("/"),
            created=docker_time(attrs.get("Created")) or 0.0,
            labels=labels,
            env=tuple(config.get("Env") or ()),
            device_ids=tuple(i for r in requests for i in (r.get("DeviceIDs") or [])),
            image=labels.get("ds01.image") or str(config.get("Image", "")),
        )

    @property
    def user(self) -> str:
        return owner_of(self.labels)

    @property
    def container_type(self) -> str:
        return container_type_of(self.labels, self.name)


@dataclass
class Imported:
    """One container of an import: what adopting it gives (or gave) it."""

    docker_name: str
    user: str
    container_type: str
    image: str
    gpu_slots: list[str] = field(default_factory=list)
    conflict: str = ""
    unknown_gpus: list[str] = field(default_factory=list)
    adopted: bool = False


def gpu_plan(
    seen: Seen, slots: Sequence[Slot], metadata: Path | None
) -> tuple[list[str], list[str]]:
    """The slot ids of this node the container uses, and the GPUs it names that the
    node does not have. ds01's own label says, else DS01's labels, its devices or its
    environment, else DS01's metadata file of it (in ``metadata``)."""
    own = [s.split("/", 1)[1] for s in seen.labels.get("ds01.gpu.slots", "").split() if "/" in s]
    if made_by_gateway(seen.labels):
        own = []
    references = tuple(own) or gpu_references(seen.labels, seen.env, seen.device_ids)
    if not references and metadata is not None:
        references = recorded_gpus(metadata, seen.name)
    return slots_for(references, slots)


def plan_import(
    containers: Iterable[Seen],
    node: str,
    slots: Sequence[Slot],
    held: Mapping[str, str],
    metadata: Path | None,
) -> list[Imported]:
    """What adopting each container would give it, oldest first: of two containers
    that use one GPU, the older gets it; ``held`` maps slot ids to the containers
    holding them now."""
    holders = dict(held)
    report = []
    for seen in sorted(containers, key=lambda c: c.created):
        found, unknown = gpu_plan(seen, slots, metadata)
        entry = Imported(
            seen.name, seen.user, seen.container_type, seen.image, unknown_gpus=unknown
        )
        taken = [s for s in found if holders.get(s, seen.name) != seen.name]
        if taken:
            entry.conflict = ", ".join(f"slot {s} is held by {holders[s]}" for s in taken)
        else:
            holders.update(dict.fromkeys(found, seen.name))
            entry.gpu_slots = [f"{node}/{s}" for s in found]
        report.append(entry)
    return report


def owner_of(labels: Mapping[str, str]) -> str:
    """ds01's and DS01's owner label, else mlc's ("" when neither says)."""
    return labels.get("ds01.user") or labels.get("aime.mlc.USER") or ""


def container_type_of(labels: Mapping[str, str], name: str) -> str:
    """DS01's container type: its label, else what made the container. Containers made
    by ds01, DS01 or mlc have none: the user's own limits apply (DS01's "atomic"). On a
    container of the gateway, ds01's type labels are the image's: not believed."""
    for key in () if made_by_gateway(labels) else _TYPE_LABELS:
        if labels.get(key):
            return labels[key]
    if any(key.startswith("devcontainer.") for key in labels):
        return "devcontainer"
    if any(key.startswith("com.docker.compose.") for key in labels):
        return "compose"
    if SEPARATOR in name or "aime.mlc" in labels:
        return ""
    return "docker"


def made_by_gateway(labels: Mapping[str, str]) -> bool:
    """Made through ds01's gateway: its other ds01 labels may be its image's, set by a
    user, and its GPU environment is void (GPUs come only from a ds01 create)."""
    return labels.get(GATEWAY_LABEL) == "true"


def gpu_references(
    labels: Mapping[str, str], env: Sequence[str], device_ids: Iterable[str]
) -> tuple[str, ...]:
    """The GPUs a container says it uses: UUIDs or DS01 slot ids (0, 1.2), from DS01's
    labels, else its device requests, else its visibility environment (Docker keeps the
    last of a repeated variable, as here). None for a container of the gateway."""
    if made_by_gateway(labels):
        return ()
    for key in (*_UUID_LABELS, *_SLOT_LABELS):
        if labels.get(key):
            return _split(labels[key])
    requested = tuple(device_ids)
    if requested:
        return requested
    values = dict(entry.split("=", 1) for entry in env if "=" in entry)
    for key in GPU_ENV:
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


def recorded_gpus(directory: Path, name: str) -> tuple[str, ...]:
    """The GPU DS01's allocator recorded for a container, in
    /var/lib/ds01/container-metadata/<name>.json (its ``gpu_id``); () without one."""
    try:
        data = json.loads((directory / f"{name}.json").read_text())
    except (OSError, ValueError):
        return ()
    value = data.get("gpu_id") if isinstance(data, dict) else None
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    return _split(str(value)) if value not in (None, "") else ()


def unaccounted(container: str, references: Sequence[str], allocations: Iterable[Any]) -> str:
    """Why the container may not start on the GPUs it names ("" if it may): each must be
    a slot of this node allocated to it. ``allocations``: the allocator's, of this node
    (GetStatus)."""
    rows = list(allocations)
    found, unknown = slots_for(references, [Slot(a.slot.slot_id, a.slot.uuid) for a in rows])
    if unknown:
        return f"it names GPUs ds01 does not account for here ({' '.join(unknown)})"
    holders = {a.slot.slot_id: a.container for a in rows}
    for slot_id in found:
        if holders.get(slot_id) != container:
            held = f"held by {holders[slot_id]}" if holders.get(slot_id) else "free"
            return f"its GPU {slot_id} is {held}: not allocated to it"
    return ""


def _ds01_slot_id(reference: str) -> str:
    """DS01 wrote a MIG slice as GPU.INSTANCE (1.2); ds01 writes 1:2."""
    if re.fullmatch(r"\d+\.\d+", reference):
        return reference.replace(".", ":")
    return reference


def docker_time(stamp: str | None) -> float | None:
    """Docker's RFC 3339 timestamps (nanoseconds, Z); its zero time means never."""
    if not stamp or stamp.startswith("0001-"):
        return None
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    base = dt.datetime.fromisoformat(whole).replace(tzinfo=dt.UTC)
    return base.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


def _split(value: str) -> tuple[str, ...]:
    return tuple(part for part in re.split(r"[,\s]+", value.strip()) if part)
