"""python-socketio with its Redis manager, on gevent: the peer for broadcast across processes.

    python socketio_server.py PORT REDIS_URL

A Socket.IO server in gevent mode (`async_mode="gevent"`, served by gevent's pywsgi
with gevent-websocket's handler, as python-socketio's deployment notes say) whose
client manager is `socketio.RedisManager`: an emit to a room is delivered to the
room's local members and published on Redis for every other process. The process
is monkey-patched, as the Redis manager needs on gevent.

A client that connects with `role=sub` in its query joins the room "all"; each "pub"
event is emitted to the room as event "m". WebSocket transport only (the benchmark
client never long-polls).
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

import socketio  # noqa: E402
from gevent import pywsgi  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

sio = socketio.Server(async_mode="gevent", client_manager=socketio.RedisManager(sys.argv[2]),
                      transports=["websocket"], cors_allowed_origins="*")


@sio.event
def connect(sid, environ):
    if "role=sub" in environ.get("QUERY_STRING", ""):
        sio.enter_room(sid, "all")


@sio.on("pub")
def pub(sid, data):
    sio.emit("m", data, to="all")


if __name__ == "__main__":
    server = pywsgi.WSGIServer(("127.0.0.1", int(sys.argv[1])), socketio.WSGIApp(sio),
                               handler_class=WebSocketHandler, log=None, backlog=4096)
    server.start()
    print(f"READY {server.server_port}", flush=True)
    server.serve_forever()
