"""Regression tests for defects in input handling, sessions and rally.Client.

Written against the behaviour after the transport and dispatch rewrite: each
test failed on the code before it, for the reason its docstring names. Same
rules as test_rally.py: loopback only, port 0, real sockets, real h11 and
wsproto peers, and every wait bounded by ``WAIT``.

A loopback listener admits only loopback ``Host`` names (SPEC: host
allowlist), so raw requests built from the shared helpers go through
``loopback()``, which gives them ``Host: 127.0.0.1``.
"""

import asyncio
import contextlib
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h11
import pytest
import wsproto
import wsproto.events
from wsproto.connection import ConnectionType

import rally
from test_limits import UPGRADE, RawWs
from test_rally import (
    WAIT,
    Heard,
    Say,
    ServerLoadTitle,
    article_app,
    envelope,
    eventually,
    exchange,
    responses,
    room_app,
    rpc_request,
    running,
)

# ==== Helpers ================================================================


def loopback(request: bytes) -> bytes:
    """A request of the shared helpers with a loopback Host instead of ``t``."""
    return request.replace(b"\r\nhost: localhost\r\n", b"\r\nhost: 127.0.0.1\r\n", 1)


def status_of(raw: bytes) -> int:
    """The status code of the first response line in ``raw``."""
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw.split(b" ", 2)[1])


async def post(server: rally.Server, body: bytes, extra: bytes = b"") -> tuple[int, dict[str, Any]]:
    """POST /_rally/rpc with a loopback Host, read to the end: ``(status, reply)``."""
    [(response, reply)] = responses(
        await exchange(server, loopback(rpc_request(body, extra + b"connection: close\r\n")))
    )
    return response.status_code, json.loads(reply)


async def get(server: rally.Server, path: str, extra: bytes = b"") -> tuple[h11.Response, bytes]:
    request = b"GET %s HTTP/1.1\r\nhost: 127.0.0.1\r\n%sconnection: close\r\n\r\n" % (path.encode(), extra)
    [(response, body)] = responses(await exchange(server, request))
    return response, body


def upgrade_request(page: str, extra: bytes = b"") -> bytes:
    """The shared WebSocket handshake with a loopback Host and ``extra`` header lines."""
    return loopback(UPGRADE % page.encode())[:-2] + extra + b"\r\n"


async def open_ws(
    server: rally.Server, page: str = "/articles/a", extra: bytes = b"", sock: socket.socket | None = None
) -> tuple[RawWs, bytes]:
    """A RawWs after a 101, and the 101's head."""
    if sock is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    else:
        reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(upgrade_request(page, extra))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    if not head.startswith(b"HTTP/1.1 101 "):
        writer.close()
        raise AssertionError(head)
    return RawWs(reader, writer), head


async def texts(ws: RawWs, count: int) -> list[str]:
    """The next ``count`` whole text messages the server sends."""
    out: list[str] = []
    part = ""
    while len(out) < count:
        events = await ws.events()
        assert events or not ws.reader.at_eof(), f"closed after {len(out)} of {count} messages"
        for event in events:
            if isinstance(event, wsproto.events.TextMessage):
                part += event.data
                if event.message_finished:
                    out.append(part)
                    part = ""
    return out


def rpc_frame(ws: RawWs, msg_type: str, fields: dict[str, Any], msg_id: Any) -> bytes:
    return ws.ws.send(wsproto.events.TextMessage(data=envelope(msg_type, fields, msg_id).decode()))


def send_frame(ws: RawWs, msg_type: str, fields: dict[str, Any]) -> bytes:
    text = json.dumps({"kind": "send", "msg": {"type": msg_type, "fields": fields}}, separators=(",", ":"))
    return ws.ws.send(wsproto.events.TextMessage(data=text))


def cookie_value(response: h11.Response) -> bytes | None:
    """The rally_session value of the response's Set-Cookie, if it sets one."""
    values = [v for k, v in response.headers if k == b"set-cookie"]
    if not values:
        return None
    [value] = values
    name, _, rest = value.split(b";")[0].partition(b"=")
    assert name == b"rally_session"
    return rest


