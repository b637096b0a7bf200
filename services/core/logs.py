"""One log format for every ds01 process: text or JSON lines, times with their zone, and
syslog priorities that journald reads when systemd runs the process."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from typing import Any

# Attributes of every LogRecord; anything else on a record was passed as ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# journald's priorities (sd-daemon(3)): "<3>" before a line makes it an error.
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


def timestamp(created: float) -> str:
    """RFC 3339 with milliseconds and the local zone: 2026-11-29T16:08:16.123+00:00."""
    return dt.datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: message``; under journald, which stamps lines itself, the
    syslog priority instead of the time."""

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname:<7} {record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journald:
            return f"<{_PRIORITIES.get(record.levelno, 3)}>{text}"
        return f"{timestamp(record.created)} {text}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extra
    fields (the audit trail's who, what, target, decision and reason)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **extra_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def under_journald(stream: Any = sys.stderr) -> bool:
    """Whether ``stream`` is journald's (systemd sets JOURNAL_STREAM to its device:inode)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def setup_logging(level: str = "info", log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    journald = under_journald(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(journald))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
