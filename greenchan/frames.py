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


def parse_complete(data: Any, max_size: Optional[int]) -> Tuple[List[Tuple[bool, bytes]], int, int]:
    """Parse the leading complete, final, masked text/binary frames of ``data``.

    Returns ``[(is_text, payload), ...]``, how many bytes they took, and what
    the rest is: 0 if it is not for this parser (hand it to the engine), else
    the size of the incomplete frame it starts (1 while too short to tell), so
    the caller waits for that many bytes. Text payloads are returned undecoded.
    """
    frames: List[Tuple[bool, bytes]] = []
    pos = 0
    end = len(data)
    view = memoryview(data)
    while True:
        left = end - pos
        if left < 2:
            return frames, pos, 1 if left else 0
        first = data[pos]
        second = data[pos + 1]
        if (first != _FIN_TEXT and first != _FIN_BINARY) or not second & 0x80:
            return frames, pos, 0
        length = second & 0x7F
        if length < 126:
            start = pos + 6
        elif length == 126:
            if left < 4:
                return frames, pos, 1
            (length,) = _U16.unpack_from(data, pos + 2)
            start = pos + 8
        else:
            if left < 10:
                return frames, pos, 1
            (length,) = _U64.unpack_from(data, pos + 2)
            if length >> 63:
                return frames, pos, 0  # invalid: the engine says so
            start = pos + 14
        if max_size is not None and length > max_size:
            return frames, pos, 0  # the engine closes with 1009
        stop = start + length
        if stop > end:
            return frames, pos, stop - pos
        frames.append((first == _FIN_TEXT, apply_mask(view[start:stop], bytes(view[start - 4:start]))))
        pos = stop


class FastReader:
    """Feeds the fast path across reads: a large frame arrives in several chunks.

    ``feed(data)`` returns the messages it completed and the bytes it will not
    take (from a frame boundary on), which go to the engine; from then on the
    engine has the stream until the caller knows it is at a boundary again.
    """

    __slots__ = ("max_size", "_chunks", "_size", "_need")

    def __init__(self, max_size: Optional[int]) -> None:
        self.max_size = max_size
        # The pieces of an incomplete frame we will take, joined once complete:
        # one copy per frame, however many reads it took.
        self._chunks: List[bytes] = []
        self._size = 0
        self._need = 0

    def feed(self, data: bytes) -> Tuple[List[Tuple[bool, bytes]], bytes]:
        if self._chunks:
            self._chunks.append(data)
            self._size += len(data)
            if self._size < self._need:
                return [], b""
            data = b"".join(self._chunks)
            self._chunks = []
            self._size = 0
        frames, used, need = parse_complete(data, self.max_size)
        if used == len(data):
            return frames, b""
        rest = data[used:]
        if need:
            self._chunks = [rest]
            self._size = len(rest)
            self._need = need
            return frames, b""
        return frames, rest

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete frame."""
        return self._size


def header(opcode: int, length: int) -> bytes:
    """The header of a final, unmasked server frame (RFC 6455 section 5.2)."""
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return _HEAD16.pack(0x80 | opcode, 126, length)
    return _HEAD64.pack(0x80 | opcode, 127, length)


def encode(opcode: int, payload: bytes) -> bytes:
    """A final, unmasked server frame."""
    return header(opcode, len(payload)) + payload


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