HEX32 = re.compile(r"[0-9a-f]{32}")


# ==== 1. Concurrent RPCs on one WebSocket are bounded ========================


@dataclass
class Hold:
    n: int


def holding_app(limit: int) -> tuple[rally.App, dict[str, int]]:
    """An app whose async RPC counts the calls running at once; the first
    ``limit`` calls wait until ``limit`` have started."""
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


def test_default_max_concurrent_rpcs_is_a_positive_int() -> None:
    """Before: rally has no DEFAULT_MAX_CONCURRENT_RPCS."""
    assert type(rally.DEFAULT_MAX_CONCURRENT_RPCS) is int and rally.DEFAULT_MAX_CONCURRENT_RPCS >= 1


@pytest.mark.parametrize("count", [4, 5, 200], ids=["at-n", "n-plus-one", "two-hundred"])
async def test_concurrent_rpcs_on_one_websocket_are_bounded_and_none_is_lost(count: int) -> None:
    """Before: App has no max_concurrent_rpcs, and every RPC of a read starts at once."""
    app, stats = holding_app(4)
    async with running(app) as server:
        ws, _ = await open_ws(server)
        ws.writer.write(b"".join(rpc_frame(ws, "Hold", {"n": i}, i) for i in range(count)))
        replies = [json.loads(t) for t in await texts(ws, count)]
        ws.close()
    assert sorted(r["id"] for r in replies) == list(range(count))
    assert all(r == {"kind": "ok", "id": r["id"], "value": r["id"]} for r in replies)
    assert stats["max_active"] == 4
    assert stats["started"] == count


# ==== 2. Too many query fields on the handshake ===============================


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
    """Before: parse_qs raised ValueError past 8 fields: 500 and a traceback at ERROR."""
    async with running(article_app()) as server:
        raw = await exchange(server, upgrade_request(page), until_close=False)
    assert status_of(raw) == status
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ==== 3. Work per read is bounded; other connections get a turn ===============


@dataclass
class Bump:
    pass


@dataclass
class Mark:
    who: str


@contextlib.asynccontextmanager
async def running_with_big_buffers(app: rally.App) -> AsyncIterator[rally.Server]:
    """Serve on a listener whose connections have 4 MiB receive buffers, so a
    burst a client writes at once is in the server's socket at once."""
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


async def big_send_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), WAIT)
    return sock


async def test_a_burst_of_sends_on_one_connection_lets_another_connection_in() -> None:
    """Before: every envelope of a read ran in one callback: B's RPC waited for all 4000 of A's updates."""
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
        a, _ = await open_ws(server, "/counter", sock=await big_send_socket(server.port))
        b, _ = await open_ws(server, "/counter")
        burst = b"".join(send_frame(a, "Bump", {}) for _ in range(4000))
        assert len(burst) < 256 * 1024  # one read of the server before the rewrite
        a.writer.write(burst)
        b.writer.write(rpc_frame(b, "Mark", {"who": "B"}, 1))
        [reply] = await texts(b, 1)
        [done] = await texts(a, 1)
        a.close()
        b.close()
    assert json.loads(reply)["kind"] == "ok"
    assert json.loads(done) == {"kind": "push", "msg": {"type": "Heard", "fields": {"text": "done"}}}
    assert [x for x in log if x != "B"] == list(range(4000))
    assert log.index("B") < 4000


async def test_json_array_far_over_max_array_items_is_too_large() -> None:
    """Before: the reader built all 349 525 items and the envelope check answered 400 invalid."""
    n = (rally.DEFAULT_MAX_BODY_BYTES - 4) // 3
    body = b"[" + b"[]," * n + b"[]]"
    assert len(body) == rally.DEFAULT_MAX_BODY_BYTES
    async with running(article_app()) as server:
        status, reply = await post(server, body)
    assert (status, reply["kind"], reply["code"]) == (413, "error", "too_large")


