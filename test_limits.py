"""Limits, faults and load: every limit of SPEC section 7 at N and N+1, and the
failure rules of sections 3 to 5, against a running server on 127.0.0.1.

Same rules as test_rally.py. Limits and time-outs are configured small so the
file runs in seconds; a sleep appears only where time itself is the input (a
client trickling bytes), never to wait for the server.
"""

import asyncio
import gc
import json
import logging
import os
import resource
import socket
from typing import Any

import h11
import pytest
import wsproto
import wsproto.events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rally
from test_rally import (
    EVERYTHING_JSON,
    WAIT,
    Everything,
    Heard,
    Node,
    Say,
    ServerLoadTitle,
    Sleep,
    article_app,
    codecs,
    envelope,
    eventually,
    exchange,
    json_reader,
    responses,
    room_app,
    rpc_app,
    rpc_request,
    running,
)

UPGRADE = (
    b"GET /_rally/ws?page=%s HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
)


class RawWs:
    """A WebSocket client over a raw socket, framing with a real wsproto client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.ws = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT)

    @classmethod
    async def open(cls, server: rally.Server, page: str = "/articles/a") -> "RawWs":
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(UPGRADE % page.encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer)

    def send(self, event: wsproto.events.Event) -> None:
        self.writer.write(self.ws.send(event))

    async def events(self) -> list[wsproto.events.Event]:
        """Events from the next read; [] once the server has closed the TCP connection."""
        data = await asyncio.wait_for(self.reader.read(65536), WAIT)
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    async def close_code(self) -> int:
        """Read until the server's close frame; its code."""
        while True:
            events = await self.events()
            for e in events:
                if isinstance(e, wsproto.events.CloseConnection):
                    return e.code
            if not events and self.reader.at_eof():
                return 1006

    def close(self) -> None:
        self.writer.close()


def head_of_size(size: int, path: bytes = b"/articles/x") -> bytes:
    """A GET whose head is exactly ``size`` bytes in canonical form."""
    start = b"GET %s HTTP/1.1\r\nhost: localhost\r\n" % path
    fixed = len(start) + len(b"x-pad: \r\n") + len(b"\r\n")
    return start + b"x-pad: " + b"a" * (size - fixed) + b"\r\n\r\n"


# ==== HTTP ===================================================================


@pytest.mark.parametrize(("size", "status"), [(1024, 200), (1025, 431)], ids=["at-limit", "one-over"])
async def test_head_size_counted_even_when_it_arrives_in_one_read(size: int, status: int) -> None:
    request = head_of_size(size)
    assert len(request) == size
    async with running(article_app(max_head_bytes=1024)) as server:
        [(response, _)] = responses(await exchange(server, request, until_close=False))
    assert response.status_code == status


async def test_incomplete_head_over_limit_is_431() -> None:
    async with running(article_app(max_head_bytes=1024)) as server:
        raw = await exchange(server, b"GET / HTTP/1.1\r\nx-pad: " + b"a" * 5000)
    assert raw.startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize(("count", "status"), [(10, 200), (11, 431)], ids=["at-limit", "one-over"])
async def test_header_count(count: int, status: int) -> None:
    headers = b"host: localhost\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(count - 1))
    async with running(article_app(max_headers=10)) as server:
        [(response, _)] = responses(
            await exchange(server, b"GET /articles/x HTTP/1.1\r\n" + headers + b"\r\n", until_close=False)
        )
    assert response.status_code == status


async def test_transfer_encoding_with_content_length_is_refused_and_closed() -> None:
    smuggle = (
        b"POST /_rally/rpc HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 4\r\n"
        b"transfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /articles/x HTTP/1.1\r\nhost: localhost\r\n\r\n"
    )
    async with running(article_app()) as server:
        raw = await exchange(server, smuggle)
    assert raw.startswith(b"HTTP/1.1 400 ") and raw.count(b"HTTP/1.1") == 1


