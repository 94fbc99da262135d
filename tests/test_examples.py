"""Every example runs as documented."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from conftest import ROOT, clean_env, frys

from frys_edge.storage import Storage

COLLECTOR_PORT = 8099  # the default in examples/gateway/workflows/forward.yaml


def test_gateway_reads_alerts_stores_and_forwards_batches(tmp_path: Path) -> None:
    batches: list[list[dict[str, Any]]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            batches.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", COLLECTOR_PORT), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    data_dir = tmp_path / "data"
    argv = [sys.executable, "-m", "frys_edge.cli", "run", "-c", "examples/gateway/frys.toml"]
    proc = subprocess.Popen(
        [*argv, "--data-dir", str(data_dir)], cwd=ROOT, env=clean_env(), stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while sum(len(b) for b in batches) < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        server.shutdown()
        server.server_close()
    forwarded = [event for batch in batches for event in batch]
    assert len(forwarded) >= 6, "the collector should have received readings"
    assert all(e["topic"] == "readings/boiler" for e in forwarded)
    seqs = [e["seq"] for e in forwarded]
    assert seqs == sorted(set(seqs)), "each reading forwarded once, in order"
    with Storage(data_dir, readonly=True) as store:
        latest = store.get("workflow", "latest/boiler")
        assert latest is not None and "celsius" in latest.value
        cursor = store.get("workflow", "forward/cursor")
        assert cursor is not None and cursor.value >= seqs[-1]
        alerts = [e.payload for e in store.events(limit=10_000) if e.topic == "alerts/boiler"]
        readings = [e for e in store.events(limit=10_000) if e.topic == "readings/boiler"]
        over = [e.payload["celsius"] for e in readings if e.payload["celsius"] > 30]
        # Every reading over the threshold alerts; outliers by the WASM plugin's z-score too.
        assert over and sorted(over) == sorted(a["celsius"] for a in alerts if a["celsius"] > 30)
        assert all(a["celsius"] > 30 or a["z"] > 2.5 for a in alerts)
        detects = [
            s
            for r in store.list_runs(workflow="read_sensor", limit=1000)
            for s in store.run_steps(r.id)
            if s.name == "detect"
        ]
        assert detects and all("scores" in s.output for s in detects if s.output)
        assert {r.status for r in store.list_runs(limit=1000)} <= {"succeeded", "running"}


def test_example_workflows_validate(tmp_path: Path) -> None:
    gateway = frys(
        "workflow",
        "validate",
        "-c",
        "examples/gateway/frys.toml",
        "examples/gateway/workflows/read.yaml",
        "examples/gateway/workflows/forward.yaml",
        cwd=ROOT,
    )
    assert gateway.returncode == 0, gateway.stderr
    diamond = frys("workflow", "validate", str(ROOT / "examples/workflows/diamond.yaml"))
    assert diamond.returncode == 0, diamond.stderr