async def test_a_message_of_400_000_empty_fragments_does_not_stop_other_connections() -> None:
    """A fragmented message whose fragments carry nothing is parsed a slice at a
    time: B's RPC is answered while A's fragments are still being read."""
    log: list[str] = []
    app = article_app()

    @app.rpc
    def server_mark(msg: Mark) -> int:
        log.append(msg.who)
        return len(log)

    async with running(app) as server:
        a, _ = await open_ws(server)
        b, _ = await open_ws(server)
        text = envelope("Mark", {"who": "A"}, 1).decode()
        first = a.ws.send(wsproto.events.TextMessage(data=text, message_finished=False))
        empty = a.ws.send(wsproto.events.TextMessage(data="", message_finished=False))
        last = a.ws.send(wsproto.events.TextMessage(data="", message_finished=True))
        assert len(empty) == 6  # header and mask, no payload
        a.writer.write(first + empty * 400_000 + last)
        b.writer.write(rpc_frame(b, "Mark", {"who": "B"}, 2))
        [reply] = await texts(b, 1)
        seen = list(log)
        a.writer.transport.abort()  # the rest of A's fragments are not needed
        b.close()
    assert json.loads(reply) == {"kind": "ok", "id": 2, "value": 1}
    assert seen == ["B"]


# ==== 4. Envelope id =========================================================

VALID_IDS = [("a" * 64, "64-chars"), (2**53 - 1, "max-safe-int"), (-(2**53 - 1), "min-safe-int"), (0, "zero")]
INVALID_IDS = [("a" * 65, "65-chars"), (2**53, "2^53"), (-(2**53), "-2^53"), ("x" * 1_000_000, "million-chars")]


@pytest.mark.parametrize("msg_id", [v for v, _ in VALID_IDS], ids=[i for _, i in VALID_IDS])
async def test_envelope_id_in_range_is_echoed_over_http_and_websocket(msg_id: Any) -> None:
    """The bounds themselves stay valid (they passed before too)."""
    body = envelope("ServerLoadTitle", {"slug": "a"}, msg_id)
    expected = {"kind": "ok", "id": msg_id, "value": "Article: a"}
    async with running(article_app()) as server:
        assert await post(server, body) == (200, expected)
        ws, _ = await open_ws(server)
        ws.send(wsproto.events.TextMessage(data=body.decode()))
        [reply] = await texts(ws, 1)
        ws.close()
    assert json.loads(reply) == expected


@pytest.mark.parametrize("msg_id", [v for v, _ in INVALID_IDS], ids=[i for _, i in INVALID_IDS])
async def test_envelope_id_out_of_range_is_invalid_at_id_and_not_echoed(msg_id: Any) -> None:
    """Before: any int or str was taken as the id and echoed, a million characters included."""
    body = envelope("ServerLoadTitle", {"slug": "a"}, msg_id)
    async with running(article_app()) as server:
        status, http_reply = await post(server, body)
        ws, _ = await open_ws(server)
        ws.send(wsproto.events.TextMessage(data=body.decode()))
        [text] = await texts(ws, 1)
        ws.close()
    ws_reply = json.loads(text)
    assert status == 400
    for reply in (http_reply, ws_reply):
        assert (reply["kind"], reply["code"], reply["id"]) == ("error", "invalid", None)
        assert reply["errors"][0]["path"] == "id"
        assert len(json.dumps(reply)) < 300  # no echo of the id


# ==== 5. float route parameters ==============================================


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
    """Before: the converter was float(): nan, inf, 1_0 and 1e999 (inf) were served with 200."""
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


# ==== 6. Two Origin headers ==================================================


