"""Tests of rally.py.

Rules: loopback only (127.0.0.1), port 0, a time bound on every test (pytest
``timeout`` plus ``asyncio.wait_for`` around every wait), and no sleeps that
stand in for synchronisation: tests wait on the event they assert, with a
bound. Peers are real: h11 and wsproto produce the bytes of the pure tests,
and end-to-end tests talk to a running server through ``running(app)`` over
real sockets, with ``rally.Client``, raw sockets, or the independent
``websockets`` library.

Ordered like rally.py: contract, wire, dispatch, then end to end.
"""

import asyncio
import contextlib
import dataclasses
import datetime
import enum
import errno
import hmac
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Optional

import h11
import pytest
import wsproto
import wsproto.events
from hypothesis import given, settings
from hypothesis import strategies as st

import rally

WAIT = 5.0  # seconds: the bound on any single wait in these tests


# ==== Shared types and the Article app of README "A page" ====================


@dataclass
class ServerLoadTitle:
    slug: str


@dataclass
class ToggleFavorite: ...


@dataclass
class AddComment:
    body: str


ToServer = ToggleFavorite | AddComment


@dataclass
class FavoriteToggled:
    article_id: int


@dataclass
class CommentSaved:
    body: str


ToClient = FavoriteToggled | CommentSaved


@dataclass
class ServerModel:
    article_id: int


class Article:
    html = "<html><head><title>Article</title></head><body><h1>Article</h1></body></html>"

    def server_load_title(msg: ServerLoadTitle, server_context: rally.ServerContext) -> rally.Result[str, list[str]]:
        if msg.slug == "missing":
            return rally.Error(["not found"])
        return rally.Ok("Article: " + msg.slug)

    def server_init(slug: str, server_context: rally.ServerContext) -> tuple[ServerModel, rally.Effect[ToClient]]:
        return ServerModel(article_id=len(slug)), rally.effect.none()

    def server_update(
        model: ServerModel, msg: ToServer, server_context: rally.ServerContext
    ) -> tuple[ServerModel, rally.Effect[ToClient]]:
        match msg:
            case ToggleFavorite():
                return model, rally.effect.send_to_client(FavoriteToggled(model.article_id))
            case AddComment(body):
                return model, rally.effect.broadcast_to_page(CommentSaved(body))


def article_app(**options: Any) -> rally.App:
    app = rally.App(**options)
    app.page("/articles/{slug}", Article)
    return app


@contextlib.asynccontextmanager
async def running(app: rally.App) -> AsyncIterator[rally.Server]:
    """Serve ``app`` on 127.0.0.1, a free port, for the body of the block."""
    server = await app.start("127.0.0.1", 0, access_log=False)
    try:
        yield server
    finally:
        await asyncio.wait_for(server.close(), 15)


async def exchange(server: rally.Server, data: bytes, *, until_close: bool = True) -> bytes:
    """Write raw bytes to the server and read what it answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(data)
        await writer.drain()
        if until_close:
            return await asyncio.wait_for(reader.read(-1), WAIT)
        return await asyncio.wait_for(reader.read(65536), WAIT)
    finally:
        writer.close()


def responses(data: bytes) -> list[tuple[h11.Response, bytes]]:
    """Parse raw response bytes with a real h11 client."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    out: list[tuple[h11.Response, bytes]] = []
    response: h11.Response | None = None
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            response, body = event, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            out.append((response, body))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                break
            conn.start_next_cycle()
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
        else:
            break
    return out


def rpc_request(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /_rally/rpc HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
        + extra
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )


def envelope(msg_type: str, fields: dict[str, Any], msg_id: int = 1) -> bytes:
    return json.dumps({"kind": "rpc", "id": msg_id, "msg": {"type": msg_type, "fields": fields}}).encode()


# ==== Contract ==============================================================


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


@dataclass
class Point:
    x: int
    y: int


@dataclass
class Circle:
    r: float


@dataclass
class Square:
    side: float


@dataclass
class Node:
    name: str
    children: list["Node"]


@dataclass
class Everything:
    s: str
    i: int
    f: float
    b: bool
    n: None
    items: list[int]
    var: tuple[str, ...]
    pair: tuple[int, str]
    mapping: dict[str, float]
    maybe: int | None
    old_maybe: Optional[str]  # noqa: UP045 - the spelling under test
    lit: Literal["a", "b", 3]
    color: Color
    point: Point
    shape: Circle | Square
    raw: bytes
    when: datetime.datetime
    day: datetime.date
    tree: Node
    default: int = 7


EVERYTHING_JSON: dict[str, Any] = {
    "s": "hé\u2028",
    "i": -(2**53 - 1),
    "f": 1.5,
    "b": True,
    "n": None,
    "items": [1, 2],
    "var": ["x", "y"],
    "pair": [1, "one"],
    "mapping": {"__proto__": 1.0, "constructor": 2},
    "maybe": None,
    "old_maybe": "o",
    "lit": 3,
    "color": "green",
    "point": {"x": 1, "y": 2},
    "shape": {"type": "Square", "fields": {"side": 2.0}},
    "raw": "AAEC/w==",
    "when": "2024-05-01T12:30:00+00:00",
    "day": "2024-05-01",
    "tree": {"name": "root", "children": [{"name": "leaf", "children": []}]},
    "default": 7,
}


def codecs(**limits: Any) -> rally._Codecs:
    return rally._Codecs(rally._Limits(**limits))


def test_contract_decodes_every_supported_annotation() -> None:
    value = codecs().get(Everything).decode(EVERYTHING_JSON)
    assert value == Everything(
        s="hé\u2028",
        i=-(2**53 - 1),
        f=1.5,
        b=True,
        n=None,
        items=[1, 2],
        var=("x", "y"),
        pair=(1, "one"),
        mapping={"__proto__": 1.0, "constructor": 2.0},
        maybe=None,
        old_maybe="o",
        lit=3,
        color=Color.GREEN,
        point=Point(1, 2),
        shape=Square(2.0),
        raw=b"\x00\x01\x02\xff",
        when=datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc),
        day=datetime.date(2024, 5, 1),
        tree=Node("root", [Node("leaf", [])]),
    )


def test_contract_encode_then_decode_round_trips() -> None:
    codec = codecs().get(Everything)
    value = codec.decode(EVERYTHING_JSON)
    assert codec.encode(value) == EVERYTHING_JSON
    assert codec.decode(json.loads(json.dumps(codec.encode(value)))) == value


def test_contract_field_with_default_may_be_missing() -> None:
    data = dict(EVERYTHING_JSON)
    del data["default"]
    assert codecs().get(Everything).decode(data).default == 7


def bad_path(tp: Any, value: Any, **limits: Any) -> dict[str, str]:
    with pytest.raises(rally._Bad) as info:
        codecs(**limits).get(tp).decode(value)
    return info.value.error("msg.fields")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("s", None, "expected str, got null"),
        ("i", True, "expected int, got true"),
        ("i", 1.5, "expected int, got float"),
        ("i", 2**53, "integer outside ±(2^53-1)"),
        ("i", -(2**53), "integer outside ±(2^53-1)"),
        ("f", "1", "expected float, got str"),
        ("f", False, "expected float, got false"),
        ("b", 1, "expected bool, got int"),
        ("n", 0, "expected null, got int"),
        ("items", {}, "expected array, got object"),
        ("pair", [1], "expected array of 2, got 1 items"),
        ("mapping", [], "expected object, got array"),
        ("lit", "c", 'expected one of ["a", "b", 3], got "c"'),
        ("lit", True, 'expected one of ["a", "b", 3], got true'),
        ("color", "blue", "expected one of ['red', 'green'], got \"blue\""),
        ("raw", "AAEC/w", "expected standard base64 with padding"),
        ("raw", "AA!C", "expected standard base64 with padding"),
        ("when", "yesterday", "expected ISO 8601 datetime, got 'yesterday'"),
        ("day", "2024-05-01T00:00:00", "expected ISO 8601 date, got '2024-05-01T00:00:00'"),
        ("point", {"x": 1}, "missing field of Point"),
        ("point", {"x": 1, "y": 2, "z": 3}, "unknown field of Point (its fields: x, y)"),
    ],
    ids=lambda v: str(v)[:20],
)
def test_contract_rejects_with_path_and_message(field: str, value: Any, message: str) -> None:
    data = dict(EVERYTHING_JSON, **{field: value})
    error = bad_path(Everything, data)
    assert error["message"] == message
    assert error["path"].startswith(f"msg.fields.{field}")


def test_contract_error_path_reaches_nested_item() -> None:
    data = dict(EVERYTHING_JSON, tree={"name": "r", "children": [{"name": "a", "children": []}, {"name": None}]})
    assert bad_path(Everything, data) == {
        "path": "msg.fields.tree.children[1].name",
        "message": "expected str, got null",
    }


def test_contract_tagged_union_rejects_unknown_type_name() -> None:
    data = dict(EVERYTHING_JSON, shape={"type": "Triangle", "fields": {}})
    error = bad_path(Everything, data)
    assert error["path"] == "msg.fields.shape.type"
    assert "unknown type 'Triangle'" in error["message"]


@pytest.mark.parametrize(
    ("limit", "value", "ok_value"),
    [
        ({"max_string_chars": 3}, "abcd", "abc"),
        ({"max_array_items": 2}, [1, 2, 3], [1, 2]),
    ],
    ids=["string", "array"],
)
def test_contract_limits_at_n_and_n_plus_one(limit: dict[str, int], value: Any, ok_value: Any) -> None:
    tp = str if isinstance(value, str) else list[int]
    assert codecs(**limit).get(tp).decode(ok_value) == ok_value
    with pytest.raises(rally._Bad, match="longer than") as info:
        codecs(**limit).get(tp).decode(value)
    assert info.value.code == "too_large"


def test_contract_encoder_checks_types() -> None:
    codec = codecs().get(Point)
    with pytest.raises(rally._Bad) as info:
        codec.encode(Point(1, "2"))  # type: ignore[arg-type]
    assert info.value.error("result") == {"path": "result.y", "message": "expected int, got str"}
    with pytest.raises(rally._Bad, match="finite"):
        codecs().get(float).encode(float("nan"))


@pytest.mark.parametrize(
    "annotation",
    [set[int], int | str, dict[int, str], list, complex, Any, tuple[()]],
    ids=str,
)
def test_contract_unsupported_annotations_are_refused(annotation: Any) -> None:
    with pytest.raises(rally._Unsupported):
        codecs().get(annotation)


def json_reader(**limits: Any) -> rally._Json:
    return rally._Json(rally._Limits(**limits))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b"[NaN]", "NaN is not allowed"),
        (b"[Infinity]", "Infinity is not allowed"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"a": "\xc3"}', "not UTF-8"),
        (b"[" * 10_000, "nested deeper than 32"),
        (b"[" * 100_000, "more than 20000 arrays and objects"),
        (b"[" * 33 + b"]" * 33, "nested deeper than 32"),
        (b"1" * 5000, "bad JSON"),
        (b"{", "bad JSON"),
    ],
    ids=[
        "duplicate",
        "nan",
        "infinity",
        "utf16-bom",
        "bad-utf8",
        "deep-10000",
        "deep-100000",
        "deep-33",
        "huge-int",
        "truncated",
    ],
)
def test_json_reader_refuses_with_contract_error(data: bytes, message: str) -> None:
    with pytest.raises(rally.ContractError) as info:
        json_reader().loads(data)
    assert info.value.code == ("too_large" if "deeper" in message or "arrays and objects" in message else "invalid")
    assert message in info.value.errors[0]["message"]


def test_json_reader_depth_at_limit_and_entries_limit() -> None:
    assert json_reader().loads(b"[" * 32 + b"]" * 32) is not None
    assert json_reader(max_object_entries=2).loads(b'{"a":1,"b":2}') == {"a": 1, "b": 2}
    with pytest.raises(rally.ContractError, match="more than 2 entries") as info:
        json_reader(max_object_entries=2).loads(b'{"a":1,"b":2,"c":3}')
    assert info.value.code == "too_large"


def test_json_reader_keeps_proto_keys_as_data() -> None:
    assert json_reader().loads(b'{"__proto__": {"x": 1}}') == {"__proto__": {"x": 1}}


# ==== Wire ==================================================================


def test_ws_frame_matches_wsproto_server_frames() -> None:
    server = wsproto.connection.Connection(wsproto.connection.ConnectionType.SERVER)
    for size in (0, 125, 126, 65535, 65536, 70000):
        payload = "x" * size
        assert rally._ws_frame(payload.encode()) == server.send(wsproto.events.TextMessage(data=payload))
    assert rally._ws_frame(b"\x00\x01", 0x2) == server.send(wsproto.events.BytesMessage(data=b"\x00\x01"))


def client_frames() -> tuple[bytes, list[str | bytes]]:
    """Frames a real wsproto client sends, and the messages they carry."""
    client = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT)
    out = b""
    messages: list[str | bytes] = ["hi", "é" * 100, "x" * 300, "y" * 70_000, "abcd", b"\x00\x01", "", "€"]
    for m in messages:
        if m == "abcd":  # fragmented, with a ping between the fragments
            out += client.send(wsproto.events.TextMessage(data="ab", message_finished=False))
            out += client.send(wsproto.events.Ping(payload=b"p"))
            out += client.send(wsproto.events.TextMessage(data="cd", message_finished=True))
        elif isinstance(m, bytes):
            out += client.send(wsproto.events.BytesMessage(data=m))
        else:
            out += client.send(wsproto.events.TextMessage(data=m))
    return out, messages


def test_frame_tracker_follows_boundaries_of_any_split() -> None:
    data, _ = client_frames()
    rng = random.Random(7)
    for _ in range(200):
        tracker = rally._FrameTracker()
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 12)))
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            tracker.feed(data[a:b])
        assert tracker.clean
    tracker = rally._FrameTracker()
    tracker.feed(data[:-1])
    assert not tracker.clean


def test_fast_text_frames_match_wsproto_and_refuse_the_rest() -> None:
    client = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT)
    texts = ["hi", "é" * 100, "x" * 300, "z" * 65535]
    data = b"".join(client.send(wsproto.events.TextMessage(data=t)) for t in texts)
    assert rally._read_text_frames(data) == [(t, len(t.encode())) for t in texts]
    assert rally._read_text_frames(data[:-1]) is None  # a partial frame
    assert rally._read_text_frames(client.send(wsproto.events.TextMessage(data="w" * 65536))) is None
    assert rally._read_text_frames(client.send(wsproto.events.Ping(payload=b""))) is None
    assert rally._read_text_frames(client.send(wsproto.events.TextMessage(data="a", message_finished=False))) is None
    unmasked = rally._ws_frame(b"hi")
    assert rally._read_text_frames(unmasked) is None
    bad_utf8 = bytes((0x81, 0x82)) + b"\0\0\0\0" + b"\xc3\x28"
    assert rally._read_text_frames(bad_utf8) is None


def ws_events(chunks: list[bytes], max_message_bytes: int = 1 << 20) -> list[Any]:
    """What a ``_WsReader`` makes of ``chunks``: messages, pings, pongs, closes
    (as ``(kind, payload)``), and the close code of a ProtocolError."""
    reader = rally._WsReader(max_message_bytes)
    out: list[Any] = []
    try:
        for chunk in chunks:
            reader.feed(chunk)
            while (event := reader.next_event()) is not None:
                if isinstance(event, (str, bytes)):
                    out.append(event)
                elif isinstance(event, wsproto.events.Ping):
                    out.append(("ping", event.payload))
                elif isinstance(event, wsproto.events.CloseConnection):
                    out.append(("close", event.code))
                else:
                    assert event is rally._PARTIAL, event
    except rally.ProtocolError as exc:
        out.append(("error", exc.close_code))
    return out


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted(set(c for c in cuts if 0 < c < len(data)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def test_ws_reader_gives_the_same_events_for_a_whole_buffer_and_one_byte_at_a_time() -> None:
    data, messages = client_frames()
    whole = ws_events([data])
    assert whole == [*messages[:4], ("ping", b"p"), *messages[4:]]
    assert ws_events([data[i : i + 1] for i in range(len(data))]) == whole


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=80_000), max_size=20))
def test_ws_reader_gives_the_same_events_for_any_split(cuts: list[int]) -> None:
    data, _ = client_frames()
    assert ws_events(splits(data, cuts)) == ws_events([data])


def test_ws_reader_reports_protocol_errors_and_the_size_bound_at_any_split() -> None:
    client = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT)
    ok = client.send(wsproto.events.TextMessage(data="fine"))
    too_big = client.send(wsproto.events.TextMessage(data="x" * 101))
    parts = client.send(wsproto.events.TextMessage(data="x" * 60, message_finished=False)) + client.send(
        wsproto.events.TextMessage(data="x" * 41)
    )
    unmasked = rally._ws_frame(b"hi")  # a client frame must be masked: 1002
    bad_utf8 = bytes((0x81, 0x82)) + b"\0\0\0\0" + b"\xc3\x28"  # 1007
    for data, expected in [
        (ok + too_big, ["fine", ("error", 1009)]),
        (ok + parts, ["fine", ("error", 1009)]),
        (ok + unmasked, ["fine", ("close", 1002)]),
        (ok + bad_utf8, ["fine", ("close", 1007)]),
    ]:
        assert ws_events([data], max_message_bytes=100) == expected
        assert ws_events([data[i : i + 1] for i in range(len(data))], max_message_bytes=100) == expected


def test_ws_reader_makes_a_wsproto_connection_only_for_frames_that_need_one() -> None:
    """Fast-path text frames need no wsproto connection (nor a frame
    tracker); a ping or a pong makes one and lets it go once read, so an
    idle page keeps none; a frame
    cut in two and a close keep it while they need it; a message read
    through wsproto keeps it for good (docs/performance.md "Where each byte
    goes"). The events are the same as with one connection throughout."""
    client = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT)
    text = client.send(wsproto.events.TextMessage(data="hi"))
    ping = client.send(wsproto.events.Ping(payload=b"p"))
    pong = client.send(wsproto.events.Pong(payload=b"rally"))
    binary = client.send(wsproto.events.BytesMessage(data=b"\x00\x01"))
    reader = rally._WsReader(1 << 20)

    def read(data: bytes) -> list[Any]:
        reader.feed(data)
        return [e if isinstance(e, (str, bytes)) else type(e).__name__ for e in iter(reader.next_event, None)]

    assert read(text) == ["hi"] and reader._ws is None
    assert read(ping) == ["Ping"] and reader._ws is None
    assert read(pong[:3]) == [] and reader._ws is not None  # wsproto holds half a frame
    assert read(pong[3:]) == ["Pong"] and reader._ws is None and reader.tracker is rally._NO_FRAME
    assert read(text + text) == ["hi", "hi"] and reader._ws is None
    server = wsproto.connection.Connection(wsproto.connection.ConnectionType.SERVER)
    ping_out = wsproto.events.Ping(payload=b"rally")
    assert reader.send(ping_out) == server.send(ping_out) and reader._ws is None
    assert read(binary) == [b"\x00\x01"] and reader._ws is not None
    assert read(ping) == ["Ping"] and reader._ws is not None and reader.state is wsproto.connection.ConnectionState.OPEN
    frames = text + ping + text + ping + text  # wsproto made and let go twice, read whole
    for a in range(1, len(frames)):
        for b in range(a, len(frames), 3):
            assert ws_events(splits(frames, [a, b])) == ["hi", ("ping", b"p"), "hi", ("ping", b"p"), "hi"]
    closing = rally._WsReader(1 << 20)
    closing.feed(client.send(wsproto.events.CloseConnection(code=1000)))
    assert isinstance(closing.next_event(), wsproto.events.CloseConnection) and closing.next_event() is None
    assert closing._ws is not None and closing.state is wsproto.connection.ConnectionState.REMOTE_CLOSING
    assert rally._NO_FRAME.clean and rally._NO_FRAME.head == b""  # the shared tracker was never fed


