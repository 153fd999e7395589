"""gevent-websocket on gevent's pywsgi: echo on /echo, broadcast on /sub and /pub.

    python gevent_websocket_server.py PORT
"""

import sys

from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler

subscribers = set()


def app(environ, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is None:
        start_response("400 Bad Request", [("Content-Length", "0")])
        return [b""]
    path = environ["PATH_INFO"]
    if path == "/echo":
        while True:
            message = ws.receive()
            if message is None:
                break
            ws.send(message, binary=isinstance(message, (bytes, bytearray)))
    elif path == "/sub":
        subscribers.add(ws)
        try:
            while ws.receive() is not None:
                pass
        finally:
            subscribers.discard(ws)
    elif path == "/pub":
        while True:
            message = ws.receive()
            if message is None:
                break
            for s in list(subscribers):
                try:
                    s.send(message)
                except Exception:
                    subscribers.discard(s)
    return []


if __name__ == "__main__":
    server = pywsgi.WSGIServer(("127.0.0.1", int(sys.argv[1])), app,
                               handler_class=WebSocketHandler, log=None)
    server.start()
    print(f"READY {server.server_port}", flush=True)
    server.serve_forever()