@pytest.mark.parametrize("foreign_first", [False, True], ids=["both-same-origin", "foreign-then-same"])
@pytest.mark.parametrize("target", ["websocket", "rpc"])
async def test_two_origin_headers_are_refused_403(target: str, foreign_first: bool) -> None:
    """Before: the last Origin header won, so a same-origin one admitted the request."""
    async with running(article_app()) as server:
        host = b"127.0.0.1:%d" % server.port
        first = b"http://evil.test" if foreign_first else b"http://" + host
        origins = b"origin: %s\r\norigin: http://%s\r\n" % (first, host)
        if target == "websocket":
            request = upgrade_request("/articles/a", origins).replace(b"host: 127.0.0.1\r\n", b"host: %s\r\n" % host)
        else:
            body = envelope("ServerLoadTitle", {"slug": "a"})
            request = loopback(rpc_request(body, origins)).replace(b"host: 127.0.0.1\r\n", b"host: %s\r\n" % host)
        raw = await exchange(server, request, until_close=False)
    assert status_of(raw) == 403


# ==== 7. A malformed request is not echoed ===================================


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /SECRET-MARKER HTTP/1.1 garbage\r\nhost: 127.0.0.1\r\n\r\n",
        b"GET /articles/a HTTP/1.1\r\nhost: 127.0.0.1\r\nSECRET-MARKER\r\n\r\n",
    ],
    ids=["request-line", "header-line"],
)
async def test_malformed_request_gets_a_400_that_does_not_echo_it(request_bytes: bytes) -> None:
    """Before: the 400's body was h11's error text, which quotes the offending bytes."""
    async with running(article_app()) as server:
        raw = await exchange(server, request_bytes)
    assert status_of(raw) == 400
    assert b"SECRET" not in raw and b"MARKER" not in raw
    [(_, body)] = responses(raw)
    assert 0 < len(body) < 200


# ==== 8. Expect: 100-continue only where the body will be read ================


async def test_expect_100_continue_for_an_rpc_that_will_read_its_body() -> None:
    """The positive case, with a loopback Host (it passed before too)."""
    body = envelope("ServerLoadTitle", {"slug": "later"})
    head = loopback(rpc_request(body, b"expect: 100-continue\r\n"))[: -len(body)]
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
        (b"POST /nowhere HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 2\r\n", 404),
        (b"POST /articles/a HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 2\r\n", 405),
        (b"POST /_rally/rpc HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n", 415),
        (
            b"POST /_rally/rpc HTTP/1.1\r\nhost: 127.0.0.1\r\norigin: http://evil.test\r\n"
            b"content-type: application/json\r\ncontent-length: 2\r\n",
            403,
        ),
    ],
    ids=["404", "405", "415", "403"],
)
async def test_expect_100_continue_is_not_sent_for_a_refused_request(request_bytes: bytes, status: int) -> None:
    """Before: every request with Expect: 100-continue got 100 Continue before its refusal."""
    async with running(article_app()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request_bytes + b"expect: 100-continue\r\n\r\n{}")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        writer.close()
    assert status_of(first) == status


# ==== 9. App validates every limit ===========================================

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


@pytest.mark.parametrize("name", INT_LIMITS, ids=INT_LIMITS)
def test_every_count_limit_must_be_at_least_one(name: str) -> None:
    """Before: only five limits were checked (and max_concurrent_rpcs did not exist)."""
    with pytest.raises(rally.RegistrationError):
        rally.App(**{name: 0})
    rally.App(**{name: 1})


@pytest.mark.parametrize("value", [0, -1.0], ids=["zero", "negative"])
@pytest.mark.parametrize("name", TIMEOUTS, ids=TIMEOUTS)
def test_every_time_out_must_be_positive(name: str, value: float) -> None:
    """Before: no time-out was checked (and send_timeout did not exist)."""
    with pytest.raises(rally.RegistrationError):
        rally.App(**{name: value})
    rally.App(**{name: 0.001})


# ==== 10. Misuse raises UsageError ============================================


@dataclass
class NotAPush:
    x: int


def test_usage_error_is_a_rally_error_and_a_type_error_and_registration_error_is_one() -> None:
    """Before: rally has no UsageError."""
    assert issubclass(rally.UsageError, rally.RallyError) and issubclass(rally.UsageError, TypeError)
    assert issubclass(rally.RegistrationError, rally.UsageError)
    with pytest.raises(rally.UsageError):
        rally.App().page("no-slash", type("P", (), {}))


