"""API: serves health, Prometheus metrics and the REST API over HTTP/1.1 (anyio and h11).

h11 parses and writes HTTP; this module bounds it (header and body size, connections, idle
and slow clients), routes requests to handlers and maps every error to one JSON shape. The
handlers call the runtime, engine and storage; they decide nothing the runtime does not.
"""

from __future__ import annotations

import asyncio
import email.utils
import hmac
import ipaddress
import logging
import math
import re
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import anyio.abc
import h11
import msgspec
from anyio.streams.tls import TLSListener

from frys_edge import __version__
from frys_edge.cli import run_document
from frys_edge.config import Config, NetworkConfig
from frys_edge.core import BusFull, FrysError, topic_matches, validate_pattern, validate_topic
from frys_edge.engine import RunNotFound
from frys_edge.metrics import Counter, Histogram, Metrics
from frys_edge.storage import InvalidValue, Storage
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
# Server-Sent Events: log rows read at a time, and seconds between keep-alive comments.
SSE_BATCH = 500
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


def decode_body(body: bytes, kind: type[Any], what: str = "body") -> Any:
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
    if isinstance(exc, HttpError):
        return exc.response()
    if isinstance(exc, RunNotFound):
        return HttpError(404, "not_found", str(exc)).response()
    if isinstance(exc, DefinitionError):
        first = exc.problems[0].path if exc.problems else ""
        return HttpError(422, "invalid", str(exc), f"$.{first}" if first else "$").response()
    if isinstance(exc, WorkflowError):
        return HttpError(422, "invalid", str(exc)).response()
    if isinstance(exc, UnknownCollection):
        return HttpError(404, "not_found", str(exc)).response()
    if isinstance(exc, VectorError):
        return HttpError(422, "invalid", str(exc)).response()
    if isinstance(exc, InvalidValue):
        return HttpError(422, "invalid", str(exc)).response()
    if isinstance(exc, BusFull):
        return HttpError(503, "busy", str(exc), headers=[("retry-after", "1")]).response()
    if isinstance(exc, FrysError):  # storage full, engine stopping, runtime not started
        log.warning("request refused: %s", exc)
        return HttpError(503, "unavailable", str(exc)).response()
    log.error("internal error serving a request: %s", exc, exc_info=exc)
    return HttpError(500, "internal", f"internal error: {type(exc).__name__}").response()


# -- routing --------------------------------------------------------------------------------

Handler = Callable[[Request, dict[str, str]], Awaitable[Response]]


class RouteDoc(msgspec.Struct, frozen=True):
    """What /openapi.json says of a route: the types its query and body are decoded as."""

    query: type[Any] | None = None
    body: Any = None
    created: bool = False


