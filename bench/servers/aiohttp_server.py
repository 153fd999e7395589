"""aiohttp: echo on /echo, broadcast on /sub and /pub.

    python aiohttp_server.py PORT
"""

import asyncio
import sys

from aiohttp import WSMsgType, web

subscribers = set()


async def echo(request):
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def sub(request):
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    subscribers.add(ws)
    try:
        async for _ in ws:
            pass
    finally:
        subscribers.discard(ws)
    return ws


async def pub(request):
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            for s in list(subscribers):
                try:
                    await s.send_str(msg.data)
                except Exception:
                    subscribers.discard(s)
    return ws


async def main(port):
    app = web.Application()
    app.add_routes([web.get("/echo", echo), web.get("/sub", sub), web.get("/pub", pub)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
