"""Frame boundaries and a lean fast path for the common WebSocket frames.

Most traffic is unfragmented, masked text or binary frames with no extension. For
those, parsing here instead of through websockets' generator-based parser saves
most of the per-message cost (DESIGN.md: 50k -> 81k echo messages/s on this
machine's 64-connection echo, client-bound). Every other frame (control frames,
fragments, compressed frames, anything over the size limit or malformed) goes to
``ServerProtocol``, which stays the authority on what a frame means.

``FrameReader`` decides, for each frame of the stream, who parses it, and it
knows where every frame ends because it reads every frame header itself: the
engine is given each of its frames from the first byte to the last and nothing
more, so once a frame it was given ends, the engine is idle at a frame boundary.
(Asking the engine instead, through an empty ``reader.buffer``, was wrong:
websockets' reader consumes a header before its mask and payload arrive, issue
10.) ``tests/test_websocket_split.py`` feeds frame sequences under every split,
down to one byte per read, and demands websockets' own result on the whole stream.
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

Messages = List[Tuple[bool, bytes]]


def parse_complete(data: Any, pos: int, max_size: Optional[int], limit: int) -> Tuple[Messages, int, int]:
    """Parse at most ``limit`` complete, final, masked text/binary frames from ``pos``.

    Returns ``[(is_text, payload), ...]``, the position after them, and what
    comes there: 0 if it is not for this parser (another kind of frame, or the
    limit was reached), else how many bytes from that position the incomplete
    frame it starts needs before it can be parsed (at least one more byte while
    its header is incomplete). Text payloads are returned undecoded.
    """
    frames: Messages = []
    end = len(data)
    view = memoryview(data)
    while limit:
        left = end - pos
        if left < 2:
            return frames, pos, 2 if left else 0
        first = data[pos]
        second = data[pos + 1]
        if (first != _FIN_TEXT and first != _FIN_BINARY) or not second & 0x80:
            return frames, pos, 0
        length = second & 0x7F
        if length < 126:
            start = pos + 6
        elif length == 126:
            if left < 4:
                return frames, pos, 4
            (length,) = _U16.unpack_from(data, pos + 2)
            start = pos + 8
        else:
            if left < 10:
                return frames, pos, 10
            (length,) = _U64.unpack_from(data, pos + 2)
            if length >> 63:
                return frames, pos, 0  # invalid: FrameReader says so
            start = pos + 14
        if max_size is not None and length > max_size:
            return frames, pos, 0  # the engine closes with 1009 (1002 past 2**63)
        stop = start + length
        if stop > end:
            return frames, pos, stop - pos
        frames.append((first == _FIN_TEXT, apply_mask(view[start:stop], bytes(view[start - 4:start]))))
        pos = stop
        limit -= 1
    return frames, pos, 0


# What FrameReader.next() returns, with its value. The *_LAST steps used up
# every byte read, so the caller need not ask again until the next read.
MORE = 0  # None: nothing to do until more bytes arrive
MESSAGES = 1  # [(is_text, payload), ...] parsed here, at most ``room`` of them
MESSAGES_LAST = 2
ENGINE_END = 3  # the last bytes of a frame for the engine (its first too, if whole)
ENGINE_LAST = 4
ENGINE = 5  # bytes of a frame for the engine, which does not end it (always last)
TOO_LONG = 6  # None: a 64-bit length with its top bit set (RFC 6455 5.2: 1002)


class FrameReader:
    """Splits the client's byte stream at frame boundaries, whatever the reads.

    ``feed(data)`` adds one read; ``next(room)`` returns the next step (above),
    taking no more than one frame for the engine or ``room`` fast messages, so
    the caller parses no further than its inbound queue has room for and the
    rest stays here, unparsed (``unparsed``), until it asks again.

    Invariant: the engine has been given exactly the bytes of the frames the
    reader sent it, up to the current position. At a frame boundary (``left``
    is 0) it therefore holds no partial frame, and outside a fragmented
    message the fast path may take the next frame.

    With ``fast`` false (an extension was negotiated) every frame goes to the
    engine, still one at a time.
    """

    __slots__ = ("max_size", "fast", "left", "_buf", "_pos", "_held", "_held_size", "_need", "_fragmented")

    def __init__(self, max_size: Optional[int], fast: bool = True) -> None:
        self.max_size = max_size
        self.fast = fast
        self._buf: Any = b""  # the read being parsed, from _pos on
        self._pos = 0
        # An incomplete header or fast frame, from a boundary on, in the pieces
        # it came in: joined once, when long enough (one copy per frame,
        # however many reads it took).
        self._held: List[bytes] = []
        self._held_size = 0
        self._need = 0
        # Bytes of the engine's current frame not yet given to it: while not 0,
        # the engine holds part of a frame and the rest must follow.
        self.left = 0
        self._fragmented = False  # inside a fragmented message: all to the engine

    @property
    def unparsed(self) -> int:
        """Bytes read and kept here: unparsed, or an incomplete frame."""
        return len(self._buf) - self._pos + self._held_size

    def feed(self, data: bytes) -> None:
        """Add the bytes of one read."""
        if self._pos < len(self._buf):  # what was not asked for yet comes first
            data = bytes(self._buf[self._pos:]) + data
        elif self._held:
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size < self._need:
                self._buf, self._pos = b"", 0
                return
            data = b"".join(self._held)
            self._held = []
            self._held_size = 0
        self._buf, self._pos = data, 0

    def rest(self) -> bytes:
        """Everything kept, from the current position on; the reader is emptied.

        For after the close handshake or a failure: the engine discards it.
        """
        data = bytes(self._buf[self._pos:]) + b"".join(self._held)
        self._buf, self._pos, self._held, self._held_size, self.left = b"", 0, [], 0, 0
        return data

    def next(self, room: int) -> Tuple[int, Any]:
        """The next step and its value (the constants above).

        At a boundary the next frame goes to the fast path if it is a final,
        masked text or binary frame within ``max_size`` outside a fragmented
        message (and ``fast``); any other frame's header is read here, and
        its bytes, exactly, go to the engine, in as many steps as reads.
        """
        buf = self._buf
        pos = self._pos
        end = len(buf)
        if pos >= end:
            return MORE, None
        left = self.left
        if left:  # the engine has this frame's start: give it the rest, and no more
            if end - pos < left:
                self.left = left - (end - pos)
                self._pos = end
                return ENGINE, memoryview(buf)[pos:]
            self.left = 0
            self._pos = pos = pos + left
            return ENGINE_END if pos < end else ENGINE_LAST, memoryview(buf)[pos - left:pos]
        if self.fast and not self._fragmented:
            frames, pos, need = parse_complete(buf, pos, self.max_size, room)
            self._pos = pos
            if frames:
                return MESSAGES if pos < end else MESSAGES_LAST, frames
            if need:
                return self._hold(need)
        # A frame for the engine: read its header, to know where it ends.
        avail = end - pos
        if avail < 2:
            return self._hold(2)
        first = buf[pos]
        second = buf[pos + 1]
        length = second & 0x7F
        if length < 126:
            size = 2
        elif length == 126:
            if avail < 4:
                return self._hold(4)
            (length,) = _U16.unpack_from(buf, pos + 2)
            size = 4
        else:
            if avail < 10:
                return self._hold(10)
            (length,) = _U64.unpack_from(buf, pos + 2)
            if length >> 63:
                return TOO_LONG, None
            size = 10
        if self.fast:  # where a fragmented message starts and ends
            opcode = first & 0x0F
            if opcode == 1 or opcode == 2:
                self._fragmented = not first & 0x80
            elif opcode == 0 and first & 0x80:
                self._fragmented = False
        # An unmasked or otherwise invalid frame fails in the engine at its
        # header, whatever length it claims; what follows is discarded.
        left = size + (4 if second & 0x80 else 0) + length
        if avail < left:
            self.left = left - avail
            self._pos = end
            return ENGINE, memoryview(buf)[pos:] if pos else buf
        self._pos = pos + left
        if avail == left:
            return ENGINE_LAST, memoryview(buf)[pos:] if pos else buf
        return ENGINE_END, memoryview(buf)[pos:pos + left]

    def _hold(self, need: int) -> Tuple[int, Any]:
        """Keep the incomplete frame or header at the position until ``need`` bytes."""
        rest = self._buf[self._pos:]
        self._held = [bytes(rest)]
        self._held_size = len(rest)
        self._need = need
        self._buf, self._pos = b"", 0
        return MORE, None


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
