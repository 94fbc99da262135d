"""config: owns the config model and its loading (defaults, TOML file, FRYS_* env, CLI overrides,
reload polling); it must not start, open or configure anything itself.

Precedence, lowest first: defaults, the TOML file, the environment, command-line overrides.
Every value from every source is validated by msgspec against the field's type, and all
problems are reported together in one `ConfigError`.

Sizes (`network.buffer_size`, `memory.limit`) accept an int (bytes) or a string such as
"4096", "512k", "64MB", "64 MiB", "1.5GB". Units are 1024-based: k/kb/kib, m/mb/mib, g/gb/gib and
t/tb/tib all mean KiB, MiB, GiB, TiB (so the design documents' `64MB` is 64 MiB), any case.

Environment: `FRYS_<SECTION>_<KEY>` sets `[section] key` (`FRYS_SYSTEM_DATA_DIR`,
`FRYS_NETWORK_PORT`). The design documents' names are aliases: `FRYS_THREAD_COUNT`
(system.threads), `FRYS_PLUGIN_PATHS` (plugins.paths), `FRYS_PLUGIN_SANDBOX` (plugins.sandbox),
`FRYS_MAX_CONNECTIONS` (network.max_connections); the full name wins when both are set.
A `FRYS_<SECTION>_*` name with an unknown key is a problem; other `FRYS_*` names (such as a
config-file variable read by the CLI) are ignored. Env values are text: lists split on
`os.pathsep`, booleans take true/false/1/0/yes/no/on/off in any case, and an empty value
unsets an optional field (`FRYS_NETWORK_TOKEN=`).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping
from fractions import Fraction
from types import UnionType
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

import msgspec

from frys_edge.core import FrysError

__all__ = [
    "Config",
    "ConfigError",
    "ConfigWatcher",
    "LoadedConfig",
    "MemoryConfig",
    "NetworkConfig",
    "PluginGrant",
    "PluginsConfig",
    "Problem",
    "StorageConfig",
    "SystemConfig",
    "WorkflowsConfig",
    "changed_keys",
    "changed_sections",
    "config_items",
    "display_value",
    "format_size",
    "load_config",
    "parse_size",
]

_KIB = 1024
_MIB = 1024 * _KIB
_GIB = 1024 * _MIB
_TIB = 1024 * _GIB

# Marks an int field as a byte size, so it also accepts human strings.
_SIZE_MARK = object()
_Size = Annotated[int, _SIZE_MARK]
_Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]

_SIZE_FORMS = 'bytes as an integer, or a string like "4096", "512k", "64MB", "64 MiB", "1.5GB"'


class SystemConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Process-wide settings."""

    data_dir: str = "./data"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    # Worker threads for blocking work (SQLite writes, long WASM calls); 0 runs that work
    # inline on the event loop, the only choice under Pyodide, which cannot start threads.
    threads: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0 if sys.platform == "emscripten" else 4
    shutdown_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0


class StorageConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """SQLite settings."""

    sync: Literal["normal", "full"] = "normal"
    busy_timeout: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    # Size of the reader connection pool.
    readers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    # Cap on the database file; writes beyond it fail with "disk full". None: no cap.
    max_size: Annotated[_Size, msgspec.Meta(ge=64 * _KIB)] | None = None


class NetworkConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """HTTP API and health endpoint settings."""

    host: str = "127.0.0.1"
    port: _Port = 8080
    health_port: _Port = 9090
    token: str | None = None
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 1000
    buffer_size: Annotated[_Size, msgspec.Meta(ge=1)] = 64 * _KIB
    # PEM files: with both set, the API port speaks HTTPS (the health port stays plain HTTP
    # for probes).
    tls_cert: str | None = None
    tls_key: str | None = None


