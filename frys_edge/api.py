"""API: serves health, Prometheus metrics and the REST API over HTTP/1.1 (anyio and h11).

h11 parses and writes HTTP; this module bounds it (header and body size, connections, idle
and slow clients), routes requests to handlers and maps every error to one JSON shape. The
handlers call the runtime, engine and storage; they decide nothing the runtime does not.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import functools
import hmac
import importlib.resources
import ipaddress
import logging
import math
import re
import ssl
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import anyio.abc
import h11
import msgspec
import wsproto.connection
import wsproto.events
import wsproto.utilities
from anyio.streams.tls import TLSListener

from frys_edge import __version__
from frys_edge.cli import run_document
from frys_edge.config import Config, NetworkConfig
from frys_edge.core import (
    BusFull,
    EventBus,
    FrysError,
    Subscription,
    topic_matches,
    validate_pattern,
    validate_topic,
)
from frys_edge.engine import RunNotFound
from frys_edge.metrics import Counter, Histogram, Metrics
from frys_edge.storage import Event, InvalidValue, Storage
from frys_edge.vectors import (
    UnknownCollection,
    VectorError,
    VectorStore,
    hit_document,
    track_collection,
)
from frys_edge.workflow import DefinitionError, WorkflowError

if TYPE_CHECKING:
    from frys_edge.runtime import Runtime

log = logging.getLogger("frys.api")

MAX_BODY = 1024 * 1024
# Request line plus headers; h11 answers 431 beyond it.
MAX_HEADER = 16 * 1024
# A keep-alive connection waiting this long for its next request is closed.
IDLE_TIMEOUT = 30.0
# Reading a request body or writing a response must finish within this (slow clients).
TRANSFER_TIMEOUT = 30.0
# After an error that leaves the request unread, read and discard this much before closing,
# so the client sees our response rather than a reset.
LINGER_SECONDS = 1.0
LINGER_BYTES = 4 * MAX_BODY
PUBLISH_TIMEOUT = 5.0
# Event log rows read at a time by a live stream (SSE or WebSocket).
LOG_BATCH = 500
# Seconds between the Server-Sent Events keep-alive comments.
SSE_PING = 15.0
MAX_PAGE = 1000
JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class ApiError(FrysError):
    """The API cannot start or serve (an unsafe bind, a port in use)."""


def tls_context(network: NetworkConfig) -> ssl.SSLContext | None:
    """The server TLS context from [network] tls_cert and tls_key, or None without them."""
    cert, key = network.tls_cert, network.tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ApiError("set both [network] tls_cert and tls_key (PEM files), or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ApiError(
            f"cannot load the TLS certificate {cert} and key {key}: {e}; check [network] "
            "tls_cert and tls_key point at PEM files that belong together"
        ) from e
    return context


def check_bind_security(config: Config) -> None:
    """Refuse a non-loopback [network] host unless a token is configured."""
    net = config.network
    if net.token or _is_loopback(net.host):
        return
    raise ApiError(
        f"refusing to listen on {net.host or '0.0.0.0'} without [network] token; "
        "set FRYS_NETWORK_TOKEN or bind 127.0.0.1"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


# -- requests, responses and the error shape ------------------------------------------------


@dataclass
class Request:
    """One parsed request: method, path, query (last value of each name) and body."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Response:
    """One response; `route` is the matched route pattern, for metrics."""

    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: list[tuple[str, str]] = field(default_factory=list)
    route: str = "unmatched"
    close: bool = False
    # A streamed body (Server-Sent Events): chunks until the iterator ends or we drain.
    stream: AsyncIterator[bytes] | None = None
    # A switch of protocol (status 101, WebSocket): run with the connection once it is sent.
    upgrade: Callable[[Upgraded], Awaitable[None]] | None = None


