"""Actions: the built-in workflow actions and the context every action runs with.

An action is `async def action(ctx: ActionContext, params: dict) -> output`; its output must
be JSON-able, and raising fails the attempt (the step's retry policy decides what next).
Actions do their I/O through the runtime they are given; they never touch SQL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from frys_edge.core import EventBus, topic_matches
from frys_edge.sandbox import PluginError
from frys_edge.storage import RunRecord, StepRecord
from frys_edge.workflow import WorkflowError

if TYPE_CHECKING:
    from frys_edge.engine import Engine

log = logging.getLogger("frys.workflow")

KV_NAMESPACE = "workflow"
HTTP_MAX_BYTES = 1024 * 1024


class ActionContext:
    """What an action knows about the step it runs for, and its durable suspension point."""

    def __init__(
        self, engine: Engine, run: RunRecord, step: str, attempt: int, resumed: StepRecord | None
    ) -> None:
        self.engine = engine
        self.rt = engine.rt
        self.run_id = run.id
        self.workflow = run.workflow
        self.step = step
        self.attempt = attempt
        self._resumed = resumed

    async def suspend(self, seconds: float | None, state: Any = None) -> tuple[float | None, Any]:
        """Record a durable wait: a deadline `seconds` from now (None: none) and `state`.

        Returns (deadline, state). After a restart the step runs again, and this returns what
        was recorded the first time, so a wait keeps its deadline and its starting point.
        """
        if self._resumed is not None:
            return self._resumed.wake_at, self._resumed.output
        deadline = None if seconds is None else time.time() + seconds
        await self.engine.storage.record_step(
            self.run_id, self.step, "suspended", self.attempt - 1, output=state, wake_at=deadline
        )
        self._resumed = StepRecord(
            self.step, "suspended", self.attempt - 1, state, None, None, None, deadline
        )
        return deadline, state


Action = Callable[[ActionContext, dict[str, Any]], Awaitable[Any]]


def _params(params: dict[str, Any], action: str, *required: str) -> None:
    missing = [name for name in required if name not in params]
    if missing:
        raise WorkflowError(f"action {action}: missing params {', '.join(missing)}")


async def _log(ctx: ActionContext, params: dict[str, Any]) -> Any:
    message = str(params.get("message", ""))
    level = getattr(logging, str(params.get("level", "info")).upper(), logging.INFO)
    log.log(level, "%s/%s: %s", ctx.workflow, ctx.step, message, extra={"run": ctx.run_id})
    return {"message": message}


async def _sleep(ctx: ActionContext, params: dict[str, Any]) -> Any:
    _params(params, "sleep", "seconds")
    seconds = float(params["seconds"])
    deadline, _ = await ctx.suspend(seconds)
    assert deadline is not None
    await anyio.sleep(max(0.0, deadline - time.time()))
    return {"slept": seconds}


async def _kv_get(ctx: ActionContext, params: dict[str, Any]) -> Any:
    _params(params, "kv.get", "key")
    entry = ctx.engine.storage.get(params.get("namespace", KV_NAMESPACE), str(params["key"]))
    return params.get("default") if entry is None else entry.value


async def _kv_put(ctx: ActionContext, params: dict[str, Any]) -> Any:
    _params(params, "kv.put", "key", "value")
    namespace = params.get("namespace", KV_NAMESPACE)
    version = await ctx.engine.storage.put(namespace, str(params["key"]), params["value"])
    return {"version": version}


async def _emit(ctx: ActionContext, params: dict[str, Any]) -> Any:
    """Publish on the bus; with `durable: true` append to the event log first."""
    _params(params, "emit", "topic")
    topic, payload = str(params["topic"]), params.get("payload")
    seq = None
    if params.get("durable"):
        seq = await ctx.engine.storage.append(topic, payload)
    delivered = await ctx.rt.publish(topic, payload)
    return {"delivered": delivered, "seq": seq}


async def _events_read(ctx: ActionContext, params: dict[str, Any]) -> Any:
    """Read the durable event log after a sequence number, for store-and-forward."""
    pattern = str(params.get("topic", "#"))
    after = int(params.get("after") or 0)
    limit = min(int(params.get("limit", 100)), 1000)
    events = ctx.engine.storage.events(after, limit=limit)
    matching = [
        {"seq": e.seq, "topic": e.topic, "payload": e.payload, "ts": e.ts}
        for e in events
        if topic_matches(pattern, e.topic)
    ]
    # last_seq covers non-matching events too, so a cursor moves past them.
    return {
        "events": matching,
        "count": len(matching),
        "last_seq": events[-1].seq if events else after,
    }


class EventWaits:
    """Runs waiting for events share one bus subscription per topic pattern.

    A publish then costs one match per distinct pattern, not one per waiting run.
    """

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self._patterns: dict[str, tuple[Any, dict[asyncio.Future[Any], dict[str, Any]]]] = {}

    def add(self, pattern: str, match: dict[str, Any]) -> asyncio.Future[Any]:
        """A future set with the first event on `pattern` whose payload has `match`'s fields."""
        entry = self._patterns.get(pattern)
        if entry is None:
            waiters: dict[asyncio.Future[Any], dict[str, Any]] = {}
            sub = self.bus.subscribe(
                pattern,
                handler=lambda message: self._deliver(waiters, message),
                name=f"wait_event {pattern}",
            )
            entry = self._patterns[pattern] = (sub, waiters)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        entry[1][future] = match
        return future

    def remove(self, pattern: str, future: asyncio.Future[Any]) -> None:
        """Forget a waiter; the pattern's subscription goes with its last waiter."""
        entry = self._patterns.get(pattern)
        if entry is None:
            return
        entry[1].pop(future, None)
        if not entry[1]:
            self.bus.unsubscribe(entry[0])
            del self._patterns[pattern]

    @staticmethod
    def _deliver(waiters: dict[asyncio.Future[Any], dict[str, Any]], message: Any) -> None:
        for future, match in waiters.items():
            if not future.done() and _matches(match, message.payload):
                future.set_result({"topic": message.topic, "payload": message.payload, "seq": None})