@pytest.mark.parametrize(("size", "status"), [(300, 200), (301, 413)], ids=["at-limit", "one-over"])
async def test_body_size_with_content_length(size: int, status: int) -> None:
    body = envelope("ServerLoadTitle", {"slug": ""})
    body = body[:-3] + b" " * (size - len(body)) + body[-3:]
    assert len(body) == size
    async with running(article_app(max_body_bytes=300)) as server:
        [(response, _)] = responses(await exchange(server, rpc_request(body), until_close=False))
    assert response.status_code == status


async def test_chunked_body_is_counted_as_it_arrives() -> None:
    chunk = b"1000\r\n" + b" " * 4096 + b"\r\n"
    request = (
        b"POST /_rally/rpc HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n" + chunk * 100  # never ends: 400 KiB and no last chunk
    )
    async with running(article_app(max_body_bytes=10_000)) as server:
        raw = await exchange(server, request)
    assert raw.startswith(b"HTTP/1.1 413 ") and b"too_large" in raw


async def test_content_length_longer_than_the_body_times_out_with_408() -> None:
    request = (
        b"POST /_rally/rpc HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
        b"content-length: 100\r\n\r\n{}"
    )
    async with running(article_app(body_timeout=0.3)) as server:
        raw = await exchange(server, request)
    assert raw.startswith(b"HTTP/1.1 408 ")


async def test_content_length_shorter_than_the_body_leaves_garbage_that_is_refused() -> None:
    body = envelope("ServerLoadTitle", {"slug": "a"})
    request = rpc_request(body).replace(b"content-length: %d" % len(body), b"content-length: %d" % (len(body) - 5))
    async with running(article_app(header_timeout=0.3)) as server:
        raw = await exchange(server, request)
    first, rest = responses(raw)[0][0], raw.split(b"\r\n\r\n", 1)[1]
    assert first.status_code == 400  # the cut JSON is invalid
    assert b"HTTP/1.1 408 " in rest  # and its tail never becomes a request


@pytest.mark.parametrize(
    "line",
    [b"GARBAGE\r\n\r\n", b"GET /\r\n\r\n", b"GET / HTTP/9.9\r\nhost: localhost\r\n\r\n", b"\x00\x01\x02\r\n\r\n"],
    ids=["word", "no-version", "bad-version", "binary"],
)
async def test_malformed_request_line_is_400(line: bytes) -> None:
    async with running(article_app()) as server:
        raw = await exchange(server, line)
    assert raw.startswith(b"HTTP/1.1 4") and b"connection: close" in raw


