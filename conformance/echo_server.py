"""A greenchan echo server for the Autobahn|Testsuite fuzzing client.

    python conformance/echo_server.py [--host 127.0.0.1] [--port 9001] [--compression]

Every message is sent back as it came (text as text, binary as binary). The
message size limit is 16 MiB because cases 9.x send messages of up to 16 MiB.
Every other option keeps greenchan's default (keepalive pings, same-origin
check, ...), so this is the server the conformance measurement runs.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402

from greenchan import Server, with_channel  # noqa: E402


@with_channel
def echo(channel):
    channel.on_receive(channel.send)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--compression", action="store_true", help="offer permessage-deflate")
    parser.add_argument("--max-message-size", type=int, default=16 * 1024 * 1024)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = Server(
        echo,
        host=args.host,
        port=args.port,
        max_message_size=args.max_message_size,
        compression="deflate" if args.compression else None,
    )
    server.start()
    print(f"greenchan echo server on ws://{args.host}:{server.port}/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