async def test_broadcast_of_a_type_that_is_no_push_type_raises_usage_error() -> None:
    """Before: a plain TypeError."""
    app = room_app()
    async with running(app):
        with pytest.raises(rally.UsageError, match="NotAPush"):
            await app.broadcast_to_app(NotAPush(1))


def test_threadsafe_broadcast_on_an_app_that_is_not_serving_raises_usage_error() -> None:
    """Before: RuntimeError."""
    with pytest.raises(rally.UsageError):
        room_app().broadcast_to_app_threadsafe(Heard("nobody listens"))


def test_client_of_a_url_that_is_not_http_raises_usage_error() -> None:
    """Before: ValueError."""
    with pytest.raises(rally.UsageError):
        rally.Client("ftp://x")


# ==== 11. Signed session cookies ==============================================


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


async def test_session_cookie_is_opaque_and_the_session_id_is_32_hex() -> None:
    """Before: the cookie value was the bare 32-hex session id."""
    seen: list[str] = []
    app = who_app(seen, secret="k")
    value = await issue_cookie(app)
    assert await present_cookie(app, value) is None
    assert len(seen) == 2 and seen[0] == seen[1] and HEX32.fullmatch(seen[0])
    assert not HEX32.fullmatch(value.decode("latin-1"))
    assert value.decode("latin-1") != seen[0]


@pytest.mark.parametrize("forged", [b"f" * 32, b"0123456789abcdef" * 2], ids=["f32", "hex32"])
async def test_an_unsigned_session_id_is_not_accepted_on_a_page(forged: bytes) -> None:
    """Before: any 32-hex value was taken as the session: session fixation."""
    seen: list[str] = []
    fresh = await present_cookie(who_app(seen, secret="k"), forged)
    assert fresh is not None and fresh != forged
    assert seen[0] != forged.decode()


async def test_two_websockets_with_the_same_forged_cookie_get_two_sessions() -> None:
    """Before: both joined session ffff...: each received the other's broadcast_to_session."""
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
        one, head_one = await open_ws(server, "/talk", forged)
        two, head_two = await open_ws(server, "/talk", forged)
        await eventually(lambda: len(seen) == 2, "both pages initialised")
        one.writer.write(send_frame(one, "Say", {"scope": "session", "text": "to my session"}))
        assert [json.loads(t)["msg"]["fields"]["text"] for t in await texts(one, 1)] == ["to my session"]
        # Had the session broadcast reached two, it was written before this answer.
        two.writer.write(send_frame(two, "Say", {"scope": "client", "text": "just me"}))
        assert [json.loads(t)["msg"]["fields"]["text"] for t in await texts(two, 1)] == ["just me"]
        one.close()
        two.close()
    assert seen[0] != seen[1] and "f" * 32 not in seen
    assert b"set-cookie" in head_one.lower() and b"set-cookie" in head_two.lower()


@pytest.mark.parametrize("secret", ["a str secret", b"a bytes secret"], ids=["str", "bytes"])
async def test_a_cookie_is_accepted_by_an_app_with_the_same_secret_only(secret: str | bytes) -> None:
    """Before: App took no secret; any server accepted any 32-hex cookie."""
    seen: list[str] = []
    value = await issue_cookie(who_app(seen, secret=secret))
    assert await present_cookie(who_app(seen, secret=secret), value) is None
    assert seen[0] == seen[1]
    assert await present_cookie(who_app(seen, secret="another secret"), value) is not None
    assert seen[2] != seen[0]


async def test_the_secret_defaults_to_the_rally_secret_environment_variable(monkeypatch: Any) -> None:
    """Before: no secret at all."""
    monkeypatch.setenv("RALLY_SECRET", "from the environment")
    seen: list[str] = []
    value = await issue_cookie(who_app(seen))
    assert await present_cookie(who_app(seen, secret="from the environment"), value) is None
    assert await present_cookie(who_app(seen, secret="something else"), value) is not None
    assert seen[0] == seen[1] != seen[2]


# ==== 12. Host allowlist =====================================================


