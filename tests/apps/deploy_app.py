"""A WSGI app for the deployment tests, served by gunicorn, the command line and gevent-websocket.

Every channel appends ``open <path> <pid>`` to the file named by ``DEPLOY_LOG`` when
its handler starts, and ``close <path> <status> <code> <pid>`` from its ``on_close``,
so a test can wait until the server holds its channels and then check that every
``on_close`` ran, in whichever worker process.

Routes (one handler serves WebSocket and HTTP):
  /echo    echo each message; an HTTP POST gets its body back; a GET waits
  /stream  HTTP: start a stream with one chunk, then wait
  /pid     answer the worker's pid
"""
import os

from greenchan import with_channel


def _log(line: str) -> None:
    path = os.environ.get("DEPLOY_LOG")
    if path:
        with open(path, "a") as f:  # one short O_APPEND write: lines never mix
            f.write(line + "\n")


# Imported by each worker after gunicorn installed its signal handlers: the tests
# wait for one line per worker before sending signals (a SIGTERM that reaches a
# gevent worker while it boots can be lost, with gunicorn's own gevent worker too).
_log(f"ready {os.getpid()}")


@with_channel
def _handler(channel):
    path = channel.environ.get("PATH_INFO", "")
    pid = os.getpid()

    @channel.on_close
    def closed(status):
        _log(f"close {path} {status} {channel.close_code} {pid}")

    if path == "/pid":
        channel.send(str(pid))
        return
    if path == "/stream":
        channel.send("first\n", close=False)
    elif path == "/echo":
        channel.on_receive(channel.send)
    _log(f"open {path} {pid}")


def app(environ, start_response):
    return _handler(environ, start_response)


application = app
not_callable = 42
