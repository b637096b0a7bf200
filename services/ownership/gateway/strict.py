"""Strict decoding: a request is read once, by rules at least as strict as Docker's.

JSON bodies: duplicate keys, keys that are not plain ASCII, keys that are not Docker's
exact field name, wrong types, NaN and strings Go would rewrite (lone surrogates, NUL)
are refused, so that what the gateway checks is what Docker will read. Queries: parsed
with Go's rules (``&`` only; ``;`` and ``#`` refused), only the route's own parameters,
each once unless the route says it may repeat.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from ds01.ownership.gateway.fields import ListOf, MapOf, Obj, Scalar, Schema

INT64 = (-(2**63), 2**63 - 1)


class BadRequest(Exception):
    """Answered with 400 and this message: the request itself is malformed."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if not key.isascii():
            raise BadRequest(f"the key {key!r} is not plain ASCII")
        if key in found:
            raise BadRequest(f"the key {key!r} appears twice")
        found[key] = value
    return found


def _no_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a JSON number Docker accepts")


def decode_json(body: bytes, schema: Schema, what: str) -> Any:
    """The body as a checked value: only ``schema``'s keys, each with its type.

    An empty body is ``None`` (Docker reads it as no body at all)."""
    return check(json_value(body, what), schema, what)


def json_value(data: bytes, what: str) -> Any:
    """JSON without duplicate keys, non-ASCII keys or NaN; ``None`` when empty."""
    if not data.strip():
        return None
    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except BadRequest as err:
        raise BadRequest(f"{what}: {err}") from None
    except ValueError as err:
        raise BadRequest(f"{what} is not valid JSON: {err}") from None


def check(value: Any, schema: Schema, where: str) -> Any:
    """``value`` if it has ``schema``'s shape (null is Go's zero value), else BadRequest."""
    if value is None:
        return None
    if isinstance(schema, Obj):
        if not isinstance(value, dict):
            raise BadRequest(f"{where} must be an object")
        for key in value:
            if key not in schema.fields:
                raise BadRequest(
                    f"{where}: unknown field {key!r} (Docker's field names are case-sensitive here)"
                )
        return {k: check(v, schema.fields[k], f"{where}.{k}") for k, v in value.items()}
    if isinstance(schema, MapOf):
        if not isinstance(value, dict):
            raise BadRequest(f"{where} must be an object")
        return {k: check(v, schema.value, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(schema, ListOf):
        if not isinstance(value, list):
            raise BadRequest(f"{where} must be a list")
        return [check(v, schema.item, f"{where}[{i}]") for i, v in enumerate(value)]
    return _scalar(value, schema, where)


def _scalar(value: Any, kind: Scalar, where: str) -> Any:
    if kind is Scalar.STRS:
        if isinstance(value, str):
            return [_string(value, where)]
        if isinstance(value, list):
            return [_scalar(v, Scalar.STR, f"{where}[{i}]") for i, v in enumerate(value)]
        raise BadRequest(f"{where} must be {kind.value}")
    if kind is Scalar.STR:
        if not isinstance(value, str):
            raise BadRequest(f"{where} must be {kind.value}")
        return _string(value, where)
    if kind is Scalar.BOOL:
        if not isinstance(value, bool):
            raise BadRequest(f"{where} must be {kind.value}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{where} must be {kind.value}")
    if kind is Scalar.INT and (isinstance(value, float) or not INT64[0] <= value <= INT64[1]):
        raise BadRequest(f"{where} must be {kind.value} that fits in 64 bits")
    return value


def _string(value: str, where: str) -> str:
    """Go replaces lone surrogates with U+FFFD and passes NUL on to system calls: a
    string that Docker would read differently, or cut short, is refused."""
    if "\x00" in value:
        raise BadRequest(f"{where} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{where} contains an unpaired surrogate") from None
    return value


def encode_json(value: Any) -> bytes:
    """The body Docker receives: re-encoded from the checked value, never the caller's."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode()


def parse_query(
    raw: str, allowed: Iterable[str], repeatable: Iterable[str] = ()
) -> dict[str, list[str]]:
    """A query as Go's url.ParseQuery reads it, refused where the two could disagree."""
    allowed, repeatable = set(allowed), set(repeatable)
    found: dict[str, list[str]] = {}
    if not raw:
        return found
    for part in raw.split("&"):
        if not part:
            continue
        if ";" in part:
            raise BadRequest("';' in a query is refused (Go and Python read it differently)")
        key, _, value = part.partition("=")
        key, value = _unescape(key), _unescape(value)
        if key not in allowed:
            raise BadRequest(f"unknown query parameter {key!r}")
        if key in found and key not in repeatable:
            raise BadRequest(f"the query parameter {key!r} appears twice")
        found.setdefault(key, []).append(value)
    return found


def _unescape(text: str) -> str:
    """Go's QueryUnescape: '+' is a space, %XX a byte; a bad escape is an error."""
    text = text.replace("+", " ")
    for i, char in enumerate(text):
        if char == "%" and not _is_hex(text[i + 1 : i + 3]):
            raise BadRequest(f"bad percent-escape in the query: {text!r}")
    try:
        return _string(unquote_to_bytes(text).decode("utf-8"), "query")
    except UnicodeDecodeError:
        raise BadRequest("the query is not UTF-8") from None


def _is_hex(pair: str) -> bool:
    return len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair)


def encode_query(query: dict[str, list[str]]) -> str:
    return "&".join(
        f"{quote(key, safe='')}={quote(value, safe='')}"
        for key, values in query.items()
        for value in values
    )


def go_bool(value: str | None) -> bool:
    """Docker's httputils.BoolValue."""
    return value is not None and value.strip().lower() not in ("", "0", "no", "false", "none")