class PluginGrant(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What the operator allows one WASM plugin (nothing unless listed here)."""

    capabilities: list[Literal["log", "kv", "emit", "clock", "random", "wasi"]] = []
    # Topic patterns the plugin may emit on (with the emit capability).
    topics: list[str] = []
    # With wasi: directories "HOST:GUEST" (read-only) or "HOST:GUEST:rw", and env variables.
    dirs: list[str] = []
    env: dict[str, str] = {}


class PluginsConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Where plugins come from, what they are granted, and whether they run sandboxed."""

    # Directories whose subdirectories holding frys-plugin.toml are WASM plugins.
    paths: list[str] = []
    sandbox: bool = True
    native: list[str] = []
    # Per plugin name: [plugins.grants.NAME] capabilities = [...], topics = [...].
    grants: dict[str, PluginGrant] = {}
    # Instances kept per WASM plugin (calls beyond it wait).
    pool_size: Annotated[int, msgspec.Meta(ge=1, le=256)] = 4
    # Refuse WASM plugins without a valid ed25519 signature by one of trusted_keys.
    require_signature: bool = False
    # base64 ed25519 public keys (from `frys plugin keygen`).
    trusted_keys: list[str] = []


class MemoryConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Memory budget of the runtime."""

    limit: Annotated[_Size, msgspec.Meta(ge=4 * _MIB)] = 64 * _MIB


class WorkflowsConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Where workflow definitions live and how many runs may be in flight."""

    # Directory of definition files (.yaml, .yml, .json, .toml) loaded by `frys run`.
    dir: str = "./workflows"
    # Runs in flight at once; starting more waits for a free slot.
    max_runs: Annotated[int, msgspec.Meta(ge=1)] = 10000


class Config(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The whole configuration; every section defaults to its defaults."""

    system: SystemConfig = SystemConfig()
    storage: StorageConfig = StorageConfig()
    network: NetworkConfig = NetworkConfig()
    plugins: PluginsConfig = PluginsConfig()
    memory: MemoryConfig = MemoryConfig()
    workflows: WorkflowsConfig = WorkflowsConfig()


class Problem(msgspec.Struct, frozen=True):
    """One thing wrong with the configuration, and where it came from."""

    source: str  # file path, env var name, or "flag"
    line: int | None
    path: str  # dotted key such as "system.threads"; "" for whole-file problems
    message: str
    expected: str | None = None

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(FrysError):
    """The configuration is invalid; `problems` lists every reason, in source order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        count = f"{len(problems)} problem" + ("" if len(problems) == 1 else "s")
        listing = "".join(f"\n  {problem}" for problem in problems)
        super().__init__(f"invalid configuration ({count}):{listing}")


class LoadedConfig(msgspec.Struct, frozen=True):
    """A validated config with the origin of every value."""

    config: Config
    path: str | None
    sources: dict[str, str]  # dotted key -> "default", "file:frys.toml:7", "env:FRYS_...", "flag"
    mtime: float | None


class _Field(NamedTuple):
    section: str
    name: str
    type: Any
    size: bool
    secret: bool
    choices: tuple[object, ...] | None


def _is_size(tp: Any) -> bool:
    args = get_args(tp)
    if get_origin(tp) in (Union, UnionType):  # an optional size
        return any(_is_size(arg) for arg in args)
    return any(arg is _SIZE_MARK for arg in args)


def _field_table(secrets: set[str]) -> dict[str, _Field]:
    table: dict[str, _Field] = {}
    for section in msgspec.structs.fields(Config):
        for field in msgspec.structs.fields(section.type):
            args = get_args(field.type)
            dotted = f"{section.name}.{field.name}"
            table[dotted] = _Field(
                section=section.name,
                name=field.name,
                type=field.type,
                size=_is_size(field.type),
                secret=dotted in secrets,
                choices=args if get_origin(field.type) is Literal else None,
            )
    return table


_FIELDS = _field_table(secrets={"network.token"})
_SECTIONS: dict[str, type[msgspec.Struct]] = {
    f.name: f.type for f in msgspec.structs.fields(Config)
}
_ENV_ALIASES = {
    "FRYS_THREAD_COUNT": "system.threads",
    "FRYS_PLUGIN_PATHS": "plugins.paths",
    "FRYS_PLUGIN_SANDBOX": "plugins.sandbox",
    "FRYS_MAX_CONNECTIONS": "network.max_connections",
}
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True}
_BOOL_WORDS |= {"false": False, "0": False, "no": False, "off": False}
_SIZE_TEXT = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])i?)?b?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": _KIB, "m": _MIB, "g": _GIB, "t": _TIB}
_MSGSPEC_ERROR = re.compile(
    r"Expected `(?P<type>[^`]*)`(?P<bound>.*?)"
    r"(?:, got `(?P<got>[^`]*)`)?(?: - at `\$(?P<at>[^`]*)`)?"
)
_TOML_ERROR = re.compile(r"(?P<message>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)")
_TOML_HEADER = re.compile(r"\s*\[\s*([^\[\]]+?)\s*\]")
_TOML_KEY = re.compile(r"\s*([\w\-.\"' ]+?)\s*=")


