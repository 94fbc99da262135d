// Drives dist/wasm32/frys.mjs under Node for tests/test_target_wasm32.py and bench/wasm32_steps.py.
// Prints one JSON object a line.
//
//   node tests/test_target_wasm32_node.mjs BUNDLE DATA_DIR first    start, run the gateway's
//       sensor workflow 3 times, print each run, then wait to be killed (SIGKILL)
//   node tests/test_target_wasm32_node.mjs BUNDLE DATA_DIR second   start again, wait for
//       resumed runs to end, print the stored runs and KV, run once more, stop
//   node tests/test_target_wasm32_node.mjs BUNDLE DATA_DIR limits   no runtime: load plugins
//       with the sandbox on Node's WebAssembly (anomaly, and hostile ones copied from
//       plugins/) and print how each call ended

import { readdirSync, readFileSync } from "node:fs";

const [bundle, dataDir, phase] = process.argv.slice(2);
const { startFrys, loadFrysPyodide } = await import(new URL("frys.mjs", `file://${bundle}/`).href);
const print = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);

if (phase === "limits") {
  const { pyodide } = await loadFrysPyodide({ dataDir });
  const plugins = new URL("../plugins/", import.meta.url);
  for (const name of ["hostile/hugeout", "hostile/recurse", "hostile/sneaky", "hostile/tampered"]) {
    const dir = new URL(`${name}/`, plugins);
    pyodide.FS.mkdirTree(`/plugins/${name}`);
    for (const file of readdirSync(dir)) {
      pyodide.FS.writeFile(`/plugins/${name}/${file}`, readFileSync(new URL(file, dir)));
    }
  }
  const results = await pyodide.runPythonAsync(`
import json
from frys_edge.sandbox import Grant, PluginError, load_plugin

def attempt(fn):
    try:
        return {"ok": fn()}
    except PluginError as e:
        return {"kind": e.kind, "error": str(e)}

anomaly = load_plugin("/app/plugins/anomaly", Grant(capabilities=["log"]))
hugeout = load_plugin("/plugins/hostile/hugeout")
recurse = load_plugin("/plugins/hostile/recurse")
sneaky = load_plugin("/plugins/hostile/sneaky")
window = {"values": [20.0, 20.5, 21.0, 35.0, 20.2], "threshold": 1.5}


def live_instances_after(calls):
    """_JsInstance objects alive after that many calls of a fresh-instance-per-call copy of
    the anomaly plugin: each discarded instance must be freed, JS side and Python side."""
    import gc
    import pathlib
    import shutil

    from frys_edge.sandbox import _JsInstance

    shutil.copytree("/app/plugins/anomaly", "/plugins/anomaly-call")
    manifest = pathlib.Path("/plugins/anomaly-call/frys-plugin.toml")
    text = manifest.read_text().replace('format = "json"', 'format = "json"\\nisolation = "call"')
    manifest.write_text(text)
    fresh = load_plugin("/plugins/anomaly-call", Grant(capabilities=["log"]))
    for _ in range(calls):
        fresh.call("detect", window)
    gc.collect()
    return sum(isinstance(o, _JsInstance) for o in gc.get_objects())

# Over 4 MiB of input: the anomaly plugin's input_buffer cannot grow memory past its
# limits.memory_pages (64 pages) and traps.
huge = {"values": [1.5] * 1_100_000}
json.dumps({
    "detect": attempt(lambda: anomaly.call("detect", window)),
    "batch": attempt(lambda: anomaly.call_batch("detect_batch", [window, window])),
    "bad_input": attempt(lambda: anomaly.call("detect", {"values": "nope"})),
    "memory_cap": attempt(lambda: anomaly.call("detect", huge)),
    "after_memory_cap": attempt(lambda: anomaly.call("detect", window)),
    "output_cap": attempt(lambda: hugeout.call("run", None)),
    "output_claim": attempt(lambda: hugeout.call("claim", None)),
    "stack": attempt(lambda: recurse.call("run", None)),
    "ungranted": attempt(lambda: sneaky.call("run", None)),
    "tampered": attempt(lambda: load_plugin("/plugins/hostile/tampered").name),
    "live_instances": live_instances_after(40),
    "metered": anomaly.metered,
    "calls": anomaly.calls,
    "errors": anomaly.errors,
})
`);
  print({ event: "limits", ...JSON.parse(results) });
  process.exit(0);
}

const frys = await startFrys({ dataDir });
print({ event: "ready", readyMs: frys.readyMs, pythonStartMs: frys.pythonStartMs });

const summary = ({ run, steps }) => ({
  id: run.id,
  status: run.status,
  outputs: run.outputs,
  steps: Object.fromEntries(steps.map((s) => [s.name, s.status])),
  detect: steps.find((s) => s.name === "detect")?.output ?? null,
});

if (phase === "first") {
  const seen = [];
  frys.subscribe("workflow/read_sensor/#", (topic, payload) => seen.push({ topic, payload }));
  for (let i = 0; i < 3; i++) {
    print({ event: "run", ...summary(await frys.run("read_sensor", { sensor: "boiler" })) });
  }
  print({ event: "events", seen: seen.length });
  print({ event: "waiting" });
  setInterval(() => {}, 1000); // the interval trigger keeps running runs until the kill
} else if (phase === "second") {
  const deadline = Date.now() + 15000;
  while (frys.runs({ status: "running" }).length && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const runs = frys.runs({ limit: 100000 });
  print({
    event: "state",
    runs: runs.map((r) => ({ id: r.id, status: r.status })),
    latest: frys.kv("workflow", "latest/boiler"),
    readings: frys.events(0, 100000).filter((e) => e.topic === "readings/boiler").length,
  });
  print({ event: "run", ...summary(await frys.run("read_sensor", { sensor: "boiler" })) });
  await frys.stop();
  print({ event: "stopped" });
} else {
  await frys.stop();
}
