"""The wasm32 target: Frys Edge in Pyodide, under Node and in headless Chromium.

The session builds dist/wasm32 first (`bash build.sh wasm32`) when it is missing or older than
its sources. Under Node, the gateway's sensor workflow runs with the anomaly plugin on Node's
own WebAssembly and its state survives a SIGKILL of the Node process; in Chromium the demo
page runs it and lists its runs again after a reload (IndexedDB). Run these with
`pytest -m target`. The no-thread mode they rely on (`[system] threads = 0`) and the JS
backend's memory cap are also checked here on CPython, unmarked.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
import wasmtime
from conftest import ROOT, build_if_stale

from frys_edge.config import load_config
from frys_edge.runtime import Runtime
from frys_edge.sandbox import PluginError, cap_memory
from frys_edge.storage import CHECKPOINT_WRITES, Storage

BUNDLE = ROOT / "dist" / "wasm32"
SOURCES = [
    ROOT / "pyproject.toml",
    ROOT / "package-lock.json",
    *ROOT.glob("frys_edge/*"),
    *ROOT.glob("targets/wasm32/*"),
    *ROOT.glob("plugins/anomaly/*"),
    ROOT / "examples" / "gateway" / "sensors.py",
    ROOT / "examples" / "gateway" / "workflows" / "read.yaml",
]
NODE_DRIVER = ROOT / "tests" / "test_target_wasm32_node.mjs"
BROWSER_DRIVER = ROOT / "tests" / "test_target_wasm32_browser.mjs"
ANOMALY = ROOT / "plugins" / "anomaly" / "anomaly.wasm"
target = pytest.mark.target
needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="needs node")


@pytest.fixture(scope="session")
def bundle(request: pytest.FixtureRequest) -> Path:
    """dist/wasm32, built first when it is missing or older than a source."""
    build_if_stale(request, "wasm32", BUNDLE / "manifest.json", SOURCES)
    return BUNDLE


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# -- on Node ----------------------------------------------------------------------------------


@target
@needs_node
def test_gateway_workflow_runs_in_pyodide_and_its_state_survives_sigkill(
    bundle: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first = subprocess.Popen(
        ["node", str(NODE_DRIVER), str(bundle), str(data), "first"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert first.stdout is not None
    seen: list[dict[str, Any]] = []
    try:
        for line in first.stdout:
            seen.append(json.loads(line))
            if seen[-1]["event"] == "waiting":
                break
        # While it lives, a second process on the same data dir is refused.
        rival = subprocess.run(
            ["node", str(NODE_DRIVER), str(bundle), str(data), "ready"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        # Then it is killed, likely while the interval trigger's own runs are in flight.
    finally:
        first.kill()
        _, err = first.communicate(timeout=30)
    assert seen and seen[-1]["event"] == "waiting", f"first start failed:\n{err[-3000:]}"
    assert rival.returncode != 0
    assert f"is in use by process {first.pid}" in rival.stderr
    runs = [e for e in seen if e["event"] == "run"]
    assert len(runs) == 3
    for run in runs:
        assert run["status"] == "succeeded"
        assert set(run["steps"]) == {"read", "store", "log_reading", "detect", "alert"}
        # The anomaly plugin ran on Node's WebAssembly and scored the growing window.
        assert run["detect"]["mean"] == pytest.approx(run["outputs"]["celsius"], abs=20)
    # The sensor's window grows with every reading (the interval trigger may add some).
    windows = [len(r["detect"]["scores"]) for r in runs]
    assert windows == sorted(set(windows)) and windows[0] >= 1
    assert next(e for e in seen if e["event"] == "events")["seen"] >= 3
    assert (data / "frys.db").is_file()

    second = subprocess.run(
        ["node", str(NODE_DRIVER), str(bundle), str(data), "second"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    events = lines(second.stdout)
    state = next(e for e in events if e["event"] == "state")
    stored = {r["id"]: r["status"] for r in state["runs"]}
    for run in runs:
        assert stored[run["id"]] == "succeeded"
    # Runs the kill interrupted resumed and finished; none is left running.
    assert set(stored.values()) <= {"succeeded"}, stored
    assert state["latest"]["value"]["sensor"] == "boiler"
    assert state["latest"]["version"] >= 3
    assert state["readings"] >= 3
    again = next(e for e in events if e["event"] == "run")
    assert again["status"] == "succeeded" and again["detect"] is not None
    assert events[-1]["event"] == "stopped"


@target
@needs_node
def test_plugins_on_node_webassembly_keep_the_limits_that_hold_there(
    bundle: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        ["node", str(NODE_DRIVER), str(bundle), str(tmp_path / "data"), "limits"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r = lines(done.stdout)[-1]
    assert r["detect"]["ok"]["anomalies"] == [3]
    assert r["batch"]["ok"] == [r["detect"]["ok"]] * 2
    assert r["bad_input"]["kind"] == "fail" and "at byte" in r["bad_input"]["error"]
    # memory_pages is written into the module as its memory's maximum: growth past it fails.
    assert r["memory_cap"]["kind"] == "trap"
    assert r["after_memory_cap"] == r["detect"], "a fresh instance replaces the trapped one"
    assert r["output_cap"]["kind"] == "output" and "4194304 bytes" in r["output_cap"]["error"]
    assert r["output_claim"]["kind"] == "output"
    assert r["stack"]["kind"] == "stack"
    assert "which it was not granted" in r["ungranted"]["error"]
    assert r["tampered"]["kind"] == "integrity"
    assert r["live_instances"] <= 2, "discarded instances must be freed, not leaked"
    assert r["metered"] is False  # no fuel on the JavaScript engine
    assert (r["calls"], r["errors"]) == (5, 2)


# -- in Chromium ----------------------------------------------------------------------------


@pytest.fixture
def served(bundle: Path) -> Iterator[str]:
    """dist/wasm32 over real HTTP on 127.0.0.1."""
    handler = functools.partial(_QuietHandler, directory=str(bundle))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@target
@pytest.mark.browser
@needs_node
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium")
def test_demo_page_runs_the_workflow_and_keeps_its_runs_across_a_reload(served: str) -> None:
    result = subprocess.run(
        ["node", str(BROWSER_DRIVER), f"{served}/demo.html"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = lines(result.stdout)[-1]
    assert report["blocked"] == [], "the page asked for something outside the bundle"
    assert not [c for c in report["console"] if c.startswith("pageerror")], report["console"]
    before, after = report["before"], report["after"]
    assert before["rows"] and all(r["status"] == "succeeded" for r in before["rows"][1:])
    # The anomaly plugin's score is shown for runs that finished.
    assert any(r["z"] for r in before["rows"])
    assert set(before["stored"]) <= set(after["stored"]), "runs were lost across the reload"
    assert after["count"] >= before["count"] >= 3
    assert "°C" in report["latest"]


# -- the no-thread mode and the JS backend's memory cap, on CPython ----------------------------


def _frys_threads() -> set[str]:
    names = ("frys-checkpoint", "frys-writer", "AnyIO worker thread")
    return {t.name for t in threading.enumerate() if t.name.startswith(names)}


def test_storage_without_background_commits_and_checkpoints_inline(tmp_path: Path) -> None:
    async def main() -> tuple[int, int]:
        with Storage(tmp_path, sync="full", background=False) as store:
            commits: list[int] = []
            store.on_commit = lambda: commits.append(store.commits)
            versions = [await store.put("ns", "k", i) for i in range(CHECKPOINT_WRITES + 5)]
            assert versions == list(range(1, CHECKPOINT_WRITES + 6))
            assert commits == list(range(1, CHECKPOINT_WRITES + 6))
            assert _frys_threads() == set()
            return store.checkpoints, store.writes

    checkpoints, writes = anyio.run(main)
    assert checkpoints == 1 and writes == CHECKPOINT_WRITES + 5
    with Storage(tmp_path, readonly=True) as store:
        entry = store.get("ns", "k")
        assert entry is not None and entry.value == CHECKPOINT_WRITES + 4


def test_runtime_with_threads_0_runs_workflows_without_starting_a_thread(tmp_path: Path) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "w.yaml").write_text(
        "name: w\nsteps:\n"
        "  - {name: put, action: kv.put, params: {key: k, value: 1}}\n"
        "  - {name: log, action: emit, needs: [put],"
        " params: {topic: t/x, payload: {a: 1}, durable: true}}\n"
        "  - {name: nap, action: sleep, needs: [log], params: {seconds: 0.01}}\n"
    )
    config = tmp_path / "frys.toml"
    config.write_text(
        f'[system]\ndata_dir = "{tmp_path / "data"}"\nthreads = 0\n'
        f'[storage]\nsync = "full"\n[workflows]\ndir = "{workflows}"\n'
    )
    before = _frys_threads()

    async def main() -> str:
        async with Runtime(load_config(config, env={})) as rt:
            run_id = await rt.engine.start("w")
            record = await rt.engine.wait(run_id)
            assert _frys_threads() == before
            assert rt.storage is not None and not rt.storage.background
            return record.status

    assert anyio.run(main) == "succeeded"


def _memory_limits(data: bytes) -> tuple[int, int | None]:
    module = wasmtime.Module(wasmtime.Engine(), data)
    memory = next(e.type for e in module.exports if isinstance(e.type, wasmtime.MemoryType))
    return memory.limits.min, memory.limits.max


def test_cap_memory_writes_the_manifest_cap_as_the_memory_maximum() -> None:
    data = ANOMALY.read_bytes()
    initial, declared = _memory_limits(data)
    assert declared is None
    capped = cap_memory(data, 64)
    assert _memory_limits(capped) == (initial, 64)
    # A declared maximum below the cap is kept.
    assert _memory_limits(cap_memory(capped, 100)) == (initial, 64)
    three_pages = bytes(wasmtime.wat2wasm('(module (memory (export "memory") 3))'))
    with pytest.raises(PluginError, match="initial memory is 3 pages, over its limits"):
        cap_memory(three_pages, 2)


def test_cap_memory_refuses_every_truncated_or_malformed_module_clearly() -> None:
    data = bytes(wasmtime.wat2wasm('(module (memory (export "memory") 1 4))'))
    assert data[8] == 5  # the memory section comes first; what follows is the engine's to check
    for cut in range(9, 10 + data[9]):
        with pytest.raises(PluginError) as info:
            cap_memory(data[:cut], 8)
        assert info.value.kind in ("invalid", "abi"), cut
    with pytest.raises(PluginError, match="bad number"):
        cap_memory(b"\0asm\x01\0\0\0\x05\xff\xff\xff\xff\xff\xff", 8)
    with pytest.raises(PluginError, match="runs past the end"):
        cap_memory(b"\0asm\x01\0\0\0\x05\x03\x01\x00", 10)
    assert cap_memory(data, 2) != data  # the whole module still caps (maximum 4 -> 2)


def test_cap_memory_refuses_what_is_not_a_module_with_one_memory() -> None:
    with pytest.raises(PluginError, match="not a WebAssembly module"):
        cap_memory(b"hello", 4)
    no_memory = bytes(wasmtime.wat2wasm('(module (func (export "f")))'))
    with pytest.raises(PluginError, match="defines no memory"):
        cap_memory(no_memory, 4)