def json_response(status: int, document: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    """A JSON response of a document msgspec can encode."""
    return Response(status, msgspec.json.encode(document), headers=list(headers))


class HttpError(ApiError):
    """A request refused with a status, an error code and the field path at fault."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        path: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.path = path
        self.headers = list(headers)

    def response(self) -> Response:
        """The error as the one JSON error shape."""
        body = ErrorBody(ErrorDetail(self.code, self.message, self.path))
        return json_response(self.status, body, self.headers)


class ErrorDetail(msgspec.Struct):
    """What went wrong: a code, a message, and the JSON path of the field at fault."""

    code: str
    message: str
    path: str | None = None


class ErrorBody(msgspec.Struct):
    """Every error response: {"error": {"code", "message", "path"}}."""

    error: ErrorDetail


_AT = re.compile(r" - at `(\$[^`]*)`$")
_FIELD = re.compile(r"field `([^`]+)`")


def _validation_path(message: str) -> str:
    """The JSON path msgspec names in a validation message (`$.inputs.x`)."""
    found = _AT.search(message)
    path = found.group(1) if found else "$"
    named = _FIELD.search(message)  # a missing or unknown field is reported at its parent
    return f"{path}.{named.group(1)}" if named else path


def decode_body(body: bytes, kind: Any, what: str = "body") -> Any:
    """Decode and validate a JSON body as `kind`; 400 if malformed, 422 if it does not fit."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        raise HttpError(422, "invalid", f"{what}: {e}", _validation_path(str(e))) from None
    except msgspec.DecodeError as e:
        raise HttpError(400, "bad_request", f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise HttpError(400, "bad_request", f"{what} nests too deeply") from None


def decode_query(query: dict[str, str], kind: type[Any]) -> Any:
    """Convert query parameters (strings) into `kind`, or 400 naming the parameter."""
    try:
        return msgspec.convert(query, kind, strict=False)
    except msgspec.ValidationError as e:
        path = _validation_path(str(e))
        raise HttpError(400, "bad_request", f"query parameter: {e}", path) from None


def error_response(exc: Exception) -> Response:
    """Map an exception from a handler to its status and the JSON error shape."""
    return http_error(exc).response()


def http_error(exc: Exception) -> HttpError:
    """The HttpError an exception from a handler stands for (500 for the unexpected)."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, RunNotFound):
        return HttpError(404, "not_found", str(exc))
    if isinstance(exc, DefinitionError):
        first = exc.problems[0].path if exc.problems else ""
        return HttpError(422, "invalid", str(exc), f"$.{first}" if first else "$")
    if isinstance(exc, WorkflowError):
        return HttpError(422, "invalid", str(exc))
    if isinstance(exc, UnknownCollection):
        return HttpError(404, "not_found", str(exc))
    if isinstance(exc, VectorError):
        return HttpError(422, "invalid", str(exc))
    if isinstance(exc, InvalidValue):
        return HttpError(422, "invalid", str(exc))
    if isinstance(exc, BusFull):
        return HttpError(503, "busy", str(exc), headers=[("retry-after", "1")])
    if isinstance(exc, FrysError):  # storage full, engine stopping, runtime not started
        log.warning("request refused: %s", exc)
        return HttpError(503, "unavailable", str(exc))
    log.error("internal error serving a request: %s", exc, exc_info=exc)
    return HttpError(500, "internal", f"internal error: {type(exc).__name__}")


# -- routing --------------------------------------------------------------------------------

Handler = Callable[[Request, dict[str, str]], Awaitable[Response]]


class RouteDoc(msgspec.Struct, frozen=True):
    """What /openapi.json says of a route: the types its query and body are decoded as."""

    query: type[Any] | None = None
    body: Any = None
    created: bool = False
    description: str | None = None
    # Types described in components though no body is decoded as them (WebSocket messages).
    messages: tuple[Any, ...] = ()
    # The success response's media type and status.
    media_type: str = JSON
    status: int = 200


class Router:
    """Routes like `/runs/{id}` and `/kv/{namespace}/{key*}` (`*`: the rest of the path)."""

    def __init__(self) -> None:
        self._routes: dict[str, tuple[list[str], dict[str, Handler]]] = {}
        self.docs: dict[tuple[str, str], RouteDoc] = {}
        # The patterns a path can match, by its first segment (others: `_other`), in order.
        self._by_head: dict[str, list[str]] = {}
        self._other: list[str] = []

    def add(self, method: str, pattern: str, handler: Handler, doc: RouteDoc | None = None) -> None:
        """Register handler for method on pattern, described by doc for the OpenAPI schema."""
        parts = pattern.strip("/").split("/") if pattern != "/" else []
        self._routes.setdefault(pattern, (parts, {}))[1][method] = handler
        self.docs[(method, pattern)] = doc or RouteDoc()
        heads = {p[0] for p, _ in self._routes.values() if p and not p[0].startswith("{")}
        self._by_head = {head: self._patterns_for(head) for head in heads}
        self._other = self._patterns_for(None)

    def _patterns_for(self, head: str | None) -> list[str]:
        return [
            pattern
            for pattern, (parts, _) in self._routes.items()
            if not parts or parts[0] == head or parts[0].startswith("{")
        ]

    def openapi(self, title: str, version: str) -> dict[str, Any]:
        """An OpenAPI 3.1 document built from the routes and their msgspec types."""
        types = [ErrorBody] + [d.body for d in self.docs.values() if d.body not in (None, Any)]
        types += [kind for d in self.docs.values() for kind in d.messages]
        _, components = msgspec.json.schema_components(
            types, ref_template="#/components/schemas/{name}"
        )
        error = {"$ref": "#/components/schemas/ErrorBody"}
        paths: dict[str, dict[str, Any]] = {}
        for (method, pattern), doc in self.docs.items():
            handler = self._routes[pattern][1][method]
            parameters = [
                {
                    "name": part[1:-1].rstrip("*"),
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                }
                for part in self._routes[pattern][0]
                if part.startswith("{")
            ]
            for param in msgspec.structs.fields(doc.query) if doc.query else ():
                parameters.append(
                    {
                        "name": param.encode_name,
                        "in": "query",
                        "required": param.required,
                        "schema": msgspec.json.schema(param.type),
                    }
                )
            ok = "201" if doc.created else str(doc.status)
            operation: dict[str, Any] = {
                "operationId": getattr(handler, "__name__", f"{method} {pattern}"),
                "summary": f"{method} {pattern}",
                "parameters": parameters,
                "responses": {
                    ok: {"description": "OK", "content": {doc.media_type: {"schema": {}}}},
                    "4XX": {
                        "description": "Client error",
                        "content": {"application/json": {"schema": error}},
                    },
                    "5XX": {
                        "description": "Unavailable",
                        "content": {"application/json": {"schema": error}},
                    },
                },
            }
            if doc.description is not None:
                operation["description"] = doc.description
            if doc.body is not None:
                body_schema = (
                    {} if doc.body is Any else {"$ref": f"#/components/schemas/{doc.body.__name__}"}
                )
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": body_schema}},
                }
            paths.setdefault(pattern.replace("*}", "}"), {})[method.lower()] = operation
        return {
            "openapi": "3.1.0",
            "info": {"title": title, "version": version},
            "paths": paths,
            "components": {"schemas": components},
        }

    def find(self, method: str, path: str) -> tuple[str, Handler, dict[str, str]]:
        """(pattern, handler, path params); HttpError 404 or 405 (with Allow) otherwise."""
        inner = path.strip("/")
        segments = [urllib.parse.unquote(s) for s in inner.split("/")] if inner else []
        candidates = self._by_head.get(segments[0], self._other) if segments else self._other
        for pattern in candidates:
            parts, handlers = self._routes[pattern]
            params = _match(parts, segments)
            if params is None:
                continue
            handler = handlers.get(method)
            if handler is None:
                allow = ", ".join(sorted(handlers))
                raise HttpError(
                    405,
                    "method_not_allowed",
                    f"{method} is not allowed on {pattern}; use {allow}",
                    headers=[("allow", allow)],
                )
            return pattern, handler, params
        raise HttpError(404, "not_found", f"no route for {path}")


def _match(parts: list[str], segments: list[str]) -> dict[str, str] | None:
    params: dict[str, str] = {}
    for i, part in enumerate(parts):
        if i >= len(segments):
            return None
        if part.startswith("{") and part.endswith("*}"):
            rest = "/".join(segments[i:])
            if not rest:
                return None
            params[part[1:-2]] = rest
            return params
        if part.startswith("{"):
            if not segments[i]:
                return None
            params[part[1:-1]] = segments[i]
        elif part != segments[i]:
            return None
    return params if len(parts) == len(segments) else None


# -- Prometheus text exposition -------------------------------------------------------------

_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="(.*?)"(?:,(?=[A-Za-z_][A-Za-z0-9_]*=")|$)', re.S)
_BAD_NAME = re.compile(r"[^A-Za-z0-9_:]")


def _labels_of(key: str, name: str) -> list[tuple[str, str]]:
    """The labels of a series key `name{k="v",...}` (values as written by series_key)."""
    if key == name:
        return []
    return _LABEL.findall(key[len(name) + 1 : -1])


def _label_text(labels: list[tuple[str, str]]) -> str:
    if not labels:
        return ""
    escaped = (
        (k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) for k, v in labels
    )
    return "{" + ",".join(f'{k}="{v}"' for k, v in escaped) + "}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def prometheus_text(metrics: Metrics, prefix: str = "frys_") -> str:
    """Every series in the text exposition format 0.0.4, names prefixed, HELP/TYPE per family."""
    families: dict[str, list[tuple[str, Any]]] = {}
    for key, metric in metrics.series():
        families.setdefault(metric.name, []).append((key, metric))
    lines: list[str] = []
    for name, series in families.items():
        full = prefix + _BAD_NAME.sub("_", name)
        help_text = series[0][1].help.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {series[0][1].kind}")
        for key, metric in series:
            labels = _labels_of(key, name)
            if isinstance(metric, Histogram):
                cumulative = 0
                for bound, count in zip(metric.bounds, metric.counts, strict=False):
                    cumulative += count
                    le = _label_text([*labels, ("le", _number(bound))])
                    lines.append(f"{full}_bucket{le} {cumulative}")
                lines.append(
                    f"{full}_bucket{_label_text([*labels, ('le', '+Inf')])} {metric.count}"
                )
                lines.append(f"{full}_sum{_label_text(labels)} {_number(metric.sum)}")
                lines.append(f"{full}_count{_label_text(labels)} {metric.count}")
                continue
            try:
                value = float(metric.value)
            except Exception as e:  # a gauge reading something that went away
                log.warning("metric %s could not be read: %s: %s", key, type(e).__name__, e)
                continue
            lines.append(f"{full}{_label_text(labels)} {_number(value)}")
    return "\n".join(lines) + "\n"


# -- the HTTP server ------------------------------------------------------------------------


class _ClientGone(Exception):
    """The peer closed or broke the connection."""


class _Connection:
    __slots__ = ("h11", "idle_scope", "scope", "stream", "write_since")

    def __init__(self, stream: anyio.abc.SocketStream, max_header: int) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header)
        # Cancelled by stop(): the wait for the next request, or a stream in progress.
        self.idle_scope: anyio.CancelScope | None = None
        # The whole connection, cancelled when a write stalls (see HttpServer._watch_writes).
        self.scope: anyio.CancelScope | None = None
        # When the write in progress started (event loop clock), or None.
        self.write_since: float | None = None


# What a connection's parser is replaced with once it has switched protocol.
_SWITCHED = h11.Connection(h11.SERVER)


class Upgraded:
    """A connection switched to another protocol by a 101 response (a WebSocket)."""

    __slots__ = ("_conn", "_server", "received")

    def __init__(self, conn: _Connection, server: HttpServer, received: bytes) -> None:
        self._conn = conn
        self._server = server
        #: Bytes the client sent after its request, already read off the socket.
        self.received = received

    @property
    def stream(self) -> anyio.abc.ByteStream:
        return self._conn.stream

    @property
    def draining(self) -> bool:
        """Whether the server is stopping: finish up and close."""
        return self._server._draining

    def on_drain(self, scope: anyio.CancelScope | None) -> None:
        """Have stop() cancel scope (a wait for the client), or none with None."""
        self._conn.idle_scope = scope
        if scope is not None and self._server._draining:
            scope.cancel()


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


class HttpServer:
    """HTTP/1.1 on one listener: bounded connections, keep-alive, idle timeout, drain."""

    def __init__(
        self,
        name: str,
        app: Callable[[Request], Awaitable[Response]],
        metrics: Metrics,
        *,
        max_connections: int,
        max_body: int = MAX_BODY,
        max_header: int = MAX_HEADER,
        idle_timeout: float = IDLE_TIMEOUT,
        read_size: int = 64 * 1024,
        transfer_timeout: float = TRANSFER_TIMEOUT,
    ) -> None:
        self.name = name
        self.app = app
        self.metrics = metrics
        self.max_connections = max_connections
        self.max_body = max_body
        self.max_header = max_header
        self.idle_timeout = idle_timeout
        self.read_size = read_size
        self.transfer_timeout = transfer_timeout
        self._open: set[_Connection] = set()
        self._closed = anyio.Event()
        self._draining = False
        self._accept_scope: anyio.CancelScope | None = None
        self._connections_scope: anyio.CancelScope | None = None
        self._request_metrics: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        labels = {"server": name}
        metrics.gauge("http_connections", "Open HTTP connections", self._count_open, labels)
        self._refused = metrics.counter(
            "http_connections_refused_total", "Connections closed at max_connections", labels
        )

    def _count_open(self) -> float:
        return float(len(self._open))

    async def serve(self, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
        """Serve connections from listener until stop() has drained them (or cancelled)."""
        async with anyio.create_task_group() as connections:
            self._connections_scope = connections.cancel_scope
            connections.start_soon(self._watch_writes)
            with anyio.CancelScope() as self._accept_scope:
                if self._draining:
                    self._accept_scope.cancel()
                async with listener:
                    await listener.serve(self._handle, connections)

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let requests in flight finish (up to timeout), then close all."""
        self._draining = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        for conn in list(self._open):
            if conn.idle_scope is not None:
                conn.idle_scope.cancel()
        with anyio.move_on_after(timeout):
            while self._open:
                await self._closed.wait()
        if self._open:
            log.warning("%s server: closing %d connections after drain", self.name, len(self._open))
        if self._connections_scope is not None:
            self._connections_scope.cancel()

    async def _watch_writes(self) -> None:
        """Close every connection whose write has not finished within transfer_timeout (a
        client that reads nothing): one timer for all writes rather than one per write,
        which would cost about 7 % of the requests a second."""
        tick = min(1.0, self.transfer_timeout / 4)
        while not (self._draining and not self._open):
            await anyio.sleep(tick)
            stalled = anyio.current_time() - self.transfer_timeout
            for conn in self._open:
                since = conn.write_since
                if since is not None and since < stalled and conn.scope is not None:
                    log.info("%s server: closing a connection that read nothing", self.name)
                    conn.scope.cancel()

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        if self._draining or len(self._open) >= self.max_connections:
            if not self._draining:
                self._refused.inc()
            await anyio.aclose_forcefully(stream)
            return
        conn = _Connection(stream, self.max_header)
        self._open.add(conn)
        try:
            with anyio.CancelScope() as conn.scope:
                switched = await self._serve_connection(conn)
                if switched is not None:  # the HTTP state is gone; the connection is the upgrade's
                    upgrade, link = switched
                    await upgrade(link)
        except _ClientGone:
            pass
        finally:
            self._open.discard(conn)
            closed, self._closed = self._closed, anyio.Event()
            closed.set()
            await anyio.aclose_forcefully(stream)

    async def _serve_connection(
        self, conn: _Connection
    ) -> tuple[Callable[[Upgraded], Awaitable[None]], Upgraded] | None:
        """Serve requests until the connection closes, or until a 101 switches protocol:
        then return the upgrade to run and its link."""
        while True:
            with anyio.CancelScope(deadline=anyio.current_time() + self.idle_timeout) as idle:
                conn.idle_scope = idle
                if self._draining:
                    idle.cancel()
                try:
                    event = await self._next_event(conn)
                except h11.RemoteProtocolError as e:
                    await self._send_error(conn, e)
                    return None
            conn.idle_scope = None
            if idle.cancelled_caught or isinstance(event, h11.ConnectionClosed):
                return None
            if not isinstance(event, h11.Request):
                return None  # h11 yields a Request first in each cycle; anything else is a bug
            started = time.perf_counter()
            # h11 bounds only what is buffered incomplete; a head read in one chunk can be larger.
            size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if size > self.max_header:
                message = f"request line and headers are over {self.max_header} bytes"
                response = HttpError(431, "too_large", message).response()
                response.close = True
            else:
                response = await self._respond(conn, event)
            if response.upgrade is not None:
                return await self._switch(conn, response, event.method, started)
            await self._send(conn, response, event.method.decode("ascii", "replace"))
            self._observe(response, event.method, time.perf_counter() - started)
            if response.close:
                if conn.h11.their_state is not h11.DONE:  # the request was left unread
                    await self._linger(conn)
                return None
            if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                return None
            conn.h11.start_next_cycle()

    async def _next_event(self, conn: _Connection) -> Any:
        while True:
            event = conn.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await conn.stream.receive(self.read_size)
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ):
                data = b""  # h11 turns it into ConnectionClosed, or an error mid-message
            conn.h11.receive_data(data)

    async def _respond(self, conn: _Connection, event: h11.Request) -> Response:
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        split = urllib.parse.urlsplit(target)
        query = {k: v for k, v in urllib.parse.parse_qsl(split.query, keep_blank_values=True) if v}
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in event.headers
        }
        request = Request(method, split.path or "/", query, headers)
        try:
            request.body = await self._read_body(conn, headers)
        except HttpError as e:
            response = e.response()
            response.close = True
            return response
        try:
            return await self.app(request)
        except Exception as e:
            return error_response(e)

    async def _read_body(self, conn: _Connection, headers: dict[str, str]) -> bytes:
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise HttpError(
                413, "too_large", f"request body of {length} bytes is over {self.max_body} bytes"
            )
        if length is None and "transfer-encoding" not in headers:
            # No body (most GETs): h11 has the end of the message already, so skip the timer.
            try:
                if isinstance(conn.h11.next_event(), h11.EndOfMessage):
                    return b""
            except h11.RemoteProtocolError as e:
                raise HttpError(400, "bad_request", f"malformed request: {e}") from None
            raise HttpError(400, "bad_request", "a request without a body sent one")
        if conn.h11.they_are_waiting_for_100_continue:
            await self._write(
                conn, conn.h11.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        chunks: list[bytes] = []
        size = 0
        try:
            with anyio.fail_after(self.transfer_timeout):
                while True:
                    event = await self._next_event(conn)
                    if isinstance(event, h11.Data):
                        size += len(event.data)
                        if size > self.max_body:
                            raise HttpError(
                                413, "too_large", f"request body is over {self.max_body} bytes"
                            )
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage):
                        return b"".join(chunks)
                    else:
                        raise _ClientGone
        except TimeoutError:
            raise HttpError(
                408, "timeout", f"request body not received within {self.transfer_timeout:g} s"
            ) from None
        except h11.RemoteProtocolError as e:
            raise HttpError(400, "bad_request", f"malformed request body: {e}") from None

    async def _send(self, conn: _Connection, response: Response, method: str) -> None:
        if self._draining and not response.close:
            response.close = True
        if response.stream is not None:
            await self._send_stream(conn, response)
            return
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            ("date", _http_date()),
            *response.headers,
        ]
        if response.close:
            headers.append(("connection", "close"))
        try:
            reason = HTTPStatus(response.status).phrase.encode()
        except ValueError:
            reason = b""
        h = conn.h11
        data = h.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        if method != "HEAD" and response.body:
            data += h.send(h11.Data(data=response.body))
        data += h.send(h11.EndOfMessage())
        await self._write(conn, data)

    async def _send_stream(self, conn: _Connection, response: Response) -> None:
        """Chunked body from response.stream; the connection closes when it ends."""
        assert response.stream is not None
        response.close = True
        headers = [
            ("content-type", response.content_type),
            ("cache-control", "no-cache"),
            ("date", _http_date()),
            ("connection", "close"),
            *response.headers,
        ]
        h = conn.h11
        await self._write(conn, h.send(h11.Response(status_code=response.status, headers=headers)))
        # Draining cancels this scope like an idle wait, so a stream ends at once.
        with anyio.CancelScope() as scope:
            conn.idle_scope = scope
            try:
                async for chunk in response.stream:
                    await self._write(conn, h.send(h11.Data(data=chunk)))
            finally:
                conn.idle_scope = None
                await response.stream.aclose()  # type: ignore[attr-defined]
        await self._write(conn, h.send(h11.EndOfMessage()))

    async def _switch(
        self, conn: _Connection, response: Response, method: bytes, started: float
    ) -> tuple[Callable[[Upgraded], Awaitable[None]], Upgraded] | None:
        """Send the 101; returns the upgrade to run with the connection, or None if refused."""
        upgrade = response.upgrade
        assert upgrade is not None
        headers = [*response.headers, ("date", _http_date())]
        try:
            switching = h11.InformationalResponse(
                status_code=101, headers=headers, reason=b"Switching Protocols"
            )
            head = conn.h11.send(switching)
        except h11.LocalProtocolError:  # h11 saw no upgrade proposed (e.g. a body came with it)
            response = HttpError(400, "bad_request", "not an upgrade request").response()
            response.close = True
            await self._send(conn, response, "GET")
            self._observe(response, method, time.perf_counter() - started)
            return None
        await self._write(conn, head)
        self._observe(response, method, time.perf_counter() - started)
        received = bytes(conn.h11.trailing_data[0])
        conn.h11 = _SWITCHED  # the parser and its buffers are not needed any more
        return upgrade, Upgraded(conn, self, received)

    async def _send_error(self, conn: _Connection, error: h11.RemoteProtocolError) -> None:
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = error.error_status_hint
        code = "too_large" if status == 431 else "bad_request"
        response = HttpError(status, code, f"malformed request: {error}").response()
        response.close = True
        await self._send(conn, response, "")
        self._observe(response, b"", 0.0)
        await self._linger(conn)

    async def _write(self, conn: _Connection, data: bytes | None) -> None:
        if not data:
            return
        conn.write_since = anyio.current_time()
        try:
            await conn.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            raise _ClientGone from None
        finally:
            conn.write_since = None

    async def _linger(self, conn: _Connection) -> None:
        """Half-close and drain what the client still sends, so it reads our response."""
        try:
            await conn.stream.send_eof()
            received = 0
            with anyio.move_on_after(LINGER_SECONDS):
                while received < LINGER_BYTES:
                    received += len(await conn.stream.receive(self.read_size))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the client closed first, as hoped

    def _observe(self, response: Response, method: bytes, seconds: float) -> None:
        name = method.decode("ascii", "replace")
        if name not in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            name = "other"
        key = (response.route, name, response.status)
        pair = self._request_metrics.get(key)
        if pair is None:
            labels = {"route": response.route, "method": name, "status": str(response.status)}
            counter = self.metrics.counter("http_requests_total", "HTTP requests", labels)
            latency = self.metrics.histogram(
                "http_request_seconds", "HTTP request time", {"route": response.route}
            )
            pair = self._request_metrics[key] = (counter, latency)
        pair[0].inc()
        pair[1].observe(seconds)


