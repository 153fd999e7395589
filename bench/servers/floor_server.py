"""The fan-out floor: a bare gevent WebSocket server, one raw `send` per subscriber.

    python floor_server.py PORT

What a broadcast costs on this machine when a server does nothing but the kernel's
part: the publisher's frame is parsed and a server frame built once, then the raw,
non-blocking `_socket.socket.send` is called once per subscriber: no gevent socket
wrapper (no hub switch, no wait), no per-member state, no queue, no error handling
beyond dropping a member whose send fails. A short send is not retried (a 32-byte
frame into an empty 2.5 MiB loopback buffer is not short). It is the floor a real
server is measured against, not a server anyone should run.

Routes: /sub joins the group (its greenlet only waits for the hang-up), /pub
broadcasts each text or binary message it receives to the group.
"""

import base64
import hashlib
import socket as _stdsocket
import struct
import sys

from gevent.server import StreamServer

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
subscribers = []   # the raw _socket.socket of each subscriber


def handshake(sock):
    """Read the upgrade request, answer 101; return (path, leftover bytes) or None."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(4096)
        if not data or len(buf) > 16384:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    path = lines[0].split()[1].decode()
    key = b""
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    return path, rest


def frame(opcode, payload):
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + struct.pack("!H", n) + payload
    return bytes((0x80 | opcode, 127)) + struct.pack("!Q", n) + payload


def read_frames(sock, buf):
    """Yield (opcode, payload) of each client frame (masked, unfragmented)."""
    while True:
        while True:
            if len(buf) >= 2:
                n = buf[1] & 0x7F
                start = 2 + (2 if n == 126 else 8 if n == 127 else 0)
                if len(buf) >= start:
                    if n == 126:
                        n = struct.unpack_from("!H", buf, 2)[0]
                    elif n == 127:
                        n = struct.unpack_from("!Q", buf, 2)[0]
                    masked = buf[1] & 0x80
                    end = start + (4 if masked else 0) + n
                    if len(buf) >= end:
                        break
            data = sock.recv(65536)
            if not data:
                return
            buf += data
        op = buf[0] & 0x0F
        if masked:
            mask = buf[start:start + 4]
            payload = bytes(b ^ mask[i & 3] for i, b in enumerate(buf[start + 4:end]))
        else:
            payload = buf[start:end]
        buf = buf[end:]
        yield op, payload


def handle(sock, address):
    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
    try:
        hs = handshake(sock)
        if hs is None:
            return
        path, rest = hs
        if path == "/sub":
            raw = sock._sock   # the stdlib socket under gevent's wrapper, non-blocking
            subscribers.append(raw)
            try:
                for op, _ in read_frames(sock, rest):
                    if op == 0x8:
                        break
            finally:
                if raw in subscribers:
                    subscribers.remove(raw)
        elif path == "/pub":
            for op, payload in read_frames(sock, rest):
                if op == 0x8:
                    break
                if op in (0x1, 0x2):
                    f = frame(op, payload)   # framed once for every subscriber
                    for s in subscribers:
                        try:
                            s.send(f)
                        except OSError:
                            pass
    except OSError:
        pass


if __name__ == "__main__":
    server = StreamServer(("127.0.0.1", int(sys.argv[1])), handle, backlog=4096)
    server.start()
    print(f"READY {server.server_port}", flush=True)
    server.serve_forever()
