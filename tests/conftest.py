"""Shared fixtures: a temp data dir, and a way to run the `frys` CLI as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
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
