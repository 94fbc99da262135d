"""The static binary dist/frys runs alone in an empty chroot, as in a `FROM scratch` image.

Each test copies dist/frys into an empty directory that holds what the image holds (`/tmp`,
and `/data` owned by the image's user) and runs it there with `chroot` as that user, with
`/proc` mounted as every container runtime mounts it. Needs root and Linux; the session
builds dist/frys first (`bash build.sh binary`) when it is missing or older than its sources.
Run only these: `pytest -m target`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, build_if_stale

from frys_edge import __version__
from frys_edge.storage import Storage

pytestmark = [
    pytest.mark.target,
    pytest.mark.skipif(
        sys.platform != "linux" or os.geteuid() != 0, reason="chroot needs Linux and root"
    ),
]

BINARY = ROOT / "dist" / "frys"
SOURCES = [  # what the build reads: a newer one means dist/frys is stale
    ROOT / "pyproject.toml",
    *ROOT.glob("frys_edge/*"),
    *ROOT.glob("targets/linux-musl/*.py"),
    ROOT / "targets" / "linux-musl" / "build.sh",
    ROOT / "targets" / "linux-musl" / "requirements.txt",
]
USER = "65532:65532"  # the Dockerfile's user
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"  # the binary's env has no PATH
COLLECTOR_URL = "http://127.0.0.1:8099/ingest"  # the default in the gateway's forward.yaml


@pytest.fixture(scope="session")
def binary(request: pytest.FixtureRequest) -> Path:
    """dist/frys, built first when it is missing or older than a source."""
    build_if_stale(request, "binary", BINARY, SOURCES)
    return BINARY


@pytest.fixture
def root(binary: Path, tmp_path: Path) -> Iterator[Path]:
    """An empty root with the binary alone, /tmp, /data for the user, and /proc mounted."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy2(binary, root / "frys")
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)
    (root / "data").mkdir()
    os.chown(root / "data", 65532, 65532)
    (root / "proc").mkdir()
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=True)


def in_chroot(root: Path, *args: str) -> list[str]:
    """The argv running /frys ARGS inside root as the image's user."""
    return [CHROOT, f"--userspec={USER}", str(root), "/frys", *args]


def image_env(**extra: str) -> dict[str, str]:
    """A container's bare environment: no PATH, no HOME, only what the test sets."""
    return {"FRYS_NETWORK_PORT": "0", "FRYS_NETWORK_HEALTH_PORT": "0", **extra}


