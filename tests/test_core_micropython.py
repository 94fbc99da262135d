"""frys_edge/core.py passes every behaviour check on MicroPython, not only on CPython."""

import shutil
import subprocess
from pathlib import Path

import core_checks
import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "node_modules" / "@micropython" / "micropython-webassembly-pyscript"
CHECKS = {name for name in dir(core_checks) if name.startswith("check_")}


def run_checks_on_micropython() -> subprocess.CompletedProcess[str]:
    if not RUNTIME.is_dir():
        pytest.fail(
            f"MicroPython runtime not installed ({RUNTIME} is missing); run `npm ci` in {ROOT}"
        )
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH; install Node.js 18 or newer, then run `npm ci`")
    return subprocess.run(
        [node, str(ROOT / "tests" / "micropython_runner.mjs")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_core_check_passes_on_micropython() -> None:
    proc = run_checks_on_micropython()
    report = proc.stdout + proc.stderr
    passed = {line[3:] for line in proc.stdout.splitlines() if line.startswith("ok ")}
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAIL ")]
    assert not failed, report
    assert proc.returncode == 0, report
    assert passed == CHECKS, (
        f"MicroPython ran a different set of checks; missing: {sorted(CHECKS - passed)}, "
        f"unexpected: {sorted(passed - CHECKS)}"
    )
