"""Limits, faults and load: every limit of docs/limits.md "Limits" at N and N+1, the
failure rules of docs/contract.md "The contract", "Wire protocol" and "Sessions, topics
and broadcast", sessions and hosts, shutdown, and the failure
paths of the Python client, against a running server on 127.0.0.1.

Same rules as test_rally.py. Limits and time-outs are configured small so each
test runs in seconds; a sleep appears only where time itself is the input (a
client trickling bytes or reading slowly, a poll interval, how long the server
is starved of descriptors), never to wait for the server. Raw requests name
``host: localhost``: a loopback listener admits only loopback Host names.
"""

import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import resource
import select
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
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
    CommentSaved,
    Everything,
    FavoriteToggled,
    Heard,
    Node,
    Room,
    Say,
    ServerLoadTitle,
    Sleep,
    article_app,
    codecs,
    envelope,
    eventually,
    exchange,
    journal_app,
    json_reader,
    post_rpc,
    responses,
    room_app,
    rpc_app,
    rpc_request,
    running,
    ws_events,
)

# ==== Helpers ================================================================


def get_request(path: str, extra: bytes = b"") -> bytes:
    """A GET of ``path`` with ``extra`` header lines, asking the server to close after answering."""
    return b"GET %s HTTP/1.1\r\nhost: localhost\r\n%sconnection: close\r\n\r\n" % (path.encode(), extra)


def upgrade_request(page: str = "/articles/a", extra: bytes = b"", *, route: str | None = None) -> bytes:
    """The WebSocket handshake of ``page`` (or of the raw ``route``) with ``extra`` header lines."""
    target = route if route is not None else "/_rally/ws?page=" + page
    return (
        b"GET %s HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n%s\r\n" % (target.encode(), extra)
    )


def head_of_size(size: int, path: bytes = b"/articles/x") -> bytes:
    """A GET whose head is exactly ``size`` bytes in canonical form."""
    start = b"GET %s HTTP/1.1\r\nhost: localhost\r\n" % path
    fixed = len(start) + len(b"x-pad: \r\n") + len(b"\r\n")
    return start + b"x-pad: " + b"a" * (size - fixed) + b"\r\n\r\n"


def with_host(request: bytes, host: bytes) -> bytes:
    """``request`` with ``host`` in place of its ``host: localhost``."""
    return request.replace(b"\r\nhost: localhost\r\n", b"\r\nhost: %s\r\n" % host, 1)


def status_of(raw: bytes) -> int:
    """The status code of the first response line in ``raw``."""
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw.split(b" ", 2)[1])


async def get(server: rally.Server, path: str, extra: bytes = b"") -> tuple[h11.Response, bytes]:
    """GET ``path`` and read until the server closes: the response and its body."""
    [(response, body)] = responses(await exchange(server, get_request(path, extra)))
    return response, body


async def connected_socket(
    server: rally.Server, *, rcvbuf: int | None = None, sndbuf: int | None = None
) -> socket.socket:
    """A non-blocking socket connected to ``server``, with the buffer sizes given."""
    sock = socket.socket()
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port)), WAIT)
    except BaseException:
        sock.close()
        raise
    return sock


async def silent_http(server: rally.Server, request: bytes) -> tuple[asyncio.StreamWriter, bytes]:
    """Send ``request``, read the response head, then never read again."""
    reader, writer = await asyncio.open_connection(sock=await connected_socket(server, rcvbuf=4096))
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    writer.transport.pause_reading()
    return writer, head


class RawWs:
    """A WebSocket client over a raw socket, framing with a real wsproto client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes = b"") -> None:
        self.reader, self.writer, self.head = reader, writer, head
        self.ws = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT)

    @classmethod
    async def open(
        cls,
        server: rally.Server,
        page: str = "/articles/a",
        extra: bytes = b"",
        *,
        route: str | None = None,
        rcvbuf: int | None = None,
        sndbuf: int | None = None,
    ) -> "RawWs":
        """Open the WebSocket of ``page`` (or of the raw ``route``); ``head`` is the server's 101."""
        sock = await connected_socket(server, rcvbuf=rcvbuf, sndbuf=sndbuf)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(upgrade_request(page, extra, route=route))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            assert head.startswith(b"HTTP/1.1 101 "), head
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, head)

    def send(self, event: wsproto.events.Event) -> None:
        self.writer.write(self.ws.send(event))

    def rpc_frame(self, msg_type: str, fields: dict[str, Any], msg_id: Any) -> bytes:
        """The frame of an ``rpc`` envelope, to write alone or as part of a burst."""
        return self.ws.send(wsproto.events.TextMessage(data=envelope(msg_type, fields, msg_id).decode()))

    def send_frame(self, msg_type: str, fields: dict[str, Any]) -> bytes:
        """The frame of a ``send`` envelope, to write alone or as part of a burst."""
        text = json.dumps({"kind": "send", "msg": {"type": msg_type, "fields": fields}}, separators=(",", ":"))
        return self.ws.send(wsproto.events.TextMessage(data=text))

    async def events(self) -> list[wsproto.events.Event]:
        """Events from the next read; [] once the server has closed the TCP connection."""
        data = await asyncio.wait_for(self.reader.read(65536), WAIT)
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    async def texts(self, count: int) -> list[str]:
        """The next ``count`` whole text messages the server sends."""
        out: list[str] = []
        part = ""
        while len(out) < count:
            events = await self.events()
            assert events or not self.reader.at_eof(), f"closed after {len(out)} of {count} messages"
            for event in events:
                if isinstance(event, wsproto.events.TextMessage):
                    part += event.data
                    if event.message_finished:
                        out.append(part)
                        part = ""
        return out

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


async def socket_gone(reader: asyncio.StreamReader, bound: float) -> bool:
    """Read (and drop) until the server closes the TCP connection; False if still open after ``bound`` s."""
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


def rss_kib() -> int:
    """The resident set size of this process, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


# Messages of the apps below.


@dataclass
class Hang:
    pass


@dataclass
class Slow:
    seconds: float


@dataclass
class Hold:
    n: int


@dataclass
class Bump:
    pass


@dataclass
class Mark:
    who: str


@dataclass
class NotAPush:
    x: int


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


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"GET /_rally/health HTTP/1.1\r\nhost: localhost\r\nhost: localhost\r\n", id="two-hosts"),
        pytest.param(b"GET /_rally/health HTTP/1.1\r\nhost: localhost\r\nHost: evil.example\r\n", id="two-hosts-cased"),
        pytest.param(b"GET /_rally/health HTTP/1.1\r\nx-a: 1\r\n", id="no-host"),
        pytest.param(b"GET /_rally/health HTTP/1.1\r\nhost: localhost\r\nhost: a\r\nx: \x80\r\n", id="two-hosts-h11"),
    ],
)
async def test_request_without_exactly_one_host_is_400_and_closed(head: bytes) -> None:
    """RFC 9112 section 3.2: a request with no Host, or more than one, gets 400."""
    async with running(article_app()) as server:
        raw = await exchange(server, head + b"\r\n")
    assert status_of(raw) == 400 and b"connection: close" in raw


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /SECRET-MARKER HTTP/1.1 garbage\r\nhost: localhost\r\n\r\n",
        b"GET /articles/a HTTP/1.1\r\nhost: localhost\r\nSECRET-MARKER\r\n\r\n",
    ],
    ids=["request-line", "header-line"],
)
async def test_malformed_request_gets_a_400_that_does_not_echo_it(request_bytes: bytes) -> None:
    """The 400's body is a short text of rally's own: it never quotes the offending bytes."""
    async with running(article_app()) as server:
        raw = await exchange(server, request_bytes)
    assert status_of(raw) == 400
    assert b"SECRET" not in raw and b"MARKER" not in raw
    [(_, body)] = responses(raw)
    assert 0 < len(body) < 200


@pytest.mark.parametrize(
    ("text", "status", "value"),
    [
        ("1.5", 200, 1.5),
        ("-2", 200, -2.0),
        ("nan", 404, None),
        ("NaN", 404, None),
        ("inf", 404, None),
        ("-inf", 404, None),
        ("infinity", 404, None),
        ("1_0", 404, None),
        ("1e999", 404, None),
    ],
)
async def test_float_route_parameter_accepts_only_finite_plain_numbers(text: str, status: int, value: Any) -> None:
    """A float parameter is a finite number in plain notation: nan, inf, 1_0 and 1e999 match no route."""
    seen: list[float] = []

    class F:
        def view(x: float) -> str:
            seen.append(x)
            return f"<p>{x}</p>"

    app = rally.App()
    app.page("/f/{x}", F)
    async with running(app) as server:
        response, _ = await get(server, f"/f/{text}")
    assert response.status_code == status
    assert seen == ([] if value is None else [value])


async def test_expect_100_continue_is_sent_for_an_rpc_that_will_read_its_body() -> None:
    body = envelope("ServerLoadTitle", {"slug": "later"})
    head = rpc_request(body, b"expect: 100-continue\r\n")[: -len(body)]
    async with running(article_app()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(head)
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        response = await asyncio.wait_for(reader.readuntil(b'"Article: later"}'), WAIT)
        writer.close()
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /nowhere HTTP/1.1\r\nhost: localhost\r\ncontent-length: 2\r\n", 404),
        (b"POST /articles/a HTTP/1.1\r\nhost: localhost\r\ncontent-length: 2\r\n", 405),
        (b"POST /_rally/rpc HTTP/1.1\r\nhost: localhost\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n", 415),
        (
            b"POST /_rally/rpc HTTP/1.1\r\nhost: localhost\r\norigin: http://evil.test\r\n"
            b"content-type: application/json\r\ncontent-length: 2\r\n",
            403,
        ),
    ],
    ids=["404", "405", "415", "403"],
)
async def test_expect_100_continue_is_not_sent_for_a_refused_request(request_bytes: bytes, status: int) -> None:
    """A request refused from its head gets the refusal at once, not a 100 Continue for a body never read."""
    async with running(article_app()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request_bytes + b"expect: 100-continue\r\n\r\n{}")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        writer.close()
    assert status_of(first) == status


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
        sock = await connected_socket(server, rcvbuf=4096)
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
        status, reply = await post_rpc(server, b"[" * 100_000)
        assert asyncio.get_running_loop().time() - started < 1.0
    assert (status, reply["code"]) == (413, "too_large")


async def test_json_array_far_over_max_array_items_is_too_large() -> None:
    """An array far past max_array_items is refused as too_large, like any input past a size limit."""
    n = (rally.DEFAULT_MAX_BODY_BYTES - 4) // 3
    body = b"[" + b"[]," * n + b"[]]"
    assert len(body) == rally.DEFAULT_MAX_BODY_BYTES
    async with running(article_app()) as server:
        status, reply = await post_rpc(server, body)
    assert (status, reply["kind"], reply["code"]) == (413, "error", "too_large")


def with_containers(count: int) -> bytes:
    """A JSON list holding lists of up to 1000 empty objects: ``count`` arrays and objects in all."""
    items, left = [], count - 1
    while left:
        take = min(left, 1001)  # a list and up to 1000 objects
        items.append("[" + ",".join(["{}"] * (take - 1)) + "]")
        left -= take
    return ("[" + ",".join(items) + "]").encode()


class NotParsed:
    def decode(self, text: str) -> Any:
        raise AssertionError("parsed")


@pytest.mark.parametrize(("count", "refused"), [(20_000, False), (20_001, True)], ids=["at-limit", "one-over"])
def test_json_document_holds_at_most_twice_max_array_items_arrays_and_objects(count: int, refused: bool) -> None:
    """With the default max_array_items (10 000), a document of 20 000 arrays and
    objects is read; one more is too_large, refused before it is parsed."""
    body = with_containers(count)
    assert body.count(b"[") + body.count(b"{") == count
    if not refused:
        assert len(json_reader().loads(body)) == -(-(count - 1) // 1001)
        return
    reader = json_reader()
    reader._decoder = NotParsed()  # type: ignore[assignment]
    with pytest.raises(rally.ContractError) as info:
        reader.loads(body)
    assert info.value.code == "too_large"
    assert info.value.errors == [{"path": "", "message": "more than 20000 arrays and objects"}]


def test_json_brackets_inside_strings_are_not_arrays_or_objects() -> None:
    """Brackets in strings (escaped quotes included) do not count toward the bound."""
    text = "[{" * 10_000 + '\\"[{'
    doc = json.dumps({"a": [text, text], "b": [[], {}]}).encode()
    assert doc.count(b"[") + doc.count(b"{") > 40_000
    assert json_reader().loads(doc) == {"a": [text, text], "b": [[], {}]}


async def test_json_document_of_too_many_arrays_and_objects_over_http_is_413_too_large() -> None:
    async with running(article_app()) as server:
        status, reply = await post_rpc(server, with_containers(20_001))
    assert (status, reply["code"], reply["errors"][0]["message"]) == (
        413,
        "too_large",
        "more than 20000 arrays and objects",
    )


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
        status, reply = await post_rpc(server, body)
    assert (status, reply["code"]) == (400, code)


async def test_error_messages_quote_at_most_a_short_excerpt() -> None:
    async with running(rpc_app()) as server:
        _, reply = await post_rpc(server, envelope("Q" * 50_000, {}))
        _, reply2 = await post_rpc(server, envelope("Divide", {"a": "x" * 50_000, "b": 1}))
    assert len(json.dumps(reply)) < 300 and len(json.dumps(reply2)) < 300


VALID_IDS = [("a" * 64, "64-chars"), (2**53 - 1, "max-safe-int"), (-(2**53 - 1), "min-safe-int"), (0, "zero")]
INVALID_IDS = [("a" * 65, "65-chars"), (2**53, "2^53"), (-(2**53), "-2^53"), ("x" * 1_000_000, "million-chars")]


@pytest.mark.parametrize("msg_id", [v for v, _ in VALID_IDS], ids=[i for _, i in VALID_IDS])
async def test_envelope_id_in_range_is_echoed_over_http_and_websocket(msg_id: Any) -> None:
    """An id is a string of at most 64 characters or a safe integer; the bounds themselves are valid."""
    body = envelope("ServerLoadTitle", {"slug": "a"}, msg_id)
    expected = {"kind": "ok", "id": msg_id, "value": "Article: a"}
    async with running(article_app()) as server:
        assert await post_rpc(server, body) == (200, expected)
        ws = await RawWs.open(server)
        ws.send(wsproto.events.TextMessage(data=body.decode()))
        [reply] = await ws.texts(1)
        ws.close()
    assert json.loads(reply) == expected


@pytest.mark.parametrize("msg_id", [v for v, _ in INVALID_IDS], ids=[i for _, i in INVALID_IDS])
async def test_envelope_id_out_of_range_is_invalid_at_id_and_not_echoed(msg_id: Any) -> None:
    """An id past the bounds is refused at ``id``, and the reply does not echo it."""
    body = envelope("ServerLoadTitle", {"slug": "a"}, msg_id)
    async with running(article_app()) as server:
        status, http_reply = await post_rpc(server, body)
        ws = await RawWs.open(server)
        ws.send(wsproto.events.TextMessage(data=body.decode()))
        [text] = await ws.texts(1)
        ws.close()
    ws_reply = json.loads(text)
    assert status == 400
    for reply in (http_reply, ws_reply):
        assert (reply["kind"], reply["code"], reply["id"]) == ("error", "invalid", None)
        assert reply["errors"][0]["path"] == "id"
        assert len(json.dumps(reply)) < 300  # no echo of the id


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
        raw = await exchange(server, upgrade_request()[:60])
    assert raw.startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize(
    ("page", "status"),
    [
        ("/articles/a&b=1&c=2&d=3&e=4&f=5&g=6&h=7", 101),
        ("/articles/a&b=1&c=2&d=3&e=4&f=5&g=6&h=7&i=8", 400),
        ("/articles/a&1&2&3&4&5&6&7&8", 400),
        ("/articles/a&flag", 400),
    ],
    ids=["eight-fields", "nine-fields", "nine-bare-fields", "a-field-without-value"],
)
async def test_websocket_query_with_too_many_fields_is_400_and_logs_no_error(
    page: str, status: int, caplog: Any
) -> None:
    """A handshake query of more than 8 fields, or with a field without a value, is the client's error."""
    async with running(article_app()) as server:
        raw = await exchange(server, upgrade_request(page), until_close=False)
    assert status_of(raw) == status
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


