"""Progress lines for log files, paced by a fake clock: never timing-dependent."""

from __future__ import annotations

import pytest

from toolbox.progress import MAX_GAP_S, MIN_GAP_S, CountLines, Pace, duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_boundary_sooner_than_the_floor_is_passed_over_and_a_silent_minute_is_not():
    clock = FakeClock()
    pace = Pace(clock)
    clock.now += MIN_GAP_S - 1
    assert not pace.due(boundary=True)  # a fast run: no flood
    clock.now += 1
    assert pace.due(boundary=True)
    clock.now += MAX_GAP_S - 1
    assert not pace.due(boundary=False)
    clock.now += 1
    assert pace.due(boundary=False)  # a slow run: a line a minute, boundary or not
    assert not pace.due(boundary=True)  # the gap starts again at the last line


def test_first_at_once_shows_the_first_boundary_only():
    clock = FakeClock()
    pace = Pace(clock, first_at_once=True)
    assert not pace.due(boundary=False)
    assert pace.due(boundary=True)
    clock.now += 1
    assert not pace.due(boundary=True)


@pytest.mark.parametrize(
    "seconds, shown", [(0.4, "0s"), (59.4, "59s"), (60, "1m00s"), (245, "4m05s"), (7380, "2h03m"), (float("inf"), "?")]
)
def test_duration(seconds, shown):
    assert duration(seconds) == shown


def test_count_lines_at_tenths_no_sooner_than_the_floor_and_none_at_the_end():
    clock, said = FakeClock(), []
    lines = CountLines("eval", 10_000, said.append, enabled=True, clock=clock)
    for done in range(0, 10_001, 500):  # 500 images every 2.5 s: a tenth every 5 s, a line every other one
        lines.update(done)
        clock.now += 2.5
    assert said == [
        f"eval {n:,}/10,000 images  200 img/s  elapsed {duration(n / 200)}  ETA {duration((10_000 - n) / 200)}"
        for n in (2000, 4000, 6000, 8000)
    ]


def test_count_lines_in_a_slow_pass_come_every_minute():
    clock, said = FakeClock(), []
    lines = CountLines("predict", 1000, said.append, enabled=True, clock=clock)
    for done in range(1, 50):  # one image every 30 s: no tenth in 25 minutes
        clock.now += 30
        lines.update(done)
    assert len(said) == 24 and said[0] == "predict 2/1,000 images  0.0 img/s  elapsed 1m00s  ETA 8h19m"


def test_count_lines_disabled_or_short_say_nothing():
    clock, said = FakeClock(), []
    off = CountLines("eval", 100, said.append, enabled=False, clock=clock)
    short = CountLines("eval", 100, said.append, enabled=True, clock=clock)
    for done in range(0, 101, 10):  # all of it within the floor
        off.update(done)
        short.update(done)
        clock.now += 0.5
    assert said == []
