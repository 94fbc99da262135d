"""The dashboard (GET / on the API port) in headless Chromium, driven by playwright-core.

A real runtime and server on 127.0.0.1 with a token; tests/dashboard.mjs loads the page,
enters the token, and reports what it saw and every request it made.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import types
from pathlib import Path
from urllib.parse import urlsplit

import anyio.from_thread
import pytest
from test_api import GREET, request, runtime

from frys_edge.api import ApiServer
from frys_edge.workflow import parse_workflow

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "dash-token"


def node_and_chromium() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH; install Node.js 18 or newer, then run `npm ci`")
    if not (ROOT / "node_modules" / "playwright-core").is_dir():
        pytest.fail(f"playwright-core is not installed; run `npm ci` in {ROOT}")
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing; install it with `apt-get install -y chromium`")
    return node


def test_dashboard_without_chromium_is_one_page_with_a_strict_policy(tmp_path: Path) -> None:
    with anyio.from_thread.start_blocking_portal() as portal:
        rt = runtime(tmp_path, **{"network.token": TOKEN})
        portal.call(rt.start)
        server = ApiServer(rt)
        port = portal.call(server.bind)["api"]
        portal.start_task_soon(server.serve)
        try:
            page = request(port, "GET", "/")  # no token: the page itself asks for it
            assert page.status == 200
            assert page.headers["content-type"] == "text/html; charset=utf-8"
            policy = page.headers["content-security-policy"]
            assert "default-src 'none'" in policy and "connect-src 'self'" in policy
            text = page.body.decode()
            assert "<script" in text and "<style" in text
            assert "src=" not in text and "href=" not in text  # nothing loaded from anywhere
            assert request(port, "GET", "/status").status == 401
            headers = {"Authorization": f"Bearer {TOKEN}"}
            status = request(port, "GET", "/status", headers=headers)
            assert status.status == 200 and status.json["health"]["status"] == "ok"
            assert request(port, "GET", "/plugins", headers=headers).json == {"plugins": []}
            portal.call(rt.load_plugin, types.SimpleNamespace(), "probe")
            portal.call(lambda: anyio.to_thread.run_sync(rt.load_wasm, ROOT / "plugins" / "hello"))
            broken = tmp_path / "plugins" / "broken"
            broken.mkdir(parents=True)
            (broken / "frys-plugin.toml").write_text('name = "broken"\n')
            portal.call(lambda: anyio.to_thread.run_sync(rt._try_load_wasm, broken))
            plugins = request(port, "GET", "/plugins", headers=headers).json["plugins"]
            assert [(p["name"], p["kind"]) for p in plugins] == [
                ("broken", "wasm"),
                ("hello", "wasm"),
                ("probe", "native"),
            ]
            assert plugins[0]["error"] and plugins[1]["calls"] == 0 and plugins[1]["exports"]
        finally:
            portal.call(server.stop)
            portal.call(rt.stop)


@pytest.mark.browser
def test_dashboard_in_chromium_shows_runs_and_live_events_with_no_outside_request(
    tmp_path: Path,
) -> None:
    node = node_and_chromium()
    with anyio.from_thread.start_blocking_portal() as portal:
        rt = runtime(tmp_path, **{"network.token": TOKEN})
        portal.call(rt.start)
        workflow = parse_workflow(GREET, rt.engine.actions)
        rt.engine.workflows[workflow.spec.name] = workflow
        server = ApiServer(rt)
        port = portal.call(server.bind)["api"]
        portal.start_task_soon(server.serve)
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            started = request(
                port,
                "POST",
                "/runs",
                {"workflow": "greet", "inputs": {"reading": 3}},
                headers=headers,
            )
            assert started.status == 201
            run_id = started.json["id"]
            proc = subprocess.run(
                [
                    node,
                    str(ROOT / "tests" / "dashboard.mjs"),
                    f"http://127.0.0.1:{port}/",
                    TOKEN,
                    run_id,
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
            report = json.loads(proc.stdout.strip().splitlines()[-1])
            assert report["blocked"] == [], report
            for url in report["requests"] + report["websockets"]:
                assert urlsplit(url).hostname == "127.0.0.1", url
            assert any(urlsplit(u).path == "/ws" for u in report["websockets"]), report
            assert report["runSteps"] == ["store", "say"] and report["runBars"] == 2
            assert report["overall"] == "ok"
            assert report["publishStatus"] == 200 and "dashboard/test" in report["liveEvent"]
            shown = request(port, "GET", f"/runs/{report['startedRun']}", headers=headers)
            assert shown.status == 200 and shown.json["inputs"] == {"reading": 7}
            # Before the token is entered the first requests are refused; nothing else failed.
            errors = [
                line
                for line in report["console"]
                if line.startswith(("error", "pageerror")) and "status of 401" not in line
            ]
            assert errors == [], errors
            assert report["loadMs"] < 5000
        finally:
            portal.call(server.stop)
            portal.call(rt.stop)
