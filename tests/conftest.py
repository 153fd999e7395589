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
