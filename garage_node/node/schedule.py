"""Serving hours: when the PC's owner lends it to the region (`[schedule]` in garage.toml).

Pure logic on wall-clock time in the PC's time zone, no I/O: the agent asks `Schedule.at(t)`
on each pass and drains the engine outside the windows. A window is written as the owner
thinks of it, "mon-fri 23:00-08:00" or "sat-sun" (all day), and one that ends at or before its
start crosses midnight: it belongs to the day it starts on (Friday 23:00 to Saturday 08:00).

Windows are laid on one week of local wall-clock minutes, so a DST change moves nothing the
owner wrote: 23:00 stays 23:00 in winter and summer. Only the standard library is imported:
config.py validates windows with this module, and build-image.sh runs config.py.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo, UTC
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_GROUPS = {"daily": tuple(range(7)), "weekdays": tuple(range(5)), "weekends": (5, 6)}
WEEK_MIN = 7 * 24 * 60
_TIME = r"(\d{1,2}):(\d{2})"
WINDOW_HELP = ('windows like "mon-fri 23:00-08:00" (ends at or before its start: crosses midnight) or '
               '"sat-sun" (all day); days mon..sun, ranges (mon-fri), lists (sat,sun), daily, weekdays, '
               'weekends; times HH:MM, 24:00 allowed as an end')


class ScheduleError(ValueError):
    """A window the owner wrote cannot be read; the text says which part and why."""


@dataclass(frozen=True)
class Window:
    days: tuple[int, ...]  # 0 = Monday
    start_min: int  # minutes after local midnight of each day in `days`
    end_min: int  # may be <= start_min: ends the next day

    @property
    def length_min(self) -> int:
        span = self.end_min - self.start_min
        return span if span > 0 else span + 24 * 60


def _days(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if part in _GROUPS:
            out += _GROUPS[part]
        elif "-" in part:
            a, _, b = part.partition("-")
            if a not in DAYS or b not in DAYS:
                raise ScheduleError(f"'{part}' is not a day range (e.g. mon-fri)")
            i, j = DAYS.index(a), DAYS.index(b)
            # sat-mon wraps over the week's end.
            out += [(i + k) % 7 for k in range((j - i) % 7 + 1)]
        elif part in DAYS:
            out.append(DAYS.index(part))
        else:
            raise ScheduleError(f"'{part}' is not a day (mon..sun, daily, weekdays, weekends)")
    return tuple(sorted(set(out)))


def _minutes(h: str, m: str, end: bool) -> int:
    hours, minutes = int(h), int(m)
    if minutes > 59 or hours > 24 or (hours == 24 and (minutes or not end)):
        raise ScheduleError(f"'{h}:{m}' is not a time of day (00:00-23:59, 24:00 as an end)")
    return hours * 60 + minutes


def parse_window(text: str) -> Window:
    words = text.strip().lower().split()
    if not words or len(words) > 2:
        raise ScheduleError(f"'{text}' is not a window ({WINDOW_HELP})")
    days = _days(words[0])
    if len(words) == 1:
        return Window(days, 0, 24 * 60)
    m = re.fullmatch(f"{_TIME}-{_TIME}", words[1])
    if m is None:
        raise ScheduleError(f"'{words[1]}' is not a time range (e.g. 23:00-08:00)")
    start, end = _minutes(m[1], m[2], end=False), _minutes(m[3], m[4], end=True)
    if start == end:
        raise ScheduleError(f"'{words[1]}' starts and ends at the same time (write the days alone for all day)")
    return Window(days, start, end)


def check_windows(windows: tuple[str, ...]) -> bool:
    """For config validation: every window parses."""
    try:
        for w in windows:
            parse_window(w)
    except ScheduleError:
        return False
    return True


def check_timezone(name: str) -> bool:
    if name == "":
        return True
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def system_timezone() -> tzinfo:
    """The PC's zone with its DST rules: TZ, else /etc/localtime; UTC when neither says."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name and check_timezone(name):
        return ZoneInfo(name)
    localtime = Path("/etc/localtime")
    try:
        target = os.readlink(localtime)
        if "zoneinfo/" in target:
            return ZoneInfo(target.split("zoneinfo/", 1)[1])
    except (OSError, ZoneInfoNotFoundError, ValueError):
        pass
    try:
        with localtime.open("rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        # Not ZoneInfo("UTC"): a system without tzdata (a minimal image) has no zone files at all.
        return UTC


@dataclass(frozen=True)
class Serving:
    """What the schedule says at one moment."""

    serving: bool
    until: datetime | None  # when that changes (aware, in the schedule's zone); None: never

    def until_text(self) -> str:
        return "" if self.until is None else self.until.strftime("%a %H:%M %Z").strip()


class Schedule:
    """The union of the owner's windows over a week. No windows: always serving."""

    def __init__(self, windows: tuple[str, ...] = (), tz: tzinfo | None = None) -> None:
        self.windows = tuple(parse_window(w) for w in windows)
        self.tz = tz or UTC
        spans: list[tuple[int, int]] = []
        for w in self.windows:
            for d in w.days:
                start = d * 24 * 60 + w.start_min
                end = start + w.length_min
                # Sunday night into Monday morning wraps to the start of the week.
                if end > WEEK_MIN:
                    spans += [(start, WEEK_MIN), (0, end - WEEK_MIN)]
                else:
                    spans.append((start, end))
        merged: list[list[int]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.spans = tuple((a, b) for a, b in merged)

    @property
    def always(self) -> bool:
        return not self.windows or self.spans == ((0, WEEK_MIN),)

    def at(self, t: float) -> Serving:
        """Serving or not at wall-clock time `t` (epoch seconds), and until when."""
        if self.always:
            return Serving(True, None)
        now = datetime.fromtimestamp(t, self.tz)
        minute = now.weekday() * 24 * 60 + now.hour * 60 + now.minute + now.second / 60
        serving = any(a <= minute < b for a, b in self.spans)
        # The next boundary that changes the answer, on the week's circle.
        edges = sorted({e for span in self.spans for e in span})
        ahead = [e for e in edges if e > minute] + [e + WEEK_MIN for e in edges]
        for edge in ahead:
            if (self._inside(edge % WEEK_MIN)) != serving:
                break
        else:  # pragma: no cover - not reachable: `always` covers a schedule with no change
            return Serving(serving, None)
        # Wall-clock arithmetic: "08:00" means 08:00 on the local clock, DST or not.
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
        local = midnight - timedelta(days=now.weekday()) + timedelta(minutes=edge)
        return Serving(serving, local.replace(tzinfo=self.tz))

    def _inside(self, minute: float) -> bool:
        return any(a <= minute < b for a, b in self.spans)
