"""The HTTP API, health and metrics over real HTTP on 127.0.0.1 against a started runtime."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from frys_edge.api import ApiError, ApiServer, check_bind_security, serve_api, tls_context
from frys_edge.config import load_config
from frys_edge.core import Subscription
from frys_edge.runtime import Runtime
from frys_edge.workflow import parse_workflow

NO_BODY = object()

GREET = {
    "name": "greet",
    "inputs": {"reading": {"type": "number"}},
    "triggers": [{"type": "event", "topic": "greet/now"}],
    "steps": [
        {
            "name": "store",
            "action": "kv.put",
            "params": {"key": "r", "value": "${{ inputs.reading }}"},
        },
        {"name": "say", "action": "log", "needs": ["store"], "params": {"message": "hi"}},
    ],
    "outputs": {"said": "${{ steps.say.output.message }}"},
}
NAP = {"name": "nap", "steps": [{"name": "z", "action": "sleep", "params": {"seconds": 30}}]}


def runtime(tmp_path: Path, **settings: Any) -> Runtime:
    overrides = {
        "system.data_dir": str(tmp_path / "data"),
        "workflows.dir": str(tmp_path / "workflows"),
        "network.port": 0,
        "network.health_port": 0,
        # The test process carries every other test's imports: keep "memory" healthy.
        "memory.limit": "4GB",
        **settings,
    }
    return Runtime(load_config(env={}, overrides=overrides))


@asynccontextmanager
async def serving(
    tmp_path: Path,
    *,
    settings: dict[str, Any] | None = None,
    server_options: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[Runtime, ApiServer]]:
    """A started runtime with greet and nap loaded, served by an ApiServer on free ports."""
    async with runtime(tmp_path, **(settings or {})) as rt:
        for spec in (GREET, NAP):
            workflow = parse_workflow(spec, rt.engine.actions)
            rt.engine.workflows[workflow.spec.name] = workflow
        server = ApiServer(rt, **(server_options or {}))
        await server.bind()
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            yield rt, server
            await server.stop(timeout=2)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    body: Any = NO_BODY,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Reply:
    """One blocking HTTP request (run it in a worker thread)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = raw if raw is not None else None if body is NO_BODY else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return Reply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        if own:
            conn.close()


async def call(port: int, method: str, path: str, body: Any = NO_BODY, **kwargs: Any) -> Reply:
    # Our own limiter: the runtime's threads are its storage's, and must stay free.
    limiter = anyio.CapacityLimiter(1)
    return await anyio.to_thread.run_sync(
        lambda: request(port, method, path, body, **kwargs), limiter=limiter
    )


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await anyio.to_thread.run_sync(fn, limiter=anyio.CapacityLimiter(1))


def assert_error(reply: Reply, status: int, code: str, path: str | None = None) -> None:
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    error = reply.json["error"]
    assert set(error) == {"code", "message", "path"}
    assert error["code"] == code
    assert error["message"]
    assert error["path"] == path


# -- health port ----------------------------------------------------------------------------


def test_health_reports_the_overall_status_and_each_component(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            reply = await call(server.ports["health"], "GET", "/health")
            assert reply.status == 200
            assert reply.json["status"] == "ok"
            assert reply.json["components"]["storage"]["status"] == "ok"
            ready = await call(server.ports["health"], "GET", "/health/ready")
            assert ready.status == 200 and ready.json["ready"] is True

    anyio.run(main)


def test_ready_is_503_naming_the_failed_component(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (rt, server):
            rt.health.set("plugin:meter", "failed", "meter.wasm trapped")
            reply = await call(server.ports["health"], "GET", "/health/ready")
            assert_error(reply, 503, "not_ready")
            assert reply.json["reasons"] == {"plugin:meter": "failed: meter.wasm trapped"}
            assert "plugin:meter" in reply.json["error"]["message"]
            # Liveness stays 200: the process is alive, just not ready.
            alive = await call(server.ports["health"], "GET", "/health")
            assert alive.status == 200 and alive.json["status"] == "failed"

    anyio.run(main)


SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?P<labels>\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})?'
    r" (?P<value>NaN|[+-]Inf|[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$"
)