def _matches(match: dict[str, Any], payload: Any) -> bool:
    if not match:
        return True
    return isinstance(payload, dict) and all(payload.get(k) == v for k, v in match.items())


async def _wait_event(ctx: ActionContext, params: dict[str, Any]) -> Any:
    """Wait durably for an event on a topic pattern whose payload has the `match` fields.

    Events in the durable log since the wait began count too, so one emitted with
    `durable: true` while the device was down is still seen after the restart.
    """
    _params(params, "wait_event", "topic")
    pattern = str(params["topic"])
    match = params.get("match") or {}
    if not isinstance(match, dict):
        raise WorkflowError("action wait_event: match must be a mapping of payload fields")
    timeout = params.get("timeout")
    storage = ctx.engine.storage
    deadline, since = await ctx.suspend(
        None if timeout is None else float(timeout), storage.last_seq()
    )
    # Registered before reading the log, so nothing published in between is missed.
    waits = ctx.engine.event_waits
    found = waits.add(pattern, match)
    try:
        after = int(since or 0)
        while True:
            batch = storage.events(after, limit=1000)
            for event in batch:
                if topic_matches(pattern, event.topic) and _matches(match, event.payload):
                    return {"topic": event.topic, "payload": event.payload, "seq": event.seq}
            if len(batch) < 1000:
                break
            after = batch[-1].seq
        left = None if deadline is None else max(0.0, deadline - time.time())
        with anyio.fail_after(left):
            return await found
    finally:
        waits.remove(pattern, found)


def _http_call(
    url: str, method: str, headers: dict[str, str], body: bytes | None, timeout: float
) -> tuple[int, str, bytes]:
    # Imported on first use: urllib.request (http.client, email) is a fifth of the import
    # time of a start under Pyodide, where no socket exists for it anyway.
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(HTTP_MAX_BYTES + 1)
            return response.status, response.headers.get_content_type(), data
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get_content_type(), e.read(HTTP_MAX_BYTES + 1)


