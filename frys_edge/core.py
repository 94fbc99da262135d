"""Core: owns scheduling, pooling, pub/sub, caching, retry and circuit breaking as pure in-memory
logic, and must never do I/O, so that it runs unchanged on CPython and MicroPython."""

# MicroPython constraints shape this file: annotations must not name `typing` at run time (they
# are quoted and imported only for type checkers), awaitables need `__iter__` as well as
# `__await__`, plain dicts are not insertion-ordered, and `time.monotonic` does not exist.

import heapq
import random
import sys
import time
from collections import OrderedDict, deque

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import Any

try:
    from threading import Condition as _Condition
    from threading import Event as _ThreadEvent
    from threading import Lock as _Lock

    _THREADS = True
except ImportError:  # the MicroPython WebAssembly port has no threads
    _THREADS = False

try:
    from time import monotonic
except ImportError:
    # ticks_ms() wraps around, so sum the differences; a call every few days keeps it exact.
    _ticks = [0, 0]
    _ticks[0] = time.ticks_ms()  # type: ignore[attr-defined]

    def monotonic() -> float:
        """Seconds from an arbitrary start; never goes backwards."""
        now = time.ticks_ms()  # type: ignore[attr-defined]
        _ticks[1] += time.ticks_diff(now, _ticks[0])  # type: ignore[attr-defined]
        _ticks[0] = now
        return _ticks[1] / 1000


# CPython dicts keep insertion order, MicroPython's do not (its OrderedDict does).
_OrderedMap = OrderedDict if sys.implementation.name == "micropython" else dict

_MISSING = object()


class FrysError(Exception):
    """Root of every error Frys Edge raises."""


class PoolExhausted(FrysError):
    """A pool had no free object within the allowed wait."""


class BusFull(FrysError):
    """A block-policy subscription was full, so nothing was published."""


class QueueFull(FrysError):
    """The scheduler already holds max_pending tasks that have not started."""


class CircuitOpen(FrysError):
    """A circuit breaker refused a call; retry_after says when to try again."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Cancelled(FrysError):
    """A task was cancelled."""


def _is_coroutine(value):
    return hasattr(value, "send") and hasattr(value, "throw")


class _NoLock:
    """Stands in for a lock where there are no threads to exclude."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return False


_NO_LOCK = _NoLock()


def _new_lock():
    return _Lock() if _THREADS else _NO_LOCK


# ---------------------------------------------------------------------------------------------
# Scheduler


class _Suspend:
    """What a task yields to Scheduler.run: wait for a delay or for an event."""

    __slots__ = ("delay", "event")

    def __init__(self, delay, event):
        self.delay = delay
        self.event = event

    def __iter__(self):
        if self.event is None or not self.event.is_set():
            yield self

    __await__ = __iter__


def sleep(seconds: float) -> "Awaitable[None]":
    """Awaitable that suspends the calling task for seconds (tasks run by Scheduler.run)."""
    return _Suspend(max(0.0, seconds), None)


class Event:
    """One-shot flag that tasks run by Scheduler.run can await."""

    def __init__(self) -> None:
        self._is_set = False
        self._waiters = []  # type: list[Callable[[], None]]

    def is_set(self) -> bool:
        """Whether set() has been called."""
        return self._is_set

    def set(self) -> None:
        """Set the flag and wake every task waiting on it."""
        if self._is_set:
            return
        self._is_set = True
        waiters, self._waiters = self._waiters, []
        for wake in waiters:
            wake()

    def wait(self) -> "Awaitable[None]":
        """Awaitable that completes once the event is set."""
        return _Suspend(None, self)


_FINAL_STATES = ("done", "failed", "cancelled")


class Task:
    """One call submitted to a Scheduler, and its outcome."""

    __slots__ = (
        "_blocker",
        "_callbacks",
        "_coro",
        "_scheduler",
        "_throw",
        "args",
        "cancel_requested",
        "error",
        "fn",
        "group",
        "id",
        "name",
        "priority",
        "result",
        "state",
    )

    def __init__(self, scheduler, task_id, fn, args, name, priority, group):
        self.id = task_id
        self.name = name
        self.fn = fn
        self.args = args
        self.priority = priority
        self.group = group
        self.state = "pending"
        self.result = None  # type: Any
        self.error = None  # type: BaseException | None
        # Set when cancel() hits a running task; an external driver must then stop it.
        self.cancel_requested = False
        self._scheduler = scheduler  # type: Scheduler
        self._callbacks = None  # type: list[Callable[[Task], object]] | None
        self._coro = None  # type: Any
        self._blocker = None  # type: _Suspend | None
        self._throw = None  # type: BaseException | None

    def cancel(self) -> bool:
        """Cancel this task; see Scheduler.cancel."""
        return self._scheduler.cancel(self)

    def done(self) -> bool:
        """Whether the task has finished, failed or been cancelled."""
        return self.state in _FINAL_STATES

    def add_done_callback(self, fn: "Callable[[Task], object]") -> None:
        """Call fn(task) when the task ends (at once if it already has)."""
        if self.state in _FINAL_STATES:
            fn(self)
        elif self._callbacks is None:
            self._callbacks = [fn]
        else:
            self._callbacks.append(fn)

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.name!r} {self.state}>"


