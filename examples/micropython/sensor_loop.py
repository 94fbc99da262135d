"""A sensor loop on the Frys Edge core alone: scheduler, pool, event bus, cache, breaker.

Runs unchanged on MicroPython and CPython. On a board, copy frys_edge/core.py next to this
file as core.py and run `import sensor_loop`; on a PC, `python examples/micropython/sensor_loop.py`.

Two simulated sensors are sampled every PERIOD seconds by scheduler tasks. Each sample is
packed into a frame borrowed from a bounded pool and published on the bus; a detector
subscribed to every sensor flags readings far from the calibrated baseline (loaded once per
sensor through the cache), and a batch of readings goes to a flaky uplink guarded by a
circuit breaker and retried with backoff. The output is deterministic, so a test can check it.
"""

try:
    from frys_edge import core
except ImportError:  # on a board, core.py sits beside this file
    import core

PERIOD = 0.002  # seconds between samples
SAMPLES = 16  # per sensor
BATCH = 8  # readings per uplink send
THRESHOLD = 5.0  # degrees from the baseline that count as an anomaly
SPIKES = {("b", 11): 31.5}  # (sensor, sample) -> injected reading


def read_sensor(sensor, index):
    """The simulated hardware: a steady wave around 20 degrees, plus the injected spikes."""
    return SPIKES.get((sensor, index), 20.0 + (index % 4) * 0.25)


class Uplink:
    """Stands in for a network link: the first `failures` sends fail, later ones succeed."""

    def __init__(self, failures):
        self.failures = failures
        self.attempts = 0
        self.sent = []

    def send(self, batch):
        self.attempts += 1
        if self.attempts <= self.failures:
            raise OSError("uplink down (attempt " + str(self.attempts) + ")")
        self.sent.append(batch)


def run(out=print):
    """Run the loop to completion and return the summary counters."""
    scheduler = core.Scheduler(groups={"uplink": 1})
    bus = core.EventBus(scheduler=scheduler, default_maxsize=32)
    frames = core.Pool(lambda: bytearray(8), max_size=2, name="frames")
    baselines = core.Cache(max_entries=8)
    breaker = core.CircuitBreaker(failure_threshold=2, reset_timeout=PERIOD * 4, name="uplink")
    retry = core.RetryPolicy(max_attempts=5, initial_delay=PERIOD, jitter=False)
    uplink = Uplink(failures=3)
    calibrations = []
    pending = []
    received = [0]

    def calibrate(sensor):
        calibrations.append(sensor)
        return 20.0

    def detect(message):
        sensor = message.topic.split("/")[1]
        index, value = message.payload
        baseline = baselines.get_or_load(sensor, lambda: calibrate(sensor))
        if abs(value - baseline) > THRESHOLD:
            out("anomaly sensor=" + sensor + " sample=" + str(index) + " value=" + str(value))
            bus.publish("alerts/" + sensor, (index, value))

    async def forward(batch):
        attempt = 1
        while True:
            try:
                breaker.check()
                uplink.send(batch)
                breaker.record_success()
                out("sent batch of " + str(len(batch)) + " after " + str(attempt) + " attempt(s)")
                return
            except core.CircuitOpen:
                pass  # not an attempt: wait for the breaker to let a trial through
            except OSError:
                breaker.record_failure()
                if not retry.should_retry(attempt):
                    raise
                attempt += 1
            await core.sleep(retry.delay(attempt - 1))

    def collect(message):
        received[0] += 1
        pending.append(message.payload)
        if len(pending) == BATCH:
            batch = pending[:]
            del pending[:]
            scheduler.submit(forward, batch, group="uplink")

    async def sample(sensor):
        for index in range(SAMPLES):
            with frames.item() as frame:
                value = read_sensor(sensor, index)
                frame[0] = index
                frame[1] = int(value * 4)  # quarter-degree resolution fits a byte
                bus.publish("sensors/" + sensor + "/reading", (frame[0], frame[1] / 4))
            await core.sleep(PERIOD)

    bus.subscribe("sensors/+/reading", detect, name="detector")
    bus.subscribe("sensors/#", collect, name="uplink")
    alerts = bus.subscribe("alerts/#", maxsize=4, policy="drop_oldest")
    for sensor in ("a", "b"):
        scheduler.submit(sample, sensor, name="sample " + sensor)
    scheduler.run(timeout=10.0)

    summary = {
        "samples": received[0],
        "alerts": alerts.pending(),
        "calibrations": len(calibrations),
        "batches_sent": len(uplink.sent),
        "uplink_attempts": uplink.attempts,
        "breaker_opened": breaker.times_opened,
        "frames_created": frames.stats()["created"],
        "tasks_failed": scheduler.stats()["failed"],
    }
    for key in sorted(summary):
        out(key + " " + str(summary[key]))
    return summary


if __name__ == "__main__":
    run()