def parse_size(value: object) -> int:
    """Bytes from an int or a human string ("512k", "64MB", "64 MiB", "1.5GB"; 1024-based)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and (match := _SIZE_TEXT.fullmatch(value.strip())):
        size = Fraction(match[1]) * _SIZE_UNITS[(match[2] or "").lower()]
        if size.denominator == 1:
            return int(size)
    raise ValueError(f"not a size: {value!r} (expected {_SIZE_FORMS})")


def format_size(size: int) -> str:
    """The exact human form of a byte count ("64 MiB", "1536 KiB", "100 B")."""
    for unit, name in ((_TIB, "TiB"), (_GIB, "GiB"), (_MIB, "MiB"), (_KIB, "KiB")):
        if size and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} B"


class _Setting(NamedTuple):
    """A raw value for one key from one source, before validation."""

    section: str
    key: str
    raw: object
    source: str
    line: int | None
    label: str
    text: bool  # env and flag strings are text to convert, file values are already typed


class _Invalid(Exception):
    def __init__(self, message: str, expected: str | None, subpath: str = "") -> None:
        super().__init__(message)
        self.message, self.expected, self.subpath = message, expected, subpath


def _show(value: object, field: _Field | None = None) -> str:
    if field is not None and field.secret:
        return "********"
    shown = msgspec.json.encode(value).decode()
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _from_text(field: _Field, text: str) -> object:
    args = get_args(field.type)
    if field.type is bool:
        return _BOOL_WORDS.get(text.lower(), text)
    if get_origin(field.type) is list:
        return text.split(os.pathsep) if text else []
    if text == "" and type(None) in args:
        return None
    return text


def _convert(field: _Field, raw: object, text: bool) -> object:
    value = _from_text(field, raw) if text and isinstance(raw, str) else raw
    if field.size and value is not None:
        try:
            value = parse_size(value)
        except ValueError:
            raise _Invalid(
                f"expected a size ({_SIZE_FORMS}; units are 1024-based), "
                f"got {type(raw).__name__} {_show(raw, field)}",
                "size",
            ) from None
    try:
        return msgspec.convert(value, field.type, strict=not text)
    except msgspec.ValidationError as error:
        raise _explain(field, raw, str(error)) from None


def _explain(field: _Field, raw: object, error: str) -> _Invalid:
    """Rewrite msgspec's message into "expected X, got T value" for the user."""
    if field.choices is not None:
        expected = "one of " + ", ".join(_show(choice) for choice in field.choices)
        return _Invalid(f"expected {expected}, got {_show(raw, field)}", expected)
    match = _MSGSPEC_ERROR.fullmatch(error)
    if match is None:
        return _Invalid(error, None)
    expected = match["type"] + match["bound"]
    if field.size:  # bounds in bytes read better as "4 MiB"
        bound = re.sub(r"\d+", lambda number: format_size(int(number[0])), match["bound"])
        expected = "size" + bound
    if match["at"]:  # an item inside a list: name the item, not the whole value
        got = f", got {match['got']}" if match["got"] else ""
        return _Invalid(f"expected {expected}{got}", expected, match["at"])
    shown = _show(raw, field)
    got = f"{match['got']} {shown}" if match["got"] else shown
    return _Invalid(f"expected {expected}, got {got}", expected)