HANDSHAKE_HEAD = b"GET /_rally/ws?page=/articles/a HTTP/1.1\r\nhost: localhost\r\n"
UPGRADE = b"upgrade: websocket\r\nconnection: Upgrade\r\n"
V13 = b"sec-websocket-version: 13\r\n"
KEY = b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


@pytest.mark.parametrize(
    "lines, status, header",
    [
        pytest.param(b"connection: close\r\n", 426, (b"upgrade", b"websocket"), id="no-upgrade"),
        pytest.param(b"upgrade: websocket\r\nconnection: keep-alive\r\n" + V13 + KEY, 426, None, id="no-token"),
        pytest.param(b"upgrade: h2c\r\nconnection: Upgrade\r\n" + V13 + KEY, 426, None, id="other-protocol"),
        pytest.param(
            UPGRADE + b"sec-websocket-version: 8\r\n" + KEY, 426, (b"sec-websocket-version", b"13"), id="version-8"
        ),
        pytest.param(UPGRADE + V13, 400, None, id="no-key"),
        pytest.param(UPGRADE + V13 + b"sec-websocket-key: not base64!\r\n", 400, None, id="key-not-base64"),
        pytest.param(UPGRADE + V13 + b"sec-websocket-key: AAAAAAAAAAAAAAAAAAAA\r\n", 400, None, id="key-of-15-bytes"),
        pytest.param(
            b"upgrade: WebSocket\r\nconnection: keep-alive, Upgrade\r\n" + V13 + KEY, 101, None, id="lists-and-case"
        ),
    ],
)
async def test_websocket_handshake_headers_are_checked_as_rfc_6455_says(
    lines: bytes, status: int, header: tuple[bytes, bytes] | None
) -> None:
    """RFC 6455 section 4.2.1: Upgrade websocket and Connection upgrade (any
    case, in a token list), version 13 (else 426 naming it), and a key of 16
    bytes in base64 (else 400)."""
    async with running(article_app()) as server:
        raw = await exchange(server, HANDSHAKE_HEAD + lines + b"\r\n", until_close=False)
    assert status_of(raw) == status, raw[:200]
    if header is not None:
        [(response, _)] = responses(raw)
        assert header in response.headers


async def test_websocket_frames_written_with_the_handshake_are_read_after_it() -> None:
    """A client that writes its first frame in the same packet as its
    handshake, before the 101 (RFC 6455 asks it to wait), is served."""
    async with running(article_app()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        ws = RawWs(reader, writer)
        try:
            writer.write(upgrade_request() + ws.rpc_frame("ServerLoadTitle", {"slug": "early"}, 1))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            assert head.startswith(b"HTTP/1.1 101 ")
            assert [json.loads(t) for t in await ws.texts(1)] == [{"kind": "ok", "id": 1, "value": "Article: early"}]
        finally:
            ws.close()


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


def fragmented(*payloads: str) -> bytes:
    """The frames of one text message in fragments carrying ``payloads``, as a real client masks them."""
    client = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT)
    *head, last = payloads
    frames = [client.send(wsproto.events.TextMessage(data=p, message_finished=False)) for p in head]
    return b"".join(frames) + client.send(wsproto.events.TextMessage(data=last, message_finished=True))


FRAGMENT = 64  # docs/limits.md: each frame of a fragmented message counts at least 64 bytes


@pytest.mark.parametrize(
    ("payloads", "expected"),
    [
        ([""] * 10, [""]),
        ([""] * 11, [("error", 1009)]),
        (["x" * (10 * FRAGMENT - FRAGMENT), ""], ["x" * (9 * FRAGMENT)]),
        (["x" * (10 * FRAGMENT - FRAGMENT + 1), ""], [("error", 1009)]),
    ],
    ids=["10-empty-at-limit", "11-empty-one-over", "long-and-empty-at-limit", "long-and-empty-one-over"],
)
def test_websocket_reader_counts_each_fragment_as_at_least_min_fragment_bytes(
    payloads: list[str], expected: list[Any]
) -> None:
    """With max_message_bytes 10 * 64, a message of 10 empty fragments fits and 11 do not; a
    fragment counts its bytes or 64, whichever is more, at any split of the bytes."""
    data = fragmented(*payloads)
    limit = 10 * FRAGMENT
    assert ws_events([data], max_message_bytes=limit) == expected
    assert ws_events([data[i : i + 1] for i in range(len(data))], max_message_bytes=limit) == expected
    # An unfragmented message is counted in its bytes alone, however it arrives.
    single = fragmented("y" * limit)
    assert ws_events([single[i : i + 1] for i in range(len(single))], max_message_bytes=limit) == ["y" * limit]


@pytest.mark.parametrize(("empty", "refused"), [(9, False), (10, True)], ids=["at-limit", "one-over"])
async def test_websocket_message_of_empty_fragments_is_closed_with_1009_past_the_limit(
    empty: int, refused: bool
) -> None:
    """An RPC in one fragment of its own bytes (over 64) and then empty ones, the last
    finishing it: with room for the RPC and 10 fragments of 64 bytes, 9 empty fragments
    and the last are answered, one more empty fragment closes with 1009."""
    text = envelope("ServerLoadTitle", {"slug": "s" * FRAGMENT}, 3).decode()
    assert len(text) > FRAGMENT
    async with running(rpc_app(max_message_bytes=len(text) + 10 * FRAGMENT)) as server:
        ws = await RawWs.open(server)
        ws.writer.write(fragmented(text, *[""] * empty, ""))
        if refused:
            assert await ws.close_code() == 1009
        else:
            [reply] = await ws.texts(1)
            assert json.loads(reply) == {"kind": "ok", "id": 3, "value": "Article: " + "s" * FRAGMENT}
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
        sock = await connected_socket(server, rcvbuf=4096)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_sendall(sock, upgrade_request()), WAIT)
        client = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT)
        flood = client.send(wsproto.events.Ping(payload=b"x" * 125)) * 2000
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


