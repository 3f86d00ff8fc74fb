"""GET /v1/series and /v1/regions against a real, migrated PostgreSQL: the numbers equal raw SQL over
`readings` from every source (1-minute aggregates, hourly and daily rollups, raw for p95), region
roll-ups by code prefix, a late reading corrects only the buckets it falls in, and bad parameters
(injection strings in each) get a 400 and change nothing.

Readings and their 1-minute aggregates are written through the sink's own write path
(consumers.sink.write_batch: the same staging + upsert as `arus sink`), then the rollup job runs."""

from __future__ import annotations

import asyncio
import math
import random
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from fastapi.testclient import TestClient

from arus.api import create_app
from consumers.rollups import rollup_once
from consumers.rows import AggregateRow, ReadingRow
from consumers.sink import write_batch
from infra.db import aconnect, connect
from infra.settings import Settings
from tests.helpers import pg_fetch, pg_scalar

WIB = timezone(timedelta(hours=7))
ORIGIN = datetime(2000, 1, 1, tzinfo=WIB)
BASE = datetime(2026, 3, 2, tzinfo=WIB)  # a WIB midnight
DAYS = 10
STEP = timedelta(minutes=20)
METRIC = "waterLevel"
# device -> region (two desa/kelurahan of Kaliwates, one of Jombang, one at the kabupaten itself)
DEVICES = {
    "sa-d1": "35.09.19.1001",
    "sa-d2": "35.09.19.1002",
    "sa-d3": "35.09.01.2001",
    "sa-d4": "35.09",
}
ORIGIN_SQL = "TIMESTAMPTZ '2000-01-01 00:00:00+07'"


def kecamatan(code: str) -> str | None:
    parts = code.split(".")
    return ".".join(parts[:3]) if len(parts) >= 3 else None


def make_readings(seed: int = 7) -> list[ReadingRow]:
    rnd = random.Random(seed)
    rows: list[ReadingRow] = []
    for i, (dev, region) in enumerate(DEVICES.items()):
        t = BASE + timedelta(minutes=3 * i, seconds=7 * i)  # distinct times across devices
        end = BASE + timedelta(days=DAYS)
        while t < end:
            value = rnd.randint(0, 40) * 0.25  # exact in binary: sums are exact
            rows.append((t.astimezone(UTC), dev, region, METRIC, value, f"ev-{dev}-{t.timestamp():.0f}"))
            t += STEP
    return rows


def aggregate_rows(readings: list[ReadingRow]) -> list[AggregateRow]:
    """What the stream emits for these readings: per device and per kecamatan 1-minute windows."""
    groups: dict[tuple[str, str, str, str, datetime], list[tuple[datetime, float]]] = defaultdict(list)
    for t, dev, region, metric, value, _ in readings:
        start = t - timedelta(seconds=t.second, microseconds=t.microsecond)
        groups[("device", dev, region, metric, start)].append((t, value))
        kec = kecamatan(region)
        if kec is not None:
            groups[("kecamatan", kec, kec, metric, start)].append((t, value))
    out: list[AggregateRow] = []
    for (scope, key, region, metric, start), items in groups.items():
        values = [v for _, v in items]
        last_t, last_v = max(items)
        out.append((start, scope, key, region, metric, start + timedelta(minutes=1), len(values), min(values),
                    max(values), sum(values), sum(values) / len(values), last_v, last_t, True))
    return out


def write(dsn: str, readings: list[ReadingRow], aggregates: list[AggregateRow]) -> None:
    async def go() -> None:
        conn = await aconnect(dsn, autocommit=True)
        try:
            await write_batch(conn, readings, aggregates, [])
        finally:
            await conn.close()

    asyncio.run(go())


def run_rollups(dsn: str) -> Any:
    with connect(dsn, autocommit=True) as conn:
        # the watermark trails now() by a margin: pretend the previous run was long ago so this run
        # sees everything written a moment ago (the job itself never skips it: it would see it later)
        return rollup_once(conn)


@pytest.fixture
def loaded(fresh_database_url: str) -> Iterator[str]:
    dsn = fresh_database_url
    with connect(dsn, autocommit=True) as conn:
        for dev, region in DEVICES.items():
            conn.execute("INSERT INTO devices (device_id, kind, region_code) VALUES (%s, 'water_level', %s)",
                         (dev, region))
    readings = make_readings()
    write(dsn, readings, aggregate_rows(readings))
    res = run_rollups(dsn)
    assert res.hourly_rows > 0 and res.daily_rows > 0
    yield dsn


