"""Behaviour of the config loader: sources and precedence, env names, sizes, errors, reload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from frys_edge.config import (
    Config,
    ConfigError,
    ConfigWatcher,
    MemoryConfig,
    NetworkConfig,
    Problem,
    SystemConfig,
    changed_keys,
    changed_sections,
    config_items,
    display_value,
    format_size,
    load_config,
    parse_size,
)
from frys_edge.core import FrysError

EXAMPLE = Path(__file__).parent.parent / "examples" / "frys.toml"
KIB, MIB, GIB = 1024, 1024**2, 1024**3


def write(tmp_path: Path, text: str, name: str = "frys.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [str(problem) for problem in excinfo.value.problems]


# Sources and precedence


def test_defaults_apply_when_there_is_no_file() -> None:
    loaded = load_config(env={})
    assert loaded.config == Config()
    assert loaded.config.system.threads == 4
    assert loaded.config.memory.limit == 64 * MIB
    assert loaded.config.network.buffer_size == 64 * KIB
    assert loaded.path is None
    assert loaded.mtime is None
    assert set(loaded.sources.values()) == {"default"}


def test_file_values_replace_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[system]\ndata_dir = "/var/lib/frys"\nthreads = 8\n'
        '[network]\nport = 9000\ntoken = "s3cret"\n'
        '[plugins]\npaths = ["/opt/plugins"]\nsandbox = false\n',
    )
    loaded = load_config(path, env={})
    config = loaded.config
    assert config.system.data_dir == "/var/lib/frys"
    assert config.system.threads == 8
    assert config.network.port == 9000
    assert config.network.token == "s3cret"
    assert config.plugins.paths == ["/opt/plugins"]
    assert config.plugins.sandbox is False
    assert config.storage == Config().storage
    assert loaded.path == str(path)
    assert loaded.mtime == path.stat().st_mtime


def test_env_wins_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[system]\ndata_dir = "/from/file"\n[network]\nport = 9000\n')
    config = load_config(path, env={"FRYS_SYSTEM_DATA_DIR": "/from/env"}).config
    assert config.system.data_dir == "/from/env"
    assert config.network.port == 9000


def test_overrides_win_over_env(tmp_path: Path) -> None:
    path = write(tmp_path, "[network]\nport = 9000\n")
    env = {"FRYS_NETWORK_PORT": "9001", "FRYS_SYSTEM_DATA_DIR": "/from/env"}
    config = load_config(path, env=env, overrides={"network.port": "9002"}).config
    assert config.network.port == 9002
    assert config.system.data_dir == "/from/env"


def test_overrides_accept_typed_values() -> None:
    overrides: dict[str, bool | int | list[str]] = {
        "plugins.paths": ["/a", "/b"],
        "plugins.sandbox": False,
        "system.threads": 2,
    }
    config = load_config(env={}, overrides=overrides).config
    assert config.plugins.paths == ["/a", "/b"]
    assert config.plugins.sandbox is False
    assert config.system.threads == 2


def test_sources_name_the_file_line_env_var_and_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "# comment\n[system]\n\nthreads = 8\n[network]\nport = 9000\n")
    loaded = load_config(
        path,
        env={"FRYS_SYSTEM_DATA_DIR": "/x", "FRYS_NETWORK_PORT": "9001"},
        overrides={"network.port": "9002"},
    )
    assert loaded.sources["system.threads"] == f"file:{path}:4"
    assert loaded.sources["system.data_dir"] == "env:FRYS_SYSTEM_DATA_DIR"
    assert loaded.sources["network.port"] == "flag"
    assert loaded.sources["storage.sync"] == "default"
    assert set(loaded.sources) == {key for key, _ in config_items(loaded.config)}


def test_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRYS_SYSTEM_THREADS", "7")
    assert load_config().config.system.threads == 7


# Environment names


@pytest.mark.parametrize(
    ("name", "text", "key", "value"),
    [
        ("FRYS_MEMORY_LIMIT", "64MB", "memory.limit", 64 * MIB),
        ("FRYS_THREAD_COUNT", "4", "system.threads", 4),
        ("FRYS_PLUGIN_PATHS", f"/a{os.pathsep}/b", "plugins.paths", ["/a", "/b"]),
        ("FRYS_PLUGIN_SANDBOX", "true", "plugins.sandbox", True),
        ("FRYS_MAX_CONNECTIONS", "1000", "network.max_connections", 1000),
        ("FRYS_NETWORK_BUFFER_SIZE", "64KB", "network.buffer_size", 64 * KIB),
        ("FRYS_STORAGE_SYNC", "full", "storage.sync", "full"),
        ("FRYS_SYSTEM_SHUTDOWN_TIMEOUT", "2.5", "system.shutdown_timeout", 2.5),
    ],
)
def test_design_document_env_names_work_as_written(
    name: str, text: str, key: str, value: object
) -> None:
    loaded = load_config(env={name: text})
    assert dict(config_items(loaded.config))[key] == value
    assert loaded.sources[key] == f"env:{name}"


def test_full_env_name_wins_over_the_design_document_alias() -> None:
    loaded = load_config(env={"FRYS_THREAD_COUNT": "2", "FRYS_SYSTEM_THREADS": "3"})
    assert loaded.config.system.threads == 3
    assert loaded.sources["system.threads"] == "env:FRYS_SYSTEM_THREADS"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        *[(word, True) for word in ("true", "TRUE", "1", "yes", "On")],
        *[(word, False) for word in ("false", "0", "No", "off")],
    ],
)
def test_env_booleans_accept_common_words(text: str, value: bool) -> None:
    assert load_config(env={"FRYS_PLUGINS_SANDBOX": text}).config.plugins.sandbox is value


def test_empty_env_value_unsets_an_optional_field_and_empties_a_list() -> None:
    config = load_config(
        env={"FRYS_NETWORK_TOKEN": "", "FRYS_PLUGINS_PATHS": ""},
        overrides={"network.token": ""},
    ).config
    assert config.network.token is None
    assert config.plugins.paths == []


def test_frys_variables_outside_known_sections_are_ignored() -> None:
    env = {"FRYS_CONFIG": "/etc/frys.toml", "FRYS_HOME": "/x", "HOME": "/root"}
    assert load_config(env=env).config == Config()


def test_unknown_key_in_a_known_env_section_is_a_problem() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(env={"FRYS_SYSTEM_THREAD": "4"})
    assert problems_of(excinfo) == [
        'FRYS_SYSTEM_THREAD: system.thread: unknown key "thread" in [system]; '
        'did you mean "threads"?'
    ]


# Sizes


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("100B", 100),
        ("512k", 512 * KIB),
        ("64MB", 64 * MIB),
        ("64 MiB", 64 * MIB),
        ("64mb", 64 * MIB),
        ("1.5GB", 3 * GIB // 2),
        ("2 Gi", 2 * GIB),
        ("1TiB", 1024 * GIB),
        ("  8 KiB ", 8 * KIB),
    ],
)
def test_human_sizes_are_1024_based(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "-1k", "64 parsecs", "1.5", "0.1k", "1e3", "64 MBB"])
def test_bad_size_strings_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="512k"):
        parse_size(text)


def test_bad_size_in_the_file_names_the_field_and_the_accepted_forms(tmp_path: Path) -> None:
    path = write(tmp_path, '[network]\nbuffer_size = "64 parsecs"\n[memory]\nlimit = 1.5\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    buffer, limit = excinfo.value.problems
    assert buffer.path == "network.buffer_size"
    assert buffer.line == 2
    assert buffer.expected == "size"
    assert '"64MB"' in buffer.message
    assert '"64 parsecs"' in buffer.message
    assert "1024-based" in buffer.message
    assert (limit.path, limit.line) == ("memory.limit", 4)
    assert "got float 1.5" in limit.message


def test_size_below_its_minimum_is_reported_in_human_units() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(env={"FRYS_MEMORY_LIMIT": "1MB"})
    assert problems_of(excinfo) == [
        'FRYS_MEMORY_LIMIT: memory.limit: expected size >= 4 MiB, got "1MB"'
    ]


units = st.sampled_from([(1, "B"), (KIB, "KiB"), (MIB, "MiB"), (GIB, "GiB"), (1024 * GIB, "TiB")])


@given(count=st.integers(min_value=0, max_value=2**20), unit=units)
def test_size_round_trips_through_its_human_form(count: int, unit: tuple[int, str]) -> None:
    size = count * unit[0]
    assert parse_size(format_size(size)) == size
    assert parse_size(f"{count}{unit[1]}") == size


@given(size=st.integers(min_value=0))
def test_any_non_negative_int_is_a_size(size: int) -> None:
    assert parse_size(size) == size


@given(size=st.integers(min_value=4 * MIB, max_value=2**62))
def test_any_int_from_the_minimum_up_is_a_memory_limit(size: int) -> None:
    assert load_config(env={}, overrides={"memory.limit": size}).config.memory.limit == size


# Errors


def test_missing_file_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert problems_of(excinfo) == [f"{path}: config file not found; check the path"]


def test_unreadable_file_is_a_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(tmp_path, env={})  # a directory cannot be read as a file
    (problem,) = excinfo.value.problems
    assert problem.source == str(tmp_path)
    assert problem.message.startswith("cannot read config file:")


def test_file_that_is_not_utf8_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "frys.toml"
    path.write_bytes(b'[system]\ndata_dir = "\xff"\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert problems_of(excinfo) == [f"{path}:2: not UTF-8 text; save the file as UTF-8"]


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "[system]\nthreads = 4\ndata_dir = = 1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    (problem,) = excinfo.value.problems
    assert problem.line == 3
    assert str(problem) == f"{path}:3: TOML syntax error at column 12: Invalid value"


def test_toml_syntax_error_at_the_end_of_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[plugins]\npaths = ["/a",\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert problems_of(excinfo) == [
        f"{path}: TOML syntax error: Invalid value (at end of document)"
    ]


def test_unknown_section_is_a_problem_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, '[system]\n\n[sytem]\ndata_dir = "/x"\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert problems_of(excinfo) == [
        f'{path}:3: sytem: unknown section "sytem"; did you mean "system"?'
    ]


def test_unknown_key_suggests_the_closest_known_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[network]\nmax_conections = 10\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert problems_of(excinfo) == [
        f'{path}:2: network.max_conections: unknown key "max_conections" in [network]; '
        'did you mean "max_connections"?'
    ]


def test_unknown_key_without_a_close_match_lists_the_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "[memory]\nzzz = 1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert excinfo.value.problems[0].message == 'unknown key "zzz" in [memory]; known: limit'


def test_wrong_type_names_file_line_path_and_expected_type(tmp_path: Path) -> None:
    path = write(tmp_path, '# Frys\n\n[system]\nlog_level = "info"\n\n\nthreads = "four"\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    (problem,) = excinfo.value.problems
    assert problem == Problem(
        source=str(path),
        line=7,
        path="system.threads",
        message='expected int, got str "four"',
        expected="int",
    )
    assert str(problem) == f'{path}:7: system.threads: expected int, got str "four"'


def test_wrong_type_in_a_dotted_key_and_in_a_list_item(tmp_path: Path) -> None:
    path = write(tmp_path, 'system.threads = "4"\n[plugins]\npaths = ["/a", 5]\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert problems_of(excinfo) == [
        f'{path}:1: system.threads: expected int, got str "4"',
        f"{path}:3: plugins.paths[1]: expected str, got int",
    ]


def test_section_that_is_not_a_table_is_a_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "system = 5\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert problems_of(excinfo) == [f"{path}:1: system: expected a table [system], got int 5"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("threads = -1", "expected int >= 0, got -1"),
        ("threads = 257", "expected int <= 256, got 257"),
        ("shutdown_timeout = 0", "expected float > 0.0, got 0"),
    ],
)
def test_out_of_range_values_are_problems(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, f"[system]\n{text}\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert excinfo.value.problems[0].message == message
    assert excinfo.value.problems[0].line == 2


def test_bad_enum_value_lists_the_allowed_values() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(env={"FRYS_SYSTEM_LOG_LEVEL": "verbose"})
    (problem,) = excinfo.value.problems
    assert str(problem) == (
        "FRYS_SYSTEM_LOG_LEVEL: system.log_level: "
        'expected one of "debug", "info", "warning", "error", got "verbose"'
    )
    assert problem.expected == 'one of "debug", "info", "warning", "error"'


def test_problems_never_show_the_token(tmp_path: Path) -> None:
    path = write(tmp_path, "[network]\ntoken = 123456\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert "123456" not in str(excinfo.value)
    assert problems_of(excinfo) == [
        f"{path}:2: network.token: expected str | null, got int ********"
    ]


def test_bad_override_is_reported_as_a_flag() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(env={}, overrides={"network.port": "http", "nowhere": "x", "system": "x"})
    assert problems_of(excinfo) == [
        'flag: network.port: expected int, got str "http"',
        'flag: nowhere: unknown section "nowhere"; '
        "known: system, storage, network, plugins, memory, workflows",
        'flag: system: expected a dotted key such as "system.data_dir"',
    ]


def test_every_problem_in_every_source_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[system]\nthreads = "four"\nlog_format = "xml"\n[storage]\nreaders = 100\n[bogus]\n',
    )
    with pytest.raises(ConfigError) as excinfo:
        load_config(
            path,
            env={"FRYS_NETWORK_PORT": "-1", "FRYS_PLUGIN_SANDBOX": "maybe"},
            overrides={"memory.limit": "lots"},
        )
    error = excinfo.value
    assert isinstance(error, FrysError)
    assert [(p.source, p.path) for p in error.problems] == [
        (str(path), "system.threads"),
        (str(path), "system.log_format"),
        (str(path), "storage.readers"),
        (str(path), "bogus"),
        ("FRYS_PLUGIN_SANDBOX", "plugins.sandbox"),
        ("FRYS_NETWORK_PORT", "network.port"),
        ("flag", "memory.limit"),
    ]
    assert str(error).startswith("invalid configuration (7 problems):\n  ")
    assert all(str(problem) in str(error) for problem in error.problems)


def test_a_bad_file_value_is_reported_even_when_env_overrides_it(tmp_path: Path) -> None:
    path = write(tmp_path, '[system]\nthreads = "four"\n')
    with pytest.raises(ConfigError):
        load_config(path, env={"FRYS_SYSTEM_THREADS": "4"})


# Showing and comparing


def test_config_items_list_every_key_in_schema_order() -> None:
    items = config_items(Config())
    assert items[0] == ("system.data_dir", "./data")
    assert ("network.token", None) in items
    assert items[-1] == ("workflows.max_runs", 10000)
    assert len(items) == 27


def test_display_value_masks_the_token_and_shows_sizes_in_human_units() -> None:
    assert display_value("network.token", "s3cret") == "********"
    assert display_value("network.token", None) == "(not set)"
    assert display_value("memory.limit", 64 * MIB) == "64 MiB"
    assert display_value("network.buffer_size", 1536) == "1536 B"
    assert display_value("plugins.sandbox", True) == "true"
    assert display_value("plugins.paths", ["/a", "/b"]) == '["/a","/b"]'
    assert display_value("system.data_dir", "./data") == "./data"
    assert display_value("system.threads", 4) == "4"


def test_changed_sections_and_keys_name_only_what_differs() -> None:
    old = Config()
    new = Config(
        system=SystemConfig(threads=8),
        network=NetworkConfig(port=1, token="t"),
        memory=MemoryConfig(),
    )
    assert changed_sections(old, new) == {"system", "network"}
    assert changed_keys(old, new) == ["system.threads", "network.port", "network.token"]
    assert changed_sections(old, Config()) == set()
    assert changed_keys(old, Config()) == []


# Hot reload


def touch(path: Path, text: str, tick: int) -> None:
    """Rewrite a file with an mtime that surely differs, whatever the filesystem's resolution."""
    path.write_text(text)
    stamp = 1_700_000_000_000_000_000 + tick * 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


