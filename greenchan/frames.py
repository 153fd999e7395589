"""A lean fast path for the common WebSocket frames, beside websockets' engine.

Most traffic is unfragmented, masked text or binary frames with no extension. For those, parsing and building frames here instead of through
websockets' generator-based parser saves most of the per-message cost
(DESIGN.md: 50k -> 81k echo messages/s on this machine's 64-connection echo,
client-bound). Everything else (control frames, fragments, anything over the size limit or
malformed) is left untouched for ``ServerProtocol``, which stays the authority.
A large frame split across reads is collected here (``FastReader``) instead of
in the engine's generator-based reader: the 256 KiB echo benchmark runs through
this path. ``tests/test_frames.py`` feeds both
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
_U64 = struct.Struct("!Q")


def parse_complete(data: Any, max_size: Optional[int]) -> Tuple[List[Tuple[bool, bytes]], int, bool]:
    """Parse the leading complete, final, masked text/binary frames of ``data``.

    Returns ``[(is_text, payload), ...]``, how many bytes they took, and whether
    the rest is the start of a frame this parser will take once it is complete
    (so the caller should wait for more bytes rather than hand the rest to the
    engine). Text payloads are returned undecoded: UTF-8 is the caller's.
    """
    frames: List[Tuple[bool, bytes]] = []
    pos = 0
    end = len(data)
    while True:
        left = end - pos
        if left < 2:
            return frames, pos, True  # nothing, or not enough to tell
        first = data[pos]
        second = data[pos + 1]
        if (first != _FIN_TEXT and first != _FIN_BINARY) or not second & 0x80:
            return frames, pos, False
        length = second & 0x7F
        if length < 126:
            start = pos + 6
        elif length == 126:
            if left < 4:
                return frames, pos, True
            (length,) = _U16.unpack_from(data, pos + 2)
            start = pos + 8
        else:
            if left < 10:
                return frames, pos, True
            (length,) = _U64.unpack_from(data, pos + 2)
            if length >> 63:
                return frames, pos, False  # invalid: the engine says so
            start = pos + 14
        if max_size is not None and length > max_size:
            return frames, pos, False  # the engine closes with 1009
        stop = start + length
        if stop > end:
            return frames, pos, True
        frames.append((first == _FIN_TEXT, apply_mask(data[start:stop], data[start - 4:start])))
        pos = stop


class FastReader:
    """Feeds the fast path across reads: a large frame arrives in several chunks.

    ``feed(data)`` returns the messages it completed and the bytes it will not
    take (from a frame boundary on), which go to the engine; from then on the
    engine has the stream until the caller knows it is at a boundary again.
    """

    __slots__ = ("max_size", "_pending")

    def __init__(self, max_size: Optional[int]) -> None:
        self.max_size = max_size
        self._pending: Optional[bytearray] = None  # an incomplete frame we will take

    def feed(self, data: bytes) -> Tuple[List[Tuple[bool, bytes]], bytes]:
        buffer: Any = data
        if self._pending is not None:
            self._pending += data
            buffer = self._pending
            self._pending = None
        frames, used, wait = parse_complete(buffer, self.max_size)
        if used == len(buffer):
            return frames, b""
        if wait:
            self._pending = bytearray(memoryview(buffer)[used:])
            return frames, b""
        return frames, bytes(memoryview(buffer)[used:])

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._pending) if self._pending is not None else 0


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
