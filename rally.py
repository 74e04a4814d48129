"""rally.py: typed RPC and stateful server pages over HTTP/1.1 and WebSocket.

One module, pure asyncio, built on the sans-IO libraries h11 and wsproto and
nothing else at run time. A web page calls typed Python functions (RPC) and
holds a stateful server-side page whose model lives on the server; the server
pushes typed messages back to one connection, one browser session, one page
or the whole app. The Python type hints of the handlers are the wire contract.

Theory of operation. Registration (``App.page``, ``App.rpc``) reads the type
hints once and builds a handler table of codecs: strict JSON decoders and
checked encoders for every message, result and push. The wire layer is
sans-IO: ``_HttpReader`` and ``_WsReader`` are fed bytes and hand back
requests, whole messages and control frames, under the size limits. Dispatch
never sees a socket: ``_Router`` turns a request head into an answer, a body
to read, a file to stream or a WebSocket upgrade; ``_PageSession`` owns one
page connection's model, its sends in order, its in-flight RPCs and its
effects, and talks to its connection through a four-call ``_Peer``. The
transport is one ``asyncio.BufferedProtocol`` per connection (no task per
connection): it reads into one buffer shared by the whole server, gives other
connections a turn after a bounded amount of work, writes through one place
that enforces the outgoing bound, keeps one timer per purpose, aborts a
socket whose graceful close does not finish, and stages shutdown. A
broadcast is encoded and framed once; the same bytes go to every recipient,
and with a broker (``App(broker="redis://...")``) to the app's other
processes in one Redis PUBLISH.

Example::

    import rally
    from dataclasses import dataclass

    @dataclass
    class Greet:
        name: str

    app = rally.App()

    @app.rpc
    def server_greet(msg: Greet) -> rally.Result[str, str]:
        return rally.Ok("Hello, " + msg.name)

    app.run()   # http://127.0.0.1:8000

Copyright (c) 2026 the rally.py authors.
License: MIT
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import enum
import errno
import hashlib
import hmac
import inspect
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import types
import typing
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import Future as _ThreadFuture
from typing import Any, Final, Generic, Literal, TypeVar, Union

if typing.TYPE_CHECKING:
    import h11
    import wsproto
    import wsproto.connection
    import wsproto.events
else:

    def _lazy_module(name: str) -> types.ModuleType:
        """``name``, imported on its first attribute access: ``import rally``
        leaves h11 and wsproto for the first connection that needs them
        (docs/performance.md "Import time")."""
        if name in sys.modules:
            return sys.modules[name]
        import importlib.util

        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None, name
        spec.loader = importlib.util.LazyLoader(spec.loader)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    h11 = _lazy_module("h11")
    wsproto = _lazy_module("wsproto")  # its package imports .connection and .events

if typing.TYPE_CHECKING:
    import subprocess  # imported where used: only python rally.py --reload starts processes

__version__ = "0.1.0"

__all__ = [
    "App",
    "Server",
    "ServerContext",
    "Ok",
    "Error",
    "Result",
    "Effect",
    "effect",
    "WebSocket",
    "Client",
    "PageConnection",
    "TestClient",
    "RallyError",
    "ProtocolError",
    "ContractError",
    "RegistrationError",
    "UsageError",
    "RemoteError",
    "UnwrapError",
    "Presence",
    "Response",
    "RedisBroker",
    "ConnectionClosed",
    "CLOSE_STALE_CONTRACT",
    "CLOSE_SESSION_CLOSED",
    "CLOSE_REFUSED",
    "Refuse",
    "PresenceChanged",
    "main",
    "DEFAULT_MAX_HEAD_BYTES",
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_JSON_DEPTH",
    "DEFAULT_MAX_STRING_CHARS",
    "DEFAULT_MAX_ARRAY_ITEMS",
    "DEFAULT_MAX_OBJECT_ENTRIES",
    "DEFAULT_HEADER_TIMEOUT_S",
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_KEEPALIVE_TIMEOUT_S",
    "DEFAULT_PING_INTERVAL_S",
    "DEFAULT_PONG_TIMEOUT_S",
    "DEFAULT_CLOSE_TIMEOUT_S",
    "DEFAULT_HANDLER_TIMEOUT_S",
    "DEFAULT_SHUTDOWN_TIMEOUT_S",
    "DEFAULT_MAX_OUTGOING_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_PENDING_MESSAGES",
    "DEFAULT_MAX_CONCURRENT_RPCS",
    "DEFAULT_SEND_TIMEOUT_S",
    "DEFAULT_RESUME_WINDOW_S",
    "DEFAULT_MAX_HELD_BYTES",
    "DEFAULT_MAX_PRESENCE_ENTRIES",
    "DEFAULT_MAX_PRESENCE_META_BYTES",
    "DEFAULT_MAX_TOPICS_PER_CONNECTION",
]

_logger: Final = logging.getLogger("rally")
_access_logger: Final = logging.getLogger("rally.access")

# ==== Defaults and limits ===================================================

#: Request line plus headers. h11, node and uvicorn use 16 KiB; Apache 8 KiB.
DEFAULT_MAX_HEAD_BYTES: Final = 16 * 1024
#: Header lines per request (Apache allows 100, websockets 128).
DEFAULT_MAX_HEADERS: Final = 100
#: Request body, counted as it arrives, chunked or not (aiohttp: 1 MiB).
DEFAULT_MAX_BODY_BYTES: Final = 1024 * 1024
#: WebSocket message, counted across fragments (websockets: 1 MiB).
DEFAULT_MAX_MESSAGE_BYTES: Final = 1024 * 1024
#: Nesting depth of any JSON document (the envelope itself uses 3 levels).
DEFAULT_MAX_JSON_DEPTH: Final = 32
#: Characters in one decoded string.
DEFAULT_MAX_STRING_CHARS: Final = 100_000
#: Items in one decoded list or tuple.
DEFAULT_MAX_ARRAY_ITEMS: Final = 10_000
#: Entries in one JSON object.
DEFAULT_MAX_OBJECT_ENTRIES: Final = 1_000
#: Whole request head (and so the WebSocket handshake), from its first byte.
DEFAULT_HEADER_TIMEOUT_S: Final = 10.0
#: Whole request body, from the end of the head.
DEFAULT_BODY_TIMEOUT_S: Final = 30.0
#: Idle keep-alive connection between requests (uvicorn and hypercorn: 5 s).
DEFAULT_KEEPALIVE_TIMEOUT_S: Final = 5.0
#: WebSocket ping interval (websockets: 20 s).
DEFAULT_PING_INTERVAL_S: Final = 20.0
#: Time a peer has to answer a ping before it is dropped (websockets: 20 s).
DEFAULT_PONG_TIMEOUT_S: Final = 20.0
#: Time a peer has to answer our close frame, and to take the bytes still
#: queued for it once we close, before its socket is aborted (websockets: 10 s).
DEFAULT_CLOSE_TIMEOUT_S: Final = 10.0
#: Time a peer may accept none of the bytes we send (a response, a file) before
#: its socket is aborted.
DEFAULT_SEND_TIMEOUT_S: Final = 30.0
#: One call of an ``async`` handler.
DEFAULT_HANDLER_TIMEOUT_S: Final = 30.0
#: Graceful shutdown: in-flight work gets this long before it is cancelled.
DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 5.0
#: Bytes queued for one connection before it counts as a slow consumer.
DEFAULT_MAX_OUTGOING_BYTES: Final = 1024 * 1024
#: Open connections, HTTP and WebSocket together; the default is lowered to
#: stay below the process's descriptor limit (RLIMIT_NOFILE).
DEFAULT_MAX_CONNECTIONS: Final = 10_000
#: ``send`` messages waiting for ``server_update``; reading pauses beyond it.
DEFAULT_MAX_PENDING_MESSAGES: Final = 64
#: ``async`` RPC handlers running at once for one WebSocket; reading pauses at it.
DEFAULT_MAX_CONCURRENT_RPCS: Final = 64
#: How long a page connection lost without a closing handshake keeps its
#: model, topics and outgoing frames for the page to resume (0: not at all);
#: also how long RPC answers are kept by idempotency key.
DEFAULT_RESUME_WINDOW_S: Final = 30.0
#: Bytes of outgoing frames every resumable page holds for a resume, all
#: pages together (each page also holds at most max_outgoing_bytes).
DEFAULT_MAX_HELD_BYTES: Final = 64 * 1024 * 1024
#: Connections one page's presence lists, in every process together.
DEFAULT_MAX_PRESENCE_ENTRIES: Final = 1_000
#: One presence meta, encoded as JSON: with the entries bound, a page's whole
#: list (about 600 KB at the defaults) fits below max_outgoing_bytes.
DEFAULT_MAX_PRESENCE_META_BYTES: Final = 512
#: Custom topics one connection may be subscribed to (rally.effect.subscribe).
DEFAULT_MAX_TOPICS_PER_CONNECTION: Final = 100

#: Flow control: a transport pauses our writers above this many buffered bytes,
#: and resumes them below the low mark (asyncio's own ratio). Both are given,
#: so every transport keeps these two ints instead of making its own.
_WRITE_HIGH_WATER: Final = 64 * 1024
_WRITE_LOW_WATER: Final = _WRITE_HIGH_WATER // 4
#: How long a refused request's remaining bytes are read before the socket closes.
_LINGER_S: Final = 1.0
#: One read buffer shared by every connection of a server.
_READ_BUFFER_BYTES: Final = 256 * 1024
#: Every frame of a fragmented WebSocket message counts at least this many
#: bytes against ``max_message_bytes``: a message of empty fragments is bounded
#: like any other (about what one fragment costs while it is held).
_MIN_FRAGMENT_BYTES: Final = 64
#: Events (messages, requests, control frames) one connection handles before
#: the others get a turn; the rest of what it sent waits for the next turn.
_EVENTS_PER_TURN: Final = 64
#: The most a WebSocket gathers from one batch of messages before it writes (``_WsConn._write``).
_CORK_BYTES: Final = 64 * 1024
#: Static files are read and written in pieces of this size, with backpressure.
_FILE_CHUNK_BYTES: Final = 64 * 1024
#: Descriptors kept free below RLIMIT_NOFILE (``_default_max_connections``):
#: 32 for files, logs and listening sockets, and one batch of accepts, the
#: most ``Server._accept`` lets wait to become connections (those refused
#: with a 503 included, until their socket is closed).
_RESERVED_FDS: Final = 32 + _EVENTS_PER_TURN
#: How long accepting pauses when the process runs out of descriptors.
_ACCEPT_BACKOFF_S: Final = 0.5
#: rally.Client acknowledges numbered frames after this many, so the server forgets them.
_CLIENT_ACK_EVERY: Final = 16
#: The largest HTTP response body and WebSocket message a ``rally.Client``
#: takes from a server by default (``max_message_bytes=``).
_CLIENT_MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
#: A page's sends waiting for a connection (``max_queued_sends=``): the browser client's bound.
_CLIENT_MAX_QUEUED_SENDS: Final = 1000
#: A page's pushes unread by ``receive()`` before it stops reading (``max_unread_messages=``).
_CLIENT_MAX_UNREAD_MESSAGES: Final = 10_000
#: Envelope ids: a safe integer or a string of at most this many characters.
_MAX_ID_CHARS: Final = 64
#: RPC answers kept by idempotency key, in number and in bytes: per session,
#: and for all sessions (docs/delivery.md, "Delivery across reconnects").
_MAX_SESSION_ANSWERS: Final = 1_000
_MAX_SESSION_ANSWER_BYTES: Final = 1024 * 1024
_MAX_ANSWERS: Final = 10_000
_MAX_ANSWER_BYTES: Final = 16 * 1024 * 1024
#: Largest integer JavaScript represents exactly (Number.MAX_SAFE_INTEGER).
_MAX_SAFE_INT: Final = 2**53 - 1
_SESSION_COOKIE: Final = "rally_session"
_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: Close codes chosen by rally.py (RFC 6455 section 7.4.2 leaves 4000-4999 to
#: applications): the page's contract changed, and the session was closed.
CLOSE_STALE_CONTRACT: Final = 4000
CLOSE_SESSION_CLOSED: Final = 4001
#: ``server_init`` raised ``rally.Refuse``: the page is refused, the client stops.
CLOSE_REFUSED: Final = 4003
#: A close reason the API takes (RFC 6455 allows 123 bytes in a close frame).
_MAX_CLOSE_REASON_BYTES: Final = 120


class _Limits(typing.NamedTuple):
    """Every limit and time-out of one App, fixed when the App is made."""

    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    max_headers: int = DEFAULT_MAX_HEADERS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    max_string_chars: int = DEFAULT_MAX_STRING_CHARS
    max_array_items: int = DEFAULT_MAX_ARRAY_ITEMS
    max_object_entries: int = DEFAULT_MAX_OBJECT_ENTRIES
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT_S
    ping_interval: float = DEFAULT_PING_INTERVAL_S
    pong_timeout: float = DEFAULT_PONG_TIMEOUT_S
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT_S
    handler_timeout: float = DEFAULT_HANDLER_TIMEOUT_S
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    max_outgoing_bytes: int = DEFAULT_MAX_OUTGOING_BYTES
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_pending_messages: int = DEFAULT_MAX_PENDING_MESSAGES
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS
    send_timeout: float = DEFAULT_SEND_TIMEOUT_S
    resume_window: float = DEFAULT_RESUME_WINDOW_S
    max_held_bytes: int = DEFAULT_MAX_HELD_BYTES
    max_presence_entries: int = DEFAULT_MAX_PRESENCE_ENTRIES
    max_presence_meta_bytes: int = DEFAULT_MAX_PRESENCE_META_BYTES
    max_topics_per_connection: int = DEFAULT_MAX_TOPICS_PER_CONNECTION


#: Signs session cookies when neither ``App(secret=...)`` nor RALLY_SECRET is set.
_PROCESS_SECRET: Final = secrets.token_bytes(32)


def _default_max_connections() -> int:
    """DEFAULT_MAX_CONNECTIONS, or less where the descriptor limit is lower:
    past it accepting fails before a 503 can be answered."""
    try:
        import resource
    except ImportError:  # not on Unix
        return DEFAULT_MAX_CONNECTIONS
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(1, min(DEFAULT_MAX_CONNECTIONS, soft - _RESERVED_FDS))


# ==== Errors ================================================================


class RallyError(Exception):
    """Root of every error rally.py raises."""


class ProtocolError(RallyError):
    """The peer broke HTTP or WebSocket, or asked for what is refused.

    ``status`` is the HTTP status to answer with, ``headers`` extra response
    headers (``Allow`` for a 405, say); ``close_code`` the WebSocket close
    code. The message is sent to the peer: it never quotes the request.
    """

    def __init__(
        self,
        message: str,
        status: int = 400,
        close_code: int = 1002,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.close_code = close_code
        self.headers = headers


class ContractError(RallyError):
    """A value broke the contract: it does not match its type or a limit.

    ``code`` is the wire error code (``invalid``, ``unknown_type``,
    ``too_large``, ...) and ``errors`` a list of ``{"path", "message"}``.
    """

    def __init__(self, code: str, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['path']}: {e['message']}" for e in errors) or code)
        self.code = code
        self.errors = errors


class UsageError(RallyError, TypeError):
    """The program misused the API: a wrong argument, or a call at the wrong time."""


class RegistrationError(UsageError):
    """A page, handler or option the program registered is wrong: raised by
    ``App(...)``, ``app.page`` and the other registration calls, never at
    request time."""


class UnwrapError(RallyError):
    """``unwrap()`` on an ``Error`` (``error`` holds its value) or
    ``unwrap_error()`` on an ``Ok``."""

    def __init__(self, message: str, error: Any = None) -> None:
        super().__init__(message)
        self.error = error


class RemoteError(RallyError):
    """The server answered a ``Client`` with an ``error`` envelope, refused a
    page's handshake (``refused``), or sent a response body larger than the
    Client takes (``too_large``)."""

    def __init__(self, code: str, errors: list[dict[str, str]], status: int | None = None) -> None:
        described = (f"{e.get('path')}: {e.get('message')}" if e.get("path") else f"{e.get('message')}" for e in errors)
        super().__init__(f"{code}: " + "; ".join(described))
        self.code = code
        self.errors = errors
        self.status = status


class ConnectionClosed(RallyError):
    """The WebSocket is closed; ``code`` and ``reason`` say how."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class Refuse(RallyError):
    """Raised by a page's ``server_init`` to refuse the page (a banned
    user, say): the connection closes with code 4003 (``CLOSE_REFUSED``)
    and ``reason``, no model exists, ``server_terminate`` does not run, and
    the client stops without reconnecting. ``reason`` is at most 120 bytes
    of UTF-8 (``UsageError`` otherwise)."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(_close_reason(reason, "rally.Refuse(reason)"))
        self.reason = reason


def _close_reason(reason: object, where: str) -> str:
    """A close reason as the API takes it: a str of at most 120 bytes of UTF-8."""
    if not isinstance(reason, str) or len(reason.encode("utf-8", "surrogatepass")) > _MAX_CLOSE_REASON_BYTES:
        raise UsageError(
            f"{where}: expected a str of at most {_MAX_CLOSE_REASON_BYTES} bytes of UTF-8, got {reason!r:.60}"
        )
    return reason


class _Bad(Exception):
    """Decoding or encoding failed; containers prepend their path segment.
    ``code`` is ``invalid``, or ``too_large`` for a value over a limit."""

    __slots__ = ("message", "segments", "code")

    def __init__(self, message: str, code: str = "invalid") -> None:
        self.message = message
        self.segments: list[str] = []
        self.code = code

    @classmethod
    def at(cls, segment: str, message: str) -> _Bad:
        """An error whose path ends below the value being decoded."""
        bad = cls(message)
        bad.segments.append(segment)
        return bad

    def error(self, root: str) -> dict[str, str]:
        """The wire form: ``{"path", "message"}``, the path under ``root``."""
        return {"path": root + "".join(reversed(self.segments)), "message": self.message}


# ==== Contract: Python types <-> JSON (pure) ================================

_T = TypeVar("_T")
_E = TypeVar("_E")
_M = TypeVar("_M")


class _Value:
    """Equality, hash and repr over ``__match_args__``: a frozen dataclass
    without the half millisecond of import time each dataclass costs."""

    __slots__ = ()
    __match_args__: tuple[str, ...] = ()

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__match_args__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Value) and type(other) is type(self) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((type(self), self._fields()))

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={value!r}" for name, value in zip(self.__match_args__, self._fields(), strict=True))
        return f"{type(self).__name__}({args})"


class _ResultBase(_Value):
    """What ``Ok`` and ``Error`` share: no truth value, so that
    ``assert await client.rpc(...)`` cannot pass on an ``Error``."""

    __slots__ = ()

    def __bool__(self) -> bool:
        raise TypeError(f"the truth value of {type(self).__name__} is ambiguous: test result.is_ok or result.is_error")


class Ok(_ResultBase, Generic[_T]):
    """A successful RPC result; encoded with the T of ``Result[T, E]``."""

    __slots__ = ("value",)
    __match_args__ = ("value",)

    is_ok: Final = True
    is_error: Final = False

    def __init__(self, value: _T) -> None:
        self.value = value

    def unwrap(self) -> _T:
        """The value."""
        return self.value

    def unwrap_error(self) -> typing.NoReturn:
        """Raises ``UnwrapError``: an ``Ok`` holds no error."""
        raise UnwrapError(f"unwrap_error() on {self!r}")


class Error(_ResultBase, Generic[_E]):
    """A failed RPC result the client should handle (a form error, say)."""

    __slots__ = ("error",)
    __match_args__ = ("error",)

    is_ok: Final = False
    is_error: Final = True

    def __init__(self, error: _E) -> None:
        self.error = error

    def unwrap(self) -> typing.NoReturn:
        """Raises ``UnwrapError`` carrying the error: an ``Error`` holds no value."""
        raise UnwrapError(f"unwrap() on {self!r}", self.error)

    def unwrap_error(self) -> _E:
        """The error."""
        return self.error


Result = Union[Ok[_T], Error[_E]]  # noqa: UP007 - a generic alias needs Union
"""``Result[T, E]``: the return annotation of an RPC handler."""


class Effect(_Value, Generic[_M]):
    """What a stateful handler asks to be delivered after it returns.

    Build one with the functions of ``rally.effect``; ``Effect[ToClient]`` in
    an annotation names the push types of a page.
    """

    __slots__ = ("scope", "msg", "children", "target")
    __match_args__ = ("scope", "msg", "children", "target")

    def __init__(
        self, scope: str, msg: Any = None, children: tuple[Effect[_M], ...] = (), target: str | None = None
    ) -> None:
        # "none", "client", "session", "page", "app", "topic", "subscribe", "unsubscribe", "watch", "unwatch" or "batch"
        self.scope = scope
        self.msg = msg
        self.children = children
        self.target = target  # the topic, or another page's path


def _check_watched(page: object) -> str:
    if not isinstance(page, str) or not page.startswith("/") or len(page) > 1000:
        raise UsageError(f"watch_presence: expected a page path or route pattern starting with /, got {page!r:.60}")
    return page


def _check_topic(topic: object) -> str:
    """A custom topic name: a non-empty str outside the reserved names."""
    if not isinstance(topic, str) or not topic:
        raise UsageError(f"a topic is a non-empty str, got {topic!r}")
    if topic == "app" or topic.startswith(("session:", "page:", "app:")):
        raise UsageError(f"topic {topic[:60]!r} is reserved: names under session:, page: and app are rally.py's own")
    return topic


class _EffectBuilders:
    """The ``rally.effect`` namespace: constructors of ``Effect`` values."""

    @staticmethod
    def none() -> Effect[Any]:
        """Deliver nothing."""
        return _NO_EFFECT

    @staticmethod
    def send_to_client(msg: _M) -> Effect[_M]:
        """Deliver ``msg`` to this connection only."""
        return Effect("client", msg)

    @staticmethod
    def broadcast_to_session(msg: _M) -> Effect[_M]:
        """Deliver ``msg`` to every connection of this browser session (every tab)."""
        return Effect("session", msg)

    @staticmethod
    def broadcast_to_page(msg: _M, page: str | None = None) -> Effect[_M]:
        """Deliver ``msg`` to every connection on the same page path, or on
        the concrete path ``page`` (whose page must declare ``msg``'s type)."""
        if page is not None and (not isinstance(page, str) or not page.startswith("/")):
            raise UsageError(f"broadcast_to_page(page=...) takes a path starting with /, got {page!r}")
        return Effect("page", msg, target=page)

    @staticmethod
    def broadcast_to_topic(topic: str, msg: _M) -> Effect[_M]:
        """Deliver ``msg`` to every connection subscribed to ``topic`` whose
        page declares ``msg``'s type."""
        return Effect("topic", msg, target=_check_topic(topic))

    @staticmethod
    def subscribe(topic: str) -> Effect[Any]:
        """Join ``topic`` (a room shared by several pages, say) until the
        connection ends or unsubscribes."""
        return Effect("subscribe", target=_check_topic(topic))

    @staticmethod
    def unsubscribe(topic: str) -> Effect[Any]:
        """Leave ``topic``."""
        return Effect("unsubscribe", target=_check_topic(topic))

    @staticmethod
    def watch_presence(page: str) -> Effect[Any]:
        """Get ``rally.PresenceChanged`` events of the presence of ``page``,
        a concrete path (``/rooms/blue``) or a route pattern (``/rooms/{name}``:
        every page it matches), until the connection ends or unwatches; the
        page's ``server_event`` must take ``rally.PresenceChanged``."""
        return Effect("watch", target=_check_watched(page))

    @staticmethod
    def unwatch_presence(page: str) -> Effect[Any]:
        """Stop watching ``page`` (as given to ``watch_presence``)."""
        return Effect("unwatch", target=_check_watched(page))

    @staticmethod
    def broadcast_to_app(msg: _M) -> Effect[_M]:
        """Deliver ``msg`` to every connection of the app."""
        return Effect("app", msg)

    @staticmethod
    def batch(*effects: Effect[_M]) -> Effect[_M]:
        """Run ``effects`` in order."""
        return Effect("batch", None, tuple(effects))


_NO_EFFECT: Final[Effect[Any]] = Effect("none")
effect: Final = _EffectBuilders()


def _kind(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return {int: "int", float: "float", str: "str", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


_Decoder = Callable[[Any], Any]
_Encoder = Callable[[Any], Any]


class _Codec:
    """Strict decoder and checked encoder of one annotation.

    ``decode`` takes a value from ``json.loads`` and returns the Python value;
    ``encode`` does the reverse. Both raise only ``_Bad``.
    """

    __slots__ = ("name", "decode", "encode")

    def __init__(self, name: str, decode: _Decoder, encode: _Encoder) -> None:
        self.name = name
        self.decode = decode
        self.encode = encode


class _Unsupported(Exception):
    """An annotation outside the contract (docs/contract.md), found while building a codec."""


def _is_dataclass_type(tp: object) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _doc(obj: Any) -> str | None:
    """The docstring of a handler, page or type for the contract, cleaned of
    its indentation; ``None`` when it has none. A class's own docstring only
    (not one it inherits), and not the ones ``dataclasses`` and ``enum`` write
    for a class without any."""
    if isinstance(obj, type):
        doc = vars(obj).get("__doc__")
    elif inspect.ismodule(obj) or inspect.isroutine(obj):
        doc = obj.__doc__
    else:  # a callable object or a partial: its class's docstring is not about this handler
        return None
    if not isinstance(doc, str):
        return None
    if isinstance(obj, enum.EnumMeta) and doc == "An enumeration.":  # the one Python 3.10 gives every Enum
        return None
    if _is_dataclass_type(obj):
        try:
            generated = obj.__name__ + str(inspect.signature(obj)).replace(" -> None", "")
        except (TypeError, ValueError):
            generated = obj.__name__
        if doc == generated:
            return None
    return inspect.cleandoc(doc) or None


def _type_name(tp: object) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


class _Codecs:
    """Builds and caches codecs under one set of limits.

    Dataclasses are described once in ``types`` (for the contract) and may be
    recursive: a placeholder codec stands in while their fields are built.
    """

    def __init__(self, limits: _Limits) -> None:
        self.limits = limits
        self._cache: dict[Any, _Codec] = {}
        self.types: dict[str, dict[str, Any]] = {}
        self.defaults: dict[str, dict[str, Any]] = {}
        self._classes: dict[str, type] = {}
        self._namespaces: list[dict[str, Any]] = []

    def get(self, tp: Any) -> _Codec:
        """The codec of annotation ``tp``; raises ``_Unsupported``."""
        try:
            return self._cache[tp]
        except KeyError:
            pass
        except TypeError:  # an unhashable annotation
            raise _Unsupported(f"unsupported type {tp!r}") from None
        codec = self._build(tp)
        self._cache[tp] = codec
        return codec

    def message(self, members: tuple[type, ...]) -> _Codec:
        """Codec of a tagged message ``{"type": name, "fields": {...}}``."""
        return self._tagged(members)

    def members(self, tp: Any) -> tuple[type, ...] | None:
        """The dataclasses of ``tp`` if it is a dataclass or a union of them."""
        if _is_dataclass_type(tp):
            return (tp,)
        if _is_union(tp):
            args = typing.get_args(tp)
            if all(_is_dataclass_type(a) for a in args):
                return tuple(args)
        return None

    def register_class(self, cls: type) -> None:
        other = self._classes.setdefault(cls.__name__, cls)
        if other is not cls:
            raise _Unsupported(
                f"two different types are named {cls.__name__!r} "
                f"({other.__module__}.{other.__qualname__} and {cls.__module__}.{cls.__qualname__}); "
                "message type names must be unique in an app"
            )

    def _build(self, tp: Any) -> _Codec:
        lim = self.limits
        if isinstance(tp, (str, typing.ForwardRef)):
            # Python 3.10's get_type_hints leaves list["Node"] unresolved.
            return self.get(self._resolve(tp if isinstance(tp, str) else tp.__forward_arg__))
        if tp is str:
            max_chars = lim.max_string_chars

            def dec_str(v: Any) -> str:
                if type(v) is str:
                    if len(v) > max_chars:
                        raise _Bad(f"string longer than {max_chars} characters", "too_large")
                    return v
                raise _Bad(f"expected str, got {_kind(v)}")

            def enc_str(v: Any) -> str:
                if isinstance(v, str):
                    return v
                raise _Bad(f"expected str, got {type(v).__name__}")

            return _Codec("str", dec_str, enc_str)
        if tp is bool:

            def dec_bool(v: Any) -> bool:
                if type(v) is bool:
                    return v
                raise _Bad(f"expected bool, got {_kind(v)}")

            def enc_bool(v: Any) -> bool:
                if type(v) is bool:
                    return v
                raise _Bad(f"expected bool, got {type(v).__name__}")

            return _Codec("bool", dec_bool, enc_bool)
        if tp is int:

            def dec_int(v: Any) -> int:
                if type(v) is int:
                    if -_MAX_SAFE_INT <= v <= _MAX_SAFE_INT:
                        return v
                    raise _Bad("integer outside ±(2^53-1)")
                raise _Bad(f"expected int, got {_kind(v)}")

            def enc_int(v: Any) -> int:
                if isinstance(v, int) and not isinstance(v, bool):
                    if -_MAX_SAFE_INT <= v <= _MAX_SAFE_INT:
                        return int(v)
                    raise _Bad("integer outside ±(2^53-1)")
                raise _Bad(f"expected int, got {type(v).__name__}")

            return _Codec("int", dec_int, enc_int)
        if tp is float:

            def dec_float(v: Any) -> float:
                t = type(v)
                if t is float:
                    if math.isfinite(v):
                        return v  # type: ignore[no-any-return]
                    raise _Bad("expected a finite float")
                if t is int:
                    return float(v)
                raise _Bad(f"expected float, got {_kind(v)}")

            def enc_float(v: Any) -> float:
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    if math.isfinite(v):
                        return float(v)
                    raise _Bad("expected a finite float")
                raise _Bad(f"expected float, got {type(v).__name__}")

            return _Codec("float", dec_float, enc_float)
        if tp is None or tp is type(None):

            def dec_none(v: Any) -> None:
                if v is not None:
                    raise _Bad(f"expected null, got {_kind(v)}")

            def enc_none(v: Any) -> None:
                if v is not None:
                    raise _Bad(f"expected None, got {type(v).__name__}")

            return _Codec("None", dec_none, enc_none)
        if tp is bytes:
            return self._bytes()
        dt = sys.modules.get("datetime")  # an annotation can name it only once it is imported
        if dt is not None and (tp is dt.datetime or tp is dt.date):
            return self._datetime(tp, dt)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return self._enum(tp)
        if _is_dataclass_type(tp):
            return self._dataclass(tp)
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is list:
            return self._list(args, tp)
        if origin is tuple:
            return self._tuple(args, tp)
        if origin is dict:
            return self._dict(args, tp)
        if origin is Literal:
            return self._literal(args)
        if _is_union(tp):
            non_none = tuple(a for a in args if a is not type(None))
            if len(non_none) < len(args):
                inner = self.get(non_none[0] if len(non_none) == 1 else Union[non_none])  # noqa: UP007
                return self._optional(inner)
            if all(_is_dataclass_type(a) for a in args):
                return self._tagged(args)
            raise _Unsupported(f"unsupported union {tp!r}: only T | None and unions of dataclasses are allowed")
        raise _Unsupported(f"unsupported type {_type_name(tp)}")

    def _bytes(self) -> _Codec:
        max_chars = self.limits.max_string_chars

        def dec(v: Any) -> bytes:
            if type(v) is not str:
                raise _Bad(f"expected base64 str, got {_kind(v)}")
            if len(v) > max_chars:
                raise _Bad(f"string longer than {max_chars} characters", "too_large")
            try:
                return base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                raise _Bad("expected standard base64 with padding") from None

        def enc(v: Any) -> str:
            if isinstance(v, (bytes, bytearray, memoryview)):
                return base64.b64encode(v).decode("ascii")
            raise _Bad(f"expected bytes, got {type(v).__name__}")

        return _Codec("bytes", dec, enc)

    def _datetime(self, tp: type, datetime: types.ModuleType) -> _Codec:
        is_datetime = tp is datetime.datetime
        name = "datetime" if is_datetime else "date"

        def dec(v: Any) -> Any:
            if type(v) is not str:
                raise _Bad(f"expected ISO 8601 {name} str, got {_kind(v)}")
            if len(v) > 64:
                raise _Bad(f"expected ISO 8601 {name}, got a string of {len(v)} characters")
            try:
                if is_datetime:
                    # Python 3.10's fromisoformat does not read "Z".
                    return datetime.datetime.fromisoformat(v[:-1] + "+00:00" if v.endswith("Z") else v)
                if len(v) != 10:
                    raise ValueError
                return datetime.date.fromisoformat(v)
            except ValueError:
                raise _Bad(f"expected ISO 8601 {name}, got {v[:40]!r}") from None

        def enc(v: Any) -> str:
            if is_datetime and isinstance(v, datetime.datetime):
                return str(v.isoformat())
            if not is_datetime and isinstance(v, datetime.date) and not isinstance(v, datetime.datetime):
                return str(v.isoformat())
            raise _Bad(f"expected {name}, got {type(v).__name__}")

        return _Codec(name, dec, enc)

    def _enum(self, tp: type[enum.Enum]) -> _Codec:
        by_value: dict[tuple[type, Any], enum.Enum] = {}
        for member in tp:
            value = member.value
            if type(value) not in (str, int) or isinstance(value, bool):
                raise _Unsupported(f"enum {tp.__name__}: values must be str or int, {member.name} is {value!r}")
            by_value[(type(value), value)] = member
        self.types.setdefault(tp.__name__, {"enum": [m.value for m in tp]})
        if (doc := _doc(tp)) is not None:
            self.types[tp.__name__].setdefault("doc", doc)

        def dec(v: Any) -> enum.Enum:
            try:
                return by_value[(type(v), v)]
            except (KeyError, TypeError):
                raise _Bad(f"expected one of {[m.value for m in tp]}, got {_short(v)}") from None

        def enc(v: Any) -> Any:
            if isinstance(v, tp):
                return v.value
            raise _Bad(f"expected {tp.__name__}, got {type(v).__name__}")

        return _Codec(tp.__name__, dec, enc)

    def _literal(self, args: tuple[Any, ...]) -> _Codec:
        allowed: set[tuple[type, Any]] = set()
        for a in args:
            if type(a) not in (str, int, bool) and a is not None:
                raise _Unsupported(f"unsupported Literal value {a!r}")
            allowed.add((type(a), a))
        name = "Literal[" + ", ".join(json.dumps(a) for a in args) + "]"

        def dec(v: Any) -> Any:
            try:
                if (type(v), v) in allowed:
                    return v
            except TypeError:
                pass
            raise _Bad(f"expected one of {json.dumps(list(args))}, got {_short(v)}")

        def enc(v: Any) -> Any:
            if (type(v), v) in allowed:
                return v
            raise _Bad(f"expected {name}, got {v!r}")

        return _Codec(name, dec, enc)

    def _optional(self, inner: _Codec) -> _Codec:
        d, e = inner.decode, inner.encode
        return _Codec(
            inner.name + " | None",
            lambda v: None if v is None else d(v),
            lambda v: None if v is None else e(v),
        )

    def _list(self, args: tuple[Any, ...], tp: Any) -> _Codec:
        if len(args) != 1:
            raise _Unsupported(f"unsupported type {tp!r}: write list[T]")
        item = self.get(args[0])
        d, e = item.decode, item.encode
        max_items = self.limits.max_array_items

        def dec(v: Any) -> list[Any]:
            if type(v) is not list:
                raise _Bad(f"expected array, got {_kind(v)}")
            if len(v) > max_items:
                raise _Bad(f"array longer than {max_items} items", "too_large")
            i = 0
            try:
                out = []
                for i, x in enumerate(v):  # noqa: B007 - i names the failing item
                    out.append(d(x))
                return out
            except _Bad as bad:
                bad.segments.append(f"[{i}]")
                raise

        def enc(v: Any) -> list[Any]:
            if not isinstance(v, (list, tuple)):
                raise _Bad(f"expected list, got {type(v).__name__}")
            i = 0
            try:
                out = []
                for i, x in enumerate(v):  # noqa: B007
                    out.append(e(x))
                return out
            except _Bad as bad:
                bad.segments.append(f"[{i}]")
                raise

        return _Codec(f"list[{item.name}]", dec, enc)

    def _tuple(self, args: tuple[Any, ...], tp: Any) -> _Codec:
        if len(args) == 2 and args[1] is Ellipsis:
            inner = self._list((args[0],), tp)
            d, e = inner.decode, inner.encode
            return _Codec(f"tuple[{inner.name[5:-1]}, ...]", lambda v: tuple(d(v)), e)
        if not args or args == ((),):
            raise _Unsupported(f"unsupported type {tp!r}: an empty tuple carries nothing")
        items = [self.get(a) for a in args]
        n = len(items)

        def dec(v: Any) -> tuple[Any, ...]:
            if type(v) is not list:
                raise _Bad(f"expected array of {n}, got {_kind(v)}")
            if len(v) != n:
                raise _Bad(f"expected array of {n}, got {len(v)} items")
            out = []
            for i, (c, x) in enumerate(zip(items, v, strict=True)):
                try:
                    out.append(c.decode(x))
                except _Bad as bad:
                    bad.segments.append(f"[{i}]")
                    raise
            return tuple(out)

        def enc(v: Any) -> list[Any]:
            if not isinstance(v, (tuple, list)) or len(v) != n:
                raise _Bad(f"expected tuple of {n}, got {type(v).__name__}")
            out = []
            for i, (c, x) in enumerate(zip(items, v, strict=True)):
                try:
                    out.append(c.encode(x))
                except _Bad as bad:
                    bad.segments.append(f"[{i}]")
                    raise
            return out

        return _Codec("tuple[" + ", ".join(c.name for c in items) + "]", dec, enc)

    def _dict(self, args: tuple[Any, ...], tp: Any) -> _Codec:
        if len(args) != 2 or args[0] is not str:
            raise _Unsupported(f"unsupported type {tp!r}: only dict[str, T] maps to a JSON object")
        value = self.get(args[1])
        d, e = value.decode, value.encode
        max_chars = self.limits.max_string_chars

        def dec(v: Any) -> dict[str, Any]:
            if type(v) is not dict:
                raise _Bad(f"expected object, got {_kind(v)}")
            out = {}
            for k, x in v.items():
                if len(k) > max_chars:
                    raise _Bad(f"key longer than {max_chars} characters", "too_large")
                try:
                    out[k] = d(x)
                except _Bad as bad:
                    bad.segments.append(f"[{json.dumps(k[:40])}]")
                    raise
            return out

        def enc(v: Any) -> dict[str, Any]:
            if not isinstance(v, dict):
                raise _Bad(f"expected dict, got {type(v).__name__}")
            out = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    raise _Bad(f"expected str keys, got {type(k).__name__}")
                try:
                    out[k] = e(x)
                except _Bad as bad:
                    bad.segments.append(f"[{json.dumps(k[:40])}]")
                    raise
            return out

        return _Codec(f"dict[str, {value.name}]", dec, enc)

    def _fields(self, cls: type) -> list[tuple[str, _Codec, bool]]:
        """``(name, codec, has_default)`` of each field a dataclass's __init__
        takes; the defaults, encoded, go into the contract."""
        try:
            hints = typing.get_type_hints(cls)
        except Exception as exc:
            raise _Unsupported(f"cannot resolve the annotations of {cls.__name__}: {exc}") from None
        fields = []
        defaults: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            try:
                fc = self.get(hints[f.name])
            except _Unsupported as exc:
                raise _Unsupported(f"{cls.__name__}.{f.name}: {exc}") from None
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if has_default:
                factory = typing.cast(Callable[[], Any], f.default_factory)
                default = f.default if f.default is not dataclasses.MISSING else factory()
                try:
                    defaults[f.name] = fc.encode(default)
                except _Bad as bad:
                    raise _Unsupported(f"{cls.__name__}.{f.name}: the default {default!r}: {bad.message}") from None
            fields.append((f.name, fc, has_default))
        if defaults:
            self.defaults[cls.__name__] = defaults
        return fields

    def _resolve(self, name: str) -> Any:
        for ns in reversed(self._namespaces):
            try:
                return eval(name, ns)  # an annotation, as typing.get_type_hints evaluates it
            except NameError:
                continue
        raise _Unsupported(f"cannot resolve the forward reference {name!r}")

    def _dataclass(self, cls: type) -> _Codec:
        self.register_class(cls)
        # A recursive type finds this codec in the cache while its fields are
        # built; the trampolines reach the finished functions set below.
        codec = _Codec(cls.__name__, lambda v: codec.decode(v), lambda v: codec.encode(v))
        self._cache[cls] = codec
        module = sys.modules.get(cls.__module__)
        self._namespaces.append({**(vars(module) if module else {}), cls.__name__: cls})
        try:
            fields = self._fields(cls)
        except BaseException:
            del self._cache[cls]
            raise
        finally:
            self._namespaces.pop()
        self.types[cls.__name__] = {"fields": {n: c.name for n, c, _ in fields}}
        if cls.__name__ in self.defaults:
            self.types[cls.__name__]["defaults"] = self.defaults[cls.__name__]
        if (doc := _doc(cls)) is not None:
            self.types[cls.__name__]["doc"] = doc
        names = frozenset(n for n, _, _ in fields)
        field_list = ", ".join(n for n, _, _ in fields) or "none"
        required = [n for n, _, has_default in fields if not has_default]
        spec = [(n, c.decode, c.encode) for n, c, _ in fields]

        def dec(v: Any) -> Any:
            if type(v) is not dict:
                raise _Bad(f"expected object, got {_kind(v)}")
            kwargs = {}
            for name, d, _e in spec:
                try:
                    x = v[name]
                except KeyError:
                    continue
                try:
                    kwargs[name] = d(x)
                except _Bad as bad:
                    bad.segments.append("." + name)
                    raise
            if len(kwargs) != len(v):
                extra = sorted(k for k in v if k not in names)
                raise _Bad.at("." + extra[0][:40], f"unknown field of {cls.__name__} (its fields: {field_list})")
            if len(kwargs) < len(required):
                missing = [n for n in required if n not in kwargs]
                if missing:
                    raise _Bad.at("." + missing[0], f"missing field of {cls.__name__}")
            return cls(**kwargs)

        def enc(v: Any) -> dict[str, Any]:
            if not isinstance(v, cls):
                raise _Bad(f"expected {cls.__name__}, got {type(v).__name__}")
            out = {}
            for name, _d, e in spec:
                try:
                    out[name] = e(getattr(v, name))
                except _Bad as bad:
                    bad.segments.append("." + name)
                    raise
            return out

        codec.decode, codec.encode = dec, enc
        return codec

    def _tagged(self, members: tuple[type, ...]) -> _Codec:
        codecs = {cls: self.get(cls) for cls in members}
        by_name = {cls.__name__: c for cls, c in codecs.items()}
        names = sorted(by_name)
        max_entries = 2

        def dec(v: Any) -> Any:
            if type(v) is not dict:
                raise _Bad(f"expected message object, got {_kind(v)}")
            t = v.get("type")
            if type(t) is not str:
                bad = _Bad(f"expected a type name, got {_kind(t)}")
                bad.segments.append(".type")
                raise bad
            c = by_name.get(t)
            if c is None:
                bad = _Bad(f"unknown type {t[:40]!r}, expected one of {names}")
                bad.segments.append(".type")
                raise bad
            if "fields" not in v or len(v) > max_entries:
                raise _Bad('expected exactly the keys "type" and "fields"')
            try:
                return c.decode(v["fields"])
            except _Bad as bad:
                bad.segments.append(".fields")
                raise

        def enc(v: Any) -> dict[str, Any]:
            c = codecs.get(type(v))
            if c is None:
                raise _Bad(f"expected one of {names}, got {type(v).__name__}")
            return {"type": type(v).__name__, "fields": c.encode(v)}

        return _Codec(" | ".join(c.name for c in codecs.values()), dec, enc)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is Union or isinstance(tp, types.UnionType)


def _short(value: Any) -> str:
    """A JSON excerpt of a value for an error message, never the whole input."""
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else _kind(value)
    return text if len(text) <= 40 else text[:37] + "..."


# JSON reading: strict UTF-8, no NaN/Infinity, no duplicate keys, limits.


class _TooLarge(ValueError):
    """A JSON object over the entries limit, raised from inside the parser."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


#: A JSON string, escapes included: what ``_containers`` leaves out.
_JSON_STRING: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def _containers(text: str) -> int:
    """Arrays and objects in a JSON document: its brackets outside strings."""
    bare = _JSON_STRING.sub("", text)
    return bare.count("[") + bare.count("{")


class _Json:
    """JSON reader under one set of limits; raises only ``ContractError``."""

    def __init__(self, limits: _Limits) -> None:
        self.max_depth = limits.max_json_depth
        self.max_items = limits.max_array_items
        # Room for a list of max_items objects and the envelope around it.
        self.max_containers = 2 * limits.max_array_items
        max_entries = limits.max_object_entries

        def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
            obj = dict(items)
            if len(obj) != len(items):
                seen: set[str] = set()
                dup = next(k for k, _ in items if k in seen or seen.add(k))  # type: ignore[func-returns-value]
                raise ValueError(f"duplicate key {dup[:40]!r}")
            if len(obj) > max_entries:
                raise _TooLarge(f"object with more than {max_entries} entries")
            return obj

        self._decoder = json.JSONDecoder(object_pairs_hook=pairs, parse_constant=_reject_constant)

    def loads(self, data: bytes | str) -> Any:
        if isinstance(data, (bytes, bytearray, memoryview)):
            try:
                text = bytes(data).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ContractError(
                    "invalid", [{"path": "", "message": f"not UTF-8: {exc.reason} at byte {exc.start}"}]
                ) from None
        else:
            text = data
        # Parsing costs about a third of a microsecond per array or object, so
        # a megabyte of ``[],[],...`` is refused before it is parsed. One count
        # says when there may be too many (it also counts brackets inside
        # strings); only then are the strings left out to count exactly.
        brackets = text.count("[") + text.count("{")
        if brackets > self.max_containers and _containers(text) > self.max_containers:
            raise ContractError(
                "too_large", [{"path": "", "message": f"more than {self.max_containers} arrays and objects"}]
            )
        try:
            value = self._decoder.decode(text)
        except RecursionError:
            raise ContractError(
                "too_large", [{"path": "", "message": f"JSON nested deeper than {self.max_depth}"}]
            ) from None
        except _TooLarge as exc:
            raise ContractError("too_large", [{"path": "", "message": str(exc)}]) from None
        except ValueError as exc:
            raise ContractError("invalid", [{"path": "", "message": f"bad JSON: {str(exc)[:120]}"}]) from None
        # A document cannot nest deeper than its number of brackets; only
        # bracket-heavy input pays for the walk.
        if brackets > self.max_depth:
            problem = _too_large(value, self.max_depth, self.max_items)
            if problem:
                raise ContractError("too_large", [{"path": "", "message": problem}])
        return value


def _too_large(value: Any, max_depth: int, max_items: int) -> str | None:
    """What breaks the depth or array limit in a parsed document, if anything.
    Level by level, and a too long array is refused before its items are
    looked at, so a megabyte of ``[],[],...`` costs one ``len``."""
    level = [value]
    for _ in range(max_depth):
        below = []
        for v in level:
            if type(v) is dict:
                below += [c for c in v.values() if type(c) is list or type(c) is dict]
            elif len(v) > max_items:
                return f"array longer than {max_items} items"
            else:
                below += [c for c in v if type(c) is list or type(c) is dict]
        if not below:
            return None
        level = below
    return f"JSON nested deeper than {max_depth}"


_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _dumps(value: Any) -> bytes:
    """Compact JSON; ASCII-only so lone surrogates stay valid on the wire.
    One encoder for the process: ``json.dumps`` with options builds a new one
    per call."""
    return _ENCODER.encode(value).encode("ascii")


# Envelopes (docs/protocol.md "Wire protocol").

_ERROR_STATUS: Final = {
    "invalid": 400,
    "unknown_type": 400,
    "not_stateful": 400,
    "too_large": 413,
    "stale_contract": 409,
    "key_reused": 422,
    "internal": 500,
    "busy": 503,
}


def _ok_reply(msg_id: Any, value: Any) -> bytes:
    return _dumps({"kind": "ok", "id": msg_id, "value": value})


def _err_reply(msg_id: Any, error: Any) -> bytes:
    return _dumps({"kind": "err", "id": msg_id, "error": error})


def _error_reply(msg_id: Any, code: str, errors: list[dict[str, str]], seq: int | None = None) -> bytes:
    """An ``error`` envelope; one answering a numbered ``send`` carries its ``seq``."""
    if seq is None:
        return _dumps({"kind": "error", "id": msg_id, "code": code, "errors": errors})
    return _dumps({"kind": "error", "id": msg_id, "seq": seq, "code": code, "errors": errors})


def _ack(seq: int) -> bytes:
    """A numbered ``send`` was applied: its ``server_update`` ran."""
    return b'{"kind":"ack","seq":%d}' % seq


def _hello(token: str, resumed: bool, ack: int) -> bytes:
    """The first frame of every page connection (docs/delivery.md "Delivery across reconnects")."""
    return _ws_frame(_dumps({"kind": "hello", "resume": token, "resumed": resumed, "ack": ack}))


def _seq_frame(seq: int, tail: bytes) -> bytes:
    """Frame a JSON object for one page connection with its ``seq`` first;
    ``tail`` is the object's encoding without its ``{``, made once for every
    recipient: only the number differs."""
    body = b'{"seq":%d,%b' % (seq, tail)
    n = len(body)
    if n < 126:
        return b"\x81%c%b" % (n, body)
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + body
    return struct.pack("!BBQ", 0x81, 127, n) + body


_INTERNAL_ERRORS: Final = [{"path": "", "message": "internal server error"}]
#: A page's acknowledgement exactly as the browser client writes it.
_ACK_RE: Final = re.compile(r'\{"kind":"ack","seq":(0|[1-9][0-9]{0,15})\}')


class _Envelope(typing.NamedTuple):
    kind: str  # "rpc", "send" or "ack"
    id: Any  # an rpc's id; a send's or an ack's seq (None: a send without one)
    msg: Any  # {"type": ..., "fields": ...}; None for an ack
    key: str | None = None  # an rpc's idempotency key


def _parse_envelope(value: Any) -> _Envelope:
    """Check an envelope's shape. An ``rpc`` may carry an idempotency
    ``key`` (a string of at most 64 characters); a ``send`` a ``seq`` (a
    positive safe integer); an ``ack`` from the page says which numbered
    frames it has received, up to its ``seq``."""

    def bad(path: str, message: str) -> ContractError:
        return ContractError("invalid", [{"path": path, "message": message}])

    if type(value) is not dict:
        raise bad("", f"expected an envelope object, got {_kind(value)}")
    kind = value.get("kind")
    if kind == "rpc":
        msg_id = value.get("id")
        if type(msg_id) is int:
            if not -_MAX_SAFE_INT <= msg_id <= _MAX_SAFE_INT:
                raise bad("id", "integer outside ±(2^53-1)")
        elif type(msg_id) is str:
            if len(msg_id) > _MAX_ID_CHARS:
                raise bad("id", f"string longer than {_MAX_ID_CHARS} characters")
        else:
            raise bad("id", f"expected int or str, got {_kind(msg_id)}")
        key = value.get("key")
        if key is not None and (type(key) is not str or not 0 < len(key) <= _MAX_ID_CHARS):
            raise bad("key", f"expected a string of 1 to {_MAX_ID_CHARS} characters")
        if len(value) != (3 if key is None else 4) or "msg" not in value:
            raise bad("", 'an rpc envelope has exactly "kind", "id", "msg" and an optional "key"')
    elif kind == "ack":
        seq = value.get("seq")
        if type(seq) is not int or not 0 <= seq <= _MAX_SAFE_INT or len(value) != 2:
            raise bad("seq", f'an ack is {{"kind": "ack", "seq": n}} with n a safe int, got {_short(seq)}')
        return _Envelope("ack", seq, None)
    elif kind == "send":
        msg_id = value.get("seq")
        if "seq" in value and (type(msg_id) is not int or not 0 < msg_id <= _MAX_SAFE_INT):
            raise bad("seq", f"expected a positive int, got {_short(msg_id)}")
        if len(value) != (2 if msg_id is None else 3) or "msg" not in value:
            raise bad("", 'a send envelope has exactly "kind", "msg" and an optional "seq"')
    else:
        raise bad("kind", f'expected "rpc", "send" or "ack", got {_short(kind)}')
    msg = value["msg"]
    if type(msg) is not dict or type(msg.get("type")) is not str or "fields" not in msg or len(msg) != 2:
        raise ContractError("invalid", [{"path": "msg", "message": 'expected {"type": str, "fields": object}'}])
    return _Envelope(kind, msg_id, msg, value.get("key") if kind == "rpc" else None)


# ==== Wire: h11 and wsproto adapters (sans-IO) ==============================
#
# Objects here are fed bytes and hand back events or bytes; none of them
# touches a socket, a loop or a clock, so a test can feed them one byte at a
# time. Each raises only ``ProtocolError`` for bad input.


def _ws_accept(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a client key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())


def _ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One unmasked, final server frame. The same bytes serve every recipient:
    "A server MUST NOT mask any frames that it sends to the client" (RFC 6455
    section 5.1), so a broadcast is framed once."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def _ws_client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked, final client frame ("A client MUST mask all frames that it
    sends to the server", RFC 6455 section 5.1), with a fresh random key."""
    n = len(payload)
    mask = os.urandom(4)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    return head + mask + _unmask(mask, payload)


def _unmask(mask: bytes, payload: bytes) -> bytes:
    """XOR a frame's payload with its 4-byte key (RFC 6455 section 5.3): it
    masks and unmasks alike."""
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def _read_text_frames(data: bytes, masked: bool = True) -> list[tuple[str, int]] | None:
    """The messages of ``data`` if it is nothing but whole, final, masked text
    frames of up to 64 KiB with no extension bits: what a browser sends for
    every typed message. ``None`` for anything else, which wsproto then parses
    (and judges, for a protocol error). Returns ``(text, payload bytes)``.
    ``masked=False`` reads a server's frames (unmasked) for a ``Client``.

    wsproto spends about 6 us on a small frame; this takes under one."""
    out = []
    i, n = 0, len(data)
    key = 4 if masked else 0
    while i < n:
        # FIN + text, RSV 0; MASK set from a client, clear from a server
        if n - i < 2 + key or data[i] != 0x81 or (data[i + 1] >= 0x80) is not masked:
            return None
        length = data[i + 1] & 0x7F
        i += 2
        if length == 126:
            length = int.from_bytes(data[i : i + 2], "big")
            i += 2
            if length < 126:  # not minimal: wsproto refuses it
                return None
        elif length == 127:
            return None
        end = i + key + length
        if end > n:
            return None
        try:
            payload = _unmask(data[i : i + 4], data[i + 4 : end]) if masked else data[i:end]
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            return None  # wsproto closes with 1007
        out.append((text, length))
        i = end
    return out


def _header_size(second_byte: int) -> int:
    """Bytes of a frame header from its second byte: mask bit and length code."""
    length = second_byte & 0x7F
    return 2 + (4 if second_byte & 0x80 else 0) + (2 if length == 126 else 8 if length == 127 else 0)


class _FrameTracker:
    """Follows frame boundaries of the bytes given to wsproto, so the fast
    path above is taken only while wsproto holds no partial frame and no
    fragmented message."""

    __slots__ = ("head", "remaining", "fragmented")

    def __init__(self) -> None:
        self.head = b""  # bytes of a frame header not complete yet
        self.remaining = 0  # payload bytes of the current frame still to come
        self.fragmented = False  # a data frame without FIN was seen

    @property
    def clean(self) -> bool:
        return not self.head and not self.remaining and not self.fragmented

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.remaining:
                take = min(self.remaining, n - i)
                self.remaining -= take
                i += take
                continue
            head = self.head + data[i : i + 14]  # 14: the longest header
            if len(head) < 2 or len(head) < _header_size(head[1]):
                self.head = head
                return
            i += _header_size(head[1]) - len(self.head)
            self.head = b""
            length = head[1] & 0x7F
            if length >= 126:
                length = int.from_bytes(head[2 : 4 if length == 126 else 10], "big")
            self.remaining = length
            if head[0] & 0x0F < 0x8:  # a data frame: continuation, text or binary
                self.fragmented = not head[0] & 0x80


#: The tracker of a ``_WsReader`` without a wsproto connection: fed nothing, always clean.
_NO_FRAME: Final = _FrameTracker()


class _PartialMessage:
    """``_WsReader.next_event``: a fragment of a message arrived (it counts
    as work, so a stream of empty fragments cannot hold the loop)."""


class _WsReader:
    """One WebSocket's incoming bytes in, whole messages and control frames out.

    ``feed(data)``, then ``next_event()`` until it returns ``None``: a ``str``
    or ``bytes`` for a whole message, ``_PARTIAL`` for a fragment, or a
    wsproto ``Ping``, ``Pong`` or ``CloseConnection`` (wsproto reports a
    protocol violation as a ``CloseConnection`` with its code). Raises
    ``ProtocolError`` (close code 1009) for a message over
    ``max_message_bytes``, counted in bytes across fragments, where each
    frame of a fragmented message counts at least ``_MIN_FRAGMENT_BYTES``
    (so empty fragments cannot go on for ever). Whole small
    text frames are read without wsproto while it holds nothing (the fast
    path); everything else goes through wsproto. ``send(event)`` frames a
    control event (ping, pong, close).

    wsproto's connection (about 1.6 KiB) and its ``_FrameTracker`` are made
    when a frame needs them and let go once a batch of control frames (a
    pong) leaves them holding nothing, so an idle page, whose frames take the
    fast path, keeps neither (docs/performance.md "Where each byte goes"). A
    connection that reads a message through wsproto keeps them for good:
    making them costs about 2 us.

    ``client=True`` reads a server's frames, for ``PageConnection``, and
    ``send`` then frames a text or binary message itself (masked) while
    wsproto's state is open, as wsproto would.
    """

    __slots__ = (
        "_ws",
        "client",
        "max_bytes",
        "tracker",
        "ready",
        "at",
        "events",
        "parts",
        "size",
        "frame_start",
        "messages",
    )

    def __init__(self, max_message_bytes: int, *, client: bool = False) -> None:
        self._ws: wsproto.connection.Connection | None = None  # made by ``ws`` when a frame needs it
        self.client = client
        self.max_bytes = max_message_bytes
        self.tracker = _NO_FRAME  # its own with wsproto's connection
        self.ready: list[tuple[str, int]] | None = None  # messages of the fast path, from ``at``
        self.at = 0
        self.events: Iterator[wsproto.events.Event] | None = None  # wsproto's, while it may hold some
        self.parts: list[Any] | None = None  # a fragmented message's parts so far
        self.size = 0  # the message so far, as counted against max_bytes
        self.frame_start = 0  # ``size`` where the current frame began
        self.messages = False  # wsproto gave a message: keep its connection for good

    @property
    def ws(self) -> wsproto.connection.Connection:
        """wsproto's connection, made now if there is none: with none, it
        holds nothing, so a fresh one is the same."""
        ws = self._ws
        if ws is None:
            kind = wsproto.connection.ConnectionType.CLIENT if self.client else wsproto.connection.ConnectionType.SERVER
            ws = self._ws = wsproto.connection.Connection(kind)
            self.tracker = _FrameTracker()
        return ws

    @property
    def state(self) -> wsproto.connection.ConnectionState:
        """wsproto's state of the closing handshake (``OPEN`` while it has no connection)."""
        return wsproto.connection.ConnectionState.OPEN if self._ws is None else self._ws.state

    def feed(self, data: bytes) -> None:
        if self.ready is None and self.events is None and self.tracker.clean:
            messages = _read_text_frames(data, not self.client)
            if messages:
                self.ready, self.at = messages, 0
                return
        ws = self.ws
        self.tracker.feed(data)
        ws.receive_data(data)
        if self.events is None:
            self.events = ws.events()

    def next_event(self) -> str | bytes | _PartialMessage | wsproto.events.Event | None:
        ready = self.ready
        if ready is not None:
            text, size = ready[self.at]
            self.at += 1
            if self.at == len(ready):
                self.ready = None
            if size > self.max_bytes:
                raise ProtocolError(f"message larger than {self.max_bytes} bytes", 413, 1009)
            return text
        if self.events is None:
            return None
        try:
            event = next(self.events)
        except StopIteration:
            self.events = None
            if not self.messages and self.tracker.clean and self.state is wsproto.connection.ConnectionState.OPEN:
                self._ws, self.tracker = None, _NO_FRAME  # no frame, no message and no close held: let go
            return None
        if not isinstance(event, wsproto.events.Message):
            return event
        self.messages = True
        data = event.data
        size = self.size + (len(data) if not isinstance(data, str) or data.isascii() else len(data.encode()))
        # wsproto reports a frame in pieces as its bytes arrive: the minimum is
        # charged once the frame is whole, to every frame of a fragmented
        # message (one that is not finished, or did not begin with this frame).
        if event.frame_finished:
            if not event.message_finished or self.frame_start:
                size = max(size, self.frame_start + _MIN_FRAGMENT_BYTES)
            self.frame_start = size
        self.size = size
        if size > self.max_bytes:
            raise ProtocolError(f"message larger than {self.max_bytes} bytes", 413, 1009)
        if not event.message_finished:
            if self.parts is None:
                self.parts = []
            self.parts.append(data)
            return _PARTIAL
        if self.parts:
            self.parts.append(data)
            data = data[:0].join(self.parts)
        self.parts = None
        self.size = self.frame_start = 0
        return data  # type: ignore[no-any-return]

    def send(self, event: wsproto.events.Event) -> bytes:
        kind = type(event)
        if self.client:
            if (
                (kind is wsproto.events.TextMessage or kind is wsproto.events.BytesMessage)
                and event.message_finished  # type: ignore[attr-defined]
                and (self._ws is None or self._ws.state is wsproto.connection.ConnectionState.OPEN)
            ):
                if kind is wsproto.events.TextMessage:
                    return _ws_client_frame(event.data.encode("utf-8"))  # type: ignore[attr-defined]
                return _ws_client_frame(bytes(event.data), 0x2)  # type: ignore[attr-defined]
        elif self._ws is None and kind is wsproto.events.Ping:  # the keepalive: no connection for it
            return _ws_frame(bytes(event.payload), 0x9)  # type: ignore[attr-defined]
        return self.ws.send(event)


_PARTIAL: Final = _PartialMessage()


class _Request(typing.NamedTuple):
    """A request head that passed the head limits."""

    method: bytes
    target: bytes
    path: str  # percent-decoded
    query: str
    http_version: bytes
    headers: dict[bytes, bytes]  # lower-case name -> value (the last one)
    raw_headers: Sequence[tuple[bytes, bytes]]  # every header, lower-case names
    repeated: tuple[bytes, ...]  # names that came more than once
    has_body: bool


class _EndOfRequest:
    """``_HttpReader.next_event``: the request is whole."""


class _EndOfStream:
    """``_HttpReader.next_event``: the peer closed between requests."""


_END: Final = _EndOfRequest()
_EOF: Final = _EndOfStream()


# The reader's states. A request is read by the fast path unless the fast
# path hands it to h11 (``_IN_H11``), which then reads it to its end.
_IN_HEAD: Final = 0  # a request head is arriving
_IN_BODY: Final = 1  # the head was read; ``remaining`` body bytes follow
_IN_DONE: Final = 2  # the request is whole and the connection may carry another
_IN_LAST: Final = 3  # the request is whole and asked to close the connection
_IN_CLOSED: Final = 4  # the peer closed between requests
_IN_H11: Final = 5  # h11 reads this request
#: The request is whole and proposed another protocol (Upgrade): as h11, the
#: reader pauses; what follows is ``trailing`` (a WebSocket's first frames).
_IN_UPGRADE: Final = 6

_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
#: A header line the fast path takes: a token, a colon, optional spaces or
#: tabs, a value of visible ASCII with spaces inside, and CRLF. h11 takes
#: every such line and reads the same name and value out of it (the value
#: without the whitespace around it). A value starts and ends with a visible
#: character, so a line that does not match fails in time linear in its length.
#: Groups: the whole line (``findall`` skips what does not match: the lengths
#: of the lines found must add up to the head's), its name and its value.
_FIELD_VALUE: Final = rb"[\x21-\x7e](?:[ \x21-\x7e]*[\x21-\x7e])?"
_FAST_FIELD_RE: Final = re.compile(rb"((" + _TOKEN + rb"):[ \t]*(?:(" + _FIELD_VALUE + rb")[ \t]*)?\r\n)")
_FAST_REQUEST_LINE_RE: Final = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1\r\n")
#: The end of a head as h11 finds it: a bare LF ends a line too.
_H11_HEAD_END_RE: Final = re.compile(rb"\n\r?\n")


def _connection_tokens(value: bytes) -> list[bytes]:
    """The comma-separated tokens of a Connection header, lower-cased: h11
    closes after a message whose Connection has the token "close"."""
    return [token.strip() for token in value.lower().split(b",")]


class _HttpReader:
    """One connection's request bytes in, request events out.

    ``feed(data)`` (``b""`` for the end of the stream), then ``next_event()``
    until it returns ``None``: a ``_Request`` head, ``bytes`` of its body,
    ``_END`` once the request is whole, ``_EOF`` when the peer closed
    between requests. After the answer, ``next_cycle()`` starts the next
    request with the bytes the peer already pipelined. Head and body limits
    are counted as bytes arrive. Raises only ``ProtocolError``, whose text
    never quotes the request.

    Plain requests are read by a strict fast path (docs/decisions.md): an
    ``HTTP/1.1`` request line, header lines of a narrow grammar
    (``_FAST_FIELD_RE``), exactly one Host, at most one Content-Length of
    digits, no Transfer-Encoding or Expect, not CONNECT, and a body of that
    length; one that proposes another protocol (Upgrade: a WebSocket
    handshake) then pauses the reader, as h11 does. Any other request goes
    to h11 from its first byte (the fast path consumes nothing before it
    knows it takes the request),
    so its events, refusals, ``done`` and ``trailing`` are h11's; those of a
    fast one are the same as h11's would be. ``fast=False`` gives every
    request to h11 (the tests compare the two).
    """

    __slots__ = (
        "limits",
        "fast",
        "h11",
        "state",
        "buf",
        "closed",
        "scanned",
        "remaining",
        "keep_alive",
        "upgrade",
        "body_size",
        "request",
    )

    def __init__(self, limits: _Limits, fast: bool = True) -> None:
        self.limits = limits
        self.fast = fast
        self.h11: h11.Connection | None = None  # this request's parser, once it is h11's
        self.state = _IN_HEAD
        self.buf: bytes | bytearray = b""  # what the fast path has not read yet
        self.closed = False  # the peer closed (``feed(b"")``)
        self.scanned = 0  # a partial head has no CRLFCRLF before this offset of ``buf``
        self.remaining = 0  # body bytes still to come
        self.keep_alive = True  # the fast request did not say "Connection: close"
        self.upgrade = False  # the fast request proposed another protocol
        self.body_size = 0
        self.request: _Request | None = None  # this cycle's head, once parsed (also when refused)
        if not fast:
            self._give_to_h11()

    def feed(self, data: bytes) -> None:
        if self.h11 is not None:
            self.h11.receive_data(data)
        elif not data:
            self.closed = True
        elif not self.buf:
            self.buf = data
        else:
            if type(self.buf) is bytes:
                self.buf = bytearray(self.buf)
            self.buf += data

    def next_event(self) -> _Request | bytes | _EndOfRequest | _EndOfStream | None:
        state = self.state
        if state == _IN_HEAD:
            return self._fast_head()
        if state == _IN_BODY:
            return self._fast_body()
        if state == _IN_H11:
            return self._h11_event()
        if state == _IN_UPGRADE:
            return None
        # A fast request is whole: what h11 does after one. It waits for
        # next_cycle, takes the end of the stream, and refuses bytes after a
        # request that asked to close.
        if self.buf:
            if state == _IN_DONE:
                return None
            raise ProtocolError("bad request", 400)
        if self.closed:
            self.state = _IN_CLOSED
            return _EOF
        return None

    @property
    def done(self) -> bool:
        """The whole request was read: the connection may carry another."""
        if self.h11 is not None:
            return self.h11.their_state is h11.DONE
        return self.state == _IN_DONE

    @property
    def trailing(self) -> bytes:
        """Bytes the peer sent after the request (a WebSocket's first frames)."""
        if self.h11 is not None:
            return bytes(self.h11.trailing_data[0])
        return bytes(self.buf)

    def next_cycle(self) -> bool:
        """Start the next request; True if the peer already sent some of it, or closed."""
        if self.h11 is not None:
            pipelined, closed = self.h11.trailing_data
            self.h11 = None
        else:
            pipelined, closed = bytes(self.buf), self.closed
        self.state = _IN_HEAD
        self.buf = pipelined
        self.closed = closed
        self.scanned = 0
        self.body_size = 0
        self.request = None
        if not self.fast:
            self._give_to_h11()
        return bool(pipelined) or closed

    # -- the fast path ------------------------------------------------------------

    def _fast_head(self) -> _Request | bytes | _EndOfRequest | _EndOfStream | None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n", self.scanned)
        if end < 0:
            if not buf:
                if self.closed:
                    self.state = _IN_CLOSED
                    return _EOF
                return None
            # A partial head. h11 would decide now on a head that a bare LF
            # ends, an invalid first byte or the end of the stream: let it.
            # Otherwise both wait, and both refuse to wait past the limit.
            if self.closed or buf[0] < 0x21 or _H11_HEAD_END_RE.search(buf, max(0, self.scanned - 2)):
                return self._to_h11()
            if len(buf) > self.limits.max_head_bytes:
                raise ProtocolError("request head too large", 431)
            self.scanned = max(0, len(buf) - 3)
            return None
        if type(buf) is not bytes:
            buf = bytes(buf)
        line = _FAST_REQUEST_LINE_RE.match(buf, 0, end + 2)
        if line is None:
            return self._to_h11()
        method, target = line.group(1, 2)
        at = line.end()
        headers: dict[bytes, bytes] = {}
        raw = []
        repeated = []
        for whole, name, value in _FAST_FIELD_RE.findall(buf, at, end + 2):
            at += len(whole)
            name = name.lower()
            if name in headers:
                repeated.append(name)
            headers[name] = value
            raw.append((name, value))
        length = headers.get(b"content-length")
        if (
            at != end + 2  # a line the grammar does not take was skipped
            or b"host" not in headers
            or b"transfer-encoding" in headers
            or b"expect" in headers
            or method == b"CONNECT"
            or (
                repeated
                and (
                    b"host" in repeated
                    or b"content-length" in repeated
                    or b"connection" in repeated
                    or b"upgrade" in repeated
                )
            )
            or (length is not None and not (length.isdigit() and len(length) <= 18))
        ):
            return self._to_h11()
        connection = headers.get(b"connection")
        self.keep_alive = connection is None or b"close" not in _connection_tokens(connection)
        # h11's rule: an Upgrade header with a token proposes a switch.
        upgrade = headers.get(b"upgrade")
        self.upgrade = upgrade is not None and any(t.strip() for t in upgrade.split(b","))
        self.buf = buf[end + 4 :]
        self.remaining = int(length) if length is not None else 0
        self.state = _IN_BODY
        # The head's canonical size (_head_size) is at most its size here plus
        # a byte a line (": " where the line may have had ":"); only a head
        # near the limit is measured.
        size = end + 4 + len(raw)
        if size > self.limits.max_head_bytes:
            size = len(method) + len(target) + 14 + sum([len(name) + len(value) + 4 for name, value in raw])
        return self._checked(method, target, b"1.1", headers, raw, repeated, size, length, False)

    def _fast_body(self) -> bytes | _EndOfRequest | None:
        remaining = self.remaining
        if not remaining:
            self.state = _IN_UPGRADE if self.upgrade else _IN_DONE if self.keep_alive else _IN_LAST
            return _END
        buf = self.buf
        if buf:
            if len(buf) > remaining:
                data, self.buf = buf[:remaining], buf[remaining:]
            else:
                data, self.buf = buf, b""
            self.remaining = remaining - len(data)
            return data if type(data) is bytes else bytes(data)
        if self.closed:  # as h11: the stream ended inside the body
            raise ProtocolError("bad request", 400)
        return None

    def _to_h11(self) -> _Request | bytes | _EndOfRequest | _EndOfStream | None:
        """Give this request to h11, and return its first event."""
        self._give_to_h11()
        return self._h11_event()

    def _give_to_h11(self) -> None:
        """Give this request, from its first byte, to h11."""
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_bytes)
        self.state = _IN_H11
        if self.buf:
            self.h11.receive_data(bytes(self.buf))
            self.buf = b""
        if self.closed:
            self.h11.receive_data(b"")

    # -- h11 ----------------------------------------------------------------------

    def _h11_event(self) -> _Request | bytes | _EndOfRequest | _EndOfStream | None:
        assert self.h11 is not None
        try:
            event = self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            raise ProtocolError("request head too large" if status == 431 else "bad request", status) from None
        except ValueError:
            # h11 0.14 turns a Content-Length of more digits than int() takes
            # (4300) into a ValueError; later versions refuse it, as here.
            raise ProtocolError("bad request", 400) from None
        if event is h11.NEED_DATA or event is h11.PAUSED:  # PAUSED: until next_cycle
            return None
        event_type = type(event)
        if event_type is h11.Request:
            return self._head(event)  # type: ignore[arg-type]
        if event_type is h11.EndOfMessage:
            return _END
        if event_type is h11.Data:
            data = event.data  # type: ignore[union-attr]
            self.body_size += len(data)
            if self.body_size > self.limits.max_body_bytes:
                raise ProtocolError(f"body larger than {self.limits.max_body_bytes} bytes", 413)
            return bytes(data)
        return _EOF if event_type is h11.ConnectionClosed else None

    def _head(self, req: h11.Request) -> _Request:
        raw = req.headers.raw_items()  # a list: iterating h11's Headers costs a call per item
        headers: dict[bytes, bytes] = {}
        repeated = []
        for name, value in raw:
            name = name.lower()
            if name in headers:
                repeated.append(name)
            headers[name] = value
        chunked = b"transfer-encoding" in headers
        size = _head_size(req, raw)
        length = headers.get(b"content-length")
        return self._checked(
            req.method, req.target, req.http_version, headers, req.headers, repeated, size, length, chunked
        )

    def _checked(
        self,
        method: bytes,
        target: bytes,
        http_version: bytes,
        headers: dict[bytes, bytes],
        raw: Sequence[tuple[bytes, bytes]],
        repeated: list[bytes],
        size: int,
        length: bytes | None,
        chunked: bool,
    ) -> _Request:
        """The ``_Request`` of a parsed head, kept as ``self.request`` even
        when the head limits refuse it (``ProtocolError``)."""
        lim = self.limits
        text = target.decode("latin-1")
        raw_path, _, query = text.partition("?")
        self.request = request = _Request(  # by position: a third of the cost of keywords
            method,
            target,
            urllib.parse.unquote(raw_path) if "%" in raw_path else raw_path,
            query,
            http_version,
            headers,
            raw,
            tuple(repeated),
            chunked or (length is not None and int(length) > 0),
        )
        if len(raw) > lim.max_headers:
            raise ProtocolError(f"more than {lim.max_headers} header lines", 431)
        if repeated and b"host" in repeated:
            raise ProtocolError("more than one Host header", 400)
        if size > lim.max_head_bytes:
            raise ProtocolError(f"request head larger than {lim.max_head_bytes} bytes", 431)
        if length is not None and int(length) > lim.max_body_bytes:
            raise ProtocolError(f"body larger than {lim.max_body_bytes} bytes", 413)
        if length is not None and chunked:
            # RFC 9112 section 6.3: a request with both "ought to be handled as
            # an error"; answering and closing defeats request smuggling.
            raise ProtocolError("both Transfer-Encoding and Content-Length", 400)
        return request


def _head_size(req: h11.Request, headers: Sequence[tuple[bytes, bytes]]) -> int:
    """Bytes of a request head in canonical form: request line, header lines,
    blank line. h11 bounds only incomplete heads, so a whole head that arrives
    in one read is measured here."""
    size = len(req.method) + len(req.target) + 12  # spaces, "HTTP/1.1", CRLF
    for name, value in headers:
        size += len(name) + len(value) + 4
    return size + 2


def _http_head(
    status: int,
    content_type: bytes,
    length: int,
    extra: Iterable[tuple[bytes, bytes]] = (),
    *,
    keep_alive: bool = False,
) -> bytes:
    """A response head with Content-Length. h11 parses requests; responses
    are this one format, written here (a third of h11's cost per request was
    serializing them). Header values come from rally.py, never from a request."""
    return _http_response(status, b"", content_type, extra, keep_alive=keep_alive, length=length)


def _http_response(
    status: int,
    body: bytes,
    content_type: bytes = b"text/plain; charset=utf-8",
    extra: Iterable[tuple[bytes, bytes]] = (),
    *,
    keep_alive: bool = False,
    head: bool = False,
    length: int | None = None,
) -> bytes:
    """A complete response: head, and the body unless it answers a HEAD
    (``length`` for a head whose body follows apart)."""
    if status == 204 or status == 304:
        # RFC 9110 sections 8.6 and 15.4.5: neither has content, so no Content-Length (a
        # 304's could only repeat the 200's) and no Content-Type describing none.
        start = b"HTTP/1.1 %d %s\r\ndate: %s\r\n" % (status, _REASONS[status], _http_date())
    elif not extra and keep_alive and not head and length is None:  # an RPC's answer: one format
        return b"HTTP/1.1 %d %s\r\ndate: %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (
            status,
            _REASONS.get(status, b"Status"),
            _http_date(),
            content_type,
            len(body),
            body,
        )
    else:
        size = len(body) if length is None else length
        start = b"HTTP/1.1 %d %s\r\ndate: %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n" % (
            status,
            _REASONS.get(status, b"Status"),
            _http_date(),
            content_type,
            size,
        )
    out = [start, *[b"%s: %s\r\n" % (k, v) for k, v in extra]] if extra else [start]
    out.append(b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
    if not head:
        out.append(body)
    return b"".join(out)


_date_cache: list[Any] = [0, b""]
_DAYS: Final = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")
_MONTHS: Final = tuple(m.encode() for m in "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split())


def _http_date() -> bytes:
    """The Date header (RFC 9110 section 6.6.1), formatted once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, _imf_fixdate(now)]
    return _date_cache[1]  # type: ignore[no-any-return]


def _imf_fixdate(seconds: int) -> bytes:
    """``seconds`` since the epoch as an IMF-fixdate (RFC 9110 section 5.6.7)."""
    t = time.gmtime(seconds)
    return b"%s, %02d %s %d %02d:%02d:%02d GMT" % (
        _DAYS[t.tm_wday],
        t.tm_mday,
        _MONTHS[t.tm_mon - 1],
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )


def _parse_http_date(value: str) -> int | None:
    """An HTTP-date in any of its three formats (RFC 9110 section 5.6.7), as
    seconds since the epoch; None when it is not one."""
    import email.utils  # only conditional requests with a date pay for it

    parts = email.utils.parsedate_tz(value)
    if parts is None:
        return None
    try:
        return int(email.utils.mktime_tz(parts))
    except (OverflowError, ValueError):
        return None


_REASONS: Final = {
    200: b"OK",
    201: b"Created",
    204: b"No Content",
    206: b"Partial Content",
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    401: b"Unauthorized",
    410: b"Gone",
    304: b"Not Modified",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Content Too Large",
    416: b"Range Not Satisfiable",
    101: b"Switching Protocols",
    415: b"Unsupported Media Type",
    426: b"Upgrade Required",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
}

# Sessions: the cookie carries a random id and its HMAC, so the server
# accepts only ids it issued (docs/delivery.md "Sessions, topics and broadcast").

_SESSION_RE: Final = re.compile(r"(?:^|;)\s*rally_session=([0-9a-f]{32})\.([0-9a-f]{32})\s*(?:;|$)")


def _sign(secret: bytes, session_id: str) -> str:
    return hmac.new(secret, session_id.encode("ascii"), hashlib.sha256).hexdigest()[:32]


def _session_from_cookie(cookie: str | None, secret: bytes) -> str | None:
    """The session id of a Cookie header, if it carries one this secret signed."""
    if cookie is None:
        return None
    m = _SESSION_RE.search(cookie)
    if m is None or not hmac.compare_digest(m.group(2), _sign(secret, m.group(1))):
        return None
    return m.group(1)


def _new_session_id() -> str:
    """128 random bits, as 32 hex characters (``secrets.token_hex(16)``
    without its two wrapper calls: an RPC without a cookie makes one)."""
    return os.urandom(16).hex()


def _session_cookie(session_id: str, secret: bytes, secure: bool) -> bytes:
    flags = "; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")
    return f"{_SESSION_COOKIE}={session_id}.{_sign(secret, session_id)}{flags}".encode("ascii")


def _origin_allowed(origin: str | None, host: str | None, allowed: frozenset[str]) -> bool:
    """A missing Origin is a non-browser client and allowed; ``null`` never is."""
    if origin is None:
        return True
    if origin in allowed:
        return True
    if origin == "null" or host is None:
        return False
    parsed = urllib.parse.urlsplit(origin)
    return parsed.scheme in ("http", "https") and parsed.netloc.lower() == host.lower() and not parsed.path


_LOOPBACK_HOSTS: Final = frozenset(("localhost", "127.0.0.1", "[::1]"))


def _host_name(host: str) -> str:
    """The name of a Host header without its port, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rpartition(":")[0] if ":" in host else host


def _host_allowed(host: str | None, allowed: frozenset[str]) -> bool:
    return "*" in allowed or (host is not None and _host_name(host) in allowed)


def _is_loopback(address: str) -> bool:
    import ipaddress  # only a listener's address needs it

    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return address == "localhost"


def _html_boot(html: str, boot: dict[str, Any]) -> str:
    """Inject boot data and the client script into a page's HTML."""
    data = json.dumps(boot).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    tags = f'<script id="rally-boot" type="application/json">{data}</script><script src="/_rally/client.js"></script>'
    lower = html.lower()
    at = lower.find("</head>")
    if at < 0:
        at = lower.find("<body")
        if at >= 0:
            at = html.find(">", at) + 1
    if at < 0:
        return tags + html
    return html[:at] + tags + html[at:]


# ==== Dispatch: handler table, pages, topics, effects (no sockets) ==========


def _pack_headers(lines: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Header lines as one bytes object, ``name:value`` lines joined by a
    newline: what a WebSocket's ``ServerContext`` keeps of its handshake
    (docs/performance.md "Where each byte goes"). h11 lets no newline into a
    name or value, nor a colon into a name, so ``_unpack_headers`` gives the
    lines back as they were."""
    return b"\n".join([name + b":" + value for name, value in lines])


def _unpack_headers(packed: bytes) -> list[tuple[bytes, bytes]]:
    """The header lines ``_pack_headers`` packed, in their order."""
    if not packed:
        return []
    return [(name, value) for name, _, value in (line.partition(b":") for line in packed.split(b"\n"))]


class ServerContext:
    """What a handler knows of its request.

    ``session_id`` (the ``rally_session`` cookie), ``page`` (the concrete
    path, e.g. ``/articles/hello``, or ``None`` for an HTTP RPC that names no
    page), ``params`` (typed route parameters), ``headers`` (lower-case names),
    ``client`` (``(host, port)``), ``connection_id`` (``None`` for HTTP;
    unique across the processes of an app) and ``state`` (the object given
    as ``rally.App(state=...)``).
    """

    __slots__ = (
        "session_id",
        "page",
        "params",
        "client",
        "connection_id",
        "state",
        "_raw_headers",
        "_headers",
        "_registry",
    )

    def __init__(
        self,
        session_id: str,
        page: str | None,
        params: dict[str, Any],
        raw_headers: Sequence[tuple[bytes, bytes]] | bytes,
        client: tuple[str, int] | None,
        connection_id: int | None,
        registry: _Registry,
    ) -> None:
        """``raw_headers``: the request's header lines, or for a context that
        lives as long as a WebSocket the same packed by ``_pack_headers``
        (one bytes object instead of a tuple and two bytes objects a line)."""
        self.session_id = session_id
        self.page = page
        self.params = params
        self.client = client
        self.connection_id = connection_id
        self.state = registry.state
        self._raw_headers = raw_headers
        self._headers: dict[str, str] | None = None
        self._registry = registry

    def presence(self, page: str | None = None) -> list[Presence]:
        """Who is on this page now, in every process of the app, or on the
        concrete page ``page`` (as ``app.presence(page)``); ``[]`` for a
        request of no page."""
        page = page or self.page
        return self._registry.presence_of(page) if page else []

    @property
    def headers(self) -> dict[str, str]:
        """Request headers by lower-case name; repeated headers joined by ", "."""
        if self._headers is None:
            raw = self._raw_headers
            lines = _unpack_headers(raw) if isinstance(raw, bytes) else raw
            out: dict[str, str] = {}
            for k, v in lines:
                name, value = k.decode("latin-1"), v.decode("latin-1")
                out[name] = out[name] + ", " + value if name in out else value
            self._headers = out
        return self._headers

    def __repr__(self) -> str:
        return f"ServerContext(session_id=..., page={self.page!r}, connection_id={self.connection_id!r})"


class _Peer(typing.Protocol):
    """What a page or raw session needs of its connection: the whole
    interface between dispatch and the transport."""

    def write_frame(self, frame: bytes) -> None:
        """Queue one frame for the peer (dropped once the connection closes)."""

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake with ``code``."""

    def pause(self) -> None:
        """Stop reading the peer: the session has as much work as it may hold."""

    def resume(self) -> None:
        """Read the peer again."""

    async def writable(self) -> None:
        """Return once the peer takes bytes again; raise ``ConnectionClosed``
        if the connection is gone."""

    def abandon(self) -> None:
        """Drop the connection without ending its session, which went on
        over a newer connection of the same page (a resume)."""


_Reply = tuple[int, bytes]


class _Handler(typing.NamedTuple):
    """One RPC handler of the table, its codecs built at registration."""

    name: str  # the message type name: the key of the table
    fn: Callable[..., Any]
    is_async: bool
    wants_context: bool
    decode: _Decoder  # the message's fields object -> dataclass
    ok: _Codec  # of T in Result[T, E]
    err: _Codec | None  # of E; None: the handler returns a plain T
    qualname: str


class _Route(typing.NamedTuple):
    """A page path pattern such as ``/articles/{id}``."""

    pattern: str
    regex: re.Pattern[str]
    converters: dict[str, Callable[[str], Any]]

    def match(self, path: str) -> dict[str, Any] | None:
        m = self.regex.fullmatch(path)
        if m is None:
            return None
        try:
            return {k: self.converters[k](v) for k, v in m.groupdict().items()}
        except ValueError:
            return None


_PARAM_RE: Final = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)}")


def _route_regex(pattern: str) -> re.Pattern[str]:
    """The regex of a route pattern such as ``/rooms/{name}``: each parameter one path segment."""
    return re.compile(
        "".join(f"(?P<{part}>[^/]+)" if i % 2 else re.escape(part) for i, part in enumerate(_PARAM_RE.split(pattern)))
    )


def _convert_int(s: str) -> int:
    if not re.fullmatch(r"-?[0-9]{1,16}", s):
        raise ValueError(s)
    return int(s)


def _convert_float(s: str) -> float:
    """A decimal number: no ``nan``, ``inf``, ``1_0`` or values that overflow."""
    if not _FLOAT_RE.fullmatch(s):
        raise ValueError(s)
    value = float(s)
    if not math.isfinite(value):
        raise ValueError(s)
    return value


_FLOAT_RE: Final = re.compile(r"-?[0-9]{1,32}(?:\.[0-9]{1,32})?(?:[eE][-+]?[0-9]{1,3})?")
_PARAM_CONVERTERS: Final[dict[Any, Callable[[str], Any]]] = {str: str, int: _convert_int, float: _convert_float}


class _Page(typing.NamedTuple):
    """A page: its route, HTML, and the stateful handlers if any."""

    route: _Route
    name: str
    html: str | None
    view: Callable[..., Any] | None
    view_wants_context: str | None
    init: Callable[..., Any] | None
    init_wants_context: str | None
    update: Callable[..., Any] | None
    update_is_async: bool
    update_wants_context: bool
    to_server: _Codec | None
    to_server_names: frozenset[str]
    to_client: _Codec | None
    to_client_types: tuple[type, ...]
    push_types: frozenset[type]  # to_client_types, for a lookup per recipient
    terminate: Callable[..., Any] | None
    terminate_is_async: bool
    terminate_wants_context: bool
    presence: Callable[..., Any] | None
    presence_wants_context: bool
    presence_codec: _Codec | None
    event: Callable[..., Any] | None = None
    event_is_async: bool = False
    event_wants_context: bool = False
    event_types: frozenset[type] = frozenset()  # server events the model takes, PresenceChanged included
    event_codec: _Codec | None = None  # of the events that are dataclasses, for the contract
    doc: str | None = None  # the page class's (or module's) docstring

    def hook_docs(self) -> dict[str, str]:
        """The docstrings of the page's hooks and view that have one, for the contract."""
        hooks = {
            "view": self.view,
            "server_init": self.init,
            "server_update": self.update,
            "server_event": self.event,
            "server_presence": self.presence,
            "server_terminate": self.terminate,
        }
        return {name: doc for name, fn in hooks.items() if fn is not None and (doc := _doc(fn)) is not None}

    @property
    def stateful(self) -> bool:
        return self.update is not None


class _RawRoute(typing.NamedTuple):
    path: str
    handler: Callable[[WebSocket], Awaitable[None]]
    subprotocols: tuple[str, ...] = ()  # the server's, in its order


def _check_no_self(fn: Callable[..., Any], where: str, kind: str, plain: str) -> None:
    """Refuse a method: a function whose first parameter is ``self``."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return
    if params and params[0] == "self":
        name = getattr(fn, "__name__", "f")
        raise RegistrationError(
            f"{where}: {kind} take no self: write def {name}({', '.join(params[1:])}) as {plain} "
            "(or mark it @staticmethod); rally never makes an instance to pass as self"
        )


def _quiet_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """``fn``'s resolved annotations, or none if they do not resolve."""
    try:
        return typing.get_type_hints(fn)
    except Exception:
        return {}


def _dataclasses_in(annotations: Iterable[Any]) -> set[type]:
    """The dataclasses named anywhere in ``annotations`` (inside unions, tuples, Effect[...])."""
    found: set[type] = set()
    todo = list(annotations)
    while todo:
        tp = todo.pop()
        if _is_dataclass_type(tp):
            found.add(tp)
        todo.extend(typing.get_args(tp))
    return found


def _context_param(fn: Callable[..., Any], hints: dict[str, Any]) -> str | None:
    """The name of the parameter that takes the ServerContext, if any."""
    for name in inspect.signature(fn).parameters:
        if hints.get(name) is ServerContext or (name == "server_context" and name not in hints):
            return name
    return None


class Presence(_Value):
    """One connection on a page, as presence reports it: ``id`` (its
    connection id, unique across the processes of an app), ``tag`` (opaque,
    the same for every connection of one browser session, never the session
    id) and ``meta`` (what the page's ``server_presence`` returned). On the
    server it also carries ``session_id``, the browser session behind it
    (for ``app.close_session``), which browsers never see; it takes no part
    in equality or ``repr``."""

    __slots__ = ("id", "tag", "meta", "session_id")
    __match_args__ = ("id", "tag", "meta")

    def __init__(self, id: int, tag: str, meta: Any, session_id: str = "") -> None:  # noqa: A002 - the wire's name
        self.id = id
        self.tag = tag
        self.meta = meta
        self.session_id = session_id


class PresenceChanged(_Value):
    """A server event (``server_event``) telling a page's model that the
    presence of ``page`` (its own, or one it watches with
    ``rally.effect.watch_presence``) changed: who joined, changed their meta,
    or left, each a ``rally.Presence``; one per page and turn of the event
    loop. Never sent to a browser."""

    __slots__ = ("page", "joins", "updates", "leaves")
    __match_args__ = ("page", "joins", "updates", "leaves")

    def __init__(self, page: str, joins: list[Presence], updates: list[Presence], leaves: list[Presence]) -> None:
        self.page = page
        self.joins = joins
        self.updates = updates
        self.leaves = leaves


_EMPTY: Final[list[Any]] = []


class _Broker(typing.Protocol):
    """What dispatch and the server ask of a broker that carries an app's
    broadcasts to its other processes (``RedisBroker``, docs/scaling.md "Scaling
    out"): the whole interface between them. The broker calls back only
    the registry's public methods and ``_Topics.publish``/``close``."""

    def bind(self, app: App) -> None:
        """Serve ``app`` (one broker per App)."""

    async def start(self) -> None:
        """Connect, once per App however many servers run it."""

    async def stop(self) -> None:
        """Send what waits, say goodbye, disconnect."""

    def publish(self, topic: str, frame: bytes, msg_type: type) -> None:
        """Deliver a push to ``topic``'s members in the other processes."""

    def close(self, target: str, reason: str) -> None:
        """Close with 4001 and ``reason`` the connections of ``target`` (a
        session's topic, or ``connection:<id>``) in the other processes."""

    def release(self, token: str, session_id: str) -> None:
        """A page held elsewhere for resume ``token`` came back here: end it there."""

    def presence(self, path: str, upserts: list[list[Any]], leaves: list[int]) -> None:
        """Tell the other processes of this one's presence joins, updates and leaves on ``path``."""

    def health(self) -> dict[str, Any]:
        """The report of ``GET /_rally/health``."""


#: An effect's delivery, checked and encoded: (scope, target, frame, push type, message).
_Op = tuple[str, str | None, bytes, type | None, Any]


class _PresenceEntry(typing.NamedTuple):
    """One connection in a page's presence list."""

    tag: str  # the session's opaque tag
    meta: Any  # the meta as a JSON value, as it goes on the wire
    value: Any  # the meta as server_presence returned it (decoded, for another process's)
    origin: str  # "" for this process's own connections, else the broker's process id
    session_id: str  # the browser session behind it: server-side only

    def presence(self, cid: int) -> Presence:
        return Presence(cid, self.tag, self.value, self.session_id)


class _PresenceTable:
    """Every process's presence entries by page path and connection id
    (docs/api.md "Presence"), and the frames that tell of them; pure: no
    sockets, no sessions, no loop.

    Own entries change by ``put`` and ``drop``; another process's by
    ``merge`` (its diff for one page) and ``replace`` (its whole list, or
    ``{}`` when it has gone), which return the diff frame for the page's
    listed connections, encoded once. A page holds at most
    ``max_entries`` entries and a meta at most ``max_meta_bytes`` encoded:
    ``refusal`` says why a new one does not fit, and ``merge`` leaves such
    entries of another process out, so that a page's whole list always
    fits one frame a joiner can take.

    With ``track`` on (a page takes ``rally.PresenceChanged``), every
    change is also noted in ``changes`` as ``rally.Presence`` values,
    coalesced per page until ``take_changes``: a join then a leave in the
    same turn cancel out, an update of a join is that join."""

    __slots__ = ("pages", "max_entries", "max_meta_bytes", "misfits", "track", "changes")

    def __init__(self, max_entries: int, max_meta_bytes: int) -> None:
        self.pages: dict[str, dict[int, _PresenceEntry]] = {}
        self.max_entries = max_entries
        self.max_meta_bytes = max_meta_bytes
        self.misfits: set[str] = set()  # processes whose entries did not fit here: said once each
        self.track = False
        #: page path -> (joins, updates, leaves), each connection id -> its entry
        self.changes: dict[str, tuple[dict[int, Presence], dict[int, Presence], dict[int, Presence]]] = {}

    def of(self, path: str) -> list[Presence]:
        """The entries of the concrete page ``path``, of every process."""
        return [e.presence(cid) for cid, e in self.pages.get(path, {}).items()]

    def _note(self, path: str, cid: int, kind: int, e: _PresenceEntry) -> None:
        """Note a join (0), update (1) or leave (2) of ``cid`` on ``path``."""
        joins, updates, leaves = self.changes.setdefault(path, ({}, {}, {}))
        if kind == 1 and cid in joins:
            joins[cid] = e.presence(cid)
        elif kind == 2 and cid in joins:
            del joins[cid]
            updates.pop(cid, None)
        else:
            if kind == 2:
                updates.pop(cid, None)
            (joins, updates, leaves)[kind][cid] = e.presence(cid)
        if not (joins or updates or leaves):
            del self.changes[path]

    def take_changes(self) -> list[PresenceChanged]:
        """The changes noted since the last call, one event per page."""
        changes, self.changes = self.changes, {}
        return [
            PresenceChanged(path, list(j.values()), list(u.values()), list(gone.values()))
            for path, (j, u, gone) in changes.items()
        ]

    def own(self) -> dict[str, list[list[Any]]]:
        """This process's own entries, ``{path: [[id, tag, meta], ...]}``:
        the snapshot its broker sends the others."""
        out: dict[str, list[list[Any]]] = {}
        for path, entries in self.pages.items():
            own = [[cid, e.tag, e.meta, e.session_id] for cid, e in entries.items() if not e.origin]
            if own:
                out[path] = own
        return out

    def refusal(self, path: str, cid: int, meta: Any) -> str | None:
        """Why connection ``cid`` cannot be listed on ``path`` with ``meta``, if it cannot."""
        size = len(_dumps(meta))
        if size > self.max_meta_bytes:
            return f"its meta is {size} bytes encoded, more than max_presence_meta_bytes={self.max_meta_bytes}"
        entries = self.pages.get(path)
        if entries is not None and cid not in entries and len(entries) >= self.max_entries:
            return f"the page lists {len(entries)} connections already (max_presence_entries={self.max_entries})"
        return None

    def put(self, path: str, cid: int, tag: str, meta: Any, value: Any, session_id: str = "") -> None:
        """List or update this process's connection ``cid`` (``refusal`` said yes)."""
        entries = self.pages.setdefault(path, {})
        joining = cid not in entries
        entries[cid] = e = _PresenceEntry(tag, meta, value, "", session_id)
        if self.track:
            self._note(path, cid, 0 if joining else 1, e)

    def drop(self, path: str, cid: int) -> bool:
        """Unlist this process's connection ``cid``; whether it was listed."""
        entries = self.pages.get(path)
        e = entries.pop(cid, None) if entries is not None else None
        if e is None:
            return False
        if not entries:
            del self.pages[path]
        if self.track:
            self._note(path, cid, 2, e)
        return True

    def listed(self, path: str, cid: int) -> bool:
        return cid in self.pages.get(path, ())

    @staticmethod
    def entry(cid: int, e: _PresenceEntry, me: bool = False) -> dict[str, Any]:
        return {"id": cid, "tag": e.tag, "self": me, "meta": e.meta}

    @staticmethod
    def diff(joins: list[Any] = _EMPTY, updates: list[Any] = _EMPTY, leaves: list[Any] = _EMPTY) -> bytes:
        """A presence diff, encoded once for every connection on the page."""
        return _dumps({"kind": "presence", "joins": joins, "updates": updates, "leaves": leaves})

    def states(self, path: str, cids: list[int]) -> list[bytes]:
        """The whole list of ``path`` for each of this process's connections
        ``cids``, its own entry with ``"self": true``; for several, every
        entry is encoded once for all of them."""
        entries = self.pages.get(path, {})
        if len(cids) == 1:  # one encoding of the list, in C
            me = cids[0]
            return [_dumps({"kind": "presence", "state": [self.entry(i, e, i == me) for i, e in entries.items()]})]
        ids = list(entries)
        parts = [_dumps(self.entry(i, e)) for i, e in entries.items()]
        at = {i: n for n, i in enumerate(ids)}
        out = []
        for cid in cids:
            n = at[cid]
            own = _dumps(self.entry(cid, entries[cid], True))
            out.append(b'{"kind":"presence","state":[' + b",".join([*parts[:n], own, *parts[n + 1 :]]) + b"]}")
        return out

    def merge(self, origin: str, path: Any, upserts: Any, leaves: Any, codec: _Codec | None) -> bytes | None:
        """Apply process ``origin``'s diff for page ``path``: ``upserts``
        (``[[id, tag, meta], ...]``) join or update, ``leaves`` (ids) leave;
        ``codec`` is the page's meta codec here (``None``: no such page
        here, nothing to keep). An entry of another origin is never touched;
        an item that is not what rally.py sends is skipped. Returns the diff
        frame for the page's connections, or ``None`` if nothing changed."""
        if type(path) is not str or type(upserts) is not list or type(leaves) is not list or codec is None:
            return None
        entries = self.pages.setdefault(path, {})
        joins: list[Any] = []
        updates: list[Any] = []
        gone: list[int] = []
        for item in upserts:
            if type(item) is not list or len(item) not in (3, 4):
                continue
            cid, tag, meta, session_id = item if len(item) == 4 else (*item, "")
            if type(session_id) is not str:
                continue
            if type(cid) is not int or not 0 < cid <= _MAX_SAFE_INT or type(tag) is not str:
                continue
            old = entries.get(cid)
            if old is not None and (old.origin != origin or (old.tag, old.meta) == (tag, meta)):
                continue
            problem = self.refusal(path, cid, meta)
            try:
                if problem is not None:
                    raise _Bad(problem)
                value = codec.decode(meta)
            except _Bad as bad:
                if origin not in self.misfits:  # once per process: every change of it would say the same
                    self.misfits.add(origin)
                    _logger.warning(
                        "presence of page %s from process %s does not fit %s here: %s (said once for that "
                        "process; its entries that do not fit are left out)",
                        path,
                        origin,
                        "its type" if problem is None else "the limits",
                        bad.message,
                    )
                continue
            entries[cid] = e = _PresenceEntry(tag, meta, value, origin, session_id)
            (joins if old is None else updates).append(self.entry(cid, e))
            if self.track:
                self._note(path, cid, 0 if old is None else 1, e)
        for cid in leaves:
            old = entries.get(cid) if type(cid) is int else None
            if old is not None and old.origin == origin:
                del entries[cid]
                gone.append(cid)
                if self.track:
                    self._note(path, cid, 2, old)
        if not entries:
            del self.pages[path]
        return self.diff(joins, updates, gone) if joins or updates or gone else None

    def replace(self, origin: str, pages: Any, codec_of: Callable[[str], _Codec | None]) -> list[tuple[str, bytes]]:
        """Process ``origin``'s entries are now exactly ``pages`` (as ``own``
        makes them; ``{}`` when it has gone); returns each changed page's
        diff frame."""
        if type(pages) is not dict:
            return []
        if not pages:  # it has gone, or holds nothing: a later misfit of it is said again
            self.misfits.discard(origin)
        known = {path for path, entries in self.pages.items() if any(e.origin == origin for e in entries.values())}
        out = []
        for path in known | pages.keys():
            upserts = pages.get(path)
            if type(upserts) is not list:
                upserts = []
            listed = {item[0] for item in upserts if type(item) is list and item and type(item[0]) is int}
            entries = self.pages.get(path, {})
            leaves = [cid for cid, e in entries.items() if e.origin == origin and cid not in listed]
            if type(path) is str:
                frame = self.merge(origin, path, upserts, leaves, codec_of(path))
                if frame is not None:
                    out.append((path, frame))
        return out


class _Topics:
    """Topic name -> the page sessions in it (docs/delivery.md "Sessions, topics and broadcast"), and the
    presence joins of this turn of the event loop.

    ``members`` holds only non-empty sets, so an app with no connections
    holds no topics; an ended session is never let in. ``broadcast`` is
    ``publish`` here plus one message to the other processes when the app
    has a broker (docs/scaling.md "Scaling out"); the broker's listener calls
    ``publish`` for what the others send.

    Presence joins wait in ``joining`` until the end of the event loop's
    turn, or until anything else is published first: then the connections
    already listed on the page get one ``joins`` diff for all of that
    page's joiners still listed, and each joiner still connected its whole
    list. A burst of N joins to a page costs a few diffs to each connection
    there, not N."""

    __slots__ = ("members", "broker", "joining", "presence", "events", "decode", "watchers", "changes_due")

    def __init__(self, presence: _PresenceTable, events: set[type], decode: Callable[[bytes, type], Any]) -> None:
        #: topic -> its sessions. A topic of one session (a browser session's
        #: own topic, with one tab open) is a 1-tuple, 56 bytes where a set
        #: is 216 (docs/performance.md "Where each byte goes"); a second
        #: member makes it a set.
        self.members: dict[str, set[_PageSession] | tuple[_PageSession]] = {}
        self.broker: _Broker | None = None
        self.joining: dict[str, list[_PageSession]] = {}  # page path -> sessions to list and announce
        self.presence = presence
        self.events = events  # every page's server event types
        self.decode = decode  # a push frame from another process -> its message
        #: watched page path or route pattern -> (its regex, or None for a path; the sessions watching)
        self.watchers: dict[str, tuple[re.Pattern[str] | None, set[_PageSession]]] = {}
        self.changes_due = False

    def join(self, session: _PageSession, topics: Iterable[str]) -> None:
        if session.state is _PageState.ENDED:
            return
        for t in topics:
            members = self.members.get(t)
            if members is None:
                self.members[t] = (session,)
            elif isinstance(members, tuple):
                if members[0] is not session:
                    self.members[t] = {members[0], session}
            else:
                members.add(session)

    def leave(self, session: _PageSession, topics: Iterable[str]) -> None:
        for t in topics:
            members = self.members.get(t)
            if members is None:
                continue
            if isinstance(members, tuple):
                if members[0] is session:
                    del self.members[t]
            else:
                members.discard(session)
                if not members:
                    del self.members[t]

    def sessions(self, topic: str) -> tuple[_PageSession, ...]:
        return tuple(self.members.get(topic, ()))

    def publish(
        self,
        topic: str,
        frame: bytes,
        msg_type: type | None = None,
        skip: _PageSession | None = None,
        msg: Any = None,
    ) -> int:
        """Give one encoded frame to every member of a topic whose page
        declares ``msg_type``, but ``skip``, and the message (``msg``, or
        decoded from ``frame`` once) to the ``server_event`` of every member
        whose page takes it; returns the count of members reached either
        way. A presence frame (``msg_type`` None) reaches only members that
        were sent their presence ``state``: one still in ``server_init``
        gets the state when it ends, which holds what the diffs meanwhile
        said."""
        if self.joining:  # announced first: they came before this frame
            self.flush_joins()
        members = self.members.get(topic)
        if not members:
            return 0
        n = 0
        framed, tail = _ws_frame(frame), frame[1:]
        if msg_type not in self.events:  # the hot path: pushes and presence frames only
            for session in tuple(members):
                if (
                    msg_type in session.page.push_types if msg_type is not None else session.listed
                ) and session is not skip:
                    session.push(frame, framed, tail, msg_type is not None)
                    n += 1
            return n
        assert msg_type is not None
        for session in tuple(members):
            page = session.page
            pushed = msg_type in page.push_types
            if pushed:
                session.push(frame, framed, tail)
            if msg_type in page.event_types:
                if msg is None:
                    msg = self.decode(frame, msg_type)
                    if msg is None:  # another version of the app sent it: logged
                        return n
                session.event(msg)
            elif not pushed:
                continue
            n += 1
        return n

    def presence_changed(self) -> None:
        """The presence table noted changes: deliver them as
        ``rally.PresenceChanged`` at the end of this turn of the event loop."""
        if self.presence.changes and not self.changes_due:
            self.changes_due = True
            asyncio.get_running_loop().call_soon(self.flush_changes)

    def flush_changes(self) -> None:
        """One ``rally.PresenceChanged`` per changed page to the
        ``server_event`` of each connection on that page that takes it, and
        of each connection watching the page or a pattern matching it."""
        self.changes_due = False
        for change in self.presence.take_changes():
            path = change.page
            to = {s for s in self.members.get(f"page:{path}", ()) if PresenceChanged in s.page.event_types}
            for regex, sessions in self.watchers.values():
                if regex is None or regex.fullmatch(path):
                    to.update(sessions)
            for session in to:
                session.event(change)

    def watch(self, session: _PageSession, page: str) -> None:
        if session.state is _PageState.ENDED:
            return
        found = self.watchers.get(page)
        if found is None:
            regex = _route_regex(page) if _PARAM_RE.search(page) else None
            found = self.watchers[page] = (regex, set())
        found[1].add(session)

    def unwatch(self, session: _PageSession, pages: Iterable[str]) -> None:
        for page in pages:
            found = self.watchers.get(page)
            if found is not None:
                found[1].discard(session)
                if not found[1]:
                    del self.watchers[page]

    def join_presence(self, path: str, session: _PageSession) -> None:
        """``session`` was listed on page ``path``: announce it and send it
        the list with the others listed there in this turn of the event loop."""
        if not self.joining:
            asyncio.get_running_loop().call_soon(self.flush_joins)
        self.joining.setdefault(path, []).append(session)

    def flush_joins(self) -> None:
        """Tell each page's listed connections of its joiners in one diff,
        then send each joiner still there its whole list."""
        joining, self.joining = self.joining, {}
        table = self.presence
        for path, sessions in joining.items():
            entries = table.pages.get(path, {})
            here = [s for s in sessions if s.state is not _PageState.ENDED and s.cid in entries]
            if not here:
                continue
            cids = [s.cid for s in here]
            self.publish(f"page:{path}", table.diff(joins=[table.entry(c, entries[c]) for c in cids]))
            for session, state in zip(here, table.states(path, cids), strict=True):
                session.listed = True
                session.tell(state)

    def broadcast(self, topic: str, frame: bytes, msg_type: type, msg: Any = None) -> int:
        """``publish`` a push or server event here and, with a broker, in
        every other process (its PUBLISH leaves first, so they deliver while
        this one does); returns the count of this process's connections
        reached."""
        if self.broker is not None:
            self.broker.publish(topic, frame, msg_type)
        return self.publish(topic, frame, msg_type, msg=msg)

    def close(self, target: str, reason: str = "") -> int:
        """Close with 4001 and ``reason`` every connection of ``target``, a
        session's topic or ``connection:<id>``; returns the count."""
        if target.startswith("connection:"):
            cid = target[11:]
            members: tuple[_PageSession, ...] = tuple(s for s in self.members.get("app", ()) if str(s.cid) == cid)
        else:
            members = self.sessions(target)
        for session in members:
            session.close(CLOSE_SESSION_CLOSED, reason)
        return len(members)


def _cancelling() -> bool:
    """Whether the running task is being cancelled, as opposed to having
    caught a CancelledError that something it awaited raised of itself (a
    handler). Before Python 3.11 tasks cannot tell: assume cancelled."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


class _Kept:
    """One idempotency key's call: its first id, a digest of its message,
    and its reply once known (``future`` resolves to it for those waiting)."""

    __slots__ = ("first_id", "digest", "reply", "future", "expiry")

    def __init__(self, first_id: Any, digest: bytes) -> None:
        self.first_id = first_id
        self.digest = digest
        self.reply: _Reply | None = None
        self.future: asyncio.Future[_Reply] | None = None
        self.expiry = math.inf  # running: kept until it answers


class _Shelf:
    """One session's kept calls, oldest first (a call moves to the end when
    it answers), and the bytes of their replies."""

    __slots__ = ("calls", "size", "done")

    def __init__(self) -> None:
        self.calls: dict[str, _Kept] = {}
        self.size = 0
        self.done = 0  # calls that have answered (the rest are running)


class _Answers:
    """RPC answers by session and idempotency key (docs/delivery.md, "Delivery across
    reconnects"): a call retried over HTTP or after a reconnect within
    ``window`` seconds of the first call's answer gets that answer, and the
    handler runs once.

    The first call of a key runs in a task of this store, not of the
    connection or page that made it: every caller of the key (the first
    and each retry) waits on the call's future, which is always resolved
    with a reply, whatever happens to the connections. The store owns its
    tasks (``tasks``) because they belong to no connection and to no one
    ``Server``; ``Server.close`` waits for them and cancels them with its
    own. They are bounded with the answers: a running call is a kept
    answer, never evicted.

    Bounds: at most ``session_count`` calls and ``session_bytes`` bytes of
    replies per session; past either, that session's oldest answers go
    (never a running call: a session whose calls all run is answered
    ``busy``). At most ``total_count`` calls and ``total_bytes`` in all;
    past either, the oldest answers of the session holding the most (calls,
    or bytes) go first. A reply larger than ``session_bytes`` reaches its
    callers and is not kept."""

    __slots__ = (
        "window",
        "session_count",
        "session_bytes",
        "total_count",
        "total_bytes",
        "shelves",
        "count",
        "size",
        "tasks",
    )

    def __init__(
        self,
        window: float,
        *,
        session_count: int = _MAX_SESSION_ANSWERS,
        session_bytes: int = _MAX_SESSION_ANSWER_BYTES,
        total_count: int = _MAX_ANSWERS,
        total_bytes: int = _MAX_ANSWER_BYTES,
    ) -> None:
        self.window = window
        self.session_count = session_count
        self.session_bytes = session_bytes
        self.total_count = total_count
        self.total_bytes = total_bytes
        #: session id -> its calls; the session touched last is last
        self.shelves: dict[str, _Shelf] = {}
        self.count = 0  # calls kept, running or answered
        self.size = 0  # bytes of the answered ones
        self.tasks: set[asyncio.Task[_Reply]] = set()

    def answer(
        self,
        session: str,
        key: str,
        msg_id: Any,
        msg: dict[str, Any],
        run: Callable[[], _Reply | Awaitable[_Reply]],
    ) -> _Reply | Awaitable[_Reply]:
        """The reply to one keyed call: the kept one (with this call's id),
        a wait for the running one, ``key_reused`` for another message under
        a kept key, ``busy`` when nothing can make room, or ``run()``'s,
        kept."""
        now = time.monotonic()
        self._sweep(now)
        digest = hashlib.blake2b(
            json.dumps(msg, sort_keys=True, separators=(",", ":")).encode(), digest_size=16
        ).digest()
        shelf = self.shelves.get(session)
        if shelf is not None:
            kept = shelf.calls.get(key)
            if kept is not None and kept.expiry < now:
                self._forget(shelf, key)
                kept = None
            if kept is not None:
                if kept.digest != digest:
                    errors = [{"path": "key", "message": "this key was used for another message in this session"}]
                    return _ERROR_STATUS["key_reused"], _error_reply(msg_id, "key_reused", errors)
                return self._again(kept, msg_id)
        else:
            shelf = self.shelves[session] = _Shelf()
        if not self._make_room(shelf):
            if not shelf.calls:
                del self.shelves[session]
            errors = [{"path": "key", "message": "too many calls with a key are running; try again later"}]
            return _ERROR_STATUS["busy"], _error_reply(msg_id, "busy", errors)
        kept = shelf.calls[key] = _Kept(msg_id, digest)
        self.count += 1
        self.shelves[session] = self.shelves.pop(session)  # touched last
        reply = run()
        if isinstance(reply, tuple):
            self._answered(session, key, kept, reply)
            return reply
        loop = asyncio.get_running_loop()
        kept.future = loop.create_future()
        task = loop.create_task(self._run(reply))
        self.tasks.add(task)
        task.add_done_callback(lambda task: self._ran(task, session, key, kept, reply))
        return self._again(kept, msg_id)

    @staticmethod
    async def _run(reply: Awaitable[_Reply]) -> _Reply:
        return await reply

    def _ran(self, task: asyncio.Task[_Reply], session: str, key: str, kept: _Kept, reply: Awaitable[_Reply]) -> None:
        """The first call's task is over: its callers get its reply, or
        ``internal`` if it was cancelled (shutdown) before answering; a
        call without a reply is not kept (a retry runs it again)."""
        self.tasks.discard(task)
        future = kept.future
        assert future is not None
        if not task.cancelled() and task.exception() is None:
            answer = task.result()
            self._answered(session, key, kept, answer)
            future.set_result(answer)
            return
        if inspect.iscoroutine(reply):
            reply.close()  # cancelled before it started: it never will
        if not task.cancelled():
            _logger.error("RPC with key %r raised", key, exc_info=task.exception())
        shelf = self.shelves.get(session)
        if shelf is not None and shelf.calls.get(key) is kept:
            self._forget(shelf, key)
            if not shelf.calls:
                del self.shelves[session]
        future.set_result((500, _error_reply(kept.first_id, "internal", _INTERNAL_ERRORS)))

    def _answered(self, session: str, key: str, kept: _Kept, reply: _Reply) -> None:
        """Keep a call's reply for ``window`` seconds, within the bounds."""
        shelf = self.shelves.get(session)
        if shelf is None or shelf.calls.get(key) is not kept:
            return
        kept.reply = reply
        kept.expiry = time.monotonic() + self.window
        size = len(reply[1])
        if size > self.session_bytes or size > self.total_bytes:  # answered, not kept: nothing else goes for it
            del shelf.calls[key]
            self.count -= 1
            if not shelf.calls:
                del self.shelves[session]
            return
        del shelf.calls[key]
        shelf.calls[key] = kept  # the newest answer: out last
        shelf.done += 1
        shelf.size += size
        self.size += size
        self.shelves[session] = self.shelves.pop(session)
        while shelf.size > self.session_bytes and self._evict(shelf):
            pass
        while self.size > self.total_bytes and self._evict(max(self.shelves.values(), key=lambda s: s.size)):
            pass
        if not shelf.calls:
            self.shelves.pop(session, None)

    def _make_room(self, shelf: _Shelf) -> bool:
        """Room for one more call of ``shelf``'s session, evicting answers
        (its own oldest, then the heaviest session's); False if only
        running calls are left to evict."""
        while len(shelf.calls) >= self.session_count:
            if not self._evict(shelf):
                return False
        while self.count >= self.total_count:
            heaviest = max(self.shelves.values(), key=lambda s: s.done)
            if not self._evict(heaviest):
                return False
        return True

    def _evict(self, shelf: _Shelf) -> bool:
        """Forget ``shelf``'s oldest answer (a running call stays); False if it has none."""
        if not shelf.done:
            return False
        for key, kept in shelf.calls.items():
            if kept.reply is not None:
                self._forget(shelf, key)
                return True
        return False  # pragma: no cover (done counts the answered calls)

    def _forget(self, shelf: _Shelf, key: str) -> None:
        kept = shelf.calls.pop(key)
        self.count -= 1
        if kept.reply is not None:
            shelf.done -= 1
            size = len(kept.reply[1])
            shelf.size -= size
            self.size -= size

    def _sweep(self, now: float) -> None:
        """Forget the sessions, touched longest ago, whose answers have all expired."""
        shelves = self.shelves
        while shelves:
            session = next(iter(shelves))
            shelf = shelves[session]
            if any(kept.expiry >= now for kept in shelf.calls.values()):
                return
            while shelf.calls:
                self._forget(shelf, next(iter(shelf.calls)))
            del shelves[session]

    @staticmethod
    def _again(kept: _Kept, msg_id: Any) -> _Reply | Awaitable[_Reply]:
        """The call's reply, now or once it comes, with this call's id."""
        first_id = kept.first_id

        def with_id(reply: _Reply) -> _Reply:
            if msg_id == first_id and type(msg_id) is type(first_id):
                return reply
            return reply[0], _dumps({**json.loads(reply[1]), "id": msg_id})

        if kept.reply is not None:
            return with_id(kept.reply)
        # A future of its own for each caller, not a coroutine: a caller
        # cancelled before it awaited leaves nothing unawaited behind, and
        # cancelling it leaves the call's future alone.
        future = kept.future
        assert future is not None
        mine: asyncio.Future[_Reply] = future.get_loop().create_future()

        def settle(done: asyncio.Future[_Reply]) -> None:
            if not mine.done():
                mine.set_result(with_id(done.result()))

        future.add_done_callback(settle)
        return mine


class _Registry:
    """The handler table, pages, contract and topics of one App.

    Registration methods raise ``RegistrationError``; request-time methods
    return wire replies and never raise for bad input.
    """

    def __init__(self, limits: _Limits, state: Any) -> None:
        self.limits = limits
        self.state = state
        self.codecs = _Codecs(limits)
        self.json = _Json(limits)
        self.rpcs: dict[str, _Handler] = {}
        self.pages: list[_Page] = []
        self.raw_routes: dict[str, _RawRoute] = {}
        self.static: list[tuple[str, str]] = []
        self.push_encoders: dict[type, _Encoder] = {}  # of every type a broadcast may carry
        #: every process's presence entries (see "Presence across processes")
        self.presence = _PresenceTable(limits.max_presence_entries, limits.max_presence_meta_bytes)
        self.event_types: set[type] = set()  # of every page's server_event
        self.topics = _Topics(self.presence, self.event_types, self.decode_event)
        self.held = _HeldPages(limits)
        self.answers = _Answers(limits.resume_window)
        self._contract: tuple[bytes, str] | None = None

    # -- registration --------------------------------------------------------

    def _codec(self, tp: Any, where: str) -> _Codec:
        try:
            return self.codecs.get(tp)
        except _Unsupported as exc:
            raise RegistrationError(f"{where}: {exc}") from None

    def _hints(self, fn: Callable[..., Any], where: str) -> dict[str, Any]:
        try:
            return typing.get_type_hints(fn)
        except Exception as exc:
            raise RegistrationError(f"{where}: cannot resolve annotations: {exc}") from None

    def add_rpc(self, fn: Callable[..., Any], owner: str) -> _Handler:
        where = f"{owner}{fn.__name__}"
        if not owner:
            _check_no_self(fn, f"@app.rpc {fn.__qualname__}", "RPC functions", "a module-level function")
        hints = self._hints(fn, where)
        params = list(inspect.signature(fn).parameters.values())
        if not params:
            raise RegistrationError(f"{where}: an RPC handler takes the message as its first parameter")
        first = params[0]
        msg_type = hints.get(first.name)
        if msg_type is None:
            raise RegistrationError(
                f"{where}: parameter {first.name!r} has no annotation; annotate it with a dataclass"
            )
        if not _is_dataclass_type(msg_type):
            raise RegistrationError(
                f"{where}: parameter {first.name!r} is annotated {_type_name(msg_type)}, expected a dataclass"
            )
        ctx = _context_param(fn, hints)
        for p in params[1:]:
            if p.name != ctx:
                raise RegistrationError(
                    f"{where}: unexpected parameter {p.name!r}; an RPC handler takes (msg, server_context)"
                )
        if "return" not in hints:
            raise RegistrationError(f"{where}: missing return annotation; write -> rally.Result[T, E] or -> T")
        ret = hints["return"]
        ok_type, err_type = _result_types(ret)
        msg_codec = self._codec(msg_type, f"{where}: parameter {first.name!r} ({_type_name(msg_type)})")
        ok = self._codec(ok_type, f"{where}: return type {_type_name(ok_type)}")
        err = (
            self._codec(err_type, f"{where}: return error type {_type_name(err_type)}")
            if err_type is not None
            else None
        )
        name = msg_type.__name__
        if name in self.rpcs:
            raise RegistrationError(f"{where}: message type {name} is already handled by {self.rpcs[name].qualname}")
        handler = _Handler(
            name=name,
            fn=fn,
            is_async=inspect.iscoroutinefunction(fn),
            wants_context=ctx is not None,
            decode=msg_codec.decode,
            ok=ok,
            err=err,
            qualname=where,
        )
        self.rpcs[name] = handler
        self._contract = None
        return handler

    def add_page(self, path: str, namespace: Any) -> _Page:
        owner = getattr(namespace, "__name__", type(namespace).__name__)
        param_names = self._check_route(path, namespace, owner)
        members = {k: getattr(namespace, k) for k in dir(namespace) if not k.startswith("__")}
        for name, fn in members.items():
            if (name == "view" or name.startswith("server_")) and callable(fn):
                _check_no_self(fn, f"page {owner}: {name}", "page functions", "a plain function in the class body")
        init, update = members.get("server_init"), members.get("server_update")
        view, html = members.get("view"), members.get("html")
        hooks = {name: members.get(name) for name in ("server_terminate", "server_presence", "server_event")}
        for name, fn in {"server_update": update, **hooks}.items():
            if fn is not None and init is None:
                raise RegistrationError(
                    f"page {owner}: {name} without server_init; add server_init to create the model"
                )
        if html is not None and not isinstance(html, str):
            raise RegistrationError(f"page {owner}: html must be a str, got {type(html).__name__}")
        if view is not None and not callable(view):
            raise RegistrationError(f"page {owner}: view must be a function")
        view_ctx, init_ctx, param_types, to_client_types, to_client = self._entry_hooks(
            path, param_names, view, init, owner
        )
        update_ctx, to_server, to_server_types = False, None, list[str]()
        if update is not None:
            update_ctx, to_server, to_server_types, to_client_types, to_client = self._update_hook(
                update, owner, to_client_types, to_client
            )
        terminate, terminate_ctx = hooks["server_terminate"], False
        if terminate is not None:
            where = f"page {owner}: server_terminate"
            terminate_ctx = self._model_hook(terminate, where)
            types_t, _ = self._effect_type(hints := self._hints(terminate, where), where, owner, whole=False)
            if not set(types_t) <= set(to_client_types):
                names = [c.__name__ for c in to_client_types]
                raise RegistrationError(f"{where} pushes {_type_name(hints.get('return'))}; the page pushes {names}")
        presence, presence_ctx, presence_codec = hooks["server_presence"], False, None
        if presence is not None:
            where = f"page {owner}: server_presence"
            presence_ctx = self._model_hook(presence, where)
            meta_type = self._hints(presence, where).get("return")
            if not _is_dataclass_type(meta_type):
                raise RegistrationError(f"{where}: return annotation is {_type_name(meta_type)}; expected a dataclass")
            presence_codec = self._codec(meta_type, where)
        event = hooks["server_event"]
        event_ctx, event_types, event_codec = (
            self._event_hook(event, owner, to_client_types, to_client) if event is not None else (False, (), None)
        )
        converters = {p: _PARAM_CONVERTERS[param_types.get(p, str)] for p in param_names}
        if html is None and view is None:
            html = f"<!doctype html><title>{owner}</title>"
        page = _Page(
            route=_Route(path, _route_regex(path), converters),
            name=owner,
            html=html,
            view=view,
            view_wants_context=view_ctx,
            init=init,
            init_wants_context=init_ctx,
            update=update,
            update_is_async=inspect.iscoroutinefunction(update),
            update_wants_context=update_ctx,
            to_server=to_server,
            to_server_names=frozenset(to_server_types),
            to_client=to_client,
            to_client_types=to_client_types,
            push_types=frozenset(to_client_types),
            terminate=terminate,
            terminate_is_async=inspect.iscoroutinefunction(terminate),
            terminate_wants_context=terminate_ctx,
            presence=presence,
            presence_wants_context=presence_ctx,
            presence_codec=presence_codec,
            event=event,
            event_is_async=inspect.iscoroutinefunction(event),
            event_wants_context=event_ctx,
            event_types=frozenset(event_types),
            event_codec=event_codec,
            doc=_doc(namespace if isinstance(namespace, type) or inspect.ismodule(namespace) else type(namespace)),
        )
        self._check_unprefixed(namespace, owner, members, page)
        for name, fn in members.items():
            if name.startswith("server_") and name not in _PAGE_HOOKS and callable(fn):
                self.add_rpc(fn, f"page {owner}: ")
        for cls in (*to_client_types, *event_types):
            if cls is not PresenceChanged:
                self.push_encoders[cls] = self.codecs.get(cls).encode
        self.event_types.update(event_types)
        if PresenceChanged in event_types:
            self.presence.track = True
        self.pages.append(page)
        self._contract = None
        return page

    def _check_unprefixed(self, namespace: Any, owner: str, members: dict[str, Any], page: _Page) -> None:
        """Refuse a function of the page that looks like an RPC but lacks the
        ``server_`` prefix: its first parameter (after a ``self``) is
        annotated with a dataclass that none of the page's hooks use, so its
        calls would answer ``unknown_type``. Names starting with ``_``, a
        module's imports and functions already registered with ``@app.rpc``
        are left alone."""
        hooks = (page.view, page.init, page.update, page.terminate, page.presence, page.event)
        own = {t for fn in hooks if fn is not None for t in _dataclasses_in(_quiet_hints(fn).values())}
        handlers = {h.fn for h in self.rpcs.values()}
        module = namespace.__name__ if isinstance(namespace, types.ModuleType) else None
        for name, fn in members.items():
            if name.startswith(("server_", "_")) or name == "view" or not inspect.isfunction(fn):
                continue
            if fn in handlers or (module is not None and fn.__module__ != module):
                continue
            params = list(inspect.signature(fn).parameters)
            has_self = bool(params) and params[0] == "self"
            params = params[1:] if has_self else params
            msg_type = _quiet_hints(fn).get(params[0]) if params else None
            if not isinstance(msg_type, type) or not _is_dataclass_type(msg_type) or msg_type in own:
                continue
            rest = ", ".join(params)
            fix = f"def server_{name}({rest})"
            no_self = " and drop its self (page functions take no self)" if has_self else ""
            raise RegistrationError(
                f"page {owner}: {name}({rest}) takes a {msg_type.__name__} but is not an RPC: only functions "
                f"named server_... are, so a call of {msg_type.__name__} would answer unknown_type; rename it "
                f"server_{name}{no_self} to make it an RPC ({fix}), or _{name} if it is a helper"
            )

    def _check_route(self, path: Any, namespace: Any, owner: str) -> list[str]:
        """Check a page's route; returns its parameter names."""
        if not isinstance(path, str):
            hint = "; the arguments are swapped" if isinstance(namespace, str) else ""
            raise RegistrationError(
                f"app.page(path, namespace) takes the route first, like app.page('/articles/{{id}}', Article);"
                f" got {getattr(path, '__name__', type(path).__name__)} as the path{hint}"
            )
        if not path.startswith("/") or path.startswith("/_rally/"):
            raise RegistrationError(f"page {owner}: path {path!r} must start with / and not with /_rally/")
        if any(p.route.pattern == path for p in self.pages):
            raise RegistrationError(f"page {owner}: route {path!r} is registered twice")
        param_names: list[str] = _PARAM_RE.findall(path)
        if len(set(param_names)) != len(param_names):
            raise RegistrationError(f"page {owner}: route {path!r} repeats a parameter")
        return param_names

    def _entry_hooks(
        self, path: str, param_names: list[str], view: Any, init: Any, owner: str
    ) -> tuple[str | None, str | None, dict[str, Any], tuple[type, ...], _Codec | None]:
        """Check ``view`` and ``server_init`` against the route: their
        context parameters, the route parameters' types, and what
        ``server_init`` pushes."""
        param_types: dict[str, Any] = {}
        init_ctx = view_ctx = None
        to_client_types: tuple[type, ...] = ()
        to_client = None
        for fn_name, fn in (("view", view), ("server_init", init)):
            if fn is None:
                continue
            where = f"page {owner}: {fn_name}"
            hints = self._hints(fn, where)
            ctx = _context_param(fn, hints)
            accepted = [p for p in inspect.signature(fn).parameters if p != ctx]
            for p in param_names:
                if p not in accepted:
                    raise RegistrationError(f"{where} does not accept route parameter {p!r} of {path!r}")
            for p in accepted:
                if p not in param_names:
                    raise RegistrationError(f"{where}: parameter {p!r} is not a parameter of route {path!r}")
                tp = hints.get(p)
                if tp not in _PARAM_CONVERTERS:
                    raise RegistrationError(
                        f"{where}: route parameter {p!r} is annotated {_type_name(tp)}; expected str, int or float"
                    )
                if param_types.setdefault(p, tp) is not tp:
                    raise RegistrationError(f"{where}: route parameter {p!r} has two types, {param_types[p]} and {tp}")
            if fn_name == "view":
                view_ctx = ctx
            else:
                init_ctx = ctx
                to_client_types, to_client = self._effect_type(hints, where, owner)
        return view_ctx, init_ctx, param_types, to_client_types, to_client

    def _message_hook(self, fn: Any, where: str) -> tuple[bool, str, Any, dict[str, Any]]:
        """Check a ``(model, msg, server_context)`` hook: whether it wants
        the context, the message parameter's name and annotation, and its hints."""
        hints = self._hints(fn, where)
        ctx = _context_param(fn, hints)
        ps = [p for p in inspect.signature(fn).parameters if p != ctx]
        if len(ps) != 2:
            raise RegistrationError(f"{where}: expected parameters (model, msg, server_context), got {ps}")
        return ctx is not None, ps[1], hints.get(ps[1]), hints

    def _update_hook(
        self, update: Any, owner: str, to_client_types: tuple[type, ...], to_client: _Codec | None
    ) -> tuple[bool, _Codec, list[str], tuple[type, ...], _Codec | None]:
        """Check ``server_update``: its context, its ToServer codec and names, and what the page pushes."""
        where = f"page {owner}: server_update"
        wants_ctx, name, msg_type, hints = self._message_hook(update, where)
        members_ = self.codecs.members(msg_type) if msg_type is not None else None
        if members_ is None:
            raise RegistrationError(
                f"{where}: parameter {name!r} is annotated {_type_name(msg_type)}; "
                "expected a dataclass or a union of dataclasses"
            )
        try:
            to_server = self.codecs.message(members_)
        except _Unsupported as exc:
            raise RegistrationError(f"{where}: parameter {name!r}: {exc}") from None
        types_u, codec_u = self._effect_type(hints, where, owner)
        if codec_u is not None and to_client is not None and codec_u.name != to_client.name:
            raise RegistrationError(
                f"{where} pushes {codec_u.name} but server_init pushes {to_client.name}; use one ToClient type"
            )
        names = [cls.__name__ for cls in members_]
        return wants_ctx, to_server, names, types_u or to_client_types, codec_u or to_client

    def _event_hook(
        self, event: Any, owner: str, to_client_types: tuple[type, ...], to_client: _Codec | None
    ) -> tuple[bool, tuple[type, ...], _Codec | None]:
        """Check ``server_event``: its context, the event types (dataclasses
        and ``rally.PresenceChanged``), their codec, and that it pushes
        what the page pushes."""
        where = f"page {owner}: server_event"
        wants_ctx, name, msg_type, hints = self._message_hook(event, where)
        args = typing.get_args(msg_type) if _is_union(msg_type) else (msg_type,)
        others = [self.codecs.members(a) for a in args if a is not PresenceChanged]
        members_ = tuple(m for found in others if found is not None for m in found)
        if None in others or msg_type is None:
            raise RegistrationError(
                f"{where}: parameter {name!r} is annotated {_type_name(msg_type)}; expected a dataclass, "
                "rally.PresenceChanged or a union of them"
            )
        try:
            codec = self.codecs.message(members_) if members_ else None
        except _Unsupported as exc:
            raise RegistrationError(f"{where}: parameter {name!r}: {exc}") from None
        types_e, codec_e = self._effect_type(hints, where, owner)
        if not set(types_e) <= set(to_client_types):
            names = [c.__name__ for c in to_client_types]
            raise RegistrationError(f"{where} pushes {codec_e.name if codec_e else None}; the page pushes {names}")
        events = (*members_, PresenceChanged) if PresenceChanged in args else members_
        return wants_ctx, events, codec

    def _model_hook(self, fn: Callable[..., Any], where: str) -> bool:
        """Check a hook that takes ``(model, server_context)``; whether it wants the context."""
        ctx = _context_param(fn, self._hints(fn, where))
        ps = [p for p in inspect.signature(fn).parameters if p != ctx]
        if len(ps) != 1:
            raise RegistrationError(f"{where}: expected parameters (model, server_context), got {ps}")
        return ctx is not None

    def _effect_type(
        self, hints: dict[str, Any], where: str, owner: str, whole: bool = True
    ) -> tuple[tuple[type, ...], _Codec | None]:
        """The ToClient of a ``tuple[Model, Effect[ToClient]]`` return
        annotation (of a plain ``Effect[ToClient]`` if not ``whole``)."""
        ret = hints.get("return")
        if whole:
            args = typing.get_args(ret) if typing.get_origin(ret) is tuple else ()
            effect_type = args[1] if len(args) == 2 else None
        else:
            effect_type = ret
        if effect_type is None or typing.get_origin(effect_type) is not Effect and effect_type is not Effect:
            expected = "tuple[Model, rally.Effect[ToClient]]" if whole else "rally.Effect[ToClient]"
            raise RegistrationError(f"{where}: return annotation is {_type_name(ret)}; expected {expected}")
        inner = typing.get_args(effect_type)
        if not inner:
            return (), None
        members = self.codecs.members(inner[0])
        if members is None:
            raise RegistrationError(
                f"{where}: Effect[{_type_name(inner[0])}]: expected a dataclass or a union of dataclasses"
            )
        try:
            return members, self.codecs.message(members)
        except _Unsupported as exc:
            raise RegistrationError(f"{where}: Effect[{_type_name(inner[0])}]: {exc}") from None

    # -- contract ------------------------------------------------------------

    def contract(self) -> tuple[bytes, str]:
        """The contract document and its hash, computed once per change."""
        if self._contract is None:
            doc: dict[str, Any] = {
                "types": dict(sorted(self.codecs.types.items())),
                "rpc": {
                    n: {
                        "result": h.ok.name,
                        "error": h.err.name if h.err else None,
                        **({"doc": h_doc} if (h_doc := _doc(h.fn)) is not None else {}),
                    }
                    for n, h in sorted(self.rpcs.items())
                },
                "pages": {
                    p.route.pattern: {
                        "params": {k: _PARAM_NAMES[c] for k, c in p.route.converters.items()},
                        "stateful": p.stateful,
                        "to_server": p.to_server.name if p.to_server else None,
                        "to_client": p.to_client.name if p.to_client else None,
                        "presence": p.presence_codec.name if p.presence_codec else None,
                        **({"events": sorted(t.__name__ for t in p.event_types)} if p.event_types else {}),
                        **({"doc": p.doc} if p.doc is not None else {}),
                        **({"hooks": hooks} if (hooks := p.hook_docs()) else {}),
                    }
                    for p in self.pages
                },
            }
            digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
            doc["hash"] = digest
            self._contract = (json.dumps(doc, indent=2).encode(), digest)
        return self._contract

    def match_page(self, path: str) -> tuple[_Page, dict[str, Any]] | None:
        for page in self.pages:
            params = page.route.match(path)
            if params is not None:
                return page, params
        return None

    # -- RPC -----------------------------------------------------------------

    def rpc(
        self, msg_id: Any, msg: dict[str, Any], ctx: ServerContext, key: str | None = None
    ) -> _Reply | Awaitable[_Reply]:
        """Answer one ``rpc`` envelope: a reply now, or an awaitable of one.
        A call with an idempotency ``key`` that this session already made
        gets the first call's answer; the handler runs once (see ``_Answers``)."""
        if key is None or not self.answers.window:
            return self._rpc(msg_id, msg, ctx)
        return self.answers.answer(ctx.session_id, key, msg_id, msg, lambda: self._rpc(msg_id, msg, ctx))

    def _rpc(self, msg_id: Any, msg: dict[str, Any], ctx: ServerContext) -> _Reply | Awaitable[_Reply]:
        handler = self.rpcs.get(msg["type"])
        if handler is None:
            return 400, _error_reply(
                msg_id, "unknown_type", [{"path": "msg.type", "message": f"no RPC handles {msg['type'][:40]!r}"}]
            )
        try:
            arg = handler.decode(msg["fields"])
        except _Bad as bad:
            return _ERROR_STATUS[bad.code], _error_reply(msg_id, bad.code, [bad.error("msg.fields")])
        args = (arg, ctx) if handler.wants_context else (arg,)
        if handler.is_async:
            return self._rpc_async(handler, msg_id, args)
        try:
            result = handler.fn(*args)
        except Exception:
            _logger.exception("RPC handler %s raised (message %s)", handler.qualname, handler.name)
            return 500, _error_reply(msg_id, "internal", _INTERNAL_ERRORS)
        return self._result(handler, msg_id, result)

    async def _rpc_async(self, handler: _Handler, msg_id: Any, args: tuple[Any, ...]) -> _Reply:
        try:
            result = await asyncio.wait_for(handler.fn(*args), self.limits.handler_timeout)
        except asyncio.CancelledError:
            if _cancelling():
                raise
            _logger.error("RPC handler %s raised CancelledError (message %s)", handler.qualname, handler.name)
            return 500, _error_reply(msg_id, "internal", _INTERNAL_ERRORS)
        except asyncio.TimeoutError:
            _logger.error(
                "RPC handler %s timed out after %s s (message %s)",
                handler.qualname,
                self.limits.handler_timeout,
                handler.name,
            )
            return 500, _error_reply(msg_id, "internal", _INTERNAL_ERRORS)
        except Exception:
            _logger.exception("RPC handler %s raised (message %s)", handler.qualname, handler.name)
            return 500, _error_reply(msg_id, "internal", _INTERNAL_ERRORS)
        return self._result(handler, msg_id, result)

    def _result(self, handler: _Handler, msg_id: Any, result: Any) -> _Reply:
        try:
            if handler.err is None:
                return 200, _ok_reply(msg_id, handler.ok.encode(result))
            if isinstance(result, Ok):
                return 200, _ok_reply(msg_id, handler.ok.encode(result.value))
            if isinstance(result, Error):
                return 200, _err_reply(msg_id, handler.err.encode(result.error))
            raise _Bad(f"expected Ok or Error, got {type(result).__name__}")
        except _Bad as bad:
            _logger.error(
                "RPC handler %s returned a value that breaks its annotation Result[%s, %s]: %s",
                handler.qualname,
                handler.ok.name,
                handler.err.name if handler.err else None,
                bad.error("result")["path"] + ": " + bad.message,
            )
            return 500, _error_reply(msg_id, "internal", _INTERNAL_ERRORS)

    # -- pushes -------------------------------------------------------------

    def push_payload(self, msg: Any, encode: _Encoder | None = None) -> bytes:
        """Encode one push, once, for any number of recipients (each frames
        it with its own ``seq``)."""
        enc = encode or self.push_encoders.get(type(msg))
        if enc is None:
            raise _Bad(f"{type(msg).__name__} is not a push type of any page (no Effect[...] names it)")
        return _dumps({"kind": "push", "msg": {"type": type(msg).__name__, "fields": enc(msg)}})

    def effect_ops(self, eff: Any, page: _Page, out: list[_Op]) -> list[_Op]:
        """Check and encode every push of an effect of ``page``, in order,
        before any is delivered: ``(scope, target, frame, type)`` appended to
        ``out`` (a subscription or a watch has no frame). A broadcast may
        carry the page's push types and any page's server event types
        (docs/api.md "Server events"). Raises ``_Bad`` for a value that is not an
        Effect, a type the page may not send, a ``broadcast_to_page(page=...)``
        to a page that declares neither, or a watch of a page that has
        ``server_event`` without ``rally.PresenceChanged``."""
        if not isinstance(eff, Effect):
            raise _Bad(f"expected rally.Effect, got {type(eff).__name__}")
        scope = eff.scope
        if scope == "batch":
            for child in eff.children:
                self.effect_ops(child, page, out)
        elif scope in ("subscribe", "unsubscribe"):
            out.append((scope, eff.target, b"", None, None))
        elif scope in ("watch", "unwatch"):
            if PresenceChanged not in page.event_types:
                raise _Bad("watch_presence needs a server_event that takes rally.PresenceChanged")
            out.append((scope, eff.target, b"", None, None))
        elif scope != "none":
            msg_type = type(eff.msg)
            if scope == "page" and eff.target is not None:
                self.check_page_push(eff.target, msg_type, _Bad)
            elif msg_type not in page.push_types and (scope == "client" or msg_type not in self.event_types):
                names = [c.__name__ for c in page.to_client_types]
                raise _Bad(f"push {msg_type.__name__} is not in the page's Effect types {names} nor a server event")
            payload = self.push_payload(eff.msg, self.push_encoders[msg_type])
            out.append((scope, eff.target, payload, msg_type, eff.msg))
        return out

    def decode_event(self, frame: bytes, msg_type: type) -> Any:
        """The message of a push frame from another process, for ``server_event``; ``None`` if it does not fit."""
        try:
            fields = json.loads(frame)["msg"]["fields"]
            return self.codecs.get(msg_type).decode(fields)
        except (ValueError, KeyError, TypeError, _Bad) as exc:
            _logger.warning("a %s from another process does not fit its type here: %s", msg_type.__name__, exc)
            return None

    def check_page_push(self, path: str, msg_type: type, error: Callable[[str], Exception]) -> None:
        """Raise ``error`` unless the page at ``path`` pushes ``msg_type`` or takes it as a server event."""
        found = self.match_page(path)
        if found is None:
            raise error(f"no page is at {path[:100]!r}")
        if msg_type not in found[0].push_types and msg_type not in found[0].event_types:
            names = [c.__name__ for c in found[0].to_client_types]
            raise error(
                f"the page at {path[:100]!r} does not push {msg_type.__name__} nor take it as a server event;"
                f" it pushes {names}"
            )

    # -- presence -----------------------------------------------------------
    #
    # With a broker, ``presence`` also holds the entries of the other
    # processes, told by their broker messages: ``presence_merge`` applies one
    # process's diff for one page, ``presence_replace`` its whole list (a
    # snapshot, or ``{}`` when it has gone). Either tells this process's
    # connections on each page what changed in one diff frame, encoded once.
    # Messages come from processes of the same app; an item that is not what
    # rally.py sends is skipped.

    def presence_of(self, path: str) -> list[Presence]:
        """Who is on the concrete page ``path``: one entry per connection, of every process."""
        return self.presence.of(path)

    def presence_own(self) -> dict[str, list[list[Any]]]:
        """This process's own entries: the snapshot its broker sends the others."""
        return self.presence.own()

    def presence_merge(self, origin: str, path: Any, upserts: Any, leaves: Any) -> None:
        """Apply process ``origin``'s diff for page ``path`` and tell this
        process's connections there."""
        codec = self._meta_codec(path) if type(path) is str else None
        frame = self.presence.merge(origin, path, upserts, leaves, codec)
        if frame is not None:
            self.topics.presence_changed()
            self.topics.publish(f"page:{path}", frame)

    def presence_replace(self, origin: str, pages: Any) -> None:
        """Process ``origin``'s entries are now exactly ``pages`` (``{}``
        when it has gone); tell this process's connections on each page."""
        for path, frame in self.presence.replace(origin, pages, self._meta_codec):
            self.topics.presence_changed()
            self.topics.publish(f"page:{path}", frame)

    def _meta_codec(self, path: str) -> _Codec | None:
        found = self.match_page(path)
        return found[0].presence_codec if found is not None else None


_PAGE_HOOKS: Final = frozenset(("server_init", "server_update", "server_terminate", "server_presence", "server_event"))
_PARAM_NAMES: Final = {str: "str", _convert_int: "int", _convert_float: "float"}


def _result_types(ret: Any) -> tuple[Any, Any]:
    """``(T, E)`` of ``Result[T, E]``, or ``(T, None)`` for a plain ``T``."""
    if _is_union(ret):
        args = typing.get_args(ret)
        origins = [typing.get_origin(a) or a for a in args]
        if len(args) == 2 and Ok in origins and Error in origins:
            ok = args[origins.index(Ok)]
            err = args[origins.index(Error)]
            return (typing.get_args(ok) or (Any,))[0], (typing.get_args(err) or (Any,))[0]
    return ret, None


# Declarations and docs: two views of the contract document, made from the
# very dict GET /_rally/contract serves, so neither can disagree with it.

#: Contract type names that need no declaration, and their TypeScript.
_TS_SCALARS: Final = {
    "str": "string",
    "int": "number",  # every contract int is within ±(2^53-1): a JavaScript number
    "float": "number",
    "bool": "boolean",
    "None": "null",
    "bytes": "string",  # base64
    "datetime": "string",  # ISO 8601
    "date": "string",
}
_TYPE_NAME_RE: Final = re.compile(r"[^\W\d]\w*")
_TS_KEY_RE: Final = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")

#: A parsed contract type name: ``("scalar", name)``, ``("ref", name)`` (a
#: dataclass or enum), ``("tagged", names)``, ``("literal", values)``,
#: ``("optional", node)``, ``("list", node)``, ``("tuple", nodes)``, ``("dict", node)``.
_TypeNode = tuple[str, Any]


def _parse_type(text: str) -> _TypeNode:
    """Read a type name of the contract (as a codec names it, e.g.
    ``list[Point | None]``) into a ``_TypeNode``; raises ``ValueError``."""
    pos = 0

    def union() -> _TypeNode:
        nonlocal pos
        terms = [term()]
        while text.startswith(" | ", pos):
            pos += 3
            terms.append(term())
        rest = [t for t in terms if t != ("scalar", "None")]
        if len(terms) == 1 or not rest:
            return terms[0]
        # Unions are T | None, or of dataclasses, and those are tagged (docs/contract.md).
        node = rest[0] if len(rest) == 1 else ("tagged", tuple(t[1] for t in rest))
        return node if len(rest) == len(terms) else ("optional", node)

    def term() -> _TypeNode:
        nonlocal pos
        m = _TYPE_NAME_RE.match(text, pos)
        if m is None:
            raise ValueError(f"unexpected {text[pos : pos + 20]!r} in type {text!r}")
        name, pos = m.group(), m.end()
        if not text.startswith("[", pos):
            return ("scalar" if name in _TS_SCALARS else "ref", name)
        pos += 1
        args: list[Any] = []
        while True:
            if name == "Literal":
                value, pos = json.JSONDecoder().raw_decode(text, pos)
                args.append(value)
            elif text.startswith("...", pos):
                pos += 3
                args.append(...)
            else:
                args.append(union())
            if not text.startswith(", ", pos):
                break
            pos += 2
        if not text.startswith("]", pos):
            raise ValueError(f"expected ] at {pos} in type {text!r}")
        pos += 1
        if name == "Literal":
            return ("literal", tuple(args))
        if name == "dict":
            return ("dict", args[1])
        if name == "list" or args[-1] is ...:
            return ("list", args[0])
        return ("tuple", tuple(args))

    node = union()
    if pos != len(text):
        raise ValueError(f"unexpected {text[pos : pos + 20]!r} in type {text!r}")
    return node


def _ts(node: _TypeNode, ns: str = "Rally.") -> str:
    """The TypeScript of a parsed type; ``ns`` prefixes the app's own types."""
    kind, arg = node
    if kind == "scalar":
        return _TS_SCALARS[arg]
    if kind == "ref":
        return f"{ns}{arg}"
    if kind == "tagged":
        return " | ".join(f"{{ type: {json.dumps(n)}; fields: {ns}{n} }}" for n in arg)
    if kind == "literal":
        return " | ".join(json.dumps(v) for v in arg)
    if kind == "optional":
        return _ts(arg, ns) + " | null"
    if kind == "tuple":
        return "[" + ", ".join(_ts(a, ns) for a in arg) + "]"
    inner = _ts(arg, ns)
    if kind == "dict":
        return f"{{ [key: string]: {inner} }}"
    return f"({inner})[]" if " | " in inner else inner + "[]"


def _ts_key(name: str) -> str:
    return name if _TS_KEY_RE.fullmatch(name) else json.dumps(name)


def _message_names(text: str | None) -> tuple[str, ...]:
    """The type names of a page's ToServer or ToClient (one may be alone)."""
    if text is None:
        return ()
    node = _parse_type(text)
    return tuple(node[1]) if node[0] == "tagged" else (node[1],)


def _typescript(contract: dict[str, Any]) -> str:
    """TypeScript declarations of a contract document: the app's types in
    namespace ``Rally``, and the browser client ``rally`` typed by them, for
    plain JavaScript under ``// @ts-check`` as for TypeScript."""

    def ts(text: str | None) -> str:
        return "never" if text is None else _ts(_parse_type(text))

    def tagged(text: str | None) -> str:
        names = _message_names(text)
        return _ts(("tagged", names)) if names else "never"

    out = [
        f"// TypeScript declarations of a rally.py app, contract {contract['hash']}: its types",
        "// (namespace Rally) and the browser client window.rally typed by them. Made from",
        "// GET /_rally/contract; reference it from a // @ts-check script:",
        '// /// <reference path="rally.d.ts" />',
        "",
        "declare namespace Rally {",
    ]
    for name, t in contract["types"].items():
        if "enum" in t:
            out.append(f"  type {name} = {' | '.join(json.dumps(v) for v in t['enum']) or 'never'};")
            continue
        defaults = t.get("defaults", {})
        out.append(f"  interface {name} {{")
        for field, tp in t["fields"].items():
            optional = "?" if field in defaults else ""
            if optional:
                default = json.dumps(defaults[field]).replace("*/", "*\\/")
                out.append(f"    /** default: {default} */")
            out.append(f"    {_ts_key(field)}{optional}: {_ts(_parse_type(tp), '')};")
        if not t["fields"]:
            out.append("    [key: string]: never;")
        out.append("  }")
    out += ["}", "", "declare namespace rally {", "  /** RPC message type name -> its fields and its answer. */"]
    out.append("  interface Rpc {")
    for name, r in contract["rpc"].items():
        result = f"{{ ok: true; value: {ts(r['result'])} }} | {{ ok: false; error: {ts(r['error'])} }}"
        out.append(f"    {_ts_key(name)}: {{ fields: Rally.{name}; result: {result} }};")
    out.append("  }")
    sends: dict[str, None] = {}
    pushes: dict[str, None] = {}
    params: dict[str, dict[str, None]] = {}
    page_lines = []
    for path, p in contract["pages"].items():
        sends.update(dict.fromkeys(_message_names(p["to_server"])))
        pushes.update(dict.fromkeys(_message_names(p["to_client"])))
        for k, v in p["params"].items():
            params.setdefault(k, {})[_TS_SCALARS[v]] = None
        page_params = "; ".join(f"{_ts_key(k)}: {_TS_SCALARS[v]}" for k, v in p["params"].items())
        page_lines += [
            f"    {json.dumps(path)}: {{",
            f"      params: {{ {page_params} }};" if page_params else "      params: {};",
            f"      toServer: {tagged(p['to_server'])};",
            f"      toClient: {tagged(p['to_client'])};",
            f"      presence: {ts(p['presence'])};",
            "    };",
        ]
    for title, kind, names in (("a page sends (rally.send)", "Send", sends), ("pushed (rally.on)", "Push", pushes)):
        out.append(f"  /** Message type name {title} -> its fields. */")
        out.append(f"  interface {kind} {{")
        out += [f"    {_ts_key(n)}: Rally.{n};" for n in names]
        out.append("  }")
    params_type = "; ".join(f"readonly {_ts_key(k)}: {' | '.join(v)}" for k, v in params.items())
    out += [
        "  /** Every page by route: its params and its messages as they travel ({type, fields}). */",
        "  interface Pages {",
        *page_lines,
        "  }",
        '  type Status = "connecting" | "open" | "reconnecting" | "closed";',
        "  /** A status and what comes with it: whether an open page resumed; the close code",
        "   * (4000 stale contract, 4001 session closed, 4003 refused by server_init) and",
        "   * reason a closed page got. */",
        "  type StatusChange =",
        '    | [status: "open", info: { resumed: boolean }]',
        '    | [status: "closed", info: { code: number; reason: string }]',
        '    | [status: "connecting" | "reconnecting", info: undefined];',
        '  interface PresenceEntry { id: number; tag: string; self: boolean; meta: Pages[keyof Pages]["presence"] }',
        "  interface ProtocolError extends Error { code: string; errors: { path: string; message: string }[] }",
        "  /** A message's fields; they may be left out when every field has a default. */",
        "  type Fields<T> = {} extends T ? [fields?: T] : [fields: T];",
        "  /** This page's concrete path. */",
        "  const page: string;",
        "  /** This page's route parameters (each name typed over the pages that have it). */",
        f"  const params: {{ {params_type} }};" if params_type else "  const params: {};",
        '  function rpc<K extends keyof Rpc>(type: K, ...fields: Fields<Rpc[K]["fields"]>): Promise<Rpc[K]["result"]>;',
        "  function send<K extends keyof Send>(type: K, ...fields: Fields<Send[K]>): Promise<void>;",
        "  function on<K extends keyof Push>(type: K, fn: (fields: Push[K], type: K) => void): () => void;",
        "  function onPresence(fn: (entries: PresenceEntry[]) => void): () => void;",
        "  function onStatus(fn: (...change: StatusChange) => void): () => void;",
        "  /** A handler of the status alone. */",
        "  function onStatus(fn: (status: Status) => void): () => void;",
        "  function onError(fn: (error: ProtocolError) => void): () => void;",
        "}",
        "interface Window {",
        "  rally: typeof rally;",
        "}",
        "",
    ]
    return "\n".join(out)


#: The value a docs form starts from, per scalar type name.
_SAMPLES: Final = {
    "str": "",
    "int": 0,
    "float": 0,
    "bool": False,
    "None": None,
    "bytes": "",
    "datetime": "2026-01-01T00:00:00+00:00",
    "date": "2026-01-01",
}


def _sample(node: _TypeNode, types: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """A value of a parsed type for a form to start from: defaults where the
    contract has them, else the plainest value of each type."""
    kind, arg = node
    if kind == "scalar":
        return _SAMPLES[arg]
    if kind == "literal":
        return arg[0]
    if kind in ("optional", "list", "dict"):
        return {"optional": None, "list": [], "dict": {}}[kind]
    if kind == "tuple":
        return [_sample(a, types, seen) for a in arg]
    if kind == "tagged":
        return {"type": arg[0], "fields": _sample(("ref", arg[0]), types, seen)}
    t = types[arg]
    if "enum" in t:
        return t["enum"][0] if t["enum"] else None
    if arg in seen:  # a recursive type: its required self is not ours to invent
        return {}
    defaults = t.get("defaults", {})
    return {
        f: defaults[f] if f in defaults else _sample(_parse_type(tp), types, (*seen, arg))
        for f, tp in t["fields"].items()
    }


#: The docs page's one script: each RPC form POSTs its fields to /_rally/rpc;
#: each page's live console opens that page's WebSocket (numbered frames,
#: each acknowledged as it arrives unless the box is unticked), sends the
#: ToServer message of its form and logs every frame both ways.
_DOCS_JS: Final = """
"use strict";
var contract = document.body.dataset.contract;
document.querySelectorAll("form[data-rpc]").forEach(function (form) {
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var out = form.querySelector("output"), body;
    try {
      body = JSON.stringify({kind: "rpc", id: 1, msg: {type: form.dataset.rpc, fields: JSON.parse(form.fields.value)}});
    } catch (error) { out.className = "error"; out.textContent = "fields: " + error.message; return; }
    out.className = ""; out.textContent = "…";
    fetch("/_rally/rpc", {method: "POST", body: body, headers:
      {"Content-Type": "application/json", "Rally-Contract": contract}})
      .then(function (response) { return response.json(); })
      .then(function (reply) { out.className = reply.kind; out.textContent = JSON.stringify(reply, null, 2); },
            function (error) { out.className = "error"; out.textContent = String(error); });
  });
});
document.querySelectorAll("[data-console]").forEach(function (box) {
  var route = box.dataset.console, socket = null, nextSeq = 1;
  var connect = box.querySelector("form.connect"), sender = box.querySelector("form.send");
  var log = box.querySelector("ol.log"), state = box.querySelector(".state");
  var openButton = connect.querySelector("button.open"), closeButton = connect.querySelector("button.close");
  var sendButton = sender && sender.querySelector("button");
  function entry(way, kind, text) {
    var item = document.createElement("li"), arrow = document.createElement("span");
    var body = document.createElement("code");
    item.className = way;
    item.dataset.kind = kind;
    arrow.textContent = way === "in" ? "←" : way === "out" ? "→" : "•";
    body.textContent = text;
    item.append(arrow, body);
    log.append(item);
    log.scrollTop = log.scrollHeight;
  }
  function write(ws, frame) { ws.send(JSON.stringify(frame)); entry("out", frame.kind, JSON.stringify(frame)); }
  function buttons(open, ready) {
    openButton.disabled = open; closeButton.disabled = !open;
    if (sendButton) sendButton.disabled = !ready;
  }
  connect.addEventListener("submit", function (event) {
    event.preventDefault();
    if (socket) return;
    var path = route.replace(/\\{([^}]+)\\}/g, function (_, name) {
      return encodeURIComponent(connect.elements.namedItem("param-" + name).value);
    });
    var ws = socket = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host +
      "/_rally/ws?page=" + encodeURIComponent(path) + "&contract=" + encodeURIComponent(contract) + "&last=0");
    nextSeq = 1;
    state.textContent = "connecting";
    entry("note", "connecting", "connecting to " + path);
    buttons(true, false);
    ws.addEventListener("open", function () {
      state.textContent = "open";
      buttons(true, true);
    });
    ws.addEventListener("message", function (event) {
      var frame;
      try { frame = JSON.parse(event.data); } catch (error) { entry("in", "text", String(event.data)); return; }
      entry("in", String(frame.kind), event.data);
      if (typeof frame.seq === "number" && (frame.kind === "push" || frame.kind === "presence") &&
          connect.elements.namedItem("ack").checked) {
        write(ws, {kind: "ack", seq: frame.seq});
      }
    });
    ws.addEventListener("close", function (event) {
      if (socket === ws) { socket = null; buttons(false, false); }
      state.textContent = "closed " + event.code;
      entry("note", "closed", "closed: " + event.code + (event.reason ? " " + event.reason : "") +
        (event.code === 1006 ? " (no closing handshake: refused before it opened, or cut)" : ""));
    });
  });
  closeButton.addEventListener("click", function () {
    if (socket) { state.textContent = "closing"; socket.close(1000); }
  });
  box.querySelector("button.clear").addEventListener("click", function () { log.textContent = ""; });
  if (!sender) return;
  var picker = sender.elements.namedItem("type"), fields = sender.elements.namedItem("fields");
  picker.addEventListener("change", function () { fields.value = picker.selectedOptions[0].dataset.sample; });
  sender.addEventListener("submit", function (event) {
    event.preventDefault();
    var parsed;
    try { parsed = JSON.parse(fields.value); }
    catch (error) { entry("note", "invalid", "fields: " + error.message); return; }
    if (socket && socket.readyState === WebSocket.OPEN) {
      write(socket, {kind: "send", seq: nextSeq++, msg: {type: picker.value, fields: parsed}});
    }
  });
});
"""
#: ``connect-src 'self'`` covers the page's own WebSocket too (``ws:`` for
#: ``http:``, ``wss:`` for ``https:``, same host and port), and nothing else.
_DOCS_CSP: Final = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'; "
    "script-src 'sha256-" + base64.b64encode(hashlib.sha256(_DOCS_JS.encode()).digest()).decode() + "'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
).encode()
_DOCS_CSS: Final = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 62rem; margin: 2rem auto; padding: 0 1rem; color: #1d2230; }
code, textarea, output, select, input { font: 13px/1.4 ui-monospace, monospace; }
a { color: #1f5fbf; } a code { color: inherit; } h2 { margin-top: 2rem; }
h3 { margin: .4rem 0; scroll-margin-top: 1rem; } h3 code { font-size: 1em; } h4 { margin: .8rem 0 .3rem; }
:target, section:target > h3, h3:target { background: #fff4c2; }
nav p { margin: .2rem 0; } nav a { margin-right: .5rem; }
table { border-collapse: collapse; margin: .4rem 0; } td, th { border: 1px solid #dde1e8; padding: .2rem .6rem; }
th { background: #f3f4f7; text-align: left; font-weight: 600; }
section { border-top: 1px solid #dde1e8; padding: .4rem 0 .8rem; }
.doc { color: #3b4256; } .doc p { margin: .3rem 0; } .tag { font-size: 12px; color: #5d6478; }
dl.hooks { margin: .4rem 0; } dl.hooks dt { float: left; clear: left; margin-right: .6rem; }
dl.hooks dd { margin: 0 0 .2rem; color: #3b4256; }
textarea { display: block; width: 100%; box-sizing: border-box; min-height: 4rem; }
output { display: block; white-space: pre-wrap; margin-top: .4rem; } .ok { color: #176b3a; }
.err, .error { color: #b22; }
.console { border: 1px solid #dde1e8; border-radius: 6px; padding: .2rem .8rem .8rem; background: #fbfbfd; }
.console form { margin: .4rem 0; } .console label { margin-right: .8rem; white-space: nowrap; }
.console .state { margin-left: .6rem; color: #5d6478; } .console select { margin-bottom: .3rem; }
ol.log { list-style: none; margin: .3rem 0 0; padding: .3rem .5rem; max-height: 18rem; overflow: auto;
  background: #fff; border: 1px solid #dde1e8; min-height: 2.2rem; }
ol.log li { white-space: pre-wrap; word-break: break-all; } ol.log li > span { display: inline-block; width: 1.4rem; }
ol.log .in { color: #1d2230; } ol.log .out { color: #5d6478; } ol.log .note { color: #5d6478; font-style: italic; }
ol.log [data-kind=push] { color: #176b3a; } ol.log [data-kind=error] { color: #b22; }
ol.log [data-kind=presence] { color: #7a3fb0; } ol.log .in[data-kind=ack] { color: #1f5fbf; }
.log-head { display: flex; justify-content: space-between; align-items: baseline; margin-top: .5rem; }
"""
#: A type expression's tokens: a JSON string (a ``Literal`` value, never a link) or a name.
_DOCS_TOKEN_RE: Final = re.compile(r'"(?:[^"\\]|\\.)*"|[^\W\d]\w*')
#: ``code`` or ````code```` in a docstring.
_DOCS_CODE_RE: Final = re.compile(r"``([^`]+)``|`([^`]+)`")


def _docs_html(contract: dict[str, Any]) -> str:
    """The ``/_rally/docs`` page of a contract document: pages (with a live
    console each that has a model or pushes), RPCs (with a form each that
    calls it) and types, with their docstrings; every type name links to
    its definition (``#type-Name``). Every name and value is escaped."""
    import html  # only an app whose docs page is read pays for its entity table

    esc = html.escape
    types = contract["types"]

    def code(text: str | None) -> str:
        return "—" if text is None else f"<code>{esc(text)}</code>"

    def typed(text: str | None) -> str:
        """A type expression, each of the app's type names a link to its definition."""
        if text is None:
            return "—"
        out, pos = [], 0
        for m in _DOCS_TOKEN_RE.finditer(text):
            token = m.group()
            out.append(esc(text[pos : m.start()]))
            out.append(f'<a href="#type-{esc(token)}">{esc(token)}</a>' if token in types else esc(token))
            pos = m.end()
        return "<code>" + "".join(out) + esc(text[pos:]) + "</code>"

    def doc(text: str | None) -> str:
        if not text:
            return ""
        paragraphs = (
            _DOCS_CODE_RE.sub(lambda m: f"<code>{m.group(1) or m.group(2)}</code>", esc(p)) for p in text.split("\n\n")
        )
        return '<div class="doc">' + "".join(f"<p>{p}</p>" for p in paragraphs) + "</div>"

    def fields(name: str) -> str:
        t = types[name]
        if "enum" in t:
            return "<p>enum of " + ", ".join(code(json.dumps(v)) for v in t["enum"]) + "</p>"
        defaults = t.get("defaults", {})
        rows = "".join(
            f"<tr><td>{esc(f)}</td><td>{typed(tp)}</td>"
            f"<td>{code(json.dumps(defaults[f])) if f in defaults else 'required'}</td></tr>"
            for f, tp in t["fields"].items()
        )
        return f"<table><tr><th>field<th>type<th>default</tr>{rows}</table>" if rows else "<p>no fields</p>"

    def sample(name: str) -> str:
        return json.dumps(_sample(("ref", name), types), indent=2)

    def textarea(text: str, label: str) -> str:
        return (
            f'<textarea name="fields" rows="{min(text.count(chr(10)) + 1, 16)}" spellcheck="false" '
            f'aria-label="{esc(label)}">{esc(text)}</textarea>'
        )

    def console(path: str, p: dict[str, Any]) -> str:
        numbers = {"int": 'type="number" step="1" value="1"', "float": 'type="number" step="any" value="1"'}
        inputs = "".join(
            f'<label>{esc(k)} <input name="param-{esc(k)}" required '
            + numbers.get(v, f'value="{esc(k)}"')  # a str parameter starts as its own name
            + "></label>"
            for k, v in p["params"].items()
        )
        sends = _message_names(p["to_server"])
        send = ""
        if sends:
            options = "".join(f'<option data-sample="{esc(sample(n))}">{esc(n)}</option>' for n in sends)
            send = (
                f'<form class="send"><select name="type" aria-label="message type">{options}</select>'
                f"{textarea(sample(sends[0]), 'fields of the message')}<button disabled>Send</button></form>"
            )
        return (
            f'<div class="console" data-console="{esc(path)}"><h4>Live console</h4><form class="connect">{inputs}'
            '<label><input type="checkbox" name="ack" checked> acknowledge numbered frames</label>'
            '<button class="open">Open</button> <button type="button" class="close" disabled>Close</button>'
            f'<span class="state" role="status">closed</span></form>{send}'
            '<div class="log-head"><strong>Frames</strong><button type="button" class="clear">Clear</button></div>'
            '<ol class="log" aria-label="frames"></ol></div>'
        )

    pages = []
    for path, p in contract["pages"].items():
        params = ", ".join(f"{k}: {v}" for k, v in p["params"].items()) or None
        events = ", ".join(
            typed(e) if e in types else f'<code title="rally.PresenceChanged, built in">{esc(e)}</code>'
            for e in p.get("events", ())
        )
        hooks = "".join(f"<dt>{code(h)}</dt><dd>{doc(d)}</dd>" for h, d in p.get("hooks", {}).items())
        watch = p["stateful"] or p["to_client"] or p["presence"] or p.get("events")
        pages.append(
            f'<section id="page-{esc(path)}"><h3>{code(path)} <span class="tag">'
            f"{'stateful' if p['stateful'] else 'not stateful'}</span></h3>{doc(p.get('doc'))}"
            f"<table><tr><th>params</th><td>{code(params)}</td></tr>"
            f"<tr><th>sends (ToServer)</th><td>{typed(p['to_server'])}</td></tr>"
            f"<tr><th>pushes (ToClient)</th><td>{typed(p['to_client'])}</td></tr>"
            f"<tr><th>server events</th><td>{events or '—'}</td></tr>"
            f"<tr><th>presence</th><td>{typed(p['presence'])}</td></tr></table>"
            f"{f'<dl class=hooks>{hooks}</dl>' if hooks else ''}{console(path, p) if watch else ''}</section>"
        )
    rpcs = []
    for name, r in contract["rpc"].items():
        n = esc(name)
        error = ", or the error " + typed(r["error"]) if r["error"] else ""
        rpcs.append(
            f'<section id="rpc-{n}"><h3 id="type-{n}">{n}</h3>{doc(r.get("doc"))}'
            f"<p>answers {typed(r['result'])}{error}</p>{fields(name)}"
            f'<form data-rpc="{n}">{textarea(sample(name), f"fields of {name}")}'
            f"<button>Call {n}</button><output></output></form></section>"
        )
    others = [n for n in types if n not in contract["rpc"]]
    type_sections = "".join(
        f'<section id="type-{esc(n)}"><h3>{esc(n)}</h3>{doc(types[n].get("doc"))}{fields(n)}</section>' for n in others
    )
    links = (
        ("Pages", "".join(f'<a href="#page-{esc(p)}">{code(p)}</a>' for p in contract["pages"])),
        ("RPCs", "".join(f'<a href="#rpc-{esc(n)}">{esc(n)}</a>' for n in contract["rpc"])),
        ("Types", "".join(f'<a href="#type-{esc(n)}">{esc(n)}</a>' for n in others)),
    )
    nav = "<nav>" + "".join(f"<p>{title}: {items or 'none'}</p>" for title, items in links) + "</nav>"
    digest = esc(contract["hash"])
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        'content="width=device-width"><link rel="icon" href="data:,"><title>API docs · rally.py</title>'
        f'<style>{_DOCS_CSS}</style></head><body data-contract="{digest}">'
        f"<h1>API docs</h1><p>Contract <code>{digest}</code>: "
        '<a href="/_rally/contract">JSON</a> · <a href="/_rally/types.d.ts">TypeScript declarations</a></p>'
        f"{nav}<h2>Pages</h2>{''.join(pages) or '<p>none</p>'}<h2>RPCs</h2>{''.join(rpcs) or '<p>none</p>'}"
        f"<h2>Other types</h2>{type_sections or '<p>none</p>'}<script>{_DOCS_JS}</script></body></html>"
    )


def _frame_size(payload_bytes: int) -> int:
    """Bytes of a server's WebSocket frame of ``payload_bytes``, header included."""
    return payload_bytes + (2 if payload_bytes < 126 else 4 if payload_bytes < 65536 else 10)


class _Replay:
    """The numbered frames of one resumable page connection
    (docs/delivery.md "Delivery across reconnects"); pure. Out: the next push ``seq``, the
    frames written and not yet acknowledged, each counted in the bytes it
    takes on the wire, and the ``floor`` below which the page cannot
    resume.

    A held item is ``(position, payload, numbered, cost)``: a numbered
    frame's position is its seq; a refusal's, the seq of the numbered frame
    written before it. Presence frames are numbered but never held (a
    resumed page gets a fresh list) and acks are never held (``hello``'s
    ``ack`` settles every send taken)."""

    __slots__ = ("out_seq", "frames", "size", "floor")

    def __init__(self) -> None:
        self.out_seq = 0  # the last seq given to a frame for the page
        # No list while nothing is held: an idle page, every push acknowledged, keeps none.
        self.frames: list[tuple[int, bytes, bool, int]] | tuple[()] = ()
        self.size = 0  # bytes held, as written on the wire
        self.floor = 0  # frames up to this seq are no longer held: no resume from before it

    def _hold(self, item: tuple[int, bytes, bool, int]) -> None:
        if self.frames:  # a list, never an empty one
            self.frames.append(item)
        else:
            self.frames = [item]
        self.size += item[3]

    def _drop(self, n: int) -> None:
        """Stop holding the ``n`` oldest frames; the list goes with the last."""
        if n >= len(self.frames):
            self.frames = ()
        elif n and isinstance(self.frames, list):
            del self.frames[:n]

    def push(self, payload: bytes, tail: bytes) -> bytes:
        """Number a push, frame it and hold it; returns the frame, whose
        length is what it costs held. ``tail`` is ``payload`` without its ``{``."""
        seq = self.out_seq = self.out_seq + 1
        frame = _seq_frame(seq, tail)
        cost = len(frame)
        if self.frames:  # ``_hold`` inline, the hot path of a numbered broadcast
            self.frames.append((seq, payload, True, cost))
        else:
            self.frames = [(seq, payload, True, cost)]
        self.size += cost
        return frame

    def number(self, payload: bytes) -> bytes:
        """Number and frame a presence frame, which is not held."""
        seq = self.out_seq = self.out_seq + 1
        return _seq_frame(seq, payload[1:])

    def refuse(self, payload: bytes) -> bytes:
        """Frame and hold the refusal of a send, unnumbered, after the last numbered frame."""
        frame = _ws_frame(payload)
        self._hold((self.out_seq, payload, False, len(frame)))
        return frame

    def ack(self, last: int) -> int:
        """The page has every numbered frame up to ``last``: stop holding
        them and the refusals written before them; returns the bytes freed."""
        if last <= self.floor:
            return 0
        n = freed = 0
        for pos, _, numbered, cost in self.frames:
            if pos > last or (pos == last and not numbered):
                break
            n += 1
            freed += cost
        self._drop(n)
        self.size -= freed
        self.floor = last
        return freed

    def trim(self, budget: int) -> int:
        """Forget the oldest frames until at most ``budget`` bytes are held
        (no resume from before them); returns the bytes freed."""
        freed = 0
        frames = self.frames
        n = 0
        while self.size - freed > budget and n < len(frames):
            pos, _, numbered, cost = frames[n]
            freed += cost
            self.floor = pos if numbered else pos + 1
            n += 1
        self._drop(n)
        self.size -= freed
        return freed

    def forget(self) -> int:
        """Hold nothing more and allow no resume; returns the bytes freed."""
        freed, self.size = self.size, 0
        self.frames = ()
        self.floor = self.out_seq + 1
        return freed

    def can_resume(self, last: int) -> bool:
        """Whether a page that received every frame up to ``last`` misses nothing held."""
        return self.floor <= last <= self.out_seq

    def replay(self) -> list[bytes]:
        """Every frame held, framed again, in order (after ``ack(last)``)."""
        return [_seq_frame(pos, p[1:]) if numbered else _ws_frame(p) for pos, p, numbered, _ in self.frames]


class _HeldPages:
    """Page sessions that may be resumed, by resume token, those of them
    held without a connection with their expiry timers, and the bytes every
    resumable page holds (docs/delivery.md "Delivery across reconnects").

    ``hold`` keeps a session whose connection was lost for
    ``resume_window`` seconds, at most ``max_connections`` of them;
    ``take`` finds the one a reconnecting page may go on with; ``release``
    stops its timer once it goes on; ``forget`` drops an ended one;
    ``end_all`` ends every held one (shutdown). ``size`` counts the bytes
    every resumable page holds (each page adds and frees its own); past
    ``max_held_bytes``, ``make_room`` has held sessions give up their
    frames, the one held longest first, and end on the loop's next step,
    then the page that wrote trims its own oldest frames."""

    __slots__ = ("limits", "tokens", "timers", "size", "budget", "page_budget")

    def __init__(self, limits: _Limits) -> None:
        self.limits = limits
        self.budget = limits.max_held_bytes  # for every page together
        self.page_budget = limits.max_outgoing_bytes  # for each page
        self.tokens: dict[str, _PageSession] = {}
        self.timers: dict[_PageSession, asyncio.TimerHandle] = {}  # held without a connection, oldest first
        self.size = 0  # bytes held by every resumable page

    def add(self, session: _PageSession) -> None:
        if self.limits.resume_window:
            self.tokens[session.token] = session

    def get(self, token: str) -> _PageSession | None:
        return self.tokens.get(token)

    def take(self, token: str, session_id: str, path: str, last: int) -> _PageSession | None:
        """The session a page of ``session_id`` at ``path``, which received
        every frame up to ``last``, goes on with; ``None`` if none can. A
        session of the same browser session that cannot go on ends now."""
        session = self.tokens.get(token)
        if session is None:
            return None
        if session.can_resume(session_id, path, last):
            return session
        if session.ctx.session_id == session_id:
            session.close(1000, "replaced by a new connection")
        return None

    def hold(self, session: _PageSession) -> bool:
        """Keep ``session`` for ``resume_window`` seconds; whether it is kept."""
        limits = self.limits
        if not limits.resume_window or len(self.timers) >= limits.max_connections or session.token not in self.tokens:
            return False
        loop = asyncio.get_running_loop()
        self.timers[session] = loop.call_later(limits.resume_window, session.finish, 1006, "resume window passed")
        return True

    def release(self, session: _PageSession) -> None:
        timer = self.timers.pop(session, None)
        if timer is not None:
            timer.cancel()

    def forget(self, session: _PageSession, held_bytes: int) -> None:
        """``session`` ended: drop its token, timer and bytes."""
        if self.tokens.get(session.token) is session:
            del self.tokens[session.token]
        self.release(session)
        self.size -= held_bytes

    def end_all(self, code: int, reason: str) -> None:
        for session in tuple(self.timers):
            session.finish(code, reason)

    def make_room(self, session: _PageSession) -> None:
        """Past ``max_held_bytes`` (``size`` counts what every resumable
        page holds): held sessions give their frames up, the one held
        longest first, ``session`` too, and end on the next step; then
        ``session`` forgets its oldest frames."""
        budget = self.budget
        for held in tuple(self.timers):
            if self.size <= budget:
                return
            held.evict("held pages over max_held_bytes")
        if self.size > budget:
            session.evict("held pages over max_held_bytes", self.size - budget)


class _Detached:
    """The peer of a page session whose connection was lost: it writes
    nothing (the session holds the frames for a resume) and reads nothing."""

    __slots__ = ()

    def write_frame(self, frame: bytes) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        pass

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def abandon(self) -> None:
        pass

    async def writable(self) -> None:
        raise ConnectionClosed(1006, "connection lost")


_DETACHED: Final = _Detached()


class _PageState(enum.Enum):
    """A page session's life: moves happen only in ``_PageSession._move``, along ``_PAGE_MOVES``."""

    STARTING = "starting"  # server_init has not returned: sends wait, nothing is listed
    LIVE = "live"  # the model is kept and a connection carries the page
    DETACHED = "detached"  # its connection was lost: held for resume_window
    ENDED = "ended"  # out of every topic and the presence; server_terminate ran or runs


_PAGE_MOVES: Final = {
    _PageState.STARTING: frozenset((_PageState.LIVE, _PageState.ENDED)),
    _PageState.LIVE: frozenset((_PageState.DETACHED, _PageState.ENDED)),
    _PageState.DETACHED: frozenset((_PageState.LIVE, _PageState.ENDED)),
    _PageState.ENDED: frozenset(),
}


class _PageSession:
    """One page connection's life, without sockets: its model, its ``send``
    messages handled in order, its in-flight RPCs (at most
    ``max_concurrent_rpcs``), the effects of its handlers, its topics and
    presence, and its numbered frames (docs/delivery.md "Delivery across reconnects").

    Its ``state`` moves along ``_PAGE_MOVES`` in ``_move`` only: STARTING
    until ``server_init`` returns, LIVE, DETACHED while held for a resume
    after its connection was lost (``end`` with ``lost``), LIVE again when
    ``attach`` moves it to the page's next connection, ENDED once. Every
    step that delivers, lists or subscribes checks the state first, so
    nothing runs on an ended page, and ``finish`` is the one place a
    session ends: it leaves the topics and the presence, stops the work in
    flight and runs ``server_terminate`` once for a model. The transport
    feeds it whole text messages (``receive``) and it talks back through
    its ``_Peer``, which never ends it from inside a write. Handler errors
    are logged here and answered with ``internal``; bad input is answered
    with an ``error`` envelope.
    """

    __slots__ = (
        "reg",
        "page",
        "ctx",
        "cid",
        "peer",
        "spawn",
        "tag",
        "custom",
        "model",
        "state",
        "meta",
        "listed",
        "pending",
        "worker",
        "rpcs",
        "token",
        "replay",
        "in_seq",
        "watching",
    )

    def __init__(
        self,
        reg: _Registry,
        page: _Page,
        ctx: ServerContext,
        peer: _Peer,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        tag: str = "",
        resumable: bool = False,
    ) -> None:
        self.reg = reg
        self.page = page
        self.ctx = ctx
        assert ctx.connection_id is not None and ctx.page is not None
        self.cid: int = ctx.connection_id
        self.peer = peer
        self.spawn = spawn
        self.tag = tag  # the session's presence tag
        self.custom: set[str] | None = None  # topics joined by rally.effect.subscribe
        self.model: Any = None
        self.state = _PageState.STARTING
        self.meta: Any = None  # the encoded presence meta others were told, once listed
        self.listed = False  # the page's presence list was sent: diffs follow
        # A list, not a deque: at most max_pending_messages items; none until
        # the first message waits, so an idle connection keeps no list.
        self.pending: list[tuple[Any, int | None]] | tuple[()] = ()  # (message, seq)
        self.worker: asyncio.Task[None] | None = None  # server_init or the sends, one at a time
        self.rpcs: set[asyncio.Task[Any]] | None = None  # made by the first async RPC
        self.token = secrets.token_urlsafe(16) if resumable else ""  # the resume token, told in hello
        self.replay: _Replay | None = _Replay() if resumable else None  # the page said &last=
        self.in_seq = 0  # the highest send seq taken from the page
        self.watching: set[str] | None = None  # pages and patterns whose presence changes it gets

    @property
    def topics(self) -> tuple[str, str, str]:
        """The three topics every page connection is in: its session's, its
        page's and the app's. Made when needed, not kept: the topic table
        holds the names (docs/performance.md "Where each byte goes")."""
        ctx = self.ctx
        return (f"session:{ctx.session_id}", f"page:{ctx.page}", "app")

    def _queue(self, item: tuple[Any, int | None]) -> None:
        """Queue a send or a server event behind the one running."""
        if isinstance(self.pending, list):
            self.pending.append(item)
        else:
            self.pending = [item]

    def _move(self, to: _PageState) -> None:
        if to not in _PAGE_MOVES[self.state]:
            raise RuntimeError(f"page session cannot move from {self.state.value} to {to.value}")
        self.state = to

    # -- the transport's side --------------------------------------------------

    def start(self) -> None:
        """Say hello (to a page that numbers frames), join the topics, then
        run ``server_init`` (its effects may reach this connection)."""
        if self.replay is not None:
            self.peer.write_frame(_hello(self.token, False, 0))
            self.reg.held.add(self)
        self.reg.topics.join(self, self.topics)
        self._init()

    def push(self, payload: bytes, frame: bytes, tail: bytes, hold: bool = True) -> None:
        """A frame published to one of this connection's topics (an ended
        session is in none): its ``payload``, ``frame`` (the same framed once
        for every page that does not number frames) and ``tail``
        (``payload`` without its ``{``, made once for every page that
        does); ``hold``: a push, held for a resume, not a presence frame.
        The hot path of every broadcast."""
        replay = self.replay
        if replay is None:
            self.peer.write_frame(frame)
        elif hold:
            framed = replay.push(payload, tail)
            held = self.reg.held
            held.size += len(framed)
            if held.size > held.budget or replay.size > held.page_budget:
                self._over()
            self.peer.write_frame(framed)
        else:
            self.peer.write_frame(replay.number(payload))

    def tell(self, payload: bytes) -> None:
        """A presence frame for this connection alone: numbered, not held."""
        if self.state is _PageState.ENDED:
            return
        replay = self.replay
        self.peer.write_frame(_ws_frame(payload) if replay is None else replay.number(payload))

    def event(self, msg: Any) -> None:
        """A server event for the model (docs/api.md "Server events"): applied
        by ``server_event`` in order with the sends, never two at once; it
        waits while ``server_init`` runs. At most ``max_pending_messages``
        events wait: past that the page ends like a slow consumer (1013)."""
        if self.state is _PageState.ENDED:
            return
        ready = self.state is not _PageState.STARTING
        if ready and self.worker is None and not self.page.event_is_async:
            self._event_now(msg)
            return
        limit = self.reg.limits.max_pending_messages
        if sum(type(v) is _Event for v, _ in self.pending) >= limit:
            _logger.warning(
                "closing page %s connection %d: more than %d server events wait for its model",
                self.ctx.page,
                self.cid,
                limit,
            )
            # On the next step: this may be the middle of a broadcast to others.
            asyncio.get_running_loop().call_soon(self.close, 1013, "too many server events waiting")
            return
        self._queue((_Event(msg), None))
        if ready and self.worker is None:
            self.worker = self.spawn(self._drain())

    def can_resume(self, session_id: str, page: str, last: int) -> bool:
        """Whether a page of session ``session_id`` that received every frame
        up to ``last`` can go on with this session."""
        return (
            self.state in (_PageState.LIVE, _PageState.DETACHED)
            and self.replay is not None
            and session_id == self.ctx.session_id
            and page == self.ctx.page
            and self.replay.can_resume(last)
        )

    def attach(self, peer: _Peer, last: int) -> bool:
        """Go on over the page's new connection (``can_resume`` said yes):
        hello, every frame after ``last`` again, in order, then the
        presence list as it is now. ``False`` if the session can no longer
        go on (it ended, or gave up its frames, since)."""
        replay = self.replay
        if self.state is _PageState.ENDED or replay is None or not replay.can_resume(last):
            return False
        if self.state is _PageState.DETACHED:
            self._move(_PageState.LIVE)
            self.reg.held.release(self)
        old, self.peer = self.peer, peer
        old.abandon()  # a connection whose loss the server had not noticed yet
        self.reg.held.size -= replay.ack(last)
        peer.write_frame(_hello(self.token, True, self.in_seq))
        for frame in replay.replay():
            peer.write_frame(frame)
        if self.in_seq:  # acks are not held: this one settles every send taken before
            peer.write_frame(_ws_frame(_ack(self.in_seq)))
        if self.listed:
            self.tell(self.reg.presence.states(self.topics[1][5:], [self.cid])[0])
        self._flow()
        return True

    def close(self, code: int, reason: str) -> None:
        """Close the page's connection with ``code``; end the session at once if it has none."""
        if self.state is _PageState.DETACHED:
            self.finish(code, reason)
        elif self.state is not _PageState.ENDED:
            self.peer.close(code, reason)

    def receive(self, data: str | bytes) -> None:
        """One whole message from the page; raises ``ProtocolError`` for a
        binary one (close code 1003)."""
        if not isinstance(data, str):
            raise ProtocolError("binary frames are not accepted here", close_code=1003)
        if self.state is _PageState.ENDED:
            return
        replay = self.replay
        if data.startswith('{"kind":"ack","seq":') and replay is not None:  # what a browser sends most
            ack = _ACK_RE.fullmatch(data)
            if ack is not None and (last := int(ack[1])) <= replay.out_seq:
                self.reg.held.size -= replay.ack(last)
                return
        reg = self.reg
        try:
            kind, msg_id, msg, key = _parse_envelope(reg.json.loads(data))
        except ContractError as exc:
            self._reply(_error_reply(None, exc.code, exc.errors))
            return
        if kind == "rpc":
            reply = reg.rpc(msg_id, msg, self.ctx, key)
            if isinstance(reply, tuple):
                self._reply(reply[1])
            else:
                self._start_rpc(reply)
            return
        if kind == "ack":
            out_seq = replay.out_seq if replay is not None else 0
            if msg_id > out_seq:
                errors = [{"path": "seq", "message": f"no frame {msg_id} was sent (the last is {out_seq})"}]
                self._reply(_error_reply(None, "invalid", errors))
            elif replay is not None:
                self.reg.held.size -= replay.ack(msg_id)
            return
        page, seq = self.page, msg_id
        if seq is not None:
            if seq <= self.in_seq:
                return  # sent again after a resume: taken already, answered in order
            self.in_seq = seq
        if page.to_server is None:
            errors = [{"path": "", "message": f"page {page.route.pattern} has no server_update"}]
            self._refuse(_error_reply(None, "not_stateful", errors, seq), seq)
            return
        if msg["type"] not in page.to_server_names:
            errors = [{"path": "msg.type", "message": f"page {page.route.pattern} takes no {msg['type'][:40]!r}"}]
            self._refuse(_error_reply(None, "unknown_type", errors, seq), seq)
            return
        try:
            value = page.to_server.decode(msg)
        except _Bad as bad:
            self._refuse(_error_reply(None, bad.code, [bad.error("msg")], seq), seq)
            return
        ready = self.state is _PageState.LIVE
        if ready and self.worker is None and not page.update_is_async:
            self._update_now(value, seq)
            return
        self._queue((value, seq))
        self._flow()
        if ready and self.worker is None:
            self.worker = self.spawn(self._drain())

    def end(self, code: int, reason: str, lost: bool = False) -> None:
        """The connection is over (``code`` and ``reason`` say how). One that
        was ``lost`` (no closing handshake) leaves a live resumable session
        held for ``resume_window`` seconds; anything else finishes it."""
        if self.state is _PageState.ENDED or self.state is _PageState.DETACHED:
            return
        if lost and self.state is _PageState.LIVE and self.reg.held.hold(self):
            self._move(_PageState.DETACHED)
            self.peer = _DETACHED
            return
        self.finish(code, reason)

    def evict(self, reason: str, over: int | None = None) -> None:
        """Held bytes are over their budget: a held session gives up its
        frames and ends on the loop's next step; a live one (``over`` bytes
        too many) forgets its oldest frames, so it resumes from no earlier."""
        replay = self.replay
        if replay is None or self.state is _PageState.ENDED:
            return
        if self.state is _PageState.DETACHED or over is None:
            self.reg.held.size -= replay.forget()
            if self.state is _PageState.DETACHED:
                asyncio.get_running_loop().call_soon(self.finish, 1006, reason)
        else:
            self.reg.held.size -= replay.trim(max(0, replay.size - over))

    def finish(self, code: int, reason: str) -> None:
        """End the session, once, whatever ended it: leave the topics and the
        presence, drop queued sends, cancel the work in flight (the server
        awaits the tasks), then run ``server_terminate`` for the model, if
        there is one."""
        if self.state is _PageState.ENDED:
            return
        had_model = self.state is not _PageState.STARTING
        self._move(_PageState.ENDED)
        self.peer = _DETACHED
        reg = self.reg
        replay = self.replay
        reg.held.forget(self, replay.forget() if replay is not None else 0)
        topics = reg.topics
        topics.leave(self, self.topics)
        if self.custom:
            topics.leave(self, self.custom)
            self.custom = None
        if self.watching:
            topics.unwatch(self, self.watching)
            self.watching = None
        if self.meta is not None:
            self._unlist()
        self.pending = ()
        if self.worker is not None:
            self.worker.cancel()
        for task in self.rpcs or ():
            task.cancel()
        page = self.page
        if had_model and page.terminate is not None:
            args = (self.model, self.ctx) if page.terminate_wants_context else (self.model,)
            if page.terminate_is_async:
                self.spawn(self._terminate_async(page.terminate(*args)))
                return
            try:
                eff = page.terminate(*args)
            except Exception:
                _logger.exception("server_terminate of page %s raised (page %s)", page.name, self.ctx.page)
                return
            self._terminated(eff)

    async def _terminate_async(self, coro: Awaitable[Any]) -> None:
        try:
            eff = await asyncio.wait_for(coro, self.reg.limits.handler_timeout)
        except Exception:
            _logger.exception("server_terminate of page %s failed (page %s)", self.page.name, self.ctx.page)
            return
        self._terminated(eff)

    def _terminated(self, eff: Any) -> None:
        """Deliver ``server_terminate``'s effect to the others (the page is
        ended: what would reach itself, its subscriptions included, does not)."""
        try:
            ops = self.reg.effect_ops(eff, self.page, [])
        except _Bad as bad:
            _logger.error(
                "server_terminate of page %s returned a value that breaks its annotation: %s",
                self.page.name,
                bad.message,
            )
            return
        self._deliver(ops)

    async def settle(self) -> None:
        """Return once no RPC or ``server_update`` is running (at shutdown,
        with reading stopped, so that replies in flight are delivered)."""
        while True:
            tasks = [t for t in (self.worker, *(self.rpcs or ())) if t is not None and not t.done()]
            if not tasks:
                return
            await asyncio.wait(tasks)

    # -- work -------------------------------------------------------------------

    def _flow(self) -> None:
        """Stop reading while the queued sends or the running RPCs are at their bound."""
        lim = self.reg.limits
        if len(self.pending) >= lim.max_pending_messages or len(self.rpcs or ()) >= lim.max_concurrent_rpcs:
            self.peer.pause()
        else:
            self.peer.resume()

    def _reply(self, body: bytes) -> None:
        """An RPC's answer, an ack, or an error about no send: not numbered, not held."""
        self.peer.write_frame(_ws_frame(body))

    def _refuse(self, body: bytes, seq: int | None) -> None:
        """An ``error`` refusing a send: held until acknowledged when it has a seq."""
        replay = self.replay
        if seq is None or replay is None:
            self._reply(body)
            return
        framed = replay.refuse(body)
        self.reg.held.size += len(framed)
        self._over()
        self.peer.write_frame(framed)

    def _emit(self, payload: bytes) -> None:
        """A push of this page's own effect to itself (``send_to_client``)."""
        if self.state is not _PageState.ENDED:
            self.push(payload, _ws_frame(payload), payload[1:])

    def _over(self) -> None:
        """After holding a frame: past ``max_outgoing_bytes`` for the page a
        held session gives up (it ends on the next step) and a live one
        forgets its oldest frames (no resume from before them); past
        ``max_held_bytes`` for all, ``_HeldPages`` makes room."""
        replay = self.replay
        assert replay is not None
        held = self.reg.held
        over = replay.size - held.page_budget
        if over > 0:
            self.evict("resume buffer full", over)
        if held.size > held.budget:
            held.make_room(self)

    def _start_rpc(self, reply: Awaitable[_Reply]) -> None:
        if self.rpcs is None:
            self.rpcs = set()
        task = self.spawn(self._rpc(reply))
        self.rpcs.add(task)
        task.add_done_callback(self._rpc_done)
        self._flow()

    async def _rpc(self, reply: Awaitable[_Reply]) -> None:
        _, body = await reply
        self._reply(body)

    def _rpc_done(self, task: asyncio.Task[Any]) -> None:
        assert self.rpcs is not None
        self.rpcs.discard(task)
        if self.state is not _PageState.ENDED:
            self._flow()

    def _init(self) -> None:
        page = self.page
        if page.init is None:
            self._move(_PageState.LIVE)
            return
        kwargs = dict(self.ctx.params)
        if page.init_wants_context:
            kwargs[page.init_wants_context] = self.ctx
        if inspect.iscoroutinefunction(page.init):
            self.worker = self.spawn(self._init_async(page.init(**kwargs)))
            return
        try:
            result = page.init(**kwargs)
        except Refuse as refused:
            self._refused(refused.reason)
            return
        except Exception:
            _logger.exception("server_init of page %s raised (page %s)", page.name, self.ctx.page)
            self._init_failed()
            return
        self._accept_init(result)

    async def _init_async(self, coro: Awaitable[Any]) -> None:
        try:
            result = await asyncio.wait_for(coro, self.reg.limits.handler_timeout)
        except Refuse as refused:
            self.worker = None
            self._refused(refused.reason)
            return
        except Exception:
            _logger.exception("server_init of page %s failed (page %s)", self.page.name, self.ctx.page)
            self.worker = None
            self._init_failed()
            return
        self.worker = None
        if self._accept_init(result) and self.pending:
            self.worker = self.spawn(self._drain())

    def _accept_init(self, result: Any) -> bool:
        """Keep ``server_init``'s model and deliver its effect; the page is live then."""
        if self.state is _PageState.ENDED:
            return False
        if not self._apply(result, "server_init", live=True):
            self._init_failed()
            return False
        return self.state is _PageState.LIVE

    def _refused(self, reason: str) -> None:
        """``server_init`` raised ``rally.Refuse``: close with 4003, no model."""
        _logger.info("page %s refused connection %d: %s", self.ctx.page, self.cid, reason)
        self.peer.close(CLOSE_REFUSED, reason)

    def _init_failed(self) -> None:
        if self.state is not _PageState.ENDED:
            self._reply(_error_reply(None, "internal", _INTERNAL_ERRORS))
            self.peer.close(1011, "server_init failed")

    def _apply(self, result: Any, what: str, live: bool = False) -> bool:
        """Take ``(model, effect)`` from a handler. Every push is checked and
        encoded before anything happens, so an effect is all or nothing: then
        the model is kept (``live``: the page is live from now) and the frames
        are delivered in order, as long as the page has not ended."""
        page = self.page
        try:
            if not isinstance(result, tuple) or len(result) != 2:
                raise _Bad(f"expected a (model, effect) tuple, got {type(result).__name__}")
            model, eff = result
            ops = self.reg.effect_ops(eff, page, [])
        except _Bad as bad:
            _logger.error("%s of page %s returned a value that breaks its annotation: %s", what, page.name, bad.message)
            return False
        self.model = model
        if live:
            self._move(_PageState.LIVE)
        self._deliver(ops)
        if page.presence is not None and self.state is not _PageState.ENDED:
            self._present()
        return True

    def _deliver(self, ops: list[_Op]) -> None:
        """Carry out an effect's checked deliveries and subscriptions, in
        order; what concerns the page itself only while it has not ended."""
        topics = self.reg.topics
        for scope, target, frame, msg_type, msg in ops:
            if scope == "client":
                self._emit(frame)
            elif scope == "watch" or scope == "unwatch":
                assert target is not None
                if self.state is not _PageState.ENDED:
                    self._watch(scope == "watch", target)
            elif scope == "subscribe" or scope == "unsubscribe":
                assert target is not None
                if self.state is _PageState.ENDED:
                    continue
                if self.custom is None:
                    self.custom = set()
                if scope == "unsubscribe":
                    if target in self.custom:
                        self.custom.discard(target)
                        topics.leave(self, (target,))
                elif target not in self.custom:
                    limit = self.reg.limits.max_topics_per_connection
                    if len(self.custom) + len(self.watching or ()) >= limit:
                        _logger.error(
                            "page %s: connection %d is in %d topics already (max_topics_per_connection): "
                            "not subscribed to %r",
                            self.ctx.page,
                            self.cid,
                            limit,
                            target[:100],
                        )
                        continue
                    self.custom.add(target)
                    topics.join(self, (target,))
            elif target is not None:  # a custom topic, or another page
                assert msg_type is not None
                topics.broadcast(target if scope == "topic" else f"page:{target}", frame, msg_type, msg)
            else:
                assert msg_type is not None
                topics.broadcast(self.topics[_OWN_TOPICS[scope]], frame, msg_type, msg)

    def _watch(self, on: bool, page: str) -> None:
        """Watch or stop watching the presence of ``page`` (a path or pattern),
        within ``max_topics_per_connection`` with the topics."""
        watching = self.watching
        if watching is None:
            watching = self.watching = set()
        if not on:
            if page in watching:
                watching.discard(page)
                self.reg.topics.unwatch(self, (page,))
            return
        if page in watching:
            return
        limit = self.reg.limits.max_topics_per_connection
        if len(watching) + len(self.custom or ()) >= limit:
            _logger.error(
                "page %s: connection %d is in %d topics and watches already (max_topics_per_connection): "
                "not watching %r",
                self.ctx.page,
                self.cid,
                limit,
                page[:100],
            )
            return
        watching.add(page)
        self.reg.topics.watch(self, page)

    # -- presence ------------------------------------------------------------------

    def _present(self) -> None:
        """Recompute this connection's presence meta; on joining, list it and
        send it the whole list and the others a join (at the end of this
        turn of the event loop, with the page's other joiners); on a
        change, an update to all."""
        page = self.page
        assert page.presence is not None and page.presence_codec is not None
        try:
            meta_value = page.presence(*((self.model, self.ctx) if page.presence_wants_context else (self.model,)))
            meta = page.presence_codec.encode(meta_value)
        except _Bad as bad:
            _logger.error(
                "server_presence of page %s returned a value that breaks its annotation: %s", page.name, bad.message
            )
            return
        except Exception:
            _logger.exception("server_presence of page %s raised (page %s)", page.name, self.ctx.page)
            return
        joining = self.meta is None
        if not joining and meta == self.meta:
            return
        path, cid, table = self.topics[1][5:], self.cid, self.reg.presence
        problem = table.refusal(path, cid, meta)
        if problem is not None:
            _logger.error(
                "presence of connection %d on page %s refused: %s; %s",
                cid,
                path,
                problem,
                "it is not listed" if joining else "the others see its previous meta",
            )
            return
        self.meta = meta
        table.put(path, cid, self.tag, meta, meta_value, self.ctx.session_id)
        topics = self.reg.topics
        topics.presence_changed()
        if joining:  # the list holds the other processes' entries too
            topics.join_presence(path, self)
        else:
            entry = table.entry(cid, table.pages[path][cid])
            topics.publish(self.topics[1], table.diff(updates=[entry]), skip=self)
            self.tell(table.diff(updates=[{**entry, "self": True}]))
        if topics.broker is not None:
            topics.broker.presence(path, [[cid, self.tag, meta, self.ctx.session_id]], _EMPTY)

    def _unlist(self) -> None:
        path, cid, table = self.topics[1][5:], self.cid, self.reg.presence
        self.meta = None
        if table.drop(path, cid):
            topics = self.reg.topics
            topics.presence_changed()
            topics.publish(self.topics[1], table.diff(leaves=[cid]))
            if topics.broker is not None:
                topics.broker.presence(path, _EMPTY, [cid])

    def _call(self, hook: Callable[..., Any] | None, wants_ctx: bool, msg: Any, what: str) -> Any:
        """Run a plain ``(model, msg[, server_context])`` hook; ``_FAILED`` if it raised (logged)."""
        assert hook is not None
        try:
            return hook(*((self.model, msg, self.ctx) if wants_ctx else (self.model, msg)))
        except Exception:
            _logger.exception("%s of page %s raised on %s", what, self.page.name, type(msg).__name__)
            return _FAILED

    async def _await(self, hook: Callable[..., Any] | None, wants_ctx: bool, msg: Any, what: str) -> Any:
        """Run an ``async`` hook within ``handler_timeout``; ``_FAILED`` if it failed (logged)."""
        assert hook is not None
        try:
            coro = hook(*((self.model, msg, self.ctx) if wants_ctx else (self.model, msg)))
            return await asyncio.wait_for(coro, self.reg.limits.handler_timeout)
        except Exception:
            _logger.exception("%s of page %s failed on %s", what, self.page.name, type(msg).__name__)
            return _FAILED

    def _update_now(self, value: Any, seq: int | None) -> None:
        page = self.page
        self._updated(self._call(page.update, page.update_wants_context, value, "server_update"), seq)

    def _updated(self, result: Any, seq: int | None) -> None:
        """Apply what ``server_update`` returned, unless the page ended
        meanwhile; then ``ack`` a numbered send, or answer ``internal`` (the
        model stays as it was)."""
        if self.state is _PageState.ENDED:
            return
        if result is not _FAILED and self._apply(result, "server_update"):
            if seq is not None:
                self._reply(_ack(seq))
        else:
            self._refuse(_error_reply(None, "internal", _INTERNAL_ERRORS, seq), seq)

    def _event_now(self, msg: Any) -> None:
        page = self.page
        self._evented(self._call(page.event, page.event_wants_context, msg, "server_event"))

    def _evented(self, result: Any) -> None:
        """Apply what ``server_event`` returned, unless it failed or the page ended meanwhile."""
        if result is not _FAILED and self.state is not _PageState.ENDED:
            self._apply(result, "server_event")

    async def _drain(self) -> None:
        """Run queued ``send`` messages and server events in order, one
        ``server_update`` or ``server_event`` at a time."""
        page = self.page
        try:
            while self.pending and self.state is not _PageState.ENDED:
                value, seq = self.pending.pop(0)
                self._flow()
                if type(value) is _Event:
                    if page.event_is_async:
                        self._evented(
                            await self._await(page.event, page.event_wants_context, value.msg, "server_event")
                        )
                    else:
                        self._event_now(value.msg)
                elif page.update_is_async:
                    result = await self._await(page.update, page.update_wants_context, value, "server_update")
                    self._updated(result, seq)
                else:
                    self._update_now(value, seq)
        finally:
            self.worker = None
            if not self.pending:
                self.pending = ()  # the list goes with the last message: an idle page keeps none


class _Event:
    """A server event waiting in a page session's queue, among its sends."""

    __slots__ = ("msg",)

    def __init__(self, msg: Any) -> None:
        self.msg = msg


class Response:
    """What a page's ``view`` may return instead of a ``str``: a status, a
    body, headers (a dict) and a content type, so a missing record answers
    404 and a moved one redirects (``Response("", 303, {"location": "/"})``).
    An HTML body with status 200 gets the boot data and client script, as a
    ``str`` does. Raises ``UsageError`` for a status outside 100-599 or a
    header that could split the response."""

    __slots__ = ("body", "status", "headers", "content_type")

    def __init__(
        self,
        body: str | bytes = "",
        status: int = 200,
        headers: dict[str, str] | None = None,
        content_type: str = "text/html; charset=utf-8",
    ) -> None:
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise UsageError(f"Response status must be an int from 100 to 599, got {status!r}")
        self.headers: list[tuple[bytes, bytes]] = []
        for name, value in (headers or {}).items():
            if not _TOKEN_RE.fullmatch(name) or name.lower() in _FRAMING_HEADERS:
                raise UsageError(f"Response header name {name!r} is not allowed")
            if not isinstance(value, str) or _UNSAFE_VALUE_RE.search(value):
                raise UsageError(f"Response header {name}: {value!r} has a control character or is not a str")
            self.headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        if _UNSAFE_VALUE_RE.search(content_type):
            raise UsageError(f"Response content_type {content_type!r} has a control character")
        self.body = body
        self.status = status
        self.content_type = content_type

    def __repr__(self) -> str:
        return f"Response(status={self.status}, content_type={self.content_type!r}, {len(self.body)} body)"


_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 section 5.6.2
_UNSAFE_VALUE_RE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: Headers rally.py writes itself: a view cannot set them.
_FRAMING_HEADERS: Final = frozenset(("content-length", "transfer-encoding", "connection", "date", "content-type"))


_OWN_TOPICS: Final = {"session": 0, "page": 1, "app": 2}
_FAILED: Final = object()  # a handler raised


# API descriptions: OpenAPI 3.1 of POST /_rally/rpc and AsyncAPI 3.0 of the
# page sockets, two more views made from the very dict GET /_rally/contract
# serves (docs/contract.md "API descriptions"). Their schemas are JSON Schema: 2020-12
# in OpenAPI 3.1, draft 07 in AsyncAPI 3.0 (its default schema format).

#: The JSON Schema of each contract scalar.
_JSON_SCALARS: Final[dict[str, dict[str, Any]]] = {
    "str": {"type": "string"},
    "int": {"type": "integer", "minimum": -_MAX_SAFE_INT, "maximum": _MAX_SAFE_INT},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "None": {"type": "null"},
    "bytes": {"type": "string", "contentEncoding": "base64"},
    # datetime.isoformat: no offset for a naive value, so no "date-time" format (RFC 3339 wants one)
    "datetime": {"type": "string", "description": "ISO 8601 date and time, with an offset if the value has one"},
    "date": {"type": "string", "format": "date"},
}
_REF: Final = "#/components/schemas/"
_COMPONENT_KEY_RE: Final = re.compile(r"[A-Za-z0-9_]+")
_NOT_KEY_RE: Final = re.compile(r"[^A-Za-z0-9_]+")


def _component_key(name: str) -> str:
    """A type name as a key of ``components`` (``[A-Za-z0-9._-]`` only):
    any other character as ``-<hex>-``. No type name has a ``-`` or a
    ``.``, so neither a name so written nor a key of rally.py's own
    (``rally.Id``, ``Name.Message``, ...) can be another type's key."""
    if _COMPONENT_KEY_RE.fullmatch(name):
        return name
    return "".join(c if _COMPONENT_KEY_RE.fullmatch(c) else f"-{ord(c):x}-" for c in name)


def _description(entry: Any, text: str = "") -> dict[str, str]:
    """``{"description": ...}`` of an entry's ``doc`` (if the contract has
    one) and ``text``; ``{}`` for neither."""
    doc = entry.get("doc") if isinstance(entry, dict) else None
    parts = [p for p in (doc if isinstance(doc, str) else "", text) if p]
    return {"description": "\n\n".join(parts)} if parts else {}


class _Schemas:
    """JSON Schemas of a contract's types and envelopes, for ``components``
    of an OpenAPI 3.1 (``draft07=False``: JSON Schema 2020-12, OpenAPI's
    discriminators) or an AsyncAPI 3.0 document (draft 07). Every dataclass
    and enum is a component named by ``_component_key``; a dataclass that
    travels as a message (``{"type", "fields"}``: tagged in a union, or an
    RPC, send or push) is also ``Name.Message``."""

    def __init__(self, contract: dict[str, Any], draft07: bool) -> None:
        self.contract = contract
        self.draft07 = draft07
        self.messages: set[str] = set()

    @staticmethod
    def ref(key: str) -> dict[str, Any]:
        return {"$ref": _REF + key}

    def message(self, name: str) -> dict[str, Any]:
        self.messages.add(name)
        return self.ref(_component_key(name) + ".Message")

    def of(self, text: str) -> dict[str, Any]:
        """The schema of a contract type name, such as ``list[Point | None]``."""
        return self.node(_parse_type(text))

    def node(self, node: _TypeNode) -> dict[str, Any]:
        kind, arg = node
        if kind == "scalar":
            return dict(_JSON_SCALARS[arg])
        if kind == "ref":
            return self.ref(_component_key(arg))
        if kind == "tagged":
            schema: dict[str, Any] = {"oneOf": [self.message(n) for n in arg]}
            if not self.draft07:
                mapping = {n: self.message(n)["$ref"] for n in arg}
                schema["discriminator"] = {"propertyName": "type", "mapping": mapping}
            return schema
        if kind == "literal":
            return {"enum": list(arg)}
        if kind == "optional":
            return {"anyOf": [self.node(arg), {"type": "null"}]}
        if kind == "list":
            return {"type": "array", "items": self.node(arg)}
        if kind == "tuple":
            items = [self.node(a) for a in arg]
            if self.draft07:
                return {"type": "array", "items": items, "additionalItems": False, "minItems": len(items)}
            return {"type": "array", "prefixItems": items, "items": False, "minItems": len(items)}
        return {"type": "object", "additionalProperties": self.node(arg)}  # dict[str, T]

    def obj(self, properties: dict[str, Any], optional: Iterable[str] = (), **extra: Any) -> dict[str, Any]:
        """A closed object schema; every property required but ``optional``."""
        schema: dict[str, Any] = {**extra, "type": "object", "properties": properties}
        required = [p for p in properties if p not in set(optional)]
        if required:
            schema["required"] = required
        schema["additionalProperties"] = False
        return schema

    def components(self) -> dict[str, Any]:
        """Every type of the contract, rally.py's own schemas, and the
        ``Name.Message`` of each message type asked for so far (call it
        last)."""
        out: dict[str, Any] = {}
        for name, t in self.contract["types"].items():
            if "enum" in t:
                kinds = sorted({"string" if isinstance(v, str) else "integer" for v in t["enum"]})
                out[_component_key(name)] = {
                    **_description(t),
                    "type": kinds[0] if len(kinds) == 1 else kinds,
                    "enum": t["enum"],
                }
                continue
            defaults = t.get("defaults", {})
            props: dict[str, Any] = {}
            for field, text in t["fields"].items():
                props[field] = self.of(text)
                if field in defaults:
                    if self.draft07 and "$ref" in props[field]:  # draft 07 ignores what stands beside $ref
                        props[field] = {"allOf": [props[field]]}
                    props[field]["default"] = defaults[field]
            out[_component_key(name)] = self.obj(props, defaults, **_description(t))
        int_ = _JSON_SCALARS["int"]
        out["rally.Id"] = {
            "description": "The id the client chose for a call, echoed in its answer",
            "oneOf": [int_, {"type": "string", "maxLength": _MAX_ID_CHARS}],
        }
        out["rally.ErrorItem"] = self.obj({"path": {"type": "string"}, "message": {"type": "string"}})
        seq = {"type": "integer", "minimum": 1, "maximum": _MAX_SAFE_INT}
        out["rally.Error"] = self.obj(
            {
                "kind": {"const": "error"},
                "id": {"anyOf": [self.ref("rally.Id"), {"type": "null"}]},
                "seq": seq,
                "code": {"enum": list(_ERROR_STATUS)},
                "errors": {"type": "array", "items": self.ref("rally.ErrorItem")},
            },
            ["seq"],
            description='An error envelope (docs/protocol.md "Wire protocol"): null id for an answer to a send or to '
            "a frame without an id; seq of a refused numbered send",
        )
        for name, rpc in self.contract["rpc"].items():
            key = "rpc." + _component_key(name)
            out[key] = self.obj(
                {
                    "kind": {"const": "rpc"},
                    "id": self.ref("rally.Id"),
                    "key": {"type": "string", "minLength": 1, "maxLength": _MAX_ID_CHARS},
                    "msg": self.message(name),
                },
                ["key"],
                **_description(rpc, f"Call {name}; answered by {key}.Answer"),
            )
            ok = self.obj({"kind": {"const": "ok"}, "id": self.ref("rally.Id"), "value": self.of(rpc["result"])})
            if rpc["error"] is None:
                out[key + ".Answer"] = {"description": f"The answer of {name}: its result", **ok}
            else:
                err = self.obj({"kind": {"const": "err"}, "id": self.ref("rally.Id"), "error": self.of(rpc["error"])})
                out[key + ".Answer"] = {"description": f"The answer of {name}: its result or error", "oneOf": [ok, err]}
        for name in sorted(self.messages):
            key = _component_key(name)
            out[key + ".Message"] = self.obj({"type": {"const": name}, "fields": self.ref(key)})
        return out


def _openapi(contract: dict[str, Any]) -> str:
    """An OpenAPI 3.1 document of a contract: ``POST /_rally/rpc`` taking
    each RPC's envelope (``rpc.Name``, one of them by its ``msg.type``) and
    answering each one's ``rpc.Name.Answer`` (which one for which call is
    ``x-rally-rpc``, and the operation's description), the error envelope
    by status; every type under ``components/schemas``."""
    s = _Schemas(contract, draft07=False)
    rpcs = contract["rpc"]
    #: each RPC's request and answer schemas, by message type
    calls = {
        n: {"request": f"{_REF}rpc.{_component_key(n)}", "answer": f"{_REF}rpc.{_component_key(n)}.Answer"}
        for n in rpcs
    }
    listing = "".join(
        f"\n- `{n}` answers `{r['result']}`" + (f", or the error `{r['error']}`" if r["error"] else "")
        for n, r in rpcs.items()
    )
    request: dict[str, Any] = {"oneOf": [{"$ref": c["request"]} for c in calls.values()]}
    if not calls:  # every call is unknown_type: any envelope
        request = {"type": "object"}

    def error(what: str, *codes: str) -> dict[str, Any]:
        schema = {"allOf": [s.ref("rally.Error"), {"properties": {"code": {"enum": list(codes)}}}]}
        return {"description": what, "content": {"application/json": {"schema": schema}}}

    def refused(what: str) -> dict[str, Any]:
        return {"description": what, "content": {"text/plain": {"schema": {"type": "string"}}}}

    responses: dict[str, Any] = {}
    if calls:
        responses["200"] = {
            "description": "The handler's answer: an ok envelope with its result, or an err envelope with its "
            "error (for a handler that returns rally.Result)",
            "content": {"application/json": {"schema": {"anyOf": [{"$ref": c["answer"]} for c in calls.values()]}}},
        }
    responses |= {
        "400": error(
            "Bad JSON, a bad envelope, a value that breaks the contract (invalid), or no RPC handles "
            "that message type (unknown_type)",
            "invalid",
            "unknown_type",
        ),
        "403": refused("A cross-origin request from an Origin not in allowed_origins"),
        "409": error("The Rally-Contract header names another contract (stale_contract)", "stale_contract"),
        "413": error("The body, a string, an array or an object is over its limit (too_large)", "too_large"),
        "415": refused("The Content-Type is not application/json"),
        "422": error("The idempotency key was used for another message (key_reused)", "key_reused"),
        "500": error(
            "The handler raised, timed out, or returned a value that breaks its annotation (internal)", "internal"
        ),
        "503": {
            "description": "This session has as many keyed calls running as it may keep answers (busy, an error "
            "envelope); or the server is at max_connections (plain text, connection closed)",
            "content": {
                "application/json": error("", "busy")["content"]["application/json"],
                "text/plain": {"schema": {"type": "string"}},
            },
        },
    }
    header = {"schema": {"type": "string"}, "required": False}
    operation = {
        "operationId": "rpc",
        "summary": "Call an RPC",
        "description": "One rpc envelope per request, msg.type naming the RPC:" + (listing or " (this app has none)"),
        "parameters": [
            {
                "name": "Rally-Contract",
                "in": "header",
                **header,
                "description": "The contract hash the client was made for; another one is answered 409 stale_contract",
            },
            {
                "name": "Rally-Page",
                "in": "header",
                **header,
                "description": "The page path the call comes from: fills server_context.page and params",
            },
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
        "responses": responses,
        "x-rally-rpc": calls,
    }
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "rally.py app",
            "version": contract["hash"],
            "description": "The RPCs of a rally.py app, made from its contract (GET /_rally/contract); "
            "version is the contract hash",
        },
        "paths": {"/_rally/rpc": {"post": operation}},
    }
    doc["components"] = {"schemas": s.components()}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _asyncapi(contract: dict[str, Any]) -> str:
    """An AsyncAPI 3.0 document of a contract, from the server's side: one
    channel per page, addressed ``/_rally/ws?page=<route>`` with the route's
    parameters (AsyncAPI parameters are strings: the type of each is in its
    description); an operation ``receive`` of what the client sends (its
    ToServer types in send envelopes, RPCs, acks) and one ``send`` of what
    the server sends (its ToClient types in push envelopes, answers, errors,
    acks, hello, presence); every type under ``components/schemas``."""
    s = _Schemas(contract, draft07=True)
    seq = {"type": "integer", "minimum": 1, "maximum": _MAX_SAFE_INT}
    messages: dict[str, Any] = {}

    def message(key: str, title: str, payload: dict[str, Any], summary: str) -> dict[str, Any]:
        messages.setdefault(key, {"name": key, "title": title, "summary": summary, "payload": payload})
        return {"$ref": "#/components/messages/" + key}

    def common(kind: str) -> dict[str, dict[str, Any]]:
        """The protocol's own messages of every page, by who sends them."""
        out: dict[str, dict[str, Any]] = {}
        if kind == "receive":
            out["rally.ack"] = message(
                "rally.ack",
                "ack",
                s.obj({"kind": {"const": "ack"}, "seq": {**seq, "minimum": 0}}),
                'The page has every numbered frame up to seq (docs/delivery.md "Delivery across reconnects")',
            )
            if contract["rpc"]:
                out["rally.rpc"] = message(
                    "rally.rpc",
                    "rpc",
                    {"oneOf": [s.ref("rpc." + _component_key(n)) for n in contract["rpc"]]},
                    "An RPC call, answered on this socket as over POST /_rally/rpc",
                )
            return out
        if contract["rpc"]:
            out["rally.answer"] = message(
                "rally.answer",
                "answer",
                {"anyOf": [s.ref(f"rpc.{_component_key(n)}.Answer") for n in contract["rpc"]]},
                "The answer to an RPC call: its id, and its result or error",
            )
        out["rally.error"] = message("rally.error", "error", s.ref("rally.Error"), "An error envelope")
        out["rally.ack.applied"] = message(
            "rally.ack.applied",
            "ack",
            s.obj({"kind": {"const": "ack"}, "seq": seq}),
            "The send with this seq was applied",
        )
        out["rally.hello"] = message(
            "rally.hello",
            "hello",
            s.obj(
                {
                    "kind": {"const": "hello"},
                    "resume": {"type": "string"},
                    "resumed": {"type": "boolean"},
                    "ack": {**seq, "minimum": 0},
                }
            ),
            'First frame to a page that said &last= (docs/delivery.md "Delivery across reconnects")',
        )
        return out

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for route, page in contract["pages"].items():
        cid = _NOT_KEY_RE.sub("_", route).strip("_") or "root"
        while cid in channels:
            cid += "_"
        params = page["params"]
        channel_messages: dict[str, dict[str, Any]] = {}
        sends = common("receive")
        for name in _message_names(page["to_server"]):
            sends["send." + _component_key(name)] = message(
                "send." + _component_key(name),
                name,
                s.obj({"kind": {"const": "send"}, "seq": seq, "msg": s.message(name)}, ["seq"]),
                f"Send {name} to the page's server_update",
            )
        pushes = common("send")
        for name in _message_names(page["to_client"]):
            pushes["push." + _component_key(name)] = message(
                "push." + _component_key(name),
                name,
                s.obj({"seq": seq, "kind": {"const": "push"}, "msg": s.message(name)}, ["seq"]),
                f"Push {name} from the page's server",
            )
        if page["presence"] is not None:
            entry = s.obj(
                {
                    "id": _JSON_SCALARS["int"],
                    "tag": {"type": "string"},
                    "self": {"type": "boolean"},
                    "meta": s.of(page["presence"]),
                }
            )
            entries = {"type": "array", "items": entry}
            key = "presence." + _component_key(page["presence"])
            pushes[key] = message(
                key,
                "presence",
                {
                    "oneOf": [
                        s.obj({"seq": seq, "kind": {"const": "presence"}, "state": entries}, ["seq"]),
                        s.obj(
                            {
                                "seq": seq,
                                "kind": {"const": "presence"},
                                "joins": entries,
                                "updates": entries,
                                "leaves": {"type": "array", "items": _JSON_SCALARS["int"]},
                            },
                            ["seq"],
                        ),
                    ]
                },
                f"Who is on the page: the whole list (state), then changes; meta is {page['presence']}",
            )
        for k, ref in (*sends.items(), *pushes.items()):
            channel_messages[k] = ref
        kinds = ", ".join(f"{p}: {t}" for p, t in params.items())
        channels[cid] = {
            "address": "/_rally/ws?page=" + route,
            "title": route,
            **_description(
                page,
                f"The WebSocket of the page {route}"
                + (f" (route parameters {kinds}: AsyncAPI parameters are strings)" if params else "")
                + ("" if page["stateful"] else "; the page has no server_update, so a send is not_stateful"),
            ),
            "messages": channel_messages,
        }
        if params:
            channels[cid]["parameters"] = {p: {"description": f"route parameter {p}, {t}"} for p, t in params.items()}
        for action, sent in (("receive", sends), ("send", pushes)):
            operations[f"{cid}.{action}"] = {
                "action": action,
                "channel": {"$ref": f"#/channels/{cid}"},
                "summary": ("What the client sends to " if action == "receive" else "What the server sends on ")
                + route,
                "messages": [{"$ref": f"#/channels/{cid}/messages/{k}"} for k in sent],
            }
    doc = {
        "asyncapi": "3.0.0",
        "info": {
            "title": "rally.py app",
            "version": contract["hash"],
            "description": "The page WebSockets of a rally.py app, made from its contract (GET /_rally/contract), "
            "from the server's side: receive is what a client sends, send what the server sends; "
            "version is the contract hash",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
    }
    doc["components"] = {"schemas": s.components(), "messages": messages}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# Routing: a request head becomes one of these actions.


class _Answer(typing.NamedTuple):
    """A whole response to write."""

    status: int
    body: bytes
    content_type: bytes = b"text/plain; charset=utf-8"
    headers: Sequence[tuple[bytes, bytes]] = ()


class _ReadBody(typing.NamedTuple):
    """Read the request's body (answering ``Expect: 100-continue``), then
    ``handle(router, request, client, body)`` gives the answer, now or as an
    awaitable."""

    handle: Callable[[_Router, _Request, tuple[str, int] | None, bytes], _Answer | Awaitable[_Answer]]


class _SendFile(typing.NamedTuple):
    """Stream an open file as a 200 response (or the ``size`` bytes from
    ``offset`` as a 206), with backpressure."""

    file: typing.BinaryIO
    size: int  # the bytes sent: the Content-Length
    content_type: bytes
    headers: Sequence[tuple[bytes, bytes]]
    status: int = 200
    offset: int = 0


class _Upgrade(typing.NamedTuple):
    """An accepted WebSocket handshake: the 101's headers and who serves it."""

    headers: list[tuple[bytes, bytes]]
    ctx: ServerContext
    page: _Page | None
    raw: _RawRoute | None
    stale: bool  # the page's contract hash differs: refuse with 4000 after the upgrade
    tag: str  # the session's presence tag
    resumable: bool = False  # the page numbers what it receives (it sent &last=)
    resume: _PageSession | None = None  # the held session this connection goes on with
    last: int = 0  # the last frame the page received of it
    subprotocol: str | None = None  # a raw route's, agreed in the handshake


_Action = _Answer | _ReadBody | _SendFile | _Upgrade | Awaitable[_Answer]


def _refusal(exc: ProtocolError, req: _Request | None) -> _Answer:
    """The one place a refusal becomes an HTTP answer."""
    if exc.status == 413 and req is not None and req.path == "/_rally/rpc":
        body = _error_reply(None, "too_large", [{"path": "", "message": str(exc)}])
        return _Answer(413, body, b"application/json", exc.headers)
    return _Answer(exc.status, str(exc).encode() + b"\n", headers=exc.headers)


#: What a cross-origin RPC may send: every request header of the browser
#: client's and the docs page's ``fetch`` (Content-Type, Rally-Contract, Rally-Page).
_CORS_ALLOW_HEADERS: Final = b"content-type, rally-contract, rally-page"
#: Seconds a browser may keep a preflight's answer: a change of
#: ``allowed_origins`` reaches browsers within ten minutes.
_CORS_MAX_AGE: Final = b"600"
_RPC_METHODS: Final = (b"OPTIONS", b"POST")


def _allow(req: _Request, *methods: bytes) -> None:
    if req.method not in methods:
        raise ProtocolError("method not allowed", 405, headers=((b"allow", b", ".join(methods)),))


class _Router:
    """Turns a request head into an action: an answer, a body to read for an
    RPC, a file to stream, or an accepted WebSocket upgrade. The fixed
    ``/_rally/*`` routes are a table; then raw WebSocket routes, static
    prefixes and pages. The host allowlist, the origin rule and the signed
    session cookie are checked here, before any page or upgrade, and the
    CORS headers of an RPC from an origin of ``allowed_origins`` are made
    here (``_cors``, ``_preflight``, ``refusal``). Refusals raise
    ``ProtocolError``; no sockets.
    """

    def __init__(self, app: App, loopback: bool) -> None:
        self.app = app
        self.reg = app._registry
        self.limits = app._limits
        self.secret = app._secret
        hosts = app.allowed_hosts
        self.hosts = hosts if hosts is not None else _LOOPBACK_HOSTS if loopback else None
        self.host_ok: dict[bytes, bool] = {}
        # Connection ids count up from a random start below 2**52, drawn per
        # server (so after a fork): unique across the processes of a cluster
        # unless two ranges overlap (for two servers of n connections each, a
        # chance of about 2n in 2**52), and below 2**53, exact in JavaScript.
        self.ids = itertools.count(secrets.randbelow(2**52) + 1)
        #: declarations, docs page, OpenAPI and AsyncAPI documents: (contract hash, body, ETag), made once per contract
        self.views: dict[Callable[[dict[str, Any]], str], tuple[str, bytes, bytes]] = {}

    def route(self, req: _Request, client: tuple[str, int] | None) -> _Action:
        hosts = self.hosts
        if hosts is not None and not (self.host_ok.get(req.headers.get(b"host", b"")) or self._host_ok(req)):
            _logger.warning(
                "refused request from %s: Host %r is not in allowed_hosts %s",
                client[0] if client else "-",
                _header(req, b"host"),
                sorted(hosts),
            )
            raise ProtocolError("host not allowed", 400)
        fixed = _FIXED_ROUTES.get(req.path)
        if fixed is not None:
            return fixed(self, req, client)
        reg = self.reg
        raw = reg.raw_routes.get(req.path)
        if raw is not None:
            _allow(req, b"GET")
            self._check_origin(req, client)
            return self._upgrade(req, client, raw.path, None, {}, raw)
        for prefix, directory in reg.static:
            if req.path.startswith(prefix):
                _allow(req, b"GET", b"HEAD")
                return self._static(req, req.path[len(prefix) :], directory)
        found = reg.match_page(req.path)
        if found is None:
            raise ProtocolError("not found", 404)
        _allow(req, b"GET", b"HEAD")
        return self._page(req, client, *found)

    # -- the fixed routes --------------------------------------------------------

    def _rpc(self, req: _Request, client: tuple[str, int] | None) -> _Action:
        if req.method != b"POST":
            if req.method == b"OPTIONS":
                return self._preflight(req, client)
            _allow(req, *_RPC_METHODS)
        self._check_origin(req, client)
        if req.headers.get(b"content-type") != b"application/json":  # what the clients send; else parse it
            ctype = (_header(req, b"content-type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise ProtocolError("RPC requires Content-Type: application/json", 415)
        expected = _header(req, b"rally-contract") if b"rally-contract" in req.headers else None
        if expected is not None and expected != self.reg.contract()[1]:
            errors = [{"path": "", "message": "the server's contract changed; reload"}]
            return _Answer(409, _error_reply(None, "stale_contract", errors), b"application/json", self._cors(req))
        return _READ_RPC

    def _preflight(self, req: _Request, client: tuple[str, int] | None) -> _Answer:
        """``OPTIONS /_rally/rpc``: the CORS preflight a browser sends before
        a cross-origin ``fetch`` with a JSON body. For an Origin in
        ``allowed_origins``, 204 allowing POST with the client's headers and
        credentials; a foreign (or repeated) Origin is refused 403 like its
        POST would be; without an Origin, or from the page's own, it is no
        preflight and the answer says which methods the route takes."""
        self._check_origin(req, client)
        cors = self._cors(req)
        if not cors:
            return _Answer(204, b"", headers=((b"allow", b", ".join(_RPC_METHODS)),))
        cors += [
            (b"access-control-allow-methods", b"POST"),
            (b"access-control-allow-headers", _CORS_ALLOW_HEADERS),
            (b"access-control-max-age", _CORS_MAX_AGE),
        ]
        return _Answer(204, b"", headers=cors)

    def _rpc_body(self, req: _Request, client: tuple[str, int] | None, body: bytes) -> _Answer | Awaitable[_Answer]:
        reg = self.reg
        try:
            kind, msg_id, msg, key = _parse_envelope(reg.json.loads(body))
            if kind != "rpc":
                raise ContractError(
                    "invalid",
                    [{"path": "kind", "message": f'POST /_rally/rpc takes "rpc" envelopes, not "{kind}"'}],
                )
        except ContractError as exc:
            status, body = _ERROR_STATUS[exc.code], _error_reply(None, exc.code, exc.errors)
            return _Answer(status, body, b"application/json", self._cors(req))
        headers = req.headers
        page = _header(req, b"rally-page") if b"rally-page" in headers else None
        found = reg.match_page(page) if page else None
        sid = _session_from_cookie(_header(req, b"cookie"), self.secret) if b"cookie" in headers else None
        if sid is None:  # a one-shot session (pages set cookies): no retry can be in it, so nothing is kept for one
            sid, key = _new_session_id(), None
        ctx = ServerContext(sid, page if found else None, found[1] if found else {}, req.raw_headers, client, None, reg)
        reply = reg.rpc(msg_id, msg, ctx, key)
        cors = self._cors(req) if b"origin" in req.headers else ()
        if isinstance(reply, tuple):
            return _Answer(reply[0], reply[1], b"application/json", cors)
        return _json_answer(reply, cors)

    def _socket(self, req: _Request, client: tuple[str, int] | None) -> _Action:
        _allow(req, b"GET")
        self._check_origin(req, client)
        try:
            qs = urllib.parse.parse_qs(req.query, max_num_fields=8, strict_parsing=bool(req.query))
        except ValueError:
            raise ProtocolError("malformed query", 400) from None
        pages = qs.get("page") or [""]
        found = self.reg.match_page(pages[0]) if len(pages) == 1 and pages[0] else None
        if found is None:
            raise ProtocolError("no page at ?page=", 404)
        sent_hash = qs["contract"][0] if "contract" in qs else None
        stale = sent_hash is not None and sent_hash != self.reg.contract()[1]
        up = self._upgrade(req, client, pages[0], found[0], found[1], None, stale)
        if "last" not in qs:
            return up
        last = qs["last"][0]
        if not last.isdigit() or len(last) > 16:
            raise ProtocolError("malformed query: last must be a frame number", 400)
        token = qs["resume"][0] if "resume" in qs else None
        if token is None:
            return up._replace(resumable=True)
        pages_held = self.reg.held
        if pages_held.get(token) is None:
            if self.reg.topics.broker is not None:
                self.reg.topics.broker.release(token, up.ctx.session_id)  # another process may hold it
            return up._replace(resumable=True)
        held = pages_held.take(token, up.ctx.session_id, pages[0], int(last))
        if held is None or stale:
            if held is not None:
                held.close(1000, "replaced by a new connection")  # it cannot go on: it ends now
            return up._replace(resumable=True)
        return up._replace(resumable=True, resume=held, last=int(last))

    def _client_js(self, req: _Request, client: tuple[str, int] | None) -> _Action:
        _allow(req, b"GET", b"HEAD")
        return _cached(req, _CLIENT_JS_BYTES, b"application/javascript; charset=utf-8", _CLIENT_JS_ETAG)

    def _contract(self, req: _Request, client: tuple[str, int] | None) -> _Action:
        _allow(req, b"GET", b"HEAD")
        doc, digest = self.reg.contract()
        return _cached(req, doc, b"application/json", b'"' + digest.encode() + b'"')

    def _types(self, req: _Request, client: tuple[str, int] | None) -> _Action:
        _allow(req, b"GET", b"HEAD")
        return self._view(req, _typescript, b"application/typescript; charset=utf-8")

    def _docs(self, req: _Request, client: tuple[str, int] | None) -> _Action:
        answer = self._docs_view(req, _docs_html, b"text/html; charset=utf-8")
        return answer._replace(headers=[*answer.headers, (b"content-security-policy", _DOCS_CSP)])

    def _openapi_doc(self, req: _Request, client: tuple[str, int] | None) -> _Action:
        return self._docs_view(req, _openapi, b"application/json")

    def _asyncapi_doc(self, req: _Request, client: tuple[str, int] | None) -> _Action:
        return self._docs_view(req, _asyncapi, b"application/json")

    def _docs_view(self, req: _Request, make: Callable[[dict[str, Any]], str], content_type: bytes) -> _Answer:
        """A document of the ones ``App(docs=False)`` turns off (404)."""
        if not self.app.docs:
            raise ProtocolError("not found", 404)
        _allow(req, b"GET", b"HEAD")
        return self._view(req, make, content_type)

    def _view(self, req: _Request, make: Callable[[dict[str, Any]], str], content_type: bytes) -> _Answer:
        """A document made from the contract, with an ETag of its bytes."""
        doc, digest = self.reg.contract()
        made = self.views.get(make)
        if made is None or made[0] != digest:
            body = make(json.loads(doc)).encode()
            made = self.views[make] = (digest, body, b'"' + hashlib.sha256(body).hexdigest()[:16].encode() + b'"')
        return _cached(req, made[1], content_type, made[2])

    def _health(self, req: _Request, client: tuple[str, int] | None) -> _Action:
        _allow(req, b"GET", b"HEAD")
        broker = self.app.broker
        report = _NO_BROKER if broker is None else broker.health()
        body = _dumps({"status": "ok", "connections": self.app.connections(), "broker": report})
        return _Answer(200, body, b"application/json", ((b"cache-control", b"no-store"),))

    # -- checks -------------------------------------------------------------------

    def _host_ok(self, req: _Request) -> bool:
        """The Host is in ``allowed_hosts``; the answer for a Host value is
        kept (a few values at most reach a server, each costs one lookup)."""
        value = req.headers.get(b"host")
        if value is None:
            return False
        ok = self.host_ok.get(value)
        if ok is None:
            assert self.hosts is not None
            ok = _host_allowed(value.decode("latin-1"), self.hosts)
            if len(self.host_ok) < 64:
                self.host_ok[value] = ok
        return ok

    def _session(self, req: _Request) -> tuple[str, list[tuple[bytes, bytes]]]:
        """The session id, and the Set-Cookie header to send if it is new."""
        sid = _session_from_cookie(_header(req, b"cookie"), self.secret)
        if sid is not None:
            return sid, []
        sid = _new_session_id()
        return sid, [(b"set-cookie", _session_cookie(sid, self.secret, self.app.secure_cookies))]

    def refusal(self, exc: ProtocolError, req: _Request | None) -> _Answer:
        """The answer refusing ``req``: an answer to an RPC from an Origin in
        ``allowed_origins`` carries the CORS headers, so the page that sent
        it can read why (a 413 ``too_large``, a 415)."""
        answer = _refusal(exc, req)
        if req is not None and req.path == "/_rally/rpc" and b"origin" in req.headers:
            cors = self._cors(req)
            if cors:
                return answer._replace(headers=[*answer.headers, *cors])
        return answer

    def _cors(self, req: _Request) -> list[tuple[bytes, bytes]]:
        """The CORS headers of an answer to an RPC from ``req``'s Origin:
        for one listed in ``allowed_origins`` that is not the page's own,
        that origin (one of the app's own values, never the request's bytes),
        with credentials; none for any other, or a repeated Origin."""
        origin = _header(req, b"origin")
        if origin is None or origin not in self.app.allowed_origins or b"origin" in req.repeated:
            return []
        if _origin_allowed(origin, _header(req, b"host"), frozenset()):
            return []  # the page's own origin: same-origin, nothing to allow
        return [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-credentials", b"true"),
            (b"vary", b"origin"),
        ]

    def _check_origin(self, req: _Request, client: tuple[str, int] | None) -> None:
        if b"origin" not in req.headers:  # not a browser: it holds no victim's cookie
            return
        origin = _header(req, b"origin")
        host = _header(req, b"host")
        if b"origin" not in req.repeated and _origin_allowed(origin, host, self.app.allowed_origins):
            return
        _logger.warning(
            "refused cross-origin request from %s: Origin %r, expected http(s)://%s or one of allowed_origins %s",
            client[0] if client else "-",
            "(repeated)" if b"origin" in req.repeated else origin,
            host,
            sorted(self.app.allowed_origins),
        )
        raise ProtocolError("cross-origin request refused", 403)

    def _check_handshake(self, req: _Request) -> str:
        """Check a WebSocket handshake's headers (RFC 6455 section 4.2.1); returns its key."""
        connection = [t.strip() for t in (_header(req, b"connection") or "").lower().split(",")]
        if (_header(req, b"upgrade") or "").lower() != "websocket" or "upgrade" not in connection:
            raise ProtocolError("WebSocket upgrade required", 426, headers=((b"upgrade", b"websocket"),))
        if _header(req, b"sec-websocket-version") != "13":
            raise ProtocolError("WebSocket version 13 required", 426, headers=((b"sec-websocket-version", b"13"),))
        key = _header(req, b"sec-websocket-key") or ""
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            valid_key = False
        if not valid_key:
            raise ProtocolError("bad Sec-WebSocket-Key", 400)
        return key

    # -- answers ------------------------------------------------------------------

    def _upgrade(
        self,
        req: _Request,
        client: tuple[str, int] | None,
        page_path: str,
        page: _Page | None,
        params: dict[str, Any],
        raw: _RawRoute | None,
        stale: bool = False,
    ) -> _Upgrade:
        key = self._check_handshake(req)
        subprotocol = None if raw is None or not raw.subprotocols else _pick_subprotocol(req, raw.subprotocols)
        sid, cookie = self._session(req)
        ctx = ServerContext(sid, page_path, params, _pack_headers(req.raw_headers), client, next(self.ids), self.reg)
        headers = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", _ws_accept(key.encode())),
            *cookie,
        ]
        if subprotocol is not None:
            headers.append((b"sec-websocket-protocol", subprotocol.encode()))
        tag = ""  # only a page with presence lists its connections, each with its session's tag
        if page is not None and page.presence is not None:
            tag = hmac.new(self.secret, b"presence:" + sid.encode(), hashlib.sha256).hexdigest()[:16]
        return _Upgrade(headers, ctx, page, raw, stale, tag, subprotocol=subprotocol)

    def _static(self, req: _Request, rel: str, directory: str) -> _Action:
        parts = rel.split("/")
        if any(p in ("..", ".") or "\\" in p or "\0" in p for p in parts) or rel.startswith("/"):
            raise ProtocolError("not found", 404)
        root = os.path.realpath(directory)
        full = os.path.realpath(os.path.join(root, *[p for p in parts if p]))
        if not full.startswith(root + os.sep):
            raise ProtocolError("not found", 404)
        try:
            # Non-blocking: opening a FIFO for reading would otherwise wait for
            # a writer, with the event loop. A regular file's reads ignore it.
            fd = os.open(full, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            raise ProtocolError("not found", 404) from None
        import mimetypes  # only apps that serve files pay for its tables
        import stat

        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a directory, a FIFO, a device
            os.close(fd)
            raise ProtocolError("not found", 404)
        f = os.fdopen(fd, "rb")  # the _SendFile closes it
        size = st.st_size
        etag = f'"{st.st_mtime_ns:x}-{size:x}"'.encode()
        # RFC 9110 section 8.8.2.1: never a Last-Modified later than the Date.
        modified = min(int(st.st_mtime), int(time.time()))
        headers = [(b"etag", etag), (b"last-modified", _imf_fixdate(modified)), (b"cache-control", b"no-cache")]
        if _not_modified(req, etag, modified):
            f.close()
            return _Answer(304, b"", b"", headers)
        ctype = mimetypes.guess_type(full)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
            ctype += "; charset=utf-8"
        headers.append((b"accept-ranges", b"bytes"))
        span = _byte_range(req, size, etag, modified)
        if span is True:
            return _SendFile(f, size, ctype.encode(), headers)
        if span is False:
            f.close()
            headers.append((b"content-range", b"bytes */%d" % size))
            return _Answer(416, b"range not satisfiable\n", headers=headers)
        first, last = span
        headers.append((b"content-range", b"bytes %d-%d/%d" % (first, last, size)))
        return _SendFile(f, last - first + 1, ctype.encode(), headers, 206, first)

    def _page(self, req: _Request, client: tuple[str, int] | None, page: _Page, params: dict[str, Any]) -> _Action:
        sid, cookie = self._session(req)
        boot = {"page": req.path, "params": params, "contract": self.reg.contract()[1], "stateful": page.stateful}
        if page.view is None:
            assert page.html is not None
            return _Answer(200, _html_boot(page.html, boot).encode(), b"text/html; charset=utf-8", cookie)
        ctx = ServerContext(sid, req.path, params, req.raw_headers, client, None, self.reg)
        kwargs = dict(params)
        if page.view_wants_context:
            kwargs[page.view_wants_context] = ctx
        return self._render(page, kwargs, boot, cookie)

    async def _render(
        self, page: _Page, kwargs: dict[str, Any], boot: dict[str, Any], cookie: list[tuple[bytes, bytes]]
    ) -> _Answer:
        assert page.view is not None
        result = page.view(**kwargs)
        if inspect.isawaitable(result):
            result = await asyncio.wait_for(result, self.limits.handler_timeout)
        if isinstance(result, str):
            return _Answer(200, _html_boot(result, boot).encode(), b"text/html; charset=utf-8", cookie)
        if not isinstance(result, Response):
            raise UsageError(f"view of page {page.name} returned {type(result).__name__}, expected str or Response")
        body = result.body
        if isinstance(body, str):
            if result.status == 200 and result.content_type.startswith("text/html"):
                body = _html_boot(body, boot)
            body = body.encode()
        return _Answer(result.status, body, result.content_type.encode("latin-1"), [*result.headers, *cookie])


def _header(req: _Request, name: bytes) -> str | None:
    value = req.headers.get(name)
    return None if value is None else value.decode("latin-1")


def _pick_subprotocol(req: _Request, supported: tuple[str, ...]) -> str | None:
    """The subprotocol of a raw route's handshake (RFC 6455 section 4.2.2): the
    first of the client's Sec-WebSocket-Protocol offers that the route
    supports, in the client's order (section 4.1: its offers are "ordered by
    preference"); None when it offers none. A client offering only others is
    refused 400: a browser would fail a 101 without one of its offers."""
    offers = [o.strip(" \t") for o in (_header_list(req, b"sec-websocket-protocol") or "").split(",")]
    offers = [o for o in offers if o]
    if not offers:
        return None
    for offer in offers:
        if offer in supported:
            return supported[supported.index(offer)]  # the route's own string goes into the 101
    raise ProtocolError("no supported WebSocket subprotocol; this route speaks " + ", ".join(supported), 400)


def _header_list(req: _Request, name: bytes) -> str | None:
    """A list-valued header: its lines joined by ", " when it came more than
    once (RFC 9110 section 5.3)."""
    if name in req.repeated:
        return ", ".join(v.decode("latin-1") for k, v in req.raw_headers if k == name)
    return _header(req, name)


_ENTITY_TAG_RE: Final = re.compile(r'[ \t]*(?:W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|$)')
_LIST_GAP_RE: Final = re.compile(r"[ \t]*(?:,|$)")


def _etag_matches(value: str, etag: bytes) -> bool:
    """Whether an If-None-Match value matches ``etag``: ``*``, or a list of
    entity-tags one of which matches by the weak comparison (``W/"x"``
    matches ``"x"``; RFC 9110 sections 8.8.3.2 and 13.1.2). A value that is
    not a list of entity-tags matches nothing."""
    if value.strip(" \t") == "*":
        return True
    opaque = etag.decode("latin-1").removeprefix("W/")
    pos, end, found = 0, len(value), False
    while pos < end:
        m = _ENTITY_TAG_RE.match(value, pos) or _LIST_GAP_RE.match(value, pos)  # empty elements are allowed
        if m is None or m.end() == pos:
            return False
        found = found or (m.lastindex == 1 and m.group(1) == opaque)
        pos = m.end()
    return found


def _not_modified(req: _Request, etag: bytes, modified: int | None = None) -> bool:
    """Whether a GET or HEAD is answered 304 (RFC 9110 section 13.2.2):
    If-None-Match decides when present; otherwise If-Modified-Since, for an
    answer with a Last-Modified of ``modified`` (seconds since the epoch).
    An If-Modified-Since that is not one HTTP-date is ignored."""
    none_match = _header_list(req, b"if-none-match")
    if none_match is not None:
        return _etag_matches(none_match, etag)
    since = _header(req, b"if-modified-since")
    if modified is None or since is None or b"if-modified-since" in req.repeated:
        return False
    date = _parse_http_date(since)
    return date is not None and modified <= date


def _cached(req: _Request, body: bytes, content_type: bytes, etag: bytes) -> _Answer:
    headers = [(b"etag", etag), (b"cache-control", b"no-cache")]
    if _not_modified(req, etag):
        return _Answer(304, b"", b"", headers)
    return _Answer(200, body, content_type, headers)


_RANGE_RE: Final = re.compile(r"bytes=[ \t]*([0-9]*)-([0-9]*)[ \t]*", re.IGNORECASE)


def _byte_range(req: _Request, size: int, etag: bytes, modified: int) -> tuple[int, int] | bool:
    """What a static file's Range asks for (RFC 9110 sections 13.1.5, 14.1.2,
    14.2): ``(first, last)`` byte positions; ``True`` for the whole file (no
    Range, a HEAD, several ranges, a malformed or repeated Range, or an
    If-Range that does not match); ``False`` when unsatisfiable (416)."""
    value = _header(req, b"range")
    if value is None or req.method != b"GET" or b"range" in req.repeated:
        return True
    m = _RANGE_RE.fullmatch(value)
    if m is None:  # several ranges, another unit, not a range: served whole, as section 14.2 allows
        return True
    first, last = m.groups()
    if (not first and not last) or (first and last and int(last) < int(first)):
        return True  # not a valid range-spec
    if_range = _header(req, b"if-range")
    if if_range is not None and not _if_range_matches(if_range.strip(" \t"), etag, modified):
        return True
    if not first:  # the last n bytes
        n = int(last)
        if n == 0:
            return False
        return (max(0, size - n), size - 1) if size else True
    start = int(first)
    if start >= size:
        return False
    return start, size - 1 if not last else min(int(last), size - 1)


def _if_range_matches(value: str, etag: bytes, modified: int) -> bool:
    """If-Range (RFC 9110 section 13.1.5): an entity-tag matches by the strong
    comparison (never a weak one); a date matches when it is exactly the
    Last-Modified and that is a strong validator (a second or more older than
    now, section 8.8.2.2)."""
    if value.startswith(('"', "W/")):
        return value == etag.decode("latin-1")
    return _parse_http_date(value) == modified and modified <= time.time() - 1


async def _json_answer(reply: Awaitable[_Reply], headers: Sequence[tuple[bytes, bytes]] = ()) -> _Answer:
    status, body = await reply
    return _Answer(status, body, b"application/json", headers)


_READ_RPC: Final = _ReadBody(_Router._rpc_body)
_FIXED_ROUTES: Final[dict[str, Callable[[_Router, _Request, tuple[str, int] | None], _Action]]] = {
    "/_rally/rpc": _Router._rpc,
    "/_rally/ws": _Router._socket,
    "/_rally/client.js": _Router._client_js,
    "/_rally/contract": _Router._contract,
    "/_rally/types.d.ts": _Router._types,
    "/_rally/docs": _Router._docs,
    "/_rally/openapi.json": _Router._openapi_doc,
    "/_rally/asyncapi.json": _Router._asyncapi_doc,
    "/_rally/health": _Router._health,
}
#: The health report's ``broker`` without one: ``RedisBroker.health``'s keys, nothing in them.
_NO_BROKER: Final = {
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
}


# ==== Broker: broadcasts across processes (Redis pub/sub) ===================
#
# With a broker every process of an app subscribes to one Redis channel. A
# broadcast is PUBLISHed once, then delivered in its own process at once, as
# without a broker: a one-line JSON header (origin process, kind, topic, push
# type) and the frame, encoded once where it was produced. The first PUBLISH
# of a turn of the event loop is written to the socket before its local
# delivery starts, so the other processes deliver while this one does; more
# in the same turn go together at its end (one write, one read for Redis).
# Replies are read later, in order. Every other process writes those bytes
# to its own members through ``_Topics.publish``; the origin ignores its own
# message, so the sender receives exactly once. Across processes delivery is
# at most once (as Phoenix.PubSub): while Redis is unreachable local delivery
# goes on and remote deliveries are dropped and counted. One channel per app,
# filtered where it arrives, is the simple correct design; docs/scaling.md
# "Scaling out" weighs it against a channel per topic, measured by bench/channels.py.
#
# Every message is signed: it starts with the HMAC-SHA256 of the rest, keyed
# with HMAC-SHA256(secret, "rally broker\n" + channel), the app's ``secret``
# being one that all its processes share (docs/scaling.md, "Scaling out"). A message
# without the right MAC, whoever PUBLISHed it, is dropped before anything in
# it is read, so Redis access alone cannot push frames to browsers, close
# sessions or change presence. A push frame from another process is also
# checked before it is written to any connection (``_fits``).
#
# Presence across processes. The registry holds every process's presence
# entries, each marked with the process it came from. A process PUBLISHes the
# joins, updates and leaves of its own connections (``presence``: upserts and
# leaves for one page); the others apply them and tell their own connections
# on that page in one diff frame. Receiving is idempotent: an upsert of an
# entry already held as it is changes nothing, so a message received twice,
# or after a snapshot that already had it, sends no frame. Snapshots keep the
# processes in step: ``hello`` (on every connection to Redis, so also after an
# outage) carries the sender's whole list and asks each other process for its
# own, which each sends as ``state``; a process heard from that was unknown
# (forgotten, or first heard by a heartbeat) is asked with ``want``. A
# snapshot replaces what the receiver held of its sender. It is built when it
# is sent, so never older than a diff sent before it, and one snapshot
# answers every request made in the same turn of the event loop (or while
# Redis is too far behind to take it). A process unheard of
# for three heartbeat intervals (killed, machine gone, or Redis unreachable
# from here) is forgotten by a timer, and its entries leave every page; one
# that stops says ``bye`` and its entries leave at once.
#
# Counts. Every heartbeat (``beat``) and snapshot (``hello``, ``state``)
# also carries the sender's count of page connections (``n``, as
# ``App.connections``); the health report gives each process heard its last
# count, which leaves with the process.

#: First reconnect delay after a failure; each further failure doubles it, up
#: to ``RedisBroker(max_backoff=...)``, and every delay is drawn from [d/2, d].
_BROKER_FIRST_BACKOFF_S: Final = 0.1

#: Every message on the channel starts with its HMAC-SHA256, keyed from the
#: app's ``secret`` (see ``RedisBroker._start``).
_BROKER_MAC_BYTES: Final = 32
#: What the broker says, once per process, of each kind of message it refuses.
_BROKER_REFUSALS: Final = {
    "unsigned": "broker: dropping messages on %r without this app's MAC (sent by a process with another secret, "
    "or not by rally.py): %r",
    "foreign": "broker: ignoring messages on %r that rally.py did not send: %r",
    "replayed": "broker: dropping a message on %r that repeats one already received (published again by someone "
    "who can read the channel?): %r",
    "misfit": "broker: dropping a push from process %s on %r that is not a push frame or is over "
    "max_message_bytes (%d bytes): %r",
}
#: The senders whose last message number the broker remembers, to refuse a
#: replay of their messages: a process's id is new each time it starts, so
#: this is the last this many processes of the app heard from.
_BROKER_MAX_SENDERS: Final = 4096

#: How a remote push frame starts, as ``_Registry.push_payload`` makes it.
_BROKER_PUSH_START: Final = b'{"kind":"push","msg":{"type":'

#: Reads a remote push frame as a browser would: JSON with no NaN or Infinity.
_BROKER_FRAME_JSON: Final = json.JSONDecoder(parse_constant=_reject_constant)


class _BrokerMessage(typing.NamedTuple):
    """One message from the channel whose MAC was right: its sender, kind,
    JSON header and, for a push, the frame after it."""

    origin: str
    kind: str
    header: dict[str, Any]
    frame: bytes


class _BrokerWire:
    """The broker's messages, sans-IO: what ``RedisBroker`` PUBLISHes and
    what it makes of what it receives. Each message is an HMAC-SHA256 of the
    rest (keyed from the app's secret and the channel: a message signed for
    another app's channel is refused), a one-line JSON header (its number
    ``q``, sender ``o``, kind ``k``, then the kind's fields) and, for a
    push, the frame. ``read`` returns a ``_BrokerMessage`` or why it refused
    the bytes: ``"unsigned"`` (no MAC of this app), ``"foreign"`` (a header
    rally.py does not send) or ``"replayed"``. ``fits`` checks a push frame
    of another process before it goes to any connection.

    Replays: ``sign`` numbers this process's messages 1, 2, 3, ... in the
    order they are published, and one publisher's messages reach every
    subscriber in that order, so ``read`` takes from each sender only a
    number above the last it took from it (``heard``, for the last
    ``_BROKER_MAX_SENDERS`` senders): a message published again by whoever
    can read the channel is refused, unless this process has taken no later
    message of its sender yet (it has just started, say: docs/scaling.md,
    "Scaling out", under Replays)."""

    __slots__ = ("process_id", "key", "max_frame", "sent", "heard")

    def __init__(self, secret: bytes, channel: str, process_id: str, max_frame: int) -> None:
        self.process_id = process_id
        # Not the cookie key itself, and bound to the channel.
        self.key = hmac.new(secret, b"rally broker\n" + channel.encode(), hashlib.sha256).digest()
        self.max_frame = max_frame
        self.sent = 0  # the number of the last message signed
        self.heard: dict[str, int] = {}  # sender -> the number of its last message taken; the last heard last

    def message(self, kind: str, frame: bytes = b"", **fields: Any) -> bytes:
        """One message of this process, unsigned and unnumbered (``sign`` does both)."""
        return _dumps({"o": self.process_id, "k": kind, **fields}) + b"\n" + frame

    def sign(self, message: bytes) -> tuple[bytes, bytes]:
        """The MAC and the bytes of ``message`` numbered: call it as the
        message is published, so that the numbers go out in order."""
        self.sent += 1
        numbered = b'{"q":%d,' % self.sent + message[1:]
        return hmac.digest(self.key, numbered, "sha256"), numbered

    def read(self, data: bytes) -> _BrokerMessage | str:
        mac = hmac.digest(self.key, memoryview(data)[_BROKER_MAC_BYTES:], "sha256")
        if len(data) < _BROKER_MAC_BYTES or not hmac.compare_digest(mac, data[:_BROKER_MAC_BYTES]):
            return "unsigned"
        end = data.find(b"\n", _BROKER_MAC_BYTES)
        if end < 0:
            end = len(data)
        head, frame = data[_BROKER_MAC_BYTES:end], data[end + 1 :]
        try:
            header = json.loads(head)
            number, origin, kind = header["q"], header["o"], header["k"]
            if type(origin) is not str or not origin or type(kind) is not str:  # "" marks our own entries
                raise TypeError(origin, kind)
            if type(number) is not int or number < 1:
                raise TypeError(number)
        except (ValueError, KeyError, TypeError, RecursionError):
            return "foreign"
        heard = self.heard
        last = heard.pop(origin, 0)  # put back below, as heard last
        if number <= last:
            heard[origin] = last
            return "replayed"
        heard[origin] = number
        if len(heard) > _BROKER_MAX_SENDERS:
            del heard[next(iter(heard))]  # the sender heard from longest ago
        return _BrokerMessage(origin, kind, header, frame)

    def fits(self, frame: bytes, name: str) -> bool:
        """Whether a push frame from another process may be written to the
        connections here as it is: at most ``max_message_bytes``, UTF-8 JSON
        (no NaN or Infinity) shaped as ``_Registry.push_payload`` makes it,
        of the type its header names."""
        if len(frame) > self.max_frame or not frame.startswith(_BROKER_PUSH_START):
            return False
        try:
            envelope = _BROKER_FRAME_JSON.decode(frame.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return False
        msg = envelope.get("msg") if type(envelope) is dict else None
        return (
            len(envelope) == 2
            and envelope.get("kind") == "push"
            and type(msg) is dict
            and len(msg) == 2
            and msg.get("type") == name
            and "fields" in msg
        )


class _Processes:
    """The app's other processes as the broker hears them: when each was
    last heard and how many page connections its last beat, ``hello`` or
    ``state`` said it has. One unheard of for ``quiet`` seconds (three
    heartbeat intervals) is forgotten by a timer and ``gone(process)`` is
    called (its presence entries leave every page)."""

    __slots__ = ("quiet", "gone", "seen", "counts", "timer")

    def __init__(self, quiet: float, gone: Callable[[str], None]) -> None:
        self.quiet = quiet
        self.gone = gone
        self.seen: dict[str, float] = {}  # process id -> when last heard
        self.counts: dict[str, int] = {}  # process id -> its page connections
        self.timer: asyncio.TimerHandle | None = None  # when the first of them will have been quiet too long

    def heard(self, process: str, now: float) -> bool:
        """Note a message from ``process``; whether it was known."""
        known = process in self.seen
        self.seen[process] = now
        if self.timer is None:
            self.forget_quiet(now)
        return known

    def forget_quiet(self, now: float) -> None:
        """Forget the processes quiet for ``quiet`` seconds at ``now`` and set
        the timer for the next one: it fires when that one has been quiet that long."""
        for process, heard in list(self.seen.items()):
            if heard + self.quiet <= now:
                self.left(process)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.seen:
            when = min(self.seen.values()) + self.quiet
            self.timer = asyncio.get_running_loop().call_at(when, self.forget_quiet, when)

    def left(self, process: str) -> None:
        """``process`` said goodbye, or has been quiet too long."""
        self.seen.pop(process, None)
        self.counts.pop(process, None)
        self.gone(process)

    def clear(self) -> None:
        """The broker stops: every other process leaves."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for process in list(self.seen):
            self.left(process)


class RedisBroker:
    """Carries an app's broadcasts to its other processes through Redis
    pub/sub (docs/scaling.md, "Scaling out"): ``rally.App(broker=rally.RedisBroker(url))``,
    ``rally.App(broker=url)``, or ``RALLY_BROKER`` in the environment when the
    app names none.

    ``url`` is ``redis://[user:password@]host:port/db``, ``rediss://`` (TLS)
    or ``unix:///path``. ``prefix`` names the app's channel,
    ``<prefix>:broadcast``: apps sharing one Redis need different prefixes
    (pub/sub ignores the db number). ``heartbeat_interval`` (seconds): each
    process announces itself this often; a process unheard of for three
    intervals leaves the health report and its presence entries leave every
    page (presence is cluster-wide), and a process that does not hear its
    own heartbeat back for three intervals reconnects. ``max_backoff``
    (seconds) caps the reconnect delay; ``timeout`` (seconds) bounds
    connecting and every command; ``max_queued`` messages may wait for
    Redis's reply before more broadcasts are dropped.

    Needs the ``redis`` package (``pip install 'rally-py[redis]'``), imported here
    and only when a broker is made; raises ``RegistrationError`` without it or
    for a bad argument. One broker serves one App. Its counters (also in
    ``GET /_rally/health``): ``published``, ``received`` (broadcasts from
    other processes), ``dropped`` (broadcasts that certainly never reached
    Redis), ``unconfirmed`` (broadcasts written to Redis whose reply never
    came: the connection failed first, so Redis may or may not have
    delivered them) and ``rejected`` (messages from the channel refused: without the app's MAC,
    so not sent by a process with its ``secret``; repeating one already
    taken (a replay); or a push frame that is not one or is over
    ``max_message_bytes``).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "rally",
        heartbeat_interval: float = 5.0,
        max_backoff: float = 10.0,
        timeout: float = 5.0,
        max_queued: int = 10_000,
    ) -> None:
        try:
            where = _redacted(url)
        except (TypeError, ValueError, AttributeError):
            where = "a value that is not a URL"
        if not where.startswith(("redis://", "rediss://", "unix://")):  # said without credentials
            raise RegistrationError(f"broker: expected a redis://, rediss:// or unix:// URL, got {where}")
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        if any(v.strip().upper() not in ("0", "F", "FALSE", "N", "NO") for v in query.get("decode_responses", ())):
            raise RegistrationError(
                f"broker URL {where}: decode_responses is not supported (the broker passes frames on as the bytes "
                "it receives); remove it from the URL"
            )
        if not isinstance(prefix, str) or not prefix:
            raise RegistrationError(f"RedisBroker(prefix={prefix!r}): expected a non-empty str")
        for name, value in (
            ("heartbeat_interval", heartbeat_interval),
            ("max_backoff", max_backoff),
            ("timeout", timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise RegistrationError(f"RedisBroker({name}={value!r}): expected a number of seconds above 0")
        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 1:
            raise RegistrationError(f"RedisBroker(max_queued={max_queued!r}): expected an integer of at least 1")
        import importlib

        try:  # typed as Any: rally.py type-checks without redis installed
            self._redis: Any = importlib.import_module("redis.asyncio")
            self._retry: Any = importlib.import_module("redis.asyncio.retry")
            self._backoff: Any = importlib.import_module("redis.backoff")
            errors = importlib.import_module("redis.exceptions")
        except ImportError:
            raise RegistrationError(
                "a broker needs the redis package: pip install 'rally-py[redis]' (or 'redis>=5.0.1')"
            ) from None
        self.url = url
        self.channel = prefix + ":broadcast"
        self.heartbeat_interval = float(heartbeat_interval)
        self.max_backoff = float(max_backoff)
        self.timeout = float(timeout)
        self.max_queued = max_queued
        #: This process on the channel, named when the broker starts (after a fork).
        self.process_id = ""
        self.up = False
        self.published = 0
        self.received = 0
        self.dropped = 0
        self.unconfirmed = 0
        self.rejected = 0
        self._errors: tuple[type[BaseException], ...] = (errors.RedisError, OSError, asyncio.TimeoutError)
        self._where = where
        self._app: App | None = None
        self._topics: _Topics | None = None
        self._types: dict[str, type] = {}
        self._users = 0  # servers of the app that started it
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: asyncio.StreamWriter | None = None  # the publishing connection's, while up
        self._head = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(self.channel), self.channel.encode())
        self._waiting: collections.deque[bool] = collections.deque()  # PUBLISHes sent, unanswered: a broadcast?
        self._batch: list[bytes] | None = None  # PUBLISHes to write at the end of this turn of the loop
        self._unwritten = 0  # broadcasts in _waiting never handed to a connection (in _batch, or it failed first)
        self._wake = asyncio.Event()  # a reply to read
        self._idle = asyncio.Event()  # every reply read
        self._tried = asyncio.Event()  # the first connection attempt is over
        self._said: bool | None = None  # the state last logged: up, down, or nothing yet
        self._down_since = 0.0
        self._dropped_then = 0
        self._failures = 0  # since the last connection that stayed healthy for a heartbeat interval
        self._healthy_since: float | None = None  # when this connection heard its own first message back
        self._causes: set[str] = set()  # the failures logged since the broker went down
        self._next_beat = 0.0
        self._own_beat = 0.0  # when this process last heard its own message back
        self._processes = _Processes(3 * self.heartbeat_interval, self._gone)
        self._state_owed = False  # a presence snapshot is to be sent
        self._wire: _BrokerWire | None = None  # made when the broker starts: this process's name and key
        self._refusals_said: set[str] = set()  # the kinds of refused messages warned about
        self._oversize_said = False  # a push of this process too large to send the others
        self._max_frame = DEFAULT_MAX_MESSAGE_BYTES  # the app's max_message_bytes, once bound

    def __repr__(self) -> str:
        return f"RedisBroker({self._where!r}, channel={self.channel!r})"

    # -- the app's side: the _Broker calls, made by the App and its servers ----

    def bind(self, app: App) -> None:
        """Serve ``app``; ``RegistrationError`` if this broker serves another."""
        if self._app is not None and self._app is not app:
            raise RegistrationError(f"{self!r} already serves another App: make one broker per App")
        self._app = app
        self._max_frame = app._limits.max_message_bytes
        self._registry: _Registry = app._registry
        self._topics = app._registry.topics

    async def start(self) -> None:
        """Connect and subscribe (the first attempt bounded by ``timeout``),
        then keep the connection; once per App however many servers it runs."""
        loop = asyncio.get_running_loop()
        if self._users and loop is not self._loop:
            raise UsageError(f"{self!r} already runs in another event loop: serve an App from one loop")
        self._users += 1
        if self._users > 1:
            return
        assert self._app is not None
        self._loop = loop
        self._types = {t.__name__: t for t in self._app._registry.push_encoders}
        self.process_id = f"{os.getpid()}.{secrets.token_hex(3)}"
        self._wire = _BrokerWire(self._app._secret, self.channel, self.process_id, self._max_frame)
        self._wake, self._idle, self._tried = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._idle.set()
        self._processes = _Processes(3 * self.heartbeat_interval, self._gone)
        self._said = None
        self._causes = set()
        self._failures = 0
        self._task = self._loop.create_task(self._run())
        try:
            await asyncio.wait_for(self._tried.wait(), 2 * self.timeout + 1)
        except asyncio.TimeoutError:
            pass  # still trying: the server starts, broadcasts stay local meanwhile
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Send what waits (bounded by ``timeout``) and a goodbye, then disconnect."""
        self._users -= 1
        task = self._task
        if self._users > 0 or task is None:
            return
        self._task = None
        if self.up:
            self._enqueue(self._control("bye"), False)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.timeout)
        task.cancel()
        await asyncio.wait((task,))
        self.up = False
        self._drop_queue()
        self._processes.clear()  # the others' presence entries go with the connection

    def publish(self, topic: str, frame: bytes, msg_type: type) -> None:
        """One PUBLISH for a push, written before this process delivers it;
        none (counted as dropped) for one the others would refuse as over
        ``max_message_bytes``."""
        if len(frame) > self._max_frame:
            self.dropped += 1
            if not self._oversize_said:
                self._oversize_said = True
                _logger.warning(
                    "broker: a %s push of %d bytes is over max_message_bytes (%d): it reaches this process's "
                    "connections only; said once per process, counted in 'dropped'",
                    msg_type.__name__,
                    len(frame),
                    self._max_frame,
                )
            return
        if self._wire is not None:
            self._enqueue(self._wire.message("push", frame, t=topic, m=msg_type.__name__), True)

    def close(self, target: str, reason: str) -> None:
        """Tell the other processes to close the connections of ``target``
        (a session's topic, or ``connection:<id>``) with ``reason``."""
        if self._wire is not None:
            self._enqueue(self._wire.message("close", t=target, r=reason), True)

    def release(self, token: str, session_id: str) -> None:
        """A page of session ``session_id`` holding resume ``token`` came
        back here, where it cannot resume: the process that holds it ends it
        now (its presence entry leaves) instead of at the window's end."""
        if self._wire is not None:
            self._enqueue(self._wire.message("release", t=token, s=session_id), False)

    def presence(self, path: str, upserts: list[list[Any]], leaves: list[int]) -> None:
        """Tell the other processes that connections of this one joined or
        changed (``upserts``, ``[[id, tag, meta], ...]``) or left (``leaves``)
        the presence of page ``path``. If it cannot wait in the queue, the
        whole list follows instead; while Redis is down, the hello after it
        is back carries it."""
        if self._wire is not None and not self._enqueue(
            self._wire.message("presence", t=path, e=upserts, l=leaves), False
        ):
            if self.up:
                self._queue_state()

    def health(self) -> dict[str, Any]:
        """The ``broker`` part of ``GET /_rally/health`` (docs/scaling.md "Scaling
        out"). ``connections`` maps each process of ``processes`` to its page
        connections: this one's now, another's as its last heartbeat,
        ``hello`` or ``state`` said (a process whose count has not come yet
        is left out)."""
        if self._loop is not None:
            self._processes.forget_quiet(self._loop.time())
        processes = sorted(self._processes.seen)
        counts = self._processes.counts
        own = self.process_id
        return {
            "state": "up" if self.up else "down",
            "process": own,
            "processes": processes,
            "connections": {
                p: self._connections() if p == own else counts[p] for p in processes if p == own or p in counts
            },
            "published": self.published,
            "received": self.received,
            "dropped": self.dropped,
            "unconfirmed": self.unconfirmed,
            "rejected": self.rejected,
            "waiting": len(self._waiting),
        }

    # -- the connection ------------------------------------------------------

    def _control(self, kind: str) -> bytes:
        assert self._wire is not None
        return self._wire.message(kind)

    def _state(self, kind: str) -> bytes:
        """A ``hello`` or ``state``: this process's whole presence and its
        count of page connections, as they are now."""
        assert self._wire is not None
        return self._wire.message(kind, p=self._registry.presence_own(), n=self._connections())

    def _connections(self) -> int:
        """This process's page connections (``App.connections``), told the others in beats and snapshots."""
        return self._app.connections() if self._app is not None else 0

    def _enqueue(self, message: bytes, broadcast: bool) -> bool:
        """Send one PUBLISH of ``message`` after its MAC: written now if it
        is the first of this turn of the event loop, else at its end; the
        reply is read by ``_replies``.
        Dropped (and counted, if a broadcast) while Redis is unreachable or
        ``max_queued`` replies are awaited."""
        writer, wire = self._writer, self._wire
        if writer is None or wire is None or writer.transport.is_closing() or len(self._waiting) >= self.max_queued:
            self.dropped += broadcast
            return False
        mac, message = wire.sign(message)
        command = (self._head, b"$%d\r\n" % (_BROKER_MAC_BYTES + len(message)), mac, message, b"\r\n")
        if self._batch is None:
            writer.writelines(command)
            self._batch = []
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        else:
            self._batch += command
            self._unwritten += broadcast
        self._waiting.append(broadcast)
        self._idle.clear()
        self._wake.set()
        return True

    def _flush(self) -> None:
        batch, self._batch = self._batch, None
        if batch and self._writer is not None:
            self._writer.writelines(batch)
            self._unwritten = 0

    def _queue_state(self) -> None:
        """Send this process's whole presence once this turn of the event
        loop is over (one snapshot for every request made in it), or, if
        ``max_queued`` replies are awaited then, as soon as one comes."""
        if self.up and not self._state_owed:
            self._state_owed = True
            assert self._loop is not None
            self._loop.call_soon(self._send_state)

    def _send_state(self) -> None:
        if self._state_owed and self.up and len(self._waiting) < self.max_queued:
            self._state_owed = False
            self._enqueue(self._state("state"), False)

    def _drop_queue(self) -> None:
        """The connection is gone: of the broadcasts awaiting Redis's reply,
        those never written are dropped; the others are unconfirmed (Redis
        may have run them: a reply that timed out can still be delivered)."""
        unwritten = self._unwritten
        self.dropped += unwritten
        self.unconfirmed += sum(self._waiting) - unwritten
        self._unwritten = 0
        self._waiting.clear()
        self._batch = None
        self._state_owed = False  # the hello after a reconnect carries it
        self._idle.set()

    async def _run(self) -> None:
        """Connect, serve, and after a failure reconnect with capped
        exponential backoff and jitter, until cancelled."""
        while True:
            try:
                await self._connection()
            except Exception as exc:
                self._went_down(exc)
            delay = min(self.max_backoff, _BROKER_FIRST_BACKOFF_S * 2 ** min(self._failures, 30))
            self._failures += 1
            await asyncio.sleep(random.uniform(delay / 2, delay))

    async def _connection(self) -> None:
        """One connection's life: subscribe, then listen and publish until either fails."""
        loop = self._loop
        assert loop is not None
        no_retry = self._retry.Retry(self._backoff.NoBackoff(), 0)  # the backoff is ours
        client = self._redis.Redis.from_url(
            self.url, retry=no_retry, socket_connect_timeout=self.timeout, socket_timeout=self.timeout
        )
        pubsub = client.pubsub()
        publisher = client.connection_pool.make_connection()
        tasks: list[asyncio.Task[None]] = []
        try:
            await publisher.connect()
            # redis-py writes through an asyncio.StreamWriter, whose write() is
            # synchronous: taking it lets a PUBLISH leave before the local fan-out.
            writer = getattr(publisher, "_writer", None)
            if not isinstance(writer, asyncio.StreamWriter):
                raise RuntimeError("this redis-py keeps no asyncio.StreamWriter: rally.py supports redis 5.0.1 to 8")
            await pubsub.subscribe(self.channel)
            deadline = loop.time() + self.timeout
            while True:  # the subscription is confirmed before the broker counts as up
                left = deadline - loop.time()
                reply = await pubsub.get_message(timeout=left) if left > 0 else None
                if reply is None:
                    raise asyncio.TimeoutError(f"no answer to SUBSCRIBE within {self.timeout} s")
                if reply.get("type") == "subscribe":
                    break
            self._writer = writer
            self._went_up()
            tasks = [loop.create_task(self._listen(pubsub)), loop.create_task(self._replies(publisher))]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise ConnectionError("the connection to redis ended")
        finally:
            self._writer = None
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            with contextlib.suppress(*self._errors):
                await publisher.disconnect()
            for conn in (pubsub, client):
                with contextlib.suppress(*self._errors):
                    await conn.aclose()

    async def _listen(self, pubsub: Any) -> None:
        loop = self._loop
        assert loop is not None
        silence = 3 * self.heartbeat_interval
        while True:
            reply = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.heartbeat_interval)
            if reply is not None and reply.get("type") == "message":
                self._on_message(reply["data"])
            if loop.time() - self._own_beat > silence:
                raise ConnectionError(f"this process's heartbeat did not come back within {silence:g} s")

    async def _replies(self, publisher: Any) -> None:
        """Read the reply to every PUBLISH, in order (each within
        ``timeout``, or the connection is given up), and send the heartbeats."""
        loop = self._loop
        assert loop is not None
        waiting = self._waiting
        while True:
            now = loop.time()
            if now >= self._next_beat:
                self._beat(now)
            if not waiting:
                self._idle.set()
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._next_beat - now)
                continue
            await publisher.read_response()  # the number of subscribers reached; an error raises
            self.published += waiting.popleft()
            if self._state_owed:
                self._send_state()

    def _beat(self, now: float) -> None:
        self._next_beat = now + self.heartbeat_interval
        assert self._wire is not None
        self._enqueue(self._wire.message("beat", n=self._connections()), False)

    def _gone(self, process: str) -> None:
        """Another process has gone: its presence entries leave every page."""
        self._registry.presence_replace(process, {})

    def _went_up(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        self.up = True
        self._healthy_since = None
        self._own_beat = now
        self._next_beat = now + self.heartbeat_interval  # the hello is the first heartbeat
        self._enqueue(self._state("hello"), False)
        self._tried.set()

    def _went_healthy(self, now: float) -> None:
        """This connection's first message came back: Redis takes its
        PUBLISHes and delivers the channel to it, so the broker is up (and
        says so); the backoff is reset once it has stayed so for a
        heartbeat interval (``_went_down``)."""
        self._healthy_since = now
        self._causes = set()
        if self._said is None:
            _logger.info(
                "broker up: redis at %s, channel %r; this process is %s on %s",
                self._where,
                self.channel,
                self.process_id,
                socket.gethostname(),
            )
        elif self._said is False:
            _logger.info(
                "broker back up: redis at %s after %.1f s; %d broadcasts to other processes were dropped meanwhile",
                self._where,
                now - self._down_since,
                self.dropped - self._dropped_then,
            )
        self._said = True

    def _went_down(self, exc: BaseException) -> None:
        """The connection failed. The backoff starts again from its first
        delay only if the connection had been healthy for a heartbeat
        interval, so one that fails soon after connecting (a user without
        PUBLISH permission, say) is retried ever less often. Each cause of
        failure is logged once until the broker is healthy again: the first
        as ``broker down``, any other as ``broker still down``, and one that
        is not Redis's or the network's with its traceback."""
        assert self._loop is not None
        now = self._loop.time()
        self.up = False
        self._writer = None
        self._drop_queue()
        self._tried.set()
        if self._healthy_since is not None and now - self._healthy_since >= self.heartbeat_interval:
            self._failures = 0
        self._healthy_since = None
        cause = f"{type(exc).__name__}: {exc}"
        if cause in self._causes:
            return
        self._causes.add(cause)
        if not isinstance(exc, self._errors):
            _logger.error("broker: unexpected failure of the connection to redis at %s", self._where, exc_info=exc)
        reason = str(exc) or type(exc).__name__
        if self._said is not False:
            self._down_since = now
            self._dropped_then = self.dropped
            _logger.warning(
                "broker down: redis at %s is unreachable or refuses the broker (%s); until it is back, "
                "broadcasts reach only this process's connections",
                self._where,
                reason,
            )
            self._said = False
        else:
            _logger.warning("broker still down: redis at %s (%s); each cause is said once", self._where, reason)

    def _on_message(self, data: bytes) -> None:
        """One message from the channel: a push or a session close from another
        process for the connections here, a change of its presence, its whole
        presence (``hello``, ``state``), a request for ours (``want``), a page
        held here for resume that came back there (``release``), a
        heartbeat, or a goodbye. Dropped unread without the right MAC, or
        when it repeats a message already taken (``_BrokerWire``)."""
        assert self._wire is not None
        read = self._wire.read(data)
        if isinstance(read, str):
            self._refuse(read, self.channel, data[:80])
            return
        origin, kind, header, frame = read
        assert self._loop is not None and self._topics is not None
        now = self._loop.time()
        known = self._processes.heard(origin, now)
        if origin == self.process_id:
            self._own_beat = now
            if self._healthy_since is None:
                self._went_healthy(now)
            return
        count = header.get("n")  # in a beat, hello or state: the sender's page connections
        if type(count) is int and count >= 0:
            self._processes.counts[origin] = count
        topic = header.get("t")
        if kind == "push" and type(topic) is str:
            name = header.get("m")
            msg_type = self._types.get(name) if type(name) is str else None
            if (
                msg_type is not None
                and self._topics.members.get(topic)
                and not self._wire.fits(frame, msg_type.__name__)
            ):
                self._refuse("misfit", origin, self.channel, len(frame), frame[:80])
                return
            self.received += 1
            if msg_type is not None:  # a type no page here declares reaches no one
                self._topics.publish(topic, frame, msg_type)
        elif kind == "close" and type(topic) is str:
            self.received += 1
            reason = header.get("r")
            self._topics.close(topic, reason if type(reason) is str and len(reason) <= 120 else "session closed")
        elif kind == "presence":
            self._registry.presence_merge(origin, topic, header.get("e"), header.get("l"))
        elif kind == "hello" or kind == "state":
            self._registry.presence_replace(origin, header.get("p"))
            if kind == "hello":
                self._queue_state()  # at once, so a new process sees the others and their presence
            return
        elif kind == "want":
            if topic == self.process_id:
                self._queue_state()
        elif kind == "release" and type(topic) is str:
            held = self._registry.held.get(topic)
            if held is not None and held.ctx.session_id == header.get("s"):
                held.close(1000, "replaced by a new connection")
        elif kind == "bye":
            self._processes.left(origin)
            return
        if not known:  # heard again after it was forgotten, or first by a beat: its presence may be missing
            self._enqueue(self._wire.message("want", t=origin), False)

    def _refuse(self, kind: str, *args: Any) -> None:
        """Count a message from the channel in ``rejected``, and say so
        (``_BROKER_REFUSALS[kind]`` with ``args``) once per process and kind."""
        self.rejected += 1
        if kind not in self._refusals_said:
            self._refusals_said.add(kind)
            _logger.warning(_BROKER_REFUSALS[kind] + "; said once per process, counted in 'rejected'", *args)


def _redacted(url: str) -> str:
    """A broker URL for logs: scheme, host, port and path, without credentials."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


# ==== Transport: asyncio server, connections, timers, shutdown ===============
#
# The classes here move bytes between sockets and the objects above, keep the
# timers (one per purpose) and apply flow control. Reading a connection stops
# for any of four reasons, each a bit of ``_Conn.pausing``.

_BY_WRITES: Final = 1  # the peer is not reading what we write
_BY_WORK: Final = 2  # a request is being answered, or a page session is full
_BY_TURN: Final = 4  # this connection had its turn; the others go first
_BY_SHUTDOWN: Final = 8  # the server is closing: in-flight work finishes, nothing new starts


class _Conn(asyncio.BufferedProtocol):
    """What both kinds of connection share: one transport, reading paused
    for any of several reasons, writing with backpressure, and the two
    timers that make sure a socket really goes away: one while the peer
    takes none of our bytes (``send_timeout``), one once we close
    (``close_timeout``: ``transport.close()`` waits for the send buffer to
    drain, and a peer that never reads would keep the socket forever)."""

    __slots__ = ("srv", "transport", "pausing", "write_paused", "waiter", "stall_timer", "abort_timer", "ended", "gone")

    def __init__(self, srv: Server, transport: asyncio.Transport | None = None) -> None:
        self.srv = srv
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]  # set by connection_made
        self.pausing = 0
        self.write_paused = False
        self.waiter: asyncio.Future[None] | None = None  # a writer waiting for resume_writing
        self.stall_timer: asyncio.TimerHandle | None = None
        self.abort_timer: asyncio.TimerHandle | None = None
        self.ended = False  # closing or closed: nothing more is sent
        self.gone = False  # connection_lost was called

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.srv.read_buffer

    def _pause(self, reason: int) -> None:
        if not self.pausing and not self.gone:
            self.transport.pause_reading()
        self.pausing |= reason

    def _resume(self, reason: int) -> None:
        if self.pausing & reason:
            self.pausing &= ~reason
            if not self.pausing and not self.gone:
                self.transport.resume_reading()

    def _yield_turn(self) -> None:
        """Let every other connection go first, then go on where we stopped."""
        if not self.pausing & _BY_TURN:
            self._pause(_BY_TURN)
            self.srv.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._resume(_BY_TURN)
        self._process()

    def _process(self) -> None:
        raise NotImplementedError

    def pause_writing(self) -> None:
        self.write_paused = True
        self._pause(_BY_WRITES)
        if self.stall_timer is None:
            self.stall_timer = self.srv.loop.call_later(self.srv.limits.send_timeout, self._stalled)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None
        self._wake()
        self._resume(_BY_WRITES)
        self._yield_turn()  # what was read before the pause

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def writable(self) -> None:
        """Return once the transport takes bytes, or the connection ends
        (the caller then finds out how); ``ConnectionClosed`` (1006) once
        the socket is gone or going. A transport that failed (the peer
        reset it) or was aborted is closing before ``connection_lost``
        comes, and takes nothing more: a writer that never waits must
        stop there, not write on (asyncio logs every such write)."""
        while self.write_paused and not self.ended and not self.gone:
            self.waiter = self.srv.loop.create_future()
            await self.waiter
        if self.gone or self.transport.is_closing():
            raise ConnectionClosed(1006, "connection lost")

    def _stalled(self) -> None:
        self.stall_timer = None
        _logger.info("aborting a connection that took no bytes for %s s", self.srv.limits.send_timeout)
        self._abort()

    def _close_transport(self) -> None:
        """Close gracefully, and abort if the peer has not taken our last bytes in time."""
        self.transport.close()
        if self.abort_timer is None and self.transport.get_write_buffer_size():
            self.abort_timer = self.srv.loop.call_later(self.srv.limits.close_timeout, self._abort)

    def _abort(self) -> None:
        self.abort_timer = None
        self.transport.abort()

    def _lost(self) -> None:
        """The socket is gone: stop the timers, wake a waiting writer, forget us."""
        self.gone = True
        for timer in (self.stall_timer, self.abort_timer):
            if timer is not None:
                timer.cancel()
        self.stall_timer = self.abort_timer = None
        self._wake()
        self.srv.forget(self)


class _HttpState(enum.Enum):
    """Where an HTTP connection is in its request cycle."""

    IDLE = "idle"  # waiting for the first byte of a request (keep-alive)
    HEAD = "head"  # a request head is arriving
    BODY = "body"  # the rest of the request (its body, or only its end) is arriving
    BUSY = "busy"  # the request is being answered
    DRAINING = "draining"  # answered and half-closed; what the client still sends is dropped
    CLOSED = "closed"


#: The states in which the reader may hold an event (IDLE: it holds nothing).
#: A tuple: ``in`` compares by identity, where a set would hash the Enum in Python.
_READING: Final = (_HttpState.HEAD, _HttpState.BODY)


class _HttpConn(_Conn):
    """One HTTP/1.1 connection until it closes or becomes a WebSocket.

    Bytes go to an ``_HttpReader``; each request head goes to the router
    as soon as it is whole, so a refusal never waits for a body and only a
    request that will be read gets ``100 Continue``. One deadline timer
    covers the request cycle (head, body, keep-alive, linger); the head's
    and the body's deadlines are set only when the connection has to wait
    for their bytes, so a request that arrives whole costs no timer work
    until its answer sets the keep-alive deadline."""

    __slots__ = ("reader", "state", "timer", "deadline", "timed", "request", "action", "body", "client")

    def __init__(self, srv: Server) -> None:
        super().__init__(srv)
        self.reader = _HttpReader(srv.limits)
        self.state = _HttpState.IDLE
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = math.inf
        self.timed: _HttpState | None = None  # HEAD or BODY: that phase's deadline is set
        self.request: _Request | None = None
        self.action: _Action | None = None
        self.body: list[bytes] = []
        self.client: tuple[str, int] | None = None

    # -- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):  # IPv4's (host, port) as it is; IPv6 adds flow info and scope
            self.client = peer if len(peer) == 2 else (peer[0], peer[1])
        srv = self.srv
        srv.conns.add(self)
        if len(srv.conns) > srv.limits.max_connections or srv.closing:
            transport.write(_http_response(503, b"server busy\n", extra=[(b"retry-after", b"1")]))
            self._close()
            return
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER, low=_WRITE_LOW_WATER)
        self._arm(srv.limits.keepalive_timeout)

    def buffer_updated(self, nbytes: int) -> None:
        if self.state is _HttpState.DRAINING:
            return
        if self.state is _HttpState.IDLE:
            self.state = _HttpState.HEAD  # its deadline counts from this read (see _process)
        self.reader.feed(bytes(self.srv.read_buffer[:nbytes]))
        self._process()

    def eof_received(self) -> bool:
        if self.state is _HttpState.DRAINING:
            self._close()
        else:
            if self.state is _HttpState.IDLE:
                self.state = _HttpState.HEAD  # the reader has the end of the stream to tell
            self.reader.feed(b"")  # seen once the answer in progress is written
            self._process()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _HttpState.CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if isinstance(self.action, _SendFile):
            self.action.file.close()
        self._lost()

    # -- the request cycle ----------------------------------------------------

    def _arm(self, seconds: float) -> None:
        """Set the connection's one deadline. The timer moves only when the
        deadline comes earlier, so a request cycle costs one timer, not three."""
        loop = self.srv.loop
        self.deadline = deadline = loop.time() + seconds
        timer = self.timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self.timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.state is _HttpState.CLOSED or self.deadline == math.inf:
            return
        if self.srv.loop.time() < self.deadline:  # moved later meanwhile
            self.timer = self.srv.loop.call_at(self.deadline, self._on_timer)
            return
        if self.state in (_HttpState.HEAD, _HttpState.BODY):
            self._respond(_Answer(408, b"request not received in time\n"))
        else:
            self._close()

    def _close(self) -> None:
        self.state = _HttpState.CLOSED
        self.deadline = math.inf
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._close_transport()

    def _process(self) -> None:
        """Handle what the reader holds, at most ``_EVENTS_PER_TURN`` events
        before the other connections get a turn. One loop serves every
        pipelined request: an answer given inside it starts the next cycle
        and returns here, so depth does not grow."""
        budget = _EVENTS_PER_TURN
        while self.state in _READING and not self.pausing:
            if not budget:
                self._yield_turn()
                return
            budget -= 1
            try:
                event = self.reader.next_event()
            except ProtocolError as exc:
                self.request = self.reader.request
                self._respond(self.srv.router.refusal(exc, self.request))
                continue
            if event is None:
                break
            event_type = type(event)
            if event_type is bytes:
                self.body.append(event)  # type: ignore[arg-type]
            elif event_type is _Request:
                self._on_head(event)  # type: ignore[arg-type]
            elif event_type is _EndOfRequest:
                self._on_end()
            else:
                self._close()
        state = self.state
        if (state is _HttpState.HEAD or state is _HttpState.BODY) and self.timed is not state:
            # The request waits for more bytes (or reading is paused): the
            # deadline of its head or body starts now, and once.
            self.timed = state
            limits = self.srv.limits
            self._arm(limits.header_timeout if state is _HttpState.HEAD else limits.body_timeout)

    def _on_head(self, req: _Request) -> None:
        self.request = req
        try:
            action = self.srv.router.route(req, self.client)
        except ProtocolError as exc:
            action = self.srv.router.refusal(exc, req)
        except Exception:
            _logger.exception("unexpected error routing %s %s", req.method, req.target[:200])
            action = _Answer(500, b"internal server error\n")
        self.action = action
        if type(action) is _ReadBody:
            expect = req.headers.get(b"expect")
            if expect is not None and expect.lower() == b"100-continue" and not self.transport.is_closing():
                # RFC 9110 section 10.1.1: the client waits for this before the body.
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        elif req.has_body:
            self._act(action)  # the body is not wanted: answer now, then close
            return
        self.body = []
        self.state = _HttpState.BODY  # its deadline counts from here (see _process)

    def _on_end(self) -> None:
        action = self.action
        assert action is not None
        if type(action) is _ReadBody:
            body = b"".join(self.body)
            self.body = []
            req = self.request
            assert req is not None
            try:
                action = action.handle(self.srv.router, req, self.client, body)
            except Exception:
                _logger.exception("unexpected error answering %s", self.request)
                action = _Answer(500, b"internal server error\n")
        self._act(action)

    def _act(self, action: _Action) -> None:
        self.state = _HttpState.BUSY
        self.deadline = math.inf  # a handler's time is bounded by handler_timeout
        action_type = type(action)
        if action_type is _Answer:
            self._respond(action)  # type: ignore[arg-type]
        elif action_type is _Upgrade:
            self._upgrade(action)  # type: ignore[arg-type]
        else:
            self._pause(_BY_WORK)
            self.srv.spawn(self._answer_later(action))  # type: ignore[arg-type]

    async def _answer_later(self, action: _SendFile | Awaitable[_Answer]) -> None:
        """Answer with what ``action`` gives, then go on with the next request.
        Whatever happens, the connection does not stay BUSY: an error is
        answered 500; a cancellation of this task (shutdown) closes it."""
        try:
            if isinstance(action, _SendFile):
                try:
                    await self._send_file(action)
                except ConnectionClosed:
                    return
                finally:
                    action.file.close()
            else:
                try:
                    answer = await action
                except asyncio.CancelledError:
                    if _cancelling():
                        raise
                    # Raised by what was awaited (a view), not a cancellation of this task.
                    _logger.error("answering %s raised CancelledError", self.request)
                    answer = _Answer(500, b"internal server error\n")
                except Exception:
                    _logger.exception("answering %s raised", self.request)
                    answer = _Answer(500, b"internal server error\n")
                self._respond(answer)
        except asyncio.CancelledError:
            if self.state is not _HttpState.CLOSED:
                self._close()
            raise
        self._process()

    async def _send_file(self, f: _SendFile) -> None:
        req = self.request
        assert req is not None
        keep_alive = self._keep_alive()
        await self.writable()  # raises once the peer is gone: nothing is written to a closing transport
        self.transport.write(_http_head(f.status, f.content_type, f.size, f.headers, keep_alive=keep_alive))
        left = 0 if req.method == b"HEAD" else f.size
        if left and f.offset:
            f.file.seek(f.offset)
        while left > 0:
            await self.writable()
            chunk = f.file.read(min(_FILE_CHUNK_BYTES, left))
            if not chunk:  # the file shrank: the promised length cannot be kept
                self._abort()
                raise ConnectionClosed(1006, "file shrank")
            self.transport.write(chunk)
            left -= len(chunk)
        self._log(f.status)
        self._finish_cycle(keep_alive)

    def _respond(self, answer: _Answer) -> None:
        if self.state is _HttpState.CLOSED or self.state is _HttpState.DRAINING:
            return
        if self.transport.is_closing():  # reset or aborted: connection_lost is on its way
            return
        req = self.request
        keep_alive = self._keep_alive()
        self.transport.write(
            _http_response(
                answer.status,
                answer.body,
                answer.content_type,
                answer.headers,
                keep_alive=keep_alive,
                head=req is not None and req.method == b"HEAD",
            )
        )
        if self.srv.access_log:
            self._log(answer.status)
        self._finish_cycle(keep_alive)

    def _keep_alive(self) -> bool:
        """Whether this connection may carry another request after the answer."""
        req = self.request
        if req is None or req.http_version != b"1.1" or self.srv.closing or not self.reader.done:
            return False
        connection = req.headers.get(b"connection")
        return connection is None or b"close" not in _connection_tokens(connection)

    def _finish_cycle(self, keep_alive: bool) -> None:
        """After our answer: the next request, or the end of the connection."""
        if self.state is _HttpState.CLOSED:
            return
        self.request = self.action = self.timed = None
        if not keep_alive:
            if self.reader.done or not self.transport.can_write_eof():
                self._close()
                return
            # Closing with unread bytes makes the kernel send a reset that can
            # destroy the answer in flight: half-close, and read the rest of
            # what the client sends for a moment (as nginx does).
            self.transport.write_eof()
            self.state = _HttpState.DRAINING
            self.pausing = 0
            self.transport.resume_reading()
            self._arm(_LINGER_S)
            return
        if self.pausing:
            self._resume(_BY_WORK)
        if self.reader.next_cycle():
            self.state = _HttpState.HEAD  # its deadline is set if it has to wait (see _process)
        else:
            self.state = _HttpState.IDLE
            self._arm(self.srv.limits.keepalive_timeout)

    def _upgrade(self, up: _Upgrade) -> None:
        """Write the 101 and hand the socket to a ``_WsConn``."""
        out = [b"HTTP/1.1 101 Switching Protocols\r\n"] + [b"%s: %s\r\n" % h for h in up.headers] + [b"\r\n"]
        if not self.transport.is_closing():
            self.transport.write(b"".join(out))
        self._log(101)
        self.state = _HttpState.CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ws = _WsConn(self.srv, self.transport, up)
        self.srv.conns.add(ws)
        paused = self.pausing
        self._lost()
        self.transport.set_protocol(ws)
        if paused:
            self.transport.resume_reading()
        if self.write_paused:
            ws.pause_writing()
        ws.start(self.reader.trailing, up.stale)

    def _log(self, status: int) -> None:
        if self.srv.access_log and _access_logger.isEnabledFor(logging.INFO):
            req = self.request
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
            if req is None:
                _access_logger.info('%s - "-" %d', client, status)
            else:
                _access_logger.info(
                    '%s - "%s %s HTTP/%s" %d',
                    client,
                    req.method.decode("latin-1"),
                    req.target[:1000].decode("latin-1"),
                    req.http_version.decode("latin-1"),
                    status,
                )


class _WsState(enum.Enum):
    """A WebSocket's lifecycle: moves happen only in ``_WsConn._move``."""

    OPEN = "open"
    CLOSING = "closing"  # a close frame went one way; the other is awaited
    CLOSED = "closed"


_WS_MOVES: Final = {
    _WsState.OPEN: {_WsState.CLOSING, _WsState.CLOSED},
    _WsState.CLOSING: {_WsState.CLOSED},
    _WsState.CLOSED: set(),
}


class _Keepalive:
    """When each open WebSocket of a server is due a ping, and when the pong
    of each ping is late: one timer for them all, not one per connection
    (a timer is about 270 bytes with its context, its time and its bound
    method; a place in a bucket here a few dozen: docs/performance.md
    "Where each byte goes"). Each wheel holds at most 17 buckets.

    Two wheels, pings and pongs, each a queue of ``(tick, bucket)`` in tick
    order: a deadline is always now plus the same delay (``ping_interval``
    or ``pong_timeout``), so each wheel only grows at its end. A connection
    is in at most one bucket (``_WsConn.keepalive``), which it leaves when
    it answers, ends or is due. A tick is ``step`` seconds, a sixteenth of
    the shorter delay: a deadline is rounded up to its tick, never early and
    at most a step late. When a tick comes, ``_WsConn.ping`` is called for
    each of its connections: a ping, or a close for the missing pong."""

    __slots__ = ("loop", "limits", "step", "pings", "pongs", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: _Limits) -> None:
        self.loop = loop
        self.limits = limits
        self.step = min(limits.ping_interval, limits.pong_timeout) / 16
        self.pings: collections.deque[tuple[int, set[_WsConn]]] = collections.deque()
        self.pongs: collections.deque[tuple[int, set[_WsConn]]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None  # at the first tick of either wheel

    def ping_later(self, conn: _WsConn) -> None:
        """Ping ``conn`` ``ping_interval`` from now (it opened, or answered a ping)."""
        self._add(self.pings, conn, self.limits.ping_interval)

    def pong_by(self, conn: _WsConn) -> None:
        """``conn`` was pinged: its pong is late ``pong_timeout`` from now."""
        self._add(self.pongs, conn, self.limits.pong_timeout)

    def forget(self, conn: _WsConn) -> None:
        bucket = conn.keepalive
        if bucket is not None:
            bucket.discard(conn)
            conn.keepalive = None

    def stop(self) -> None:
        """The server closed: no more ticks."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pings.clear()
        self.pongs.clear()

    def _add(self, wheel: collections.deque[tuple[int, set[_WsConn]]], conn: _WsConn, delay: float) -> None:
        self.forget(conn)
        if delay == math.inf:  # App(ping_interval=math.inf): never
            return
        tick = math.ceil((self.loop.time() + delay) / self.step)
        if wheel and wheel[-1][0] >= tick:
            bucket = wheel[-1][1]
        else:
            bucket = set()
            wheel.append((tick, bucket))
        bucket.add(conn)
        conn.keepalive = bucket
        self._arm(tick)

    def _arm(self, tick: int) -> None:
        when = tick * self.step
        if self.timer is None or self.timer.when() > when:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(when, self._tick)

    def _tick(self) -> None:
        self.timer = None
        now = self.loop.time()
        for wheel in (self.pongs, self.pings):
            while wheel and wheel[0][0] * self.step <= now:
                _, bucket = wheel.popleft()
                for conn in tuple(bucket):
                    if conn.keepalive is bucket:  # not gone meanwhile
                        conn.keepalive = None
                        conn.ping()
        firsts = [wheel[0][0] for wheel in (self.pings, self.pongs) if wheel]
        if firsts:
            self._arm(min(firsts))


class _WsConn(_Conn):
    """One WebSocket: bytes to a ``_WsReader``, whole messages to the
    session (a ``_PageSession`` or a raw route's ``_RawSession``), frames
    from the session to the socket. It is the session's ``_Peer``.

    Timers: the server's ``_Keepalive`` pings it (then waits for the pong),
    and ``_Conn``'s abort timer runs once a close has started. Every way the
    connection ends passes through ``_end``."""

    __slots__ = ("reader", "session", "state", "keepalive", "awaiting_pong", "ctx", "resuming", "dropped", "corked")

    def __init__(self, srv: Server, transport: asyncio.Transport, up: _Upgrade) -> None:
        super().__init__(srv, transport)
        self.reader = _WsReader(srv.limits.max_message_bytes)
        self.ctx = up.ctx
        self.session: _PageSession | _RawSession
        self.resuming: _Upgrade | None = None  # a held page to go on with, until start
        self.dropped = False  # dropped as a slow consumer: the session ends once the socket is gone
        if up.resume is not None:
            self.session, self.resuming = up.resume, up
        elif up.page is not None:
            self.session = _PageSession(srv.registry, up.page, up.ctx, self, srv.spawner, up.tag, up.resumable)
        else:
            assert up.raw is not None
            self.session = _RawSession(up.raw, up.ctx, self, srv, up.subprotocol)
        self.state = _WsState.OPEN
        self.keepalive: set[_WsConn] | None = None  # its bucket in the server's _Keepalive
        self.awaiting_pong = False
        self.corked: bytearray | None = None  # what this connection writes while it reads a batch

    # -- lifecycle ------------------------------------------------------------

    def _move(self, to: _WsState) -> None:
        if to not in _WS_MOVES[self.state]:
            raise RuntimeError(f"WebSocket cannot move from {self.state.value} to {to.value}")
        self.state = to

    def start(self, trailing: bytes, stale: bool) -> None:
        if stale:
            errors = [{"path": "", "message": "the server's contract changed; reload"}]
            self.write_frame(_ws_frame(_error_reply(None, "stale_contract", errors)))
            self.close(CLOSE_STALE_CONTRACT, "stale_contract")
            return
        self.srv.keepalive.ping_later(self)
        up, self.resuming = self.resuming, None
        session = self.session
        if up is None:
            session.start()
        elif isinstance(session, _PageSession) and session.attach(self, up.last):
            self.ctx = session.ctx
        else:  # it ended, or gave its frames up, since the request was routed: a fresh page
            assert up.page is not None
            srv = self.srv
            self.session = _PageSession(srv.registry, up.page, up.ctx, self, srv.spawner, up.tag, True)
            self.session.start()
        if trailing:
            self.reader.feed(trailing)
            self._process()

    def close(self, code: int = 1000, reason: str = "", lost: bool = False) -> None:
        """Start the closing handshake; the peer has ``close_timeout`` to
        answer. ``lost``: the peer is not answering (a page may resume)."""
        if self.state is not _WsState.OPEN:
            return
        self._move(_WsState.CLOSING)
        self._end(code, reason, lost)
        self._send(wsproto.events.CloseConnection(code=code, reason=reason))
        if self.abort_timer is None:
            self.abort_timer = self.srv.loop.call_later(self.srv.limits.close_timeout, self._abort)

    def shut_down(self) -> None:
        """Server shutdown: stop reading, let the work in flight finish, close with 1001."""
        if self.state is _WsState.OPEN:
            self._pause(_BY_SHUTDOWN)
            self.srv.spawn(self._shut_down())

    async def _shut_down(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.session.settle(), self.srv.limits.shutdown_timeout)
        self.close(1001, "server shutting down")

    def _end(self, code: int, reason: str, lost: bool = False) -> None:
        """The one place every end of the connection passes, once: a close
        from either side, a protocol error, a drop (``lost``), a time-out,
        shutdown."""
        if self.ended:
            return
        self.ended = True
        self.srv.keepalive.forget(self)
        self._resume(_BY_WORK | _BY_SHUTDOWN)  # the peer's close frame must still be read
        self._wake()
        # A page lost while the server shuts down ends with it: it would
        # have nowhere to come back to.
        self.session.end(code, reason, lost and not self.srv.closing)

    def abandon(self) -> None:
        """The page went on over a newer connection: drop this one, leaving the session alone."""
        self.ended = True
        self.srv.keepalive.forget(self)
        self.state = _WsState.CLOSED
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _WsState.CLOSED  # from any state: the socket is gone
        if self.dropped:
            self._end(1006, "slow consumer")
        else:
            self._end(1006, "connection lost", lost=True)
        self._lost()

    def ping(self) -> None:
        """Its keepalive deadline came (``_Keepalive``): ping, or close if the last ping got no pong."""
        if self.state is not _WsState.OPEN:
            return
        if self.awaiting_pong:
            _logger.info(
                "closing WebSocket %s: no pong within %s s", self.ctx.connection_id, self.srv.limits.pong_timeout
            )
            self.close(1011, "keepalive ping timeout", lost=True)
            return
        self.awaiting_pong = True
        self._send(wsproto.events.Ping(payload=b"rally"))
        self.srv.keepalive.pong_by(self)

    # -- the session's peer -----------------------------------------------------

    def write_frame(self, frame: bytes) -> None:
        """Write a data frame while the connection is open."""
        if self.state is _WsState.OPEN:
            self._write(frame)

    def pause(self) -> None:
        self._pause(_BY_WORK)

    def resume(self) -> None:
        if self.pausing & _BY_WORK:
            self._resume(_BY_WORK)
            self._yield_turn()  # messages read before the pause wait in the reader

    # -- writing --------------------------------------------------------------

    def _write(self, data: bytes | bytearray) -> None:
        """The one place bytes leave: a slow consumer past the bound is
        dropped. Its socket is aborted at once; its session ends when the
        socket is gone (``connection_lost``, on the loop's next step), never
        inside this write, which may be in the middle of an effect.

        While the connection handles a batch of messages read at once
        (``_process``), what it writes is corked: gathered and sent in one
        system call when the batch is done (or the cork holds
        ``_CORK_BYTES``), not one per answer. A send costs the server more
        than the answer it carries (docs/performance.md "Writes")."""
        corked = self.corked
        if corked is not None:
            corked += data
            if len(corked) < _CORK_BYTES:
                return
            self.corked = bytearray()
            data = corked
        transport = self.transport
        if transport.is_closing():  # reset, aborted or closed: asyncio would log each write
            return
        transport.write(data)
        if self.write_paused and transport.get_write_buffer_size() > self.srv.limits.max_outgoing_bytes:
            _logger.info(
                "dropping slow WebSocket %s: more than %d bytes unsent",
                self.ctx.connection_id,
                self.srv.limits.max_outgoing_bytes,
            )
            self.state = _WsState.CLOSED
            self.dropped = True
            transport.abort()

    def _send(self, event: wsproto.events.Event) -> None:
        """Send a control frame (ping, pong, close) through wsproto."""
        data = self.reader.send(event)
        if data and self.state is not _WsState.CLOSED:
            self._write(data)

    # -- reading --------------------------------------------------------------

    def buffer_updated(self, nbytes: int) -> None:
        self.reader.feed(bytes(self.srv.read_buffer[:nbytes]))
        self._process()

    def eof_received(self) -> bool:
        # The peer closed its side without a close frame: a network loss.
        self._end(1006, "connection lost", lost=True)
        return False

    def _process(self) -> None:
        """Handle what the reader holds, with what it writes corked (``_write``)."""
        if self.corked is not None:
            self._handle_events()
            return
        self.corked = bytearray()
        try:
            self._handle_events()
        finally:
            self._uncork()

    def _uncork(self) -> None:
        corked, self.corked = self.corked, None
        if corked:
            self._write(corked)

    def _close_transport(self) -> None:
        self._uncork()  # a close frame and the answers before it
        super()._close_transport()

    def _handle_events(self) -> None:
        """Handle what the reader holds, at most ``_EVENTS_PER_TURN`` events
        before the other connections get a turn."""
        budget = _EVENTS_PER_TURN
        reader = self.reader
        try:
            while self.state is not _WsState.CLOSED and not self.pausing:
                if not budget:
                    self._yield_turn()
                    return
                budget -= 1
                event = reader.next_event()
                if event is None:
                    return
                event_type = type(event)
                if event_type is str or event_type is bytes:
                    if self.state is _WsState.OPEN:
                        self.session.receive(event)  # type: ignore[arg-type]
                elif event_type is wsproto.events.Ping:
                    self._on_ping(event)  # type: ignore[arg-type]
                elif event_type is wsproto.events.Pong:
                    self._on_pong(event)  # type: ignore[arg-type]
                elif event_type is wsproto.events.CloseConnection:
                    self._on_close(event)  # type: ignore[arg-type]
        except ProtocolError as exc:
            self.close(exc.close_code, str(exc))

    def _on_ping(self, event: wsproto.events.Ping) -> None:
        if self.state is _WsState.OPEN:
            self._send(event.response())

    def _on_pong(self, event: wsproto.events.Pong) -> None:
        if self.awaiting_pong and self.state is _WsState.OPEN:
            self.awaiting_pong = False
            self.srv.keepalive.ping_later(self)

    def _on_close(self, event: wsproto.events.CloseConnection) -> None:
        if self.state is _WsState.OPEN:
            # The peer started the close (or broke the protocol: wsproto
            # reports that as a CloseConnection with 1002/1007): answer it.
            self._move(_WsState.CLOSING)
            self._end(event.code, event.reason or "")
            ws_state = self.reader.state
            if ws_state is wsproto.connection.ConnectionState.REMOTE_CLOSING:
                self._send(event.response())
            elif ws_state is wsproto.connection.ConnectionState.OPEN:
                self._send(event)
        if self.state is not _WsState.CLOSED:
            self._move(_WsState.CLOSED)
        # RFC 6455 section 7.1.1: the server closes the TCP connection first.
        self._close_transport()


class _RawSession:
    """An ``@app.websocket`` connection: the handler's task and its inbox
    (at most ``max_pending_messages``; reading pauses at the bound)."""

    __slots__ = ("route", "peer", "srv", "socket", "inbox", "waiter", "closed", "task")

    def __init__(
        self, route: _RawRoute, ctx: ServerContext, peer: _WsConn, srv: Server, subprotocol: str | None = None
    ) -> None:
        self.route = route
        self.peer = peer
        self.srv = srv
        self.socket = WebSocket(self, ctx, subprotocol)
        self.inbox: collections.deque[str | bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.closed: ConnectionClosed | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = self.srv.spawn(self._run())

    def receive(self, data: str | bytes) -> None:
        self.inbox.append(data)
        if len(self.inbox) >= self.srv.limits.max_pending_messages:
            self.peer.pause()
        self._wake()

    def end(self, code: int, reason: str, lost: bool = False) -> None:
        """``receive()`` and ``send()`` raise ``ConnectionClosed(code)`` from
        now on; a handler that is still running ``close_timeout`` later is
        cancelled."""
        self.closed = ConnectionClosed(code, reason)
        self._wake()
        task = self.task
        if task is not None and not task.done():
            self.srv.loop.call_later(self.srv.limits.close_timeout, task.cancel)

    async def settle(self) -> None:
        """Nothing to wait for: the handler learns of the shutdown from the 1001."""

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _run(self) -> None:
        try:
            await self.route.handler(self.socket)
        except ConnectionClosed:
            pass
        except Exception:
            _logger.exception("WebSocket handler for %s raised", self.route.path)
            self.peer.close(1011, "internal error")
            return
        self.peer.close(1000)


class WebSocket:
    """The connection an ``@app.websocket`` handler gets.

    ``await receive()`` returns the next message (``str`` or ``bytes``);
    ``await send(data)`` writes one, waiting while the peer is not reading;
    ``await close(code)`` starts the closing handshake. Once the connection
    is closed both raise ``ConnectionClosed`` with the peer's close code
    (1006 when it was dropped without one). The limits, time-outs and origin
    check of every WebSocket apply.
    """

    __slots__ = ("_session", "_ctx", "_subprotocol")

    def __init__(self, session: _RawSession, ctx: ServerContext, subprotocol: str | None = None) -> None:
        self._session = session
        self._ctx = ctx
        self._subprotocol = subprotocol

    @property
    def context(self) -> ServerContext:
        """The connection's ServerContext (session, headers, client, state)."""
        return self._ctx

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol agreed in the handshake (one of the route's
        ``subprotocols``), or None when the client offered none."""
        return self._subprotocol

    async def receive(self) -> str | bytes:
        """The next message; raises ``ConnectionClosed`` when there is none to come."""
        s = self._session
        while not s.inbox:
            if s.closed is not None:
                raise s.closed
            s.waiter = s.srv.loop.create_future()
            try:
                await s.waiter
            finally:
                s.waiter = None
        data = s.inbox.popleft()
        if len(s.inbox) < s.srv.limits.max_pending_messages:
            s.peer.resume()
        return data

    async def send(self, data: str | bytes) -> None:
        """Send one text (``str``) or binary (``bytes``) message; waits while
        the peer is not taking what was sent before."""
        s = self._session
        if s.closed is None:
            await s.peer.writable()
        if s.closed is not None:
            raise s.closed
        if isinstance(data, str):
            s.peer.write_frame(_ws_frame(data.encode("utf-8")))
        else:
            s.peer.write_frame(_ws_frame(bytes(data), 0x2))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with ``code``; returns at once, the handshake completes behind."""
        self._session.peer.close(code, reason)


#: What one in-memory delivery hands the receiving protocol at most: a socket read's worth.
_MEMORY_CHUNK_BYTES: Final = 64 * 1024


class _MemoryTransport(asyncio.Transport):
    """One end of an in-memory connection (``TestClient``): the parts of a
    socket transport that ``_Conn`` and asyncio's streams use, no socket.

    What one end writes waits in its own buffer (``get_write_buffer_size``)
    until the other end's protocol takes it: a chunk of at most
    ``_MEMORY_CHUNK_BYTES`` per turn of the loop, and none while that end's
    reading is paused. There is no kernel buffer in between, so a writer
    whose peer stops reading gets ``pause_writing`` as soon as its own buffer
    passes the high-water mark (64 KiB unless ``set_write_buffer_limits``
    says otherwise) and ``resume_writing`` once it is back under the low
    one, as a socket's writer would after the kernel's buffers fill: the
    bytes held are bounded by what the writer itself lets through.

    ``close()`` hands what is buffered to the peer, then its end of file
    (``eof_received``; an answer that is not true closes the peer too), then
    ``connection_lost(None)``; ``abort()`` drops the buffer, and the peer
    sees ``connection_lost(ConnectionResetError)``, as after a reset. What
    reaches an end that is closing is dropped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, peername: tuple[str, int], sockname: tuple[str, int]) -> None:
        super().__init__({"peername": peername, "sockname": sockname, "socket": None})
        self._loop = loop
        self._protocol: asyncio.BaseProtocol | None = None
        self._peer: _MemoryTransport = self
        self._out = bytearray()  # written, not yet taken by the peer's protocol
        self._eof_out = False  # write_eof(): the end of file follows _out
        self._eof_sent = False
        self._closing = False
        self._lost = False
        self._reading = True
        self._write_paused = False
        self._scheduled = False  # a delivery of _out to the peer is due
        self._high = self._low = 0
        self.set_write_buffer_limits()

    @staticmethod
    def pair(
        loop: asyncio.AbstractEventLoop, client: tuple[str, int], server: tuple[str, int]
    ) -> tuple[_MemoryTransport, _MemoryTransport]:
        """The client's end and the server's end of one connection."""
        a, b = _MemoryTransport(loop, server, client), _MemoryTransport(loop, client, server)
        a._peer, b._peer = b, a
        return a, b

    # -- asyncio.Transport ----------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[return-value]  # None once connection_lost was called, as asyncio's

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            self._peer._schedule()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._check_pause()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return len(self._out)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_out:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._closing or not data:
            return  # as a socket transport after close(): nothing more goes out
        self._out += data
        self._schedule()
        self._check_pause()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if not self._closing and not self._eof_out:
            self._eof_out = True
            self._schedule()

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._schedule()
            self._peer._schedule()  # what the peer still holds for this end is dropped

    def abort(self) -> None:
        if self._lost:
            return
        self._closing = True
        self._out.clear()
        self._eof_sent = True  # a reset, not an end of file
        self._gone(None)
        peer = self._peer
        if not peer._closing:
            peer._closing = True
            peer._out.clear()
            peer._gone(ConnectionResetError("connection reset by peer (in memory)"))
        else:
            peer._schedule()  # closing, maybe waiting for this end to read: it drops its bytes and goes

    # -- moving bytes -----------------------------------------------------------

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        """Hand the peer's protocol one chunk of ``_out`` (or the end of file)."""
        self._scheduled = False
        peer = self._peer
        if peer._closing:
            self._out.clear()  # the peer reads no more: dropped, as after a reset
        elif peer._reading:
            protocol = peer._protocol
            try:
                if self._out:
                    if isinstance(protocol, asyncio.BufferedProtocol):
                        buf = memoryview(protocol.get_buffer(len(self._out)))
                        n = min(len(buf), len(self._out), _MEMORY_CHUNK_BYTES)
                        buf[:n] = self._out[:n]
                        del self._out[:n]
                        protocol.buffer_updated(n)
                    else:
                        assert isinstance(protocol, asyncio.Protocol)
                        chunk = bytes(self._out[:_MEMORY_CHUNK_BYTES])
                        del self._out[: len(chunk)]
                        protocol.data_received(chunk)
                    if self._out:
                        self._schedule()
                elif (self._eof_out or self._closing) and not self._eof_sent:
                    self._eof_sent = True
                    assert isinstance(protocol, (asyncio.Protocol, asyncio.BufferedProtocol))
                    if not protocol.eof_received():
                        peer.close()
            except Exception as exc:  # as a socket transport does: say so, and drop the connection
                self._loop.call_exception_handler(
                    {"message": "in-memory transport: the protocol failed", "exception": exc, "protocol": protocol}
                )
                peer.abort()
                return
        if self._write_paused and len(self._out) <= self._low:
            self._write_paused = False
            if not self._lost:
                self.get_protocol().resume_writing()
        if self._closing and not self._out and not self._lost:
            if not self._eof_sent and not peer._closing:
                self._schedule()  # the end of file goes next turn (or when the peer reads again)
            self._gone(None)

    def _check_pause(self) -> None:
        if not self._write_paused and len(self._out) > self._high and not self._lost:
            self._write_paused = True
            self.get_protocol().pause_writing()

    def _gone(self, exc: Exception | None) -> None:
        """This end is closed: its protocol hears so on the loop's next step."""
        if not self._lost:
            self._lost = True
            self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: Exception | None) -> None:
        try:
            self.get_protocol().connection_lost(exc)
        finally:
            # As asyncio's transports do: no cycle outlives the connection,
            # so its objects go by reference counting, not the collector.
            self._protocol = None
            peer = self._peer
            if peer._lost and peer._protocol is None:
                self._peer = peer._peer = _UNPAIRED


#: The peer of both ends once both are closed (no reference cycle is left).
_UNPAIRED: Final = _MemoryTransport(None, ("", 0), ("", 0))  # type: ignore[arg-type]
_UNPAIRED._closing = _UNPAIRED._lost = _UNPAIRED._scheduled = True


class _CannotListen(OSError):
    """Binding the listening socket failed; the message names the address
    (``app.run`` and the command line say it and exit, without a traceback)."""


def _check_port(port: object) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UsageError(f"port={port!r}: expected an int from 0 to 65535 (0 picks a free one)")


def _listening_socket(infos: list[tuple[Any, ...]]) -> socket.socket:
    """A socket bound and listening at the first of ``getaddrinfo``'s
    answers; ``_CannotListen`` (an ``OSError`` with the same ``errno``) if
    it cannot be."""
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        where = f"[{address[0]}]:{address[1]}" if family == socket.AF_INET6 else f"{address[0]}:{address[1]}"
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = " (another program listens there: stop it, or choose another port)"
        elif exc.errno == errno.EADDRNOTAVAIL:
            hint = " (no network interface of this machine has that address)"
        raise _CannotListen(exc.errno, f"cannot listen on {where}: {exc.strerror}{hint}") from None
    except BaseException:
        sock.close()
        raise
    return sock


class Server:
    """A running server: ``url``, ``port``, and ``await close()``.

    Made by ``App.start`` (and, listening nowhere, by ``TestClient``).
    ``close()`` stages shutdown: stop accepting, close idle HTTP connections,
    let in-flight requests and WebSocket RPCs finish, close WebSockets with
    1001, give it all ``shutdown_timeout`` seconds, abort the sockets left,
    and await every task it started.
    """

    def __init__(self, app: App, access_log: bool) -> None:
        self.app = app
        self.registry = app._registry
        self.limits = app._limits
        self.access_log = access_log
        self.loop = asyncio.get_running_loop()
        self.conns: set[_HttpConn | _WsConn] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        #: ``spawn`` made a bound method once, for every page session to keep (one each is 64 bytes)
        self.spawner: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]] = self.spawn
        self.keepalive = _Keepalive(self.loop, self.limits)  # every WebSocket's pings
        self.read_buffer = memoryview(bytearray(_READ_BUFFER_BYTES))
        self.closing = False
        self.host = ""
        self.port = 0
        self.router: _Router = None  # type: ignore[assignment]  # set by _listen
        self._sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None  # loops without add_reader
        self._accept_timer: asyncio.TimerHandle | None = None
        self._starved = False
        self._accepting = 0  # sockets accepted, not yet a connection (counted in conns)
        self._memory_peers = 0  # connections made by _connect_in_memory
        self._lifespan: contextlib.AbstractAsyncContextManager[Any] | None = None
        self._closed = asyncio.Event()
        self._drained: asyncio.Future[None] | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the listening socket."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def spawn(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """Start a task the server awaits before ``close()`` returns."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _listen(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = await self._bind(host, port)
        sock.setblocking(False)
        self._sock = sock
        name = sock.getsockname()
        self.host, self.port = name[0], name[1]
        self.router = _Router(self.app, _is_loopback(self.host))
        try:
            self.loop.add_reader(sock.fileno(), self._accept)
        except NotImplementedError:  # a loop without add_reader: asyncio accepts
            self._server = await self.loop.create_server(lambda: _HttpConn(self), sock=sock)

    async def _bind(self, host: str, port: int) -> socket.socket:
        flags = socket.AI_PASSIVE
        try:  # a numeric address needs no resolver, nor the thread pool's turn (about 0.1 ms)
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)
        return _listening_socket(infos)

    def _accept(self) -> None:
        """Accept what is waiting, a bounded number per turn. Out of file
        descriptors, accepting pauses for a moment and says so once (asyncio's
        own accept loop logs once per waiting connection, thousands of times
        a second)."""
        sock = self._sock
        assert sock is not None
        # At most one batch of sockets waits to become connections (to be
        # counted, or answered 503 and closed): the room _RESERVED_FDS keeps
        # below the descriptor limit.
        for _ in range(_EVENTS_PER_TURN - self._accepting):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    _logger.error("accept failed: %s", exc)
                    return
                if not self._starved:
                    self._starved = True
                    _logger.error(
                        "out of file descriptors (%s): not accepting for %s s at a time until some close; "
                        "max_connections is %d, RLIMIT_NOFILE may be too low (ulimit -n)",
                        exc.strerror,
                        _ACCEPT_BACKOFF_S,
                        self.limits.max_connections,
                    )
                self.loop.remove_reader(sock.fileno())
                self._accept_timer = self.loop.call_later(_ACCEPT_BACKOFF_S, self._accept_again)
                return
            if self._starved:
                self._starved = False
                _logger.warning("accepting connections again")
            conn.setblocking(False)
            self._accepting += 1
            self.spawn(self._connect(conn))

    def _accept_again(self) -> None:
        self._accept_timer = None
        if not self.closing and self._sock is not None:
            self.loop.add_reader(self._sock.fileno(), self._accept)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: _HttpConn(self), conn)
        except OSError:
            conn.close()
        finally:
            self._accepting -= 1

    def _stop_accepting(self) -> None:
        if self._accept_timer is not None:
            self._accept_timer.cancel()
        if self._server is not None:
            self._server.close()
        elif self._sock is not None:
            self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
        self._sock = None

    async def close(self) -> None:
        """Shut down gracefully (idempotent); returns when every connection
        is gone and every task the server started has finished."""
        if self.closing:
            await self._closed.wait()
            return
        self.closing = True
        loop = self.loop
        deadline = loop.time() + self.limits.shutdown_timeout
        self._stop_accepting()
        self.registry.held.end_all(1001, "server shutting down")  # pages not connected end now
        for conn in tuple(self.conns):
            if isinstance(conn, _WsConn):
                conn.shut_down()
            elif conn.state in (_HttpState.IDLE, _HttpState.HEAD, _HttpState.DRAINING):
                conn._close()
        await self._wait_drained(deadline - loop.time())
        for conn in tuple(self.conns):
            conn.transport.abort()
        await self._wait_drained(self.limits.close_timeout)
        # Handlers finishing after their connection ended, terminate hooks, and
        # the first calls of idempotency keys (the store's: see _Answers; with
        # several servers of one App, the first to close ends them all).
        answers = self.registry.answers.tasks
        if self.tasks or answers:
            await asyncio.wait((*self.tasks, *answers), timeout=max(0.0, deadline - loop.time()))
        for task in (*self.tasks, *answers):
            task.cancel()
        if self.tasks or answers:
            _, pending = await asyncio.wait((*self.tasks, *answers), timeout=self.limits.close_timeout)
            if pending:
                _logger.error("%d tasks did not finish after being cancelled at shutdown", len(pending))
        if self._server is not None:
            await self._server.wait_closed()
        self.keepalive.stop()
        try:
            await self._exit_lifespan()
        finally:
            if self.app.broker is not None:  # last: terminate hooks and the lifespan may broadcast
                await self.app.broker.stop()
            self._closed.set()

    async def _open(self, host: str, port: int, sock: socket.socket | None, listen: bool = True) -> None:
        """Start the broker, enter the app's lifespan, then listen (or,
        with ``listen=False``, take connections made by ``_connect_in_memory``
        only, as a server listening on ``host``:``port`` would)."""
        broker = self.app.broker
        if broker is not None:
            await broker.start()
        try:
            lifespan = self.app._lifespan
            if lifespan is not None:
                manager = lifespan(self.app)
                await manager.__aenter__()
                self._lifespan = manager
            try:
                if listen:
                    await self._listen(host, port, sock)
                else:
                    self.host, self.port = host, port
                    self.router = _Router(self.app, _is_loopback(host))
            except BaseException:
                await self._exit_lifespan()
                raise
        except BaseException:
            if broker is not None:
                await broker.stop()
            raise

    def _connect_in_memory(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new connection to this server with no socket: the client's
        streams, wired through a ``_MemoryTransport`` pair to a new
        ``_HttpConn`` (which answers 503 and closes once the server closes)."""
        loop = self.loop
        self._memory_peers += 1
        client_end, server_end = _MemoryTransport.pair(
            loop, ("127.0.0.1", 1024 + self._memory_peers % 64512), (self.host, self.port)
        )
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        client_end.set_protocol(protocol)
        protocol.connection_made(client_end)
        writer = asyncio.StreamWriter(client_end, protocol, reader, loop)
        conn = _HttpConn(self)
        server_end.set_protocol(conn)
        conn.connection_made(server_end)
        return reader, writer

    async def _exit_lifespan(self) -> None:
        manager, self._lifespan = self._lifespan, None
        if manager is not None:
            await manager.__aexit__(None, None, None)

    async def _wait_drained(self, seconds: float) -> None:
        if self.conns:
            self._drained = self.loop.create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained, seconds)

    def forget(self, conn: _Conn) -> None:
        """Drop a finished connection; the last one ends a shutdown's wait."""
        self.conns.discard(conn)
        if not self.conns and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until ``close()`` has finished."""
        await self._closed.wait()


# ==== Public entry points: App, Client =======================================


class App:
    """A rally.py application: pages, RPC handlers, limits and topics.

    Every limit is a keyword argument backed by a ``DEFAULT_*`` constant;
    ``state`` is handed to handlers as ``server_context.state``;
    ``lifespan(app)``, an async context manager, is entered before the
    server accepts and exited after it has drained (background tasks live
    there);
    ``allowed_origins`` extends the same-origin rule of the WebSocket
    handshake and ``POST /_rally/rpc``; ``allowed_hosts`` lists the host
    names the server answers to (``"*"`` for any; by default only loopback
    names when it listens on a loopback address, any name otherwise);
    ``secret`` signs session cookies (else ``RALLY_SECRET``, else a random
    secret of this process); ``secure_cookies`` adds ``Secure`` to the
    session cookie (set it in production, behind HTTPS); ``docs=False``
    turns off the ``/_rally/docs`` page; ``broker`` (a
    ``redis://`` URL or a ``RedisBroker``; else ``RALLY_BROKER``, else none)
    carries broadcasts and ``close_session`` to the app's other processes.
    """

    def __init__(
        self,
        *,
        state: Any = None,
        lifespan: Callable[[App], contextlib.AbstractAsyncContextManager[Any]] | None = None,
        allowed_origins: Iterable[str] = (),
        allowed_hosts: Iterable[str] | None = None,
        secret: str | bytes | None = None,
        secure_cookies: bool = False,
        docs: bool = True,
        broker: str | RedisBroker | None = None,
        max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
        max_string_chars: int = DEFAULT_MAX_STRING_CHARS,
        max_array_items: int = DEFAULT_MAX_ARRAY_ITEMS,
        max_object_entries: int = DEFAULT_MAX_OBJECT_ENTRIES,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
        body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
        keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT_S,
        ping_interval: float = DEFAULT_PING_INTERVAL_S,
        pong_timeout: float = DEFAULT_PONG_TIMEOUT_S,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT_S,
        handler_timeout: float = DEFAULT_HANDLER_TIMEOUT_S,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
        max_outgoing_bytes: int = DEFAULT_MAX_OUTGOING_BYTES,
        send_timeout: float = DEFAULT_SEND_TIMEOUT_S,
        max_connections: int | None = None,
        max_pending_messages: int = DEFAULT_MAX_PENDING_MESSAGES,
        max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
        resume_window: float = DEFAULT_RESUME_WINDOW_S,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
        max_presence_entries: int = DEFAULT_MAX_PRESENCE_ENTRIES,
        max_presence_meta_bytes: int = DEFAULT_MAX_PRESENCE_META_BYTES,
        max_topics_per_connection: int = DEFAULT_MAX_TOPICS_PER_CONNECTION,
    ) -> None:
        self._limits = _Limits(
            max_head_bytes=max_head_bytes,
            max_headers=max_headers,
            max_body_bytes=max_body_bytes,
            max_message_bytes=max_message_bytes,
            max_json_depth=max_json_depth,
            max_string_chars=max_string_chars,
            max_array_items=max_array_items,
            max_object_entries=max_object_entries,
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            keepalive_timeout=keepalive_timeout,
            ping_interval=ping_interval,
            pong_timeout=pong_timeout,
            close_timeout=close_timeout,
            handler_timeout=handler_timeout,
            shutdown_timeout=shutdown_timeout,
            max_outgoing_bytes=max_outgoing_bytes,
            send_timeout=send_timeout,
            max_connections=_default_max_connections() if max_connections is None else max_connections,
            max_pending_messages=max_pending_messages,
            max_concurrent_rpcs=max_concurrent_rpcs,
            resume_window=resume_window,
            max_held_bytes=max_held_bytes,
            max_presence_entries=max_presence_entries,
            max_presence_meta_bytes=max_presence_meta_bytes,
            max_topics_per_connection=max_topics_per_connection,
        )
        for name, value in self._limits._asdict().items():
            if name == "resume_window":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                    raise RegistrationError(f"App({name}={value!r}): expected a number of seconds, 0 or more")
            elif name.endswith("_timeout") or name == "ping_interval":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise RegistrationError(f"App({name}={value!r}): expected a number of seconds above 0")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RegistrationError(f"App({name}={value!r}): expected an integer of at least 1")
        for name, flag in (("docs", docs), ("secure_cookies", secure_cookies)):
            if not isinstance(flag, bool):
                raise RegistrationError(f"App({name}={flag!r}): expected True or False")
        if secret is not None and (not isinstance(secret, (str, bytes)) or not secret):
            raise RegistrationError("App(secret=...): expected a non-empty str or bytes")
        if isinstance(allowed_origins, str) or isinstance(allowed_hosts, str):
            raise RegistrationError("App(allowed_origins=..., allowed_hosts=...) take a list of names, not a str")
        self._lifespan = lifespan
        self.allowed_origins = frozenset(allowed_origins)
        self.allowed_hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)
        if secret is None:
            secret = os.environ.get("RALLY_SECRET") or _PROCESS_SECRET
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self.secure_cookies = secure_cookies
        self.docs = docs
        self._registry = _Registry(self._limits, state)
        self._loop: asyncio.AbstractEventLoop | None = None
        if broker is None:
            broker = os.environ.get("RALLY_BROKER") or None
        if isinstance(broker, str):
            broker = RedisBroker(broker)
        elif broker is not None and not isinstance(broker, RedisBroker):
            raise RegistrationError(f"App(broker={broker!r}): expected a redis:// URL or a rally.RedisBroker")
        if broker is not None:
            broker.bind(self)
        #: The ``RedisBroker`` that carries broadcasts to the app's other processes, or None.
        self.broker = broker
        self._registry.topics.broker = broker

    @property
    def state(self) -> Any:
        """``server_context.state`` of every handler; a lifespan may set it."""
        return self._registry.state

    @state.setter
    def state(self, value: Any) -> None:
        self._registry.state = value

    # -- registration ---------------------------------------------------------

    def page(self, path: str, namespace: Any) -> None:
        """Serve ``namespace`` (a class or module) as the page at ``path``.

        Its ``server_*`` functions whose first parameter is a dataclass become
        RPC handlers; ``server_init``/``server_update`` make it stateful;
        ``html`` or ``view(...)`` is its HTML. Raises ``RegistrationError``.
        """
        self._registry.add_page(path, namespace)

    def rpc(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: register an RPC handler that belongs to no page."""
        self._registry.add_rpc(fn, "")
        return fn

    def websocket(
        self, path: str, *, subprotocols: Sequence[str] = ()
    ) -> Callable[[Callable[[WebSocket], Awaitable[None]]], Callable[[WebSocket], Awaitable[None]]]:
        """Decorator: serve a raw WebSocket at ``path``; see ``WebSocket``.
        ``subprotocols``: the ones it speaks; the handshake agrees on the
        first of the client's offers among them (``ws.subprotocol``)."""
        if not path.startswith("/") or path.startswith("/_rally/"):
            raise RegistrationError(f"websocket route {path!r} must start with / and not with /_rally/")
        if isinstance(subprotocols, (str, bytes)) or not all(
            isinstance(p, str) and _TOKEN_RE.fullmatch(p) for p in subprotocols
        ):
            raise RegistrationError(
                f"websocket route {path!r}: subprotocols must be a list of tokens (RFC 6455 section 4.1), "
                f"got {subprotocols!r}"
            )

        def register(fn: Callable[[WebSocket], Awaitable[None]]) -> Callable[[WebSocket], Awaitable[None]]:
            if not inspect.iscoroutinefunction(fn):
                raise RegistrationError(f"websocket handler {fn.__name__} must be async def")
            if path in self._registry.raw_routes:
                raise RegistrationError(f"websocket route {path!r} is registered twice")
            self._registry.raw_routes[path] = _RawRoute(path, fn, tuple(subprotocols))
            return fn

        return register

    def static(self, prefix: str, directory: str | os.PathLike[str]) -> None:
        """Serve the files under ``directory`` at ``prefix`` (GET/HEAD, ETag)."""
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise RegistrationError(f"static prefix {prefix!r} must start and end with /")
        if not os.path.isdir(directory):
            raise RegistrationError(f"static directory {os.fspath(directory)!r} does not exist")
        self._registry.static.append((prefix, os.fspath(directory)))

    @property
    def contract(self) -> dict[str, Any]:
        """The contract document served at ``/_rally/contract``."""
        return json.loads(self._registry.contract()[0])  # type: ignore[no-any-return]

    # -- serving --------------------------------------------------------------

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, access_log: bool = True, sock: socket.socket | None = None
    ) -> Server:
        """Start serving in the running loop and return at once; port 0 picks
        a free one. An address it cannot listen on raises ``OSError``, whose
        message names it (``errno`` as the system said)."""
        if sock is None:
            _check_port(port)
        if _cli_importing is not None:
            raise UsageError(
                f"module {_cli_importing} started a server while python rally.py was importing it;"
                ' put its app.run() under if __name__ == "__main__": so that the command line serves the app'
            )
        server = Server(self, access_log)
        self._loop = server.loop
        await server._open(host, port, sock)
        _logger.info("rally.py serving on %s", server.url)
        return server

    async def serve(self, host: str = "127.0.0.1", port: int = 8000, *, access_log: bool = True) -> None:
        """Serve until cancelled, then shut down gracefully."""
        server = await self.start(host, port, access_log=access_log)
        try:
            await server.wait_closed()
        finally:
            await asyncio.shield(server.close())

    def run(self, host: str = "127.0.0.1", port: int = 8000, *, access_log: bool = True, workers: int = 1) -> None:
        """Serve until SIGINT or SIGTERM, then shut down gracefully; blocks.

        ``workers`` above 1 forks that many processes sharing one listening
        socket, and starts another when one dies (Unix). Each holds its own
        connections, so the app needs a broker: without one ``UsageError``
        says so before anything starts. An address it cannot listen on (a
        port in use, say) exits with a one-line message, as on the command
        line."""
        _check_port(port)
        supervisor = _Workers(self, host, port, workers, access_log) if workers != 1 else None
        if not logging.getLogger().handlers and not _logger.handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        try:
            if supervisor is not None:
                code = supervisor.run()
                if code:
                    raise SystemExit(code)
                return
            asyncio.run(self._run(host, port, access_log))
        except _CannotListen as exc:
            raise SystemExit(f"rally.py: {exc.strerror}") from None

    async def _run(self, host: str, port: int, access_log: bool) -> None:
        server = await self.start(host, port, access_log=access_log)
        print(f"rally.py serving on {server.url} (Ctrl-C stops)", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        _logger.info("shutting down")
        await server.close()

    @contextlib.contextmanager
    def run_in_thread(self, host: str = "127.0.0.1", port: int = 0, *, access_log: bool = True) -> Iterator[Server]:
        """Context manager for synchronous scripts: serve from a thread."""
        ready: _ThreadFuture[Server] = _ThreadFuture()
        stop: _ThreadFuture[None] = _ThreadFuture()

        async def main() -> None:
            try:
                server = await self.start(host, port, access_log=access_log)
            except BaseException as exc:
                ready.set_exception(exc)
                return
            stopped = asyncio.Event()
            loop = asyncio.get_running_loop()
            stop.add_done_callback(lambda _: loop.call_soon_threadsafe(stopped.set))
            ready.set_result(server)
            await stopped.wait()
            await server.close()

        thread = threading.Thread(target=asyncio.run, args=(main(),), name="rally-server", daemon=True)
        thread.start()
        try:
            yield ready.result()
        finally:
            stop.set_result(None)
            thread.join()

    # -- pushing from anywhere ------------------------------------------------

    def _publish(self, topic: str, msg: Any) -> int:
        try:
            frame = self._registry.push_payload(msg)
        except _Bad as bad:
            raise UsageError(bad.message) from None
        return self._registry.topics.broadcast(topic, frame, type(msg), msg)

    async def broadcast_to_app(self, msg: Any) -> int:
        """Push ``msg`` to every connection whose page declares its type;
        returns how many were reached. ``UsageError`` if no page declares it.

        With a broker, every ``broadcast_*`` also reaches the app's other
        processes, and the count is of this process's connections only."""
        return self._publish("app", msg)

    async def broadcast_to_page(self, path: str, msg: Any) -> int:
        """Push ``msg`` to every connection on the concrete page ``path``;
        ``UsageError`` if no page is there or it does not declare the type."""
        self._registry.check_page_push(path, type(msg), UsageError)
        return self._publish(f"page:{path}", msg)

    async def broadcast_to_session(self, session_id: str, msg: Any) -> int:
        """Push ``msg`` to every connection of a browser session whose page declares its type."""
        return self._publish(f"session:{session_id}", msg)

    async def broadcast_to_topic(self, topic: str, msg: Any) -> int:
        """Push ``msg`` to every connection subscribed to ``topic`` (by
        ``rally.effect.subscribe``) whose page declares its type."""
        return self._publish(_check_topic(topic), msg)

    def connections(self, path: str | None = None) -> int:
        """How many page WebSockets this process serves now, or those on
        the concrete page ``path`` (``"/articles/hello"``, not a route
        pattern). A page from the moment its connection opens (during
        ``server_init`` too) until it closes; one whose connection was lost
        and is held for a resume counts again once it resumes, and not while
        it waits. Raw ``@app.websocket`` connections are not pages. With a
        broker, the other processes' counts are in ``GET /_rally/health``."""
        if path is not None and not isinstance(path, str):
            raise UsageError(f"connections(path) takes a page path str or None, got {type(path).__name__}")
        reg = self._registry
        members = reg.topics.members.get("app" if path is None else f"page:{path}")
        if not members:
            return 0
        held = reg.held.timers  # the sessions held without a connection, each still in its topics
        if not held:
            return len(members)
        if path is None:
            return len(members) - len(held)
        if len(held) < len(members):
            return len(members) - sum(1 for session in held if session.ctx.page == path)
        return sum(1 for session in members if session not in held)

    def presence(self, path: str) -> list[Presence]:
        """Who is on the concrete page ``path`` (pages with ``server_presence``),
        in every process of the app (with a broker: as this process last heard
        from the others)."""
        return self._registry.presence_of(path)

    async def close_session(self, session_id: str, reason: str = "") -> int:
        """Close every page connection of a session with code 4001 and
        ``reason`` (at most 120 bytes of UTF-8; "session closed" if empty),
        as on logout, in every process of the app; returns how many were in
        this one. The browser stops and reports ``onStatus("closed", {code,
        reason})``."""
        return self._close(f"session:{session_id}", _close_reason(reason, "close_session") or "session closed")

    async def close_connection(self, connection_id: int, reason: str = "") -> int:
        """Close one page connection (``rally.Presence.id``,
        ``server_context.connection_id``) with code 4001 and ``reason``
        (at most 120 bytes of UTF-8; "connection closed" if empty), in
        whichever process of the app holds it (a kick); returns 1 if it
        was in this one, else 0."""
        if isinstance(connection_id, bool) or not isinstance(connection_id, int):
            raise UsageError(f"close_connection: expected a connection id (int), got {connection_id!r:.60}")
        return self._close(
            f"connection:{connection_id}", _close_reason(reason, "close_connection") or "connection closed"
        )

    def _close(self, target: str, reason: str) -> int:
        if self.broker is not None:
            self.broker.close(target, reason)
        return self._registry.topics.close(target, reason)

    def _threadsafe(self, coro: Coroutine[Any, Any, _T]) -> _ThreadFuture[_T]:
        if self._loop is None or self._loop.is_closed():
            coro.close()
            raise UsageError("the app is not serving: start it before pushing from a thread")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def broadcast_to_app_threadsafe(self, msg: Any) -> _ThreadFuture[int]:
        """``broadcast_to_app`` from any thread; returns a concurrent Future."""
        return self._threadsafe(self.broadcast_to_app(msg))

    def broadcast_to_page_threadsafe(self, path: str, msg: Any) -> _ThreadFuture[int]:
        """``broadcast_to_page`` from any thread; returns a concurrent Future."""
        return self._threadsafe(self.broadcast_to_page(path, msg))

    def broadcast_to_topic_threadsafe(self, topic: str, msg: Any) -> _ThreadFuture[int]:
        """``broadcast_to_topic`` from any thread; returns a concurrent Future."""
        return self._threadsafe(self.broadcast_to_topic(topic, msg))

    def broadcast_to_session_threadsafe(self, session_id: str, msg: Any) -> _ThreadFuture[int]:
        """``broadcast_to_session`` from any thread; returns a concurrent Future."""
        return self._threadsafe(self.broadcast_to_session(session_id, msg))

    def close_session_threadsafe(self, session_id: str, reason: str = "") -> _ThreadFuture[int]:
        """``close_session`` from any thread; returns a concurrent Future."""
        return self._threadsafe(self.close_session(session_id, reason))

    def close_connection_threadsafe(self, connection_id: int, reason: str = "") -> _ThreadFuture[int]:
        """``close_connection`` from any thread; returns a concurrent Future."""
        return self._threadsafe(self.close_connection(connection_id, reason))


_CLIENT_JS: Final = r"""
/* rally.py browser client: typed RPC, sends, pushes and presence over one WebSocket. */
(function () {
  "use strict";
  var boot = JSON.parse(document.getElementById("rally-boot").textContent);
  var RPC_TIMEOUT_MS = 30000, MAX_QUEUE = 1000, BACKOFF_MIN_MS = 250, BACKOFF_MAX_MS = 10000, STABLE_MS = 5000;
  var ACK_EVERY = 32, ACK_AFTER_MS = 5000, CLOSE_STALE = 4000, CLOSE_SESSION = 4001, CLOSE_REFUSED = 4003;
  var socket = null, status = "connecting", attempt = 0, nextId = 1, nextSeq = 1, staleSeen = false;
  var closed = null;  // {code, reason} once the server closed the page for good (4000, 4001, 4003): no reconnecting
  var resumeToken = null, lastSeq = 0, ackedSeq = 0, ackTimer = null;  // what this page received, by seq
  var ready = false;  // the current socket's hello arrived: sends and RPCs go straight out
  var callKey = Math.random().toString(36).slice(2, 10) + Date.now().toString(36);  // RPC idempotency prefix
  var sends = new Map();     // send seq -> {text, type, resolve, reject, sent}: until the server's ack
  var pending = new Map();   // rpc id -> {resolve, reject, timer, text, type}: (again) on each hello
  var handlers = new Map();  // push type -> Set of functions
  var statusHandlers = new Set(), errorHandlers = new Set(), presenceHandlers = new Set();
  var presence = new Map();  // connection id -> {id, tag, self, meta}, in joining order

  function statusInfo() {
    // What onStatus tells a handler added later about the present status.
    if (status === "open") return { resumed: false };
    if (status === "closed") return { code: closed.code, reason: closed.reason };
    return undefined;
  }

  function safely(fn, args) {
    // As the DOM does for event listeners: a handler that throws is reported
    // (window.onerror, the console), and the other handlers, and the client
    // (its acks, its reconnecting), go on.
    try { fn.apply(null, args); } catch (e) {
      if (typeof window.reportError === "function") window.reportError(e); else console.error(e);
    }
  }

  function setStatus(next, info) {
    if (next === status) return;
    status = next;
    statusHandlers.forEach(function (fn) { safely(fn, [status, info]); });
  }

  function protocolError(reply) {
    var err = new Error("rally: " + reply.code + (reply.errors && reply.errors.length
      ? " (" + reply.errors.map(function (e) { return (e.path ? e.path + ": " : "") + e.message; }).join("; ") + ")"
      : ""));
    err.code = reply.code;
    err.errors = reply.errors || [];
    return err;
  }

  function clientError(code, message) {
    // Shaped as protocolError's, for the failures the client finds itself.
    var err = new Error("rally: " + message);
    err.code = code;
    err.errors = [];
    return err;
  }

  function closedError(what) {
    return clientError("closed", "the page was closed (" + closed.code + (closed.reason ? " " + closed.reason : "") +
      ") " + what);
  }

  function reportError(err) {
    // An error that no Promise took: the page's handlers, else the console.
    if (errorHandlers.size) errorHandlers.forEach(function (fn) { safely(fn, [err]); });
    else console.error(err);
  }

  function reloadOnce() {
    // A redeployed server has other types: reload to get them, but never in a loop.
    if (staleSeen) return;  // the error envelope and the close code both say it
    staleSeen = true;
    var key = "rally-reloaded-at", last = Number(sessionStorage.getItem(key) || 0);
    if (Date.now() - last > 30000) {
      sessionStorage.setItem(key, String(Date.now()));
      location.reload();
    } else {
      console.error("rally: the server's contract differs from this page's; not reloading again");
    }
  }

  function settle(reply) {
    var call = pending.get(reply.id);
    if (!call) return;
    pending.delete(reply.id);
    clearTimeout(call.timer);
    if (reply.kind === "ok") call.resolve({ ok: true, value: reply.value });
    else if (reply.kind === "err") call.resolve({ ok: false, error: reply.error });
    else {
      if (reply.code === "stale_contract") reloadOnce();
      call.reject(protocolError(reply));
    }
  }

  function acked(seq, reply) {
    var item = sends.get(seq);
    if (!item) return;
    sends.delete(seq);
    if (!reply) { item.resolve(); return; }
    var err = protocolError(reply);
    console.warn("rally: send " + item.type + " refused:", err.message);
    item.reject(err);
  }

  function onPresence(reply) {
    if (reply.state) {
      presence = new Map();
      reply.state.forEach(function (e) { presence.set(e.id, e); });
    } else {
      reply.joins.forEach(function (e) { presence.set(e.id, e); });
      reply.updates.forEach(function (e) { presence.set(e.id, e); });
      reply.leaves.forEach(function (id) { presence.delete(id); });
    }
    var list = Array.from(presence.values());
    presenceHandlers.forEach(function (fn) { safely(fn, [list]); });
  }

  function sendAck() {
    clearTimeout(ackTimer);
    ackTimer = null;
    if (lastSeq > ackedSeq && socket && socket.readyState === WebSocket.OPEN) {
      ackedSeq = lastSeq;
      socket.send(JSON.stringify({ kind: "ack", seq: lastSeq }));
    }
  }

  function onHello(ws, reply, stable) {
    resumeToken = reply.resume;
    if (!reply.resumed) {
      // A fresh page: a send written before and not answered may or may not
      // have been applied; it is rejected, never applied twice.
      sends.forEach(function (item, seq) {
        if (!item.sent) return;
        sends.delete(seq);
        var err = new Error("rally: the connection closed before the server confirmed " + item.type);
        err.code = "connection_lost";
        item.reject(err);
      });
      lastSeq = ackedSeq = 0;
    }
    // Resumed, the server has every send up to reply.ack (their answers come
    // again in order); the rest is sent again.
    sends.forEach(function (item, seq) {
      if (!reply.resumed || seq > reply.ack) { item.sent = true; ws.send(item.text); }
    });
    // RPCs in flight when the last connection dropped are asked again with
    // their id and idempotency key (the server answers a call it ran once),
    // and those made while disconnected are asked for the first time.
    pending.forEach(function (call) { ws.send(call.text); });
    // The backoff starts again only once this connection has stayed open a
    // while: a server_init that fails every time must not make a tight loop.
    stable.timer = setTimeout(function () { attempt = 0; }, STABLE_MS);
    ready = true;
    setStatus("open", { resumed: reply.resumed });
  }

  function onMessage(ws, stable, event) {
    var reply;
    try { reply = JSON.parse(event.data); } catch (e) { reportError(new Error("rally: a frame is not JSON")); return; }
    if (reply.kind === "hello") { onHello(ws, reply, stable); return; }
    if (reply.seq !== undefined && (reply.kind === "push" || reply.kind === "presence")) {
      if (reply.seq <= lastSeq) return;  // had it already
      lastSeq = reply.seq;
      if (lastSeq - ackedSeq >= ACK_EVERY) sendAck();
      else if (!ackTimer) ackTimer = setTimeout(sendAck, ACK_AFTER_MS);
    }
    if (reply.kind === "push") {
      var fns = handlers.get(reply.msg.type);
      if (fns) fns.forEach(function (fn) { safely(fn, [reply.msg.fields, reply.msg.type]); });
    } else if (reply.kind === "presence") {
      onPresence(reply);
    } else if (reply.kind === "ack") {
      // Sends are applied in order: an ack settles every send up to it
      // (after a resume the server acks the last one it took, once).
      sends.forEach(function (item, seq) { if (seq <= reply.seq) acked(seq, null); });
    } else if (reply.id !== null && reply.id !== undefined) {
      settle(reply);
    } else if (reply.kind === "error" && reply.seq !== undefined) {
      acked(reply.seq, reply);
    } else if (reply.kind === "error") {
      if (reply.code === "stale_contract") reloadOnce();
      else reportError(protocolError(reply));
    }
  }

  function connect() {
    if (closed) return;
    setStatus(attempt ? "reconnecting" : "connecting");
    var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host +
      "/_rally/ws?page=" + encodeURIComponent(boot.page) + "&contract=" + encodeURIComponent(boot.contract) +
      "&last=" + lastSeq + (resumeToken ? "&resume=" + encodeURIComponent(resumeToken) : "");
    var ws = new WebSocket(url), stable = { timer: null };
    socket = ws;
    ready = false;
    ws.onmessage = function (event) { onMessage(ws, stable, event); };
    ws.onclose = function (event) {
      clearTimeout(stable.timer);
      if (socket !== ws) return;
      socket = null;
      if (event.code === CLOSE_STALE || event.code === CLOSE_SESSION || event.code === CLOSE_REFUSED) {
        // For good: every send and RPC waiting, queued or written, is rejected
        // now, and every later one at once (rpc and send below).
        closed = { code: event.code, reason: event.reason };
        clearTimeout(ackTimer);
        sends.forEach(function (item) { item.reject(closedError("before " + item.type + " was applied")); });
        sends.clear();
        pending.forEach(function (call) {
          clearTimeout(call.timer);
          call.reject(closedError("before " + call.type + " was answered"));
        });
        pending.clear();
        setStatus("closed", { code: closed.code, reason: closed.reason });
        if (event.code === CLOSE_STALE) reloadOnce();
        return;
      }
      var delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * Math.pow(2, attempt++));
      setStatus("reconnecting");
      setTimeout(connect, delay * (0.5 + Math.random()));
    };
  }

  function rpc(type, fields) {
    if (closed) return Promise.reject(closedError("before " + type + " was asked"));
    var id = nextId++;
    return new Promise(function (resolve, reject) {
      var timer = setTimeout(function () {
        pending.delete(id);
        reject(clientError("timeout", type + " timed out"));
      }, RPC_TIMEOUT_MS);
      var msg = { type: type, fields: fields || {} };
      var text = JSON.stringify({ kind: "rpc", id: id, key: callKey + "-" + id, msg: msg });
      pending.set(id, { resolve: resolve, reject: reject, timer: timer, text: text, type: type });
      // Not connected (connecting, or a lost connection): the call waits, and
      // the next connection's hello writes it with the others in pending,
      // with its idempotency key. It fails only at its time-out or a close
      // for good, never because the network is down now.
      if (ready && socket && socket.readyState === WebSocket.OPEN) socket.send(text);
    });
  }

  function send(type, fields) {
    var seq = nextSeq++;
    var item = { text: JSON.stringify({ kind: "send", seq: seq, msg: { type: type, fields: fields || {} } }),
                 type: type, sent: false };
    var promise = new Promise(function (resolve, reject) { item.resolve = resolve; item.reject = reject; });
    promise.catch(function () {});  // a send nobody awaits is not an unhandled rejection (it is logged)
    if (closed) {
      var refused = closedError("before " + type + " was sent");
      console.warn(refused.message);
      item.reject(refused);
      return promise;
    }
    var open = ready && socket && socket.readyState === WebSocket.OPEN;
    if (!open) {
      var waiting = 0;
      sends.forEach(function (other) { if (!other.sent) waiting++; });
      if (waiting >= MAX_QUEUE) {
        // The oldest never written: one written already may have been applied.
        var oldest = null;
        sends.forEach(function (other, s) { if (oldest === null && !other.sent) oldest = s; });
        var err = new Error("rally: more than " + MAX_QUEUE + " sends while disconnected; dropped the oldest");
        err.code = "queue_full";
        console.warn(err.message);
        sends.get(oldest).reject(err);
        sends.delete(oldest);
      }
    }
    sends.set(seq, item);
    if (open) { item.sent = true; socket.send(item.text); }
    return promise;
  }

  function on(type, fn) {
    if (!handlers.has(type)) handlers.set(type, new Set());
    handlers.get(type).add(fn);
    return function () { handlers.get(type).delete(fn); };
  }

  function subscribe(set, fn, now) {
    set.add(fn);
    if (now) now();
    return function () { set.delete(fn); };
  }

  window.rally = {
    page: boot.page, params: boot.params, rpc: rpc, send: send, on: on,
    onStatus: function (fn) { return subscribe(statusHandlers, fn, function () { fn(status, statusInfo()); }); },
    onError: function (fn) { return subscribe(errorHandlers, fn); },
    onPresence: function (fn) { return subscribe(presenceHandlers, fn, function () {
      fn(Array.from(presence.values())); }); }
  };
  connect();
})();
"""
_CLIENT_JS_BYTES: Final = _CLIENT_JS.encode("utf-8")
_CLIENT_JS_ETAG: Final = b'"' + hashlib.sha256(_CLIENT_JS_BYTES).hexdigest()[:16].encode() + b'"'


# ==== The Python client: Client, PageConnection, TestClient ==================

if sys.version_info >= (3, 11):

    async def _within(aw: Awaitable[_T], seconds: float | None) -> _T:
        """``await aw``, or ``TimeoutError`` after ``seconds``: ``asyncio.wait_for``
        without the task (and the turns of the loop) it makes of a coroutine."""
        async with asyncio.timeout(seconds):
            return await aw

else:  # pragma: no cover - Python 3.10
    _within = asyncio.wait_for


#: A status line the client's fast path takes: HTTP/1.1, three digits, and a
#: reason of visible ASCII and spaces. h11 reads every such line the same way.
_FAST_STATUS_LINE_RE: Final = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [ \x21-\x7e]*\r\n")
_TOKEN_STR_RE: Final = re.compile(_TOKEN.decode())
_FIELD_VALUE_STR_RE: Final = re.compile("(?:" + _FIELD_VALUE.decode() + ")?")
_TARGET_STR_RE: Final = re.compile(r"[\x21-\x7e]+")
#: A response head longer than this goes to h11, which refuses it (its own bound).
_MAX_RESPONSE_HEAD_BYTES: Final = 16 * 1024


class _Response(typing.NamedTuple):
    status: int
    headers: list[tuple[bytes, bytes]]  # names lower-cased, in the order sent
    body: bytes


class _HttpExchange:
    """One HTTP/1.1 request of a ``Client`` and its response, with no I/O.

    ``request`` holds the request's bytes to write. ``feed(data)`` takes
    the bytes read (``b""`` for the end of the stream), and ``response()``
    returns the response once it is whole, ``None`` until then (for a 101,
    its head). ``reusable`` then says whether the connection may carry
    another request, and ``trailing`` holds what the server sent after the
    response (a WebSocket's first frames after a 101).

    The client's mirror of ``_HttpReader``: a plain response (an HTTP/1.1
    status line, header lines of ``_FAST_FIELD_RE``'s grammar, at most one
    Content-Length of digits and no Transfer-Encoding; no body after HEAD,
    a 101, 204 or 304) is read by a strict fast path, which consumes
    nothing before it has the whole response. Any other goes to h11 from
    its first byte, which reads it, or refuses it with
    ``h11.RemoteProtocolError``, as it would have without the fast path.
    Likewise a request whose every part the fast writer cannot show valid
    is written by h11, which refuses what is invalid. ``fast=False`` gives
    everything to h11 (the tests compare the two).

    A body longer than ``max_body`` bytes (if given) raises
    ``RemoteError("too_large")`` as soon as its length is known (from
    Content-Length, or as chunks arrive), before it is held.
    """

    __slots__ = (
        "method",
        "target",
        "headers",
        "body",
        "request",
        "h11",
        "buf",
        "closed",
        "upgrade",
        "head",
        "chunks",
        "parsed",
        "reusable",
        "trailing",
        "max_body",
        "size",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes = b"",
        *,
        fast: bool = True,
        max_body: int | None = None,
    ) -> None:
        self.method, self.target, self.headers, self.body = method, target, headers, body
        self.max_body = max_body
        self.size = 0  # h11's body so far, in bytes
        self.h11: h11.Connection | None = None  # h11's connection, once the exchange is its
        self.buf = bytearray()  # the response so far, from its first byte (fast path)
        self.closed = False  # the server closed (``feed(b"")``)
        self.head: h11.Response | None = None  # h11's response head, once read
        self.chunks: list[bytes] = []  # h11's body so far
        #: the fast path's head, once whole: status, headers, where the body starts, its length
        self.parsed: tuple[int, list[tuple[bytes, bytes]], int, int] | None = None
        self.reusable = False
        self.trailing = b""
        self.upgrade = False  # the fast path's request proposed a switch (h11 keeps its own)
        request = _request_bytes(method, target, headers, body) if fast else None
        if request is None:
            request = self._give_to_h11()
        else:
            # h11's rule: an Upgrade header with a token proposes a switch, which a 101 accepts.
            self.upgrade = any(name.lower() == "upgrade" and value.strip(" ,\t") for name, value in headers)
        self.request: bytes = request

    def feed(self, data: bytes) -> None:
        if self.h11 is not None:
            self.h11.receive_data(data)
        elif not data:
            self.closed = True
        else:
            self.buf += data

    @property
    def started(self) -> bool:
        """A response head has arrived (``feed(b"")`` before one: the server
        closed a keep-alive connection without answering)."""
        if self.h11 is not None:
            return self.head is not None
        return self.parsed is not None

    def response(self) -> _Response | None:
        if self.h11 is not None:
            return self._h11_response()
        if self.parsed is None:
            parsed = self._fast_head()
            if parsed is None:
                if self.h11 is not None:
                    return self._h11_response()
                return None
            self.parsed = parsed
        status, headers, start, length = self.parsed
        buf = self.buf
        if status == 101:
            self.trailing = bytes(buf[start:])
            return _Response(101, headers, b"")
        if len(buf) < start + length:
            return self._to_h11() if self.closed else None
        tokens = [_connection_tokens(value) for name, value in headers if name == b"connection"]
        self.reusable = not any(b"close" in t for t in tokens) and not self._asked_to_close()
        self.trailing = bytes(buf[start + length :]) if self.reusable else b""
        return _Response(status, headers, bytes(buf[start : start + length]))

    def _fast_head(self) -> tuple[int, list[tuple[bytes, bytes]], int, int] | None:
        """The response's status, headers, where its body starts and its
        length, once its whole head is here and plain; ``None`` while it is
        not, or once it was given to h11 (then ``self.h11`` is set)."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            # A partial head: h11 decides at once on a head a bare LF ends, on
            # a first byte no status line has, on the end of the stream, and
            # past its own bound on a head's size.
            if self.closed or (
                buf and (buf[0] != 0x48 or len(buf) > _MAX_RESPONSE_HEAD_BYTES or _H11_HEAD_END_RE.search(buf))
            ):
                self._hand_to_h11()
            return None
        head = bytes(buf[: end + 2])
        line = _FAST_STATUS_LINE_RE.match(head)
        if line is None:
            self._hand_to_h11()
            return None
        status = int(line.group(1))
        at = line.end()
        headers = []
        for whole, name, value in _FAST_FIELD_RE.findall(head, at):
            at += len(whole)
            headers.append((name.lower(), value))
        lengths = [value for name, value in headers if name == b"content-length"]
        if (
            at != end + 2  # a line the grammar does not take was skipped
            or any(name == b"transfer-encoding" for name, _ in headers)
            or len(lengths) > 1
            or (lengths and not (lengths[0].isdigit() and len(lengths[0]) <= 18))
        ):
            self._hand_to_h11()
            return None
        if status == 101 and self.upgrade:
            return status, headers, end + 4, 0
        if status < 200:
            self._hand_to_h11()  # 100 Continue and the like: h11 passes over them
            return None
        if status in (204, 304) or self.method == "HEAD":
            return status, headers, end + 4, 0
        if lengths:
            self._check_size(status, int(lengths[0]))
            return status, headers, end + 4, int(lengths[0])
        self._hand_to_h11()  # a body up to the end of the stream
        return None

    def _check_size(self, status: int, size: int) -> None:
        if self.max_body is not None and size > self.max_body:
            message = f"the response body is larger than max_message_bytes ({self.max_body} bytes)"
            raise RemoteError("too_large", [{"path": "", "message": message}], status)

    def _asked_to_close(self) -> bool:
        return any(
            name.lower() == "connection" and b"close" in _connection_tokens(value.encode("ascii"))
            for name, value in self.headers
        )

    def _to_h11(self) -> _Response | None:
        """Give the response, from its first byte, to h11, and return what it makes of it."""
        self._hand_to_h11()
        return self._h11_response()

    def _hand_to_h11(self) -> None:
        """Give the response, from its first byte, to h11."""
        self._give_to_h11()  # h11 writes the request again, for its state: the bytes are not sent
        conn = self.h11
        assert conn is not None
        if self.buf:
            conn.receive_data(bytes(self.buf))
        if self.closed:
            conn.receive_data(b"")
        self.buf = bytearray()
        self.parsed = None

    def _give_to_h11(self) -> bytes:
        """Make the exchange h11's: it writes the request (its bytes are returned)."""
        conn = self.h11 = h11.Connection(h11.CLIENT)
        request = conn.send(h11.Request(method=self.method, target=self.target, headers=self.headers))
        if self.body:
            request += conn.send(h11.Data(data=self.body))
        return request + conn.send(h11.EndOfMessage())

    def _h11_response(self) -> _Response | None:
        conn = self.h11
        assert conn is not None
        while True:
            try:
                event = conn.next_event()
            except ValueError:
                # h11 0.14 turns a Content-Length of more digits than int()
                # takes (4300) into a ValueError; later versions refuse it so.
                raise h11.RemoteProtocolError("bad Content-Length", 400) from None
            if event is h11.NEED_DATA:
                return None
            if type(event) is h11.InformationalResponse:
                if event.status_code == 101:
                    self.trailing = bytes(conn.trailing_data[0])
                    return _Response(101, list(event.headers), b"")
            elif type(event) is h11.Response:
                self.head = event
                if self.method != "HEAD" and event.status_code not in (204, 304):
                    for name, value in event.headers:
                        if name == b"content-length":
                            self._check_size(event.status_code, int(value))
            elif type(event) is h11.Data:
                self.size += len(event.data)
                assert self.head is not None
                self._check_size(self.head.status_code, self.size)
                self.chunks.append(bytes(event.data))
            elif type(event) in (h11.EndOfMessage, h11.ConnectionClosed) or event is h11.PAUSED:
                if self.head is None:  # paused with no response: a switch h11 took for done (CONNECT)
                    return None
                # PAUSED: a 2xx to CONNECT switched protocols after its head.
                self.reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE
                self.trailing = bytes(conn.trailing_data[0]) if self.reusable or event is h11.PAUSED else b""
                return _Response(self.head.status_code, list(self.head.headers), b"".join(self.chunks))


def _request_bytes(method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes | None:
    """The bytes of a request whose every part is plainly valid (as h11 would
    write it), or ``None``: then h11 writes it, or refuses it."""
    if method == "CONNECT" or not (_TOKEN_STR_RE.fullmatch(method) and _TARGET_STR_RE.fullmatch(target)):
        return None
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    host = length = 0
    for name, value in headers:
        if not (_TOKEN_STR_RE.fullmatch(name) and _FIELD_VALUE_STR_RE.fullmatch(value)):
            return None
        lower = name.lower()
        if lower == "host":
            host += 1
        elif lower == "content-length":
            if length or value != str(len(body)):
                return None
            length = 1
        elif lower == "transfer-encoding":
            return None
        lines.append(f"{name}: {value}\r\n")
    if host != 1 or (body and not length):
        return None
    lines.append("\r\n")
    return "".join(lines).encode("ascii") + body


class Client:
    """A Python client of a rally.py app: one browser session, in a script.

    ``await client.rpc(msg)`` calls an RPC over HTTP and returns ``Ok`` or
    ``Error``; ``async with client.page(path) as page`` opens the page's
    WebSocket. With ``app=`` (the server's App, or one declaring the same
    types) results and pushes are decoded into their dataclasses; without it
    they stay JSON values (pushes as ``{"type", "fields"}`` dicts). The
    session cookie the server sets is kept and sent back, like a browser:
    ``session_cookie`` is its value (pass it as ``session=`` to another
    Client to join the same session) and ``session_id`` the id handlers see.
    An ``error`` envelope raises ``RemoteError``.

    ``max_message_bytes`` bounds what the client holds of one answer: an
    HTTP response body over it raises ``RemoteError("too_large")`` and
    drops the connection, a page message over it closes the page with 1009.
    ``max_queued_sends`` and ``max_unread_messages`` bound each page's sends
    waiting for a connection and pushes waiting for ``receive()`` (see
    ``PageConnection``).
    """

    def __init__(
        self,
        url: str,
        app: App | None = None,
        *,
        origin: str | None = None,
        session: str | None = None,
        timeout: float = 30.0,
        max_message_bytes: int = _CLIENT_MAX_MESSAGE_BYTES,
        max_queued_sends: int = _CLIENT_MAX_QUEUED_SENDS,
        max_unread_messages: int = _CLIENT_MAX_UNREAD_MESSAGES,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise UsageError(f"expected an http:// URL, got {url!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise UsageError(
                f"expected the server's own URL (http://host:port), got {url!r}: paths go to page() and request()"
            )
        bounds = {
            "max_message_bytes": max_message_bytes,
            "max_queued_sends": max_queued_sends,
            "max_unread_messages": max_unread_messages,
        }
        for name, value in bounds.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name}={value!r}: expected a positive int")
        self.max_message_bytes = max_message_bytes
        self.max_queued_sends = max_queued_sends
        self.max_unread_messages = max_unread_messages
        self.host = parts.hostname
        self.port = parts.port or 80
        self.origin = origin
        self.session_cookie = session
        self.timeout = timeout
        self._registry = app._registry if app is not None else None
        self._codecs = self._registry.codecs if self._registry else _Codecs(_Limits())
        self._json = _Json(_Limits())
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._pipelined = b""  # what the server sent after the last response, on that connection
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)

    @property
    def session_id(self) -> str | None:
        """The session id of ``session_cookie`` (what ``server_context.session_id`` says)."""
        return self.session_cookie.partition(".")[0] if self.session_cookie else None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the keep-alive HTTP connection, if any."""
        if self._streams is not None:
            writer = self._streams[1]
            self._drop()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _drop(self) -> None:
        """Close the keep-alive HTTP connection, if any, without waiting."""
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new connection to the server, for HTTP or a page (``TestClient``'s is in memory)."""
        return await asyncio.open_connection(self.host, self.port)

    def _headers(self) -> list[tuple[str, str]]:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address (RFC 3986)
        hs = [("host", f"{host}:{self.port}")]
        if self.origin:
            hs.append(("origin", self.origin))
        if self.session_cookie:
            hs.append(("cookie", f"{_SESSION_COOKIE}={self.session_cookie}"))
        return hs

    def _take_cookie(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        for k, v in headers:
            if k == b"set-cookie":
                name, _, value = v.decode("latin-1").split(";")[0].partition("=")
                if name.strip() == _SESSION_COOKIE:
                    self.session_cookie = value.strip()

    def encode_message(self, msg: Any) -> dict[str, Any]:
        """``{"type", "fields"}`` of a dataclass instance."""
        try:
            return self._codecs.message((type(msg),)).encode(msg)  # type: ignore[no-any-return]
        except (_Unsupported, _Bad) as exc:
            raise UsageError(f"cannot encode {type(msg).__name__}: {exc}") from None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request on the keep-alive connection: ``(status, headers, body)``."""
        async with self._lock:
            return await _within(self._request(method, path, body, list(headers)), self.timeout)

    async def _request(
        self, method: str, path: str, body: bytes, headers: list[tuple[str, str]]
    ) -> tuple[int, dict[str, str], bytes]:
        hs = self._headers() + headers + [("content-length", str(len(body)))]
        for attempt in (1, 2):
            if self._streams is None:
                self._streams, self._pipelined = await self._open(), b""
            reader, writer = self._streams
            exchange = _HttpExchange(method, path, hs, body, max_body=self.max_message_bytes)
            writer.write(exchange.request)
            try:
                await writer.drain()
                if self._pipelined:
                    exchange.feed(self._pipelined)
                while (response := exchange.response()) is None:
                    data = await reader.read(65536)
                    if not data and not exchange.started and attempt == 1:
                        raise ConnectionResetError
                    exchange.feed(data)
            except BaseException as exc:
                # Whatever ended the exchange early (a time-out, a cancellation,
                # a refusal) leaves the connection mid-response: it is never used
                # again, or a late answer would be read as the next call's. A
                # keep-alive connection the server closed meanwhile (reset, or
                # ended in a way h11 refuses) gets one retry.
                self._drop()
                stale = isinstance(exc, (ConnectionResetError, BrokenPipeError, h11.RemoteProtocolError))
                if attempt == 2 or not stale:
                    raise
                continue
            self._take_cookie(response.headers)
            if exchange.reusable:
                self._pipelined = exchange.trailing
            else:
                await self.close()
            return (
                response.status,
                {k.decode(): v.decode("latin-1") for k, v in response.headers},
                response.body,
            )
        raise AssertionError("unreachable")

    async def rpc(self, msg: Any, key: str | None = None) -> Ok[Any] | Error[Any]:
        """Call the RPC handling ``type(msg)`` over HTTP. With an idempotency
        ``key``, a call the session already made with that key (over HTTP or
        a page) within ``resume_window`` gets that call's answer, and the
        handler does not run again."""
        envelope = {"kind": "rpc", "id": next(self._ids), "msg": self.encode_message(msg)}
        if key is not None:
            envelope["key"] = key
        status, _, body = await self.request(
            "POST", "/_rally/rpc", _dumps(envelope), [("content-type", "application/json")]
        )
        try:
            reply = self._json.loads(body)
        except ContractError as exc:  # not an answer of rally.py's (a proxy's 502 page, say)
            errors = [{"path": e["path"], "message": f"{e['message']} (HTTP {status})"} for e in exc.errors]
            raise RemoteError(exc.code, errors, status) from None
        return self._decode_reply(type(msg).__name__, reply, status)

    def _decode_reply(self, name: str, reply: Any, status: int | None = None) -> Ok[Any] | Error[Any]:
        if type(reply) is not dict:
            errors = [{"path": "", "message": f"expected a reply object, got {_kind(reply)}"}]
            raise RemoteError("invalid", errors, status)
        kind = reply.get("kind")
        if kind == "error":
            raise self._remote_error(reply, status)
        handler = self._registry.rpcs.get(name) if self._registry else None
        try:
            if kind == "ok":
                return Ok(self._typed(handler, True, reply["value"]))
            if kind == "err":
                return Error(self._typed(handler, False, reply["error"]))
        except _Bad as bad:
            raise RemoteError("invalid", [bad.error("value")], status) from None
        raise RemoteError("invalid", [{"path": "kind", "message": f"unexpected reply {_short(kind)}"}], status)

    @staticmethod
    def _remote_error(reply: dict[str, Any], status: int | None = None) -> RemoteError:
        """The RemoteError of an ``error`` envelope, whatever its fields hold."""
        code = reply.get("code")
        errors = reply.get("errors")
        if type(errors) is not list or not all(type(e) is dict for e in errors):
            errors = []
        return RemoteError(code if type(code) is str else "?", errors, status)

    def _typed(self, handler: _Handler | None, ok: bool, value: Any) -> Any:
        codec = None if handler is None else handler.ok if ok else handler.err
        return value if codec is None else codec.decode(value)

    def page(self, path: str) -> PageConnection:
        """``async with client.page(path) as page``: the page's WebSocket."""
        return PageConnection(self, path)


class _Send:
    """One numbered ``send`` of a page, from ``send()`` until the server
    answers it (or the page gives it up)."""

    __slots__ = ("text", "written", "answered")

    def __init__(self, text: str, answered: asyncio.Future[None]) -> None:
        self.text = text
        self.written = False  # written to a connection: the server may have taken it
        self.answered = answered  # what send() awaits: the ack, or the refusal


class PageConnection:
    """A page's WebSocket from a ``Client``: ``send``, ``rpc``, ``receive``.

    ``send()`` returns once the server applied the message (its ``ack``)
    and raises ``RemoteError`` when the server refuses it; while the
    connection is lost it waits for ``reconnect()`` (see ``send``).
    ``receive()`` returns the next push (a dataclass when the Client knows
    the app); ``ConnectionClosed`` once closed. ``async for msg in page``
    iterates pushes until the connection closes.

    Bounds, from the Client: at most ``max_queued_sends`` sends wait for a
    connection (sent while it is lost, or before the first hello); past
    that the oldest of them is dropped and its ``send()`` raises
    ``RemoteError("queue_full")``, as in the browser client. At most
    ``max_unread_messages`` pushes (and reported errors) wait unread in
    ``receive()``: at the bound the page stops reading its connection until
    ``receive()`` takes one, so the server sees a slow consumer (nothing is
    lost, unless it drops the connection). Presence lists unread by
    ``next_presence()`` are bounded alike, the oldest dropped (``presence``
    always has the newest).
    """

    def __init__(self, client: Client, path: str, *, headers: Iterable[tuple[str, str]] = ()) -> None:
        self.client = client
        self.path = path
        self.close_code: int | None = None
        self.close_reason = ""
        self._extra = list(headers)
        self._ws = _WsReader(self.client.max_message_bytes, client=True)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._waiting: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._page_types: dict[str, _Codec] = {}
        found = client._registry.match_page(path) if client._registry else None
        if found and found[0].to_client_types:
            self._page_types = {c.__name__: client._codecs.get(c) for c in found[0].to_client_types}
        self._meta_codec = found[0].presence_codec if found else None
        #: This connection's id, once the page's presence named it.
        self.connection_id: int | None = None
        self._presence: dict[int, Presence] = {}
        self._presence_updates: asyncio.Queue[list[Presence]] = asyncio.Queue()
        #: The server's resume token and whether the last connection resumed (its hello).
        self.resume_token: str | None = None
        self.resumed = False
        self._hello: asyncio.Future[dict[str, Any]] | None = None
        self.last_seq = 0  # the last numbered frame received
        self._acked_seq = 0  # the last one acknowledged to the server
        self._next_send = itertools.count(1)
        # Numbered sends the server has not answered, in seq order: written
        # ones, then (while no connection is ready) the queued ones.
        self._unacked: dict[int, _Send] = {}
        self._ready = False  # this connection's hello arrived: sends go straight out
        self._unread_paused = False  # reading paused: max_unread_messages wait in receive()
        self._closed_for_good: ConnectionClosed | None = None  # by close(), or code 4000/4001/4003

    async def __aenter__(self) -> PageConnection:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the WebSocket; raises ``RemoteError`` if the server refuses.

        Whatever ends the handshake early (a refusal, a time-out, a bad
        answer, cancellation) closes the socket before it propagates."""
        c = self.client
        if self._reader_task is not None and not self._reader_task.done():
            raise UsageError(f"page {self.path!r} is connected already: reconnect() opens it again")
        loop = asyncio.get_running_loop()
        reader, writer = await _within(c._open(), c.timeout)
        try:
            trailing = await self._handshake(reader, writer)
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        self._unread_paused = False
        self._closed_for_good = None
        self._hello = loop.create_future()
        self._reader_task = loop.create_task(self._read(reader, trailing))

    async def wait_closed(self) -> None:
        """Return once the connection is closed, by either side or lost
        (``close_code`` says how: 1006 when it was lost)."""
        if self._reader_task is not None:
            await asyncio.shield(self._reader_task)

    async def reconnect(self) -> bool:
        """Open the page again after its connection was lost (or closed):
        with the server's resume token, so a page the server still holds
        goes on where it was (missed pushes arrive in order, no
        ``server_init``). Returns whether it resumed.

        Resumed, the sends the server had not taken are sent again (it
        takes each once) and the queued ones follow. Not resumed (a fresh
        ``server_init``), a send written before and not answered raises
        ``RemoteError("connection_lost")`` from its ``send()``: it may or
        may not have been applied to the old model, and it is not applied
        to the new one; the queued sends, never written, go to the new
        model."""
        self._ready = False  # sends wait for the new connection's hello
        if self._reader_task is not None:
            if self._writer is not None:
                self._writer.transport.abort()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        stale = [item for item in self._drain_inbox() if not isinstance(item, ConnectionClosed)]
        for item in stale:
            self._inbox.put_nowait(item)
        self._ws = _WsReader(self.client.max_message_bytes, client=True)
        self.close_code, self.close_reason = None, ""
        await self.connect()
        assert self._hello is not None and self._reader_task is not None
        # The page's hello comes first, unless the server refused the page and closed.
        waits = (self._hello, self._reader_task)
        await _within(asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED), self.client.timeout)
        if not self._hello.done():
            raise ConnectionClosed(self.close_code or 1006, self.close_reason)
        return self.resumed

    def _drain_inbox(self) -> list[Any]:
        items = []
        while not self._inbox.empty():
            items.append(self._inbox.get_nowait())
        return items

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        """Send the upgrade request and read the 101; returns the bytes after it."""
        c = self.client
        key = base64.b64encode(secrets.token_bytes(16))
        target = "/_rally/ws?page=" + urllib.parse.quote(self.path, safe="/") + f"&last={self.last_seq}"
        if self.resume_token is not None:
            target += "&resume=" + urllib.parse.quote(self.resume_token)
        hs = (
            c._headers()
            + self._extra
            + [
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
                ("sec-websocket-key", key.decode()),
                ("sec-websocket-version", "13"),
            ]
        )
        exchange = _HttpExchange("GET", target, hs, max_body=c.max_message_bytes)
        writer.write(exchange.request)
        while (response := exchange.response()) is None:
            exchange.feed(await _within(reader.read(65536), c.timeout))
        if response.status == 101:
            c._take_cookie(response.headers)
            accept = dict(response.headers).get(b"sec-websocket-accept")
            if accept != _ws_accept(key):
                raise RemoteError("invalid", [{"path": "", "message": "bad Sec-WebSocket-Accept"}], 101)
            return exchange.trailing
        message = response.body.decode("utf-8", "replace").strip()
        raise RemoteError("refused", [{"path": "", "message": message}], response.status)

    async def _read(self, reader: asyncio.StreamReader, data: bytes) -> None:
        ws = self._ws
        try:
            # Until a close frame, either side's: then the closing handshake
            # is done (the answer to the server's is written), and the socket
            # is closed in ``finally`` without waiting for the server to
            # close it first (RFC 6455 section 7.1.1: a client MAY).
            while self.close_code is None:
                if not data:
                    data = await reader.read(65536)
                    if not data:
                        ws.ws.receive_data(None)  # the end of the stream: wsproto's state is CLOSED
                        break
                ws.feed(data)
                data = b""
                while (event := ws.next_event()) is not None:
                    if type(event) is str:
                        self._on_text(event)
                        if self._inbox.qsize() >= self.client.max_unread_messages:
                            self._pause()
                    elif isinstance(event, wsproto.events.Ping) and ws.state is wsproto.connection.ConnectionState.OPEN:
                        self._write(ws.send(event.response()))
                    elif isinstance(event, wsproto.events.CloseConnection):
                        self._ready = False
                        self.close_code, self.close_reason = event.code, event.reason or ""
                        if ws.state is wsproto.connection.ConnectionState.REMOTE_CLOSING:
                            self._write(ws.send(event.response()))
        except ProtocolError as exc:  # a message over max_message_bytes: closed as the server closes a browser
            self.close_code, self.close_reason = exc.close_code, str(exc)
            if ws.state is wsproto.connection.ConnectionState.OPEN:
                self._write(ws.send(wsproto.events.CloseConnection(code=exc.close_code, reason=str(exc))))
        except (ConnectionError, OSError):
            pass
        finally:
            self._ready = False
            if self.close_code is None:
                self.close_code = 1006
            closed = ConnectionClosed(self.close_code, self.close_reason)
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(closed)
            if self.close_code in (CLOSE_STALE_CONTRACT, CLOSE_SESSION_CLOSED, CLOSE_REFUSED):
                self._close_for_good()  # the browser client stops here too
            self._inbox.put_nowait(closed)
            if self._writer is not None:
                self._writer.close()

    def _write(self, data: bytes) -> None:
        if self._writer is not None and data and not self._writer.is_closing():
            self._writer.write(data)

    def _on_text(self, text: str) -> None:
        """One message from the server. Anything but an envelope is reported
        by ``receive()`` as ``RemoteError("invalid")``: the reader goes on."""
        try:
            reply = json.loads(text)
        except (ValueError, RecursionError) as exc:
            self._invalid("", f"bad JSON: {str(exc)[:120]}")
            return
        if type(reply) is not dict:
            self._invalid("", f"expected an envelope object, got {_kind(reply)}")
            return
        kind = reply.get("kind")
        seq = reply.get("seq")
        if kind == "hello":
            self.resume_token, self.resumed = reply.get("resume"), bool(reply.get("resumed"))
            if not self.resumed:
                # A fresh page numbers its frames from 1 again. Reset here, as
                # the hello is read: the frames right behind it (server_init's
                # pushes, the presence list) must not look like old ones.
                self.last_seq = self._acked_seq = 0
            ack = reply.get("ack")
            self._flush_sends(self.resumed, ack if type(ack) is int else 0)
            if self._hello is not None and not self._hello.done():
                self._hello.set_result(reply)
            return
        if kind in ("push", "presence") and type(seq) is int:
            if seq <= self.last_seq:
                return  # had it already
            self.last_seq = seq
            if seq - self._acked_seq >= _CLIENT_ACK_EVERY:  # the server may forget what we have
                self._acked_seq = seq
                self._write(self._ws.send(wsproto.events.TextMessage(data=f'{{"kind":"ack","seq":{seq}}}')))
        if kind == "ack" or (kind == "error" and type(seq) is int):
            # A send's answer. An answer nobody waits for (replayed after a
            # resume, or its send given up) is dropped.
            if type(seq) is not int:
                return
            if kind == "error":
                send = self._unacked.pop(seq, None)
                if send is not None and not send.answered.done():
                    send.answered.set_exception(Client._remote_error(reply))
                return
            # Sends are applied in order and a refusal comes before the ack
            # of any later send: an ack settles every send up to it (after a
            # resume, the one ack of the sends whose own ack was lost).
            for done in [s for s in self._unacked if s <= seq]:
                send = self._unacked.pop(done)
                if not send.answered.done():
                    send.answered.set_result(None)
            return
        if kind == "presence":
            self._on_presence(reply)
            return
        if kind == "push":
            msg = reply.get("msg")
            if type(msg) is not dict or type(msg.get("type")) is not str or "fields" not in msg:
                self._invalid("msg", 'expected {"type": str, "fields": ...}')
                return
            self._inbox.put_nowait(msg)
            return
        msg_id = reply.get("id")
        if type(msg_id) in (int, str) and msg_id in self._waiting:
            fut = self._waiting.pop(msg_id)
            if not fut.done():
                fut.set_result(reply)
        elif kind == "error":
            self._inbox.put_nowait(Client._remote_error(reply))

    def _pause(self) -> None:
        """Stop reading: ``max_unread_messages`` wait in ``receive()``."""
        if not self._unread_paused and self._writer is not None:
            self._unread_paused = True
            typing.cast(asyncio.ReadTransport, self._writer.transport).pause_reading()

    def _invalid(self, path: str, message: str) -> None:
        self._inbox.put_nowait(RemoteError("invalid", [{"path": path, "message": message}]))

    def _on_presence(self, frame: dict[str, Any]) -> None:
        try:
            if "state" in frame:
                self._presence = {}
                entries = frame["state"]
            else:
                entries = frame["joins"] + frame["updates"]
                for cid in frame["leaves"]:
                    self._presence.pop(cid, None)
            for e in entries:
                meta = e["meta"] if self._meta_codec is None else self._meta_codec.decode(e["meta"])
                self._presence[e["id"]] = Presence(e["id"], e["tag"], meta)
                if e["self"]:
                    self.connection_id = e["id"]
        except (KeyError, TypeError, _Bad) as exc:
            self._invalid("", f"bad presence frame: {exc!r}"[:200])
            return
        if self._presence_updates.qsize() >= self.client.max_unread_messages:
            self._presence_updates.get_nowait()  # the oldest unread list goes: ``presence`` has the newest
        self._presence_updates.put_nowait(self.presence)

    @property
    def presence(self) -> list[Presence]:
        """Who is on the page, as the last presence frame said (``[]`` on a page without presence)."""
        return list(self._presence.values())

    async def next_presence(self, timeout: float | None = None) -> list[Presence]:
        """The presence list as the next presence frame leaves it (one call per frame, in order)."""
        if not self._presence_updates.empty():
            return self._presence_updates.get_nowait()
        return await _within(self._presence_updates.get(), timeout or self.client.timeout)

    async def send_raw(self, text: str | bytes) -> None:
        """Send one text (``str``) or binary (``bytes``) message as it is."""
        if self.close_code is not None:
            raise ConnectionClosed(self.close_code, self.close_reason)
        if self._writer is None:
            raise UsageError(f"page {self.path!r} is not connected: async with client.page(path) as page:")
        event: wsproto.events.Event = (
            wsproto.events.TextMessage(data=text) if isinstance(text, str) else wsproto.events.BytesMessage(data=text)
        )
        self._write(self._ws.send(event))
        assert self._writer is not None
        await self._writer.drain()

    async def send(self, msg: Any, timeout: float | None = None) -> None:
        """Send a message to the page's ``server_update`` and return once the
        server applied it (its ``ack``: the pushes of that ``server_update``
        have arrived by then). A message is never applied twice; once
        ``send()`` returns, it was applied once.

        Raises ``RemoteError`` when the server refuses it (``code``:
        ``unknown_type``, ``invalid``, ``internal``, ...) and
        ``ConnectionClosed`` once the page is closed for good (``close()``,
        close code 4000, 4001 or 4003). While the connection is lost (or before
        its hello) the message waits, at most ``max_queued_sends`` of them,
        and goes out after ``reconnect()``; see there for what a page that
        did not resume does with it. ``TimeoutError`` after ``timeout``
        seconds (the Client's ``timeout`` by default), or a cancellation,
        gives the message up: one not written yet is never applied, one
        written may have been applied (once)."""
        if self._closed_for_good is not None:
            raise ConnectionClosed(self._closed_for_good.code, self._closed_for_good.reason)
        seq = next(self._next_send)
        text = json.dumps({"kind": "send", "seq": seq, "msg": self.client.encode_message(msg)})
        send = _Send(text, asyncio.get_running_loop().create_future())
        ready = self._ready and self._ws.state is wsproto.connection.ConnectionState.OPEN
        if not ready:
            queued = [s for s, other in self._unacked.items() if not other.written]
            if len(queued) >= self.client.max_queued_sends:
                oldest = self._unacked.pop(queued[0])
                message = f"more than {self.client.max_queued_sends} sends waiting for a connection: dropped the oldest"
                oldest.answered.set_exception(RemoteError("queue_full", [{"path": "", "message": message}]))
        self._unacked[seq] = send
        try:
            if ready:
                send.written = True
                self._write(self._ws.send(wsproto.events.TextMessage(data=text)))
                assert self._writer is not None
                with contextlib.suppress(ConnectionError, OSError):
                    await self._writer.drain()  # a lost connection: the answer comes after reconnect()
            await self._answer(send.answered, self.client.timeout if timeout is None else timeout)
        finally:
            if self._unacked.get(seq) is send:
                del self._unacked[seq]  # given up: not written again

    async def _answer(self, answer: asyncio.Future[_T], seconds: float) -> _T:
        """``await answer`` for at most ``seconds``; a time-out while reading
        is paused says why the answer could not be read."""
        try:
            return await _within(answer, seconds)
        except asyncio.TimeoutError:
            if not self._unread_paused:
                raise
            raise asyncio.TimeoutError(
                f"no answer within {seconds} s: {self._inbox.qsize()} messages wait unread in receive() "
                f"(max_unread_messages), so the page stopped reading its connection"
            ) from None

    def _flush_sends(self, resumed: bool, ack: int) -> None:
        """At a connection's hello: settle what the page had sent, write what
        the server lacks, in seq order (it takes a seq only above the last
        it took), and let later sends go straight out."""
        if not resumed:
            lost = [seq for seq, send in self._unacked.items() if send.written]
            for seq in lost:
                send = self._unacked.pop(seq)
                message = "the connection was lost before the server answered; it may or may not have been applied"
                send.answered.set_exception(RemoteError("connection_lost", [{"path": "", "message": message}]))
        if self._ws.state is not wsproto.connection.ConnectionState.OPEN:
            return  # close() began meanwhile
        for seq, send in self._unacked.items():
            if not resumed or seq > ack:  # resumed: the server took the rest; their answers follow the hello
                send.written = True
                self._write(self._ws.send(wsproto.events.TextMessage(data=send.text)))
        self._ready = True

    def _close_for_good(self) -> None:
        """No more sends: the waiting ones raise ``ConnectionClosed``."""
        closed = ConnectionClosed(self.close_code or 1000, self.close_reason)
        self._closed_for_good = closed
        self._ready = False
        sends, self._unacked = self._unacked, {}
        for send in sends.values():
            if not send.answered.done():
                send.answered.set_exception(ConnectionClosed(closed.code, closed.reason))

    async def rpc(self, msg: Any, key: str | None = None) -> Ok[Any] | Error[Any]:
        """Call an RPC over this WebSocket; ``TimeoutError`` after the Client's
        ``timeout``. ``key``: as for ``Client.rpc``."""
        msg_id = next(self._ids)
        envelope = {"kind": "rpc", "id": msg_id, "msg": self.client.encode_message(msg)}
        if key is not None:
            envelope["key"] = key
        text = json.dumps(envelope)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = fut
        try:
            await self.send_raw(text)
            reply = await self._answer(fut, self.client.timeout)
        finally:
            # Answered, timed out, cancelled or closed: a late reply finds no one.
            self._waiting.pop(msg_id, None)
        return self.client._decode_reply(type(msg).__name__, reply)

    async def receive(self, timeout: float | None = None) -> Any:
        """The next push; raises ``RemoteError`` or ``ConnectionClosed``."""
        inbox = self._inbox
        item = inbox.get_nowait() if not inbox.empty() else await _within(inbox.get(), timeout or self.client.timeout)
        if self._unread_paused and inbox.qsize() < self.client.max_unread_messages:
            self._unread_paused = False
            if self._writer is not None:  # room again (a no-op once closed)
                typing.cast(asyncio.ReadTransport, self._writer.transport).resume_reading()
        if isinstance(item, ConnectionClosed):
            self._inbox.put_nowait(item)  # every later receive() sees it too
            raise item
        if isinstance(item, RemoteError):
            raise item
        codec = self._page_types.get(item.get("type"))
        if codec is None and self.client._registry is not None:
            cls = self.client._codecs._classes.get(item.get("type"))
            codec = self.client._codecs.get(cls) if cls else None
        if codec is None:
            return item
        try:
            return codec.decode(item["fields"])
        except _Bad as bad:
            raise RemoteError("invalid", [bad.error("msg.fields")]) from None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            try:
                yield await self.receive(timeout=1e9)
            except ConnectionClosed:
                return

    async def close(self, code: int = 1000) -> None:
        """Close the WebSocket and wait for the server's answer (bounded by
        the Client's ``timeout``). If the calling task is cancelled meanwhile,
        the socket is still closed and the cancellation propagates."""
        writer = self._writer
        self._ready = False
        if writer is None:
            self._close_for_good()
            return
        try:
            if self._ws.state is wsproto.connection.ConnectionState.OPEN:
                self._write(self._ws.send(wsproto.events.CloseConnection(code=code)))
            if self._reader_task is not None:
                # A time-out, or the reader's own failure, ends the wait; a
                # cancellation of this task is not caught.
                with contextlib.suppress(Exception):
                    await _within(asyncio.shield(self._reader_task), self.client.timeout)
        finally:
            if self._reader_task is not None:
                self._reader_task.cancel()
            self._writer = None
            writer.close()
            self._close_for_good()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class TestClient(Client):
    """``rally.Client`` for tests: runs ``app`` in this process, with no socket.

    ``async with rally.TestClient(app) as client:`` does what ``app.start``
    does (starts the app's broker if it has one, enters its lifespan) but
    listens nowhere; every connection the client opens (HTTP, and each
    ``client.page(path)``) is an in-memory pair of transports wired to the
    server's own HTTP and WebSocket code, so requests, pages, presence,
    resumes, limits and errors behave as over a socket (``RemoteError``,
    ``ConnectionClosed``). Leaving the block closes the client and shuts the
    server down as ``Server.close()`` does: open pages get 1001, the
    lifespan exits, the broker stops. ``client.server`` is that ``Server``
    (``client.app`` its App), ``client.client()`` another client of it: a
    second browser, with a session of its own unless ``session=`` joins one.

    ``url`` is the address the server pretends to listen at (the ``Host``
    the client sends, and which hosts it allows by default: loopback names
    for the default). A broker is started as the app would start it, so an
    app with one still talks to Redis over the network; only the HTTP and
    WebSocket traffic is in memory.
    """

    __test__ = False  # a class pytest should not collect, whatever its name says

    def __init__(
        self,
        app: App,
        *,
        url: str = "http://127.0.0.1",
        origin: str | None = None,
        session: str | None = None,
        timeout: float = 30.0,
        access_log: bool = False,
        max_message_bytes: int = _CLIENT_MAX_MESSAGE_BYTES,
        max_queued_sends: int = _CLIENT_MAX_QUEUED_SENDS,
        max_unread_messages: int = _CLIENT_MAX_UNREAD_MESSAGES,
    ) -> None:
        if not isinstance(app, App):
            raise UsageError(f"TestClient(app): expected a rally.App, got {type(app).__name__}")
        super().__init__(
            url,
            app,
            origin=origin,
            session=session,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            max_queued_sends=max_queued_sends,
            max_unread_messages=max_unread_messages,
        )
        self.app = app
        self.url = url
        self.server: Server | None = None
        self._access_log = access_log
        self._owner = True  # it started the server, and closes it

    async def __aenter__(self) -> TestClient:
        if not self._owner:
            return self
        if self.server is not None:
            raise UsageError("this TestClient was entered already: make a new one")
        server = Server(self.app, self._access_log)
        self.app._loop = server.loop
        await server._open(self.host, self.port, None, listen=False)
        self.server = server
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.close()
        finally:
            if self._owner and self.server is not None:
                await self.server.close()

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        server = self.server
        if server is None:
            raise UsageError("a TestClient serves its app inside async with rally.TestClient(app) as client:")
        if server.closing:
            raise ConnectionRefusedError("the TestClient's server is closed")
        return server._connect_in_memory()

    def client(self, *, origin: str | None = None, session: str | None = None) -> TestClient:
        """Another client of this server (its own cookie jar: a second
        browser); closed by ``async with`` or ``close()``, and in any case
        when this one's block ends and the server shuts down."""
        if self.server is None:
            raise UsageError("a TestClient serves its app inside async with rally.TestClient(app) as client:")
        other = TestClient(
            self.app,
            url=self.url,
            origin=origin,
            session=session,
            timeout=self.timeout,
            max_message_bytes=self.max_message_bytes,
            max_queued_sends=self.max_queued_sends,
            max_unread_messages=self.max_unread_messages,
        )
        other.server = self.server
        other._owner = False
        return other


# ==== Workers: one listening socket, several processes =======================

#: Exit code of a worker that could not start serving: the parent then stops
#: instead of starting it again and again (gunicorn's WORKER_BOOT_ERROR).
_WORKER_BOOT_FAILED: Final = 3
#: A worker that dies sooner than this after starting is replaced after a
#: delay that doubles from 0.1 s up to _WORKER_RESTART_MAX_S; a later death
#: is replaced at once.
_WORKER_STABLE_S: Final = 10.0
_WORKER_RESTART_MAX_S: Final = 10.0
#: After the shutdown bound of the workers themselves, the parent waits this
#: much longer before it kills the ones still running.
_WORKER_STOP_MARGIN_S: Final = 5.0


class _Workers:
    """``app.run(workers=N)``: the parent binds the socket once and forks N
    workers that accept on it, each an ordinary server (its own event loop,
    connections, lifespan and broker connection; the session secret is the
    parent's, inherited). A worker that dies is replaced; one that cannot
    start serving stops them all. SIGTERM, SIGINT or SIGHUP (unless the
    parent started with it ignored, as under nohup) reaches every worker as
    SIGTERM, each shuts down gracefully, and those still running after the
    shutdown bound are killed. A parent that dies without doing so (SIGKILL)
    takes its workers with it: each watches a pipe whose write end only the
    parent holds, and shuts down gracefully when the pipe reports EOF. The
    parent runs no event loop: it sleeps in ``select`` on the self-pipe its
    signal handlers write to."""

    def __init__(self, app: App, host: str, port: int, count: int, access_log: bool) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise UsageError(f"workers={count!r}: expected an integer of at least 1")
        if app.broker is None:
            raise UsageError(
                f"workers={count} needs a broker: each worker holds its own connections, so a broadcast made "
                "in one would not reach the others'; set App(broker='redis://...') or RALLY_BROKER"
            )
        if not hasattr(os, "fork"):
            raise UsageError(f"workers={count} needs os.fork (Unix)")
        self.app = app
        self.host = host
        self.port = port
        self.count = count
        self.access_log = access_log
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started)
        self.due: dict[int, float] = {}  # slot -> when to start its next worker
        self.quick_deaths = [0] * count  # per slot, deaths in a row soon after starting
        self.stop_signal: int | None = None
        self.deadline: float | None = None  # for the workers to stop, once stopping
        self.code = 0
        self.served = False  # in a worker (its own copy of this object): whether it has started serving
        self.stop_signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)
        self.parent = 0  # pid
        self.lifeline = (-1, -1)  # read end, write end: EOF on the read end means the parent is gone

    def run(self) -> int:
        """Serve until a signal stops every worker; returns the exit code."""
        sock = _listening_socket(
            socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        )
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        # Not inheritable (neither end is): a program a worker execs holds neither.
        self.lifeline = os.pipe()
        self.parent = os.getpid()
        if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # nohup: stays ignored, here and in the workers
            self.stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        handled = (signal.SIGCHLD, *self.stop_signals)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        previous_fd = signal.set_wakeup_fd(wake_w)
        try:
            for slot in range(self.count):
                self._spawn(slot, sock, (wake_r, wake_w))
            host, port = sock.getsockname()[:2]
            url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            print(f"rally.py serving on {url} with {self.count} workers (Ctrl-C stops)", file=sys.stderr, flush=True)
            while self.children or (self.due and self.stop_signal is None):
                self._step(sock, (wake_r, wake_w))
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)
            os.close(self.lifeline[0])
            os.close(self.lifeline[1])  # workers still running (the parent failed) now see EOF and stop
            sock.close()
        return self.code

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        # Only a note: the self-pipe wakes the loop, which does the work.
        if signum != signal.SIGCHLD and self.stop_signal is None:
            self.stop_signal = signum

    def _step(self, sock: socket.socket, pipe: tuple[int, int]) -> None:
        """Wait for a signal or the next timer, then reap, stop and restart."""
        import select

        now = time.monotonic()
        if self.stop_signal is not None and self.deadline is None:
            _logger.info("stopping %d workers (%s)", len(self.children), signal.Signals(self.stop_signal).name)
            self._signal_all(signal.SIGTERM)
            limits = self.app._limits
            self.deadline = now + limits.shutdown_timeout + limits.close_timeout + _WORKER_STOP_MARGIN_S
            self.due.clear()
        timeout = None  # select waits for a signal
        if self.deadline is not None and self.deadline != math.inf:  # inf: killed, waiting for SIGCHLD
            timeout = max(0.0, self.deadline - now)
        elif self.due:
            timeout = max(0.0, min(self.due.values()) - now)
        select.select([pipe[0]], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(pipe[0], 512):
                pass
        self._reap()
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline and self.children:
            _logger.error("%d workers did not stop in time; killing them", len(self.children))
            self._signal_all(signal.SIGKILL)
            self.deadline = math.inf
        if self.stop_signal is None:
            for slot, when in list(self.due.items()):
                if when <= now:
                    del self.due[slot]
                    self._spawn(slot, sock, pipe)

    def _signal_all(self, sig: int) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _reap(self) -> None:
        """Collect every worker that ended; plan a replacement unless stopping."""
        while self.children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            found = self.children.pop(pid, None)
            if found is None:
                continue
            slot, started = found
            code = os.waitstatus_to_exitcode(status)
            if self.stop_signal is not None:
                continue
            if code == _WORKER_BOOT_FAILED:
                _logger.error("worker %d could not start serving; stopping the others", pid)
                self.stop_signal, self.code = signal.SIGTERM, 1
                continue
            lived = time.monotonic() - started
            if lived >= _WORKER_STABLE_S:
                self.quick_deaths[slot] = 0
                delay = 0.0
            else:
                delay = min(_WORKER_RESTART_MAX_S, 0.1 * 2 ** min(self.quick_deaths[slot], 30))
                self.quick_deaths[slot] += 1
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            _logger.error("worker %d %s after %.1f s; starting another in %.1f s", pid, how, lived, delay)
            self.due[slot] = time.monotonic() + delay

    def _spawn(self, slot: int, sock: socket.socket, pipe: tuple[int, int]) -> None:
        pid = os.fork()
        if pid:
            self.children[pid] = (slot, time.monotonic())
            return
        # The worker: never returns into the parent's code. Its exit code
        # tells the parent whether it failed before serving (stop them all)
        # or after (a crash like any other: replace it).
        code: int | None = None
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for sig in self.stop_signals:
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.close(pipe[0])
            os.close(pipe[1])
            os.close(self.lifeline[1])  # only the parent holds the write end
            code = asyncio.run(self._serve(sock))
        except Exception:
            when = "after serving" if self.served else "before serving"
            _logger.exception("worker %d failed %s", os.getpid(), when)
        finally:
            if code is None:
                code = 1 if self.served else _WORKER_BOOT_FAILED
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    async def _serve(self, sock: socket.socket) -> int:
        """One worker's life: serve on the shared socket until a stop signal
        or until the parent is gone."""
        try:
            server = await self.app.start(self.host, self.port, access_log=self.access_log, sock=sock)
        except Exception:
            _logger.exception("worker %d could not start serving", os.getpid())
            return _WORKER_BOOT_FAILED
        self.served = True  # from here on a failure, a failing shutdown included, is no boot failure
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in self.stop_signals:
            loop.add_signal_handler(sig, stop.set)

        def parent_gone() -> None:  # EOF stays readable: stop watching
            loop.remove_reader(self.lifeline[0])
            _logger.warning("worker %d: parent %d is gone; shutting down", os.getpid(), self.parent)
            stop.set()

        loop.add_reader(self.lifeline[0], parent_gone)
        await stop.wait()
        await server.close()
        return 0


# ==== Command line ===========================================================


_cli_importing: str | None = None  # the module ``python rally.py`` is importing


def _module_of_file(target: str) -> str | None:
    """``module:app`` for a target that names a Python file (``example.py``,
    ``src/example.py:app``) instead of a module, else None."""
    path, colon, attr = target.rpartition(":")
    if not colon:
        path, attr = attr, ""
    if not path.endswith(".py"):
        return None
    relative = os.path.relpath(os.path.abspath(path))
    parts = relative[: -len(".py")].split(os.sep)
    if relative.startswith(os.pardir) or not all(p.isidentifier() for p in parts):
        return f"{os.path.basename(path)[: -len('.py')]}:{attr or 'app'} (run from the directory of {path})"
    return f"{'.'.join(parts)}:{attr or 'app'}"


def _refuse_file_name(target: str) -> None:
    meant = _module_of_file(target)
    if meant is not None:
        raise SystemExit(f"rally.py: {target} is a file name, and rally.py takes module:app; did you mean {meant}?")


def _load_app(target: str) -> App:
    """Import ``module:app`` from the current directory; a target that is
    not one, a module that is not there or an attribute that is not an App
    ends the program with what to write instead."""
    import importlib

    global _cli_importing
    module_name, _, attr = target.partition(":")
    if not module_name:
        raise SystemExit(f"rally.py: expected module:app, got {target!r}")
    _refuse_file_name(target)
    sys.path.insert(0, os.getcwd())
    # Run as ``python rally.py``, this module is __main__: the app's
    # ``import rally`` must find it rather than load a second copy.
    sys.modules.setdefault("rally", sys.modules[__name__])
    _cli_importing = module_name
    try:
        module = importlib.import_module(module_name)
    except UsageError as exc:
        raise SystemExit(f"rally.py: {exc}") from None
    except ModuleNotFoundError as exc:
        # The module itself (or its package) is missing, rather than one it imports.
        if exc.name is None or not (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise
        raise SystemExit(
            f"rally.py: no module named {module_name!r} in {os.getcwd()} or on sys.path; run python rally.py"
            f" from the directory that holds {module_name.replace('.', os.sep)}.py, and name it without .py"
        ) from None
    finally:
        _cli_importing = None

    def is_app(value: object) -> bool:  # by duck typing: the app may hold another copy of this module's App
        return hasattr(value, "run") and hasattr(value, "contract") and not isinstance(value, type)

    name = attr or "app"
    app = getattr(module, name, None)
    if not is_app(app):
        apps = sorted(k for k, v in vars(module).items() if is_app(v))
        hint = f"did you mean {' or '.join(f'{module_name}:{k}' for k in apps)}?" if apps else "it has no rally.App"
        if not hasattr(module, name):
            raise SystemExit(f"rally.py: module {module_name} has no attribute {name!r}; {hint}")
        raise SystemExit(f"rally.py: {module_name}.{name} is not a rally.App (it is {type(app).__name__}); {hint}")
    return typing.cast(App, app)


# ==== --reload: restart the server when a Python file changes ================

#: How often ``--reload`` looks at the modification times of the Python files (s).
_RELOAD_POLL_S: Final = 0.5
#: How long ``--reload`` lets a server process shut down gracefully before it kills it (s).
_RELOAD_STOP_S: Final = 15.0
#: The environment variable by which ``--reload`` hands a server process the
#: listening socket's descriptor and the read end of its lifeline pipe.
_RELOAD_FDS: Final = "_RALLY_RELOAD_FDS"
#: Directories ``--reload`` does not look into (besides hidden ones and virtual environments).
_RELOAD_SKIPPED: Final = frozenset(("__pycache__", "node_modules", "site-packages"))


def _python_files(root: str) -> dict[str, tuple[int, int]]:
    """Every ``.py`` file under ``root``, with its modification time (ns)
    and size; hidden directories, virtual environments and _RELOAD_SKIPPED
    are left out."""
    found: dict[str, tuple[int, int]] = {}
    for directory, dirs, files in os.walk(root):
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".")
            and d not in _RELOAD_SKIPPED
            and not os.path.exists(os.path.join(directory, d, "pyvenv.cfg"))
        ]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with contextlib.suppress(OSError):  # gone since os.walk listed it
                    st = os.stat(path)
                    found[path] = (st.st_mtime_ns, st.st_size)
    return found


class _Reloader:
    """``python rally.py module:app --reload``: the parent binds the
    listening socket once and runs the server in a child process (this
    file, run again with the socket's descriptor in _RELOAD_FDS), polls the
    modification times of the Python files under the current directory, and
    on a change stops the child gracefully and starts another on the same
    socket: connections made meanwhile wait in its backlog. The parent never
    imports the app, so an app that fails to import is reported by the child
    and started again at the next change. Pages reconnect by themselves (a
    changed contract makes them reload); the children share one session
    secret (RALLY_SECRET, unless set), so their cookies stay valid. A child
    watches a pipe whose write end only the parent holds, and shuts down
    when the parent is gone."""

    def __init__(self, target: str, child_args: list[str], host: str, port: int) -> None:
        self.command = [sys.executable, os.path.abspath(__file__), target, *child_args]
        self.host = host
        self.port = port
        self.root = os.getcwd()
        self.stop_signal: int | None = None

    def run(self) -> int:
        """Serve and restart until SIGINT, SIGTERM or SIGHUP; returns the exit code."""
        sock = _listening_socket(
            socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        )
        lifeline = os.pipe()  # neither end inheritable: each child gets the read end by pass_fds
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # no .pyc older than its edited source
        env[_RELOAD_FDS] = f"{sock.fileno()},{lifeline[0]}"
        if not env.get("RALLY_SECRET"):
            env["RALLY_SECRET"] = secrets.token_hex(32)
        signals = [signal.SIGINT, signal.SIGTERM]
        if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
            signals.append(signal.SIGHUP)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}
        child: subprocess.Popen[bytes] | None = None
        try:
            host, port = sock.getsockname()[:2]
            url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            print(
                f"rally.py --reload: serving on {url}; restarting when a .py file under {self.root} changes",
                file=sys.stderr,
                flush=True,
            )
            files = _python_files(self.root)
            child = self._start(env, (sock.fileno(), lifeline[0]))
            told = False
            while self.stop_signal is None:
                time.sleep(_RELOAD_POLL_S)
                now = _python_files(self.root)
                changed = sorted(p for p in now.keys() | files.keys() if now.get(p) != files.get(p))
                if changed and self.stop_signal is None:
                    names = [os.path.relpath(p, self.root) for p in changed]
                    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                    print(f"rally.py --reload: {', '.join(names[:3])}{more} changed; restarting", file=sys.stderr)
                    sys.stderr.flush()
                    self._stop(child)
                    files = _python_files(self.root)  # with what changed while the child stopped
                    child, told = self._start(env, (sock.fileno(), lifeline[0])), False
                elif child.poll() is not None and not told:
                    print(
                        f"rally.py --reload: the server exited with code {child.returncode};"
                        " it starts again when a .py file changes",
                        file=sys.stderr,
                        flush=True,
                    )
                    told = True
        finally:
            if child is not None:
                self._stop(child)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(lifeline[0])
            os.close(lifeline[1])
            sock.close()
        return 0

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        self.stop_signal = signum

    def _start(self, env: dict[str, str], fds: tuple[int, int]) -> subprocess.Popen[bytes]:
        import subprocess

        return subprocess.Popen(self.command, env=env, pass_fds=fds)

    @staticmethod
    def _stop(child: subprocess.Popen[bytes]) -> None:
        """Stop the child gracefully (SIGTERM), killing it after _RELOAD_STOP_S."""
        import subprocess

        if child.poll() is None:
            child.terminate()
        try:
            child.wait(_RELOAD_STOP_S)
        except subprocess.TimeoutExpired:
            _logger.error("the server process %d did not stop in %.0f s; killing it", child.pid, _RELOAD_STOP_S)
            child.kill()
            child.wait()


def _serve_reloaded(app: App, fds: str, access_log: bool) -> None:
    """A ``--reload`` child: serve on the parent's socket until SIGINT,
    SIGTERM or the parent is gone, then shut down gracefully."""
    sock_fd, lifeline = (int(fd) for fd in fds.split(","))
    sock = socket.socket(fileno=sock_fd)
    if not logging.getLogger().handlers and not _logger.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def serve() -> None:
        server = await app.start(access_log=access_log, sock=sock)
        print(f"rally.py serving on {server.url} (Ctrl-C stops; --reload restarts it)", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def parent_gone() -> None:  # EOF stays readable: stop watching
            loop.remove_reader(lifeline)
            _logger.warning("the --reload parent is gone; shutting down")
            stop.set()

        loop.add_reader(lifeline, parent_gone)
        await stop.wait()
        await server.close()

    asyncio.run(serve())


def main(argv: list[str] | None = None) -> None:
    """``python rally.py module:app [--host H] [--port P] [--workers N | --reload] [--types FILE]
    [--openapi FILE] [--asyncapi FILE]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="rally.py", description="Serve a rally.py app.")
    parser.add_argument("app", help="module:attribute of the App, e.g. demo:app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    parser.add_argument(
        "--types", metavar="FILE", help="write the app's TypeScript declarations to FILE (- for stdout) and exit"
    )
    parser.add_argument(
        "--openapi", metavar="FILE", help="write the app's OpenAPI 3.1 document to FILE (- for stdout) and exit"
    )
    parser.add_argument(
        "--asyncapi", metavar="FILE", help="write the app's AsyncAPI 3.0 document to FILE (- for stdout) and exit"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (above 1 needs a broker)")
    parser.add_argument(
        "--reload", action="store_true", help="restart the server when a .py file under this directory changes"
    )
    reloaded = os.environ.pop(_RELOAD_FDS, None)  # set for a --reload child; not for what it starts
    args = parser.parse_args(argv)
    if args.reload:
        if args.workers != 1:
            parser.error(
                f"--reload runs the server in one process and restarts it; it cannot be combined with"
                f" --workers {args.workers} (serve with --workers, without --reload, in production)"
            )
        if args.types is not None or args.openapi is not None or args.asyncapi is not None:
            parser.error(
                "--reload serves the app; --types, --openapi and --asyncapi write a document and exit: give one"
            )
        if os.name != "posix":
            parser.error("--reload needs a Unix system (it passes the listening socket to a child process)")
        _refuse_file_name(args.app)
        try:
            _check_port(args.port)
        except UsageError as exc:
            parser.error(str(exc))
        child_args = ["--no-access-log"] if args.no_access_log else []
        try:
            code = _Reloader(args.app, child_args, args.host, args.port).run()
        except _CannotListen as exc:
            raise SystemExit(f"rally.py: {exc.strerror}") from None
        raise SystemExit(code)
    app = _load_app(args.app)
    if reloaded is not None:
        _serve_reloaded(app, reloaded, access_log=not args.no_access_log)
        return
    views = [(args.types, _typescript), (args.openapi, _openapi), (args.asyncapi, _asyncapi)]
    wanted = [(file, make) for file, make in views if file is not None]
    for file, make in wanted:
        if file == "-":
            sys.stdout.write(make(app.contract))
        else:
            with open(file, "w", encoding="utf-8") as f:
                f.write(make(app.contract))
    if not wanted:
        try:
            app.run(args.host, args.port, access_log=not args.no_access_log, workers=args.workers)
        except UsageError as exc:
            parser.error(str(exc))


if __name__ == "__main__":
    main()