# -- request and query bodies ---------------------------------------------------------------

_Limit = Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)]
_Key = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class StartRun(msgspec.Struct, forbid_unknown_fields=True):
    """POST /runs: start a run of a loaded workflow."""

    workflow: str
    inputs: dict[str, Any] = {}
    idempotency_key: _Key | None = None


class PublishEvent(msgspec.Struct, forbid_unknown_fields=True):
    """POST /events: publish on the bus; with durable, also append to the event log."""

    topic: Annotated[str, msgspec.Meta(min_length=1)]
    payload: Any = None
    durable: bool = False


class RunsQuery(msgspec.Struct, forbid_unknown_fields=True):
    """GET /runs query: newest first; `before` is the `next` of the previous page."""

    status: str | None = None
    workflow: str | None = None
    before: str | None = None
    limit: _Limit = 100


class KvQuery(msgspec.Struct, forbid_unknown_fields=True):
    """GET /kv/{namespace} query: keys starting with prefix, after the key `after`."""

    prefix: str = ""
    after: str = ""
    limit: _Limit = 100


class EventsQuery(msgspec.Struct, forbid_unknown_fields=True):
    """GET /events query: durable events after a sequence number."""

    after: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    limit: _Limit = 100
    topic: str | None = None


class VectorSearch(msgspec.Struct, forbid_unknown_fields=True):
    """POST /vectors/{name}/search: by text `query` or a `vector`, top `k`, metadata filter;
    `exact` searches every vector even when the collection's HNSW graph is ready."""

    query: str | None = None
    vector: list[float] | None = None
    k: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    filter: dict[str, Any] | None = None
    exact: bool = False