@pytest.fixture
def client(loaded: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=loaded))) as c:
        yield c


# --------------------------------------------------------------------------- raw SQL truth

RAW_AGG = {
    "avg": "avg(value)", "min": "min(value)", "max": "max(value)", "sum": "sum(value)", "count": "count(*)",
    "last": "(array_agg(value ORDER BY time DESC))[1]",
    "p95": "percentile_cont(0.95) WITHIN GROUP (ORDER BY value)",
}
WIDTH = {"1m": "1 minute", "5m": "5 minutes", "15m": "15 minutes", "1h": "1 hour", "6h": "6 hours", "1d": "1 day"}


def truth(dsn: str, agg: str, bucket: str, lo: datetime, hi: datetime, region: str | None = None,
          device: str | None = None) -> list[tuple[str, float, int]]:
    cond, params = "", [METRIC, lo, hi]
    if region is not None:
        cond += " AND (region_code = %s OR region_code LIKE %s)"
        params += [region, region + ".%"]
    if device is not None:
        cond += " AND device_id = %s"
        params.append(device)
    rows = pg_fetch(
        dsn,
        f"SELECT date_bin(interval '{WIDTH[bucket]}', time, {ORIGIN_SQL}) AS t, {RAW_AGG[agg]}, count(*)"
        f" FROM readings WHERE metric = %s AND time >= %s AND time < %s {cond} GROUP BY 1 ORDER BY 1",
        params,
    )
    return [(t.astimezone(UTC).isoformat().replace("+00:00", "Z"), float(v), int(n)) for t, v, n in rows]


def api_points(client: TestClient, **params: str) -> tuple[dict[str, Any], list[tuple[str, float, int]]]:
    r = client.get("/v1/series", params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    return body, [(p["time"], p["value"], p["n"]) for p in body["points"]]


def assert_same(got: list[tuple[str, float, int]], want: list[tuple[str, float, int]]) -> None:
    assert want, "the reference query returned nothing: the test data does not cover this case"
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[2] for g in got] == [w[2] for w in want]
    for (t, gv, _), (_, wv, _) in zip(got, want, strict=True):
        assert gv == pytest.approx(wv, rel=1e-12, abs=1e-12), t


def iso(t: datetime) -> str:
    return t.isoformat()


CASES = [
    # (query, expected source)
    ({"region": "35.09.19", "bucket": "1h", "agg": "avg", "days": 2}, "aggregates"),
    ({"region": "35.09", "bucket": "15m", "agg": "max", "days": 1}, "aggregates"),
    ({"region": "35.09.19.1001", "bucket": "5m", "agg": "count", "days": 1}, "aggregates"),
    ({"device": "sa-d3", "bucket": "1m", "agg": "last", "days": 1}, "aggregates"),
    ({"region": "35.09", "bucket": "1h", "agg": "sum", "days": 9}, "rollup_hourly"),
    ({"region": "35.09.19", "bucket": "6h", "agg": "min", "days": 9}, "rollup_hourly"),
    ({"device": "sa-d4", "bucket": "6h", "agg": "avg", "days": 9}, "rollup_hourly"),
    ({"region": "35.09", "bucket": "1d", "agg": "avg", "days": 10}, "rollup_daily"),
    ({"region": "35.09.19", "bucket": "1d", "agg": "last", "days": 10}, "rollup_daily"),
    ({"region": "35.09.01", "bucket": "1d", "agg": "count", "days": 10}, "rollup_daily"),
    ({"region": "35.09.19", "bucket": "1h", "agg": "p95", "days": 2}, "readings"),
    ({"device": "sa-d1", "bucket": "1d", "agg": "p95", "days": 5}, "readings"),
]


