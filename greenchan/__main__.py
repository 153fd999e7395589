"""The command line: ``greenchan MODULE:APP`` serves a WSGI app on greenchan's server.

Also ``python -m greenchan``. Server options come from the flags below and, for
any flag not given, from ``GREENCHAN_*`` environment variables, which the
gunicorn worker reads as well (``GREENCHAN_PING_INTERVAL=30``), so one
deployment can move between the two without rewriting its settings.
"""
import argparse
import dataclasses
import importlib
import inspect
import logging
import os
import re
import sys
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

from .options import Options

__all__ = ["main", "options_from_environ", "parse_option", "describe_options", "OptionDoc"]

log = logging.getLogger("greenchan.cli")

#: Prefix of the environment variables that set server options.
ENV_PREFIX = "GREENCHAN_"

# How each option is written on the command line and in the environment. An
# option not named here gets its kind from its type in Options (float: seconds,
# int: a count, Sequence: a list), so a new option has a flag at once.
_SIZES = {"max_message_size", "send_buffer", "max_body", "max_header_size"}
_COUNTS = {"max_queue", "max_connections"}
_SECONDS = {"send_timeout", "ping_interval", "ping_timeout", "handshake_timeout", "close_timeout",
            "session_grace"}
_LISTS = {"origins", "subprotocols"}
_UNITS = {"": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}

# ``store`` is an object, not text: the command line and the environment give it
# as a Redis URL (--redis-url, GREENCHAN_REDIS_URL), which becomes a RedisChannelStore.
_OBJECTS = {"store"}
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options) if f.name not in _OBJECTS)
_FIELDS = {f.name: f for f in dataclasses.fields(Options) if f.name not in _OBJECTS}
#: The variable that gives the server a RedisChannelStore (session forwarding).
REDIS_URL = ENV_PREFIX + "REDIS_URL"


def store_from_url(url: str) -> Any:
    """The ``store`` option from its URL: a RedisChannelStore shared by every process."""
    from .stores import RedisChannelStore

    return RedisChannelStore(url)
# Options whose text may say "none" (or 0 for keepalive) to turn them off: those
# whose type allows None.
_NULLABLE = {name for name, f in _FIELDS.items() if "Optional" in str(f.type)}


def _kind(name: str) -> str:
    """``size``, ``count``, ``seconds``, ``list`` or ``choice`` (compression)."""
    for kind, names in (("size", _SIZES), ("count", _COUNTS), ("seconds", _SECONDS), ("list", _LISTS)):
        if name in names:
            return kind
    if name == "compression":
        return "choice"
    annotation = str(_FIELDS[name].type)
    if "Sequence" in annotation or "List" in annotation:
        return "list"
    return "seconds" if "float" in annotation else "count"


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
    kind = _kind(name)
    if kind == "list":
        return [item.strip() for item in text.split(",") if item.strip()] or None
    if kind == "choice":
        if text.lower() != "deflate":
            raise ValueError(f"{name} is 'deflate' or 'none', not {text!r}")
        return "deflate"
    try:
        if kind == "size":
            number = text.lower().rstrip()
            digits = number.rstrip("abcdefghijklmnopqrstuvwxyz").strip()
            unit = number[len(digits):].strip()
            if unit not in _UNITS:
                raise ValueError
            return int(float(digits) * _UNITS[unit])
        if kind == "count":
            return int(text)
        seconds = float(text)
        if seconds == 0 and name in ("ping_interval", "ping_timeout"):
            return None
        return seconds
    except ValueError:
        pass
    what = "a size (bytes, or with KiB/MiB)" if kind == "size" else "a number"
    raise ValueError(f"{name} must be {what}, not {text!r}")


def format_option(name: str, value: Any) -> str:
    """``value`` of option ``name`` written as its flag takes it (``1MiB``, ``20``, ``none``)."""
    if value is None:
        return "none"
    kind = _kind(name)
    if kind == "list":
        return ",".join(value)
    if kind == "size":
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value >= size and value % size == 0:
                return f"{value // size}{unit}"
        return str(value)
    if kind == "seconds":
        return f"{value:g}"
    return str(value)


