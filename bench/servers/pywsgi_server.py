"""Plain gevent pywsgi, the HTTP baseline: what greenchan's HTTP channel adds cost to.

    python pywsgi_server.py PORT

  /poll    a fixed body with Content-Length (what a long-poll answer is)
  /stream  three chunks, chunked encoding (what a stream is)
  /idle    holds the request open, a greenlet waiting (what an idle long-poll is)
  /sse     one event of a text/event-stream, then the greenlet waits (an idle SSE stream)
"""

import socket
import sys

from gevent import pywsgi
from gevent.event import Event

BODY = b"hello, world"
forever = Event()


def chunks():
    yield b"chunk 1\n"
    yield b"chunk 2\n"
    yield b"chunk 3\n"


def events():
    yield b"data: open\n\n"
    forever.wait()


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/poll":
        start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                                  ("Content-Length", str(len(BODY)))])
        return [BODY]
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
        return chunks()
    if path == "/idle":
        forever.wait()
        start_response("204 No Content", [])
        return []
    if path == "/sse":
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
        return events()
    start_response("404 Not Found", [("Content-Length", "0")])
    return [b""]


class NoDelayServer(pywsgi.WSGIServer):
    """pywsgi writes a response's headers and body in two sends; without TCP_NODELAY,
    Nagle and the client's delayed ACK hold the body back ~40 ms on every keep-alive
    request (1.4k req/s at 20% CPU here). The baseline is pywsgi at its best."""

    def handle(self, sock, address):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle(sock, address)


if __name__ == "__main__":
    server = NoDelayServer(("127.0.0.1", int(sys.argv[1])), app, log=None)
    server.start()
    print(f"READY {server.server_port}", flush=True)
    server.serve_forever()
