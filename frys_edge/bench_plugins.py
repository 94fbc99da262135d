"""Plugin benchmarks: the sandbox's cost per call, per batched input, per cached load, for fuel.

Every figure sits beside a floor measured in the same run: a raw wasmtime-py call of the same
export (no limits, no pool, no JSON), or the same compute loop with fuel metering off. Run
with `frys bench --plugins [--quick] [--json FILE]`.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from frys_edge.bench import Result, format_table, median_per_op
from frys_edge.sandbox import load_plugin, shared_engine

# echo returns its input; sum(n) loops n times (compute-bound, for fuel); both use the ABI.
WAT = """
(module
  (memory (export "memory") 4)
  (func (export "input_buffer") (param i32) (result i32) (i32.const 1024))
  (func (export "echo") (param $p i32) (param $n i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32))
            (i64.extend_i32_u (local.get $n))))
  (func (export "sum") (param $n i32) (result i64)
    (local $i i32) (local $acc i64)
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (local.set $acc (i64.add (local.get $acc) (i64.extend_i32_u (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (local.get $acc))
)
"""


def _plugin_dir(tmp: Path) -> Path:
    import wasmtime

    directory = tmp / "bench"
    directory.mkdir()
    wasm = wasmtime.wat2wasm(WAT)
    (directory / "bench.wasm").write_bytes(wasm)
    (directory / "frys-plugin.toml").write_text(
        'name = "bench"\nversion = "1"\nmodule = "bench.wasm"\n'
        f'sha256 = "{hashlib.sha256(wasm).hexdigest()}"\n'
        '[[exports]]\nname = "echo"\nbatch = true\n'
        "[limits]\nfuel = 1000000000\nmemory_pages = 64\nmax_output = 16777216\n"
    )
    return directory


def _bare_store(fuel: bool) -> tuple[Any, Any]:
    """A plain wasmtime engine and store (no epochs, no limits), fuel on or off."""
    import wasmtime

    config = wasmtime.Config()
    config.consume_fuel = fuel
    engine = wasmtime.Engine(config)
    store = wasmtime.Store(engine)
    if fuel:
        store.set_fuel(10**15)
    return engine, store


def _raw(fuel: bool) -> tuple[object, object, object]:
    """A bare wasmtime instance of the same module: (store, exports, engine)."""
    import wasmtime

    engine, store = _bare_store(fuel)
    instance = wasmtime.Instance(store, wasmtime.Module(engine, WAT), [])
    return store, instance.exports(store), engine


ANOMALY = Path(__file__).resolve().parent.parent / "plugins" / "anomaly" / "anomaly.wasm"


def _anomaly_seconds(fuel: bool, values: bytes, rounds: int) -> float:
    """Median time of one raw `detect` call into the shipped anomaly plugin."""
    import wasmtime

    engine, store = _bare_store(fuel)
    linker = wasmtime.Linker(engine)
    i32 = wasmtime.ValType.i32()
    linker.define_func("frys", "log", wasmtime.FuncType([i32, i32, i32], []), lambda *a: None)
    linker.define_func("frys", "fail", wasmtime.FuncType([i32, i32], []), lambda *a: None)
    instance = linker.instantiate(store, wasmtime.Module.from_file(engine, str(ANOMALY)))
    ex: Any = instance.exports(store)
    ptr = ex["input_buffer"](store, len(values))
    ex["memory"].write(store, values, ptr)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ex["detect"](store, ptr, len(values))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _results(tmp: Path, quick: bool) -> list[Result]:
    rounds = 5 if quick else 9
    n = 2000 if quick else 10000
    directory = _plugin_dir(tmp)
    cache = tmp / "cache"
    plugin = load_plugin(directory, cache_dir=cache, pool_size=1)
    store, exports, _ = _raw(fuel=False)
    echo = exports["echo"]  # type: ignore[index]

    def raw(k: int) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            echo(store, 1024, 7)
        return time.perf_counter() - t0

    def sandboxed(k: int) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            plugin.call("echo", {"a": 1})
        return time.perf_counter() - t0

    floor_call = median_per_op(raw, n, rounds)
    call = median_per_op(sandboxed, n, rounds)
    batch = [{"v": i, "ts": 1795700000.5} for i in range(1000)]

    def batched(k: int) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            plugin.call_batch("echo", batch)
        return time.perf_counter() - t0

    per_input = median_per_op(batched, 20, rounds) / len(batch)

    loads = []
    shared_engine()
    for _ in range(rounds):
        t0 = time.perf_counter()
        loaded = load_plugin(directory, cache_dir=cache, pool_size=1)
        loads.append(time.perf_counter() - t0)
        assert loaded.cache_hit
    load = statistics.median(loads)

    loop = 200_000 if quick else 1_000_000
    fuel_store, fuel_exports, _ = _raw(fuel=True)
    free_store, free_exports, _ = _raw(fuel=False)

    def summing(store: object, exports: object) -> float:
        fn = exports["sum"]  # type: ignore[index]
        t0 = time.perf_counter()
        fn(store, loop)
        return time.perf_counter() - t0

    fuel_on = statistics.median(summing(fuel_store, fuel_exports) for _ in range(rounds))
    fuel_off = statistics.median(summing(free_store, free_exports) for _ in range(rounds))

    values = json.dumps({"values": [20 + (i % 17) * 0.5 for i in range(5000)]}).encode()
    anomaly_rounds = 21 if quick else 101
    anomaly_on = anomaly_off = 0.0
    if ANOMALY.exists():  # the plugins dir ships with the source, not the wheel
        anomaly_on = _anomaly_seconds(True, values, anomaly_rounds)
        anomaly_off = _anomaly_seconds(False, values, anomaly_rounds)

    calls = 20_000 if quick else 100_000
    for _ in range(1000):
        plugin.call("echo", {"a": 1})
    before = _rss()
    for i in range(calls):
        plugin.call("echo", {"a": i})
    growth = _rss() - before
    mb = 1024 * 1024
    return [
        Result(
            "plugin call through the sandbox (trivial export)",
            call * 1e6,
            "µs",
            "raw wasmtime-py call",
            floor_call * 1e6,
            "≤ 1.5x floor",
            call <= 1.5 * floor_call,
        ),
        Result(
            "batch of 1,000 inputs in one call, per input",
            per_input * 1e6,
            "µs",
            "raw wasmtime-py call",
            floor_call * 1e6,
            "≤ 2 µs",
            per_input <= 2e-6,
        ),
        Result(
            "load of a cached (AOT) module",
            load * 1e3,
            "ms",
            "raw wasmtime-py call",
            floor_call * 1e3,
            "≤ 5 ms",
            load <= 5e-3,
        ),
        Result(
            f"fuel metering on, empty {loop:,}-iteration loop (worst case)",
            fuel_on * 1e3,
            "ms",
            "same loop, fuel off",
            fuel_off * 1e3,
            "≤ 1.3x floor",
            fuel_on <= 1.3 * fuel_off,
        ),
        Result(
            "fuel metering on, anomaly detect over 5,000 values",
            anomaly_on * 1e3,
            "ms",
            "same call, fuel off",
            anomaly_off * 1e3,
            "≤ 1.3x floor",
            anomaly_on <= 1.3 * anomaly_off,
        ),
        Result(
            f"RSS growth over {calls:,} calls",
            growth / mb,
            "MiB",
            "RSS before the calls",
            before / mb,
            "≤ 10 MB",
            growth <= 10 * mb,
        ),
    ]


def run_plugin_benchmarks(json_path: str | None = None, quick: bool = False) -> int:
    """Run the plugin benchmarks, print the table, optionally write JSON; an exit code."""
    with tempfile.TemporaryDirectory(prefix="frys-bench-plugins-") as tmp:
        results = _results(Path(tmp), quick)
    print(format_table(results))
    if json_path:
        payload = [{**msgspec.structs.asdict(r), "ratio": r.ratio} for r in results]
        Path(json_path).write_text(json.dumps(payload, indent=2) + "\n")
    return 0
