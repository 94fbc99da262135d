"""frys_edge.core on CPython: every shared behaviour check, plus property and thread tests."""

import heapq
import re
import threading
import time
from collections import OrderedDict

import anyio
import core_checks
import pytest
from core_checks import FakeClock
from hypothesis import given, settings
from hypothesis import strategies as st

from frys_edge import core

CHECKS = sorted(name for name in dir(core_checks) if name.startswith("check_"))


@pytest.mark.parametrize("name", CHECKS)
def test_core_check(name: str) -> None:
    getattr(core_checks, name)()


# --- pool --------------------------------------------------------------------------------------


class Conn:
    def __init__(self) -> None:
        self.broken = False
        self.closed = False


@given(
    max_size=st.integers(1, 5),
    ops=st.lists(
        st.tuples(st.sampled_from(["acquire", "release", "release_broken"]), st.integers(0, 9)),
        max_size=60,
    ),
)
def test_pool_never_exceeds_its_bound_under_random_acquire_release(
    max_size: int, ops: list[tuple[str, int]]
) -> None:
    def reset(conn: Conn) -> None:
        if conn.broken:
            raise RuntimeError("reset failed")

    def close(conn: Conn) -> None:
        conn.closed = True

    pool = core.Pool(Conn, max_size, reset=reset, close=close)
    held: list[Conn] = []
    for op, index in ops:
        if op == "acquire":
            if len(held) < max_size:
                held.append(pool.acquire(timeout=0))
            else:
                with pytest.raises(core.PoolExhausted):
                    pool.acquire(timeout=0)
        elif held:
            conn = held.pop(index % len(held))
            conn.broken = op == "release_broken"
            pool.release(conn)
            assert conn.closed == conn.broken
        stats = pool.stats()
        assert stats["size"] <= max_size
        assert stats["in_use"] == len(held)
        assert stats["idle"] + stats["in_use"] == stats["size"]
        assert stats["high_water"] <= max_size
        assert not any(conn.closed for conn in held)


def test_pool_bound_holds_when_threads_contend() -> None:
    max_size = 3
    guard = threading.Lock()
    in_use = [0]
    peak = [0]
    errors: list[BaseException] = []
    pool = core.Pool(object, max_size, name="contended")

    def worker() -> None:
        try:
            for _ in range(300):
                with pool.item(timeout=10) as obj:
                    with guard:
                        in_use[0] += 1
                        peak[0] = max(peak[0], in_use[0])
                    assert obj is not None
                    with guard:
                        in_use[0] -= 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = pool.stats()
    assert peak[0] <= max_size
    assert stats["created"] <= max_size and stats["high_water"] <= max_size
    assert stats["acquired"] == 8 * 300 and stats["in_use"] == 0


def test_pool_acquire_waits_for_a_release_from_another_thread() -> None:
    pool = core.Pool(object, 1)
    held = pool.acquire()
    releaser = threading.Timer(0.05, pool.release, args=(held,))
    releaser.start()
    started = time.monotonic()
    assert pool.acquire(timeout=5) is held
    assert time.monotonic() - started >= 0.04
    releaser.join()


def test_pool_acquire_times_out_naming_the_wait() -> None:
    pool = core.Pool(object, 2, name="sqlite-readers")
    pool.acquire()
    pool.acquire()
    started = time.monotonic()
    with pytest.raises(
        core.PoolExhausted, match=r"'sqlite-readers'.*all 2 objects in use for 0\.2 s"
    ):
        pool.acquire(timeout=0.2)
    assert time.monotonic() - started >= 0.19


def test_pool_close_all_wakes_waiting_threads() -> None:
    pool = core.Pool(object, 1)
    pool.acquire()
    outcome: list[BaseException] = []

    def waiter() -> None:
        try:
            pool.acquire(timeout=10)
        except core.FrysError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.05)
    pool.close_all()
    thread.join(5)
    assert len(outcome) == 1 and "closed" in str(outcome[0])


# --- topics ------------------------------------------------------------------------------------


