"""The `frys` command line, run as a real process: exit codes, messages, round trips."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, clean_env, frys

import frys_edge


def write_config(tmp_path: Path, body: str = "") -> Path:
    path = tmp_path / "frys.toml"
    path.write_text(f'[system]\ndata_dir = "{tmp_path / "data"}"\n{body}')
    return path


def test_version_prints_the_package_version() -> None:
    result = frys("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"frys {frys_edge.__version__}"


def test_usage_error_exits_2_with_help() -> None:
    result = frys("kv", "frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_every_command_has_help_with_an_example() -> None:
    for args in (
        ["run"],
        ["config", "check"],
        ["config", "show"],
        ["kv", "put"],
        ["kv", "get"],
        ["kv", "list"],
        ["kv", "delete"],
        ["db", "check"],
        ["db", "backup"],
        ["workflow", "validate"],
        ["workflow", "list"],
        ["workflow", "run"],
        ["workflow", "runs"],
        ["workflow", "show"],
        ["workflow", "cancel"],
        ["plugin", "check"],
        ["plugin", "call"],
        ["plugin", "list"],
        ["plugin", "keygen"],
        ["plugin", "sign"],
        ["bench"],
        ["health"],
    ):
        result = frys(*args, "--help")
        assert result.returncode == 0, args
        assert "example:" in result.stdout, args


def test_config_check_accepts_the_shipped_example() -> None:
    result = frys("config", "check", str(ROOT / "examples" / "frys.toml"))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_config_check_wrong_type_exits_2_and_names_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'threads = "four"\n')
    result = frys("config", "check", str(path))
    assert result.returncode == 2
    assert "system.threads" in result.stderr
    assert "int" in result.stderr
    assert "frys.toml:3" in result.stderr


def test_config_check_syntax_error_exits_2_and_gives_the_line(tmp_path: Path) -> None:
    path = tmp_path / "frys.toml"
    path.write_text('[system]\nlog_level = "info"\nthreads = = 4\n')
    result = frys("config", "check", str(path))
    assert result.returncode == 2
    assert "frys.toml:3: TOML syntax error" in result.stderr


def test_config_check_reports_every_problem_at_once(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, 'log_level = "loud"\nthreds = 2\n[network]\nport = 99999\n[bogus]\nx = 1\n'
    )
    result = frys("config", "check", str(path))
    assert result.returncode == 2
    for needle in ("system.log_level", "threds", "threads", "network.port", "bogus"):
        assert needle in result.stderr, needle


def test_config_check_missing_file_exits_2(tmp_path: Path) -> None:
    result = frys("config", "check", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "nope.toml" in result.stderr


def test_config_check_includes_bad_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = frys("config", "check", str(path), env=clean_env(FRYS_MEMORY_LIMIT="lots"))
    assert result.returncode == 2
    assert "FRYS_MEMORY_LIMIT" in result.stderr and "memory.limit" in result.stderr


def test_config_show_names_the_source_of_each_value(tmp_path: Path) -> None:
    path = write_config(tmp_path, "threads = 2\n")
    env = clean_env(FRYS_NETWORK_PORT="9000", FRYS_MEMORY_LIMIT="64MB")
    result = frys("config", "show", "-c", str(path), "--json", env=env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["system.threads"]["source"].startswith("file:")
    assert shown["network.port"]["source"] == "env:FRYS_NETWORK_PORT"
    assert shown["network.host"]["source"] == "default"
    text = frys("config", "show", "-c", str(path), env=env).stdout
    assert "[network]" in text and "port = 9000" in text


def test_kv_round_trip_through_the_data_dir(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    put = frys("kv", "put", "-c", str(path), "greeting", '{"text": "hello"}')
    assert put.returncode == 0, put.stderr
    get = frys("kv", "get", "-c", str(path), "greeting")
    assert get.returncode == 0, get.stderr
    assert json.loads(get.stdout) == {"text": "hello"}
    assert frys("kv", "put", "-c", str(path), "plain", "not json").returncode == 0
    listed = frys("kv", "list", "-c", str(path)).stdout.splitlines()
    assert listed == ['greeting\t{"text": "hello"}', 'plain\t"not json"']
    assert frys("kv", "delete", "-c", str(path), "plain").returncode == 0
    missing = frys("kv", "get", "-c", str(path), "plain")
    assert missing.returncode == 1 and "no key 'plain'" in missing.stderr


def test_kv_honours_frys_system_data_dir(tmp_path: Path) -> None:
    env = clean_env(FRYS_SYSTEM_DATA_DIR=str(tmp_path / "envdata"))
    assert frys("kv", "put", "n", "42", env=env).returncode == 0
    assert (tmp_path / "envdata" / "frys.db").exists()
    assert frys("kv", "get", "n", env=env).stdout.strip() == "42"


def test_kv_get_on_a_fresh_dir_explains(tmp_path: Path) -> None:
    result = frys("kv", "get", "--data-dir", str(tmp_path / "none"), "k")
    assert result.returncode == 1
    assert "no database here yet" in result.stderr


def test_db_check_and_backup(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    frys("kv", "put", "-c", str(path), "k", "1")
    check = frys("db", "check", "-c", str(path))
    assert check.returncode == 0 and "ok" in check.stdout
    backup = frys("db", "backup", "-c", str(path), str(tmp_path / "snap.db"))
    assert backup.returncode == 0, backup.stderr
    assert (tmp_path / "snap.db").stat().st_size > 0


def test_run_serves_until_sigterm_and_refuses_a_second_writer(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "frys_edge.cli", "run", "-c", str(path)],
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while "running" not in line:
            assert line, "frys run exited before it was ready"
            line = proc.stderr.readline()
        second = frys("kv", "put", "-c", str(path), "k", "1")
        assert second.returncode == 1
        assert "another frys process" in second.stderr
        # Reads do not need the lock.
        assert frys("kv", "list", "-c", str(path)).returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()


def test_run_loads_native_plugins_and_refuses_unknown_ones(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[plugins]\nnative = ["no_such_plugin_module"]\n')
    result = frys("run", "-c", str(path), timeout=30)
    assert result.returncode == 1
    assert "plugin 'no_such_plugin_module'" in result.stderr
    assert "install it or fix the name" in result.stderr


def test_run_logs_json_lines_when_asked(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "frys_edge.cli", "run", "-c", str(path), "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while "runtime started" not in line:
            assert line, "frys run exited before logging"
            line = proc.stderr.readline()
        record = json.loads(line)
        assert record["level"] == "info" and record["logger"] == "frys"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b'[system]\nlog_level = "loud"\n', ["system.log_level", '"debug"', '"error"']),
        (b"system = 3\n", ["system", "table"]),
        (b'[system]\ndata_dir = "\xff\xfe"\n', ["UTF-8"]),
        (b'[memory]\nlimit = "64 parsecs"\n', ["memory.limit", "size"]),
        (b'[memory]\nlimit = "1MB"\n', ["memory.limit", ">= 4 MiB"]),
    ],
)
def test_config_check_names_each_kind_of_problem(
    tmp_path: Path, content: bytes, needles: list[str]
) -> None:
    path = tmp_path / "frys.toml"
    path.write_bytes(content)
    result = frys("config", "check", str(path))
    assert result.returncode == 2
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_workflow_validate_reports_a_cycle_and_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: loop\n"
        "steps:\n"
        "  - name: a\n    action: log\n    needs: [b]\n"
        "  - name: b\n    action: vector_searc\n    needs: [a]\n"
    )
    result = frys("workflow", "validate", str(bad), str(ROOT / "examples/workflows/diamond.yaml"))
    assert result.returncode == 2
    assert "cycle" in result.stderr and "a -> b" in result.stderr.replace("b -> a", "a -> b")
    assert "unknown action 'vector_searc'" in result.stderr and "bad.yaml:7" in result.stderr
    assert "diamond.yaml: ok" in result.stdout


def test_design_document_example_runs_against_a_collection_filled_by_the_cli(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path)
    example = str(ROOT / "examples/workflows/design_doc.yaml")
    assert frys("workflow", "validate", example).returncode == 0
    items = tmp_path / "items.jsonl"
    items.write_text(
        '{"id": "doc-1", "text": "pump 3 pressure fault", "metadata": {"kind": "fault"}}\n'
        '{"id": "doc-2", "text": "the test query we expect", "metadata": {"kind": "note"}}\n'
        '{"id": "doc-3", "text": "valve maintenance schedule"}\n'
    )
    assert frys("vector", "create", "-c", str(path), "default", "--dim", "256").returncode == 0
    added = frys("vector", "add", "-c", str(path), "default", str(items))
    assert added.returncode == 0, added.stderr
    result = frys("workflow", "run", "-c", str(path), example, "--wait", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["status"] == "succeeded"
    hits = doc["steps"][0]["output"]["hits"]
    assert hits[0]["id"] == "doc-2" and hits[0]["metadata"] == {"kind": "note"}


def test_diamond_runs_to_succeeded_and_is_listed(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    diamond = str(ROOT / "examples/workflows/diamond.yaml")
    result = frys(
        "workflow", "run", "-c", str(path), diamond, "--input", "greeting=hi", "--wait", "--json"
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["status"] == "succeeded"
    assert [s["status"] for s in doc["steps"]] == ["succeeded"] * 4
    assert [len(s["history"]) for s in doc["steps"]] == [1] * 4
    assert doc["outputs"]["d"]["version"] == 1
    runs = json.loads(frys("workflow", "runs", "-c", str(path), "--json").stdout)
    assert [(r["id"], r["status"]) for r in runs] == [(doc["id"], "succeeded")]
    shown = frys("workflow", "show", "-c", str(path), doc["id"], "--json")
    assert json.loads(shown.stdout)["steps"] == doc["steps"]
    text = frys("workflow", "show", "-c", str(path), doc["id"]).stdout
    assert f"run {doc['id']} of diamond: succeeded" in text


def test_workflow_run_without_wait_leaves_the_run_to_resume(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    sleepy = tmp_path / "sleepy.yaml"
    sleepy.write_text(
        "name: sleepy\nsteps:\n  - name: nap\n    action: sleep\n    params: {seconds: 60}\n"
    )
    env = clean_env(FRYS_SYSTEM_SHUTDOWN_TIMEOUT="0.1")
    started = frys("workflow", "run", "-c", str(path), str(sleepy), env=env)
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    listed = frys("workflow", "runs", "-c", str(path), "--status", "running").stdout
    assert run_id in listed
    cancelled = frys("workflow", "cancel", "-c", str(path), run_id)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    again = frys("workflow", "cancel", "-c", str(path), run_id)
    assert again.returncode == 1 and "already cancelled" in again.stderr


def test_workflow_run_with_bad_input_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    diamond = str(ROOT / "examples/workflows/diamond.yaml")
    result = frys("workflow", "run", "-c", str(path), diamond, "--input", "greeting=1", "--wait")
    assert result.returncode == 2
    assert "inputs.greeting" in result.stderr
    missing = frys("workflow", "run", "-c", str(path), diamond, "--input", "nokey")
    assert missing.returncode == 2


def test_workflow_list_shows_definitions_and_invalid_files(tmp_path: Path) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "ok.yaml").write_text(
        "name: ok\ntriggers:\n  - {type: interval, every: 60}\nsteps:\n  - {name: a, action: log}\n"
    )
    (workflows / "bad.yaml").write_text("name: bad\nsteps: []\n")
    path = write_config(tmp_path, f'[workflows]\ndir = "{workflows}"\n')
    result = frys("workflow", "list", "-c", str(path), "--json")
    assert result.returncode == 0, result.stderr
    rows = {Path(r["file"]).name: r for r in json.loads(result.stdout)}
    assert rows["ok.yaml"]["name"] == "ok" and rows["ok.yaml"]["triggers"] == ["interval 60.0"]
    assert rows["bad.yaml"]["error"] and "steps" in rows["bad.yaml"]["error"]


def test_run_serves_health_and_the_api_on_the_ports_it_prints(tmp_path: Path) -> None:
    import re
    import urllib.request

    path = write_config(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "frys_edge.cli", "run", "-c", str(path)],
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        while "running" not in line:
            assert line, "frys run exited before it was ready"
            line = proc.stderr.readline()
        health = re.search(r"health (http://\S+);", line)
        api = re.search(r"API (http://\S+),", line)
        assert health and api, line
        with urllib.request.urlopen(health.group(1) + "/health", timeout=5) as response:
            assert json.load(response)["status"] in ("ok", "degraded")
        with urllib.request.urlopen(health.group(1) + "/metrics", timeout=5) as response:
            assert "frys_http_requests_total" in response.read().decode()
        with urllib.request.urlopen(api.group(1) + "/workflows", timeout=5) as response:
            assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()


def test_run_refuses_an_open_bind_without_a_token(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[network]\nhost = "0.0.0.0"\n')
    result = frys("run", "-c", str(path))
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without [network] token" in result.stderr


def test_health_probes_the_running_runtime_and_fails_when_it_is_gone(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    path = write_config(tmp_path)
    env = clean_env(FRYS_NETWORK_HEALTH_PORT=port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "frys_edge.cli", "run", "-c", str(path)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        while "running" not in (line := proc.stderr.readline()):
            assert line, "frys run exited before it was ready"
        healthy = frys("health", "-c", str(path), env=env)
        assert healthy.returncode == 0, healthy.stderr
        assert healthy.stdout.strip() in (
            f"http://127.0.0.1:{port}/health: ok",
            f"http://127.0.0.1:{port}/health: degraded",
        )
        ready = frys("health", "-c", str(path), "--ready", env=env)
        assert ready.returncode == 0, ready.stderr
        assert ready.stdout.strip() == f"http://127.0.0.1:{port}/health/ready: ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
    gone = frys("health", "-c", str(path), "--timeout", "2", env=env)
    assert gone.returncode == 1
    assert f"http://127.0.0.1:{port}/health" in gone.stderr
    assert "is `frys run` running with this config?" in gone.stderr
