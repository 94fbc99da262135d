"""Schema-driven fuzzing of the HTTP API: whatever a client sends, the answer is never a 5xx.

Requests are built from /openapi.json itself: every route, its path parameters, its query
parameters, and bodies made of the request type's own fields with values that mostly fit
their schema, any JSON at all, or random bytes.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frys_edge.api import ApiServer
from frys_edge.config import load_config
from frys_edge.runtime import Runtime

SEGMENT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


def typed(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that mostly fit a (simple) JSON schema, and sometimes any JSON instead."""
    options = schema.get("anyOf") or [schema]
    strategies: list[st.SearchStrategy[Any]] = []
    for option in options:
        kind = option.get("type")
        if kind == "string":
            strategies.append(st.text(max_size=12))
        elif kind == "integer":
            strategies.append(
                st.integers(option.get("minimum", -(2**64)), option.get("maximum", 2**64))
            )
        elif kind == "number":
            strategies.append(st.floats(allow_nan=False, allow_infinity=False))
        elif kind == "boolean":
            strategies.append(st.booleans())
        elif kind == "null":
            strategies.append(st.none())
        elif kind == "array":
            strategies.append(st.lists(typed(option.get("items", {})), max_size=4))
        elif kind == "object":
            strategies.append(st.dictionaries(st.text(max_size=6), JSON, max_size=3))
    return st.one_of(*strategies, JSON) if strategies else JSON


def send(port: int, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_no_request_built_from_the_openapi_schema_gets_a_5xx(tmp_path: Path) -> None:
    overrides = {
        "system.data_dir": str(tmp_path / "data"),
        "workflows.dir": str(tmp_path / "none"),
        "network.port": 0,
        "network.health_port": 0,
        "memory.limit": "4GB",
    }
    rt = Runtime(load_config(env={}, overrides=overrides))
    with anyio.from_thread.start_blocking_portal() as portal:
        portal.call(rt.start)
        server = ApiServer(rt)
        ports = portal.call(server.bind)
        portal.start_task_soon(server.serve)
        try:
            status, raw = send(ports["api"], "GET", "/openapi.json", None)
            assert status == 200
            fuzz(ports["api"], json.loads(raw))
        finally:
            portal.call(server.stop)
            portal.call(rt.stop)


def fuzz(port: int, spec: dict[str, Any]) -> None:
    components = spec["components"]
    operations = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            if path.endswith("/stream"):
                continue  # an endless response: covered by its own test
            schema = body.get("schema")
            fields: dict[str, Any] | None = None
            if schema is not None:
                name = schema.get("$ref", "").rsplit("/", 1)[-1]
                fields = components["schemas"].get(name, {}).get("properties", {})
            queries = [p["name"] for p in op["parameters"] if p["in"] == "query"]
            operations.append((method.upper(), path, fields, queries))

    @st.composite
    def requests(draw: st.DrawFn) -> tuple[str, str, bytes | None]:
        method, template, fields, queries = draw(st.sampled_from(operations))
        path = template
        for name in [part[1:-1] for part in template.split("/") if part.startswith("{")]:
            segment = draw(SEGMENT.filter(bool))
            path = path.replace("{" + name + "}", urllib.parse.quote(segment, safe=""))
        query = {
            name: str(draw(st.integers(-(2**70), 2**70) | st.text(max_size=8)))
            for name in queries
            if draw(st.booleans())
        }
        if query:
            path += "?" + urllib.parse.urlencode(query)
        body: bytes | None = None
        if fields is not None:
            kind = draw(st.sampled_from(["fields", "json", "garbage"]))
            if kind == "fields":  # the body's own fields, with values that mostly fit
                names = sorted(fields or {})
                chosen = draw(st.lists(st.sampled_from(names), unique=True)) if names else []
                assert fields is not None
                body = json.dumps({f: draw(typed(fields[f])) for f in chosen}).encode()
            elif kind == "json":
                body = json.dumps(draw(JSON)).encode()
            else:
                body = draw(st.binary(max_size=40))
        return method, path, body

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(requests())
    def no_5xx(request: tuple[str, str, bytes | None]) -> None:
        method, path, body = request
        status, raw = send(port, method, path, body)
        assert status < 500, (method, path, body, status, raw[:300])
        if status >= 400:
            error = json.loads(raw)["error"]
            assert set(error) == {"code", "message", "path"}

    no_5xx()