async def test_websocket_close_timeout_is_not_cancelled_by_a_late_pong() -> None:
    app = rally.App(ping_interval=0.2, pong_timeout=5, close_timeout=0.5)

    @app.websocket("/ctl")
    async def ctl(ws: rally.WebSocket) -> None:
        with contextlib.suppress(rally.ConnectionClosed):
            while await ws.receive() != "close":
                pass
            await ws.close()

    async with running(app) as server:
        ws = await RawWs.open(server, route="/ctl")
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


# ==== WebSocket routes =======================================================


async def test_websocket_route_receive_reports_the_peers_close_code() -> None:
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
        ws = await RawWs.open(server, route="/recv")
        try:
            await asyncio.wait_for(entered.wait(), WAIT)
            ws.send(wsproto.events.CloseConnection(code=4321, reason="bye"))
            got = await asyncio.wait_for(seen, WAIT)
        finally:
            ws.writer.transport.abort()
    assert isinstance(got, rally.ConnectionClosed), f"receive() ended with {got!r}, not ConnectionClosed"
    assert got.code == 4321, f"receive() reported code {got.code}, the peer closed with 4321"


async def test_websocket_route_receive_reports_1006_when_the_peer_drops_tcp() -> None:
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
        ws = await RawWs.open(server, route="/recv")
        await asyncio.wait_for(entered.wait(), WAIT)
        ws.writer.transport.abort()  # no close frame
        got = await asyncio.wait_for(seen, WAIT)
    assert not isinstance(got, asyncio.CancelledError), "the handler was cancelled instead of told the peer left"
    assert isinstance(got, rally.ConnectionClosed), f"receive() ended with {got!r}"
    assert got.code == 1006


async def test_websocket_route_send_waits_for_a_slow_reader_instead_of_dropping_it() -> None:
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
        ws = await RawWs.open(server, route="/produce")
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


async def test_websocket_route_dropped_connection_reports_a_code_other_than_1000() -> None:
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
        ws = await RawWs.open(server, route="/flood", rcvbuf=4096)
        ws.writer.transport.pause_reading()  # never reads again, so never answers a ping
        try:
            got = await asyncio.wait_for(outcome, WAIT)
        finally:
            ws.writer.transport.abort()
    assert isinstance(got, rally.ConnectionClosed), f"the handler ended with {got!r}"
    assert got.code != 1000, "a connection the server dropped was reported as a normal close (1000)"


# ==== Slow consumers and fan-out =============================================


async def test_slow_consumer_is_dropped_and_everyone_else_gets_everything_in_order() -> None:
    app = room_app()
    async with running(app) as server:
        readers = [await RawWs.open(server, "/rooms/1") for _ in range(3)]
        slow = await connected_socket(server, rcvbuf=4096)  # sends its handshake, then never reads
        await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(slow, upgrade_request("/rooms/1")), WAIT)
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


BIG = 32 * 1024 * 1024


def big_file(directory: Any) -> None:
    """Write ``big`` (BIG random bytes) and ``small.txt`` into ``directory``."""
    chunk = os.urandom(1024 * 1024)
    with open(os.path.join(directory, "big"), "wb") as f:
        for _ in range(BIG // len(chunk)):
            f.write(chunk)
    with open(os.path.join(directory, "small.txt"), "w") as f:
        f.write("small")


async def test_static_file_to_non_reading_clients_does_not_hold_the_file_in_memory(tmp_path: Any) -> None:
    big_file(tmp_path)
    app = article_app(shutdown_timeout=1)
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
    app = article_app(max_connections=1, keepalive_timeout=0.3, close_timeout=0.5, send_timeout=0.5, shutdown_timeout=1)
    app.static("/s/", tmp_path)
    app.page("/big-page", BigPage)
    async with running(app) as server:
        writer, head = await silent_http(server, b"GET %s HTTP/1.1\r\nhost: localhost\r\n\r\n" % target)
        try:
            assert head.startswith(b"HTTP/1.1 200 "), head
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10.0
            statuses: list[int | None] = []
            page_get = get_request("/articles/a")
            while loop.time() < deadline:
                try:
                    status: int | None = responses(await exchange(server, page_get))[0][0].status_code
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
        ws = await RawWs.open(server, "/rooms/1", rcvbuf=4096)
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


FAILED_SEND = "socket.send() raised exception."  # what asyncio logs for each write to a reset socket


@contextlib.contextmanager
def failed_sends() -> Iterator[list[str]]:
    """The ``socket.send() raised exception.`` records asyncio logs while the block runs."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == FAILED_SEND:
                seen.append(record.getMessage())

    handler = Keep()
    log = logging.getLogger("asyncio")
    log.addHandler(handler)
    try:
        yield seen
    finally:
        log.removeHandler(handler)


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with SO_LINGER 0: the peer gets a TCP reset, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_then_reset(port: int, request: bytes, count: int) -> None:
    """In a thread, so the reset lands while the server is writing: send
    ``request``, read ``count`` bytes of the answer, reset."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    try:
        sock.sendall(request)
        got = 0
        while got < count:
            data = sock.recv(1 << 20)
            assert data, f"closed after {got} bytes"
            got += len(data)
    finally:
        reset(sock)


async def test_client_reset_during_static_downloads_logs_no_failed_sends(tmp_path: Any) -> None:
    """Downloads of a 3 MiB file reset as they start (the request is read, then
    every write meets the reset: before, asyncio logged 44 failed sends) and
    after 1 MiB (the reset lands while the file is being written): the server
    stops writing to a reset socket."""
    with open(tmp_path / "big", "wb") as f:
        f.write(os.urandom(3 * 1024 * 1024))
    app = article_app()
    app.static("/s/", tmp_path)
    request = b"GET /s/big HTTP/1.1\r\nhost: localhost\r\n\r\n"
    async with running(app) as server:
        with failed_sends() as seen:
            sock = await connected_socket(server)
            await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, request), WAIT)
            reset(sock)
            await eventually(lambda: not server.conns and not server.tasks, "the reset download is over")
            for _ in range(3):
                await asyncio.to_thread(read_then_reset, server.port, request, 1024 * 1024)
                await eventually(lambda: not server.conns and not server.tasks, "the reset download is over")
        response, _ = await get(server, "/articles/a")
    assert seen == []
    assert response.status_code == 200


async def test_client_reset_during_a_flood_of_page_pushes_logs_no_failed_sends() -> None:
    """2000 pushes in one turn of the loop, the page's socket reset after the
    tenth: none of the rest is written (before, asyncio logged nearly 2000 lines)."""
    app = room_app()
    async with running(app) as server:
        with failed_sends() as seen:
            sock = await connected_socket(server)
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_sendall(sock, upgrade_request("/rooms/1")), WAIT)
            head = b""
            while b"\r\n\r\n" not in head:
                head += await asyncio.wait_for(loop.sock_recv(sock, 4096), WAIT)
            assert head.startswith(b"HTTP/1.1 101 "), head
            await eventually(lambda: app._registry.topics.members, "the page joined its topics")
            for i in range(2000):
                if i == 10:
                    reset(sock)  # the server's socket gets the reset now: loopback delivers it at once
                await app.broadcast_to_app(Heard(f"{i} " + "p" * 100))
            await eventually(lambda: not server.conns, "the reset connection is gone")
    assert seen == []


async def test_client_reset_during_a_websocket_route_flood_ends_the_sender_and_logs_no_failed_sends() -> None:
    """A route sending as fast as it may, its peer reset after 1 MiB: ``send``
    raises ConnectionClosed (1006) instead of writing on into the reset socket."""
    app = rally.App()
    ended: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

    @app.websocket("/flood")
    async def flood(ws: rally.WebSocket) -> None:
        sent = 0
        try:
            while sent < 20_000:  # 20 MB: far more than is read before the reset
                await ws.send("x" * 1000)
                sent += 1
        except rally.ConnectionClosed as exc:
            ended.set_result((exc.code, sent))
            raise
        ended.set_result((0, sent))

    async with running(app) as server:
        with failed_sends() as seen:
            await asyncio.to_thread(read_then_reset, server.port, upgrade_request(route="/flood"), 1024 * 1024)
            code, sent = await asyncio.wait_for(ended, WAIT)
    assert seen == []
    assert (code, sent < 20_000) == (1006, True)


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
        # Each send waits for its answer: they run at once, written in order.
        sends = [asyncio.create_task(page.send(Say("client", str(i)))) for i in range(100)]
        [conn] = [c for c in server.conns if isinstance(c, rally._WsConn)]
        session = conn.session
        assert isinstance(session, rally._PageSession)
        await eventually(lambda: conn.pausing, "reading paused")
        # The bound stops reading: messages already read wait in the reader.
        assert len(session.pending) == 8
        gate.set()
        await asyncio.wait_for(asyncio.gather(*sends), WAIT)
        assert [(await page.receive()).text for _ in range(100)] == [str(i) for i in range(100)]
        assert session.model == [str(i) for i in range(100)]


def holding_app(limit: int) -> tuple[rally.App, dict[str, int]]:
    """An app whose async RPC counts the calls running at once; the first ``limit`` wait until ``limit`` started."""
    stats = {"active": 0, "max_active": 0, "started": 0}
    release = asyncio.Event()
    app = article_app(max_concurrent_rpcs=limit)

    @app.rpc
    async def server_hold(msg: Hold) -> int:
        stats["started"] += 1
        stats["active"] += 1
        stats["max_active"] = max(stats["max_active"], stats["active"])
        if stats["started"] == limit:
            release.set()
        try:
            await asyncio.wait_for(release.wait(), WAIT)
            await asyncio.sleep(0)  # one more turn of the loop, so unbounded calls would overlap
        finally:
            stats["active"] -= 1
        return msg.n

    return app, stats


@pytest.mark.parametrize("count", [4, 5, 200], ids=["at-n", "n-plus-one", "two-hundred"])
async def test_concurrent_rpcs_on_one_websocket_are_bounded_and_none_is_lost(count: int) -> None:
    """At most max_concurrent_rpcs RPCs of one WebSocket run at once; the others wait their turn."""
    app, stats = holding_app(4)
    async with running(app) as server:
        ws = await RawWs.open(server)
        ws.writer.write(b"".join(ws.rpc_frame("Hold", {"n": i}, i) for i in range(count)))
        replies = [json.loads(t) for t in await ws.texts(count)]
        ws.close()
    assert sorted(r["id"] for r in replies) == list(range(count))
    assert all(r == {"kind": "ok", "id": r["id"], "value": r["id"]} for r in replies)
    assert stats["max_active"] == 4
    assert stats["started"] == count


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


