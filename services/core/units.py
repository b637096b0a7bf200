"""Sizes and durations as the DS01 configuration writes them ("64g", "72h")."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[bkmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_DURATION_PART = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>[smhdw])")
_DURATION_FACTORS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(text: str | int) -> int:
    """Bytes in a Docker-style size: 512m, 16g, 1.5t, or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size {text} is negative")
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size such as 512m, 16g or 1t")
    return int(float(match["number"]) * _SIZE_FACTORS[match["unit"].lower()])


def format_size(size: int) -> str:
    """The shortest exact Docker-style spelling: 34359738368 -> 32g."""
    for unit in ("t", "g", "m", "k"):
        factor = _SIZE_FACTORS[unit]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def parse_duration(text: str | int) -> float:
    """Seconds in a duration such as 90s, 30m, 72h, 1d or 1h30m; a plain number is seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text != text or text in (float("inf"), float("-inf")) or text < 0:
            raise ValueError(f"duration {text} is not a finite, non-negative number")
        return float(text)
    compact = str(text).strip().lower().replace(" ", "")
    if compact.replace(".", "", 1).isdigit():
        return float(compact)  # digits only: always finite
    parts = list(_DURATION_PART.finditer(compact))
    if not parts or "".join(p.group(0) for p in parts) != compact:
        raise ValueError(f"{text!r} is not a duration such as 90s, 30m, 72h or 1d")
    return sum(float(p["number"]) * _DURATION_FACTORS[p["unit"]] for p in parts)


def format_duration(seconds: float) -> str:
    """72h rather than 259200s, as the seed prints it: hours or minutes when exact."""
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds}s"
    for unit in ("h", "m"):
        factor = _DURATION_FACTORS[unit]
        if whole >= factor and whole % factor == 0:
            return f"{whole // factor}{unit}"
    return f"{whole}s"
