"""rally.py: typed RPC and stateful server pages over HTTP/1.1 and WebSocket.

One module, pure asyncio, built on the sans-IO libraries h11 and wsproto and
nothing else at run time. A web page calls typed Python functions (RPC) and
holds a stateful server-side page whose model lives on the server; the server
pushes typed messages back to one connection, one browser session, one page
or the whole app. The Python type hints of the handlers are the wire contract.

Theory of operation. Registration (``App.page``, ``App.rpc``) reads the type
hints once and builds a handler table of codecs: strict JSON decoders and
checked encoders for every message, result and push. The wire layer turns
bytes into h11/wsproto events and frames into bytes without touching asyncio.
Dispatch maps a decoded envelope to a handler and an effect to a set of
recipients, and never sees a socket. The transport is one
``asyncio.BufferedProtocol`` per connection (no task per connection): it reads
into one buffer shared by the whole server, writes through one place that
enforces the outgoing bound, owns every timer, and stages shutdown. A
broadcast is encoded and framed once; the same bytes go to every recipient.

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
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import re
import secrets
import signal
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

import h11
import wsproto.connection
import wsproto.events
import wsproto.frame_protocol
from wsproto.connection import ConnectionState, ConnectionType

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
    "RallyError",
    "ProtocolError",
    "ContractError",
    "RegistrationError",
    "RemoteError",
    "ConnectionClosed",
    "CLOSE_STALE_CONTRACT",
    "CLOSE_SESSION_CLOSED",
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
#: Time a peer has to answer our close frame (websockets: 10 s).
DEFAULT_CLOSE_TIMEOUT_S: Final = 10.0
#: One call of an ``async`` handler.
DEFAULT_HANDLER_TIMEOUT_S: Final = 30.0
#: Graceful shutdown: in-flight work gets this long before it is cancelled.
DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 5.0
#: Bytes queued for one connection before it counts as a slow consumer.
DEFAULT_MAX_OUTGOING_BYTES: Final = 1024 * 1024
#: Open connections, HTTP and WebSocket together.
DEFAULT_MAX_CONNECTIONS: Final = 10_000
#: ``send`` messages waiting for ``server_update``; reading pauses beyond it.
DEFAULT_MAX_PENDING_MESSAGES: Final = 64

#: Flow control: a transport pauses our writers above this many buffered bytes.
_WRITE_HIGH_WATER: Final = 64 * 1024
#: How long a refused request's remaining bytes are read before the socket closes.
_LINGER_S: Final = 1.0
#: One read buffer shared by every connection of a server.
_READ_BUFFER_BYTES: Final = 256 * 1024
#: Largest integer JavaScript represents exactly (Number.MAX_SAFE_INTEGER).
_MAX_SAFE_INT: Final = 2**53 - 1
_SESSION_COOKIE: Final = "rally_session"
_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: Close codes chosen by rally.py (RFC 6455 section 7.4.2 leaves 4000-4999 to
#: applications): the page's contract changed, and the session was closed.
CLOSE_STALE_CONTRACT: Final = 4000
CLOSE_SESSION_CLOSED: Final = 4001


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


# ==== Errors ================================================================


class RallyError(Exception):
    """Root of every error rally.py raises."""


class ProtocolError(RallyError):
    """The peer broke HTTP, WebSocket or the envelope format.

    ``status`` is the HTTP status to answer with; ``close_code`` the WebSocket
    close code.
    """

    def __init__(self, message: str, status: int = 400, close_code: int = 1002) -> None:
        super().__init__(message)
        self.status = status
        self.close_code = close_code


class ContractError(RallyError):
    """A value broke the contract: it does not match its type or a limit.

    ``code`` is the wire error code (``invalid``, ``unknown_type``,
    ``too_large``, ...) and ``errors`` a list of ``{"path", "message"}``.
    """

    def __init__(self, code: str, errors: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{e['path']}: {e['message']}" for e in errors) or code)
        self.code = code
        self.errors = errors


class RegistrationError(RallyError, TypeError):
    """The program misused the API: raised at registration, never at request time."""


class RemoteError(RallyError):
    """The server answered a ``Client`` with an ``error`` envelope."""

    def __init__(self, code: str, errors: list[dict[str, str]], status: int | None = None) -> None:
        super().__init__(f"{code}: " + "; ".join(f"{e.get('path')}: {e.get('message')}" for e in errors))
        self.code = code
        self.errors = errors
        self.status = status


class ConnectionClosed(RallyError):
    """The WebSocket is closed; ``code`` and ``reason`` say how."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class _Bad(Exception):
    """Decoding or encoding failed; containers prepend their path segment.
    ``code`` is ``invalid``, or ``too_large`` for a value over a limit."""

    __slots__ = ("message", "segments", "code")

    def __init__(self, message: str, code: str = "invalid") -> None:
        self.message = message
        self.segments: list[str] = []
        self.code = code

    def at(self, root: str) -> dict[str, str]:
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


class Ok(_Value, Generic[_T]):
    """A successful RPC result; encoded with the T of ``Result[T, E]``."""

    __slots__ = ("value",)
    __match_args__ = ("value",)

    def __init__(self, value: _T) -> None:
        self.value = value


class Error(_Value, Generic[_E]):
    """A failed RPC result the client should handle (a form error, say)."""

    __slots__ = ("error",)
    __match_args__ = ("error",)

    def __init__(self, error: _E) -> None:
        self.error = error


Result = Union[Ok[_T], Error[_E]]  # noqa: UP007 - a generic alias needs Union
"""``Result[T, E]``: the return annotation of an RPC handler."""


class Effect(_Value, Generic[_M]):
    """What a stateful handler asks to be delivered after it returns.

    Build one with the functions of ``rally.effect``; ``Effect[ToClient]`` in
    an annotation names the push types of a page.
    """

    __slots__ = ("scope", "msg", "children")
    __match_args__ = ("scope", "msg", "children")

    def __init__(self, scope: str, msg: Any = None, children: tuple[Effect[_M], ...] = ()) -> None:
        self.scope = scope  # "none", "client", "session", "page", "app" or "batch"
        self.msg = msg
        self.children = children


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
    def broadcast_to_page(msg: _M) -> Effect[_M]:
        """Deliver ``msg`` to every connection on the same page path."""
        return Effect("page", msg)

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
    """An annotation outside SPEC section 3, found while building a codec."""


def _is_dataclass_type(tp: object) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


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
        """``(name, codec, has_default)`` of each field a dataclass's __init__ takes."""
        try:
            hints = typing.get_type_hints(cls)
        except Exception as exc:
            raise _Unsupported(f"cannot resolve the annotations of {cls.__name__}: {exc}") from None
        fields = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            try:
                fc = self.get(hints[f.name])
            except _Unsupported as exc:
                raise _Unsupported(f"{cls.__name__}.{f.name}: {exc}") from None
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            fields.append((f.name, fc, has_default))
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
        names = frozenset(n for n, _, _ in fields)
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
                raise _Bad(f"unknown field {extra[0][:40]!r} for {cls.__name__}")
            if len(kwargs) < len(required):
                missing = [n for n in required if n not in kwargs]
                if missing:
                    raise _Bad(f"missing field {missing[0]!r} of {cls.__name__}")
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


class _Json:
    """JSON reader under one set of limits; raises only ``ContractError``."""

    def __init__(self, limits: _Limits) -> None:
        self.max_depth = limits.max_json_depth
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
        if text.count("[") + text.count("{") > self.max_depth and _depth_exceeds(value, self.max_depth):
            raise ContractError("too_large", [{"path": "", "message": f"JSON nested deeper than {self.max_depth}"}])
        return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if type(v) is dict else v if type(v) is list else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if type(c) in (dict, list))
    return False


_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _dumps(value: Any) -> bytes:
    """Compact JSON; ASCII-only so lone surrogates stay valid on the wire.
    One encoder for the process: ``json.dumps`` with options builds a new one
    per call."""
    return _ENCODER.encode(value).encode("ascii")


# Envelopes (SPEC section 4).

_ERROR_STATUS: Final = {
    "invalid": 400,
    "unknown_type": 400,
    "not_stateful": 400,
    "too_large": 413,
    "stale_contract": 409,
    "internal": 500,
}


def _ok_reply(msg_id: Any, value: Any) -> bytes:
    return _dumps({"kind": "ok", "id": msg_id, "value": value})


def _err_reply(msg_id: Any, error: Any) -> bytes:
    return _dumps({"kind": "err", "id": msg_id, "error": error})


def _error_reply(msg_id: Any, code: str, errors: list[dict[str, str]]) -> bytes:
    return _dumps({"kind": "error", "id": msg_id, "code": code, "errors": errors})


_INTERNAL_ERRORS: Final = [{"path": "", "message": "internal server error"}]


def _parse_envelope(value: Any) -> tuple[str, Any, Any]:
    """Check an envelope's shape: returns ``(kind, id, msg)``."""

    def bad(path: str, message: str) -> ContractError:
        return ContractError("invalid", [{"path": path, "message": message}])

    if type(value) is not dict:
        raise bad("", f"expected an envelope object, got {_kind(value)}")
    kind = value.get("kind")
    if kind == "rpc":
        msg_id = value.get("id")
        if type(msg_id) is not int and type(msg_id) is not str:
            raise bad("id", f"expected int or str, got {_kind(msg_id)}")
        if len(value) != 3 or "msg" not in value:
            raise bad("", 'an rpc envelope has exactly "kind", "id" and "msg"')
    elif kind == "send":
        msg_id = None
        if len(value) != 2 or "msg" not in value:
            raise bad("", 'a send envelope has exactly "kind" and "msg"')
    else:
        raise bad("kind", f'expected "rpc" or "send", got {_short(kind)}')
    msg = value["msg"]
    if type(msg) is not dict or type(msg.get("type")) is not str or "fields" not in msg or len(msg) != 2:
        raise ContractError("invalid", [{"path": "msg", "message": 'expected {"type": str, "fields": object}'}])
    return kind, msg_id, msg


# ==== Wire: h11 and wsproto adapters (sans-IO) ==============================


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