class Scheduler:
    """Priority ready-queue plus timers, with a concurrency limit per named group.

    Lower priority numbers run first, FIFO within a priority. Drive it either with run(), or
    from outside: call task.fn(*task.args) for each task from pop_ready(), report the outcome
    with finish(), and sleep until next_deadline() or until on_wake() is called.
    """

    def __init__(
        self,
        groups: "dict[str, int] | None" = None,
        max_pending: int = 10000,
        clock: "Callable[[], float]" = monotonic,
        on_wake: "Callable[[], object] | None" = None,
    ) -> None:
        if max_pending < 1:
            raise FrysError(f"Scheduler max_pending must be at least 1, got {max_pending!r}")
        self.max_pending = max_pending
        self.on_wake = on_wake
        self._clock = clock
        self._next_id = 0
        self._next_seq = 0
        self._ready = []  # type: list[tuple[int, int, Task]]  # (priority, seq, task) heap
        self._parked = {}  # type: dict[str, list[tuple[int, int, Task]]]  # ready, group full
        self._timers = []  # type: list[tuple[float, int, Task]]  # (deadline, id, task) heap
        self._stale = 0  # heap entries left behind by cancelled tasks
        self._limits = {}  # type: dict[str, int]
        self._running_in = {}  # type: dict[str, int]
        self._pending = 0
        self._waiting = 0
        self._running = 0
        self._done = 0
        self._failed = 0
        self._cancelled = 0
        # run()'s own state: coroutines asleep, and coroutines ready to be resumed.
        self._sleepers = []  # type: list[tuple[float, int, Task, _Suspend]]
        self._runnable = []  # type: list[Task]
        self._cancel_requests = []  # type: list[Task]  # running tasks asked to stop
        for name, limit in (groups or {}).items():
            self.set_group_limit(name, limit)

    def set_group_limit(self, name: str, limit: "int | None") -> None:
        """Allow at most limit tasks of group name to run at once (None: no limit)."""
        if limit is None:
            self._limits.pop(name, None)
        elif limit < 1:
            raise FrysError(
                f"group {name!r} limit must be at least 1, got {limit!r}; use None for no limit"
            )
        else:
            self._limits[name] = limit
        parked = self._parked.pop(name, None)
        if parked:
            for entry in parked:
                heapq.heappush(self._ready, entry)
            self._wake()

    def submit(
        self,
        fn: "Callable[..., Any]",
        *args: "Any",
        priority: int = 0,
        group: str = "default",
        delay: float = 0.0,
        name: "str | None" = None,
    ) -> Task:
        """Queue fn(*args) to start after delay seconds; fn may return a coroutine."""
        if self._pending + self._waiting >= self.max_pending:
            raise QueueFull(
                f"scheduler queue full: {self._pending + self._waiting} tasks pending or "
                f"waiting (max_pending={self.max_pending}); raise max_pending or submit less often"
            )
        self._next_id += 1
        if name is None:
            name = getattr(fn, "__name__", "task")
        task = Task(self, self._next_id, fn, args, name, priority, group)
        if delay > 0:
            task.state = "waiting"
            self._waiting += 1
            heapq.heappush(self._timers, (self._clock() + delay, task.id, task))
        else:
            self._pending += 1
            self._next_seq += 1
            heapq.heappush(self._ready, (priority, self._next_seq, task))
        self._wake()
        return task

    def cancel(self, task: Task) -> bool:
        """Drop a task that has not started, or ask a running one to stop; False if it ended."""
        state = task.state
        if state == "pending" or state == "waiting":
            if state == "pending":
                self._pending -= 1
            else:
                self._waiting -= 1
            self._stale += 1
            task.state = "cancelled"
            task.error = Cancelled(f"task {task.id} ({task.name}) was cancelled before it started")
            self._cancelled += 1
            self._compact()
            self._run_callbacks(task)
            return True
        if state != "running":
            return False
        if not task.cancel_requested:
            task.cancel_requested = True
            task._throw = Cancelled(f"task {task.id} ({task.name}) was cancelled while running")
            self._cancel_requests.append(task)
            if task._blocker is not None:
                self._resume(task, task._blocker)
            self._wake()
        return True

    def cancel_not_started(self) -> int:
        """Cancel every task that is pending, parked or waiting on a timer; returns how many."""
        tasks = [entry[2] for entry in self._ready] + [entry[2] for entry in self._timers]
        for parked in self._parked.values():
            tasks.extend(entry[2] for entry in parked)
        return sum(
            1 for task in tasks if task.state in ("pending", "waiting") and self.cancel(task)
        )

    def take_cancel_requests(self) -> "list[Task]":
        """Running tasks asked to stop since the last call; an external driver stops them."""
        requests, self._cancel_requests = self._cancel_requests, []
        return requests

    def pop_ready(self, now: "float | None" = None) -> "list[Task]":
        """Mark as running and return every task allowed to start now, in priority order."""
        timers = self._timers
        if timers:
            if now is None:
                now = self._clock()
            while timers and timers[0][0] <= now:
                task = heapq.heappop(timers)[2]
                if task.state != "waiting":
                    self._stale -= 1
                    continue
                task.state = "pending"
                self._waiting -= 1
                self._pending += 1
                self._next_seq += 1
                heapq.heappush(self._ready, (task.priority, self._next_seq, task))
        ready = self._ready
        started = []
        limits = self._limits
        running_in = self._running_in
        while ready:
            entry = heapq.heappop(ready)
            task = entry[2]
            if task.state != "pending":
                self._stale -= 1
                continue
            group = task.group
            count = running_in.get(group, 0)
            if group in limits and count >= limits[group]:
                heapq.heappush(self._parked.setdefault(group, []), entry)
                continue
            running_in[group] = count + 1
            task.state = "running"
            started.append(task)
        self._pending -= len(started)
        self._running += len(started)
        return started

    def finish(
        self, task: Task, result: "Any" = None, error: "BaseException | None" = None
    ) -> None:
        """Record how a running task ended, free its group slot and call its callbacks."""
        if task.state != "running":
            raise FrysError(
                f"task {task.id} ({task.name}) is {task.state}, not running; finish() takes only "
                "tasks from pop_ready()"
            )
        self._running -= 1
        self._running_in[task.group] -= 1
        task._coro = None
        task._blocker = None
        if error is None:
            task.state = "done"
            task.result = result
            self._done += 1
        else:
            task.state = "cancelled" if isinstance(error, Cancelled) else "failed"
            task.error = error
            if task.state == "cancelled":
                self._cancelled += 1
            else:
                self._failed += 1
        parked = self._parked.get(task.group)
        if parked:
            self._unpark_one(parked)
            self._wake()
        self._run_callbacks(task)

    def next_deadline(self) -> "float | None":
        """Clock time at which the next delayed task becomes ready, or None."""
        timers = self._timers
        while timers and timers[0][2].state != "waiting":
            heapq.heappop(timers)
            self._stale -= 1
        return timers[0][0] if timers else None

    def stats(self) -> "dict[str, Any]":
        """Task counts by state, and running tasks per group."""
        return {
            "pending": self._pending,
            "waiting": self._waiting,
            "running": self._running,
            "done": self._done,
            "failed": self._failed,
            "cancelled": self._cancelled,
            "running_by_group": dict(self._running_in),
        }

    def run(
        self, timeout: "float | None" = None, sleep: "Callable[[float], object]" = time.sleep
    ) -> bool:
        """Run tasks, stepping coroutines, until none remain (True) or timeout passes (False)."""
        clock = self._clock
        stop_at = None if timeout is None else clock() + timeout
        sleepers = self._sleepers
        while self._pending or self._waiting or self._running:
            now = clock()
            if stop_at is not None and now >= stop_at:
                return False
            progressed = False
            # Own-loop tasks get Cancelled thrown in on resume; no driver needs the list.
            self._cancel_requests = []
            for task in self.pop_ready(now):
                self._start(task)
                progressed = True
            while sleepers and sleepers[0][0] <= now:
                entry = heapq.heappop(sleepers)
                self._resume(entry[2], entry[3])
            while self._runnable:
                batch, self._runnable = self._runnable, []
                for task in batch:
                    self._step(task)
                progressed = True
            if progressed:
                continue
            wake = self.next_deadline()
            if sleepers and (wake is None or sleepers[0][0] < wake):
                wake = sleepers[0][0]
            if stop_at is not None and (wake is None or stop_at < wake):
                wake = stop_at
            if wake is None:
                raise FrysError(
                    f"Scheduler.run is stuck: {self._running} running tasks wait on events that "
                    "no task can set any more; set the event or cancel those tasks"
                )
            sleep(max(0.0, wake - now))
        return True

    def _wake(self):
        if self.on_wake is not None:
            self.on_wake()

    def _unpark_one(self, parked):
        while parked:
            entry = heapq.heappop(parked)
            if entry[2].state == "pending":
                heapq.heappush(self._ready, entry)
                return
            self._stale -= 1

    def _compact(self):
        # Cancelled tasks stay in the heaps until popped; rebuild once they are the majority
        # so that submit-then-cancel loops cannot grow memory without bound.
        total = len(self._ready) + len(self._timers)
        for parked in self._parked.values():
            total += len(parked)
        if self._stale < 64 or self._stale * 2 < total:
            return
        self._ready = [e for e in self._ready if e[2].state == "pending"]
        heapq.heapify(self._ready)
        self._timers = [e for e in self._timers if e[2].state == "waiting"]
        heapq.heapify(self._timers)
        for group in list(self._parked):
            live = [e for e in self._parked[group] if e[2].state == "pending"]
            heapq.heapify(live)
            self._parked[group] = live
        self._stale = 0

    def _run_callbacks(self, task):
        callbacks, task._callbacks = task._callbacks, None
        if callbacks:
            for fn in callbacks:
                fn(task)

    def _start(self, task):
        if task._throw is not None:
            self.finish(task, error=task._throw)
            return
        try:
            result = task.fn(*task.args)
        except Exception as exc:
            self.finish(task, error=exc)
            return
        if _is_coroutine(result):
            task._coro = result
            self._step(task)
        else:
            self.finish(task, result)

    def _resume(self, task, token):
        # A stale token (an old sleep, an event set after cancellation) must not resume twice.
        if task._blocker is token:
            task._blocker = None
            self._runnable.append(task)

    def _step(self, task):
        exc, task._throw = task._throw, None
        result = None
        error = None
        try:
            request = task._coro.send(None) if exc is None else task._coro.throw(exc)
        except StopIteration as stop:
            result = stop.value
        except Exception as failure:
            error = failure
        else:
            if task._throw is not None:
                # cancelled itself while running: deliver it at once
                self._runnable.append(task)
            elif not isinstance(request, _Suspend):
                task._throw = FrysError(
                    f"task {task.id} ({task.name}) awaited {request!r}, but Scheduler.run can "
                    "only wait on core.sleep() and core.Event"
                )
                self._runnable.append(task)
            elif request.event is None:
                task._blocker = request
                self._next_seq += 1
                heapq.heappush(
                    self._sleepers, (self._clock() + request.delay, self._next_seq, task, request)
                )
            else:
                task._blocker = request
                request.event._waiters.append(lambda: self._resume(task, request))
            return
        self.finish(task, result, error)


# ---------------------------------------------------------------------------------------------
# Pool


class _Lease:
    """Context manager that lends one pool object for the duration of a with block."""

    __slots__ = ("_obj", "_pool", "_timeout")

    def __init__(self, pool, timeout):
        self._pool = pool
        self._timeout = timeout
        self._obj = None

    def __enter__(self):
        self._obj = self._pool.acquire(self._timeout)
        return self._obj

    def __exit__(self, exc_type, exc, tb):
        self._pool.release(self._obj)
        return False


class Pool:
    """Bounded pool of reusable objects (connections, buffers), safe to share between threads."""

    def __init__(
        self,
        factory: "Callable[[], Any]",
        max_size: int,
        name: str = "pool",
        reset: "Callable[[Any], object] | None" = None,
        close: "Callable[[Any], object] | None" = None,
    ) -> None:
        if max_size < 1:
            raise FrysError(f"pool {name!r}: max_size must be at least 1, got {max_size!r}")
        self.name = name
        self.max_size = max_size
        self._factory = factory
        self._reset = reset
        self._close = close
        self._idle = []  # type: list[Any]
        self._lent = {}  # type: dict[int, Any]  # id(obj) -> obj
        self._size = 0  # objects alive or being created
        self._closed = False
        self._waiters = 0
        self._created = 0
        self._acquired = 0
        self._exhausted = 0
        self._discarded = 0
        self._high_water = 0
        self._lock = _new_lock()
        self._cond = _Condition(self._lock) if _THREADS else None

    def acquire(self, timeout: "float | None" = None) -> "Any":
        """Return an idle or new object; if all are lent, wait up to timeout s (None: forever).

        Without threads (MicroPython's WebAssembly port) nothing can release meanwhile, so a
        full pool raises PoolExhausted at once.
        """
        with self._lock:
            if not self._idle and self._size >= self.max_size and not self._closed:
                self._wait(timeout)
            if self._closed:
                raise FrysError(f"pool {self.name!r} is closed; create a new pool")
            if self._idle:
                obj = self._idle.pop()
                self._lend(obj)
                return obj
            self._size += 1  # reserve the slot, then create outside the lock
        try:
            obj = self._factory()
        except BaseException:
            with self._lock:
                self._size -= 1
                self._notify()
            raise
        with self._lock:
            self._created += 1
            self._lend(obj)
        return obj

    def release(self, obj: "Any") -> None:
        """Reset obj and return it; if reset raises, obj is closed and dropped instead."""
        with self._lock:
            if self._lent.pop(id(obj), None) is None:
                raise FrysError(
                    f"pool {self.name!r}: released an object it did not lend (released twice, "
                    "or from another pool)"
                )
            if self._reset is None and not self._closed:
                self._idle.append(obj)
                if self._waiters:
                    self._notify()
                return
        if not self._closed and self._reset is not None:
            try:
                self._reset(obj)
            except Exception:
                # a half-reset object (say, a connection stuck in a transaction) is unsafe to lend
                self._drop(obj, discarded=True)
                return
            with self._lock:
                if not self._closed:
                    self._idle.append(obj)
                    if self._waiters:
                        self._notify()
                    return
        self._drop(obj)

    def item(self, timeout: "float | None" = None) -> "_Lease":
        """Context manager: `with pool.item() as obj:` acquires and always releases."""
        return _Lease(self, timeout)

    def close_all(self) -> None:
        """Close idle objects now, lent ones when released; later acquires raise FrysError."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._size -= len(idle)
            if self._cond is not None:
                self._cond.notify_all()
        if self._close is not None:
            for obj in idle:
                self._close(obj)

    def stats(self) -> "dict[str, Any]":
        """Sizes and counters of this pool."""
        with self._lock:
            return {
                "name": self.name,
                "max_size": self.max_size,
                "size": self._size,
                "in_use": len(self._lent),
                "idle": len(self._idle),
                "created": self._created,
                "acquired": self._acquired,
                "exhausted": self._exhausted,
                "discarded": self._discarded,
                "high_water": self._high_water,
            }

    def _lend(self, obj):
        lent = self._lent
        lent[id(obj)] = obj
        self._acquired += 1
        if len(lent) > self._high_water:
            self._high_water = len(lent)

    def _notify(self):
        if self._cond is not None:
            self._cond.notify()

    def _drop(self, obj, discarded=False):
        with self._lock:
            self._size -= 1
            if discarded:
                self._discarded += 1
            self._notify()
        if self._close is not None:
            self._close(obj)

    def _wait(self, timeout):
        # Called with the lock held; returns once an object is idle, a slot is free or the
        # pool is closed.
        cond = self._cond
        if cond is None or (timeout is not None and timeout <= 0):
            self._exhausted += 1
            raise PoolExhausted(
                f"pool {self.name!r} exhausted: all {self.max_size} objects in use; raise the "
                "pool size or release objects sooner"
            )
        started = monotonic()
        self._waiters += 1
        try:
            while not self._idle and self._size >= self.max_size and not self._closed:
                if timeout is None:
                    cond.wait()
                    continue
                left = started + timeout - monotonic()
                if left <= 0:
                    self._exhausted += 1
                    raise PoolExhausted(
                        f"pool {self.name!r} exhausted: all {self.max_size} objects in use for "
                        f"{timeout:.1f} s; raise the pool size or release objects sooner"
                    )
                cond.wait(left)
        finally:
            self._waiters -= 1


# ---------------------------------------------------------------------------------------------
# Topics and the event bus


def _has_wildcard(text):
    return "+" in text or "#" in text


def validate_topic(topic: str) -> None:
    """Raise FrysError unless topic is a valid topic to publish to (no wildcards)."""
    if not isinstance(topic, str) or not topic:
        raise FrysError(f"topic must be a non-empty string, got {topic!r}")
    if _has_wildcard(topic):
        raise FrysError(
            f"topic {topic!r} contains a wildcard; '+' and '#' are only allowed in subscription "
            "patterns"
        )


def validate_pattern(pattern: str) -> None:
    """Raise FrysError unless pattern is a valid subscription pattern."""
    if not isinstance(pattern, str) or not pattern:
        raise FrysError(f"pattern must be a non-empty string, got {pattern!r}")
    levels = pattern.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if level == "#":
            if i != last:
                raise FrysError(
                    f"pattern {pattern!r}: '#' must be the last level, as in 'sensors/#'"
                )
        elif level != "+" and _has_wildcard(level):
            raise FrysError(
                f"pattern {pattern!r}: '+' and '#' must fill a whole level, as in 'sensors/+/temp'"
            )


def _match_levels(pattern_levels: "list[str]", topic_levels: "list[str]") -> bool:
    count = len(topic_levels)
    for i, level in enumerate(pattern_levels):
        if level == "#":
            return True  # matches the parent level and anything below it
        if i >= count or (level != "+" and level != topic_levels[i]):
            return False
    return len(pattern_levels) == count


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether topic matches pattern: '+' is one level, a final '#' any number (even none)."""
    if pattern == topic:
        return True
    return _match_levels(pattern.split("/"), topic.split("/"))


