"""Seconds per named stage of a job, as every job's summary reports them (``stage_seconds``)."""

from __future__ import annotations

import time


class Stopwatch:
    """``lap(stage)`` charges the time since the previous lap (or the start) to ``stage``;
    a stage timed more than once (each round of a loop) adds up. ``seconds`` keeps the
    stages in the order they first ran."""

    def __init__(self, digits: int = 3) -> None:
        self.digits = digits
        self.seconds: dict[str, float] = {}
        self.started = self._clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._clock, self.digits)
        self._clock = now

    def total(self) -> float:
        """Seconds since the stopwatch started."""
        return round(time.perf_counter() - self.started, self.digits)