class Router:
    """Routes like `/runs/{id}` and `/kv/{namespace}/{key*}` (`*`: the rest of the path)."""

    def __init__(self) -> None:
        self._routes: dict[str, tuple[list[str], dict[str, Handler]]] = {}
        self.docs: dict[tuple[str, str], RouteDoc] = {}

    def add(self, method: str, pattern: str, handler: Handler, doc: RouteDoc | None = None) -> None:
        """Register handler for method on pattern, described by doc for the OpenAPI schema."""
        parts = pattern.strip("/").split("/") if pattern != "/" else []
        self._routes.setdefault(pattern, (parts, {}))[1][method] = handler
        self.docs[(method, pattern)] = doc or RouteDoc()

    def openapi(self, title: str, version: str) -> dict[str, Any]:
        """An OpenAPI 3.1 document built from the routes and their msgspec types."""
        types = [ErrorBody] + [d.body for d in self.docs.values() if d.body not in (None, Any)]
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
            ok = "201" if doc.created else "200"
            operation: dict[str, Any] = {
                "operationId": getattr(handler, "__name__", f"{method} {pattern}"),
                "summary": f"{method} {pattern}",
                "parameters": parameters,
                "responses": {
                    ok: {"description": "OK", "content": {"application/json": {"schema": {}}}},
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
        for pattern, (parts, handlers) in self._routes.items():
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
    __slots__ = ("h11", "idle_scope", "stream")

    def __init__(self, stream: anyio.abc.SocketStream, max_header: int) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header)
        self.idle_scope: anyio.CancelScope | None = None


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
    ) -> None:
        self.name = name
        self.app = app
        self.metrics = metrics
        self.max_connections = max_connections
        self.max_body = max_body
        self.max_header = max_header
        self.idle_timeout = idle_timeout
        self.read_size = read_size
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

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        if self._draining or len(self._open) >= self.max_connections:
            if not self._draining:
                self._refused.inc()
            await anyio.aclose_forcefully(stream)
            return
        conn = _Connection(stream, self.max_header)
        self._open.add(conn)
        try:
            await self._serve_connection(conn)
        except _ClientGone:
            pass
        finally:
            self._open.discard(conn)
            closed, self._closed = self._closed, anyio.Event()
            closed.set()
            await anyio.aclose_forcefully(stream)

    async def _serve_connection(self, conn: _Connection) -> None:
        while True:
            with anyio.CancelScope(deadline=anyio.current_time() + self.idle_timeout) as idle:
                conn.idle_scope = idle
                if self._draining:
                    idle.cancel()
                try:
                    event = await self._next_event(conn)
                except h11.RemoteProtocolError as e:
                    await self._send_error(conn, e)
                    return
            conn.idle_scope = None
            if idle.cancelled_caught or isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                return  # h11 yields a Request first in each cycle; anything else is a bug
            started = time.perf_counter()
            # h11 bounds only what is buffered incomplete; a head read in one chunk can be larger.
            size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if size > self.max_header:
                message = f"request line and headers are over {self.max_header} bytes"
                response = HttpError(431, "too_large", message).response()
                response.close = True
            else:
                response = await self._respond(conn, event)
            await self._send(conn, response, event.method.decode("ascii", "replace"))
            self._observe(response, event.method, time.perf_counter() - started)
            if response.close:
                if conn.h11.their_state is not h11.DONE:  # the request was left unread
                    await self._linger(conn)
                return
            if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                return
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
        if conn.h11.they_are_waiting_for_100_continue:
            await self._write(
                conn, conn.h11.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        chunks: list[bytes] = []
        size = 0
        try:
            with anyio.fail_after(TRANSFER_TIMEOUT):
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
                408, "timeout", f"request body not received within {TRANSFER_TIMEOUT} s"
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
        try:
            with anyio.fail_after(TRANSFER_TIMEOUT):
                await conn.stream.send(data)
        except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            raise _ClientGone from None

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
    """GET /runs query."""

    status: str | None = None
    workflow: str | None = None
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
    """POST /vectors/{name}/search: by text `query` or a `vector`, top `k`, metadata filter."""

    query: str | None = None
    vector: list[float] | None = None
    k: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    filter: dict[str, Any] | None = None


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


class EmptyQuery(msgspec.Struct, forbid_unknown_fields=True):
    """Routes without query parameters."""


def _run_summary(run: Any) -> dict[str, Any]:
    document = run_document(run, [], [])
    del document["steps"]
    return document


def _entry(entry: Any) -> dict[str, Any]:
    return msgspec.structs.asdict(entry)


async def _event_stream(
    rt: Runtime, storage: Storage, patterns: list[str], after: int
) -> AsyncIterator[bytes]:
    # Woken by any publish (durable events are published as they are logged) and every
    # SSE_PING seconds, when a comment line keeps proxies and idle timers from closing it.
    wake = asyncio.Event()
    sub = rt.bus.subscribe("#", handler=lambda _message: wake.set(), name="sse")
    try:
        while True:
            events = storage.events(after, limit=SSE_BATCH)
            for event in events:
                after = event.seq
                if any(topic_matches(p, event.topic) for p in patterns):
                    data = msgspec.json.encode({"topic": event.topic, "payload": event.payload})
                    yield b"id: %d\nevent: %s\ndata: %s\n\n" % (
                        event.seq,
                        event.topic.encode(),
                        data,
                    )
            if len(events) == SSE_BATCH:
                continue
            wake.clear()
            with anyio.move_on_after(SSE_PING) as idle:
                await wake.wait()
            if idle.cancelled_caught:
                yield b": ping\n\n"
    finally:
        rt.bus.unsubscribe(sub)


# -- the two applications -------------------------------------------------------------------


class _Routes:
    """The handlers of the health port and of the API port, over one runtime."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.health = Router()
        self.health.add("GET", "/health", self.get_health)
        self.health.add("GET", "/health/ready", self.get_ready)
        self.health.add("GET", "/metrics", self.get_metrics)
        api = self.api = Router()
        api.add("GET", "/openapi.json", self.get_openapi)
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
        api.add("GET", "/vectors", self.list_vectors)
        api.add("POST", "/vectors/{name}/search", self.search_vectors, RouteDoc(body=VectorSearch))
        api.add("PUT", "/vectors/{name}/items", self.upsert_vectors, RouteDoc(body=VectorItems))
        api.add("POST", "/vectors/{name}/delete", self.delete_vectors, RouteDoc(body=VectorIds))
        self._openapi = api.openapi("Frys Edge API", __version__)

    async def health_app(self, request: Request) -> Response:
        """The health port: open to all."""
        return await self._dispatch(self.health, request)

    async def api_app(self, request: Request) -> Response:
        """The API port: with a token configured, every request must carry it."""
        token = self.rt.config.network.token
        if token:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {token}".encode()):
                error = HttpError(
                    401,
                    "unauthorized",
                    "missing or wrong bearer token; send Authorization: Bearer <[network] token>",
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
        runs = self.storage.list_runs(
            status=query.status, workflow=query.workflow, limit=query.limit
        )
        return json_response(200, {"runs": [_run_summary(run) for run in runs]})

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
        body = _event_stream(self.rt, self.storage, patterns, after)
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
        infos = [msgspec.structs.asdict(c) for c in self.vectors.collections()]
        return json_response(200, {"collections": infos})

    async def search_vectors(self, request: Request, params: dict[str, str]) -> Response:
        decode_query(request.query, EmptyQuery)
        body: VectorSearch = decode_body(request.body, VectorSearch)
        hits = self.vectors.search(
            params["name"], vector=body.vector, query=body.query, k=body.k, filter=body.filter
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
    ) -> None:
        net = rt.config.network
        self.rt = rt
        self.host = net.host
        self.drain_timeout = (
            rt.config.system.shutdown_timeout if drain_timeout is None else drain_timeout
        )
        routes = _Routes(rt)
        options: dict[str, Any] = {
            "max_connections": net.max_connections,
            "max_body": max_body,
            "idle_timeout": idle_timeout,
            "read_size": net.buffer_size,
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
