"""Mapping periods: a range of months (or ISO weeks, or days) as STAC datetime intervals.

``"2026-01/2026-06"`` with ``every="month"`` is six periods ``2026-01`` .. ``2026-06``;
``"last"`` is the last *finished* period before now (what a scheduled run maps).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from .errors import PeriodError

Every = Literal["month", "week", "day"]


@dataclass(frozen=True, order=True)
class Period:
    """``[start, end)`` in UTC, with an id usable in paths (``2026-01``, ``2026-W03``,
    ``2026-01-05``)."""

    start: dt.datetime
    end: dt.datetime
    id: str

    def interval(self) -> str:
        """The STAC search interval (closed, to the last microsecond of the period)."""
        last = self.end - dt.timedelta(microseconds=1)
        return f"{_iso(self.start)}/{_iso(last)}"

    @property
    def middle(self) -> dt.datetime:
        return self.start + (self.end - self.start) / 2


def _iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _floor(t: dt.datetime, every: Every) -> dt.datetime:
    t = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if every == "month":
        return t.replace(day=1)
    if every == "week":
        return t - dt.timedelta(days=t.weekday())
    return t


def _next(t: dt.datetime, every: Every) -> dt.datetime:
    if every == "month":
        return (t.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return t + dt.timedelta(days=7 if every == "week" else 1)


def _period(start: dt.datetime, every: Every) -> Period:
    if every == "month":
        pid = f"{start:%Y-%m}"
    elif every == "week":
        year, week, _ = start.isocalendar()
        pid = f"{year}-W{week:02d}"
    else:
        pid = f"{start:%Y-%m-%d}"
    return Period(start, _next(start, every), pid)


def _parse(text: str) -> dt.datetime:
    text = text.strip()
    for fmt in ("%Y-%m-%d", "%Y-%m", "%Y"):
        try:
            return dt.datetime.strptime(text, fmt).replace(tzinfo=dt.UTC)
        except ValueError:
            pass
    raise PeriodError(f"period bound {text!r}: use YYYY, YYYY-MM or YYYY-MM-DD")


def parse_periods(
    text: str, every: Every = "month", *, now: dt.datetime | None = None
) -> list[Period]:
    """The periods of ``every`` length covering ``text``: ``START/END`` (both included,
    e.g. ``2026-01/2026-06``), one date (its period), or ``last`` (the last finished one).

    Raises:
        PeriodError: unparseable bounds, END before START, or an unknown ``every``.
    """
    if every not in ("month", "week", "day"):
        raise PeriodError(f"every must be month, week or day, not {every!r}")
    if text.strip() == "last":
        current = _floor(now or dt.datetime.now(dt.UTC), every)
        prev = _floor(current - dt.timedelta(days=1), every)
        return [_period(prev, every)]
    first, _, last = text.partition("/")
    start = _floor(_parse(first), every)
    end = _floor(_parse(last), every) if last else start
    if end < start:
        raise PeriodError(f"period {text!r} ends before it starts")
    periods = []
    while start <= end:
        periods.append(_period(start, every))
        start = _next(start, every)
    return periods