async def test_trickled_head_is_closed_within_the_bound_while_others_are_served() -> None:
    async with running(article_app(header_timeout=0.5)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def trickle() -> None:
            for byte in b"GET /articles/x HTTP/1.1\r\nhost: localhost\r\nx-slow: " + b"a" * 1000:
                writer.write(bytes((byte,)))
                await asyncio.sleep(0.01)  # the input under test: one byte every 10 ms
                if reader.at_eof():
                    return

        trickling = asyncio.ensure_future(trickle())
        [(ok, _)] = responses(
            await exchange(server, b"GET /articles/y HTTP/1.1\r\nhost: localhost\r\n\r\n", until_close=False)
        )
        assert ok.status_code == 200
        raw = await asyncio.wait_for(reader.read(-1), WAIT)
        elapsed = loop.time() - started
        trickling.cancel()
        writer.close()
    assert raw.startswith(b"HTTP/1.1 408 ")
    assert 0.45 < elapsed < 1.5


async def test_idle_keep_alive_connection_is_closed() -> None:
    async with running(article_app(keepalive_timeout=0.3)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /articles/x HTTP/1.1\r\nhost: localhost\r\n\r\n")
        started = asyncio.get_running_loop().time()
        raw = await asyncio.wait_for(reader.read(-1), WAIT)  # the response, then EOF
        elapsed = asyncio.get_running_loop().time() - started
        writer.close()
    assert raw.startswith(b"HTTP/1.1 200 ") and 0.25 < elapsed < 1.5


async def test_client_that_never_reads_pauses_reading_and_bounds_memory() -> None:
    async with running(article_app()) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.setblocking(False)
        request = b"GET /_rally/client.js HTTP/1.1\r\nhost: localhost\r\n\r\n"
        loop = asyncio.get_running_loop()
        sent = 0
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            while True:  # until the server stops reading and our send buffer fills
                await asyncio.wait_for(loop.sock_sendall(sock, request * 100), 1.0)
                sent += 100
        [conn] = [c for c in server.conns if isinstance(c, rally._HttpConn)]
        assert conn.pausing
        assert conn.transport is not None and conn.transport.get_write_buffer_size() < 256 * 1024
        assert sent > 100  # it did answer for a while
        sock.close()


# ==== JSON and the contract ==================================================


async def test_deep_json_over_http_is_refused_quickly() -> None:
    async with running(article_app()) as server:
        started = asyncio.get_running_loop().time()
        status, reply = await post_json(server, b"[" * 100_000)
        assert asyncio.get_running_loop().time() - started < 1.0
    assert (status, reply["code"]) == (413, "too_large")


async def post_json(server: rally.Server, body: bytes) -> tuple[int, dict[str, Any]]:
    [(response, reply)] = responses(await exchange(server, rpc_request(body), until_close=False))
    return response.status_code, json.loads(reply)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"kind":"rpc","id":1,"msg":{"type":"ServerLoadTitle","fields":{"slug":"\xff"}}}', "invalid"),
        (b'{"kind":"rpc","id":1,"id":2,"msg":{"type":"ServerLoadTitle","fields":{"slug":"a"}}}', "invalid"),
        (b'{"kind":"rpc","id":1,"msg":{"type":"ServerLoadTitle","fields":{"slug":1' + b"0" * 5000 + b"}}}", "invalid"),
        (envelope("Divide", {"a": 2**53, "b": 1}), "invalid"),
        (envelope("Divide", {"a": 1e400, "b": 1}), "invalid"),
    ],
    ids=["not-utf8", "duplicate-key", "huge-int", "unsafe-int", "infinite-float"],
)
async def test_bad_json_values_are_invalid(body: bytes, code: str) -> None:
    async with running(rpc_app()) as server:
        status, reply = await post_json(server, body)
    assert (status, reply["code"]) == (400, code)


async def test_error_messages_quote_at_most_a_short_excerpt() -> None:
    async with running(rpc_app()) as server:
        _, reply = await post_json(server, envelope("Q" * 50_000, {}))
        _, reply2 = await post_json(server, envelope("Divide", {"a": "x" * 50_000, "b": 1}))
    assert len(json.dumps(reply)) < 300 and len(json.dumps(reply2)) < 300


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=JSON)
def test_property_random_json_decodes_or_raises_only_the_contract_error(value: Any) -> None:
    codec = codecs().get(Everything)
    for candidate in (value, {**EVERYTHING_JSON, "s": value}, {**EVERYTHING_JSON, "tree": value}):
        try:
            codec.decode(candidate)
        except rally._Bad:
            pass
    text = json.dumps(value)
    try:
        json_reader().loads(text.encode())
    except rally.ContractError:
        pass


