"""The servers bench/run.py compares, each speaking rally.py's wire protocol.

``python bench/servers.py TARGET PORT``: TARGET is rally, uvicorn, websockets,
aiohttp or raw. Every target answers ``POST /_rally/rpc`` (where it speaks
HTTP) and ``/_rally/ws`` with the same envelopes: an ``Echo`` rpc returns its
text, and a ``Shout`` send pushes ``Shouted`` to every open connection.
rally's ``max_connections`` is 20 000, or ``$BENCH_MAX_CONNECTIONS``
(bench/fanout.py raises it); the descriptor limit is raised to fit it.
"""

import asyncio
import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_CONNECTIONS = int(os.environ.get("BENCH_MAX_CONNECTIONS", 20_000))


def reply(text: str) -> str:
    """The answer of every target to one envelope (None: nothing to answer)."""
    m = json.loads(text)
    if m["kind"] == "rpc" and m["msg"]["type"] == "Echo":
        return json.dumps({"kind": "ok", "id": m["id"], "value": m["msg"]["fields"]["text"]}, separators=(",", ":"))
    raise ValueError(f"unexpected {text[:80]}")


def push(text: str) -> str | None:
    m = json.loads(text)
    if m["kind"] == "send" and m["msg"]["type"] == "Shout":
        return json.dumps(
            {"kind": "push", "msg": {"type": "Shouted", "fields": m["msg"]["fields"]}}, separators=(",", ":")
        )
    return None


def run_rally(port: int, **options: float) -> None:
    """``options``: more ``rally.App`` arguments (bench/memory.py's traced server pings less often)."""
    import rally

    @dataclass
    class Echo:
        text: str

    @dataclass
    class Shout:
        text: str

    @dataclass
    class Shouted:
        text: str

    app = rally.App(max_connections=MAX_CONNECTIONS, **options)  # type: ignore[arg-type]

    @app.rpc
    def server_echo(msg: Echo) -> rally.Result[str, str]:
        return rally.Ok(msg.text)

    class Root:
        html = "<p>bench</p>"

        def server_init() -> tuple[None, rally.Effect[Shouted]]:
            return None, rally.effect.none()

        def server_update(model: None, msg: Shout) -> tuple[None, rally.Effect[Shouted]]:
            return None, rally.effect.broadcast_to_app(Shouted(msg.text))

    app.page("/", Root)
    app.run("127.0.0.1", port, access_log=False)


def run_uvicorn(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    sockets: set[WebSocket] = set()

    async def rpc(request):  # type: ignore[no-untyped-def]
        return Response(reply((await request.body()).decode()), media_type="application/json")

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        sockets.add(websocket)
        try:
            while True:
                text = await websocket.receive_text()
                out = push(text)
                if out is None:
                    await websocket.send_text(reply(text))
                else:
                    for other in list(sockets):
                        await other.send_text(out)
        except WebSocketDisconnect:
            pass
        finally:
            sockets.discard(websocket)

    app = Starlette(routes=[Route("/_rally/rpc", rpc, methods=["POST"]), WebSocketRoute("/_rally/ws", ws)])
    uvicorn.run(app, host="127.0.0.1", port=port, http="h11", ws="wsproto", loop="asyncio",
                log_level="warning", access_log=False, backlog=8192)  # fmt: skip


def run_websockets(port: int) -> None:
    from websockets.asyncio.server import broadcast, serve

    sockets: set = set()  # type: ignore[type-arg]

    async def handler(ws) -> None:  # type: ignore[no-untyped-def]
        sockets.add(ws)
        try:
            async for text in ws:
                out = push(text)
                if out is None:
                    await ws.send(reply(text))
                else:
                    broadcast(sockets, out)
        finally:
            sockets.discard(ws)

    async def main() -> None:
        async with serve(handler, "127.0.0.1", port, compression=None, max_queue=None, backlog=8192):
            await asyncio.Future()

    asyncio.run(main())


def run_aiohttp(port: int) -> None:
    from aiohttp import WSMsgType, web

    sockets: set[web.WebSocketResponse] = set()

    async def rpc(request: web.Request) -> web.Response:
        return web.Response(text=reply(await request.text()), content_type="application/json")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse(compress=False)
        await sock.prepare(request)
        sockets.add(sock)
        try:
            async for msg in sock:
                if msg.type != WSMsgType.TEXT:
                    break
                out = push(msg.data)
                if out is None:
                    await sock.send_str(reply(msg.data))
                else:
                    for other in list(sockets):
                        await other.send_str(out)
        finally:
            sockets.discard(sock)
        return sock

    app = web.Application()
    app.add_routes([web.post("/_rally/rpc", rpc), web.get("/_rally/ws", ws)])
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=8192)