def test_watcher_returns_none_until_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "frys.toml"
    touch(path, "[system]\nthreads = 2\n", tick=0)
    assert load_config(path, env={}).config.system.threads == 2
    watcher = ConfigWatcher(path, env={}, overrides={"network.port": "1"})
    assert watcher.poll() is None
    assert watcher.poll() is None

    touch(path, "[system]\nthreads = 3\n", tick=1)
    reloaded = watcher.poll()
    assert reloaded is not None
    assert (reloaded.config.system.threads, reloaded.config.network.port) == (3, 1)
    assert reloaded.mtime == path.stat().st_mtime
    assert watcher.poll() is None


def test_watcher_notices_a_change_in_size_alone(tmp_path: Path) -> None:
    path = tmp_path / "frys.toml"
    touch(path, "[system]\nthreads = 2\n", tick=0)
    watcher = ConfigWatcher(path, env={})
    touch(path, "[system]\nthreads = 16\n", tick=0)
    reloaded = watcher.poll()
    assert reloaded is not None
    assert reloaded.config.system.threads == 16


def test_watcher_raises_once_on_a_bad_edit_and_recovers_after_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "frys.toml"
    touch(path, "[system]\nthreads = 2\n", tick=0)
    watcher = ConfigWatcher(path, env={})

    touch(path, '[system]\nthreads = "two"\n', tick=1)
    with pytest.raises(ConfigError) as excinfo:
        watcher.poll()
    assert excinfo.value.problems[0].line == 2
    assert watcher.poll() is None  # the bad version is not re-reported on every poll

    touch(path, "[system]\nthreads = 5\n", tick=2)
    fixed = watcher.poll()
    assert fixed is not None
    assert fixed.config.system.threads == 5


def test_watcher_reports_a_deleted_file_once(tmp_path: Path) -> None:
    path = write(tmp_path, "[system]\nthreads = 2\n")
    watcher = ConfigWatcher(path, env={})
    path.unlink()
    with pytest.raises(ConfigError, match="not found"):
        watcher.poll()
    assert watcher.poll() is None


def test_reload_loads_even_when_nothing_changed(tmp_path: Path) -> None:
    path = write(tmp_path, "[system]\nthreads = 2\n")
    watcher = ConfigWatcher(path, env={})
    assert watcher.reload().config.system.threads == 2
    assert watcher.poll() is None


# The documented example


def test_example_config_loads_and_equals_the_defaults() -> None:
    loaded = load_config(EXAMPLE, env={})
    assert loaded.config == Config()


def test_example_config_sets_every_key_except_the_unset_optional_ones() -> None:
    # TOML has no null: optional keys whose default is "unset" appear commented out.
    sources = load_config(EXAMPLE, env={}).sources
    from_file = {key for key, source in sources.items() if source.startswith("file:")}
    unset = {"network.token", "network.tls_cert", "network.tls_key", "storage.max_size"}
    assert set(sources) - from_file == unset | {"plugins.grants"}