async def _http(ctx: ActionContext, params: dict[str, Any]) -> Any:
    """One HTTP request; a status outside 2xx fails the attempt so the step retries."""
    _params(params, "http", "url")
    url = str(params["url"])
    if not url.startswith(("http://", "https://")):
        raise WorkflowError(f"action http: url must start with http:// or https://, got {url!r}")
    headers = {str(k): str(v) for k, v in (params.get("headers") or {}).items()}
    body = None
    if "json" in params:
        body = json.dumps(params["json"]).encode()
        headers.setdefault("Content-Type", "application/json")
    elif "body" in params:
        body = str(params["body"]).encode()
    method = str(params.get("method", "POST" if body is not None else "GET")).upper()
    timeout = float(params.get("timeout", 10.0))
    try:
        status, content_type, data = await ctx.rt.blocking(
            _http_call, url, method, headers, body, timeout
        )
    except (OSError, ValueError) as e:
        raise ConnectionError(f"{method} {url}: {e}") from e
    if len(data) > HTTP_MAX_BYTES:
        raise WorkflowError(f"{method} {url}: response over {HTTP_MAX_BYTES} bytes")
    text = data.decode(errors="replace")
    if not 200 <= status < 300:
        raise ConnectionError(f"{method} {url}: HTTP {status}: {text[:200]}")
    output: Any = text
    if content_type == "application/json" and data:
        output = json.loads(data)
    return {"status": status, "body": output}


async def _workflow(ctx: ActionContext, params: dict[str, Any]) -> Any:
    """Start a child run and wait for it; a re-run of this step finds the same child."""
    _params(params, "workflow", "workflow")
    engine = ctx.engine
    child = await engine.start(
        str(params["workflow"]),
        params.get("inputs") or {},
        idempotency_key=f"{ctx.run_id}/{ctx.step}",
        parent_run=ctx.run_id,
    )
    run = await engine.wait(child)
    if run.status != "succeeded":
        raise WorkflowError(f"child run {child} of {run.workflow} {run.status}: {run.error}")
    return {"run": child, "outputs": run.outputs}


async def _plugin(ctx: ActionContext, params: dict[str, Any]) -> Any:
    """Call a WASM plugin's export (on a worker thread if any); `batch: true` sends a list."""
    _params(params, "plugin", "plugin", "export")
    name, export = str(params["plugin"]), str(params["export"])
    plugin = ctx.rt.wasm.get(name)
    if plugin is None:
        loaded = ", ".join(sorted(ctx.rt.wasm)) or "none"
        raise WorkflowError(f"action plugin: no WASM plugin {name!r} is loaded ({loaded})")
    value = params.get("input")
    batch = bool(params.get("batch"))
    if batch and not isinstance(value, list):
        raise WorkflowError("action plugin: batch: true needs a list as input")
    metrics = ctx.rt.metrics
    labels = {"plugin": name, "export": export}
    started = time.perf_counter()
    try:
        if isinstance(value, list) and batch:
            return await ctx.rt.blocking(plugin.call_batch, export, value)
        return await ctx.rt.blocking(plugin.call, export, value)
    except PluginError as e:
        metrics.counter(
            "plugin_errors_total", "Plugin calls failed", {**labels, "kind": e.kind}
        ).inc()
        raise
    finally:
        metrics.histogram("plugin_call_seconds", "Plugin call time", labels).observe(
            time.perf_counter() - started
        )


BUILTIN_ACTIONS: dict[str, Action] = {
    "log": _log,
    "sleep": _sleep,
    "kv.get": _kv_get,
    "kv.put": _kv_put,
    "emit": _emit,
    "events.read": _events_read,
    "wait_event": _wait_event,
    "http": _http,
    "workflow": _workflow,
    "plugin": _plugin,
}
