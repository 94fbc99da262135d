"""frys_pyodide: the Python half of the wasm32 loader (frys.mjs); it runs inside Pyodide.

It starts one Runtime on Pyodide's event loop and answers the loader's JavaScript API with
JSON text (so no Python object has to outlive a call on the JavaScript side). It owns no
logic of its own: everything is the runtime's, run with `[system] threads = 0`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from frys_edge.config import load_config
from frys_edge.runtime import Runtime

_runtime: Runtime | None = None
_encode = msgspec.json.encode


def _rt() -> Runtime:
    if _runtime is None:
        raise RuntimeError("frys is not started: call start() first")
    return _runtime


async def start(config_path: str, data_dir: str, on_commit: Callable[[], None] | None) -> float:
    """Start the runtime on `config_path` with its data in `data_dir`; returns start ms."""
    global _runtime
    if _runtime is not None:
        raise RuntimeError("frys is already started in this Pyodide instance")
    t0 = time.perf_counter()
    overrides: dict[str, Any] = {"system.data_dir": data_dir}
    rt = Runtime(load_config(config_path, env={}, overrides=overrides))
    await rt.start()
    assert rt.storage is not None
    rt.storage.on_commit = on_commit
    _runtime = rt
    return (time.perf_counter() - t0) * 1000


async def run(workflow: str, inputs_json: str, idempotency_key: str | None) -> str:
    """Start a run, wait for its end, and return its record with its steps, as JSON."""
    rt = _rt()
    inputs = msgspec.json.decode(inputs_json) if inputs_json else {}
    run_id = await rt.engine.start(workflow, inputs, idempotency_key=idempotency_key)
    await rt.engine.wait(run_id)
    return get_run(run_id)


def get_run(run_id: str) -> str:
    """One run with its steps, as JSON (null when there is no such run)."""
    storage = _rt().storage
    assert storage is not None
    record = storage.get_run(run_id)
    if record is None:
        return "null"
    steps = storage.run_steps(run_id)
    return _encode({"run": record, "steps": steps}).decode()


def list_runs(workflow: str | None, status: str | None, limit: int) -> str:
    """Runs, newest first, as a JSON array."""
    storage = _rt().storage
    assert storage is not None
    return _encode(storage.list_runs(workflow=workflow, status=status, limit=limit)).decode()


def kv_get(namespace: str, key: str) -> str:
    """The KV entry as JSON, or null."""
    storage = _rt().storage
    assert storage is not None
    return _encode(storage.get(namespace, key)).decode()


def events(after: int, limit: int) -> str:
    """Durable events after a sequence number, as a JSON array."""
    storage = _rt().storage
    assert storage is not None
    return _encode(storage.events(after, limit=limit)).decode()


def health() -> str:
    """The health model as JSON."""
    return _encode(_rt().health.snapshot()).decode()


def subscribe(pattern: str, callback: Callable[[str, str], None]) -> Callable[[], None]:
    """Call callback(topic, payload JSON) for each bus message on pattern; returns unsubscribe."""
    rt = _rt()
    sub = rt.bus.subscribe(
        pattern,
        handler=lambda message: callback(message.topic, _encode(message.payload).decode()),
        name=f"js {pattern}",
    )
    return lambda: rt.bus.unsubscribe(sub)


async def stop() -> None:
    """Stop the runtime: runs in flight stay stored and resume at the next start."""
    global _runtime
    rt, _runtime = _runtime, None
    if rt is not None:
        await rt.stop()