def _unknown(what: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f'did you mean "{close[0]}"?' if close else "known: " + ", ".join(known)
    return f"unknown {what}; {hint}"


def _toml_lines(text: str) -> dict[str, int]:
    """First line of each table and dotted key: a line scan, good enough to point at a key."""
    lines: dict[str, int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if header := _TOML_HEADER.match(line):
            table = _dotted(header[1])
            lines.setdefault(table, number)
        elif key := _TOML_KEY.match(line):
            lines.setdefault(f"{table}.{_dotted(key[1])}".lstrip("."), number)
    return lines


def _dotted(key: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in key.split("."))


def _file_settings(path: str) -> tuple[list[_Setting | Problem], float | None]:
    try:
        mtime = os.stat(path).st_mtime  # before reading, so a later edit is never missed
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return [Problem(path, None, "", "config file not found; check the path")], None
    except OSError as error:
        return [Problem(path, None, "", f"cannot read config file: {error.strerror}")], None
    try:
        text = data.decode()
        document = tomllib.loads(text)
    except UnicodeDecodeError as error:
        bad_line = data.count(b"\n", 0, error.start) + 1
        return [Problem(path, bad_line, "", "not UTF-8 text; save the file as UTF-8")], mtime
    except tomllib.TOMLDecodeError as error:
        # tomllib gives the position only inside its message.
        match = _TOML_ERROR.fullmatch(str(error))
        if match is None:  # "(at end of document)"
            return [Problem(path, None, "", f"TOML syntax error: {error}")], mtime
        message = f"TOML syntax error at column {match['column']}: {match['message']}"
        return [Problem(path, int(match["line"]), "", message)], mtime
    lines = _toml_lines(text)
    items: list[_Setting | Problem] = []
    for section, table in document.items():
        if section not in _SECTIONS:
            message = _unknown(f'section "{section}"', section, list(_SECTIONS))
            items.append(Problem(path, lines.get(section), section, message))
        elif not isinstance(table, dict):
            message = f"expected a table [{section}], got {type(table).__name__} {_show(table)}"
            items.append(Problem(path, lines.get(section), section, message, "table"))
        else:
            for key, raw in table.items():
                line = lines.get(f"{section}.{key}", lines.get(section))
                label = f"file:{path}" if line is None else f"file:{path}:{line}"
                items.append(_Setting(section, key, raw, path, line, label, text=False))
    return items, mtime


def _env_settings(env: Mapping[str, str]) -> Iterator[_Setting]:
    found: list[tuple[int, str, str]] = []
    for name in env:
        if name in _ENV_ALIASES:
            found.append((0, name, _ENV_ALIASES[name]))
        elif name.startswith("FRYS_"):
            section, _, key = name.removeprefix("FRYS_").partition("_")
            if section.lower() in _SECTIONS and section.isupper():
                found.append((1, name, f"{section.lower()}.{key.lower()}"))
    for _, name, path in sorted(found):  # aliases first, so the full name wins
        section, _, key = path.partition(".")
        yield _Setting(section, key, env[name], name, None, f"env:{name}", text=True)


def _override_settings(overrides: Mapping[str, object]) -> Iterator[_Setting | Problem]:
    for path, raw in overrides.items():
        section, _, key = path.partition(".")
        if section not in _SECTIONS:
            message = _unknown(f'section "{section}"', section, list(_SECTIONS))
            yield Problem("flag", None, path, message)
        elif not key:
            yield Problem("flag", None, path, 'expected a dotted key such as "system.data_dir"')
        else:
            yield _Setting(section, key, raw, "flag", None, "flag", text=isinstance(raw, str))


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, str | int | float | bool | list[str]] | None = None,
) -> LoadedConfig:
    """Load and validate the config from defaults, `path`, `env` (default os.environ) and overrides.

    `overrides` maps dotted keys to values from the command line; strings are converted like env
    values. Raises ConfigError listing every problem in every source.
    """
    file_path = None if path is None else os.fspath(path)
    items: list[_Setting | Problem] = []
    mtime = None
    if file_path is not None:
        items, mtime = _file_settings(file_path)
    items += _env_settings(os.environ if env is None else env)
    items += _override_settings(overrides or {})

    problems: list[Problem] = []
    values: dict[str, dict[str, object]] = {section: {} for section in _SECTIONS}
    sources = dict.fromkeys(_FIELDS, "default")
    for item in items:
        if isinstance(item, Problem):
            problems.append(item)
            continue
        dotted = f"{item.section}.{item.key}"
        field = _FIELDS.get(dotted)
        if field is None:
            known = [f.name for f in _FIELDS.values() if f.section == item.section]
            message = _unknown(f'key "{item.key}" in [{item.section}]', item.key, known)
            problems.append(Problem(item.source, item.line, dotted, message))
            continue
        try:
            values[item.section][item.key] = _convert(field, item.raw, item.text)
        except _Invalid as invalid:
            where = dotted + invalid.subpath
            problems.append(
                Problem(item.source, item.line, where, invalid.message, invalid.expected)
            )
            continue
        sources[dotted] = item.label
    if problems:
        raise ConfigError(problems)
    sections: dict[str, Any] = {name: _SECTIONS[name](**values[name]) for name in _SECTIONS}
    return LoadedConfig(Config(**sections), file_path, sources, mtime)


def config_items(config: Config) -> list[tuple[str, object]]:
    """Every dotted key with its value, in schema order."""
    return [(path, getattr(getattr(config, f.section), f.name)) for path, f in _FIELDS.items()]


def display_value(path: str, value: object) -> str:
    """A value as `frys config show` prints it: secrets masked, sizes human-readable."""
    if value is None:
        return "(not set)"
    field = _FIELDS.get(path)
    if field is not None and field.secret:
        return _show(value, field)
    if field is not None and field.size and isinstance(value, int):
        return format_size(value)
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    pairs = zip(config_items(old), config_items(new), strict=True)
    return [path for (path, before), (_, after) in pairs if before != after]


def changed_sections(old: Config, new: Config) -> set[str]:
    """Names of the sections whose values differ, so reload can tell each component."""
    return {name for name in _SECTIONS if getattr(old, name) != getattr(new, name)}


class ConfigWatcher:
    """Hot reload by polling the file's mtime and size; no threads, no extra dependency.

    Create it right after the initial `load_config`: the file as it is then counts as loaded.
    Call `poll()` in a loop and `reload()` on SIGHUP. On ConfigError the caller keeps its old
    config; the failed version is remembered, so `poll()` raises once per bad edit, not on
    every call.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, str | int | float | bool | list[str]] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self._env = env
        self._overrides = overrides
        self._stamp = self._current_stamp()

    def _current_stamp(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def reload(self) -> LoadedConfig:
        """Load the file now, whether or not it changed."""
        self._stamp = self._current_stamp()  # taken before reading, so a later edit is seen
        return load_config(self.path, self._env, self._overrides)

    def poll(self) -> LoadedConfig | None:
        """The new config if the file changed since the last load, else None."""
        if self._current_stamp() == self._stamp:
            return None
        return self.reload()
