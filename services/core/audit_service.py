"""The audit trail over gRPC: calls put on the record, and the trail read back by admins."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf.message import Message

from ds01.core.audit import AuditLog, AuditRecord, read_audit
from ds01.core.config import Config
from ds01.core.etcd import connect
from ds01.core.identity import Around, Principal, caller
from ds01.core.messages import abort, timestamp
from ds01.core.naming import SEPARATOR, belongs_to
from ds01.v1 import audit_pb2, audit_pb2_grpc

# Methods that only read: a user reading is never on the record (unless refused).
READ_PREFIXES = ("Get", "List", "Watch", "Check", "Validate", "WhoAmI")
UNTOUCHED = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/ds01.v1.StatusService/")
DEFAULT_PAGE = 1000


def target_of(request: Any) -> tuple[str, str]:
    """What a call acts on, as (field, value): the user it names, else the container,
    name or node."""
    for field in ("user", "container", "name", "node"):
        value = getattr(request, field, "")
        if isinstance(value, str) and value:
            return field, value
    return "", ""


def acts_on_another(who: str, field: str, value: str) -> bool:
    """Whether the call names another user, or a container named ``<name>._.<user>`` of
    another user (a bare container name is the caller's own)."""
    if field == "user":
        return value != who
    if field in ("container", "name"):
        return SEPARATOR in value and not belongs_to(value, who)
    return False


def on_the_record(
    principal: Principal, method: str, target: tuple[str, str], code: grpc.StatusCode
) -> bool:
    """Admins' changes, anyone's change to another user's things, and every call refused
    for want of permission. A service acting for a user is recorded where the user acted."""
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return True
    if principal.is_service or method.startswith(READ_PREFIXES):
        return False
    return principal.is_admin or acts_on_another(principal.name, *target)


class CallAudit:
    """Puts calls on the record once they end, with the status they ended with. Inside
    the authentication (an inner layer of ``CallInterceptor``): it knows who called."""

    SKIPPED = UNTOUCHED

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def around(self, method: str) -> Around:
        name = method.rpartition("/")[2]

        @contextlib.contextmanager
        def recorded(request: Any, context: grpc.aio.ServicerContext) -> Iterator[None]:
            code = grpc.StatusCode.UNKNOWN
            try:
                yield
                code = context.code() or grpc.StatusCode.OK
            except Exception:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                self._maybe_record(name, request, context, code)

        return recorded

    def _maybe_record(
        self, method: str, request: Any, context: grpc.aio.ServicerContext, code: Any
    ) -> None:
        try:
            principal = caller()
        except LookupError:  # refused before anyone was authenticated
            return
        status = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
        target = target_of(request) if isinstance(request, Message) else ("", "")
        if not on_the_record(principal, method, target, status):
            return
        decision = {
            grpc.StatusCode.OK: "allowed",
            grpc.StatusCode.PERMISSION_DENIED: "denied",
            grpc.StatusCode.UNAUTHENTICATED: "denied",
        }.get(status, "failed")
        reason = "" if status is grpc.StatusCode.OK else f"{status.name}: {context.details() or ''}"
        self.audit.record(principal.name, method, target[1], decision, reason.rstrip(": "))


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, config: Config, service: str) -> None:
        self.config = config
        self.service = service

    async def ListAuditRecords(
        self, request: audit_pb2.ListAuditRecordsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListAuditRecordsResponse:
        if not caller().is_admin:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, "the audit trail is for admins")
        since = request.since.ToDatetime().timestamp() if request.HasField("since") else 0.0
        client = connect(self.config, self.service)
        try:
            found = await read_audit(client, since, request.user, request.page_size or DEFAULT_PAGE)
        finally:
            await client.close()
        return audit_pb2.ListAuditRecordsResponse(records=[record_message(r) for r in found])


def record_message(record: AuditRecord) -> audit_pb2.AuditRecord:
    return audit_pb2.AuditRecord(
        time=timestamp(record.time),
        node=record.node,
        service=record.service,
        who=record.who,
        action=record.action,
        target=record.target,
        decision=record.decision,
        reason=record.reason,
    )