@contextlib.asynccontextmanager
async def running_with_big_buffers(app: rally.App) -> AsyncIterator[rally.Server]:
    """Serve ``app`` on a listener whose connections have 4 MiB receive buffers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    server = await app.start(sock=sock, access_log=False)
    try:
        yield server
    finally:
        await asyncio.wait_for(server.close(), 15)


async def test_websocket_burst_of_sends_on_one_connection_lets_another_connection_in() -> None:
    """A burst that arrives in one read runs a slice at a time: B's RPC is answered before A's 4000 updates end."""
    log: list[Any] = []

    class Counter:
        def server_init() -> tuple[int, rally.Effect[Heard]]:
            return 0, rally.effect.none()

        def server_update(model: int, msg: Bump) -> tuple[int, rally.Effect[Heard]]:
            log.append(model)
            done = rally.effect.send_to_client(Heard("done"))
            return model + 1, done if model == 3999 else rally.effect.none()

    app = rally.App()
    app.page("/counter", Counter)

    @app.rpc
    def server_mark(msg: Mark) -> int:
        log.append(msg.who)
        return len(log)

    async with running_with_big_buffers(app) as server:
        a = await RawWs.open(server, "/counter", sndbuf=4 * 1024 * 1024)
        b = await RawWs.open(server, "/counter")
        burst = b"".join(a.send_frame("Bump", {}) for _ in range(4000))
        assert len(burst) < 256 * 1024  # fits in one read of the server
        a.writer.write(burst)
        b.writer.write(b.rpc_frame("Mark", {"who": "B"}, 1))
        [reply] = await b.texts(1)
        [done] = await a.texts(1)
        a.close()
        b.close()
    assert json.loads(reply)["kind"] == "ok"
    assert json.loads(done) == {"kind": "push", "msg": {"type": "Heard", "fields": {"text": "done"}}}
    assert [x for x in log if x != "B"] == list(range(4000))
    assert log.index("B") < 4000


async def test_websocket_message_of_400_000_empty_fragments_does_not_stop_other_connections() -> None:
    """A fragmented message whose fragments carry nothing is parsed a slice at a
    time: B's RPC is answered while A's fragments are still being read."""
    log: list[str] = []
    app = article_app()

    @app.rpc
    def server_mark(msg: Mark) -> int:
        log.append(msg.who)
        return len(log)

    async with running(app) as server:
        a = await RawWs.open(server)
        b = await RawWs.open(server)
        text = envelope("Mark", {"who": "A"}, 1).decode()
        first = a.ws.send(wsproto.events.TextMessage(data=text, message_finished=False))
        empty = a.ws.send(wsproto.events.TextMessage(data="", message_finished=False))
        last = a.ws.send(wsproto.events.TextMessage(data="", message_finished=True))
        assert len(empty) == 6  # header and mask, no payload
        a.writer.write(first + empty * 400_000 + last)
        b.writer.write(b.rpc_frame("Mark", {"who": "B"}, 2))
        [reply] = await b.texts(1)
        seen = list(log)
        a.writer.transport.abort()  # the rest of A's fragments are not needed
        b.close()
    assert json.loads(reply) == {"kind": "ok", "id": 2, "value": 1}
    assert seen == ["B"]


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


def test_default_max_connections_leaves_a_batch_of_accepts_free() -> None:
    """At the default max_connections, beyond the descriptors already open,
    there is room for a whole batch of accepted sockets not yet counted as
    connections (the server accepts _EVENTS_PER_TURN at a time)."""
    result = run_script(
        """
        import json, os, resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        import rally
        print(json.dumps({"max_connections": rally.App()._limits.max_connections,
                          "batch": rally._EVENTS_PER_TURN, "open": len(os.listdir("/proc/self/fd"))}))
        """
    )
    free = 256 - result["max_connections"] - result["open"]
    assert free >= result["batch"], f"{free} descriptors free at max_connections: {result}"


SERVER_AT_256_DESCRIPTORS = """
import asyncio, json, logging, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
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

class P:
    html = "<p>p</p>"

