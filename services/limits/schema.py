"""The keys a DS01 limits layer may set, their old names, and how each value is read.

A value of ``None`` means unlimited. Each kind of value parses the YAML scalar into a
Python value (raising ValueError with a sentence for people) and formats it back the
way the seed prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ds01.core.units import format_duration, format_size, parse_duration, parse_size


@dataclass(frozen=True)
class Kind:
    name: str
    parse: Callable[[Any], Any]
    format: Callable[[Any], str]
    nullable: bool = True


# Every value must fit the fields it travels in (int32 counts, int64 bytes and seconds).
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1
MAX_NUMBER = 1e9
MAX_SECONDS = 100 * 365 * 86400  # a century: longer is a typo, not a policy


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {value}")
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    if value > MAX_NUMBER:
        raise ValueError(f"{value} is too large (at most {MAX_NUMBER:g})")
    return float(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {value!r}")
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    if value > MAX_INT32:
        raise ValueError(f"{value} is too large (at most {MAX_INT32})")
    return value


def _positive_count(value: Any) -> int:
    count = _count(value)
    if count == 0:
        raise ValueError("must be at least 1")
    return count


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {value!r}")
    if not -MAX_INT32 <= value <= MAX_INT32:
        raise ValueError(f"{value} is out of range (at most {MAX_INT32} either way)")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected a size such as 16g, got {value!r}")
    size = parse_size(value)
    if size > MAX_INT64:
        raise ValueError(f"{value} is too large")
    return size


def _duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a duration such as 72h, got {value!r}")
    if isinstance(value, int | float) and value != 0:
        # DS01's old parser read this as seconds, its newer code as hours: say which.
        raise ValueError(
            f"{value} has no unit: write {value}h, {value}m or {value}s "
            "(or give the key a unit suffix, as in idle_timeout_h)"
        )
    seconds = parse_duration(value)
    if seconds > MAX_SECONDS:
        raise ValueError(f"{value} is longer than a century")
    return seconds


def _in_unit(factor: float, unit: str) -> Kind:
    """A duration key with a unit suffix (DS01's ``max_runtime_h: 24``): a number."""

    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number of {unit}, got {value!r}")
        seconds = _number(value) * factor
        if seconds > MAX_SECONDS:
            raise ValueError(f"{value} {unit} is longer than a century")
        return seconds

    return Kind(f"number of {unit}", parse, format_duration)


UNIT_SUFFIXES = {
    "_h": _in_unit(3600.0, "hours"),
    "_m": _in_unit(60.0, "minutes"),
    "_s": _in_unit(1.0, "seconds"),
}
# What DS01 also writes for "no limit" beside null.
UNLIMITED_WORDS = frozenset({"null", "none", "never", "indefinite", "unlimited"})


def suffixed(key: str, kinds: dict[str, Kind], aliases: dict[str, str]) -> tuple[str, Kind] | None:
    """``idle_timeout_h`` -> ("idle_timeout", hours): the duration key a suffixed key
    sets, and how its number is read; None when ``key`` is no such key."""
    for suffix, kind in UNIT_SUFFIXES.items():
        base = key.removesuffix(suffix)
        if base != key and kinds.get(aliases.get(base, base)) is DURATION:
            return aliases.get(base, base), kind
    return None


def _fraction(value: Any) -> float:
    number = _number(value)
    if number > 1:
        raise ValueError(f"expected a fraction between 0 and 1, got {value}")
    return number


def _percent(value: Any) -> float:
    number = _number(value)
    if number > 100:
        raise ValueError(f"expected a percentage between 0 and 100, got {value}")
    return number


def _ipc_mode(value: Any) -> str:
    if value not in ("host", "private"):
        raise ValueError(f"expected host or private, got {value!r}")
    return value


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


NUMBER = Kind("number", _number, _format_number)
COUNT = Kind("count", _count, str)
POSITIVE_COUNT = Kind("positive count", _positive_count, str)
INTEGER = Kind("integer", _integer, str, nullable=False)
BOOL = Kind("boolean", _bool, lambda v: "yes" if v else "no", nullable=False)
SIZE = Kind("size", _size, format_size)
DURATION = Kind("duration", _duration, format_duration)
IPC_MODE = Kind("ipc mode", _ipc_mode, str)
FRACTION = Kind("fraction", _fraction, _format_number)
PERCENT = Kind("percentage", _percent, _format_number)
CPU_PERCENT = Kind(  # systemd's CPUQuota: "9600%" is 96 CPUs
    "CPU quota", lambda v: _cpu_quota(v), lambda v: f"{_format_number(v * 100)}%"
)

# Every key a defaults, group, override or container-type layer may set.
LIMIT_KEYS: dict[str, Kind] = {
    "priority": INTEGER,
    "max_gpu_equivalents": NUMBER,
    "max_gpu_slots_per_container": COUNT,
    "slots_per_gpu": POSITIVE_COUNT,
    "allow_full_gpu": BOOL,
    "max_cpus": NUMBER,
    "memory": SIZE,
    "memory_swap": SIZE,
    "shm_size": SIZE,
    "ipc_mode": IPC_MODE,
    "pids_limit": COUNT,
    "max_containers_per_user": COUNT,
    "idle_timeout": DURATION,
    "max_runtime": DURATION,
    "gpu_hold_after_stop": DURATION,
    "container_hold_after_stop": DURATION,
    "created_container_timeout": DURATION,
    "sigterm_grace": DURATION,  # how long `stop` waits before it kills
    "max_tasks": COUNT,  # tasks of the user's whole group (DS01: the group slice)
}

# Names older DS01 configurations use for the same keys.
ALIASES: dict[str, str] = {
    "max_mig_instances": "max_gpu_equivalents",
    "max_gpu_slots": "max_gpu_equivalents",
    "max_gpus_per_user": "max_gpu_equivalents",
    "max_mig_per_container": "max_gpu_slots_per_container",
    "max_gpus_per_container": "max_gpu_slots_per_container",
    "mig_instances_per_gpu": "slots_per_gpu",
}

# Limits on the sum of one user's containers (the cgroup slice's own limits).
AGGREGATE_KEYS: dict[str, Kind] = {
    "cpus": NUMBER,
    "memory": SIZE,
    "memory_high": SIZE,  # throttled above this, killed only above memory
    "pids": COUNT,
    "gpu_equivalents": NUMBER,
}
AGGREGATE_ALIASES: dict[str, str] = {
    "max_cpus": "cpus",
    "cpu_quota": "cpus",
    "memory_max": "memory",
    "tasks_max": "pids",
    "pids_limit": "pids",
    "max_gpu_equivalents": "gpu_equivalents",
    "gpu_limit": "gpu_equivalents",
}
# Keys whose value is spelled differently under an alias.
AGGREGATE_SPELLINGS: dict[str, Kind] = {"cpu_quota": CPU_PERCENT}

# Lifecycle policies: top level, then the group's, then the override's.
POLICY_KEYS: dict[str, Kind] = {
    "gpu_idle_threshold": PERCENT,  # GPU utilisation below this is idle
    "cpu_idle_threshold": NUMBER,  # CPU percent (of one core) below this is idle
    "network_idle_threshold": SIZE,  # bytes received per sweep below this is idle
    "idle_detection_window": POSITIVE_COUNT,  # idle sweeps in a row before idle counts
    "grace_period": DURATION,  # after a start, no idle check
    "keepalive_max_duration": DURATION,  # how long a .keep-alive file is honoured
    "sigterm_grace": DURATION,
    "gpu_hold_after_manual_stop": DURATION,
    "created_container_timeout": DURATION,
    "high_demand_threshold": FRACTION,  # share of GPU slots allocated
    "high_demand_idle_reduction": FRACTION,  # the idle timeout times this, then
    "warn_before_idle_stop": DURATION,
    "exempt_from_idle": BOOL,
}

GPU_ALLOCATION_KEYS: dict[str, Kind] = {
    "enable_mig": BOOL,
    "mig_profile": Kind("MIG profile", lambda v: _text(v), str, nullable=False),
    "strategy": Kind(
        "strategy", lambda v: _choice(v, ("least_allocated", "pack")), str, nullable=False
    ),
}


ENFORCEMENT_KEYS: dict[str, Kind] = {
    "aggregate_limits": BOOL,  # false: the per-user aggregate limits are not applied
}


def _cpu_quota(value: Any) -> float:
    """CPUs in systemd's CPUQuota ("9600%" is 96 CPUs); a plain number is CPUs."""
    if isinstance(value, str):
        try:
            percent = float(value.strip().removesuffix("%"))
        except ValueError:
            percent = None
        if percent is None or not value.strip().endswith("%"):
            raise ValueError(f"expected a quota such as 9600% (96 CPUs), got {value!r}")
        return _number(percent) / 100
    return _number(value)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected text, got {value!r}")
    return value


def _choice(value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
    return value
