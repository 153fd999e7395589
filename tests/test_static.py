"""greenchan/static.py: serving greenchan.js from plain WSGI, Flask and Bottle."""

from __future__ import annotations

import email.utils
import os
import shutil
import subprocess
import time

import pytest
import requests

import greenchan.static
from greenchan import Server
from greenchan.static import JAVASCRIPT_PATH, StaticFile, javascript

TIMEOUT = 10


def _source() -> bytes:
    with open(JAVASCRIPT_PATH, "rb") as f:
        return f.read()


@pytest.fixture
def url():
    with Server(javascript, port=0) as server:
        yield f"http://127.0.0.1:{server.port}/greenchan.js"


def test_serves_the_client_with_cache_headers(url):
    r = requests.get(url, timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert r.headers["Cache-Control"] == "public, max-age=3600"
    assert r.headers["ETag"].startswith('"') and r.headers["ETag"].endswith('"')
    modified = email.utils.parsedate_to_datetime(r.headers["Last-Modified"]).timestamp()
    assert modified == int(os.stat(JAVASCRIPT_PATH).st_mtime)
    assert int(r.headers["Content-Length"]) == len(_source())
    assert r.content == _source()


@pytest.mark.parametrize("tag", ["{etag}", "W/{etag}", '"other", {etag}', "*"])
def test_if_none_match_answers_304(url, tag):
    etag = requests.get(url, timeout=TIMEOUT).headers["ETag"]
    r = requests.get(url, headers={"If-None-Match": tag.format(etag=etag)}, timeout=TIMEOUT)
    assert r.status_code == 304
    assert r.content == b""
    assert r.headers["ETag"] == etag
    assert r.headers["Cache-Control"] == "public, max-age=3600"


def test_stale_etag_gets_the_file(url):
    r = requests.get(url, headers={"If-None-Match": '"stale"'}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == _source()


def test_if_modified_since(url):
    last_modified = requests.get(url, timeout=TIMEOUT).headers["Last-Modified"]
    assert requests.get(url, headers={"If-Modified-Since": last_modified}, timeout=TIMEOUT).status_code == 304
    assert (
        requests.get(
            url, headers={"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"}, timeout=TIMEOUT
        ).status_code
        == 200
    )
    assert requests.get(url, headers={"If-Modified-Since": "not a date"}, timeout=TIMEOUT).status_code == 200
    # If-None-Match wins over If-Modified-Since (RFC 9110 13.1.3).
    r = requests.get(
        url, headers={"If-Modified-Since": last_modified, "If-None-Match": '"stale"'}, timeout=TIMEOUT
    )
    assert r.status_code == 200


def test_head_and_other_methods(url):
    r = requests.head(url, timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == b""
    assert int(r.headers["Content-Length"]) == len(_source())
    r = requests.post(url, data=b"x", timeout=TIMEOUT)
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD"


def test_flask_view_in_one_line():
    flask = pytest.importorskip("flask")
    app = flask.Flask(__name__)
    app.add_url_rule("/greenchan.js", view_func=greenchan.static.javascript)
    with Server(app, port=0) as server:
        url = f"http://127.0.0.1:{server.port}/greenchan.js"
        r = requests.get(url, timeout=TIMEOUT)
        assert r.status_code == 200 and r.content == _source()
        assert r.headers["Content-Type"] == "application/javascript; charset=utf-8"
        assert r.headers["Cache-Control"] == "public, max-age=3600"
        r2 = requests.get(url, headers={"If-None-Match": r.headers["ETag"]}, timeout=TIMEOUT)
        assert r2.status_code == 304 and r2.content == b""


def test_bottle_route_in_one_line():
    bottle = pytest.importorskip("bottle")
    app = bottle.Bottle()
    app.route("/greenchan.js", callback=greenchan.static.javascript)
    app.route("/other", callback=lambda: "other")
    with Server(app, port=0) as server:
        url = f"http://127.0.0.1:{server.port}/greenchan.js"
        r = requests.get(url, timeout=TIMEOUT)
        assert r.status_code == 200 and r.content == _source()
        assert r.headers["Content-Type"] == "application/javascript; charset=utf-8"
        assert r.headers["Cache-Control"] == "public, max-age=3600"
        assert int(r.headers["Content-Length"]) == len(_source())
        r2 = requests.get(url, headers={"If-None-Match": r.headers["ETag"]}, timeout=TIMEOUT)
        assert r2.status_code == 304 and r2.content == b"" and r2.headers["ETag"] == r.headers["ETag"]
        head = requests.head(url, timeout=TIMEOUT)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["Content-Length"]) == len(_source())
        # Another route served by the same greenlet (keep-alive) in between.
        with requests.Session() as session:
            assert session.get(f"http://127.0.0.1:{server.port}/other", timeout=TIMEOUT).text == "other"
            assert session.get(url, timeout=TIMEOUT).content == _source()


def test_flask_view_still_gets_the_wsgi_app_after_a_bottle_request():
    """A greenlet keeps its last Bottle request bound: a Flask view must not answer from it."""
    bottle = pytest.importorskip("bottle")
    flask = pytest.importorskip("flask")
    bottle_app = bottle.Bottle()
    bottle_app.route("/greenchan.js", callback=greenchan.static.javascript)
    flask_app = flask.Flask(__name__)
    flask_app.add_url_rule("/flask/greenchan.js", view_func=greenchan.static.javascript)

    def both(environ, start_response):
        app = flask_app if environ["PATH_INFO"].startswith("/flask/") else bottle_app
        return app(environ, start_response)

    with Server(both, port=0) as server, requests.Session() as session:
        base = f"http://127.0.0.1:{server.port}"
        etag = session.get(f"{base}/greenchan.js", timeout=TIMEOUT).headers["ETag"]
        # Same connection: the Bottle request is still bound in this greenlet.
        r = session.get(f"{base}/flask/greenchan.js", timeout=TIMEOUT)
        assert r.status_code == 200 and r.content == _source() and r.headers["ETag"] == etag


def test_an_edited_file_is_served_anew(tmp_path):
    path = tmp_path / "x.js"
    path.write_text("var a = 1;\n")
    app = StaticFile(str(path), "application/javascript; charset=utf-8")
    with Server(app, port=0) as server:
        url = f"http://127.0.0.1:{server.port}/x.js"
        first = requests.get(url, timeout=TIMEOUT)
        path.write_text("var a = 22;\n")
        later = time.time() + 10
        os.utime(path, (later, later))
        second = requests.get(url, headers={"If-None-Match": first.headers["ETag"]}, timeout=TIMEOUT)
        assert second.status_code == 200 and second.text == "var a = 22;\n"
        assert second.headers["ETag"] != first.headers["ETag"]


def test_missing_file_says_what_to_do(tmp_path):
    app = StaticFile(str(tmp_path / "gone.js"), "application/javascript")
    with Server(app, port=0) as server:
        r = requests.get(f"http://127.0.0.1:{server.port}/", timeout=TIMEOUT)
        assert r.status_code == 500 and "reinstall greenchan" in r.text


def test_client_is_one_dependency_free_script():
    src = _source().decode("utf-8")
    for modern in ("?.", "??", "import(", "export "):  # newer than ES2017 or a module
        assert modern not in src, modern
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the script's syntax was not checked")
    subprocess.run([node, "--check", JAVASCRIPT_PATH], check=True, timeout=TIMEOUT)
    # Evaluated as a classic script it exposes window.greenchan.connect.
    probe = (
        "const vm = require('vm'); const fs = require('fs');"
        "const window = {}; vm.createContext(window);"
        "vm.runInContext(fs.readFileSync(process.argv[1], 'utf8'), window);"
        "if (typeof window.greenchan.connect !== 'function') process.exit(3);"
    )
    subprocess.run([node, "-e", probe, JAVASCRIPT_PATH], check=True, timeout=TIMEOUT)
