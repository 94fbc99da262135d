"""The durable workflow engine on a real runtime and a real SQLite file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from frys_edge.config import load_config
from frys_edge.engine import ActionContext
from frys_edge.runtime import Runtime
from frys_edge.storage import Storage
from frys_edge.workflow import DefinitionError, WorkflowError, parse_workflow


def make_runtime(tmp_path: Path, body: str = "") -> Runtime:
    path = tmp_path / "frys.toml"
    path.write_text(f'[system]\ndata_dir = "{tmp_path / "data"}"\n{body}')
    return Runtime(load_config(path, env={}))


def define(rt: Runtime, spec: dict[str, Any]) -> Any:
    workflow = parse_workflow(spec, rt.engine.actions)
    rt.engine.workflows[workflow.spec.name] = workflow
    return workflow


DIAMOND = {
    "name": "diamond",
    "inputs": {"reading": {"type": "number"}},
    "steps": [
        {"name": "a", "action": "kv.put", "params": {"key": "a", "value": "${{ inputs.reading }}"}},
        {"name": "b", "action": "log", "needs": ["a"], "params": {"message": "b"}},
        {"name": "c", "action": "kv.get", "needs": ["a"], "params": {"key": "a"}},
        {
            "name": "d",
            "action": "log",
            "needs": ["b", "c"],
            "params": {"message": "c read ${{ steps.c.output }}"},
        },
    ],
    "outputs": {"read": "${{ steps.c.output }}", "said": "${{ steps.d.output.message }}"},
}


def test_diamond_runs_each_step_once_in_dependency_order(tmp_path: Path) -> None:
    async def main() -> None:
        async with make_runtime(tmp_path) as rt:
            define(rt, DIAMOND)
            run_id = await rt.engine.start("diamond", {"reading": 21.5})
            run = await rt.engine.wait(run_id)
            assert run.status == "succeeded", run.error
            assert run.outputs == {"read": 21.5, "said": "c read 21.5"}
            assert rt.storage is not None
            steps = {s.name: s for s in rt.storage.run_steps(run_id)}
            assert {n: (s.status, s.attempts) for n, s in steps.items()} == {
                n: ("succeeded", 1) for n in "abcd"
            }
            assert steps["a"].finished_at <= steps["b"].started_at  # type: ignore[operator]
            assert steps["c"].finished_at <= steps["d"].started_at  # type: ignore[operator]

    anyio.run(main)


def test_failing_step_is_retried_by_its_policy(tmp_path: Path) -> None:
    async def main() -> None:
        async with make_runtime(tmp_path) as rt:
            calls: list[float] = []

            @rt.engine.action("flaky")
            async def flaky(ctx: ActionContext, params: dict[str, Any]) -> Any:
                calls.append(time.monotonic())
                if len(calls) < 3:
                    raise ConnectionError("collector unreachable")
                return {"attempt": ctx.attempt}

            retry = {"max_attempts": 3, "initial_delay": 0.05, "jitter": False}
            define(rt, {"name": "w", "steps": [{"name": "s", "action": "flaky", "retry": retry}]})
            run = await rt.engine.wait(await rt.engine.start("w"))
            assert run.status == "succeeded"
            assert rt.storage is not None
            (step,) = rt.storage.run_steps(run.id)
            assert (step.attempts, step.output) == (3, {"attempt": 3})
            assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.1
            history = rt.storage.run_attempts(run.id)
            assert [(a.attempt, a.status) for a in history] == [(1, "failed"), (2, "failed")]
            assert history[0].error == "ConnectionError: collector unreachable"

            define(rt, {"name": "w2", "steps": [{"name": "s", "action": "flaky"}]})
            calls.clear()
            failed = await rt.engine.wait(await rt.engine.start("w2"))
            assert failed.status == "failed" and failed.error == "step s failed"
            (step,) = rt.storage.run_steps(failed.id)
            assert step.error == "ConnectionError: collector unreachable"

    anyio.run(main)


def test_conditions_skip_and_on_error_continue(tmp_path: Path) -> None:
    async def main() -> None:
        async with make_runtime(tmp_path) as rt:

            @rt.engine.action("boom")
            async def boom(ctx: ActionContext, params: dict[str, Any]) -> Any:
                raise ValueError("sensor offline")

            define(
                rt,
                {
                    "name": "w",
                    "inputs": {"hot": {"type": "boolean", "default": False}},
                    "steps": [
                        {"name": "alert", "action": "log", "if": "inputs.hot"},
                        {"name": "read", "action": "boom", "on_error": "continue"},
                        {"name": "after", "action": "log", "needs": ["read", "alert"]},
                    ],
                },
            )
            run = await rt.engine.wait(await rt.engine.start("w"))
            assert run.status == "succeeded"
            assert rt.storage is not None
            states = {s.name: s.status for s in rt.storage.run_steps(run.id)}
            assert states == {"alert": "skipped", "read": "failed", "after": "succeeded"}

    anyio.run(main)


def test_idempotency_key_returns_the_existing_run(tmp_path: Path) -> None:
    async def main() -> None:
        async with make_runtime(tmp_path) as rt:
            define(rt, DIAMOND)
            first = await rt.engine.start("diamond", {"reading": 1}, idempotency_key="batch-7")
            again = await rt.engine.start("diamond", {"reading": 2}, idempotency_key="batch-7")
            assert first == again
            await rt.engine.wait(first)
            assert rt.storage is not None
            assert len(rt.storage.list_runs(workflow="diamond")) == 1

    anyio.run(main)


def test_step_and_run_timeouts_fail_the_run(tmp_path: Path) -> None:
    async def main() -> None:
        async with make_runtime(tmp_path) as rt:
            slow = {"name": "s", "action": "sleep", "params": {"seconds": 5}, "timeout": 0.1}
            define(rt, {"name": "step_timeout", "steps": [slow]})
            run = await rt.engine.wait(await rt.engine.start("step_timeout"))
            assert run.status == "failed"
            assert rt.storage is not None
            assert rt.storage.run_steps(run.id)[0].error == "timed out after 0.1 s"
            sleepy = {"name": "s", "action": "sleep", "params": {"seconds": 5}}
            define(rt, {"name": "run_timeout", "timeout": 0.2, "steps": [sleepy]})
            t0 = time.monotonic()
            run = await rt.engine.wait(await rt.engine.start("run_timeout"))
            assert (run.status, run.error) == ("failed", "run timed out after 0.2 s")
            assert time.monotonic() - t0 < 2

    anyio.run(main)


def test_cancel_stops_running_steps(tmp_path: Path) -> None:
    async def main() -> None:
        async with make_runtime(tmp_path) as rt:
            sleepy = {"name": "s", "action": "sleep", "params": {"seconds": 30}}
            define(
                rt, {"name": "w", "steps": [sleepy, {"name": "t", "action": "log", "needs": ["s"]}]}
            )
            run_id = await rt.engine.start("w")
            await anyio.sleep(0.05)
            assert await rt.engine.cancel(run_id) is True
            run = await rt.engine.wait(run_id)
            assert run.status == "cancelled"
            assert await rt.engine.cancel(run_id) is False

    anyio.run(main)


def test_kv_and_emit_actions_reach_storage_and_the_bus(tmp_path: Path) -> None:
    async def main() -> None:
        async with make_runtime(tmp_path) as rt:
            sub = rt.bus.subscribe("alerts/#")
            done = rt.bus.subscribe("workflow/#")
            define(
                rt,
                {
                    "name": "w",
                    "steps": [
                        {"name": "put", "action": "kv.put", "params": {"key": "k", "value": [1]}},
                        {
                            "name": "get",
                            "action": "kv.get",
                            "needs": ["put"],
                            "params": {"key": "k"},
                        },
                        {
                            "name": "tell",
                            "action": "emit",
                            "needs": ["get"],
                            "params": {"topic": "alerts/hot", "payload": "${{ steps.get.output }}"},
                        },
                    ],
                },
            )
            run = await rt.engine.wait(await rt.engine.start("w"))
            assert run.status == "succeeded"
            message = sub.get_nowait()
            assert message is not None and message.payload == [1]
            finished = done.get_nowait()
            assert finished is not None and finished.topic == "workflow/w/succeeded"
            assert rt.storage is not None
            entry = rt.storage.get("workflow", "k")
            assert entry is not None and entry.value == [1]

    anyio.run(main)


def test_bad_inputs_and_unknown_workflows_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with make_runtime(tmp_path) as rt:
            define(rt, DIAMOND)
            with pytest.raises(DefinitionError, match=r"inputs\.reading"):
                await rt.engine.start("diamond", {"reading": "hot"})
            with pytest.raises(WorkflowError, match="unknown workflow 'nope'"):
                await rt.engine.start("nope")

    anyio.run(main)


def test_unfinished_runs_resume_after_a_restart_and_keep_their_deadlines(tmp_path: Path) -> None:
    async def main() -> None:
        rt = make_runtime(tmp_path, "shutdown_timeout = 0.2\n")
        spec = {
            "name": "w",
            "steps": [
                {"name": "first", "action": "log"},
                {"name": "nap", "action": "sleep", "needs": ["first"], "params": {"seconds": 2}},
                {"name": "last", "action": "log", "needs": ["nap"]},
            ],
        }
        async with rt:
            define(rt, spec)
            run_id = await rt.engine.start("w")
            await anyio.sleep(1.0)
        rt = make_runtime(tmp_path)
        async with rt:
            assert rt.storage is not None
            before = {s.name: s for s in rt.storage.run_steps(run_id)}
            assert before["first"].status == "succeeded" and "last" not in before
            assert before["nap"].status == "suspended" and before["nap"].wake_at is not None
            run = await rt.engine.wait(run_id)
            assert run.status == "succeeded"
            steps = {s.name: s for s in rt.storage.run_steps(run_id)}
            assert steps["first"].attempts == 1
            # The sleep ends 2 s after it began, not 2 s after the restart.
            nap_end = steps["nap"].finished_at
            assert nap_end is not None
            assert before["nap"].wake_at <= nap_end < before["nap"].wake_at + 0.5

    anyio.run(main)


def test_wait_event_gets_a_live_event_that_matches(tmp_path: Path) -> None:
    async def main() -> None:
        async with make_runtime(tmp_path) as rt:
            wait = {
                "name": "w",
                "action": "wait_event",
                "params": {"topic": "door/+/open", "match": {"door": "front"}, "timeout": 5},
            }
            define(rt, {"name": "w", "steps": [wait], "outputs": {"got": "${{ steps.w.output }}"}})
            run_id = await rt.engine.start("w")
            await anyio.sleep(0.05)
            await rt.publish("door/1/open", {"door": "back"})
            await rt.publish("door/2/closed", {"door": "front"})
            await rt.publish("door/3/open", {"door": "front", "by": "alice"})
            run = await rt.engine.wait(run_id)
            assert run.status == "succeeded"
            got = run.outputs["got"]
            assert (got["topic"], got["payload"]["by"]) == ("door/3/open", "alice")

            define(rt, {"name": "t", "steps": [{**wait, "params": {"topic": "x", "timeout": 0.1}}]})
            timed_out = await rt.engine.wait(await rt.engine.start("t"))
            assert timed_out.status == "failed"

    anyio.run(main)


def test_wait_event_sees_a_durable_event_emitted_while_it_was_down(tmp_path: Path) -> None:
    async def main() -> None:
        wait = {"name": "w", "action": "wait_event", "params": {"topic": "ack/#"}}
        async with make_runtime(tmp_path, "shutdown_timeout = 0.1\n") as rt:
            define(rt, {"name": "w", "steps": [wait]})
            run_id = await rt.engine.start("w")
            await anyio.sleep(0.1)
        with Storage(tmp_path / "data") as store:  # the device is down; the log is not
            await store.append("ack/7", {"ok": True})
        async with make_runtime(tmp_path) as rt:
            assert rt.storage is not None
            with anyio.fail_after(5):
                run = await rt.engine.wait(run_id)
            assert run.status == "succeeded"
            (step,) = rt.storage.run_steps(run_id)
            assert step.output["payload"] == {"ok": True}

    anyio.run(main)


class Collector:
    """A local HTTP server that fails the first `failures` POSTs, then stores bodies."""

    def __init__(self, failures: int) -> None:
        import http.server
        import json
        import threading

        collector = self
        self.failures = failures
        self.received: list[Any] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if collector.failures > 0:
                    collector.failures -= 1
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b"busy")
                    return
                collector.received.append(json.loads(body))
                reply = json.dumps({"stored": len(collector.received)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ingest"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_http_retries_until_the_collector_recovers(tmp_path: Path) -> None:
    collector = Collector(failures=2)

    async def main() -> None:
        async with make_runtime(tmp_path) as rt:
            step = {
                "name": "send",
                "action": "http",
                "params": {"url": collector.url, "json": {"temp": 21.5}},
                "retry": {"max_attempts": 5, "initial_delay": 0.05, "jitter": False},
            }
            define(rt, {"name": "w", "steps": [step], "outputs": {"r": "${{ steps.send.output }}"}})
            run = await rt.engine.wait(await rt.engine.start("w"))
            assert run.status == "succeeded", run.error
            assert run.outputs["r"] == {"status": 200, "body": {"stored": 1}}
            assert rt.storage is not None
            assert rt.storage.run_steps(run.id)[0].attempts == 3
            bad = {"name": "send", "action": "http", "params": {"url": "http://127.0.0.1:9/x"}}
            define(rt, {"name": "down", "steps": [bad]})
            failed = await rt.engine.wait(await rt.engine.start("down"))
            assert failed.status == "failed"
            assert "ConnectionError" in rt.storage.run_steps(failed.id)[0].error  # type: ignore[operator]

    try:
        anyio.run(main)
    finally:
        collector.close()
    assert collector.received == [{"temp": 21.5}]


def test_child_workflows_are_awaited_and_cancelled_with_their_parent(tmp_path: Path) -> None:
    async def main() -> None:
        async with make_runtime(tmp_path) as rt:
            define(
                rt,
                {
                    "name": "child",
                    "inputs": {"n": {"type": "integer"}},
                    "steps": [
                        {"name": "s", "action": "log", "params": {"message": "${{ inputs.n }}"}}
                    ],
                    "outputs": {"said": "${{ steps.s.output.message }}"},
                },
            )
            call = {
                "name": "c",
                "action": "workflow",
                "params": {"workflow": "child", "inputs": {"n": 3}},
            }
            define(
                rt,
                {
                    "name": "parent",
                    "steps": [call],
                    "outputs": {"o": "${{ steps.c.output.outputs }}"},
                },
            )
            run = await rt.engine.wait(await rt.engine.start("parent"))
            assert run.status == "succeeded"
            assert run.outputs == {"o": {"said": "3"}}
            assert rt.storage is not None
            (child,) = rt.storage.list_runs(parent_run=run.id)
            assert child.status == "succeeded" and child.idempotency_key == f"{run.id}/c"

            define(
                rt,
                {
                    "name": "slow",
                    "steps": [{"name": "s", "action": "sleep", "params": {"seconds": 30}}],
                },
            )
            call_slow = {"name": "c", "action": "workflow", "params": {"workflow": "slow"}}
            define(rt, {"name": "parent2", "steps": [call_slow]})
            parent_id = await rt.engine.start("parent2")
            await anyio.sleep(0.1)
            assert await rt.engine.cancel(parent_id)
            (child,) = rt.storage.list_runs(parent_run=parent_id)
            assert child.status == "cancelled"

    anyio.run(main)


def test_workflow_concurrency_limits_runs_at_once_and_metrics_count_per_workflow(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with make_runtime(tmp_path) as rt:
            active, peak = 0, 0

            @rt.engine.action("busy")
            async def busy(ctx: ActionContext, params: dict[str, Any]) -> Any:
                nonlocal active, peak
                active += 1
                peak = max(peak, active)
                await anyio.sleep(0.05)
                active -= 1

            define(
                rt, {"name": "one", "concurrency": 1, "steps": [{"name": "s", "action": "busy"}]}
            )
            ids = [await rt.engine.start("one") for _ in range(4)]
            for run_id in ids:
                assert (await rt.engine.wait(run_id)).status == "succeeded"
            assert peak == 1
            snap = rt.metrics.snapshot()
            assert snap['workflow_runs_started_total{workflow="one"}'] == 4
            assert snap['workflow_runs_succeeded_total{workflow="one"}'] == 4
            step = snap['workflow_step_seconds{step="s",workflow="one"}']
            assert step["count"] == 4 and step["p50"] >= 0.05  # type: ignore[index]

    anyio.run(main)


def test_a_run_stuck_past_its_timeout_is_reported(tmp_path: Path) -> None:
    async def main() -> None:
        async with make_runtime(tmp_path) as rt:

            @rt.engine.action("deaf")
            async def deaf(ctx: ActionContext, params: dict[str, Any]) -> Any:
                # A blocking call that cannot be cancelled, like a hung driver.
                await anyio.to_thread.run_sync(time.sleep, 0.6, abandon_on_cancel=False)

            define(rt, {"name": "w", "timeout": 0.1, "steps": [{"name": "s", "action": "deaf"}]})
            run_id = await rt.engine.start("w")
            await anyio.sleep(0.4)
            assert rt.engine.overdue(grace=0.1) == [run_id]
            assert (await rt.engine.wait(run_id)).status == "failed"
            assert rt.engine.overdue(grace=0.1) == []

    anyio.run(main)


def test_a_scheduled_retry_fires_at_its_time_after_a_restart(tmp_path: Path) -> None:
    calls: list[float] = []

    def runtime() -> Runtime:
        rt = make_runtime(tmp_path, "shutdown_timeout = 0.1\n")

        @rt.engine.action("flaky")
        async def flaky(ctx: ActionContext, params: dict[str, Any]) -> Any:
            calls.append(time.time())
            if len(calls) == 1:
                raise ConnectionError("first try fails")
            return "ok"

        return rt

    retry = {"max_attempts": 2, "initial_delay": 1.5, "jitter": False}
    spec = {"name": "w", "steps": [{"name": "s", "action": "flaky", "retry": retry}]}

    async def main() -> None:
        async with runtime() as rt:
            define(rt, spec)
            run_id = await rt.engine.start("w")
            await anyio.sleep(0.3)
        async with runtime() as rt:
            assert rt.storage is not None
            (waiting,) = rt.storage.run_steps(run_id)
            assert waiting.status == "waiting" and waiting.wake_at is not None
            run = await rt.engine.wait(run_id)
            assert run.status == "succeeded"
            assert waiting.wake_at <= calls[1] < waiting.wake_at + 0.5
            assert calls[1] - calls[0] >= 1.5

    anyio.run(main)


def test_many_waiting_runs_share_one_subscription_per_pattern(tmp_path: Path) -> None:
    async def main() -> None:
        async with make_runtime(tmp_path) as rt:
            wait = {
                "name": "w",
                "action": "wait_event",
                "params": {"topic": "door/#", "match": {"door": "${{ inputs.door }}"}},
            }
            define(rt, {"name": "w", "inputs": {"door": {"type": "integer"}}, "steps": [wait]})
            base = rt.bus.stats()["subscriptions"]
            ids = [await rt.engine.start("w", {"door": i % 5}) for i in range(200)]
            with anyio.fail_after(5):
                while rt.bus.stats()["subscriptions"] == base:
                    await anyio.sleep(0.01)
                await anyio.sleep(0.2)
            assert rt.bus.stats()["subscriptions"] == base + 1
            await rt.publish("door/open", {"door": 3})
            assert rt.storage is not None
            with anyio.fail_after(5):
                while len(rt.storage.list_runs(status="succeeded", limit=1000)) < 40:
                    await anyio.sleep(0.02)
            done = {r.id for r in rt.storage.list_runs(status="succeeded", limit=1000)}
            assert done == {run_id for i, run_id in enumerate(ids) if i % 5 == 3}
            for run_id in ids:
                if run_id not in done:
                    await rt.engine.cancel(run_id)
            assert rt.bus.stats()["subscriptions"] == base

    anyio.run(main)
