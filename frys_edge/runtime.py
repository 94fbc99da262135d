"""The kernel: owns config, storage, scheduler, bus, cache and plugins, and starts and stops them.

It drives the pure core (scheduler, bus, cache) on the running asyncio loop (anyio's asyncio
backend, or Pyodide's) and uses anyio for threads, timeouts and signals; with `[system]
threads = 0` (the default under Pyodide) blocking work runs inline on the loop (on CPython
a loaded WASM plugin still starts wasmtime's one deadline ticker thread).
It supervises long-running components (restarting a failed one with backoff), keeps the health
model and metrics, applies config reloads, and drains gracefully on shutdown. It speaks no SQL and
serves no HTTP.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar

import anyio
import msgspec

from frys_edge.config import (
    Config,
    ConfigError,
    ConfigWatcher,
    LoadedConfig,
    changed_keys,
    changed_sections,
    load_config,
)
from frys_edge.core import (
    BusFull,
    Cache,
    Cancelled,
    EventBus,
    FrysError,
    RetryPolicy,
    Scheduler,
    Task,
)
from frys_edge.engine import Engine
from frys_edge.metrics import Health, Metrics
from frys_edge.sandbox import Grant, HostServices, PluginError, WasmPlugin, load_plugin
from frys_edge.storage import Storage, encode_value
from frys_edge.vectors import VECTOR_ACTIONS, VectorError, VectorStore, track_collection
from frys_edge.workflow import WorkflowError

log = logging.getLogger("frys")

HOOKS = ("init", "on_load", "on_unload", "on_config_change", "cleanup")
PLUGIN_GROUP = "frys_edge.plugins"
# Keys a running runtime applies at once; the rest take effect at the next start.
LIVE_KEYS = {"system.log_level", "system.log_format", "storage.sync", "memory.limit"}
CONFIG_POLL_SECONDS = 1.0
PYTHON_GC_THRESHOLD = (700, 10, 10)
GC_THRESHOLD = 7000
MEMORY_POLL_SECONDS = 5.0
PLUGIN_POLL_SECONDS = 2.0
# A run's timeout cancels it; one still active this long after is stuck (a step ignoring it).
STUCK_GRACE_SECONDS = 5.0

T = TypeVar("T")


class NotRunning(FrysError):
    """Work was offered to a runtime that is not started or is shutting down."""


class Budget(msgspec.Struct, frozen=True):
    """Sizes of bounded structures, derived from `[memory] limit`."""

    cache_entries: int
    bus_queue: int
    max_pending_tasks: int
    sqlite_cache_kib: int


def budget_for(limit: int) -> Budget:
    """Split a memory budget (bytes) between the runtime's bounded structures."""
    mib = limit // (1024 * 1024)

    def clamp(value: int, low: int, high: int) -> int:
        return max(low, min(high, value))

    return Budget(
        # Assumes ~1 KiB an entry and ~512 B a queued message or pending task.
        cache_entries=clamp(mib * 64, 256, 1_000_000),
        bus_queue=clamp(mib * 16, 64, 100_000),
        max_pending_tasks=clamp(mib * 256, 1000, 1_000_000),
        # A sixteenth of the budget for SQLite's page caches, shared by all connections.
        sqlite_cache_kib=clamp(limit // 16 // 1024, 512, 256 * 1024),
    )


def _plugin_stamp(directory: Path) -> tuple[int, ...]:
    """Modification times of a plugin dir's files: a change means a reload."""
    try:
        return tuple(sorted(f.stat().st_mtime_ns for f in directory.iterdir() if f.is_file()))
    except FileNotFoundError:  # being replaced right now: look again at the next poll
        return ()


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        if sys.platform == "emscripten":
            return 0  # no /proc and no resource module: the WebAssembly heap is not measured
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, msg, plus any `extra` fields."""

    _skip = frozenset(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in self._skip})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(out, enc_hook=str).decode()


def configure_logging(level: str, fmt: str) -> None:
    """Send the `frys` logger to stderr at level, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


class NativePlugin:
    """A loaded Python plugin: a module or object with optional lifecycle hooks."""

    def __init__(self, name: str, obj: Any) -> None:
        self.name = name
        self.obj = obj

    async def call(self, hook: str, *args: Any) -> None:
        """Call the plugin's hook if it has one, awaiting it if it is async."""
        fn = getattr(self.obj, hook, None)
        if fn is None:
            return
        result = fn(*args)
        if inspect.isawaitable(result):
            await result


def _import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"frys_plugin_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resolve_plugin(spec: str) -> tuple[str, Any]:
    """Find a native plugin by entry-point name, `module`, `file.py`, with `:attribute`."""
    try:
        for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
            if ep.name == spec:
                return spec, ep.load()
        module_name, _, attr = spec.partition(":")
        try:
            module: ModuleType = (
                _import_file(Path(module_name))
                if module_name.endswith(".py")
                else importlib.import_module(module_name)
            )
        except (ImportError, OSError) as e:
            raise PluginError(
                f"plugin {spec!r}: no entry point of that name in group {PLUGIN_GROUP!r} and "
                f"no importable module ({e}); install it or fix the name"
            ) from e
        obj = getattr(module, attr) if attr else module
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(
            f"plugin {spec!r} could not be loaded: {type(e).__name__}: {e}; check "
            "[plugins] native and the plugin's installation"
        ) from e
    return getattr(obj, "NAME", spec), obj


Component = Callable[[], Awaitable[None]]


def _with_live_keys(running: Config, new: Config) -> Config:
    """The running config with the values of LIVE_KEYS taken from new."""
    sections: dict[str, dict[str, Any]] = {}
    for key in LIVE_KEYS:
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = getattr(getattr(new, section), name)
    return msgspec.structs.replace(
        running,
        **{
            section: msgspec.structs.replace(getattr(running, section), **values)
            for section, values in sections.items()
        },
    )


class Runtime:
    """The kernel. Use as `async with Runtime(config) as rt:`."""

    def __init__(
        self,
        config: LoadedConfig | Config | None = None,
        *,
        overrides: Mapping[str, str] | None = None,
    ) -> None:
        """Build (not start) a runtime; overrides are the CLI flags, kept across reloads."""
        if config is None:
            config = load_config(overrides=overrides)
        if isinstance(config, Config):
            config = LoadedConfig(config=config, path=None, sources={}, mtime=None)
        self.loaded = config
        self.health = Health()
        self.metrics = Metrics()
        self.plugins: dict[str, NativePlugin] = {}
        self.wasm: dict[str, WasmPlugin] = {}
        self._wasm_stamps: dict[Path, tuple[int, ...]] = {}
        self.budget = budget_for(config.config.memory.limit)
        self.scheduler = Scheduler(
            max_pending=self.budget.max_pending_tasks, on_wake=self._wake_soon
        )
        self.bus = EventBus(
            self.scheduler, default_maxsize=self.budget.bus_queue, on_space=self._bus_space
        )
        self._space: asyncio.Event | None = None
        self.cache = Cache(max_entries=self.budget.cache_entries)
        self.engine = Engine(self, max_runs=config.config.workflows.max_runs)
        self.engine.actions.update(VECTOR_ACTIONS)
        self.vectors: VectorStore | None = None
        self.storage: Storage | None = None
        self.started_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: dict[Task, asyncio.Task[Any]] = {}
        self._inline: set[Task] = set()
        self._components: set[asyncio.Task[None]] = set()
        self._service_queued = False
        self._submitting = False
        self._alarm: asyncio.TimerHandle | None = None
        self._accepting = False
        self._watcher = ConfigWatcher(config.path, overrides=overrides) if config.path else None
        self._config_listeners: list[Callable[[Config, set[str]], None]] = []
        self._tasks_run = self.metrics.counter("tasks_completed_total", "Tasks finished")
        self._task_latency = self.metrics.histogram("task_seconds", "Task run time")
        self._reloads = self.metrics.counter("config_reloads_total", "Config reloads applied")
        self._reload_errors = self.metrics.counter(
            "config_reload_errors_total", "Config reloads refused as invalid"
        )

    @property
    def config(self) -> Config:
        return self.loaded.config

    # -- start and stop -------------------------------------------------------------------

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open storage, load native plugins and start the supervised components."""
        if self._loop is not None:
            raise NotRunning("runtime is already started; start it once")
        t0 = time.perf_counter()
        cfg = self.config
        self.health.set("storage", "starting")
        self.storage = await self.blocking(self._open_storage)
        self.health.set("storage", "ok")
        # Without worker threads (Pyodide, threads = 0) no graph is built in the background.
        self.vectors = VectorStore(self.storage, background=cfg.system.threads > 0)
        # Loading a large collection takes a while: do it now, off the event loop.
        await self.blocking(self._load_vectors, self.vectors)
        if cfg.system.threads:
            anyio.to_thread.current_default_thread_limiter().total_tokens = cfg.system.threads
        # Thousands of live runs make CPython's default collector (a young-generation pass
        # every 700 allocations) cost more than the runs; raise it unless the embedding
        # program chose its own thresholds. Measured: 10,000 runs at once went 5,000 -> 7,600/s.
        if gc.get_threshold() == PYTHON_GC_THRESHOLD:
            gc.set_threshold(GC_THRESHOLD, *PYTHON_GC_THRESHOLD[1:])
        self._register_gauges()
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self.health.set("scheduler", "ok")
        try:
            for spec in cfg.plugins.native:
                await self.load_plugin(spec)
        except BaseException:
            await self.stop()
            raise
        await self.blocking(self._load_wasm_plugins)
        self._load_workflows(Path(cfg.workflows.dir))
        await self.engine.resume()
        if self.engine.unresumable:
            count = len(self.engine.unresumable)
            self.health.set("workflows", "degraded", f"{count} runs cannot resume; see the log")
        self._start_triggers()
        self.supervise("memory-watch", self._watch_memory)
        self.supervise("workflow-watch", self._watch_runs)
        if cfg.plugins.paths:
            self.supervise("plugin-watch", self._watch_plugins)
        if self._watcher is not None:
            self.supervise("config-watch", self._watch_config)
        self.started_at = time.time()
        log.info(
            "runtime started in %.1f ms, data dir %s, sync=%s",
            (time.perf_counter() - t0) * 1000,
            cfg.system.data_dir,
            cfg.storage.sync,
        )

    def _load_wasm_plugins(self) -> None:
        """Load every plugin dir under [plugins] paths (on a worker thread)."""
        for root in self.config.plugins.paths:
            for manifest in sorted(Path(root).glob("*/frys-plugin.toml")):
                self._try_load_wasm(manifest.parent)

    def _try_load_wasm(self, directory: Path) -> None:
        """Load or reload one plugin dir; a failure shows in health, never stops the runtime."""
        # Stamped first: files changed while loading get another look at the next poll.
        self._wasm_stamps[directory] = _plugin_stamp(directory)
        try:
            plugin = self.load_wasm(directory)
        except PluginError as e:
            # A bad new version leaves the loaded one serving.
            serving = directory.name in self.wasm
            status: Literal["degraded", "failed"] = "degraded" if serving else "failed"
            suffix = "; the loaded version keeps serving" if serving else ""
            self.health.set(f"plugin:{directory.name}", status, f"{e}{suffix}")
            log.error("WASM plugin %s not loaded: %s%s", directory, e, suffix)
            return
        log.info("WASM plugin %s %s loaded", plugin.name, plugin.manifest.version)

    def load_wasm(self, directory: Path) -> WasmPlugin:
        """Load (or reload) one WASM plugin dir with the operator's grant for its name."""
        from frys_edge.sandbox import read_manifest

        cfg = self.config
        name = read_manifest(directory).name
        if name != directory.name:
            raise PluginError(
                f"{directory}: holds plugin {name!r}; a plugin dir is named after its plugin"
            )
        granted = cfg.plugins.grants.get(name)
        grant = (
            Grant() if granted is None else msgspec.convert(granted, Grant, from_attributes=True)
        )
        services = HostServices(
            kv_get=self._plugin_kv_get, kv_put=self._plugin_kv_put, publish=self._plugin_publish
        )
        plugin = load_plugin(
            directory,
            grant,
            services=services,
            cache_dir=Path(cfg.system.data_dir) / "plugin-cache",
            pool_size=cfg.plugins.pool_size,
            trusted_keys=cfg.plugins.trusted_keys,
            require_signature=cfg.plugins.require_signature,
        )
        self.wasm[plugin.name] = plugin
        self.health.set(f"plugin:{plugin.name}", "ok")
        labels = {"plugin": plugin.name}
        for metric, help_text in (
            ("calls", "Plugin calls"),
            ("errors", "Plugin calls that failed"),
            ("fuel_used", "Fuel plugins consumed"),
        ):
            self.metrics.gauge(
                f"plugin_{metric}_total", help_text, self._plugin_stat(plugin.name, metric), labels
            )
        return plugin

    def _plugin_stat(self, name: str, stat: str) -> Callable[[], float]:
        # Read through self.wasm, so a reloaded plugin's counters replace the old one's.
        return lambda: float(getattr(self.wasm[name], stat))

    # Host services for WASM plugins; they run where the call runs (a worker thread, or the
    # loop with threads = 0). KV lives in the plugin's own namespace, and publishing from a
    # worker hops to the event loop, which owns the bus.
    def _plugin_kv_get(self, plugin: str, key: str) -> Any:
        assert self.storage is not None
        entry = self.storage.get(f"plugin/{plugin}", key)
        return None if entry is None else entry.value

    def _plugin_kv_put(self, plugin: str, key: str, value: Any) -> None:
        assert self.storage is not None
        where = f"kv plugin/{plugin}/{key}"
        op = ("put", f"plugin/{plugin}", key, encode_value(value, where), time.time())
        self.storage.write([op])

    def _plugin_publish(self, topic: str, payload: Any) -> None:
        if self.config.system.threads:
            anyio.from_thread.run_sync(self.bus.publish, topic, payload)
        else:
            self.bus.publish(topic, payload)

    def _start_triggers(self) -> None:
        """(Re)start the triggers of the loaded workflows as one supervised component."""
        for task in self._components:
            if task.get_name() == "triggers":
                task.cancel()
        if any(w.spec.triggers for w in self.engine.workflows.values()):
            self.supervise("triggers", self.engine.run_triggers)

    def _load_vectors(self, store: VectorStore) -> None:
        """Load every collection; one that cannot load degrades health, not start."""
        for record in self.storage.vector_collections() if self.storage else ():
            try:
                store.stats(record.name)  # loads it into memory
            except VectorError as e:
                log.error("vector collection %s cannot load: %s", record.name, e)
                self.health.set("vectors", "degraded", f"collection {record.name}: {e}")
                continue
            track_collection(store, self.metrics, record.name)
        self.metrics.gauge(
            "vector_index_loads_total",
            "Vector collections loaded into memory",
            lambda: float(store.loads),
        )
        self.metrics.gauge(
            "vector_index_builds_total",
            "HNSW graphs built (not loaded from their saved file)",
            lambda: float(store.index_builds),
        )

    def _load_workflows(self, directory: Path) -> None:
        """Load every definition in the workflows dir; a bad file degrades health, not start."""
        if not directory.is_dir():
            return
        problems = []
        for path in sorted(directory.iterdir()):
            if path.suffix not in (".yaml", ".yml", ".json", ".toml"):
                continue
            try:
                self.engine.load(str(path))
            except WorkflowError as e:
                problems.append(str(e))
                log.error("workflow definition not loaded: %s", e)
        if problems:
            self.health.set("workflows", "degraded", "; ".join(problems))
        else:
            self.health.set("workflows", "ok")
        log.info("loaded %d workflows from %s", len(self.engine.workflows), directory)

    def _open_storage(self) -> Storage:
        cfg = self.config
        return Storage(
            cfg.system.data_dir,
            sync=cfg.storage.sync,
            busy_timeout=cfg.storage.busy_timeout,
            readers=cfg.storage.readers,
            max_size=cfg.storage.max_size,
            cache_kib=self.budget.sqlite_cache_kib // (cfg.storage.readers + 1),
            background=cfg.system.threads > 0,
        )

    async def stop(self) -> None:
        """Stop taking work, let running tasks finish within shutdown_timeout, then close.

        Tasks not started by then are cancelled, running ones are cancelled, plugins are
        unloaded, and storage is closed even if a plugin fails to unload.
        """
        loop = self._loop
        if loop is None:
            return
        self._accepting = False
        timeout = self.config.system.shutdown_timeout
        try:
            await self.engine.stop(timeout)
            with anyio.move_on_after(timeout) as scope:
                while self.scheduler.stats()["running"]:
                    await anyio.sleep(0.01)
            if scope.cancelled_caught:
                log.warning("shutdown: tasks still running after %.1f s, cancelling", timeout)
            dropped = self.scheduler.cancel_not_started()
            if dropped:
                log.warning("shutdown: cancelled %d tasks that had not started", dropped)
            for task in list(self._running):
                task.cancel()
            self._service()
            owned = [t for t in (*self._own_tasks(), *self._components) if not t.done()]
            for t in self._components:
                t.cancel()
            if owned:
                await asyncio.wait(owned, timeout=1.0)
            for name in list(self.plugins):
                try:
                    await self.unload_plugin(name)
                except Exception as e:
                    log.error("shutdown: plugin %s failed to unload: %s", name, e, exc_info=e)
        finally:
            self._loop = None
            if self._alarm is not None:
                self._alarm.cancel()
                self._alarm = None
            if self.vectors is not None:
                # saves HNSW graphs changed since they were saved, so the next start loads them
                self.vectors.close()
            if self.storage is not None:
                self.storage.close()
                self.storage = None
            self.health.set("storage", "stopped")
            self.health.set("scheduler", "stopped")
            log.info("runtime stopped")

    def _own_tasks(self) -> list[asyncio.Task[None]]:
        # Tasks run inline by run() belong to their callers; the runtime waits only for its own.
        return [t for task, t in self._running.items() if task not in self._inline]

    def _register_gauges(self) -> None:
        m = self.metrics
        m.gauge("process_resident_memory_bytes", "Resident memory", lambda: float(rss_bytes()))
        m.gauge("memory_limit_bytes", "Configured memory budget", lambda: self.config.memory.limit)
        m.gauge("tasks_running", "Tasks running", lambda: self.scheduler.stats()["running"])
        m.gauge("tasks_pending", "Tasks waiting", lambda: self.scheduler.stats()["pending"])
        m.gauge("bus_published_total", "Bus messages published", lambda: self._bus("published"))
        m.gauge("bus_dropped_total", "Bus messages dropped", lambda: self._bus("dropped"))
        m.gauge("cache_hit_rate", "Cache hit rate", lambda: self.cache.stats()["hit_rate"])
        m.gauge("plugins_loaded", "Native plugins loaded", lambda: len(self.plugins))
        m.gauge("storage_commits_total", "SQLite commits", lambda: self._storage("commits"))
        m.gauge("storage_writes_total", "Storage writes", lambda: self._storage("writes"))

    def _bus(self, key: str) -> float:
        return float(self.bus.stats()[key])

    def _storage(self, key: str) -> float:
        return float(self.storage.stats()[key]) if self.storage else 0.0

    # -- tasks ----------------------------------------------------------------------------

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking fn(*args) on a worker thread, or inline when `[system] threads = 0`."""
        if self.config.system.threads:
            return await anyio.to_thread.run_sync(fn, *args)
        return fn(*args)

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise NotRunning(
                "runtime is not accepting work (not started, or shutting down); "
                "spawn tasks inside `async with Runtime(...)`"
            )

    def spawn(
        self,
        fn: Callable[..., Any],
        *args: Any,
        priority: int = 0,
        group: str = "default",
        delay: float = 0.0,
        name: str | None = None,
    ) -> Task:
        """Queue fn(*args) on the scheduler; a coroutine result is awaited."""
        task = self._submit(fn, args, priority, group, delay, name)
        self._dispatch()
        return task

    def _submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        priority: int,
        group: str,
        delay: float,
        name: str | None,
    ) -> Task:
        self._check_accepting()
        self._submitting = True
        try:
            return self.scheduler.submit(
                fn, *args, priority=priority, group=group, delay=delay, name=name
            )
        finally:
            self._submitting = False

    async def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        priority: int = 0,
        group: str = "default",
        delay: float = 0.0,
        name: str | None = None,
    ) -> Any:
        """Run fn(*args) through the scheduler and return its result (or raise its error).

        When the scheduler lets it start at once, it runs inside the caller's own task (as
        asyncio's eager tasks do) instead of a new one; cancelling the caller cancels it.
        """
        task = self._submit(fn, args, priority, group, delay, name)
        if self._dispatch(task):
            await self._execute(task, inline=True)
        elif not task.done():
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def wake(_task: Task) -> None:
                if not done.done():
                    done.set_result(None)

            task.add_done_callback(wake)
            try:
                await done
            except BaseException:
                task.cancel()
                raise
        if task.error is not None:
            raise task.error
        return task.result

    # Tasks run as plain asyncio tasks: anyio's start_soon costs about six times as much per
    # task, and the runtime tracks and cancels these itself.
    def _dispatch(self, claim: Task | None = None) -> bool:
        """Start every ready task, except `claim`, which the caller runs; True if it was ready."""
        loop = self._loop
        if loop is None:  # stopping: nothing new starts
            return False
        claimed = False
        for task in self.scheduler.pop_ready():
            if task is claim:
                claimed = True
            else:
                self._running[task] = loop.create_task(self._execute(task))
        return claimed

    async def _execute(self, task: Task, inline: bool = False) -> None:
        t0 = time.perf_counter()
        if inline:
            current = asyncio.current_task()
            assert current is not None
            self._running[task] = current
            self._inline.add(task)
        try:
            result = task.fn(*task.args)
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            self.scheduler.finish(task, error=Cancelled(f"task {task.name!r} was cancelled"))
            if inline and not task.cancel_requested:
                raise  # the caller itself is being cancelled
            if inline:
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
        except Exception as e:
            self.scheduler.finish(task, error=e)
        except BaseException as e:
            self.scheduler.finish(task, error=e)
            raise
        else:
            self.scheduler.finish(task, result=result)
        finally:
            del self._running[task]
            self._inline.discard(task)
        self._tasks_run.inc()
        self._task_latency.observe(time.perf_counter() - t0)
        self._dispatch()

    def _wake_soon(self) -> None:
        """The scheduler's on_wake: start what is ready now, service timers and cancels soon."""
        # spawn() and run() dispatch right after their own submit (run() may claim its task).
        if not self._submitting:
            self._dispatch()
        # One service call per loop turn is enough, however many submits there were.
        if not self._service_queued and self._loop is not None:
            self._service_queued = True
            self._loop.call_soon(self._service)

    def _service(self) -> None:
        """Stop tasks asked to stop, start due timers, and set the alarm for the next one."""
        self._service_queued = False
        for task in self.scheduler.take_cancel_requests():
            running = self._running.get(task)
            if running is not None:
                running.cancel()
        self._dispatch()
        deadline = self.scheduler.next_deadline()
        if deadline is None or self._loop is None:
            return
        alarm = self._alarm
        if alarm is None or alarm.when() > deadline:
            if alarm is not None:
                alarm.cancel()
            # loop.time() is time.monotonic(), the scheduler's clock.
            self._alarm = self._loop.call_at(deadline, self._on_alarm)

    def _on_alarm(self) -> None:
        self._alarm = None
        self._service()

    # -- bus ----------------------------------------------------------------------------

    async def publish(self, topic: str, payload: Any = None, timeout: float | None = None) -> int:
        """Publish on the bus, waiting for room in full `block`-policy subscriptions.

        Raises BusFull if there is still no room after timeout seconds (None: wait on).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self.bus.publish(topic, payload)
            except BusFull:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            if self._space is None:
                self._space = asyncio.Event()
            space = self._space
            with anyio.move_on_after(None if deadline is None else deadline - time.monotonic()):
                await space.wait()

    def _bus_space(self, _sub: Any) -> None:
        space, self._space = self._space, None
        if space is not None:
            space.set()

    # -- supervised components ------------------------------------------------------------

    def supervise(self, name: str, component: Component, retry: RetryPolicy | None = None) -> None:
        """Run component until stop; restart it with backoff whenever it fails."""
        if self._loop is None:
            raise NotRunning(f"component {name!r}: start the runtime before adding components")
        policy = retry or RetryPolicy(max_attempts=1_000_000, initial_delay=0.1, max_delay=30.0)
        task = self._loop.create_task(self._supervise(name, component, policy), name=name)
        self._components.add(task)
        task.add_done_callback(self._components.discard)

    async def _supervise(self, name: str, component: Component, policy: RetryPolicy) -> None:
        failures = 0
        while True:
            self.health.set(name, "ok")
            started = time.monotonic()
            try:
                await component()
            except Exception as e:
                # A component that ran a while before failing starts its backoff afresh.
                failures = 1 if time.monotonic() - started > 60 else failures + 1
                delay = policy.delay(failures)
                reason = f"{type(e).__name__}: {e}; restart {failures} in {delay:.2f} s"
                self.health.set(name, "failed", reason)
                log.error("component %s failed: %s", name, reason, exc_info=e)
                await anyio.sleep(delay)
                self.health.restarted(name)
                continue
            self.health.set(name, "stopped", "finished")
            return

    async def _watch_plugins(self) -> None:
        """Reload a WASM plugin when its manifest or module changes on disk (mtime polling)."""
        while True:
            await anyio.sleep(PLUGIN_POLL_SECONDS)
            for root in self.config.plugins.paths:
                for manifest in Path(root).glob("*/frys-plugin.toml"):
                    directory = manifest.parent
                    if self._wasm_stamps.get(directory) != _plugin_stamp(directory):
                        await self.blocking(self._try_load_wasm, directory)

    async def _watch_runs(self) -> None:
        """Report health "workflow-runs" degraded while runs are stuck past their timeout."""
        while True:
            stuck = self.engine.overdue(STUCK_GRACE_SECONDS)
            if stuck:
                shown = ", ".join(stuck[:5]) + (", ..." if len(stuck) > 5 else "")
                reason = f"{len(stuck)} runs still active past their timeout: {shown}"
                self.health.set("workflow-runs", "degraded", reason)
            else:
                self.health.set("workflow-runs", "ok")
            await anyio.sleep(MEMORY_POLL_SECONDS)

    async def _watch_memory(self) -> None:
        """Report health "memory" degraded while resident memory is over the budget."""
        while True:
            used, limit = rss_bytes(), self.config.memory.limit
            if used > limit:
                self.health.set(
                    "memory",
                    "degraded",
                    f"resident memory {used / 2**20:.1f} MiB is over [memory] limit "
                    f"{limit / 2**20:.1f} MiB",
                )
            else:
                self.health.set("memory", "ok")
            await anyio.sleep(MEMORY_POLL_SECONDS)

    # -- config reload --------------------------------------------------------------------

    def on_config_change(self, listener: Callable[[Config, set[str]], None]) -> None:
        """Call listener(new_config, changed_sections) after each applied reload."""
        self._config_listeners.append(listener)

    async def _watch_config(self) -> None:
        assert self._watcher is not None
        while True:
            await anyio.sleep(CONFIG_POLL_SECONDS)
            try:
                new = self._watcher.poll()
            except ConfigError as e:
                self._refuse_reload(e)
                continue
            if new is not None:
                await self.apply_config(new)

    async def reload_config(self) -> bool:
        """Re-read the config file (SIGHUP); keep the old config when the new one is bad."""
        if self._watcher is None:
            log.info("reload asked, but the runtime runs without a config file")
            return False
        try:
            new = self._watcher.reload()
        except ConfigError as e:
            self._refuse_reload(e)
            return False
        await self.apply_config(new)
        # Reload plugins and definitions too: work in flight finishes on what it started with.
        await self.blocking(self._load_wasm_plugins)
        self._load_workflows(Path(self.config.workflows.dir))
        self._start_triggers()
        return True

    def _refuse_reload(self, err: ConfigError) -> None:
        self._reload_errors.inc()
        log.error("config reload refused, keeping the running config: %s", err)

    async def apply_config(self, new: LoadedConfig) -> set[str]:
        """Apply the live keys of a validated config and tell listeners and plugins.

        Keys outside LIVE_KEYS keep their running values (the config the runtime reports is
        the one it runs with) and are logged as waiting for the next start.
        """
        old = self.config
        effective = _with_live_keys(old, new.config)
        pending = changed_keys(effective, new.config)
        if pending:
            log.warning("config keys that take effect at the next start: %s", ", ".join(pending))
        sections = changed_sections(old, effective)
        self.loaded = LoadedConfig(
            config=effective, path=new.path, sources=new.sources, mtime=new.mtime
        )
        if not sections:
            return sections
        self._reloads.inc()
        keys = changed_keys(old, effective)
        cfg = effective
        if "system" in sections:
            configure_logging(cfg.system.log_level, cfg.system.log_format)
        if "storage.sync" in keys and self.storage is not None:
            self.storage.set_sync(cfg.storage.sync)
        if "memory" in sections:
            self.budget = budget_for(cfg.memory.limit)
            self.cache.resize(self.budget.cache_entries)
            self.bus.default_maxsize = self.budget.bus_queue
            self.scheduler.max_pending = self.budget.max_pending_tasks
        log.info("config reloaded; applied: %s", ", ".join(keys))
        for listener in self._config_listeners:
            try:
                listener(cfg, sections)
            except Exception as e:
                log.error("config listener %r failed: %s", listener, e, exc_info=e)
        for plugin in list(self.plugins.values()):
            try:
                await plugin.call("on_config_change", self, sections)
            except Exception as e:
                reason = f"on_config_change failed: {type(e).__name__}: {e}"
                self.health.set(f"plugin:{plugin.name}", "degraded", reason)
                log.error("plugin %s %s", plugin.name, reason, exc_info=e)
        return sections

    # -- native plugins -------------------------------------------------------------------

    async def load_plugin(self, spec: str | Any, name: str | None = None) -> NativePlugin:
        """Load a native plugin while running: init, then on_load."""
        if isinstance(spec, str):
            found, obj = resolve_plugin(spec)
            name = name or found
        else:
            obj = spec
            name = name or getattr(obj, "NAME", None) or getattr(obj, "__name__", repr(obj))
        assert name is not None
        if name in self.plugins:
            raise PluginError(f"plugin {name!r} is already loaded; unload it first")
        plugin = NativePlugin(name, obj)
        try:
            await plugin.call("init", self)
            await plugin.call("on_load", self)
        except Exception as e:
            await plugin.call("cleanup", self)
            raise PluginError(f"plugin {name!r} failed to load: {type(e).__name__}: {e}") from e
        self.plugins[name] = plugin
        self.health.set(f"plugin:{name}", "ok")
        log.info("plugin %s loaded", name)
        return plugin

    async def unload_plugin(self, name: str) -> None:
        """Unload a native plugin while running: on_unload, then cleanup."""
        plugin = self.plugins.pop(name, None)
        if plugin is None:
            raise PluginError(f"plugin {name!r} is not loaded; loaded: {sorted(self.plugins)}")
        try:
            await plugin.call("on_unload", self)
        finally:
            await plugin.call("cleanup", self)
            self.health.remove(f"plugin:{name}")
        log.info("plugin %s unloaded", name)


async def serve(
    rt: Runtime,
    ready: Callable[[], None] | None = None,
    before_stop: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Run until SIGTERM or SIGINT (SIGHUP reloads config); returns the exit code.

    `before_stop` runs first on shutdown, while the runtime still serves (an HTTP server
    drains its requests there).
    """
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    watcher: asyncio.Task[None] | None = None
    with anyio.open_signal_receiver(*signals) as received:
        try:
            async with rt:
                if ready is not None:
                    ready()
                async for sig in received:
                    if sig == signal.SIGHUP:
                        await rt.reload_config()
                        continue
                    log.info("received %s, draining (a second signal exits at once)", sig.name)
                    watcher = asyncio.create_task(_exit_on_second_signal(received))
                    if before_stop is not None:
                        await before_stop()
                    break
        finally:
            if watcher is not None:
                watcher.cancel()
    return 0


async def _exit_on_second_signal(received: Any) -> None:
    async for sig in received:
        if sig != signal.SIGHUP:
            log.warning("second %s: exiting now", sig.name)
            logging.shutdown()
            os._exit(1)
