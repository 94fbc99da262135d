"""The kernel: tasks, supervision, health, config reload, native plugins, graceful drain."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import clean_env

from frys_edge.config import load_config
from frys_edge.core import BusFull, Cancelled, RetryPolicy
from frys_edge.runtime import NotRunning, PluginError, Runtime, budget_for


def make_runtime(tmp_path: Path, body: str = "") -> tuple[Runtime, Path]:
    path = tmp_path / "frys.toml"
    path.write_text(f'[system]\ndata_dir = "{tmp_path / "data"}"\n{body}')
    return Runtime(load_config(path, env={})), path


def test_tasks_run_by_priority_and_return_results(tmp_path: Path) -> None:
    async def main() -> None:
        rt, _ = make_runtime(tmp_path)
        async with rt:
            order: list[str] = []

            async def job(name: str) -> str:
                order.append(name)
                return name.upper()

            rt.scheduler.set_group_limit("one", 1)
            first = rt.spawn(anyio.sleep, 0.05, group="one")
            tasks = [
                rt.spawn(job, n, group="one", priority=p) for n, p in (("low", 5), ("high", 1))
            ]
            assert await rt.run(job, "direct") == "DIRECT"
            while not all(t.done() for t in (first, *tasks)):
                await anyio.sleep(0.01)
            assert order == ["direct", "high", "low"]
            assert [t.result for t in tasks] == ["LOW", "HIGH"]

    anyio.run(main)


def test_task_errors_reach_the_caller_and_delays_are_honoured(tmp_path: Path) -> None:
    async def main() -> None:
        rt, _ = make_runtime(tmp_path)
        async with rt:

            def boom() -> None:
                raise ValueError("bad reading")

            with pytest.raises(ValueError, match="bad reading"):
                await rt.run(boom)
            t0 = time.monotonic()
            assert await rt.run(lambda: "late", delay=0.2) == "late"
            assert time.monotonic() - t0 >= 0.2
        with pytest.raises(NotRunning):
            rt.spawn(boom)

    anyio.run(main)


def test_cancelling_running_and_waiting_tasks(tmp_path: Path) -> None:
    async def main() -> None:
        rt, _ = make_runtime(tmp_path)
        async with rt:
            running = rt.spawn(anyio.sleep, 30)
            delayed = rt.spawn(lambda: "never", delay=30)
            await anyio.sleep(0.01)
            assert running.state == "running"
            assert running.cancel() and delayed.cancel()
            with anyio.fail_after(2):
                while not running.done():
                    await anyio.sleep(0.01)
            assert (running.state, delayed.state) == ("cancelled", "cancelled")
            with anyio.move_on_after(0.05):
                await rt.run(anyio.sleep, 30, name="abandoned")
            await anyio.sleep(0.01)
            assert rt.scheduler.stats()["running"] == 0

    anyio.run(main)


def test_failing_component_is_restarted_and_health_says_so(tmp_path: Path) -> None:
    async def main() -> None:
        rt, _ = make_runtime(tmp_path)
        async with rt:
            calls = 0
            seen: list[tuple[str, str]] = []

            async def flaky() -> None:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise ConnectionError("sensor bus unplugged")
                await anyio.sleep_forever()

            rt.supervise("sensors", flaky, RetryPolicy(100, initial_delay=0.2, jitter=False))
            for _ in range(200):
                c = rt.health.components.get("sensors")
                if c is not None:
                    seen.append((c.status, c.reason))
                if calls == 2:
                    break
                await anyio.sleep(0.01)
            await anyio.sleep(0.01)
            failed = [reason for status, reason in seen if status == "failed"]
            assert failed and "sensor bus unplugged" in failed[0]
            component = rt.health.components["sensors"]
            assert (component.status, component.restarts) == ("ok", 1)
            assert rt.health.ready()

    anyio.run(main)


def test_bad_config_reload_keeps_the_old_config(tmp_path: Path) -> None:
    async def main() -> None:
        rt, path = make_runtime(tmp_path, 'log_level = "info"\n[memory]\nlimit = "64MB"\n')
        async with rt:
            changes: list[set[str]] = []
            rt.on_config_change(lambda cfg, sections: changes.append(sections))
            path.write_text(path.read_text().replace('"info"', "42"))
            assert await rt.reload_config() is False
            assert rt.config.system.log_level == "info"
            assert rt.metrics.snapshot()["config_reload_errors_total"] == 1
            path.write_text(path.read_text().replace("42", '"debug"').replace("64MB", "128MB"))
            assert await rt.reload_config() is True
            assert rt.config.system.log_level == "debug"
            assert rt.budget == budget_for(128 * 1024 * 1024)
            assert changes == [{"system", "memory"}]

    anyio.run(main)


def test_native_plugins_listed_in_config_load_at_start(tmp_path: Path) -> None:
    async def main() -> None:
        rt, _ = make_runtime(tmp_path, '[plugins]\nnative = ["json", "test_runtime:RECORDER"]\n')
        async with rt:
            assert set(rt.plugins) == {"json", "recorder"}
        assert RECORDER.calls[:2] == ["init", "on_load"]
        assert RECORDER.calls[-2:] == ["on_unload", "cleanup"]

    anyio.run(main)


def test_command_line_overrides_survive_a_reload(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "frys.toml"
        path.write_text('[system]\nlog_level = "info"\n')
        overrides = {"system.data_dir": str(tmp_path / "flagdata")}
        rt = Runtime(load_config(path, env={}, overrides=overrides), overrides=overrides)
        async with rt:
            path.write_text('[system]\nlog_level = "debug"\n')
            assert await rt.reload_config()
            assert rt.config.system.data_dir == str(tmp_path / "flagdata")

    anyio.run(main)


def test_config_file_change_is_picked_up_by_polling(tmp_path: Path) -> None:
    async def main() -> None:
        rt, path = make_runtime(tmp_path)
        async with rt:
            time.sleep(0.01)
            path.write_text(path.read_text() + 'log_format = "json"\n')
            with anyio.fail_after(5):
                while rt.config.system.log_format != "json":
                    await anyio.sleep(0.05)

    anyio.run(main)


class Recorder:
    """A native plugin that records its lifecycle."""

    NAME = "recorder"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def init(self, rt: Runtime) -> None:
        self.calls.append("init")

    async def on_load(self, rt: Runtime) -> None:
        self.calls.append("on_load")

    def on_config_change(self, rt: Runtime, sections: set[str]) -> None:
        self.calls.append(f"on_config_change:{','.join(sorted(sections))}")

    async def on_unload(self, rt: Runtime) -> None:
        self.calls.append("on_unload")

    def cleanup(self, rt: Runtime) -> None:
        self.calls.append("cleanup")


RECORDER = Recorder()


def test_native_plugin_lifecycle_while_running(tmp_path: Path) -> None:
    async def main() -> None:
        rt, path = make_runtime(tmp_path)
        plugin = Recorder()
        async with rt:
            await rt.load_plugin(plugin)
            assert "plugin:recorder" in rt.health.components
            with pytest.raises(PluginError, match="already loaded"):
                await rt.load_plugin(plugin)
            path.write_text(path.read_text() + 'log_level = "warning"\n')
            await rt.reload_config()
            await rt.unload_plugin("recorder")
            assert "plugin:recorder" not in rt.health.components
            with pytest.raises(PluginError, match="not loaded"):
                await rt.unload_plugin("recorder")
            loaded = await rt.load_plugin("json")  # any importable module is a plugin
            assert loaded.name == "json"
            with pytest.raises(PluginError, match="no entry point"):
                await rt.load_plugin("no_such_module_here")
        assert plugin.calls == [
            "init",
            "on_load",
            "on_config_change:system",
            "on_unload",
            "cleanup",
        ]

    anyio.run(main)


DRAIN = """
import sys, anyio
from frys_edge.config import load_config
from frys_edge.core import BusFull, Cancelled, RetryPolicy
from frys_edge.runtime import Runtime, serve