def reference_match(pattern: str, topic: str) -> bool:
    """MQTT matching written independently, as a regular expression."""
    levels = pattern.split("/")
    multi = levels[-1] == "#"
    if multi:
        levels = levels[:-1]
        if not levels:
            return True
    regex = "/".join("[^/]*" if level == "+" else re.escape(level) for level in levels)
    if multi:
        regex += "(/.*)?"
    return re.fullmatch(regex, topic) is not None


topics = st.lists(st.sampled_from(["a", "b", "ab", ""]), min_size=1, max_size=5).map("/".join)
patterns = st.builds(
    lambda levels, multi: "/".join([*levels, "#"] if multi else levels),
    st.lists(st.sampled_from(["a", "b", "", "+"]), max_size=5),
    st.booleans(),
)


@given(pattern=patterns.filter(bool), topic=topics.filter(bool))
def test_wildcard_matching_agrees_with_a_regex_reference(pattern: str, topic: str) -> None:
    core.validate_pattern(pattern)
    core.validate_topic(topic)
    assert core.topic_matches(pattern, topic) == reference_match(pattern, topic)


@given(pattern=patterns.filter(bool), topic=topics.filter(bool))
def test_bus_delivers_exactly_to_matching_patterns(pattern: str, topic: str) -> None:
    bus = core.EventBus()
    sub = bus.subscribe(pattern)
    assert bus.publish(topic, None) == int(reference_match(pattern, topic))
    assert sub.pending() == int(reference_match(pattern, topic))


# --- cache -------------------------------------------------------------------------------------


class CacheModel:
    """LRU + TTL semantics written the obvious way, to compare against core.Cache."""

    def __init__(self, max_entries: int, clock: FakeClock) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self.data: OrderedDict[int, tuple[int, float | None]] = OrderedDict()
        self.hits = self.misses = self.evictions = self.expirations = 0

    def expired(self, key: int) -> bool:
        expires = self.data[key][1]
        return expires is not None and expires <= self.clock()

    def get(self, key: int) -> int | None:
        if key in self.data and self.expired(key):
            del self.data[key]
            self.expirations += 1
        if key not in self.data:
            self.misses += 1
            return None
        self.data.move_to_end(key)
        self.hits += 1
        return self.data[key][0]

    def set(self, key: int, value: int, ttl: float | None) -> None:
        self.data.pop(key, None)
        self.data[key] = (value, None if ttl is None else self.clock() + ttl)
        if len(self.data) > self.max_entries:
            self.data.popitem(last=False)
            self.evictions += 1

    def length(self) -> int:
        for key in [key for key in self.data if self.expired(key)]:
            del self.data[key]
            self.expirations += 1
        return len(self.data)


cache_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("set"), st.integers(0, 6), st.integers(), st.sampled_from([None, 1.0, 2.5])
        ),
        st.tuples(st.just("get"), st.integers(0, 6)),
        st.tuples(st.just("delete"), st.integers(0, 6)),
        st.tuples(st.just("tick"), st.sampled_from([0.5, 1.0, 2.0])),
        st.tuples(st.just("len")),
    ),
    max_size=80,
)


@given(max_entries=st.integers(1, 5), ops=cache_ops)
def test_cache_lru_order_and_ttl_match_a_model(max_entries: int, ops: list[tuple]) -> None:
    clock = FakeClock()
    cache = core.Cache(max_entries=max_entries, clock=clock)
    model = CacheModel(max_entries, clock)
    for op in ops:
        if op[0] == "set":
            cache.set(op[1], op[2], ttl=op[3])
            model.set(op[1], op[2], op[3])
        elif op[0] == "get":
            assert cache.get(op[1]) == model.get(op[1])
        elif op[0] == "delete":
            assert cache.delete(op[1]) == (model.data.pop(op[1], None) is not None)
        elif op[0] == "tick":
            clock.now += op[1]
        else:
            assert len(cache) == model.length()
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (
        model.hits,
        model.misses,
        model.evictions,
    )
    assert stats["expirations"] == model.expirations
    assert len(cache) == model.length()


