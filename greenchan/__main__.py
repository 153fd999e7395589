"""The command line: ``greenchan MODULE:APP`` serves a WSGI app on greenchan's server.

Also ``python -m greenchan``. Server options come from the flags below and, for
any flag not given, from ``GREENCHAN_*`` environment variables, which the
gunicorn worker reads as well (``GREENCHAN_PING_INTERVAL=30``), so one
deployment can move between the two without rewriting its settings.
"""
import argparse
import dataclasses
import importlib
import logging
import os
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from .options import Options

__all__ = ["main", "options_from_environ", "parse_option"]

log = logging.getLogger("greenchan.cli")

#: Prefix of the environment variables that set server options.
ENV_PREFIX = "GREENCHAN_"

# Options whose text may say "none" (or 0 for durations) to turn them off.
_NULLABLE = {"max_message_size", "ping_interval", "ping_timeout", "max_connections",
             "handshake_timeout", "origins", "subprotocols", "compression"}
_SIZES = {"max_message_size", "send_buffer", "max_body", "max_header_size"}
_COUNTS = {"max_queue", "max_connections"}
_SECONDS = {"send_timeout", "ping_interval", "ping_timeout", "handshake_timeout", "close_timeout"}
_LISTS = {"origins", "subprotocols"}
_UNITS = {"": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}

OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options))


def parse_option(name: str, text: str) -> Any:
    """Turn the text form of option ``name`` (a flag or an environment value) into its value.

    Sizes take an optional unit (``64KiB``, ``1M``: powers of 1024); durations are
    seconds; ``none`` (and ``0`` for ``ping_interval`` and ``ping_timeout``)
    turns a nullable option off; lists are comma-separated.
    """
    if name not in OPTION_NAMES:
        raise ValueError(f"unknown greenchan option {name!r}")
    text = text.strip()
    if name in _NULLABLE and text.lower() in ("none", "off", ""):
        return None
    if name in _LISTS:
        return [item.strip() for item in text.split(",") if item.strip()] or None
    if name == "compression":
        if text.lower() != "deflate":
            raise ValueError(f"{name} is 'deflate' or 'none', not {text!r}")
        return "deflate"
    try:
        if name in _SIZES:
            number = text.lower().rstrip()
            digits = number.rstrip("abcdefghijklmnopqrstuvwxyz").strip()
            unit = number[len(digits):].strip()
            if unit not in _UNITS:
                raise ValueError
            return int(float(digits) * _UNITS[unit])
        if name in _COUNTS:
            return int(text)
        if name in _SECONDS:
            seconds = float(text)
            if seconds == 0 and name in ("ping_interval", "ping_timeout"):
                return None
            return seconds
    except ValueError:
        pass
    kind = "a size (bytes, or with KiB/MiB)" if name in _SIZES else "a number"
    raise ValueError(f"{name} must be {kind}, not {text!r}")


