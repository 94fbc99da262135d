"""Sandbox: loads WebAssembly plugins and calls them with deny-by-default capabilities and limits.

A plugin is a directory with `frys-plugin.toml` and its `.wasm`. Loading checks the module's
sha256 against the manifest before compiling; compiled modules are cached on disk (keyed by
module hash, wasmtime version and engine settings, and checked by their own hash before use).
Every call runs with fuel, a wall-clock deadline (epoch interruption), a memory cap, a stack
cap and an output cap; a call that hits one fails with a PluginError naming it and its
instance is discarded. Host functions exist only for capabilities the manifest asks for AND
the operator grants; an ungranted one is linked as a stub that fails the call, so the host is
never reached. The ABI is in plugins/ABI.md. wasmtime is imported only when a plugin loads.

Under Pyodide (no wasmtime there) the same plugins run on the JavaScript engine's own
`WebAssembly`, behind the same classes: the memory cap holds (written into the module as its
memory's maximum), and so do the output cap, the stack (the engine's own) and the grants; fuel,
the deadline, the AOT cache and WASI commands do not exist there.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec

from frys_edge.core import FrysError, Pool, PoolExhausted, topic_matches

log = logging.getLogger("frys.plugins")

MANIFEST = "frys-plugin.toml"
CAPABILITIES = ("log", "kv", "emit", "clock", "random", "wasi")
EPOCH_TICK = 0.005  # seconds between epoch increments: the deadline's resolution
PAGE = 65536
# Hard caps whatever a manifest asks: an operator raises them in code, not a plugin.
MAX_PAGES = 4096  # 256 MiB
MAX_FUEL = 10**12
MAX_DEADLINE_MS = 60_000
MAX_OUTPUT = 64 * 1024 * 1024
STACK_BYTES = 512 * 1024
# Pyodide: plugins run on the JavaScript engine's WebAssembly instead of wasmtime.
JS_WEBASSEMBLY = sys.platform == "emscripten"


class PluginError(FrysError):
    """A plugin could not be found, loaded or called."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Per-call bounds; defaults suit a small detector or decoder."""

    memory_pages: int = 16
    fuel: int = 10_000_000
    deadline_ms: int = 1000
    max_output: int = 1024 * 1024


class ExportSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One function a plugin offers."""

    name: str
    description: str = ""
    input: str = ""
    output: str = ""
    batch: bool = False


class Manifest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`frys-plugin.toml`."""

    name: str
    version: str
    module: str
    sha256: str
    # base64 ed25519 signature of the sha256 hex text, by a key the operator trusts.
    signature: str | None = None
    description: str = ""
    kind: Literal["reactor", "command"] = "reactor"
    format: Literal["json"] = "json"
    # "call": a fresh instance for every call, so nothing a call leaves behind is seen by the
    # next (costs an instantiation per call); "instance": instances are reused.
    isolation: Literal["instance", "call"] = "instance"
    capabilities: list[str] = []
    exports: list[ExportSpec] = []
    limits: Limits = Limits()


