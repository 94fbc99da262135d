"""Foundation benchmarks: each figure beside a floor measured in the same run, as a ratio.

The machine is shared and noisy, so every micro-benchmark runs several rounds and reports the
median round; targets are ratios to the floor or absolute bounds where the issue sets them.
Run with `frys bench` (table) and `--json FILE` (machine-readable).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

from frys_edge.config import Config, SystemConfig
from frys_edge.core import EventBus, Pool
from frys_edge.runtime import Runtime
from frys_edge.storage import Storage


class Result(msgspec.Struct):
    """One benchmark line."""

    name: str
    value: float
    unit: str
    floor_name: str
    floor: float
    target: str
    met: bool

    @property
    def ratio(self) -> float:
        return self.value / self.floor if self.floor else 0.0


def median_per_op(fn: Callable[[int], float], n: int, rounds: int) -> float:
    """Median over rounds of (seconds for n ops / n); fn(n) returns elapsed seconds."""
    return statistics.median(fn(n) / n for _ in range(rounds))


async def amedian_per_op(fn: Callable[[int], Awaitable[float]], n: int, rounds: int) -> float:
    return statistics.median([await fn(n) / n for _ in range(rounds)])


# -- floors ------------------------------------------------------------------------------


async def _noop() -> None:
    return None


async def floor_asyncio_task(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await asyncio.create_task(_noop())
    return time.perf_counter() - t0


async def floor_asyncio_queue(n: int) -> float:
    q: asyncio.Queue[int] = asyncio.Queue()
    t0 = time.perf_counter()
    for i in range(n):
        q.put_nowait(i)
        q.get_nowait()
    return time.perf_counter() - t0


def floor_sqlite_commit(path: Path, sync: str) -> Callable[[int], float]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {sync}")
    conn.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID")

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            conn.execute("BEGIN")
            conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (f"k{i}", '{"v":1}'))
            conn.execute("COMMIT")
        return time.perf_counter() - t0

    return run


def floor_batched_insert(path: Path) -> Callable[[int], float]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS kvb (k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID")

    def run(n: int) -> float:
        rows = [(f"k{i}", '{"v":1}') for i in range(n)]
        t0 = time.perf_counter()
        conn.execute("BEGIN")
        conn.executemany("INSERT OR REPLACE INTO kvb VALUES (?, ?)", rows)
        conn.execute("COMMIT")
        return time.perf_counter() - t0

    return run


# -- ours --------------------------------------------------------------------------------


def bench_pool(n: int) -> float:
    pool = Pool(object, 4, name="bench")
    acquire, release = pool.acquire, pool.release
    t0 = time.perf_counter()
    for _ in range(n):
        release(acquire())
    return time.perf_counter() - t0


def bench_bus(n: int) -> float:
    bus = EventBus()
    sub = bus.subscribe("sensors/+/temp", maxsize=n + 1)
    publish, get = bus.publish, sub.get_nowait
    t0 = time.perf_counter()
    for i in range(n):
        publish("sensors/1/temp", i)
        get()
    return time.perf_counter() - t0


async def bench_bus_handler(rt: Runtime, n: int) -> float:
    """One message at a time: publish, then wait until the handler has run."""
    loop = asyncio.get_running_loop()
    waiter: list[asyncio.Future[None]] = []

    def handler(_msg: Any) -> None:
        waiter[0].set_result(None)

    sub = rt.bus.subscribe("bench/#", handler=handler)
    t0 = time.perf_counter()
    for i in range(n):
        waiter[:] = [loop.create_future()]
        rt.bus.publish("bench/x", i)
        await waiter[0]
    elapsed = time.perf_counter() - t0
    rt.bus.unsubscribe(sub)
    return elapsed


async def bench_dispatch(rt: Runtime, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await rt.run(_noop)
    return time.perf_counter() - t0


async def floor_queue_consumer(n: int) -> float:
    """One message at a time through an asyncio.Queue to a consumer task and back."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()

    async def consumer() -> None:
        while True:
            (await queue.get()).set_result(None)

    worker = asyncio.create_task(consumer())
    t0 = time.perf_counter()
    for _ in range(n):
        reply = loop.create_future()
        queue.put_nowait(reply)
        await reply
    elapsed = time.perf_counter() - t0
    worker.cancel()
    return elapsed