class Message:
    """One published message; seq increases across the whole bus."""

    __slots__ = ("payload", "seq", "topic", "ts")

    def __init__(self, topic: str, payload: "Any", seq: int, ts: float) -> None:
        self.topic = topic
        self.payload = payload
        self.seq = seq
        self.ts = ts

    def __repr__(self) -> str:
        return f"<Message {self.seq} {self.topic!r}>"


_POLICIES = ("drop_oldest", "drop_new", "block")


def _bounded_queue(maxsize):
    # MicroPython's deque accepts maxlen only as a positional argument.
    return deque((), maxsize)  # noqa: RUF037


class Subscription:
    """A bounded queue of the messages whose topic matches a pattern.

    Counters: delivered (handed to get_nowait() or the handler), dropped (by the overflow
    policy) and errors (raised by the filter or the handler; the latest is last_error).
    """

    def __init__(self, bus, pattern, handler, maxsize, policy, filter, name):
        self.pattern = pattern
        self.handler = handler
        self.maxsize = maxsize
        self.policy = policy
        self.filter = filter
        self.name = name
        self.active = True
        self.delivered = 0
        self.dropped = 0
        self.errors = 0
        self.last_error = None  # type: Exception | None
        self._bus = bus
        self._scheduler = bus.scheduler
        self._queue = _bounded_queue(maxsize)  # type: deque[Message]
        self._levels = pattern.split("/") if _has_wildcard(pattern) else None
        self._draining = False

    def pending(self) -> int:
        """Number of messages queued and not yet taken."""
        return len(self._queue)

    def get_nowait(self) -> "Message | None":
        """Take the oldest queued message, or None when the queue is empty."""
        if not self._queue:
            return None
        return self._take()

    async def drain(self) -> None:
        """Pass queued messages to the handler in order, awaiting it if it returns a coroutine."""
        try:
            while self.active and self._queue:
                message = self._take()
                try:
                    result = self.handler(message)
                    if _is_coroutine(result):
                        await result
                except Cancelled:
                    raise
                except Exception as exc:
                    # one bad message must not stop the subscription or the bus
                    self._error(exc)
        finally:
            self._draining = False

    def __repr__(self) -> str:
        return f"<Subscription {self.name!r} {self.policy} {len(self._queue)}/{self.maxsize}>"

    def _take(self) -> Message:
        queue = self._queue
        was_full = len(queue) >= self.maxsize
        message = queue.popleft()
        self.delivered += 1
        self._bus._delivered += 1
        if was_full and self.policy == "block":
            self._bus._space_freed(self)
        return message

    def _error(self, exc):
        self.errors += 1
        self.last_error = exc
        self._bus._errors += 1


