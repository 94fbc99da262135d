"""A native plugin for the gateway example: a simulated temperature sensor.

`frys run -c examples/gateway/frys.toml` loads it through `[plugins] native`. It registers the
workflow action `sensor.read`, which returns a reading that drifts slowly and spikes above
30 °C for about a second every six, so the example's alerts fire.
"""

from __future__ import annotations

import math
import time
from typing import Any

NAME = "simulated-sensors"


async def read(ctx: Any, params: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    celsius = 21.0 + 3.0 * math.sin(now / 30)
    if now % 6 < 1.2:
        celsius += 12.0
    return {"sensor": params.get("sensor", "boiler"), "celsius": round(celsius, 2), "ts": now}


def init(rt: Any) -> None:
    rt.engine.action("sensor.read")(read)
