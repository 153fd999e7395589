"""Why greenchan's ``compression`` default is off: the cost of permessage-deflate.

    python bench/compression.py

Measures, in one run on this machine: (1) server CPU per message to frame a
message with and without permessage-deflate (websockets' engine, as greenchan
uses it), for a 32-byte chat message and a 16 KiB JSON document; (2) the bytes on
the wire for each; (3) server memory per idle WebSocket with and without
compression negotiated (RSS delta over N connections, a greenchan server in a
subprocess).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

SMALL = b'{"user":"ann","text":"hi there"}'
LARGE = json.dumps([{"id": i, "name": f"user {i}", "online": i % 3 == 0} for i in range(300)]).encode()


def frame_cost(payload: bytes, deflate: bool, n: int = 20000) -> tuple:
    extensions = [PerMessageDeflate(False, False, 15, 15)] if deflate else []
    t0 = time.perf_counter()
    for _ in range(n):
        data = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=extensions)
    return (time.perf_counter() - t0) / n * 1e6, len(data)


SERVER = textwrap.dedent(
    """
    from gevent import monkey; monkey.patch_all()
    import sys
    from greenchan import Server, with_channel
    app = with_channel(lambda ch: ch.on_receive(ch.send))
    server = Server(app, port=0, compression=sys.argv[1] if sys.argv[1] != "none" else None).start()
    print("READY", server.port, flush=True)
    server.serve_forever()
    """
)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def idle_memory(compression: str, n: int = 1000) -> float:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, compression], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().split()[1])
        extra = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if compression != "none" else ""

        def connect() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(
                (
                    "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                    f"{extra}\r\n"
                ).encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
            return sock

        warm = [connect() for _ in range(50)]
        time.sleep(0.5)
        before = rss_kib(proc.pid)
        socks = [connect() for _ in range(n)]
        time.sleep(1.0)
        after = rss_kib(proc.pid)
        for sock in socks + warm:
            sock.close()
        return (after - before) / n
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    print("| payload | compression | CPU per message (µs) | bytes on the wire |")
    print("|---|---|---|---|")
    for name, payload in (("32 B chat message", SMALL), (f"{len(LARGE) // 1024} KiB JSON", LARGE)):
        for deflate in (False, True):
            cost, size = frame_cost(payload, deflate)
            print(f"| {name} | {'deflate' if deflate else 'off'} | {cost:.1f} | {size} |")
    print()
    print("| compression | server RSS per idle WebSocket (KiB) |")
    print("|---|---|")
    for compression in ("none", "deflate"):
        print(f"| {compression} | {idle_memory(compression):.1f} |")
    print(f"\n(python bench/compression.py; Python {sys.version.split()[0]}, pid {os.getpid()})")


if __name__ == "__main__":
    main()
