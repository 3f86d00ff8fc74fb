"""Calculation periods on the Asia/Jakarta (WIB, UTC+7, no daylight saving) calendar, in epoch ms."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

WIB_OFFSET_MS = 7 * 3_600_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
# calculationFrequency (FIWARE) -> the period label stored in indicator_values.period
PERIOD_NAMES = {"hourly": "hour", "daily": "day", "weekly": "week", "monthly": "month"}


def _wib(ms: int) -> datetime:
    """The WIB wall clock of an instant, as a naive-free UTC datetime shifted by +7h."""
    return datetime.fromtimestamp((ms + WIB_OFFSET_MS) / 1000, UTC)


def _ms(wall: datetime) -> int:
    return int(wall.timestamp() * 1000) - WIB_OFFSET_MS


def period_start(frequency: str, t_ms: int) -> int:
    """Start (epoch ms) of the WIB hour / day / ISO week (Monday) / month containing t_ms."""
    if frequency == "hourly":
        return t_ms - (t_ms + WIB_OFFSET_MS) % HOUR_MS
    day = t_ms - (t_ms + WIB_OFFSET_MS) % DAY_MS
    if frequency == "daily":
        return day
    if frequency == "weekly":
        return day - _wib(day).weekday() * DAY_MS
    if frequency == "monthly":
        wall = _wib(day)
        return _ms(wall.replace(day=1))
    raise ValueError(f"unknown frequency {frequency!r}")


def period_end(frequency: str, start_ms: int) -> int:
    """End (exclusive) of the period that starts at start_ms."""
    if frequency == "hourly":
        return start_ms + HOUR_MS
    if frequency == "daily":
        return start_ms + DAY_MS
    if frequency == "weekly":
        return start_ms + 7 * DAY_MS
    if frequency == "monthly":
        wall = _wib(start_ms)
        nxt = (wall.replace(day=28) + timedelta(days=4)).replace(day=1)
        return _ms(nxt)
    raise ValueError(f"unknown frequency {frequency!r}")


def label(frequency: str, start_ms: int) -> str:
    """Human label of a period in WIB: 2026-11-28 13:00, 2026-11-28, 2026-W48, 2026-11."""
    wall = _wib(start_ms)
    if frequency == "hourly":
        return wall.strftime("%Y-%m-%d %H:00")
    if frequency == "daily":
        return wall.strftime("%Y-%m-%d")
    if frequency == "weekly":
        iso = wall.isocalendar()
        return f"{iso.year}-W{iso.week:02d}"
    return wall.strftime("%Y-%m")
