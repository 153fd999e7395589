"""Prometheus metrics, a health check, and what they read (the ``greenchan[metrics]`` extra).

::

    from greenchan.metrics import health_app, wsgi_app
    # mount them: a Flask app, werkzeug's DispatcherMiddleware, or a route of your own
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": wsgi_app, "/healthz": health_app})

greenchan counts as it runs with plain integers (``counters.py``); this module
turns them into prometheus_client metrics when they are read, so a message
costs an integer addition, not a metric update. Under gunicorn with several
workers, set ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder before starting it
(prometheus_client's convention): each worker then writes its figures there
about once a second and at every scrape, ``wsgi_app`` reports the sum of all
workers, and the gauges of a dead worker are dropped (``livesum``).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Tuple

import gevent
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import counters

__all__ = ["wsgi_app", "health_app", "serve_metrics"]

log = logging.getLogger("greenchan.metrics")

# Set (by prometheus_client's convention) when several processes share the figures.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
# How often a worker writes its figures for the others to read (multiprocess only).
SYNC_INTERVAL = 1.0

_T = ("transport",)
open_ = Gauge("greenchan_channels_open", "Channels open now", _T, multiprocess_mode="livesum")
opened = Counter("greenchan_channels_opened", "Channels opened", _T)
closed = Counter("greenchan_channels_closed", "Channels closed, by why", ("transport", "status"))
messages_in = Counter("greenchan_messages_received", "Messages received from clients", _T)
messages_out = Counter("greenchan_messages_sent", "Messages sent to clients", _T)
bytes_in = Counter("greenchan_bytes_received", "Payload bytes received from clients", _T)
bytes_out = Counter("greenchan_bytes_sent", "Payload bytes sent to clients", _T)
rejected = Counter("greenchan_rejected", "Requests refused before a handler", ("reason",))
broadcasts = Counter("greenchan_broadcasts", "Broadcasts", ("store",))
broadcast_seconds = Histogram("greenchan_broadcast_seconds", "Time a broadcast takes", ("store",), buckets=counters.BUCKETS)
resumes = Counter("greenchan_resumes", "Joins with since: replayed in full, or continuity lost", ("recovered",))
store_up = Gauge("greenchan_store_up", "1 while the store's Redis is reachable", ("store",), multiprocess_mode="livemin")

# What was last written to each metric: counters go up by the difference.
_pushed: Dict[Tuple[Any, ...], float] = {}


def _add(metric: Any, labels: Tuple[str, ...], value: float) -> None:
    key = (metric, labels)
    delta = value - _pushed.get(key, 0)
    if delta:
        metric.labels(*labels).inc(delta)
        _pushed[key] = value


def sync() -> None:
    """Write greenchan's counters into the metrics (at each scrape, and once a
    second under multiprocess mode). Never scans channels: it reads integers."""
    for transport, traffic in counters.traffic.items():
        labels = (transport,)
        open_.labels(transport).set(traffic.open)
        _add(opened, labels, traffic.opened)
        _add(messages_in, labels, traffic.messages_in)
        _add(messages_out, labels, traffic.messages_out)
        _add(bytes_in, labels, traffic.bytes_in)
        _add(bytes_out, labels, traffic.bytes_out)
    for pair, count in list(counters.closed.items()):
        _add(closed, pair, count)
    for reason, count in list(counters.rejected.items()):
        _add(rejected, (reason,), count)
    for recovered, count in counters.resumes.items():
        _add(resumes, (recovered,), count)
    for store, durations in list(counters.broadcasts.items()):
        _add(broadcasts, (store,), durations.count)
        child = broadcast_seconds.labels(store)
        # prometheus_client keeps one counter per bucket, filled as observe()
        # would; the differences go there, so a worker's histogram sums as it should.
        for i, count in enumerate(durations.buckets):
            bucket: Tuple[Any, ...] = (broadcast_seconds, (store, i))
            delta = count - _pushed.get(bucket, 0)
            if delta:
                child._buckets[i].inc(delta)
                _pushed[bucket] = count
        total: Tuple[Any, ...] = (broadcast_seconds, (store, "sum"))
        grown = durations.sum - _pushed.get(total, 0)
        if grown:
            child._sum.inc(grown)
            _pushed[total] = durations.sum
    for store in list(counters.stores):
        store_up.labels(type(store).__name__).set(1 if getattr(store, "_up", True) else 0)


def _registry() -> Any:
    if MULTIPROCESS_DIR:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def wsgi_app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    """The metrics in Prometheus's text format; mount it at ``/metrics``."""
    sync()
    data = generate_latest(_registry())
    start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(data)))])
    return [data]


def health_app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    """For a load balancer: 200 while serving, 503 once the server began to stop
    (so the balancer drains it before its WebSockets get 1001), with the state of
    each Redis store in the body. Redis down does not make it 503: every instance
    shares that Redis, and taking them all out would not help the clients."""
    redis: List[Dict[str, Any]] = [
        {"store": type(store).__name__, "url": getattr(store, "url", None), "up": bool(getattr(store, "_up", True))}
        for store in list(counters.stores)
    ]
    stopping = counters.stopping
    body = json.dumps({"status": "stopping" if stopping else "serving", "stores": redis}).encode()
    status = "503 Service Unavailable" if stopping else "200 OK"
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
    return [body]


def serve_metrics(host: str, port: int) -> Any:
    """Serve ``/metrics`` and ``/healthz`` on their own port (the command line's ``--metrics-port``)."""
    from gevent.pywsgi import WSGIServer

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            return health_app(environ, start_response)
        if environ.get("PATH_INFO") == "/metrics":
            return wsgi_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"/metrics or /healthz\n"]

    server = WSGIServer((host, port), app, log=None)
    server.start()
    return server


def _sync_loop() -> None:
    pid = os.getpid()
    while os.getpid() == pid:
        try:
            sync()
        except Exception:
            log.exception("writing greenchan's metrics failed")
        gevent.sleep(SYNC_INTERVAL)


def _start_syncing() -> None:
    if MULTIPROCESS_DIR:
        _forget_dead_workers()
        gevent.spawn(_sync_loop)


def _forget_dead_workers() -> None:
    """Remove the live gauges of processes that are gone (a worker that died)."""
    from prometheus_client import multiprocess

    pids = set()
    for name in os.listdir(MULTIPROCESS_DIR or "."):
        stem = name.rsplit(".", 1)[0]
        tail = stem.rsplit("_", 1)[-1]
        if tail.isdigit():
            pids.add(int(tail))
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, MULTIPROCESS_DIR)
        except PermissionError:
            pass


_start_syncing()
if hasattr(os, "register_at_fork"):  # a worker forked after import writes its own figures
    os.register_at_fork(after_in_child=_start_syncing)