class FakeClock:
    """An event loop's ``time`` and ``call_at``, with time moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[asyncio.TimerHandle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        timer = asyncio.TimerHandle(when, callback, (), self)  # type: ignore[arg-type]
        self.timers.append(timer)
        return timer

    def get_debug(self) -> bool:
        return False

    def _timer_handle_cancelled(self, timer: asyncio.TimerHandle) -> None:
        pass

    def pending(self) -> list[asyncio.TimerHandle]:
        return [t for t in self.timers if not t.cancelled()]

    def run_until(self, end: float) -> None:
        """Run each timer due by ``end`` at its time."""
        while (due := [t for t in self.pending() if t.when() <= end]) and self.now <= end:
            timer = min(due, key=lambda t: t.when())
            self.timers.remove(timer)
            self.now = max(self.now, timer.when())
            timer._run()
        self.now = end


class Pinged:
    """What ``_Keepalive`` needs of a ``_WsConn``: its bucket, and ``ping``,
    which pings (its pong is then due) or, with the last ping unanswered, closes."""

    def __init__(self, keepalive: Any, clock: FakeClock) -> None:
        self.keepalive: set[Any] | None = None
        self.pinger, self.clock = keepalive, clock
        self.pings: list[float] = []
        self.awaiting_pong = False
        self.closed: float | None = None

    def ping(self) -> None:
        if self.awaiting_pong:
            self.closed = self.clock.now
            return
        self.pings.append(self.clock.now)
        self.awaiting_pong = True
        self.pinger.pong_by(self)

    def pong(self) -> None:
        self.awaiting_pong = False
        self.pinger.ping_later(self)


def test_keepalive_pings_every_connection_on_time_with_one_timer() -> None:
    """Every connection is pinged ``ping_interval`` after it opened or
    answered, and closed ``pong_timeout`` after an unanswered ping: never
    early, at most a sixteenth of the shorter delay late, with one timer
    for all (docs/performance.md "Where each byte goes")."""
    clock = FakeClock()
    keepalive = rally._Keepalive(clock, rally._Limits(ping_interval=20.0, pong_timeout=10.0))  # type: ignore[arg-type]
    step = 10.0 / 16
    a, b, c = (Pinged(keepalive, clock) for _ in range(3))
    keepalive.ping_later(a)  # type: ignore[arg-type]
    clock.now = 1.0
    keepalive.ping_later(b)  # type: ignore[arg-type]
    keepalive.ping_later(c)  # type: ignore[arg-type]
    clock.run_until(19.99)
    assert a.pings == b.pings == [] and len(clock.pending()) == 1
    keepalive.forget(c)  # c ended
    clock.run_until(21 + step)
    assert 20 <= a.pings[0] <= 20 + step and 21 <= b.pings[0] <= 21 + step and len(clock.pending()) == 1
    clock.now = 25.0
    a.pong()  # a answers; b never does
    clock.run_until(31 + step)
    assert b.closed is not None and 31 <= b.closed <= 31 + step and a.closed is None
    clock.run_until(45 + step)
    assert 45 <= a.pings[-1] <= 45 + step and a.closed is None and c.pings == []
    keepalive.stop()
    assert clock.pending() == [] and not keepalive.pings and not keepalive.pongs
    never = rally._Keepalive(clock, rally._Limits(ping_interval=math.inf))  # type: ignore[arg-type]
    never.ping_later(c)  # type: ignore[arg-type]
    assert c.keepalive is None and not never.pings


def http_events(chunks: list[bytes], **limits: Any) -> list[Any]:
    """What an ``_HttpReader`` makes of ``chunks``, answering each request at
    once (``next_cycle``): heads as ``(method, path, query, has_body)``, each
    body joined, ``"end"``, ``"eof"``, and the status of a ProtocolError."""
    reader = rally._HttpReader(rally._Limits(**limits))
    out: list[Any] = []
    body = b""
    try:
        for chunk in chunks:
            reader.feed(chunk)
            while (event := reader.next_event()) is not None:
                if isinstance(event, rally._Request):
                    out.append((event.method, event.path, event.query, event.has_body))
                elif isinstance(event, bytes):
                    body += event
                elif event is rally._END:
                    out += [body, "end"]
                    body = b""
                    reader.next_cycle()
                else:
                    out.append("eof")
                    return out
    except rally.ProtocolError as exc:
        out.append(("error", exc.status))
    return out


def h11_requests() -> bytes:
    """Pipelined requests as a real h11 client writes them."""
    out = b""
    for method, target, body, chunked in [
        ("GET", "/articles/a%20b?x=1", b"", False),
        ("POST", "/_rally/rpc", b'{"kind":"rpc"}', False),
        ("POST", "/_rally/rpc", b"x" * 5000, True),
        ("HEAD", "/", b"", False),
    ]:
        client = h11.Connection(h11.CLIENT)
        headers = [("host", "localhost")]
        headers += [("transfer-encoding", "chunked")] if chunked else [("content-length", str(len(body)))]
        out += client.send(h11.Request(method=method, target=target, headers=headers))
        if chunked:
            out += client.send(h11.Data(data=body[:1000])) + client.send(h11.Data(data=body[1000:]))
        elif body:
            out += client.send(h11.Data(data=body))
        out += client.send(h11.EndOfMessage())
    return out


def test_http_reader_gives_the_same_events_for_a_whole_buffer_and_one_byte_at_a_time() -> None:
    data = h11_requests()
    whole = http_events([data, b""])
    assert whole == [
        (b"GET", "/articles/a b", "x=1", False),
        b"",
        "end",
        (b"POST", "/_rally/rpc", "", True),
        b'{"kind":"rpc"}',
        "end",
        (b"POST", "/_rally/rpc", "", True),
        b"x" * 5000,
        "end",
        (b"HEAD", "/", "", False),
        b"",
        "end",
        "eof",
    ]
    assert http_events([data[i : i + 1] for i in range(len(data))] + [b""]) == whole


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=6000), max_size=20))
def test_http_reader_gives_the_same_events_for_any_split(cuts: list[int]) -> None:
    data = h11_requests()
    assert http_events([*splits(data, cuts), b""]) == http_events([data, b""])


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\nhost: localhost\r\n" + b"x-h: v\r\n" * 3 + b"\r\n", 431),
        (b"POST / HTTP/1.1\r\nhost: localhost\r\ncontent-length: 101\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n65\r\n" + b"x" * 101, 413),
        (b"POST / HTTP/1.1\r\nhost: localhost\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n", 400),
        (b"GET /SECRET HTTP/1.1 junk\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nhost: localhost\r\ncontent-length: " + b"9" * 5000 + b"\r\n\r\n", 400),
    ],
    ids=["headers", "content-length", "chunked-body", "both-lengths", "bad-request-line", "content-length-digits"],
)
def test_http_reader_refuses_with_the_same_status_at_any_split(data: bytes, status: int) -> None:
    limits = {"max_headers": 3, "max_body_bytes": 100}
    expected = http_events([data], **limits)
    assert expected[-1] == ("error", status)
    assert http_events([data[i : i + 1] for i in range(len(data))], **limits)[-1] == ("error", status)
    with pytest.raises(rally.ProtocolError) as info:
        reader = rally._HttpReader(rally._Limits(**limits))
        reader.feed(data)
        while reader.next_event() is not None:
            pass
    assert b"SECRET" not in str(info.value).encode()


# The fast path of _HttpReader against h11 (as the WebSocket fast path is
# checked against wsproto above): on any input, split anywhere, it gives what
# a reader that hands every request to h11 gives, or hands the input to h11.


def reader_trace(chunks: list[bytes], fast: bool, later: bool = False, **limits: Any) -> tuple[list[Any], list[bool]]:
    """Everything an ``_HttpReader`` shows of ``chunks``, driven as
    ``_HttpConn`` drives it: each event with ``done`` after it, ``trailing``
    and ``next_cycle()``'s answer once a request is whole (the next cycle
    starts only when ``done``), a refusal with its status, text and the
    request it refused. With ``later``, each answer comes after the next
    chunk was fed, and one more ``next_event`` before it shows what the
    reader does with a whole request and bytes after it. Second: per
    request whole or refused, whether h11 read it."""
    reader = rally._HttpReader(rally._Limits(**limits), fast=fast)
    out: list[Any] = []
    h11_used: list[bool] = []
    answering = False
    try:
        for chunk in chunks:
            reader.feed(chunk)
            if answering:  # as h11 before next_cycle: nothing yet (PAUSED), or the end of the stream
                out.append(("later", reader.next_event() is rally._EOF, reader.done))
                out.append(("next", reader.next_cycle()))
                answering = False
            while (event := reader.next_event()) is not None:
                if isinstance(event, rally._Request):
                    out.append(("head", request_fields(event), reader.done))
                elif isinstance(event, bytes):
                    out.append(("data", event, reader.done))
                elif event is rally._END:
                    out.append(("end", reader.done, reader.trailing))
                    h11_used.append(reader.h11 is not None)
                    if reader.done:
                        if later:
                            answering = True
                            break
                        out.append(("next", reader.next_cycle()))
                else:
                    assert event is rally._EOF
                    out.append(("eof", reader.done))
                    return out, h11_used
            out.append(("wait", reader.done, reader.trailing))
    except rally.ProtocolError as exc:
        h11_used.append(reader.h11 is not None)
        out.append(("error", exc.status, str(exc), request_fields(reader.request), reader.done, reader.trailing))
    return out, h11_used


def request_fields(req: rally._Request | None) -> tuple[Any, ...] | None:
    """A ``_Request`` as plain values (h11's ``Headers`` as a list)."""
    return None if req is None else (*req[:6], list(req.raw_headers), *req[7:])


_VCHARS = bytes(range(0x21, 0x7F)).decode()
_METHODS = ["GET", "POST", "HEAD", "PUT", "OPTIONS", "DELETE", "get", "M-SEARCH", "X!#$%&'*+.^_`|~"]
_TARGETS = ["/", "/_rally/rpc", "/articles/a%20b?x=1", "/%zz", "*", "http://a.test/x?y", "/?" + _VCHARS]
_NAMES = ["content-type", "Cookie", "origin", "rally-page", "accept", "x-a", "X-A", "via", "A!#$%&'*+-.^_`|~z"]
_CONNECTION = ["keep-alive", "close", "Close", "keep-alive, close", "upgrade", "closed", "a,close ,b", ""]
_OWS = ["", " ", "  ", "\t", " \t "]


T = typing.TypeVar("T")


class Choices:
    """Choices made by bytes that hypothesis draws: each choice reads the
    next byte, 0 once they run out, and 0 picks the simplest option. One
    drawn byte string makes a whole example (thousands of examples run in
    seconds, where a draw per choice takes minutes), and hypothesis still
    shrinks a failure, toward fewer and smaller bytes: simpler requests."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def below(self, n: int) -> int:
        """A number from 0 to ``n - 1`` (``n`` at most 256)."""
        byte = self.data[self.at] if self.at < len(self.data) else 0
        self.at += 1
        return byte % n

    def pick(self, options: typing.Sequence[T]) -> T:
        return options[self.below(len(options))]

    def text(self, alphabet: str, max_size: int) -> str:
        return "".join(self.pick(alphabet) for _ in range(self.below(max_size + 1)))


#: Ways to make a request that may not be plain, each changing its lines
#: (the request line, then header lines) or its body.
_MUTATIONS = [
    "version",
    "request_line_space",
    "obs_fold",
    "transfer_encoding",
    "expect",
    "upgrade",
    "content_length",
    "second_content_length",
    "no_host",
    "second_host",
    "bad_byte",
    "lf_line_ends",
    "space_before_colon",
    "value_bytes",
    "leading_blank_line",
    "body_length",
    "connect",
    "name_case",
    "lf_head_end",
]


def http_request(c: Choices) -> tuple[bytes, bool]:
    """One request's bytes, and whether it is plain (the fast path must read it)."""
    target = c.pick(_TARGETS) + c.text(_VCHARS, 6)
    body = c.text(_VCHARS, 24).encode()
    lines = [f"{c.pick(_METHODS)} {target} HTTP/1.1".encode()]
    fields = [("Host", c.pick(["localhost", "a.test:8000", "", "x y"]))]
    fields += [(c.pick(_NAMES), c.text(_VCHARS + "   ", 12).strip()) for _ in range(c.below(5))]
    if not c.below(4):
        fields.append(("connection", c.pick(_CONNECTION)))
    if body or c.below(2):
        fields.insert(c.below(len(fields) + 1), ("Content-Length", str(len(body))))
    before, after = c.pick(_OWS), c.pick(_OWS)
    lines += [f"{name}:{before}{value}{after if value else ''}".encode() for name, value in fields]
    mutations = [c.pick(_MUTATIONS) for _ in range(c.pick([0, 0, 0, 1, 2]))]
    for mutation in mutations:
        lines, body = mutate(c, mutation, lines, body)
    return b"\r\n".join([*lines, b"", b""]) + body, not mutations


def mutate(c: Choices, mutation: str, lines: list[bytes], body: bytes) -> tuple[list[bytes], bytes]:
    """``lines`` and ``body`` changed by one of ``_MUTATIONS``."""
    lines = list(lines)
    at = 1 + c.below(len(lines))  # where a header line goes
    line = c.below(len(lines))  # which line changes
    if mutation == "version":
        version = c.pick([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 ", b"HTTP/11", b"HTTP/1.1\t"])
        lines[0] = lines[0].replace(b"HTTP/1.1", version)
    elif mutation == "request_line_space":
        old, new = c.pick([(b" ", b"  "), (b" ", b"\t"), (b" /", b" "), (b"/", b" /"), (b"", b" ")])
        lines[0] = lines[0].replace(old, new, 1)
    elif mutation == "obs_fold":
        lines.insert(at, c.pick([b" folded", b"\tfolded", b"  "]))
    elif mutation == "transfer_encoding":
        lines.insert(at, b"Transfer-Encoding: " + c.pick([b"chunked", b"Chunked", b"gzip", b"chunked, gzip", b""]))
        if c.below(2):
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    elif mutation == "expect":
        lines.insert(at, b"Expect: " + c.pick([b"100-continue", b"100-Continue", b"x"]))
    elif mutation == "upgrade":
        lines.insert(at, b"Upgrade: " + c.pick([b"websocket", b"h2c", b""]))
    elif mutation == "content_length":
        lines = [line for line in lines if not line.lower().startswith(b"content-length")]
        value = c.pick([b"+5", b"5, 5", b"5,6", b"0x10", b"", b"-1", b"007", b"1" * 18, b"1" * 19, b"9" * 25, b" 3 "])
        lines.insert(min(at, len(lines)), b"Content-Length:" + value)
    elif mutation == "second_content_length":
        lines.insert(at, b"content-length: %d" % (len(body) + c.below(2)))
    elif mutation == "no_host":
        lines = [line for line in lines if not line.lower().startswith(b"host")]
    elif mutation == "second_host":
        lines.insert(at, b"HOST: " + c.pick([b"localhost", b"other"]))
    elif mutation == "bad_byte":
        pos = c.below(min(len(lines[line]) + 1, 256))
        byte = bytes([c.pick(b"\x00\x01\t\n\r \x7f\x80\xff:,") if c.below(2) else c.below(256)])
        lines[line] = lines[line][:pos] + byte + lines[line][pos + c.below(2) :]
    elif mutation == "lf_line_ends":
        joined = b"\r\n".join(lines)
        lines = [joined.replace(b"\r\n", b"\n", c.pick([-1, 1, 2]))]  # and the CRLFCRLF after: a bare LF before it
    elif mutation == "space_before_colon":
        lines[line] = lines[line].replace(b":", c.pick([b" :", b"\t:"]), 1)
    elif mutation == "value_bytes":
        inside = c.pick([b"\x00", b"\x01", b"\x7f", b"\x80", b"\xe9", b"\r", b"\t", b"\x0b", b"\x0c", b"\t\t"])
        lines.insert(at, b"x-v: a" + inside + b"b")
    elif mutation == "leading_blank_line":
        lines.insert(0, c.pick([b"", b"\n", b" "]))
    elif mutation == "body_length":
        body = body + b"xyz"[: 1 + c.below(3)] if c.below(2) else body[: len(body) // 2]
    elif mutation == "connect":
        lines[0] = b"CONNECT " + lines[0].partition(b" ")[2]
    elif mutation == "lf_head_end":  # h11 ends the head at the first "\n\n" or "\n\r\n"
        lines[-1] += c.pick([b"\n", b"\n\n", b"\r\n\n"])
    elif mutation == "name_case":
        lines = [lines[0]] + [line.swapcase() if b":" in line else line for line in lines[1:]]
    return lines, body


@settings(max_examples=10_000, deadline=None)
@given(
    choices=st.binary(min_size=400, max_size=400),
    eof=st.booleans(),
    limits=st.sampled_from(
        [{}, {}, {}, {"max_headers": 3}, {"max_head_bytes": 80}, {"max_head_bytes": 150, "max_body_bytes": 10}]
    ),
)
def test_http_fast_path_matches_h11_or_hands_the_request_to_it(
    choices: bytes, eof: bool, limits: dict[str, int]
) -> None:
    """One to three requests, plain or mutated, pipelined, then maybe the
    start of another or bytes that are none, cut anywhere into feeds."""
    c = Choices(choices)
    count, tail = 1 + c.below(3), c.pick([b"", b"GET / HT", b"\r\n", b"x", b"\n"])
    cuts = [c.below(256) + 256 * c.below(3) for _ in range(c.below(6))]
    requests = [http_request(c) for _ in range(count)]
    chunks = splits(b"".join(request for request, _ in requests) + tail, cuts) + ([b""] if eof else [])
    later = not c.below(4)
    fast, h11_used = reader_trace(chunks, fast=True, later=later, **limits)
    assert fast == reader_trace(chunks, fast=False, later=later, **limits)[0]
    if all(plain for _, plain in requests):  # plain requests never reach h11
        assert not any(h11_used[: len(requests)]), fast


def test_http_reader_reads_plain_requests_without_h11(monkeypatch: pytest.MonkeyPatch) -> None:
    browser = (
        b"GET /articles/a%20b?x=1 HTTP/1.1\r\nHost: localhost:8000\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n"
        b"Accept: text/html,application/xhtml+xml;q=0.9,*/*;q=0.8\r\nCookie: rally_session=abc.def\r\n"
        b"Connection: keep-alive\r\n\r\n"
    )
    rpc = (
        b"POST /_rally/rpc HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    )
    last = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    chunks = [browser + rpc[:30], rpc[30:] + last, b""]
    expected = reader_trace(chunks, fast=False)[0]
    assert [e[0] for e in expected] == [
        *("head", "end", "next", "wait"),
        *("head", "data", "end", "next", "head", "end", "wait"),
        "eof",
    ]

    def no_h11(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a plain request reached h11")

    monkeypatch.setattr(h11, "Connection", no_h11)
    assert reader_trace(chunks, fast=True) == (expected, [False, False, False])


def test_http_reader_reads_a_websocket_handshake_without_h11(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade pauses the reader as h11 does: not done, the frames behind it ``trailing``."""
    handshake = (
        b"GET /_rally/ws?page=/ HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    chunks = [handshake[:50], handshake[50:] + b"\x81\x82", b"abcdef", b""]
    expected = reader_trace(chunks, fast=False)[0]
    assert [e[0] for e in expected] == ["wait", "head", "end", "wait", "wait", "wait"]
    assert expected[2][1:] == (False, b"\x81\x82") and expected[-1][2] == b"\x81\x82abcdef"

    def no_h11(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a WebSocket handshake reached h11")

    monkeypatch.setattr(h11, "Connection", no_h11)
    assert reader_trace(chunks, fast=True) == (expected, [False])


@pytest.mark.parametrize(
    "data",
    [
        b"POST /r HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabcGET",
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\nGET / HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\nGET / HTTP/1.0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x80",
    ],
    ids=["close-then-more", "fold-after-plain", "bare-lf", "chunked-then-plain", "upgrade"],
)
def test_http_fast_path_matches_h11_at_every_split(data: bytes) -> None:
    for eof, later in itertools.product(([], [b""]), (False, True)):
        whole = reader_trace([data, *eof], fast=False, later=later)[0]
        assert reader_trace([data, *eof], fast=True, later=later)[0] == whole
        for cut in range(1, len(data)):
            chunks = [data[:cut], data[cut:], *eof]
            assert reader_trace(chunks, fast=True, later=later)[0] == reader_trace(chunks, fast=False, later=later)[0]
        one_byte = [data[i : i + 1] for i in range(len(data))] + eof
        assert reader_trace(one_byte, fast=True, later=later)[0] == reader_trace(one_byte, fast=False, later=later)[0]


# ==== The client's HTTP: the fast path against h11 ===========================

#: Ways to make a response that may not be plain: those of requests that
#: mean the same in a response (``mutate``), and a response's own.
_RESPONSE_MUTATIONS = [
    *("obs_fold", "transfer_encoding", "content_length", "second_content_length", "bad_byte"),
    *("lf_line_ends", "space_before_colon", "value_bytes", "body_length"),
    *("version", "status_line", "no_content_length", "informational", "switch", "no_body_status"),
]


def client_request(c: Choices) -> tuple[str, str, list[tuple[str, str]], bytes]:
    """A request as ``Client`` makes one (sometimes one h11 refuses or writes itself)."""
    method = c.pick(["GET", "POST", "HEAD", "POST", "CONNECT", "G T"])
    target = c.pick(["/_rally/rpc", "/_rally/ws?page=/room&last=0", "/x y", "/é"])
    body = c.text(_VCHARS, 8).encode() if method == "POST" else b""
    headers = [("host", c.pick(["127.0.0.1:8000", "a b", "h\r\nx: y"]))]
    headers += [(c.pick(_NAMES + ["bad name", "é"]), c.text(_VCHARS + "  ", 8).strip()) for _ in range(c.below(3))]
    if not c.below(4):
        headers.append(("upgrade", c.pick(["websocket", "", " , "])))
    if not c.below(6):
        headers.append(("connection", c.pick(_CONNECTION)))
    if body or c.below(2):
        headers.append(("content-length", c.pick([str(len(body))] * 5 + ["9", "x"])))
    if not c.below(8):
        headers.insert(0, c.pick([("Host", "other"), ("transfer-encoding", "chunked"), ("x", " padded ")]))
    return method, target, headers, body


def http_response(c: Choices) -> tuple[bytes, int, bool]:
    """One response's bytes, its status, and whether it is plain (not
    changed by one of ``_RESPONSE_MUTATIONS``)."""
    body = c.text(_VCHARS, 24).encode()
    status = c.pick([200, 200, 404, 500, 101, 204, 304, 302])
    lines = [f"HTTP/1.1 {status} {c.pick(['OK', '', 'Not Found', 'a  b'])}".encode()]
    fields = [(c.pick(_NAMES + ["set-cookie", "sec-websocket-accept"]), c.text(_VCHARS + "   ", 12).strip())]
    fields += [(c.pick(_NAMES), c.text(_VCHARS, 6)) for _ in range(c.below(3))]
    if not c.below(4):
        fields.append(("connection", c.pick(_CONNECTION)))
    fields.insert(c.below(len(fields) + 1), ("Content-Length", str(len(body))))
    before, after = c.pick(_OWS), c.pick(_OWS)
    lines += [f"{name}:{before}{value}{after if value else ''}".encode() for name, value in fields]
    mutations = [c.pick(_RESPONSE_MUTATIONS) for _ in range(c.pick([0, 0, 1, 2]))]
    for mutation in mutations:
        lines, body = mutate_response(c, mutation, lines, body)
    return b"\r\n".join([*lines, b"", b""]) + body, status, not mutations


def mutate_response(c: Choices, mutation: str, lines: list[bytes], body: bytes) -> tuple[list[bytes], bytes]:
    """``lines`` and ``body`` of a response changed by one of ``_RESPONSE_MUTATIONS``."""
    lines = list(lines)
    if mutation == "version":
        lines[0] = lines[0].replace(b"HTTP/1.1", c.pick([b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 "]))
    elif mutation == "status_line":
        lines[0] = c.pick([b"HTTP/1.1 200", b"HTTP/1.1 20 OK", b"HTTP/1.1 600 X", b"HTTP/1.1 099 X", b"HTTP/1.1  2 OK"])
    elif mutation == "no_content_length":
        lines = [x for x in lines if not x.lower().startswith(b"content-length")]
    elif mutation == "informational":
        lines.insert(0, c.pick([b"HTTP/1.1 100 Continue\r\n", b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n"]))
    elif mutation == "switch":
        lines[0] = b"HTTP/1.1 101 Switching Protocols"
        body = c.pick([b"", b"\x81\x02hi", body])
    elif mutation == "no_body_status":
        lines[0] = c.pick([b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 199 X"])
    else:
        return mutate(c, mutation, lines, body)
    return lines, body


def exchange_trace(request: tuple[str, str, list[tuple[str, str]], bytes], chunks: list[bytes], fast: bool) -> Any:
    """What an ``_HttpExchange`` makes of ``chunks``: its request bytes as h11
    reads them, and after each feed the response (with ``reusable`` and
    ``trailing``), or the refusal. Second: h11 wrote the request, h11 read
    the response."""
    try:
        exchange = rally._HttpExchange(*request, fast=fast)
    except (h11.LocalProtocolError, UnicodeError) as exc:
        return [("refused request", type(exc), str(exc))], (True, True)
    wrote = exchange.h11 is not None
    server = h11.Connection(h11.SERVER)
    server.receive_data(exchange.request)
    head = server.next_event()
    sent = (head.method, head.target, list(head.headers), server.next_event())  # type: ignore[union-attr]
    out: list[Any] = [sent]
    try:
        for chunk in chunks:
            exchange.feed(chunk)
            response = exchange.response()
            if response is not None:
                out.append(("response", response, exchange.reusable, exchange.trailing))
                break
            out.append("wait")
    except h11.RemoteProtocolError as exc:
        out.append(("error", str(exc), exc.error_status_hint))
    return out, (wrote, exchange.h11 is not None)


@settings(max_examples=3_000, deadline=None)
@given(choices=st.binary(min_size=300, max_size=300), eof=st.booleans())
def test_client_http_fast_path_matches_h11_or_hands_the_response_to_it(choices: bytes, eof: bool) -> None:
    """A request, a response (plain or mutated) and maybe more bytes, cut
    anywhere: the fast path answers as h11, and reads plain ones itself."""
    c = Choices(choices)
    request = client_request(c)
    response, status, plain = http_response(c)
    tail = c.pick([b"", b"HTTP/1.1 200 OK\r\n", b"\x81\x00"])
    cuts = [c.below(256) for _ in range(c.below(5))]
    chunks = splits(response + tail, cuts) + ([b""] if eof else [])
    fast, (h11_wrote, h11_read) = exchange_trace(request, chunks, fast=True)
    assert fast == exchange_trace(request, chunks, fast=False)[0]
    upgrade = any(n == "upgrade" and v.strip(" ,") for n, v in request[2])
    if plain and not h11_wrote and (status != 101 or upgrade) and fast[-1][0] == "response":
        assert not h11_read, fast  # plain responses never reach h11


def test_client_hands_a_response_head_past_its_bound_to_h11_which_refuses_it() -> None:
    """A partial response head of _MAX_RESPONSE_HEAD_BYTES (N) waits for the
    rest; one byte more (N + 1) goes to h11, which refuses it as it would
    have without the fast path."""
    request = ("GET", "/", [("host", "a")], b"")
    n = rally._MAX_RESPONSE_HEAD_BYTES
    head = b"HTTP/1.1 200 OK\r\nx: " + b"a" * (n - 22) + b"\r\n"
    assert len(head) == n
    waiting = rally._HttpExchange(*request)
    waiting.feed(head)
    assert waiting.response() is None and waiting.h11 is None
    waiting.feed(b"content-length: 0\r\n\r\n")  # the head is whole: read, however long
    assert waiting.response() == (200, [(b"x", b"a" * (n - 22)), (b"content-length", b"0")], b"")
    for exchange in (rally._HttpExchange(*request), rally._HttpExchange(*request, fast=False)):
        exchange.feed(head + b"b")
        with pytest.raises(h11.RemoteProtocolError):
            exchange.response()


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "h11"])
def test_client_refuses_a_content_length_of_more_digits_than_int_takes(fast: bool) -> None:
    """h11 0.14 raised a ValueError for it, later versions RemoteProtocolError: the client raises the latter."""
    exchange = rally._HttpExchange("GET", "/", [("host", "x")], fast=fast)
    exchange.feed(b"HTTP/1.1 200 OK\r\ncontent-length: " + b"9" * 5000 + b"\r\n\r\nabc")
    with pytest.raises(h11.RemoteProtocolError):
        exchange.response()


def test_client_reads_plain_responses_and_frames_without_h11_or_wsproto(monkeypatch: pytest.MonkeyPatch) -> None:
    request = ("POST", "/_rally/rpc", [("host", "127.0.0.1:80"), ("content-length", "2")], b"{}")
    response = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n{"kind":"ok"}\n'
    upgrade = ("GET", "/_rally/ws?page=/", [("host", "a"), ("upgrade", "websocket"), ("connection", "Upgrade")], b"")
    switched = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n\x81\x02hi"
    expected = [exchange_trace(request, [response], fast=False), exchange_trace(upgrade, [switched], fast=False)]

    def refused(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("h11 or wsproto was used")

    monkeypatch.setattr(h11.Connection, "receive_data", refused)
    monkeypatch.setattr(h11.Connection, "send", refused)
    exchange = rally._HttpExchange(*request)
    exchange.feed(response[:30])
    assert exchange.response() is None and not exchange.started
    exchange.feed(response[30:])
    headers = [(b"content-type", b"application/json"), (b"content-length", b"14")]
    assert exchange.response() == (200, headers, b'{"kind":"ok"}\n')
    assert exchange.reusable and exchange.trailing == b""
    monkeypatch.undo()
    assert [exchange_trace(request, [response], fast=True), exchange_trace(upgrade, [switched], fast=True)] == [
        (expected[0][0], (False, False)),
        (expected[1][0], (False, False)),
    ]
    # A page's frames from the server: read and written without wsproto, as wsproto would.
    monkeypatch.setattr(wsproto.connection.Connection, "receive_data", refused)
    monkeypatch.setattr(wsproto.connection.Connection, "send", refused)
    reader = rally._WsReader(sys.maxsize, client=True)
    reader.feed(rally._ws_frame(b"hello") + rally._ws_frame("é".encode() * 200))
    assert [reader.next_event(), reader.next_event(), reader.next_event()] == ["hello", "é" * 200, None]
    frame = reader.send(wsproto.events.TextMessage(data="x" * 300))
    monkeypatch.undo()
    server = wsproto.connection.Connection(wsproto.connection.ConnectionType.SERVER)
    server.receive_data(frame)
    assert [(type(e), e.data) for e in server.events()] == [(wsproto.events.TextMessage, "x" * 300)]


async def test_websocket_messages_survive_any_split_of_the_byte_stream() -> None:
    app = rally.App()

    @app.websocket("/echo")
    async def echo(ws: rally.WebSocket) -> None:
        while True:
            await ws.send(await ws.receive())

    data, messages = client_frames()
    handshake = (
        b"GET /echo HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    )
    rng = random.Random(11)
    async with running(app) as server:
        for _ in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(handshake)
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            cuts = sorted(rng.sample(range(1, len(data)), 8))
            for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
                writer.write(data[a:b])
                await writer.drain()
            client = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT)
            got: list[str | bytes] = []
            partial: list[Any] = []
            while len(got) < len(messages):
                client.receive_data(await asyncio.wait_for(reader.read(65536), WAIT))
                for event in client.events():
                    if isinstance(event, wsproto.events.Message):
                        partial.append(event.data)
                        if event.message_finished:
                            got.append(partial[0][:0].join(partial))
                            partial = []
            assert got == messages
            writer.close()


def test_ws_accept_matches_rfc_6455_example() -> None:
    assert rally._ws_accept(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        (None, "a.test", (), True),
        ("http://a.test", "a.test", (), True),
        ("https://a.test:8443", "a.test:8443", (), True),
        ("http://evil.test", "a.test", (), False),
        ("null", "a.test", (), False),
        ("null", "a.test", ("null",), True),
        ("http://b.test", "a.test", ("http://b.test",), True),
        ("ftp://a.test", "a.test", (), False),
    ],
)
def test_origin_rule(origin: str | None, host: str, allowed: tuple[str, ...], ok: bool) -> None:
    assert rally._origin_allowed(origin, host, frozenset(allowed)) is ok


def test_html_boot_escapes_script_end() -> None:
    html = rally._html_boot("<html><head></head><body></body></html>", {"page": "/</script><x>"})
    assert "</script><x>" not in html
    assert html.index("rally-boot") < html.index("</head>")


def test_session_cookie_flags_and_signature() -> None:
    secret = b"k" * 32
    cookie = rally._session_cookie("ab" * 16, secret, False)
    value = cookie.split(b";")[0].split(b"=")[1].decode()
    assert value.startswith("ab" * 16 + ".") and len(value) == 65
    assert cookie.endswith(b"; Path=/; HttpOnly; SameSite=Lax")
    assert rally._session_cookie("ab" * 16, secret, True).endswith(b"; Secure")
    assert len(rally._new_session_id()) == 32
    assert rally._session_from_cookie("a=1; rally_session=" + value, secret) == "ab" * 16
    assert rally._session_from_cookie("rally_session=" + value, b"other" * 8) is None
    assert rally._session_from_cookie("rally_session=" + "ab" * 16, secret) is None  # unsigned
    forged = "ab" * 16 + "." + "0" * 32
    assert rally._session_from_cookie("rally_session=" + forged, secret) is None
    assert rally._session_from_cookie("rally_session=../../etc", secret) is None


# ==== Registration ==========================================================


def registration_error(namespace: Any, path: str = "/p/{slug}") -> str:
    with pytest.raises(rally.RegistrationError) as info:
        rally.App().page(path, namespace)
    return str(info.value)


def test_registration_missing_message_annotation() -> None:
    class P:
        def server_go(msg) -> rally.Result[str, str]:  # type: ignore[no-untyped-def]
            return rally.Ok("")

    message = registration_error(P, "/p")
    assert "server_go" in message and "'msg'" in message and "no annotation" in message


def test_registration_unsupported_field_type_names_handler_parameter_and_type() -> None:
    @dataclass
    class Tags:
        tags: set[str]

    class P:
        def server_tag(msg: Tags) -> rally.Result[str, str]:
            return rally.Ok("")

    message = registration_error(P, "/p")
    assert "server_tag" in message and "'msg'" in message and "Tags.tags" in message and "set[str]" in message


def test_registration_unsupported_return_type() -> None:
    class P:
        def server_go(msg: Point) -> rally.Result[complex, str]:
            return rally.Ok(1j)

    message = registration_error(P, "/p")
    assert "server_go" in message and "return type" in message and "complex" in message


def test_registration_missing_return_annotation() -> None:
    class P:
        def server_go(msg: Point):  # type: ignore[no-untyped-def]
            return rally.Ok(1)

    assert "missing return annotation" in registration_error(P, "/p")


def test_registration_message_type_used_by_two_handlers() -> None:
    app = rally.App()

    @app.rpc
    def server_a(msg: Point) -> int:
        return 1

    with pytest.raises(rally.RegistrationError, match="Point is already handled by server_a"):

        @app.rpc
        def server_b(msg: Point) -> int:
            return 2


def test_registration_two_types_with_one_name() -> None:
    app = rally.App()

    @app.rpc
    def server_a(msg: Point) -> int:
        return 1

    def server_b(msg: Any) -> int:
        return 2

    server_b.__annotations__ = {"msg": dataclasses.make_dataclass("Point", [("z", int)]), "return": int}
    with pytest.raises(rally.RegistrationError, match="two different types are named 'Point'"):
        app.rpc(server_b)


def test_registration_route_param_not_accepted_by_server_init() -> None:
    class P:
        def server_init(server_context: rally.ServerContext) -> tuple[ServerModel, rally.Effect[ToClient]]:
            return ServerModel(1), rally.effect.none()

    message = registration_error(P, "/p/{slug}")
    assert "server_init" in message and "'slug'" in message


def test_registration_route_param_type_must_be_str_int_or_float() -> None:
    class P:
        def server_init(slug: bytes) -> tuple[ServerModel, rally.Effect[ToClient]]:
            return ServerModel(1), rally.effect.none()

    message = registration_error(P, "/p/{slug}")
    assert "server_init" in message and "'slug'" in message and "bytes" in message


def test_registration_update_without_init() -> None:
    class P:
        def server_update(model: ServerModel, msg: ToServer) -> tuple[ServerModel, rally.Effect[ToClient]]:
            return model, rally.effect.none()

    assert "server_update without server_init" in registration_error(P, "/p")


def test_registration_update_message_must_be_dataclasses() -> None:
    class P:
        def server_init() -> tuple[ServerModel, rally.Effect[ToClient]]:
            return ServerModel(1), rally.effect.none()

        def server_update(model: ServerModel, msg: int) -> tuple[ServerModel, rally.Effect[ToClient]]:
            return model, rally.effect.none()

    message = registration_error(P, "/p")
    assert "server_update" in message and "'msg'" in message and "int" in message


def test_registration_init_return_must_be_model_and_effect() -> None:
    class P:
        def server_init() -> ServerModel:
            return ServerModel(1)

    message = registration_error(P, "/p")
    assert "server_init" in message and "tuple[Model, rally.Effect[ToClient]]" in message


def test_registration_route_twice_and_reserved_paths() -> None:
    app = article_app()
    with pytest.raises(rally.RegistrationError, match="registered twice"):
        app.page("/articles/{slug}", Article)
    with pytest.raises(rally.RegistrationError, match="must start with /"):
        app.page("/_rally/x", Article)


def test_registration_broker_option_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RALLY_BROKER", raising=False)
    assert rally.App().broker is None
    for bad in ("http://localhost:6379", "", "redis://localhost:port"):
        with pytest.raises(rally.RegistrationError, match="expected a redis://, rediss:// or unix:// URL"):
            rally.App(broker=bad)
    with pytest.raises(rally.RegistrationError, match="expected a redis:// URL or a rally.RedisBroker"):
        rally.App(broker=6379)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)  # as if the redis package were not installed
    with pytest.raises(rally.RegistrationError, match=r"pip install 'rally-py\[redis\]'"):
        rally.App(broker="redis://localhost:6379/0")
    monkeypatch.setenv("RALLY_BROKER", "redis://localhost:6379/0")
    with pytest.raises(rally.RegistrationError, match="needs the redis package"):
        rally.App()


def test_registration_page_from_a_module() -> None:
    import types

    module = types.ModuleType("article_module")
    module.html = "<p>module page</p>"  # type: ignore[attr-defined]
    module.server_load_title = Article.server_load_title  # type: ignore[attr-defined]
    app = rally.App()
    app.page("/m", module)
    assert "ServerLoadTitle" in app.contract["rpc"]


# A newcomer's page: the page functions written as methods, one at a time.
SELF_PAGE = """
@dataclass
class Model:
    n: int
@dataclass
class Bump: ...
@dataclass
class Bumped:
    n: int
@dataclass
class Meta:
    name: str
@dataclass
class Ping: ...

class Counter:
    def view(slug: str) -> str:
        return "<p>counter</p>"
    def server_init(slug: str) -> tuple[Model, rally.Effect[Bumped]]:
        return Model(0), rally.effect.none()
    def server_update(model: Model, msg: Bump) -> tuple[Model, rally.Effect[Bumped]]:
        return Model(model.n + 1), rally.effect.none()
    def server_event(model: Model, msg: Bump) -> tuple[Model, rally.Effect[Bumped]]:
        return model, rally.effect.none()
    def server_terminate(model: Model) -> rally.Effect[Bumped]:
        return rally.effect.none()
    def server_presence(model: Model) -> Meta:
        return Meta("ann")
    def server_ping(msg: Ping) -> str:
        return "pong"
"""
SELF_PAGE_FUNCTIONS = ["view", "server_init", "server_update", "server_event", "server_terminate", "server_presence"]


def self_page(method: str | None) -> Any:
    """The page of SELF_PAGE, with ``method`` (if any) taking ``self`` first."""
    source = SELF_PAGE if method is None else SELF_PAGE.replace(f"def {method}(", f"def {method}(self, ")
    assert method is None or source != SELF_PAGE
    scope: dict[str, Any] = {"rally": rally, "dataclass": dataclass}
    exec(source, scope)
    return scope["Counter"]


def test_registration_self_page_is_fine_without_self() -> None:
    app = rally.App()
    app.page("/counter/{slug}", self_page(None))
    assert "Ping" in app.contract["rpc"]


@pytest.mark.parametrize("method", [*SELF_PAGE_FUNCTIONS, "server_ping"])
def test_registration_page_functions_take_no_self(method: str) -> None:
    message = registration_error(self_page(method), "/counter/{slug}")
    assert message.startswith(f"page Counter: {method}: page functions take no self: write def {method}(")
    assert "as a plain function in the class body (or mark it @staticmethod)" in message
    assert "not a parameter of route" not in message


def test_registration_app_rpc_on_a_method_takes_no_self() -> None:
    app = rally.App()
    with pytest.raises(rally.RegistrationError) as info:

        class Handlers:
            @app.rpc
            def server_ping(self, msg: Point) -> int:  # type: ignore[no-untyped-def]
                return msg.x

    assert str(info.value).startswith("@app.rpc ")
    assert "Handlers.server_ping: RPC functions take no self: write def server_ping(msg) as a module-level" in str(
        info.value
    )
    assert app.contract["rpc"] == {}


@dataclass
class LoadTitle:
    slug: str


def test_registration_a_function_taking_a_dataclass_without_the_server_prefix_is_refused() -> None:
    class P:
        def load_title(msg: LoadTitle) -> str:
            return msg.slug

    message = registration_error(P, "/p")
    assert message.startswith("page P: load_title(msg) takes a LoadTitle but is not an RPC")
    assert "a call of LoadTitle would answer unknown_type" in message
    assert "rename it server_load_title to make it an RPC (def server_load_title(msg))" in message

    class Method:
        def load_title(self, msg: LoadTitle) -> str:  # type: ignore[no-untyped-def]
            return msg.slug

    message = registration_error(Method, "/p")
    assert "rename it server_load_title and drop its self (page functions take no self)" in message


def test_registration_helpers_and_attributes_of_a_page_stay_allowed() -> None:
    @dataclass
    class Model:
        title: str

    @dataclass
    class Shown:
        title: str

    class P:
        html = "<p>p</p>"
        LIMIT = 3
        Card = Shown  # a type in the namespace

        def fmt(title: str) -> str:  # a helper without a dataclass first parameter
            return title.upper()

        def describe(model: Model) -> Shown:  # a helper of the page's own model
            return Shown(P.fmt(model.title))

        def _load(msg: LoadTitle) -> str:  # private: a helper by its name
            return msg.slug

        def server_init() -> tuple[Model, rally.Effect[Shown]]:
            return Model("t"), rally.effect.none()

        def server_load_title(msg: LoadTitle) -> str:
            return P._load(msg)

    app = rally.App()
    app.page("/p", P)
    assert list(app.contract["rpc"]) == ["LoadTitle"]

    class WithView:
        def view() -> str:
            return "<p>v</p>"

        def server_load_title(msg: LoadTitle) -> str:
            return msg.slug

    rally.App().page("/v", WithView)


def test_registration_a_module_page_ignores_imported_functions_and_its_own_rpcs() -> None:
    import types

    module = types.ModuleType("imports_module")
    module.__dict__.update(rally=rally, app=rally.App())
    exec(
        textwrap.dedent(
            """
            from dataclasses import dataclass, asdict, replace
            from test_rally import LoadTitle, Point

            html = "<p>module page</p>"

            @app.rpc
            def load(msg: LoadTitle) -> str:  # already an RPC
                return msg.slug
            """
        ),
        module.__dict__,
    )
    module.app.page("/m", module)
    assert set(module.app.contract["rpc"]) == {"LoadTitle"}
    exec("def move(p: Point) -> int:\n    return p.x\n", module.__dict__)
    with pytest.raises(rally.RegistrationError, match="rename it server_move"):
        module.app.page("/m2", module)


def test_contract_document_lists_types_rpcs_pages_and_hash() -> None:
    doc = article_app().contract
    assert doc["rpc"]["ServerLoadTitle"] == {"result": "str", "error": "list[str]"}
    assert doc["pages"]["/articles/{slug}"] == {
        "params": {"slug": "str"},
        "stateful": True,
        "to_server": "ToggleFavorite | AddComment",
        "to_client": "FavoriteToggled | CommentSaved",
        "presence": None,
    }
    assert doc["types"]["AddComment"] == {"fields": {"body": "str"}}
    assert len(doc["hash"]) == 16
    assert article_app().contract["hash"] == doc["hash"]
    changed = article_app()

    @changed.rpc
    def server_point(msg: Point) -> int:
        return msg.x

    assert changed.contract["hash"] != doc["hash"]


@dataclass
class Documented:
    """A message with a docstring.

    Its second paragraph, indented in the source."""

    text: str


@dataclass
class Undocumented:  # dataclasses writes "Undocumented(n: int = 0)" as its __doc__
    n: int = 0


@dataclass
class InheritsADocstring(Documented):
    pass


class Shade(enum.Enum):
    """A shade of grey."""

    LIGHT = "light"


class DocumentedPage:
    """The page's own docstring."""

    def server_init() -> tuple[int, rally.Effect[Undocumented]]:
        """Starts at zero."""
        return 0, rally.effect.none()

    def server_update(model: int, msg: Documented | InheritsADocstring) -> tuple[int, rally.Effect[Undocumented]]:
        return model + 1, rally.effect.send_to_client(Undocumented(model + 1))

    def server_shade(msg: Undocumented) -> Shade:
        """Answers a shade."""
        return Shade.LIGHT

    def server_plain(msg: ServerLoadTitle) -> str:
        return msg.slug


def test_contract_carries_written_docstrings_and_skips_generated_ones() -> None:
    assert Undocumented.__doc__ == "Undocumented(n: int = 0)"  # what the contract must not show
    app = rally.App()
    app.page("/documented", DocumentedPage)
    doc = app.contract
    written = "A message with a docstring.\n\nIts second paragraph, indented in the source."
    assert doc["types"]["Documented"]["doc"] == written
    assert "doc" not in doc["types"]["Undocumented"] and "doc" not in doc["types"]["InheritsADocstring"]
    assert doc["types"]["Shade"] == {"enum": ["light"], "doc": "A shade of grey."}
    assert doc["rpc"]["Undocumented"] == {"result": "Shade", "error": None, "doc": "Answers a shade."}
    assert "doc" not in doc["rpc"]["ServerLoadTitle"]
    page = doc["pages"]["/documented"]
    assert (page["doc"], page["hooks"]) == ("The page's own docstring.", {"server_init": "Starts at zero."})
    assert "doc" not in article_app().contract["pages"]["/articles/{slug}"]


# ==== End to end: HTTP ======================================================


async def eventually(condition: Any, what: str) -> None:
    """Wait for a condition the server reaches on its own (a close, say), with a bound."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached within {WAIT} s: {what}")
        await asyncio.sleep(0.005)


async def test_page_get_serves_html_with_boot_data_and_sets_session_cookie() -> None:
    async with running(article_app()) as server:
        [(response, body)] = responses(
            await exchange(server, b"GET /articles/hello HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        )
    headers = dict(response.headers)
    assert response.status_code == 200
    assert headers[b"content-type"] == b"text/html; charset=utf-8"
    cookie = headers[b"set-cookie"].decode()
    assert cookie.startswith("rally_session=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    text = body.decode()
    boot = json.loads(text.split('<script id="rally-boot" type="application/json">')[1].split("</script>")[0])
    assert boot["page"] == "/articles/hello" and boot["params"] == {"slug": "hello"}
    assert boot["contract"] == article_app().contract["hash"]
    assert '<script src="/_rally/client.js"></script>' in text and "<h1>Article</h1>" in text


async def test_page_get_keeps_an_existing_session_cookie_and_head_has_no_body() -> None:
    async with running(article_app()) as server:
        first = await exchange(server, b"GET /articles/x HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        [(response, _)] = responses(first)
        cookie = dict(response.headers)[b"set-cookie"].split(b";")[0]
        request = (
            b"HEAD /articles/x HTTP/1.1\r\nhost: localhost\r\ncookie: " + cookie + b"\r\nconnection: close\r\n\r\n"
        )
        raw = await exchange(server, request)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"set-cookie" not in raw.lower()
    assert raw.endswith(b"\r\n\r\n")


async def test_int_route_param_converts_and_non_integer_is_404() -> None:
    seen: list[Any] = []

    class Item:
        def view(id: int) -> str:
            seen.append(id)
            return f"<p>item {id}</p>"

    app = rally.App()
    app.page("/items/{id}", Item)
    async with running(app) as server:
        ok = responses(
            await exchange(server, b"GET /items/42 HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        )
        missing = responses(
            await exchange(server, b"GET /items/x42 HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        )
    assert ok[0][0].status_code == 200 and b"<p>item 42</p>" in ok[0][1]
    assert seen == [42]
    assert missing[0][0].status_code == 404 and missing[0][1]


@pytest.mark.parametrize(
    ("request_bytes", "status", "header"),
    [
        (b"GET /nowhere HTTP/1.1\r\nhost: localhost\r\n\r\n", 404, None),
        (b"GET /_rally/rpc HTTP/1.1\r\nhost: localhost\r\n\r\n", 405, (b"allow", b"OPTIONS, POST")),
        (b"POST /articles/x HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\n\r\n", 405, (b"allow", b"GET, HEAD")),
        (
            b"POST /_rally/rpc HTTP/1.1\r\nhost: localhost\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\n{}",
            415,
            None,
        ),
        (
            b"POST /_rally/rpc HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
            b"content-length: 2000000\r\n\r\n",
            413,
            None,
        ),
        (
            b"POST /_rally/rpc HTTP/1.1\r\nhost: localhost\r\norigin: http://evil.test\r\n"
            b"content-type: application/json\r\n"
            b"content-length: 2\r\n\r\n{}",
            403,
            None,
        ),
    ],
    ids=["404", "405-rpc", "405-page", "415", "413", "403"],
)
async def test_http_refusals_have_status_and_short_body(
    request_bytes: bytes, status: int, header: tuple[bytes, bytes] | None
) -> None:
    async with running(article_app()) as server:
        [(response, body)] = responses(await exchange(server, request_bytes, until_close=False))
    assert response.status_code == status
    assert 0 < len(body) < 200
    if header is not None:
        assert header in response.headers


async def test_client_js_has_etag_and_answers_304() -> None:
    async with running(article_app()) as server:
        [(first, body)] = responses(
            await exchange(server, b"GET /_rally/client.js HTTP/1.1\r\nhost: localhost\r\n\r\n", until_close=False)
        )
        etag = dict(first.headers)[b"etag"]
        again = b"GET /_rally/client.js HTTP/1.1\r\nhost: localhost\r\nif-none-match: " + etag + b"\r\n\r\n"
        [(second, empty)] = responses(await exchange(server, again, until_close=False))
    assert first.status_code == 200 and b"rally" in body
    assert dict(first.headers)[b"content-type"].startswith(b"application/javascript")
    assert second.status_code == 304 and empty == b""


# ==== End to end: conditional and range requests (RFC 9110) ===================

ETAGGED = ["/_rally/client.js", "/_rally/contract", "/_rally/types.d.ts", "/_rally/docs", "/s/hello.txt"]
OLD = 1_000_000_000  # an mtime: Sun, 09 Sep 2001 01:46:40 GMT
OLD_DATE = b"Sun, 09 Sep 2001 01:46:40 GMT"


def static_app(directory: Any) -> rally.App:
    """The Article app, with the files of ``directory`` at /s/."""
    app = article_app()
    app.static("/s/", directory)
    return app


def head_lines(*lines: bytes) -> bytes:
    return b"".join(line + b"\r\n" for line in lines)


async def fetch(server: rally.Server, path: str, *lines: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """GET ``path`` with header ``lines``, on a connection the server closes after."""
    request = b"GET %s HTTP/1.1\r\nhost: localhost\r\n%sconnection: close\r\n\r\n" % (path.encode(), head_lines(*lines))
    [(response, body)] = responses(await exchange(server, request))
    return response.status_code, dict(response.headers), body


@pytest.mark.parametrize("path", ETAGGED)
@pytest.mark.parametrize(
    "form",
    ["exact", "weak", "list", "weak-in-list", "two-lines", "star", "other", "weak-other", "malformed"],
)
async def test_if_none_match_compares_weakly_against_a_list_or_star(tmp_path: Any, path: str, form: str) -> None:
    (tmp_path / "hello.txt").write_text("hello")
    async with running(static_app(tmp_path)) as server:
        status, headers, _ = await fetch(server, path)
        etag = headers[b"etag"]
        lines = {
            "exact": [b"if-none-match: " + etag],
            "weak": [b"if-none-match: W/" + etag],
            "list": [b'if-none-match: "nope", ' + etag + b' ,"other"'],
            "weak-in-list": [b'if-none-match: "nope",W/' + etag],
            "two-lines": [b"if-none-match: " + etag, b'if-none-match: "nope"'],
            "star": [b"if-none-match: *"],
            "other": [b'if-none-match: "nope", W/"other"'],
            "weak-other": [b"if-none-match: W/" + etag[:-1] + b'x"'],
            "malformed": [b"if-none-match: " + etag[1:-1]],
        }[form]
        again, _, body = await fetch(server, path, *lines)
    assert status == 200
    assert again == (200 if form in ("other", "weak-other", "malformed") else 304)


@pytest.mark.parametrize("path", ETAGGED)
async def test_304_has_no_content_length_and_carries_the_200s_validators(tmp_path: Any, path: str) -> None:
    (tmp_path / "hello.txt").write_text("hello")
    async with running(static_app(tmp_path)) as server:
        _, first, _ = await fetch(server, path)
        request = b"GET %s HTTP/1.1\r\nhost: localhost\r\nif-none-match: %s\r\n" % (path.encode(), first[b"etag"])
        # Two on one connection: the first 304 ends where its head does.
        raw = await exchange(server, request + b"\r\n" + request + b"connection: close\r\n\r\n")
    (second, body), (third, _) = responses(raw)
    headers = dict(second.headers)
    assert (second.status_code, third.status_code, body) == (304, 304, b"")
    assert b"content-length" not in headers and b"content-type" not in headers
    kept = [b"etag", b"cache-control"] + ([b"last-modified"] if path.startswith("/s/") else [])
    assert {k: headers.get(k) for k in kept} == {k: first[k] for k in kept}


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"if-modified-since: " + OLD_DATE, 304),
        (b"if-modified-since: Sun, 09 Sep 2001 01:46:41 GMT", 304),
        (b"if-modified-since: Sunday, 09-Sep-01 01:46:40 GMT", 304),  # RFC 850, obsolete but accepted
        (b"if-modified-since: Sun Sep  9 01:46:40 2001", 304),  # asctime, obsolete but accepted
        (b"if-modified-since: Sun, 09 Sep 2001 01:46:39 GMT", 200),
        (b"if-modified-since: yesterday", 200),
        (b'if-none-match: "nope"\r\nif-modified-since: ' + OLD_DATE, 200),  # If-None-Match decides
    ],
)
async def test_static_last_modified_and_if_modified_since(tmp_path: Any, line: bytes, status: int) -> None:
    (tmp_path / "hello.txt").write_text("hello")
    os.utime(tmp_path / "hello.txt", (OLD, OLD))
    async with running(static_app(tmp_path)) as server:
        first, headers, _ = await fetch(server, "/s/hello.txt")
        again, again_headers, _ = await fetch(server, "/s/hello.txt", line)
    assert (first, headers[b"last-modified"]) == (200, OLD_DATE)
    assert again == status and again_headers[b"last-modified"] == OLD_DATE


async def test_last_modified_is_never_later_than_date(tmp_path: Any) -> None:
    (tmp_path / "future.txt").write_text("later")
    future = time.time() + 86400
    os.utime(tmp_path / "future.txt", (future, future))
    async with running(static_app(tmp_path)) as server:
        _, headers, _ = await fetch(server, "/s/future.txt")
    assert headers[b"last-modified"] == headers[b"date"]


DATA = bytes(random.Random(5).randrange(256) for _ in range(100_000))  # more than one 64 KiB piece
SIZE = len(DATA)


@pytest.mark.parametrize(
    ("value", "first", "last"),
    [
        (b"bytes=0-9", 0, 9),
        (b"bytes=70000-", 70000, SIZE - 1),  # from the second piece on: the slice starts mid-file
        (b"bytes=60000-70000", 60000, 70000),
        (b"bytes=-100", SIZE - 100, SIZE - 1),
        (b"bytes=-200000", 0, SIZE - 1),  # longer than the file: all of it
        (b"bytes=99990-200000", 99990, SIZE - 1),  # past the end: up to it
        (b"bytes=5-5", 5, 5),
        (b"Bytes= 7-8 ", 7, 8),
    ],
)
async def test_range_is_answered_206_with_content_range_and_the_slice(
    tmp_path: Any, value: bytes, first: int, last: int
) -> None:
    (tmp_path / "data.bin").write_bytes(DATA)
    async with running(static_app(tmp_path)) as server:
        status, headers, body = await fetch(server, "/s/data.bin", b"range: " + value)
    assert status == 206
    assert headers[b"content-range"] == b"bytes %d-%d/%d" % (first, last, SIZE)
    assert int(headers[b"content-length"]) == last - first + 1 and body == DATA[first : last + 1]


@pytest.mark.parametrize("value", [b"bytes=100000-", b"bytes=200000-300000", b"bytes=-0"])
async def test_unsatisfiable_range_is_answered_416_with_the_size(tmp_path: Any, value: bytes) -> None:
    (tmp_path / "data.bin").write_bytes(DATA)
    async with running(static_app(tmp_path)) as server:
        status, headers, body = await fetch(server, "/s/data.bin", b"range: " + value)
    assert status == 416 and headers[b"content-range"] == b"bytes */%d" % SIZE and DATA[:10] not in body


@pytest.mark.parametrize(
    "lines",
    [
        [],
        [b"range: bytes=0-1,5-6"],  # several ranges: served whole, as RFC 9110 section 14.2 allows
        [b"range: bytes=0-1, 5-6"],
        [b"range: bytes=5-1"],  # last before first: not a range
        [b"range: bytes=-"],
        [b"range: bytes=abc"],
        [b"range: bytes=1-2-3"],
        [b"range: items=0-1"],
        [b"range: bytes=0-1", b"range: bytes=2-3"],  # repeated
        [b"range: bytes=+1-2"],
    ],
    ids=["none", "several", "several-spaced", "backwards", "empty", "letters", "three", "unit", "repeated", "sign"],
)
async def test_no_or_ignored_range_is_answered_200_with_accept_ranges(tmp_path: Any, lines: list[bytes]) -> None:
    (tmp_path / "data.bin").write_bytes(DATA)
    async with running(static_app(tmp_path)) as server:
        status, headers, body = await fetch(server, "/s/data.bin", *lines)
    assert (status, body) == (200, DATA)
    assert headers[b"accept-ranges"] == b"bytes" and b"content-range" not in headers


@pytest.mark.parametrize(
    ("if_range", "status"),
    [
        ("etag", 206),
        ("weak-etag", 200),  # If-Range compares strongly: a weak tag never matches
        ("other-etag", 200),
        ("date", 206),
        ("other-date", 200),
        ("not-a-date", 200),
    ],
)
async def test_if_range_serves_the_range_only_when_it_matches(tmp_path: Any, if_range: str, status: int) -> None:
    (tmp_path / "data.bin").write_bytes(DATA)
    os.utime(tmp_path / "data.bin", (OLD, OLD))
    async with running(static_app(tmp_path)) as server:
        _, headers, _ = await fetch(server, "/s/data.bin")
        value = {
            "etag": headers[b"etag"],
            "weak-etag": b"W/" + headers[b"etag"],
            "other-etag": b'"other"',
            "date": OLD_DATE,
            "other-date": b"Sun, 09 Sep 2001 01:46:41 GMT",
            "not-a-date": b"soon",
        }[if_range]
        got, _, body = await fetch(server, "/s/data.bin", b"range: bytes=10-19", b"if-range: " + value)
        # The range is unsatisfiable; a failed If-Range makes it a 200 all the same.
        unsatisfiable, _, _ = await fetch(server, "/s/data.bin", b"range: bytes=900000-", b"if-range: " + value)
    assert (got, body) == ((206, DATA[10:20]) if status == 206 else (200, DATA))
    assert unsatisfiable == (416 if status == 206 else 200)


async def test_if_range_date_of_a_file_modified_this_second_does_not_match(tmp_path: Any) -> None:
    (tmp_path / "data.bin").write_bytes(DATA)
    now = int(time.time()) + 1  # the next second: never a second older than the Date
    os.utime(tmp_path / "data.bin", (now, now))
    async with running(static_app(tmp_path)) as server:
        _, headers, _ = await fetch(server, "/s/data.bin")
        status, _, _ = await fetch(
            server, "/s/data.bin", b"range: bytes=0-1", b"if-range: " + headers[b"last-modified"]
        )
    assert status == 200


async def test_range_on_head_and_matching_if_none_match_are_not_206(tmp_path: Any) -> None:
    (tmp_path / "data.bin").write_bytes(DATA)
    async with running(static_app(tmp_path)) as server:
        _, headers, _ = await fetch(server, "/s/data.bin")
        head = await exchange(
            server, b"HEAD /s/data.bin HTTP/1.1\r\nhost: localhost\r\nrange: bytes=0-9\r\nconnection: close\r\n\r\n"
        )
        cached, _, _ = await fetch(server, "/s/data.bin", b"range: bytes=0-9", b"if-none-match: " + headers[b"etag"])
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\ncontent-length: %d\r\n" % SIZE in head
    assert head.endswith(b"\r\n\r\n") and b"content-range" not in head
    assert cached == 304


@pytest.mark.parametrize(("value", "status", "body"), [(b"bytes=-5", 200, b""), (b"bytes=0-", 416, b"")])
async def test_range_on_an_empty_file(tmp_path: Any, value: bytes, status: int, body: bytes) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    async with running(static_app(tmp_path)) as server:
        got, headers, got_body = await fetch(server, "/s/empty.txt", b"range: " + value)
    assert got == status
    if status == 200:
        assert got_body == body
    else:
        assert headers[b"content-range"] == b"bytes */0"


async def test_ranges_keep_a_keep_alive_connection_framed(tmp_path: Any) -> None:
    (tmp_path / "data.bin").write_bytes(DATA)
    get = b"GET /s/data.bin HTTP/1.1\r\nhost: localhost\r\n%s\r\n"
    requests = [
        b"range: bytes=70000-70009\r\n",
        b"range: bytes=900000-\r\n",
        b"range: bytes=-3\r\n",
        b"connection: close\r\n",
    ]
    async with running(static_app(tmp_path)) as server:
        raw = await exchange(server, b"".join(get % r for r in requests))
    got = [(r.status_code, body) for r, body in responses(raw)]
    assert got == [(206, DATA[70000:70010]), (416, b"range not satisfiable\n"), (206, DATA[-3:]), (200, DATA)]


async def test_range_on_generated_documents_is_ignored() -> None:
    async with running(article_app()) as server:
        _, _, whole = await fetch(server, "/_rally/client.js")
        status, headers, body = await fetch(server, "/_rally/client.js", b"range: bytes=0-9")
    assert (status, body) == (200, whole) and b"accept-ranges" not in headers


CURL = shutil.which("curl")


async def test_curl_resumes_a_partial_download(tmp_path: Any) -> None:
    if CURL is None:
        pytest.skip("curl is not installed: the resumed-download test needs it (apt-get install -y curl)")
    served = tmp_path / "served"
    served.mkdir()
    data = DATA * 3
    (served / "big.bin").write_bytes(data)
    out = tmp_path / "big.bin"
    out.write_bytes(data[:123_457])  # an interrupted download
    async with running(static_app(served)) as server:
        curl = await asyncio.create_subprocess_exec(
            CURL,
            "-sS",
            "-C",
            "-",
            "-o",
            str(out),
            "-w",
            "%{http_code}",
            f"{server.url}/s/big.bin",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(curl.communicate(), WAIT)
    assert curl.returncode == 0, stderr
    assert stdout == b"206" and out.read_bytes() == data


async def test_contract_endpoint_serves_the_contract_with_hash() -> None:
    app = article_app()
    async with running(app) as server:
        [(response, body)] = responses(
            await exchange(server, b"GET /_rally/contract HTTP/1.1\r\nhost: localhost\r\n\r\n", until_close=False)
        )
    assert response.status_code == 200
    assert json.loads(body) == app.contract


async def test_health_endpoint_without_a_broker() -> None:
    async with running(article_app()) as server:
        [(response, body)] = responses(
            await exchange(server, b"GET /_rally/health HTTP/1.1\r\nhost: localhost\r\n\r\n", until_close=False)
        )
        [(refused, _)] = responses(
            await exchange(server, b"POST /_rally/health HTTP/1.1\r\nhost: localhost\r\n\r\n", until_close=False)
        )
    assert response.status_code == 200 and (b"cache-control", b"no-store") in response.headers
    assert json.loads(body) == {
        "status": "ok",
        "connections": 0,
        "broker": {
            "state": "none",
            "process": "",
            "processes": [],
            "connections": {},
            "published": 0,
            "received": 0,
            "dropped": 0,
            "unconfirmed": 0,
            "rejected": 0,
            "waiting": 0,
        },
    }
    assert refused.status_code == 405


async def test_keep_alive_pipelined_requests_are_answered_in_order() -> None:
    pipelined = b"".join(rpc_request(envelope("ServerLoadTitle", {"slug": f"s{i}"}, i)) for i in range(10))
    async with running(article_app()) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(pipelined)
        raw = b""
        while raw.count(b'"kind":"ok"') < 10:
            chunk = await asyncio.wait_for(reader.read(65536), WAIT)
            assert chunk, "server closed a keep-alive connection"
            raw += chunk
        writer.close()
    replies = [json.loads(body) for _, body in responses(raw)]
    assert replies == [{"kind": "ok", "id": i, "value": f"Article: s{i}"} for i in range(10)]


async def test_connection_close_is_a_token_of_the_connection_header() -> None:
    """As h11 reads it: "closed" is another token and keeps the connection; "a, Close" closes it."""

    def request(connection: bytes) -> bytes:
        return b"GET /_rally/health HTTP/1.1\r\nhost: localhost\r\nconnection: " + connection + b"\r\n\r\n"

    async with running(article_app()) as server:
        raw = await exchange(server, request(b"closed") + request(b"keep-alive, closedown") + request(b"a, Close"))
    assert [response.status_code for response, _ in responses(raw)] == [200, 200, 200]


async def test_chunked_request_body_is_read() -> None:
    body = envelope("ServerLoadTitle", {"slug": "chunky"})
    request = (
        b"POST /_rally/rpc HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (10, body[:10])
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - 10, body[10:])
    )
    async with running(article_app()) as server:
        [(response, reply)] = responses(await exchange(server, request, until_close=False))
    assert response.status_code == 200
    assert json.loads(reply) == {"kind": "ok", "id": 1, "value": "Article: chunky"}


async def test_expect_100_continue_is_answered_before_the_body() -> None:
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


# ==== End to end: RPC ========================================================


@dataclass
class Divide:
    a: int
    b: int


@dataclass
class Sleep:
    seconds: float


@dataclass
class Lie:
    pass


def rpc_app(**options: Any) -> rally.App:
    app = article_app(**options)

    @app.rpc
    def server_divide(msg: Divide) -> rally.Result[float, str]:
        if msg.b == 0 and msg.a == 0:
            return rally.Error("0/0")
        return rally.Ok(msg.a / msg.b)

    @app.rpc
    async def server_sleep(msg: Sleep, server_context: rally.ServerContext) -> str:
        await asyncio.sleep(msg.seconds)
        return f"slept in {server_context.session_id[:0]}{'ws' if server_context.connection_id else 'http'}"

    @app.rpc
    def server_lie(msg: Lie) -> rally.Result[int, str]:
        return rally.Ok("not an int")  # type: ignore[arg-type]

    return app


async def post_rpc(server: rally.Server, body: bytes, extra: bytes = b"") -> tuple[int, dict[str, Any]]:
    [(response, reply)] = responses(await exchange(server, rpc_request(body, extra), until_close=False))
    return response.status_code, json.loads(reply)


async def test_rpc_over_http_ok_and_err() -> None:
    async with running(rpc_app()) as server:
        assert await post_rpc(server, envelope("ServerLoadTitle", {"slug": "hello"}, 7)) == (
            200,
            {"kind": "ok", "id": 7, "value": "Article: hello"},
        )
        assert await post_rpc(server, envelope("ServerLoadTitle", {"slug": "missing"}, 8)) == (
            200,
            {"kind": "err", "id": 8, "error": ["not found"]},
        )
        assert await post_rpc(server, envelope("Sleep", {"seconds": 0}, "s")) == (
            200,
            {"kind": "ok", "id": "s", "value": "slept in http"},
        )


@pytest.mark.parametrize(
    ("body", "status", "code", "path"),
    [
        (b"{nope", 400, "invalid", ""),
        (b'{"kind": "rpc", "id": 1}', 400, "invalid", ""),
        (b'{"kind": "send", "msg": {"type": "AddComment", "fields": {"body": "x"}}}', 400, "invalid", "kind"),
        (envelope("Nope", {}), 400, "unknown_type", "msg.type"),
        (envelope("Divide", {"a": 1, "b": "2"}), 400, "invalid", "msg.fields.b"),
        (envelope("Divide", {"a": 1}), 400, "invalid", "msg.fields.b"),
        (envelope("Divide", {"a": 1, "b": 0}), 500, "internal", ""),
        (envelope("Lie", {}), 500, "internal", ""),
    ],
    ids=[
        "bad-json",
        "no-msg",
        "send-over-http",
        "unknown-type",
        "wrong-field",
        "missing-field",
        "raises",
        "bad-return",
    ],
)
async def test_rpc_over_http_errors(body: bytes, status: int, code: str, path: str, caplog: Any) -> None:
    async with running(rpc_app()) as server:
        got_status, reply = await post_rpc(server, body)
    assert (got_status, reply["kind"], reply["code"]) == (status, "error", code)
    assert reply["errors"][0]["path"] == path
    if code == "internal":
        assert "Traceback" not in json.dumps(reply) and "ZeroDivision" not in json.dumps(reply)
        assert any(r.name == "rally" and r.levelno == logging.ERROR for r in caplog.records)


async def test_rpc_over_http_too_large() -> None:
    async with running(rpc_app(max_string_chars=10, max_body_bytes=300)) as server:
        assert (await post_rpc(server, envelope("ServerLoadTitle", {"slug": "x" * 10})))[0] == 200
        status, reply = await post_rpc(server, envelope("ServerLoadTitle", {"slug": "x" * 11}))
        assert (status, reply["code"], reply["errors"][0]["path"]) == (413, "too_large", "msg.fields.slug")
        status, reply = await post_rpc(server, envelope("ServerLoadTitle", {"slug": "x" * 300}))
        assert (status, reply["code"]) == (413, "too_large")


async def test_handler_exception_is_logged_with_traceback_on_rally_logger(caplog: Any) -> None:
    async with running(rpc_app()) as server:
        await post_rpc(server, envelope("Divide", {"a": 1, "b": 0}))
        status, reply = await post_rpc(server, envelope("Divide", {"a": 1, "b": 2}))
    records = [r for r in caplog.records if r.name == "rally" and r.levelno == logging.ERROR]
    assert records and records[0].exc_info is not None and records[0].exc_info[0] is ZeroDivisionError
    assert "server_divide" in records[0].getMessage()
    assert (status, reply["value"]) == (200, 0.5)


async def test_stale_contract_over_http_is_409() -> None:
    async with running(rpc_app()) as server:
        status, reply = await post_rpc(server, envelope("Divide", {"a": 1, "b": 2}), b"rally-contract: 0000\r\n")
    assert (status, reply["code"]) == (409, "stale_contract")


async def test_access_log_one_line_per_request_and_switch_off(caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="rally.access")
    app = article_app()
    server = await app.start("127.0.0.1", 0)
    await exchange(server, b"GET /articles/a HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
    await server.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "rally.access"]
    assert len(lines) == 1 and '"GET /articles/a HTTP/1.1" 200' in lines[0]
    caplog.clear()
    async with running(app) as quiet:  # running() passes access_log=False
        await exchange(quiet, b"GET /articles/a HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
    assert not [r for r in caplog.records if r.name == "rally.access"]


# ==== End to end: WebSocket with the websockets library ======================


async def test_independent_websockets_client_gets_rpc_answers_and_pushes() -> None:
    import websockets

    async with running(rpc_app()) as server:
        url = f"ws://127.0.0.1:{server.port}/_rally/ws?page=/articles/hello"
        async with websockets.connect(url) as a, websockets.connect(url) as b:
            await a.send(
                json.dumps({"kind": "rpc", "id": 1, "msg": {"type": "ServerLoadTitle", "fields": {"slug": "x"}}})
            )
            assert json.loads(await asyncio.wait_for(a.recv(), WAIT)) == {"kind": "ok", "id": 1, "value": "Article: x"}
            await a.send(json.dumps({"kind": "send", "msg": {"type": "ToggleFavorite", "fields": {}}}))
            toggled = {"kind": "push", "msg": {"type": "FavoriteToggled", "fields": {"article_id": 5}}}
            assert json.loads(await asyncio.wait_for(a.recv(), WAIT)) == toggled
            await a.send(json.dumps({"kind": "send", "msg": {"type": "AddComment", "fields": {"body": "hi"}}}))
            saved = {"kind": "push", "msg": {"type": "CommentSaved", "fields": {"body": "hi"}}}
            assert json.loads(await asyncio.wait_for(a.recv(), WAIT)) == saved
            assert json.loads(await asyncio.wait_for(b.recv(), WAIT)) == saved
            await a.send(json.dumps({"kind": "rpc", "id": 2, "msg": {"type": "Sleep", "fields": {"seconds": 0}}}))
            assert json.loads(await asyncio.wait_for(a.recv(), WAIT))["value"] == "slept in ws"


@pytest.mark.parametrize(
    ("frame", "code", "path"),
    [
        ("not json", "invalid", ""),
        ('{"kind": "shout", "msg": {}}', "invalid", "kind"),
        ('{"kind": "send", "msg": {"type": "Nope", "fields": {}}}', "unknown_type", "msg.type"),
        ('{"kind": "send", "msg": {"type": "AddComment", "fields": {"body": 1}}}', "invalid", "msg.fields.body"),
        ('{"kind": "rpc", "id": 3, "msg": {"type": "Nope", "fields": {}}}', "unknown_type", "msg.type"),
    ],
    ids=["bad-json", "bad-kind", "unknown-send", "bad-field", "unknown-rpc"],
)
async def test_websocket_bad_message_gets_error_envelope_and_stays_open(frame: str, code: str, path: str) -> None:
    import websockets

    async with running(article_app()) as server:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/_rally/ws?page=/articles/a") as ws:
            await ws.send(frame)
            reply = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            assert (reply["kind"], reply["code"], reply["errors"][0]["path"]) == ("error", code, path)
            await ws.send(json.dumps({"kind": "send", "msg": {"type": "ToggleFavorite", "fields": {}}}))
            assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["msg"]["type"] == "FavoriteToggled"


async def test_websocket_too_large_value_is_an_error_and_too_large_message_closes_1009() -> None:
    import websockets

    async with running(article_app(max_string_chars=10, max_message_bytes=200)) as server:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/_rally/ws?page=/articles/a") as ws:
            await ws.send(json.dumps({"kind": "send", "msg": {"type": "AddComment", "fields": {"body": "x" * 11}}}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            assert (reply["code"], reply["errors"][0]["path"]) == ("too_large", "msg.fields.body")
            await ws.send(json.dumps({"kind": "send", "msg": {"type": "AddComment", "fields": {"body": "ok"}}}))
            assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["msg"]["fields"] == {"body": "ok"}
            await ws.send("x" * 201)
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), WAIT)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_websocket_send_on_page_without_update_is_not_stateful() -> None:
    import websockets

    class Plain:
        html = "<p>plain</p>"

    app = rally.App()
    app.page("/plain", Plain)
    async with running(app) as server:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/_rally/ws?page=/plain") as ws:
            await ws.send(json.dumps({"kind": "send", "msg": {"type": "AddComment", "fields": {"body": "x"}}}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
    assert reply["code"] == "not_stateful"


async def test_websocket_binary_frame_closes_1003() -> None:
    import websockets

    async with running(article_app()) as server:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/_rally/ws?page=/articles/a") as ws:
            await ws.send(b"\x00\x01")
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), WAIT)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1003


async def test_websocket_stale_contract_gets_error_and_close_4000() -> None:
    import websockets

    async with running(article_app()) as server:
        url = f"ws://127.0.0.1:{server.port}/_rally/ws?page=/articles/a&contract=0123456789abcdef"
        async with websockets.connect(url) as ws:
            reply = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), WAIT)
    assert reply["code"] == "stale_contract"
    assert info.value.rcvd is not None and info.value.rcvd.code == rally.CLOSE_STALE_CONTRACT


@pytest.mark.parametrize(
    "query", ["", "?page=", "?page=/nowhere", "?page=/articles/a/b"], ids=["none", "empty", "unknown", "no-match"]
)
async def test_websocket_without_matching_page_is_404_before_upgrade(query: str) -> None:
    request = (
        b"GET /_rally/ws%s HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n" % query.encode()
    )
    async with running(article_app()) as server:
        [(response, _)] = responses(await exchange(server, request, until_close=False))
    assert response.status_code == 404


async def test_websocket_foreign_origin_is_403_and_allowed_origins_admits_it() -> None:
    import websockets

    async with running(article_app()) as server:
        url = f"ws://127.0.0.1:{server.port}/_rally/ws?page=/articles/a"
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(url, origin="http://evil.test"):  # type: ignore[arg-type]
                pass
        assert info.value.response.status_code == 403
    async with running(article_app(allowed_origins=["http://evil.test"])) as server:
        url = f"ws://127.0.0.1:{server.port}/_rally/ws?page=/articles/a"
        async with websockets.connect(url, origin="http://evil.test") as ws:  # type: ignore[arg-type]
            await ws.send(json.dumps({"kind": "send", "msg": {"type": "ToggleFavorite", "fields": {}}}))
            assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["kind"] == "push"


# ---- Raw WebSocket routes: subprotocols (RFC 6455 section 4.2.2) -------------


def subprotocol_app() -> rally.App:
    """/chat speaks chat.v2 and chat.v1 (in that order); /plain speaks none.
    Each handler sends what it sees as ``ws.subprotocol``."""
    app = rally.App()

    @app.websocket("/chat", subprotocols=["chat.v2", "chat.v1"])
    async def chat(ws: rally.WebSocket) -> None:
        await ws.send(repr(ws.subprotocol))
        await ws.receive()

    @app.websocket("/plain")
    async def plain(ws: rally.WebSocket) -> None:
        await ws.send(repr(ws.subprotocol))
        await ws.receive()

    return app


@pytest.mark.parametrize(
    ("route", "offers", "agreed"),
    [
        ("/chat", ["chat.v1", "chat.v2"], "chat.v1"),  # the client's order of preference decides
        ("/chat", ["chat.v2", "chat.v1"], "chat.v2"),
        ("/chat", ["x.unknown", "chat.v1"], "chat.v1"),
        ("/chat", None, None),  # no offer: no subprotocol
        ("/plain", ["chat.v1"], None),  # a route without subprotocols agrees on none, as before
    ],
)
async def test_raw_route_agrees_on_the_clients_first_supported_subprotocol(
    route: str, offers: list[str] | None, agreed: str | None
) -> None:
    import websockets

    async with running(subprotocol_app()) as server:
        url = f"ws://127.0.0.1:{server.port}{route}"
        async with websockets.connect(url, subprotocols=offers) as ws:  # type: ignore[arg-type]
            seen = await asyncio.wait_for(ws.recv(), WAIT)
            assert ws.response is not None
            answered = ws.response.headers.get("Sec-WebSocket-Protocol")
    assert (ws.subprotocol, answered, seen) == (agreed, agreed, repr(agreed))


async def test_raw_route_refuses_400_a_client_offering_only_unsupported_subprotocols() -> None:
    import websockets

    async with running(subprotocol_app()) as server:
        url = f"ws://127.0.0.1:{server.port}/chat"
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(url, subprotocols=["chat.v3", "CHAT.V1"]):  # type: ignore[list-item]
                pass
    assert info.value.response.status_code == 400
    assert b"chat.v2, chat.v1" in info.value.response.body


async def test_subprotocol_offers_in_several_lines_and_with_spaces_are_one_list() -> None:
    offers = b"sec-websocket-protocol: , x.one ,\tchat.v1\r\nsec-websocket-protocol: chat.v2\r\n"
    handshake = (
        b"GET /chat HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n%s\r\n" % offers
    )
    async with running(subprotocol_app()) as server:
        raw = await exchange(server, handshake, until_close=False)
    head = raw.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 101 Switching Protocols"
    assert [h for h in head if h.lower().startswith(b"sec-websocket-protocol")] == [b"sec-websocket-protocol: chat.v1"]


@pytest.mark.parametrize("subprotocols", ["chat.v1", ["chat v1"], [""], ["chat.v1", 1], ["chat/1"]])
def test_websocket_subprotocols_must_be_a_list_of_tokens(subprotocols: Any) -> None:
    app = rally.App()
    with pytest.raises(rally.RegistrationError, match="subprotocols must be a list of tokens"):
        app.websocket("/chat", subprotocols=subprotocols)


NODE = shutil.which("node")
NODE_CLIENT = """
const ws = new WebSocket(process.argv[1], JSON.parse(process.argv[2]));
ws.onopen = () => console.log("open " + JSON.stringify(ws.protocol));
ws.onmessage = (event) => { console.log("message " + event.data); ws.close(); };
ws.onerror = () => { console.log("error"); process.exit(0); };
ws.onclose = () => process.exit(0);
"""


def node_websocket_flags() -> list[str] | None:
    """The flags that give Node its built-in WebSocket (none from Node 22, one
    on Node 20), or None when there is no Node or no WebSocket in it."""
    if NODE is None:
        return None
    for flags in ([], ["--experimental-websocket"]):
        probe = [NODE, *flags, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"]
        if subprocess.run(probe, capture_output=True, timeout=WAIT).returncode == 0:
            return flags
    return None


@pytest.mark.parametrize(
    ("offers", "expected"),
    [
        (["x.unknown", "chat.v1"], ['open "chat.v1"', "message 'chat.v1'"]),
        (["chat.v3"], ["error"]),  # refused 400: the browser's WebSocket fails
    ],
)
async def test_node_websocket_agrees_on_a_subprotocol(offers: list[str], expected: list[str]) -> None:
    flags = node_websocket_flags()
    if flags is None:
        pytest.skip("Node with a built-in WebSocket (Node 20 with --experimental-websocket, or 22+) is not installed")
    assert NODE is not None
    async with running(subprotocol_app()) as server:
        node = await asyncio.create_subprocess_exec(
            NODE,
            *flags,
            "-e",
            NODE_CLIENT,
            f"ws://127.0.0.1:{server.port}/chat",
            json.dumps(offers),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(node.communicate(), WAIT)
    assert node.returncode == 0, stderr
    assert stdout.decode().split("\n")[:-1] == expected


# ==== Cross-origin RPC (CORS) =================================================

CORS_ORIGIN = "http://app.test:5173"
CORS_HEADER_NAMES = (
    b"access-control-allow-origin",
    b"access-control-allow-credentials",
    b"access-control-allow-methods",
    b"access-control-allow-headers",
    b"access-control-max-age",
)


async def rpc_call(
    server: rally.Server, method: bytes, headers: dict[bytes, bytes] | list[tuple[bytes, bytes]], body: bytes = b""
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One request to ``/_rally/rpc`` on its own connection: status, header list, body."""
    items = list(headers.items()) if isinstance(headers, dict) else headers
    head = b"%s /_rally/rpc HTTP/1.1\r\nhost: localhost:%d\r\n" % (method, server.port)
    head += b"".join(b"%s: %s\r\n" % item for item in items)
    if body or method == b"POST":
        head += b"content-length: %d\r\n" % len(body)
    [(response, answer)] = responses(await exchange(server, head + b"connection: close\r\n\r\n" + body))
    return response.status_code, list(response.headers), answer


def cors_headers(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    return {name: value for name, value in headers if name.startswith(b"access-control-") or name == b"vary"}


def client_rpc_header_names() -> set[str]:
    """The request headers rally's own scripts (the browser client, the docs page) send with an HTTP RPC."""
    names: set[str] = set()
    for script in (rally._CLIENT_JS, rally._DOCS_JS):
        for match in re.finditer(r'fetch\("/_rally/rpc".*?headers:\s*\{(.*?)\}', script, re.S):
            names |= {name.lower() for name in re.findall(r'"([A-Za-z-]+)":', match.group(1))}
    assert names, "no script of rally's sends an HTTP RPC"
    return names


async def test_preflight_from_an_allowed_origin_is_204_with_the_cors_headers() -> None:
    async with running(article_app(allowed_origins=[CORS_ORIGIN])) as server:
        status, headers, body = await rpc_call(
            server,
            b"OPTIONS",
            {
                b"origin": CORS_ORIGIN.encode(),
                b"access-control-request-method": b"POST",
                b"access-control-request-headers": b"content-type,rally-contract,rally-page",
            },
        )
    assert (status, body) == (204, b"")
    assert all(name != b"content-length" for name, _ in headers)  # RFC 9110 section 8.6: none in a 204
    cors = cors_headers(headers)
    assert cors == {
        b"access-control-allow-origin": CORS_ORIGIN.encode(),
        b"access-control-allow-credentials": b"true",
        b"access-control-allow-methods": b"POST",
        b"access-control-allow-headers": b"content-type, rally-contract, rally-page",
        b"access-control-max-age": b"600",
        b"vary": b"origin",
    }
    allowed = {h.strip() for h in cors[b"access-control-allow-headers"].decode().split(",")}
    assert client_rpc_header_names() <= allowed


async def test_post_from_an_allowed_origin_carries_the_origin_headers_on_every_answer() -> None:
    app = article_app(allowed_origins=[CORS_ORIGIN], max_body_bytes=1000)
    origin = {b"origin": CORS_ORIGIN.encode(), b"content-type": b"application/json"}
    expected = {
        b"access-control-allow-origin": CORS_ORIGIN.encode(),
        b"access-control-allow-credentials": b"true",
        b"vary": b"origin",
    }
    async with running(app) as server:
        ok = await rpc_call(server, b"POST", origin, envelope("ServerLoadTitle", {"slug": "x"}))
        invalid = await rpc_call(server, b"POST", origin, b"{")
        stale = await rpc_call(server, b"POST", {**origin, b"rally-contract": b"0" * 16}, b"{}")
        too_large = await rpc_call(server, b"POST", origin, b"[" * 1001)
        not_json = await rpc_call(server, b"POST", {**origin, b"content-type": b"text/plain"}, b"{}")
    assert ok[0] == 200 and json.loads(ok[2]) == {"kind": "ok", "id": 1, "value": "Article: x"}
    assert [invalid[0], stale[0], too_large[0], not_json[0]] == [400, 409, 413, 415]
    assert json.loads(too_large[2])["code"] == "too_large"  # readable by the page
    for status, headers, _ in (ok, invalid, stale, too_large, not_json):
        assert cors_headers(headers) == expected, status


async def test_a_foreign_origin_is_refused_without_cors_headers_before_and_after_a_preflight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(article_app(allowed_origins=[CORS_ORIGIN])) as server:
        for origin in (b"http://evil.test", b"null", CORS_ORIGIN.encode() + b"/", b"http://app.test:5174"):
            preflight = await rpc_call(
                server, b"OPTIONS", {b"origin": origin, b"access-control-request-method": b"POST"}
            )
            post = await rpc_call(
                server,
                b"POST",
                {b"origin": origin, b"content-type": b"application/json"},
                envelope("ServerLoadTitle", {"slug": "x"}),
            )
            for status, headers, _ in (preflight, post):
                assert status == 403, origin
                assert cors_headers(headers) == {}, origin
        # Two Origin headers, even both allowed, are refused (docs/security.md "Threat model").
        twice = [(b"origin", CORS_ORIGIN.encode()), (b"origin", CORS_ORIGIN.encode())]
        repeated = await rpc_call(server, b"OPTIONS", [*twice, (b"access-control-request-method", b"POST")])
        assert repeated[0] == 403 and cors_headers(repeated[1]) == {}
    assert "refused cross-origin request" in caplog.text


async def test_same_origin_and_originless_rpc_get_no_cors_headers() -> None:
    async with running(article_app(allowed_origins=[CORS_ORIGIN])) as server:
        own = b"http://localhost:%d" % server.port
        body = envelope("ServerLoadTitle", {"slug": "x"})
        same = await rpc_call(server, b"POST", {b"origin": own, b"content-type": b"application/json"}, body)
        originless = await rpc_call(server, b"POST", {b"content-type": b"application/json"}, body)
        options = await rpc_call(server, b"OPTIONS", {})
        get = await rpc_call(server, b"GET", {b"origin": CORS_ORIGIN.encode()})
    for status, headers, _ in (same, originless):
        assert status == 200 and cors_headers(headers) == {}
    # An OPTIONS that is no preflight says what the route takes, as RFC 9110 section 9.3.7 has it.
    assert options[0] == 204 and cors_headers(options[1]) == {} and (b"allow", b"OPTIONS, POST") in options[1]
    assert get[0] == 405 and (b"allow", b"OPTIONS, POST") in get[1]


# ==== End to end: stateful pages and broadcast ================================


@dataclass
class Say:
    scope: Literal["client", "session", "page", "app"]
    text: str


@dataclass
class Heard:
    text: str


@dataclass
class Count:
    n: int
    text: str


@dataclass
class Tally:
    n: int


class Room:
    html = "<p>room</p>"

    def server_init(room: str) -> tuple[Tally, rally.Effect[Heard | Count]]:
        return Tally(0), rally.effect.none()

    async def server_update(
        model: Tally, msg: Say, server_context: rally.ServerContext
    ) -> tuple[Tally, rally.Effect[Heard | Count]]:
        if msg.text.startswith("count"):
            await asyncio.sleep(0.001 * (hash(msg.text) % 3))  # uneven handler times must not reorder
            return Tally(model.n + 1), rally.effect.send_to_client(Count(model.n + 1, msg.text))
        push = Heard(msg.text)
        scoped = {
            "client": rally.effect.send_to_client,
            "session": rally.effect.broadcast_to_session,
            "page": rally.effect.broadcast_to_page,
            "app": rally.effect.broadcast_to_app,
        }[msg.scope](push)
        return model, rally.effect.batch(rally.effect.none(), scoped)


def room_app() -> rally.App:
    app = rally.App()
    app.page("/rooms/{room}", Room)
    return app


async def test_broadcast_scopes_two_sessions_two_pages_exact_recipients() -> None:
    app = room_app()
    async with running(app) as server:
        clients = {s: rally.Client(server.url, app) for s in "AB"}
        conns: dict[str, rally.PageConnection] = {}
        for s in "AB":
            for p in "12":
                conns[s + p] = await clients[s].page(f"/rooms/{p}").__aenter__()
        assert clients["A"].session_id != clients["B"].session_id
        expected: dict[str, list[str]] = {name: [] for name in conns}
        for sender in conns:
            for scope in ("client", "session", "page", "app"):
                text = f"{scope} from {sender}"
                await conns[sender].send(Say(scope, text))
                for name in conns:
                    reached = {
                        "client": name == sender,
                        "session": name[0] == sender[0],
                        "page": name[1] == sender[1],
                        "app": True,
                    }[scope]
                    if reached:
                        expected[name].append(text)
        # Each connection's sends are handled in order, so once a receiver has
        # every sender's "end", it has everything those senders broadcast.
        for sender, conn in conns.items():
            await conn.send(Say("app", f"end {sender}"))
        for name, conn in conns.items():
            got: list[str] = []
            ends: set[str] = set()
            while len(ends) < len(conns):
                text = (await conn.receive()).text
                if text.startswith("end "):
                    ends.add(text)
                else:
                    got.append(text)
            assert sorted(got) == sorted(expected[name]), name
            assert len(got) == len(set(got)), f"{name} received a message twice"
        for conn in conns.values():
            await conn.close()
        await eventually(lambda: not app._registry.topics.members, "topics empty after every connection closed")


async def test_twenty_sends_are_handled_in_order() -> None:
    app = room_app()
    async with running(app) as server:
        async with rally.Client(server.url, app) as client, client.page("/rooms/x") as page:
            for i in range(20):
                await page.send(Say("client", f"count {i}"))
            got = [await page.receive() for _ in range(20)]
    assert got == [Count(i + 1, f"count {i}") for i in range(20)]


async def test_topics_are_left_on_every_kind_of_close() -> None:
    import websockets

    app = room_app()
    async with running(app) as server:
        url = f"ws://127.0.0.1:{server.port}/_rally/ws?page=/rooms/1"
        polite = await websockets.connect(url)
        rude = await websockets.connect(url)
        bad = await websockets.connect(url)
        await eventually(lambda: len(app._registry.topics.members.get("app", ())) == 3, "three joined")
        await polite.close()
        rude.transport.abort()
        await bad.send(b"binary closes 1003")
        await eventually(lambda: not app._registry.topics.members, "topics empty")
        await bad.close()


async def test_server_init_effects_reach_the_new_connection_itself() -> None:
    @dataclass
    class Welcome:
        text: str

    class Lobby:
        def server_init(server_context: rally.ServerContext) -> tuple[int, rally.Effect[Welcome]]:
            return 0, rally.effect.broadcast_to_page(Welcome("hello"))

    app = rally.App()
    app.page("/lobby", Lobby)
    async with running(app) as server:
        async with rally.Client(server.url, app) as client, client.page("/lobby") as page:
            assert await page.receive() == Welcome("hello")


async def test_server_update_raising_keeps_the_model_and_answers_internal(caplog: Any) -> None:
    class Fragile:
        def server_init() -> tuple[Tally, rally.Effect[Count]]:
            return Tally(0), rally.effect.none()

        def server_update(model: Tally, msg: Say) -> tuple[Tally, rally.Effect[Count]]:
            if msg.text == "boom":
                raise RuntimeError("boom")
            return Tally(model.n + 1), rally.effect.send_to_client(Count(model.n + 1, msg.text))

    app = rally.App()
    app.page("/fragile", Fragile)
    async with running(app) as server:
        async with rally.Client(server.url, app) as client, client.page("/fragile") as page:
            await page.send(Say("client", "one"))
            assert await page.receive() == Count(1, "one")
            with pytest.raises(rally.RemoteError) as info:
                await page.send(Say("client", "boom"))
            assert info.value.code == "internal"
            await page.send(Say("client", "two"))
            assert await page.receive() == Count(2, "two")
    assert any("server_update of page Fragile raised" in r.getMessage() for r in caplog.records)


async def test_push_of_a_type_outside_the_page_effect_is_internal(caplog: Any) -> None:
    class Wrong:
        def server_init() -> tuple[int, rally.Effect[Count]]:
            return 0, rally.effect.none()

        def server_update(model: int, msg: Say) -> tuple[int, rally.Effect[Count]]:
            return model, rally.effect.send_to_client(Heard("not a Count"))  # type: ignore[arg-type]

    app = rally.App()
    app.page("/wrong", Wrong)
    async with running(app) as server:
        async with rally.Client(server.url, app) as client, client.page("/wrong") as page:
            with pytest.raises(rally.RemoteError) as info:
                await page.send(Say("client", "x"))
    assert info.value.code == "internal"
    assert any("breaks its annotation" in r.getMessage() for r in caplog.records)


async def test_an_effect_is_all_or_nothing(caplog: Any) -> None:
    class Tallied:
        def server_init() -> tuple[int, rally.Effect[Count]]:
            return 0, rally.effect.none()

        def server_update(model: int, msg: Say) -> tuple[int, rally.Effect[Count]]:
            if msg.text == "bad":  # a broadcast first, then a push the page does not declare
                bad = rally.effect.send_to_client(Heard("not a Count"))  # type: ignore[arg-type]
                return model + 100, rally.effect.batch(rally.effect.broadcast_to_page(Count(-1, "bad")), bad)
            return model + 1, rally.effect.broadcast_to_page(Count(model + 1, msg.text))

    app = rally.App()
    app.page("/tallied", Tallied)
    async with running(app) as server, rally.Client(server.url, app) as client:
        async with client.page("/tallied") as sender, client.page("/tallied") as other:
            with pytest.raises(rally.RemoteError) as info:
                await sender.send(Say("client", "bad"))
            assert info.value.code == "internal"
            await sender.send(Say("client", "good"))
            # Neither side saw the broadcast of the refused effect, and the model did not advance.
            assert await other.receive() == Count(1, "good")
            assert await sender.receive() == Count(1, "good")
    assert any("breaks its annotation" in r.getMessage() for r in caplog.records)


# ==== End to end: rally.Client ===============================================


async def test_client_rpc_returns_typed_ok_and_error() -> None:
    app = rpc_app()
    async with running(app) as server, rally.Client(server.url, app) as client:
        assert await client.rpc(ServerLoadTitle("a")) == rally.Ok("Article: a")
        assert await client.rpc(ServerLoadTitle("missing")) == rally.Error(["not found"])
        assert await client.rpc(Divide(1, 4)) == rally.Ok(0.25)
        with pytest.raises(rally.RemoteError) as info:
            await client.rpc(Divide(1, 0))
        assert (info.value.code, info.value.status) == ("internal", 500)
        async with client.page("/articles/abc") as page:
            assert await page.rpc(ServerLoadTitle("ws")) == rally.Ok("Article: ws")
            await page.send(ToggleFavorite())
            assert await page.receive() == FavoriteToggled(3)


async def test_client_page_refused_raises_remote_error_with_status() -> None:
    async with running(article_app()) as server, rally.Client(server.url) as client:
        with pytest.raises(rally.RemoteError) as info:
            async with client.page("/nowhere"):
                pass
    assert (info.value.code, info.value.status) == ("refused", 404)


async def test_client_without_app_gets_json_values() -> None:
    async with running(article_app()) as server, rally.Client(server.url) as client:
        assert await client.rpc(ServerLoadTitle("a")) == rally.Ok("Article: a")
        async with client.page("/articles/ab") as page:
            await page.send(ToggleFavorite())
            assert await page.receive() == {"type": "FavoriteToggled", "fields": {"article_id": 2}}


# ==== Embedding ==============================================================


async def test_broadcast_from_outside_handlers_and_close_session() -> None:
    app = room_app()
    async with running(app) as server:
        async with rally.Client(server.url, app) as one, rally.Client(server.url, app) as two:
            a1 = await one.page("/rooms/1").__aenter__()
            a2 = await one.page("/rooms/2").__aenter__()
            b1 = await two.page("/rooms/1").__aenter__()
            assert await app.broadcast_to_app(Heard("all")) == 3
            assert await app.broadcast_to_page("/rooms/1", Heard("room 1")) == 2
            assert one.session_id is not None
            assert await app.broadcast_to_session(one.session_id, Heard("one")) == 2
            assert [await a1.receive() for _ in range(3)] == [Heard("all"), Heard("room 1"), Heard("one")]
            assert [await a2.receive() for _ in range(2)] == [Heard("all"), Heard("one")]
            assert [await b1.receive() for _ in range(2)] == [Heard("all"), Heard("room 1")]
            with pytest.raises(TypeError, match="not a push type"):
                await app.broadcast_to_app(Divide(1, 2))
            assert await app.close_session(one.session_id) == 2
            for conn in (a1, a2):
                with pytest.raises(rally.ConnectionClosed) as info:
                    await conn.receive()
                assert info.value.code == rally.CLOSE_SESSION_CLOSED
            await b1.send(Say("client", "still here"))
            assert await b1.receive() == Heard("still here")
            await b1.close()


def test_run_in_thread_and_threadsafe_broadcast() -> None:
    app = room_app()
    received: list[Any] = []

    async def listen(url: str, ready: threading.Event) -> None:
        async with rally.Client(url, app) as client, client.page("/rooms/t") as page:
            ready.set()
            received.append(await page.receive())

    with app.run_in_thread() as server:
        assert server.url.startswith("http://127.0.0.1:")
        ready = threading.Event()
        listener = threading.Thread(target=asyncio.run, args=(listen(server.url, ready),))
        listener.start()
        assert ready.wait(WAIT)
        # The listener is subscribed once its page is open; the server joined
        # its topics before answering the handshake.
        assert app.broadcast_to_app_threadsafe(Heard("from a thread")).result(WAIT) == 1
        listener.join(WAIT)
    assert received == [Heard("from a thread")]


APP_MODULE = textwrap.dedent(
    """
    import asyncio
    import sys
    from dataclasses import dataclass
    import rally

    @dataclass
    class Slow:
        seconds: float

    app = rally.App(shutdown_timeout=3)

    @app.rpc
    async def server_slow(msg: Slow) -> str:
        print("slow rpc started", file=sys.stderr, flush=True)
        await asyncio.sleep(msg.seconds)
        return "finished"

    class Home:
        html = "<p>home</p>"

    app.page("/", Home)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_cli_serves_module_app_and_shuts_down_cleanly_on_signal(tmp_path: Any, sig: int) -> None:
    import websockets

    (tmp_path / "shutdown_app.py").write_text(APP_MODULE)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(rally.__file__)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.abspath(rally.__file__), "shutdown_app:app", "--port", "0",
        cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = b""
        while b"serving on" not in line:
            line = await asyncio.wait_for(proc.stderr.readline(), WAIT)
            assert line, "server exited before serving"
        url = line.decode().split("serving on ")[1].split()[0]
        async with (
            websockets.connect(url.replace("http", "ws") + "/_rally/ws?page=/") as ws,
            rally.Client(url) as client,
        ):
            in_flight = asyncio.ensure_future(client.rpc(rally_slow(0.5)))
            while b"slow rpc started" not in line:
                line = await asyncio.wait_for(proc.stderr.readline(), WAIT)
            proc.send_signal(sig)
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), WAIT)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
            assert await asyncio.wait_for(in_flight, WAIT) == rally.Ok("finished")
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
        rest = await proc.stderr.read()
        assert b"Traceback" not in rest and b"ERROR" not in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_workers_without_a_broker_are_refused_with_the_reason(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RALLY_BROKER", raising=False)
    with pytest.raises(rally.UsageError, match="workers=2 needs a broker"):
        rally.App().run(workers=2)
    with pytest.raises(rally.UsageError, match="at least 1"):
        rally.App().run(workers=0)
    (tmp_path / "shutdown_app.py").write_text(APP_MODULE)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(rally.__file__)))
    out = subprocess.run(
        [sys.executable, os.path.abspath(rally.__file__), "shutdown_app:app", "--port", "0", "--workers", "3"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=WAIT,
    )  # fmt: skip
    assert out.returncode == 2 and "serving" not in out.stderr
    assert "workers=3 needs a broker" in out.stderr and "RALLY_BROKER" in out.stderr


def rally_slow(seconds: float) -> Any:
    return dataclasses.make_dataclass("Slow", [("seconds", float)])(seconds)


# ==== The module itself ======================================================


def fresh_python(code: str) -> str:
    """What ``code`` prints in a new interpreter, beside rally.py."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=os.path.dirname(rally.__file__)
    )
    return out.stdout


def test_import_needs_only_h11_and_wsproto() -> None:
    code = (
        "import sys; before = set(sys.modules); import rally; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(m for m in new if m not in sys.stdlib_module_names and not m.startswith('_')))"
    )
    assert fresh_python(code).strip() == "['h11', 'rally', 'wsproto']"


def test_import_defers_h11_and_wsproto_to_the_first_use() -> None:
    """``import rally`` leaves the modules of h11 and wsproto unloaded
    (docs/performance.md "Import time"); the first use loads them."""
    code = (
        "import sys, rally; loaded = [m in sys.modules for m in ('h11._connection', 'wsproto.events')]; "
        "print(*loaded, rally.h11.Request.__name__, rally.wsproto.events.Ping.__name__, "
        "'h11._connection' in sys.modules, 'wsproto.events' in sys.modules)"
    )
    assert fresh_python(code).split() == ["False", "False", "Request", "Ping", "True", "True"]


def test_public_names_exist_and_have_docstrings() -> None:
    for name in rally.__all__:
        value = getattr(rally, name)
        if typing.get_origin(value) is not None:
            continue  # Result: a generic alias, documented where it is defined
        if callable(value) or isinstance(value, type):
            assert value.__doc__ and value.__doc__.strip(), name
    assert rally.effect.broadcast_to_page.__doc__


# ==== Pages: terminate, presence, topics, lifespan, responses ================


async def receive_until(page: rally.PageConnection, wanted: Any) -> list[Any]:
    """Receive pushes until ``wanted`` arrives; returns those that came before it."""
    before: list[Any] = []
    while (item := await page.receive()) != wanted:
        before.append(item)
    return before


async def raw_page_socket(server: rally.Server, path: str, extra: bytes = b"", rcvbuf: int = 0) -> socket.socket:
    """A socket that sends the handshake of page ``path`` and leaves the rest to the test."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", server.port)), WAIT)
        request = (
            b"GET /_rally/ws?page=%s HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n%s\r\n"
        ) % (path.encode(), extra)
        await asyncio.wait_for(loop.sock_sendall(sock, request), WAIT)
    except BaseException:
        sock.close()
        raise
    return sock


async def next_frame(ws: Any) -> Any:
    """The next message of a ``websockets`` connection, as JSON."""
    return json.loads(await asyncio.wait_for(ws.recv(), WAIT))


# -- server_terminate


@dataclass
class Guest:
    name: str


@dataclass
class Note:
    text: str


@dataclass
class Left:
    name: str


@dataclass
class Ended:
    """What one call of ``server_terminate`` saw."""

    name: str
    connection_id: int
    present: list[int]  # the connection ids on the page, by server_context.presence()
    reached: int | None = None  # an app.broadcast_to_page from inside the hook


class Terminations:
    """The ``state`` of the lounge apps: every ``server_terminate`` call, and a way to wait for them."""

    def __init__(self) -> None:
        self.calls: list[Ended] = []
        self.app: rally.App | None = None
        self._changed = asyncio.Event()

    def add(self, model: Guest, ctx: rally.ServerContext, reached: int | None = None) -> None:
        assert ctx.connection_id is not None
        self.calls.append(Ended(model.name, ctx.connection_id, [p.id for p in ctx.presence()], reached))
        self._changed.set()

    async def wait(self, n: int) -> None:
        while len(self.calls) < n:
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), WAIT)


class Lounge:
    """A guest named by the ``x-name`` header; ``crash`` makes ``server_init`` raise."""

    def server_init(server_context: rally.ServerContext) -> tuple[Guest, rally.Effect[Left | Note]]:
        name = server_context.headers.get("x-name", "anon")
        if name == "crash":
            raise RuntimeError("server_init fails on purpose")
        return Guest(name), rally.effect.none()

    def server_presence(model: Guest) -> Guest:
        return model

    def server_terminate(model: Guest, server_context: rally.ServerContext) -> rally.Effect[Left | Note]:
        server_context.state.add(model, server_context)
        return rally.effect.broadcast_to_page(Left(model.name))


class AsyncLounge(Lounge):
    async def server_terminate(model: Guest, server_context: rally.ServerContext) -> rally.Effect[Left | Note]:
        state = server_context.state
        reached = await state.app.broadcast_to_page(server_context.page, Left(model.name + " directly"))
        state.add(model, server_context, reached)
        return rally.effect.broadcast_to_page(Left(model.name))


def lounge_app(page: Any = Lounge, **options: Any) -> tuple[rally.App, Terminations]:
    terminations = Terminations()
    app = rally.App(state=terminations, **options)
    app.page("/lounge", page)
    terminations.app = app
    return app, terminations


def bounded_client(server: rally.Server, app: rally.App) -> rally.Client:
    """A Client of ``app`` whose every wait is bounded by WAIT."""
    return rally.Client(server.url, app, timeout=WAIT)


def guest(client: rally.Client, name: str) -> rally.PageConnection:
    return rally.PageConnection(client, "/lounge", headers=[("x-name", name)])


@pytest.mark.parametrize("how", ["client close", "client drop", "slow consumer", "close_session"])
async def test_server_terminate_runs_once_after_leaving_and_its_broadcast_reaches_the_others(how: str) -> None:
    app, terminations = lounge_app(max_outgoing_bytes=256 * 1024)
    async with running(app) as server, bounded_client(server, app) as bob, bounded_client(server, app) as other:
        async with guest(other, "carol") as carol:
            await carol.next_presence()
            sock = None
            if how in ("client close", "close_session"):
                victim = await guest(bob, "bob").__aenter__()
            else:  # a raw socket that never reads
                sock = await raw_page_socket(server, "/lounge", b"x-name: bob\r\n", rcvbuf=4096)
            try:
                [bob_id] = {p.id for p in await carol.next_presence()} - {carol.connection_id}
                got: list[Any] = []  # what carol received meanwhile
                if how == "client close":
                    await victim.close()
                elif how == "close_session":
                    assert bob.session_id is not None
                    assert await app.close_session(bob.session_id) == 1
                elif how == "client drop":  # no close frame: a reset
                    assert sock is not None
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                else:  # carol keeps up with the broadcasts; bob never reads, so the server drops him
                    note = Note("x" * 60_000)
                    for _ in range(600):
                        if terminations.calls:
                            break
                        await app.broadcast_to_page("/lounge", note)
                        got += await receive_until(carol, note)
                await terminations.wait(1)
                if Left("bob") not in got:
                    got += [*await receive_until(carol, Left("bob")), Left("bob")]
                assert [item for item in got if not isinstance(item, Note)] == [Left("bob")]
                assert terminations.calls == [Ended("bob", bob_id, [carol.connection_id])]
                assert [(p.id, p.meta) for p in app.presence("/lounge")] == [(carol.connection_id, Guest("carol"))]
                if sock is None:  # the ended connection got no Left before its close
                    with pytest.raises(rally.ConnectionClosed) as info:
                        await victim.receive()
                    assert info.value.code == (1000 if how == "client close" else rally.CLOSE_SESSION_CLOSED)
            finally:
                if sock is not None:
                    sock.close()
                else:
                    await victim.close()
    assert [call.name for call in terminations.calls] == ["bob", "carol"]


async def test_server_terminate_runs_once_per_connection_at_shutdown() -> None:
    app, terminations = lounge_app()
    async with running(app) as server, bounded_client(server, app) as client:
        async with guest(client, "bob") as bob, guest(client, "carol") as carol:
            await bob.next_presence()
            await carol.next_presence()
            await asyncio.wait_for(server.close(), WAIT)
            for page in (bob, carol):
                with pytest.raises(rally.ConnectionClosed) as info:
                    await receive_until(page, None)
                assert info.value.code == 1001
    assert sorted((call.name, call.connection_id) for call in terminations.calls) == [
        ("bob", bob.connection_id),
        ("carol", carol.connection_id),
    ]
    assert all(call.connection_id not in call.present for call in terminations.calls)


@dataclass
class DoorOpen:
    by: str


class SlowDoor:
    """A page whose async server_init refuses, fails or hangs as the x-how header says."""

    async def server_init(server_context: rally.ServerContext) -> tuple[DoorOpen, rally.Effect[DoorOpen]]:
        how = server_context.headers.get("x-how", "")
        await asyncio.sleep(0)  # a real await: the page waits in STARTING meanwhile
        if how == "refuse":
            raise rally.Refuse("not today")
        if how == "fail":
            raise RuntimeError("the door is stuck")
        if how == "hang":
            await asyncio.Event().wait()
        return DoorOpen(how), rally.effect.send_to_client(DoorOpen(how))


@pytest.mark.parametrize(
    "how, error, code",
    [("refuse", None, rally.CLOSE_REFUSED), ("fail", "internal", 1011), ("hang", "internal", 1011), ("open", "", 0)],
)
async def test_async_server_init_that_refuses_fails_or_times_out_ends_the_page(
    how: str, error: str | None, code: int, caplog: Any
) -> None:
    """The async server_init's ends, as the sync one's: Refuse closes with
    4003 and its reason; an exception, or running past handler_timeout, is
    an internal error and 1011; otherwise the page opens."""
    app = rally.App(handler_timeout=0.2)  # the hanging init's bound: time is the input
    app.page("/door", SlowDoor)
    async with running(app) as server, rally.Client(server.url, app, timeout=WAIT) as client:
        async with rally.PageConnection(client, "/door", headers=[("x-how", how)]) as page:
            if how == "open":
                assert await page.receive() == DoorOpen("open")
                return
            if error is not None:
                with pytest.raises(rally.RemoteError) as failed:
                    await page.receive()
                assert failed.value.code == error
            with pytest.raises(rally.ConnectionClosed) as closed:
                await page.receive()
    assert closed.value.code == code
    if how == "refuse":
        assert closed.value.reason == "not today"
    else:
        assert any("server_init of page SlowDoor failed" in r.getMessage() for r in caplog.records)


async def test_no_server_terminate_when_server_init_raised(caplog: Any) -> None:
    app, terminations = lounge_app()
    async with running(app) as server, bounded_client(server, app) as client:
        async with guest(client, "crash") as page:
            with pytest.raises(rally.RemoteError) as error:
                await page.receive()
            with pytest.raises(rally.ConnectionClosed) as closed:
                await page.receive()
    assert (error.value.code, closed.value.code) == ("internal", 1011)
    assert terminations.calls == []
    assert any("server_init of page Lounge raised" in r.getMessage() for r in caplog.records)


async def test_async_server_terminate_runs_after_leaving_and_broadcasts() -> None:
    app, terminations = lounge_app(AsyncLounge)
    async with running(app) as server, bounded_client(server, app) as client:
        async with guest(client, "carol") as carol:
            async with guest(client, "bob") as bob:
                await bob.next_presence()
            assert [await carol.receive() for _ in range(2)] == [Left("bob directly"), Left("bob")]
            assert terminations.calls == [Ended("bob", bob.connection_id, [carol.connection_id], reached=1)]
    assert [call.name for call in terminations.calls] == ["bob", "carol"]


class Headed:
    """A page whose ``server_init`` keeps the headers its connection's context gives (``state``: a future)."""

    def server_init(server_context: rally.ServerContext) -> tuple[None, rally.Effect[Note]]:
        server_context.state.set_result(server_context.headers)
        return None, rally.effect.none()


async def test_a_page_context_gives_its_handshake_headers_as_they_came() -> None:
    """A page connection's context keeps its handshake's headers packed
    (docs/performance.md "Where each byte goes") and gives them back as an
    HTTP request's context does: by lower-case name, a repeated one joined
    by ", " in order, colons and spaces inside a value kept, an empty value
    empty."""
    lines = [(b"x-tag", b"one"), (b"X-Url", b"http://h:1/p?q=a:b c"), (b"x-tag", b"two"), (b"x-empty", b"")]
    packed = rally._pack_headers([(name.lower(), value) for name, value in lines])
    assert rally._unpack_headers(packed) == [(name.lower(), value) for name, value in lines]
    assert rally._unpack_headers(rally._pack_headers([])) == []
    seen: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
    app = rally.App(state=seen)
    app.page("/headed", Headed)
    async with running(app) as server:
        sock = await raw_page_socket(server, "/headed", b"".join(b"%s: %s\r\n" % line for line in lines))
        try:
            headers = await asyncio.wait_for(seen, WAIT)
        finally:
            sock.close()
    assert {k: v for k, v in headers.items() if k.startswith("x-")} == {
        "x-tag": "one, two",
        "x-url": "http://h:1/p?q=a:b c",
        "x-empty": "",
    }
    assert headers["host"] == "localhost" and headers["upgrade"] == "websocket"


# -- presence


@dataclass
class Status:
    status: str


@dataclass
class SetStatus:
    status: str


@dataclass
class WhoIsHere: ...


class Desk:
    def server_init() -> tuple[Status, rally.Effect[Note]]:
        return Status("here"), rally.effect.none()

    def server_update(model: Status, msg: SetStatus) -> tuple[Status, rally.Effect[Note]]:
        return Status(msg.status), rally.effect.none()

    def server_presence(model: Status) -> Status:
        return model

    def server_who_is_here(msg: WhoIsHere, server_context: rally.ServerContext) -> list[int]:
        server_context.state.append(server_context.presence())
        return [p.id for p in server_context.presence()]


def desk_app() -> tuple[rally.App, list[list[rally.Presence]]]:
    seen: list[list[rally.Presence]] = []  # what server_context.presence() returned
    app = rally.App(state=seen)
    app.page("/desk", Desk)
    return app, seen


def by_id(entries: list[rally.Presence]) -> list[rally.Presence]:
    return sorted(entries, key=lambda p: p.id)


async def test_presence_wire_format_state_then_joins_updates_and_leaves() -> None:
    import websockets

    def send(seq: int, status: str) -> str:
        return json.dumps({"kind": "send", "seq": seq, "msg": {"type": "SetStatus", "fields": {"status": status}}})

    def diff(joins: Any = (), updates: Any = (), leaves: Any = ()) -> dict[str, Any]:
        return {"kind": "presence", "joins": list(joins), "updates": list(updates), "leaves": list(leaves)}

    app, _ = desk_app()
    async with running(app) as server:
        url = f"ws://127.0.0.1:{server.port}/_rally/ws?page=/desk"
        async with websockets.connect(url) as a:
            [me] = (await next_frame(a)).pop("state")
            assert (me["self"], me["meta"]) == (True, {"status": "here"})
            a_id, a_tag = me["id"], me["tag"]
            async with websockets.connect(url) as b:
                state = await next_frame(b)
                b_id, b_tag = state["state"][1]["id"], state["state"][1]["tag"]
                assert state == {
                    "kind": "presence",
                    "state": [
                        {"id": a_id, "tag": a_tag, "self": False, "meta": {"status": "here"}},
                        {"id": b_id, "tag": b_tag, "self": True, "meta": {"status": "here"}},
                    ],
                }
                assert await next_frame(a) == diff(joins=[{**state["state"][1], "self": False}])

                await a.send(send(1, "away"))
                away = {"id": a_id, "tag": a_tag, "self": True, "meta": {"status": "away"}}
                assert await next_frame(a) == diff(updates=[away])
                assert await next_frame(a) == {"kind": "ack", "seq": 1}
                assert await next_frame(b) == diff(updates=[{**away, "self": False}])

                await a.send(send(2, "away"))  # unchanged: no presence frame
                assert await next_frame(a) == {"kind": "ack", "seq": 2}
                await a.send(send(3, "busy"))
                busy = {"id": a_id, "tag": a_tag, "self": True, "meta": {"status": "busy"}}
                assert [await next_frame(a) for _ in range(2)] == [diff(updates=[busy]), {"kind": "ack", "seq": 3}]
                assert await next_frame(b) == diff(updates=[{**busy, "self": False}])  # the next one after "away"
            assert await next_frame(a) == diff(leaves=[b_id])
            assert a_tag != b_tag
            for ws, tag in ((a, a_tag), (b, b_tag)):
                session_cookie = ws.response.headers["set-cookie"].split(";")[0].split("=", 1)[1]
                assert tag not in session_cookie


class SlowDesk:
    """A desk whose ``server_init`` waits for the gate after the first connection's."""

    async def server_init(server_context: rally.ServerContext) -> tuple[Status, rally.Effect[Note]]:
        gate = server_context.state
        gate.inits += 1
        if gate.inits > 1:
            await gate.open.wait()
        return Status("here"), rally.effect.none()

    def server_update(model: Status, msg: SetStatus) -> tuple[Status, rally.Effect[Note]]:
        return Status(msg.status), rally.effect.none()

    def server_presence(model: Status) -> Status:
        return model


@dataclass
class Gate:
    open: asyncio.Event
    inits: int = 0


async def test_no_presence_diff_reaches_a_connection_before_its_state() -> None:
    """B is in the page's topic while its async server_init runs, but A's
    change meanwhile sends B no diff: B's first frame is its state, built when
    its init ends, with A's new status in it."""
    import websockets

    gate = Gate(asyncio.Event())
    app = rally.App(state=gate)
    app.page("/desk", SlowDesk)
    async with running(app) as server:
        url = f"ws://127.0.0.1:{server.port}/_rally/ws?page=/desk"
        async with websockets.connect(url) as a:
            [me] = (await next_frame(a)).pop("state")
            async with websockets.connect(url) as b:
                await eventually(lambda: gate.inits == 2, "B's server_init has begun")
                away = {"kind": "send", "seq": 1, "msg": {"type": "SetStatus", "fields": {"status": "away"}}}
                await a.send(json.dumps(away))
                assert [(await next_frame(a))["kind"] for _ in range(2)] == ["presence", "ack"]
                gate.open.set()
                first = await next_frame(b)
                assert [(p["id"], p["self"], p["meta"]) for p in first["state"]] == [
                    (me["id"], False, {"status": "away"}),
                    (first["state"][1]["id"], True, {"status": "here"}),
                ]


@contextlib.asynccontextmanager
async def gated_desk(desk: type) -> AsyncIterator[tuple[Gate, Callable[[], Awaitable[Any]]]]:
    """A server with ``desk`` at /desk and its gate, and a function that
    opens a raw WebSocket to the desk (closed on leaving)."""
    import websockets

    gate = Gate(asyncio.Event())
    app = rally.App(state=gate)
    app.page("/desk", desk)
    async with running(app) as server, contextlib.AsyncExitStack() as stack:
        url = f"ws://127.0.0.1:{server.port}/_rally/ws?page=/desk"

        async def connect() -> Any:
            return await stack.enter_async_context(websockets.connect(url))

        yield gate, connect


async def test_joins_in_one_turn_of_the_loop_are_one_diff_and_each_joiner_gets_the_whole_list() -> None:
    """B, C and D finish server_init in the same turn (one gate opens for all
    three): A gets one joins diff naming all three, each of them its list of
    four with itself marked, and nothing more about the others: their next
    presence frame is A's update."""
    async with gated_desk(SlowDesk) as (gate, connect):
        a = await connect()
        [me] = (await next_frame(a)).pop("state")
        others = [await connect() for _ in range(3)]
        await eventually(lambda: gate.inits == 4, "the three server_init have begun")
        gate.open.set()
        states = [(await next_frame(ws))["state"] for ws in others]
        ids = [me["id"], *(next(e["id"] for e in state if e["self"]) for state in states)]
        for n, state in enumerate(states, 1):
            assert [(e["id"], e["self"]) for e in state] == [(i, i == ids[n]) for i in ids]
            assert all(e["meta"] == {"status": "here"} for e in state)
        joins = await next_frame(a)
        assert (joins["joins"], joins["updates"], joins["leaves"]) == (
            [{**e, "self": False} for e in states[0][1:]],
            [],
            [],
        )
        away = {"kind": "send", "seq": 1, "msg": {"type": "SetStatus", "fields": {"status": "away"}}}
        await a.send(json.dumps(away))
        for ws in others:
            assert (await next_frame(ws))["updates"] == [{**me, "self": False, "meta": {"status": "away"}}]


class AnnouncingDesk(SlowDesk):
    """A slow desk whose ``server_init`` also tells the page who arrived."""

    async def server_init(server_context: rally.ServerContext) -> tuple[Status, rally.Effect[Note]]:
        model, _ = await SlowDesk.server_init(server_context)
        return model, rally.effect.broadcast_to_page(Note(f"{server_context.connection_id} arrived"))


async def test_a_waiting_join_is_announced_before_any_later_frame() -> None:
    """Joins wait for the end of the turn, but never past a frame published
    after them: B, C and D end server_init in one turn, each broadcasting
    "arrived" to the page and then joining, and A hears each join before the
    next one's broadcast."""
    async with gated_desk(AnnouncingDesk) as (gate, connect):
        a = await connect()
        assert [sorted(await next_frame(a)) for _ in range(2)] == [["kind", "msg"], ["kind", "state"]]  # its arrival
        others = [await connect() for _ in range(3)]
        await eventually(lambda: gate.inits == 4, "the three server_init have begun")
        gate.open.set()
        frames = [await next_frame(a) for _ in range(6)]
        order = [
            f"{f['msg']['fields']['text']}" if f["kind"] == "push" else f"joined {f['joins'][0]['id']}" for f in frames
        ]
        ids = [int(text.split()[0]) for text in order[::2]]
        assert order == [text for i in ids for text in (f"{i} arrived", f"joined {i}")]
        assert all(len(f["joins"]) == 1 for f in frames[1::2])
        for ws in others:
            await ws.close()


async def test_presence_tags_group_a_session_and_python_apis_agree() -> None:
    app, seen = desk_app()
    async with (
        running(app) as server,
        bounded_client(server, app) as alice,
        bounded_client(server, app) as bob,
        contextlib.AsyncExitStack() as stack,
    ):
        a1 = await stack.enter_async_context(alice.page("/desk"))
        await a1.next_presence()
        a2 = await stack.enter_async_context(alice.page("/desk"))
        b1 = await stack.enter_async_context(bob.page("/desk"))
        for page, frames in ((a1, 2), (a2, 2), (b1, 1)):  # a1: joins of a2 and b1; a2: state, join of b1
            for _ in range(frames):
                await page.next_presence()
        everyone = by_id(app.presence("/desk"))
        assert [p.id for p in everyone] == sorted([a1.connection_id, a2.connection_id, b1.connection_id])
        assert all(isinstance(p, rally.Presence) and p.meta == Status("here") for p in everyone)
        tags = {p.id: p.tag for p in everyone}
        assert tags[a1.connection_id] == tags[a2.connection_id] != tags[b1.connection_id]
        for who, page in ((alice, a1), (bob, b1)):
            assert who.session_id is not None and who.session_cookie is not None
            assert tags[page.connection_id] not in (who.session_id, who.session_cookie)
        for page in (a1, a2, b1):
            assert by_id(page.presence) == everyone
        assert sorted((await b1.rpc(WhoIsHere())).unwrap()) == [p.id for p in everyone]
        assert by_id(seen[-1]) == everyone

        await a2.send(SetStatus("away"))
        updated = by_id(await b1.next_presence())
        assert updated == by_id(app.presence("/desk"))
        assert [p.meta for p in updated if p.id == a2.connection_id] == [Status("away")]
        await a2.close()
        left = by_id(await b1.next_presence())
        assert left == by_id(app.presence("/desk")) == [p for p in everyone if p.id != a2.connection_id]
    assert app.presence("/desk") == []


# -- custom topics


@dataclass
class Shout:
    text: str


@dataclass
class Whisper:
    text: str


@dataclass
class Join:
    topic: str


@dataclass
class Quit:
    topic: str


@dataclass
class Yell:
    topic: str
    text: str


@dataclass
class Relay:
    page: str
    text: str


class Red:
    def server_init() -> tuple[int, rally.Effect[Shout]]:
        return 0, rally.effect.none()

    def server_update(model: int, msg: Join | Quit | Yell | Relay) -> tuple[int, rally.Effect[Shout]]:
        match msg:
            case Join(topic) | Quit(topic):  # then the sender hears the topic's name
                change = rally.effect.subscribe if isinstance(msg, Join) else rally.effect.unsubscribe
                return model, rally.effect.batch(change(topic), rally.effect.send_to_client(Shout(topic)))
            case Yell(topic, text):
                return model, rally.effect.broadcast_to_topic(topic, Shout(text))
            case Relay(page, text):
                return model, rally.effect.broadcast_to_page(Shout(text), page=page)


class Blue(Red):
    html = "<p>blue</p>"


class Mute:
    """Subscribes like the others, but pushes Whisper, not Shout."""

    def server_init() -> tuple[int, rally.Effect[Whisper]]:
        return 0, rally.effect.none()

    def server_update(model: int, msg: Join) -> tuple[int, rally.Effect[Whisper]]:
        return model, rally.effect.batch(rally.effect.subscribe(msg.topic), rally.effect.send_to_client(Whisper("in")))


def topics_app() -> rally.App:
    app = rally.App()
    app.page("/red", Red)
    app.page("/blue", Blue)
    app.page("/mute", Mute)
    return app


async def test_topics_subscribe_broadcast_unsubscribe_across_pages_and_end_with_the_connection() -> None:
    app = topics_app()
    async with (
        running(app) as server,
        bounded_client(server, app) as one,
        bounded_client(server, app) as two,
        two.page("/blue") as blue,
        two.page("/mute") as mute,
    ):
        async with one.page("/red") as red:
            for page in (red, blue):
                await page.send(Join("news"))
                assert await page.receive() == Shout("news")  # subscribed
            await mute.send(Join("news"))
            assert await mute.receive() == Whisper("in")

            await red.send(Yell("news", "from red"))
            assert [await red.receive(), await blue.receive()] == [Shout("from red")] * 2
            assert await app.broadcast_to_topic("news", Shout("from the app")) == 2  # mute does not declare Shout
            assert await app.broadcast_to_topic("news", Whisper("to mute")) == 1
            assert await mute.receive() == Whisper("to mute")  # no Shout before it
            assert [await red.receive(), await blue.receive()] == [Shout("from the app")] * 2

            await blue.send(Quit("news"))
            assert await blue.receive() == Shout("news")  # unsubscribed

            def from_a_thread() -> int:
                return app.broadcast_to_topic_threadsafe("news", Shout("thread")).result(WAIT)

            assert await asyncio.to_thread(from_a_thread) == 1
            await blue.send(Yell("news", "from blue"))  # a non-member may broadcast to a topic
            assert [await red.receive(), await red.receive()] == [Shout("thread"), Shout("from blue")]
            await blue.send(Relay("/blue", "marker"))
            assert await blue.receive() == Shout("marker")  # nothing of the topic after leaving it
        assert await app.broadcast_to_topic("news", Shout("nobody left")) == 0
        assert await app.broadcast_to_topic("news", Whisper("mute is still in")) == 1
        assert await mute.receive() == Whisper("mute is still in")
    assert app._registry.topics.members == {}


async def test_broadcast_to_another_page_must_be_a_type_that_page_declares(caplog: Any) -> None:
    app = topics_app()
    async with (
        running(app) as server,
        bounded_client(server, app) as client,
        client.page("/red") as red,
        client.page("/blue") as blue,
        client.page("/mute") as mute,
    ):
        await red.send(Relay("/blue", "over"))
        assert await blue.receive() == Shout("over")
        with pytest.raises(rally.RemoteError) as info:
            await red.send(Relay("/mute", "refused"))
        assert info.value.code == "internal"
        await red.send(Relay("/red", "home"))
        assert await red.receive() == Shout("home")  # the first thing red gets: "over" went to /blue only
        with pytest.raises(rally.UsageError, match="does not push Shout"):
            await app.broadcast_to_page("/mute", Shout("x"))
        with pytest.raises(rally.UsageError, match="no page"):
            await app.broadcast_to_page("/nowhere", Shout("x"))
        assert await app.broadcast_to_page("/mute", Whisper("only this")) == 1
        assert await mute.receive() == Whisper("only this")
    assert any("does not push Shout" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("topic", ["session:abc", "page:/red", "app", "app:x", ""])
async def test_reserved_or_empty_topic_names_are_usage_errors(topic: str) -> None:
    app = topics_app()
    for make in (
        rally.effect.subscribe,
        rally.effect.unsubscribe,
        lambda t: rally.effect.broadcast_to_topic(t, Shout("x")),
    ):
        with pytest.raises(rally.UsageError):
            make(topic)
    with pytest.raises(rally.UsageError):
        await app.broadcast_to_topic(topic, Shout("x"))
    with pytest.raises(rally.UsageError):
        rally.effect.broadcast_to_page(Shout("x"), page="red")  # a path starts with /


# -- lifespan


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def port_state(port: int) -> str:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    except ConnectionRefusedError:
        return "closed"
    writer.close()
    await writer.wait_closed()
    return "open"


class Tracked:
    def server_init() -> tuple[int, rally.Effect[Note]]:
        return 0, rally.effect.none()

    def server_terminate(model: int, server_context: rally.ServerContext) -> rally.Effect[Note]:
        server_context.state.append("terminate")
        return rally.effect.none()


def lifespan_app(events: list[str], port: int, *, fail: bool = False) -> rally.App:
    """An app whose lifespan records entering (and whether ``port`` accepted yet) and exiting."""

    @contextlib.asynccontextmanager
    async def lifespan(app: rally.App) -> AsyncIterator[None]:
        events.append("enter, port " + await port_state(port))
        if fail:
            raise RuntimeError("cannot reach the database")
        yield
        events.append("exit")

    app = rally.App(state=events, lifespan=lifespan)
    app.page("/", Tracked)
    return app


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
async def test_start_listens_at_a_numeric_address_or_a_name(host: str) -> None:
    """A numeric address is bound as it is; a name goes through the resolver.
    The Client names an IPv6 address in brackets in its Host header."""
    if host == "::1" and not ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (::1) to bind")
    server = await rally.App().start(host, 0, access_log=False)
    try:
        assert server.host in ("127.0.0.1", "::1")
        async with rally.Client(server.url, timeout=WAIT) as client:
            status, _, body = await client.request("GET", "/_rally/health")
        assert status == 200 and b'"ok"' in body
    finally:
        await asyncio.wait_for(server.close(), WAIT)


async def test_lifespan_is_entered_before_start_accepts_and_exited_after_close_drained() -> None:
    events: list[str] = []
    port = free_port()
    app = lifespan_app(events, port)
    server = await app.start("127.0.0.1", port, access_log=False)
    try:
        assert events == ["enter, port closed"]
        async with bounded_client(server, app) as client, client.page("/") as page:
            await asyncio.wait_for(server.close(), WAIT)  # the open page is drained first
            with pytest.raises(rally.ConnectionClosed):
                await page.receive()
    finally:
        await asyncio.wait_for(server.close(), WAIT)
    assert events == ["enter, port closed", "terminate", "exit"]


async def test_lifespan_with_serve_until_cancelled() -> None:
    events: list[str] = []
    port = free_port()
    app = lifespan_app(events, port)
    serving = asyncio.ensure_future(app.serve("127.0.0.1", port, access_log=False))
    try:
        deadline = asyncio.get_running_loop().time() + WAIT
        while await port_state(port) == "closed":  # poll until it listens, as eventually() does
            assert asyncio.get_running_loop().time() < deadline, "serve never listened"
            await asyncio.sleep(0.005)
        client = rally.Client(f"http://127.0.0.1:{port}", app, timeout=WAIT)
        async with client.page("/") as page:
            serving.cancel()
            with pytest.raises(rally.ConnectionClosed):
                await page.receive()
    finally:
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(serving, WAIT)
    assert events == ["enter, port closed", "terminate", "exit"]


def test_lifespan_with_run_in_thread() -> None:
    events: list[str] = []
    port = free_port()
    app = lifespan_app(events, port)
    with app.run_in_thread(port=port, access_log=False) as server:
        assert events == ["enter, port closed"]

        async def get() -> int:
            async with rally.Client(server.url, timeout=WAIT) as client:
                return (await client.request("GET", "/"))[0]

        assert asyncio.run(get()) == 200
    assert events == ["enter, port closed", "exit"]


async def test_lifespan_failing_to_enter_means_no_server_and_the_error_surfaces() -> None:
    events: list[str] = []
    port = free_port()
    app = lifespan_app(events, port, fail=True)
    with pytest.raises(RuntimeError, match="database"):
        await app.start("127.0.0.1", port)
    with pytest.raises(RuntimeError, match="database"):
        await asyncio.wait_for(app.serve("127.0.0.1", port), WAIT)
    assert await port_state(port) == "closed"

    def serve_in_thread() -> None:
        with app.run_in_thread(port=port):
            pytest.fail("run_in_thread served although the lifespan failed")

    with pytest.raises(RuntimeError, match="database"):
        await asyncio.to_thread(serve_in_thread)
    assert events == ["enter, port closed"] * 3


# -- responses from a view


class Records:
    def view(id: int) -> str | rally.Response:
        if id == 1:
            return rally.Response("<html><head></head><body>record 1</body></html>")
        if id == 2:
            return rally.Response("", 303, {"Location": "/records/1"})
        if id == 3:
            return rally.Response(b'{"id": 3}', content_type="application/json")
        return rally.Response(f"<p>no record {id}</p>", 404, {"cache-control": "no-store"})


async def test_view_response_sets_status_headers_and_body() -> None:
    app = rally.App()
    app.page("/records/{id}", Records)
    async with running(app) as server, bounded_client(server, app) as client:
        status, headers, body = await client.request("GET", "/records/9")
        assert (status, body, headers["cache-control"]) == (404, b"<p>no record 9</p>", "no-store")
        assert headers["content-type"] == "text/html; charset=utf-8"
        status, headers, body = await client.request("GET", "/records/2")
        assert (status, headers["location"], body) == (303, "/records/1", b"")
        status, headers, body = await client.request("GET", "/records/3")
        assert (status, headers["content-type"], body) == (200, "application/json", b'{"id": 3}')
        status, headers, body = await client.request("GET", "/records/1")
        assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
        assert b'<script id="rally-boot"' in body and b'<script src="/_rally/client.js"></script>' in body
        assert body.endswith(b"</head><body>record 1</body></html>")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"status": 99},
        {"status": 600},
        {"status": True},
        {"status": "200"},
        {"headers": {"bad name": "x"}},
        {"headers": {"x-split": "a\r\nset-cookie: b"}},
        {"headers": {"content-length": "1"}},
        {"headers": {"x-number": 1}},
        {"content_type": "text/html\r\nx: y"},
    ],
    ids=["status-99", "status-600", "status-bool", "status-str", "name", "crlf", "framing", "non-str", "type-crlf"],
)
def test_response_refuses_a_bad_status_or_header_at_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(rally.UsageError):
        rally.Response("body", **kwargs)


# -- Ok and Error


async def test_result_is_ok_is_error_unwrap_and_no_truth_value() -> None:
    ok, error = rally.Ok(3), rally.Error(["not found"])
    assert (ok.is_ok, ok.is_error, error.is_ok, error.is_error) == (True, False, False, True)
    assert (ok.unwrap(), error.unwrap_error()) == (3, ["not found"])
    with pytest.raises(rally.UnwrapError) as info:
        error.unwrap()
    assert info.value.error == ["not found"]
    with pytest.raises(rally.UnwrapError):
        ok.unwrap_error()
    for result in (ok, error):
        with pytest.raises(TypeError, match="is_ok"):
            bool(result)
    async with running(article_app()) as server, rally.Client(server.url, timeout=WAIT) as client:
        assert (await client.rpc(ServerLoadTitle("a"))).unwrap() == "Article: a"
        with pytest.raises(TypeError, match="is_ok"):
            assert await client.rpc(ServerLoadTitle("missing"))


# -- a numbered send


@pytest.mark.parametrize(
    ("make_app", "path", "msg", "push"),
    [
        (article_app, "/articles/abc", ("ToggleFavorite", {}), ("FavoriteToggled", {"article_id": 3})),
        (room_app, "/rooms/1", ("Say", {"scope": "client", "text": "count"}), ("Count", {"n": 1, "text": "count"})),
    ],
    ids=["sync-update", "async-update"],
)
async def test_numbered_send_is_acked_after_server_update_and_its_push(
    make_app: Any, path: str, msg: tuple[str, Any], push: tuple[str, Any]
) -> None:
    import websockets

    async with running(make_app()) as server:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/_rally/ws?page={path}") as ws:
            send = {"kind": "send", "msg": {"type": msg[0], "fields": msg[1]}}
            await ws.send(json.dumps({**send, "seq": 1}))
            assert await next_frame(ws) == {"kind": "push", "msg": {"type": push[0], "fields": push[1]}}
            assert await next_frame(ws) == {"kind": "ack", "seq": 1}
            await ws.send(json.dumps({**send, "seq": 2**53 - 1}))  # the largest
            assert (await next_frame(ws))["msg"]["type"] == push[0]
            assert await next_frame(ws) == {"kind": "ack", "seq": 2**53 - 1}
            await ws.send(json.dumps(send))
            assert (await next_frame(ws))["msg"]["type"] == push[0]  # no seq: no ack
            await ws.send(json.dumps({"kind": "rpc", "id": 9, "msg": {"type": "Nope", "fields": {}}}))
            assert (await next_frame(ws))["id"] == 9


async def test_refused_numbered_send_gets_an_error_with_its_seq() -> None:
    import websockets

    async with running(article_app()) as server:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/_rally/ws?page=/articles/a") as ws:
            await ws.send(json.dumps({"kind": "send", "seq": 1, "msg": {"type": "AddComment", "fields": {"body": 1}}}))
            reply = await next_frame(ws)
            assert (reply["kind"], reply["id"], reply["seq"], reply["code"]) == ("error", None, 1, "invalid")
            assert reply["errors"][0]["path"] == "msg.fields.body"
            await ws.send(json.dumps({"kind": "send", "seq": 2, "msg": {"type": "Nope", "fields": {}}}))
            reply = await next_frame(ws)
            assert (reply["kind"], reply["seq"], reply["code"]) == ("error", 2, "unknown_type")


@pytest.mark.parametrize("seq", [0, -1, "x", 2**53, 1.5, True, None], ids=repr)
async def test_send_with_a_bad_seq_is_invalid(seq: Any) -> None:
    import websockets

    async with running(article_app()) as server:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/_rally/ws?page=/articles/a") as ws:
            await ws.send(json.dumps({"kind": "send", "seq": seq, "msg": {"type": "ToggleFavorite", "fields": {}}}))
            reply = await next_frame(ws)
            assert (reply["kind"], reply["code"], "seq" in reply) == ("error", "invalid", False)
            assert reply["errors"][0]["path"] == "seq"
            await ws.send(json.dumps({"kind": "send", "seq": 3, "msg": {"type": "ToggleFavorite", "fields": {}}}))
            assert (await next_frame(ws))["kind"] == "push"  # the bad one ran nothing; the connection goes on
            assert await next_frame(ws) == {"kind": "ack", "seq": 3}


# ==== Delivery across reconnects (docs/delivery.md "Delivery across reconnects") ========


class CutProxy:
    """A TCP proxy to a server that loses the network on demand: ``cut()``
    resets both sides of every live connection without a WebSocket close
    (the server sees a lost connection, as after a network loss);
    ``silence()`` resets the client's side while the server's side is kept
    open and ignored (a loss the server has not noticed yet); ``mute()``
    drops what the server sends from then on (answers lost on the way)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.pipes: list[tuple[asyncio.Transport, asyncio.StreamWriter]] = []
        self.server: asyncio.Server | None = None
        self.zombies: list[asyncio.StreamWriter] = []
        self.muted = False

    async def __aenter__(self) -> "CutProxy":
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        for writer in self.zombies:
            writer.transport.abort()
        assert self.server is not None
        self.server.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        pair = (writer.transport, up_writer)
        self.pipes.append(pair)  # type: ignore[arg-type]

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    if pair not in self.pipes:
                        return  # silenced: what the server sends goes nowhere
                    if not (self.muted and dst is writer):
                        dst.write(data)
            if pair in self.pipes:
                dst.transport.abort()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

    def cut(self) -> None:
        for client_side, server_side in self.pipes:
            client_side.abort()
            server_side.transport.abort()
        self.pipes.clear()
        self.muted = False

    def mute(self) -> None:
        self.muted = True

    def silence(self) -> None:
        for client_side, server_side in self.pipes:
            client_side.abort()
            self.zombies.append(server_side)
        self.pipes.clear()


@dataclass
class Typed:
    text: str


@dataclass
class Said:
    text: str


@dataclass
class Ask:
    question: str


class Journal:
    """The ``state`` of the journal app: what each model applied, each
    ``server_init`` and ``server_terminate``, RPC runs, with waits."""

    def __init__(self) -> None:
        self.inits = 0
        self.terminated: list[list[str]] = []
        self.asked: list[str] = []
        self.release = asyncio.Event()
        self.changed = asyncio.Event()

    def note(self) -> None:
        self.changed.set()

    async def until(self, condition: Any) -> None:
        while not condition():
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), WAIT)


class JournalPage:
    """Each ``Typed`` is appended to the model and said to the whole page."""

    html = "<p>journal</p>"

    def server_init(server_context: rally.ServerContext) -> tuple[list[str], rally.Effect[Said]]:
        server_context.state.inits += 1
        server_context.state.note()
        return [], rally.effect.none()

    def server_update(model: list[str], msg: Typed) -> tuple[list[str], rally.Effect[Said]]:
        return [*model, msg.text], rally.effect.broadcast_to_page(Said(msg.text))

    def server_terminate(model: list[str], server_context: rally.ServerContext) -> rally.Effect[Said]:
        server_context.state.terminated.append(model)
        server_context.state.note()
        return rally.effect.none()

    async def server_ask(msg: Ask, server_context: rally.ServerContext) -> str:
        journal = server_context.state
        journal.asked.append(msg.question)
        journal.note()
        await journal.release.wait()
        return "answer to " + msg.question


def journal_app(**options: Any) -> tuple[rally.App, Journal]:
    journal = Journal()
    app = rally.App(state=journal, **options)
    app.page("/journal", JournalPage)
    return app, journal


async def said(page: rally.PageConnection, n: int) -> list[str]:
    return [(await page.receive()).text for _ in range(n)]


async def test_resume_after_a_cut_replays_missed_pushes_once_in_order_without_init() -> None:
    app, journal = journal_app()
    async with running(app) as server, CutProxy(server.port) as proxy:
        cut_client = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT)
        async with cut_client, bounded_client(server, app) as other:
            async with cut_client.page("/journal") as page, other.page("/journal") as steady:
                await page.send(Typed("a"))
                assert await said(page, 1) == ["a"] and await said(steady, 1) == ["a"]
                proxy.cut()
                await asyncio.wait_for(page.wait_closed(), WAIT)
                for text in "bcde":  # while the page is away
                    await steady.send(Typed(text))
                assert await said(steady, 4) == list("bcde")
                assert await page.reconnect() is True
                assert await said(page, 4) == list("bcde")  # missed, once, in order
                await page.send(Typed("f"))
                assert await said(page, 1) == ["f"] and await said(steady, 1) == ["f"]
                assert journal.inits == 2 and journal.terminated == []  # no second server_init


async def test_resume_takes_over_a_connection_the_server_still_thinks_open() -> None:
    app, journal = journal_app()
    async with running(app) as server, CutProxy(server.port) as proxy:
        client = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT)
        async with client, client.page("/journal") as page:
            await eventually(lambda: page.resume_token, "hello")
            proxy.silence()  # the server sees nothing: no reset, no close
            sending = asyncio.create_task(page.send(Typed("lost in the dark")))  # goes nowhere, or waits
            await asyncio.wait_for(page.wait_closed(), WAIT)
            assert await page.reconnect() is True
            await asyncio.wait_for(sending, WAIT)  # sent again (or at last), answered
            assert await said(page, 1) == ["lost in the dark"]  # applied once
            assert journal.inits == 1 and journal.terminated == []


async def test_a_send_whose_ack_was_lost_is_applied_once() -> None:
    app, journal = journal_app()
    async with running(app) as server, CutProxy(server.port) as proxy:
        client = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT)
        async with client, bounded_client(server, app) as other, other.page("/journal") as steady:
            async with client.page("/journal") as page:
                await eventually(lambda: page.resume_token, "hello")
                proxy.mute()
                sending = asyncio.create_task(page.send(Typed("once")))
                assert await said(steady, 1) == ["once"]  # applied; its push and ack are lost
                proxy.cut()
                await asyncio.wait_for(page.wait_closed(), WAIT)
                assert list(page._unacked) == [1] and not sending.done()  # the page does not know it was applied
                assert await page.reconnect() is True  # the server says it has send 1: not sent again
                await asyncio.wait_for(sending, WAIT)  # the lost ack, replayed
                assert await said(page, 1) == ["once"]  # and the lost push, before it
                assert not page._unacked
                await page.send(Typed("after"))
                assert await said(page, 1) == ["after"]
        await journal.until(lambda: len(journal.terminated) == 2)
        assert ["once", "after"] in journal.terminated  # the cut page's model: each send once


@pytest.mark.parametrize("why", ["window passed", "buffer overflowed", "closed by the page"])
async def test_resume_refused_starts_afresh(why: str) -> None:
    window = 0.2 if why == "window passed" else 30.0
    app, journal = journal_app(resume_window=window, max_outgoing_bytes=2048)
    async with running(app) as server, CutProxy(server.port) as proxy:
        client = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT)
        async with client, bounded_client(server, app) as other, other.page("/journal") as steady:
            page = client.page("/journal")
            await page.connect()
            await page.send(Typed("before"))
            assert await said(page, 1) == ["before"]
            if why == "closed by the page":
                await page.close()  # a closing handshake: the page is gone for good
            else:
                proxy.cut()
            await asyncio.wait_for(page.wait_closed(), WAIT)
            if why == "window passed":
                await journal.until(lambda: len(journal.terminated) == 1)
            elif why == "buffer overflowed":
                await steady.send(Typed("x" * 3000))  # more than the page may hold while away
                await journal.until(lambda: len(journal.terminated) == 1)
            assert await page.reconnect() is False
            assert journal.terminated[0] == ["before"]  # the old model ended, once
            assert journal.inits == 3
            await page.send(Typed("after"))
            assert (await page.receive()).text == "after"
            await page.close()


async def test_a_resume_token_is_worth_nothing_to_another_session() -> None:
    app, journal = journal_app()
    async with running(app) as server, CutProxy(server.port) as proxy:
        client = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT)
        thief = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT)
        async with client, thief, client.page("/journal") as page:
            await page.send(Typed("mine"))
            assert await said(page, 1) == ["mine"]
            proxy.cut()
            await asyncio.wait_for(page.wait_closed(), WAIT)
            stolen = thief.page("/journal")
            stolen.resume_token, stolen.last_seq = page.resume_token, 0
            assert await stolen.reconnect() is False  # a fresh page of the thief's own session
            await stolen.send(Typed("thief"))
            assert await said(stolen, 1) == ["thief"]  # nothing of the owner's page was replayed to it
            await stolen.close()
            assert await page.reconnect() is True  # the owner still can
            assert await said(page, 1) == ["thief"]  # what the page said while the owner was away
            assert journal.inits == 2
            await journal.until(lambda: journal.terminated == [["thief"]])  # only the thief's own page ended


@dataclass
class Applied:
    sends: int


class GreetingJournalPage(JournalPage):
    """A journal page whose ``server_init`` greets the new connection and
    whose presence meta is how many sends the model applied."""

    def server_init(server_context: rally.ServerContext) -> tuple[list[str], rally.Effect[Said]]:
        journal = server_context.state
        journal.inits += 1
        journal.note()
        return [], rally.effect.send_to_client(Said(f"init {journal.inits}"))

    def server_presence(model: list[str]) -> Applied:
        return Applied(len(model))


async def test_client_reconnect_not_resumed_keeps_the_fresh_init_pushes_and_presence() -> None:
    journal = Journal()
    app = rally.App(state=journal, resume_window=0)  # no resume: every reconnect starts afresh
    app.page("/journal", GreetingJournalPage)
    async with running(app) as server, CutProxy(server.port) as proxy:
        client = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT)
        async with client, client.page("/journal") as page:
            assert await said(page, 1) == ["init 1"]
            for text in "abc":
                await page.send(Typed(text))
            assert await said(page, 3) == list("abc")
            await eventually(lambda: [p.meta for p in page.presence] == [Applied(3)], "the presence of three sends")
            old_id, old_seq = page.connection_id, page.last_seq
            assert old_seq > 2  # more than the fresh page's first frames: they must not look old
            proxy.cut()
            await asyncio.wait_for(page.wait_closed(), WAIT)
            assert await page.reconnect() is False
            assert await said(page, 1) == ["init 2"]  # the fresh server_init's push
            await eventually(
                lambda: (
                    page.connection_id != old_id
                    and [(p.id, p.meta) for p in page.presence] == [(page.connection_id, Applied(0))]
                ),
                "the fresh page's presence state",
            )
            await page.send(Typed("after"))
            assert await said(page, 1) == ["after"]
            assert journal.inits == 2


class SlowJournalPage(JournalPage):
    """A journal page whose ``server_update`` notes each message, then waits
    for ``journal.release`` before applying it."""

    async def server_update(
        model: list[str], msg: Typed, server_context: rally.ServerContext
    ) -> tuple[list[str], rally.Effect[Said]]:
        journal = server_context.state
        journal.asked.append(msg.text)
        journal.note()
        await journal.release.wait()
        return [*model, msg.text], rally.effect.broadcast_to_page(Said(msg.text))


def slow_journal_app() -> tuple[rally.App, Journal]:
    journal = Journal()
    app = rally.App(state=journal)
    app.page("/journal", SlowJournalPage)
    return app, journal


async def test_client_send_returns_once_applied_and_raises_the_server_refusal() -> None:
    app, journal = slow_journal_app()
    async with running(app) as server, bounded_client(server, app) as client, client.page("/journal") as page:
        sending = asyncio.create_task(page.send(Typed("slow")))
        await journal.until(lambda: journal.asked == ["slow"])  # server_update is running
        assert not sending.done()  # no ack yet
        journal.release.set()
        await asyncio.wait_for(sending, WAIT)
        with pytest.raises(rally.RemoteError) as refused:
            await page.send(Ask("not a message of server_update"))
        assert refused.value.code == "unknown_type"
        await page.send(Typed("next"))
        assert await said(page, 2) == ["slow", "next"]  # the refusal went to its send, not to receive()


async def test_client_send_while_away_is_queued_and_applied_once_after_resume() -> None:
    app, journal = journal_app()
    async with running(app) as server, CutProxy(server.port) as proxy:
        client = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT)
        async with client, bounded_client(server, app) as other, other.page("/journal") as steady:
            async with client.page("/journal") as page:
                await page.send(Typed("a"))
                assert await said(page, 1) == ["a"]
                proxy.cut()
                await asyncio.wait_for(page.wait_closed(), WAIT)
                sending = asyncio.create_task(page.send(Typed("queued")))  # no error: it waits
                await eventually(lambda: 2 in page._unacked, "the send queued")
                assert await page.reconnect() is True
                await asyncio.wait_for(sending, WAIT)  # answered: applied
                assert await said(page, 1) == ["queued"]
                assert await said(steady, 2) == ["a", "queued"]
        await journal.until(lambda: len(journal.terminated) == 2)
        assert journal.terminated == [["a", "queued"], []]  # the cut page's sends once; the steady page's


async def test_client_sends_when_the_page_starts_afresh() -> None:
    app, journal = journal_app(resume_window=0)  # every reconnect starts afresh
    async with running(app) as server, CutProxy(server.port) as proxy:
        client = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT)
        async with client, bounded_client(server, app) as other, other.page("/journal") as steady:
            async with client.page("/journal") as page:
                await eventually(lambda: page.resume_token, "hello")
                proxy.mute()  # applied, but its push and ack are lost
                in_flight = asyncio.create_task(page.send(Typed("in flight")))
                assert await said(steady, 1) == ["in flight"]
                proxy.cut()
                await asyncio.wait_for(page.wait_closed(), WAIT)
                queued = asyncio.create_task(page.send(Typed("queued")))
                await eventually(lambda: len(page._unacked) == 2, "the second send queued")
                assert await page.reconnect() is False
                with pytest.raises(rally.RemoteError) as lost:
                    await asyncio.wait_for(in_flight, WAIT)  # written before: it may have been applied
                assert lost.value.code == "connection_lost"
                await asyncio.wait_for(queued, WAIT)  # never written before: applied to the new model
                assert await said(page, 1) == ["queued"] and await said(steady, 1) == ["queued"]
        await journal.until(lambda: len(journal.terminated) == 3)
        assert journal.terminated == [["in flight"], ["queued"], []]  # the old model, the new one, the steady page


async def test_client_queued_sends_are_bounded_and_a_send_given_up_is_not_applied() -> None:
    app, journal = journal_app()
    async with running(app) as server, CutProxy(server.port) as proxy:
        client = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT, max_queued_sends=2)
        async with client, client.page("/journal") as page:
            await eventually(lambda: page.resume_token, "hello")
            proxy.cut()
            await asyncio.wait_for(page.wait_closed(), WAIT)
            with pytest.raises(asyncio.TimeoutError):  # TimeoutError itself from Python 3.11 on
                await page.send(Typed("given up"), timeout=0.05)  # never written: withdrawn
            assert not page._unacked
            sending = [asyncio.create_task(page.send(Typed(text))) for text in ("1", "2", "3")]
            with pytest.raises(rally.RemoteError) as full:
                await asyncio.wait_for(sending[0], WAIT)  # the oldest makes room for the third
            assert full.value.code == "queue_full"
            assert await page.reconnect() is True
            await asyncio.wait_for(asyncio.gather(*sending[1:]), WAIT)
            assert await said(page, 2) == ["2", "3"]
        await journal.until(lambda: len(journal.terminated) == 1)
        assert journal.terminated == [["2", "3"]]


@pytest.mark.parametrize("how", ["close", "close while away", "close_session"])
async def test_client_send_raises_connection_closed_once_the_page_is_closed_for_good(how: str) -> None:
    app, journal = slow_journal_app()
    async with running(app) as server, CutProxy(server.port) as proxy:
        client = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT)
        async with client:
            page = client.page("/journal")
            await page.connect()
            await eventually(lambda: page.resume_token, "hello")
            if how == "close while away":
                proxy.cut()
                await asyncio.wait_for(page.wait_closed(), WAIT)
                pending = asyncio.create_task(page.send(Typed("never")))
                await eventually(lambda: page._unacked, "the send queued")
                await page.close()
            else:
                pending = asyncio.create_task(page.send(Typed("held")))
                await journal.until(lambda: journal.asked == ["held"])
                if how == "close":
                    await page.close()
                else:
                    assert client.session_id is not None
                    assert await app.close_session(client.session_id) == 1
            with pytest.raises(rally.ConnectionClosed) as info:
                await asyncio.wait_for(pending, WAIT)
            with pytest.raises(rally.ConnectionClosed) as again:
                await page.send(Typed("after"))
            if how == "close_session":
                assert info.value.code == again.value.code == rally.CLOSE_SESSION_CLOSED
            assert not page._unacked
            journal.release.set()


async def test_resume_works_when_the_server_had_sent_nothing_and_after_a_long_quiet() -> None:
    window = 1.0
    app, journal = journal_app(ping_interval=60, resume_window=window)
    async with running(app) as server, CutProxy(server.port) as proxy:
        client = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT)
        async with client, client.page("/journal") as page:
            await eventually(lambda: page.resume_token, "hello")  # all the server sent
            assert page.last_seq == 0
            # Quiet for twice the window: the window counts from the loss, not
            # from the last frame (elapsed time is what is tested here).
            await asyncio.sleep(2 * window)
            proxy.cut()
            await asyncio.wait_for(page.wait_closed(), WAIT)
            assert await page.reconnect() is True
            await page.send(Typed("still me"))
            assert await said(page, 1) == ["still me"]
            assert journal.inits == 1


async def test_client_rpcs_with_a_key_run_once_per_session_over_http_and_the_page() -> None:
    app, journal = journal_app()
    journal.release.set()
    async with running(app) as server, bounded_client(server, app) as client, bounded_client(server, app) as other:
        async with client.page("/journal") as page:  # the session's cookie
            assert await page.rpc(Ask("q"), key="k1") == rally.Ok("answer to q")
            assert await page.rpc(Ask("q"), key="k1") == rally.Ok("answer to q")  # the kept answer
        assert await client.rpc(Ask("q"), key="k1") == rally.Ok("answer to q")  # one session, one store
        assert await client.rpc(Ask("r"), key="k2") == rally.Ok("answer to r")
        assert await client.rpc(Ask("no key")) == await client.rpc(Ask("no key")) == rally.Ok("answer to no key")
        async with other.page("/journal"):  # another session: its own k1
            assert await other.rpc(Ask("s"), key="k1") == rally.Ok("answer to s")
        with pytest.raises(rally.RemoteError) as bad:
            await client.rpc(Ask("t"), key="k" * 65)
        assert bad.value.code == "invalid"
    assert journal.asked == ["q", "r", "no key", "no key", "s"]


async def test_an_rpc_retried_with_its_key_runs_once() -> None:
    app, journal = journal_app()
    async with running(app) as server:
        [(page, _)] = responses(
            await exchange(server, b"GET /journal HTTP/1.1\r\nhost: localhost\r\n\r\n", until_close=False)
        )
        cookie = dict(page.headers)[b"set-cookie"].split(b";")[0]
        session = b"cookie: " + cookie + b"\r\n"
        body = json.dumps(
            {"kind": "rpc", "id": 1, "key": "load1-1", "msg": {"type": "Ask", "fields": {"question": "q"}}}
        )

        def rpc_request(body: bytes, extra: bytes = session) -> bytes:
            return globals()["rpc_request"](body, extra)

        first = asyncio.create_task(exchange(server, rpc_request(body.encode()), until_close=False))
        await journal.until(lambda: journal.asked == ["q"])
        first.cancel()  # its answer is lost with its connection
        with contextlib.suppress(asyncio.CancelledError):
            await first
        retry = body.replace('"id": 1', '"id": 2')
        second = asyncio.create_task(exchange(server, rpc_request(retry.encode()), until_close=False))
        third = asyncio.create_task(exchange(server, rpc_request(body.encode()), until_close=False))
        journal.release.set()
        answers = [json.loads(responses(await t)[0][1]) for t in (second, third)]
        assert answers == [
            {"kind": "ok", "id": 2, "value": "answer to q"},
            {"kind": "ok", "id": 1, "value": "answer to q"},
        ]
        assert journal.asked == ["q"]  # the handler ran once
        # Another session with the same key is another call.
        other = rpc_request(body.encode(), b"")
        assert json.loads(responses(await exchange(server, other, until_close=False))[0][1])["value"] == "answer to q"
        assert journal.asked == ["q", "q"]


@dataclass
class Vanish:
    pass


class VanishingPage:
    async def view() -> str:
        raise asyncio.CancelledError


@pytest.mark.parametrize(
    ("first", "status", "body"),
    [
        (
            rpc_request(envelope("Vanish", {}, 1)),
            500,
            b'{"kind":"error","id":1,"code":"internal","errors":[{"path":"","message":"internal server error"}]}',
        ),
        (b"GET /vanishing HTTP/1.1\r\nhost: localhost\r\n\r\n", 500, b"internal server error\n"),
    ],
    ids=["rpc handler", "view"],
)
@pytest.mark.skipif(
    sys.version_info < (3, 11),
    reason="Python 3.10 tasks cannot tell a handler's own CancelledError from a cancellation (Task.cancelling is 3.11)",
)
async def test_a_cancelled_error_raised_by_a_handler_is_answered_and_the_connection_goes_on(
    first: bytes, status: int, body: bytes
) -> None:
    """A CancelledError out of what an HTTP answer awaits (the handler raises
    it; no task was cancelled) is answered 500, and the connection is not
    left busy: the next request on it is answered."""
    app = rpc_app()
    app.page("/vanishing", VanishingPage)

    @app.rpc
    async def server_vanish(msg: Vanish) -> str:
        raise asyncio.CancelledError

    async with running(app) as server:
        then = rpc_request(envelope("ServerLoadTitle", {"slug": "after"}, 2), b"connection: close\r\n")
        answers = [(r.status_code, b) for r, b in responses(await exchange(server, first + then))]
        assert answers == [(status, body), (200, b'{"kind":"ok","id":2,"value":"Article: after"}')]


def busy_http(server: rally.Server) -> int:
    """How many of the server's HTTP connections are answering a request."""
    return sum(isinstance(c, rally._HttpConn) and c.state is rally._HttpState.BUSY for c in server.conns)


async def test_a_keyed_rpc_whose_page_closes_while_it_runs_still_answers_the_retry_waiting_for_it() -> None:
    app, journal = journal_app()
    async with running(app) as server, bounded_client(server, app) as client:
        async with client.page("/journal") as page:  # the session's cookie
            first = asyncio.create_task(page.rpc(Ask("q"), key="k1"))
            await journal.until(lambda: journal.asked == ["q"])
            retry = asyncio.create_task(client.rpc(Ask("q"), key="k1"))  # over HTTP: waits for the first call
            await eventually(lambda: busy_http(server) == 1, "the retry waiting for the first call")
        # The page closed with a handshake: its session ended and let go of the first call.
        await journal.until(lambda: journal.terminated == [[]])
        with pytest.raises(rally.ConnectionClosed):
            await asyncio.wait_for(first, WAIT)
        journal.release.set()
        assert await asyncio.wait_for(retry, WAIT) == rally.Ok("answer to q")
        assert await client.rpc(Ask("q"), key="k1") == rally.Ok("answer to q")  # kept
    assert journal.asked == ["q"]  # the handler ran once


async def test_a_send_taken_already_is_ignored() -> None:
    import websockets

    async with running(article_app()) as server:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/_rally/ws?page=/articles/abc") as ws:
            for seq in (1, 1, 2, 1):
                await ws.send(json.dumps({"kind": "send", "seq": seq, "msg": {"type": "ToggleFavorite", "fields": {}}}))
            push = {"kind": "push", "msg": {"type": "FavoriteToggled", "fields": {"article_id": 3}}}
            frames = [await next_frame(ws) for _ in range(4)]
            assert frames == [push, {"kind": "ack", "seq": 1}, push, {"kind": "ack", "seq": 2}]
            await ws.send(
                json.dumps({"kind": "rpc", "id": 9, "msg": {"type": "ServerLoadTitle", "fields": {"slug": "x"}}})
            )
            assert (await next_frame(ws))["id"] == 9  # nothing else came in between


@settings(max_examples=15, deadline=None)
@given(st.lists(st.sampled_from(["send", "say", "cut", "cut in flight"]), max_size=12))
def test_every_push_arrives_once_in_order_whatever_the_cuts(ops: list[str]) -> None:
    async def scenario() -> None:
        app, journal = journal_app()
        async with running(app) as server, CutProxy(server.port) as proxy:
            client = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT)
            async with client, bounded_client(server, app) as other, other.page("/journal") as steady:
                page = client.page("/journal")
                await page.connect()
                await eventually(lambda: page.resume_token, "hello")
                produced: list[str] = []  # every Said, in the order the page's topic got them
                sent: list[str] = []  # the cut page's sends
                for i, op in enumerate(ops):
                    sending = None
                    if op == "say":
                        await steady.send(Typed(f"say{i}"))
                    elif op in ("send", "cut in flight"):
                        if op == "cut in flight":
                            proxy.mute()  # applied, but neither its push nor its ack gets back
                        sent.append(f"send{i}")
                        sending = asyncio.create_task(page.send(Typed(sent[-1])))
                        if op == "send":
                            await asyncio.wait_for(sending, WAIT)
                    if op != "cut":
                        produced += await said(steady, 1)
                    if op in ("cut", "cut in flight"):
                        proxy.cut()
                        await asyncio.wait_for(page.wait_closed(), WAIT)
                        assert await page.reconnect() is True
                    if sending is not None:
                        await asyncio.wait_for(sending, WAIT)  # answered once the page resumed
                await steady.send(Typed("end"))
                produced += await said(steady, 1)
                assert await said(page, len(produced)) == produced  # no gap, no duplicate, in order
                await page.close()
            await journal.until(lambda: len(journal.terminated) == 2)
            assert sent in journal.terminated  # each of the page's sends applied once, in order
            assert journal.inits == 2

    asyncio.run(scenario())


@pytest.mark.parametrize("size", [0, 100, 109, 110, 65_490, 65_500, 70_000])
def test_a_numbered_frame_is_the_shared_payload_with_its_seq_first(size: int) -> None:
    """Read by a real wsproto client, across the 126 and 65 536 byte length forms."""
    push = {"kind": "push", "msg": {"type": "T", "fields": {"x": "a" * size}}}
    payload = json.dumps(push).encode()
    for seq in (1, 99, 2**53 - 1):
        client = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT)
        client.receive_data(rally._seq_frame(seq, payload[1:]))
        [message] = list(client.events())
        assert isinstance(message, wsproto.events.TextMessage) and message.message_finished
        assert message.data.startswith(f'{{"seq":{seq},"kind"')
        assert json.loads(message.data) == {"seq": seq, **push}


async def test_held_pages_are_bounded_by_max_connections_at_n_and_n_plus_one() -> None:
    app, journal = journal_app(max_connections=2)
    async with running(app) as server, CutProxy(server.port) as proxy:
        clients = [rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT) for _ in range(3)]
        async with clients[0], clients[1], clients[2]:
            pages = [c.page("/journal") for c in clients]

            async def open_and_cut(page: rally.PageConnection) -> None:
                await page.connect()
                await eventually(lambda: page.resume_token, "hello")
                proxy.cut()  # every live connection: the ones still open are cut again below
                await asyncio.wait_for(page.wait_closed(), WAIT)

            await open_and_cut(pages[0])
            await open_and_cut(pages[1])  # two held: N
            assert len(app._registry.held.timers) == 2
            await open_and_cut(pages[2])  # a third would be N + 1: it ends at once
            await journal.until(lambda: len(journal.terminated) == 1)
            assert len(app._registry.held.timers) == 2
            assert await pages[0].reconnect() is True
            assert await pages[2].reconnect() is False
            for page in pages[:1] + pages[2:]:
                await page.close()


@pytest.mark.parametrize("ack", ['{"kind":"ack","seq":%d}', '{ "seq": %d, "kind": "ack" }'], ids=["browser", "spaced"])
async def test_a_page_acknowledgement_frees_what_the_server_held_and_resume_from_before_it(ack: str) -> None:
    import websockets

    app, journal = journal_app()
    async with running(app) as server:
        url = f"ws://127.0.0.1:{server.port}/_rally/ws?page=/journal&last=0"
        async with websockets.connect(url) as ws:
            hello = await next_frame(ws)
            assert (hello["kind"], hello["resumed"], hello["ack"]) == ("hello", False, 0)
            cookie = {"cookie": ws.response.headers["set-cookie"].split(";")[0]}
            held = app._registry.held.get(hello["resume"])
            assert held is not None and held.replay is not None
            for i in (1, 2, 3):
                await ws.send(
                    json.dumps({"kind": "send", "seq": i, "msg": {"type": "Typed", "fields": {"text": str(i)}}})
                )
                assert await next_frame(ws) == {
                    "seq": i,
                    "kind": "push",
                    "msg": {"type": "Said", "fields": {"text": str(i)}},
                }
                assert await next_frame(ws) == {"kind": "ack", "seq": i}  # unnumbered
            # Pushes are held until acknowledged; acks are not (hello's "ack" settles them).
            assert [(pos, numbered) for pos, _, numbered, _ in held.replay.frames] == [(1, True), (2, True), (3, True)]
            await ws.send(ack % 2)
            await ws.send(ack % 9)  # more than was sent: refused, nothing changes
            assert (await next_frame(ws))["code"] == "invalid"
            assert [(pos, numbered) for pos, _, numbered, _ in held.replay.frames] == [(3, True)]
            ws.transport.abort()  # type: ignore[attr-defined]
        # The page has every frame up to 2: the rest comes again, in order.
        await eventually(lambda: held.state is rally._PageState.DETACHED, "held")
        async with websockets.connect(f"{url[:-1]}2&resume={hello['resume']}", additional_headers=cookie) as ws:
            again = await next_frame(ws)
            assert (again["kind"], again["resumed"], again["ack"]) == ("hello", True, 3)
            assert [await next_frame(ws) for _ in range(2)] == [
                {"seq": 3, "kind": "push", "msg": {"type": "Said", "fields": {"text": "3"}}},
                {"kind": "ack", "seq": 3},  # settles every send up to 3
            ]
            ws.transport.abort()  # type: ignore[attr-defined]
        # The frames before 2 are gone: a page that has only frame 1 starts afresh.
        await eventually(lambda: held.state is rally._PageState.DETACHED, "held again")
        async with websockets.connect(f"{url[:-1]}1&resume={hello['resume']}", additional_headers=cookie) as ws:
            assert (await next_frame(ws))["resumed"] is False
        await journal.until(lambda: len(journal.terminated) == 2)
        assert journal.terminated == [["1", "2", "3"], []]  # the held page ended when it could not go on
        assert journal.inits == 2


@pytest.mark.parametrize("value", [-0.001, -1, "30", True, None], ids=repr)
def test_resume_window_is_a_number_of_seconds_zero_or_more(value: Any) -> None:
    with pytest.raises(rally.RegistrationError, match="resume_window"):
        rally.App(resume_window=value)
    rally.App(resume_window=0)
    rally.App(resume_window=0.5)


@pytest.mark.parametrize("query", ["last=x", "last=-1", "last=1.5", "last=12345678901234567"])
async def test_a_last_that_is_not_a_frame_number_is_a_400(query: str) -> None:
    app, _ = journal_app()
    async with running(app) as server:
        request = (
            b"GET /_rally/ws?page=/journal&%s HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\n"
            b"connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
        ) % query.encode()
        [(response, _)] = responses(await exchange(server, request))
        assert response.status_code == 400


@pytest.mark.parametrize("key", ["", "k" * 65, 7, None], ids=["empty", "65 characters", "int", "null"])
async def test_an_rpc_key_that_is_not_a_short_string_is_invalid(key: Any) -> None:
    async with running(rpc_app()) as server:
        body = {"kind": "rpc", "id": 1, "key": key, "msg": {"type": "ServerLoadTitle", "fields": {"slug": "x"}}}
        sent = rpc_request(json.dumps(body).encode())
        [(response, data)] = responses(await exchange(server, sent, until_close=False))
        assert response.status_code == 400
        assert json.loads(data)["errors"][0]["path"] == ("" if key is None else "key")
    ok = {"kind": "rpc", "id": 1, "key": "k" * 64, "msg": {"type": "ServerLoadTitle", "fields": {"slug": "x"}}}
    async with running(rpc_app()) as server:
        sent = rpc_request(json.dumps(ok).encode())
        [(response, _)] = responses(await exchange(server, sent, until_close=False))
        assert response.status_code == 200


async def test_resume_window_zero_turns_resume_off() -> None:
    app, journal = journal_app(resume_window=0)
    async with running(app) as server, CutProxy(server.port) as proxy:
        client = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT)
        async with client, client.page("/journal") as page:
            await eventually(lambda: page.resume_token, "hello")  # still numbered
            await page.send(Typed("a"))
            assert await said(page, 1) == ["a"]
            proxy.cut()
            await asyncio.wait_for(page.wait_closed(), WAIT)
            await journal.until(lambda: journal.terminated == [["a"]])  # ended at once, not held
            assert await page.reconnect() is False
            assert journal.inits == 2


def ask(question: str) -> dict[str, Any]:
    return {"type": "Ask", "fields": {"question": question}}


def kept_keys(answers: rally._Answers) -> dict[str, list[str]]:
    return {session: list(shelf.calls) for session, shelf in answers.shelves.items() if shelf.calls}


@pytest.mark.parametrize(
    ("bounds", "calls", "kept"),
    [
        ({"session_count": 3}, [("s", "k0", 5), ("s", "k1", 5), ("s", "k2", 5)], {"s": ["k0", "k1", "k2"]}),
        (  # N + 1: the session's oldest goes
            {"session_count": 3},
            [("s", "k0", 5), ("s", "k1", 5), ("s", "k2", 5), ("s", "k3", 5)],
            {"s": ["k1", "k2", "k3"]},
        ),
        ({"session_bytes": 30}, [("s", "a", 10), ("s", "b", 20)], {"s": ["a", "b"]}),
        ({"session_bytes": 30}, [("s", "a", 10), ("s", "b", 20), ("s", "c", 1)], {"s": ["b", "c"]}),
        ({"session_bytes": 30}, [("s", "a", 10), ("s", "big", 31)], {"s": ["a"]}),  # answered, not kept
        (
            {"session_count": 2},  # one session's bound leaves the others alone
            [("a", "k0", 5), ("b", "k0", 5), ("b", "k1", 5), ("b", "k2", 5)],
            {"a": ["k0"], "b": ["k1", "k2"]},
        ),
        ({"total_count": 3}, [("a", "k0", 5), ("a", "k1", 5), ("b", "k0", 5)], {"a": ["k0", "k1"], "b": ["k0"]}),
        (  # N + 1 in all: the heaviest session's oldest goes, not the oldest answer
            {"total_count": 3},
            [("b", "k0", 5), ("a", "k0", 5), ("a", "k1", 5), ("c", "k0", 5)],
            {"b": ["k0"], "a": ["k1"], "c": ["k0"]},
        ),
        (
            {"total_bytes": 30},
            [("a", "k0", 5), ("b", "k0", 10), ("b", "k1", 10), ("c", "k0", 5)],
            {"a": ["k0"], "b": ["k0", "k1"], "c": ["k0"]},
        ),
        (
            {"total_bytes": 30},
            [("a", "k0", 5), ("b", "k0", 10), ("b", "k1", 10), ("c", "k0", 6)],
            {"a": ["k0"], "b": ["k1"], "c": ["k0"]},
        ),
    ],
    ids=[
        "session count N",
        "session count N+1",
        "session bytes N",
        "session bytes N+1",
        "reply over session bytes",
        "other sessions untouched",
        "total count N",
        "total count N+1 heaviest first",
        "total bytes N",
        "total bytes N+1 heaviest first",
    ],
)
def test_kept_rpc_answers_are_bounded_per_session_and_in_all_at_n_and_n_plus_one(
    bounds: dict[str, int], calls: list[tuple[str, str, int]], kept: dict[str, list[str]]
) -> None:
    answers = rally._Answers(30, **bounds)
    runs: list[tuple[str, str]] = []
    for session, key, size in calls:
        reply = answers.answer(
            session, key, 1, ask(key), lambda s=session, k=key, n=size: runs.append((s, k)) or (200, b"x" * n)
        )
        assert reply == (200, b"x" * size)
    assert kept_keys(answers) == kept
    assert answers.count == sum(map(len, kept.values()))
    assert answers.size == sum(size for session, key, size in calls if key in kept.get(session, ()))
    runs.clear()
    for session, key, _ in calls:  # a retry of a kept key runs nothing
        if key in kept.get(session, ()):
            answers.answer(session, key, 1, ask(key), lambda s=session, k=key: runs.append((s, k)) or (200, b""))
    assert runs == []
    forgotten = [(s, k) for s, k, _ in calls if k not in kept.get(s, ())]
    if forgotten:  # a retry of a forgotten one runs it again
        session, key = forgotten[0]
        answers.answer(session, key, 1, ask(key), lambda: runs.append((session, key)) or (200, b""))
        assert runs == [forgotten[0]]


@pytest.mark.parametrize(
    ("session", "msg", "answer"),
    [
        ("s", ask("q"), (200, b'{"kind":"ok","id":2,"value":"answer 1"}')),
        ("s", {"fields": {"question": "q"}, "type": "Ask"}, (200, b'{"kind":"ok","id":2,"value":"answer 1"}')),
        ("s", ask("other"), "key_reused"),
        ("s", {"type": "Tell", "fields": {"question": "q"}}, "key_reused"),
        ("s", {"type": "Ask", "fields": {"question": "q", "more": 1}}, "key_reused"),
        ("t", ask("other"), (200, b'{"kind":"ok","id":2,"value":"answer 2"}')),  # another session: another call
    ],
    ids=["same", "same, keys in another order", "other fields", "other type", "more fields", "other session"],
)
def test_a_key_reused_with_another_message_is_refused_never_answered_the_first_answer(
    session: str, msg: dict[str, Any], answer: Any
) -> None:
    answers = rally._Answers(30)
    runs = 0

    def run(msg_id: int) -> tuple[int, bytes]:
        nonlocal runs
        runs += 1
        return 200, json.dumps({"kind": "ok", "id": msg_id, "value": f"answer {runs}"}, separators=(",", ":")).encode()

    assert answers.answer("s", "k", 1, ask("q"), lambda: run(1)) == (200, b'{"kind":"ok","id":1,"value":"answer 1"}')
    reply = answers.answer(session, "k", 2, msg, lambda: run(2))
    if answer == "key_reused":
        status, body = reply  # type: ignore[misc]
        assert status == 422 and json.loads(body)["code"] == "key_reused" and json.loads(body)["id"] == 2
        assert runs == 1
        assert answers.answer("s", "k", 3, ask("q"), lambda: run(3))[1] == b'{"kind":"ok","id":3,"value":"answer 1"}'  # type: ignore[index]
    else:
        assert reply == answer


async def test_a_keyed_call_runs_in_the_stores_task_and_every_caller_gets_its_answer() -> None:
    answers = rally._Answers(30, session_count=2)
    release = asyncio.Event()

    async def handler(msg_id: int, text: str) -> tuple[int, bytes]:
        await release.wait()
        return 200, json.dumps({"kind": "ok", "id": msg_id, "value": text}, separators=(",", ":")).encode()

    first = answers.answer("s", "a", 1, ask("a"), lambda: handler(1, "A"))
    retry = answers.answer("s", "a", 2, ask("a"), lambda: handler(2, "never"))
    other = answers.answer("s", "b", 3, ask("b"), lambda: handler(3, "B"))
    assert len(answers.tasks) == 2
    # N + 1 with the session's two calls both running: nothing to evict.
    busy = answers.answer("s", "c", 4, ask("c"), lambda: handler(4, "never"))
    assert busy[0] == 503 and json.loads(busy[1])["code"] == "busy"  # type: ignore[index]
    assert isinstance(first, asyncio.Future) and isinstance(retry, asyncio.Future)
    first.cancel()  # a caller going away (its page ended) leaves the call running
    release.set()
    assert await asyncio.wait_for(retry, WAIT) == (200, b'{"kind":"ok","id":2,"value":"A"}')
    assert await asyncio.wait_for(other, WAIT) == (200, b'{"kind":"ok","id":3,"value":"B"}')  # type: ignore[arg-type]
    assert not answers.tasks and kept_keys(answers) == {"s": ["a", "b"]}
    # Now there is an answer to evict: the session's oldest goes.
    assert answers.answer("s", "c", 5, ask("c"), lambda: (200, b"C")) == (200, b"C")
    assert kept_keys(answers) == {"s": ["b", "c"]}


async def test_a_keyed_call_cancelled_before_it_ran_answers_internal_and_is_not_kept() -> None:
    answers = rally._Answers(30)
    ran: list[int] = []

    async def handler(msg_id: int) -> tuple[int, bytes]:
        ran.append(msg_id)
        return 200, b"{}"

    waiting = answers.answer("s", "k", 1, ask("q"), lambda: handler(1))
    [task] = answers.tasks
    task.cancel()  # shutdown, before the call's task ever ran
    status, body = await asyncio.wait_for(waiting, WAIT)  # type: ignore[misc]
    assert (status, json.loads(body)["code"], json.loads(body)["id"]) == (500, "internal", 1)
    assert ran == [] and kept_keys(answers) == {} and answers.count == 0
    assert await asyncio.wait_for(answers.answer("s", "k", 2, ask("q"), lambda: handler(2)), WAIT) == (200, b"{}")  # type: ignore[arg-type]
    assert ran == [2]


def test_a_kept_rpc_answer_expires_after_the_window() -> None:
    answers = rally._Answers(window=0.001)
    answers.answer("s", "k", 1, ask("q"), lambda: (200, b'{"kind":"ok","id":1,"value":2}'))
    deadline = time.monotonic() + 0.001
    while time.monotonic() <= deadline:  # the window is what is tested: let it pass
        pass
    assert answers.answer("s", "k", 1, ask("q"), lambda: (200, b"again")) == (200, b"again")
    answers.answer("t", "k", 1, ask("q"), lambda: (200, b"t"))  # the expired session is swept
    assert list(answers.shelves) == ["s", "t"] and answers.count == 2


# ==== Counting connections (app.connections, GET /_rally/health) ==============


async def health_of(client: rally.Client) -> dict[str, Any]:
    status, _, body = await client.request("GET", "/_rally/health")
    assert status == 200
    return json.loads(body)  # type: ignore[no-any-return]


async def test_connections_counts_this_processs_pages_by_path_and_not_those_held_for_resume() -> None:
    app, journal = journal_app()
    app.page("/articles/{slug}", Article)
    assert app.connections() == 0 and app.connections("/journal") == 0  # not serving yet
    async with running(app) as server, CutProxy(server.port) as proxy:
        cut_client = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT)
        async with cut_client, bounded_client(server, app) as other:
            async with (
                cut_client.page("/journal") as held,
                other.page("/journal") as steady,
                other.page("/articles/a") as a,
                other.page("/articles/b") as b,
            ):
                await held.send(Typed("hi"))  # each connection's session has started: it heard back
                assert await said(held, 1) == ["hi"] and await said(steady, 1) == ["hi"]
                for article in (a, b):
                    await article.send(ToggleFavorite())
                    await article.receive()
                assert app.connections() == 4 and (await health_of(other))["connections"] == 4
                assert app.connections("/journal") == 2 and app.connections("/articles/a") == 1
                assert app.connections("/articles/{slug}") == 0 and app.connections("/nowhere") == 0
                proxy.cut()  # held's connection is lost: its page is kept for a resume, not counted
                await eventually(lambda: app.connections() == 3, "the lost connection uncounted")
                assert app.connections("/journal") == 1 and len(app._registry.held.timers) == 1
                assert journal.terminated == []  # held, not ended
                assert (await health_of(other))["connections"] == 3
                assert await held.reconnect() is True
                await eventually(lambda: app.connections() == 4, "the resumed page counted again")
                assert app.connections("/journal") == 2
                await a.close()
                await eventually(lambda: app.connections("/articles/a") == 0, "the closed page uncounted")
                assert app.connections() == 3
        await eventually(lambda: app.connections() == 0, "every page closed")
    with pytest.raises(rally.UsageError, match="connections"):
        app.connections(42)  # type: ignore[arg-type]


