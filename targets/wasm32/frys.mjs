// frys.mjs: runs Frys Edge in Pyodide, in Node or a browser, from the files of dist/wasm32/.
//
//   import { startFrys } from "./frys.mjs";
//   const frys = await startFrys({ dataDir: "./data/wasm32" });    // Node: a host directory
//   const frys = await startFrys({ dataDir: "/frys-demo" });       // browser: IndexedDB name
//   const run = await frys.run("read_sensor", { sensor: "boiler" }); // waits for the run's end
//   frys.runs({ limit: 20 }); frys.kv("workflow", "latest/boiler");
//   const off = frys.subscribe("workflow/#", (topic, payload) => ...); off();
//   await frys.stop();
//
// Nothing is fetched from a CDN: Pyodide's runtime files, the wheels and the app (config,
// workflows, plugins) all come from this bundle. See README.md beside this file.

const HERE = new URL("./", import.meta.url);
const IS_NODE = typeof process !== "undefined" && Boolean(process.versions?.node);
const MOUNT = "/data";

async function bundleBytes(rel) {
  const url = new URL(rel, HERE);
  if (IS_NODE) {
    const { readFile } = await import("node:fs/promises");
    return new Uint8Array(await readFile(url));
  }
  const response = await fetch(url);
  if (!response.ok) throw new Error(`frys: cannot load ${url}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

function syncfs(pyodide, populate) {
  return new Promise((resolve, reject) =>
    pyodide.FS.syncfs(populate, (err) => (err ? reject(err) : resolve())),
  );
}

// Browser persistence: the data dir lives in memory (IDBFS) and is copied to IndexedDB by
// FS.syncfs. A commit schedules a copy; one runs at a time, and commits made while it runs
// schedule one more, so every commit reaches IndexedDB within about two copies' time.
function idbfsSyncer(pyodide, onError) {
  let running = null;
  let again = false;
  const schedule = () => {
    if (running) {
      again = true;
      return;
    }
    running = syncfs(pyodide, false)
      .catch(onError)
      .finally(() => {
        running = null;
        if (again) {
          again = false;
          schedule();
        }
      });
  };
  const flush = async () => {
    while (running) await running;
    await syncfs(pyodide, false);
  };
  return { schedule, flush };
}

// Emscripten's flock is a no-op, so storage's own data-dir lock cannot see another Node
// process: this lock file, holding the pid, does. A holder that is gone (killed) is stale.
async function lockHostDir(host) {
  const fs = await import("node:fs");
  const { join } = await import("node:path");
  const path = join(host, "frys.node.lock");
  const alive = (pid) => {
    try {
      process.kill(pid, 0);
      return true;
    } catch (err) {
      return err.code === "EPERM";
    }
  };
  try {
    fs.writeFileSync(path, String(process.pid), { flag: "wx" });
  } catch (err) {
    if (err.code !== "EEXIST") throw err;
    const holder = Number(fs.readFileSync(path, "utf8"));
    if (holder && holder !== process.pid && alive(holder)) {
      throw new Error(
        `frys: data dir ${host} is in use by process ${holder}; stop it first, or give this one another dataDir`,
      );
    }
    fs.writeFileSync(path, String(process.pid));
  }
  const release = () => {
    try {
      if (fs.readFileSync(path, "utf8") === String(process.pid)) fs.unlinkSync(path);
    } catch {
      // already gone
    }
  };
  process.once("exit", release);
  return release;
}

async function mountDataDir(pyodide, dataDir, onError) {
  if (IS_NODE) {
    const { mkdirSync } = await import("node:fs");
    const { resolve } = await import("node:path");
    const host = resolve(dataDir);
    mkdirSync(host, { recursive: true });
    const release = await lockHostDir(host);
    pyodide.FS.mkdirTree(MOUNT);
    pyodide.mountNodeFS(MOUNT, host);
    return { where: host, syncer: null, release };
  }
  // IDBFS names its IndexedDB database after the mount point: one per dataDir.
  const mount = dataDir.startsWith("/") ? dataDir : `/${dataDir}`;
  pyodide.FS.mkdirTree(mount);
  pyodide.FS.mount(pyodide.FS.filesystems.IDBFS, {}, mount);
  await syncfs(pyodide, true);
  return { where: mount, syncer: idbfsSyncer(pyodide, onError), release: () => {} };
}

/**
 * Start Pyodide with Frys Edge installed from the bundle and the data dir mounted at the path
 * it returns (`dataPath`), without starting a runtime: for callers that drive Python directly.
 * options.dataDir: Node, a host directory (default ./data/wasm32); browser, the IndexedDB
 *   database's name (default /frys). options.onError(err): failures of background copies to
 *   IndexedDB. Resolves to {pyodide, manifest, dataPath, dataDir, syncer, release}; syncer
 *   is null under Node, else {schedule(), flush()}; release() frees the Node data-dir lock
 *   (also freed when the process exits).
 */
export async function loadFrysPyodide(options = {}) {
  const onError = options.onError ?? ((err) => console.error("frys: saving to IndexedDB failed", err));
  const manifest = JSON.parse(new TextDecoder().decode(await bundleBytes("manifest.json")));
  // The wheels and app files load while Pyodide compiles.
  const wheels = Promise.all(manifest.wheels.map((w) => bundleBytes(`wheels/${w}`)));
  const app = Promise.all(manifest.app.map((rel) => bundleBytes(`app/${rel}`)));
  const glue = bundleBytes("frys_pyodide.py");
  const indexURL = new URL("pyodide/", HERE);
  const { loadPyodide } = await import(new URL("pyodide/pyodide.mjs", HERE).href);
  const pyodide = await loadPyodide({
    indexURL: IS_NODE ? decodeURIComponent(indexURL.pathname) : indexURL.href,
    stdout: options.stdout,
    stderr: options.stderr,
  });
  const sitePackages = pyodide.runPython("import sysconfig; sysconfig.get_path('purelib')");
  for (const data of await wheels) {
    pyodide.unpackArchive(data, "wheel", { extractDir: sitePackages });
  }
  pyodide.FS.writeFile(`${sitePackages}/frys_pyodide.py`, await glue);
  const appFiles = await app;
  manifest.app.forEach((rel, i) => {
    const path = `/app/${rel}`;
    pyodide.FS.mkdirTree(path.slice(0, path.lastIndexOf("/")));
    pyodide.FS.writeFile(path, appFiles[i]);
  });
  const dataDir = options.dataDir ?? (IS_NODE ? "./data/wasm32" : "/frys");
  const { where, syncer, release } = await mountDataDir(pyodide, dataDir, onError);
  return { pyodide, manifest, dataPath: IS_NODE ? MOUNT : where, dataDir: where, syncer, release };
}

/**
 * Start Pyodide, install Frys Edge from the bundle, and start the runtime.
 * options: those of loadFrysPyodide, and config, a TOML file of the bundle's app/ dir
 *   (default app/frys.toml).
 * Resolves to the API object once the runtime is ready (stored runs resumed, plugins loaded).
 */
export async function startFrys(options = {}) {
  const t0 = performance.now();
  const config = options.config ?? "app/frys.toml";
  if (!config.startsWith("app/")) {
    throw new Error(`frys: config must be a file of the bundle's app/ dir, got ${config}`);
  }
  const { pyodide, manifest, dataPath, dataDir, syncer, release } = await loadFrysPyodide(options);
  const py = pyodide.pyimport("frys_pyodide");
  let pythonStartMs;
  try {
    pythonStartMs = await py.start(`/${config}`, dataPath, syncer?.schedule);
  } catch (err) {
    release();
    throw err;
  }
  if (syncer) await syncer.flush(); // what start wrote (migrations, resumed runs)
  const readyMs = performance.now() - t0;

  const parse = (text) => JSON.parse(text);
  return {
    pyodide,
    manifest,
    /** Where the data lives: a host directory (Node) or an IDBFS mount point (browser). */
    dataDir,
    /** Milliseconds from startFrys() to ready, and of that, the runtime's own start. */
    readyMs,
    pythonStartMs,
    /** Start a run of a loaded workflow and wait for its end: {run, steps}. */
    // Absent values go to Python as undefined (None there); JavaScript null would not.
    async run(workflow, inputs = {}, { idempotencyKey } = {}) {
      return parse(await py.run(workflow, JSON.stringify(inputs), idempotencyKey));
    },
    /** Stored runs, newest first: [{id, workflow, status, outputs, error, created_at, ...}]. */
    runs({ workflow, status, limit = 100 } = {}) {
      return parse(py.list_runs(workflow, status, limit));
    },
    /** One stored run with its steps, or null. */
    getRun(id) {
      return parse(py.get_run(id));
    },
    /** A KV entry {namespace, key, value, version, updated_at}, or null. */
    kv(namespace, key) {
      return parse(py.kv_get(namespace, key));
    },
    /** Durable events after a sequence number. */
    events(after = 0, limit = 100) {
      return parse(py.events(after, limit));
    },
    health() {
      return parse(py.health());
    },
    /** Call callback(topic, payload) for each bus message matching pattern; returns unsubscribe. */
    subscribe(pattern, callback) {
      const off = py.subscribe(pattern, (topic, payload) => callback(topic, JSON.parse(payload)));
      return () => {
        off();
        off.destroy();
      };
    },
    /** Browser: resolve once every commit so far is in IndexedDB. Node: nothing to do. */
    async sync() {
      if (syncer) await syncer.flush();
    },
    /** Stop the runtime (runs in flight resume at the next start) and save to IndexedDB. */
    async stop() {
      await py.stop();
      if (syncer) await syncer.flush();
      release();
    },
  };
}