def host_request(kind: str, host: bytes) -> bytes:
    origin = b"origin: http://%s\r\n" % host
    if kind == "page":
        return b"GET /articles/a HTTP/1.1\r\nhost: %s\r\n%sconnection: close\r\n\r\n" % (host, origin)
    if kind == "rpc":
        request = rpc_request(envelope("ServerLoadTitle", {"slug": "a"}), origin)
    else:
        request = UPGRADE % b"/articles/a"
        request = request[:-2] + origin + b"\r\n"
    return request.replace(b"\r\nhost: localhost\r\n", b"\r\nhost: %s\r\n" % host, 1)


ADMITTED = {"page": 200, "rpc": 200, "websocket": 101}


@pytest.mark.parametrize("kind", ["page", "rpc", "websocket"])
@pytest.mark.parametrize(
    "host", ["evil.example:{port}", "evil.example", "localhost.evil.example:{port}", "127.0.0.1.evil.example"]
)
async def test_a_loopback_listener_refuses_a_foreign_host_with_400(kind: str, host: str) -> None:
    """Before: any Host was served, and an Origin matching it passed the origin check (DNS rebinding)."""
    async with running(article_app()) as server:
        raw = await exchange(server, host_request(kind, host.format(port=server.port).encode()), until_close=False)
    assert status_of(raw) == 400


@pytest.mark.parametrize("kind", ["page", "rpc", "websocket"])
@pytest.mark.parametrize("host", ["localhost", "localhost:{port}", "127.0.0.1", "127.0.0.1:1", "[::1]", "[::1]:{port}"])
async def test_a_loopback_listener_admits_loopback_host_names(kind: str, host: str) -> None:
    """Loopback names on any port stay admitted (they were before too)."""
    async with running(article_app()) as server:
        raw = await exchange(server, host_request(kind, host.format(port=server.port).encode()), until_close=False)
    assert status_of(raw) == ADMITTED[kind]


@pytest.mark.parametrize("kind", ["page", "rpc", "websocket"])
@pytest.mark.parametrize(
    ("allowed", "host"),
    [(["evil.example"], "evil.example:{port}"), (["*"], "anything.example:{port}")],
    ids=["listed", "star"],
)
async def test_allowed_hosts_admits_the_hosts_it_lists(kind: str, allowed: list[str], host: str) -> None:
    """Before: App took no allowed_hosts."""
    async with running(article_app(allowed_hosts=allowed)) as server:
        raw = await exchange(server, host_request(kind, host.format(port=server.port).encode()), until_close=False)
    assert status_of(raw) == ADMITTED[kind]


# ==== Part B: rally.Client and PageConnection =================================


@dataclass
class Hang:
    pass


async def test_page_rpc_that_times_out_or_is_cancelled_forgets_its_id() -> None:
    """Before: the future stayed in PageConnection._waiting for ever."""
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


class FakeServer:
    """A tiny WebSocket server on 127.0.0.1: h11/wsproto do its handshake; each
    test gives the coroutine that serves one connection."""

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
    while await reader.read(65536):
        pass


async def accept_ws(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> wsproto.WSConnection:
    """Answer the client's handshake with a wsproto server connection."""
    ws = wsproto.WSConnection(ConnectionType.SERVER)
    while True:
        data = await reader.read(65536)
        ws.receive_data(data or None)
        for event in ws.events():
            if isinstance(event, wsproto.events.Request):
                writer.write(ws.send(wsproto.events.AcceptConnection()))
                return ws
        assert data, "client closed during the handshake"


@pytest.mark.parametrize("failure", ["time-out", "garbage", "cancelled"])
async def test_page_connect_closes_its_socket_when_the_handshake_fails(failure: str) -> None:
    """Before: the socket of a failed handshake was never closed."""
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


async def test_page_close_in_a_cancelled_task_cleans_up_and_stays_cancelled() -> None:
    """Before: close() suppressed the CancelledError of the task that called it."""
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


async def test_a_server_frame_that_is_not_an_envelope_is_reported_and_the_connection_goes_on() -> None:
    """Before: the first such frame raised in the reader task: the connection died with 1006."""

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