def run_raw(port: int) -> None:
    """The ceiling: an asyncio.Protocol that parses just what the benchmark sends."""
    import base64
    import hashlib

    conns: set[asyncio.Transport] = set()

    def frame(payload: bytes) -> bytes:
        n = len(payload)
        return (bytes((0x81, n)) if n < 126 else bytes((0x81, 126)) + n.to_bytes(2, "big")) + payload

    class Raw(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t: asyncio.Transport = transport  # type: ignore[assignment]
            self.buf = b""
            self.ws = False

        def connection_lost(self, exc: Exception | None) -> None:
            conns.discard(self.t)

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while self.buf:
                if not self.ws:
                    end = self.buf.find(b"\r\n\r\n")
                    if end < 0:
                        return
                    head, rest = self.buf[:end].decode("latin-1"), self.buf[end + 4 :]
                    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head.split("\r\n")[1:])}
                    if "sec-websocket-key" in headers:
                        key = headers["sec-websocket-key"].encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
                        accept = base64.b64encode(hashlib.sha1(key).digest())
                        head = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                        self.t.write(head + b"sec-websocket-accept: " + accept + b"\r\n\r\n")
                        self.ws = True
                        self.buf = rest
                        conns.add(self.t)
                        continue
                    n = int(headers["content-length"])
                    if len(rest) < n:
                        return
                    body = reply(rest[:n].decode()).encode()
                    self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(body), body))  # fmt: skip
                    self.buf = rest[n:]
                    continue
                if len(self.buf) < 6:
                    return
                n = self.buf[1] & 0x7F
                at = 2
                if n == 126:
                    n, at = int.from_bytes(self.buf[2:4], "big"), 4
                if len(self.buf) < at + 4 + n:
                    return
                mask, payload = self.buf[at : at + 4], self.buf[at + 4 : at + 4 + n]
                key = (mask * (n // 4 + 1))[:n]
                text = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big").decode()
                self.buf = self.buf[at + 4 + n :]
                out = push(text)
                if out is None:
                    self.t.write(frame(reply(text).encode()))
                else:
                    data = frame(out.encode())
                    for t in list(conns):
                        t.write(data)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Raw, "127.0.0.1", port, backlog=8192)
        await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__":
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    need = MAX_CONNECTIONS + 128  # listening socket, logs, a batch of accepts
    if "BENCH_MAX_CONNECTIONS" in os.environ and hard != resource.RLIM_INFINITY and hard < need:
        try:  # root with CAP_SYS_RESOURCE may raise the hard limit (up to /proc/sys/fs/nr_open)
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            hard = need
        except (ValueError, OSError) as exc:
            print(
                f"servers.py: RLIMIT_NOFILE stays at {hard} ({exc}): fewer than {MAX_CONNECTIONS} connections fit",
                file=sys.stderr,
                flush=True,
            )
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    target, port = sys.argv[1], int(sys.argv[2])
    {"rally": run_rally, "uvicorn": run_uvicorn, "websockets": run_websockets, "aiohttp": run_aiohttp, "raw": run_raw}[
        target
    ](port)
