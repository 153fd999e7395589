"""The bytes a message is while it crosses processes (``RedisChannelStore``)."""
from __future__ import annotations

import json
from typing import Any, Dict

from ..channel import Event, check_message

# -- the wire format of RedisChannelStore --------------------------------------
#
# One tag byte, then the payload, so that the common case (text) costs one byte:
#   b"s" + UTF-8 text                         str
#   b"b" + the bytes                          bytes, bytearray, memoryview
#   b"e" + JSON {event,id,retry} + b"\n" + UTF-8 data                 Event
#   b"d" + JSON {status,headers,body: "s"|"b"|null} + b"\n" + body    response dict
# Compact JSON never contains a raw newline, so the first b"\n" ends it.
#
# A group with history publishes (from a Lua script, history.py's PUBLISH_LUA)
#   b"h" + epoch + b":" + <ms>-<n> + b" " + one of the above
# so that every process knows each message's id and number.

_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode(message: Any) -> bytes:
    """The bytes a ``RedisChannelStore`` publishes for ``message``."""
    if isinstance(message, str):
        return b"s" + message.encode()
    if isinstance(message, (bytes, bytearray, memoryview)):
        return b"b" + bytes(message)
    if isinstance(message, Event):
        fields = {k: getattr(message, k) for k in ("event", "id", "retry") if getattr(message, k) is not None}
        return b"e" + _JSON.encode(fields).encode() + b"\n" + message.data.encode()
    if isinstance(message, dict):
        check_message(message)
        body = message.get("body")
        meta: Dict[str, Any] = {}
        if "status" in message:
            meta["status"] = int(message["status"])
        headers = message.get("headers")
        if headers is not None:
            items = headers.items() if hasattr(headers, "items") else headers
            meta["headers"] = [[str(k), str(v)] for k, v in items]
        if isinstance(body, str):
            meta["body"], raw = "s", body.encode()
        elif body is not None:
            meta["body"], raw = "b", bytes(body)
        else:
            raw = b""
        return b"d" + _JSON.encode(meta).encode() + b"\n" + raw
    check_message(message)  # raises the TypeError that says what can be sent
    raise TypeError(f"cannot broadcast {type(message).__name__}")  # pragma: no cover


def decode(payload: bytes) -> Any:
    """The message ``encode`` made ``payload`` from."""
    tag, rest = payload[:1], payload[1:]
    if tag == b"s":
        return rest.decode()
    if tag == b"b":
        return bytes(rest)
    head, _, raw = rest.partition(b"\n")
    meta = json.loads(head)
    if tag == b"e":
        return Event(raw.decode(), event=meta.get("event"), id=meta.get("id"), retry=meta.get("retry"))
    if tag == b"d":
        message: Dict[str, Any] = {}
        if "status" in meta:
            message["status"] = meta["status"]
        if "headers" in meta:
            message["headers"] = [tuple(pair) for pair in meta["headers"]]
        kind = meta.get("body")
        if kind == "s":
            message["body"] = raw.decode()
        elif kind == "b":
            message["body"] = bytes(raw)
        return message
    raise ValueError(f"unknown greenchan message tag {tag!r}")