def test_get_or_load_is_single_flight_across_threads() -> None:
    cache = core.Cache()
    calls: list[int] = []
    barrier = threading.Barrier(8)
    results: list[object] = []

    def loader() -> object:
        calls.append(1)
        time.sleep(0.05)
        return object()

    def worker() -> None:
        barrier.wait()
        results.append(cache.get_or_load("key", loader))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(results) == 8 and all(result is results[0] for result in results)


def test_get_or_load_shares_the_loader_exception_across_threads() -> None:
    cache = core.Cache()
    barrier = threading.Barrier(4)
    failure = OSError("database is locked")
    seen: list[BaseException] = []
    calls: list[int] = []

    def loader() -> object:
        calls.append(1)
        time.sleep(0.05)
        raise failure

    def worker() -> None:
        barrier.wait()
        try:
            cache.get_or_load("key", loader)
        except OSError as exc:
            seen.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(seen) == 4 and all(exc is failure for exc in seen)
    assert "key" not in cache


def test_get_or_load_of_different_keys_runs_loaders_concurrently() -> None:
    cache = core.Cache()
    a_started = threading.Event()

    def load_a() -> str:
        a_started.set()
        time.sleep(0.1)
        return "a"

    def load_b() -> str:
        assert a_started.wait(5)
        return "b"

    thread = threading.Thread(target=cache.get_or_load, args=("a", load_a))
    thread.start()
    started = time.monotonic()
    assert cache.get_or_load("b", load_b) == "b"
    assert time.monotonic() - started < 0.09  # did not wait for key "a"
    thread.join()
    assert cache.get("a") == "a"


def test_get_or_load_async_is_single_flight_with_anyio_events() -> None:
    cache = core.Cache()
    calls: list[int] = []
    results: list[str] = []

    async def loader() -> str:
        calls.append(1)
        await anyio.sleep(0.02)
        return "value"

    async def reader() -> None:
        results.append(await cache.get_or_load_async("key", loader, anyio.Event))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(reader)

    anyio.run(main)
    assert calls == [1]
    assert results == ["value"] * 10


def test_get_or_load_async_waiter_loads_itself_when_the_anyio_leader_is_cancelled() -> None:
    cache = core.Cache()
    calls: list[int] = []
    results: list[str] = []

    async def loader() -> str:
        calls.append(1)
        await anyio.sleep(0.05)
        return "value"

    async def main() -> None:
        leader_scope = anyio.CancelScope()

        async def leader() -> None:
            with leader_scope:
                await cache.get_or_load_async("key", loader, anyio.Event)

        async def waiter() -> None:
            results.append(await cache.get_or_load_async("key", loader, anyio.Event))

        async with anyio.create_task_group() as tg:
            tg.start_soon(leader)
            await anyio.sleep(0.01)
            tg.start_soon(waiter)
            await anyio.sleep(0.01)
            leader_scope.cancel()

    anyio.run(main)
    assert calls == [1, 1]
    assert results == ["value"]


# --- retry -------------------------------------------------------------------------------------


def backoff_cap(initial: float, max_delay: float, multiplier: float, attempt: int) -> float:
    if initial == 0:
        return 0.0
    try:
        return min(max_delay, initial * multiplier ** (attempt - 1))
    except OverflowError:
        return max_delay


@given(
    initial=st.floats(0, 100),
    max_delay=st.floats(0, 1000),
    multiplier=st.floats(1, 10),
    attempt=st.integers(1, 5000),
    rand=st.floats(0, 1, exclude_max=True),
)
def test_retry_delays_stay_within_the_capped_backoff(
    initial: float, max_delay: float, multiplier: float, attempt: int, rand: float
) -> None:
    cap = backoff_cap(initial, max_delay, multiplier, attempt)
    jittered = core.RetryPolicy(initial_delay=initial, max_delay=max_delay, multiplier=multiplier)
    assert 0.0 <= jittered.delay(attempt, rand=lambda: rand) <= cap
    assert 0.0 <= jittered.delay(attempt) <= cap
    plain = core.RetryPolicy(
        initial_delay=initial, max_delay=max_delay, multiplier=multiplier, jitter=False
    )
    assert plain.delay(attempt) == cap


