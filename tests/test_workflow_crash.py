"""Crash test: workflow runs survive SIGKILL with exactly-once recorded step results."""

from __future__ import annotations

import collections
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from frys_edge.storage import Storage

RUNS, STEPS, KILLS = 200, 10, 20

# Each step records its execution in the event log, then the engine records its result.
CHILD = """
import sys, anyio
from frys_edge.config import load_config
from frys_edge.runtime import Runtime

data_dir, definition, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])

async def main():
    # Ten runs in flight and a short wait per step, so the work spans many kill moments.
    overrides = {"system.data_dir": data_dir, "workflows.max_runs": 10}
    config = load_config(env={}, overrides=overrides)
    rt = Runtime(config)

    # Registered before start, so runs resumed at start find it.
    @rt.engine.action("record")
    async def record(ctx, params):
        await rt.storage.append("exec", {"run": ctx.run_id, "step": ctx.step})
        await anyio.sleep(0.03)
        return {"step": ctx.step}

    async with rt:
        rt.engine.load(definition)
        print("ready", flush=True)
        ids = [await rt.engine.start("chain", idempotency_key=f"run-{i}") for i in range(runs)]
        for run_id in ids:
            await rt.engine.wait(run_id)
        print("done", flush=True)

anyio.run(main)
"""


def snapshot(data_dir: Path) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(steps with an execution logged, steps with a recorded result) as stored now."""
    with Storage(data_dir, readonly=True) as store:
        executed = {(e.payload["run"], e.payload["step"]) for e in store.events(limit=10**7)}
        recorded = {
            (run.id, step.name)
            for run in store.list_runs(limit=10**6)
            for step in store.run_steps(run.id)
            if step.status == "succeeded"
        }
    return executed, recorded


def test_runs_survive_sigkill_and_steps_rerun_only_if_in_flight(tmp_path: Path) -> None:
    definition = tmp_path / "chain.json"
    steps = [
        {"name": f"s{i}", "action": "record", "needs": [f"s{i - 1}"] if i else []}
        for i in range(STEPS)
    ]
    definition.write_text(json.dumps({"name": "chain", "steps": steps}))
    data_dir = tmp_path / "data"
    argv = [sys.executable, "-c", CHILD, str(data_dir), str(definition), str(RUNS)]
    rng = random.Random(7)
    in_flight_at_kill: collections.Counter[tuple[str, str]] = collections.Counter()
    kills = 0
    while kills < KILLS:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.3))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        if "done" in out:
            break  # finished before the kill: no more moments to kill at
        kills += 1
        executed, recorded = snapshot(data_dir)
        in_flight_at_kill.update(executed - recorded)

    final = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    assert "done" in final.stdout

    assert kills >= KILLS, f"only {kills} kills landed before the runs finished"
    with Storage(data_dir, readonly=True) as store:
        runs = store.list_runs(limit=10**6)
        assert len(runs) == RUNS
        assert {run.status for run in runs} == {"succeeded"}
        for run in runs:
            recorded = store.run_steps(run.id)
            assert sorted(s.name for s in recorded) == sorted(f"s{i}" for i in range(STEPS))
            assert {s.status for s in recorded} == {"succeeded"}
        executions = collections.Counter(
            (e.payload["run"], e.payload["step"]) for e in store.events(limit=10**7)
        )
    assert len(executions) == RUNS * STEPS
    for step, count in executions.items():
        assert count - 1 <= in_flight_at_kill[step], (
            f"{step} ran {count} times but was in flight at only {in_flight_at_kill[step]} kills"
        )
