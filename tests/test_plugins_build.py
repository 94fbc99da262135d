"""The shipped plugins: each built module matches its manifest and keeps the ABI.

These drive the modules in plugins/ through the raw ABI (plugins/ABI.md) with wasmtime
directly, so they check the plugins themselves, independently of frys_edge.sandbox.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import tomllib
from pathlib import Path
from typing import Any

import pytest
import wasmtime

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
MANIFESTS = sorted(PLUGINS.rglob("frys-plugin.toml"))
ENGINE = wasmtime.Engine()

# The capability a manifest must list for each frys import; None: always available.
CAPABILITY_OF_IMPORT = {
    "fail": None,
    "log": "log",
    "kv_get": "kv",
    "kv_put": "kv",
    "emit": "emit",
    "clock_ms": "clock",
    "random_u64": "random",
}


def manifest_id(path: Path) -> str:
    return str(path.parent.relative_to(PLUGINS))


def load_manifest(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


@functools.cache
def compiled(wasm: Path) -> wasmtime.Module:
    return wasmtime.Module.from_file(ENGINE, str(wasm))


def memory_of(
    source: wasmtime.Caller | wasmtime.Instance, store: wasmtime.Store
) -> wasmtime.Memory:
    memory = (
        source["memory"] if isinstance(source, wasmtime.Caller) else source.exports(store)["memory"]
    )
    assert isinstance(memory, wasmtime.Memory)
    return memory


class PluginFailed(Exception):
    """The plugin called frys.fail during the call."""


class Reactor:
    """One instance of a reactor plugin, driven the way the host drives it.

    The frys imports are recording stubs: log and fail, and kv_get/kv_put over a dict.
    """

    def __init__(self, wasm: Path) -> None:
        self.store = wasmtime.Store(ENGINE)
        self.logs: list[tuple[int, str]] = []
        self.failures: list[str] = []
        self.kv: dict[str, bytes] = {}
        self.input_buffer_sizes: list[int] = []
        linker = wasmtime.Linker(ENGINE)
        i32 = wasmtime.ValType.i32()
        for name, params, results, func in [
            ("fail", [i32, i32], [], self._fail),
            ("log", [i32, i32, i32], [], self._log),
            ("kv_get", [i32, i32, i32, i32], [i32], self._kv_get),
            ("kv_put", [i32, i32, i32, i32], [i32], self._kv_put),
        ]:
            ftype = wasmtime.FuncType(params, results)
            linker.define_func("frys", name, ftype, func, access_caller=True)
        self.instance = linker.instantiate(self.store, compiled(wasm))
        self.memory = memory_of(self.instance, self.store)
        self.in_ptr = 0
        self.in_cap = 0

    def func(self, name: str) -> wasmtime.Func:
        func = self.instance.exports(self.store)[name]
        assert isinstance(func, wasmtime.Func), name
        return func

    def _bytes(self, caller: wasmtime.Caller, ptr: int, length: int) -> bytes:
        return bytes(memory_of(caller, self.store).read(caller, ptr, ptr + length))

    def _log(self, caller: wasmtime.Caller, level: int, ptr: int, length: int) -> None:
        self.logs.append((level, self._bytes(caller, ptr, length).decode()))

    def _fail(self, caller: wasmtime.Caller, ptr: int, length: int) -> None:
        self.failures.append(self._bytes(caller, ptr, length).decode())

    def _kv_get(self, caller: wasmtime.Caller, kp: int, kl: int, op: int, cap: int) -> int:
        value = self.kv.get(self._bytes(caller, kp, kl).decode())
        if value is None:
            return -1
        if len(value) <= cap:
            memory_of(caller, self.store).write(caller, value, op)
        return len(value)

    def _kv_put(self, caller: wasmtime.Caller, kp: int, kl: int, vp: int, vl: int) -> int:
        self.kv[self._bytes(caller, kp, kl).decode()] = self._bytes(caller, vp, vl)
        return 0

    def call(self, export: str, data: bytes) -> bytes:
        """Call EXPORT with DATA as the host does: write into the input buffer, one call."""
        store = self.store
        if len(data) > self.in_cap:
            self.in_cap = max(len(data), 2 * self.in_cap, 4096)
            self.input_buffer_sizes.append(self.in_cap)
            self.in_ptr = self.func("input_buffer")(store, self.in_cap)
            assert isinstance(self.in_ptr, int)
            assert self.in_ptr + self.in_cap <= self.memory.data_len(store), "outside memory"
        self.memory.write(store, data, self.in_ptr)
        self.failures.clear()
        packed = self.func(export)(store, self.in_ptr, len(data))
        assert isinstance(packed, int)
        if self.failures:
            raise PluginFailed(self.failures[0])
        packed &= 0xFFFF_FFFF_FFFF_FFFF
        out_ptr, out_len = packed >> 32, packed & 0xFFFF_FFFF
        assert out_ptr + out_len <= self.memory.data_len(store), "output outside memory"
        return bytes(self.memory.read(store, out_ptr, out_ptr + out_len)) if out_len else b""

    def call_json(self, export: str, value: Any) -> Any:
        return json.loads(self.call(export, json.dumps(value).encode()))


def reference_detect(values: list[float], threshold: float = 3.0) -> dict[str, Any]:
    """What anomaly.detect must answer: population std, |z| > threshold, z = 0 if std is 0."""
    n = len(values)
    mean = sum(values) / n if n else 0.0
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / n) if n else 0.0
    scores = [(x - mean) / std if std > 0 else 0.0 for x in values]
    anomalies = [i for i, z in enumerate(scores) if abs(z) > threshold]
    return {"mean": mean, "std": std, "anomalies": anomalies, "scores": scores}


def assert_same_detection(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert set(got) == {"mean", "std", "anomalies", "scores"}
    assert got["mean"] == pytest.approx(want["mean"], rel=1e-12, abs=1e-300)
    assert got["std"] == pytest.approx(want["std"], rel=1e-12, abs=1e-300)
    assert got["anomalies"] == want["anomalies"]
    assert got["scores"] == pytest.approx(want["scores"], rel=1e-12, abs=1e-12)


# ---- manifests -----------------------------------------------------------------------


def test_every_plugin_named_in_the_brief_ships_a_manifest() -> None:
    shipped = {manifest_id(m) for m in MANIFESTS}
    hostile = {"spin", "membomb", "recurse", "hugeout", "sneaky", "tampered"}
    assert shipped == {"anomaly", "hello", "upper", "readfile"} | {f"hostile/{h}" for h in hostile}


@pytest.mark.parametrize("manifest", MANIFESTS, ids=manifest_id)
def test_manifest_sha256_matches_its_module_except_tampered(manifest: Path) -> None:
    spec = load_manifest(manifest)
    digest = hashlib.sha256((manifest.parent / spec["module"]).read_bytes()).hexdigest()
    if spec["name"] == "tampered":
        assert digest != spec["sha256"]
    else:
        assert digest == spec["sha256"], "stale hash: run `bash build.sh plugins`"


def test_tampered_is_hello_with_one_byte_changed() -> None:
    hello = (PLUGINS / "hello" / "hello.wasm").read_bytes()
    tampered = (PLUGINS / "hostile" / "tampered" / "tampered.wasm").read_bytes()
    assert len(hello) == len(tampered)
    assert sum(a != b for a, b in zip(hello, tampered, strict=True)) == 1
    spec = load_manifest(PLUGINS / "hostile" / "tampered" / "frys-plugin.toml")
    assert spec["sha256"] == hashlib.sha256(hello).hexdigest()


@pytest.mark.parametrize("manifest", MANIFESTS, ids=manifest_id)
def test_module_exports_and_imports_match_its_manifest(manifest: Path) -> None:
    spec = load_manifest(manifest)
    module = compiled(manifest.parent / spec["module"])
    exports = {e.name: e.type for e in module.exports}
    assert isinstance(exports.get("memory"), wasmtime.MemoryType)

    def signature(name: str) -> tuple[list[str], list[str]]:
        func = exports[name]
        assert isinstance(func, wasmtime.FuncType), name
        return [str(p) for p in func.params], [str(r) for r in func.results]

    if spec["kind"] == "command":
        assert [e["name"] for e in spec["exports"]] == ["_start"]
        assert signature("_start") == ([], [])
        assert "wasi" in spec["capabilities"]
        assert {i.module for i in module.imports} <= {"wasi_snapshot_preview1"}
        return

    assert spec["kind"] == "reactor"
    assert signature("input_buffer") == (["i32"], ["i32"])
    assert not {"alloc", "dealloc"} & set(exports), "alloc/dealloc are not part of the ABI"
    for export in spec["exports"]:
        assert signature(export["name"]) == (["i32", "i32"], ["i64"])
    for imp in module.imports:
        assert imp.module == "frys"
        capability = CAPABILITY_OF_IMPORT[str(imp.name)]
        if spec["name"] == "sneaky":
            assert capability not in spec["capabilities"]
        else:
            assert capability is None or capability in spec["capabilities"], imp.name


# ---- anomaly -------------------------------------------------------------------------

ANOMALY = PLUGINS / "anomaly" / "anomaly.wasm"

DETECT_CASES = [
    ([1, 2, 3, 4, 100, 2, 3, 1, 2, 3], 2.0),
    ([20.5, 20.7, 20.6, 20.4, 35.2, 20.5, 20.6, 20.5, 20.4, 20.6, 20.5, 20.7], 3.0),
    ([-1.5e-3, 2.25e-3, -7e-4, 9.1e-3, 1.2e-2], 1.0),
    ([5, 5, 5, 5], 3.0),
    ([], 3.0),
    ([1e100, -1e100, 0, 3e99], 1.0),
]


@pytest.mark.parametrize(("values", "threshold"), DETECT_CASES)
def test_anomaly_detect_matches_the_python_reference(values: list[float], threshold: float) -> None:
    got = Reactor(ANOMALY).call_json("detect", {"values": values, "threshold": threshold})
    assert_same_detection(got, reference_detect([float(v) for v in values], threshold))


def test_anomaly_detect_matches_the_reference_on_random_windows() -> None:
    rng = random.Random(4)
    plugin = Reactor(ANOMALY)
    for _ in range(100):
        scale = 10.0 ** rng.randint(-6, 6)
        values = [rng.gauss(20, 3) * scale for _ in range(rng.randint(1, 30))]
        got = plugin.call_json("detect", {"values": values, "threshold": 2.0})
        assert_same_detection(got, reference_detect(values, 2.0))


def test_anomaly_threshold_defaults_to_3_and_json_whitespace_is_accepted() -> None:
    text = b' {\n\t"values" : [ 1 , 1, 1,1,1,1,1,1,1,1, -2.5E+1 ]\r\n} \n'
    got = json.loads(Reactor(ANOMALY).call("detect", text))
    assert_same_detection(got, reference_detect([1.0] * 10 + [-25.0]))
    assert got["anomalies"] == [10]


def test_anomaly_detect_batch_answers_like_detect_for_each_input() -> None:
    inputs = [{"values": v, "threshold": t} for v, t in DETECT_CASES]
    plugin = Reactor(ANOMALY)
    assert plugin.call_json("detect_batch", inputs) == [
        plugin.call_json("detect", i) for i in inputs
    ]
    assert plugin.call_json("detect_batch", []) == []


@pytest.mark.parametrize(
    ("export", "text", "message"),
    [
        ("detect", b"", "expected '{' (an object with \"values\") at byte 0"),
        ("detect", b"{}", 'missing key "values" at byte 1'),
        ("detect", b'{"values":[1,]}', "expected a number at byte 13"),
        ("detect", b'{"values":[01]}', "expected ',' or ']' in \"values\" at byte 12"),
        ("detect", b'{"values":["1"]}', "expected a number at byte 11"),
        ("detect", b'{"values":[1],"window":5}', "unknown key"),
        ("detect", b'{"values":[1],"values":[2]}', 'duplicate key "values"'),
        ("detect", b'{"values":[1e999]}', "number out of range for a double at byte 11"),
        ("detect", b'{"values":[1]} []', "unexpected data after the input at byte 15"),
        ("detect_batch", b'[{"values":[1]}, {"values":1}]', "item 1: expected '['"),
    ],
)
def test_anomaly_refuses_other_shapes_through_fail(export: str, text: bytes, message: str) -> None:
    with pytest.raises(PluginFailed) as failed:
        Reactor(ANOMALY).call(export, text)
    assert failed.value.args[0].startswith(f"anomaly.{export}: ")
    assert message in failed.value.args[0]


def test_anomaly_logs_one_debug_line_per_call() -> None:
    plugin = Reactor(ANOMALY)
    plugin.call_json("detect", {"values": [1, 2, 3, 50], "threshold": 1.5})
    plugin.call_json("detect_batch", [{"values": [1]}, {"values": [2, 3]}])
    assert plugin.logs == [
        (0, "detect: 1 input, 4 values, 1 anomalies"),
        (0, "detect_batch: 2 inputs, 3 values, 0 anomalies"),
    ]


def test_anomaly_memory_does_not_grow_over_10000_calls_into_one_instance() -> None:
    # The arena is reset at the start of every call; without that, these calls would
    # take ~50 MB. Failures, batches and smaller inputs must not leak either.
    plugin = Reactor(ANOMALY)
    plugin.call_json("detect", {"values": list(range(5000))})
    pages = plugin.memory.size(plugin.store)
    window = {"values": [float(i % 7) for i in range(100)], "threshold": 1.0}
    text = json.dumps(window).encode()
    batch = json.dumps([window, window]).encode()
    for i in range(10_000):
        if i % 100 == 1:
            with pytest.raises(PluginFailed):
                plugin.call("detect", b'{"values":[1,"x"]}')
        elif i % 100 == 2:
            assert len(json.loads(plugin.call("detect_batch", batch))) == 2
        else:
            assert plugin.call("detect", text).startswith(b'{"mean":')
    assert plugin.memory.size(plugin.store) == pages
    assert plugin.input_buffer_sizes == [max(len(json.dumps({"values": list(range(5000))})), 4096)]


def test_anomaly_input_buffer_grows_and_keeps_its_place_clear_of_outputs() -> None:
    plugin = Reactor(ANOMALY)
    small = {"values": [1, 2, 3, 50], "threshold": 1.5}
    want = plugin.call_json("detect", small)
    big = {"values": [float(i) for i in range(20_000)]}
    assert_same_detection(plugin.call_json("detect", big), reference_detect(big["values"]))
    assert len(plugin.input_buffer_sizes) == 2
    assert plugin.call_json("detect", small) == want


# ---- hello ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        b'{"a": [1, 2.5, "\xc3\xa9"], "b": null}',
        b'"x"',
        b"",
        b"[" * 3 + b"]" * 3,
        b'"' + b"y" * 200_000 + b'"',  # past the first page: input_buffer grows memory
    ],
)
def test_hello_echo_returns_its_input_unchanged(text: bytes) -> None:
    assert Reactor(PLUGINS / "hello" / "hello.wasm").call("echo", text) == text


def test_hello_reuses_one_input_buffer_across_calls() -> None:
    plugin = Reactor(PLUGINS / "hello" / "hello.wasm")
    for n in (10, 4000, 4096, 10):
        assert plugin.call("echo", b"1" * n) == b"1" * n
    assert plugin.input_buffer_sizes == [4096]
    assert plugin.call("echo", b"2" * 5000) == b"2" * 5000
    assert plugin.input_buffer_sizes == [4096, 8192]


def test_hello_greet_says_hello_world() -> None:
    assert Reactor(PLUGINS / "hello" / "hello.wasm").call_json("greet", None) == {"hello": "world"}


# ---- upper (WASI command) ------------------------------------------------------------


def run_command(wasm: Path, stdin: bytes, tmp_path: Path) -> bytes:
    """Run a WASI command with STDIN from a file and no dirs, env or args; return stdout."""
    (tmp_path / "stdin").write_bytes(stdin)
    wasi = wasmtime.WasiConfig()
    wasi.stdin_file = str(tmp_path / "stdin")
    wasi.stdout_file = str(tmp_path / "stdout")
    store = wasmtime.Store(ENGINE)
    store.set_wasi(wasi)
    linker = wasmtime.Linker(ENGINE)
    linker.define_wasi()
    instance = linker.instantiate(store, compiled(wasm))
    try:
        start = instance.exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        start(store)
    except wasmtime.ExitTrap as exit_trap:
        assert exit_trap.code == 0
    return (tmp_path / "stdout").read_bytes()


def test_upper_uppercases_the_strings_of_its_json_input(tmp_path: Path) -> None:
    text = b'{"msg": "hello, wasi\\n caf\\u00e9", "ok": true, "n": 1e5}'
    out = run_command(PLUGINS / "upper" / "upper.wasm", text, tmp_path)
    assert out == b'{"MSG": "HELLO, WASI\\n CAF\\u00E9", "OK": true, "N": 1e5}'
    assert json.loads(out) == {"MSG": "HELLO, WASI\n CAF\u00e9", "OK": True, "N": 1e5}


def test_upper_streams_inputs_larger_than_its_buffer(tmp_path: Path) -> None:
    text = json.dumps(["abc xyz"] * 20000).encode()
    out = run_command(PLUGINS / "upper" / "upper.wasm", text, tmp_path)
    assert out == text.upper()


# ---- hostile -------------------------------------------------------------------------


def test_hugeout_returns_a_real_4_mib_string_and_claims_100_mb() -> None:
    plugin = Reactor(PLUGINS / "hostile" / "hugeout" / "hugeout.wasm")
    out = plugin.call("run", b"null")
    assert len(out) == 4 * 1024 * 1024 and json.loads(out) == "A" * (len(out) - 2)
    plugin.call("run", b"null")  # a second call reuses the grown memory
    packed = plugin.func("claim")(plugin.store, plugin.in_ptr, 0)
    assert isinstance(packed, int)
    assert packed & 0xFFFF_FFFF == 100_000_000
    assert plugin.memory.data_len(plugin.store) < 100_000_000
