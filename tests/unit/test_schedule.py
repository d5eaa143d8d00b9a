"""Serving hours (garage_node/node/schedule.py): windows, midnight, week's end, time zones and
DST, on a FakeClock's wall time; and the config errors a bad [schedule] gives."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from garage_node.core.settings import parse
from garage_node.node.config import ConfigError, NodeConfig
from garage_node.node.schedule import Schedule, ScheduleError, parse_window
from testing.fakes import FakeClock

BERLIN = ZoneInfo("Europe/Berlin")
OWNER = ("mon-fri 23:00-08:00", "sat-sun")  # nights on weekdays, weekends all day


def at(year, month, day, hour, minute=0, tz=BERLIN) -> FakeClock:
    clock = FakeClock()
    clock.wall = datetime(year, month, day, hour, minute, tzinfo=tz).timestamp()
    return clock


def local(ts_dt) -> str:
    return ts_dt.strftime("%a %Y-%m-%d %H:%M")


def test_weekday_nights_cross_midnight():
    s = Schedule(OWNER, BERLIN)
    # Tuesday 2027-03-02 14:00: daytime, not serving until 23:00 that evening.
    v = s.at(at(2027, 3, 2, 14).time())
    assert not v.serving and local(v.until) == "Tue 2027-03-02 23:00"
    assert v.until_text() == "Tue 23:00 CET"
    # 23:30 that night: serving until 08:00 the next morning.
    v = s.at(at(2027, 3, 2, 23, 30).time())
    assert v.serving and local(v.until) == "Wed 2027-03-03 08:00"
    # 07:59 Wednesday: still the night that began on Tuesday.
    assert s.at(at(2027, 3, 3, 7, 59).time()).serving
    assert not s.at(at(2027, 3, 3, 8, 0).time()).serving


def test_friday_night_runs_into_the_weekend_and_monday_morning_ends_it():
    s = Schedule(OWNER, BERLIN)
    # Friday 23:00 through the weekend is one stretch. It ends at Monday 00:00, not 08:00:
    # the night windows start on weekdays only, so no window starts on Sunday evening.
    v = s.at(at(2027, 3, 5, 23, 30).time())
    assert v.serving and local(v.until) == "Mon 2027-03-08 00:00"
    v = s.at(at(2027, 3, 8, 0, 30).time())
    assert not v.serving and local(v.until) == "Mon 2027-03-08 23:00"


def test_sunday_night_window_wraps_into_monday():
    s = Schedule(("sun 22:00-06:00",), BERLIN)
    assert s.at(at(2027, 3, 8, 5, 0).time()).serving  # Monday 05:00
    v = s.at(at(2027, 3, 7, 22, 30).time())
    assert v.serving and local(v.until) == "Mon 2027-03-08 06:00"
    v = s.at(at(2027, 3, 8, 6, 0).time())
    assert not v.serving and local(v.until) == "Sun 2027-03-14 22:00"


def test_windows_are_wall_clock_times_across_dst():
    s = Schedule(("daily 23:00-08:00",), BERLIN)
    # Berlin goes to summer time on Sunday 2027-03-28 (02:00 -> 03:00): the night still ends
    # at 08:00 on the local clock, which is 06:00 UTC instead of 07:00.
    v = s.at(at(2027, 3, 27, 23, 30).time())
    assert v.serving and local(v.until) == "Sun 2027-03-28 08:00"
    assert v.until.utcoffset().total_seconds() == 2 * 3600
    assert datetime.fromtimestamp(v.until.timestamp(), ZoneInfo("UTC")).hour == 6


def test_time_zone_decides_what_the_hours_mean():
    # The same instant: 22:30 in UTC is 23:30 in Berlin (winter).
    clock = at(2027, 3, 2, 22, 30, tz=ZoneInfo("UTC"))
    assert Schedule(OWNER, BERLIN).at(clock.time()).serving
    assert not Schedule(OWNER, ZoneInfo("UTC")).at(clock.time()).serving


def test_no_windows_or_the_whole_week_is_always_serving():
    clock = FakeClock()
    for s in (Schedule((), BERLIN), Schedule(("daily",), BERLIN), Schedule(("mon-sun 00:00-24:00",), BERLIN)):
        v = s.at(clock.time())
        assert v.serving and v.until is None and v.until_text() == ""


def test_clock_moving_through_a_day_flips_twice():
    s = Schedule(("weekdays 09:00-17:00",), BERLIN)
    clock = at(2027, 3, 3, 6)  # Wednesday
    seen = []
    for _ in range(24):
        seen.append(s.at(clock.time()).serving)
        clock.advance(3600)
    assert seen == [False] * 3 + [True] * 8 + [False] * 13


@pytest.mark.parametrize("text, part", [
    ("mon-fry 23:00-08:00", "fry"), ("mon 25:00-08:00", "25:00"), ("mon 23:00-08:60", "08:60"),
    ("mon 08:00-08:00", "same time"), ("mon 23:00 08:00", "not a window"), ("", "not a window"),
    ("someday", "someday"), ("mon 2300-0800", "not a time range"), ("mon 24:00-08:00", "24:00"),
])
def test_bad_windows_say_what_is_wrong(text, part):
    with pytest.raises(ScheduleError, match=part):
        parse_window(text)


def test_day_forms():
    assert parse_window("weekends").days == (5, 6)
    assert parse_window("sat,sun 10:00-12:00").days == (5, 6)
    assert parse_window("fri-mon").days == (0, 4, 5, 6)  # wraps over the week's end
    assert parse_window("Mon-Fri 23:00-24:00").end_min == 24 * 60


def test_config_errors_name_the_key_and_never_echo_the_value():
    with pytest.raises(ConfigError) as e:
        parse(NodeConfig(), {"schedule": {"windows": ["mon-fri 23:00-08:00", "tuesday-ish 9-5"]}}, "garage.toml",
              error=ConfigError)
    assert "garage.toml" in str(e.value) and "schedule.windows" in str(e.value) and "mon-fri 23:00-08:00" in str(e.value)
    assert "tuesday-ish" not in str(e.value)
    with pytest.raises(ConfigError, match="schedule.timezone.*IANA time zone"):
        parse(NodeConfig(), {"schedule": {"timezone": "Mars/Olympus"}}, "garage.toml", error=ConfigError)
    with pytest.raises(ConfigError, match="gpu.max_temp_c"):
        parse(NodeConfig(), {"gpu": {"max_temp_c": 150}}, "garage.toml", error=ConfigError)
    with pytest.raises(ConfigError, match="gpu.power_limit_w"):
        parse(NodeConfig(), {"gpu": {"power_limit_w": -5}}, "garage.toml", error=ConfigError)


def test_resume_temperature_must_be_below_the_limit(tmp_path):
    from garage_node.node.config import load_node_config

    base = tmp_path / "node.toml"
    base.write_text("[gpu]\nmax_temp_c = 80\n")
    over = tmp_path / "garage.toml"
    over.write_text("[gpu]\nresume_temp_c = 85\n")
    with pytest.raises(ConfigError, match="resume_temp_c must be below max_temp_c"):
        load_node_config(base, over)
    over.write_text("[gpu]\nresume_temp_c = 70\n")
    cfg = load_node_config(base, over)
    assert cfg.gpu.resume_below_c == 70
    over.write_text("")
    assert load_node_config(base, over).gpu.resume_below_c == 70  # unset: 10 °C below max_temp_c 80
