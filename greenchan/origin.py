"""The Origin policy, for every transport, and the CORS answers that go with it.

A browser sends a cross-site ``text/plain`` POST without a preflight, and lets a
page on any site open an ``EventSource`` or a WebSocket to any server: without a
check, any site could speak into a user's channel. So every channel request
passes the same rule (API.md, option ``origins``):

- ``origins=None`` (the default): same origin only, the ``Origin`` matching the
  ``Host``; ``["*"]``: anyone; a list: exactly the origins listed.
- A request without ``Origin`` (curl, server to server, a same-origin GET) passes,
  unless the browser says in ``Sec-Fetch-Site`` that it is cross-site.
- Origins allowed by a list or by ``"*"`` also get CORS answers on HTTP, so
  greenchan.js served from another allowed origin can read the responses.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from . import counters

__all__ = ["origin_allowed", "check_origin", "cors_headers", "page_origin", "same_page", "CORS_KEY"]

log = logging.getLogger("greenchan.origin")

# The CORS headers an allowed cross-origin request's responses carry; set by
# check_origin, added by the HTTP transports to every response they write.
CORS_KEY = "greenchan.cors"

# Response headers greenchan.js reads on the HTTP transports: a cross-origin
# page sees only those named here.
EXPOSED = "Greenchan-Event-Id, Greenchan-Session, Greenchan-Seq"

_DEFAULT_PORTS = {"http": ":80", "https": ":443", "ws": ":80", "wss": ":443"}


def same_origin(origin: str, host: str) -> bool:
    """True if ``origin`` names the host the request was sent to."""
    try:
        parts = urlsplit(origin)
        netloc = parts.netloc.lower()
    except ValueError:
        return False
    if not netloc:
        return False  # "null" (sandboxed frames, file://) is nobody's origin
    default = _DEFAULT_PORTS.get(parts.scheme, "")
    host = host.lower()
    return netloc == host or netloc + default == host or netloc == host + default


def origin_allowed(environ: dict, origins: Optional[Sequence[str]]) -> bool:
    """API.md's Origin rule for one request, whatever its transport."""
    if origins is not None and "*" in origins:
        return True
    origin = environ.get("HTTP_ORIGIN")
    if origin is None:
        # Browsers send Origin on every cross-origin fetch, EventSource and
        # WebSocket; a cross-site request without one is a navigation, an
        # image or a script tag: not a channel client.
        return environ.get("HTTP_SEC_FETCH_SITE", "").lower() != "cross-site"
    if origins is not None:
        return origin in origins
    return same_origin(origin, environ.get("HTTP_HOST", ""))


def _cross_allowed(environ: dict, origins: Optional[Sequence[str]]) -> Optional[str]:
    """The request's Origin if it is another origin that the rule allows."""
    origin = environ.get("HTTP_ORIGIN")
    if origin is None or origins is None or same_origin(origin, environ.get("HTTP_HOST", "")):
        return None
    if origin in origins or "*" in origins:
        return origin
    return None


def cors_headers(environ: dict, origins: Optional[Sequence[str]]) -> List[Tuple[str, str]]:
    """Headers that let an allowed cross-origin page read this response.

    A listed origin may send credentials (cookies); ``"*"`` alone never does, so
    a wildcard cannot be used to read a user's channel with their cookies.
    """
    origin = _cross_allowed(environ, origins)
    if origin is None:
        return []
    headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
    if origins is not None and origin in origins:
        headers.append(("Access-Control-Allow-Credentials", "true"))
    else:
        headers[0] = ("Access-Control-Allow-Origin", "*")
    headers.append(("Access-Control-Expose-Headers", EXPOSED))
    return headers


def is_preflight(environ: dict) -> bool:
    """True for a CORS preflight: OPTIONS with ``Access-Control-Request-Method``."""
    return environ.get("REQUEST_METHOD") == "OPTIONS" and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ


def preflight_headers(environ: dict, origins: Optional[Sequence[str]]) -> List[Tuple[str, str]]:
    """The answer to an allowed preflight (empty if it is not allowed)."""
    headers = cors_headers(environ, origins)
    if not headers:
        return []
    requested = environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS")
    headers += [
        ("Access-Control-Allow-Methods", "GET, POST"),
        ("Access-Control-Allow-Headers", requested or "Content-Type, Last-Event-ID"),
        ("Access-Control-Max-Age", "600"),
    ]
    return headers


def check_origin(environ: dict, origins: Optional[Sequence[str]]) -> Optional[Tuple[int, List[Tuple[str, str]]]]:
    """Apply the Origin rule before any channel exists.

    Returns ``None`` when the request may go on (with ``environ[CORS_KEY]`` set
    for an allowed cross-origin one), else the answer to give instead: 403 for a
    refused origin, 204 with the CORS headers for an allowed preflight (which
    never reaches the handler).
    """
    if not origin_allowed(environ, origins):
        log.info(
            "refused %s %s from origin %r (Sec-Fetch-Site %r)",
            environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"),
            environ.get("HTTP_ORIGIN"), environ.get("HTTP_SEC_FETCH_SITE"),
        )
        counters.reject("origin")
        return 403, []
    if is_preflight(environ):
        headers = preflight_headers(environ, origins)
        return (204, headers) if headers else (403, [])
    cors = cors_headers(environ, origins)
    if cors:
        environ[CORS_KEY] = cors
    return None


def page_origin(environ: dict) -> Optional[str]:
    """The origin of the page that sent this request, as far as the server can tell.

    Its ``Origin`` header; else, for a request the browser calls same-origin
    (``Sec-Fetch-Site``: browsers send no ``Origin`` on same-origin GETs, an
    EventSource's and a long-poll's included), ``"//"`` and the host it was sent
    to. Without this a page of another origin served by the same server (another
    host name) could read a stolen session over SSE or long-polling.
    """
    origin = environ.get("HTTP_ORIGIN")
    if origin is None and environ.get("HTTP_SEC_FETCH_SITE", "").lower() == "same-origin":
        return "//" + environ.get("HTTP_HOST", "")
    return origin


def same_page(pinned: str, origin: str) -> bool:
    """Whether two page origins (an Origin header, or "//" and a host) are the same."""
    if pinned == origin:
        return True
    if pinned.startswith("//") and origin.startswith("//"):
        return pinned.lower() == origin.lower()
    if pinned.startswith("//"):
        return same_origin(origin, pinned[2:])
    if origin.startswith("//"):
        return same_origin(pinned, origin[2:])
    return False