# Trees a few levels deep: deeper ones are refused by max_json_depth, by design.
st.register_type_strategy(
    Node,
    st.recursive(
        st.builds(Node, name=st.text(max_size=5), children=st.just([])),
        lambda inner: st.builds(Node, name=st.text(max_size=5), children=st.lists(inner, max_size=3)),
        max_leaves=8,
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.from_type(Everything))
def test_property_values_of_every_annotation_round_trip(value: Everything) -> None:
    codec = codecs().get(Everything)
    try:
        encoded = codec.encode(value)
    except rally._Bad:
        return  # a value the contract cannot carry (an int past 2^53, NaN): refused, not mangled
    wire = json.dumps(encoded)
    assert codec.decode(json_reader().loads(wire.encode())) == value


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_property_random_bytes_as_envelope_raise_only_contract_errors(data: bytes) -> None:
    try:
        rally._parse_envelope(json_reader().loads(data))
    except rally.ContractError:
        pass


# ==== WebSocket ==============================================================


async def test_websocket_handshake_time_out() -> None:
    async with running(article_app(header_timeout=0.3)) as server:
        raw = await exchange(server, (UPGRADE % b"/articles/a")[:60])
    assert raw.startswith(b"HTTP/1.1 408 ")


async def test_websocket_message_limit_at_n_and_over_n_across_fragments() -> None:
    async with running(article_app(max_message_bytes=1000)) as server:
        ws = await RawWs.open(server)
        body = json.dumps({"kind": "send", "msg": {"type": "AddComment", "fields": {"body": ""}}})
        exact = body.replace('"body": ""', '"body": "' + "x" * (1000 - len(body)) + '"')
        assert len(exact) == 1000
        ws.send(wsproto.events.TextMessage(data=exact[:500], message_finished=False))
        ws.send(wsproto.events.TextMessage(data=exact[500:], message_finished=True))
        pushes = [e for e in await ws.events() if isinstance(e, wsproto.events.TextMessage)]
        assert json.loads(pushes[0].data)["kind"] == "push"
        for _ in range(3):  # 3 fragments of 400 bytes: each under the limit, together over
            ws.send(wsproto.events.TextMessage(data="y" * 400, message_finished=False))
        assert await ws.close_code() == 1009
        ws.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (bytes((0x81, 0x82)) + b"\0\0\0\0" + b"\xc3\x28", 1007),  # invalid UTF-8
        (bytes((0x81, 0x02)) + b"hi", 1002),  # unmasked client frame
        (bytes((0xC1, 0x80)) + b"\0\0\0\0", 1002),  # RSV1 without an extension
        (bytes((0x83, 0x80)) + b"\0\0\0\0", 1002),  # reserved opcode
        (bytes((0x89, 0xFE)) + b"\0\x7e" + b"\0\0\0\0" + b"p" * 126, 1002),  # control frame over 125 bytes
        (bytes((0x80, 0x80)) + b"\0\0\0\0", 1002),  # continuation with nothing to continue
    ],
    ids=["bad-utf8", "unmasked", "rsv1", "opcode", "big-ping", "stray-continuation"],
)
async def test_websocket_protocol_violations_close_with_their_code(frame: bytes, code: int) -> None:
    app = article_app()
    async with running(app) as server:
        ws = await RawWs.open(server)
        ws.writer.write(frame)
        assert await ws.close_code() == code
        ws.close()
        await eventually(lambda: not app._registry.topics.members, "topics empty")


async def test_ping_flood_is_answered_and_a_non_reading_flooder_is_dropped() -> None:
    async with running(article_app(max_outgoing_bytes=64 * 1024)) as server:
        ws = await RawWs.open(server)
        for i in range(200):
            ws.send(wsproto.events.Ping(payload=b"%d" % i))
        pongs: list[Any] = []
        while len(pongs) < 200:
            pongs += [e for e in await ws.events() if isinstance(e, wsproto.events.Pong)]
        assert pongs[-1].payload == b"199"
        ws.close()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(UPGRADE % b"/articles/a")
        client = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT)
        flood = client.send(wsproto.events.Ping(payload=b"x" * 125)) * 2000
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        with pytest.raises((ConnectionError, TimeoutError, asyncio.TimeoutError)):
            for _ in range(200):  # never reads: the server drops it
                await asyncio.wait_for(loop.sock_sendall(sock, flood), 2.0)
        sock.close()
        async with rally.Client(server.url) as healthy:
            assert (await healthy.rpc(ServerLoadTitle("still"))).value == "Article: still"  # type: ignore[union-attr]