# --- scheduler: the external driver sees the same order as run() -------------------------------

LIMITS = {"a": 1, "b": 2}
task_specs = st.lists(
    st.tuples(
        st.integers(0, 3),  # priority
        st.sampled_from(["default", "a", "b"]),  # group
        st.sampled_from([0.0, 1.0, 2.0]),  # delay
        st.sampled_from([0.0, 1.0, 1.5, 3.0]),  # how long the task takes
    ),
    min_size=1,
    max_size=12,
)


def starts_under_core_loop(specs: list[tuple[int, str, float, float]]) -> list[tuple[int, float]]:
    clock = FakeClock()
    sched = core.Scheduler(groups=LIMITS, clock=clock)
    starts = []

    async def job(index: int, duration: float) -> None:
        starts.append((index, clock.now))
        await core.sleep(duration)

    for index, (priority, group, delay, duration) in enumerate(specs):
        sched.submit(job, index, duration, priority=priority, group=group, delay=delay)
    assert sched.run(sleep=clock.sleep)
    return starts


def starts_under_external_driver(
    specs: list[tuple[int, str, float, float]],
) -> list[tuple[int, float]]:
    """Drive the scheduler the way the anyio runtime does: pop_ready, finish, next_deadline."""
    clock = FakeClock()
    sched = core.Scheduler(groups=LIMITS, clock=clock)
    for index, (priority, group, delay, duration) in enumerate(specs):
        sched.submit(print, index, duration, priority=priority, group=group, delay=delay)
    starts = []
    completions: list[tuple[float, int, core.Task]] = []
    while any(sched.stats()[state] for state in ("pending", "waiting", "running")):
        for task in sched.pop_ready(clock.now):
            index, duration = task.args
            starts.append((index, clock.now))
            heapq.heappush(completions, (clock.now + duration, len(starts), task))
        if completions and completions[0][0] <= clock.now:
            while completions and completions[0][0] <= clock.now:
                sched.finish(heapq.heappop(completions)[2])
            continue
        wake = [completions[0][0]] if completions else []
        deadline = sched.next_deadline()
        if deadline is not None:
            wake.append(deadline)
        clock.now = min(wake)
    return starts


@settings(max_examples=200)
@given(specs=task_specs)
def test_external_driver_starts_tasks_in_the_same_order_as_run(
    specs: list[tuple[int, str, float, float]],
) -> None:
    assert starts_under_external_driver(specs) == starts_under_core_loop(specs)


@given(specs=task_specs)
def test_group_limits_hold_under_the_external_driver(
    specs: list[tuple[int, str, float, float]],
) -> None:
    clock = FakeClock()
    sched = core.Scheduler(groups=LIMITS, clock=clock)
    for index, (priority, group, delay, _) in enumerate(specs):
        sched.submit(print, index, priority=priority, group=group, delay=delay)
    running: list[core.Task] = []
    while any(sched.stats()[state] for state in ("pending", "waiting", "running")):
        running.extend(sched.pop_ready(clock.now))
        for group, limit in LIMITS.items():
            assert sum(task.group == group for task in running) <= limit
        if running:
            sched.finish(running.pop(0))
        else:
            deadline = sched.next_deadline()
            assert deadline is not None
            clock.now = deadline


def test_run_sleeps_on_the_real_clock_until_timers_are_due() -> None:
    sched = core.Scheduler()
    fired: list[float] = []
    started = core.monotonic()

    async def job() -> None:
        await core.sleep(0.03)
        fired.append(core.monotonic() - started)

    sched.submit(job)
    sched.submit(lambda: fired.append(core.monotonic() - started), delay=0.01)
    assert sched.run(timeout=5)
    assert len(fired) == 2 and 0.01 <= fired[0] <= fired[1] and fired[1] >= 0.03