def _unmask(mask: bytes, payload: bytes) -> bytes:
    """XOR a client frame's payload with its 4-byte key (RFC 6455 section 5.3)."""
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def _read_text_frames(data: bytes) -> list[tuple[str, int]] | None:
    """The messages of ``data`` if it is nothing but whole, final, masked text
    frames of up to 64 KiB with no extension bits: what a browser sends for
    every typed message. ``None`` for anything else, which wsproto then parses
    (and judges, for a protocol error). Returns ``(text, payload bytes)``.

    wsproto spends about 6 us on a small frame; this takes under one."""
    out = []
    i, n = 0, len(data)
    while i < n:
        if n - i < 6 or data[i] != 0x81 or data[i + 1] < 0x80:  # FIN + text, RSV 0; MASK set
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
        end = i + 4 + length
        if end > n:
            return None
        try:
            text = _unmask(data[i : i + 4], data[i + 4 : end]).decode("utf-8")
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


def _head_size(req: h11.Request, headers: list[tuple[bytes, bytes]]) -> int:
    """Bytes of a request head in canonical form: request line, header lines,
    blank line. h11 bounds only incomplete heads, so a whole head that arrives
    in one read is measured here."""
    size = len(req.method) + len(req.target) + 12  # spaces, "HTTP/1.1", CRLF
    for name, value in headers:
        size += len(name) + len(value) + 4
    return size + 2


def _http_response(
    status: int,
    body: bytes,
    content_type: bytes = b"text/plain; charset=utf-8",
    extra: Iterable[tuple[bytes, bytes]] = (),
    *,
    keep_alive: bool = False,
    head: bool = False,
) -> bytes:
    """A complete response with Content-Length. h11 parses requests; responses
    are this one format, written here (a third of h11's cost per request was
    serializing them). Header values come from rally.py, never from a request."""
    out = [
        b"HTTP/1.1 %d %s\r\ndate: %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
        % (status, _REASONS.get(status, b"Status"), _http_date(), content_type, len(body))
    ]
    out += [b"%s: %s\r\n" % (k, v) for k, v in extra]
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
        t = time.gmtime(now)
        _date_cache[:] = [
            now,
            b"%s, %02d %s %d %02d:%02d:%02d GMT"
            % (_DAYS[t.tm_wday], t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec),
        ]
    return _date_cache[1]  # type: ignore[no-any-return]


_REASONS: Final = {
    200: b"OK",
    304: b"Not Modified",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Content Too Large",
    101: b"Switching Protocols",
    415: b"Unsupported Media Type",
    426: b"Upgrade Required",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
}

_SESSION_RE: Final = re.compile(r"(?:^|;)\s*rally_session=([0-9a-f]{32})\s*(?:;|$)")


def _session_from_cookie(cookie: str | None) -> str | None:
    if cookie is None:
        return None
    m = _SESSION_RE.search(cookie)
    return m.group(1) if m else None


def _new_session_id() -> str:
    """128 random bits from ``secrets``, as 32 hex characters."""
    return secrets.token_hex(16)


def _session_cookie(session_id: str, secure: bool) -> bytes:
    flags = "; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")
    return f"{_SESSION_COOKIE}={session_id}{flags}".encode("ascii")


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


