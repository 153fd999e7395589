"""A TCP relay the tests can cut and restore: the network between a browser and a server.

Chromium's ``context.set_offline(True)`` leaves connections that are already open
alone, so a test that wants "the network dropped mid-conversation" puts this relay
between the page and the server and calls ``cut()``: every relayed connection ends
at once (whatever was in flight in the relay is lost, as on a real drop) and new
ones are refused (accepted and reset) until ``restore()``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Any

import gevent
from gevent.server import StreamServer

CHUNK = 65536


class Relay:
    """``Relay(port).start()`` listens on a free port of 127.0.0.1 and forwards to ``port``."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.server = StreamServer((host, 0), self._serve)
        self.is_cut = False
        self.accepted = 0  # connections relayed (not counting refused ones)
        self.refused = 0
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()

    @property
    def port(self) -> int:
        return self.server.server_port

    def start(self) -> Relay:
        self.server.start()
        return self

    def cut(self) -> None:
        """The network drops: end every relayed connection, refuse new ones."""
        self.is_cut = True
        for pair in list(self._pairs):
            self._end(pair)

    def restore(self) -> None:
        """The network is back: new connections go through again."""
        self.is_cut = False

    def retarget(self, port: int) -> None:
        """Send new connections to ``port`` (a server that took over); open ones are untouched."""
        self.target = (self.target[0], port)

    def stop(self) -> None:
        self.cut()
        self.server.stop(timeout=1)

    def _serve(self, client: socket.socket, address: Any) -> None:
        if self.is_cut:
            self.refused += 1
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        pair = (client, upstream)
        self._pairs.add(pair)
        self.accepted += 1
        back = gevent.spawn(self._pump, upstream, client, pair)
        try:
            self._pump(client, upstream, pair)
        finally:
            back.join(timeout=5)
            back.kill(block=False)
            self._end(pair)

    def _pump(self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, socket.socket]) -> None:
        try:
            while pair in self._pairs:
                data = src.recv(CHUNK)
                if not data:
                    # A half-close passes through: the other direction may still flow.
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except OSError:
            self._end(pair)

    def _end(self, pair: tuple[socket.socket, socket.socket]) -> None:
        if pair not in self._pairs:
            return
        self._pairs.discard(pair)
        for sock in pair:
            _reset(sock)


def _reset(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): the peer learns at once that the connection is gone."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
