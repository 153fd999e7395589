"""A live feed over Server-Sent Events: every second, the time and a counter.

    python examples/feed.py                 # http://127.0.0.1:8081/
    curl -N http://127.0.0.1:8081/events    # the raw stream

The page uses the browser's own EventSource; the server side is one handler that
adds each subscriber to a group, and one greenlet that broadcasts to the group.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402

try:
    from greenchan import Event, MemoryChannelStore, Server, with_channel  # noqa: E402
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from greenchan import Event, MemoryChannelStore, Server, with_channel  # noqa: E402

PAGE = b"""<!doctype html><meta charset="utf-8"><title>greenchan feed</title>
<h1>Live feed</h1><ul id="feed"></ul>
<script>
const feed = document.getElementById("feed");
new EventSource("/events").addEventListener("tick", (e) => {
  const li = document.createElement("li"); li.textContent = e.data; feed.prepend(li);
});
</script>"""

store = MemoryChannelStore()


@with_channel
def events(channel):
    """Each subscriber joins the group; the broadcaster does the rest."""
    channel.send(Event("connected", event="hello"))
    store.add_to_group("feed", channel)


def page(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
    return [PAGE]


def app(environ, start_response):
    if environ["PATH_INFO"] == "/events":
        return events(environ, start_response)
    return page(environ, start_response)


def broadcast_forever(interval: float = 1.0) -> None:
    count = 0
    while True:
        count += 1
        store.broadcast("feed", Event(f"{time.strftime('%H:%M:%S')} tick {count}", event="tick", id=str(count)))
        gevent.sleep(interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between ticks")
    args = parser.parse_args()
    server = Server(app, host=args.host, port=args.port).start()
    print(f"feed on http://{args.host}:{server.port}/", flush=True)
    gevent.spawn(broadcast_forever, args.interval)
    server.serve_forever()


if __name__ == "__main__":
    main()
