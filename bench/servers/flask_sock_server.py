"""Flask-Sock on gevent's pywsgi (monkey-patched): echo on /echo, broadcast on /sub and /pub.

    python flask_sock_server.py PORT
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from flask import Flask  # noqa: E402
from flask_sock import Sock  # noqa: E402
from gevent import pywsgi  # noqa: E402

app = Flask(__name__)
sock = Sock(app)
subscribers = set()


@sock.route("/echo")
def echo(ws):
    while True:
        ws.send(ws.receive())


@sock.route("/sub")
def sub(ws):
    subscribers.add(ws)
    try:
        while True:
            ws.receive()
    finally:
        subscribers.discard(ws)


@sock.route("/pub")
def pub(ws):
    while True:
        message = ws.receive()
        for s in list(subscribers):
            try:
                s.send(message)
            except Exception:
                subscribers.discard(s)


if __name__ == "__main__":
    server = pywsgi.WSGIServer(("127.0.0.1", int(sys.argv[1])), app, log=None)
    server.start()
    print(f"READY {server.server_port}", flush=True)
    server.serve_forever()
