"""Engine: runs workflow definitions durably on the runtime; it decides nothing about syntax.

Contract (also in the README): a step's result is committed to storage before any step that
needs it starts. A step whose result was recorded never runs again; a step that was running
when the process died runs again on restart (at-least-once side effects, exactly-once
recorded results). Retry delays and durable sleeps are absolute wall-clock deadlines stored
with the step, so they fire at the right time after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
from cronsim import CronSim

from frys_edge.actions import BUILTIN_ACTIONS, Action, ActionContext, EventWaits
from frys_edge.core import FrysError, RetryPolicy
from frys_edge.expr import evaluate_condition, render_value
from frys_edge.storage import RunRecord, StepRecord, Storage
from frys_edge.workflow import (
    TriggerSpec,
    Workflow,
    WorkflowError,
    coerce_inputs,
    load_workflow,
    ready_steps,
    run_outcome,
)

if TYPE_CHECKING:
    from frys_edge.runtime import Runtime

log = logging.getLogger("frys.workflow")

FINAL = ("succeeded", "failed", "cancelled")
TRIGGER_NAMESPACE = "triggers"
TRIGGER_QUEUE = 1000


class RunNotFound(WorkflowError):
    """No run has this id."""


class _Suspended(Exception):
    """The engine is stopping: leave the run as it is stored, to resume at the next start."""


def _next_fire(trigger: TriggerSpec, after: float) -> float:
    """The first fire time strictly after `after` (cron schedules are in UTC)."""
    if trigger.type == "interval":
        assert trigger.every is not None
        return after + trigger.every
    assert trigger.cron is not None
    start = datetime.fromtimestamp(after, UTC)
    return next(CronSim(trigger.cron, start)).timestamp()


def _event_inputs(workflow: Workflow, message: Any) -> dict[str, Any]:
    """The declared inputs found in an event: payload fields, and `topic` if declared."""
    declared = workflow.spec.inputs
    payload = message.payload if isinstance(message.payload, dict) else {}
    inputs = {k: v for k, v in payload.items() if k in declared}
    if "topic" in declared:
        inputs["topic"] = message.topic
    if "payload" in declared:
        inputs["payload"] = message.payload
    return inputs


class Engine:
    """Starts, resumes, cancels and waits for workflow runs on a started runtime."""

    def __init__(self, rt: Runtime, max_runs: int) -> None:
        self.rt = rt
        self.actions: dict[str, Action] = dict(BUILTIN_ACTIONS)
        self.workflows: dict[str, Workflow] = {}
        self.max_runs = max_runs
        self._active: dict[str, asyncio.Task[Any]] = {}
        self._waiters: dict[str, list[asyncio.Future[RunRecord]]] = {}
        self._slot_freed = asyncio.Event()
        # Runs whose stored definition no longer validates (an action went missing).
        self.unresumable: dict[str, str] = {}
        self._stopping = False
        self.event_waits = EventWaits(rt.bus)
        self._deadlines: dict[str, float] = {}
        self._limits: dict[str, asyncio.Semaphore] = {}
        rt.metrics.gauge("workflow_runs_active", "Runs in flight", lambda: float(len(self._active)))

    def _count(self, name: str, workflow: str, help: str) -> None:
        self.rt.metrics.counter(name, help, {"workflow": workflow}).inc()

    @property
    def storage(self) -> Storage:
        storage = self.rt.storage
        if storage is None:
            raise FrysError("workflow engine: the runtime is not started")
        return storage

    # -- definitions ----------------------------------------------------------------------

    def action(self, name: str) -> Callable[[Action], Action]:
        """Decorator: register an async fn(ctx, params) as a workflow action."""

        def register(fn: Action) -> Action:
            if name in self.actions:
                raise WorkflowError(f"action {name!r} is already registered")
            self.actions[name] = fn
            return fn

        return register

    def load(self, path: str) -> Workflow:
        """Load, validate and register a workflow definition file."""
        workflow = load_workflow(path, self.actions)
        self.workflows[workflow.spec.name] = workflow
        return workflow

    # -- runs -----------------------------------------------------------------------------

    async def start(
        self,
        workflow: Workflow | str,
        inputs: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        parent_run: str | None = None,
    ) -> str:
        """Persist a new run and start it; returns its id (an existing one for a used key)."""
        if isinstance(workflow, str):
            found = self.workflows.get(workflow)
            if found is None:
                known = ", ".join(sorted(self.workflows)) or "none loaded"
                raise WorkflowError(f"unknown workflow {workflow!r} (known: {known})")
            workflow = found
        values = coerce_inputs(workflow, inputs or {})
        # Back-pressure: a caller waits for a free slot instead of memory growing unbounded.
        while len(self._active) >= self.max_runs:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        spec = workflow.spec
        deadline = None if spec.timeout is None else time.time() + spec.timeout
        created, run_id = await self.storage.new_run(
            uuid.uuid4().hex,
            spec.name,
            workflow.to_json().decode(),
            values,
            idempotency_key=idempotency_key,
            parent_run=parent_run,
            deadline=deadline,
        )
        if created:
            self._count("workflow_runs_started_total", spec.name, "Workflow runs started")
            run = self.storage.get_run(run_id)
            assert run is not None
            self._launch(run, workflow, {})
        return run_id

    async def resume(self) -> int:
        """Restart every unfinished run from its last recorded step; returns how many."""
        resumed = 0
        # Runs of one workflow share their definition text: validate each text once.
        definitions: dict[str, Workflow] = {}
        for run in self.storage.unfinished_runs():
            if run.id in self._active:
                continue
            try:
                workflow = definitions.get(run.definition) or Workflow.from_json(
                    run.definition.encode(), self.actions
                )
                definitions[run.definition] = workflow
            except WorkflowError as e:
                # Left as stored: it resumes once its actions are registered again.
                self.unresumable[run.id] = str(e)
                log.error("run %s of %s cannot resume: %s", run.id, run.workflow, e)
                continue
            self.unresumable.pop(run.id, None)
            steps = {s.name: s for s in self.storage.run_steps(run.id)}
            self._launch(run, workflow, steps)
            resumed += 1
        if resumed:
            log.info("resumed %d unfinished workflow runs", resumed)
        return resumed

    def _launch(self, run: RunRecord, workflow: Workflow, steps: dict[str, StepRecord]) -> None:
        if self._stopping:
            raise FrysError("workflow engine is stopping; the run starts at the next start")
        task = asyncio.get_running_loop().create_task(self._drive(run, workflow, steps))
        self._active[run.id] = task
        if run.deadline is not None:
            self._deadlines[run.id] = run.deadline

        def done(_task: asyncio.Task[Any]) -> None:
            self._active.pop(run.id, None)
            self._deadlines.pop(run.id, None)  # also when suspended at stop
            self._slot_freed.set()

        task.add_done_callback(done)

    def overdue(self, grace: float) -> list[str]:
        """Runs still active more than `grace` seconds past their deadline (stuck)."""
        late = time.time() - grace
        return [run_id for run_id, deadline in self._deadlines.items() if deadline < late]

    async def stop(self, timeout: float) -> None:
        """Let running steps finish (up to timeout), then leave every run to resume later."""
        self._stopping = True
        drivers = list(self._active.values())
        if drivers:
            await asyncio.wait(drivers, timeout=timeout)
            for task in drivers:
                task.cancel()
            await asyncio.wait(drivers)

    async def wait(self, run_id: str) -> RunRecord:
        """Wait until the run reaches a final status and return its record."""
        run = self.storage.get_run(run_id)
        if run is None:
            raise RunNotFound(f"no run {run_id!r}; list them with `frys workflow runs`")
        if run.status in FINAL:
            return run
        if run_id not in self._active:
            raise WorkflowError(f"run {run_id} is {run.status} but not running here")
        future: asyncio.Future[RunRecord] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(run_id, []).append(future)
        return await future

    async def cancel(self, run_id: str) -> bool:
        """Cancel a run, its running steps and its child runs; False if it had finished."""
        task = self._active.get(run_id)
        if task is not None:
            # The parent goes first, so a child's end cannot fail the parent's step meanwhile.
            task.cancel()
            await asyncio.wait([task])
            run = self.storage.get_run(run_id)
            cancelled = run is not None and run.status == "cancelled"
        elif self.storage.get_run(run_id) is None:
            raise RunNotFound(f"no run {run_id!r}; list them with `frys workflow runs`")
        else:
            cancelled = await self.storage.end_run(run_id, "cancelled", error="cancelled")
        for child in self.storage.list_runs(parent_run=run_id, status="running", limit=10**6):
            await self.cancel(child.id)
        return cancelled

    # -- triggers -------------------------------------------------------------------------

    async def run_triggers(self) -> None:
        """Start runs from the triggers of every loaded workflow, until cancelled."""
        async with anyio.create_task_group() as tg:
            for workflow in self.workflows.values():
                for index, trigger in enumerate(workflow.spec.triggers):
                    if trigger.type == "event":
                        tg.start_soon(self._event_trigger, workflow, trigger)
                    else:
                        tg.start_soon(self._clock_trigger, workflow, index, trigger)

    async def _event_trigger(self, workflow: Workflow, trigger: TriggerSpec) -> None:
        """Each event on the topic starts a run; its payload's fields are the inputs."""
        assert trigger.topic is not None
        send, receive = anyio.create_memory_object_stream[Any](TRIGGER_QUEUE)

        def on_event(message: Any) -> None:
            try:
                send.send_nowait(message)
            except anyio.WouldBlock:
                log.warning("trigger %s: queue full, dropped %s", workflow.spec.name, message.topic)

        sub = self.rt.bus.subscribe(
            trigger.topic, handler=on_event, name=f"trigger {trigger.topic}"
        )
        try:
            async with receive:
                async for message in receive:
                    await self._fire(workflow, _event_inputs(workflow, message), None)
        finally:
            self.rt.bus.unsubscribe(sub)

    async def _clock_trigger(self, workflow: Workflow, index: int, trigger: TriggerSpec) -> None:
        """Interval and cron triggers; the last fire time is kept in KV for missed fires."""
        key = f"{workflow.spec.name}/{index}"
        entry = self.storage.get(TRIGGER_NAMESPACE, key)
        last = None if entry is None else float(entry.value)
        now = time.time()
        due = _next_fire(trigger, last if last is not None else now)
        if due <= now:  # fires were missed while the device was off
            due = now if trigger.missed == "run_once" else _next_fire(trigger, now)
        while True:
            await anyio.sleep(max(0.0, due - time.time()))
            await self._fire(workflow, {}, f"trigger:{key}:{due:.3f}")
            await self.storage.put(TRIGGER_NAMESPACE, key, due)
            due = _next_fire(trigger, max(due, time.time()))

    async def _fire(self, workflow: Workflow, inputs: dict[str, Any], key: str | None) -> None:
        try:
            await self.start(workflow, inputs, idempotency_key=key)
        except WorkflowError as e:
            log.error("trigger of %s could not start a run: %s", workflow.spec.name, e)

    # -- execution ------------------------------------------------------------------------

    async def _drive(
        self, run: RunRecord, workflow: Workflow, recorded: dict[str, StepRecord]
    ) -> None:
        states = {n: r.status for n, r in recorded.items() if r.status in (*FINAL, "skipped")}
        outputs = {n: r.output for n, r in recorded.items() if n in states}
        in_flight: dict[asyncio.Task[str], str] = {}
        status, error = "failed", None
        try:
            timeout = None if run.deadline is None else run.deadline - time.time()
            limit = workflow.spec.concurrency
            slot = (
                self._limits.setdefault(run.workflow, asyncio.Semaphore(limit)) if limit else None
            )
            with anyio.fail_after(timeout):
                # `concurrency` runs of a workflow at once; later ones wait here, timed.
                async with slot or contextlib.nullcontext():
                    await self._advance(run, workflow, recorded, states, outputs, in_flight)
            status = run_outcome(workflow, states) or "failed"
            if status == "failed":
                failed = [n for n, s in states.items() if s == "failed"]
                error = f"step {failed[0]} failed" if failed else "no step could run"
        except TimeoutError:
            error = f"run timed out after {workflow.spec.timeout} s"
        except _Suspended:
            return
        except asyncio.CancelledError:
            if self._stopping:
                return
            status, error = "cancelled", "cancelled"
        finally:
            for task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.wait(in_flight)
        result = None
        if status == "succeeded":
            try:
                result = render_value(workflow.outputs, self._context(run, states, outputs))
            except FrysError as e:
                status, error = "failed", f"outputs: {e}"
        await self._finish(run, status, result, error)

    async def _advance(
        self,
        run: RunRecord,
        workflow: Workflow,
        recorded: dict[str, StepRecord],
        states: dict[str, str],
        outputs: dict[str, Any],
        in_flight: dict[asyncio.Task[str], str],
    ) -> None:
        """Start ready steps and record their outcomes until the run's outcome is known."""
        while True:
            outcome = run_outcome(workflow, states)
            if outcome == "failed" or (outcome is not None and not in_flight):
                return
            if not self._stopping:
                ready = ready_steps(workflow, states)
                if len(ready) == 1 and not in_flight:
                    # A lone step (a chain) runs in the driver: no task, no wait set.
                    name = ready[0]
                    states[name] = "running"
                    states[name] = await self._run_step(
                        run, workflow, name, recorded.get(name), states, outputs
                    )
                    continue
                for name in ready:
                    states[name] = "running"
                    step = self._run_step(run, workflow, name, recorded.get(name), states, outputs)
                    in_flight[asyncio.create_task(step)] = name
            if not in_flight:
                if self._stopping:
                    raise _Suspended
                return
            done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for finished in done:
                states[in_flight.pop(finished)] = finished.result()

    async def _finish(self, run: RunRecord, status: str, outputs: Any, error: str | None) -> None:
        # Shielded: a cancelled run must still record that it was cancelled.
        with anyio.CancelScope(shield=True):
            await self.storage.end_run(run.id, status, outputs, error)
            self._count(f"workflow_runs_{status}_total", run.workflow, f"Workflow runs {status}")
            level = logging.DEBUG if status == "succeeded" else logging.WARNING
            log.log(
                level, "run %s of %s %s%s", run.id, run.workflow, status, f": {error}" * bool(error)
            )
            await self.rt.publish(f"workflow/{run.workflow}/{status}", {"run": run.id})
        self._deadlines.pop(run.id, None)
        record = self.storage.get_run(run.id)
        assert record is not None
        for future in self._waiters.pop(run.id, []):
            if not future.done():
                future.set_result(record)

    @staticmethod
    def _context(
        run: RunRecord, states: Mapping[str, str], outputs: Mapping[str, Any]
    ) -> dict[str, Any]:
        steps = {n: {"status": s, "output": outputs.get(n)} for n, s in states.items()}
        return {
            "inputs": run.inputs,
            "steps": steps,
            "run": {"id": run.id, "workflow": run.workflow, "started_at": run.created_at},
        }

    async def _run_step(
        self,
        run: RunRecord,
        workflow: Workflow,
        name: str,
        recorded: StepRecord | None,
        states: Mapping[str, str],
        outputs: dict[str, Any],
    ) -> str:
        """Run one step to a final status (retrying as its policy says); returns the status."""
        spec = workflow.steps[name]
        storage = self.storage
        context = self._context(run, states, outputs)
        condition = workflow.conditions[name]
        if condition is not None and not evaluate_condition(condition, context):
            await storage.record_step(run.id, name, "skipped", 0, finished_at=time.time())
            return "skipped"
        retry = spec.retry
        policy = (
            RetryPolicy(
                retry.max_attempts,
                retry.initial_delay,
                retry.max_delay,
                retry.multiplier,
                retry.jitter,
            )
            if retry is not None
            else RetryPolicy(max_attempts=1)
        )
        attempts = recorded.attempts if recorded is not None else 0
        wake_at = recorded.wake_at if recorded is not None else None
        suspended = recorded if recorded is not None and recorded.status == "suspended" else None
        if recorded is not None and recorded.status == "waiting" and wake_at is not None:
            await anyio.sleep(max(0.0, wake_at - time.time()))
        while True:
            attempts += 1
            started = time.time()
            ctx = ActionContext(self, run, name, attempts, suspended)
            try:
                params = render_value(workflow.params[name], context)
                action = self.actions[spec.action]
                if spec.timeout is None:
                    output = await action(ctx, params)
                else:
                    with anyio.fail_after(spec.timeout):
                        output = await action(ctx, params)
            except Exception as e:
                error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if isinstance(e, TimeoutError):
                    error = f"timed out after {spec.timeout} s"
                ended = time.time()
                if policy.should_retry(attempts):
                    self._count("workflow_step_retries_total", run.workflow, "Step retries")
                    wake_at = ended + policy.delay(attempts)
                    suspended = None
                    await storage.record_step(
                        run.id,
                        name,
                        "waiting",
                        attempts,
                        error=error,
                        wake_at=wake_at,
                        attempt=("failed", started, ended),
                    )
                    await anyio.sleep(max(0.0, wake_at - time.time()))
                    continue
                await storage.record_step(
                    run.id,
                    name,
                    "failed",
                    attempts,
                    error=error,
                    started_at=started,
                    finished_at=ended,
                    attempt=("failed", started, ended),
                )
                log.warning("run %s step %s failed: %s", run.id, name, error)
                return "failed"
            finished = time.time()
            labels = {"workflow": run.workflow, "step": name}
            self.rt.metrics.histogram("workflow_step_seconds", "Step run time", labels).observe(
                finished - started
            )
            await storage.record_step(
                run.id,
                name,
                "succeeded",
                attempts,
                output=output,
                started_at=started,
                finished_at=finished,
            )
            outputs[name] = output
            return "succeeded"
