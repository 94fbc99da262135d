"""The hostile plugins in plugins/hostile: each is contained, and the host keeps serving."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from test_sandbox import Services

from frys_edge.sandbox import Grant, PluginError, WasmPlugin, load_plugin

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
HOSTILE = PLUGINS / "hostile"


def with_limits(tmp_path: Path, name: str, limits: str) -> Path:
    """A copy of a hostile plugin whose [limits] are replaced (the module is unchanged)."""
    copy = tmp_path / name
    shutil.copytree(HOSTILE / name, copy)
    manifest = copy / "frys-plugin.toml"
    text = manifest.read_text()
    manifest.write_text(text[: text.index("[limits]")] + "[limits]\n" + limits)
    return copy


def assert_host_healthy(plugin: WasmPlugin) -> None:
    hello = load_plugin(PLUGINS / "hello")
    assert hello.call("echo", {"still": "serving"}) == {"still": "serving"}
    assert plugin.pool.stats()["in_use"] == 0, "the failed instance went back to nobody"


def contained(plugin: WasmPlugin, export: str, deadline_ms: int) -> PluginError:
    t0 = time.monotonic()
    with pytest.raises(PluginError) as err:
        plugin.call(export, None)
    assert time.monotonic() - t0 < deadline_ms / 1000 + 0.05, "stopped within deadline + 50 ms"
    assert_host_healthy(plugin)
    return err.value


def test_an_infinite_loop_runs_out_of_fuel(tmp_path: Path) -> None:
    plugin = load_plugin(with_limits(tmp_path, "spin", "fuel = 1000000\ndeadline_ms = 200\n"))
    assert contained(plugin, "run", 200).kind == "fuel"


def test_an_infinite_loop_with_fuel_to_spare_hits_its_deadline(tmp_path: Path) -> None:
    limits = "fuel = 1000000000000\ndeadline_ms = 200\n"
    plugin = load_plugin(with_limits(tmp_path, "spin", limits))
    error = contained(plugin, "run", 200)
    assert error.kind == "deadline" and "deadline" in str(error)


def test_a_memory_bomb_stays_inside_its_memory_cap(tmp_path: Path) -> None:
    limits = "memory_pages = 4\nfuel = 1000000000000\ndeadline_ms = 200\n"
    plugin = load_plugin(with_limits(tmp_path, "membomb", limits))
    error = contained(plugin, "run", 200)
    assert error.kind in ("deadline", "memory", "trap")


def test_unbounded_recursion_exhausts_the_stack(tmp_path: Path) -> None:
    plugin = load_plugin(with_limits(tmp_path, "recurse", "deadline_ms = 200\n"))
    assert contained(plugin, "run", 200).kind == "stack"


def test_huge_outputs_are_refused_before_they_are_read() -> None:
    plugin = load_plugin(HOSTILE / "hugeout")
    real = contained(plugin, "run", 100)
    assert real.kind == "output" and "over its max_output of 65536" in str(real)
    lying = contained(plugin, "claim", 100)
    assert lying.kind == "output"


def test_an_ungranted_host_function_never_reaches_the_host() -> None:
    services = Services()
    plugin = load_plugin(HOSTILE / "sneaky", Grant(capabilities=["kv"]), services=services.host)
    error = contained(plugin, "run", 50)
    assert "capability 'kv'" in str(error) and "not granted" in str(error)
    assert services.kv == {}


def test_a_module_that_does_not_match_its_hash_is_never_compiled() -> None:
    with pytest.raises(PluginError, match="does not match the manifest") as err:
        load_plugin(HOSTILE / "tampered")
    assert err.value.kind == "integrity"


def test_plugin_check_passes_on_every_shipped_plugin_and_fails_on_an_altered_copy(
    tmp_path: Path,
) -> None:
    from conftest import frys

    shipped = [PLUGINS / name for name in ("anomaly", "hello", "upper", "readfile")]
    shipped += [d for d in sorted(HOSTILE.iterdir()) if d.name != "tampered"]
    result = frys("plugin", "check", *map(str, shipped))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok: ") == len(shipped) >= 4
    copy = tmp_path / "anomaly"
    shutil.copytree(PLUGINS / "anomaly", copy)
    wasm = copy / "anomaly.wasm"
    data = bytearray(wasm.read_bytes())
    data[len(data) // 2] ^= 0x01
    wasm.write_bytes(bytes(data))
    altered = frys("plugin", "check", str(copy))
    assert altered.returncode == 2 and "does not match the manifest" in altered.stderr


def test_the_anomaly_plugin_flags_outliers_singly_and_in_batches() -> None:
    plugin = load_plugin(PLUGINS / "anomaly", Grant(capabilities=["log"]))
    out = plugin.call("detect", {"values": [10, 11, 10, 12, 11, 10, 95], "threshold": 2})
    assert out["anomalies"] == [6]
    batch = plugin.call_batch("detect_batch", [{"values": [1, 1, 1, 1, 9]}, {"values": [5, 5]}])
    # z of 9 in [1, 1, 1, 1, 9] is 2.0, under the default threshold 3; [5, 5] has no spread.
    assert [b["anomalies"] for b in batch] == [[], []]
    assert batch[0]["mean"] == 2.6 and batch[0]["std"] == 3.2
    upper = load_plugin(PLUGINS / "upper", Grant(capabilities=["wasi"]))
    assert upper.call_raw("_start", b'{"a":"b"}') == b'{"A":"B"}'


def test_wasi_sees_only_the_directories_and_env_the_operator_granted(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("pump 3 serviced")
    (tmp_path / "secret.txt").write_text("do not read")
    granted = Grant(capabilities=["wasi"], dirs=[f"{shared}:/data"])
    plugin = load_plugin(PLUGINS / "readfile", granted)
    assert plugin.call("_start", "/data/notes.txt") == "pump 3 serviced"
    with pytest.raises(PluginError, match="exited with status 1"):
        plugin.call("_start", str(tmp_path / "secret.txt"))
    blind = load_plugin(PLUGINS / "readfile", Grant(capabilities=["wasi"]))
    with pytest.raises(PluginError, match="exited with status 1"):
        blind.call("_start", "/data/notes.txt")
    with pytest.raises(PluginError, match="was not granted the wasi capability"):
        load_plugin(PLUGINS / "readfile").call("_start", "/data/notes.txt")
    with pytest.raises(PluginError, match="must be HOST:GUEST"):
        load_plugin(PLUGINS / "readfile", Grant(capabilities=["wasi"], dirs=[f"{shared}"]))


def test_a_hostile_input_buffer_pointer_is_refused_not_followed(tmp_path: Path) -> None:
    from test_sandbox import make_plugin

    wat = """
    (module
      (memory (export "memory") 1)
      ;; -16 MiB as an i32: would point below the plugin's memory if taken as signed
      (func (export "input_buffer") (param i32) (result i32) (i32.const -16777216))
      (func (export "run") (param i32 i32) (result i64) (i64.const 0)))
    """
    plugin = load_plugin(make_plugin(tmp_path, wat, name="below", exports=["run"]))
    with pytest.raises(PluginError, match="input_buffer outside memory") as err:
        plugin.call("run", {"x": 1})
    assert err.value.kind == "abi"
    assert_host_healthy(plugin)


def test_a_failing_host_service_fails_the_call_and_discards_the_instance(tmp_path: Path) -> None:
    from test_sandbox import make_plugin

    def broken_put(namespace: str, key: str, value: object) -> None:
        raise RuntimeError("disk on fire")

    services = Services()
    services.host.kv_put = broken_put
    plugin = load_plugin(make_plugin(tmp_path), Grant(capabilities=["kv"]), services=services.host)
    with pytest.raises(PluginError, match="host error") as err:
        plugin.call("store", None)
    assert err.value.kind == "host" and plugin.errors == 1
    assert plugin.pool.stats()["discarded"] == 1
    assert plugin.call("echo", 7) == 7


def test_a_wasi_command_cannot_write_past_its_max_output(tmp_path: Path) -> None:
    copy = tmp_path / "upper"
    shutil.copytree(PLUGINS / "upper", copy)
    manifest = copy / "frys-plugin.toml"
    text = manifest.read_text()
    manifest.write_text(text[: text.index("[limits]")] + "[limits]\nmax_output = 1024\n")
    upper = load_plugin(copy, Grant(capabilities=["wasi"]))
    flood = b'"' + b"a" * 8192 + b'"'  # upper echoes it: eight times its max_output
    with pytest.raises(PluginError, match="max_output") as err:
        upper.call_raw("_start", flood)
    assert err.value.kind == "output"
    assert upper.call_raw("_start", b'"ok"') == b'"OK"'