class EventBus:
    """In-process publish/subscribe over '/'-separated topics with bounded queues.

    Not thread-safe: publish and consume from one thread (or one event loop).
    """

    def __init__(
        self,
        scheduler: "Scheduler | None" = None,
        default_maxsize: int = 1000,
        on_space: "Callable[[Subscription], object] | None" = None,
    ) -> None:
        if default_maxsize < 1:
            raise FrysError(f"EventBus default_maxsize must be at least 1, got {default_maxsize!r}")
        self.scheduler = scheduler
        self.default_maxsize = default_maxsize
        # called with a block-policy subscription whose full queue just got room again
        self.on_space = on_space
        self._subs = []  # type: list[Subscription]
        self._seq = 0
        self._count = 0
        self._published = 0
        self._delivered = 0
        self._dropped = 0
        self._errors = 0

    def subscribe(
        self,
        pattern: str,
        handler: "Callable[[Message], Any] | None" = None,
        maxsize: "int | None" = None,
        policy: str = "drop_oldest",
        filter: "Callable[[Message], bool] | None" = None,
        name: "str | None" = None,
    ) -> Subscription:
        """Subscribe to pattern; with a handler, messages are drained on the scheduler."""
        validate_pattern(pattern)
        self._count += 1
        if name is None:
            name = f"sub{self._count}:{pattern}"
        if policy not in _POLICIES:
            raise FrysError(
                f"subscription {name!r}: unknown policy {policy!r}; use one of "
                "drop_oldest, drop_new, block"
            )
        if maxsize is None:
            maxsize = self.default_maxsize
        elif maxsize < 1:
            raise FrysError(f"subscription {name!r}: maxsize must be at least 1, got {maxsize!r}")
        if handler is not None and self.scheduler is None:
            raise FrysError(
                f"subscription {name!r} has a handler but the EventBus has no scheduler to "
                "run it; pass EventBus(scheduler=...), or subscribe without a handler and "
                "call get_nowait()"
            )
        sub = Subscription(self, pattern, handler, maxsize, policy, filter, name)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop delivering to sub and discard what it still has queued."""
        if not sub.active:
            return
        sub.active = False
        self._subs.remove(sub)
        was_full = len(sub._queue) >= sub.maxsize
        sub._queue = _bounded_queue(sub.maxsize)
        if was_full and sub.policy == "block":
            self._space_freed(sub)

    def publish(self, topic: str, payload: "Any" = None) -> int:
        """Queue a message to every matching subscription; returns how many queued it."""
        validate_topic(topic)
        message = Message(topic, payload, self._seq + 1, monotonic())
        levels = None
        targets = []
        for sub in self._subs:
            if sub._levels is None:
                if sub.pattern != topic:
                    continue
            else:
                if levels is None:
                    levels = topic.split("/")
                if not _match_levels(sub._levels, levels):
                    continue
            if sub.filter is not None:
                try:
                    if not sub.filter(message):
                        continue
                except Exception as exc:
                    sub._error(exc)
                    continue
            if sub.policy == "block" and len(sub._queue) >= sub.maxsize:
                # refuse before queuing anywhere, so a retry cannot deliver twice
                raise BusFull(
                    f"subscription {sub.name!r} is full: {sub.maxsize} messages queued (policy "
                    "'block'); consume faster, raise maxsize or choose a dropping policy"
                )
            targets.append(sub)
        self._seq += 1
        self._published += 1
        queued = 0
        for sub in targets:
            queue = sub._queue
            if len(queue) >= sub.maxsize:
                sub.dropped += 1
                self._dropped += 1
                if sub.policy == "drop_new":
                    continue
                queue.popleft()
            queue.append(message)
            queued += 1
            if sub.handler is not None and not sub._draining:
                try:
                    sub._scheduler.submit(sub.drain, group="bus", name="drain " + sub.name)
                    sub._draining = True
                except QueueFull as exc:
                    # Raising now would make a retry deliver twice; the message stays queued
                    # and the next publish schedules the drain again.
                    sub._error(exc)
        return queued

    def stats(self) -> "dict[str, int]":
        """Totals across the bus."""
        return {
            "published": self._published,
            "delivered": self._delivered,
            "dropped": self._dropped,
            "errors": self._errors,
            "subscriptions": len(self._subs),
        }

    def _space_freed(self, sub):
        if self.on_space is not None:
            self.on_space(sub)


# ---------------------------------------------------------------------------------------------
# Cache


class _Flight:
    """One load in progress that concurrent callers for the same key wait on."""

    __slots__ = ("error", "signal", "value")

    def __init__(self, signal):
        self.signal = signal
        self.value = _MISSING  # still _MISSING after signal: the load was abandoned
        self.error = None

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.value


class Cache:
    """LRU cache with an optional TTL per cache or per entry, and single-flight loading."""

    def __init__(
        self,
        max_entries: int = 1024,
        ttl: "float | None" = None,
        clock: "Callable[[], float]" = monotonic,
    ) -> None:
        if max_entries < 1:
            raise FrysError(f"Cache max_entries must be at least 1, got {max_entries!r}")
        if ttl is not None and ttl <= 0:
            raise FrysError(f"Cache ttl must be positive seconds or None, got {ttl!r}")
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._data = _OrderedMap()  # type: dict[Any, tuple[Any, float | None]]  # LRU first
        self._may_expire = ttl is not None
        self._lock = _new_lock()
        self._flights = {}  # type: dict[Any, _Flight]
        self._async_flights = {}  # type: dict[Any, _Flight]
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._expirations = 0

    def get(self, key: "Any", default: "Any" = None) -> "Any":
        """The value for key (now most recently used), or default if missing or expired."""
        with self._lock:
            return self._lookup(key, default)

    def set(self, key: "Any", value: "Any", ttl: "float | None" = None) -> None:
        """Store value under key, expiring after ttl seconds (default: the cache's ttl)."""
        if ttl is None:
            ttl = self.ttl
        elif ttl <= 0:
            raise FrysError(f"Cache ttl must be positive seconds, got {ttl!r} for key {key!r}")
        expires = None
        if ttl is not None:
            expires = self._clock() + ttl
            self._may_expire = True
        with self._lock:
            data = self._data
            data.pop(key, None)  # re-inserting moves the key to the most recent end
            data[key] = (value, expires)
            if len(data) > self.max_entries:
                del data[next(iter(data))]
                self._evictions += 1

    def delete(self, key: "Any") -> bool:
        """Remove key; True if it was present."""
        with self._lock:
            return self._data.pop(key, None) is not None

    def resize(self, max_entries: int) -> None:
        """Change the bound, evicting least recently used entries beyond it."""
        if max_entries < 1:
            raise FrysError(f"Cache max_entries must be at least 1, got {max_entries!r}")
        with self._lock:
            self.max_entries = max_entries
            data = self._data
            while len(data) > max_entries:
                del data[next(iter(data))]
                self._evictions += 1

    def clear(self) -> None:
        """Remove every entry (counters are kept)."""
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            if self._may_expire:
                self._purge_expired()
            return len(self._data)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return False
            if entry[1] is not None and entry[1] <= self._clock():
                del self._data[key]
                self._expirations += 1
                return False
            return True

    def stats(self) -> "dict[str, Any]":
        """Size and hit/miss/eviction/expiration counters."""
        with self._lock:
            lookups = self._hits + self._misses
            return {
                "entries": len(self._data),
                "max_entries": self.max_entries,
                "hits": self._hits,
                "misses": self._misses,
                "evictions": self._evictions,
                "expirations": self._expirations,
                "hit_rate": self._hits / lookups if lookups else 0.0,
            }

    def get_or_load(self, key: "Any", loader: "Callable[[], Any]") -> "Any":
        """The cached value, or loader() stored; threads missing the same key share one call."""
        with self._lock:
            value = self._lookup(key, _MISSING)
            if value is not _MISSING:
                return value
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight(_ThreadEvent() if _THREADS else None)
        if not leader:
            if flight.signal is None:
                raise FrysError(f"loader for key {key!r} called get_or_load for the same key")
            flight.signal.wait()
            return flight.outcome()
        try:
            value = loader()
            self.set(key, value)
            flight.value = value
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[key]
            if flight.signal is not None:
                flight.signal.set()
        return value

    async def get_or_load_async(
        self,
        key: "Any",
        loader: "Callable[[], Awaitable[Any]]",
        event_factory: "Callable[[], Any] | None" = None,
    ) -> "Any":
        """Async get_or_load: concurrent misses on one key await a single loader() call.

        Waiters block on event_factory() (default: core.Event, for Scheduler.run; the anyio
        runtime passes anyio.Event). If the loading task is cancelled, a waiter loads instead.
        """
        while True:
            value = self.get(key, _MISSING)
            if value is not _MISSING:
                return value
            flight = self._async_flights.get(key)
            if flight is None:
                break
            await flight.signal.wait()
            if flight.error is not None or flight.value is not _MISSING:
                return flight.outcome()
        flight = _Flight((event_factory or Event)())
        self._async_flights[key] = flight
        try:
            value = await loader()
            self.set(key, value)
            flight.value = value
        except Cancelled:
            raise  # not the waiters' failure: they retry the load
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            del self._async_flights[key]
            flight.signal.set()
        return value

    def _lookup(self, key, default):
        # pop and re-insert: moves the key to the most recently used end
        entry = self._data.pop(key, None)
        if entry is None:
            self._misses += 1
            return default
        if entry[1] is not None and entry[1] <= self._clock():
            self._expirations += 1
            self._misses += 1
            return default
        self._data[key] = entry
        self._hits += 1
        return entry[0]

    def _purge_expired(self):
        now = self._clock()
        data = self._data
        expired = [k for k, entry in data.items() if entry[1] is not None and entry[1] <= now]
        for key in expired:
            del data[key]
        self._expirations += len(expired)


# ---------------------------------------------------------------------------------------------
# Retry and circuit breaking


class RetryPolicy:
    """Exponential backoff with optional full jitter; pure arithmetic, no sleeping."""

    def __init__(
        self,
        max_attempts: int = 3,
        initial_delay: float = 0.1,
        max_delay: float = 30.0,
        multiplier: float = 2.0,
        jitter: bool = True,
    ) -> None:
        if max_attempts < 1:
            raise FrysError(f"RetryPolicy max_attempts must be at least 1, got {max_attempts!r}")
        if initial_delay < 0 or max_delay < 0:
            raise FrysError(
                f"RetryPolicy delays must be >= 0, got initial_delay={initial_delay!r} "
                f"max_delay={max_delay!r}"
            )
        if multiplier < 1:
            raise FrysError(f"RetryPolicy multiplier must be >= 1, got {multiplier!r}")
        self.max_attempts = max_attempts
        self.initial_delay = float(initial_delay)
        self.max_delay = float(max_delay)
        self.multiplier = float(multiplier)  # a float power overflows instead of growing a bigint
        self.jitter = jitter

    def delay(self, attempt: int, rand: "Callable[[], float] | None" = None) -> float:
        """Seconds to wait after failed attempt number attempt (1-based)."""
        if attempt < 1:
            raise FrysError(f"RetryPolicy.delay: attempt numbers start at 1, got {attempt!r}")
        cap = min(self.max_delay, self.initial_delay)
        if cap > 0 and attempt > 1:
            try:
                cap = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1))
            except OverflowError:  # CPython; MicroPython gives inf, which min() also handles
                cap = self.max_delay
        if not self.jitter:
            return cap
        return (rand or random.random)() * cap

    def should_retry(self, attempt: int) -> bool:
        """Whether another attempt may follow failed attempt number attempt."""
        return attempt < self.max_attempts


