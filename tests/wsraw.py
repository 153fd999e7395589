"""A raw WebSocket client over a plain socket, for bytes a client library would hide."""
from __future__ import annotations

import base64
import os
import socket
import struct
from typing import Optional, Tuple


def handshake(port: int, path: str = "/", extra: str = "", key: Optional[str] = None) -> Tuple[socket.socket, bytes]:
    """Open a socket, send an upgrade request, return the socket and the response head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = key or base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return sock, head


def frame(opcode: int, payload: bytes = b"", fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    """One client frame, masked as RFC 6455 requires unless told otherwise."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", first, (0x80 if mask else 0) | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, length)
    else:
        head = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


def _exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> Tuple[int, bytes]:
    """Read one server frame: (opcode, payload)."""
    first, second = _exact(sock, 2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", _exact(sock, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", _exact(sock, 8))
    return first & 0x0F, _exact(sock, length)


def read_close(sock: socket.socket) -> Tuple[Optional[int], bytes]:
    """Read frames until a close frame; return its code and reason."""
    for _ in range(1000):
        opcode, payload = read_frame(sock)
        if opcode == 8:
            if len(payload) >= 2:
                return struct.unpack("!H", payload[:2])[0], payload[2:]
            return None, b""
    raise AssertionError("no close frame")


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason
