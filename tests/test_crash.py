"""Crash test: every acknowledged write survives SIGKILL at a random moment."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from frys_edge.storage import Storage

# A writer process: several tasks put keys concurrently (so group commit is in play) and
# print a line for each write only after its await returned, i.e. after its commit.
WRITER = """
import sys, anyio
from frys_edge.storage import Storage

async def writer(store, round_, w):
    for n in range(1_000_000):
        key = f"r{round_}-w{w}-{n}"
        await store.put("crash", key, {"n": n, "pad": "x" * 200})
        print(key, flush=True)

async def main():
    store = Storage(sys.argv[1], sync=sys.argv[2])
    print("ready", flush=True)
    async with anyio.create_task_group() as tg:
        for w in range(8):
            tg.start_soon(writer, store, sys.argv[3], w)

anyio.run(main)
"""


@pytest.mark.parametrize(("sync", "rounds"), [("normal", 20), ("full", 5)])
def test_acknowledged_writes_survive_sigkill(tmp_path: Path, sync: str, rounds: int) -> None:
    data_dir = tmp_path / "data"
    rng = random.Random(1234)
    acked: set[str] = set()
    for round_ in range(rounds):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(data_dir), sync, str(round_)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.02, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        # A line cut short by the kill was never a complete acknowledgement.
        lines = out.split("\n")
        acked.update(line for line in lines[:-1] if line)

        with Storage(data_dir, sync=sync) as store:  # type: ignore[arg-type]
            assert store.check() == ["ok"]
            present = {e.key for e in store.list_prefix("crash", limit=10_000_000)}
        missing = acked - present
        assert not missing, f"round {round_}: {len(missing)} acknowledged writes lost"
    assert len(acked) > rounds * 10, "the writer should have acknowledged writes each round"
