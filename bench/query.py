"""The `query` stage of `arus bench` (opt-in: `arus bench query [--quick]`): a realistic year of data
for 500 devices in a scratch database, then the typical /v1/series requests and analyst SQL, each
timed repeatedly (p50/p95).

Data (generated in PostgreSQL with generate_series, the fleet of bench.data: every metric of each
device's kind):
  rollup_hourly, rollup_daily   the whole year, per device and per kecamatan (as the rollup job keeps them)
  aggregates                    the last `query_agg_days` days of 1-minute windows (6 readings each)
  readings                      the last `query_raw_hours` hours, one reading per minute per series
Secondary indexes are dropped during the load and rebuilt after it (the same definitions), then ANALYZE.

Requests go through the real app (create_app, in process, over the ASGI transport): parameter checks,
a new read-only connection per request, the query, JSON/CSV encoding. PostgreSQL is the session's
embedded one (or ARUS_DATABASE_URL's server; the role needs CREATEDB); the scratch database is
dropped at the end.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from bench import data
from bench.stats import latency_summary, percentile

if TYPE_CHECKING:
    from bench.stages import Context

ORIGIN = "TIMESTAMPTZ '2000-01-01 00:00:00+07'"
LOADED_TABLES = ("readings", "aggregates", "rollup_hourly", "rollup_daily")


@contextlib.contextmanager
def _server(ctx: Context) -> Iterator[str]:
    """DSN of a database on a PostgreSQL server we may create databases on."""
    import os

    from infra import embedded

    if ctx.stack is not None and ctx.stack.dsn:
        yield ctx.stack.dsn
        return
    if os.environ.get("ARUS_DATABASE_URL"):
        yield os.environ["ARUS_DATABASE_URL"]
        return
    svc = embedded.start_postgres(embedded.free_port(), ctx.base / "postgres")
    ctx.say(f"started embedded {svc.name} at {svc.url} in {svc.started_s:.1f}s")
    try:
        yield svc.url
    finally:
        svc.stop(timeout=20)


@contextlib.contextmanager
def scratch_database(server_dsn: str) -> Iterator[str]:
    import psycopg
    from psycopg import conninfo, sql

    name = f"bench_query_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo.conninfo_to_dict(server_dsn)
    params["dbname"] = name
    try:
        yield conninfo.make_conninfo(**params)  # type: ignore[arg-type]
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def load(ctx: Context, dsn: str, now: datetime) -> dict[str, Any]:
    """Generate the data; returns row counts, sizes and load seconds."""
    import psycopg

    s = ctx.sizes
    fleet = data.fleet(f"q{ctx.run_id}", s.query_devices)
    series = [(d.device_id, d.region, m, i % 17 + 1.0) for i, d in enumerate(fleet) for m in d.metrics]
    hour_end = now.replace(minute=0, second=0, microsecond=0)
    year_start = hour_end - timedelta(days=s.query_days)
    minute_end = now.replace(second=0, microsecond=0)
    agg_start = minute_end - timedelta(days=s.query_agg_days)
    raw_start = minute_end - timedelta(hours=s.query_raw_hours)
    out: dict[str, Any] = {"devices": len(fleet), "series": len(series), "days": s.query_days,
                           "agg_days": s.query_agg_days, "raw_hours": s.query_raw_hours}
    t_all = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO devices (device_id, kind, region_code) VALUES (%s, %s, %s)",
                            [(d.device_id, d.kind, d.region) for d in fleet])
        conn.execute("CREATE UNLOGGED TABLE bench_series (device_id text COLLATE \"C\", region_code text COLLATE \"C\","
                     " metric text COLLATE \"C\", base float8)")
        with conn.cursor() as cur, cur.copy("COPY bench_series FROM STDIN") as copy:
            for row in series:
                copy.write_row(row)
        indexes = conn.execute(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i"
            " WHERE i.schemaname = 'public' AND i.tablename = ANY(%s)"
            " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)",
            (list(LOADED_TABLES),)).fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        # one row per series: each device's metrics, and each (kecamatan, metric) with its device count
        conn.execute("""CREATE UNLOGGED TABLE bench_all AS
            SELECT 'device'::text AS scope, device_id AS key, region_code, metric, base, 1 AS n FROM bench_series
            UNION ALL
            SELECT 'kecamatan', left(region_code, 8), left(region_code, 8), metric, avg(base), count(*)::int
            FROM bench_series GROUP BY left(region_code, 8), metric""")
        value = "s.base + 3 * sin(extract(epoch FROM {t}) / 43200.0 * pi()) + random()"
        steps = [
            ("rollup_hourly", f"""
                INSERT INTO rollup_hourly (bucket, scope, key, region_code, metric, count, min, max, sum, mean, last, last_time)
                SELECT h, s.scope, s.key, s.region_code, s.metric, 360 * s.n, v - 1, v + 1, 360 * s.n * v, v, v,
                       h + interval '59 minutes 50 seconds'
                FROM bench_all s CROSS JOIN generate_series(%(y0)s::timestamptz, %(h1)s, interval '1 hour') AS h
                CROSS JOIN LATERAL (SELECT {value.format(t='h')} AS v) x"""),
            ("rollup_daily", f"""
                INSERT INTO rollup_daily (bucket, scope, key, region_code, metric, count, min, max, sum, mean, last, last_time)
                SELECT d, s.scope, s.key, s.region_code, s.metric, 8640 * s.n, v - 4, v + 4, 8640 * s.n * v, v, v,
                       d + interval '23 hours 59 minutes 50 seconds'
                FROM bench_all s
                CROSS JOIN generate_series(date_bin('1 day', %(y0)s::timestamptz, {ORIGIN}), %(h1)s, interval '1 day') AS d
                CROSS JOIN LATERAL (SELECT {value.format(t='d')} AS v) x"""),
            ("aggregates", f"""
                INSERT INTO aggregates (bucket, scope, key, region_code, metric, bucket_end, count, min, max, sum, mean,
                                        last, last_time, final)
                SELECT m, s.scope, s.key, s.region_code, s.metric, m + interval '1 minute', 6 * s.n, v - 0.5, v + 0.5,
                       6 * s.n * v, v, v, m + interval '50 seconds', true
                FROM bench_all s CROSS JOIN generate_series(%(a0)s::timestamptz, %(m1)s, interval '1 minute') AS m
                CROSS JOIN LATERAL (SELECT {value.format(t='m')} AS v) x"""),
            ("readings", f"""
                INSERT INTO readings (time, device_id, region_code, metric, value, event_id)
                SELECT m + interval '17 seconds', s.device_id, s.region_code, s.metric, {value.format(t='m')},
                       s.device_id || '-' || extract(epoch FROM m)::bigint
                FROM generate_series(%(r0)s::timestamptz, %(m1)s, interval '1 minute') AS m CROSS JOIN bench_series s"""),
        ]
        params = {"y0": year_start, "h1": hour_end, "a0": agg_start, "m1": minute_end, "r0": raw_start}
        timings = {}
        for label, stmt in steps:
            t0 = time.monotonic()
            n = conn.execute(stmt, params).rowcount
            timings[label] = {"rows": n, "seconds": round(time.monotonic() - t0, 1)}
            ctx.say(f"query stage: {label}: {n:,} rows in {timings[label]['seconds']}s")
        t0 = time.monotonic()
        for _, ddl in indexes:
            conn.execute(ddl)
        conn.execute("ANALYZE")
        timings["indexes + analyze"] = {"seconds": round(time.monotonic() - t0, 1)}
        ctx.say(f"query stage: {len(indexes)} indexes rebuilt and ANALYZE in {timings['indexes + analyze']['seconds']}s")
        sizes = {t: conn.execute("SELECT count(*), pg_total_relation_size(%s::regclass) FROM " + t, (t,)).fetchone()
                 for t in LOADED_TABLES}
    out["load"] = timings
    out["load_seconds"] = round(time.monotonic() - t_all, 1)
    out["tables"] = {t: {"rows": int(v[0]), "mb": round(v[1] / 2**20, 1)} for t, v in sizes.items() if v}
    out["sample"] = {"kecamatan": fleet[0].region[:8], "desa": fleet[0].region, "device": fleet[0].device_id,
                     "metric": "waterLevel", "kind_metric": fleet[0].metrics[0]}
    return out


def _iso(t: datetime) -> str:
    return t.isoformat()


def api_queries(sample: dict[str, str], now: datetime) -> list[tuple[str, dict[str, str], str]]:
    """(name, query parameters, expected source) of the typical /v1/series requests."""
    kec, desa, dev = sample["kecamatan"], sample["desa"], sample["device"]
    day, week = now - timedelta(days=1), now - timedelta(days=7)
    month, quarter, year = now - timedelta(days=30), now - timedelta(days=90), now - timedelta(days=364)
    to = _iso(now)
    return [
        ("kecamatan, 24 h, 1m avg", {"metric": "waterLevel", "region": kec, "bucket": "1m", "from": _iso(day),
                                     "to": to}, "aggregates"),
        ("kabupaten, 24 h, 15m max", {"metric": "waterLevel", "region": "35.09", "bucket": "15m", "agg": "max",
                                      "from": _iso(day), "to": to}, "aggregates"),
        ("device, 7 d, 1h avg", {"metric": sample["kind_metric"], "device": dev, "bucket": "1h", "from": _iso(week),
                                 "to": to}, "aggregates"),
        ("kabupaten, 7 d, 1h avg", {"metric": "pm25", "region": "35.09", "bucket": "1h", "from": _iso(week),
                                    "to": to}, "aggregates"),
        ("kecamatan, 30 d, 1h avg", {"metric": "waterLevel", "region": kec, "bucket": "1h", "from": _iso(month),
                                     "to": to}, "rollup_hourly"),
        ("kecamatan, 30 d, 1h avg, csv", {"metric": "waterLevel", "region": kec, "bucket": "1h", "from": _iso(month),
                                          "to": to, "format": "csv"}, "rollup_hourly"),
        ("kabupaten, 1 year, 6h max", {"metric": "waterLevel", "region": "35.09", "bucket": "6h", "agg": "max",
                                       "from": _iso(year), "to": to}, "rollup_hourly"),
        ("kabupaten, 1 year, 1d avg", {"metric": "pm25", "region": "35.09", "bucket": "1d", "from": _iso(year),
                                       "to": to}, "rollup_daily"),
        ("kecamatan, 1 year, 1d last", {"metric": "waterLevel", "region": kec, "bucket": "1d", "agg": "last",
                                        "from": _iso(year), "to": to}, "rollup_daily"),
        ("desa, 90 d, 1d sum", {"metric": sample["kind_metric"], "region": desa, "bucket": "1d", "agg": "sum",
                                "from": _iso(quarter), "to": to}, "rollup_daily"),
        ("kecamatan, 24 h, 1h p95 (raw)", {"metric": "waterLevel", "region": kec, "bucket": "1h", "agg": "p95",
                                           "from": _iso(day), "to": to}, "readings"),
    ]


SQL_QUERIES: list[tuple[str, str]] = [
    ("SQL: last value per device (readings, DISTINCT ON)",
     "SELECT DISTINCT ON (rd.device_id) rd.device_id, rd.value, rd.time FROM readings rd"
     " WHERE rd.metric = 'waterLevel' AND rd.time > now() - interval '1 day' ORDER BY rd.device_id, rd.time DESC"),
    ("SQL: kabupaten hourly mean from raw readings, 24 h",
     f"SELECT date_bin('1 hour', rd.time, {ORIGIN}), avg(rd.value) FROM readings rd"
     " WHERE rd.metric = 'pm25' AND rd.region_code LIKE '35.09.%' AND rd.time > now() - interval '1 day' GROUP BY 1"),
    ("SQL: daily mean per kecamatan, 1 year (rollup_daily)",
     "SELECT d.bucket, r.name, d.mean FROM rollup_daily d JOIN regions r ON r.code = d.key"
     " WHERE d.scope = 'kecamatan' AND d.metric = 'waterLevel' AND d.bucket > now() - interval '365 days'"),
    ("SQL: kabupaten 6-hourly max, 1 year (rollup_hourly)",
     f"SELECT date_bin('6 hours', h.bucket, {ORIGIN}), max(h.max) FROM rollup_hourly h"
     " WHERE h.scope = 'kecamatan' AND h.metric = 'waterLevel' AND h.region_code LIKE '35.09.%'"
     " AND h.bucket > now() - interval '365 days' GROUP BY 1"),
]


def _time(fn: Any, reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _summary(ms: list[float]) -> dict[str, Any]:
    p95 = percentile(ms, 95)
    return {**latency_summary(ms), "p95": None if p95 is None else round(p95, 1)}


def query(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    import psycopg
    from fastapi.testclient import TestClient

    from arus.api import create_app
    from bench.stages import StageError
    from infra.db import migrate
    from infra.settings import Settings

    reps = ctx.sizes.query_reps
    now = datetime.now(UTC)
    results: dict[str, Any] = {}
    with _server(ctx) as server, scratch_database(server) as dsn:
        migrate(dsn)
        details = load(ctx, dsn, now)
        app = create_app(Settings(database_url=dsn))
        with TestClient(app) as client:
            for name, params, source in api_queries(details["sample"], now):
                last: dict[str, Any] = {}

                def call(params: dict[str, str] = params, last: dict[str, Any] = last) -> None:
                    r = client.get("/v1/series", params=params)
                    if r.status_code != 200:
                        raise StageError(f"/v1/series {params}: {r.status_code} {r.text[:300]}")
                    last["source"] = r.headers.get("x-arus-source")
                    last["points"] = (r.text.count("\n") - 1) if params.get("format") == "csv" else r.json()["count"]

                ms = _time(call, reps)
                if last.get("source") != source:
                    raise StageError(f"{name}: answered from {last.get('source')}, expected {source}")
                if not last.get("points"):
                    raise StageError(f"{name}: no points (the generated data does not cover it)")
                results[name] = {"kind": "api", "source": source, "points": last["points"], **_summary(ms)}
                ctx.say(f"query stage: {name}: p50 {results[name]['p50']} ms, p95 {results[name]['p95']} ms "
                        f"({last['points']} points from {source})")
        with psycopg.connect(dsn, autocommit=True) as conn:
            for name, stmt in SQL_QUERIES:
                rows: list[int] = []

                def run(stmt: str = stmt, rows: list[int] = rows) -> None:
                    rows.append(len(conn.execute(stmt).fetchall()))

                ms = _time(run, reps)
                results[name] = {"kind": "sql", "rows": rows[-1], **_summary(ms)}
                ctx.say(f"query stage: {name}: p50 {results[name]['p50']} ms, p95 {results[name]['p95']} ms "
                        f"({rows[-1]} rows)")
    details["queries"] = results
    details["reps"] = reps
    details["how"] = ("each request/statement run 2 times to warm up, then `reps` times in a row; wall time per "
                      "call: API = in-process ASGI request (new read-only connection, query, JSON/CSV); SQL = "
                      "statement over an open connection, rows fetched")
    year = results["kabupaten, 1 year, 1d avg"]
    day = results["kecamatan, 24 h, 1m avg"]
    figures = {
        "query_year_daily_p95_ms": year["p95"],
        "query_day_minutes_p95_ms": day["p95"],
        "query_api_worst_p95_ms": max(r["p95"] for r in results.values() if r["kind"] == "api"),
    }
    return figures, details
