"""Measure the wasm32 target: start time under Node, durable step cost against CPython, size.

Run from the repository root after `bash build.sh wasm32` (needs node):

    .venv/bin/python bench/wasm32.py [--starts 5] [--runs 25] [--json bench/results/wasm32.json]

- start: `startFrys()` of dist/wasm32/frys.mjs in a fresh Node process (Pyodide load, wheels
  installed, the gateway runtime started with its plugin and workflows), median of --starts;
  beside it a bare `loadPyodide()` of the same files, the part no Frys code can shorten.
- durable step: the workflow benchmark's 20-step chain of a no-op action
  (frys_edge/bench_workflows.py), runs started and awaited one after another, run time / 20,
  median of rounds; the same Python code in Pyodide (data dir on NODEFS, i.e. a host file, and
  on MEMFS, in memory only) and in CPython (threads = 4, the default, and threads = 0).
- size: dist/wasm32 from its manifest.json, by part.
The machine is shared: compare ratios more than absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "dist" / "wasm32"

# Run as is by CPython and by Pyodide: the same workflow, the same engine, the same timing.
MEASURE = """
import statistics
from pathlib import Path

from frys_edge.bench_workflows import CHAIN_STEPS, _chain, _runtime, bench_runs_one_at_a_time


async def measure(data_dir, sync, threads, runs, rounds):
    chain = _chain("chain", CHAIN_STEPS)
    settings = {"storage.sync": sync, "system.threads": threads}
    async with _runtime(Path(data_dir), **settings) as rt:
        await bench_runs_one_at_a_time(rt, chain, 5)  # warm-up
        per_step = [
            await bench_runs_one_at_a_time(rt, chain, runs) / (runs * CHAIN_STEPS)
            for _ in range(rounds)
        ]
    return statistics.median(per_step) * 1e6
"""

STEPS_JS = """
import {{ loadFrysPyodide }} from "{bundle}/frys.mjs";
const {{ pyodide, dataPath }} = await loadFrysPyodide({{ dataDir: "{data}" }});
pyodide.runPython({measure});
for (const [where, dir] of [["NODEFS", dataPath], ["MEMFS", "/tmp/bench"]]) {{
  for (const sync of ["normal", "full"]) {{
    const us = await pyodide.runPythonAsync(
      `await measure("${{dir}}/${{sync}}", "${{sync}}", 0, {runs}, {rounds})`);
    console.log(JSON.stringify({{ where, sync, us }}));
  }}
}}
"""

START_JS = """
import {{ startFrys }} from "{bundle}/frys.mjs";
const frys = await startFrys({{ dataDir: "{data}" }});
console.log(JSON.stringify({{ readyMs: frys.readyMs, pythonStartMs: frys.pythonStartMs }}));
await frys.stop();
"""

LOAD_JS = """
const t0 = performance.now();
const {{ loadPyodide }} = await import("{bundle}/pyodide/pyodide.mjs");
await loadPyodide({{ indexURL: "{bundle}/pyodide/" }});
console.log(JSON.stringify({{ loadMs: performance.now() - t0 }}));
"""


def node(script: str) -> list[dict[str, float]]:
    done = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        sys.exit(f"node failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def starts(count: int) -> dict[str, Any]:
    ready, python, load = [], [], []
    for _ in range(count):
        with tempfile.TemporaryDirectory() as tmp:
            out = node(START_JS.format(bundle=BUNDLE, data=tmp))[-1]
        ready.append(out["readyMs"])
        python.append(out["pythonStartMs"])
        load.append(node(LOAD_JS.format(bundle=BUNDLE))[-1]["loadMs"])
    return {
        "ready_ms": statistics.median(ready),
        "ready_ms_all": [round(v) for v in ready],
        "runtime_start_ms": statistics.median(python),
        "bare_load_pyodide_ms": statistics.median(load),
    }


def steps(runs: int, rounds: int) -> dict[str, float]:
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = STEPS_JS.format(
            bundle=BUNDLE, data=tmp, measure=json.dumps(MEASURE), runs=runs, rounds=rounds
        )
        for line in node(script):
            results[f"pyodide {line['where']} sync={line['sync']}"] = line["us"]
    namespace: dict[str, object] = {}
    exec(MEASURE, namespace)
    measure = namespace["measure"]
    for threads in (4, 0):
        for sync in ("normal", "full"):
            with tempfile.TemporaryDirectory() as tmp:
                us = asyncio.run(measure(tmp, sync, threads, runs, rounds))  # type: ignore[operator]
            results[f"cpython threads={threads} sync={sync}"] = us
    return results


def size() -> dict[str, object]:
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    files = manifest["files"]
    biggest = sorted(files.items(), key=lambda kv: -kv[1]["size"])[:6]
    return {
        "total_bytes": manifest["total_bytes"],
        "bytes_by_part": manifest["bytes_by_part"],
        "largest_files": {name: info["size"] for name, info in biggest},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--runs", type=int, default=25, help="runs of the chain a round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not (BUNDLE / "manifest.json").exists():
        sys.exit("no dist/wasm32: run `bash build.sh wasm32` first")

    result: dict[str, Any] = {
        "start": starts(args.starts),
        "step_us": steps(args.runs, args.rounds),
        "size": size(),
    }
    start = result["start"]
    print(f"{'what':<44} {'value':>12}")
    print(f"{'startFrys() to ready, median (Node)':<44} {start['ready_ms']:>9.0f} ms")
    print(f"{'  of which the runtime start':<44} {start['runtime_start_ms']:>9.0f} ms")
    print(f"{'bare loadPyodide(), median':<44} {start['bare_load_pyodide_ms']:>9.0f} ms")
    cpython = result["step_us"]["cpython threads=4 sync=normal"]
    for name, us in result["step_us"].items():
        print(f"{'durable step, ' + name:<44} {us:>9.0f} µs  {us / cpython:5.1f}x")
    total = result["size"]["total_bytes"]
    print(f"{'dist/wasm32 total':<44} {total / 2**20:>9.2f} MiB")
    for part, nbytes in result["size"]["bytes_by_part"].items():
        print(f"{'  ' + part:<44} {nbytes / 2**20:>9.2f} MiB")
    for name, nbytes in result["size"]["largest_files"].items():
        print(f"{'  file ' + name:<44} {nbytes / 2**20:>9.2f} MiB")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