async def main():
    app = rally.App(keepalive_timeout=60)
    app.page("/p", P)
    server = await app.start("127.0.0.1", 0, access_log=False)
    print(json.dumps({"port": server.port, "max_connections": app._limits.max_connections}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await asyncio.wait_for(server.close(), 10)
    print(json.dumps({"messages": messages}), flush=True)

asyncio.run(main())
"""


def test_connection_flood_at_the_default_max_connections_gets_503s_not_out_of_descriptors() -> None:
    """A server at RLIMIT_NOFILE 256 with the default max_connections, 400
    connections at once: those past max_connections get 503 and the server
    never runs out of descriptors (no back-off); once they close, it answers."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with subprocess.Popen(
        [sys.executable, "-c", SERVER_AT_256_DESCRIPTORS],
        cwd=here,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as server:
        clients: list[socket.socket] = []
        try:
            assert server.stdout is not None and server.stdin is not None
            info = json.loads(server.stdout.readline())
            for _ in range(400):  # the listen backlog (1024) takes them all at once
                clients.append(socket.create_connection(("127.0.0.1", info["port"]), timeout=WAIT))
            refused, poll = 0, select.poll()
            by_fd = {sock.fileno(): sock for sock in clients}
            for fd in by_fd:
                poll.register(fd, select.POLLIN)
            expected = 400 - info["max_connections"]
            deadline = time.monotonic() + WAIT
            while refused < expected and time.monotonic() < deadline:
                for fd, _ in poll.poll(max(0.0, deadline - time.monotonic()) * 1000):
                    poll.unregister(fd)
                    refused += by_fd[fd].recv(4096).startswith(b"HTTP/1.1 503 ")
            assert refused == expected, f"{refused} connections got 503, {expected} expected: {info}"
            for sock in clients:
                sock.close()
            page = socket.create_connection(("127.0.0.1", info["port"]), timeout=WAIT)
            with page:
                page.sendall(get_request("/p"))
                answer = b""
                while chunk := page.recv(65536):
                    answer += chunk
            assert status_of(answer) == 200
            server.stdin.write("\n")
            server.stdin.flush()
            messages = json.loads(server.stdout.readline())["messages"]
            assert not [m for m in messages if "descriptor" in m], messages
        finally:
            for sock in clients:
                sock.close()
            server.kill()
            server.wait(WAIT)


def test_server_out_of_descriptors_logs_a_few_lines_and_recovers() -> None:
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


# ==== Shutdown ===============================================================


async def close_then(server: rally.Server, probe: Any) -> Any:
    """``await server.close()``, then ``probe()`` at once in the same task: what was true when close() returned."""
    await server.close()
    return probe()


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
        ws = await RawWs.open(server, route="/block")  # does not answer the server's close frame
        await asyncio.wait_for(entered.wait(), WAIT)
        assert await asyncio.wait_for(close_then(server, cleaned.is_set), WAIT), (
            "Server.close() returned before the handler's finally ran"
        )
    finally:
        if ws is not None:
            ws.writer.transport.abort()
        await asyncio.wait_for(server.close(), 15)


async def test_server_close_returns_after_an_http_rpc_handlers_finally_ran() -> None:
    app = article_app(shutdown_timeout=0.2)
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


async def test_server_close_answers_a_websocket_rpc_in_flight_before_the_1001() -> None:
    app = article_app(shutdown_timeout=5)
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


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes (os.mkfifo) are Unix only")
async def test_static_directory_or_named_pipe_is_404_and_does_not_block_the_server(tmp_path: Any) -> None:
    """Opening a FIFO for reading waits for a writer: the server must not
    wait with it (its event loop would serve no one)."""
    (tmp_path / "hello.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    os.mkfifo(tmp_path / "pipe")
    app = article_app()
    app.static("/static/", tmp_path)
    async with running(app) as server:
        for path in ("/static/pipe", "/static/sub", "/static/hello.txt"):
            response, body = await get(server, path)
            assert (response.status_code, body) == ((200, b"hello") if path.endswith(".txt") else (404, b"not found\n"))


@pytest.mark.parametrize("foreign_first", [False, True], ids=["both-same-origin", "foreign-then-same"])
@pytest.mark.parametrize("target", ["websocket", "rpc"])
async def test_two_origin_headers_are_refused_403(target: str, foreign_first: bool) -> None:
    """Two Origin headers are refused even when one is the server's own: which one counts is ambiguous."""
    async with running(article_app()) as server:
        host = b"127.0.0.1:%d" % server.port
        first = b"http://evil.test" if foreign_first else b"http://" + host
        origins = b"origin: %s\r\norigin: http://%s\r\n" % (first, host)
        if target == "websocket":
            request = upgrade_request("/articles/a", origins)
        else:
            request = rpc_request(envelope("ServerLoadTitle", {"slug": "a"}), origins)
        raw = await exchange(server, with_host(request, host), until_close=False)
    assert status_of(raw) == 403


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


def test_h11_is_only_the_parser_responses_are_valid_http() -> None:
    raw = rally._http_response(200, b"hi", extra=[(b"etag", b'"x"')], keep_alive=True)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    response = conn.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 200
    assert conn.next_event() == h11.Data(data=b"hi")


# ==== Sessions and hosts =====================================================

HEX32 = re.compile(r"[0-9a-f]{32}")


def cookie_value(response: h11.Response) -> bytes | None:
    """The rally_session value of the response's Set-Cookie, if it sets one."""
    values = [v for k, v in response.headers if k == b"set-cookie"]
    if not values:
        return None
    [value] = values
    name, _, rest = value.split(b";")[0].partition(b"=")
    assert name == b"rally_session"
    return rest


def who_app(seen: list[str], **options: Any) -> rally.App:
    """A page that records the session id of each view."""

    class Who:
        def view(server_context: rally.ServerContext) -> str:
            seen.append(server_context.session_id)
            return "<p>who</p>"

    app = rally.App(**options)
    app.page("/who", Who)
    return app


async def issue_cookie(app: rally.App) -> bytes:
    """GET the page of a fresh server of ``app``: the session cookie it sets."""
    async with running(app) as server:
        response, _ = await get(server, "/who")
    value = cookie_value(response)
    assert value is not None
    return value


async def present_cookie(app: rally.App, value: bytes) -> bytes | None:
    """GET the page with ``value``; the fresh cookie the server sets, if any."""
    async with running(app) as server:
        response, _ = await get(server, "/who", b"cookie: rally_session=%s\r\n" % value)
    assert response.status_code == 200
    return cookie_value(response)


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


@pytest.mark.parametrize("value", [1, "yes", None])
def test_secure_cookies_must_be_a_bool(value: object) -> None:
    with pytest.raises(rally.RegistrationError, match=r"App\(secure_cookies=.*\): expected True or False"):
        rally.App(secure_cookies=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["", b"", 42, ["s"]])
def test_secret_must_be_a_non_empty_str_or_bytes(value: object) -> None:
    with pytest.raises(rally.RegistrationError, match=r"App\(secret=\.\.\.\): expected a non-empty str or bytes"):
        rally.App(secret=value)  # type: ignore[arg-type]


async def test_session_cookie_is_opaque_and_the_session_id_is_32_hex() -> None:
    """The cookie carries the session id signed, not the bare id, and an app takes back the cookies it issued."""
    seen: list[str] = []
    app = who_app(seen, secret="k")
    value = await issue_cookie(app)
    assert await present_cookie(app, value) is None
    assert len(seen) == 2 and seen[0] == seen[1] and HEX32.fullmatch(seen[0])
    assert not HEX32.fullmatch(value.decode("latin-1"))
    assert value.decode("latin-1") != seen[0]


@pytest.mark.parametrize("forged", [b"f" * 32, b"0123456789abcdef" * 2], ids=["f32", "hex32"])
async def test_session_unsigned_id_is_not_accepted_on_a_page(forged: bytes) -> None:
    """An unsigned id gets a fresh session and cookie, so a forged cookie cannot fixate a session."""
    seen: list[str] = []
    fresh = await present_cookie(who_app(seen, secret="k"), forged)
    assert fresh is not None and fresh != forged
    assert seen[0] != forged.decode()


async def test_session_forged_cookie_on_two_websockets_gives_two_sessions() -> None:
    """Each WebSocket with a forged cookie gets a session of its own: a session broadcast reaches its sender only."""
    seen: list[str] = []

    class Talk:
        def server_init(server_context: rally.ServerContext) -> tuple[int, rally.Effect[Heard]]:
            seen.append(server_context.session_id)
            return 0, rally.effect.none()

        def server_update(model: int, msg: Say) -> tuple[int, rally.Effect[Heard]]:
            if msg.scope == "session":
                return model, rally.effect.broadcast_to_session(Heard(msg.text))
            return model, rally.effect.send_to_client(Heard(msg.text))

    app = rally.App(secret="k")
    app.page("/talk", Talk)
    forged = b"cookie: rally_session=" + b"f" * 32 + b"\r\n"
    async with running(app) as server:
        one = await RawWs.open(server, "/talk", forged)
        two = await RawWs.open(server, "/talk", forged)
        await eventually(lambda: len(seen) == 2, "both pages initialised")
        one.writer.write(one.send_frame("Say", {"scope": "session", "text": "to my session"}))
        assert [json.loads(t)["msg"]["fields"]["text"] for t in await one.texts(1)] == ["to my session"]
        # Had the session broadcast reached two, it was written before this answer.
        two.writer.write(two.send_frame("Say", {"scope": "client", "text": "just me"}))
        assert [json.loads(t)["msg"]["fields"]["text"] for t in await two.texts(1)] == ["just me"]
        one.close()
        two.close()
    assert seen[0] != seen[1] and "f" * 32 not in seen
    assert b"set-cookie" in one.head.lower() and b"set-cookie" in two.head.lower()


@pytest.mark.parametrize("secret", ["a str secret", b"a bytes secret"], ids=["str", "bytes"])
async def test_session_cookie_is_accepted_by_an_app_with_the_same_secret_only(secret: str | bytes) -> None:
    seen: list[str] = []
    value = await issue_cookie(who_app(seen, secret=secret))
    assert await present_cookie(who_app(seen, secret=secret), value) is None
    assert seen[0] == seen[1]
    assert await present_cookie(who_app(seen, secret="another secret"), value) is not None
    assert seen[2] != seen[0]


async def test_session_secret_defaults_to_the_rally_secret_environment_variable(monkeypatch: Any) -> None:
    monkeypatch.setenv("RALLY_SECRET", "from the environment")
    seen: list[str] = []
    value = await issue_cookie(who_app(seen))
    assert await present_cookie(who_app(seen, secret="from the environment"), value) is None
    assert await present_cookie(who_app(seen, secret="something else"), value) is not None
    assert seen[0] == seen[1] != seen[2]


def host_request(kind: str, host: bytes) -> bytes:
    """A page GET, an RPC or a WebSocket handshake for ``host``, with an Origin on the same host."""
    origin = b"origin: http://%s\r\n" % host
    if kind == "page":
        request = get_request("/articles/a", origin)
    elif kind == "rpc":
        request = rpc_request(envelope("ServerLoadTitle", {"slug": "a"}), origin)
    else:
        request = upgrade_request("/articles/a", origin)
    return with_host(request, host)


ADMITTED = {"page": 200, "rpc": 200, "websocket": 101}


@pytest.mark.parametrize("kind", ["page", "rpc", "websocket"])
@pytest.mark.parametrize(
    "host", ["evil.example:{port}", "evil.example", "localhost.evil.example:{port}", "127.0.0.1.evil.example"]
)
async def test_host_foreign_name_on_a_loopback_listener_is_refused_with_400(kind: str, host: str) -> None:
    """A loopback listener serves only loopback Host names, so a page of a rebound DNS name cannot reach it."""
    async with running(article_app()) as server:
        raw = await exchange(server, host_request(kind, host.format(port=server.port).encode()), until_close=False)
    assert status_of(raw) == 400


@pytest.mark.parametrize("kind", ["page", "rpc", "websocket"])
@pytest.mark.parametrize("host", ["localhost", "localhost:{port}", "127.0.0.1", "127.0.0.1:1", "[::1]", "[::1]:{port}"])
async def test_host_loopback_names_are_admitted_on_a_loopback_listener(kind: str, host: str) -> None:
    """Loopback names are admitted on any port."""
    async with running(article_app()) as server:
        raw = await exchange(server, host_request(kind, host.format(port=server.port).encode()), until_close=False)
    assert status_of(raw) == ADMITTED[kind]


@pytest.mark.parametrize("kind", ["page", "rpc", "websocket"])
@pytest.mark.parametrize(
    ("allowed", "host"),
    [(["evil.example"], "evil.example:{port}"), (["*"], "anything.example:{port}")],
    ids=["listed", "star"],
)
async def test_host_allowed_hosts_admits_the_hosts_it_lists(kind: str, allowed: list[str], host: str) -> None:
    async with running(article_app(allowed_hosts=allowed)) as server:
        raw = await exchange(server, host_request(kind, host.format(port=server.port).encode()), until_close=False)
    assert status_of(raw) == ADMITTED[kind]


# ==== Idempotent RPCs ========================================================


async def session_cookie(server: rally.Server, page: str) -> bytes:
    """A ``cookie:`` header line with the session a GET of ``page`` sets."""
    head = b"GET %s HTTP/1.1\r\nhost: localhost\r\n\r\n" % page.encode()
    [(response, _)] = responses(await exchange(server, head, until_close=False))
    return b"cookie: " + dict(response.headers)[b"set-cookie"].split(b";")[0] + b"\r\n"


def keyed_rpc(msg_type: str, fields: dict[str, Any], msg_id: Any, key: str) -> str:
    return json.dumps({"kind": "rpc", "id": msg_id, "key": key, "msg": {"type": msg_type, "fields": fields}})


async def test_a_keyed_rpc_read_with_the_close_frame_runs_once_and_answers_its_retry() -> None:
    """The RPC frame and the close frame arrive in one read: the page's
    session ends before the call's task ever ran. The call still runs, once,
    and a retry over HTTP gets its answer."""
    app, journal = journal_app()
    async with running(app) as server:
        cookie = await session_cookie(server, "/journal")
        ws = await RawWs.open(server, "/journal", cookie)
        try:
            burst = ws.ws.send(wsproto.events.TextMessage(data=keyed_rpc("Ask", {"question": "q"}, 1, "k1")))
            burst += ws.ws.send(wsproto.events.CloseConnection(1000))
            ws.writer.write(burst)  # one write: the server reads both at once
            assert await ws.close_code() == 1000
        finally:
            ws.close()
        await journal.until(lambda: journal.asked == ["q"])  # the first call runs though its page is gone
        journal.release.set()
        retry = rpc_request(keyed_rpc("Ask", {"question": "q"}, 2, "k1").encode(), cookie)
        [(response, body)] = responses(await exchange(server, retry, until_close=False))
        assert (response.status_code, json.loads(body)) == (200, {"kind": "ok", "id": 2, "value": "answer to q"})
    assert journal.asked == ["q"]


@dataclass
class Echo:
    text: str


async def test_cookie_less_keyed_rpcs_keep_nothing_and_evict_no_sessions_answer() -> None:
    """10 001 keyed RPCs without a session cookie (past the 10 000 answers
    kept in all) leave a session's kept answer alone: its retry runs nothing."""
    app, journal = journal_app()
    journal.release.set()

    @app.rpc
    def server_echo(msg: Echo) -> str:
        return msg.text

    async with running(app) as server:
        cookie = await session_cookie(server, "/journal")
        first = rpc_request(keyed_rpc("Ask", {"question": "q"}, 1, "k1").encode(), cookie)
        assert json.loads(responses(await exchange(server, first, until_close=False))[0][1])["value"] == "answer to q"
        flood = b"".join(rpc_request(keyed_rpc("Echo", {"text": "x"}, i, f"k{i}").encode()) for i in range(10_001))
        flood += rpc_request(keyed_rpc("Echo", {"text": "last"}, 0, "k0").encode(), b"connection: close\r\n")
        answered = responses(await exchange(server, flood))
        assert len(answered) == 10_002 and all(r.status_code == 200 for r, _ in answered)
        retry = rpc_request(keyed_rpc("Ask", {"question": "q"}, 2, "k1").encode(), cookie)
        [(response, body)] = responses(await exchange(server, retry, until_close=False))
        assert (response.status_code, json.loads(body)) == (200, {"kind": "ok", "id": 2, "value": "answer to q"})
        assert journal.asked == ["q"]
        assert app._registry.answers.count == 1  # the session's one answer; none for one-shot sessions


async def test_a_key_reused_with_another_message_is_answered_422_key_reused_over_http_and_the_page() -> None:
    app, journal = journal_app()
    journal.release.set()
    async with running(app) as server:
        cookie = await session_cookie(server, "/journal")
        first = rpc_request(keyed_rpc("Ask", {"question": "q"}, 1, "k1").encode(), cookie)
        assert json.loads(responses(await exchange(server, first, until_close=False))[0][1])["value"] == "answer to q"
        other = rpc_request(keyed_rpc("Ask", {"question": "other"}, 2, "k1").encode(), cookie)
        [(response, body)] = responses(await exchange(server, other, until_close=False))
        assert response.status_code == 422
        assert json.loads(body) == {
            "kind": "error",
            "id": 2,
            "code": "key_reused",
            "errors": [{"path": "key", "message": "this key was used for another message in this session"}],
        }
        ws = await RawWs.open(server, "/journal", cookie)
        try:
            ws.writer.write(ws.ws.send(wsproto.events.TextMessage(data=keyed_rpc("Echo", {"text": "q"}, 3, "k1"))))
            [text] = await ws.texts(1)
            assert json.loads(text)["code"] == "key_reused"
            ws.writer.write(ws.ws.send(wsproto.events.TextMessage(data=keyed_rpc("Ask", {"question": "q"}, 4, "k1"))))
            assert json.loads((await ws.texts(1))[0]) == {"kind": "ok", "id": 4, "value": "answer to q"}
        finally:
            ws.close()
    assert journal.asked == ["q"]


async def test_server_close_awaits_and_cancels_a_keyed_rpc_that_outlived_its_page() -> None:
    app = article_app(shutdown_timeout=0.2)
    entered, cancelled, never = asyncio.Event(), asyncio.Event(), asyncio.Event()

    @app.rpc
    async def server_slow(msg: Slow) -> str:
        entered.set()
        try:
            await never.wait()
        finally:
            cancelled.set()
        return "never"

    server = await app.start("127.0.0.1", 0, access_log=False)
    try:
        cookie = await session_cookie(server, "/articles/a")
        ws = await RawWs.open(server, "/articles/a", cookie)
        try:
            burst = ws.ws.send(wsproto.events.TextMessage(data=keyed_rpc("Slow", {"seconds": 0}, 1, "k1")))
            ws.writer.write(burst + ws.ws.send(wsproto.events.CloseConnection(1000)))
            assert await ws.close_code() == 1000
        finally:
            ws.close()
        await asyncio.wait_for(entered.wait(), WAIT)
        assert app._registry.answers.tasks  # the store's, not the page's: it outlived the page
    finally:
        await asyncio.wait_for(server.close(), 15)
    assert cancelled.is_set() and not app._registry.answers.tasks


# ==== Configuration and misuse ===============================================

INT_LIMITS = [
    "max_head_bytes",
    "max_headers",
    "max_body_bytes",
    "max_message_bytes",
    "max_json_depth",
    "max_string_chars",
    "max_array_items",
    "max_object_entries",
    "max_outgoing_bytes",
    "max_connections",
    "max_pending_messages",
    "max_concurrent_rpcs",
]
TIMEOUTS = [
    "header_timeout",
    "body_timeout",
    "keepalive_timeout",
    "ping_interval",
    "pong_timeout",
    "close_timeout",
    "handler_timeout",
    "shutdown_timeout",
    "send_timeout",
]


def test_default_max_concurrent_rpcs_is_a_positive_int() -> None:
    assert type(rally.DEFAULT_MAX_CONCURRENT_RPCS) is int and rally.DEFAULT_MAX_CONCURRENT_RPCS >= 1


@pytest.mark.parametrize("name", INT_LIMITS, ids=INT_LIMITS)
def test_every_count_limit_must_be_at_least_one(name: str) -> None:
    with pytest.raises(rally.RegistrationError):
        rally.App(**{name: 0})
    rally.App(**{name: 1})


@pytest.mark.parametrize("value", [0, -1.0], ids=["zero", "negative"])
@pytest.mark.parametrize("name", TIMEOUTS, ids=TIMEOUTS)
def test_every_time_out_must_be_positive(name: str, value: float) -> None:
    with pytest.raises(rally.RegistrationError):
        rally.App(**{name: value})
    rally.App(**{name: 0.001})


def test_usage_error_is_a_rally_error_and_a_type_error_and_registration_error_is_one() -> None:
    assert issubclass(rally.UsageError, rally.RallyError) and issubclass(rally.UsageError, TypeError)
    assert issubclass(rally.RegistrationError, rally.UsageError)
    with pytest.raises(rally.UsageError):
        rally.App().page("no-slash", type("P", (), {}))


async def test_broadcast_of_a_type_that_is_no_push_type_raises_usage_error() -> None:
    app = room_app()
    async with running(app):
        with pytest.raises(rally.UsageError, match="NotAPush"):
            await app.broadcast_to_app(NotAPush(1))


def test_threadsafe_broadcast_on_an_app_that_is_not_serving_raises_usage_error() -> None:
    with pytest.raises(rally.UsageError):
        room_app().broadcast_to_app_threadsafe(Heard("nobody listens"))


@pytest.mark.parametrize("url", ["ftp://x", "http://", "http://x/app", "http://x:1/?a=1", "http://x#top"])
def test_client_of_a_url_that_is_not_a_servers_raises_usage_error(url: str) -> None:
    with pytest.raises(rally.UsageError, match="expected"):
        rally.Client(url)


def test_client_takes_a_servers_url_with_or_without_its_slash() -> None:
    assert rally.Client("http://x:1/").port == rally.Client("http://x:1").port == 1


# ==== Python client ==========================================================


class FakeServer:
    """A tiny WebSocket server on 127.0.0.1 whose test gives the coroutine that serves one connection."""

    def __init__(self, serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.serve = serve
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.tasks.add(task)  # type: ignore[arg-type]
            try:
                await self.serve(reader, writer)
            finally:
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=WAIT)
        await self.server.wait_closed()


async def read_until_eof(reader: asyncio.StreamReader) -> None:
    """Read and drop until the peer closes."""
    while await reader.read(65536):
        pass


async def answer_close(ws: wsproto.WSConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Read until the client's close frame, answer it, and return its code."""
    while data := await reader.read(65536):
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, wsproto.events.CloseConnection):
                writer.write(ws.send(event.response()))
                return event.code
    raise AssertionError("the client closed without a close frame")


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """Read one request with a Content-Length (as the Client writes them); its head."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"content-length: (\d+)", head, re.I)
    assert length is not None
    await reader.readexactly(int(length.group(1)))
    return head


async def accept_ws(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> wsproto.WSConnection:
    """Answer the client's handshake with a wsproto server connection."""
    ws = wsproto.WSConnection(wsproto.connection.ConnectionType.SERVER)
    while True:
        data = await reader.read(65536)
        ws.receive_data(data or None)
        for event in ws.events():
            if isinstance(event, wsproto.events.Request):
                writer.write(ws.send(wsproto.events.AcceptConnection()))
                return ws
        assert data, "client closed during the handshake"


async def test_client_page_rpc_that_times_out_or_is_cancelled_forgets_its_id() -> None:
    """A page RPC that times out or is cancelled leaves no waiter behind, and the page goes on."""
    gate = asyncio.Event()
    started: list[int] = []
    app = article_app()

    @app.rpc
    async def server_hang(msg: Hang) -> int:
        started.append(1)
        await gate.wait()
        return 1

    async with running(app) as server, rally.Client(server.url, app, timeout=1.0) as client:
        async with client.page("/articles/a") as page:
            with pytest.raises((TimeoutError, asyncio.TimeoutError)):
                await page.rpc(Hang())
            assert page._waiting == {}
            call = asyncio.ensure_future(page.rpc(Hang()))
            await eventually(lambda: len(started) == 2, "second call running")
            call.cancel()
            await asyncio.wait({call}, timeout=WAIT)
            assert call.cancelled()
            assert page._waiting == {}
            gate.set()
            assert await page.rpc(ServerLoadTitle("x")) == rally.Ok("Article: x")
            assert page._waiting == {}


async def test_client_http_rpc_that_times_out_leaves_its_late_answer_to_no_other_call() -> None:
    """An HTTP call given up mid-response drops its connection: the next
    call, on a new one, gets its own answer, not the late one."""
    gate = asyncio.Event()
    started = asyncio.Event()
    app = article_app()

    @app.rpc
    async def server_hang(msg: Hang) -> str:
        started.set()
        await gate.wait()
        return "late"

    async with running(app) as server, rally.Client(server.url, app, timeout=0.5) as client:
        assert await client.rpc(ServerLoadTitle("warm")) == rally.Ok("Article: warm")  # a keep-alive connection
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            await client.rpc(Hang())
        assert started.is_set()
        gate.set()
        assert await client.rpc(ServerLoadTitle("mine")) == rally.Ok("Article: mine")


@pytest.mark.parametrize("name", ["max_message_bytes", "max_queued_sends", "max_unread_messages"])
def test_client_bounds_must_be_positive_ints(name: str) -> None:
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(rally.UsageError, match=f"{name}="):
            rally.Client("http://127.0.0.1", **{name: bad})
    assert getattr(rally.Client("http://127.0.0.1", **{name: 1}), name) == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("extra", [0, 1], ids=["N", "N+1"])
async def test_client_http_response_body_at_max_message_bytes_and_over(chunked: bool, extra: int) -> None:
    """A body of max_message_bytes is read; one byte more raises too_large
    before the body is held, and the connection is not used again."""
    limit = 100_000
    body = b"x" * (limit + extra)
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            if b" /small " in head:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            elif chunked:
                pieces = [body[i : i + 30_000] for i in range(0, len(body), 30_000)]
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                writer.write(b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    async with FakeServer(serve) as url, rally.Client(url, timeout=WAIT, max_message_bytes=limit) as client:
        if extra:
            with pytest.raises(rally.RemoteError) as refused:
                await client.request("GET", "/big")
            assert refused.value.code == "too_large" and refused.value.status == 200
            assert f"max_message_bytes ({limit} bytes)" in str(refused.value)
            assert client._streams is None
        else:
            status, _, got = await client.request("GET", "/big")
            assert (status, got) == (200, body)
        assert (await client.request("GET", "/small"))[2] == b"ok"
        assert len(connections) == 1 + extra


@pytest.mark.parametrize("reason", [b"OK", b"O\tK"], ids=["fast-path", "h11"])
async def test_client_head_response_announcing_a_body_over_max_message_bytes_is_read(reason: bytes) -> None:
    """A HEAD's Content-Length announces a body that never comes: no refusal."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 %s\r\ncontent-length: 1000000\r\n\r\n" % reason)

    async with FakeServer(serve) as url, rally.Client(url, timeout=WAIT, max_message_bytes=100) as client:
        for _ in range(2):  # and the connection goes on
            status, headers, body = await client.request("HEAD", "/big")
            assert (status, headers["content-length"], body) == (200, "1000000", b"")


@pytest.mark.parametrize("limit", [100, 200_000], ids=["one-read", "in-pieces"])
async def test_client_page_message_at_max_message_bytes_and_over(limit: int) -> None:
    """A page message of max_message_bytes arrives; one byte more closes the
    page with 1009, as the server closes a browser's."""
    close_codes: list[int] = []
    closed_seen = asyncio.Event()

    def push(size: int) -> str:
        text = '{"kind":"push","msg":{"type":"Blob","fields":{}}}'
        return text + " " * (size - len(text))  # JSON allows the padding: exactly ``size`` bytes

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ws = await accept_ws(reader, writer)
        writer.write(ws.send(wsproto.events.TextMessage(data='{"kind":"hello"}')))
        writer.write(ws.send(wsproto.events.TextMessage(data=push(limit))))
        writer.write(ws.send(wsproto.events.TextMessage(data=push(limit + 1))))
        close_codes.append(await answer_close(ws, reader, writer))
        closed_seen.set()

    async with FakeServer(serve) as url, rally.Client(url, timeout=WAIT, max_message_bytes=limit) as client:
        async with client.page("/x") as page:
            assert await page.receive() == {"type": "Blob", "fields": {}}
            with pytest.raises(rally.ConnectionClosed) as closed:
                await page.receive()
            assert closed.value.code == 1009 and f"larger than {limit} bytes" in closed.value.reason
            await asyncio.wait_for(page.wait_closed(), WAIT)
        await asyncio.wait_for(closed_seen.wait(), WAIT)  # the server read the close frame
        assert close_codes == [1009]


def push_frame(n: int) -> str:
    return json.dumps({"kind": "push", "msg": {"type": "Numbered", "fields": {"n": n}}})


@pytest.mark.parametrize("count", [3, 4], ids=["N-1", "N"])
async def test_client_page_stops_reading_at_max_unread_messages_and_loses_nothing(count: int) -> None:
    """With max_unread_messages pushes unread the page stops reading its
    connection; receive() makes room, and every push arrives once, in order."""
    limit = 4
    more = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ws = await accept_ws(reader, writer)
        frames = [ws.send(wsproto.events.TextMessage(data=push_frame(n))) for n in range(1, count + 1)]
        writer.write(ws.send(wsproto.events.TextMessage(data='{"kind":"hello"}')) + b"".join(frames))
        await more.wait()
        writer.write(ws.send(wsproto.events.TextMessage(data=push_frame(count + 1))))
        await answer_close(ws, reader, writer)

    async with FakeServer(serve) as url, rally.Client(url, timeout=WAIT, max_unread_messages=limit) as client:
        async with client.page("/x") as page:
            assert page._writer is not None
            transport = page._writer.transport
            await eventually(lambda: page._inbox.qsize() == count, f"{count} pushes read")
            assert transport.is_reading() is (count < limit)
            if count == limit:  # an answer cannot be read now, and the time-out says why
                with pytest.raises(asyncio.TimeoutError, match=r"4 messages wait unread .*max_unread_messages"):
                    await page.send(Hang(), timeout=0.2)
            more.set()
            if count < limit:
                await eventually(lambda: page._inbox.qsize() == limit, "the last push read")
                assert not transport.is_reading()  # the bound reached with the last push
            got = [await page.receive()]  # room for one: reading goes on
            await eventually(lambda: page._inbox.qsize() == count, "the push after the pause read")
            got += [await page.receive() for _ in range(count)]
            assert [msg["fields"]["n"] for msg in got] == list(range(1, count + 2))
            assert transport.is_reading()


@pytest.mark.parametrize("extra", [0, 1], ids=["N", "N+1"])
async def test_client_page_keeps_at_most_max_unread_messages_presence_lists(extra: int) -> None:
    limit = 3

    def presence(n: int) -> str:
        return json.dumps({"kind": "presence", "state": [{"id": n, "tag": "t", "meta": n, "self": False}]})

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ws = await accept_ws(reader, writer)
        texts = ['{"kind":"hello"}'] + [presence(n) for n in range(1, limit + extra + 1)] + [push_frame(0)]
        writer.write(b"".join(ws.send(wsproto.events.TextMessage(data=text)) for text in texts))
        await answer_close(ws, reader, writer)

    async with FakeServer(serve) as url, rally.Client(url, timeout=WAIT, max_unread_messages=limit) as client:
        async with client.page("/x") as page:
            assert (await page.receive())["fields"] == {"n": 0}  # every presence frame before it was read
            assert [p.id for p in page.presence] == [limit + extra]
            lists = [await page.next_presence() for _ in range(limit)]
            assert [p.id for [p] in lists] == list(range(1 + extra, limit + extra + 1))  # past N, the oldest went


async def test_client_page_misuse_raises_usage_error_and_leaves_the_page_working() -> None:
    app = article_app()
    async with running(app) as server, rally.Client(server.url, app, timeout=WAIT) as client:
        page = client.page("/articles/a")
        with pytest.raises(rally.UsageError, match="not connected"):
            await page.rpc(ServerLoadTitle("x"))
        with pytest.raises(rally.UsageError, match="not connected"):
            await page.send_raw("{}")
        async with page:
            with pytest.raises(rally.UsageError, match="connected already"):
                await page.connect()
            assert await page.rpc(ServerLoadTitle("x")) == rally.Ok("Article: x")
            assert app.connections("/articles/a") == 1  # the second connect opened nothing


async def test_client_rpc_answered_by_something_else_raises_remote_error_with_the_status() -> None:
    """A proxy's error page instead of an answer is a RemoteError that says so, not a ContractError."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: 14\r\n\r\n<h1>down</h1>\n"
        )
        await read_until_eof(reader)

    async with FakeServer(serve) as url, rally.Client(url, timeout=WAIT) as client:
        with pytest.raises(rally.RemoteError) as failed:
            await client.rpc(Hang())
    assert failed.value.code == "invalid" and failed.value.status == 502
    assert "bad JSON" in str(failed.value) and "(HTTP 502)" in str(failed.value)


async def test_client_http_call_after_the_server_closed_its_idle_connection_goes_on_a_new_one() -> None:
    app = article_app(keepalive_timeout=0.1)
    async with running(app) as server, rally.Client(server.url, app, timeout=WAIT) as client:
        assert await client.rpc(ServerLoadTitle("first")) == rally.Ok("Article: first")
        assert client._streams is not None
        idle = client._streams[0]
        assert await asyncio.wait_for(idle.read(1), WAIT) == b""  # the server closed it
        assert await client.rpc(ServerLoadTitle("again")) == rally.Ok("Article: again")
        assert client._streams is not None and client._streams[0] is not idle


@pytest.mark.parametrize(
    "body, where",
    [
        (b"[]", "expected a reply object, got array"),
        (b'{"kind":"ok","id":1,"value":5}', "value: expected str, got int"),
        (b'{"kind":"maybe","id":1}', "kind: unexpected reply"),
    ],
    ids=["not-an-object", "wrong-type", "unknown-kind"],
)
async def test_client_rpc_answer_that_breaks_the_contract_is_a_remote_error(body: bytes, where: str) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await read_until_eof(reader)

    async with FakeServer(serve) as url, rally.Client(url, article_app(), timeout=WAIT) as client:
        with pytest.raises(rally.RemoteError) as failed:
            await client.rpc(ServerLoadTitle("x"))
    assert failed.value.code == "invalid" and failed.value.status == 200
    assert where in str(failed.value)


async def test_client_page_answers_pings_and_refuses_a_handshake_with_a_wrong_accept() -> None:
    pongs: list[bytes] = []
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        if len(connections) == 2:  # a 101 whose accept answers another key
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
            )
            await read_until_eof(reader)
            return
        ws = await accept_ws(reader, writer)
        writer.write(ws.send(wsproto.events.Ping(payload=b"are you there")))
        while not pongs and (data := await reader.read(65536)):
            ws.receive_data(data)
            pongs.extend(bytes(e.payload) for e in ws.events() if isinstance(e, wsproto.events.Pong))
        writer.write(ws.send(wsproto.events.TextMessage(data=push_frame(1))))
        await answer_close(ws, reader, writer)

    async with FakeServer(serve) as url, rally.Client(url, timeout=WAIT) as client:
        async with client.page("/x") as page:
            assert (await page.receive())["fields"] == {"n": 1}  # sent once the pong arrived
        assert pongs == [b"are you there"]
        with pytest.raises(rally.RemoteError, match="bad Sec-WebSocket-Accept") as refused:
            await client.page("/x").connect()
        assert refused.value.status == 101


async def test_client_page_reports_frames_that_break_the_contract_and_goes_on() -> None:
    """A push whose fields do not decode and a presence frame that is not
    one are each reported once by receive(); a frame numbered again is
    dropped; ``async for`` then iterates the rest until the close."""
    texts = [
        '{"kind":"hello"}',
        '{"kind":"push","seq":1,"msg":{"type":"CommentSaved","fields":{"body":7}}}',
        '{"kind":"presence","seq":2,"state":[{"id":1}]}',
        '{"kind":"push","seq":3,"msg":{"type":"CommentSaved","fields":{"body":"kept"}}}',
        '{"kind":"push","seq":3,"msg":{"type":"CommentSaved","fields":{"body":"numbered again"}}}',
        '{"kind":"push","seq":4,"msg":{"type":"FavoriteToggled","fields":{"article_id":2}}}',
    ]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ws = await accept_ws(reader, writer)
        writer.write(b"".join(ws.send(wsproto.events.TextMessage(data=text)) for text in texts))
        writer.write(ws.send(wsproto.events.CloseConnection(code=1000)))
        await read_until_eof(reader)

    async with FakeServer(serve) as url, rally.Client(url, article_app(), timeout=WAIT) as client:
        async with client.page("/articles/a") as page:
            with pytest.raises(rally.RemoteError, match=r"msg\.fields\.body: expected str, got int"):
                await page.receive()
            with pytest.raises(rally.RemoteError, match="bad presence frame"):
                await page.receive()
            assert [msg async for msg in page] == [CommentSaved("kept"), FavoriteToggled(2)]
            assert page.close_code == 1000


@pytest.mark.parametrize("failure", ["time-out", "garbage", "cancelled"])
async def test_client_page_connect_closes_its_socket_when_the_handshake_fails(failure: str) -> None:
    got_request = asyncio.Event()
    eof = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got_request.set()
        if failure == "garbage":
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await read_until_eof(reader)
        eof.set()

    async with FakeServer(serve) as url, rally.Client(url, timeout=0.5) as client:
        page = client.page("/x")
        outcome: Any
        if failure == "time-out":
            with pytest.raises((TimeoutError, asyncio.TimeoutError)) as outcome:
                await page.connect()
        elif failure == "garbage":
            with pytest.raises(h11.RemoteProtocolError) as outcome:
                await page.connect()
        else:
            outcome = asyncio.ensure_future(page.connect())
            await asyncio.wait_for(got_request.wait(), WAIT)
            outcome.cancel()
            await asyncio.wait({outcome}, timeout=WAIT)
            assert outcome.cancelled()
        # ``outcome`` holds the traceback and so connect()'s frame: the socket
        # is closed by the Client, not by the garbage collector.
        await asyncio.wait_for(eof.wait(), WAIT)
        assert outcome is not None


async def test_client_page_close_in_a_cancelled_task_cleans_up_and_stays_cancelled() -> None:
    """close() in a task that is cancelled still closes the socket, and the task's CancelledError goes on up."""
    close_seen = asyncio.Event()
    eof = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ws = await accept_ws(reader, writer)
        while data := await reader.read(65536):  # never answers the close frame
            ws.receive_data(data)
            if any(isinstance(e, wsproto.events.CloseConnection) for e in ws.events()):
                close_seen.set()
        eof.set()

    async with FakeServer(serve) as url, rally.Client(url, timeout=30) as client:
        page = client.page("/x")
        await page.connect()
        closing = asyncio.ensure_future(page.close())
        await asyncio.wait_for(close_seen.wait(), WAIT)
        closing.cancel()
        await asyncio.wait({closing}, timeout=WAIT)
        assert closing.cancelled()
        await asyncio.wait_for(eof.wait(), WAIT)
        assert page._reader_task is not None
        await eventually(page._reader_task.done, "reader task finished")


BAD_FRAMES = ["[1]", '"x"', "not json", "{", '{"kind": "push"}', '{"kind": "push", "msg": 1}']


async def test_client_frame_that_is_not_an_envelope_is_reported_and_the_connection_goes_on() -> None:
    """receive() raises each frame that is not an envelope as an ``invalid`` RemoteError; the page stays open."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ws = await accept_ws(reader, writer)
        for text in [*BAD_FRAMES, '{"kind": "ok", "id": [1]}']:
            writer.write(ws.send(wsproto.events.Message(data=text)))
        push = {"kind": "push", "msg": {"type": "Heard", "fields": {"text": "after"}}}
        writer.write(ws.send(wsproto.events.Message(data=json.dumps(push))))
        while data := await reader.read(65536):  # echo each client message back as a push
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, wsproto.events.TextMessage):
                    echo = {"kind": "push", "msg": {"type": "Heard", "fields": {"text": event.data}}}
                    writer.write(ws.send(wsproto.events.Message(data=json.dumps(echo))))
                elif isinstance(event, wsproto.events.CloseConnection):
                    writer.write(ws.send(event.response()))

    async with FakeServer(serve) as url, rally.Client(url, timeout=WAIT) as client:
        async with client.page("/x") as page:
            for _ in BAD_FRAMES:
                with pytest.raises(rally.RemoteError) as info:
                    await page.receive()
                assert info.value.code == "invalid"
            assert await page.receive() == {"type": "Heard", "fields": {"text": "after"}}
            await page.send_raw("still here")
            assert await page.receive() == {"type": "Heard", "fields": {"text": "still here"}}
        assert page.close_code == 1000


# ==== Page lifecycle: ends that leave nothing behind ==========================


@dataclass
class Shout:
    size: int


@dataclass
class Echoed:
    text: str


@dataclass
class Loudness:
    shouts: int


class LoudPage:
    """A page whose sends push ``size`` bytes to the whole page and count in its presence."""

    @staticmethod
    def server_init() -> tuple[int, rally.Effect[Echoed]]:
        return 0, rally.effect.subscribe("loud")

    @staticmethod
    async def server_update(
        model: int, msg: Shout, server_context: rally.ServerContext
    ) -> tuple[int, rally.Effect[Echoed]]:
        if msg.size < 0:  # the page logs its own session out in the middle of its update
            await server_context.state.close_session(server_context.session_id)
            return model + 1, rally.effect.subscribe("after")
        return model + 1, rally.effect.broadcast_to_page(Echoed("x" * msg.size))

    @staticmethod
    def server_presence(model: int) -> Loudness:
        return Loudness(model)


def loud_app(**options: Any) -> rally.App:
    app = rally.App(**options)
    app.state = app
    app.page("/loud", LoudPage)
    return app


async def test_a_page_dropped_as_a_slow_consumer_by_its_own_effect_leaves_presence_and_topics() -> None:
    app = loud_app(max_outgoing_bytes=64 * 1024)
    async with running(app) as server:
        ws = await RawWs.open(server, "/loud", rcvbuf=4096)
        await eventually(lambda: len(app.presence("/loud")) == 1, "listed")
        ws.writer.transport.pause_reading()  # it sends once, then stops reading
        ws.writer.write(ws.send_frame("Shout", {"size": 8_000_000}))  # more than the kernel's buffers take
        await eventually(lambda: not server.conns, "dropped as a slow consumer")
        await eventually(lambda: app.presence("/loud") == [], "its presence entry gone")
        await eventually(lambda: not app._registry.topics.members, "out of every topic")
        ws.writer.close()


async def test_a_page_that_closes_its_own_session_in_server_update_leaves_presence_and_topics() -> None:
    app = loud_app()
    async with running(app) as server:
        ws = await RawWs.open(server, "/loud")
        await eventually(lambda: len(app.presence("/loud")) == 1, "listed")
        ws.send(
            wsproto.events.TextMessage(
                data=json.dumps({"kind": "send", "msg": {"type": "Shout", "fields": {"size": -1}}})
            )
        )
        await eventually(lambda: app.presence("/loud") == [], "its presence entry gone")
        await eventually(lambda: not app._registry.topics.members, "out of every topic, the one joined after too")
        ws.writer.close()


async def test_a_page_lost_during_shutdown_ends_before_the_lifespan_exits() -> None:
    order: list[str] = []
    started, release = asyncio.Event(), asyncio.Event()

    @dataclass
    class Hold: ...

    class Held:
        @staticmethod
        def server_init() -> tuple[int, rally.Effect[Echoed]]:
            return 0, rally.effect.none()

        @staticmethod
        def server_update(model: int, msg: Shout) -> tuple[int, rally.Effect[Echoed]]:
            return model, rally.effect.none()

        @staticmethod
        def server_terminate(model: int) -> rally.Effect[Echoed]:
            order.append("terminate")
            return rally.effect.none()

    @contextlib.asynccontextmanager
    async def lifespan(app: rally.App) -> AsyncIterator[None]:
        yield
        order.append("lifespan exit")

    app = rally.App(lifespan=lifespan, shutdown_timeout=WAIT)
    app.page("/held", Held)

    @app.rpc
    async def server_hold(msg: Hold) -> str:
        started.set()
        await release.wait()
        return "held"

    server = await app.start(port=0)
    try:
        ws = await RawWs.open(server, "/held&last=0")  # a page that may resume
        ws.writer.write(ws.rpc_frame("Hold", {}, 1))
        await asyncio.wait_for(started.wait(), WAIT)
        closing = asyncio.ensure_future(server.close())  # waits for the RPC in flight
        await eventually(lambda: server.closing, "shutting down")
        ws.writer.transport.abort()  # the page is lost meanwhile, with no closing handshake
        await eventually(lambda: not server.conns, "its connection gone")
        release.set()
        await asyncio.wait_for(closing, WAIT)
    finally:
        release.set()
        await server.close()
    assert order == ["terminate", "lifespan exit"]


class Quiet:
    """A page whose sends change the model and push nothing."""

    @staticmethod
    def server_init() -> tuple[int, rally.Effect[Echoed]]:
        return 0, rally.effect.none()

    @staticmethod
    def server_update(model: int, msg: Shout) -> tuple[int, rally.Effect[Echoed]]:
        return model + 1, rally.effect.none()


async def test_a_page_that_only_sends_can_still_resume_after_many_sends() -> None:
    import websockets

    app = rally.App(max_outgoing_bytes=4096)
    app.page("/quiet", Quiet)
    async with running(app) as server:
        url = f"ws://127.0.0.1:{server.port}/_rally/ws?page=/quiet&last=0"
        async with websockets.connect(url) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            cookie = {"cookie": ws.response.headers["set-cookie"].split(";")[0]}
            for seq in range(1, 501):  # 500 acks: about 12 KB, three times max_outgoing_bytes
                await ws.send(json.dumps({"kind": "send", "seq": seq, "msg": {"type": "Shout", "fields": {"size": 0}}}))
            for seq in range(1, 501):
                assert json.loads(await asyncio.wait_for(ws.recv(), WAIT)) == {"kind": "ack", "seq": seq}
            ws.transport.abort()  # type: ignore[attr-defined]
        await eventually(lambda: not server.conns, "lost")
        async with websockets.connect(f"{url}&resume={hello['resume']}", additional_headers=cookie) as ws:
            again = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            assert (again["resumed"], again["ack"]) == (True, 500)


async def test_a_held_page_on_a_busy_presence_page_can_still_resume() -> None:
    import websockets

    app = loud_app(max_outgoing_bytes=2048)
    async with running(app) as server:
        url = f"ws://127.0.0.1:{server.port}/_rally/ws?page=/loud&last=0"
        async with websockets.connect(url) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            state = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            assert [e["self"] for e in state["state"]] == [True]
            cookie = {"cookie": ws.response.headers["set-cookie"].split(";")[0]}
            ws.transport.abort()  # type: ignore[attr-defined]
        await eventually(lambda: not server.conns, "held")
        for _ in range(40):  # others come and go: 80 presence diffs, several times max_outgoing_bytes
            async with websockets.connect(url) as other:
                await asyncio.wait_for(other.recv(), WAIT)
                await asyncio.wait_for(other.recv(), WAIT)
        last = state["seq"]
        async with websockets.connect(f"{url[:-1]}{last}&resume={hello['resume']}", additional_headers=cookie) as ws:
            again = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            assert again["resumed"] is True
            fresh = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            assert [e["self"] for e in fresh["state"]] == [True]  # a fresh list: only itself is here


@pytest.mark.parametrize("extra", [0, 1], ids=["N", "N+1"])
async def test_presence_entries_of_a_page_are_bounded_at_n_and_n_plus_one(
    extra: int, caplog: pytest.LogCaptureFixture
) -> None:
    app = loud_app(max_presence_entries=2)
    async with running(app) as server:
        conns = [await RawWs.open(server, "/loud") for _ in range(2 + extra)]
        await eventually(lambda: len(server.conns) == 2 + extra, "connected")
        await eventually(lambda: len(app.presence("/loud")) == 2, "two listed")
        for ws in conns:
            ws.writer.close()
        await eventually(lambda: app.presence("/loud") == [], "all gone")
    assert ("max_presence_entries=2" in caplog.text) == bool(extra)


@pytest.mark.parametrize("extra", [0, 1], ids=["N", "N+1"])
async def test_a_presence_meta_is_bounded_at_n_and_n_plus_one(extra: int, caplog: pytest.LogCaptureFixture) -> None:
    size = len(b'{"shouts":0}')
    app = loud_app(max_presence_meta_bytes=size - extra)
    async with running(app) as server:
        ws = await RawWs.open(server, "/loud")
        await eventually(lambda: len(server.conns) == 1, "connected")
        await eventually(lambda: len(app.presence("/loud")) == 1 - extra, "listed, or not")
        ws.writer.close()
    assert (f"max_presence_meta_bytes={size - 1}" in caplog.text) == bool(extra)


class Subscriber:
    """A page that subscribes to the topic each send names."""

    @staticmethod
    def server_init() -> tuple[int, rally.Effect[Echoed]]:
        return 0, rally.effect.none()

    @staticmethod
    def server_update(model: int, msg: Echoed) -> tuple[int, rally.Effect[Echoed]]:
        return model + 1, rally.effect.subscribe(msg.text)


async def test_topics_of_a_connection_are_bounded_at_n_and_n_plus_one(caplog: pytest.LogCaptureFixture) -> None:
    app = rally.App(max_topics_per_connection=2)
    app.page("/sub", Subscriber)
    async with running(app) as server:
        ws = await RawWs.open(server, "/sub")
        for topic in ("a", "b", "c"):
            ws.writer.write(ws.send_frame("Echoed", {"text": topic}))
        await eventually(lambda: "max_topics_per_connection" in caplog.text, "the third refused")
        assert [await app.broadcast_to_topic(t, Echoed("hi")) for t in ("a", "b", "c")] == [1, 1, 0]
        ws.writer.close()


# ==== Corked writes: one system call per batch of answers ====================


@dataclass
class Pad:
    size: int


class Padded:
    def server_init() -> tuple[None, rally.Effect[Heard]]:
        return None, rally.effect.none()

    def server_pad(msg: Pad) -> str:
        return "x" * msg.size


@pytest.mark.parametrize("extra", [-1, 0, 1], ids=["N-1", "N", "N+1"])
async def test_answers_to_one_read_go_out_in_one_write_of_at_most_the_cork_bound(extra: int) -> None:
    """Page RPCs read in one batch are answered in one transport write; the
    cork holds at most ``_CORK_BYTES``: with N answers filling it exactly,
    one write; one answer more, a second write."""
    app = rally.App()
    app.page("/padded", Padded)
    frame = 2048  # every answer frame: 4 bytes of header, then {"kind":"ok","id":..,"value":"xx..."}
    n = rally._CORK_BYTES // frame + extra
    assert n * frame <= 64 * 1024 * 2 and n < rally._EVENTS_PER_TURN  # one read, one turn
    async with rally.TestClient(app, timeout=WAIT) as client, client.page("/padded") as page:
        [conn] = [c for c in client.server.conns if isinstance(c, rally._WsConn)]  # type: ignore[union-attr]
        writes: list[int] = []
        write = conn.transport.write
        conn.transport.write = lambda data: (  # type: ignore[method-assign]
            writes.append(len(data)) if data[0] == 0x81 else None,  # text frames (the answers), not a close
            write(data),
        )[1]
        ids = range(100, 100 + n)  # three digits each: every answer is the same size
        value = frame - 4 - len(rally._ok_reply(100, ""))
        requests = [
            json.dumps({"kind": "rpc", "id": i, "msg": {"type": "Pad", "fields": {"size": value}}}) for i in ids
        ]
        assert page._writer is not None and page._ws is not None
        page._writer.write(b"".join(page._ws.send(wsproto.events.TextMessage(data=r)) for r in requests))
        await eventually(lambda: sum(writes) == n * frame, "every answer written")
    full, rest = divmod(n * frame, rally._CORK_BYTES)
    assert writes == [rally._CORK_BYTES] * full + ([rest] if rest else [])
    assert len(writes) == {-1: 1, 0: 1, 1: 2}[extra]
