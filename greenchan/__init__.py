"""greenchan: one asynchronous channel for WebSocket, long-polling and streaming on gevent.

The Python counterpart of http-kit's Channel API: ``with_channel`` turns a
handler into a WSGI app (or a Flask or Bottle view) that gets a ``Channel``,
whichever transport the client uses. See README.md for a tour.
"""
from .channel import Channel, ChannelClosed, CloseStatus, Event
from .decorator import with_channel
from .server import Server, run_server
from .stores import ChannelStore, MemoryChannelStore, RedisChannelStore

__version__ = "0.2.0"

__all__ = [
    "with_channel",
    "Channel",
    "CloseStatus",
    "ChannelClosed",
    "Event",
    "Server",
    "run_server",
    "ChannelStore",
    "MemoryChannelStore",
    "RedisChannelStore",
    "__version__",
]
