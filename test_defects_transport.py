"""Regression tests for transport defects: time-outs that never fire, sockets
that outlive them, raw WebSocket close codes and backpressure, shutdown that
does not wait for handlers, and running out of file descriptors.

Same rules as test_rally.py: 127.0.0.1, port 0, real sockets, h11 and wsproto
produce the bytes, and every wait has a bound. A sleep appears only where time
itself is the input (a client that reads slowly, a poll interval, how long the
server is starved of descriptors), never to wait for the server.
"""

import asyncio
import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

import pytest
import wsproto
import wsproto.events

import rally
from test_limits import UPGRADE, RawWs
from test_rally import (
    WAIT,
    Article,
    Heard,
    Room,
    envelope,
    eventually,
    exchange,
    responses,
    rpc_request,
    running,
)

pytestmark = pytest.mark.timeout(40)

#: The handshake of a raw ``@app.websocket`` route: UPGRADE with the path as target.
ROUTE_UPGRADE = UPGRADE.replace(b"/_rally/ws?page=%s", b"%s")
PAGE_GET = b"GET /articles/a HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
BIG = 32 * 1024 * 1024


@dataclass
class Hang:
    pass


@dataclass
class Slow:
    seconds: float


# ==== Helpers ================================================================


async def open_route(server: rally.Server, path: bytes, *, rcvbuf: int | None = None) -> RawWs:
    """A WebSocket client of a raw route; ``rcvbuf`` fixes a small receive buffer."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port)), WAIT)
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(ROUTE_UPGRADE % path)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return RawWs(reader, writer)


async def silent_http(server: rally.Server, request: bytes) -> tuple[asyncio.StreamWriter, bytes]:
    """Send ``request``, read the response head, then never read again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port)), WAIT)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    writer.transport.pause_reading()
    return writer, head