async def test_dead_peer_is_closed_after_ping_interval_and_pong_timeout() -> None:
    import websockets

    app = article_app(ping_interval=0.2, pong_timeout=0.2)
    async with running(app) as server:
        silent = await RawWs.open(server)  # reads, but never answers pings
        started = asyncio.get_running_loop().time()
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/_rally/ws?page=/articles/b") as alive:
            assert await silent.close_code() == 1011
            elapsed = asyncio.get_running_loop().time() - started
            assert 0.35 < elapsed < 2.0
            await alive.send(json.dumps({"kind": "send", "msg": {"type": "ToggleFavorite", "fields": {}}}))
            assert json.loads(await asyncio.wait_for(alive.recv(), WAIT))["kind"] == "push"  # answered pings
        silent.close()


async def test_abrupt_disconnect_mid_frame_leaves_nothing_behind() -> None:
    app = article_app()
    async with running(app) as server:
        ws = await RawWs.open(server)
        frame = ws.ws.send(wsproto.events.TextMessage(data="x" * 1000))
        ws.writer.write(frame[:300])
        await eventually(lambda: len(app._registry.topics.members.get("app", ())) == 1, "joined")
        ws.writer.transport.abort()
        await eventually(lambda: not app._registry.topics.members and not server.conns, "topics and connections empty")


async def test_close_handshake_time_out_drops_a_peer_that_never_answers() -> None:
    app = article_app(close_timeout=0.3)
    async with running(app) as server:
        async with rally.Client(server.url) as client:
            await client.rpc(ServerLoadTitle("a"))  # gets a session cookie
            ws = await RawWs.open(server)  # its own session: the Client's is closed below
        page = [c for c in server.conns if isinstance(c, rally._WsConn)][0]
        started = asyncio.get_running_loop().time()
        await app.close_session(page.ctx.session_id)
        data = b""
        while chunk := await asyncio.wait_for(ws.reader.read(65536), WAIT):  # read, never answer
            data += chunk
        elapsed = asyncio.get_running_loop().time() - started
        ws.close()
    assert data.startswith(b"\x88") and 0.25 < elapsed < 2.0


# ==== Slow consumers and fan-out =============================================


async def test_slow_consumer_is_dropped_and_everyone_else_gets_everything_in_order() -> None:
    app = room_app()
    async with running(app) as server:
        readers = [await RawWs.open(server, "/rooms/1") for _ in range(3)]
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", server.port))
        slow.sendall(UPGRADE % b"/rooms/1")  # and never reads again
        await eventually(lambda: len(app._registry.topics.members.get("app", ())) == 4, "all joined")
        received: list[list[int]] = [[] for _ in readers]
        progress = asyncio.Event()

        async def read(i: int, ws: RawWs) -> None:
            partial = ""
            while True:
                for e in await ws.events():
                    if isinstance(e, wsproto.events.TextMessage):
                        partial += e.data
                        if e.message_finished:
                            received[i].append(int(json.loads(partial)["msg"]["fields"]["text"].split()[0]))
                            partial = ""
                            progress.set()

        reading = [asyncio.ensure_future(read(i, ws)) for i, ws in enumerate(readers)]
        payload = "z" * 64_000
        sent = 0
        dropped_at = None
        while sent < 600 and (dropped_at is None or sent < dropped_at + 20):
            await app.broadcast_to_app(Heard(f"{sent} {payload}"))
            sent += 1
            while min(len(r) for r in received) < sent:  # readers keep up: wait for them
                progress.clear()
                await asyncio.wait_for(progress.wait(), WAIT)
            if dropped_at is None and len(app._registry.topics.members["app"]) == 3:
                dropped_at = sent
        for task in reading:
            task.cancel()
        for ws in readers:
            ws.close()
        slow.close()
    assert dropped_at is not None, "the slow consumer was never dropped"
    assert all(r == list(range(sent)) for r in received)


def rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def test_memory_stays_bounded_with_hundreds_of_connections_and_broadcasts() -> None:
    app = room_app()
    async with running(app) as server:
        conns = [await RawWs.open(server, f"/rooms/{i % 10}") for i in range(300)]
        await eventually(lambda: len(app._registry.topics.members.get("app", ())) == 300, "joined")

        async def drain(ws: RawWs) -> None:
            while True:
                await ws.reader.read(65536)

        draining = [asyncio.ensure_future(drain(ws)) for ws in conns]
        for i in range(20):
            await app.broadcast_to_app(Heard(f"warm {i}"))
        gc.collect()
        before = rss_kib()
        for i in range(300):
            await app.broadcast_to_app(Heard(f"{i} " + "m" * 1000))
            await asyncio.sleep(0)
        gc.collect()
        growth = rss_kib() - before
        for task in draining:
            task.cancel()
        for ws in conns:
            ws.close()
    assert growth < 20 * 1024, f"RSS grew {growth} KiB for 90 000 deliveries"


# ==== Handlers ===============================================================


async def test_hanging_handler_times_out_internal_and_the_server_stays_healthy(caplog: Any) -> None:
    async with running(rpc_app(handler_timeout=0.2)) as server, rally.Client(server.url) as client:
        with pytest.raises(rally.RemoteError) as info:
            await client.rpc(Sleep(30))
        assert info.value.code == "internal"
        assert (await client.rpc(Sleep(0))).value == "slept in http"  # type: ignore[union-attr]
    assert any("timed out after 0.2 s" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


async def test_pending_sends_past_the_bound_pause_reading_and_all_run_in_order() -> None:
    gate = asyncio.Event()

    class Gated:
        def server_init() -> tuple[list[str], rally.Effect[Heard]]:
            return [], rally.effect.none()

        async def server_update(model: list[str], msg: Say) -> tuple[list[str], rally.Effect[Heard]]:
            await gate.wait()
            return [*model, msg.text], rally.effect.send_to_client(Heard(msg.text))

    app = rally.App(max_pending_messages=8)
    app.page("/gated", Gated)
    async with running(app) as server, rally.Client(server.url, app) as client, client.page("/gated") as page:
        for i in range(100):
            await page.send(Say("client", str(i)))
        [conn] = [c for c in server.conns if isinstance(c, rally._WsConn)]
        session = conn.session
        assert isinstance(session, rally._PageSession)
        await eventually(lambda: conn.pausing, "reading paused")
        # The bound stops reading: messages already read wait in the reader.
        assert len(session.pending) == 8
        gate.set()
        assert [(await page.receive()).text for _ in range(100)] == [str(i) for i in range(100)]
        assert session.model == [str(i) for i in range(100)]


async def test_origin_null_is_refused_and_no_extension_is_negotiated() -> None:
    import websockets

    async with running(article_app()) as server:
        url = f"ws://127.0.0.1:{server.port}/_rally/ws?page=/articles/a"
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(url, origin="null"):  # type: ignore[arg-type]
                pass
        assert info.value.response.status_code == 403
        async with websockets.connect(url) as ws:  # offers permessage-deflate
            assert ws.response is not None and "Sec-WebSocket-Extensions" not in ws.response.headers


# ==== Connections ============================================================


async def test_max_connections_refuses_new_ones_cleanly_and_keeps_the_rest() -> None:
    import websockets

    async with running(article_app(max_connections=3)) as server:
        url = f"ws://127.0.0.1:{server.port}/_rally/ws?page=/articles/a"
        open_ = [await websockets.connect(url) for _ in range(3)]
        raw = await exchange(server, b"GET /articles/a HTTP/1.1\r\nhost: localhost\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 503 ")
        await open_[0].send(json.dumps({"kind": "send", "msg": {"type": "ToggleFavorite", "fields": {}}}))
        assert json.loads(await asyncio.wait_for(open_[0].recv(), WAIT))["kind"] == "push"
        for ws in open_:
            await ws.close()


async def test_two_thousand_websockets_connect_broadcast_and_drop_leaving_nothing() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 5000:
        pytest.skip(f"needs 5000 file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 5000), hard))
    app = room_app()
    tasks_before = len(asyncio.all_tasks())
    async with running(app) as server:
        conns: list[RawWs] = []
        for start in range(0, 2000, 200):
            conns += await asyncio.gather(*(RawWs.open(server, f"/rooms/{i % 7}") for i in range(start, start + 200)))
        await eventually(lambda: len(app._registry.topics.members.get("app", ())) == 2000, "2000 joined")
        assert await app.broadcast_to_app(Heard("hello, all")) == 2000
        first = await asyncio.gather(*(c.events() for c in conns))
        assert all(any(isinstance(e, wsproto.events.TextMessage) for e in events) for events in first)
        for c in conns:
            c.writer.transport.abort()
        await eventually(lambda: not app._registry.topics.members and not server.conns, "everything closed")
        assert len(asyncio.all_tasks()) == tasks_before
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ==== Security ===============================================================


@pytest.mark.parametrize(
    "path",
    [
        b"/static/../test_limits.py",
        b"/static/%2e%2e/test_limits.py",
        b"/static/sub/../../test_limits.py",
        b"/static//etc/passwd",
        b"/static/..%5ctest_limits.py",
        b"/static/link",
        b"/static/%00",
    ],
)
async def test_static_has_no_path_traversal(tmp_path: Any, path: bytes) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "hello.txt").write_text("hello")
    (tmp_path / "link").symlink_to(os.path.abspath(__file__))
    app = article_app()
    app.static("/static/", tmp_path)
    async with running(app) as server:
        [(response, body)] = responses(
            await exchange(server, b"GET %s HTTP/1.1\r\nhost: localhost\r\n\r\n" % path, until_close=False)
        )
    assert response.status_code in (400, 404) and b"import" not in body


async def test_static_serves_files_with_type_and_etag(tmp_path: Any) -> None:
    (tmp_path / "hello.txt").write_text("hello")
    app = article_app()
    app.static("/static/", tmp_path)
    async with running(app) as server:
        [(first, body)] = responses(
            await exchange(server, b"GET /static/hello.txt HTTP/1.1\r\nhost: localhost\r\n\r\n", until_close=False)
        )
        etag = dict(first.headers)[b"etag"]
        again = b"GET /static/hello.txt HTTP/1.1\r\nhost: localhost\r\nif-none-match: " + etag + b"\r\n\r\n"
        [(second, _)] = responses(await exchange(server, again, until_close=False))
    assert (first.status_code, body, dict(first.headers)[b"content-type"]) == (
        200,
        b"hello",
        b"text/plain; charset=utf-8",
    )
    assert second.status_code == 304


async def test_session_cookie_values_cannot_inject_headers_or_fixate_odd_ids() -> None:
    async with running(article_app()) as server:
        request = (
            b"GET /articles/a HTTP/1.1\r\nhost: localhost\r\ncookie: rally_session=abc%0d%0aset-cookie:%20x=1\r\n\r\n"
        )
        [(response, _)] = responses(await exchange(server, request, until_close=False))
    cookies = [v for k, v in response.headers if k == b"set-cookie"]
    assert len(cookies) == 1 and len(cookies[0].split(b";")[0]) == len(b"rally_session=") + 32 + 1 + 32


def test_session_ids_come_from_secrets() -> None:
    ids = {rally._new_session_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_h11_is_only_the_parser_responses_are_valid_http() -> None:
    raw = rally._http_response(200, b"hi", extra=[(b"etag", b'"x"')], keep_alive=True)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    response = conn.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 200
    assert conn.next_event() == h11.Data(data=b"hi")