@pytest.mark.parametrize(("case", "source"), CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_series_equals_raw_sql(client: TestClient, loaded: str, case: dict[str, Any], source: str) -> None:
    lo = BASE + timedelta(hours=1) if case["days"] < DAYS else BASE
    hi = lo + timedelta(days=case["days"])
    query = {"metric": METRIC, "bucket": case["bucket"], "agg": case["agg"], "from": iso(lo), "to": iso(hi)}
    for k in ("region", "device"):
        if k in case:
            query[k] = case[k]
    body, got = api_points(client, **query)
    assert body["source"] == source
    assert body["unit"] == "m" and body["agg"] == case["agg"]
    # every point is a whole bucket: the range used is the requested one rounded out to buckets
    used_lo, used_hi = (datetime.fromisoformat(body[k]) for k in ("from", "to"))
    assert used_lo <= lo and used_hi >= hi and used_lo > lo - timedelta(days=1)
    want = truth(loaded, case["agg"], case["bucket"], used_lo, used_hi, case.get("region"), case.get("device"))
    assert_same(got, want)


def test_region_rollup_is_the_union_of_its_parts(client: TestClient, loaded: str) -> None:
    lo, hi = BASE, BASE + timedelta(days=DAYS)
    common = {"metric": METRIC, "bucket": "1d", "agg": "count", "from": iso(lo), "to": iso(hi)}
    per = {}
    for region in ("35.09", "35.09.19", "35.09.01", "35.09.19.1001", "35.09.19.1002"):
        body, pts = api_points(client, region=region, **common)
        assert body["source"] == "rollup_daily"
        per[region] = sum(v for _, v, _ in pts)
    assert per["35.09.19"] == per["35.09.19.1001"] + per["35.09.19.1002"] > 0
    # the kabupaten also counts the device registered at the kabupaten itself (sa-d4)
    d4 = sum(v for _, v, _ in api_points(client, device="sa-d4", **common)[1])
    assert per["35.09"] == per["35.09.19"] + per["35.09.01"] + d4
    assert per["35.09"] == pg_scalar(loaded, "SELECT count(*) FROM readings WHERE metric = %s", (METRIC,))
    # no region, no device: the kabupaten
    body, pts = api_points(client, **common)
    assert body["region"] == "35.09" and sum(v for _, v, _ in pts) == per["35.09"]


def test_default_range_bucket_and_csv(client: TestClient, loaded: str) -> None:
    body, _ = api_points(client, metric=METRIC)
    assert body["bucket"] == "1m" and body["agg"] == "avg" and body["source"] == "aggregates"
    to = datetime.fromisoformat(body["to"])
    assert timedelta(hours=24) <= to - datetime.fromisoformat(body["from"]) <= timedelta(hours=24, minutes=1)
    lo, hi = BASE, BASE + timedelta(days=DAYS)
    body, pts = api_points(client, metric=METRIC, region="35.09.19", **{"from": iso(lo), "to": iso(hi)})
    assert body["bucket"] == "15m"  # the smallest with <= 1,500 points over 10 days
    r = client.get("/v1/series", params={"metric": METRIC, "region": "35.09.19", "bucket": "1d", "agg": "max",
                                         "from": iso(lo), "to": iso(hi), "format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    lines = r.text.strip().split("\n")
    assert lines[0] == "time,time_wib,value,n"
    want = truth(loaded, "max", "1d", lo, hi, "35.09.19")
    assert [(ln.split(",")[0], float(ln.split(",")[2]), int(ln.split(",")[3])) for ln in lines[1:]] == want
    assert lines[1].split(",")[1].endswith("T00:00:00+07:00")  # days start at WIB midnight


def test_range_is_rounded_to_whole_buckets(client: TestClient, loaded: str) -> None:
    lo, hi = BASE + timedelta(hours=1, minutes=17), BASE + timedelta(hours=5, minutes=3)
    body, got = api_points(client, metric=METRIC, device="sa-d1", bucket="1h", agg="sum",
                           **{"from": iso(lo), "to": iso(hi)})
    assert body["from"] == "2026-03-01T18:00:00Z" and body["to"] == "2026-03-01T23:00:00Z"
    assert_same(got, truth(loaded, "sum", "1h", BASE + timedelta(hours=1), BASE + timedelta(hours=6),
                           device="sa-d1"))


# --------------------------------------------------------------------------- late data


def rollup_snapshot(dsn: str, table: str) -> dict[tuple[str, str, str, datetime], tuple[Any, ...]]:
    rows = pg_fetch(dsn, f"SELECT scope, key, metric, bucket, xmin::text, count, sum, max, last FROM {table}")
    return {r[:4]: r[4:] for r in rows}


def test_late_reading_corrects_only_the_affected_buckets(client: TestClient, loaded: str) -> None:
    hourly0, daily0 = rollup_snapshot(loaded, "rollup_hourly"), rollup_snapshot(loaded, "rollup_daily")
    # nothing changed since the last run: a run now changes nothing
    again = run_rollups(loaded)
    assert (again.hourly_rows, again.daily_rows) == (0, 0)
    assert rollup_snapshot(loaded, "rollup_hourly") == hourly0
    # a late reading of sa-d1, inside a minute that already has one, with a new maximum
    t_late = BASE + timedelta(days=3, hours=5, minutes=40, seconds=30)
    late = (t_late.astimezone(UTC), "sa-d1", DEVICES["sa-d1"], METRIC, 99.5, "ev-late")
    readings = pg_fetch(loaded, "SELECT time, device_id, region_code, metric, value, event_id FROM readings"
                                " WHERE time >= %s AND time < %s",
                        (t_late - timedelta(minutes=1), t_late + timedelta(minutes=1)))
    assert any(r[1] == "sa-d1" for r in readings)
    affected_minute = [r for r in readings if r[0] >= t_late.replace(second=0) and r[0] < t_late.replace(second=0)
                       + timedelta(minutes=1)]
    write(loaded, [late], aggregate_rows([*affected_minute, late]))
    res = run_rollups(loaded)
    hourly1, daily1 = rollup_snapshot(loaded, "rollup_hourly"), rollup_snapshot(loaded, "rollup_daily")
    hour = (BASE + timedelta(days=3, hours=5)).astimezone(UTC)
    day = (BASE + timedelta(days=3)).astimezone(UTC)
    expect_h = {("device", "sa-d1", METRIC, hour), ("kecamatan", "35.09.19", METRIC, hour)}
    expect_d = {("device", "sa-d1", METRIC, day), ("kecamatan", "35.09.19", METRIC, day)}
    changed_h = {k for k in hourly1 if hourly1[k] != hourly0.get(k)}
    changed_d = {k for k in daily1 if daily1[k] != daily0.get(k)}
    assert changed_h == expect_h and changed_d == expect_d
    assert (res.hourly_rows, res.daily_rows) == (2, 2)
    assert set(hourly1) == set(hourly0) and set(daily1) == set(daily0)
    for k in expect_h:
        assert hourly1[k][3] == 99.5  # max
    # and the API, from every source, equals raw SQL again
    for bucket, days in (("1h", 2), ("1h", 9), ("1d", 10)):
        lo = BASE + timedelta(days=2) if days == 2 else BASE
        hi = lo + timedelta(days=days)
        for agg in ("max", "count", "avg"):
            _, got = api_points(client, metric=METRIC, region="35.09.19", bucket=bucket, agg=agg,
                                **{"from": iso(lo), "to": iso(hi)})
            assert_same(got, truth(loaded, agg, bucket, lo, hi, "35.09.19"))


# --------------------------------------------------------------------------- bad parameters

INJECTIONS = ["'; DROP TABLE readings; --", "1) OR 1=1 --", "waterLevel' OR '1'='1", "\x00", "%", "35.09%",
              "rollup_daily; SELECT pg_sleep(5)", "../../etc/passwd", "ｗａｔｅｒ"]


def db_fingerprint(dsn: str) -> tuple[Any, ...]:
    return (
        pg_fetch(dsn, "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace ORDER BY 1"),
        pg_scalar(dsn, "SELECT count(*) FROM readings"),
        pg_scalar(dsn, "SELECT md5(string_agg(x::text, ',' ORDER BY x::text)) FROM rollup_daily x"),
        pg_scalar(dsn, "SELECT count(*) FROM devices"),
    )


BAD = [
    ({}, "metric"),
    ({"metric": "nope"}, "metric"),
    ({"metric": METRIC, "region": "35.10"}, "region"),
    ({"metric": METRIC, "region": "35.09.19.9999"}, "region"),
    ({"metric": METRIC, "device": "no-such-device"}, "device"),
    ({"metric": METRIC, "from": "2026-03-05T00:00:00Z", "to": "2026-03-04T00:00:00Z"}, "from"),
    ({"metric": METRIC, "from": "yesterday"}, "from"),
    ({"metric": METRIC, "to": "2026-03-04T00:00:00"}, "to"),
    ({"metric": METRIC, "bucket": "2m"}, "bucket"),
    ({"metric": METRIC, "agg": "median"}, "agg"),
    ({"metric": METRIC, "format": "xml"}, "format"),
    ({"metric": METRIC, "bucket": "1m", "from": "2025-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "bucket"),
    ({"metric": METRIC, "agg": "p95", "bucket": "1d", "from": "2025-01-01T00:00:00Z",
      "to": "2026-01-01T00:00:00Z"}, "agg"),
    ({"metric": METRIC, "limit": "5"}, "limit"),
]


@pytest.mark.parametrize(("params", "parameter"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_parameters_are_400(client: TestClient, params: dict[str, str], parameter: str) -> None:
    r = client.get("/v1/series", params=params)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "bad_parameter" and body["parameter"] == parameter and body["message"]
    if parameter == "metric":
        assert METRIC in body["valid"] and "pm25" in body["valid"]


def test_injection_in_every_parameter_changes_nothing(client: TestClient, loaded: str) -> None:
    before = db_fingerprint(loaded)
    good = {"metric": METRIC, "region": "35.09.19", "from": iso(BASE), "to": iso(BASE + timedelta(days=1)),
            "bucket": "1h", "agg": "avg", "format": "json"}
    for name in [*good, "device"]:
        for evil in INJECTIONS:
            params = {**good, name: evil}
            r = client.get("/v1/series", params=params)
            assert r.status_code == 400, (name, evil, r.text)
            if evil.isprintable():  # control characters are refused before any route (also a 400)
                assert r.json().get("parameter") == name, (name, evil, r.text)
    for name, evil in (("level", INJECTIONS[0]), ("parent", INJECTIONS[0]), ("parent", "\x00"), ("parent", "99")):
        r = client.get("/v1/regions", params={name: evil})
        assert r.status_code == 400 and (r.json().get("parameter") == name or not evil.isprintable())
    assert db_fingerprint(loaded) == before
    # and the API still answers correctly afterwards
    _, got = api_points(client, **good)
    assert_same(got, truth(loaded, "avg", "1h", BASE, BASE + timedelta(days=1), "35.09.19"))


# --------------------------------------------------------------------------- regions


def test_regions_hierarchy(client: TestClient, loaded: str) -> None:
    r = client.get("/v1/regions", params={"level": "kecamatan"})
    assert r.status_code == 200
    kec = r.json()["regions"]
    assert len(kec) == 31 == pg_scalar(loaded, "SELECT count(*) FROM regions WHERE level = 'kecamatan'")
    assert all(k["parent_code"] == "35.09" for k in kec)
    kaliwates = next(k for k in kec if k["code"] == "35.09.19")
    assert kaliwates["name"] == "Kaliwates"
    children = client.get("/v1/regions", params={"parent": "35.09.19"}).json()
    assert children["count"] == kaliwates["children"] > 0
    assert {c["level"] for c in children["regions"]} <= {"desa", "kelurahan"}
    everything = client.get("/v1/regions").json()
    assert everything["count"] == 280
    assert math.isclose(len({x["code"] for x in everything["regions"]}), 280)


def test_idle_connections_are_reused_and_a_dead_one_is_replaced(client: TestClient, loaded: str) -> None:
    params = {"metric": METRIC, "region": "35.09.19", "bucket": "1d", "from": iso(BASE),
              "to": iso(BASE + timedelta(days=DAYS))}
    first = api_points(client, **params)[1]

    def backends() -> list[int]:
        return [r[0] for r in pg_fetch(loaded, "SELECT pid FROM pg_stat_activity"
                                               " WHERE application_name = 'arus-api-series'")]

    pids = backends()
    assert len(pids) == 1  # kept idle for the next request
    assert api_points(client, **params)[1] == first and backends() == pids
    pg_fetch(loaded, "SELECT pg_terminate_backend(%s)", (pids[0],))
    assert api_points(client, **params)[1] == first  # the dead connection is replaced transparently
    assert backends() and backends() != pids
