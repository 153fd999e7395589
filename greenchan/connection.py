"""A client socket driven by the hub: non-blocking writes, a persistent read watcher.

This is the I/O pattern DESIGN.md measured as fastest on gevent: instead of
gevent's cooperative socket wrapper (a greenlet switch and a watcher start/stop
per call), each connection keeps one libev read watcher whose callback does a
non-blocking ``recv`` in the hub, and writes go straight to the OS socket with a
non-blocking ``send``. Only what the kernel does not take is buffered, and that
buffer is bounded: the writer waits (backpressure) or, with ``wait=False``, arms a
slow-consumer timer, and a peer that stays behind is cut off.

Both transports use it; it knows nothing about HTTP or WebSocket framing.
"""
from __future__ import annotations

import collections
import errno
import logging
import socket
from typing import Any, Callable, Deque, List, Optional

from gevent.hub import Waiter, get_hub, getcurrent
from gevent.timeout import Timeout

log = logging.getLogger("greenchan.connection")

# 64 KiB: one recv call fills it from a busy socket, and DESIGN.md measured a
# 256 KiB buffer as 3x slower (each call maps and unmaps a buffer that large).
RECV_SIZE = 65536

# A peer whose buffered output passes this multiple of ``send_buffer`` is cut off
# at once, so a flood of non-waiting sends (broadcasts) cannot grow memory while
# the slow-consumer timer runs.
HARD_LIMIT_FACTOR = 2

_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF, errno.ETIMEDOUT)


