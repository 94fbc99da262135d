"""Triggers: events, intervals and cron start runs, with a policy for fires missed while off."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from frys_edge.config import load_config
from frys_edge.engine import _next_fire
from frys_edge.runtime import Runtime
from frys_edge.storage import Storage
from frys_edge.workflow import TriggerSpec


def runtime_with(tmp_path: Path, *definitions: dict[str, Any]) -> Runtime:
    workflows = tmp_path / "workflows"
    workflows.mkdir(exist_ok=True)
    for spec in definitions:
        (workflows / f"{spec['name']}.json").write_text(json.dumps(spec))
    overrides = {"system.data_dir": str(tmp_path / "data"), "workflows.dir": str(workflows)}
    return Runtime(load_config(env={}, overrides=overrides))


def tick(trigger: dict[str, Any], name: str = "tick") -> dict[str, Any]:
    return {"name": name, "triggers": [trigger], "steps": [{"name": "s", "action": "log"}]}


def test_interval_trigger_starts_runs_and_remembers_the_last_fire(tmp_path: Path) -> None:
    async def main() -> None:
        async with runtime_with(tmp_path, tick({"type": "interval", "every": 0.2})) as rt:
            await anyio.sleep(0.75)
            assert rt.storage is not None
            runs = rt.storage.list_runs(workflow="tick")
            assert 2 <= len(runs) <= 4
            last = rt.storage.get("triggers", "tick/0")
            assert last is not None and time.time() - 0.5 < last.value <= time.time()

    anyio.run(main)


def seed_last_fire(tmp_path: Path, name: str, when: float) -> None:
    async def put() -> None:
        with Storage(tmp_path / "data") as store:
            await store.put("triggers", f"{name}/0", when)

    anyio.run(put)


def test_missed_fires_run_once_or_are_skipped_as_configured(tmp_path: Path) -> None:
    hour_ago = time.time() - 3600
    seed_last_fire(tmp_path, "catchup", hour_ago)
    seed_last_fire(tmp_path, "skipper", hour_ago)
    every = {"type": "interval", "every": 30}

    async def main() -> None:
        specs = (
            tick({**every, "missed": "run_once"}, "catchup"),
            tick({**every, "missed": "skip"}, "skipper"),
        )
        async with runtime_with(tmp_path, *specs) as rt:
            await anyio.sleep(0.3)
            assert rt.storage is not None
            assert len(rt.storage.list_runs(workflow="catchup")) == 1
            assert rt.storage.list_runs(workflow="skipper") == []

    anyio.run(main)


def test_event_trigger_turns_payload_fields_into_inputs(tmp_path: Path) -> None:
    spec = {
        "name": "on_alert",
        "inputs": {"level": {"type": "integer"}, "topic": {"type": "string"}},
        "triggers": [{"type": "event", "topic": "alerts/#"}],
        "steps": [{"name": "s", "action": "log", "params": {"message": "${{ inputs.level }}"}}],
        "outputs": {"from": "${{ inputs.topic }}"},
    }

    async def main() -> None:
        async with runtime_with(tmp_path, spec) as rt:
            await anyio.sleep(0.05)
            await rt.publish("alerts/boiler", {"level": 3, "noise": "ignored"})
            await rt.publish("sensors/boiler", {"level": 9})
            assert rt.storage is not None
            with anyio.fail_after(3):
                while not rt.storage.list_runs(workflow="on_alert", status="succeeded"):
                    await anyio.sleep(0.02)
            (run,) = rt.storage.list_runs(workflow="on_alert")
            assert run.inputs == {"level": 3, "topic": "alerts/boiler"}
            assert run.outputs == {"from": "alerts/boiler"}

    anyio.run(main)


def test_cron_next_fire_is_the_next_matching_utc_minute() -> None:
    trigger = TriggerSpec(type="cron", cron="*/15 * * * *")
    after = datetime(2026, 11, 26, 13, 7, 30, tzinfo=UTC).timestamp()
    assert _next_fire(trigger, after) == datetime(2026, 11, 26, 13, 15, tzinfo=UTC).timestamp()
    interval = TriggerSpec(type="interval", every=5.0)
    assert _next_fire(interval, 100.0) == 105.0


def test_a_bad_cron_expression_fails_validation() -> None:
    import pytest

    from frys_edge.actions import BUILTIN_ACTIONS
    from frys_edge.workflow import DefinitionError, parse_workflow

    with pytest.raises(DefinitionError, match="bad cron expression '61 \\* \\* \\* \\*'"):
        parse_workflow(tick({"type": "cron", "cron": "61 * * * *"}), BUILTIN_ACTIONS)


def test_sighup_reload_picks_up_new_definitions_and_their_triggers(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "frys.toml"
        workflows = tmp_path / "workflows"
        workflows.mkdir()
        path.write_text(
            f'[system]\ndata_dir = "{tmp_path / "data"}"\n[workflows]\ndir = "{workflows}"\n'
        )
        async with Runtime(load_config(path, env={})) as rt:
            assert rt.engine.workflows == {}
            spec = tick({"type": "interval", "every": 0.1}, "late")
            (workflows / "late.json").write_text(json.dumps(spec))
            assert await rt.reload_config()
            assert "late" in rt.engine.workflows
            assert rt.storage is not None
            with anyio.fail_after(3):
                while not rt.storage.list_runs(workflow="late"):
                    await anyio.sleep(0.05)

    anyio.run(main)
