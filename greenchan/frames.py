"""A lean fast path for the common WebSocket frames, beside websockets' engine.

Most traffic is complete, unfragmented, masked text or binary frames with no
extension. For those, parsing and building frames here instead of through
websockets' generator-based parser saves most of the per-message cost
(DESIGN.md: 50k -> 81k echo messages/s on this machine's 64-connection echo,
client-bound). Everything else (control frames, fragments, a frame split across
reads, anything over the size limit or malformed) is left untouched for
``ServerProtocol``, which stays the authority. ``tests/test_frames.py`` feeds both
the same bytes and demands the same result.
"""
from __future__ import annotations

import struct
from typing import Any, List, Optional, Tuple

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets without its C extension
    from websockets.utils import apply_mask

_FIN_TEXT, _FIN_BINARY = 0x81, 0x82
_U16 = struct.Struct("!H")
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")


def parse_complete(data: bytes, max_size: Optional[int]) -> Tuple[List[Tuple[bool, bytes]], int]:
    """Parse the leading complete, final, masked text/binary frames of ``data``.

    Returns ``[(is_text, payload), ...]`` and how many bytes they took. Stops at
    the first frame it does not handle, which the caller gives to the engine.
    Text payloads are returned undecoded: UTF-8 validation is the caller's.
    """
    frames: List[Tuple[bool, bytes]] = []
    pos = 0
    end = len(data)
    while end - pos >= 6:
        first = data[pos]
        second = data[pos + 1]
        if (first != _FIN_TEXT and first != _FIN_BINARY) or not second & 0x80:
            break
        length = second & 0x7F
        if length < 126:
            start = pos + 6
        elif length == 126:
            if end - pos < 8:
                break
            (length,) = _U16.unpack_from(data, pos + 2)
            start = pos + 8
        else:  # 64-bit lengths are rare and big: the engine checks them
            break
        if max_size is not None and length > max_size:
            break
        stop = start + length
        if stop > end:
            break
        frames.append((first == _FIN_TEXT, apply_mask(data[start:stop], data[start - 4:start])))
        pos = stop
    return frames, pos


def encode(opcode: int, payload: bytes) -> bytes:
    """A final, unmasked server frame (RFC 6455 section 5.2)."""
    length = len(payload)
    if length < 126:
        return bytes((0x80 | opcode, length)) + payload
    if length < 65536:
        return _HEAD16.pack(0x80 | opcode, 126, length) + payload
    return _HEAD64.pack(0x80 | opcode, 127, length) + payload


# The last immutable message framed, and its frame: a broadcast sends the same
# object to every member, so it is encoded once instead of once per member.
# Holding the object keeps its id from being reused while it is cached.
_last: list = [None, b""]


def encode_message(data: Any) -> bytes:
    """The frame for a ``str`` (text) or bytes-like (binary) message."""
    if data is _last[0]:
        return _last[1]
    if isinstance(data, str):
        frame = encode(1, data.encode())
    elif isinstance(data, bytes):
        frame = encode(2, data)
    else:  # mutable (bytearray, memoryview): never cached
        return encode(2, bytes(data))
    _last[0], _last[1] = data, frame
    return frame
