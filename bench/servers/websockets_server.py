"""websockets' asyncio server: echo on /echo, broadcast on /sub and /pub.

    python websockets_server.py PORT
"""

import asyncio
import sys

from websockets.asyncio.server import broadcast, serve

subscribers = set()


async def handler(ws):
    path = ws.request.path
    if path == "/echo":
        async for message in ws:
            await ws.send(message)
    elif path == "/sub":
        subscribers.add(ws)
        try:
            await ws.wait_closed()
        finally:
            subscribers.discard(ws)
    elif path == "/pub":
        async for message in ws:
            broadcast(subscribers, message)


async def main(port):
    async with serve(handler, "127.0.0.1", port, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"READY {port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
