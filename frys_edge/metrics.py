"""Metrics and health: the numbers and component states the runtime reports; no I/O.

Counters, gauges and histograms (with Prometheus-style buckets and p50/p95/p99 over a
bounded window of recent samples), and a health model where each component is ok,
degraded or failed with a reason. The API exposes these; nothing here serves them.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import msgspec

from frys_edge.core import FrysError

Status = Literal["starting", "ok", "degraded", "failed", "stopped"]
_RANK: dict[str, int] = {"ok": 0, "stopped": 0, "starting": 1, "degraded": 2, "failed": 3}

# Seconds: from 10 µs to 10 s, covering a KV put through a slow plugin call.
DEFAULT_BUCKETS = (
    1e-5,
    5e-5,
    1e-4,
    5e-4,
    1e-3,
    5e-3,
    1e-2,
    5e-2,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
)
WINDOW = 2048


class Counter:
    """A value that only goes up."""

    kind = "counter"

    def __init__(self, name: str, help: str) -> None:
        self.name = name
        self.help = help
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add amount (default 1)."""
        self.value += amount


class Gauge:
    """A value read at collection time from a function, or set directly."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float] | None = None) -> None:
        self.name = name
        self.help = help
        self._read = read
        self._value = 0.0

    def set(self, value: float) -> None:
        """Set the value (for gauges without a read function)."""
        self._value = value

    @property
    def value(self) -> float:
        return self._read() if self._read is not None else self._value


class Histogram:
    """Observations counted per bucket, plus quantiles over the last WINDOW samples."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float] = DEFAULT_BUCKETS) -> None:
        self.name = name
        self.help = help
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0
        self._recent: deque[float] = deque(maxlen=WINDOW)

    def observe(self, value: float) -> None:
        """Record one observation (seconds, for latency histograms)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value
        self._recent.append(value)

    def quantiles(self) -> dict[str, float]:
        """p50, p95 and p99 of the recent window (zeros when empty)."""
        data = sorted(self._recent)
        if not data:
            return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
        last = len(data) - 1
        return {f"p{q}": data[round(last * q / 100)] for q in (50, 95, 99)}


Metric = Counter | Gauge | Histogram


Labels = Mapping[str, str]


def series_key(name: str, labels: Labels | None) -> str:
    """`name{k="v",...}` (labels sorted), or just name: one key per time series."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


class Metrics:
    """A registry of time series: a name (prefixed `frys_` on export) and optional labels."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._kinds: dict[str, str] = {}

    def _add(self, metric: Metric, labels: Labels | None) -> Metric:
        kind = self._kinds.setdefault(metric.name, metric.kind)
        if kind != metric.kind:
            raise FrysError(
                f"metric {metric.name} is already registered as a {kind}; "
                f"give the {metric.kind} another name"
            )
        return self._metrics.setdefault(series_key(metric.name, labels), metric)

    def counter(self, name: str, help: str, labels: Labels | None = None) -> Counter:
        """The counter `name` with these labels, created on first use."""
        m = self._metrics.get(series_key(name, labels)) or self._add(Counter(name, help), labels)
        assert isinstance(m, Counter)
        return m

    def gauge(
        self,
        name: str,
        help: str,
        read: Callable[[], float] | None = None,
        labels: Labels | None = None,
    ) -> Gauge:
        """The gauge `name` with these labels, read from `read` at collection time if given."""
        m = self._add(Gauge(name, help, read), labels)
        assert isinstance(m, Gauge)
        return m

    def histogram(self, name: str, help: str, labels: Labels | None = None) -> Histogram:
        """The histogram `name` with these labels, created on first use."""
        key = series_key(name, labels)
        m = self._metrics.get(key) or self._add(Histogram(name, help), labels)
        assert isinstance(m, Histogram)
        return m

    def series(self) -> list[tuple[str, Metric]]:
        """Every (series key, metric), for exporters."""
        return list(self._metrics.items())

    def snapshot(self) -> dict[str, object]:
        """Every series' current value; histograms give count, sum and quantiles."""
        out: dict[str, object] = {}
        for key, m in self._metrics.items():
            if isinstance(m, Histogram):
                out[key] = {"count": m.count, "sum": m.sum, **m.quantiles()}
            else:
                out[key] = m.value
        return out


class ComponentHealth(msgspec.Struct):
    """The state of one component."""

    name: str
    status: Status
    reason: str = ""
    since: float = 0.0
    restarts: int = 0


class Health:
    """Each component's state; the whole is as bad as its worst part."""

    def __init__(self) -> None:
        self.components: dict[str, ComponentHealth] = {}

    def set(self, name: str, status: Status, reason: str = "") -> None:
        """Record a component's status; `since` changes only when status or reason does."""
        current = self.components.get(name)
        if current is None:
            self.components[name] = ComponentHealth(name, status, reason, time.time())
        elif current.status != status or current.reason != reason:
            current.status = status
            current.reason = reason
            current.since = time.time()

    def restarted(self, name: str) -> None:
        """Count one restart of a supervised component."""
        self.components[name].restarts += 1

    def remove(self, name: str) -> None:
        """Forget a component (an unloaded plugin)."""
        self.components.pop(name, None)

    def status(self) -> Status:
        """The worst status over all components ("ok" when there are none)."""
        worst: Status = "ok"
        for c in self.components.values():
            if _RANK[c.status] > _RANK[worst]:
                worst = c.status
        return worst

    def ready(self) -> bool:
        """Ready when every component is ok or degraded (still serving)."""
        return all(c.status in ("ok", "degraded") for c in self.components.values())

    def snapshot(self) -> dict[str, object]:
        """The overall status and each component's state, ready to encode as JSON."""
        return {
            "status": self.status(),
            "components": {c.name: msgspec.structs.asdict(c) for c in self.components.values()},
        }