class VectorItems(msgspec.Struct, forbid_unknown_fields=True):
    """PUT /vectors/{name}/items: insert or replace items {id, vector or text, metadata}."""

    items: list[dict[str, Any]]


class VectorIds(msgspec.Struct, forbid_unknown_fields=True):
    """POST /vectors/{name}/delete: delete items by id."""

    ids: list[str]


class StreamQuery(msgspec.Struct, forbid_unknown_fields=True):
    """GET /events/stream query: topic patterns (comma-separated), and where to start."""

    topics: str = "#"
    after: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    # The bearer token, for a browser's EventSource, which cannot send headers.
    access_token: str | None = None


class WsQuery(msgspec.Struct, forbid_unknown_fields=True):
    """GET /ws query."""

    # The bearer token, for a browser's WebSocket, which cannot send headers.
    access_token: str | None = None


class EmptyQuery(msgspec.Struct, forbid_unknown_fields=True):
    """Routes without query parameters."""


def _run_summary(run: Any) -> dict[str, Any]:
    document = run_document(run, [], [])
    del document["steps"]
    return document


def _entry(entry: Any) -> dict[str, Any]:
    return msgspec.structs.asdict(entry)


class LogSignal:
    """Wakes every follower of the event log at once when anything is published (durable
    events are published as they are logged): one bus subscription for all of them, so ten
    thousand followers cost one queued message per publish, not ten thousand.

    A follower either waits on current() (a task per follower: the SSE stream) or registers
    a callback with watch() (no task while idle: /ws, where ten thousand may be open)."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._sub: Subscription | None = None
        self._event = asyncio.Event()
        self._watchers: set[Callable[[], None]] = set()

    def _listen(self) -> None:
        if self._sub is None:
            self._sub = self._bus.subscribe("#", handler=self._wake, name="log-followers")

    def current(self) -> asyncio.Event:
        """The event the next publish sets: take it before reading the log, wait on it after."""
        self._listen()
        return self._event

    def watch(self, callback: Callable[[], None]) -> None:
        """Call callback (which must not block) at each publish until unwatch(callback)."""
        self._listen()
        self._watchers.add(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        self._watchers.discard(callback)

    def _wake(self, _message: Any) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()
        for callback in list(self._watchers):
            callback()

    def close(self) -> None:
        """Stop listening to the bus."""
        if self._sub is not None:
            self._bus.unsubscribe(self._sub)
            self._sub = None


async def follow_log(
    signal: LogSignal, storage: Storage, after: int, idle: float | None = math.inf
) -> AsyncGenerator[Event | None, None]:
    """Every event logged after `after`, oldest first, then each new one as it is logged.

    Yields None when `idle` seconds pass with nothing new (the SSE stream's keep-alive); with
    idle None, ends once it has caught up instead of waiting. Reads at most LOG_BATCH rows at
    a time and only as fast as the caller consumes: a slow consumer falls behind in the log
    and loses nothing, and holds no more than one batch in memory. The caller filters by
    topic. Shared by GET /events/stream and GET /ws.
    """
    while True:
        wake = signal.current()
        events = storage.events(after, limit=LOG_BATCH)
        for event in events:
            after = event.seq
            yield event
        if len(events) == LOG_BATCH:
            continue
        if idle is None:
            return
        with anyio.move_on_after(idle) as waited:
            await wake.wait()
        if waited.cancelled_caught:
            yield None


async def _event_stream(
    signal: LogSignal, storage: Storage, patterns: list[str], after: int
) -> AsyncGenerator[bytes, None]:
    # A comment line every SSE_PING seconds keeps proxies and idle timers from closing it.
    async with contextlib.aclosing(follow_log(signal, storage, after, SSE_PING)) as events:
        async for event in events:
            if event is None:
                yield b": ping\n\n"
            elif any(topic_matches(p, event.topic) for p in patterns):
                data = msgspec.json.encode({"topic": event.topic, "payload": event.payload})
                yield b"id: %d\nevent: %s\ndata: %s\n\n" % (event.seq, event.topic.encode(), data)


# -- WebSockets -----------------------------------------------------------------------------

# Close codes (RFC 6455 section 7.4.1) the server sends; the README lists them.
WS_NORMAL = 1000  # an answer to the client's own close
WS_GOING_AWAY = 1001  # the server is draining (shutdown, SIGTERM)
WS_POLICY = 1008  # a slow client (sends stalled) or a silent one (idle timeout)
WS_TOO_BIG = 1009  # a message over max_message
WS_INTERNAL = 1011  # a server fault (logged)
# Waiting for the client's answer to our close frame.
WS_CLOSE_TIMEOUT = 2.0


@dataclass(frozen=True)
class WebSocketLimits:
    """The bounds of one /ws connection, with their defaults."""

    # A text message from the client over this many bytes closes the connection with 1009.
    max_message: int = 64 * 1024
    # Nothing heard from the client for this long: we send a ping.
    ping_interval: float = 20.0
    # Nothing heard (not even the pong) for this long: closed with 1008.
    idle_timeout: float = 60.0
    # A send that cannot finish in this long (the client reads nothing): closed with 1008.
    send_timeout: float = TRANSFER_TIMEOUT
    # Topic patterns one connection may hold.
    max_topics: int = 64


_Topics = Annotated[list[str], msgspec.Meta(min_length=1, max_length=64)]


class WsSubscribe(msgspec.Struct, tag="subscribe", tag_field="op", forbid_unknown_fields=True):
    """/ws client message: add topic patterns; `after` (a seq) replays the log after it."""

    topics: _Topics
    after: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None


class WsUnsubscribe(msgspec.Struct, tag="unsubscribe", tag_field="op", forbid_unknown_fields=True):
    """/ws client message: remove topic patterns."""

    topics: _Topics


WsClientMessage = WsSubscribe | WsUnsubscribe


class WsEvent(msgspec.Struct, tag="event", tag_field="op"):
    """/ws server message: one event of the durable log."""

    seq: int
    topic: str
    payload: Any
    ts: float


class _WsTopics(msgspec.Struct):
    topics: list[str]
    after: int


class WsSubscribed(_WsTopics, tag="subscribed", tag_field="op"):
    """/ws server message: the answer to subscribe: every pattern now subscribed, and the
    sequence number after which events are sent."""


class WsUnsubscribed(_WsTopics, tag="unsubscribed", tag_field="op"):
    """/ws server message: the answer to unsubscribe: the patterns still subscribed."""


class WsError(msgspec.Struct, tag="error", tag_field="op"):
    """/ws server message: a client message refused, in the one error shape; the connection
    stays open."""

    error: ErrorDetail


WS_DESCRIPTION = """\
WebSocket (RFC 6455) over the durable event log. Authenticate with `Authorization: Bearer`
or, from a browser, `?access_token=TOKEN`. Messages are JSON text frames.

Client: `{"op": "subscribe", "topics": ["sensors/#", "alerts/+"], "after": 42}` adds topic
patterns (`+` one level, a final `#` any); without `after` events from now on, with `after`
the connection's cursor moves to that sequence number and every logged event after it that
matches any subscribed pattern is sent (again), so a reconnecting client resumes with the
last `seq` it saw. `{"op": "unsubscribe", "topics": [...]}` removes patterns.

Server: `{"op": "subscribed"|"unsubscribed", "topics": [...], "after": seq}` answers each
request before any event it causes; `{"op": "event", "seq", "topic", "payload", "ts"}` for
each logged event, in order; `{"op": "error", "error": {"code", "message", "path"}}` for a
message that is not JSON, has an unknown op or a bad field (the connection stays open).

Limits: client messages up to 64 KiB (close 1009 beyond); a ping after 20 s of silence and
close 1008 after 60 s without hearing anything (not even the pong); events are read from
the log at most 500 at a time and only as fast as the client takes them (the log is the
queue: a slow client falls behind and loses nothing); a client that accepts no data for
30 s is closed with 1008. Draining the server closes every socket with 1001."""


class _SlowClient(Exception):
    """A send to the client did not finish within send_timeout."""


class _WebSocket:
    """One /ws connection: wsproto frames, subscriptions, and the log follower pushing events.

    One task reads (and answers pings, subscribes and closes). While something is
    subscribed, each publish kicks a second task that reads the log after the cursor, sends
    what matches and ends once caught up, so an idle connection has one task. Sends are
    serialised by a lock. The pusher matches an event against the patterns and moves the
    cursor under that lock, and the reader holds it while it changes them (bumping
    `generation`, which sends the pusher back to the new cursor) and answers, so an answer
    is never followed by an event the request ruled out.
    """

    # Ten thousand of these may be open: no __dict__, and asyncio's lock, which allocates its
    # waiter queue only when there is contention (anyio's allocates one up front).
    __slots__ = (
        "_failed",
        "_link",
        "_lock",
        "_more",
        "_pushing",
        "_tg",
        "closes",
        "cursor",
        "generation",
        "limits",
        "patterns",
        "signal",
        "storage",
        "ws",
    )

    def __init__(
        self, signal: LogSignal, storage: Storage, limits: WebSocketLimits, closes: WsCloses
    ) -> None:
        self.signal = signal
        self.storage = storage
        self.limits = limits
        self.closes = closes
        self.ws = wsproto.connection.Connection(wsproto.connection.ConnectionType.SERVER)
        self.patterns: dict[str, None] = {}  # ordered set
        self.cursor = 0
        self._lock = asyncio.Lock()
        self._link: Upgraded | None = None
        self.generation = 0
        self._pushing = False  # a pusher task is running
        self._more = False  # a publish came while it ran: it reads once more
        self._tg: anyio.abc.TaskGroup | None = None
        self._failed: Exception | None = None

    async def run(self, link: Upgraded) -> None:
        """Serve the connection until either side closes it."""
        self._link = link
        self.closes.open += 1
        code: int | None = None
        try:
            async with anyio.create_task_group() as self._tg:
                try:
                    code = await self._read(link)
                except Exception as e:
                    self._failed = e
                finally:
                    self.signal.unwatch(self._kick)
                    self._tg.cancel_scope.cancel()
            self._tg = None
            failed = self._failed
            if isinstance(failed, _SlowClient):
                code = WS_POLICY
                await self._close(code, "slow client: it read nothing for the send timeout", 0.1)
            elif failed is not None and not isinstance(failed, _ClientGone):
                log.error("internal error on a /ws connection: %s", failed, exc_info=failed)
                code = WS_INTERNAL
                await self._close(code, f"internal error: {type(failed).__name__}", 0.1)
        finally:
            self.closes.count(code)

    # -- reading

    async def _read(self, link: Upgraded) -> int | None:
        """Read until closed; returns the close code we sent, or None if the client closed."""
        limits = self.limits
        state = wsproto.connection.ConnectionState
        self.ws.receive_data(link.received)
        message: list[str] = []
        size = 0
        heard = anyio.current_time()
        pinged = False
        while True:
            for event in self.ws.events():
                if isinstance(event, wsproto.events.CloseConnection):
                    if self.ws.state is state.REMOTE_CLOSING:  # the client's close: answer it
                        await self._send_event(event.response())
                    elif self.ws.state is state.OPEN:  # wsproto found a protocol error
                        await self._close(event.code, event.reason or "")
                        return event.code
                    return None
                if isinstance(event, wsproto.events.Ping):
                    await self._send_event(event.response())
                elif isinstance(event, wsproto.events.Message):
                    if isinstance(event, wsproto.events.TextMessage):
                        size += len(event.data.encode())
                        message.append(event.data)
                    else:
                        size += len(event.data)
                    if size > limits.max_message:
                        await self._close(WS_TOO_BIG, f"message over {limits.max_message} bytes")
                        return WS_TOO_BIG
                    if event.message_finished:
                        binary = isinstance(event, wsproto.events.BytesMessage)
                        text = None if binary else "".join(message)
                        message, size = [], 0
                        await self._on_message(text)
            wait_for = limits.idle_timeout if pinged else limits.ping_interval
            with anyio.CancelScope(deadline=heard + wait_for) as wait:
                link.on_drain(wait)
                data = await _receive(link.stream)
            link.on_drain(None)
            if link.draining:
                await self._close(WS_GOING_AWAY, "server shutting down")
                return WS_GOING_AWAY
            if not wait.cancelled_caught:
                heard, pinged = anyio.current_time(), False
                self.ws.receive_data(data or None)
            elif pinged:
                await self._close(WS_POLICY, f"idle: nothing heard for {limits.idle_timeout:g} s")
                return WS_POLICY
            else:  # quiet for ping_interval: a live client answers the ping with a pong
                await self._send_event(wsproto.events.Ping(b"frys"))
                pinged = True

    async def _on_message(self, text: str | None) -> None:
        if text is None:
            error = HttpError(
                400, "bad_request", "binary messages are not accepted; send JSON text"
            )
            await self._send_message(WsError(ErrorDetail(error.code, error.message)))
            return
        try:
            request = decode_body(text.encode(), WsClientMessage, "message")
            if isinstance(request, WsSubscribe):
                await self._subscribe(request)
            else:
                await self._unsubscribe(request)
        except (_SlowClient, _ClientGone):
            raise
        except Exception as e:
            error = http_error(e)
            await self._send_message(WsError(ErrorDetail(error.code, error.message, error.path)))

    async def _subscribe(self, request: WsSubscribe) -> None:
        for i, pattern in enumerate(request.topics):
            try:
                validate_pattern(pattern)
            except FrysError as e:
                raise HttpError(422, "invalid", str(e), f"$.topics[{i}]") from None
        added = [p for p in request.topics if p not in self.patterns]
        if len(self.patterns) + len(added) > self.limits.max_topics:
            message = f"at most {self.limits.max_topics} topic patterns per connection"
            raise HttpError(422, "invalid", message, "$.topics")
        async with self._lock:
            following = bool(self.patterns)
            if request.after is not None or not following:
                self.generation += 1
                self.cursor = self.storage.last_seq() if request.after is None else request.after
            self.patterns.update(dict.fromkeys(added))
            await self._send_locked(self._frame(WsSubscribed(list(self.patterns), self.cursor)))
            self.signal.watch(self._kick)
            self._kick()

    async def _unsubscribe(self, request: WsUnsubscribe) -> None:
        async with self._lock:
            for pattern in request.topics:
                self.patterns.pop(pattern, None)
            if not self.patterns:
                self._stop_following()
            await self._send_locked(self._frame(WsUnsubscribed(list(self.patterns), self.cursor)))

    # -- following the log

    def _kick(self) -> None:
        """Something was published: read the log, or have the running pusher read again."""
        if self._pushing:
            self._more = True
        elif self._tg is not None:
            self._pushing = True
            self._tg.start_soon(self._push)

    def _stop_following(self) -> None:
        # Called holding the lock (or once no pusher runs): the pusher checks generation
        # under the lock before each send.
        self.signal.unwatch(self._kick)
        self.patterns.clear()
        self.generation += 1

    async def _push(self) -> None:
        try:
            while self.patterns:
                generation, self._more = self.generation, False
                caught_up = follow_log(self.signal, self.storage, self.cursor, idle=None)
                async with contextlib.aclosing(caught_up) as events:
                    async for event in events:
                        assert event is not None
                        async with self._lock:
                            if generation != self.generation:
                                break  # rewound or stopped: start again from self.cursor
                            if any(topic_matches(p, event.topic) for p in self.patterns):
                                document = WsEvent(event.seq, event.topic, event.payload, event.ts)
                                await self._send_locked(self._frame(document))
                            self.cursor = event.seq
                if generation == self.generation and not self._more:
                    return
        except Exception as e:
            # The reader owns the connection's end: cancel it, and let run() see why.
            assert self._tg is not None
            self._failed = e
            self._tg.cancel_scope.cancel()
        finally:
            self._pushing = False

    # -- writing

    def _frame(self, message: msgspec.Struct) -> bytes:
        return self.ws.send(wsproto.events.TextMessage(msgspec.json.encode(message).decode()))

    async def _send_message(self, message: msgspec.Struct) -> None:
        async with self._lock:
            await self._send_locked(self._frame(message))

    async def _send_event(self, event: wsproto.events.Event) -> None:
        async with self._lock:
            await self._send_locked(self.ws.send(event))

    async def _send_locked(self, data: bytes) -> None:
        assert self._link is not None
        try:
            with anyio.fail_after(self.limits.send_timeout):
                await self._link.stream.send(data)
        except TimeoutError:
            raise _SlowClient from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            raise _ClientGone from None

    async def _close(self, code: int, reason: str, wait: float = WS_CLOSE_TIMEOUT) -> None:
        """Send a close frame and wait (briefly) for the client's; the caller drops the socket."""
        assert self._link is not None
        with anyio.move_on_after(wait):
            try:
                async with self._lock:
                    self._stop_following()
                    if self.ws.state is not wsproto.connection.ConnectionState.OPEN:
                        return
                    close = wsproto.events.CloseConnection(code, reason)
                    await self._link.stream.send(self.ws.send(close))
                while not self._closed():
                    received = await _receive(self._link.stream)
                    if not received:
                        return
                    self.ws.receive_data(received)
                    for _event in self.ws.events():
                        pass  # data still in flight; we wait only for the close
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return

    def _closed(self) -> bool:
        return self.ws.state is wsproto.connection.ConnectionState.CLOSED


async def _receive(stream: anyio.abc.ByteStream, size: int = 64 * 1024) -> bytes:
    """What the peer sent next, or b"" when it closed or broke the connection."""
    try:
        return await stream.receive(size)
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return b""


class WsCloses:
    """Counts /ws connections open and closed, by the close code the server sent."""

    def __init__(self, metrics: Metrics) -> None:
        self.open = 0
        self._metrics = metrics
        self._counters: dict[int | None, Counter] = {}
        metrics.gauge("ws_connections", "Open /ws WebSocket connections", lambda: self.open)

    def count(self, code: int | None) -> None:
        self.open -= 1
        counter = self._counters.get(code)
        if counter is None:
            labels = {"code": "client" if code is None else str(code)}
            counter = self._counters[code] = self._metrics.counter(
                "ws_closed_total", "/ws connections closed, by the code the server sent", labels
            )
        counter.inc()


# -- the dashboard -------------------------------------------------------------------------

DASHBOARD_DESCRIPTION = (
    "The dashboard: one self-contained HTML page (no external requests) showing health, "
    "recent runs with their step timelines, live events over /ws, plugins, and a form to "
    "start a workflow. Served without a token; with one configured, the page asks for it."
)
# The page may talk to its own origin only, and loads nothing from anywhere.
DASHBOARD_HEADERS = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("cache-control", "no-cache"),
]
# Routes a browser opens without being able to send headers: they take ?access_token=.
_QUERY_TOKEN_PATHS = frozenset({"/ws", "/events/stream"})

