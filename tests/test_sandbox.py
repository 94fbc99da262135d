"""The WASM sandbox with real wasmtime: integrity, capabilities, limits, cache, pool."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from frys_edge.sandbox import Grant, HostServices, PluginError, load_plugin

# A reactor with the ABI at its smallest: a bump allocator, and exports that use host imports.
ABI_WAT = """
(module
  (import "frys" "fail" (func $fail (param i32 i32)))
  (import "frys" "kv_put" (func $kv_put (param i32 i32 i32 i32) (result i32)))
  (import "frys" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
  (import "frys" "clock_ms" (func $clock (result i64)))
  (import "frys" "log" (func $log (param i32 i32 i32)))
  (import "frys" "random_u64" (func $random (result i64)))
  (memory (export "memory") 2)
  (data (i32.const 16) "k1")
  (data (i32.const 32) "42")
  (data (i32.const 48) "alerts/x")
  (data (i32.const 64) "bad input")
  ;; One input buffer at 1024, as large as the rest of memory: enough for these tests.
  (func (export "input_buffer") (param $n i32) (result i32)
    (if (i32.gt_u (local.get $n) (i32.const 130048)) (then unreachable))
    (i32.const 1024))
  ;; echo: output = input
  (func (export "echo") (param $p i32) (param $n i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32))
            (i64.extend_i32_u (local.get $n))))
  ;; store: kv_put("k1", 42); returns its status as the output "0" or "-1"
  (func (export "store") (param i32 i32) (result i64)
    (local $r i32)
    (local.set $r (call $kv_put (i32.const 16) (i32.const 2) (i32.const 32) (i32.const 2)))
    (i32.store8 (i32.const 96) (select (i32.const 48) (i32.const 45) (i32.eqz (local.get $r))))
    (i64.or (i64.shl (i64.const 96) (i64.const 32)) (i64.const 1)))
  (func (export "shout") (param i32 i32) (result i64)
    (drop (call $emit (i32.const 48) (i32.const 8) (i32.const 32) (i32.const 2)))
    (i64.const 0))
  (func (export "now") (param i32 i32) (result i64)
    (drop (call $clock)) (i64.const 0))
  (func (export "say") (param i32 i32) (result i64)
    (call $log (i32.const 1) (i32.const 64) (i32.const 9)) (i64.const 0))
  (func (export "dice") (param i32 i32) (result i64)
    (drop (call $random)) (i64.const 0))
  (func (export "refuse") (param i32 i32) (result i64)
    (call $fail (i32.const 64) (i32.const 9)) (i64.const 0))
  (func (export "spin") (param i32 i32) (result i64)
    (loop $l (br $l)) (i64.const 0))
)
"""
EXPORTS = ["echo", "store", "shout", "now", "say", "dice", "refuse", "spin"]


def make_plugin(
    tmp_path: Path,
    wat: str = ABI_WAT,
    *,
    capabilities: list[str] | None = None,
    exports: list[str] | None = None,
    limits: str = "",
    name: str = "abi",
) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    wasm = wasmtime.wat2wasm(wat)
    (directory / "plugin.wasm").write_bytes(wasm)
    caps = capabilities if capabilities is not None else ["kv", "emit", "clock"]
    lines = [
        f'name = "{name}"',
        'version = "1.0.0"',
        'module = "plugin.wasm"',
        f'sha256 = "{hashlib.sha256(wasm).hexdigest()}"',
        f"capabilities = {caps!r}".replace("'", '"'),
    ]
    for export in exports if exports is not None else EXPORTS:
        lines += ["[[exports]]", f'name = "{export}"']
    (directory / "frys-plugin.toml").write_text("\n".join(lines) + "\n" + limits)
    return directory


class Services:
    def __init__(self) -> None:
        self.kv: dict[tuple[str, str], Any] = {}
        self.published: list[tuple[str, Any]] = []
        self.host = HostServices(
            kv_get=lambda ns, k: self.kv.get((ns, k)),
            kv_put=lambda ns, k, v: self.kv.__setitem__((ns, k), v),
            publish=lambda topic, payload: self.published.append((topic, payload)),
        )


def test_echo_round_trips_json(tmp_path: Path) -> None:
    plugin = load_plugin(make_plugin(tmp_path))
    assert plugin.call("echo", {"a": [1, 2.5, "x"]}) == {"a": [1, 2.5, "x"]}
    assert plugin.call_batch("echo", [1, 2, 3]) == [1, 2, 3]


def test_granted_capabilities_reach_the_host(tmp_path: Path) -> None:
    services = Services()
    grant = Grant(capabilities=["kv", "emit"], topics=["alerts/#"])
    plugin = load_plugin(make_plugin(tmp_path), grant, services=services.host)
    assert plugin.call("store", None) == 0
    assert services.kv == {("abi", "k1"): 42}
    plugin.call("shout", None)
    assert services.published == [("alerts/x", 42)]


def test_ungranted_capabilities_fail_the_call_and_never_reach_the_host(tmp_path: Path) -> None:
    services = Services()
    plugin = load_plugin(make_plugin(tmp_path), Grant(), services=services.host)
    with pytest.raises(PluginError, match=r"capability 'kv'.*not granted"):
        plugin.call("store", None)
    with pytest.raises(PluginError, match="capability 'clock'"):
        plugin.call("now", None)
    assert services.kv == {} and services.published == []
    assert plugin.call("echo", "still serving") == "still serving"


def test_emit_outside_the_granted_topics_is_refused(tmp_path: Path) -> None:
    services = Services()
    grant = Grant(capabilities=["emit"], topics=["sensors/#"])
    plugin = load_plugin(make_plugin(tmp_path), grant, services=services.host)
    plugin.call("shout", None)
    assert services.published == []


def test_a_capability_granted_but_not_asked_for_is_not_linked(tmp_path: Path) -> None:
    services = Services()
    directory = make_plugin(tmp_path, capabilities=[])
    plugin = load_plugin(directory, Grant(capabilities=["kv"]), services=services.host)
    with pytest.raises(PluginError, match="not granted"):
        plugin.call("store", None)


def test_fail_reports_the_plugins_message(tmp_path: Path) -> None:
    plugin = load_plugin(make_plugin(tmp_path))
    with pytest.raises(PluginError, match="failed: bad input") as err:
        plugin.call("refuse", None)
    assert err.value.kind == "fail"


def test_an_infinite_loop_is_stopped_by_fuel_or_deadline(tmp_path: Path) -> None:
    limits = "[limits]\nfuel = 1000000000000\ndeadline_ms = 100\n"
    plugin = load_plugin(make_plugin(tmp_path, limits=limits))
    t0 = time.monotonic()
    with pytest.raises(PluginError, match="deadline") as err:
        plugin.call("spin", None)
    assert err.value.kind == "deadline"
    assert time.monotonic() - t0 < 0.1 + 0.05
    fueled = load_plugin(make_plugin(tmp_path, name="fueled", limits="[limits]\nfuel = 100000\n"))
    with pytest.raises(PluginError, match="fuel") as err:
        fueled.call("spin", None)
    assert err.value.kind == "fuel"
    assert fueled.call("echo", 1) == 1, "the host keeps serving after a trap"


def test_a_tampered_module_is_refused_before_compiling(tmp_path: Path) -> None:
    directory = make_plugin(tmp_path)
    wasm = directory / "plugin.wasm"
    data = bytearray(wasm.read_bytes())
    data[-1] ^= 0xFF
    wasm.write_bytes(bytes(data))
    with pytest.raises(PluginError, match=r"sha256 .* does not match the manifest") as err:
        load_plugin(directory)
    assert err.value.kind == "integrity"


def test_imports_outside_the_abi_are_refused_at_load(tmp_path: Path) -> None:
    wat = '(module (import "env" "system" (func (param i32))) (memory (export "memory") 1))'
    with pytest.raises(PluginError, match=r"imports env\.system"):
        load_plugin(make_plugin(tmp_path, wat, exports=["x"]))


def test_compiled_modules_are_cached_and_a_corrupt_entry_is_rebuilt(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    directory = make_plugin(tmp_path)
    first = load_plugin(directory, cache_dir=cache)
    assert not first.cache_hit
    second = load_plugin(directory, cache_dir=cache)
    assert second.cache_hit and second.call("echo", 5) == 5
    (blob,) = cache.glob("*.cwasm")
    blob.write_bytes(blob.read_bytes()[:-100] + b"x" * 100)
    third = load_plugin(directory, cache_dir=cache)
    assert not third.cache_hit and third.call("echo", 6) == 6
    assert load_plugin(directory, cache_dir=cache).cache_hit


def test_the_instance_pool_bound_holds_under_concurrent_calls(tmp_path: Path) -> None:
    plugin = load_plugin(make_plugin(tmp_path), pool_size=2)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for i in range(50):
                assert plugin.call("echo", i) == i
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = plugin.pool.stats()
    assert stats["high_water"] <= 2 and stats["created"] <= 2
    assert plugin.calls == 300


def test_unknown_exports_and_bad_manifests_are_clear(tmp_path: Path) -> None:
    plugin = load_plugin(make_plugin(tmp_path))
    with pytest.raises(PluginError, match="no export 'nope'"):
        plugin.call("nope", None)
    directory = make_plugin(tmp_path, name="bad", capabilities=["sockets"])
    with pytest.raises(PluginError, match="unknown capabilities"):
        load_plugin(directory)


def test_runtime_loads_plugins_with_grants_and_the_plugin_action_calls_them(tmp_path: Path) -> None:
    import anyio

    from frys_edge.config import load_config
    from frys_edge.runtime import Runtime
    from frys_edge.workflow import parse_workflow

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    make_plugin(plugins)
    (tmp_path / "frys.toml").write_text(
        f'[system]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[plugins]\npaths = ["{plugins}"]\n'
        '[plugins.grants.abi]\ncapabilities = ["kv", "emit"]\ntopics = ["alerts/#"]\n'
    )

    async def main() -> None:
        async with Runtime(load_config(tmp_path / "frys.toml", env={})) as rt:
            assert set(rt.wasm) == {"abi"} and rt.health.components["plugin:abi"].status == "ok"
            alerts = rt.bus.subscribe("alerts/#")
            steps = [
                {
                    "name": "e",
                    "action": "plugin",
                    "params": {"plugin": "abi", "export": "echo", "input": {"v": 1}},
                },
                {
                    "name": "b",
                    "action": "plugin",
                    "params": {"plugin": "abi", "export": "echo", "input": [1, 2], "batch": True},
                },
                {"name": "s", "action": "plugin", "params": {"plugin": "abi", "export": "store"}},
                {"name": "x", "action": "plugin", "params": {"plugin": "abi", "export": "shout"}},
            ]
            workflow = parse_workflow({"name": "p", "steps": steps}, rt.engine.actions)
            rt.engine.workflows["p"] = workflow
            run = await rt.engine.wait(await rt.engine.start("p"))
            assert run.status == "succeeded", run.error
            assert rt.storage is not None
            outputs = {s.name: s.output for s in rt.storage.run_steps(run.id)}
            assert outputs == {"e": {"v": 1}, "b": [1, 2], "s": 0, "x": None}
            entry = rt.storage.get("plugin/abi", "k1")
            assert entry is not None and entry.value == 42
            message = alerts.get_nowait()
            assert message is not None and (message.topic, message.payload) == ("alerts/x", 42)
            snap = rt.metrics.snapshot()
            assert snap['plugin_call_seconds{export="echo",plugin="abi"}']["count"] == 2  # type: ignore[index]
            assert snap['plugin_calls_total{plugin="abi"}'] == 5  # the batch of 2 on a plain export

    anyio.run(main)


def test_plugin_cli_check_call_and_refusal(tmp_path: Path) -> None:
    from conftest import frys

    directory = make_plugin(tmp_path)
    check = frys("plugin", "check", str(directory))
    assert check.returncode == 0, check.stderr
    assert "ok: abi 1.0.0" in check.stdout and "not granted: clock, emit, kv" in check.stdout
    call = frys("plugin", "call", str(directory), "echo", "--input", '{"a": 1}')
    assert call.returncode == 0 and call.stdout.strip() == '{"a": 1}'
    wasm = directory / "plugin.wasm"
    wasm.write_bytes(wasm.read_bytes() + b"\0")
    tampered = frys("plugin", "check", str(directory))
    assert tampered.returncode == 2
    assert "plugin.wasm: sha256" in tampered.stderr and "refusing to load it" in tampered.stderr


BUSY_WAT = """
(module
  (memory (export "memory") 1)
  (data (i32.const 16) "VERSION")
  (func (export "input_buffer") (param i32) (result i32) (i32.const 1024))
  ;; version: spins a while, then returns the 7-byte JSON number at 16
  (func (export "version") (param i32 i32) (result i64)
    (local $i i32)
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (i32.const 30000000)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 7)))
)
"""


def test_hot_reload_keeps_calls_in_flight_and_a_bad_version_leaves_the_old_one(
    tmp_path: Path,
) -> None:
    import anyio

    from frys_edge.config import load_config
    from frys_edge.runtime import Runtime

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    limits = "[limits]\nfuel = 1000000000000\ndeadline_ms = 5000\n"

    def install(version: str) -> Path:
        shutil.rmtree(plugins / "busy", ignore_errors=True)
        wat = BUSY_WAT.replace("VERSION", version)
        return make_plugin(plugins, wat, name="busy", exports=["version"], limits=limits)

    install("1000001")
    (tmp_path / "frys.toml").write_text(
        f'[system]\ndata_dir = "{tmp_path / "data"}"\n[plugins]\npaths = ["{plugins}"]\n'
    )

    async def main() -> None:
        async with Runtime(load_config(tmp_path / "frys.toml", env={})) as rt:
            old = rt.wasm["busy"]
            async with anyio.create_task_group() as tg:
                results: list[Any] = []

                async def call() -> None:
                    results.append(await anyio.to_thread.run_sync(old.call, "version", None))

                tg.start_soon(call)
                await anyio.sleep(0.01)  # the call is running in a worker thread
                install("2000002")
                assert await rt.reload_config()
            assert results == [1000001], "the call in flight finished on the old version"
            assert rt.wasm["busy"].call("version", None) == 2000002
            directory = install("3000003")
            wasm = directory / "plugin.wasm"
            wasm.write_bytes(wasm.read_bytes() + b"\0")  # breaks the hash
            assert await rt.reload_config()
            assert rt.wasm["busy"].call("version", None) == 2000002
            health = rt.health.components["plugin:busy"]
            assert health.status == "degraded" and "keeps serving" in health.reason

    anyio.run(main)


def test_signed_plugins_verify_and_bad_or_missing_signatures_are_refused(tmp_path: Path) -> None:
    from conftest import frys

    key = tmp_path / "signing.key"
    made = frys("plugin", "keygen", str(key))
    assert made.returncode == 0, made.stderr
    public = made.stdout.strip()
    assert frys("plugin", "keygen", str(key)).returncode == 1, "never overwrites a key"
    directory = make_plugin(tmp_path)
    with pytest.raises(PluginError, match="not signed and signatures are required"):
        load_plugin(directory, trusted_keys=[public], require_signature=True)
    signed = frys("plugin", "sign", str(directory), "--key", str(key))
    assert signed.returncode == 0, signed.stderr
    plugin = load_plugin(directory, trusted_keys=[public], require_signature=True)
    assert plugin.call("echo", 1) == 1
    other = frys("plugin", "keygen", str(tmp_path / "other.key")).stdout.strip()
    with pytest.raises(PluginError, match="does not verify with any of the 1 trusted keys") as err:
        load_plugin(directory, trusted_keys=[other], require_signature=True)
    assert err.value.kind == "signature"
    config = tmp_path / "frys.toml"
    config.write_text(f'[plugins]\nrequire_signature = true\ntrusted_keys = ["{other}"]\n')
    refused = frys("plugin", "check", "-c", str(config), str(directory))
    assert refused.returncode == 2 and "does not verify" in refused.stderr


def test_a_changed_plugin_dir_is_reloaded_while_running(tmp_path: Path) -> None:
    import anyio

    from frys_edge.config import load_config
    from frys_edge.runtime import Runtime

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    make_plugin(plugins, name="abi")
    overrides = {"system.data_dir": str(tmp_path / "data"), "plugins.paths": [str(plugins)]}

    async def main() -> None:
        async with Runtime(load_config(env={}, overrides=overrides)) as rt:
            first = rt.wasm["abi"]
            shutil.rmtree(plugins / "abi")
            make_plugin(plugins, name="abi", exports=["echo", "spin"])
            with anyio.fail_after(10):
                while rt.wasm["abi"] is first:
                    await anyio.sleep(0.1)
            assert set(rt.wasm["abi"].exports) == {"echo", "spin"}

    anyio.run(main)


def test_call_isolation_gives_every_call_a_fresh_instance(tmp_path: Path) -> None:
    counter = """
    (module
      (memory (export "memory") 1)
      (global $n (mut i32) (i32.const 48))
      (func (export "input_buffer") (param i32) (result i32) (i32.const 1024))
      ;; count: returns one ASCII digit, one more on each call into the same instance
      (func (export "count") (param i32 i32) (result i64)
        (global.set $n (i32.add (global.get $n) (i32.const 1)))
        (i32.store8 (i32.const 16) (global.get $n))
        (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 1)))
    )
    """
    shared = load_plugin(make_plugin(tmp_path, counter, name="shared", exports=["count"]))
    assert [shared.call("count", None) for _ in range(3)] == [1, 2, 3]
    directory = make_plugin(tmp_path, counter, name="isolated", exports=["count"])
    manifest = directory / "frys-plugin.toml"
    manifest.write_text('isolation = "call"\n' + manifest.read_text())
    isolated = load_plugin(directory)
    assert [isolated.call("count", None) for _ in range(3)] == [1, 1, 1]


@pytest.mark.parametrize(
    ("capability", "export"), [("log", "say"), ("clock", "now"), ("random", "dice")]
)
def test_each_simple_capability_works_only_when_granted(
    tmp_path: Path, capability: str, export: str, caplog: pytest.LogCaptureFixture
) -> None:
    directory = make_plugin(tmp_path, capabilities=[capability])
    granted = load_plugin(directory, Grant(capabilities=[capability]))
    with caplog.at_level("INFO", logger="frys.plugins"):
        assert granted.call(export, None) is None
    if capability == "log":
        assert "plugin abi: bad input" in caplog.text
    refused = load_plugin(directory, Grant())
    with pytest.raises(PluginError, match=f"capability '{capability}'"):
        refused.call(export, None)


def test_fuel_zero_runs_unmetered_and_the_deadline_still_stops_a_loop(tmp_path: Path) -> None:
    directory = make_plugin(tmp_path, limits="[limits]\nfuel = 0\ndeadline_ms = 100\n")
    plugin = load_plugin(directory, cache_dir=tmp_path / "cache")
    assert not plugin.metered and plugin.call("echo", [1]) == [1]
    with pytest.raises(PluginError) as err:
        plugin.call("spin", None)
    assert err.value.kind == "deadline" and plugin.fuel_used == 0
    metered = load_plugin(make_plugin(tmp_path, name="metered"), cache_dir=tmp_path / "cache")
    assert metered.metered and not metered.cache_hit, "cache entries are kept per fuel setting"


def test_the_aot_cache_is_keyed_by_the_wasmtime_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import frys_edge.sandbox as sandbox

    cache = tmp_path / "cache"
    directory = make_plugin(tmp_path)
    assert not load_plugin(directory, cache_dir=cache).cache_hit
    assert load_plugin(directory, cache_dir=cache).cache_hit
    monkeypatch.setattr(sandbox, "_installed_version", lambda: "0.0.0-another")
    monkeypatch.delattr(sandbox._wasmtime(), "__version__", raising=False)
    upgraded = load_plugin(directory, cache_dir=cache)
    assert not upgraded.cache_hit, "a module compiled by another wasmtime is never loaded"
    assert upgraded.call("echo", 1) == 1
    assert len(list(cache.glob("*.cwasm"))) == 2
