// Runs frys_edge/core.py on MicroPython (the WebAssembly port from npm).
// With no argument: every check_* in tests/core_checks.py, printing "ok NAME" or
// "FAIL NAME: ERROR" per check and a summary line; exits non-zero when a check fails.
// With SCRIPT.py: imports the script beside core.py and calls its run(), printing its output;
// exits non-zero when it raises.
// Usage: npm ci && node tests/micropython_runner.mjs [examples/micropython/sensor_loop.py]

import { readFileSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");

const CHECKS_DRIVER = `
import io
import sys

sys.path.insert(0, "/frys")
import core_checks

_names = sorted(name for name in dir(core_checks) if name.startswith("check_"))
_failed = 0
for _name in _names:
    try:
        getattr(core_checks, _name)()
    except Exception as exc:
        _failed += 1
        _trace = io.StringIO()
        sys.print_exception(exc, _trace)
        print("FAIL " + _name + ": " + repr(exc))
        for _line in _trace.getvalue().splitlines():
            print("    " + _line)
    else:
        print("ok " + _name)
print("micropython " + sys.version.split(";")[-1].strip())
print(str(len(_names) - _failed) + " passed, " + str(_failed) + " failed")
`;

// MicroPython prints a traceback itself when runPython raises, so the example driver is plain.
const exampleDriver = (module) => `
import sys

sys.path.insert(0, "/frys")
import ${module}

${module}.run()
`;

const script = process.argv[2];
const output = [];
const mp = await loadMicroPython({
  heapsize: 32 * 1024 * 1024,
  stdout: (line) => output.push(line),
  stderr: (line) => output.push(line),
});
mp.FS.mkdir("/frys");
mp.FS.writeFile("/frys/core.py", readFileSync(join(root, "frys_edge", "core.py"), "utf8"));
let driver = CHECKS_DRIVER;
if (script === undefined) {
  mp.FS.writeFile("/frys/core_checks.py", readFileSync(join(root, "tests", "core_checks.py"), "utf8"));
} else {
  const module = basename(script, ".py");
  mp.FS.writeFile(`/frys/${module}.py`, readFileSync(resolve(script), "utf8"));
  driver = exampleDriver(module);
}

let crashed = null;
try {
  mp.runPython(driver);
} catch (error) {
  crashed = error;
}
process.stdout.write(output.map((line) => line + "\n").join(""));
if (crashed !== null) {
  process.stdout.write(`ERROR ${script ?? "the checks"} could not run: ${crashed.message}\n`);
  process.exit(2);
}
process.exit(output.some((line) => line.startsWith("FAIL ")) ? 1 : 0);
