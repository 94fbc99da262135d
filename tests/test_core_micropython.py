"""frys_edge/core.py passes every behaviour check on MicroPython, and the MicroPython example
runs there with the same results as on CPython."""

import shutil
import subprocess
import sys
from pathlib import Path

import core_checks
import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "node_modules" / "@micropython" / "micropython-webassembly-pyscript"
CHECKS = {name for name in dir(core_checks) if name.startswith("check_")}
SENSOR_LOOP = ROOT / "examples" / "micropython" / "sensor_loop.py"


def run_on_micropython(*args: str) -> subprocess.CompletedProcess[str]:
    if not RUNTIME.is_dir():
        pytest.fail(
            f"MicroPython runtime not installed ({RUNTIME} is missing); run `npm ci` in {ROOT}"
        )
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH; install Node.js 18 or newer, then run `npm ci`")
    return subprocess.run(
        [node, str(ROOT / "tests" / "micropython_runner.mjs"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_core_check_passes_on_micropython() -> None:
    proc = run_on_micropython()
    report = proc.stdout + proc.stderr
    passed = {line[3:] for line in proc.stdout.splitlines() if line.startswith("ok ")}
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAIL ")]
    assert not failed, report
    assert proc.returncode == 0, report
    assert passed == CHECKS, (
        f"MicroPython ran a different set of checks; missing: {sorted(CHECKS - passed)}, "
        f"unexpected: {sorted(passed - CHECKS)}"
    )


def test_sensor_loop_example_runs_on_micropython_as_on_cpython() -> None:
    micro = run_on_micropython(str(SENSOR_LOOP))
    assert micro.returncode == 0, micro.stdout + micro.stderr
    cpython = subprocess.run(
        [sys.executable, str(SENSOR_LOOP)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # Task interleaving follows real sleeps, so only the order of lines may differ.
    assert sorted(micro.stdout.splitlines()) == sorted(cpython.stdout.splitlines())
    lines = micro.stdout.splitlines()
    assert "anomaly sensor=b sample=11 value=31.5" in lines
    assert sum(line.startswith("anomaly") for line in lines) == 1
    summary = dict(line.split(" ", 1) for line in lines if not line.startswith(("anomaly", "sent")))
    assert summary == {
        "samples": "32",
        "alerts": "1",
        "calibrations": "2",
        "batches_sent": "4",
        "uplink_attempts": "7",
        "breaker_opened": "2",
        "frames_created": "1",
        "tasks_failed": "0",
    }
    assert "sent batch of 8 after 4 attempt(s)" in lines


def test_micropython_runner_fails_when_the_example_raises(tmp_path: Path) -> None:
    broken = tmp_path / "broken_loop.py"
    broken.write_text("import core\n\ndef run():\n    core.Pool(list, max_size=0)\n")
    proc = run_on_micropython(str(broken))
    assert proc.returncode != 0
    assert "max_size must be at least 1" in proc.stdout + proc.stderr
