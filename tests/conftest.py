"""Shared fixtures: a temp data dir, and a way to run the `frys` CLI as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without FRYS_* variables, plus extra.

    HTTP ports are 0 (any free port), so a `frys run` under test never collides.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRYS_")}
    env.update(FRYS_NETWORK_PORT="0", FRYS_NETWORK_HEALTH_PORT="0")
    env.update(extra)
    return env


def frys(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `frys ARGS` in a subprocess and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "frys_edge.cli", *args],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def build_if_stale(
    request: pytest.FixtureRequest, target: str, output: Path, sources: list[Path]
) -> None:
    """Run `build.sh TARGET` when output is missing or older than any source; report time."""
    newest = max(p.stat().st_mtime for p in sources if p.is_file())
    if output.exists() and output.stat().st_mtime >= newest:
        return
    started = time.monotonic()
    build = subprocess.run(["bash", "build.sh", target], cwd=ROOT, capture_output=True, text=True)
    assert build.returncode == 0, f"build.sh {target} failed:\n{build.stdout}\n{build.stderr}"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        last = ((build.stdout + build.stderr).strip().splitlines() or [""])[-1]
        reporter.write_line(f"built {target} in {time.monotonic() - started:.0f} s: {last}")