def start(root: Path, log: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen(
            in_chroot(root, "run", *args), env=image_env(**env), stderr=err, cwd=root
        )


def wait_for_ports(proc: subprocess.Popen[bytes], log: Path, after: int = 0) -> dict[str, int]:
    """The API and health ports from the `frys ... running` line (after `after` such lines)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [line for line in log.read_text().splitlines() if " running, data dir " in line]
        if len(lines) > after:
            line = lines[after]
            return {
                "api": int(line.split("API http://127.0.0.1:")[1].split(",")[0]),
                "health": int(line.split("health http://127.0.0.1:")[1].split(";")[0]),
            }
        assert proc.poll() is None, f"frys exited with {proc.returncode}:\n{log.read_text()}"
        time.sleep(0.05)
    raise AssertionError(f"frys did not start in 30 s:\n{log.read_text()}")


def get_json(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def frys_pids() -> set[int]:
    """Processes whose executable was unpacked by the binary (any of its three stages)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                exe = os.readlink(entry / "exe")
            except OSError:
                continue
            if exe.endswith("/frys") and "/staticx-" in exe:
                pids.add(int(entry.name))
    return pids


def test_binary_is_one_static_executable_under_30_mb(binary: Path) -> None:
    described = subprocess.run(["file", str(binary)], capture_output=True, text=True).stdout
    assert "ELF" in described and "statically linked" in described, described
    assert "dynamically linked" not in described
    assert binary.stat().st_size <= 30 * 2**20


def test_version_runs_in_an_empty_chroot(root: Path) -> None:
    out = subprocess.run(in_chroot(root, "--version"), env={}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"frys {__version__}"
    assert list((root / "tmp").iterdir()) == [], "what the binary unpacked is removed on exit"


def test_benchmarks_that_need_python_refuse_with_the_fix(root: Path) -> None:
    out = subprocess.run(
        in_chroot(root, "bench", "--quick"), env={}, capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "run it from the wheel" in out.stderr
    assert "Traceback" not in out.stderr


def test_without_a_writable_tmp_it_names_tmpdir_and_tmpdir_fixes_it(root: Path) -> None:
    (root / "tmp").rmdir()
    failed = subprocess.run(in_chroot(root, "--version"), env={}, capture_output=True, text=True)
    assert failed.returncode != 0
    assert "/tmp" in failed.stderr
    ok = subprocess.run(
        in_chroot(root, "--version"), env={"TMPDIR": "/data"}, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"frys {__version__}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_run_serves_health_over_http_and_stops_on_sigterm(root: Path, tmp_path: Path) -> None:
    log = tmp_path / "frys.log"
    env = {"FRYS_NETWORK_HEALTH_PORT": str(free_port())}
    proc = start(root, log, "--data-dir", "/data", **env)
    try:
        ports = wait_for_ports(proc, log)
        assert ports["health"] == int(env["FRYS_NETWORK_HEALTH_PORT"])
        status, health = get_json(ports["health"], "/health")
        assert status == 200
        assert health["components"]["storage"]["status"] == "ok"
        status, ready = get_json(ports["health"], "/health/ready")
        assert status == 200, ready
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['health']}/metrics") as r:
            assert b"frys_" in r.read()
        # The Dockerfile's HEALTHCHECK: the binary probing itself from inside the root.
        probe = subprocess.run(
            in_chroot(root, "health", "--ready"), env=env, capture_output=True, text=True
        )
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.strip().endswith("/health/ready: ready")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
    finally:
        proc.kill()
        proc.wait()
    assert (root / "data" / "frys.db").stat().st_uid == 65532
    assert list((root / "tmp").iterdir()) == []
    gone = subprocess.run(in_chroot(root, "health"), env=env, capture_output=True, text=True)
    assert gone.returncode == 1


class Collector:
    """The gateway's collector on the host: records every batch POSTed to it."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        batches = self.batches

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                batches.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ingest"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def seqs(self) -> set[int]:
        return {event["seq"] for batch in self.batches for event in batch}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def runs_by_status(port: int, workflow: str) -> dict[str, int]:
    status, body = get_json(port, f"/runs?workflow={workflow}&limit=1000")
    assert status == 200, body
    counts: dict[str, int] = {}
    for run in body["runs"]:
        counts[run["status"]] = counts.get(run["status"], 0) + 1
    return counts


def wait_until(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_gateway_with_wasm_plugin_survives_sigkill_and_restart(root: Path, tmp_path: Path) -> None:
    # Only the files the gateway needs, at the paths its frys.toml names (relative to /).
    gateway = root / "examples" / "gateway"
    gateway.mkdir(parents=True)
    for name in ("frys.toml", "sensors.py"):
        shutil.copy2(ROOT / "examples" / "gateway" / name, gateway / name)
    shutil.copytree(ROOT / "examples" / "gateway" / "workflows", gateway / "workflows")
    shutil.copytree(ROOT / "plugins" / "anomaly", root / "plugins" / "anomaly")
    data = root / "data"
    args = ("-c", "examples/gateway/frys.toml", "--data-dir", "/data")
    log = tmp_path / "frys.log"
    collector = Collector()
    # The one change to the copied files: the collector's port, any free one, so that other
    # test runs on this machine (test_examples uses 8099) cannot collide with this one.
    forward = gateway / "workflows" / "forward.yaml"
    assert forward.read_text().count(COLLECTOR_URL) == 1
    forward.write_text(forward.read_text().replace(COLLECTOR_URL, collector.url))
    try:
        first = start(root, log, *args)
        try:
            ports = wait_for_ports(first, log)
            # Runs of both workflows succeed: the native sensor plugin, the WASM detector and
            # the HTTP forward all work inside the chroot.
            wait_until(
                lambda: runs_by_status(ports["api"], "read_sensor").get("succeeded", 0) >= 4,
                "four sensor runs",
            )
            wait_until(lambda: collector.seqs(), "a batch at the collector")
            time.sleep(0.45)  # off the second boundary, so a run is likely in flight
            assert first.poll() is None
            os.kill(first.pid, signal.SIGKILL)  # the pid a supervisor or docker sees
            first.wait(timeout=5)
        finally:
            first.kill()
            first.wait()
        # SIGKILL takes the whole binary down, not only its first process.
        wait_until(lambda: not frys_pids(), "every process of the binary to exit", timeout=10)

        with Storage(data, readonly=True) as store:
            before_runs = {r.id: r.status for r in store.list_runs(limit=10_000)}
            before_events = [e.seq for e in store.events(limit=100_000)]
            latest_before = store.get("workflow", "latest/boiler")
        assert before_runs and before_events and latest_before is not None

        second = start(root, log, *args)
        try:
            ports = wait_for_ports(second, log, after=1)
            wait_until(
                lambda: (
                    runs_by_status(ports["api"], "read_sensor").get("succeeded", 0)
                    >= sum(1 for s in before_runs.values() if s == "succeeded") + 3
                ),
                "three more sensor runs after the restart",
            )
            _, health = get_json(ports["health"], "/health")
            assert health["components"]["plugin:anomaly"]["status"] == "ok", health
            time.sleep(3.5)  # one more forward
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=15) == 0, log.read_text()
        finally:
            second.kill()
            second.wait()
    finally:
        collector.close()

    with Storage(data, readonly=True) as store:
        assert store.check() == ["ok"]
        runs = {r.id: r for r in store.list_runs(limit=10_000)}
        events = store.events(limit=100_000)
        # Nothing persisted before the kill was lost, and every run left unfinished by it
        # was resumed and finished after the restart.
        assert set(before_runs) <= set(runs)
        assert set(before_events) <= {e.seq for e in events}
        assert {run_id for run_id, status in before_runs.items() if status == "running"} <= {
            run_id for run_id, run in runs.items() if run.status == "succeeded"
        }
        sensor_runs = [r for r in runs.values() if r.workflow == "read_sensor"]
        assert {r.status for r in sensor_runs} == {"succeeded"}
        # The WASM anomaly detector scored readings before and after the restart.
        detects = [s for r in sensor_runs for s in store.run_steps(r.id) if s.name == "detect"]
        assert len(detects) == len(sensor_runs)
        assert all("scores" in s.output for s in detects)
        readings = [e for e in events if e.topic == "readings/boiler"]
        assert len(readings) >= len(sensor_runs)
        cursor = store.get("workflow", "forward/cursor")
        assert cursor is not None and cursor.value > max(before_events)
    # Every reading up to the cursor reached the collector (a batch in flight at the kill
    # may arrive twice, never not at all).
    assert {e.seq for e in readings if e.seq <= cursor.value} <= collector.seqs()