# ==== README =================================================================


def readme_blocks() -> dict[str, str]:
    """README's Python blocks marked ``<!-- runnable: NAME -->``, by file name."""
    import re

    with open(os.path.join(os.path.dirname(__file__), "README.md"), encoding="utf-8") as f:
        text = f.read()
    return dict(re.findall(r"<!-- runnable: (\S+) -->\n```python\n(.*?)```", text, re.S))


def python_in(directory: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python in ``directory`` with this rally.py importable."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(rally.__file__))}
    return subprocess.run([sys.executable, *args], cwd=directory, env=env, capture_output=True, text=True, timeout=60)


def test_readme_is_a_front_door_whose_every_python_block_runs() -> None:
    """README stays short (the deep material is in docs/), and every Python
    block in it is marked runnable, so the tests below run it."""
    with open(os.path.join(os.path.dirname(__file__), "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert len(text.splitlines()) <= 400, "README.md is the front door: move detail to docs/"
    assert text.count("```python") == len(readme_blocks()) == 3
    for link in re.findall(r"\]\((docs/[a-z]+\.md)", text):
        assert os.path.exists(os.path.join(os.path.dirname(__file__), link)), link


async def test_readme_hello_answers_as_its_curl_line_says(tmp_path: Any) -> None:
    with open(os.path.join(os.path.dirname(__file__), "README.md"), encoding="utf-8") as f:
        text = f.read()
    [(body, answer)] = re.findall(r"curl -s localhost:8000/_rally/rpc .*?-d '(.*?)'\n# (.*?)\n", text, re.S)
    (tmp_path / "hello.py").write_text(readme_blocks()["hello.py"])
    sys.path.insert(0, str(tmp_path))
    try:
        import hello
    finally:
        sys.path.remove(str(tmp_path))
    async with rally.TestClient(hello.app) as client:
        status, _, got = await client.request(
            "POST", "/_rally/rpc", body.encode(), headers=[("content-type", "application/json")]
        )
    assert status == 200 and json.loads(got) == json.loads(answer)


def test_readme_examples_run_as_pasted(tmp_path: Any) -> None:
    blocks = readme_blocks()
    assert set(blocks) == {"hello.py", "example.py", "client.py"}
    for name, code in blocks.items():
        (tmp_path / name).write_text(code)
    run = python_in(tmp_path, "client.py")
    assert run.returncode == 0, run.stderr
    # Each print's output is what the comment beside it says.
    promised = [line.split("# ")[-1] for line in blocks["client.py"].splitlines() if "print(" in line]
    assert run.stdout.splitlines() == promised
    # The example is also served by the command line (its app.run() is guarded).
    cli = python_in(tmp_path, rally.__file__, "example:app", "--types", "-")
    assert cli.returncode == 0 and "ServerLoadTitle" in cli.stdout, cli.stderr


def test_cli_refuses_a_module_that_starts_a_server_when_imported(tmp_path: Any) -> None:
    guarded = readme_blocks()["example.py"]
    code = guarded.replace('if __name__ == "__main__":\n    app.run()', "app.run(port=0)")
    assert code != guarded
    (tmp_path / "unguarded.py").write_text(code)
    run = python_in(tmp_path, rally.__file__, "unguarded:app", "--port", "0")
    assert run.returncode == 1
    assert (
        'started a server while python rally.py was importing it; put its app.run() under if __name__ == "__main__"'
        in run.stderr
    )


def test_cli_given_a_file_name_asks_for_module_colon_app_without_importing_it(tmp_path: Any) -> None:
    (tmp_path / "example.py").write_text("import rally\nprint('imported')\napp = rally.App()\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "example.py").write_text("import rally\napp = rally.App()\n")
    for target, meant in [
        ("example.py", "example:app"),
        ("example.py:web", "example:web"),
        (os.path.join("src", "example.py"), "src.example:app"),
    ]:
        run = python_in(tmp_path, rally.__file__, target, "--port", "0")
        assert run.returncode == 1, run.stderr
        assert run.stderr.endswith(f"did you mean {meant}?\n"), run.stderr
        assert "Traceback" not in run.stderr and "imported" not in run.stdout


def test_cli_says_which_module_or_attribute_is_missing(tmp_path: Any) -> None:
    (tmp_path / "shop.py").write_text("import rally\nweb = rally.App()\ncount = 3\n")
    (tmp_path / "broken.py").write_text("import not_installed_anywhere\n")
    expected = {
        "nosuch:app": f"rally.py: no module named 'nosuch' in {tmp_path} or on sys.path; run python rally.py from"
        " the directory that holds nosuch.py, and name it without .py",
        "shop": "rally.py: module shop has no attribute 'app'; did you mean shop:web?",
        "shop:count": "rally.py: shop.count is not a rally.App (it is int); did you mean shop:web?",
    }
    for target, message in expected.items():
        run = python_in(tmp_path, rally.__file__, target, "--port", "0")
        assert (run.returncode, run.stderr) == (1, message + "\n")
    # A module the app imports that is missing is the app's error: its traceback shows where.
    run = python_in(tmp_path, rally.__file__, "broken:app", "--port", "0")
    assert run.returncode == 1 and "Traceback" in run.stderr and "'not_installed_anywhere'" in run.stderr


def test_cli_and_app_run_say_in_one_line_that_the_port_is_taken(tmp_path: Any) -> None:
    (tmp_path / "shop.py").write_text(
        'import sys\nimport rally\napp = rally.App()\nif __name__ == "__main__":\n    app.run(port=int(sys.argv[1]))\n'
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = (
            f"rally.py: cannot listen on 127.0.0.1:{port}: Address already in use"
            " (another program listens there: stop it, or choose another port)\n"
        )
        for command in (["shop.py", str(port)], [rally.__file__, "shop:app", "--port", str(port)]):
            for extra in ([], ["--reload"]) if command[0] == rally.__file__ else ([],):
                run = python_in(tmp_path, *command, *extra)
                assert (run.returncode, run.stderr.splitlines()[-1:]) == (1, message.splitlines()), run.stderr
                assert "Traceback" not in run.stderr


@pytest.mark.parametrize("port", ["65536", "-1"])
def test_cli_refuses_a_port_out_of_range(tmp_path: Any, port: str) -> None:
    (tmp_path / "shop.py").write_text("import rally\napp = rally.App()\n")
    for extra in ([], ["--reload"]):
        run = python_in(tmp_path, rally.__file__, "shop:app", "--port", port, *extra)
        assert run.returncode == 2 and f"port={port}: expected an int from 0 to 65535" in run.stderr, run.stderr


async def test_start_on_a_port_taken_raises_oserror_naming_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as failed:
            await rally.App().start("127.0.0.1", port, access_log=False)
    assert failed.value.errno == errno.EADDRINUSE
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in str(failed.value)
    for bad in (65536, -1, True, "80"):
        with pytest.raises(rally.UsageError, match="expected an int from 0 to 65535"):
            await rally.App().start("127.0.0.1", bad, access_log=False)  # type: ignore[arg-type]


RELOAD_APP = textwrap.dedent(
    """
    from dataclasses import dataclass

    import rally

    app = rally.App()

    @dataclass
    class Which: ...

    @app.rpc
    def server_which(msg: Which) -> str:
        return "one"
    """
)


class Reloading:
    """``python rally.py appmod:app --reload --port 0`` in ``directory``, in
    a session of its own, with its standard error read line by line."""

    def __init__(self, directory: Any) -> None:
        import queue

        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(rally.__file__))}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # --reload sets it for its server processes
        self.proc = subprocess.Popen(
            [sys.executable, rally.__file__, "appmod:app", "--reload", "--port", "0", "--no-access-log"],
            cwd=directory, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        url = self.line("rally.py --reload: serving on ").split("serving on ")[1].split(";")[0]
        self.port = int(url.rsplit(":", 1)[1])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def line(self, start: str) -> str:
        """The next line of standard error that starts with ``start``."""
        import queue

        deadline = time.monotonic() + 3 * WAIT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line starting {start!r} in time; saw {self.seen}") from None
            self.seen.append(line)
            if line.startswith(start):
                return line

    def rpc(self) -> str:
        body = json.dumps({"kind": "rpc", "id": 1, "msg": {"type": "Which", "fields": {}}}).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as sock:
            sock.sendall(
                b"POST /_rally/rpc HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            )
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        answer = json.loads(reply.split(b"\r\n\r\n", 1)[1])
        assert answer["kind"] == "ok", answer
        return str(answer["value"])

    def refused(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=WAIT).close()
        except ConnectionRefusedError:
            return True
        return False

    def end(self) -> None:
        """Kill what is still running: the parent's session holds its server processes."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(WAIT)
        self.reader.join(WAIT)  # at EOF once every process of the session is gone
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def test_cli_reload_restarts_the_server_when_a_python_file_changes(tmp_path: Any) -> None:
    (tmp_path / "appmod.py").write_text(RELOAD_APP)
    server = Reloading(tmp_path)
    try:
        server.line("rally.py serving on ")
        assert server.rpc() == "one"
        # The same size: within one second, a .pyc of the old text would pass for the new one.
        (tmp_path / "appmod.py").write_text(RELOAD_APP.replace('"one"', '"two"'))
        server.line("rally.py --reload: appmod.py changed; restarting")
        server.line("rally.py serving on ")
        assert server.rpc() == "two"
        # A mistake: the server cannot start, and starts again once the file is fixed.
        (tmp_path / "appmod.py").write_text(RELOAD_APP.replace('"one"', '"three'))
        server.line("rally.py --reload: appmod.py changed; restarting")
        server.line("SyntaxError")
        server.line("rally.py --reload: the server exited with code 1; it starts again when a .py file changes")
        (tmp_path / "helpers").mkdir()
        (tmp_path / "helpers" / "util.py").write_text("")  # any Python file under the directory
        (tmp_path / "appmod.py").write_text(RELOAD_APP.replace('"one"', '"three"'))
        changed = server.line("rally.py --reload: ")
        assert changed in (
            f"rally.py --reload: appmod.py, {os.path.join('helpers', 'util.py')} changed; restarting\n",
            f"rally.py --reload: {os.path.join('helpers', 'util.py')} changed; restarting\n",
        )
        server.line("rally.py serving on ")
        assert server.rpc() == "three"
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(3 * WAIT) == 0
        assert server.refused()  # the server process is gone too: nothing holds the socket
    finally:
        server.end()


def test_cli_reload_server_stops_when_its_parent_is_killed(tmp_path: Any) -> None:
    (tmp_path / "appmod.py").write_text(RELOAD_APP)
    server = Reloading(tmp_path)
    try:
        assert server.rpc() == "one"
        server.proc.kill()
        server.line("rally.py serving on ")
        deadline = time.monotonic() + 3 * WAIT
        while not server.refused():
            assert time.monotonic() < deadline, "the server process outlived its parent"
            time.sleep(0.05)
    finally:
        server.end()


def test_cli_reload_with_workers_is_refused(tmp_path: Any) -> None:
    (tmp_path / "appmod.py").write_text(RELOAD_APP)
    run = python_in(tmp_path, rally.__file__, "appmod:app", "--reload", "--workers", "2", "--port", "0")
    assert run.returncode == 2 and "serving" not in run.stderr
    assert "--reload runs the server in one process and restarts it; it cannot be combined with --workers 2" in (
        run.stderr
    )
    run = python_in(tmp_path, rally.__file__, "appmod.py", "--reload", "--port", "0")
    assert run.returncode == 1 and run.stderr.endswith("; did you mean appmod:app?\n")


# ==== Pages that react to the server (docs/api.md "Server events") ================


@dataclass
class Renamed:
    name: str


@dataclass
class Nudged: ...


@dataclass
class NameShown:
    name: str


@dataclass
class SetName:
    name: str


@dataclass
class ProfileMeta:
    name: str


class EventJournal:
    def __init__(self) -> None:
        self.running = 0
        self.most = 0  # server_update and server_event of one model at once, at most
        self.order: list[str] = []
        self.changes: list[rally.PresenceChanged] = []
        self.terminated: list[str] = []
        self.inits = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.app: rally.App | None = None


class ProfilePage:
    """Every tab of a profile shows the name; a rename reaches the models by server_event."""

    @staticmethod
    def server_init(id: int, server_context: rally.ServerContext) -> tuple[dict[str, Any], rally.Effect[NameShown]]:
        journal: EventJournal = server_context.state
        journal.inits += 1
        name = server_context.headers.get("x-name", "anon")
        if name == "banned":
            raise rally.Refuse("you are banned")
        return {"name": name}, rally.effect.none()

    @staticmethod
    async def server_update(
        model: dict[str, Any], msg: SetName, server_context: rally.ServerContext
    ) -> tuple[dict[str, Any], rally.Effect[NameShown]]:
        journal: EventJournal = server_context.state
        journal.running += 1
        journal.most = max(journal.most, journal.running)
        journal.order.append(f"update {msg.name}")
        await journal.gate.wait()
        journal.running -= 1
        # Every tab of the session learns the name: by server_event, not by echo.
        return model, rally.effect.broadcast_to_session(Renamed(msg.name))

    @staticmethod
    async def server_event(
        model: dict[str, Any], msg: Renamed | Nudged | rally.PresenceChanged, server_context: rally.ServerContext
    ) -> tuple[dict[str, Any], rally.Effect[NameShown]]:
        journal: EventJournal = server_context.state
        if isinstance(msg, rally.PresenceChanged):
            journal.changes.append(msg)
            return model, rally.effect.none()
        journal.running += 1
        journal.most = max(journal.most, journal.running)
        journal.order.append(f"event {type(msg).__name__}")
        await journal.gate.wait()
        journal.running -= 1
        if isinstance(msg, Nudged):
            return model, rally.effect.none()
        return {**model, "name": msg.name}, rally.effect.send_to_client(NameShown(msg.name))

    @staticmethod
    def server_presence(model: dict[str, Any]) -> ProfileMeta:
        return ProfileMeta(model["name"])

    @staticmethod
    def server_terminate(model: dict[str, Any], server_context: rally.ServerContext) -> rally.Effect[NameShown]:
        server_context.state.terminated.append(model["name"])
        return rally.effect.none()


class LobbyPage:
    """Watches the presence of every profile page."""

    @staticmethod
    def server_init() -> tuple[list[str], rally.Effect[NameShown]]:
        return [], rally.effect.watch_presence("/profiles/{id}")

    @staticmethod
    def server_event(
        model: list[str], msg: rally.PresenceChanged, server_context: rally.ServerContext
    ) -> tuple[list[str], rally.Effect[NameShown]]:
        server_context.state.changes.append(msg)
        joined = [f"{msg.page} +{p.meta.name}" for p in msg.joins]
        left = [f"{msg.page} -{p.meta.name}" for p in msg.leaves]
        return model, rally.effect.batch(*(rally.effect.send_to_client(NameShown(x)) for x in joined + left))


def profile_app(**options: Any) -> tuple[rally.App, EventJournal]:
    journal = EventJournal()
    app = rally.App(state=journal, **options)
    app.page("/profiles/{id}", ProfilePage)
    app.page("/lobby", LobbyPage)
    journal.app = app
    return app, journal


def named(client: rally.Client, path: str, name: str) -> rally.PageConnection:
    return rally.PageConnection(client, path, headers=[("x-name", name)])


async def test_a_broadcast_to_a_session_of_an_event_type_updates_every_tab_model() -> None:
    app, journal = profile_app()
    async with running(app) as server:
        ann, other = bounded_client(server, app), bounded_client(server, app)
        async with ann, other:
            await ann.request("GET", "/lobby")  # the session cookie, shared by Ann's tabs
            async with named(ann, "/profiles/1", "a") as tab1, named(ann, "/profiles/2", "a") as tab2:
                async with named(other, "/profiles/1", "o") as stranger:
                    assert ann.session_id is not None
                    assert await app.broadcast_to_session(ann.session_id, Renamed("Ann")) == 2
                    assert await tab1.receive() == NameShown("Ann")
                    assert await tab2.receive() == NameShown("Ann")
                    # The models changed: their presence says so.
                    await eventually(
                        lambda: sorted(p.meta.name for p in app.presence("/profiles/1")) == ["Ann", "o"], "renamed"
                    )
                    # A send's effect reaches the models of the session's tabs too.
                    await tab2.send(SetName("Annie"))
                    assert await tab1.receive() == NameShown("Annie")
                    assert await tab2.receive() == NameShown("Annie")
                    assert await app.broadcast_to_page("/profiles/1", Nudged()) == 2
                    await stranger.send(SetName("x"))  # renames its own session
                    # Frames come in order: neither Ann's names nor the nudge pushed anything to it first.
                    assert await stranger.receive() == NameShown("x")


async def test_server_events_run_in_order_with_the_sends_never_two_at_once() -> None:
    app, journal = profile_app()
    async with running(app) as server, bounded_client(server, app) as client:
        async with named(client, "/profiles/1", "a") as page:
            journal.gate.clear()
            sending = asyncio.ensure_future(page.send(SetName("one")))
            await eventually(lambda: journal.order == ["update one"], "the update runs")
            for _ in range(3):
                await app.broadcast_to_page("/profiles/1", Nudged())
            journal.gate.set()
            await sending
            await eventually(lambda: len(journal.order) == 5, "all ran")
            # The session's own Renamed came after the update, behind the nudges.
            assert journal.order == ["update one", "event Nudged", "event Nudged", "event Nudged", "event Renamed"]
            assert journal.most == 1
            assert await page.receive() == NameShown("one")


async def test_server_events_waiting_for_a_model_are_bounded_at_n_and_n_plus_one() -> None:
    app, journal = profile_app(max_pending_messages=4)
    async with running(app) as server, bounded_client(server, app) as client:
        async with named(client, "/profiles/1", "a") as page:
            journal.gate.clear()
            assert await app.broadcast_to_page("/profiles/1", Nudged()) == 1  # running
            for _ in range(4):  # waiting: N
                await app.broadcast_to_page("/profiles/1", Nudged())
            await app.broadcast_to_page("/profiles/1", Nudged())  # N + 1: the page ends
            with pytest.raises(rally.ConnectionClosed) as closed:
                await page.receive()
            assert closed.value.code == 1013
            journal.gate.set()


async def test_a_page_held_for_resume_still_takes_events_and_gets_their_pushes() -> None:
    app, journal = profile_app()
    async with running(app) as server, CutProxy(server.port) as proxy:
        client = rally.Client(f"http://127.0.0.1:{proxy.port}", app, timeout=WAIT)
        async with client, named(client, "/profiles/1", "a") as page:
            await eventually(lambda: page.resume_token, "hello")
            proxy.cut()
            await asyncio.wait_for(page.wait_closed(), WAIT)
            await eventually(lambda: not server.conns, "held")
            assert await app.broadcast_to_page("/profiles/1", Renamed("while away")) == 1
            await eventually(lambda: [p.meta.name for p in app.presence("/profiles/1")] == ["while away"], "applied")
            assert await page.reconnect() is True
            assert await page.receive() == NameShown("while away")  # numbered, held, replayed


async def test_presence_changes_reach_the_page_and_its_watchers_with_session_ids() -> None:
    app, journal = profile_app()
    async with running(app) as server, bounded_client(server, app) as watcher, bounded_client(server, app) as ann:
        async with watcher.page("/lobby") as lobby:
            async with named(ann, "/profiles/7", "ann"):
                assert await lobby.receive() == NameShown("/profiles/7 +ann")
                [entry] = app.presence("/profiles/7")
                assert entry.session_id == ann.session_id and entry.meta == ProfileMeta("ann")
                assert "session_id" not in repr(entry)
            assert await lobby.receive() == NameShown("/profiles/7 -ann")
            # Each change once to the lobby, and the page's own change to the page itself.
            await eventually(lambda: len(journal.changes) == 3, "joined: the page and the lobby; left: the lobby")
            own = [c for c in journal.changes if c.joins and c.joins[0].id == entry.id]
            assert [c.page for c in own] == ["/profiles/7", "/profiles/7"]
            assert own[0].joins[0].session_id == ann.session_id


async def test_close_connection_and_close_session_close_with_4001_and_their_reason() -> None:
    app, journal = profile_app()
    async with running(app) as server, bounded_client(server, app) as client:
        async with named(client, "/profiles/1", "a") as kicked, named(client, "/profiles/2", "a") as kept:
            [entry] = app.presence("/profiles/1")
            assert await app.close_connection(entry.id, "kicked by a moderator") == 1
            with pytest.raises(rally.ConnectionClosed) as closed:
                await kicked.receive()
            assert (closed.value.code, closed.value.reason) == (4001, "kicked by a moderator")
            with pytest.raises(rally.ConnectionClosed):
                await kicked.send(SetName("after"))  # closed for good
            assert await app.close_connection(entry.id) == 0  # gone already
            assert client.session_id is not None
            assert await app.close_session(client.session_id, "logged out") == 1
            with pytest.raises(rally.ConnectionClosed) as closed:
                await kept.receive()
            assert (closed.value.code, closed.value.reason) == (4001, "logged out")
            await eventually(lambda: sorted(journal.terminated) == ["a", "a"], "both models ended")
    for bad in ("x" * 121, "é" * 61):
        with pytest.raises(rally.UsageError, match="120 bytes"):
            await app.close_session("s", bad)
        with pytest.raises(rally.UsageError, match="120 bytes"):
            rally.Refuse(bad)


async def test_a_page_refused_by_server_init_closes_with_4003_and_no_model() -> None:
    app, journal = profile_app()
    async with running(app) as server, bounded_client(server, app) as client:
        page = named(client, "/profiles/1", "banned")
        with pytest.raises(rally.ConnectionClosed) as closed:
            await page.connect()
            await page.receive()
        assert (closed.value.code, closed.value.reason) == (4003, "you are banned")
        await eventually(lambda: not server.conns, "closed")
        assert journal.inits == 1 and journal.terminated == [] and app.presence("/profiles/1") == []
        assert not app._registry.topics.members


def test_server_event_types_are_part_of_the_contract_and_checked_at_registration() -> None:
    app, _ = profile_app()
    pages = app.contract["pages"]
    assert pages["/profiles/{id}"]["events"] == ["Nudged", "PresenceChanged", "Renamed"]
    assert "Renamed" in app.contract["types"] and "PresenceChanged" not in app.contract["types"]

    class Bad:
        def server_init() -> tuple[int, rally.Effect[NameShown]]:
            return 0, rally.effect.none()

        def server_event(model: int, msg: int) -> tuple[int, rally.Effect[NameShown]]:
            return model, rally.effect.none()

    with pytest.raises(rally.RegistrationError, match="server_event: parameter 'msg' is annotated int"):
        rally.App().page("/bad", Bad)


# ==== Packaging ================================================================


@pytest.mark.timeout(300)
def test_the_wheel_installs_under_its_distribution_name_into_a_fresh_venv(tmp_path: Any) -> None:
    """``pip install rally-py`` gives ``import rally``: the wheel built from this
    checkout, installed with its dependencies into a new virtual environment."""
    import shutil

    root = os.path.dirname(os.path.abspath(rally.__file__))
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("rally.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(root, name), source / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
        check=True,
        timeout=240,
    )
    [wheel] = list(wheels.iterdir())
    assert wheel.name.startswith("rally_py-") and wheel.name.endswith(".whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=240)
    shown = subprocess.run([python, "-m", "pip", "show", "rally-py"], capture_output=True, text=True, check=True)
    assert "Name: rally-py" in shown.stdout
    imported = subprocess.run(
        [python, "-c", "import rally, sys; print(rally.__version__, rally.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,  # not the checkout: the installed module
    )
    version, where = imported.stdout.split()
    assert version == rally.__version__ and str(venv) in where


# ==== The broker's messages, without Redis (docs/scaling.md "Scaling out") ============


def signed(wire: rally._BrokerWire, message: bytes) -> bytes:
    """``message`` numbered and after its MAC, as ``wire``'s process publishes it."""
    mac, numbered = wire.sign(message)
    return mac + numbered


def test_broker_wire_signs_reads_and_refuses_what_another_secret_or_channel_signed() -> None:
    wire = rally._BrokerWire(b"secret", "rally:broadcast", "p1", 1024)
    frame = b'{"kind":"push","msg":{"type":"Heard","fields":{"text":"hi"}}}'
    data = signed(wire, wire.message("push", frame, t="app", m="Heard"))
    assert rally._BrokerWire(b"secret", "rally:broadcast", "p2", 1024).read(data) == rally._BrokerMessage(
        "p1", "push", {"q": 1, "o": "p1", "k": "push", "t": "app", "m": "Heard"}, frame
    )
    for other in (
        rally._BrokerWire(b"another secret", "rally:broadcast", "p2", 1024),
        rally._BrokerWire(b"secret", "shop:broadcast", "p2", 1024),
    ):
        assert other.read(data) == "unsigned"
    assert wire.read(data[:-1]) == "unsigned"  # cut short
    assert wire.read(b"x" * 10) == "unsigned"
    assert wire.read(signed(wire, b'{"k":"push"}\n')) == "foreign"  # no sender
    assert wire.read(signed(wire, b"not json\n")) == "foreign"
    key = wire.key
    unnumbered = b'{"o":"p1","k":"beat"}\n'
    assert wire.read(hmac.digest(key, unnumbered, "sha256") + unnumbered) == "foreign"  # no number
    for number in (b"0", b"-1", b"1.5", b'"2"', b"true"):
        message = b'{"q":' + number + b',"o":"p1","k":"beat"}\n'
        assert wire.read(hmac.digest(key, message, "sha256") + message) == "foreign"


def test_broker_wire_takes_each_message_of_a_sender_once_and_in_order() -> None:
    """Numbered as published, read once: a message published again (a
    replay), or one older than the last taken from its sender, is refused,
    whatever it is; the other senders' numbers are their own."""
    a, b = (rally._BrokerWire(b"secret", "rally:broadcast", name, 1024) for name in ("a", "b"))
    reader = rally._BrokerWire(b"secret", "rally:broadcast", "r", 1024)
    a1, a2, a3 = (signed(a, a.message("beat", n=i)) for i in range(3))
    b1 = signed(b, b.message("close", t="session:x", r=""))
    assert [type(reader.read(m)).__name__ for m in (a1, b1, a2)] == ["_BrokerMessage"] * 3
    assert [reader.read(m) for m in (a1, a2, b1)] == ["replayed"] * 3
    assert type(reader.read(a3)).__name__ == "_BrokerMessage"
    assert reader.read(a2) == "replayed"  # older than the last taken, not only the same
    assert reader.heard == {"b": 1, "a": 3}
    # A sender's own messages come back to it: they are read the same way.
    assert type(a.read(a1)).__name__ == "_BrokerMessage" and a.read(a1) == "replayed"


def test_broker_wire_remembers_the_last_senders_up_to_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most _BROKER_MAX_SENDERS senders (N) are remembered; the N+1st
    makes it forget the one heard from longest ago, whose old messages it
    then takes again (a process started that many processes ago)."""
    monkeypatch.setattr(rally, "_BROKER_MAX_SENDERS", 3)
    reader = rally._BrokerWire(b"secret", "rally:broadcast", "r", 1024)
    senders = [rally._BrokerWire(b"secret", "rally:broadcast", f"p{i}", 1024) for i in range(4)]
    firsts = [signed(s, s.message("beat")) for s in senders]
    for first in firsts[:3]:
        assert type(reader.read(first)).__name__ == "_BrokerMessage"
    assert [reader.read(first) for first in firsts[:3]] == ["replayed"] * 3  # N remembered
    assert list(reader.heard) == ["p0", "p1", "p2"]
    assert type(reader.read(firsts[3])).__name__ == "_BrokerMessage"  # N + 1
    assert list(reader.heard) == ["p1", "p2", "p3"]
    assert type(reader.read(firsts[0])).__name__ == "_BrokerMessage"  # p0 was forgotten


@pytest.mark.parametrize(
    ("frame", "fits"),
    [
        (b'{"kind":"push","msg":{"type":"Heard","fields":{"text":"hi"}}}', True),
        (b'{"kind":"push","msg":{"type":"Other","fields":{}}}', False),  # not the type its header names
        (b'{"kind":"push","msg":{"type":"Heard","fields":{}},"x":1}', False),
        (b'{"kind":"push","msg":{"type":"Heard","fields":NaN}}', False),
        (b'{"kind":"push","msg":{"type":"Heard","fields":"\xff"}}', False),  # not UTF-8
        (b' {"kind":"push","msg":{"type":"Heard","fields":{}}}', False),
        (b'{"kind":"push","msg":{"type":"Heard","fields":"' + b"x" * 1000 + b'"}}', False),  # over max_frame
    ],
    ids=["push", "another-type", "extra-key", "nan", "not-utf8", "leading-space", "too-large"],
)
def test_broker_wire_checks_a_push_frame_of_another_process(frame: bytes, fits: bool) -> None:
    assert rally._BrokerWire(b"s", "c", "p", 1000).fits(frame, "Heard") is fits


def test_every_docs_section_rally_py_cites_exists() -> None:
    """A comment or message citing ``docs/x.md "Heading"`` names a heading of that document."""
    root = os.path.dirname(rally.__file__)
    with open(os.path.join(root, "rally.py"), encoding="utf-8") as f:
        source = f.read()
    citations = re.findall(r'(docs/[a-z]+\.md),?\s+"([^"]+)"', source)  # a line break may stand for the space
    cited = {(doc, " ".join(heading.split())) for doc, heading in citations}
    assert len(cited) >= 8
    for doc, heading in sorted(cited):
        with open(os.path.join(root, doc), encoding="utf-8") as f:
            text = f.read()
        headings = {line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")}
        assert heading in headings, f'{doc} has no heading "{heading}"'
