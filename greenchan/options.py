"""Server-wide options, with per-route overrides from ``with_channel``."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

# Options that ``with_channel`` may override for one route (API.md).
ROUTE_OPTIONS = frozenset(
    {"subprotocols", "origins", "max_message_size", "ping_interval", "ping_timeout"}
)


@dataclasses.dataclass(frozen=True)
class Options:
    """The limits and policies of a server; the defaults are the contract of API.md.

    Every default is chosen, not inherited: see the "Limits and security" section
    of README.md for what a client sees when it hits each one.
    """

    #: A larger WebSocket message closes the connection with 1009.
    max_message_size: Optional[int] = 1 << 20
    #: Inbound messages buffered per channel before reading pauses, so a slow
    #: handler slows its own client through TCP backpressure, not the server.
    max_queue: int = 16
    #: Outbound bytes buffered per channel before ``send`` waits.
    send_buffer: int = 1 << 20
    #: How long a send buffer may stay full before the client is closed as slow.
    send_timeout: float = 10.0
    #: WebSocket keepalive: a ping every ``ping_interval`` seconds; a pong missing
    #: for ``ping_timeout`` seconds closes with ``CloseStatus.TIMEOUT``.
    ping_interval: Optional[float] = 20.0
    ping_timeout: Optional[float] = 20.0
    #: Allowed ``Origin`` values, for every transport (a WebSocket upgrade, a POST,
    #: an SSE or long-poll GET); ``None`` means same origin only, ``["*"]`` anyone.
    #: Listed origins also get CORS answers on HTTP.
    origins: Optional[Sequence[str]] = None
    #: Offered WebSocket subprotocols, in server preference order.
    subprotocols: Optional[Sequence[str]] = None
    #: permessage-deflate. Off by default: measured in bench/, compression costs
    #: more CPU per small message than it saves on loopback and LAN links, and
    #: compressed frames cannot be shared between broadcast members. Turn it on
    #: for large text payloads over slow links.
    compression: Optional[str] = None
    #: Over this many open connections new ones get 503 with ``Retry-After``.
    max_connections: Optional[int] = None
    #: Larger request bodies get 413 and never reach the handler.
    max_body: int = 8 << 20
    #: Request headers larger than this (all lines together; at most 100 lines)
    #: get 431. 64 KiB holds the largest cookie sets browsers send (about 4 KiB
    #: per cookie, a few dozen cookies) while bounding what one request can make
    #: the server buffer.
    max_header_size: int = 64 << 10
    #: A client must finish its request headers within this many seconds.
    handshake_timeout: Optional[float] = 10.0
    #: How long a greenchan.js session outlives its client's last connection
    #: (docs/sessions.md): long enough for a network drop or a page reload, short
    #: enough that a closed tab's ``on_close`` runs within a minute.
    session_grace: float = 30.0
    #: A ``RedisChannelStore`` shared by every process of the application: with it
    #: a greenchan.js session's requests may reach any process (forwarding.py).
    store: Optional[Any] = None
    #: How long a server-initiated WebSocket close waits for the client's reply.
    close_timeout: float = 5.0

    def replace(self, **overrides: Any) -> "Options":
        """Return a copy with ``overrides`` applied, rejecting unknown names."""
        return dataclasses.replace(self, **overrides) if overrides else self

    @classmethod
    def build(cls, options: dict) -> "Options":
        """Validate user-given options; an unknown name is a ``TypeError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(
                f"unknown greenchan option(s): {', '.join(sorted(unknown))}; "
                f"known options are {', '.join(sorted(known))}"
            )
        if options.get("max_queue", 1) < 1:
            raise ValueError("max_queue must be at least 1 (reading pauses when it is full)")
        if options.get("compression") not in (None, "deflate"):
            raise ValueError("compression must be None or 'deflate'")
        return cls(**options)


DEFAULTS = Options()