class Grant(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What the operator allows one plugin: capabilities, emit topics, and WASI resources."""

    capabilities: list[str] = []
    topics: list[str] = []
    # With wasi: directories "HOST:GUEST" (read-only) or "HOST:GUEST:rw", and env variables.
    dirs: list[str] = []
    env: dict[str, str] = {}


class HostServices:
    """What host functions reach: a KV store and a publisher. The runtime supplies real ones."""

    def __init__(
        self,
        kv_get: Callable[[str, str], Any] | None = None,
        kv_put: Callable[[str, str, Any], None] | None = None,
        publish: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.kv_get = kv_get
        self.kv_put = kv_put
        self.publish = publish


_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_encode = msgspec.json.encode
_decode = msgspec.json.decode


def read_manifest(directory: Path) -> Manifest:
    """Parse and check a plugin directory's manifest; every problem in one PluginError."""
    path = directory / MANIFEST
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PluginError(f"{path}: no manifest; a plugin dir needs {MANIFEST}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PluginError(f"{path}: cannot read the manifest: {e}") from e
    try:
        manifest = msgspec.convert(raw, Manifest)
    except msgspec.ValidationError as e:
        raise PluginError(f"{path}: {e}") from e
    problems = []
    if not _NAME.match(manifest.name):
        problems.append(f"name {manifest.name!r} must match [A-Za-z0-9_-]+")
    unknown = sorted(set(manifest.capabilities) - set(CAPABILITIES))
    if unknown:
        problems.append(f"unknown capabilities {unknown}; known: {', '.join(CAPABILITIES)}")
    if manifest.kind == "reactor" and not manifest.exports:
        problems.append("a reactor plugin lists at least one [[exports]]")
    lim = manifest.limits
    for field, value, low, cap in (
        ("memory_pages", lim.memory_pages, 1, MAX_PAGES),
        ("fuel", lim.fuel, 0, MAX_FUEL),
        ("deadline_ms", lim.deadline_ms, 1, MAX_DEADLINE_MS),
        ("max_output", lim.max_output, 1, MAX_OUTPUT),
    ):
        if not low <= value <= cap:
            problems.append(f"limits.{field} = {value} is outside {low}..{cap}")
    if problems:
        raise PluginError(f"{path}: " + "; ".join(problems))
    return manifest


def _wasmtime() -> Any:
    try:
        import wasmtime
    except ImportError as e:
        raise PluginError(
            "WASM plugins need wasmtime: pip install 'frys-edge[plugins]'", "missing"
        ) from e
    return wasmtime


class _Ticker:
    """Advances an engine's epoch every EPOCH_TICK seconds, so deadlines can fire."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        thread = threading.Thread(target=self._run, name="frys-wasm-epoch", daemon=True)
        thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(EPOCH_TICK)
            self.engine.increment_epoch()


_engine_lock = threading.Lock()
_engines: dict[bool, Any] = {}


def shared_engine(fuel: bool = True) -> Any:
    """The process's wasmtime Engine with or without fuel metering; epochs on, stack capped.

    Fuel costs compute-bound code ~1.4x (wasmtime counts every basic block); a plugin whose
    manifest sets limits.fuel = 0 runs on the engine without it, bounded by its deadline.
    """
    with _engine_lock:
        engine = _engines.get(fuel)
        if engine is None:
            wt = _wasmtime()
            config = wt.Config()
            config.consume_fuel = fuel
            config.epoch_interruption = True
            config.max_wasm_stack = STACK_BYTES
            config.cranelift_opt_level = "speed"
            engine = _engines[fuel] = wt.Engine(config)
            _Ticker(engine)
        return engine


def _cache_key(digest: str, fuel: bool) -> str:
    wt = _wasmtime()
    version = getattr(wt, "__version__", None) or _installed_version()
    settings = f"fuel={fuel},epoch,stack={STACK_BYTES},speed"
    return hashlib.sha256(f"{digest}|{version}|{settings}".encode()).hexdigest()[:32]


def _installed_version() -> str:
    from importlib.metadata import version

    return version("wasmtime")


def compile_module(
    data: bytes, digest: str, cache_dir: Path | None, fuel: bool = True
) -> tuple[Any, bool]:
    """The compiled module, from the AOT cache when a sound entry exists; (module, hit)."""
    wt = _wasmtime()
    engine = shared_engine(fuel)
    if cache_dir is None:
        return wt.Module(engine, data), False
    key = _cache_key(digest, fuel)
    blob, check = cache_dir / f"{key}.cwasm", cache_dir / f"{key}.sha256"
    try:
        cached = blob.read_bytes()
        # The hash catches a corrupt or truncated entry (not tampering: whoever can write
        # the data dir could rewrite both files; signed plugins bypass the cache for that).
        if hashlib.sha256(cached).hexdigest() == check.read_text().strip():
            return wt.Module.deserialize(engine, cached), True
        log.warning("plugin cache %s does not match its hash; rebuilding it", blob)
    except FileNotFoundError:
        pass
    except (OSError, wt.WasmtimeError) as e:
        log.warning("plugin cache %s unusable (%s); rebuilding it", blob, e)
    module = wt.Module(engine, data)
    serialized = module.serialize()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = blob.with_suffix(".tmp")
    tmp.write_bytes(serialized)
    os.replace(tmp, blob)
    check.write_text(hashlib.sha256(serialized).hexdigest())
    return module, False


class _Instance:
    """One instantiated module in its own store; discarded after any failed call."""

    def __init__(self, plugin: WasmPlugin, wasi: Any = None) -> None:
        wt = _wasmtime()
        self.plugin = plugin
        self.store = wt.Store(shared_engine(plugin.metered))
        if wasi is not None:
            self.store.set_wasi(wasi)
        limits = plugin.manifest.limits
        self.store.set_limits(memory_size=limits.memory_pages * PAGE, instances=4, memories=2)
        self.failure: str | None = None
        self.broken = False
        self.input_ptr = 0
        self.input_cap = 0
        linker = plugin.linker(self)
        try:
            if plugin.metered:
                self.store.set_fuel(limits.fuel)
            self.store.set_epoch_deadline(_ticks(limits.deadline_ms))
            self.instance = linker.instantiate(self.store, plugin.module)
        except (wt.WasmtimeError, wt.Trap) as e:
            raise PluginError(f"plugin {plugin.name}: cannot instantiate: {e}", "link") from e
        exports = self.instance.exports(self.store)
        self.exports = exports
        # A command module's memory is its own business; a reactor's is the ABI's buffer space.
        self.memory: Any = exports.get("memory")

    def begin(self, limits: Limits) -> None:
        """Refill the call's budgets: fuel (when metered) and the epoch deadline."""
        if self.plugin.metered:
            self.store.set_fuel(limits.fuel)
        self.store.set_epoch_deadline(_ticks(limits.deadline_ms))

    def fuel_spent(self, limits: Limits) -> int:
        return limits.fuel - int(self.store.get_fuel())

    def call(self, export: str, function: str, *args: int) -> int:
        """Call one of the module's functions; a trap becomes a PluginError naming its limit."""
        wt = _wasmtime()
        try:
            return int(self.exports[function](self.store, *args))
        except wt.Trap as e:
            kind = _trap_kind(e)
            message = self.failure or _TRAP_MESSAGES.get(kind, str(e).splitlines()[0])
            raise PluginError(f"plugin {self.plugin.name}.{export}: {message}", kind) from e
        except wt.WasmtimeError as e:
            raise PluginError(f"plugin {self.plugin.name}.{export}: {e}", "trap") from e
        except KeyError as e:
            raise _missing_export(self.plugin.name, function) from e

    def memory_size(self) -> int:
        return int(self.memory.data_len(self.store))

    def write(self, ptr: int, data: bytes) -> None:
        # memmove on the raw pointer: memory.write costs ~2.5 µs a call through ctypes.
        base = ctypes.addressof(self.memory.data_ptr(self.store).contents)
        ctypes.memmove(base + ptr, data, len(data))

    def read(self, ptr: int, length: int) -> bytes:
        # The pointer is fetched again: a call may have grown (and moved) the memory.
        base = ctypes.addressof(self.memory.data_ptr(self.store).contents)
        return ctypes.string_at(base + ptr, length)


def _missing_export(plugin: str, function: str) -> PluginError:
    return PluginError(
        f"plugin {plugin} does not export {function!r} as the ABI requires (see plugins/ABI.md)",
        "abi",
    )


class _CallerMemory:
    """A wasmtime host function's view of the calling instance's memory."""

    def __init__(self, caller: Any, plugin: str) -> None:
        self.caller = caller
        self.plugin = plugin

    def read(self, ptr: int, length: int) -> bytes:
        memory = self.caller["memory"]
        if length < 0 or ptr < 0 or ptr + length > memory.data_len(self.caller):
            raise _wasmtime().Trap(f"plugin {self.plugin} passed a buffer outside its memory")
        return bytes(memory.read(self.caller, ptr, ptr + length))

    def write(self, ptr: int, data: bytes) -> None:
        self.read(ptr, len(data))  # bounds check
        self.caller["memory"].write(self.caller, data, ptr)


class _JsModule:
    """A module compiled by the JavaScript engine, with its imports as wasmtime lists them."""

    class Import(msgspec.Struct, frozen=True):
        module: str
        name: str

    def __init__(self, data: bytes) -> None:
        import js  # type: ignore[import-not-found]
        from pyodide.ffi import JsException, to_js  # type: ignore[import-not-found]

        try:
            self.js = js.WebAssembly.Module.new(to_js(data))
        except JsException as e:
            raise PluginError(f"not a valid WebAssembly module: {e}", "invalid") from e
        self.imports = [
            _JsModule.Import(i.module, i.name) for i in js.WebAssembly.Module.imports(self.js)
        ]


# How the JavaScript engine words the traps that have a limit's name here.
_JS_TRAPS = (
    ("call stack", "stack"),
    ("out of bounds", "memory"),
    ("unreachable", "trap"),
)


class _JsInstance:
    """One instance on the JavaScript engine's WebAssembly (Pyodide); same duties as _Instance.

    There is no fuel and no deadline: a call runs on the event loop's thread until it returns.
    """

    def __init__(self, plugin: WasmPlugin) -> None:
        import js
        from pyodide.ffi import JsException, create_proxy, jsnull

        self.plugin = plugin
        self.failure: str | None = None
        self.broken = False
        self.input_ptr = 0
        self.input_cap = 0
        # No prototype: a module must not link against Object's own properties.
        imports = js.Object.create(jsnull)
        frys = js.Object.create(jsnull)
        self._proxies: list[Any] = []
        for name, capability, _params, results, fn, caller in plugin.host_functions(self):
            if capability is not None and capability not in plugin.granted:
                fn = self._refusal(_refuse(plugin.name, capability, PluginError))
            elif caller:
                fn = _with_memory(fn, self)
            if results == ["i64"]:  # an i64 crosses into WebAssembly as a BigInt
                fn = _as_bigint(fn, js.BigInt)
            proxy = create_proxy(fn)
            self._proxies.append(proxy)
            setattr(frys, name, proxy)
        imports.frys = frys
        try:
            self.instance = js.WebAssembly.Instance.new(plugin.module.js, imports)
        except JsException as e:
            raise PluginError(f"plugin {plugin.name}: cannot instantiate: {e}", "link") from e
        self.exports = self.instance.exports
        self.memory: Any = getattr(self.exports, "memory", None)
        self._uint8 = js.Uint8Array
        self._js_error = JsException

    def close(self) -> None:
        """Free the host-function proxies: they and the JS instance hold each other, across
        two garbage collectors that cannot see the cycle, so nothing else would free them."""
        for proxy in self._proxies:
            proxy.destroy()
        self._proxies.clear()
        self.instance = self.exports = self.memory = None

    def _refusal(self, stub: Callable[..., Any]) -> Callable[..., Any]:
        """The stub, also recording its error: on this engine a module can catch what a host
        function throws, and the call must fail all the same (as a wasmtime trap does)."""

        def refuse(*args: Any) -> Any:
            try:
                return stub(*args)
            except PluginError as e:
                self.failure = self.failure or str(e)
                raise

        return refuse

    def begin(self, limits: Limits) -> None:
        """Nothing to refill: the JavaScript engine has no fuel and no epochs."""

    def fuel_spent(self, limits: Limits) -> int:
        return 0

    def call(self, export: str, function: str, *args: int) -> int:
        fn = getattr(self.exports, function, None)
        if fn is None:
            raise _missing_export(self.plugin.name, function)
        try:
            return int(fn(*args))
        except self._js_error as e:
            text = str(e)
            kind = next((k for needle, k in _JS_TRAPS if needle in text.lower()), "trap")
            message = self.failure or _TRAP_MESSAGES.get(kind, text.splitlines()[0])
            raise PluginError(f"plugin {self.plugin.name}.{export}: {message}", kind) from e

    def memory_size(self) -> int:
        return int(self.memory.buffer.byteLength)

    def write(self, ptr: int, data: bytes) -> None:
        self._view(ptr, len(data)).assign(data)

    def read(self, ptr: int, length: int) -> bytes:
        return bytes(self._view(ptr, length).to_bytes())

    def _view(self, ptr: int, length: int) -> Any:
        if length < 0 or ptr < 0 or ptr + length > self.memory_size():
            message = f"plugin {self.plugin.name} passed a buffer outside its memory"
            self.failure = self.failure or message  # caught by the module or not, it fails
            raise PluginError(message)
        return self._uint8.new(self.memory.buffer, ptr, length)


def _refuse(plugin: str, capability: str, error: Callable[[str], Exception]) -> Callable[..., Any]:
    def stub(*_args: Any) -> Any:
        raise error(
            f"plugin {plugin} called a host function of capability {capability!r}, "
            "which it was not granted"
        )

    return stub


def _with_memory(fn: Callable[..., Any], memory: Any) -> Callable[..., Any]:
    return lambda *args: fn(memory, *args)


def _as_bigint(fn: Callable[..., Any], bigint: Callable[[int], Any]) -> Callable[..., Any]:
    return lambda *args: bigint(fn(*args))


def cap_memory(data: bytes, pages: int) -> bytes:
    """The module with its memory's maximum lowered to `pages` (how the JS backend caps it).

    Raises PluginError when the module's initial memory is already larger, or when it has
    no memory section of the one-memory, 32-bit kind the ABI uses.
    """
    if data[:8] != b"\0asm\x01\0\0\0":
        raise PluginError("not a WebAssembly module (bad magic or version)", "invalid")
    pos = 8
    while pos < len(data):
        section = data[pos]
        size, body = _leb(data, pos + 1, len(data))
        end = body + size
        if end > len(data):
            raise PluginError(f"malformed module: section {section} runs past the end", "invalid")
        if section == 5:
            count, at = _leb(data, body, end)
            flags = data[at] if count == 1 and at < end else -1
            if flags not in (0, 1):
                raise PluginError("the module must define one 32-bit, unshared memory", "abi")
            initial, at = _leb(data, at + 1, end)
            maximum = pages
            if flags == 1:
                declared, at = _leb(data, at, end)
                maximum = min(declared, pages)
            if at != end:
                raise PluginError("malformed module: a memory section of a wrong size", "invalid")
            if initial > pages:
                raise PluginError(
                    f"the module's initial memory is {initial} pages, over its "
                    f"limits.memory_pages of {pages}",
                    "memory",
                )
            limits = b"\x01\x01" + _uleb(initial) + _uleb(maximum)
            return data[:pos] + b"\x05" + _uleb(len(limits)) + limits + data[end:]
        pos = end
    raise PluginError("the module defines no memory; a reactor exports one", "abi")


def _leb(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """An unsigned 32-bit LEB128 number at pos (before end), and the position after it."""
    value = shift = 0
    while True:
        if pos >= end or shift > 28:
            raise PluginError(f"malformed module: a bad number at byte {pos}", "invalid")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _ticks(deadline_ms: int) -> int:
    return max(1, round(deadline_ms / 1000 / EPOCH_TICK)) + 1


_TRAP_KINDS = {
    "OUT_OF_FUEL": "fuel",
    "INTERRUPT": "deadline",
    "STACK_OVERFLOW": "stack",
    "MEMORY_OUT_OF_BOUNDS": "memory",
    "UNREACHABLE": "trap",
}


def _trap_kind(error: Any) -> str:
    code = getattr(error, "trap_code", None)
    return _TRAP_KINDS.get(getattr(code, "name", ""), "trap")


class WasmPlugin:
    """A loaded plugin: its manifest, compiled module, granted capabilities and instance pool."""

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        module: Any,
        granted: set[str],
        grant: Grant,
        services: HostServices,
        pool_size: int,
        cache_hit: bool,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.name = manifest.name
        self.metered = manifest.limits.fuel > 0 and not JS_WEBASSEMBLY
        self.module = module
        self.granted = granted
        self.grant = grant
        self.topics = list(grant.topics)
        self.services = services
        self.cache_hit = cache_hit
        self.calls = 0
        self.errors = 0
        self.fuel_used = 0
        self.exports = {e.name: e for e in manifest.exports}
        instance = _JsInstance if JS_WEBASSEMBLY else _Instance
        self.pool: Pool = Pool(
            lambda: instance(self),
            pool_size,
            name=f"plugin-{self.name}",
            reset=_reset,
            close=_JsInstance.close if JS_WEBASSEMBLY else None,
        )

    # -- host functions -------------------------------------------------------------------

    def host_functions(
        self, inst: _Instance | _JsInstance
    ) -> list[tuple[str, str | None, list[str], list[str], Callable[..., Any], bool]]:
        """(name, capability, params, results, fn, takes memory) of every `frys` import.

        A function that takes memory gets an object with read(ptr, len) and write(ptr, data)
        first; each backend supplies its own.
        """
        name = self.name

        def fail(mem: Any, ptr: int, length: int) -> None:
            inst.failure = mem.read(ptr, min(length, 4096)).decode(errors="replace")

        def host_log(mem: Any, level: int, ptr: int, length: int) -> None:
            text = mem.read(ptr, min(length, 4096)).decode(errors="replace")
            levels = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)
            log.log(levels[min(max(level, 0), 3)], "plugin %s: %s", name, text)

        def kv_get(mem: Any, kptr: int, klen: int, optr: int, ocap: int) -> int:
            # Writes the JSON value into the plugin's buffer when it fits; returns its length
            # either way (so the plugin can retry with a bigger one), or -1 when missing.
            if self.services.kv_get is None:
                return -1
            value = self.services.kv_get(name, mem.read(kptr, klen).decode())
            if value is None:
                return -1
            data = json.dumps(value).encode()
            if len(data) <= ocap:
                mem.write(optr, data)
            return len(data)

        def kv_put(mem: Any, kptr: int, klen: int, vptr: int, vlen: int) -> int:
            if self.services.kv_put is None:
                return -1
            try:
                value = json.loads(mem.read(vptr, vlen))
                self.services.kv_put(name, mem.read(kptr, klen).decode(), value)
            except (ValueError, FrysError) as e:
                log.warning("plugin %s: kv_put refused: %s", name, e)
                return -1
            return 0

        def emit(mem: Any, tptr: int, tlen: int, pptr: int, plen: int) -> int:
            topic = mem.read(tptr, tlen).decode(errors="replace")
            if self.services.publish is None or not any(
                topic_matches(p, topic) for p in self.topics
            ):
                log.warning("plugin %s: emit on %r refused (granted: %s)", name, topic, self.topics)
                return -1
            try:
                self.services.publish(topic, json.loads(mem.read(pptr, plen) or b"null"))
            except (ValueError, FrysError) as e:
                log.warning("plugin %s: emit refused: %s", name, e)
                return -1
            return 0

        def clock_ms() -> int:
            return int(time.time() * 1000)

        def random_u64() -> int:
            return int.from_bytes(os.urandom(8), "little", signed=True)

        i32 = "i32"
        return [
            ("fail", None, [i32, i32], [], fail, True),
            ("log", "log", [i32, i32, i32], [], host_log, True),
            ("kv_get", "kv", [i32, i32, i32, i32], [i32], kv_get, True),
            ("kv_put", "kv", [i32, i32, i32, i32], [i32], kv_put, True),
            ("emit", "emit", [i32, i32, i32, i32], [i32], emit, True),
            ("clock_ms", "clock", [], ["i64"], clock_ms, False),
            ("random_u64", "random", [], ["i64"], random_u64, False),
        ]

    def linker(self, inst: _Instance) -> Any:
        """A wasmtime linker with the host functions; ungranted ones are stubs that trap."""
        wt = _wasmtime()
        linker = wt.Linker(shared_engine(self.metered))
        types = {"i32": wt.ValType.i32(), "i64": wt.ValType.i64()}
        name = self.name

        def with_caller(fn: Callable[..., Any]) -> Callable[..., Any]:
            return lambda caller, *args: fn(_CallerMemory(caller, name), *args)

        for fname, capability, params, results, fn, caller in self.host_functions(inst):
            ftype = wt.FuncType([types[t] for t in params], [types[t] for t in results])
            if capability is None or capability in self.granted:
                target = with_caller(fn) if caller else fn
                linker.define_func("frys", fname, ftype, target, access_caller=caller)
            else:
                linker.define_func("frys", fname, ftype, _refuse(name, capability, wt.Trap))
        if "wasi" in self.granted:
            linker.define_wasi()
        return linker

    # -- calls ----------------------------------------------------------------------------

    def call(self, export: str, value: Any) -> Any:
        """Call an export with a JSON-able value; returns its decoded output."""
        try:
            data = _encode(value)
        except (TypeError, msgspec.EncodeError) as e:
            raise PluginError(f"plugin {self.name}.{export}: input is not JSON-able: {e}") from e
        out = self.call_raw(export, data)
        try:
            return _decode(out) if out else None
        except msgspec.DecodeError as e:
            raise PluginError(
                f"plugin {self.name}.{export} returned invalid JSON: {e}", "abi"
            ) from e

    def call_batch(self, export: str, values: Sequence[Any]) -> list[Any]:
        """Many inputs through a batch export in one crossing (one call per input otherwise)."""
        spec = self._export(export)
        if not spec.batch:
            return [self.call(export, v) for v in values]
        out = self.call(export, list(values))
        if not isinstance(out, list) or len(out) != len(values):
            raise PluginError(
                f"plugin {self.name}.{export}: a batch export must return one output per input",
                "abi",
            )
        return out

    def _export(self, export: str) -> ExportSpec:
        spec = self.exports.get(export)
        if spec is None:
            known = ", ".join(sorted(self.exports)) or "none"
            raise PluginError(f"plugin {self.name} has no export {export!r} (exports: {known})")
        return spec

    def call_raw(self, export: str, data: bytes) -> bytes:
        """Call with input bytes; returns output bytes. Runs in the calling thread."""
        if self.manifest.kind == "command":
            return self._run_command(data)
        self._export(export)
        limits = self.manifest.limits
        try:
            inst = self.pool.acquire(timeout=limits.deadline_ms / 1000)
        except PoolExhausted as e:
            raise PluginError(f"plugin {self.name}: {e}", "busy") from e
        self.calls += 1
        try:
            inst.begin(limits)
            out = self._invoke(inst, export, data)
        except PluginError:
            inst.broken = True
            self.errors += 1
            raise
        except BaseException as e:
            # Anything else (a host function's own error, an interrupt) leaves the instance
            # mid-call: it is never reused.
            inst.broken = True
            self.errors += 1
            if isinstance(e, Exception):
                raise PluginError(f"plugin {self.name}.{export}: host error: {e!r}", "host") from e
            raise
        finally:
            if self.metered:
                self.fuel_used += inst.fuel_spent(limits)
            self.pool.release(inst)
        return out

    def _invoke(self, inst: _Instance | _JsInstance, export: str, data: bytes) -> bytes:
        max_output = self.manifest.limits.max_output
        if inst.memory is None:
            raise _missing_export(self.name, "memory")
        if len(data) > inst.input_cap:
            # One buffer per instance, grown rarely: a call is then one crossing.
            inst.input_cap = max(len(data), 2 * inst.input_cap, 4096)
            # i32 results arrive signed: a "negative" pointer must not pass the check.
            inst.input_ptr = inst.call(export, "input_buffer", inst.input_cap) & 0xFFFFFFFF
            if inst.input_ptr + inst.input_cap > inst.memory_size():
                raise PluginError(f"plugin {self.name}: input_buffer outside memory", "abi")
        if data:
            inst.write(inst.input_ptr, data)
        packed = inst.call(export, export, inst.input_ptr, len(data)) & 0xFFFFFFFFFFFFFFFF
        if inst.failure is not None:
            raise PluginError(f"plugin {self.name}.{export} failed: {inst.failure}", "fail")
        out_ptr, out_len = packed >> 32, packed & 0xFFFFFFFF
        if out_len > max_output:
            raise PluginError(
                f"plugin {self.name}.{export} returned {out_len} bytes, over its "
                f"max_output of {max_output}",
                "output",
            )
        if not out_len:
            return b""
        if out_ptr + out_len > inst.memory_size():
            raise PluginError(f"plugin {self.name}.{export} returned a bad buffer", "abi")
        # The output stays the plugin's; it may reuse that memory at its next call.
        return inst.read(out_ptr, out_len)

    def _run_command(self, data: bytes) -> bytes:
        """A WASI command: a fresh instance runs `_start`, stdin is the input, stdout the output."""
        if JS_WEBASSEMBLY:
            raise PluginError(
                f"plugin {self.name} is a WASI command; commands need wasmtime, which does "
                "not run under Pyodide (only reactor plugins run there)",
                "missing",
            )
        wt = _wasmtime()
        limits = self.manifest.limits
        if "wasi" not in self.granted:
            raise PluginError(
                f"plugin {self.name} is a WASI command and was not granted the wasi "
                f"capability; grant it in [plugins.grants.{self.name}] to run it",
                "capability",
            )
        self.calls += 1
        output = bytearray()
        overflow = False

        def collect(chunk: bytes) -> int:
            # Counted as it is written: a command cannot fill a disk before the check.
            nonlocal overflow
            if len(output) + len(chunk) > limits.max_output:
                overflow = True
                return -errno.EFBIG
            output.extend(chunk)
            return len(chunk)

        with tempfile.TemporaryDirectory(prefix="frys-wasi-") as tmp:
            stdin = Path(tmp) / "stdin"
            stdin.write_bytes(data)
            wasi = wt.WasiConfig()
            # No sockets and no arguments ever; dirs and env only as the operator granted.
            wasi.stdin_file = str(stdin)
            wasi.stdout_custom = collect
            wasi.env = list(self.grant.env.items())
            for entry in self.grant.dirs:
                host, guest, *mode = entry.split(":")
                wasi.preopen_dir(host, guest, fs_mutable=mode == ["rw"])
            inst = _Instance(self, wasi)
            try:
                inst.exports["_start"](inst.store)
            except wt.ExitTrap as e:
                if e.code != 0 and not overflow:
                    self.errors += 1
                    raise PluginError(f"plugin {self.name} exited with status {e.code}") from e
            except wt.Trap as e:
                self.errors += 1
                kind = "output" if overflow else _trap_kind(e)
                message = _TRAP_MESSAGES.get(kind, str(e).splitlines()[0])
                raise PluginError(f"plugin {self.name}: {message}", kind) from e
            finally:
                if self.metered:
                    self.fuel_used += limits.fuel - inst.store.get_fuel()
        if overflow:
            self.errors += 1
            raise PluginError(
                f"plugin {self.name} wrote more than its max_output of {limits.max_output} "
                "bytes; the rest was refused",
                "output",
            )
        return bytes(output)


def _reset(inst: _Instance) -> None:
    # A failed call may leave the instance in any state: never reuse it.
    if inst.broken:
        raise PluginError("instance discarded after a failed call")
    if inst.plugin.manifest.isolation == "call":
        raise PluginError("instance discarded: the plugin asks for a fresh one per call")
    inst.failure = None


_TRAP_MESSAGES = {
    "fuel": "ran out of fuel (limits.fuel); the call was stopped",
    "deadline": "ran past its deadline (limits.deadline_ms); the call was stopped",
    "stack": "exhausted its stack (infinite recursion?); the call was stopped",
    "memory": "accessed memory out of bounds",
    "output": "wrote more than its max_output; the call was stopped",
}


def _ed25519() -> Any:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise PluginError(
            "plugin signatures need the cryptography package: pip install 'frys-edge[signing]'",
            "missing",
        ) from e
    return ed25519, InvalidSignature


def verify_signature(manifest: Manifest, digest: str, trusted_keys: Sequence[str]) -> str:
    """The trusted key (base64) whose signature the manifest carries, or a PluginError."""
    ed25519, invalid = _ed25519()
    if manifest.signature is None:
        raise PluginError(
            f"plugin {manifest.name} is not signed and signatures are required; "
            "sign it with `frys plugin sign`",
            "signature",
        )
    try:
        signature = base64.b64decode(manifest.signature, validate=True)
    except ValueError as e:
        raise PluginError(
            f"plugin {manifest.name}: signature is not base64: {e}", "signature"
        ) from e
    for key in trusted_keys:
        try:
            public = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(key))
            public.verify(signature, digest.encode())
        except (ValueError, invalid):
            continue
        return key
    raise PluginError(
        f"plugin {manifest.name}: the signature does not verify with any of the "
        f"{len(trusted_keys)} trusted keys in [plugins] trusted_keys; refusing to load it",
        "signature",
    )


def load_plugin(
    directory: str | os.PathLike[str],
    grant: Grant | None = None,
    *,
    services: HostServices | None = None,
    cache_dir: Path | None = None,
    pool_size: int = 4,
    trusted_keys: Sequence[str] = (),
    require_signature: bool = False,
) -> WasmPlugin:
    """Check and load a plugin directory; hash (and signature) are checked before compiling.

    A signature is checked when the config requires one, or when the plugin carries one and
    trusted keys are configured.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    module_path = directory / manifest.module
    try:
        data = module_path.read_bytes()
    except OSError as e:
        raise PluginError(f"{module_path}: cannot read the module: {e.strerror}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256.lower():
        raise PluginError(
            f"{module_path}: sha256 {digest} does not match the manifest's {manifest.sha256}; "
            "the module was altered or the manifest is stale: refusing to load it",
            "integrity",
        )
    if require_signature or (manifest.signature is not None and trusted_keys):
        verify_signature(manifest, digest, trusted_keys)
    grant = grant or Grant()
    for entry in grant.dirs:
        parts = entry.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise PluginError(
                f"plugin {manifest.name}: granted dir {entry!r} must be HOST:GUEST or "
                "HOST:GUEST:ro|rw"
            )
        if not Path(parts[0]).is_dir():
            raise PluginError(f"plugin {manifest.name}: granted dir {parts[0]} does not exist")
    granted = set(manifest.capabilities) & set(grant.capabilities)
    denied = sorted(set(manifest.capabilities) - granted)
    if denied:
        log.info("plugin %s: capabilities asked for but not granted: %s", manifest.name, denied)
    cache = None if require_signature else cache_dir
    module, hit = _compile(manifest, data, digest, cache, module_path)
    _check_imports(manifest, module, module_path)
    plugin = WasmPlugin(
        directory,
        manifest,
        module,
        granted,
        grant,
        services or HostServices(),
        pool_size,
        hit,
    )
    if manifest.kind == "reactor":  # instantiate once now, so link errors show at load
        plugin.pool.release(plugin.pool.acquire())
    return plugin


def _compile(
    manifest: Manifest, data: bytes, digest: str, cache_dir: Path | None, path: Path
) -> tuple[Any, bool]:
    """The module compiled by this platform's engine, and whether the AOT cache had it.

    The cache holds native code: when signatures are required, the caller passes no cache
    dir, so nothing unsigned runs (its files are only as safe as the data dir's permissions).
    """
    try:
        if JS_WEBASSEMBLY:
            return _JsModule(cap_memory(data, manifest.limits.memory_pages)), False
        wt = _wasmtime()
        try:
            return compile_module(data, digest, cache_dir, manifest.limits.fuel > 0)
        except wt.WasmtimeError as e:
            raise PluginError(f"not a valid WebAssembly module: {e}", "invalid") from e
    except PluginError as e:
        raise PluginError(f"{path}: {e}", e.kind) from e


def _check_imports(manifest: Manifest, module: Any, path: Path) -> None:
    wasi = manifest.kind == "command" or "wasi" in manifest.capabilities
    for imp in module.imports:
        if imp.module == "frys":
            continue
        if imp.module.startswith("wasi_") and wasi:
            continue
        raise PluginError(
            f"{path}: imports {imp.module}.{imp.name}, which the host does not provide; "
            "plugins may import only the frys functions in plugins/ABI.md"
            + (" (and WASI when the manifest asks for it)" if not wasi else ""),
            "link",
        )