class ServerContext:
    """What a handler knows of its request.

    ``session_id`` (the ``rally_session`` cookie), ``page`` (the concrete
    path, e.g. ``/articles/hello``, or ``None`` for an HTTP RPC that names no
    page), ``params`` (typed route parameters), ``headers`` (lower-case names),
    ``client`` (``(host, port)``), ``connection_id`` (``None`` for HTTP) and
    ``state`` (the object given as ``rally.App(state=...)``).
    """

    __slots__ = ("session_id", "page", "params", "client", "connection_id", "state", "_raw_headers", "_headers")

    def __init__(
        self,
        session_id: str,
        page: str | None,
        params: dict[str, Any],
        raw_headers: Sequence[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        connection_id: int | None,
        state: Any,
    ) -> None:
        self.session_id = session_id
        self.page = page
        self.params = params
        self.client = client
        self.connection_id = connection_id
        self.state = state
        self._raw_headers = raw_headers
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        """Request headers by lower-case name; repeated headers joined by ", "."""
        if self._headers is None:
            out: dict[str, str] = {}
            for k, v in self._raw_headers:
                name, value = k.decode("latin-1"), v.decode("latin-1")
                out[name] = out[name] + ", " + value if name in out else value
            self._headers = out
        return self._headers

    def __repr__(self) -> str:
        return f"ServerContext(session_id=..., page={self.page!r}, connection_id={self.connection_id!r})"


class _Peer(typing.Protocol):
    """What dispatch needs of a connection that receives pushes."""

    def write_frame(self, frame: bytes) -> None: ...


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


def _convert_int(s: str) -> int:
    if not re.fullmatch(r"-?[0-9]{1,16}", s):
        raise ValueError(s)
    return int(s)


_PARAM_CONVERTERS: Final[dict[Any, Callable[[str], Any]]] = {str: str, int: _convert_int, float: float}


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

    @property
    def stateful(self) -> bool:
        return self.update is not None


class _RawRoute(typing.NamedTuple):
    path: str
    handler: Callable[[WebSocket], Awaitable[None]]


def _context_param(fn: Callable[..., Any], hints: dict[str, Any]) -> str | None:
    """The name of the parameter that takes the ServerContext, if any."""
    for name in inspect.signature(fn).parameters:
        if hints.get(name) is ServerContext or (name == "server_context" and name not in hints):
            return name
    return None


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
        self.push_encoders: dict[type, _Encoder] = {}
        self.topics: dict[str, set[_Peer]] = {}
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
        if not path.startswith("/") or path.startswith("/_rally/"):
            raise RegistrationError(f"page {owner}: path {path!r} must start with / and not with /_rally/")
        if any(p.route.pattern == path for p in self.pages):
            raise RegistrationError(f"page {owner}: route {path!r} is registered twice")
        param_names = _PARAM_RE.findall(path)
        if len(set(param_names)) != len(param_names):
            raise RegistrationError(f"page {owner}: route {path!r} repeats a parameter")
        members = {k: getattr(namespace, k) for k in dir(namespace) if not k.startswith("__")}
        init = members.get("server_init")
        update = members.get("server_update")
        view = members.get("view")
        html = members.get("html")
        if update is not None and init is None:
            raise RegistrationError(
                f"page {owner}: server_update without server_init; add server_init to create the model"
            )
        if html is not None and not isinstance(html, str):
            raise RegistrationError(f"page {owner}: html must be a str, got {type(html).__name__}")
        if view is not None and not callable(view):
            raise RegistrationError(f"page {owner}: view must be a function")
        param_types: dict[str, Any] = {}
        init_ctx = view_ctx = None
        to_client_types: tuple[type, ...] = ()
        to_client = to_server = None
        to_server_types: list[str] = []
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
        update_ctx = False
        if update is not None:
            where = f"page {owner}: server_update"
            hints = self._hints(update, where)
            ctx = _context_param(update, hints)
            ps = [p for p in inspect.signature(update).parameters if p != ctx]
            if len(ps) != 2:
                raise RegistrationError(f"{where}: expected parameters (model, msg, server_context), got {ps}")
            msg_type = hints.get(ps[1])
            members_ = self.codecs.members(msg_type) if msg_type is not None else None
            if members_ is None:
                raise RegistrationError(
                    f"{where}: parameter {ps[1]!r} is annotated {_type_name(msg_type)}; "
                    "expected a dataclass or a union of dataclasses"
                )
            try:
                to_server = self.codecs.message(members_)
                to_server_types = [cls.__name__ for cls in members_]
            except _Unsupported as exc:
                raise RegistrationError(f"{where}: parameter {ps[1]!r}: {exc}") from None
            types_u, codec_u = self._effect_type(hints, where, owner)
            if codec_u is not None and to_client is not None and codec_u.name != to_client.name:
                raise RegistrationError(
                    f"{where} pushes {codec_u.name} but server_init pushes {to_client.name}; use one ToClient type"
                )
            to_client_types, to_client = types_u or to_client_types, codec_u or to_client
            update_ctx = ctx is not None
        converters = {p: _PARAM_CONVERTERS[param_types.get(p, str)] for p in param_names}
        regex = "".join(
            f"(?P<{part}>[^/]+)" if i % 2 else re.escape(part) for i, part in enumerate(_PARAM_RE.split(path))
        )
        if html is None and view is None:
            html = f"<!doctype html><title>{owner}</title>"
        page = _Page(
            route=_Route(path, re.compile(regex), converters),
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
        )
        for name, fn in members.items():
            if name.startswith("server_") and name not in ("server_init", "server_update") and callable(fn):
                self.add_rpc(fn, f"page {owner}: ")
        for cls in to_client_types:
            self.push_encoders[cls] = self.codecs.get(cls).encode
        self.pages.append(page)
        self._contract = None
        return page

    def _effect_type(self, hints: dict[str, Any], where: str, owner: str) -> tuple[tuple[type, ...], _Codec | None]:
        """The ToClient of a ``tuple[Model, Effect[ToClient]]`` return annotation."""
        ret = hints.get("return")
        args = typing.get_args(ret) if typing.get_origin(ret) is tuple else ()
        if len(args) != 2 or typing.get_origin(args[1]) is not Effect and args[1] is not Effect:
            raise RegistrationError(
                f"{where}: return annotation is {_type_name(ret)}; expected tuple[Model, rally.Effect[ToClient]]"
            )
        inner = typing.get_args(args[1])
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
                    n: {"result": h.ok.name, "error": h.err.name if h.err else None}
                    for n, h in sorted(self.rpcs.items())
                },
                "pages": {
                    p.route.pattern: {
                        "params": {k: _PARAM_NAMES[c] for k, c in p.route.converters.items()},
                        "stateful": p.stateful,
                        "to_server": p.to_server.name if p.to_server else None,
                        "to_client": p.to_client.name if p.to_client else None,
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

    def rpc(self, msg_id: Any, msg: dict[str, Any], ctx: ServerContext) -> _Reply | Awaitable[_Reply]:
        """Answer one ``rpc`` envelope: a reply now, or an awaitable of one."""
        handler = self.rpcs.get(msg["type"])
        if handler is None:
            return 400, _error_reply(
                msg_id, "unknown_type", [{"path": "msg.type", "message": f"no RPC handles {msg['type'][:40]!r}"}]
            )
        try:
            arg = handler.decode(msg["fields"])
        except _Bad as bad:
            return _ERROR_STATUS[bad.code], _error_reply(msg_id, bad.code, [bad.at("msg.fields")])
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
                bad.at("result")["path"] + ": " + bad.message,
            )
            return 500, _error_reply(msg_id, "internal", _INTERNAL_ERRORS)

    # -- topics and effects --------------------------------------------------

    def join(self, peer: _Peer, topics: Iterable[str]) -> None:
        for t in topics:
            self.topics.setdefault(t, set()).add(peer)

    def leave(self, peer: _Peer, topics: Iterable[str]) -> None:
        for t in topics:
            members = self.topics.get(t)
            if members is not None:
                members.discard(peer)
                if not members:
                    del self.topics[t]

    def push_frame(self, msg: Any, encode: _Encoder | None = None) -> bytes:
        """Encode and frame one push, once, for any number of recipients."""
        enc = encode or self.push_encoders.get(type(msg))
        if enc is None:
            raise _Bad(f"{type(msg).__name__} is not a push type of any page (no Effect[...] names it)")
        return _ws_frame(_dumps({"kind": "push", "msg": {"type": type(msg).__name__, "fields": enc(msg)}}))

    def publish(self, topic: str, frame: bytes) -> int:
        """Write one frame to every member of a topic; returns the count."""
        members = self.topics.get(topic)
        if not members:
            return 0
        for peer in tuple(members):
            peer.write_frame(frame)
        return len(members)

    def run_effect(self, eff: Any, peer: _Peer, topics: tuple[str, str, str], page: _Page) -> None:
        """Deliver an effect returned by a handler of ``page`` to its scope.

        ``topics`` are the connection's session, page and app topics. Raises
        ``_Bad`` if a message is not one of the page's push types.
        """
        if not isinstance(eff, Effect):
            raise _Bad(f"expected rally.Effect, got {type(eff).__name__}")
        scope = eff.scope
        if scope == "none":
            return
        if scope == "batch":
            for child in eff.children:
                self.run_effect(child, peer, topics, page)
            return
        if type(eff.msg) not in page.to_client_types:
            names = [c.__name__ for c in page.to_client_types]
            raise _Bad(f"push {type(eff.msg).__name__} is not in the page's Effect types {names}")
        frame = self.push_frame(eff.msg, self.push_encoders[type(eff.msg)])
        if scope == "client":
            peer.write_frame(frame)
        else:
            self.publish(topics[("session", "page", "app").index(scope)], frame)


_PARAM_NAMES: Final = {str: "str", _convert_int: "int", float: "float"}


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


# ==== Transport: asyncio server, connections, timers, shutdown ===============


class _HttpState(enum.Enum):
    """Where an HTTP connection is in its request cycle."""

    IDLE = "idle"  # waiting for the first byte of a request (keep-alive)
    HEAD = "head"  # a request head is arriving
    BODY = "body"  # a request body is arriving
    BUSY = "busy"  # a handler is answering
    DRAINING = "draining"  # refused and answered; the rest of the request is read and dropped
    CLOSED = "closed"


_READING: Final = frozenset((_HttpState.IDLE, _HttpState.HEAD, _HttpState.BODY))


class _HttpConn(asyncio.BufferedProtocol):
    """One HTTP/1.1 connection until it closes or becomes a WebSocket."""

    __slots__ = (
        "srv",
        "transport",
        "h11",
        "state",
        "timer",
        "request",
        "body",
        "body_size",
        "client",
        "paused",
        "write_paused",
        "task",
        "session_id",
        "new_session",
        "deadline",
        "headers",
        "processing",
    )

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.transport: asyncio.Transport | None = None
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=srv.limits.max_head_bytes)
        self.state = _HttpState.IDLE
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = math.inf
        self.request: h11.Request | None = None
        self.headers: dict[bytes, bytes] = {}
        self.processing = False
        self.body: list[bytes] = []
        self.body_size = 0
        self.client: tuple[str, int] | None = None
        self.paused = False
        self.write_paused = False
        self.task: asyncio.Task[None] | None = None
        self.session_id = ""
        self.new_session = False

    # -- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        srv = self.srv
        if len(srv.conns) >= srv.limits.max_connections or srv.closing:
            transport.write(_http_response(503, b"server busy\n", extra=[(b"retry-after", b"1")]))
            transport.close()
            self.state = _HttpState.CLOSED
            return
        srv.conns.add(self)
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self._arm(srv.limits.keepalive_timeout)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.srv.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.state is _HttpState.DRAINING:
            return
        if self.state is _HttpState.IDLE:
            self.state = _HttpState.HEAD
            self._arm(self.srv.limits.header_timeout)
        self.h11.receive_data(bytes(self.srv.read_buffer[:nbytes]))
        self._process()

    def eof_received(self) -> bool:
        if self.state is not _HttpState.DRAINING:
            self.h11.receive_data(b"")
            self._process()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _HttpState.CLOSED
        self.srv.forget(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        # The peer is not reading our answers: stop reading its requests.
        self.write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.state is not _HttpState.BUSY:
            self._resume()
            self._process()  # requests pipelined before the pause

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
        self._timed_out()

    def _timed_out(self) -> None:
        if self.state in (_HttpState.HEAD, _HttpState.BODY):
            self._fail(408, "request not received in time")
        elif self.state is not _HttpState.CLOSED:
            self._close()

    def _pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.paused and self.transport is not None and not self.write_paused:
            self.paused = False
            self.transport.resume_reading()

    def _close(self) -> None:
        self.state = _HttpState.CLOSED
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.close()

    def _fail(self, status: int, message: str) -> None:
        """Answer an error and close: used where the request cannot go on."""
        if self.state is _HttpState.CLOSED or self.transport is None:
            return
        if self.state is not _HttpState.BUSY:
            req = self.request
            if status == 413 and req is not None and req.target.startswith(b"/_rally/rpc"):
                errors = [{"path": "", "message": message}]
                self.transport.write(
                    _http_response(status, _error_reply(None, "too_large", errors), b"application/json")
                )
            else:
                self.transport.write(_http_response(status, message.encode() + b"\n"))
            self._log(status)
            if self.transport.can_write_eof():
                # Closing with unread bytes makes the kernel send a reset that
                # can destroy the answer in flight: half-close, and read the
                # rest of what the client sends for a moment (as nginx does).
                self.transport.write_eof()
                self.state = _HttpState.DRAINING
                self.write_paused = False
                self._resume()
                self._arm(_LINGER_S)
                return
        self._close()

    def _process(self) -> None:
        """Pull events from h11 until it needs data, pauses, or we are busy.

        One loop serves every pipelined request: an answer given inside it
        starts the next cycle and returns here, so depth does not grow."""
        if self.processing:
            return
        self.processing = True
        try:
            while self.state in _READING and not self.write_paused:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    return
                if event is h11.PAUSED:
                    self._pause()
                    return
                event_type = type(event)
                if event_type is h11.Request:
                    self._on_request(event)  # type: ignore[arg-type]
                elif event_type is h11.Data:
                    self.body_size += len(event.data)  # type: ignore[union-attr]
                    if self.body_size > self.srv.limits.max_body_bytes:
                        raise ProtocolError(f"body larger than {self.srv.limits.max_body_bytes} bytes", 413)
                    self.body.append(event.data)  # type: ignore[union-attr]
                elif event_type is h11.EndOfMessage:
                    self._on_end()
                elif event_type is h11.ConnectionClosed:
                    self._close()
                    return
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            self._fail(status, "request head too large" if status == 431 else f"bad request: {exc}")
        except ProtocolError as exc:
            self._fail(exc.status, str(exc))
        finally:
            self.processing = False

    def _on_request(self, req: h11.Request) -> None:
        """Check a request head; raises ProtocolError for one we refuse."""
        lim = self.srv.limits
        self.request = req
        raw = req.headers.raw_items()
        if _head_size(req, raw) > lim.max_head_bytes:
            raise ProtocolError(f"request head larger than {lim.max_head_bytes} bytes", 431)
        if len(raw) > lim.max_headers:
            raise ProtocolError(f"more than {lim.max_headers} header lines", 431)
        self.headers = headers = {name.lower(): value for name, value in raw}
        length = headers.get(b"content-length")
        if length is not None and int(length) > lim.max_body_bytes:
            raise ProtocolError(f"body larger than {lim.max_body_bytes} bytes", 413)
        if length is not None and b"transfer-encoding" in headers:
            # RFC 9112 section 6.3: a request with both "ought to be handled as
            # an error"; answering and closing defeats request smuggling.
            raise ProtocolError("both Transfer-Encoding and Content-Length", 400)
        if headers.get(b"expect", b"").lower() == b"100-continue" and self.transport is not None:
            # RFC 9110 section 10.1.1: the client waits for this before the body.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.body = []
        self.body_size = 0
        self.state = _HttpState.BODY
        self._arm(lim.body_timeout)

    def _on_end(self) -> None:
        req = self.request
        assert req is not None
        self.state = _HttpState.BUSY
        self.deadline = math.inf  # a handler's time is bounded by handler_timeout
        try:
            self._route(req)
        except Exception:
            _logger.exception("unexpected error answering %s %s", req.method, req.target[:200])
            if self.state is _HttpState.BUSY:
                self._respond(500, b"internal server error\n")
            else:
                self._close()

    def _finish_cycle(self, keep_alive: bool) -> None:
        """After our response: start the next request, or close."""
        if self.state is _HttpState.CLOSED:
            return
        if not keep_alive:
            self._close()
            return
        # A fresh parser per request: it costs less than a microsecond, and the
        # old one hands over what the client already pipelined.
        pipelined, closed = self.h11.trailing_data
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.srv.limits.max_head_bytes)
        self.request = None
        self.body = []
        self._resume()
        if not pipelined and not closed:
            self.state = _HttpState.IDLE
            self._arm(self.srv.limits.keepalive_timeout)
            return
        self.state = _HttpState.HEAD
        self._arm(self.srv.limits.header_timeout)
        self.h11.receive_data(pipelined)
        if closed:
            self.h11.receive_data(b"")
        if not self.paused:
            self._process()

    def _respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"text/plain; charset=utf-8",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        if self.state is _HttpState.CLOSED or self.transport is None:
            return
        req = self.request
        hs = headers or []
        if self.new_session:
            hs.append((b"set-cookie", _session_cookie(self.session_id, self.srv.app.secure_cookies)))
            self.new_session = False
        head = req is not None and req.method == b"HEAD"
        keep_alive = self._keep_alive()
        self.transport.write(_http_response(status, body, content_type, hs, keep_alive=keep_alive, head=head))
        self._log(status)
        self._finish_cycle(keep_alive)

    def _keep_alive(self) -> bool:
        """Whether this connection may carry another request after the answer."""
        req = self.request
        return (
            req is not None
            and req.http_version == b"1.1"
            and self.h11.their_state is h11.DONE
            and b"close" not in self.headers.get(b"connection", b"").lower()
            and not self.srv.closing
        )

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

    def _header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")

    def _session(self) -> str:
        sid = _session_from_cookie(self._header(b"cookie"))
        if sid is None:
            sid = _new_session_id()
            self.new_session = True
        self.session_id = sid
        return sid

    def _origin_ok(self) -> bool:
        origin = self._header(b"origin")
        host = self._header(b"host")
        if _origin_allowed(origin, host, self.srv.app.allowed_origins):
            return True
        _logger.warning(
            "refused cross-origin request from %s: Origin %r, expected http(s)://%s or one of allowed_origins %s",
            self.client[0] if self.client else "-",
            origin,
            host,
            sorted(self.srv.app.allowed_origins),
        )
        return False

    def _route(self, req: h11.Request) -> None:
        target = req.target.decode("latin-1")
        raw_path, _, query = target.partition("?")
        path = urllib.parse.unquote(raw_path) if "%" in raw_path else raw_path
        method = req.method
        reg = self.srv.registry
        if path == "/_rally/rpc":
            if method != b"POST":
                self._respond(405, b"method not allowed\n", headers=[(b"allow", b"POST")])
            elif not self._origin_ok():
                self._respond(403, b"cross-origin request refused\n")
            else:
                ctype = (self._header(b"content-type") or "").split(";")[0].strip().lower()
                if ctype != "application/json":
                    self._respond(415, b"RPC requires Content-Type: application/json\n")
                else:
                    self._rpc()
            return
        if path == "/_rally/ws" or path in reg.raw_routes:
            self._upgrade(path, query)
            return
        if method not in (b"GET", b"HEAD"):
            allowed = path == "/_rally/client.js" or path == "/_rally/contract" or reg.match_page(path)
            if allowed:
                self._respond(405, b"method not allowed\n", headers=[(b"allow", b"GET, HEAD")])
            else:
                self._respond(404, b"not found\n")
            return
        if path == "/_rally/client.js":
            self._cached(_CLIENT_JS_BYTES, b"application/javascript; charset=utf-8", _CLIENT_JS_ETAG)
            return
        if path == "/_rally/contract":
            doc, digest = reg.contract()
            self._cached(doc, b"application/json", b'"' + digest.encode() + b'"')
            return
        for prefix, directory in reg.static:
            if path.startswith(prefix):
                self._static(path[len(prefix) :], directory)
                return
        found = reg.match_page(path)
        if found is None:
            self._respond(404, b"not found\n")
            return
        page, params = found
        self._page(page, path, params)

    def _cached(self, body: bytes, content_type: bytes, etag: bytes) -> None:
        headers = [(b"etag", etag), (b"cache-control", b"no-cache")]
        if self._header(b"if-none-match") == etag.decode():
            self._respond(304, b"", content_type, headers)
        else:
            self._respond(200, body, content_type, headers)

    def _static(self, rel: str, directory: str) -> None:
        parts = rel.split("/")
        if any(p in ("..", ".") or "\\" in p or "\0" in p for p in parts) or rel.startswith("/"):
            self._respond(404, b"not found\n")
            return
        root = os.path.realpath(directory)
        full = os.path.realpath(os.path.join(root, *[p for p in parts if p]))
        if not full.startswith(root + os.sep) or not os.path.isfile(full):
            self._respond(404, b"not found\n")
            return
        st = os.stat(full)
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'.encode()
        import mimetypes  # only apps that serve files pay for its tables

        ctype = mimetypes.guess_type(full)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
            ctype += "; charset=utf-8"
        if self._header(b"if-none-match") == etag.decode():
            self._respond(304, b"", ctype.encode(), [(b"etag", etag)])
            return
        with open(full, "rb") as f:
            body = f.read()
        self._respond(200, body, ctype.encode(), [(b"etag", etag), (b"cache-control", b"no-cache")])

    def _context(self, page: str | None, params: dict[str, Any]) -> ServerContext:
        assert self.request is not None
        return ServerContext(self._session(), page, params, self.request.headers, self.client, None, self.srv.app.state)

    def _page(self, page: _Page, path: str, params: dict[str, Any]) -> None:
        ctx = self._context(path, params)
        contract_hash = self.srv.registry.contract()[1]
        boot = {"page": path, "params": params, "contract": contract_hash, "stateful": page.stateful}
        if page.view is None:
            assert page.html is not None
            self._respond(200, _html_boot(page.html, boot).encode(), b"text/html; charset=utf-8")
            return
        kwargs = dict(params)
        if page.view_wants_context:
            kwargs[page.view_wants_context] = ctx
        view = page.view

        async def render() -> bytes:
            html = view(**kwargs)
            if inspect.isawaitable(html):
                html = await asyncio.wait_for(html, self.srv.limits.handler_timeout)
            if not isinstance(html, str):
                raise TypeError(f"view of page {page.name} returned {type(html).__name__}, expected str")
            return _html_boot(html, boot).encode()

        self._run(render(), lambda body: self._respond(200, body, b"text/html; charset=utf-8"), f"view of {page.name}")

    def _run(self, coro: Awaitable[Any], done: Callable[[Any], None], what: str) -> None:
        """Run a coroutine for the current request; reading waits meanwhile."""
        self._pause()

        async def step() -> None:
            try:
                result = await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                _logger.exception("%s raised", what)
                self.task = None
                self._respond(500, b"internal server error\n")
                return
            self.task = None
            done(result)

        self.task = self.srv.loop.create_task(step())

    def _rpc(self) -> None:
        reg = self.srv.registry
        expected = self._header(b"rally-contract")
        if expected is not None and expected != reg.contract()[1]:
            self._json(
                409,
                _error_reply(
                    None, "stale_contract", [{"path": "", "message": "the server's contract changed; reload"}]
                ),
            )
            return
        try:
            kind, msg_id, msg = _parse_envelope(reg.json.loads(b"".join(self.body)))
            if kind != "rpc":
                raise ContractError(
                    "invalid",
                    [{"path": "kind", "message": 'POST /_rally/rpc takes "rpc" envelopes; "send" needs a WebSocket'}],
                )
        except ContractError as exc:
            self._json(_ERROR_STATUS[exc.code], _error_reply(None, exc.code, exc.errors))
            return
        page = self._header(b"rally-page")
        found = reg.match_page(page) if page else None
        ctx = self._context(page if found else None, found[1] if found else {})
        self.new_session = False  # pages set the cookie; an RPC only reads it
        reply = reg.rpc(msg_id, msg, ctx)
        if isinstance(reply, tuple):
            self._json(*reply)
        else:
            self._run(reply, lambda r: self._json(*r), "RPC")

    def _json(self, status: int, body: bytes) -> None:
        self._respond(status, body, b"application/json")

    def _upgrade(self, path: str, query: str) -> None:
        """Validate a WebSocket handshake and hand the socket to a _WsConn."""
        req = self.request
        assert req is not None
        reg = self.srv.registry
        if req.method != b"GET":
            self._respond(405, b"method not allowed\n", headers=[(b"allow", b"GET")])
            return
        if not self._origin_ok():
            self._respond(403, b"cross-origin WebSocket refused\n")
            return
        qs = urllib.parse.parse_qs(query, max_num_fields=8)
        page: _Page | None = None
        page_path = ""
        params: dict[str, Any] = {}
        raw = reg.raw_routes.get(path)
        if raw is None:
            page_path = (qs.get("page") or [""])[0]
            found = reg.match_page(page_path) if page_path else None
            if found is None:
                self._respond(404, b"no page at ?page=\n")
                return
            page, params = found
        connection_tokens = [t.strip() for t in (self._header(b"connection") or "").lower().split(",")]
        if (self._header(b"upgrade") or "").lower() != "websocket" or "upgrade" not in connection_tokens:
            self._respond(426, b"WebSocket upgrade required\n", headers=[(b"upgrade", b"websocket")])
            return
        if self._header(b"sec-websocket-version") != "13":
            self._respond(426, b"WebSocket version 13 required\n", headers=[(b"sec-websocket-version", b"13")])
            return
        key = self._header(b"sec-websocket-key") or ""
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            valid_key = False
        if not valid_key:
            self._respond(400, b"bad Sec-WebSocket-Key\n")
            return
        sent_hash = qs["contract"][0] if "contract" in qs else None
        stale = page is not None and sent_hash is not None and sent_hash != reg.contract()[1]
        ctx = self._context(page_path or path, params)
        ctx.connection_id = next(self.srv.ids)
        headers = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", _ws_accept(key.encode())),
        ]
        if self.new_session:
            headers.append((b"set-cookie", _session_cookie(self.session_id, self.srv.app.secure_cookies)))
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        assert self.transport is not None
        out = [b"HTTP/1.1 101 Switching Protocols\r\n"] + [b"%s: %s\r\n" % h for h in headers] + [b"\r\n"]
        self.transport.write(b"".join(out))
        self._log(101)
        trailing, _ = self.h11.trailing_data
        self.state = _HttpState.CLOSED
        self.srv.forget(self)
        ws = _WsConn(self.srv, self.transport, ctx, page, raw)
        self.transport.set_protocol(ws)
        if self.paused:
            self.transport.resume_reading()
        if stale:
            ws.refuse_stale()
            return
        ws.start(trailing)


