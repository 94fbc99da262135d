"""A native plugin for the gateway example: a simulated temperature sensor.

`frys run -c examples/gateway/frys.toml` loads it through `[plugins] native`. It registers the
workflow action `sensor.read`, which returns a reading that drifts slowly and spikes above
30 °C for about a second every six, so the example's alerts fire, together with the last
30 readings of that sensor (kept in memory) for the WASM anomaly detector.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

NAME = "simulated-sensors"


WINDOW = 30
_recent: dict[str, deque[float]] = {}


async def read(ctx: Any, params: dict[str, Any]) -> dict[str, Any]:
    sensor = params.get("sensor", "boiler")
    now = time.time()
    celsius = round(21.0 + 3.0 * math.sin(now / 30) + (12.0 if now % 6 < 1.2 else 0.0), 2)
    window = _recent.setdefault(sensor, deque(maxlen=WINDOW))
    window.append(celsius)
    # The recent window rides along, for the anomaly detector plugin.
    return {"sensor": sensor, "celsius": celsius, "ts": now, "window": list(window)}


def init(rt: Any) -> None:
    rt.engine.action("sensor.read")(read)