_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _foreign_origin(headers: Mapping[str, str]) -> str | None:
    """The Origin a browser sent when it is not this server's own host, else None."""
    origin = headers.get("origin")
    if origin and urllib.parse.urlsplit(origin).netloc != headers.get("host"):
        return origin
    return None


@functools.cache
def _dashboard() -> bytes:
    return importlib.resources.files("frys_edge").joinpath("dashboard.html").read_bytes()


def _by_name(document: dict[str, Any]) -> str:
    return str(document["name"])


# -- the two applications -------------------------------------------------------------------


class _Routes:
    """The handlers of the health port and of the API port, over one runtime."""

    def __init__(self, rt: Runtime, ws_limits: WebSocketLimits) -> None:
        self.rt = rt
        self.ws_limits = ws_limits
        self.ws_closes = WsCloses(rt.metrics)
        self.log_signal = LogSignal(rt.bus)
        self.health = Router()
        self.health.add("GET", "/health", self.get_health)
        self.health.add("GET", "/health/ready", self.get_ready)
        self.health.add("GET", "/metrics", self.get_metrics)
        api = self.api = Router()
        page = RouteDoc(media_type="text/html", description=DASHBOARD_DESCRIPTION)
        api.add("GET", "/", self.get_dashboard, page)
        api.add("GET", "/openapi.json", self.get_openapi)
        api.add("GET", "/status", self.get_status)
        api.add("GET", "/plugins", self.list_plugins)
        api.add("GET", "/workflows", self.list_workflows)
        api.add("GET", "/workflows/{name}", self.get_workflow)
        api.add("GET", "/runs", self.list_runs, RouteDoc(query=RunsQuery))
        api.add("POST", "/runs", self.start_run, RouteDoc(body=StartRun, created=True))
        api.add("GET", "/runs/{id}", self.get_run)
        api.add("POST", "/runs/{id}/cancel", self.cancel_run)
        api.add("GET", "/kv/{namespace}", self.list_kv, RouteDoc(query=KvQuery))
        api.add("GET", "/kv/{namespace}/{key*}", self.get_kv)
        api.add("PUT", "/kv/{namespace}/{key*}", self.put_kv, RouteDoc(body=Any))
        api.add("DELETE", "/kv/{namespace}/{key*}", self.delete_kv)
        api.add("GET", "/events", self.read_events, RouteDoc(query=EventsQuery))
        api.add("GET", "/events/stream", self.stream_events, RouteDoc(query=StreamQuery))
        api.add("POST", "/events", self.publish_event, RouteDoc(body=PublishEvent))
        ws_doc = RouteDoc(
            query=WsQuery,
            description=WS_DESCRIPTION,
            messages=(WsClientMessage, WsEvent, WsSubscribed, WsUnsubscribed, WsError),
            media_type="application/octet-stream",
            status=101,
        )
        api.add("GET", "/ws", self.websocket, ws_doc)
        api.add("GET", "/vectors", self.list_vectors)
        api.add("POST", "/vectors/{name}/search", self.search_vectors, RouteDoc(body=VectorSearch))
        api.add("PUT", "/vectors/{name}/items", self.upsert_vectors, RouteDoc(body=VectorItems))
        api.add("POST", "/vectors/{name}/delete", self.delete_vectors, RouteDoc(body=VectorIds))
        self._openapi = api.openapi("Frys Edge API", __version__)

    async def health_app(self, request: Request) -> Response:
        """The health port: open to all."""
        return await self._dispatch(self.health, request)

    async def api_app(self, request: Request) -> Response:
        """The API port: with a token configured, every request but the page must carry it;
        a browser page from another site may not change anything (it could, without a
        token, by posting a plain form to 127.0.0.1)."""
        if request.method not in _SAFE_METHODS:
            origin = _foreign_origin(request.headers)
            if origin is not None:
                message = (
                    f"a {request.method} from a page of {origin} is refused: only pages "
                    "served by this API may change state"
                )
                return HttpError(403, "forbidden", message).response()
        token = self.rt.config.network.token
        if token and request.path != "/":
            given = request.headers.get("authorization", "")
            if not given and request.path in _QUERY_TOKEN_PATHS:
                given = "Bearer " + request.query.get("access_token", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                error = HttpError(
                    401,
                    "unauthorized",
                    "missing or wrong bearer token; send Authorization: Bearer <[network] token>"
                    " (or ?access_token= on /ws and /events/stream)",
                    headers=[("www-authenticate", "Bearer")],
                )
                return error.response()
        return await self._dispatch(self.api, request)

    async def _dispatch(self, router: Router, request: Request) -> Response:
        route = "unmatched"
        try:
            route, handler, params = router.find(request.method, request.path)
            response = await handler(request, params)
        except Exception as e:
            response = error_response(e)
        response.route = route
        return response

    @property
    def storage(self) -> Storage:
        storage = self.rt.storage
        if storage is None:
            raise HttpError(503, "unavailable", "the runtime is not started")
        return storage

    # -- health port

    async def get_health(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        return json_response(200, self.rt.health.snapshot())

    async def get_ready(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        health = self.rt.health
        snapshot = health.snapshot()
        if health.ready():
            return json_response(200, {"ready": True, **snapshot})
        reasons = {
            c.name: f"{c.status}: {c.reason}" if c.reason else c.status
            for c in health.components.values()
            if c.status not in ("ok", "degraded")
        }
        message = "not ready: " + "; ".join(f"{name} {why}" for name, why in reasons.items())
        error = {"code": "not_ready", "message": message, "path": None}
        return json_response(503, {"ready": False, "reasons": reasons, **snapshot, "error": error})

    async def get_metrics(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        text = prometheus_text(self.rt.metrics)
        return Response(200, text.encode(), content_type=PROMETHEUS)

    # -- workflows and runs

    def _workflow_document(self, name: str) -> dict[str, Any]:
        spec = self.rt.engine.workflows[name].spec
        return {
            "name": spec.name,
            "version": spec.version,
            "description": spec.description,
            "inputs": msgspec.to_builtins(spec.inputs),
            "steps": [step.name for step in spec.steps],
            "triggers": msgspec.to_builtins(spec.triggers),
        }

    async def get_dashboard(self, request: Request, params: dict[str, str]) -> Response:
        return Response(
            200, _dashboard(), content_type="text/html; charset=utf-8", headers=DASHBOARD_HEADERS
        )

    async def get_status(self, request: Request, params: dict[str, str]) -> Response:
        """What the dashboard shows first: version, uptime and health (behind the token)."""
        decode_query(request.query, EmptyQuery)
        uptime = time.time() - self.rt.started_at if self.rt.started_at else 0.0
        document = {"version": __version__, "uptime": uptime, "health": self.rt.health.snapshot()}
        return json_response(200, document)

    async def list_plugins(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        wasm = [
            {
                "name": p.name,
                "kind": "wasm",
                "version": p.manifest.version,
                "exports": sorted(p.exports),
                "granted": sorted(p.granted),
                "calls": p.calls,
                "errors": p.errors,
            }
            for p in self.rt.wasm.values()
        ]
        native = [{"name": name, "kind": "native"} for name in self.rt.plugins]
        # A WASM plugin dir that failed to load shows in health only; list it too.
        failed = [
            {"name": c.name.removeprefix("plugin:"), "kind": "wasm", "error": c.reason}
            for c in self.rt.health.components.values()
            if c.name.startswith("plugin:")
            and c.status == "failed"
            and c.name.removeprefix("plugin:") not in self.rt.wasm
            and c.name.removeprefix("plugin:") not in self.rt.plugins
        ]
        return json_response(200, {"plugins": sorted(wasm + native + failed, key=_by_name)})

    async def websocket(self, request: Request, params: dict[str, str]) -> Response:
        """Upgrade to a WebSocket of the event log (WS_DESCRIPTION says how it speaks)."""
        decode_query(request.query, WsQuery)
        headers = request.headers
        connection = {v.strip().lower() for v in headers.get("connection", "").split(",")}
        if headers.get("upgrade", "").lower() != "websocket" or "upgrade" not in connection:
            message = "GET /ws is a WebSocket: send Connection: Upgrade and Upgrade: websocket"
            raise HttpError(426, "upgrade_required", message, headers=[("upgrade", "websocket")])
        if headers.get("sec-websocket-version") != "13":
            raise HttpError(
                426,
                "upgrade_required",
                "only WebSocket version 13 is spoken; send Sec-WebSocket-Version: 13",
                headers=[("sec-websocket-version", "13")],
            )
        key = headers.get("sec-websocket-key", "")
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            valid_key = False
        if not valid_key:
            message = "Sec-WebSocket-Key must be 16 bytes in base64"
            raise HttpError(400, "bad_request", message)
        origin = _foreign_origin(headers)
        if origin is not None:
            # A page from another site must not read the event log through the browser.
            message = f"a WebSocket from origin {origin} is refused: only same-origin pages"
            raise HttpError(403, "forbidden", message)
        session = _WebSocket(self.log_signal, self.storage, self.ws_limits, self.ws_closes)
        accept = wsproto.utilities.generate_accept_token(key.encode()).decode()
        upgrade = [("upgrade", "websocket"), ("connection", "Upgrade")]
        return Response(
            101, headers=[*upgrade, ("sec-websocket-accept", accept)], upgrade=session.run
        )

    async def get_openapi(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        return json_response(200, self._openapi)

    async def list_workflows(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        names = sorted(self.rt.engine.workflows)
        return json_response(200, {"workflows": [self._workflow_document(n) for n in names]})

    async def get_workflow(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        if params["name"] not in self.rt.engine.workflows:
            raise HttpError(404, "not_found", f"no workflow {params['name']!r} is loaded")
        return json_response(200, self._workflow_document(params["name"]))

    def _run_document(self, run_id: str) -> dict[str, Any]:
        storage = self.storage
        run = storage.get_run(run_id)
        if run is None:
            raise HttpError(404, "not_found", f"no run {run_id!r}")
        return run_document(run, storage.run_steps(run_id), storage.run_attempts(run_id))

    async def list_runs(self, request: Request, params: dict[str, str]) -> Response:
        query: RunsQuery = decode_query(request.query, RunsQuery)
        if query.before is not None and self.storage.get_run(query.before) is None:
            message = f"no run {query.before!r} to page from; pass the `next` of a page"
            raise HttpError(422, "invalid", message, "$.before")
        runs = self.storage.list_runs(
            status=query.status, workflow=query.workflow, before=query.before, limit=query.limit
        )
        # A full page may have more after it; `next` is where the next page starts.
        next_page = runs[-1].id if len(runs) == query.limit else None
        summaries = [_run_summary(run) for run in runs]
        return json_response(200, {"runs": summaries, "next": next_page})

    async def start_run(self, request: Request, params: dict[str, str]) -> Response:
        body: StartRun = decode_body(request.body, StartRun)
        workflow = self.rt.engine.workflows.get(body.workflow)
        if workflow is None:
            known = ", ".join(sorted(self.rt.engine.workflows)) or "none loaded"
            message = f"unknown workflow {body.workflow!r} (known: {known})"
            raise HttpError(422, "invalid", message, "$.workflow")
        before = time.time()
        run_id = await self.rt.engine.start(
            workflow, body.inputs, idempotency_key=body.idempotency_key
        )
        document = self._run_document(run_id)
        # A run created by this call was stamped after `before`; an older one had the key.
        created = document["created_at"] >= before
        location = [("location", f"/runs/{run_id}")]
        return json_response(201 if created else 200, document, location)

    async def get_run(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        return json_response(200, self._run_document(params["id"]))

    async def cancel_run(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        cancelled = await self.rt.engine.cancel(params["id"])
        return json_response(200, {"cancelled": cancelled, "run": self._run_document(params["id"])})

    # -- key-value store

    async def list_kv(self, request: Request, params: dict[str, str]) -> Response:
        query: KvQuery = decode_query(request.query, KvQuery)
        entries = self.storage.list_prefix(
            params["namespace"], query.prefix, after=query.after, limit=query.limit
        )
        after = entries[-1].key if len(entries) == query.limit else None
        return json_response(200, {"entries": [_entry(e) for e in entries], "next_after": after})

    async def get_kv(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        namespace, key = params["namespace"], params["key"]
        entry = self.storage.get(namespace, key)
        if entry is None:
            raise HttpError(404, "not_found", f"no key {key!r} in namespace {namespace!r}")
        return json_response(200, _entry(entry))

    async def put_kv(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        value = decode_body(request.body, Any, "value")
        version = await self.storage.put(params["namespace"], params["key"], value)
        return json_response(
            200, {"namespace": params["namespace"], "key": params["key"], "version": version}
        )

    async def delete_kv(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        namespace, key = params["namespace"], params["key"]
        if not await self.storage.delete(namespace, key):
            raise HttpError(404, "not_found", f"no key {key!r} in namespace {namespace!r}")
        return json_response(200, {"deleted": True})

    # -- events

    async def read_events(self, request: Request, params: dict[str, str]) -> Response:
        query: EventsQuery = decode_query(request.query, EventsQuery)
        events = self.storage.events(query.after, topic=query.topic, limit=query.limit)
        after = events[-1].seq if events else query.after
        return json_response(
            200,
            {
                "events": [msgspec.structs.asdict(e) for e in events],
                "next_after": after,
                "last_seq": self.storage.last_seq(),
            },
        )

    async def stream_events(self, request: Request, params: dict[str, str]) -> Response:
        """Server-Sent Events from the durable event log: what is logged after `after` (or
        the Last-Event-ID header, or now), then each new event as it is logged."""
        query: StreamQuery = decode_query(request.query, StreamQuery)
        patterns = [p.strip() for p in query.topics.split(",") if p.strip()]
        for pattern in patterns:
            try:
                validate_pattern(pattern)
            except FrysError as e:
                raise HttpError(422, "invalid", str(e), "$.topics") from None
        resume = request.headers.get("last-event-id", "")
        if query.after is not None:
            after = query.after
        elif resume.isdigit():
            after = int(resume)
        else:
            after = self.storage.last_seq()
        body = _event_stream(self.log_signal, self.storage, patterns, after)
        return Response(200, content_type="text/event-stream", stream=body)

    async def publish_event(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        body: PublishEvent = decode_body(request.body, PublishEvent)
        try:
            validate_topic(body.topic)
        except FrysError as e:
            raise HttpError(422, "invalid", str(e), "$.topic") from None
        storage = self.storage
        # Published first: BusFull refuses before queuing anywhere, so a 503 leaves no trace.
        delivered = await self.rt.publish(body.topic, body.payload, timeout=PUBLISH_TIMEOUT)
        seq = await storage.append(body.topic, body.payload) if body.durable else None
        return json_response(200, {"delivered": delivered, "seq": seq})

    @property
    def vectors(self) -> VectorStore:
        if self.rt.vectors is None:
            raise HttpError(503, "unavailable", "the runtime is not started")
        return self.rt.vectors

    async def list_vectors(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        infos = msgspec.to_builtins(self.vectors.collections())
        return json_response(200, {"collections": infos})

    async def search_vectors(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        body: VectorSearch = decode_body(request.body, VectorSearch)
        hits = self.vectors.search(
            params["name"],
            vector=body.vector,
            query=body.query,
            k=body.k,
            filter=body.filter,
            exact=body.exact,
        )
        return json_response(200, {"hits": [hit_document(hit) for hit in hits]})

    async def upsert_vectors(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        body: VectorItems = decode_body(request.body, VectorItems)
        upserted = await self.vectors.upsert(params["name"], body.items)
        track_collection(self.vectors, self.rt.metrics, params["name"])
        return json_response(200, {"upserted": upserted})

    async def delete_vectors(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        body: VectorIds = decode_body(request.body, VectorIds)
        return json_response(200, {"deleted": await self.vectors.delete(params["name"], body.ids)})


# -- the two servers of one runtime ---------------------------------------------------------


class ApiServer:
    """The health server and the API server of one runtime, bound and served together."""

    def __init__(
        self,
        rt: Runtime,
        *,
        max_body: int = MAX_BODY,
        idle_timeout: float = IDLE_TIMEOUT,
        drain_timeout: float | None = None,
        ws_limits: WebSocketLimits | None = None,
        transfer_timeout: float = TRANSFER_TIMEOUT,
    ) -> None:
        net = rt.config.network
        self.rt = rt
        self.host = net.host
        self.drain_timeout = (
            rt.config.system.shutdown_timeout if drain_timeout is None else drain_timeout
        )
        routes = self._routes = _Routes(rt, ws_limits or WebSocketLimits())
        options: dict[str, Any] = {
            "max_connections": net.max_connections,
            "max_body": max_body,
            "idle_timeout": idle_timeout,
            "read_size": net.buffer_size,
            "transfer_timeout": transfer_timeout,
        }
        self.servers = {
            "health": HttpServer("health", routes.health_app, rt.metrics, **options),
            "api": HttpServer("api", routes.api_app, rt.metrics, **options),
        }
        self._wanted = {"health": net.health_port, "api": net.port}
        self._listeners: dict[str, anyio.abc.Listener[Any]] = {}
        self._tls: ssl.SSLContext | None = None
        #: The bound port of each server ("health", "api"), set by bind().
        self.ports: dict[str, int] = {}
        self.stopped = anyio.Event()
        self._serving = False

    async def bind(self) -> dict[str, int]:
        """Listen on both ports (0: any free port); returns {"health": port, "api": port}."""
        self._tls = tls_context(self.rt.config.network)
        try:
            for name, port in self._wanted.items():
                listener: anyio.abc.Listener[anyio.abc.SocketStream]
                try:
                    listener = await anyio.create_tcp_listener(
                        local_host=self.host or None, local_port=port
                    )
                except OSError as e:
                    raise ApiError(
                        f"cannot listen on {self.host}:{port} for the {name} server: "
                        f"{e.strerror or e}; free the port or change [network] "
                        f"{'health_port' if name == 'health' else 'port'}"
                    ) from e
                self.ports[name] = listener.extra(anyio.abc.SocketAttribute.local_port)
                self._listeners[name] = (
                    TLSListener(listener, self._tls, standard_compatible=False)
                    if name == "api" and self._tls is not None
                    else listener
                )
        except BaseException:
            for listener in self._listeners.values():
                await anyio.aclose_forcefully(listener)
            raise
        log.info(
            "API on %s:%d, health and metrics on %s:%d",
            self.host,
            self.ports["api"],
            self.host,
            self.ports["health"],
        )
        return dict(self.ports)

    async def serve(self) -> None:
        """Serve both ports until stop() has drained them; cancelling closes everything."""
        if not self._listeners:
            await self.bind()
        self._serving = True
        try:
            async with anyio.create_task_group() as tg:
                for name, server in self.servers.items():
                    tg.start_soon(server.serve, self._listeners[name])
        finally:
            self.stopped.set()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let requests in flight finish (up to timeout), close idle ones."""
        wait = self.drain_timeout if timeout is None else timeout
        async with anyio.create_task_group() as tg:
            for server in self.servers.values():
                tg.start_soon(server.stop, wait)
        if self._serving:
            await self.stopped.wait()
        else:  # bound but never served
            for listener in self._listeners.values():
                await anyio.aclose_forcefully(listener)
            self.stopped.set()
        self._routes.log_signal.close()


async def serve_api(rt: Runtime, *, ready: Callable[[ApiServer], None] | None = None) -> None:
    """Serve health and API ports until cancelled (draining gracefully) or stopped.

    `ready(server)` is called once both ports are bound; `server.ports` has the bound ports
    and `await server.stop()` drains and ends this call.
    """
    check_bind_security(rt.config)
    server = ApiServer(rt)
    await server.bind()
    if ready is not None:
        ready(server)

    async def serve_shielded() -> None:
        # Shielded so that cancelling serve_api drains requests in flight instead of cutting them.
        with anyio.CancelScope(shield=True):
            await server.serve()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve_shielded)
        try:
            await server.stopped.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await server.stop()