async def floor_asyncio_gather(n: int) -> float:
    t0 = time.perf_counter()
    await asyncio.gather(*[asyncio.create_task(_noop()) for _ in range(n)])
    return time.perf_counter() - t0


async def bench_spawn_all(rt: Runtime, n: int) -> float:
    done = asyncio.get_running_loop().create_future()
    left = n

    def finished(_task: Any) -> None:
        nonlocal left
        left -= 1
        if left == 0:
            done.set_result(None)

    t0 = time.perf_counter()
    for _ in range(n):
        rt.spawn(_noop).add_done_callback(finished)
    await done
    return time.perf_counter() - t0


async def bench_kv_put(store: Storage, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        await store.put("bench", f"k{i}", {"v": 1})
    return time.perf_counter() - t0


async def bench_group_commit(store: Storage, writers: int, each: int) -> float:
    # New keys each round, like the floor's batched insert; overwrites cost SQLite more.
    round_ = store.writes

    async def writer(w: int) -> None:
        for i in range(each):
            await store.put("group", f"{round_}-w{w}-{i}", {"v": i})

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for w in range(writers):
            tg.start_soon(writer, w)
    return time.perf_counter() - t0


def process_start(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def idle_rss(argv: list[str], ready_marker: str | None, env: dict[str, str]) -> int:
    """Resident memory of a process after it has been idle for a second."""
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        if ready_marker:
            while ready_marker not in proc.stderr.readline():
                if proc.poll() is not None:
                    raise RuntimeError(f"{argv} exited before it was ready")
        time.sleep(1.0)
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")
    finally:
        proc.terminate()
        proc.wait(timeout=15)


# -- the run -----------------------------------------------------------------------------


async def _async_results(tmp: Path, quick: bool) -> list[Result]:
    rounds = 5 if quick else 9
    n = 2000 if quick else 10000
    out: list[Result] = []

    floor_task = await amedian_per_op(floor_asyncio_task, n, rounds)
    floor_queue = await amedian_per_op(floor_asyncio_queue, n, rounds)
    floor_gather = await amedian_per_op(floor_asyncio_gather, n, rounds)
    floor_consumer = await amedian_per_op(floor_queue_consumer, n, rounds)
    cfg = Config(system=SystemConfig(data_dir=str(tmp / "rt")))
    async with Runtime(cfg) as rt:
        dispatch = await amedian_per_op(lambda k: bench_dispatch(rt, k), n, rounds)
        spawn_all = await amedian_per_op(lambda k: bench_spawn_all(rt, k), n, rounds)
        handler = await amedian_per_op(lambda k: bench_bus_handler(rt, k), n, rounds)
    out.append(
        Result(
            "scheduler dispatch of a task (await rt.run)",
            dispatch * 1e6,
            "µs",
            "asyncio create_task+await",
            floor_task * 1e6,
            "≤ 1.5x floor",
            dispatch <= 1.5 * floor_task,
        )
    )
    out.append(
        Result(
            "scheduler: spawn N tasks, wait for all",
            spawn_all * 1e6,
            "µs",
            "asyncio create_task x N + gather",
            floor_gather * 1e6,
            "≤ 1.5x floor",
            spawn_all <= 1.5 * floor_gather,
        )
    )
    bus = median_per_op(bench_bus, n, rounds)
    out.append(
        Result(
            "bus publish to delivery (pull)",
            bus * 1e6,
            "µs",
            "asyncio.Queue put+get",
            floor_queue * 1e6,
            "≤ 5 µs",
            bus <= 5e-6,
        )
    )
    out.append(
        Result(
            "bus publish to handler run, one at a time",
            handler * 1e6,
            "µs",
            "asyncio.Queue to a consumer task",
            floor_consumer * 1e6,
            "≤ 5 µs",
            handler <= 5e-6,
        )
    )
    pool = median_per_op(bench_pool, n * 10, rounds)
    out.append(
        Result(
            "pool acquire + release",
            pool * 1e6,
            "µs",
            "asyncio.Queue put+get",
            floor_queue * 1e6,
            "≤ 2 µs",
            pool <= 2e-6,
        )
    )

    floor_commit = median_per_op(floor_sqlite_commit(tmp / "floor.db", "NORMAL"), n // 4, rounds)
    floor_full = median_per_op(floor_sqlite_commit(tmp / "floor-full.db", "FULL"), 50, 3)
    floor_rows = median_per_op(floor_batched_insert(tmp / "floor-batch.db"), n, rounds)
    with Storage(tmp / "kv") as store:
        put = await amedian_per_op(lambda k: bench_kv_put(store, k), n // 4, rounds)
        writers, each = 100, (20 if quick else 100)
        group = await amedian_per_op(
            lambda _k: bench_group_commit(store, writers, each), writers * each, rounds
        )
    with Storage(tmp / "kv-full", sync="full") as store:
        put_full = await amedian_per_op(lambda k: bench_kv_put(store, k), 50, 3)
    out.append(
        Result(
            "awaited KV put, sync=normal",
            put * 1e6,
            "µs",
            "sqlite3 commit, NORMAL",
            floor_commit * 1e6,
            "≤ 1.5x floor",
            put <= 1.5 * floor_commit,
        )
    )
    out.append(
        Result(
            "awaited KV put, sync=full",
            put_full * 1e6,
            "µs",
            "sqlite3 commit, FULL",
            floor_full * 1e6,
            "(no target)",
            True,
        )
    )
    out.append(
        Result(
            f"KV puts/s, {writers} concurrent writers",
            1 / group,
            "puts/s",
            "executemany rows/s",
            1 / floor_rows,
            "≥ 200,000 /s",
            1 / group >= 200_000,
        )
    )
    return out


def _process_results(tmp: Path, quick: bool) -> list[Result]:
    runs = 5 if quick else 15
    frys = [sys.executable, "-m", "frys_edge.cli"]
    start = process_start([*frys, "--version"], runs)
    bare = process_start([sys.executable, "-c", "pass"], runs)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRYS_")}
    env["FRYS_SYSTEM_DATA_DIR"] = str(tmp / "idle")
    rss = idle_rss([*frys, "run"], "running", env)
    sleeper = "import sys, time; print('running', file=sys.stderr, flush=True); time.sleep(60)"
    bare_rss = idle_rss([sys.executable, "-c", sleeper], "running", env)
    mib = 1024 * 1024
    return [
        Result(
            "`frys --version` process start",
            start * 1e3,
            "ms",
            "python -c pass",
            bare * 1e3,
            "≤ 150 ms",
            start <= 0.150,
        ),
        Result(
            "`frys run` idle RSS",
            rss / mib,
            "MiB",
            "idle python",
            bare_rss / mib,
            "≤ 40 MiB",
            rss <= 40 * mib,
        ),
    ]


def format_table(results: list[Result]) -> str:
    rows = [("benchmark", "median", "floor", "ratio", "target", "met")]
    for r in results:
        rows.append(
            (
                r.name,
                f"{r.value:,.2f} {r.unit}",
                f"{r.floor:,.2f} {r.unit} ({r.floor_name})",
                f"{r.ratio:.2f}x",
                r.target,
                "yes" if r.met else "NO",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_benchmarks(json_path: str | None = None, quick: bool = False) -> int:
    """Run every benchmark, print the table, optionally write JSON; returns an exit code."""
    with tempfile.TemporaryDirectory(prefix="frys-bench-") as tmp:
        results = anyio.run(_async_results, Path(tmp), quick)
        results += _process_results(Path(tmp), quick)
    print(format_table(results))
    if json_path:
        payload = [{**msgspec.structs.asdict(r), "ratio": r.ratio} for r in results]
        Path(json_path).write_text(json.dumps(payload, indent=2) + "\n")
    return 0
