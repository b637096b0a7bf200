"""Keepalive pings on every connection to a ds01 service.

A stream's client sends nothing after its request, so without pings a peer that
vanished without a word (a host powered off, a network split, a connection left half
open) goes unnoticed for as long as TCP takes, which can be hours: a service following
the limits service's changes would keep answers that no change can reach any more.
Clients ping every PING_EVERY_MS while a call is open and give a connection up when a
ping is not answered within PING_ANSWER_MS, so its streams end UNAVAILABLE and are
opened again. Servers accept pings that often (gRPC's default is one per five minutes,
and a client that pings more often has its connection closed), and ping their clients
in turn, which lets the calls of a client that vanished go.
"""

from __future__ import annotations

PING_EVERY_MS = 20_000
PING_ANSWER_MS = 10_000


def client_options() -> list[tuple[str, int]]:
    """Channel options for a client of a ds01 service."""
    return _pinging(PING_EVERY_MS)


def server_options() -> list[tuple[str, int]]:
    """Server options that accept those pings, with room for a late timer; and ping a
    client with a call open every three of its intervals, so that the stream of a
    client gone without a word (its subscription, its slot among a user's streams) is
    let go within a minute, not after gRPC's two hours."""
    return [
        ("grpc.http2.min_ping_interval_without_data_ms", PING_EVERY_MS // 2),
        *_pinging(PING_EVERY_MS * 3),
    ]


def _pinging(every_ms: int) -> list[tuple[str, int]]:
    """Ping the peer every ``every_ms`` while a call is open; give the connection up
    when a ping goes unanswered for PING_ANSWER_MS."""
    return [
        ("grpc.keepalive_time_ms", every_ms),
        ("grpc.keepalive_timeout_ms", PING_ANSWER_MS),
        ("grpc.http2.ping_timeout_ms", PING_ANSWER_MS),  # what recent gRPC waits for
        # A stream that only receives still pings (gRPC stops after two by default).
        ("grpc.http2.max_pings_without_data", 0),
    ]
