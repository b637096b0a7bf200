"""``ds01 admin audit``: the fleet's audit trail, read back from any service."""

from __future__ import annotations

import datetime as dt
import json
import time

import click

from ds01.cli.common import Settings, call, output_option, print_table
from ds01.client import Ds01Client
from ds01.core.units import parse_duration
from ds01.v1 import audit_pb2


def since_moment(text: str) -> float:
    """An epoch second from ``2026-11-29``, ``2026-11-29T14:00`` (local time) or an age
    such as ``2h`` or ``3d`` (that long ago)."""
    try:
        return dt.datetime.fromisoformat(text).astimezone().timestamp()
    except ValueError:
        pass
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a date (2026-11-29, 2026-11-29T14:00) nor an age (2h, 3d)"
        ) from None


def _row(record: audit_pb2.AuditRecord) -> dict[str, str]:
    moment = record.time.ToDatetime(tzinfo=dt.UTC).astimezone()
    return {
        "time": moment.isoformat(timespec="seconds"),
        "node": record.node,
        "service": record.service,
        "who": record.who,
        "action": record.action,
        "target": record.target,
        "decision": record.decision,
        "reason": record.reason,
    }


@click.command("audit")
@click.option("--user", default="", help="Only records of this user (who acted, or target).")
@click.option("--since", "since_text", default="24h", show_default=True,
              help="From this date or time (local), or this long ago (2h, 7d).")  # fmt: skip
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True,
              help="At most this many, the newest.")  # fmt: skip
@output_option
@click.pass_obj
def audit(settings: Settings, user: str, since_text: str, limit: int, output: str | None) -> None:
    """Who did what to what, and what was decided: the gateway's decisions other than
    plain reads, admins' actions, and refused requests (kept 90 days).

    \b
    Examples:
      ds01 admin audit --since 2h
      ds01 admin audit --since 2026-11-29 -o json
    """
    since = since_moment(since_text)

    async def read(client: Ds01Client) -> audit_pb2.ListAuditRecordsResponse:
        return await client.audit_records(user, since, limit)

    rows = [_row(r) for r in call(settings, read).records]
    if (output or settings.output) == "json":
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo(f"no audit records since {dt.datetime.fromtimestamp(since):%Y-%m-%d %H:%M}")
        return
    headers = ["TIME", "NODE", "SERVICE", "WHO", "ACTION", "TARGET", "DECISION", "REASON"]
    print_table(headers, [[row[h.lower()] for h in headers] for row in rows])