class _WsState(enum.Enum):
    """A WebSocket's lifecycle: moves happen only in ``_WsConn._move``."""

    OPEN = "open"
    CLOSING = "closing"  # we sent a close frame and wait for the peer's
    CLOSED = "closed"


_WS_MOVES: Final = {
    _WsState.OPEN: {_WsState.CLOSING, _WsState.CLOSED},
    _WsState.CLOSING: {_WsState.CLOSED},
    _WsState.CLOSED: set(),
}


class _WsConn(asyncio.BufferedProtocol):
    """One WebSocket: a typed page connection, or a raw ``@app.websocket`` one.

    The h11 connection is gone; wsproto parses incoming frames and control
    frames, and outgoing data frames are built by ``_ws_frame``.
    """

    __slots__ = (
        "srv",
        "transport",
        "ws",
        "ctx",
        "page",
        "raw",
        "topics",
        "state",
        "model",
        "ready",
        "pending",
        "worker",
        "tasks",
        "parts",
        "size",
        "timer",
        "awaiting_pong",
        "write_paused",
        "paused",
        "socket",
        "tracker",
    )

    def __init__(
        self,
        srv: Server,
        transport: asyncio.Transport,
        ctx: ServerContext,
        page: _Page | None,
        raw: _RawRoute | None,
    ) -> None:
        self.srv = srv
        self.transport = transport
        self.ws = wsproto.connection.Connection(ConnectionType.SERVER)
        self.ctx = ctx
        self.page = page
        self.raw = raw
        self.topics = (f"session:{ctx.session_id}", f"page:{ctx.page}", "app")
        self.state = _WsState.OPEN
        self.model: Any = None
        self.ready = False  # server_init has returned
        # A list, not a deque: at most max_pending_messages items, and an idle
        # connection keeps 56 bytes instead of 624.
        self.pending: list[Any] = []
        self.worker: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[Any]] | None = None  # made by the first RPC task
        self.parts: list[Any] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None
        self.awaiting_pong = False
        self.write_paused = False
        self.paused = False
        self.socket: WebSocket | None = None
        self.tracker = _FrameTracker()

    # -- lifecycle ------------------------------------------------------------

    def _move(self, to: _WsState) -> None:
        if to not in _WS_MOVES[self.state]:
            raise RuntimeError(f"WebSocket cannot move from {self.state.value} to {to.value}")
        self.state = to

    def start(self, trailing: bytes) -> None:
        srv = self.srv
        srv.conns.add(self)
        self._arm(srv.limits.ping_interval, self._ping)
        if self.raw is not None:
            self.socket = WebSocket(self)
            self._spawn(self._run_raw())
        else:
            srv.registry.join(self, self.topics)
            self._init()
        if trailing:
            self._feed(trailing)

    def refuse_stale(self) -> None:
        self.srv.conns.add(self)
        errors = [{"path": "", "message": "the server's contract changed; reload"}]
        self.write_frame(_ws_frame(_error_reply(None, "stale_contract", errors)))
        self.close(CLOSE_STALE_CONTRACT, "stale_contract")

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; the peer has close_timeout to answer."""
        if self.state is not _WsState.OPEN:
            return
        self._move(_WsState.CLOSING)
        self._leave()
        self._send(wsproto.events.CloseConnection(code=code, reason=reason))
        self._arm(self.srv.limits.close_timeout, self._abort)

    def _abort(self) -> None:
        self.timer = None
        self.transport.abort()

    def _leave(self) -> None:
        if self.page is not None:
            self.srv.registry.leave(self, self.topics)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _WsState.CLOSED  # from any state: the socket is gone
        self._leave()
        self.srv.forget(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.worker is not None:
            self.worker.cancel()
        for task in tuple(self.tasks or ()):
            task.cancel()
        if self.socket is not None:
            self.socket._closed(1006 if exc is not None else 1000)

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.srv.loop.call_later(seconds, callback)

    def _ping(self) -> None:
        if self.state is not _WsState.OPEN:
            return
        if self.awaiting_pong:
            _logger.info(
                "closing WebSocket %s: no pong within %s s", self.ctx.connection_id, self.srv.limits.pong_timeout
            )
            self.close(1011, "keepalive ping timeout")
            return
        self.awaiting_pong = True
        self._send(wsproto.events.Ping(payload=b"rally"))
        self._arm(self.srv.limits.pong_timeout, self._ping)

    # -- writing --------------------------------------------------------------

    def write_frame(self, frame: bytes) -> None:
        """Write a data frame while the connection is open."""
        if self.state is _WsState.OPEN:
            self._write(frame)

    def _write(self, data: bytes) -> None:
        """The one place bytes leave: a slow consumer past the bound is dropped."""
        transport = self.transport
        transport.write(data)
        if self.write_paused and transport.get_write_buffer_size() > self.srv.limits.max_outgoing_bytes:
            _logger.info(
                "dropping slow WebSocket %s: more than %d bytes unsent",
                self.ctx.connection_id,
                self.srv.limits.max_outgoing_bytes,
            )
            self.state = _WsState.CLOSED
            self._leave()
            transport.abort()

    def _send(self, event: wsproto.events.Event) -> None:
        """Send a control frame (ping, pong, close) through wsproto."""
        data = self.ws.send(event)
        if data and self.state is not _WsState.CLOSED:
            self._write(data)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume()

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.paused and not self.write_paused and len(self.pending) < self.srv.limits.max_pending_messages:
            if self.socket is None or not self.socket._full():
                self.paused = False
                self.transport.resume_reading()

    # -- reading --------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.srv.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._feed(bytes(self.srv.read_buffer[:nbytes]))

    def eof_received(self) -> bool:
        self.ws.receive_data(None)
        self._events()
        return False

    def _feed(self, data: bytes) -> None:
        if self.tracker.clean:
            messages = _read_text_frames(data)
            if messages is not None:
                try:
                    for text, size in messages:
                        if self.state is not _WsState.OPEN:
                            return
                        if size > self.srv.limits.max_message_bytes:
                            raise ProtocolError(
                                f"message larger than {self.srv.limits.max_message_bytes} bytes", 413, 1009
                            )
                        self._deliver(text)
                except ProtocolError as exc:
                    self.close(exc.close_code, str(exc))
                return
        self.tracker.feed(data)
        self.ws.receive_data(data)
        self._events()

    def _events(self) -> None:
        try:
            for event in self.ws.events():
                handler = _WS_EVENTS.get(type(event))
                if handler is not None:
                    handler(self, event)
                if self.state is _WsState.CLOSED:
                    return
        except ProtocolError as exc:
            self.close(exc.close_code, str(exc))

    def _on_message(self, event: wsproto.events.Message[Any]) -> None:
        if self.state is not _WsState.OPEN:
            return
        data = event.data
        limit = self.srv.limits.max_message_bytes
        # Counted in bytes across fragments: wsproto has no limit of its own.
        self.size += len(data) if not isinstance(data, str) or data.isascii() else len(data.encode())
        if self.size > limit:
            raise ProtocolError(f"message larger than {limit} bytes", 413, close_code=1009)
        if not event.message_finished:
            self.parts.append(data)
            return
        if self.parts:
            self.parts.append(data)
            data = data[:0].join(self.parts)
            self.parts = []
        self.size = 0
        self._deliver(data)

    def _deliver(self, data: str | bytes) -> None:
        """A whole message arrived."""
        if self.socket is not None:
            self.socket._deliver(data)
        elif isinstance(data, str):
            self._on_text(data)
        else:
            raise ProtocolError("binary frames are not accepted here", close_code=1003)

    def _on_ping(self, event: wsproto.events.Ping) -> None:
        if self.state is _WsState.OPEN:
            self._send(event.response())

    def _on_pong(self, event: wsproto.events.Pong) -> None:
        if self.awaiting_pong:
            self.awaiting_pong = False
            self._arm(self.srv.limits.ping_interval, self._ping)

    def _on_close(self, event: wsproto.events.CloseConnection) -> None:
        if self.state is _WsState.OPEN:
            # The peer started the close (or broke the protocol: wsproto
            # reports that as a CloseConnection with 1002/1007): answer it.
            self._move(_WsState.CLOSING)
            self._leave()
            if self.ws.state is ConnectionState.REMOTE_CLOSING or self.ws.state is ConnectionState.OPEN:
                self._send(event.response() if self.ws.state is ConnectionState.REMOTE_CLOSING else event)
        self._move(_WsState.CLOSED)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        # RFC 6455 section 7.1.1: the server closes the TCP connection first.
        self.transport.close()

    # -- typed pages ----------------------------------------------------------

    def _reply(self, body: bytes) -> None:
        self.write_frame(_ws_frame(body))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = self.srv.loop.create_task(coro)
        if self.tasks is None:
            self.tasks = set()
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _on_text(self, text: str) -> None:
        reg = self.srv.registry
        try:
            kind, msg_id, msg = _parse_envelope(reg.json.loads(text))
        except ContractError as exc:
            self._reply(_error_reply(None, exc.code, exc.errors))
            return
        if kind == "rpc":
            reply = reg.rpc(msg_id, msg, self.ctx)
            if isinstance(reply, tuple):
                self._reply(reply[1])
            else:
                self._spawn(self._rpc_async(reply))
            return
        page = self.page
        assert page is not None
        if page.to_server is None:
            errors = [{"path": "", "message": f"page {page.route.pattern} has no server_update"}]
            self._reply(_error_reply(None, "not_stateful", errors))
            return
        if msg["type"] not in page.to_server_names:
            errors = [{"path": "msg.type", "message": f"page {page.route.pattern} takes no {msg['type'][:40]!r}"}]
            self._reply(_error_reply(None, "unknown_type", errors))
            return
        try:
            value = page.to_server.decode(msg)
        except _Bad as bad:
            self._reply(_error_reply(None, bad.code, [bad.at("msg")]))
            return
        if self.ready and self.worker is None and not page.update_is_async:
            self._update_now(value)
            return
        self.pending.append(value)
        if len(self.pending) >= self.srv.limits.max_pending_messages:
            self._pause()
        if self.ready and self.worker is None:
            self.worker = self.srv.loop.create_task(self._drain())

    async def _rpc_async(self, reply: Awaitable[_Reply]) -> None:
        status, body = await reply
        self._reply(body)

    def _init(self) -> None:
        page = self.page
        assert page is not None
        if page.init is None:
            self.ready = True
            return
        kwargs = dict(self.ctx.params)
        if page.init_wants_context:
            kwargs[page.init_wants_context] = self.ctx
        if inspect.iscoroutinefunction(page.init):
            self.worker = self.srv.loop.create_task(self._init_async(page.init(**kwargs)))
            return
        try:
            result = page.init(**kwargs)
        except Exception:
            _logger.exception("server_init of page %s raised (page %s)", page.name, self.ctx.page)
            self._internal_close()
            return
        self._accept_init(result)

    async def _init_async(self, coro: Awaitable[Any]) -> None:
        try:
            result = await asyncio.wait_for(coro, self.srv.limits.handler_timeout)
        except Exception:
            assert self.page is not None
            _logger.exception("server_init of page %s failed (page %s)", self.page.name, self.ctx.page)
            self.worker = None
            self._internal_close()
            return
        self.worker = None
        if self._accept_init(result) and self.pending:
            self.worker = self.srv.loop.create_task(self._drain())

    def _accept_init(self, result: Any) -> bool:
        assert self.page is not None
        if not self._apply(result, "server_init"):
            self._internal_close()
            return False
        self.ready = True
        return True

    def _internal_close(self) -> None:
        self._reply(_error_reply(None, "internal", _INTERNAL_ERRORS))
        self.close(1011, "server_init failed")

    def _apply(self, result: Any, what: str) -> bool:
        """Take ``(model, effect)`` from a handler: keep the model, run the effect."""
        page = self.page
        assert page is not None
        try:
            if not isinstance(result, tuple) or len(result) != 2:
                raise _Bad(f"expected a (model, effect) tuple, got {type(result).__name__}")
            model, eff = result
            if not isinstance(eff, Effect):
                raise _Bad(f"expected rally.Effect, got {type(eff).__name__}")
            self.model = model
            self.srv.registry.run_effect(eff, self, self.topics, page)
            return True
        except _Bad as bad:
            _logger.error("%s of page %s returned a value that breaks its annotation: %s", what, page.name, bad.message)
            return False

    def _update_now(self, value: Any) -> None:
        page = self.page
        assert page is not None and page.update is not None
        args = (self.model, value, self.ctx) if page.update_wants_context else (self.model, value)
        try:
            result = page.update(*args)
        except Exception:
            _logger.exception("server_update of page %s raised on %s", page.name, type(value).__name__)
            self._reply(_error_reply(None, "internal", _INTERNAL_ERRORS))
            return
        if not self._apply(result, "server_update"):
            self._reply(_error_reply(None, "internal", _INTERNAL_ERRORS))

    async def _drain(self) -> None:
        """Run queued ``send`` messages in order, one ``server_update`` at a time."""
        page = self.page
        assert page is not None and page.update is not None
        try:
            while self.pending and self.state is _WsState.OPEN:
                value = self.pending.pop(0)
                if len(self.pending) < self.srv.limits.max_pending_messages:
                    self._resume()
                if not page.update_is_async:
                    self._update_now(value)
                    continue
                args = (self.model, value, self.ctx) if page.update_wants_context else (self.model, value)
                try:
                    result = await asyncio.wait_for(page.update(*args), self.srv.limits.handler_timeout)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    _logger.exception("server_update of page %s failed on %s", page.name, type(value).__name__)
                    self._reply(_error_reply(None, "internal", _INTERNAL_ERRORS))
                    continue
                if not self._apply(result, "server_update"):
                    self._reply(_error_reply(None, "internal", _INTERNAL_ERRORS))
        finally:
            self.worker = None

    # -- raw routes -----------------------------------------------------------

    async def _run_raw(self) -> None:
        assert self.raw is not None and self.socket is not None
        try:
            await self.raw.handler(self.socket)
        except ConnectionClosed:
            pass
        except Exception:
            _logger.exception("WebSocket handler for %s raised", self.raw.path)
            self.close(1011, "internal error")
            return
        self.close(1000)


_WS_EVENTS: Final[dict[type, Callable[[_WsConn, Any], None]]] = {
    wsproto.events.TextMessage: _WsConn._on_message,
    wsproto.events.BytesMessage: _WsConn._on_message,
    wsproto.events.Ping: _WsConn._on_ping,
    wsproto.events.Pong: _WsConn._on_pong,
    wsproto.events.CloseConnection: _WsConn._on_close,
}


class WebSocket:
    """The connection an ``@app.websocket`` handler gets.

    ``await receive()`` returns the next message (``str`` or ``bytes``) and
    raises ``ConnectionClosed`` once the connection is closed; ``send``
    writes one message; ``close(code)`` starts the closing handshake. The
    limits, time-outs and origin check of every WebSocket apply.
    """

    __slots__ = ("_conn", "_queue", "_waiter", "_close_code")

    def __init__(self, conn: _WsConn) -> None:
        self._conn = conn
        self._queue: collections.deque[str | bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._close_code: int | None = None

    @property
    def context(self) -> ServerContext:
        """The connection's ServerContext (session, headers, client, state)."""
        return self._conn.ctx

    async def receive(self) -> str | bytes:
        """The next message; raises ``ConnectionClosed`` when there is none to come."""
        while not self._queue:
            if self._close_code is not None or self._conn.state is not _WsState.OPEN:
                raise ConnectionClosed(self._close_code or 1000)
            self._waiter = self._conn.srv.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._queue.popleft()
        self._conn._resume()
        return data

    async def send(self, data: str | bytes) -> None:
        """Send one text (``str``) or binary (``bytes``) message."""
        if self._conn.state is not _WsState.OPEN:
            raise ConnectionClosed(self._close_code or 1000)
        if isinstance(data, str):
            self._conn.write_frame(_ws_frame(data.encode("utf-8")))
        else:
            self._conn.write_frame(_ws_frame(bytes(data), 0x2))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with ``code``; returns at once, the handshake completes behind."""
        self._conn.close(code, reason)

    def _deliver(self, data: str | bytes) -> None:
        self._queue.append(data)
        if self._full():
            self._conn._pause()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _full(self) -> bool:
        return len(self._queue) >= self._conn.srv.limits.max_pending_messages

    def _closed(self, code: int) -> None:
        self._close_code = code
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Server:
    """A running server: ``url``, ``port``, and ``await close()``.

    Made by ``App.start``. ``close()`` stages shutdown: stop accepting, close
    idle HTTP connections, close WebSockets with 1001, give in-flight work
    ``shutdown_timeout`` seconds, then cancel what is left.
    """

    def __init__(self, app: App, access_log: bool) -> None:
        self.app = app
        self.registry = app._registry
        self.limits = app._limits
        self.access_log = access_log
        self.loop = asyncio.get_running_loop()
        self.conns: set[_HttpConn | _WsConn] = set()
        self.read_buffer = memoryview(bytearray(_READ_BUFFER_BYTES))
        self.ids = itertools.count(1)
        self.closing = False
        self.host = ""
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._closed = asyncio.Event()
        self._drained: asyncio.Future[None] | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the listening socket."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def _listen(self, host: str, port: int, sock: Any = None) -> None:
        if sock is not None:
            self._server = await self.loop.create_server(lambda: _HttpConn(self), sock=sock)
        else:
            self._server = await self.loop.create_server(lambda: _HttpConn(self), host, port, backlog=1024)
        name = self._server.sockets[0].getsockname()
        self.host, self.port = name[0], name[1]

    async def close(self) -> None:
        """Shut down gracefully (idempotent); returns when every connection is gone."""
        if self.closing:
            await self._closed.wait()
            return
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in tuple(self.conns):
            if isinstance(conn, _WsConn):
                conn.close(1001, "server shutting down")
            elif conn.state in (_HttpState.IDLE, _HttpState.HEAD):
                conn._close()
        if self.conns:
            self._drained = self.loop.create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained, self.limits.shutdown_timeout)
        for conn in tuple(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
            conn.connection_lost(None)
        if self._server is not None:
            await self._server.wait_closed()
        self._closed.set()

    def forget(self, conn: _HttpConn | _WsConn) -> None:
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
    ``allowed_origins`` extends the same-origin rule of the WebSocket
    handshake and ``POST /_rally/rpc``; ``secure_cookies`` adds ``Secure``
    to the session cookie (set it in production, behind HTTPS).
    """

    def __init__(
        self,
        *,
        state: Any = None,
        allowed_origins: Iterable[str] = (),
        secure_cookies: bool = False,
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
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_pending_messages: int = DEFAULT_MAX_PENDING_MESSAGES,
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
            max_connections=max_connections,
            max_pending_messages=max_pending_messages,
        )
        for name in ("max_head_bytes", "max_body_bytes", "max_message_bytes", "max_json_depth", "max_connections"):
            if getattr(self._limits, name) < 1:
                raise RegistrationError(f"App({name}=...) must be at least 1")
        self.state = state
        self.allowed_origins = frozenset(allowed_origins)
        self.secure_cookies = secure_cookies
        self._registry = _Registry(self._limits, state)
        self._loop: asyncio.AbstractEventLoop | None = None

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
        self, path: str
    ) -> Callable[[Callable[[WebSocket], Awaitable[None]]], Callable[[WebSocket], Awaitable[None]]]:
        """Decorator: serve a raw WebSocket at ``path``; see ``WebSocket``."""
        if not path.startswith("/") or path.startswith("/_rally/"):
            raise RegistrationError(f"websocket route {path!r} must start with / and not with /_rally/")

        def register(fn: Callable[[WebSocket], Awaitable[None]]) -> Callable[[WebSocket], Awaitable[None]]:
            if not inspect.iscoroutinefunction(fn):
                raise RegistrationError(f"websocket handler {fn.__name__} must be async def")
            if path in self._registry.raw_routes:
                raise RegistrationError(f"websocket route {path!r} is registered twice")
            self._registry.raw_routes[path] = _RawRoute(path, fn)
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
        self, host: str = "127.0.0.1", port: int = 0, *, access_log: bool = True, sock: Any = None
    ) -> Server:
        """Start serving in the running loop and return at once; port 0 picks a free one."""
        server = Server(self, access_log)
        await server._listen(host, port, sock)
        self._loop = server.loop
        _logger.info("rally.py serving on %s", server.url)
        return server

    async def serve(self, host: str = "127.0.0.1", port: int = 8000, *, access_log: bool = True) -> None:
        """Serve until cancelled, then shut down gracefully."""
        server = await self.start(host, port, access_log=access_log)
        try:
            await server.wait_closed()
        finally:
            await asyncio.shield(server.close())

    def run(self, host: str = "127.0.0.1", port: int = 8000, *, access_log: bool = True) -> None:
        """Serve until SIGINT or SIGTERM, then shut down gracefully; blocks."""
        if not logging.getLogger().handlers and not _logger.handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

        async def main() -> None:
            server = await self.start(host, port, access_log=access_log)
            print(f"rally.py serving on {server.url} (Ctrl-C stops)", file=sys.stderr, flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            _logger.info("shutting down")
            await server.close()

        asyncio.run(main())

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
            frame = self._registry.push_frame(msg)
        except _Bad as bad:
            raise TypeError(bad.message) from None
        return self._registry.publish(topic, frame)

    async def broadcast_to_app(self, msg: Any) -> int:
        """Push ``msg`` to every connection; returns how many were reached."""
        return self._publish("app", msg)

    async def broadcast_to_page(self, path: str, msg: Any) -> int:
        """Push ``msg`` to every connection on the concrete page ``path``."""
        return self._publish(f"page:{path}", msg)

    async def broadcast_to_session(self, session_id: str, msg: Any) -> int:
        """Push ``msg`` to every connection of a browser session."""
        return self._publish(f"session:{session_id}", msg)

    async def close_session(self, session_id: str) -> int:
        """Close every WebSocket of a session (code 4001), as on logout."""
        members = tuple(self._registry.topics.get(f"session:{session_id}", ()))
        for peer in members:
            if isinstance(peer, _WsConn):
                peer.close(CLOSE_SESSION_CLOSED, "session closed")
        return len(members)

    def _threadsafe(self, coro: Coroutine[Any, Any, _T]) -> _ThreadFuture[_T]:
        if self._loop is None or self._loop.is_closed():
            coro.close()
            raise RuntimeError("the app is not serving: start it before pushing from a thread")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def broadcast_to_app_threadsafe(self, msg: Any) -> _ThreadFuture[int]:
        """``broadcast_to_app`` from any thread; returns a concurrent Future."""
        return self._threadsafe(self.broadcast_to_app(msg))

    def broadcast_to_page_threadsafe(self, path: str, msg: Any) -> _ThreadFuture[int]:
        """``broadcast_to_page`` from any thread; returns a concurrent Future."""
        return self._threadsafe(self.broadcast_to_page(path, msg))

    def broadcast_to_session_threadsafe(self, session_id: str, msg: Any) -> _ThreadFuture[int]:
        """``broadcast_to_session`` from any thread; returns a concurrent Future."""
        return self._threadsafe(self.broadcast_to_session(session_id, msg))

    def close_session_threadsafe(self, session_id: str) -> _ThreadFuture[int]:
        """``close_session`` from any thread; returns a concurrent Future."""
        return self._threadsafe(self.close_session(session_id))


_CLIENT_JS: Final = r"""
/* rally.py browser client: typed RPC, sends and pushes over one WebSocket. */
(function () {
  "use strict";
  var boot = JSON.parse(document.getElementById("rally-boot").textContent);
  var RPC_TIMEOUT_MS = 30000, MAX_QUEUE = 1000, BACKOFF_MIN_MS = 250, BACKOFF_MAX_MS = 10000;
  var CLOSE_STALE = 4000, CLOSE_SESSION = 4001;
  var socket = null, status = "connecting", attempt = 0, nextId = 1, stopped = false, staleSeen = false;
  var queue = [];            // envelopes sent while disconnected, delivered on reconnect
  var pending = new Map();   // rpc id -> {resolve, reject, timer, type, fields}
  var handlers = new Map();  // push type -> Set of functions
  var statusHandlers = new Set();

  function setStatus(next) {
    if (next === status) return;
    status = next;
    statusHandlers.forEach(function (fn) { fn(status); });
  }

  function protocolError(reply) {
    var err = new Error("rally: " + reply.code + (reply.errors && reply.errors.length
      ? " (" + reply.errors.map(function (e) { return (e.path ? e.path + ": " : "") + e.message; }).join("; ") + ")"
      : ""));
    err.code = reply.code;
    err.errors = reply.errors || [];
    return err;
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

  function onMessage(event) {
    var reply;
    try { reply = JSON.parse(event.data); } catch (e) { console.error("rally: bad frame", e); return; }
    if (reply.kind === "push") {
      var fns = handlers.get(reply.msg.type);
      if (fns) fns.forEach(function (fn) { fn(reply.msg.fields, reply.msg.type); });
    } else if (reply.id !== null && reply.id !== undefined) {
      settle(reply);
    } else if (reply.kind === "error") {
      if (reply.code === "stale_contract") reloadOnce();
      else console.error(protocolError(reply));
    }
  }

  function connect() {
    if (stopped) return;
    setStatus("connecting");
    var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host +
      "/_rally/ws?page=" + encodeURIComponent(boot.page) + "&contract=" + encodeURIComponent(boot.contract);
    var ws = new WebSocket(url);
    socket = ws;
    ws.onopen = function () {
      attempt = 0;
      setStatus("open");
      var waiting = queue;
      queue = [];
      waiting.forEach(function (text) { ws.send(text); });
    };
    ws.onmessage = onMessage;
    ws.onclose = function (event) {
      if (socket !== ws) return;
      socket = null;
      // RPCs in flight on this socket are retried over HTTP: the server may
      // or may not have run them, as with any request whose answer was lost.
      pending.forEach(function (call, id) {
        pending.delete(id);
        clearTimeout(call.timer);
        httpRpc(call.type, call.fields).then(call.resolve, call.reject);
      });
      if (event.code === CLOSE_STALE) { stopped = true; setStatus("closed"); reloadOnce(); return; }
      if (event.code === CLOSE_SESSION) { stopped = true; setStatus("closed"); return; }
      setStatus("closed");
      var delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * Math.pow(2, attempt++));
      setTimeout(connect, delay * (0.5 + Math.random()));
    };
  }

  function httpRpc(type, fields) {
    var id = nextId++;
    var controller = new AbortController();
    var timer = setTimeout(function () { controller.abort(); }, RPC_TIMEOUT_MS);
    return fetch("/_rally/rpc", {
      method: "POST",
      credentials: "same-origin",
      signal: controller.signal,
      headers: { "Content-Type": "application/json", "Rally-Contract": boot.contract, "Rally-Page": boot.page },
      body: JSON.stringify({ kind: "rpc", id: id, msg: { type: type, fields: fields || {} } })
    }).then(function (response) {
      return response.json();
    }).then(function (reply) {
      clearTimeout(timer);
      if (reply.kind === "ok") return { ok: true, value: reply.value };
      if (reply.kind === "err") return { ok: false, error: reply.error };
      if (reply.code === "stale_contract") reloadOnce();
      throw protocolError(reply);
    }, function (error) {
      clearTimeout(timer);
      throw error.name === "AbortError" ? new Error("rally: " + type + " timed out") : error;
    });
  }

  function rpc(type, fields) {
    if (!socket || socket.readyState !== WebSocket.OPEN) return httpRpc(type, fields);
    var id = nextId++;
    return new Promise(function (resolve, reject) {
      var timer = setTimeout(function () {
        pending.delete(id);
        reject(new Error("rally: " + type + " timed out"));
      }, RPC_TIMEOUT_MS);
      pending.set(id, { resolve: resolve, reject: reject, timer: timer, type: type, fields: fields });
      socket.send(JSON.stringify({ kind: "rpc", id: id, msg: { type: type, fields: fields || {} } }));
    });
  }

  function send(type, fields) {
    var text = JSON.stringify({ kind: "send", msg: { type: type, fields: fields || {} } });
    if (socket && socket.readyState === WebSocket.OPEN) { socket.send(text); return; }
    if (queue.length >= MAX_QUEUE) {
      queue.shift();
      console.warn("rally: more than " + MAX_QUEUE + " sends while disconnected; dropped the oldest");
    }
    queue.push(text);
  }

  function on(type, fn) {
    if (!handlers.has(type)) handlers.set(type, new Set());
    handlers.get(type).add(fn);
    return function () { handlers.get(type).delete(fn); };
  }

  function onStatus(fn) {
    statusHandlers.add(fn);
    fn(status);
    return function () { statusHandlers.delete(fn); };
  }

  window.rally = { page: boot.page, params: boot.params, rpc: rpc, send: send, on: on, onStatus: onStatus };
  connect();
})();
"""
_CLIENT_JS_BYTES: Final = _CLIENT_JS.encode("utf-8")
_CLIENT_JS_ETAG: Final = b'"' + hashlib.sha256(_CLIENT_JS_BYTES).hexdigest()[:16].encode() + b'"'


class Client:
    """A Python client of a rally.py app: one browser session, in a script.

    ``await client.rpc(msg)`` calls an RPC over HTTP and returns ``Ok`` or
    ``Error``; ``async with client.page(path) as page`` opens the page's
    WebSocket. With ``app=`` (the server's App, or one declaring the same
    types) results and pushes are decoded into their dataclasses; without it
    they stay JSON values (pushes as ``{"type", "fields"}`` dicts). The
    session cookie the server sets is kept and sent back, like a browser.
    An ``error`` envelope raises ``RemoteError``.
    """

    def __init__(
        self,
        url: str,
        app: App | None = None,
        *,
        origin: str | None = None,
        session_id: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected an http:// URL, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.origin = origin
        self.session_id = session_id
        self.timeout = timeout
        self._registry = app._registry if app is not None else None
        self._codecs = self._registry.codecs if self._registry else _Codecs(_Limits())
        self._json = _Json(_Limits())
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._h11: h11.Connection | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the keep-alive HTTP connection, if any."""
        if self._streams is not None:
            self._streams[1].close()
            with contextlib.suppress(OSError):
                await self._streams[1].wait_closed()
            self._streams = None

    def _headers(self) -> list[tuple[str, str]]:
        hs = [("host", f"{self.host}:{self.port}")]
        if self.origin:
            hs.append(("origin", self.origin))
        if self.session_id:
            hs.append(("cookie", f"{_SESSION_COOKIE}={self.session_id}"))
        return hs

    def _take_cookie(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        for k, v in headers:
            if k == b"set-cookie":
                sid = _session_from_cookie(v.decode("latin-1").split(";")[0])
                if sid:
                    self.session_id = sid

    def encode_message(self, msg: Any) -> dict[str, Any]:
        """``{"type", "fields"}`` of a dataclass instance."""
        try:
            return self._codecs.message((type(msg),)).encode(msg)  # type: ignore[no-any-return]
        except (_Unsupported, _Bad) as exc:
            raise TypeError(f"cannot encode {type(msg).__name__}: {exc}") from None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request on the keep-alive connection: ``(status, headers, body)``."""
        async with self._lock:
            return await asyncio.wait_for(self._request(method, path, body, list(headers)), self.timeout)

    async def _request(
        self, method: str, path: str, body: bytes, headers: list[tuple[str, str]]
    ) -> tuple[int, dict[str, str], bytes]:
        for attempt in (1, 2):
            if self._streams is None or self._h11 is None or self._h11.our_state is not h11.IDLE:
                await self.close()
                self._streams = await asyncio.open_connection(self.host, self.port)
                self._h11 = h11.Connection(h11.CLIENT)
            reader, writer = self._streams
            conn = self._h11
            hs = self._headers() + headers + [("content-length", str(len(body)))]
            writer.write(conn.send(h11.Request(method=method, target=path, headers=hs)))
            if body:
                writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            try:
                await writer.drain()
                response: h11.Response | None = None
                chunks: list[bytes] = []
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        conn.receive_data(data)
                        if not data and response is None and attempt == 1:
                            raise ConnectionResetError
                        continue
                    if isinstance(event, h11.Response):
                        response = event
                    elif isinstance(event, h11.Data):
                        chunks.append(bytes(event.data))
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
            except (ConnectionResetError, BrokenPipeError, h11.RemoteProtocolError):
                # A keep-alive connection the server closed meanwhile: retry once.
                await self.close()
                if attempt == 2:
                    raise
                continue
            assert response is not None
            self._take_cookie(response.headers)
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                await self.close()
            return (
                response.status_code,
                {k.decode(): v.decode("latin-1") for k, v in response.headers},
                b"".join(chunks),
            )
        raise AssertionError("unreachable")

    async def rpc(self, msg: Any) -> Ok[Any] | Error[Any]:
        """Call the RPC handling ``type(msg)`` over HTTP."""
        envelope = {"kind": "rpc", "id": next(self._ids), "msg": self.encode_message(msg)}
        status, _, body = await self.request(
            "POST", "/_rally/rpc", _dumps(envelope), [("content-type", "application/json")]
        )
        return self._decode_reply(type(msg).__name__, self._json.loads(body), status)

    def _decode_reply(self, name: str, reply: dict[str, Any], status: int | None = None) -> Ok[Any] | Error[Any]:
        kind = reply.get("kind")
        if kind == "error":
            raise RemoteError(reply.get("code", "?"), reply.get("errors", []), status)
        handler = self._registry.rpcs.get(name) if self._registry else None
        try:
            if kind == "ok":
                return Ok(self._typed(handler, True, reply["value"]))
            if kind == "err":
                return Error(self._typed(handler, False, reply["error"]))
        except _Bad as bad:
            raise RemoteError("invalid", [bad.at("value")], status) from None
        raise RemoteError("invalid", [{"path": "kind", "message": f"unexpected reply {_short(kind)}"}], status)

    def _typed(self, handler: _Handler | None, ok: bool, value: Any) -> Any:
        codec = None if handler is None else handler.ok if ok else handler.err
        return value if codec is None else codec.decode(value)

    def page(self, path: str) -> PageConnection:
        """``async with client.page(path) as page``: the page's WebSocket."""
        return PageConnection(self, path)


class PageConnection:
    """A page's WebSocket from a ``Client``: ``send``, ``rpc``, ``receive``.

    ``receive()`` returns the next push (a dataclass when the Client knows
    the app); an ``error`` envelope answering a ``send`` raises
    ``RemoteError`` from ``receive()``; ``ConnectionClosed`` once closed.
    ``async for msg in page`` iterates pushes until the connection closes.
    """

    def __init__(self, client: Client, path: str, *, headers: Iterable[tuple[str, str]] = ()) -> None:
        self.client = client
        self.path = path
        self.close_code: int | None = None
        self.close_reason = ""
        self._extra = list(headers)
        self._ws = wsproto.connection.Connection(ConnectionType.CLIENT)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._waiting: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._page_types: dict[str, _Codec] = {}
        found = client._registry.match_page(path) if client._registry else None
        if found and found[0].to_client_types:
            self._page_types = {c.__name__: client._codecs.get(c) for c in found[0].to_client_types}

    async def __aenter__(self) -> PageConnection:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the WebSocket; raises ``RemoteError`` if the server refuses."""
        c = self.client
        reader, writer = await asyncio.wait_for(asyncio.open_connection(c.host, c.port), c.timeout)
        key = base64.b64encode(secrets.token_bytes(16))
        target = "/_rally/ws?page=" + urllib.parse.quote(self.path, safe="/")
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
        http = h11.Connection(h11.CLIENT)
        writer.write(http.send(h11.Request(method="GET", target=target, headers=hs)))
        writer.write(http.send(h11.EndOfMessage()))
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(reader.read(65536), c.timeout)
                http.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                c._take_cookie(event.headers)
                accept = dict(event.headers).get(b"sec-websocket-accept")
                if accept != _ws_accept(key):
                    writer.close()
                    raise RemoteError("invalid", [{"path": "", "message": "bad Sec-WebSocket-Accept"}], 101)
                break
            if isinstance(event, h11.Response):
                status = event.status_code
                body = b""
                while not isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    if event is h11.NEED_DATA:
                        http.receive_data(await asyncio.wait_for(reader.read(65536), c.timeout))
                    elif isinstance(event, h11.Data):
                        body += event.data
                    event = http.next_event()
                writer.close()
                raise RemoteError("refused", [{"path": "", "message": body.decode("utf-8", "replace").strip()}], status)
            raise RemoteError("refused", [{"path": "", "message": f"unexpected {type(event).__name__}"}])
        self._writer = writer
        trailing, _ = http.trailing_data
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader, trailing))

    async def _read(self, reader: asyncio.StreamReader, data: bytes) -> None:
        parts: list[str] = []
        try:
            if not data:
                data = await reader.read(65536)
            while self.close_code is None:
                # b"" is the end of the stream, which wsproto reads as None.
                self._ws.receive_data(data if data else None)
                for event in self._ws.events():
                    if isinstance(event, wsproto.events.TextMessage):
                        parts.append(event.data)
                        if event.message_finished:
                            self._on_text("".join(parts))
                            parts = []
                    elif isinstance(event, wsproto.events.Ping) and self._ws.state is ConnectionState.OPEN:
                        self._write(self._ws.send(event.response()))
                    elif isinstance(event, wsproto.events.CloseConnection):
                        self.close_code, self.close_reason = event.code, event.reason or ""
                        if self._ws.state is ConnectionState.REMOTE_CLOSING:
                            self._write(self._ws.send(event.response()))
                if not data:
                    break
                data = await reader.read(65536)
        except (ConnectionError, OSError):
            pass
        finally:
            if self.close_code is None:
                self.close_code = 1006
            closed = ConnectionClosed(self.close_code, self.close_reason)
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(closed)
            self._inbox.put_nowait(closed)
            if self._writer is not None:
                self._writer.close()

    def _write(self, data: bytes) -> None:
        if self._writer is not None and data:
            self._writer.write(data)

    def _on_text(self, text: str) -> None:
        reply = json.loads(text)
        kind = reply.get("kind")
        if kind == "push":
            self._inbox.put_nowait(reply["msg"])
        elif reply.get("id") in self._waiting:
            fut = self._waiting.pop(reply["id"])
            if not fut.done():
                fut.set_result(reply)
        elif kind == "error":
            self._inbox.put_nowait(RemoteError(reply.get("code", "?"), reply.get("errors", [])))

    async def send_raw(self, text: str | bytes) -> None:
        """Send one text (``str``) or binary (``bytes``) message as it is."""
        if self.close_code is not None:
            raise ConnectionClosed(self.close_code, self.close_reason)
        event: wsproto.events.Event = (
            wsproto.events.TextMessage(data=text) if isinstance(text, str) else wsproto.events.BytesMessage(data=text)
        )
        self._write(self._ws.send(event))
        assert self._writer is not None
        await self._writer.drain()

    async def send(self, msg: Any) -> None:
        """Send a message to the page's ``server_update``."""
        await self.send_raw(json.dumps({"kind": "send", "msg": self.client.encode_message(msg)}))

    async def rpc(self, msg: Any) -> Ok[Any] | Error[Any]:
        """Call an RPC over this WebSocket."""
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = fut
        await self.send_raw(json.dumps({"kind": "rpc", "id": msg_id, "msg": self.client.encode_message(msg)}))
        reply = await asyncio.wait_for(fut, self.client.timeout)
        return self.client._decode_reply(type(msg).__name__, reply)

    async def receive(self, timeout: float | None = None) -> Any:
        """The next push; raises ``RemoteError`` or ``ConnectionClosed``."""
        item = await asyncio.wait_for(self._inbox.get(), timeout or self.client.timeout)
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
            raise RemoteError("invalid", [bad.at("msg.fields")]) from None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            try:
                yield await self.receive(timeout=1e9)
            except ConnectionClosed:
                return

    async def close(self, code: int = 1000) -> None:
        """Close the WebSocket and wait for the server's answer (bounded)."""
        if self._writer is None:
            return
        if self._ws.state is ConnectionState.OPEN:
            self._write(self._ws.send(wsproto.events.CloseConnection(code=code)))
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader_task), self.client.timeout)
            self._reader_task.cancel()
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        self._writer = None


# ==== Command line ===========================================================


def _load_app(target: str) -> App:
    import importlib

    module_name, _, attr = target.partition(":")
    if not module_name:
        raise SystemExit(f"expected module:app, got {target!r}")
    sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    app = getattr(module, attr or "app", None)
    if app is None or not hasattr(app, "run"):
        raise SystemExit(f"{module_name} has no app named {attr or 'app'!r}")
    return app  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> None:
    """``python rally.py module:app [--host H] [--port P]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="rally.py", description="Serve a rally.py app.")
    parser.add_argument("app", help="module:attribute of the App, e.g. demo:app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    args = parser.parse_args(argv)
    _load_app(args.app).run(args.host, args.port, access_log=not args.no_access_log)


if __name__ == "__main__":
    main()
