"""The README is the contract: its commands run as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from conftest import ROOT, clean_env, frys

README = (ROOT / "README.md").read_text()


def code_blocks(section: str) -> list[str]:
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", body, re.S)


def test_quick_start_has_two_commands_and_ci_runs_the_second() -> None:
    blocks = code_blocks("Quick start")
    assert len(blocks) == 2
    run_cmd, test_cmd = (b.strip() for b in blocks)
    assert run_cmd.endswith("frys run -c examples/gateway/frys.toml")
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


def test_using_it_commands_work(tmp_path: Path) -> None:
    env = clean_env(FRYS_SYSTEM_DATA_DIR=str(tmp_path / "data"))
    outputs = {}
    for line in code_blocks("Using it")[0].splitlines():
        argv = shlex.split(line.split("#", 1)[0].replace("/mnt/usb", str(tmp_path)))
        assert argv[0] == "frys", line
        if argv[1] in ("run", "bench"):  # long-running; covered by their own tests
            continue
        result = frys(*argv[1:], cwd=ROOT, env=env)
        assert result.returncode == 0, f"{line}\n{result.stderr}"
        outputs[" ".join(argv[1:3])] = result.stdout
    assert outputs["kv get"].strip() == '"hello"'
    assert (tmp_path / "frys.db").exists()