def options_from_environ(environ: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Server options from ``GREENCHAN_<OPTION>`` variables (``GREENCHAN_MAX_BODY=16MiB``).

    A ``GREENCHAN_`` variable that names no option is logged and ignored: it may
    belong to the application, but a misspelt option should not pass unseen.
    """
    environ = os.environ if environ is None else environ
    options: Dict[str, Any] = {}
    for key, text in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in OPTION_NAMES:
            log.warning("ignoring %s: greenchan has no option %r (known: %s)", key, name, ", ".join(OPTION_NAMES))
            continue
        try:
            options[name] = parse_option(name, text)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    return options


class _BadApp(Exception):
    """MODULE:APP does not name a WSGI application."""


def load_app(spec: str) -> Callable:
    """Import ``MODULE:APP`` (``MODULE`` alone means ``MODULE:app``), as gunicorn does."""
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if not module_name:
        raise _BadApp(f"{spec!r} names no module; write MODULE:APP, e.g. myproject.web:app")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise _BadApp(f"no module named {module_name!r} (looked in {os.getcwd()} and sys.path)") from None
        raise  # the module exists but something it imports does not: show the traceback
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _BadApp(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise _BadApp(f"{spec} is not a WSGI application (it is {type(obj).__name__!r}, not callable)")
    return obj


_EPILOG = """\
examples:
  greenchan chat:app                          serve app from chat.py on 127.0.0.1:9090
  greenchan myproject.web:app --host 0.0.0.0 --port 8000
  greenchan chat --ping-interval 30 --origins https://example.com,https://www.example.com
  python -m greenchan chat:app --max-connections 10000 --log-level debug

Every server option can also come from the environment, as GREENCHAN_<OPTION>
(GREENCHAN_PING_INTERVAL=30, GREENCHAN_MAX_BODY=16MiB); a flag wins over the
environment. SIGTERM or SIGINT stops gracefully: WebSockets get close 1001, HTTP
channels end, every on_close runs, and the exit status is 0.
For several processes use gunicorn: gunicorn -k greenchan.gunicorn.Worker -w 4 chat:app
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="greenchan",
        description="Serve a WSGI application whose routes use greenchan channels "
        "(WebSocket, long-polling, streaming) on greenchan's gevent server.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("app", metavar="MODULE:APP",
                        help="the WSGI application, as gunicorn names it: module path, colon, "
                        "attribute (MODULE alone means MODULE:app)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=9090, help="port to listen on (default: %(default)s)")
    parser.add_argument("--log-level", default="info", type=str.lower,
                        choices=["debug", "info", "warning", "error", "critical"],
                        help="logging level (default: %(default)s)")
    group = parser.add_argument_group("server options (defaults as in the API)")
    _add = group.add_argument
    _add("--max-message-size", metavar="SIZE",
         help="largest WebSocket message, e.g. 1MiB; larger ones close with 1009 ('none': no limit)")
    _add("--max-queue", metavar="N", help="inbound messages buffered per channel before reading pauses")
    _add("--send-buffer", metavar="SIZE", help="outbound bytes buffered per channel")
    _add("--send-timeout", metavar="SECONDS", help="how long a full send buffer may stay full")
    _add("--ping-interval", metavar="SECONDS", help="WebSocket keepalive ping interval (0 or 'none' disables)")
    _add("--ping-timeout", metavar="SECONDS", help="how long to wait for a pong (0 or 'none' disables)")
    _add("--origins", metavar="ORIGIN", action="append",
         help="allowed Origin for WebSocket upgrades; repeat or comma-separate; '*' allows all "
         "(default: same origin as the Host header)")
    _add("--subprotocols", metavar="NAME", action="append",
         help="offered WebSocket subprotocols, in preference order; repeat or comma-separate")
    _add("--compression", metavar="deflate|none", help="permessage-deflate (default: none)")
    _add("--max-connections", metavar="N", help="over this many connections new ones get 503")
    _add("--max-body", metavar="SIZE", help="largest request body; larger ones get 413")
    _add("--max-header-size", metavar="SIZE", help="largest request header block; larger ones get 431")
    _add("--handshake-timeout", metavar="SECONDS",
         help="time to send request headers (and a body); also the keep-alive idle time ('none' disables)")
    _add("--close-timeout", metavar="SECONDS", help="how long a WebSocket close handshake may take")
    return parser


def _options(args: argparse.Namespace) -> Dict[str, Any]:
    options = options_from_environ()
    for name in OPTION_NAMES:
        value = getattr(args, name, None)
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(value)
        options[name] = parse_option(name, value)
    return options


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 after a graceful stop)."""
    # Monkey-patch first, before the application is imported: it (and whatever it
    # imports: redis, requests, a database driver) must see cooperative sockets.
    # Done here, not at import time, because the gunicorn worker imports this
    # module in gunicorn's master, which must stay unpatched.
    from gevent import monkey

    monkey.patch_all()
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = _options(args)
        Options.build(dict(options))
    except (ValueError, TypeError) as exc:
        parser.exit(2, f"greenchan: error: {exc}\n")
    # Like gunicorn: the current directory first, so `greenchan app:app` finds ./app.py.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        app = load_app(args.app)
    except _BadApp as exc:
        parser.exit(2, f"greenchan: error: {exc}\n")
    from .server import Server

    try:
        server = Server(app, host=args.host, port=args.port, **options)
        server.start()
    except OSError as exc:
        parser.exit(1, f"greenchan: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}\n")
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
