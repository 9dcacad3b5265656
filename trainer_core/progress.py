"""Speed and ETA, smoothed so the numbers a user reads do not flicker."""

from __future__ import annotations


class RateMeter:
    """Steps/s as an exponential moving average over wall-clock step intervals.

    Pauses, evals and saves are excluded by ``mark_idle``: the next interval starts afresh.
    """

    def __init__(self, smoothing: float = 0.05) -> None:
        self.smoothing = smoothing
        self.steps_per_s = 0.0
        self._last: float | None = None

    def tick_many(self, times: list[float]) -> list[float]:
        """The rate after each of ``times`` (steps' end times, in order): the loop hands over its steps in batches.

        The first interval sets the rate; later ones move it by ``smoothing``. Intervals that are
        not positive are skipped.
        """
        rates = []
        last, rate, smoothing = self._last, self.steps_per_s, self.smoothing
        for now in times:
            if last is not None and now > last:
                rate = 1.0 / (now - last) if rate == 0.0 else rate + smoothing * (1.0 / (now - last) - rate)
            last = now
            rates.append(rate)
        self._last, self.steps_per_s = last, rate
        return rates

    def mark_idle(self) -> None:
        self._last = None

    def eta_s(self, steps_left: int) -> float | None:
        if steps_left <= 0:
            return 0.0
        if self.steps_per_s <= 0:
            return None
        return steps_left / self.steps_per_s


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
