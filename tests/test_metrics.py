"""Metrics and health: what the API will expose must be right."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from frys_edge.core import FrysError
from frys_edge.metrics import WINDOW, Health, Metrics


def test_histogram_quantiles_and_buckets() -> None:
    m = Metrics()
    h = m.histogram("step_seconds", "Step latency")
    for ms in range(1, 101):
        h.observe(ms / 1000)
    q = h.quantiles()
    assert q["p50"] == pytest.approx(0.050, abs=0.001)
    assert q["p95"] == pytest.approx(0.095, abs=0.001)
    assert q["p99"] == pytest.approx(0.099, abs=0.001)
    assert h.count == 100 and h.sum == pytest.approx(5.05)
    assert sum(h.counts) == 100
    assert m.snapshot()["step_seconds"] == {"count": 100, "sum": h.sum, **q}


@given(st.lists(st.floats(min_value=0, max_value=100), min_size=1, max_size=3 * WINDOW))
def test_quantiles_are_ordered_and_come_from_the_recent_window(values: list[float]) -> None:
    h = Metrics().histogram("x", "x")
    for v in values:
        h.observe(v)
    q = h.quantiles()
    recent = values[-WINDOW:]
    assert q["p50"] <= q["p95"] <= q["p99"]
    assert all(value in recent for value in q.values())


def test_a_name_registered_twice_must_keep_its_kind() -> None:
    m = Metrics()
    c = m.counter("runs_total", "Runs")
    assert m.counter("runs_total", "Runs") is c
    with pytest.raises(FrysError, match="already registered as a counter"):
        m.gauge("runs_total", "Runs")


def test_gauges_read_their_source_at_collection_time() -> None:
    m = Metrics()
    box = [1.0]
    m.gauge("level", "Level", lambda: box[0])
    box[0] = 7.0
    assert m.snapshot()["level"] == 7.0


def test_health_is_as_bad_as_its_worst_component() -> None:
    h = Health()
    assert h.status() == "ok" and h.ready()
    h.set("storage", "ok")
    h.set("memory", "degraded", "over budget")
    assert h.status() == "degraded" and h.ready()
    h.set("plugin:x", "failed", "trap")
    assert h.status() == "failed" and not h.ready()
    h.remove("plugin:x")
    assert h.status() == "degraded"
    snap = h.snapshot()
    assert snap["status"] == "degraded"
    assert snap["components"]["memory"]["reason"] == "over budget"  # type: ignore[index]


def test_labelled_series_are_counted_apart() -> None:
    m = Metrics()
    m.counter("runs_total", "Runs", {"workflow": "a"}).inc()
    m.counter("runs_total", "Runs", {"workflow": "a"}).inc()
    m.counter("runs_total", "Runs", {"workflow": "b"}).inc()
    snap = m.snapshot()
    assert snap['runs_total{workflow="a"}'] == 2 and snap['runs_total{workflow="b"}'] == 1
    with pytest.raises(FrysError, match="already registered as a counter"):
        m.histogram("runs_total", "Runs", {"workflow": "c"})
