"""Behaviour checks for frys_edge.core that run unchanged on CPython (pytest) and MicroPython.

Every function named check_* is one check; it passes by returning and fails by raising.
Keep to the MicroPython subset: no pytest, no typing, no dataclasses, no threads.
"""

try:
    from frys_edge import core
except ImportError:  # MicroPython: core.py sits next to this file as a top-level module
    import core


class FakeClock:
    """A clock that moves only when told to; its sleep() advances it."""

    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def raises(exc_type, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc_type as exc:
        return exc
    raise AssertionError("expected " + exc_type.__name__)


def make_scheduler(**kwargs):
    clock = FakeClock()
    return core.Scheduler(clock=clock, **kwargs), clock


# --- monotonic ---------------------------------------------------------------------------------


def check_monotonic_never_goes_backwards():
    last = core.monotonic()
    for _ in range(100):
        now = core.monotonic()
        assert now >= last
        last = now


# --- scheduler ---------------------------------------------------------------------------------


def check_scheduler_runs_lower_priority_numbers_first():
    sched, clock = make_scheduler()
    order = []
    for priority in (5, -1, 3, 0):
        sched.submit(order.append, priority, priority=priority)
    assert sched.run(sleep=clock.sleep)
    assert order == [-1, 0, 3, 5]


def check_scheduler_is_fifo_within_a_priority():
    sched, clock = make_scheduler()
    order = []
    for i in range(10):
        sched.submit(order.append, i, priority=i % 2)
    sched.run(sleep=clock.sleep)
    assert order == [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]


def check_pop_ready_returns_tasks_in_priority_order_and_marks_them_running():
    sched, _ = make_scheduler()
    low = sched.submit(print, priority=9, name="low")
    high = sched.submit(print, priority=1, name="high")
    started = sched.pop_ready()
    assert started == [high, low]
    assert high.state == "running" and low.state == "running"
    assert sched.pop_ready() == []


def check_timers_fire_in_deadline_order_and_not_before():
    sched, clock = make_scheduler()
    fired = []

    def record(label):
        fired.append((label, clock.now))

    sched.submit(record, "late", delay=3.0)
    sched.submit(record, "early", delay=1.0)
    sched.submit(record, "middle", delay=2.0)
    assert sched.stats()["waiting"] == 3
    assert sched.next_deadline() == 1.0
    assert sched.pop_ready(0.999) == []
    sched.run(sleep=clock.sleep)
    assert fired == [("early", 1.0), ("middle", 2.0), ("late", 3.0)]


def check_delayed_task_keeps_its_priority_once_due():
    sched, _ = make_scheduler()
    sched.submit(print, delay=1.0, priority=0, name="timer")
    sched.submit(print, priority=5, name="plain")
    names = [task.name for task in sched.pop_ready(1.0)]
    assert names == ["timer", "plain"]


def check_group_limits_are_never_exceeded_while_coroutines_sleep():
    sched, clock = make_scheduler(groups={"io": 2})
    running = [0]
    peak = [0]
    order = []

    async def job(n):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        order.append(n)
        await core.sleep(1.0)
        running[0] -= 1

    for i in range(6):
        sched.submit(job, i, group="io")
    assert sched.run(sleep=clock.sleep)
    assert peak[0] == 2
    assert order == [0, 1, 2, 3, 4, 5]
    assert clock.now == 3.0


def check_group_limit_does_not_block_other_groups():
    sched, _ = make_scheduler(groups={"io": 1})
    sched.submit(print, group="io", name="io-1")
    sched.submit(print, group="io", name="io-2")
    sched.submit(print, group="cpu", name="cpu")
    started = [task.name for task in sched.pop_ready()]
    assert started == ["io-1", "cpu"]
    assert sched.stats()["running_by_group"] == {"io": 1, "cpu": 1}


def check_finishing_a_task_frees_its_group_slot():
    sched, _ = make_scheduler(groups={"io": 1})
    first = sched.submit(print, group="io")
    second = sched.submit(print, group="io")
    assert sched.pop_ready() == [first]
    assert sched.pop_ready() == []
    sched.finish(first, result="ok")
    assert first.state == "done" and first.result == "ok"
    assert sched.pop_ready() == [second]


def check_raising_a_group_limit_lets_parked_tasks_start():
    sched, _ = make_scheduler(groups={"io": 1})
    tasks = [sched.submit(print, group="io") for _ in range(3)]
    assert sched.pop_ready() == tasks[:1]
    sched.set_group_limit("io", 3)
    assert sched.pop_ready() == tasks[1:]


def check_coroutine_result_and_sleep_duration():
    sched, clock = make_scheduler()

    async def job():
        await core.sleep(2.5)
        return "slept"

    task = sched.submit(job)
    sched.run(sleep=clock.sleep)
    assert task.state == "done"
    assert task.result == "slept"
    assert clock.now == 2.5


def check_failing_task_is_recorded_as_failed():
    sched, clock = make_scheduler()

    def boom():
        raise ValueError("bad input")

    async def async_boom():
        await core.sleep(0)
        raise KeyError("missing")

    sync_task = sched.submit(boom)
    async_task = sched.submit(async_boom)
    sched.run(sleep=clock.sleep)
    assert sync_task.state == "failed" and isinstance(sync_task.error, ValueError)
    assert async_task.state == "failed" and isinstance(async_task.error, KeyError)
    assert sched.stats()["failed"] == 2


def check_cancelling_a_pending_task_skips_it_and_calls_callbacks():
    sched, clock = make_scheduler()
    ran = []
    seen = []
    now_task = sched.submit(ran.append, "now")
    timer_task = sched.submit(ran.append, "later", delay=5.0)
    now_task.add_done_callback(seen.append)
    assert now_task.cancel()
    assert sched.cancel(timer_task)
    assert seen == [now_task]
    assert now_task.state == "cancelled" and isinstance(now_task.error, core.Cancelled)
    assert sched.next_deadline() is None
    assert sched.run(sleep=clock.sleep)
    assert ran == []
    assert sched.stats()["cancelled"] == 2
    assert not now_task.cancel()


def check_cancelling_a_running_coroutine_throws_cancelled_into_it():
    sched, clock = make_scheduler()
    seen = []

    async def sleeper():
        try:
            await core.sleep(100.0)
        except core.Cancelled:
            seen.append("cancelled")
            raise
        seen.append("finished")

    async def canceller(target):
        await core.sleep(1.0)
        target.cancel()

    victim = sched.submit(sleeper)
    sched.submit(canceller, victim)
    sched.run(sleep=clock.sleep)
    assert seen == ["cancelled"]
    assert victim.state == "cancelled"
    assert clock.now == 1.0


def check_cancelling_a_task_waiting_on_an_event_frees_its_group_slot():
    sched, clock = make_scheduler(groups={"io": 1})
    never = core.Event()
    ran = []

    async def waiter():
        await never.wait()

    blocked = sched.submit(waiter, group="io")
    sched.submit(ran.append, "next", group="io")
    sched.submit(blocked.cancel, delay=1.0)
    sched.run(sleep=clock.sleep)
    assert blocked.state == "cancelled"
    assert ran == ["next"]


def check_external_cancel_of_a_running_task_sets_cancel_requested_and_wakes():
    wakes = []
    sched = core.Scheduler(on_wake=lambda: wakes.append(1))
    task = sched.submit(print)
    sched.pop_ready()
    wakes.clear()
    assert task.cancel()
    assert task.cancel_requested and wakes == [1]
    sched.finish(task, error=core.Cancelled("stopped by driver"))
    assert task.state == "cancelled"


def check_event_wakes_every_waiting_task():
    sched, clock = make_scheduler()
    event = core.Event()
    woke = []

    async def waiter(n):
        await event.wait()
        woke.append(n)

    async def setter():
        await core.sleep(2.0)
        event.set()

    for i in range(3):
        sched.submit(waiter, i)
    sched.submit(setter)
    sched.run(sleep=clock.sleep)
    assert woke == [0, 1, 2]
    assert event.is_set()


def check_submit_raises_queuefull_beyond_max_pending():
    sched, _ = make_scheduler(max_pending=3)
    for _ in range(3):
        sched.submit(print)
    err = raises(core.QueueFull, sched.submit, print)
    assert "max_pending=3" in str(err)
    sched.pop_ready()
    sched.submit(print)


def check_run_with_timeout_returns_false_and_leaves_tasks():
    sched, clock = make_scheduler()
    task = sched.submit(print, delay=10.0)
    assert sched.run(timeout=1.0, sleep=clock.sleep) is False
    assert task.state == "waiting"
    assert clock.now == 1.0


def check_run_timeout_also_stops_tasks_that_never_finish():
    sched, clock = make_scheduler()

    async def forever():
        while True:
            await core.sleep(0.25)

    task = sched.submit(forever)
    assert sched.run(timeout=1.0, sleep=clock.sleep) is False
    assert task.state == "running" and clock.now == 1.0


def check_run_reports_tasks_stuck_on_an_event_nobody_sets():
    sched, clock = make_scheduler()
    never = core.Event()

    async def waiter():
        await never.wait()

    sched.submit(waiter)
    err = raises(core.FrysError, sched.run, sleep=clock.sleep)
    assert "stuck" in str(err)


def check_awaiting_something_foreign_fails_the_task_with_a_clear_error():
    sched, clock = make_scheduler()

    class Foreign:
        def __iter__(self):
            yield "not a core awaitable"

        __await__ = __iter__

    async def job():
        await Foreign()

    task = sched.submit(job)
    sched.run(sleep=clock.sleep)
    assert task.state == "failed"
    assert "core.sleep()" in str(task.error)


def check_finish_rejects_a_task_that_is_not_running():
    sched, _ = make_scheduler()
    task = sched.submit(print)
    raises(core.FrysError, sched.finish, task)


def check_on_wake_is_called_when_work_may_be_ready():
    wakes = []
    sched = core.Scheduler(groups={"io": 1}, on_wake=lambda: wakes.append(1))
    first = sched.submit(print, group="io")
    sched.submit(print, group="io")
    assert len(wakes) == 2
    sched.pop_ready()
    sched.finish(first)
    assert len(wakes) == 3


def check_done_callback_runs_at_once_on_a_finished_task():
    sched, clock = make_scheduler()
    task = sched.submit(len, "abc")
    sched.run(sleep=clock.sleep)
    seen = []
    task.add_done_callback(seen.append)
    assert seen == [task] and task.result == 3 and task.done()


def check_stats_count_tasks_by_state():
    sched, _ = make_scheduler()
    sched.submit(print)
    sched.submit(print, delay=1.0)
    running = sched.submit(print)
    stats = sched.stats()
    assert (stats["pending"], stats["waiting"], stats["running"]) == (2, 1, 0)
    started = sched.pop_ready()
    assert running in started
    sched.finish(started[0])
    sched.finish(started[1], error=ValueError("x"))
    stats = sched.stats()
    assert (stats["pending"], stats["running"], stats["done"], stats["failed"]) == (0, 0, 1, 1)


def check_submit_then_cancel_loops_do_not_grow_memory():
    sched, _ = make_scheduler()
    for _ in range(1000):
        sched.submit(print, delay=3600.0).cancel()
        sched.submit(print).cancel()
    assert len(sched._timers) + len(sched._ready) < 200


# --- pool --------------------------------------------------------------------------------------


class Resource:
    def __init__(self, n):
        self.n = n
        self.closed = False
        self.resets = 0


def make_pool(max_size=2, **kwargs):
    made = []

    def factory():
        made.append(Resource(len(made)))
        return made[-1]

    return core.Pool(factory, max_size, name="test-pool", **kwargs), made


def check_pool_never_creates_more_than_max_size():
    pool, made = make_pool(max_size=3)
    held = [pool.acquire(timeout=0) for _ in range(3)]
    raises(core.PoolExhausted, pool.acquire, 0)
    for obj in held:
        pool.release(obj)
    again = [pool.acquire(timeout=0) for _ in range(3)]
    assert len(made) == 3
    assert {obj.n for obj in again} == {0, 1, 2}


def check_pool_exhausted_error_names_pool_limit_and_fix():
    pool, _ = make_pool(max_size=1)
    pool.acquire()
    err = raises(core.PoolExhausted, pool.acquire, 0)
    message = str(err)
    assert "'test-pool'" in message and "1 objects" in message and "raise the pool size" in message
    assert pool.stats()["exhausted"] == 1


def check_pool_reset_hook_runs_on_release():
    def reset(obj):
        obj.resets += 1

    pool, _ = make_pool(reset=reset)
    obj = pool.acquire()
    pool.release(obj)
    assert obj.resets == 1
    assert pool.acquire() is obj


def check_pool_drops_and_closes_an_object_whose_reset_fails():
    def reset(obj):
        raise RuntimeError("rollback failed")

    def close(obj):
        obj.closed = True

    pool, made = make_pool(max_size=1, reset=reset, close=close)
    broken = pool.acquire()
    pool.release(broken)
    assert broken.closed
    stats = pool.stats()
    assert stats["size"] == 0 and stats["idle"] == 0 and stats["discarded"] == 1
    fresh = pool.acquire(timeout=0)
    assert fresh is not broken and len(made) == 2


def check_pool_stats_track_use():
    pool, _ = make_pool(max_size=3)
    first = pool.acquire()
    second = pool.acquire()
    pool.release(first)
    stats = pool.stats()
    assert stats["name"] == "test-pool" and stats["max_size"] == 3
    assert (stats["size"], stats["in_use"], stats["idle"]) == (2, 1, 1)
    assert (stats["created"], stats["acquired"], stats["high_water"]) == (2, 2, 2)
    pool.release(second)


def check_pool_item_releases_even_when_the_block_raises():
    pool, _ = make_pool(max_size=1)
    try:
        with pool.item() as obj:
            assert pool.stats()["in_use"] == 1
            raise ValueError("inside")
    except ValueError:
        pass
    assert pool.stats()["in_use"] == 0
    with pool.item(timeout=0) as again:
        assert again is obj


def check_pool_rejects_double_release():
    pool, _ = make_pool()
    obj = pool.acquire()
    pool.release(obj)
    raises(core.FrysError, pool.release, obj)
    raises(core.FrysError, pool.release, Resource(99))


def check_pool_factory_failure_frees_the_slot():
    calls = []

    def factory():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("cannot connect")
        return Resource(len(calls))

    pool = core.Pool(factory, 1)
    raises(OSError, pool.acquire)
    assert pool.acquire(timeout=0).n == 2


def check_pool_close_all_closes_idle_now_and_lent_on_release():
    def close(obj):
        obj.closed = True

    pool, _ = make_pool(max_size=2, close=close)
    idle = pool.acquire()
    lent = pool.acquire()
    pool.release(idle)
    pool.close_all()
    assert idle.closed and not lent.closed
    pool.release(lent)
    assert lent.closed
    raises(core.FrysError, pool.acquire)
    assert pool.stats()["size"] == 0


# --- topics ------------------------------------------------------------------------------------

MATCH_TABLE = (
    ("a/b", "a/b", True),
    ("a/b", "a/c", False),
    ("a/+", "a/b", True),
    ("a/+", "a/b/c", False),
    ("a/+", "a", False),
    ("a/+", "a/", True),
    ("+/b", "a/b", True),
    ("+/+", "a/b", True),
    ("+", "a", True),
    ("+", "a/b", False),
    ("a/#", "a", True),
    ("a/#", "a/b", True),
    ("a/#", "a/b/c", True),
    ("a/#", "ab", False),
    ("a/#", "b/a", False),
    ("#", "a", True),
    ("#", "a/b/c", True),
    ("+/#", "a", True),
    ("+/#", "a/b/c", True),
    ("a/+/c/#", "a/x/c", True),
    ("a/+/c/#", "a/x/d/e", False),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    ("a/b", "a/b/", False),
    ("/a", "/a", True),
    ("+/a", "/a", True),
)


def check_topic_matching_table():
    for pattern, topic, expected in MATCH_TABLE:
        core.validate_pattern(pattern)
        core.validate_topic(topic)
        assert core.topic_matches(pattern, topic) == expected, (pattern, topic)


def check_validate_topic_rejects_wildcards_and_empty():
    for bad in ("", "a/+", "a/#", "a+b", 5):
        raises(core.FrysError, core.validate_topic, bad)
    err = raises(core.FrysError, core.validate_topic, "sensors/+")
    assert "wildcard" in str(err)


def check_validate_pattern_requires_whole_level_wildcards_and_final_hash():
    for good in ("a", "#", "+", "a/+/b", "a/#", "+/+/#"):
        core.validate_pattern(good)
    for bad in ("", "a/#/b", "#/a", "a/b#", "a+/b", "a/+b", "##"):
        raises(core.FrysError, core.validate_pattern, bad)
    err = raises(core.FrysError, core.validate_pattern, "a/#/b")
    assert "last level" in str(err)


# --- event bus ---------------------------------------------------------------------------------


def drain_all(sub):
    messages = []
    while True:
        message = sub.get_nowait()
        if message is None:
            return messages
        messages.append(message)


def check_get_nowait_returns_none_when_empty():
    bus = core.EventBus()
    sub = bus.subscribe("a/#")
    assert sub.get_nowait() is None
    assert bus.publish("a/b", 1) == 1
    assert sub.pending() == 1
    message = sub.get_nowait()
    assert (message.topic, message.payload) == ("a/b", 1)
    assert sub.get_nowait() is None


def check_publish_reaches_only_matching_subscriptions():
    bus = core.EventBus()
    temps = bus.subscribe("sensors/+/temp")
    everything = bus.subscribe("#")
    exact = bus.subscribe("sensors/kitchen/humidity")
    assert bus.publish("sensors/kitchen/temp", 21.5) == 2
    assert bus.publish("sensors/kitchen/humidity", 40) == 2
    assert [m.payload for m in drain_all(temps)] == [21.5]
    assert [m.payload for m in drain_all(everything)] == [21.5, 40]
    assert [m.payload for m in drain_all(exact)] == [40]


def check_message_seq_increases_across_the_bus():
    bus = core.EventBus()
    sub = bus.subscribe("#")
    for topic in ("a", "b", "a/c"):
        bus.publish(topic, None)
    seqs = [m.seq for m in drain_all(sub)]
    assert seqs == [1, 2, 3]


def check_drop_oldest_policy_keeps_the_newest_messages():
    bus = core.EventBus()
    sub = bus.subscribe("t", maxsize=3, policy="drop_oldest")
    for i in range(5):
        assert bus.publish("t", i) == 1
    assert [m.payload for m in drain_all(sub)] == [2, 3, 4]
    assert sub.dropped == 2 and sub.delivered == 3
    assert bus.stats()["dropped"] == 2


def check_drop_new_policy_keeps_the_oldest_messages():
    bus = core.EventBus()
    sub = bus.subscribe("t", maxsize=3, policy="drop_new")
    queued = [bus.publish("t", i) for i in range(5)]
    assert queued == [1, 1, 1, 0, 0]
    assert [m.payload for m in drain_all(sub)] == [0, 1, 2]
    assert sub.dropped == 2


def check_block_policy_raises_busfull_without_partial_delivery():
    bus = core.EventBus()
    loose = bus.subscribe("t", maxsize=10)
    strict = bus.subscribe("t", maxsize=2, policy="block", name="strict-consumer")
    bus.publish("t", 1)
    bus.publish("t", 2)
    err = raises(core.BusFull, bus.publish, "t", 3)
    assert "strict-consumer" in str(err)
    assert loose.pending() == 2 and strict.pending() == 2
    assert bus.stats()["published"] == 2
    strict.get_nowait()
    assert bus.publish("t", 3) == 2
    assert [m.payload for m in drain_all(loose)] == [1, 2, 3]


def check_block_policy_calls_on_space_when_a_full_queue_frees():
    freed = []
    bus = core.EventBus(on_space=freed.append)
    sub = bus.subscribe("t", maxsize=2, policy="block")
    bus.publish("t", 1)
    sub.get_nowait()
    assert freed == []
    bus.publish("t", 2)
    bus.publish("t", 3)
    sub.get_nowait()
    assert freed == [sub]


def check_filter_skips_messages_it_rejects():
    bus = core.EventBus()
    hot = bus.subscribe("temp", filter=lambda m: m.payload > 30)
    assert bus.publish("temp", 20) == 0
    assert bus.publish("temp", 35) == 1
    assert [m.payload for m in drain_all(hot)] == [35]


def check_a_failing_filter_is_counted_and_skipped():
    bus = core.EventBus()
    sub = bus.subscribe("t", filter=lambda m: m.payload["missing"])
    assert bus.publish("t", {}) == 0
    assert sub.errors == 1 and isinstance(sub.last_error, KeyError)


def check_handler_subscriptions_are_drained_through_the_scheduler_run_loop():
    sched, clock = make_scheduler()
    bus = core.EventBus(scheduler=sched)
    sync_seen = []
    async_seen = []

    async def slow_handler(message):
        await core.sleep(1.0)
        async_seen.append((message.payload, clock.now))

    bus.subscribe("t", handler=lambda m: sync_seen.append(m.payload))
    bus.subscribe("t", handler=slow_handler)
    for i in range(3):
        bus.publish("t", i)
    assert sched.stats()["pending"] == 2  # one drain per subscription, not per message
    sched.run(sleep=clock.sleep)
    assert sync_seen == [0, 1, 2]
    assert async_seen == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert bus.stats()["delivered"] == 6
    bus.publish("t", 3)
    sched.run(sleep=clock.sleep)
    assert sync_seen == [0, 1, 2, 3]


def check_drain_runs_in_the_bus_group():
    sched, _ = make_scheduler()
    bus = core.EventBus(scheduler=sched)
    bus.subscribe("t", handler=lambda m: None)
    bus.publish("t", 1)
    (task,) = sched.pop_ready()
    assert task.group == "bus"


def check_handler_errors_are_counted_and_do_not_stop_delivery():
    sched, clock = make_scheduler()
    bus = core.EventBus(scheduler=sched)
    seen = []

    def fragile(message):
        if message.payload == 1:
            raise ValueError("cannot handle 1")
        seen.append(message.payload)

    async def fragile_async(message):
        raise RuntimeError("async failure")

    sub = bus.subscribe("t", handler=fragile)
    async_sub = bus.subscribe("t", handler=fragile_async)
    for i in range(3):
        bus.publish("t", i)
    sched.run(sleep=clock.sleep)
    assert seen == [0, 2]
    assert sub.errors == 1 and isinstance(sub.last_error, ValueError)
    assert async_sub.errors == 3
    assert bus.stats()["errors"] == 4
    assert sched.stats()["failed"] == 0


def check_subscribing_a_handler_without_a_scheduler_raises():
    bus = core.EventBus()
    err = raises(core.FrysError, bus.subscribe, "t", handler=print)
    assert "scheduler" in str(err)


def check_subscribe_rejects_bad_policy_size_and_pattern():
    bus = core.EventBus()
    raises(core.FrysError, bus.subscribe, "t", policy="drop_everything")
    raises(core.FrysError, bus.subscribe, "t", maxsize=0)
    raises(core.FrysError, bus.subscribe, "a/#/b")
    raises(core.FrysError, bus.publish, "a/+", 1)


def check_unsubscribe_stops_delivery():
    bus = core.EventBus()
    sub = bus.subscribe("t")
    bus.publish("t", 1)
    bus.unsubscribe(sub)
    assert bus.publish("t", 2) == 0
    assert sub.pending() == 0
    assert bus.stats()["subscriptions"] == 0
    bus.unsubscribe(sub)


# --- cache -------------------------------------------------------------------------------------


def check_cache_evicts_the_least_recently_used_entry():
    cache = core.Cache(max_entries=3)
    for key in "abc":
        cache.set(key, key.upper())
    assert cache.get("a") == "A"  # a is now the most recently used
    cache.set("d", "D")
    assert "b" not in cache
    assert [key for key in "abcd" if key in cache] == ["a", "c", "d"]
    assert cache.stats()["evictions"] == 1


def check_cache_set_on_existing_key_refreshes_recency():
    cache = core.Cache(max_entries=2)
    cache.set("a", 1)
    cache.set("b", 2)
    cache.set("a", 3)
    cache.set("c", 4)
    assert cache.get("a") == 3 and cache.get("b") is None and len(cache) == 2


def check_cache_ttl_expires_entries_with_a_fake_clock():
    clock = FakeClock()
    cache = core.Cache(ttl=10.0, clock=clock)
    cache.set("default", 1)
    cache.set("short", 2, ttl=1.0)
    clock.now = 0.999
    assert cache.get("short") == 2
    clock.now = 1.0
    assert cache.get("short") is None
    assert cache.get("default") == 1
    clock.now = 10.0
    assert cache.get("default", "gone") == "gone"
    assert cache.stats()["expirations"] == 2


def check_cache_len_and_contains_respect_expiry():
    clock = FakeClock()
    cache = core.Cache(clock=clock)
    cache.set("forever", 1)
    cache.set("brief", 2, ttl=5.0)
    assert len(cache) == 2 and "brief" in cache
    clock.now = 5.0
    assert "brief" not in cache
    cache.set("brief2", 3, ttl=1.0)
    clock.now = 7.0
    assert len(cache) == 1 and "forever" in cache


def check_cache_counters_and_hit_rate():
    cache = core.Cache()
    assert cache.stats()["hit_rate"] == 0.0
    cache.set("k", "v")
    cache.get("k")
    cache.get("k")
    cache.get("k")
    cache.get("nope")
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (3, 1, 1)
    assert stats["hit_rate"] == 0.75


def check_cache_delete_and_clear():
    cache = core.Cache()
    cache.set("a", 1)
    cache.set("b", None)
    assert cache.delete("a") and not cache.delete("a")
    assert "b" in cache and cache.get("b", "default") is None
    cache.clear()
    assert len(cache) == 0


def check_cache_resize_evicts_the_least_recently_used_beyond_the_new_bound():
    cache = core.Cache(max_entries=4)
    for key in "abcd":
        cache.set(key, key)
    cache.get("a")
    cache.resize(2)
    assert "a" in cache and "d" in cache
    assert "b" not in cache and "c" not in cache
    assert cache.stats()["evictions"] == 2
    raises(core.FrysError, cache.resize, 0)


def check_cache_rejects_bad_limits():
    raises(core.FrysError, core.Cache, max_entries=0)
    raises(core.FrysError, core.Cache, ttl=0)
    raises(core.FrysError, core.Cache().set, "k", 1, -1.0)


def check_get_or_load_calls_the_loader_once_and_caches():
    cache = core.Cache()
    calls = []

    def loader():
        calls.append(1)
        return "loaded"

    assert cache.get_or_load("k", loader) == "loaded"
    assert cache.get_or_load("k", loader) == "loaded"
    assert len(calls) == 1
    raises(ZeroDivisionError, cache.get_or_load, "bad", lambda: 1 / 0)
    assert "bad" not in cache


def check_get_or_load_async_is_single_flight_under_the_core_loop():
    sched, clock = make_scheduler()
    cache = core.Cache()
    calls = []

    async def loader():
        calls.append(clock.now)
        await core.sleep(1.0)
        return "value"

    async def reader():
        return await cache.get_or_load_async("key", loader)

    tasks = [sched.submit(reader) for _ in range(5)]
    sched.run(sleep=clock.sleep)
    assert calls == [0.0]
    assert [task.result for task in tasks] == ["value"] * 5
    assert clock.now == 1.0
    late = sched.submit(reader)
    sched.run(sleep=clock.sleep)
    assert late.result == "value" and calls == [0.0]


def check_get_or_load_async_shares_the_loader_error_with_waiters():
    sched, clock = make_scheduler()
    cache = core.Cache()
    calls = []

    async def loader():
        calls.append(1)
        await core.sleep(1.0)
        raise OSError("backend down")

    async def reader():
        return await cache.get_or_load_async("key", loader)

    tasks = [sched.submit(reader) for _ in range(3)]
    sched.run(sleep=clock.sleep)
    assert len(calls) == 1
    assert [task.state for task in tasks] == ["failed"] * 3
    assert tasks[0].error is tasks[2].error
    assert "key" not in cache


def check_get_or_load_async_waiters_load_again_when_the_loading_task_is_cancelled():
    sched, clock = make_scheduler()
    cache = core.Cache()
    calls = []

    async def loader():
        calls.append(clock.now)
        await core.sleep(1.0)
        return "value"

    async def reader():
        return await cache.get_or_load_async("key", loader)

    first = sched.submit(reader)
    waiters = [sched.submit(reader) for _ in range(2)]
    sched.submit(first.cancel, delay=0.5)
    sched.run(sleep=clock.sleep)
    assert first.state == "cancelled"
    assert [task.result for task in waiters] == ["value", "value"]
    assert calls == [0.0, 0.5]


# --- retry -------------------------------------------------------------------------------------


def check_retry_delay_without_jitter_grows_then_caps():
    policy = core.RetryPolicy(initial_delay=0.5, max_delay=3.0, multiplier=2.0, jitter=False)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def check_retry_full_jitter_scales_the_cap_by_rand():
    policy = core.RetryPolicy(initial_delay=1.0, max_delay=10.0, multiplier=3.0)
    assert policy.delay(2, rand=lambda: 0.5) == 1.5
    assert policy.delay(3, rand=lambda: 0.0) == 0.0
    for attempt in range(1, 20):
        assert 0.0 <= policy.delay(attempt) <= 10.0


def check_retry_huge_attempt_numbers_are_capped():
    policy = core.RetryPolicy(initial_delay=0.1, max_delay=30.0, jitter=False)
    assert policy.delay(100000) == 30.0
    assert core.RetryPolicy(initial_delay=0.0, jitter=False).delay(100000) == 0.0


def check_retry_should_retry_until_max_attempts():
    policy = core.RetryPolicy(max_attempts=3)
    assert [policy.should_retry(n) for n in (1, 2, 3, 4)] == [True, True, False, False]


def check_retry_rejects_bad_arguments():
    raises(core.FrysError, core.RetryPolicy, max_attempts=0)
    raises(core.FrysError, core.RetryPolicy, initial_delay=-1)
    raises(core.FrysError, core.RetryPolicy, multiplier=0.5)
    raises(core.FrysError, core.RetryPolicy().delay, 0)


# --- circuit breaker ---------------------------------------------------------------------------


def check_breaker_opens_after_threshold_and_half_opens_after_timeout():
    clock = FakeClock()
    breaker = core.CircuitBreaker(failure_threshold=3, reset_timeout=10.0, clock=clock)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state() == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state() == "open" and not breaker.allow()
    clock.now = 9.9
    assert breaker.state() == "open"
    clock.now = 10.0
    assert breaker.state() == "half_open"
    assert breaker.allow()
    assert not breaker.allow()  # only half_open_max=1 trial call
    breaker.record_success()
    assert breaker.state() == "closed" and breaker.consecutive_failures == 0


def check_breaker_success_resets_the_failure_streak():
    breaker = core.CircuitBreaker(failure_threshold=2, clock=FakeClock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state() == "closed"


def check_breaker_failed_trial_reopens_the_circuit():
    clock = FakeClock()
    breaker = core.CircuitBreaker(
        failure_threshold=1, reset_timeout=5.0, half_open_max=2, clock=clock
    )
    breaker.record_failure()
    clock.now = 5.0
    assert breaker.allow() and breaker.allow() and not breaker.allow()
    breaker.record_failure()
    assert breaker.state() == "open"
    clock.now = 9.9
    assert breaker.state() == "open"
    clock.now = 10.0
    assert breaker.state() == "half_open"
    stats = breaker.stats()
    assert stats["times_opened"] == 2 and stats["failures"] == 2 and stats["rejected"] == 1


def check_breaker_check_raises_circuit_open_with_seconds_until_retry():
    clock = FakeClock()
    breaker = core.CircuitBreaker(
        failure_threshold=1, reset_timeout=30.0, name="modbus", clock=clock
    )
    breaker.check()
    breaker.record_failure()
    clock.now = 12.0
    err = raises(core.CircuitOpen, breaker.check)
    assert err.retry_after == 18.0
    assert "'modbus'" in str(err) and "18.0 s" in str(err)
    assert isinstance(err, core.FrysError)


def check_breaker_explicit_now_overrides_the_clock():
    breaker = core.CircuitBreaker(failure_threshold=1, reset_timeout=1.0, clock=FakeClock(100.0))
    breaker.record_failure(now=0.0)
    assert breaker.state(now=0.5) == "open"
    assert breaker.state(now=1.0) == "half_open"


def check_cancel_not_started_cancels_pending_parked_and_waiting_tasks():
    sched = core.Scheduler(groups={"one": 1})
    running = sched.submit(lambda: None, group="one")
    parked = sched.submit(lambda: None, group="one")
    later = sched.submit(lambda: None, delay=60)
    assert sched.pop_ready() == [running]
    ready = sched.submit(lambda: None)
    assert sched.cancel_not_started() == 3
    assert [t.state for t in (parked, later, ready)] == ["cancelled"] * 3
    assert running.state == "running"
    sched.finish(running)
    assert sched.pop_ready() == []
