"""The I/O floor on gevent: a raw TCP echo on StreamServer (recv + sendall).

    python raw_gevent_tcp.py PORT
"""

import sys

from gevent.server import StreamServer


def echo(sock, address):
    recv, sendall = sock.recv, sock.sendall
    try:
        while True:
            data = recv(65536)
            if not data:
                break
            sendall(data)
    except OSError:   # the client hung up: the end of a run, not an error
        pass


if __name__ == "__main__":
    server = StreamServer(("127.0.0.1", int(sys.argv[1])), echo)
    server.start()
    print(f"READY {server.server_port}", flush=True)
    server.serve_forever()