class Connection:
    """The raw socket of one client, written without blocking, read by a watcher.

    ``on_data(data)`` runs in the hub for each chunk read, with ``b""`` at EOF.
    ``on_slow()`` runs when the peer stays behind its send buffer for
    ``send_timeout`` seconds or passes the hard limit. ``on_closed()`` runs once,
    when the socket closes for whatever reason (the peer went away, a write
    failed, ``abort`` or the end of ``linger_close``).
    """

    __slots__ = (
        "sock",
        "_raw",
        "_out",
        "_out_size",
        "_reader",
        "_writer",
        "_slow_timer",
        "_linger",
        "_waiters",
        "_drained",
        "send_buffer",
        "send_timeout",
        "on_data",
        "on_slow",
        "on_closed",
        "closed",
        "paused",
        # The hang-up watch of a waiting HTTP channel (watch_hangup).
        "_kept",
        "_keep_limit",
        "_on_hangup",
        "_on_overflow",
    )

    def __init__(self, sock: Any, send_buffer: int, send_timeout: float) -> None:
        self.sock = sock  # the gevent socket: kept so the fd lives as long as we do
        self._raw: socket.socket = getattr(sock, "_sock", sock)
        # What the kernel did not take yet; made when first needed and let go once
        # empty (a deque is 600 bytes, and most connections never queue anything).
        self._out: Optional[Deque[memoryview]] = None
        self._out_size = 0
        self._reader: Any = None
        self._writer: Any = None
        self._slow_timer: Any = None
        self._linger: Any = None
        self._waiters: Optional[List[Waiter]] = None
        # Bytes the peer has taken from the buffer so far: a waiting sender
        # tells a slow peer from a busy one by whether this moves.
        self._drained = 0
        self.send_buffer = send_buffer
        self.send_timeout = send_timeout
        self.on_data: Callable[[bytes], Any] = _ignore
        self.on_slow: Callable[[], Any] = _ignore_noargs
        self.on_closed: Callable[[], Any] = _ignore_noargs
        self.closed = False
        self.paused = False
        self._kept: Optional[bytearray] = None
        self._keep_limit: Optional[int] = None
        self._on_hangup: Callable[[], Any] = _ignore_noargs
        self._on_overflow: Optional[Callable[[], Any]] = None

    # -- reading -------------------------------------------------------------

    def start_reading(self, on_data: Callable[[bytes], Any]) -> None:
        """Call ``on_data`` in the hub with each chunk the peer sends."""
        self.on_data = on_data
        if self._reader is None:
            self._reader = get_hub().loop.io(self._raw.fileno(), 1)
        if not self.paused:
            self._reader.start(self._on_readable)

    def pause_reading(self) -> None:
        """Stop reading, so TCP backpressure slows the peer (a full inbound queue)."""
        self.paused = True
        if self._reader is not None:
            self._reader.stop()

    def resume_reading(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            if self._reader is not None:
                self._reader.start(self._on_readable)

    def watch_hangup(
        self,
        on_hangup: Callable[[], Any],
        buffered: bytes = b"",
        limit: Optional[int] = None,
        on_overflow: Optional[Callable[[], Any]] = None,
    ) -> None:
        """Call ``on_hangup`` in the hub when the peer closes or resets; keep what it sends.

        An HTTP channel waiting for something to send has nothing to read, but
        must notice at once when its client goes away (API.md: ``on_close`` with
        ``CLIENT_CLOSE``). A client may send more after its request (a pipelined
        request, a stray CRLF): those bytes are read and kept, after
        ``buffered``, so that the EOF or reset behind them is still seen. Past
        ``limit`` bytes kept the watch stops and ``on_overflow()`` runs (the
        transport closes such a client: a hang-up hidden behind unread input
        would go unnoticed). ``take_kept()`` ends the watch and returns the bytes
        kept, for the next request on the connection.

        The state lives in this object's slots, not in closures: thousands of
        long-polls wait here at once, and two closures with their cells cost
        more than the rest of the watch (bench/findings.md).
        """
        self._kept = bytearray(buffered) if buffered else None
        self._keep_limit = limit
        self._on_hangup = on_hangup
        self._on_overflow = on_overflow
        if self._reader is None:
            self._reader = get_hub().loop.io(self._raw.fileno(), 1)
        self._reader.start(self._on_hangup_readable)

    def _on_hangup_readable(self) -> None:
        kept = self._kept
        held = len(kept) if kept is not None else 0
        limit = self._keep_limit
        room = RECV_SIZE if limit is None else min(RECV_SIZE, max(limit - held, 0) + 1)
        try:
            data = self._raw.recv(room)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.stop_reading()
            self._on_hangup()
            return
        if kept is None:
            kept = self._kept = bytearray()
        kept.extend(data)
        if limit is not None and len(kept) > limit:
            self.stop_reading()
            if self._on_overflow is not None:
                self._on_overflow()

    def take_kept(self) -> bytes:
        """End the hang-up watch; the bytes it kept (see ``watch_hangup``)."""
        self.stop_reading()
        kept, self._kept = self._kept, None
        self._on_hangup = _ignore_noargs
        self._on_overflow = None
        return bytes(kept) if kept else b""

    def release(self) -> None:
        """Stop every watcher but keep the socket open (pywsgi reads on)."""
        for watcher in (self._reader, self._writer, self._slow_timer):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self._reader = self._writer = self._slow_timer = None

    def stop_reading(self) -> None:
        if self._reader is not None:
            self._reader.stop()

    def _on_readable(self) -> None:
        try:
            data = self._raw.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.stop_reading()
        try:
            self.on_data(data)
        except Exception:
            log.exception("error while handling data from %s", self._peer())
            self.abort()

    # -- writing -------------------------------------------------------------

    def write(self, data: bytes, wait: bool = True, tail: Optional[bytes] = None) -> bool:
        """Write ``data`` (then ``tail``) whole, after what is already buffered.

        ``tail`` lets a large payload go out behind its header in one
        ``sendmsg`` without being copied into one buffer with it.
        Returns False if the connection is closed or closes while waiting.
        A caller in the hub never waits, whatever ``wait`` says.
        """
        if self.closed:
            return False
        if self._out_size > self.send_buffer and wait and getcurrent() is not get_hub():
            # Wait our turn before adding: concurrent senders queue up behind the
            # limit instead of piling their messages past it.
            if not self._wait_below(self.send_buffer, self.send_timeout, slow=True):
                return False
        out = self._out
        if not out:
            # Nothing queued: one send, and nothing built for the bytes the kernel
            # takes, which is nearly always all of them (bench/findings.md).
            try:
                sent = self._raw.send(data) if tail is None else self._raw.sendmsg((data, tail))
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._lost(exc)
                return False
            if tail is None:
                if sent == len(data):
                    return True
                parts = [memoryview(data)[sent:]]
            elif sent >= len(data):
                sent -= len(data)
                if sent == len(tail):
                    return True
                parts = [memoryview(tail)[sent:]]
            else:
                parts = [memoryview(data)[sent:], memoryview(tail)]
            if out is None:
                out = self._out = collections.deque()
        else:
            parts = [memoryview(data)] if tail is None else [memoryview(data), memoryview(tail)]
        backlog = self._out_size  # what was queued before this write
        for part in parts:
            out.append(part)
            self._out_size += len(part)
        if self._writer is None:
            self._writer = get_hub().loop.io(self._raw.fileno(), 2)
        if not self._writer.active:
            self._writer.start(self._on_writable)
        if self._out_size > self.send_buffer:
            return self._over_limit(wait, backlog)
        return True

    def _over_limit(self, wait: bool, backlog: int) -> bool:
        hub = get_hub()
        if wait and getcurrent() is not hub:
            # A waiting sender is held back, never cut: only a peer that drains
            # nothing for send_timeout is slow (_wait_below).
            return self._wait_below(self.send_buffer, self.send_timeout, slow=True)
        # The hard limit applies to the backlog a non-waiting write (a broadcast)
        # lands on, not to the write itself: one message larger than the buffer
        # (up to the peer's max_message_size) is legitimate and drains.
        if backlog > HARD_LIMIT_FACTOR * self.send_buffer:
            self.on_slow()
            return False
        if self._slow_timer is None:
            self._slow_timer = hub.loop.timer(self.send_timeout)
            self._slow_timer.start(self._slow_expired)
        return True

    def _slow_expired(self) -> None:
        self._slow_timer = None
        if not self.closed and self._out_size > self.send_buffer:
            self.on_slow()

    def _wait_below(self, limit: int, timeout: Optional[float], slow: bool, overall: bool = False) -> bool:
        """Park the calling greenlet until at most ``limit`` bytes are buffered.

        ``timeout`` bounds how long the peer may take nothing at all, not the
        whole wait: behind other senders a message may wait several drains of
        the buffer, and a peer that reads at full speed is not slow. With
        ``overall`` it bounds the whole wait (a flush before the connection ends).
        """
        if overall:
            with Timeout(timeout, False):
                return self._wait_below(limit, None, slow)
            return False
        while not self.closed and self._out_size > limit:
            drained = self._drained
            # _wake_all() takes the whole list, so each round registers a fresh waiter.
            waiter = Waiter()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            woken = False
            try:
                with Timeout(timeout, False):
                    waiter.get()
                    woken = True
            finally:
                if self._waiters and waiter in self._waiters:
                    self._waiters.remove(waiter)
            if not woken and self._drained == drained:
                if slow and not self.closed:
                    self.on_slow()
                return False
        return not self.closed

    def flush(self, timeout: Optional[float]) -> bool:
        """Wait until everything buffered reached the kernel; False if it did not."""
        if not self._out:
            return not self.closed
        return self._wait_below(0, timeout, slow=False, overall=True)

    def _on_writable(self) -> None:
        out = self._out
        raw = self._raw
        try:
            while out:
                chunk = out[0]
                sent = raw.send(chunk)
                self._out_size -= sent
                self._drained += sent
                if sent < len(chunk):
                    out[0] = chunk[sent:]
                    break
                out.popleft()
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._lost(exc)
            return
        if not out:
            self._out = None  # empty: let the deque go until the next short send
            self._writer.stop()
            if self._slow_timer is not None:
                self._slow_timer.stop()
                self._slow_timer = None
            if self._linger is not None:
                self._shutdown()
        if self._waiters and self._out_size <= self.send_buffer:
            self._wake_all()

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            waiter.switch(None)

    def _lost(self, exc: OSError) -> None:
        if exc.errno not in _GONE:
            log.warning("write to %s failed: %s", self._peer(), exc)
        self.abort()

    # -- closing -------------------------------------------------------------

    def abort(self) -> None:
        """Close the socket now, dropping unsent output, and wake every waiter."""
        if self.closed:
            return
        self.closed = True
        self._out = None
        self._out_size = 0
        for watcher in (self._reader, self._writer, self._slow_timer, self._linger):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self._reader = self._writer = self._slow_timer = self._linger = None
        try:
            self.sock.close()
        except OSError:
            pass
        if self._waiters:
            hub = get_hub()
            waiters, self._waiters = self._waiters, None
            for waiter in waiters:
                if getcurrent() is hub:
                    waiter.switch(None)
                else:
                    hub.loop.run_callback(waiter.switch, None)
        self.on_closed()

    def linger_close(self, timeout: float) -> None:
        """Close gracefully: flush, send FIN, discard input until the peer's FIN.

        Closing a socket that still has unread input makes the kernel send a
        reset, which can destroy our last bytes (a close frame, the end of a
        response) before the peer reads them. ``timeout`` bounds the wait.
        """
        if self.closed or self._linger is not None:
            return
        self.on_data = self._discard
        self._linger = get_hub().loop.timer(timeout)
        self._linger.start(self.abort)
        self.paused = False
        self.start_reading(self._discard)
        if not self._out:
            self._shutdown()

    def _discard(self, data: bytes) -> None:
        if not data:
            self.abort()

    def _shutdown(self) -> None:
        try:
            self._raw.shutdown(socket.SHUT_WR)
        except OSError:
            self.abort()

    def _peer(self) -> str:
        try:
            host, port = self._raw.getpeername()[:2]
            return f"{host}:{port}"
        except OSError:
            return "a closed socket"


def _ignore(data: bytes) -> None:
    pass


def _ignore_noargs() -> None:
    pass
