"""Test set-up: gevent monkey-patching first, then fixtures that start real servers."""
from gevent import monkey

monkey.patch_all()

import contextlib  # noqa: E402
from typing import Any, Iterator  # noqa: E402

import pytest  # noqa: E402

from greenchan import Server  # noqa: E402


@pytest.fixture
def serve() -> Iterator[Any]:
    """``serve(app, **options)`` starts a real Server on a free port; all stop at teardown."""
    servers = []

    def start(app: Any, **options: Any) -> Server:
        server = Server(app, port=0, **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout=0.5)


def wait_for(predicate: Any, timeout: float = 5.0) -> Any:
    """Poll ``predicate`` until it is true (bounded); fail the test if it never is."""
    import gevent

    for _ in range(int(timeout / 0.01)):
        value = predicate()
        if value:
            return value
        gevent.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout} s: {predicate}")


def rss_kib() -> int:
    """This process's resident memory, from /proc."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def greenlet_count() -> int:
    """Greenlets of this thread's hub (not the resolver's worker threads, whose
    main greenlets have no parent and which grow with the DNS thread pool)."""
    import gc

    import greenlet
    from gevent.threadpool import _WorkerGreenlet

    gc.collect()
    return sum(
        isinstance(o, greenlet.greenlet) and o.parent is not None and not isinstance(o, _WorkerGreenlet)
        for o in gc.get_objects()
    )
