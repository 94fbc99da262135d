"""Workflow benchmarks: the engine's cost per step, per run, per run in flight and per resume.

Each figure sits beside a floor measured in the same run, as in `frys_edge.bench` (whose
table, JSON and timing helpers this module reuses). Runs go through the public engine API
(`rt.engine.start`, `wait`, `resume` at start) on real SQLite files in a temp dir; nothing
here reaches into the engine beyond reading `engine._active` to count runs in flight.
Run with `frys bench --workflows [--quick] [--json FILE]`.
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
from pathlib import Path
from typing import Any

import anyio
import msgspec

from frys_edge.bench import (
    Result,
    amedian_per_op,
    floor_asyncio_gather,
    floor_sqlite_commit,
    format_table,
    median_per_op,
)
from frys_edge.config import LoadedConfig, load_config
from frys_edge.runtime import Runtime
from frys_edge.workflow import Workflow, parse_workflow

CHAIN_STEPS = 20  # steps of the one-at-a-time chain: run start and end amortised over them
GROUP_RUNS = 200  # runs at once in the sync=full benchmark
GROUP_STEPS = 5
SLEEP_SECONDS = 600.0  # far beyond the benchmark: every run is still waiting when measured
MAX_RUNS = 20_000
MB = 1_000_000


async def _noop(_ctx: Any, _params: dict[str, Any]) -> Any:
    return None


def _config(data_dir: Path, **overrides: str | int | float) -> LoadedConfig:
    # env={}: a FRYS_* variable in the caller's shell must not change what is measured.
    settings: dict[str, str | int | float] = {
        "system.data_dir": str(data_dir),
        "workflows.max_runs": MAX_RUNS,
        **overrides,
    }
    return load_config(env={}, overrides=settings)


def _runtime(data_dir: Path, **overrides: str | int | float) -> Runtime:
    rt = Runtime(_config(data_dir, **overrides))
    rt.engine.action("noop")(_noop)
    return rt


def _chain(name: str, steps: int, action: str = "noop", **params: Any) -> Workflow:
    """A workflow of `steps` steps, each needing the one before."""
    definition = {
        "name": name,
        "steps": [
            {
                "name": f"s{i}",
                "action": action,
                "params": params,
                **({"needs": [f"s{i - 1}"]} if i else {}),
            }
            for i in range(steps)
        ],
    }
    return parse_workflow(definition, {"noop", "sleep"})


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# -- ours --------------------------------------------------------------------------------


async def _run_to_success(rt: Runtime, workflow: Workflow) -> None:
    run_id = await rt.engine.start(workflow)
    record = await rt.engine.wait(run_id)
    if record.status != "succeeded":
        raise RuntimeError(f"benchmark run {run_id} ended {record.status}: {record.error}")


async def bench_runs_one_at_a_time(rt: Runtime, workflow: Workflow, runs: int) -> float:
    t0 = time.perf_counter()
    for _ in range(runs):
        await _run_to_success(rt, workflow)
    return time.perf_counter() - t0


async def bench_runs_at_once(rt: Runtime, workflow: Workflow, runs: int) -> float:
    """Start `runs` runs together and wait until every one has succeeded."""
    t0 = time.perf_counter()
    await asyncio.gather(*[_run_to_success(rt, workflow) for _ in range(runs)])
    return time.perf_counter() - t0


async def start_sleepers(rt: Runtime, runs: int) -> None:
    """Start `runs` one-step runs of a long `sleep`; return once each has recorded its timer."""
    workflow = _chain("sleeper", 1, "sleep", seconds=SLEEP_SECONDS)
    await asyncio.gather(*[rt.engine.start(workflow) for _ in range(runs)])
    assert rt.storage is not None
    # The sleep step's row is written when it records its deadline; count them on the side.
    conn = sqlite3.connect(f"file:{rt.storage.path}?mode=ro", uri=True)
    try:
        deadline = time.monotonic() + 120
        while conn.execute("SELECT count(*) FROM steps").fetchone()[0] < runs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{runs} sleeping runs did not all record their timer")
            await asyncio.sleep(0.02)
    finally:
        conn.close()
    if len(rt.engine._active) != runs:
        raise RuntimeError(f"expected {runs} runs in flight, found {len(rt.engine._active)}")


async def _in_flight_rss(data_dir: Path, runs: int) -> dict[str, int]:
    async with _runtime(data_dir, **{"system.shutdown_timeout": 0.1}) as rt:
        await asyncio.sleep(0.2)  # let start-up settle (threads, first checkpoint)
        idle = _rss()
        await start_sleepers(rt, runs)
        busy = _rss()
    # Stopped with runs still sleeping: they stay "running" in storage for the resume bench.
    return {"idle": idle, "in_flight": busy}


def _in_flight_child() -> None:
    """Entry of the subprocess: argv is [data_dir, runs]; prints {"idle", "in_flight"} as JSON."""
    data_dir, runs = Path(sys.argv[1]), int(sys.argv[2])
    print(json.dumps(anyio.run(_in_flight_rss, data_dir, runs)))


def in_flight_rss(data_dir: Path, runs: int) -> dict[str, int]:
    """RSS of a fresh process: idle runtime, then with `runs` sleeping runs (leaves them stored)."""
    code = "from frys_edge.bench_workflows import _in_flight_child; _in_flight_child()"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRYS_")}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(data_dir), str(runs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"in-flight RSS subprocess failed:\n{proc.stderr}")
    result: dict[str, int] = json.loads(proc.stdout)
    return result


async def bench_restart(data_dir: Path, runs: int) -> float:
    """Seconds from starting a runtime on `runs` unfinished runs until all are active again.

    Runtime.start resumes them (engine.resume); a few loop turns more let every resumed
    run reach its timer again, so the figure includes each run's first steps, not just the
    creation of its task.
    """
    rt = _runtime(data_dir, **{"system.shutdown_timeout": 0.1})
    t0 = time.perf_counter()
    await rt.start()
    try:
        for _ in range(5):
            await asyncio.sleep(0)
        elapsed = time.perf_counter() - t0
        if len(rt.engine._active) != runs:
            raise RuntimeError(f"resumed {len(rt.engine._active)} runs, expected {runs}")
    finally:
        await rt.stop()
    return elapsed


def floor_select_runs(db: Path, runs: int) -> float:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        t0 = time.perf_counter()
        rows = conn.execute("SELECT * FROM runs WHERE status = 'running'").fetchall()
        elapsed = time.perf_counter() - t0
    finally:
        conn.close()
    if len(rows) != runs:
        raise RuntimeError(f"found {len(rows)} unfinished runs, expected {runs}")
    return elapsed


# -- the run -----------------------------------------------------------------------------


async def _step_results(tmp: Path, quick: bool) -> list[Result]:
    rounds = 5 if quick else 9
    out: list[Result] = []

    chain = _chain("chain", CHAIN_STEPS)
    chain_runs = 25 if quick else 100
    floor_normal = median_per_op(floor_sqlite_commit(tmp / "floor.db", "NORMAL"), 2500, rounds)
    async with _runtime(tmp / "normal") as rt:
        await bench_runs_one_at_a_time(rt, chain, 5)  # warm-up: first run opens readers
        step = await amedian_per_op(
            lambda k: bench_runs_one_at_a_time(rt, chain, k // CHAIN_STEPS),
            CHAIN_STEPS * chain_runs,
            rounds,
        )
    out.append(
        Result(
            f"workflow step, one run at a time, sync=normal ({CHAIN_STEPS}-step chain)",
            step * 1e6,
            "µs",
            "sqlite3 commit, NORMAL",
            floor_normal * 1e6,
            "≤ 3x floor",
            step <= 3 * floor_normal,
        )
    )

    group = _chain("group", GROUP_STEPS)
    full_rounds = 3 if quick else 5
    floor_full = median_per_op(floor_sqlite_commit(tmp / "floor-full.db", "FULL"), 50, 3)
    async with _runtime(tmp / "full", **{"storage.sync": "full"}) as rt:
        await bench_runs_at_once(rt, group, 20)
        step_full = await amedian_per_op(
            lambda k: bench_runs_at_once(rt, group, k // GROUP_STEPS),
            GROUP_STEPS * GROUP_RUNS,
            full_rounds,
        )
    out.append(
        Result(
            f"workflow step, {GROUP_RUNS} runs at once, sync=full ({GROUP_STEPS}-step chains)",
            step_full * 1e6,
            "µs",
            "sqlite3 commit, FULL",
            floor_full * 1e6,
            "≤ 1.5x floor",
            step_full <= 1.5 * floor_full,
        )
    )

    # 1,000 at once is the steady case; 10,000 at once shows what a burst costs.
    single = _chain("single", 1)
    floor_tasks = await amedian_per_op(floor_asyncio_gather, 1000, rounds)
    async with _runtime(tmp / "single") as rt:
        await bench_runs_at_once(rt, single, 100)
        for n in (1000,) if quick else (1000, 10_000):
            per_run = await amedian_per_op(
                lambda k: bench_runs_at_once(rt, single, k), n, 3 if quick else 5
            )
            out.append(
                Result(
                    f"single-step runs started and completed, {n:,} at once",
                    1 / per_run,
                    "runs/s",
                    "asyncio create_task+gather",
                    1 / floor_tasks,
                    "≥ 5,000 /s",
                    1 / per_run >= 5000,
                )
            )
    return out


def _in_flight_results(tmp: Path, quick: bool) -> tuple[list[Result], str]:
    runs = 1000 if quick else 10_000
    data_dir = tmp / "sleepers"
    rss = in_flight_rss(data_dir, runs)
    rounds = 3
    db = data_dir / "frys.db"
    floor = statistics.median(floor_select_runs(db, runs) for _ in range(rounds))
    restart = statistics.median(anyio.run(bench_restart, data_dir, runs) for _ in range(rounds))
    per_run = (rss["in_flight"] - rss["idle"]) / runs
    note = f"RSS grows {per_run / 1024:.1f} KiB for each run waiting on a timer"
    results = [
        Result(
            f"RSS with {runs:,} runs waiting on a timer",
            rss["in_flight"] / MB,
            "MB",
            "idle runtime",
            rss["idle"] / MB,
            "≤ 300 MB",
            rss["in_flight"] <= 300 * MB,
        ),
        Result(
            f"restart until {runs:,} unfinished runs are active",
            restart * 1e3,
            "ms",
            "sqlite3 SELECT of the run rows",
            floor * 1e3,
            "≤ 2 s",
            restart <= 2.0,
        ),
    ]
    return results, note


def run_workflow_benchmarks(json_path: str | None = None, quick: bool = False) -> int:
    """Run every workflow benchmark, print the table, optionally write JSON; returns 0."""
    with tempfile.TemporaryDirectory(prefix="frys-bench-wf-") as tmp:
        results = anyio.run(_step_results, Path(tmp), quick)
        in_flight, note = _in_flight_results(Path(tmp), quick)
        results += in_flight
    print(format_table(results))
    print(f"\n{note}")
    if json_path:
        payload = [{**msgspec.structs.asdict(r), "ratio": r.ratio} for r in results]
        Path(json_path).write_text(json.dumps(payload, indent=2) + "\n")
    return 0
