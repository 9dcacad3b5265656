"""The rate meter: smoothed steps/s, idle gaps left out, and the batched form the loop uses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainer_core.progress import RateMeter, format_duration

gaps = st.lists(st.floats(min_value=0.0, max_value=2.0, allow_nan=False), max_size=40)


def times_from(start: float, steps: list[float]) -> list[float]:
    times, now = [], start
    for gap in steps:
        now += gap
        times.append(now)
    return times


def reference_rates(batches: list[list[float]], idle_between: bool, smoothing: float = 0.05) -> list[float]:
    """The meter's rule written out plainly: the first positive interval sets the rate, later ones are
    smoothed, and an idle mark makes the next step start a fresh interval."""
    rates, rate, last = [], 0.0, None
    for batch in batches:
        for now in batch:
            if last is not None and now - last > 0:
                rate = 1.0 / (now - last) if rate == 0.0 else rate + smoothing * (1.0 / (now - last) - rate)
            rates.append(rate)
            last = now
        if idle_between:
            last = None
    return rates


@given(first=gaps, second=gaps, idle_between=st.booleans())
def test_batches_give_the_rates_of_the_steps_taken_one_by_one(first: list[float], second: list[float],
                                                              idle_between: bool) -> None:
    batched, one_by_one = RateMeter(), RateMeter()
    batches = [times_from(100.0, first), times_from(200.0, second)]
    got: list[float] = []
    single: list[float] = []
    for batch in batches:
        got += batched.tick_many(batch)
        single += [one_by_one.tick_many([now])[0] for now in batch]
        if idle_between:
            batched.mark_idle()
            one_by_one.mark_idle()
    assert got == single == reference_rates(batches, idle_between)
    assert batched.steps_per_s == (got[-1] if got else 0.0)


def test_the_first_interval_sets_the_rate_and_later_ones_are_smoothed() -> None:
    meter = RateMeter(smoothing=0.5)
    assert meter.tick_many([10.0, 10.5, 10.75]) == [0.0, 2.0, 3.0]


def test_an_idle_gap_is_not_counted_as_a_slow_step() -> None:
    meter = RateMeter(smoothing=0.5)
    meter.tick_many([0.0, 0.5])
    meter.mark_idle()
    assert meter.tick_many([60.0, 60.5]) == [2.0, 2.0]


def test_eta_needs_a_rate_and_is_zero_when_nothing_is_left() -> None:
    meter = RateMeter()
    assert meter.eta_s(10) is None
    meter.tick_many([0.0, 0.25])
    assert meter.eta_s(10) == pytest.approx(2.5)
    assert meter.eta_s(0) == 0.0


@pytest.mark.parametrize(("seconds", "text"), [(None, "?"), (59.4, "59s"), (61, "1m01s"), (3723, "1h02m")])
def test_durations_read_as_a_person_would_write_them(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text
