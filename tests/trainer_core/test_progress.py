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


@given(first=gaps, second=gaps, idle_between=st.booleans())
def test_tick_many_gives_exactly_what_one_tick_per_step_gives(first: list[float], second: list[float],
                                                            idle_between: bool) -> None:
    one, many = RateMeter(), RateMeter()
    batches = [times_from(100.0, first), times_from(200.0, second)]
    singles: list[float] = []
    batched: list[float] = []
    for batch in batches:
        singles += [one.tick(now) for now in batch]
        batched += many.tick_many(batch)
        if idle_between:
            one.mark_idle()
            many.mark_idle()
    assert batched == singles
    assert many.steps_per_s == one.steps_per_s


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
