"""HTTP/1.1 response bytes, shared by both transports (a WebSocket rejects in HTTP)."""
from __future__ import annotations

import http
from typing import Any, Iterable, Mapping, Tuple, Union

Headers = Union[Mapping[str, str], Iterable[Tuple[str, str]], None]


def header_items(headers: Headers) -> list:
    """Headers as a list of (name, value), from a dict or a list of pairs."""
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def response_head(status: int, headers: list, version: str = "HTTP/1.1") -> bytes:
    """The status line and headers, ending with the blank line."""
    lines = [f"{version} {status} {reason(status)}"]
    for name, value in headers:
        value = str(value)
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} contains a line break")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def first_response(data: Any) -> Tuple[int, list]:
    """The status and headers a channel's first ``send`` starts its response with.

    A response dict gives them; an ``Event`` makes it ``text/event-stream``
    without caching; otherwise the body's type picks the ``Content-Type``.
    """
    from .channel import Event  # wire.py stays importable without the channel

    status, headers = 200, []
    if isinstance(data, dict):
        status = int(data.get("status", 200))
        headers = header_items(data.get("headers"))
    if isinstance(data, Event):
        if not has_header(headers, "Content-Type"):
            headers.append(("Content-Type", "text/event-stream"))
        if not has_header(headers, "Cache-Control"):
            headers.append(("Cache-Control", "no-cache"))
    elif not has_header(headers, "Content-Type"):
        raw = data.get("body") if isinstance(data, dict) else data
        if isinstance(raw, str):
            headers.append(("Content-Type", "text/plain; charset=utf-8"))
        elif raw is not None:
            headers.append(("Content-Type", "application/octet-stream"))
    return status, headers


def has_header(headers: list, name: str) -> bool:
    name = name.lower()
    return any(key.lower() == name for key, _ in headers)


def to_bytes(body: Any) -> bytes:
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode()
    return bytes(body)


def http_response(status: int, headers: Headers, body: Any, close: bool) -> bytes:
    """A complete response with ``Content-Length`` (a rejection, an error)."""
    data = to_bytes(body)
    items = header_items(headers)
    if status == 204:  # RFC 9110 15.3.5: no content, so neither its type nor its length
        data = b""
    else:
        if not has_header(items, "Content-Type"):
            items.append(("Content-Type", "text/plain; charset=utf-8"))
        items.append(("Content-Length", str(len(data))))
    if close:
        items.append(("Connection", "close"))
    return response_head(status, items) + data
