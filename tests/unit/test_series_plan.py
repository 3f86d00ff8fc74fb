"""The pure side of GET /v1/series and the rollup job: parameter checks, bucket alignment (WIB),
default bucket, source choice, point limits, the generated SQL, and the job's watermark."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from arus.routes.series import (
    BUCKETS,
    SOURCES,
    BadParameter,
    align,
    build_query,
    choose_source,
    default_bucket,
    floor_bucket,
    plan,
)
from consumers.rollups import MAX_LAG, MIN_LAG, new_watermark
from infra.settings import Settings

NOW = datetime(2026, 11, 28, 5, 7, 13, tzinfo=UTC)
S = Settings()


def p(**params: str):  # type: ignore[no-untyped-def]
    return plan({"metric": "waterLevel", **params}, S, NOW)


def test_buckets_start_at_wib_midnight() -> None:
    t = datetime(2026, 11, 28, 16, 59, tzinfo=UTC)  # 23:59 WIB
    assert floor_bucket(t, BUCKETS["1d"]) == datetime(2026, 11, 27, 17, 0, tzinfo=UTC)
    assert floor_bucket(t + timedelta(minutes=1), BUCKETS["1d"]) == datetime(2026, 11, 28, 17, 0, tzinfo=UTC)
    assert floor_bucket(t, BUCKETS["6h"]) == datetime(2026, 11, 28, 11, 0, tzinfo=UTC)  # 18:00 WIB
    assert floor_bucket(t, BUCKETS["1h"]) == datetime(2026, 11, 28, 16, 0, tzinfo=UTC)
    assert floor_bucket(t, BUCKETS["15m"]) == datetime(2026, 11, 28, 16, 45, tzinfo=UTC)


def test_align_rounds_out_to_whole_buckets() -> None:
    lo, hi = align(datetime(2026, 1, 1, 0, 10, tzinfo=UTC), datetime(2026, 1, 1, 2, 0, tzinfo=UTC), BUCKETS["1h"])
    assert (lo, hi) == (datetime(2026, 1, 1, 0, 0, tzinfo=UTC), datetime(2026, 1, 1, 2, 0, tzinfo=UTC))
    lo, hi = align(datetime(2026, 1, 1, 0, 0, tzinfo=UTC), datetime(2026, 1, 1, 2, 0, 1, tzinfo=UTC), BUCKETS["1h"])
    assert hi == datetime(2026, 1, 1, 3, 0, tzinfo=UTC)


@pytest.mark.parametrize(("span", "bucket"), [
    (timedelta(hours=1), "1m"), (timedelta(hours=24), "1m"), (timedelta(days=2), "5m"), (timedelta(days=7), "15m"),
    (timedelta(days=30), "1h"), (timedelta(days=365), "6h"), (timedelta(days=3650), "1d"),
])
def test_default_bucket_keeps_points_at_most_1500(span: timedelta, bucket: str) -> None:
    assert default_bucket(span) == bucket
    assert span / BUCKETS[bucket] <= 1500 or bucket == "1d"


@pytest.mark.parametrize(("bucket", "agg", "days", "source"), [
    ("1m", "avg", 1, "aggregates"),
    ("15m", "max", 90, "aggregates"),       # sub-hour buckets: only the 1-minute windows have them
    ("1h", "avg", 7, "aggregates"),         # short range: fresher than the rollups, still cheap
    ("1h", "avg", 8, "rollup_hourly"),
    ("6h", "sum", 365, "rollup_hourly"),
    ("1d", "avg", 365, "rollup_daily"),
    ("1d", "last", 30, "rollup_daily"),
    ("1d", "avg", 3, "aggregates"),
    ("1h", "p95", 2, "readings"),
    ("1d", "p95", 7, "readings"),
])
def test_source_choice(bucket: str, agg: str, days: int, source: str) -> None:
    assert choose_source(BUCKETS[bucket], agg, timedelta(days=days)) == source
    assert source in SOURCES


def test_a_year_of_daily_points_reads_the_daily_rollup() -> None:
    pl = p(**{"from": "2025-11-28T00:00:00+07:00", "to": "2026-11-28T00:00:00+07:00", "bucket": "1d"})
    assert pl.source == "rollup_daily" and pl.points_max == 365


def test_defaults() -> None:
    pl = p()
    assert (pl.agg, pl.fmt, pl.bucket, pl.source, pl.region_level) == ("avg", "json", "1m", "aggregates", "kabupaten")
    assert pl.hi == datetime(2026, 11, 28, 5, 8, tzinfo=UTC)  # now, rounded up to the minute
    assert pl.hi - pl.lo == timedelta(hours=24, minutes=1)


@pytest.mark.parametrize(("params", "parameter"), [
    ({"metric": ""}, "metric"),
    ({"metric": "WaterLevel"}, "metric"),
    ({"region": "35.09.99"}, "region"),
    ({"region": "35.09' OR '1'='1"}, "region"),
    ({"device": "a b"}, "device"),
    ({"device": "x" * 65}, "device"),
    ({"from": "2026-11-28"}, "from"),  # a date without time and offset
    ({"from": "2026-11-28T00:00:00"}, "from"),
    ({"to": "not a time"}, "to"),
    ({"from": "2026-11-28T00:00:00Z", "to": "2026-11-28T00:00:00Z"}, "from"),
    ({"bucket": "1w"}, "bucket"),
    ({"agg": "AVG"}, "agg"),
    ({"format": "parquet"}, "format"),
    ({"bucket": "1m", "from": "2026-01-01T00:00:00Z", "to": "2026-02-01T00:00:00Z"}, "bucket"),
    ({"agg": "p95", "from": "2026-01-01T00:00:00Z", "to": "2026-02-01T00:00:00Z", "bucket": "1d"}, "agg"),
    ({"colour": "red"}, "colour"),
])
def test_bad_parameters(params: dict[str, str], parameter: str) -> None:
    with pytest.raises(BadParameter) as err:
        p(**params)
    assert err.value.parameter == parameter
    assert err.value.response().status_code == 400


def test_point_limit_is_a_setting() -> None:
    small = Settings(series_max_points=10)
    with pytest.raises(BadParameter, match="limit of 10"):
        plan({"metric": "pm25", "bucket": "1h", "from": "2026-01-01T00:00:00Z", "to": "2026-01-01T11:00:00Z"},
             small, NOW)
    assert plan({"metric": "pm25", "bucket": "1h", "from": "2026-01-01T00:00:00Z", "to": "2026-01-01T10:00:00Z"},
                small, NOW).points_max == 10


@pytest.mark.parametrize("params", [
    {"region": "35.09.19", "agg": "last"},
    {"region": "35.09", "bucket": "1d", "from": "2025-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
    {"region": "35.09.19.1001", "agg": "p95"},
    {"device": "gauge-1", "region": "35.09.19", "agg": "count"},
])
def test_sql_binds_every_value(params: dict[str, str]) -> None:
    pl = p(**params)
    query, values = build_query(pl)
    text = query.as_string(None)
    for v in (pl.metric, pl.region, pl.device):
        if v:
            assert v not in text  # values are parameters, never text
    assert f'FROM "{pl.source}" s' in text
    assert "%(metric)s" in text and "%(lo)s" in text and "%(hi)s" in text
    assert values["metric"] == pl.metric and values["lo"] == pl.lo


def test_watermark_trails_now_and_open_writers() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert new_watermark(now, None) == now - MIN_LAG
    writer = now - timedelta(minutes=2)
    assert new_watermark(now, writer) == writer - timedelta(seconds=1)
    assert new_watermark(now, now - timedelta(hours=5)) == now - MAX_LAG  # a forgotten session
    assert new_watermark(now, now) == now - MIN_LAG