class OptionDoc(NamedTuple):
    """One server option as the command line, the environment and the docs present it."""

    name: str
    #: The command-line flag, ``--max-body``.
    flag: str
    #: The environment variable, ``GREENCHAN_MAX_BODY``.
    env: str
    #: ``size``, ``count``, ``seconds``, ``list`` or ``choice``.
    kind: str
    #: The default, written as the flag takes it (``8MiB``, ``10``, ``none``).
    default: str
    #: What the option does: the ``#:`` comment above its field in Options.
    description: str


def _field_comments() -> Dict[str, str]:
    """The ``#:`` comment above each field of Options, the text autodoc shows too.

    Read from the source so that options.py stays the one place that says what
    an option does. A field right below a commented one with none of its own
    shares its comment (``ping_interval`` and ``ping_timeout``).
    """
    try:
        lines = inspect.getsource(Options).splitlines()
    except (OSError, TypeError):  # no source (a frozen build): flags without descriptions
        return {}
    comments: Dict[str, str] = {}
    pending: List[str] = []
    previous: Optional[str] = None
    for line in lines:
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        match = re.match(r"(\w+)\s*:", text)
        if match and match.group(1) in _FIELDS:
            if pending:
                comment = " ".join(pending)
            else:
                comment = comments.get(previous, "") if previous else ""
            # Docstring markup reads as plain text in a terminal.
            comments[match.group(1)] = re.sub(r"``(.*?)``", r"\1", comment)
            previous = match.group(1)
        else:
            previous = None
        pending = []
    return comments


def describe_options() -> List[OptionDoc]:
    """Every server option, in the order of Options, with its default and description."""
    comments = _field_comments()
    return [
        OptionDoc(
            name=name,
            flag="--" + name.replace("_", "-"),
            env=ENV_PREFIX + name.upper(),
            kind=_kind(name),
            default=format_option(name, field.default),
            description=comments.get(name, ""),
        )
        for name, field in _FIELDS.items()
    ]


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
        if key == REDIS_URL:
            options["store"] = store_from_url(text)
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


# How each kind of option is written: its metavar, and a hint for the help.
_SYNTAX = {
    "size": ("SIZE", "bytes, or 64KiB, 1MiB"),
    "count": ("N", "a count"),
    "seconds": ("SECONDS", "seconds"),
    "list": ("VALUE", "repeat the flag or comma-separate"),
    "choice": ("deflate|none", "deflate or none"),
}


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
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve /metrics (Prometheus) and /healthz on this port, on --host "
                        "(needs greenchan[metrics]; default: off)")
    group = parser.add_argument_group(
        "server options",
        "Each also comes from GREENCHAN_<OPTION> in the environment; a flag wins.\n"
        "Sizes are bytes or take a unit (64KiB, 1MiB); durations are seconds.",
    )
    for option in describe_options():
        metavar, how = _SYNTAX[option.kind]
        if option.name == "origins":
            how += "; '*' allows every origin"
        if option.name in _NULLABLE and option.kind in ("size", "count", "seconds"):
            how += "; 0 or 'none' turns it off" if option.name.startswith("ping_") else "; 'none': off"
        # The first sentence of the field's comment: what it does; docs have the why.
        what = re.split(r"(?<=\.)\s+(?=[A-Z0-9])", option.description, maxsplit=1)[0]
        help = f"{what} [{how}] (default: {option.default})".lstrip()
        group.add_argument(option.flag, metavar=metavar, help=help.replace("%", "%%"),
                           action="append" if option.kind == "list" else "store")
    group.add_argument("--redis-url", metavar="URL",
                       help="a RedisChannelStore for the server: a greenchan.js session's requests may then "
                       "reach any process sharing that Redis; redis+cluster://HOST:PORT for a Redis Cluster "
                       "(also GREENCHAN_REDIS_URL) (default: none)")
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
    if args.redis_url:
        options["store"] = store_from_url(args.redis_url)
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
    if args.metrics_port is not None:
        try:
            from .metrics import serve_metrics
        except ImportError:
            parser.exit(2, "greenchan: error: --metrics-port needs prometheus_client: pip install 'greenchan[metrics]'\n")
        serve_metrics(args.host, args.metrics_port)
        log.info("metrics on http://%s:%d/metrics", args.host, args.metrics_port)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