async def socket_gone(reader: asyncio.StreamReader, bound: float) -> bool:
    """Read (and drop) until the server closes the TCP connection; False if it
    is still open after ``bound`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            if not await asyncio.wait_for(reader.read(65536), remaining):
                return True
    except ConnectionError:
        return True
    except asyncio.TimeoutError:
        return False


async def within(condition: Any, seconds: float) -> bool:
    """Whether ``condition()`` becomes true within ``seconds`` (polled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def close_then(server: rally.Server, probe: Any) -> Any:
    """``await server.close()``, then ``probe()`` at once, in the same task: what
    was true the moment close() returned (wait_for's own task hops would let
    cancelled handlers finish meanwhile)."""
    await server.close()
    return probe()


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def big_file(directory: Any) -> None:
    chunk = os.urandom(1024 * 1024)
    with open(os.path.join(directory, "big"), "wb") as f:
        for _ in range(BIG // len(chunk)):
            f.write(chunk)
    with open(os.path.join(directory, "small.txt"), "w") as f:
        f.write("small")


def page_app(**options: Any) -> rally.App:
    app = rally.App(**options)
    app.page("/articles/{slug}", Article)
    return app


# ==== 1. Close time-out =======================================================


async def test_close_timeout_is_not_cancelled_by_a_late_pong() -> None:
    app = rally.App(ping_interval=0.2, pong_timeout=5, close_timeout=0.5)

    @app.websocket("/ctl")
    async def ctl(ws: rally.WebSocket) -> None:
        with contextlib.suppress(rally.ConnectionClosed):
            while await ws.receive() != "close":
                pass
            await ws.close()

    async with running(app) as server:
        ws = await open_route(server, b"/ctl")
        try:
            ping = None
            while ping is None:  # the server's keepalive ping: read, never answered
                ping = next((e for e in await ws.events() if isinstance(e, wsproto.events.Ping)), None)
            ws.send(wsproto.events.TextMessage(data="close"))
            close = None
            while close is None:
                close = next((e for e in await ws.events() if isinstance(e, wsproto.events.CloseConnection)), None)
            # The close frame is not answered; a pong for the old ping arrives instead.
            late = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT)
            ws.writer.write(late.send(wsproto.events.Pong(payload=ping.payload)))
            gone = await socket_gone(ws.reader, 0.5 + 2.5)
            assert gone, "the server kept the socket open past close_timeout=0.5 after a late pong"
            await eventually(lambda: not server.conns, "server.conns empty")
        finally:
            ws.writer.transport.abort()


# ==== 2. Raw WebSocket routes ===================================================


async def test_websocket_receive_reports_the_peers_close_code() -> None:
    app = rally.App()
    entered = asyncio.Event()
    seen: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    @app.websocket("/recv")
    async def recv(ws: rally.WebSocket) -> None:
        entered.set()
        try:
            seen.set_result(("returned", await ws.receive()))
        except BaseException as exc:
            seen.set_result(exc)
            raise

    async with running(app) as server:
        ws = await open_route(server, b"/recv")
        try:
            await asyncio.wait_for(entered.wait(), WAIT)
            ws.send(wsproto.events.CloseConnection(code=4321, reason="bye"))
            got = await asyncio.wait_for(seen, WAIT)
        finally:
            ws.writer.transport.abort()
    assert isinstance(got, rally.ConnectionClosed), f"receive() ended with {got!r}, not ConnectionClosed"
    assert got.code == 4321, f"receive() reported code {got.code}, the peer closed with 4321"


async def test_websocket_receive_reports_1006_when_the_peer_drops_tcp() -> None:
    app = rally.App()
    entered = asyncio.Event()
    seen: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    @app.websocket("/recv")
    async def recv(ws: rally.WebSocket) -> None:
        entered.set()
        try:
            seen.set_result(("returned", await ws.receive()))
        except BaseException as exc:
            seen.set_result(exc)
            raise

    async with running(app) as server:
        ws = await open_route(server, b"/recv")
        await asyncio.wait_for(entered.wait(), WAIT)
        ws.writer.transport.abort()  # no close frame
        got = await asyncio.wait_for(seen, WAIT)
    assert not isinstance(got, asyncio.CancelledError), "the handler was cancelled instead of told the peer left"
    assert isinstance(got, rally.ConnectionClosed), f"receive() ended with {got!r}"
    assert got.code == 1006


async def test_websocket_send_waits_for_a_slow_reader_instead_of_dropping_it() -> None:
    app = rally.App(max_outgoing_bytes=256 * 1024)
    count, size = 200, 64 * 1024
    outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    @app.websocket("/produce")
    async def produce(ws: rally.WebSocket) -> None:
        try:
            for i in range(count):
                await ws.send(i.to_bytes(4, "big") + b"p" * (size - 4))
        except BaseException as exc:
            outcome.set_result(exc)
            raise
        outcome.set_result("completed")

    async with running(app) as server:
        ws = await open_route(server, b"/produce")
        got: list[int] = []
        try:
            partial = b""
            while len(got) < count:
                data = await asyncio.wait_for(ws.reader.read(65536), WAIT)
                if not data:
                    break  # dropped
                ws.ws.receive_data(data)
                for e in ws.ws.events():
                    if isinstance(e, wsproto.events.BytesMessage):
                        partial += e.data
                        if e.message_finished:
                            assert len(partial) == size
                            got.append(int.from_bytes(partial[:4], "big"))
                            partial = b""
                await asyncio.sleep(0.001)  # the input: a reader slower than the producer
            assert len(got) == count, f"the client got {len(got)} of {count} messages, then the server dropped it"
            assert got == list(range(count))
            assert await asyncio.wait_for(outcome, WAIT) == "completed"
        finally:
            ws.writer.transport.abort()


async def test_websocket_dropped_connection_reports_a_code_other_than_1000() -> None:
    app = rally.App(ping_interval=0.2, pong_timeout=0.3, close_timeout=0.3)
    outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    @app.websocket("/flood")
    async def flood(ws: rally.WebSocket) -> None:
        try:
            for _ in range(100_000):
                await ws.send(b"f" * 65536)
        except BaseException as exc:
            outcome.set_result(exc)
            raise
        outcome.set_result("completed")

    async with running(app) as server:
        ws = await open_route(server, b"/flood", rcvbuf=4096)
        ws.writer.transport.pause_reading()  # never reads again, so never answers a ping
        try:
            got = await asyncio.wait_for(outcome, WAIT)
        finally:
            ws.writer.transport.abort()
    assert isinstance(got, rally.ConnectionClosed), f"the handler ended with {got!r}"
    assert got.code != 1000, "a connection the server dropped was reported as a normal close (1000)"


# ==== 3. Sockets that outlive their time-outs ===================================


async def test_static_file_to_non_reading_clients_does_not_hold_the_file_in_memory(tmp_path: Any) -> None:
    big_file(tmp_path)
    app = page_app(shutdown_timeout=1)
    app.static("/s/", tmp_path)
    writers: list[asyncio.StreamWriter] = []
    async with running(app) as server:
        try:
            warm_up = b"GET /s/small.txt HTTP/1.1\r\nhost: localhost\r\n\r\n"  # imports mimetypes
            [(warm, _)] = responses(await exchange(server, warm_up, until_close=False))
            assert warm.status_code == 200
            gc.collect()
            before = rss_kib()
            for _ in range(4):
                writer, head = await silent_http(server, b"GET /s/big HTTP/1.1\r\nhost: localhost\r\n\r\n")
                writers.append(writer)
                assert head.startswith(b"HTTP/1.1 200 "), head
            gc.collect()
            growth = rss_kib() - before
        finally:
            for writer in writers:
                writer.transport.abort()
    assert growth < BIG // 1024, f"RSS grew {growth} KiB for 4 non-reading clients of a {BIG // 1024} KiB file"


class BigPage:
    html = "<p>" + "x" * (8 * 1024 * 1024) + "</p>"


@pytest.mark.parametrize(
    "target",
    # A file is streamed: the peer that takes nothing is aborted after send_timeout.
    # A page is written whole: the keep-alive time-out closes, close_timeout aborts.
    [b"/s/big", b"/big-page"],
    ids=["static-file", "page"],
)
async def test_http_socket_of_a_non_reading_client_is_aborted_after_its_timeouts(tmp_path: Any, target: bytes) -> None:
    big_file(tmp_path)
    app = page_app(max_connections=1, keepalive_timeout=0.3, close_timeout=0.5, send_timeout=0.5, shutdown_timeout=1)
    app.static("/s/", tmp_path)
    app.page("/big-page", BigPage)
    async with running(app) as server:
        writer, head = await silent_http(server, b"GET %s HTTP/1.1\r\nhost: localhost\r\n\r\n" % target)
        try:
            assert head.startswith(b"HTTP/1.1 200 "), head
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10.0
            statuses: list[int | None] = []
            while loop.time() < deadline:
                try:
                    status: int | None = responses(await exchange(server, PAGE_GET))[0][0].status_code
                except (ConnectionError, IndexError):
                    status = None
                statuses.append(status)
                if status == 200:
                    break
                await asyncio.sleep(0.05)  # poll interval
            assert statuses[-1] == 200, (
                f"the non-reading client's socket was never aborted: {len(statuses)} tries in 10 s, "
                f"statuses {sorted(set(statuses), key=str)}"
            )
        finally:
            writer.transport.abort()


async def test_websocket_close_from_a_non_reading_peer_is_aborted_after_close_timeout() -> None:
    app = rally.App(max_outgoing_bytes=8 * 1024 * 1024, close_timeout=0.5, shutdown_timeout=1)
    app.page("/rooms/{room}", Room)
    async with running(app) as server:
        ws = await open_route(server, b"/_rally/ws?page=/rooms/1", rcvbuf=4096)
        ws.writer.transport.pause_reading()  # never reads again
        try:
            [conn] = server.conns
            transport = conn.transport
            for i in range(130):  # under 8 MiB in all
                assert await app.broadcast_to_app(Heard(f"{i} " + "p" * 60_000)) == 1
                if transport.get_write_buffer_size() > 0:
                    break
            assert transport.get_write_buffer_size() > 0, "the kernel absorbed every push"
            ws.send(wsproto.events.CloseConnection(code=1000))
            assert await within(lambda: not server.conns, 0.5 + 2.5), (
                "the server's socket is still open 3 s after the peer's close frame (close_timeout=0.5)"
            )
        finally:
            ws.writer.transport.abort()


# ==== 4. Server.close() waits for handlers =======================================


async def test_server_close_returns_after_a_websocket_handlers_finally_ran() -> None:
    app = rally.App(shutdown_timeout=0.2, close_timeout=5)
    entered, cleaned = asyncio.Event(), asyncio.Event()

    @app.websocket("/block")
    async def block(ws: rally.WebSocket) -> None:
        entered.set()
        try:
            await ws.receive()
        finally:
            cleaned.set()

    server = await app.start("127.0.0.1", 0, access_log=False)
    ws: RawWs | None = None
    try:
        ws = await open_route(server, b"/block")  # does not answer the server's close frame
        await asyncio.wait_for(entered.wait(), WAIT)
        assert await asyncio.wait_for(close_then(server, cleaned.is_set), WAIT), (
            "Server.close() returned before the handler's finally ran"
        )
    finally:
        if ws is not None:
            ws.writer.transport.abort()
        await asyncio.wait_for(server.close(), 15)


async def test_server_close_returns_after_an_http_rpc_handlers_finally_ran() -> None:
    app = page_app(shutdown_timeout=0.2)
    entered, cleaned = asyncio.Event(), asyncio.Event()

    @app.rpc
    async def server_hang(msg: Hang) -> str:
        entered.set()
        try:
            await asyncio.sleep(100)
        finally:
            cleaned.set()
        return "woke"

    server = await app.start("127.0.0.1", 0, access_log=False)
    writer: asyncio.StreamWriter | None = None
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(rpc_request(envelope("Hang", {})))
        await asyncio.wait_for(entered.wait(), WAIT)
        assert await asyncio.wait_for(close_then(server, cleaned.is_set), WAIT), (
            "Server.close() returned before the RPC handler's finally ran"
        )
    finally:
        if writer is not None:
            writer.transport.abort()
        await asyncio.wait_for(server.close(), 15)


# ==== 5. A WebSocket RPC in flight at shutdown ====================================


async def test_websocket_rpc_in_flight_at_shutdown_is_answered_before_the_1001() -> None:
    app = page_app(shutdown_timeout=5)
    entered = asyncio.Event()

    @app.rpc
    async def server_slow(msg: Slow) -> str:
        entered.set()
        await asyncio.sleep(msg.seconds)
        return "done"

    server = await app.start("127.0.0.1", 0, access_log=False)
    ws: RawWs | None = None
    try:
        ws = await RawWs.open(server)
        ws.send(wsproto.events.TextMessage(data=envelope("Slow", {"seconds": 0.3}, 7).decode()))
        await asyncio.wait_for(entered.wait(), WAIT)
        closing = asyncio.ensure_future(server.close())
        seen: list[Any] = []
        text = ""
        while not seen or seen[-1][0] != "close":
            events = await ws.events()
            if not events and ws.reader.at_eof():
                seen.append(("close", "EOF without a close frame"))
                break
            for e in events:
                if isinstance(e, wsproto.events.TextMessage):
                    text += e.data
                    if e.message_finished:
                        seen.append(("text", json.loads(text)))
                        text = ""
                elif isinstance(e, wsproto.events.CloseConnection):
                    seen.append(("close", e.code))
                    ws.send(e.response())
        await asyncio.wait_for(closing, WAIT)
        assert ("text", {"kind": "ok", "id": 7, "value": "done"}) in seen, f"the RPC reply was lost: {seen}"
        assert seen[-1] == ("close", 1001), seen
    finally:
        if ws is not None:
            ws.writer.transport.abort()
        await asyncio.wait_for(server.close(), 15)


# ==== 6. File descriptors ========================================================


def run_script(script: str, timeout: float = 30) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter next to rally.py; its last stdout line is JSON."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_default_max_connections_stays_below_the_descriptor_limit() -> None:
    result = run_script(
        """
        import json, resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
        import rally
        print(json.dumps({"max_connections": rally.App()._limits.max_connections}))
        """
    )
    assert result["max_connections"] < 128, f"default max_connections {result['max_connections']} with 128 descriptors"


def test_running_out_of_descriptors_logs_a_few_lines_and_recovers() -> None:
    result = run_script(
        """
        import asyncio, json, logging, resource, socket
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
        import rally

        messages = []

        class Keep(logging.Handler):
            def emit(self, record):
                messages.append(record.getMessage())

        for name in ("rally", "asyncio"):
            log = logging.getLogger(name)
            log.addHandler(Keep())
            log.setLevel(logging.INFO)
            log.propagate = False

        def about_descriptors():
            return sum(1 for m in messages if "out of" in m.lower() or "descriptor" in m.lower())

        class P:
            html = "<p>p</p>"

        async def main():
            loop = asyncio.get_running_loop()
            app = rally.App(max_connections=10000)
            app.page("/p", P)
            server = await app.start("127.0.0.1", 0, access_log=False)
            clients, hit = [], False
            try:
                while len(clients) < 1000:  # blocking connects: the loop accepts none meanwhile
                    s = socket.socket()
                    clients.append(s)
                    s.connect(("127.0.0.1", server.port))
            except OSError:
                hit = True
            deadline = loop.time() + 5
            while not about_descriptors() and loop.time() < deadline:
                await asyncio.sleep(0.01)
            first = about_descriptors()
            await asyncio.sleep(1.0)  # the input: how long the server is starved of descriptors
            for s in clients:
                s.close()
            status = None
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                writer.write(b"GET /p HTTP/1.1\\r\\nhost: localhost\\r\\nconnection: close\\r\\n\\r\\n")
                raw = await asyncio.wait_for(reader.read(-1), 5)
                status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else None
            finally:
                writer.close()
            await asyncio.wait_for(server.close(), 10)
            print(json.dumps({"hit": hit, "clients": len(clients), "first": first,
                              "lines": about_descriptors(), "status": status}))

        asyncio.run(main())
        """
    )
    assert result["hit"], f"the clients never ran out of descriptors: {result}"
    assert result["first"] >= 1, f"no log line about running out of descriptors: {result}"
    assert result["lines"] <= 5, f"{result['lines']} log lines about running out of descriptors: {result}"
    assert result["status"] == 200, result
