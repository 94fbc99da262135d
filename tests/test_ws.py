"""GET /ws: the WebSocket over the durable event log, over real sockets on 127.0.0.1.

The client side is wsproto's own client (handshake included) on an anyio socket.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from test_api import call, serving
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from frys_edge.api import WebSocketLimits


class Closed(Exception):
    """The server closed the WebSocket: code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed {code}: {reason}")
        self.code = code
        self.reason = reason


class Rejected(Exception):
    """The server answered the handshake with an HTTP error: status and JSON body."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"rejected {status}: {body!r}")
        self.status = status
        self.body = json.loads(body) if body else None


class WsClient:
    """A minimal WebSocket client: wsproto's client state machine on an anyio TCP stream."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Event] = []
        self.pings = 0

    async def handshake(self, port: int, target: str, headers: list[tuple[str, str]]) -> None:
        extra = [(k.encode(), v.encode()) for k, v in headers]
        await self.stream.send(
            self.ws.send(Request(host=f"127.0.0.1:{port}", target=target, extra_headers=extra))
        )
        status, body = 0, b""
        while True:
            for event in await self._events():
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise Rejected(status, b"")
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise Rejected(status, body)
                else:
                    self.pending.append(event)

    async def _events(self) -> list[Event]:
        data = await self.stream.receive(65536)
        self.ws.receive_data(data)
        return list(self.ws.events())

    async def send_json(self, document: Any) -> None:
        await self.send_text(json.dumps(document))

    async def send_text(self, text: str) -> None:
        await self.stream.send(self.ws.send(TextMessage(data=text)))

    async def receive(self, timeout: float = 5) -> dict[str, Any]:
        """The next JSON message; answers pings; raises Closed when the server closes."""
        text: list[str] = []
        with anyio.fail_after(timeout):
            while True:
                while self.pending:
                    event = self.pending.pop(0)
                    if isinstance(event, TextMessage):
                        text.append(event.data)
                        if event.message_finished:
                            return json.loads("".join(text))  # type: ignore[no-any-return]
                    elif isinstance(event, Ping):
                        self.pings += 1
                        await self.stream.send(self.ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        await self.stream.send(self.ws.send(event.response()))
                        raise Closed(event.code, event.reason or "")
                    elif isinstance(event, BytesMessage):
                        raise AssertionError("the server sends text frames only")
                try:
                    self.pending.extend(await self._events())
                except anyio.EndOfStream:
                    raise Closed(1006, "connection dropped without a close frame") from None

    async def receive_op(self, op: str, timeout: float = 5) -> dict[str, Any]:
        message = await self.receive(timeout)
        assert message["op"] == op, message
        return message

    async def expect_silence(self, seconds: float) -> None:
        """Nothing but pings arrives for `seconds`."""
        with anyio.move_on_after(seconds):
            message = await self.receive(seconds + 1)
            raise AssertionError(f"unexpected message {message}")


@asynccontextmanager
async def ws_connect(
    port: int, target: str = "/ws", headers: list[tuple[str, str]] | None = None
) -> AsyncIterator[WsClient]:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        client = WsClient(stream)
        await client.handshake(port, target, headers or [])
        yield client


async def publish(port: int, topic: str, payload: Any = None) -> int:
    reply = await call(
        port, "POST", "/events", {"topic": topic, "payload": payload, "durable": True}
    )
    assert reply.status == 200, reply.body
    return int(reply.json["seq"])


def assert_ws_error(message: dict[str, Any], code: str, path: str | None = None) -> None:
    assert message["op"] == "error"
    assert set(message["error"]) == {"code", "message", "path"}
    assert message["error"]["code"] == code and message["error"]["message"]
    assert message["error"]["path"] == path


def test_subscribe_receives_live_events_matching_wildcards_only(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            api = server.ports["api"]
            await publish(api, "sensors/old", 0)  # before subscribing: not sent without after
            async with ws_connect(api) as ws:
                await ws.send_json({"op": "subscribe", "topics": ["sensors/+/temp", "alerts/#"]})
                ack = await ws.receive_op("subscribed")
                assert ack["topics"] == ["sensors/+/temp", "alerts/#"] and ack["after"] == 1
                await publish(api, "sensors/boiler/temp", 71)
                await publish(api, "sensors/boiler/pressure", 2)  # + is one level only
                await publish(api, "sensors/boiler/temp/raw", 3)
                await publish(api, "alerts", "bare")  # a final # matches the parent too
                await publish(api, "alerts/hot/boiler", {"t": 90})
                got = [await ws.receive_op("event") for _ in range(3)]
                assert [(e["seq"], e["topic"], e["payload"]) for e in got] == [
                    (2, "sensors/boiler/temp", 71),
                    (5, "alerts", "bare"),
                    (6, "alerts/hot/boiler", {"t": 90}),
                ]
                assert all(isinstance(e["ts"], float) for e in got)
                await ws.expect_silence(0.3)

    anyio.run(main)


def test_unsubscribe_stops_events_of_the_removed_pattern(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            api = server.ports["api"]
            async with ws_connect(api) as ws:
                await ws.send_json({"op": "subscribe", "topics": ["a/#", "b/#"]})
                await ws.receive_op("subscribed")
                await publish(api, "a/1")
                assert (await ws.receive_op("event"))["topic"] == "a/1"
                await ws.send_json({"op": "unsubscribe", "topics": ["a/#"]})
                assert (await ws.receive_op("unsubscribed"))["topics"] == ["b/#"]
                await publish(api, "a/2")
                await publish(api, "b/1")
                assert (await ws.receive_op("event"))["topic"] == "b/1"  # a/2 never came
                await ws.send_json({"op": "unsubscribe", "topics": ["b/#"]})
                assert (await ws.receive_op("unsubscribed"))["topics"] == []
                await publish(api, "b/2")
                await ws.expect_silence(0.3)
                # Subscribing again without after starts from now: b/2 is not replayed.
                await ws.send_json({"op": "subscribe", "topics": ["b/#"]})
                assert (await ws.receive_op("subscribed"))["after"] == 4
                await publish(api, "b/3")
                assert (await ws.receive_op("event"))["topic"] == "b/3"

    anyio.run(main)


def test_subscribe_with_after_replays_the_log_then_follows_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (rt, server):
            api = server.ports["api"]
            assert rt.storage is not None
            for i in range(1, 8):
                await rt.storage.append(f"s/{i % 2}", i)
            async with ws_connect(api) as ws:  # a client that saw up to seq 3 reconnects
                await ws.send_json({"op": "subscribe", "topics": ["s/1"], "after": 3})
                assert (await ws.receive_op("subscribed"))["after"] == 3
                replayed = [(await ws.receive_op("event"))["seq"] for _ in range(2)]
                assert replayed == [5, 7]
                await publish(api, "s/1", "live")
                live = await ws.receive_op("event")
                assert (live["seq"], live["payload"]) == (8, "live")
                # after on a connection already following rewinds it, for every pattern.
                await ws.send_json({"op": "subscribe", "topics": ["s/0"], "after": 5})
                assert (await ws.receive_op("subscribed"))["topics"] == ["s/1", "s/0"]
                again = [(await ws.receive_op("event"))["seq"] for _ in range(3)]
                assert again == [6, 7, 8]

    anyio.run(main)


def test_bad_messages_get_the_error_shape_and_the_connection_stays_open(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            api = server.ports["api"]
            async with ws_connect(api) as ws:
                await ws.send_text("{not json")
                assert_ws_error(await ws.receive(), "bad_request")
                await ws.send_json({"op": "dance"})
                assert_ws_error(await ws.receive(), "invalid", "$.op")
                await ws.send_json({"topics": ["a"]})
                assert_ws_error(await ws.receive(), "invalid", "$.op")
                await ws.send_json({"op": "subscribe", "topics": "a/#"})
                assert_ws_error(await ws.receive(), "invalid", "$.topics")
                await ws.send_json({"op": "subscribe", "topics": ["ok", "a/#/b"]})
                assert_ws_error(await ws.receive(), "invalid", "$.topics[1]")
                await ws.send_json({"op": "subscribe", "topics": ["a"], "after": -1})
                assert_ws_error(await ws.receive(), "invalid", "$.after")
                await ws.send_json({"op": "subscribe", "topics": ["a"], "extra": 1})
                assert_ws_error(await ws.receive(), "invalid", "$.extra")
                await ws.stream.send(ws.ws.send(BytesMessage(data=b"\x00\x01")))
                assert_ws_error(await ws.receive(), "bad_request")
                # Still serving: a good subscribe works after all that.
                await ws.send_json({"op": "subscribe", "topics": ["x"]})
                await ws.receive_op("subscribed")
                await publish(api, "x", 1)
                assert (await ws.receive_op("event"))["topic"] == "x"

    anyio.run(main)


def test_a_message_over_the_limit_closes_with_1009(tmp_path: Path) -> None:
    limits = WebSocketLimits(max_message=1024)

    async def main() -> None:
        async with serving(tmp_path, server_options={"ws_limits": limits}) as (_, server):
            api = server.ports["api"]
            async with ws_connect(api) as ws:
                await ws.send_json({"op": "subscribe", "topics": ["a" * 900]})  # under: fine
                await ws.receive_op("subscribed")
                await ws.send_json({"op": "subscribe", "topics": ["a" * 2000]})
                with pytest.raises(Closed) as closed:
                    await ws.receive()
                assert closed.value.code == 1009 and "1024" in closed.value.reason
            async with ws_connect(api) as ws:  # split into frames, the total still counts
                await ws.stream.send(
                    ws.ws.send(TextMessage(data="[" * 600, message_finished=False))
                )
                await ws.stream.send(ws.ws.send(TextMessage(data="]" * 600)))
                with pytest.raises(Closed) as closed:
                    await ws.receive()
                assert closed.value.code == 1009
            metrics = (await call(server.ports["health"], "GET", "/metrics")).body.decode()
            assert 'frys_ws_closed_total{code="1009"} 2' in metrics

    anyio.run(main)


def test_draining_the_server_closes_sockets_with_1001(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            api = server.ports["api"]
            async with ws_connect(api) as idle, ws_connect(api) as following:
                await following.send_json({"op": "subscribe", "topics": ["#"]})
                await following.receive_op("subscribed")
                async with anyio.create_task_group() as tg:
                    tg.start_soon(server.stop, 5.0)
                    for ws in (idle, following):
                        with pytest.raises(Closed) as closed:
                            await ws.receive(timeout=3)
                        assert closed.value.code == 1001
                assert server.stopped.is_set()

    anyio.run(main)


def test_with_a_token_ws_needs_it_in_a_header_or_the_query(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, settings={"network.token": "s3cret"}) as (_, server):
            api = server.ports["api"]
            for target, headers in [
                ("/ws", []),
                ("/ws?access_token=wrong", []),
                ("/ws", [("authorization", "Bearer wrong")]),
            ]:
                with pytest.raises(Rejected) as rejected:
                    async with ws_connect(api, target, headers):
                        pass
                assert rejected.value.status == 401
                assert rejected.value.body["error"]["code"] == "unauthorized"
            for target, headers in [
                ("/ws?access_token=s3cret", []),
                ("/ws", [("authorization", "Bearer s3cret")]),
            ]:
                async with ws_connect(api, target, headers) as ws:
                    await ws.send_json({"op": "subscribe", "topics": ["#"]})
                    await ws.receive_op("subscribed")
            # The query token is for the streams a browser opens, not for every route.
            runs = await call(api, "GET", "/runs?access_token=s3cret")
            assert runs.status == 401

    anyio.run(main)


def test_handshake_mistakes_are_http_errors_in_the_one_shape(tmp_path: Path) -> None:
    def raw(port: int, head: str) -> tuple[int, dict[str, Any]]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(head.encode())
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        status = int(data.split(b" ", 2)[1])
        return status, json.loads(data.split(b"\r\n\r\n", 1)[1])

    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            api = server.ports["api"]
            plain = await call(api, "GET", "/ws")
            assert plain.status == 426 and plain.json["error"]["code"] == "upgrade_required"
            upgrade = "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: Upgrade\r\n"
            upgrade += "Upgrade: websocket\r\nSec-WebSocket-Version: {}\r\n"
            upgrade += "Sec-WebSocket-Key: {}\r\n{}\r\n"
            key = "dGhlIHNhbXBsZSBub25jZQ=="
            cases = [
                (upgrade.format(api, 8, key, ""), 426, "upgrade_required"),
                (upgrade.format(api, 13, "short", ""), 400, "bad_request"),
                (upgrade.format(api, 13, key, "Origin: http://evil.example\r\n"), 403, "forbidden"),
            ]
            for head, status, code in cases:
                got, body = await anyio.to_thread.run_sync(raw, api, head)
                assert (got, body["error"]["code"]) == (status, code)
            same = upgrade.format(api, 13, key, f"Origin: http://127.0.0.1:{api}\r\n")
            with socket.create_connection(("127.0.0.1", api), timeout=5) as sock:
                sock.sendall(same.encode())
                head = await anyio.to_thread.run_sync(sock.recv, 65536)
            assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
            assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head

    anyio.run(main)


def test_pings_a_quiet_client_and_closes_a_silent_one_with_1008(tmp_path: Path) -> None:
    limits = WebSocketLimits(ping_interval=0.2, idle_timeout=0.5)

    async def main() -> None:
        async with serving(tmp_path, server_options={"ws_limits": limits}) as (_, server):
            api = server.ports["api"]
            async with ws_connect(api) as live:  # answers pings: stays open
                await live.expect_silence(1.2)
                assert live.pings >= 3
                await live.send_json({"op": "subscribe", "topics": ["t"]})
                await live.receive_op("subscribed")
            async with ws_connect(api) as silent:  # reads nothing, answers nothing
                await anyio.sleep(1.0)
                data = await silent.stream.receive(65536)
                silent.ws.receive_data(data)
                events = list(silent.ws.events())
                closes = [e for e in events if isinstance(e, CloseConnection)]
                assert [c.code for c in closes] == [1008], events
                assert "idle" in (closes[0].reason or "")

    anyio.run(main)


def test_a_client_that_reads_nothing_is_closed_with_1008(tmp_path: Path) -> None:
    limits = WebSocketLimits(send_timeout=0.5)

    async def main() -> None:
        async with serving(tmp_path, server_options={"ws_limits": limits}) as (rt, server):
            api = server.ports["api"]
            assert rt.storage is not None
            stream = await anyio.connect_tcp("127.0.0.1", api)
            async with stream:
                raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client = WsClient(stream)
                await client.handshake(api, "/ws", [])
                await client.send_json({"op": "subscribe", "topics": ["#"]})
                await client.receive_op("subscribed")
                big = "x" * 4000
                for i in range(3000):  # ~12 MB: far more than the socket buffers hold
                    await rt.storage.append("flood", {"i": i, "pad": big})
                await rt.publish("flood/done")  # a publish wakes the log followers
                with anyio.fail_after(10):
                    while rt.metrics.snapshot().get('ws_closed_total{code="1008"}') != 1:
                        await anyio.sleep(0.1)

    anyio.run(main)


def test_many_subscribed_sockets_share_one_bus_subscription(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (rt, server):
            api = server.ports["api"]
            before = rt.bus.stats()["subscriptions"]
            async with contextlib.AsyncExitStack() as stack:
                sockets = [await stack.enter_async_context(ws_connect(api)) for _ in range(20)]
                for i, ws in enumerate(sockets):
                    await ws.send_json({"op": "subscribe", "topics": [f"room/{i % 2}"]})
                    await ws.receive_op("subscribed")
                # Idle subscribed sockets wait on one shared wake-up, not a queue each.
                assert rt.bus.stats()["subscriptions"] == before + 1
                await publish(api, "room/1", "hi")
                for i, ws in enumerate(sockets):
                    if i % 2:
                        assert (await ws.receive_op("event"))["payload"] == "hi"
                    else:
                        await ws.expect_silence(0.05)
            with anyio.fail_after(5):  # the server sees each socket close
                while rt.metrics.snapshot()["ws_connections"] != 0:
                    await anyio.sleep(0.02)
            assert rt.metrics.snapshot()['ws_closed_total{code="client"}'] == 20

    anyio.run(main)


def test_openapi_documents_the_protocol_and_its_message_types(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            doc = (await call(server.ports["api"], "GET", "/openapi.json")).json
            ws = doc["paths"]["/ws"]["get"]
            assert "101" in ws["responses"]
            assert '"op": "subscribe"' in ws["description"] and "1009" in ws["description"]
            assert [p["name"] for p in ws["parameters"]] == ["access_token"]
            schemas = doc["components"]["schemas"]
            for name in ("WsSubscribe", "WsUnsubscribe", "WsEvent", "WsSubscribed", "WsError"):
                assert name in schemas
            assert schemas["WsSubscribe"]["properties"]["op"] == {"enum": ["subscribe"]}
            page = doc["paths"]["/"]["get"]
            assert "text/html" in page["responses"]["200"]["content"]

    anyio.run(main)