class CircuitBreaker:
    """Closed/open/half-open breaker driven only by outcomes and the clock."""

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout: float = 30.0,
        half_open_max: int = 1,
        clock: "Callable[[], float]" = monotonic,
        name: str = "breaker",
    ) -> None:
        if failure_threshold < 1 or half_open_max < 1:
            raise FrysError(
                f"breaker {name!r}: failure_threshold and half_open_max must be at least 1, "
                f"got {failure_threshold!r} and {half_open_max!r}"
            )
        if reset_timeout < 0:
            raise FrysError(f"breaker {name!r}: reset_timeout must be >= 0, got {reset_timeout!r}")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.half_open_max = half_open_max
        self._clock = clock
        self._state = "closed"
        self._opened_at = 0.0
        self._trials = 0  # calls let through since turning half-open
        self.consecutive_failures = 0
        self.successes = 0
        self.failures = 0
        self.rejected = 0
        self.times_opened = 0

    def state(self, now: "float | None" = None) -> str:
        """'closed', 'open' or 'half_open' at time now."""
        if self._state == "open":
            if now is None:
                now = self._clock()
            if now >= self._opened_at + self.reset_timeout:
                self._state = "half_open"
                self._trials = 0
        return self._state

    def allow(self, now: "float | None" = None) -> bool:
        """Whether a call may go ahead now; counts half-open trial calls."""
        state = self.state(now)
        if state == "closed":
            return True
        if state == "half_open" and self._trials < self.half_open_max:
            self._trials += 1
            return True
        self.rejected += 1
        return False

    def check(self, now: "float | None" = None) -> None:
        """Like allow(), but raise CircuitOpen instead of returning False."""
        if now is None:
            now = self._clock()
        if self.allow(now):
            return
        if self._state == "open":
            retry_after = self._opened_at + self.reset_timeout - now
            raise CircuitOpen(
                f"circuit {self.name!r} is open after {self.consecutive_failures} consecutive "
                f"failures; retry in {retry_after:.1f} s",
                retry_after,
            )
        raise CircuitOpen(
            f"circuit {self.name!r} is half-open and its {self.half_open_max} trial calls are "
            "in flight; retry when they finish",
            0.0,
        )

    def record_success(self, now: "float | None" = None) -> None:
        """Record a successful call; a half-open circuit closes."""
        self.successes += 1
        if self.state(now) != "open":
            self._state = "closed"
            self.consecutive_failures = 0

    def record_failure(self, now: "float | None" = None) -> None:
        """Record a failed call; may open the circuit."""
        if now is None:
            now = self._clock()
        self.failures += 1
        self.consecutive_failures += 1
        state = self.state(now)
        if state == "half_open" or (
            state == "closed" and self.consecutive_failures >= self.failure_threshold
        ):
            self._state = "open"
            self._opened_at = now
            self.times_opened += 1

    def stats(self) -> "dict[str, Any]":
        """State and counters."""
        return {
            "name": self.name,
            "state": self.state(),
            "consecutive_failures": self.consecutive_failures,
            "successes": self.successes,
            "failures": self.failures,
            "rejected": self.rejected,
            "times_opened": self.times_opened,
        }