async def slow_job(rt, seconds):
    await anyio.sleep(seconds)
    await rt.storage.put("drain", "finished", True)

def ready(rt, seconds):
    rt.spawn(slow_job, rt, seconds)
    print("ready", flush=True)

loaded = load_config(overrides={"system.data_dir": sys.argv[1],
                                "system.shutdown_timeout": float(sys.argv[3])})
rt = Runtime(loaded)
sys.exit(anyio.run(serve, rt, lambda: ready(rt, float(sys.argv[2]))))
"""


def start_drain_child(data_dir: Path, job_seconds: float, timeout: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", DRAIN, str(data_dir), str(job_seconds), str(timeout)],
        stdout=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_sigterm_lets_in_flight_work_finish_and_exits_0(tmp_path: Path) -> None:
    from frys_edge.storage import Storage

    proc = start_drain_child(tmp_path / "data", job_seconds=0.5, timeout=5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert time.monotonic() - t0 < 5
    with Storage(tmp_path / "data", readonly=True) as store:
        entry: Any = store.get("drain", "finished")
        assert entry is not None and entry.value is True


def test_drain_gives_up_at_the_shutdown_timeout(tmp_path: Path) -> None:
    from frys_edge.storage import Storage

    proc = start_drain_child(tmp_path / "data", job_seconds=60, timeout=0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert 0.5 <= time.monotonic() - t0 < 5
    with Storage(tmp_path / "data", readonly=True) as store:
        assert store.get("drain", "finished") is None, "the job was cancelled, not finished"


def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    proc = start_drain_child(tmp_path / "data", job_seconds=60, timeout=30)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 1
    assert time.monotonic() - t0 < 5


def test_health_turns_degraded_over_the_memory_limit(tmp_path: Path) -> None:
    async def main() -> None:
        # Any Python process is over 4 MiB resident, the smallest limit config allows.
        rt, _ = make_runtime(tmp_path, '[memory]\nlimit = "4MiB"\n')
        async with rt:
            with anyio.fail_after(2):
                while "memory" not in rt.health.components:
                    await anyio.sleep(0.01)
            memory = rt.health.components["memory"]
            assert memory.status == "degraded"
            assert "over [memory] limit 4.0 MiB" in memory.reason
            assert rt.health.status() == "degraded" and rt.health.ready()

    anyio.run(main)


def test_budget_grows_with_the_memory_limit() -> None:
    small, large = budget_for(8 * 2**20), budget_for(256 * 2**20)
    assert small.cache_entries < large.cache_entries
    assert small.bus_queue < large.bus_queue
    assert small.max_pending_tasks <= large.max_pending_tasks


def test_delayed_tasks_in_a_row_each_fire(tmp_path: Path) -> None:
    async def main() -> None:
        rt, _ = make_runtime(tmp_path)
        async with rt:
            with anyio.fail_after(3):
                assert await rt.run(lambda: 1, delay=0.05) == 1
                assert await rt.run(lambda: 2, delay=0.05) == 2
                later = rt.spawn(lambda: "later", delay=0.3)
                assert await rt.run(lambda: "sooner", delay=0.05) == "sooner"
                assert not later.done()
                while not later.done():
                    await anyio.sleep(0.02)
            assert later.result == "later"

    anyio.run(main)


def test_stop_cancels_work_that_never_started_and_bounds_inline_work(tmp_path: Path) -> None:
    async def main() -> None:
        rt, _ = make_runtime(tmp_path, "shutdown_timeout = 0.3\n")
        outcomes: list[str] = []

        async def wait_for(**kwargs: Any) -> None:
            try:
                await rt.run(anyio.sleep, 30, **kwargs)
            except Cancelled:
                outcomes.append("cancelled")

        await rt.start()
        rt.scheduler.set_group_limit("one", 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for)  # runs inline in its caller
            tg.start_soon(lambda: wait_for(group="one"))
            tg.start_soon(lambda: wait_for(group="one"))  # parked behind the first
            tg.start_soon(lambda: wait_for(delay=60))  # waiting on a timer
            await anyio.sleep(0.05)
            t0 = time.monotonic()
            with anyio.fail_after(5):  # stop() works inside a caller's cancel scope
                await rt.stop()
            assert time.monotonic() - t0 < 2
        assert outcomes == ["cancelled"] * 4
        assert rt.storage is None

    anyio.run(main)


class BadUnload:
    NAME = "bad-unload"

    def on_unload(self, rt: Runtime) -> None:
        raise RuntimeError("unload exploded")

    def on_config_change(self, rt: Runtime, sections: set[str]) -> None:
        raise ValueError("cannot take it")


def test_plugin_errors_neither_stop_reloads_nor_leak_the_data_dir(tmp_path: Path) -> None:
    async def main() -> None:
        rt, path = make_runtime(tmp_path)
        async with rt:
            await rt.load_plugin(BadUnload())
            path.write_text(path.read_text() + 'log_level = "warning"\nthreads = 2\n')
            assert await rt.reload_config() is True
            assert rt.config.system.log_level == "warning"
            assert rt.config.system.threads == 4, "threads applies at the next start"
            plugin = rt.health.components["plugin:bad-unload"]
            assert plugin.status == "degraded" and "cannot take it" in plugin.reason
        from frys_edge.storage import Storage

        Storage(tmp_path / "data").close()  # the lock was released

    anyio.run(main)


def test_publish_waits_for_room_in_a_blocking_subscription(tmp_path: Path) -> None:
    async def main() -> None:
        rt, _ = make_runtime(tmp_path)
        async with rt:
            sub = rt.bus.subscribe("sensors/#", maxsize=2, policy="block")
            assert await rt.publish("sensors/1", 1) == 1
            assert await rt.publish("sensors/1", 2) == 1
            with pytest.raises(BusFull, match="is full"):
                await rt.publish("sensors/1", 3, timeout=0.05)

            async def consume_later() -> None:
                await anyio.sleep(0.05)
                sub.get_nowait()

            async with anyio.create_task_group() as tg:
                tg.start_soon(consume_later)
                with anyio.fail_after(2):
                    assert await rt.publish("sensors/1", 3) == 1
            assert [sub.get_nowait().payload, sub.get_nowait().payload] == [2, 3]
            assert sub.dropped == 0

    anyio.run(main)