def test_metrics_are_prometheus_text_with_frys_prefix_and_http_series(tmp_path: Path) -> None:
    texts: list[str] = []

    async def fetch() -> None:
        async with serving(tmp_path) as (rt, server):
            await call(server.ports["api"], "GET", "/workflows")
            await call(server.ports["api"], "GET", "/nowhere")
            rt.metrics.counter("odd_total", "Odd labels", {"why": 'a "quoted"\\ value'}).inc()
            reply = await call(server.ports["health"], "GET", "/metrics")
            assert reply.status == 200
            assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
            texts.append(reply.body.decode())

    anyio.run(fetch)
    text = texts[0]
    assert text.endswith("\n")
    helps: list[str] = []
    types: dict[str, str] = {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.append(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram")
            types[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not an exposition line: {line!r}"
            assert match["name"].startswith("frys_")
            samples[match["name"] + (match["labels"] or "")] = float(match["value"])
    assert len(helps) == len(set(helps)) == len(types)
    assert all(name.startswith("frys_") for name in types)
    assert types["frys_http_requests_total"] == "counter"
    assert samples['frys_http_requests_total{method="GET",route="/workflows",status="200"}'] == 1
    assert samples['frys_http_requests_total{method="GET",route="unmatched",status="404"}'] == 1
    assert samples['frys_odd_total{why="a \\"quoted\\"\\\\ value"}'] == 1
    # Histogram: cumulative buckets ending in +Inf, equal to _count.
    assert types["frys_http_request_seconds"] == "histogram"
    buckets = [
        (key, value)
        for key, value in samples.items()
        if key.startswith('frys_http_request_seconds_bucket{route="/workflows"')
    ]
    values = [value for _, value in buckets]
    assert values == sorted(values)
    assert buckets[-1][0].endswith('le="+Inf"}')
    assert values[-1] == samples['frys_http_request_seconds_count{route="/workflows"}'] == 1
    assert 'frys_http_request_seconds_sum{route="/workflows"}' in samples


# -- workflows and runs ---------------------------------------------------------------------


def test_workflows_lists_names_steps_and_triggers(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            port = server.ports["api"]
            reply = await call(port, "GET", "/workflows")
            assert reply.status == 200
            greet = next(w for w in reply.json["workflows"] if w["name"] == "greet")
            assert greet["steps"] == ["store", "say"]
            assert greet["triggers"][0]["topic"] == "greet/now"
            assert greet["inputs"] == {"reading": {"type": "number", "description": ""}}
            one = await call(port, "GET", "/workflows/greet")
            assert one.status == 200 and one.json == greet
            assert_error(await call(port, "GET", "/workflows/missing"), 404, "not_found")

    anyio.run(main)


def test_start_run_returns_its_document_and_a_used_key_returns_the_same_run(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (rt, server):
            port = server.ports["api"]
            body = {"workflow": "greet", "inputs": {"reading": 4.5}, "idempotency_key": "k1"}
            first = await call(port, "POST", "/runs", body)
            assert first.status == 201, first.body
            run_id = first.json["id"]
            assert first.headers["location"] == f"/runs/{run_id}"
            assert first.json["workflow"] == "greet" and first.json["inputs"] == {"reading": 4.5}
            again = await call(port, "POST", "/runs", body)
            assert again.status == 200 and again.json["id"] == run_id

            await rt.engine.wait(run_id)
            run = await call(port, "GET", f"/runs/{run_id}")
            assert run.status == 200
            assert run.json["status"] == "succeeded"
            assert run.json["outputs"] == {"said": "hi"}
            assert [s["name"] for s in run.json["steps"]] == ["store", "say"]
            assert run.json["steps"][0]["history"][0]["status"] == "succeeded"

            listed = await call(port, "GET", "/runs?status=succeeded&workflow=greet&limit=5")
            assert listed.status == 200
            assert [r["id"] for r in listed.json["runs"]] == [run_id]
            assert "steps" not in listed.json["runs"][0]
            none = await call(port, "GET", "/runs?status=failed&workflow=")
            assert none.json["runs"] == []
            assert_error(await call(port, "GET", "/runs?limit=many"), 400, "bad_request", "$.limit")
            assert_error(await call(port, "GET", "/runs?limit=0"), 400, "bad_request", "$.limit")
            assert_error(
                await call(port, "GET", "/runs?colour=red"), 400, "bad_request", "$.colour"
            )
            assert_error(await call(port, "GET", "/runs/nope"), 404, "not_found")

    anyio.run(main)


def test_runs_page_newest_first_with_a_next_cursor(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            port = server.ports["api"]
            started = []
            for i in range(5):
                body = {"workflow": "greet", "inputs": {"reading": float(i)}}
                started.append((await call(port, "POST", "/runs", body)).json["id"])
            seen: list[str] = []
            cursor = ""
            pages = 0
            while True:
                page = await call(port, "GET", f"/runs?workflow=greet&limit=2{cursor}")
                assert page.status == 200, page.body
                seen += [r["id"] for r in page.json["runs"]]
                pages += 1
                if page.json["next"] is None:
                    break
                assert page.json["next"] == seen[-1]
                cursor = f"&before={page.json['next']}"
            assert seen == started[::-1] and pages == 3
            assert_error(await call(port, "GET", "/runs?before=nope"), 422, "invalid", "$.before")

    anyio.run(main)


@pytest.mark.parametrize(
    ("body", "status", "code", "path"),
    [
        (b'{"workflow": "greet", ', 400, "bad_request", None),
        (b"", 400, "bad_request", None),
        (b'{"inputs": {}}', 422, "invalid", "$.workflow"),
        (b'{"workflow": 7}', 422, "invalid", "$.workflow"),
        (b'{"workflow": "greet", "inputs": []}', 422, "invalid", "$.inputs"),
        (
            b'{"workflow": "greet", "inputs": {"reading": "hot"}}',
            422,
            "invalid",
            "$.inputs.reading",
        ),
        (b'{"workflow": "greet", "inputs": {}}', 422, "invalid", "$.inputs.reading"),
        (b'{"workflow": "greet", "inputz": {}}', 422, "invalid", "$.inputz"),
        (b'{"workflow": "nosuch"}', 422, "invalid", "$.workflow"),
    ],
)
def test_bad_start_requests_are_4xx_with_the_field_path(
    tmp_path: Path, body: bytes, status: int, code: str, path: str | None
) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            reply = await call(server.ports["api"], "POST", "/runs", raw=body)
            assert_error(reply, status, code, path)

    anyio.run(main)


def test_cancel_ends_a_running_run_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            port = server.ports["api"]
            started = await call(port, "POST", "/runs", {"workflow": "nap"})
            run_id = started.json["id"]
            assert started.json["status"] == "running"
            cancelled = await call(port, "POST", f"/runs/{run_id}/cancel")
            assert cancelled.status == 200
            assert cancelled.json["cancelled"] is True
            assert cancelled.json["run"]["status"] == "cancelled"
            again = await call(port, "POST", f"/runs/{run_id}/cancel")
            assert again.status == 200 and again.json["cancelled"] is False
            assert_error(await call(port, "POST", "/runs/nope/cancel"), 404, "not_found")

    anyio.run(main)


# -- key-value store and events -------------------------------------------------------------


def test_kv_put_get_list_and_delete(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            port = server.ports["api"]
            put = await call(port, "PUT", "/kv/sensors/temp/kitchen", {"c": 21.5})
            assert put.status == 200 and put.json["version"] == 1
            assert (await call(port, "PUT", "/kv/sensors/temp/hall", 19)).status == 200
            assert (await call(port, "PUT", "/kv/sensors/hum", 40)).status == 200
            got = await call(port, "GET", "/kv/sensors/temp/kitchen")
            assert got.status == 200
            assert got.json["value"] == {"c": 21.5} and got.json["version"] == 1
            # A namespace with a slash is one percent-encoded segment.
            assert (await call(port, "PUT", "/kv/plugin%2Fmeter/x", "y")).status == 200
            assert (await call(port, "GET", "/kv/plugin%2Fmeter/x")).json["value"] == "y"

            page = await call(port, "GET", "/kv/sensors?prefix=temp/&limit=1")
            assert [e["key"] for e in page.json["entries"]] == ["temp/hall"]
            assert page.json["next_after"] == "temp/hall"
            rest = await call(port, "GET", "/kv/sensors?prefix=temp/&after=temp/hall")
            assert [e["key"] for e in rest.json["entries"]] == ["temp/kitchen"]
            assert rest.json["next_after"] is None

            assert (await call(port, "DELETE", "/kv/sensors/temp/kitchen")).json == {
                "deleted": True
            }
            assert_error(await call(port, "DELETE", "/kv/sensors/temp/kitchen"), 404, "not_found")
            assert_error(await call(port, "GET", "/kv/sensors/temp/kitchen"), 404, "not_found")
            bad = await call(port, "PUT", "/kv/sensors/x", raw=b"{nope")
            assert_error(bad, 400, "bad_request")
            assert_error(
                await call(port, "GET", "/kv/sensors?limit=-1"), 400, "bad_request", "$.limit"
            )

    anyio.run(main)


def test_events_publish_on_the_bus_and_read_back_from_the_log(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (rt, server):
            port = server.ports["api"]
            sub = rt.bus.subscribe("alarm/#")
            body = {"topic": "alarm/door", "payload": {"open": True}, "durable": True}
            published = await call(port, "POST", "/events", body)
            assert published.status == 200
            assert published.json["delivered"] == 1
            seq = published.json["seq"]
            message = sub.get_nowait()
            assert message is not None and message.payload == {"open": True}
            fleeting = await call(port, "POST", "/events", {"topic": "alarm/door"})
            assert fleeting.json["seq"] is None

            read = await call(port, "GET", f"/events?after={seq - 1}&topic=alarm/door")
            assert read.status == 200
            assert [(e["seq"], e["payload"]) for e in read.json["events"]] == [
                (seq, {"open": True})
            ]
            assert read.json["next_after"] == seq and read.json["last_seq"] == seq
            empty = await call(port, "GET", f"/events?after={seq}")
            assert empty.json["events"] == [] and empty.json["next_after"] == seq

            wild = await call(port, "POST", "/events", {"topic": "alarm/#"})
            assert_error(wild, 422, "invalid", "$.topic")
            assert_error(
                await call(port, "POST", "/events", {"payload": 1}), 422, "invalid", "$.topic"
            )
            assert_error(await call(port, "GET", "/events?after=x"), 400, "bad_request", "$.after")

    anyio.run(main)


def test_unknown_route_is_404_and_wrong_method_405_with_allow(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            port = server.ports["api"]
            assert_error(await call(port, "GET", "/nowhere"), 404, "not_found")
            assert_error(await call(port, "GET", "/runs/a/b/c"), 404, "not_found")
            wrong = await call(port, "DELETE", "/runs")
            assert_error(wrong, 405, "method_not_allowed")
            assert wrong.headers["allow"] == "GET, POST"
            # Health routes live on the health port only, and the API on its own.
            assert_error(await call(port, "GET", "/health"), 404, "not_found")
            assert_error(await call(server.ports["health"], "GET", "/runs"), 404, "not_found")
            assert_error(
                await call(server.ports["health"], "POST", "/metrics"), 405, "method_not_allowed"
            )

    anyio.run(main)


# -- security -------------------------------------------------------------------------------


def test_a_page_of_another_site_cannot_change_state(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (rt, server):
            port = server.ports["api"]
            body = {"workflow": "greet", "inputs": {"reading": 1.0}}
            evil = {"origin": "http://evil.example", "content-type": "text/plain"}
            refused = await call(port, "POST", "/runs", body, headers=evil)
            assert_error(refused, 403, "forbidden")
            assert "http://evil.example" in refused.json["error"]["message"]
            put = await call(port, "PUT", "/kv/app/x", 1, headers=evil)
            assert_error(put, 403, "forbidden")
            assert rt.storage is not None and rt.storage.list_runs() == []
            own = {"origin": f"http://127.0.0.1:{port}"}
            assert (await call(port, "POST", "/runs", body, headers=own)).status == 201
            assert (await call(port, "GET", "/runs", headers=evil)).status == 200

    anyio.run(main)


def test_with_a_token_the_api_needs_it_and_health_stays_open(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, settings={"network.token": "s3cret"}) as (_, server):
            port = server.ports["api"]
            missing = await call(port, "GET", "/workflows")
            assert_error(missing, 401, "unauthorized")
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = await call(port, "GET", "/workflows", headers={"Authorization": "Bearer nope"})
            assert_error(wrong, 401, "unauthorized")
            # Even an unknown route answers 401: routes are not probed without the token.
            assert_error(await call(port, "GET", "/nowhere"), 401, "unauthorized")
            good = await call(port, "GET", "/workflows", headers={"Authorization": "Bearer s3cret"})
            assert good.status == 200
            assert (await call(server.ports["health"], "GET", "/health")).status == 200
            assert (await call(server.ports["health"], "GET", "/metrics")).status == 200

    anyio.run(main)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "gateway.local"])
def test_binding_off_loopback_without_a_token_is_refused(host: str) -> None:
    config = load_config(env={}, overrides={"network.host": host}).config
    with pytest.raises(ApiError) as caught:
        check_bind_security(config)
    assert str(caught.value) == (
        f"refusing to listen on {host} without [network] token; "
        "set FRYS_NETWORK_TOKEN or bind 127.0.0.1"
    )
    with_token = load_config(env={"FRYS_NETWORK_TOKEN": "t"}, overrides={"network.host": host})
    check_bind_security(with_token.config)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_binds_need_no_token(host: str) -> None:
    check_bind_security(load_config(env={}, overrides={"network.host": host}).config)


def test_serve_api_refuses_an_open_bind_without_a_token(tmp_path: Path) -> None:
    async def main() -> None:
        async with runtime(tmp_path, **{"network.host": "0.0.0.0"}) as rt:
            with pytest.raises(ApiError, match=r"refusing to listen on 0\.0\.0\.0"):
                await serve_api(rt)

    anyio.run(main)


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            async with runtime(tmp_path, **{"network.port": port}) as rt:
                with pytest.raises(ApiError, match=f"cannot listen on 127.0.0.1:{port}"):
                    await ApiServer(rt).bind()

    anyio.run(main)


# -- bounds ---------------------------------------------------------------------------------


def raw_exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send bytes on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_oversize_bodies_are_413_with_the_error_shape(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, server_options={"max_body": 1000}) as (_, server):
            port = server.ports["api"]
            declared = (
                b"PUT /kv/big/x HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n" + b"1" * 10
            )
            reply = await in_thread(lambda: raw_exchange(port, declared))
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 413 ")
            assert b"connection: close" in head.lower()
            assert json.loads(body)["error"]["code"] == "too_large"
            # Chunked, with no length to check up front: refused once it passes the limit.
            chunks = (b'"' + b"a" * 300 + b'"' for _ in range(5))
            streamed = await call(port, "PUT", "/kv/big/y", raw=chunks)
            assert_error(streamed, 413, "too_large")
            assert (await call(port, "PUT", "/kv/big/z", "a" * 900)).status == 200

    anyio.run(main)


def test_oversize_headers_are_431(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            port = server.ports["api"]
            huge = b"GET /workflows HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
            reply = await in_thread(lambda: raw_exchange(port, huge))
            assert reply.startswith(b"HTTP/1.1 431 ")
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "too_large"
            garbage = await in_thread(lambda: raw_exchange(port, b"NOT HTTP AT ALL\r\n\r\n"))
            assert garbage.startswith(b"HTTP/1.1 400 ")

    anyio.run(main)


def test_keep_alive_serves_two_requests_on_one_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            port = server.ports["api"]

            def two() -> tuple[Reply, Reply, bool]:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                try:
                    first = request(port, "PUT", "/kv/ns/a", 1, conn=conn)
                    sock = conn.sock
                    second = request(port, "GET", "/kv/ns/a", conn=conn)
                    return first, second, sock is not None and conn.sock is sock
                finally:
                    conn.close()

            first, second, same = await in_thread(two)
            assert first.status == 200 and second.json["value"] == 1
            assert same, "the second request needed a new connection"

    anyio.run(main)


def test_idle_keep_alive_connections_are_closed_after_the_idle_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, server_options={"idle_timeout": 0.2}) as (_, server):
            port = server.ports["api"]

            def idle() -> float:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    t0 = time.monotonic()
                    assert sock.recv(1) == b""
                    return time.monotonic() - t0

            assert 0.1 < await in_thread(idle) < 2

    anyio.run(main)


def test_connections_beyond_max_connections_are_closed(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, settings={"network.max_connections": 2}) as (rt, server):
            port = server.ports["api"]
            held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
            try:
                for sock in held:  # a full exchange: the server has surely taken them
                    sock.sendall(b"GET /workflows HTTP/1.1\r\nHost: t\r\n\r\n")
                    assert (await in_thread(partial(sock.recv, 65536))).startswith(b"HTTP/1.1 200")
                extra = b"GET /workflows HTTP/1.1\r\nHost: t\r\n\r\n"
                assert await in_thread(lambda: raw_exchange(port, extra)) == b""
            finally:
                for sock in held:
                    sock.close()
            refused = rt.metrics.counter("http_connections_refused_total", "", {"server": "api"})
            assert refused.value == 1
            await anyio.sleep(0.1)  # the held ones close; new ones are served again
            reply = await call(port, "GET", "/workflows")
            assert reply.status == 200

    anyio.run(main)


def test_a_client_that_reads_no_response_is_closed_after_the_transfer_timeout(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        options = {"transfer_timeout": 0.5}
        async with serving(tmp_path, server_options=options) as (rt, server):
            port = server.ports["api"]
            assert rt.storage is not None
            await rt.storage.put("ns", "big", "x" * 900_000)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(5)
            await in_thread(lambda: sock.connect(("127.0.0.1", port)))
            # Pipelined requests for ~18 MB it never reads: the server's writes stall.
            sock.sendall(b"GET /kv/ns/big HTTP/1.1\r\nHost: t\r\n\r\n" * 20)
            with anyio.fail_after(5):  # closed by the server although the client never read
                while rt.metrics.snapshot()['http_connections{server="api"}'] != 0:
                    await anyio.sleep(0.05)
            sock.close()

    anyio.run(main)


# -- graceful drain -------------------------------------------------------------------------


def blocked_publish(
    rt: Runtime, port: int
) -> tuple[Subscription, Callable[[], Any], dict[str, Reply]]:
    """A POST /events that will wait for room behind a full `block` subscription.

    Returns the subscription (take a message to let the POST through), the coroutine function
    that makes the request, and the dict its reply lands in.
    """
    sub = rt.bus.subscribe("slow/#", maxsize=1, policy="block")
    rt.bus.publish("slow/first", 1)
    result: dict[str, Reply] = {}

    async def post() -> None:
        result["reply"] = await call(port, "POST", "/events", {"topic": "slow/second"})

    return sub, post, result


def test_stop_drains_a_request_in_flight_and_closes_idle_connections(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (rt, server):
            port = server.ports["api"]
            sub, post, result = blocked_publish(rt, port)
            idle = socket.create_connection(("127.0.0.1", port), timeout=5)
            idle.sendall(b"GET /workflows HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await in_thread(lambda: idle.recv(65536))).startswith(b"HTTP/1.1 200")
            async with anyio.create_task_group() as tg:
                tg.start_soon(post)
                await anyio.sleep(0.2)  # the POST is now waiting for room on the bus
                tg.start_soon(server.stop, 5.0)
                await anyio.sleep(0.1)
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", port), timeout=1)
                assert await in_thread(lambda: idle.recv(1)) == b""  # idle: closed at once
                assert "reply" not in result
                assert sub.get_nowait() is not None  # room: the POST goes through
            reply = result["reply"]
            assert reply.status == 200 and reply.json["delivered"] == 1
            assert reply.headers["connection"] == "close"
            idle.close()

    anyio.run(main)


def test_serve_api_reports_its_ports_and_drains_when_cancelled(tmp_path: Path) -> None:
    async def main() -> None:
        async with runtime(tmp_path) as rt:
            servers: list[ApiServer] = []
            # A plain asyncio task, cancelled with Task.cancel(), as the runtime supervises.
            task = asyncio.create_task(serve_api(rt, ready=servers.append))
            while not servers:
                await anyio.sleep(0.01)
            server = servers[0]
            assert set(server.ports) == {"api", "health"} and 0 not in server.ports.values()
            assert (await call(server.ports["health"], "GET", "/health")).status == 200
            sub, post, result = blocked_publish(rt, server.ports["api"])
            async with anyio.create_task_group() as clients:
                clients.start_soon(post)
                await anyio.sleep(0.2)
                task.cancel()
                await anyio.sleep(0.2)
                assert not task.done() and "reply" not in result  # draining
                assert sub.get_nowait() is not None
            assert result["reply"].status == 200
            await asyncio.wait([task], timeout=2)
            assert task.cancelled()
            assert server.stopped.is_set()

    anyio.run(main)


def test_client_mistakes_found_in_review_are_4xx_not_5xx(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            api = server.ports["api"]
            huge = await call(api, "GET", "/events?after=99999999999999999999")
            assert huge.status in (400, 422)
            top = await call(api, "GET", "/kv/ns?prefix=%F4%8F%BF%BF")
            assert top.status == 200 and top.json is not None
            deep = await call(api, "PUT", "/kv/ns/k", raw=b"[" * 100_000 + b"]" * 100_000)
            assert deep.status == 400 and deep.json["error"]["code"] == "bad_request"

    anyio.run(main)


def test_openapi_is_generated_from_the_request_types(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, server):
            reply = await call(server.ports["api"], "GET", "/openapi.json")
            assert reply.status == 200
            doc = reply.json
            assert doc["openapi"] == "3.1.0"
            schemas = doc["components"]["schemas"]
            assert {"StartRun", "PublishEvent", "ErrorBody", "ErrorDetail"} <= set(schemas)
            assert schemas["StartRun"]["required"] == ["workflow"]
            post = doc["paths"]["/runs"]["post"]
            body = post["requestBody"]["content"]["application/json"]["schema"]
            assert body == {"$ref": "#/components/schemas/StartRun"} and "201" in post["responses"]
            listed = {p["name"]: p for p in doc["paths"]["/runs"]["get"]["parameters"]}
            assert listed["limit"]["schema"]["maximum"] >= 1 and not listed["limit"]["required"]
            kv = doc["paths"]["/kv/{namespace}/{key}"]["put"]["parameters"]
            assert [p["name"] for p in kv] == ["namespace", "key"]
            error = await call(server.ports["api"], "GET", "/nope")
            assert set(error.json["error"]) == {"code", "message", "path"}

    anyio.run(main)


def test_vector_routes_upsert_search_delete_and_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (rt, server):
            api = server.ports["api"]
            assert rt.vectors is not None
            rt.vectors.create("docs", 256)
            items = {
                "items": [
                    {"id": "a", "text": "pump pressure fault"},
                    {"id": "b", "text": "valve schedule", "metadata": {"k": 1}},
                ]
            }
            put = await call(api, "PUT", "/vectors/docs/items", items)
            assert put.status == 200 and put.json == {"upserted": 2}
            found = await call(api, "POST", "/vectors/docs/search", {"query": "pump fault", "k": 1})
            assert found.status == 200 and found.json["hits"][0]["id"] == "a"
            exact = {"query": "pump fault", "k": 1, "exact": True}
            assert (await call(api, "POST", "/vectors/docs/search", exact)).json == found.json
            listed = await call(api, "GET", "/vectors")
            assert [c["name"] for c in listed.json["collections"]] == ["docs"]
            assert listed.json["collections"][0]["index"]["kind"] == "exact"
            assert listed.json["collections"][0]["embedder"] == "lexical"
            gone = await call(api, "POST", "/vectors/docs/delete", {"ids": ["a"]})
            assert gone.json == {"deleted": 1}
            missing = await call(api, "POST", "/vectors/nope/search", {"query": "x"})
            assert (
                missing.status == 404
                and "frys vector create nope" in missing.json["error"]["message"]
            )
            bad = await call(
                api, "PUT", "/vectors/docs/items", {"items": [{"id": "c", "vector": [1]}]}
            )
            assert bad.status == 422
            snap = rt.metrics.snapshot()
            assert snap['vector_items{collection="docs"}'] == 1

    anyio.run(main)


def read_sse(port: int, path: str, count: int, headers: dict[str, str] | None = None) -> list[str]:
    """The first `count` events of a Server-Sent Events stream, as raw text blocks."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("content-type") == "text/event-stream"
    events: list[str] = []
    block: list[str] = []
    while len(events) < count:
        line = response.readline().decode()
        if line == "\n":
            if block and not block[0].startswith(":"):
                events.append("".join(block))
            block = []
        else:
            block.append(line)
    conn.close()
    return events


def test_event_stream_replays_resumes_and_follows_live_events(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (rt, server):
            api = server.ports["api"]
            assert rt.storage is not None
            for i in range(3):
                await rt.storage.append(f"sensors/{i}", {"n": i})
            replay = await anyio.to_thread.run_sync(
                read_sse, api, "/events/stream?after=0&topics=sensors/%23", 3
            )
            assert [e.splitlines()[0] for e in replay] == ["id: 1", "id: 2", "id: 3"]
            assert 'data: {"topic":"sensors/2","payload":{"n":2}}' in replay[2]
            resumed = await anyio.to_thread.run_sync(
                lambda: read_sse(api, "/events/stream", 1, {"Last-Event-ID": "2"})
            )
            assert resumed[0].startswith("id: 3")

            async def publish_later() -> None:
                await anyio.sleep(0.2)
                post = {"topic": "alerts/hot", "payload": 1, "durable": True}
                await call(api, "POST", "/events", post)

            async with anyio.create_task_group() as tg:
                tg.start_soon(publish_later)
                live = await anyio.to_thread.run_sync(
                    read_sse, api, "/events/stream?topics=alerts/%23", 1
                )
            assert live[0].startswith("id: 4\nevent: alerts/hot\n")
            bad = await call(api, "GET", "/events/stream?topics=a/%23/b")
            assert bad.status == 422

    anyio.run(main)


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key for 127.0.0.1, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "frys-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_on_the_api_port_with_health_left_plain(tmp_path: Path) -> None:
    import ssl

    cert, key = self_signed(tmp_path)
    tls = {"network.tls_cert": str(cert), "network.tls_key": str(key)}

    def https_get(port: int, path: str) -> int:
        context = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        finally:
            conn.close()

    async def main() -> None:
        async with serving(tmp_path, settings=tls) as (_, server):
            assert await anyio.to_thread.run_sync(https_get, server.ports["api"], "/runs") == 200
            health = await call(server.ports["health"], "GET", "/health")
            assert health.status == 200
            with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
                await anyio.to_thread.run_sync(request, server.ports["api"], "GET", "/runs")

    anyio.run(main)
    half = load_config(env={}, overrides={"network.tls_cert": str(cert)}).config.network
    with pytest.raises(ApiError, match="set both"):
        tls_context(half)
    wrong = load_config(
        env={}, overrides={"network.tls_cert": str(key), "network.tls_key": str(key)}
    )
    with pytest.raises(ApiError, match="cannot load the TLS certificate"):
        tls_context(wrong.config.network)
