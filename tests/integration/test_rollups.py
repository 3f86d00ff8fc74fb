"""Migration 005 and the storage jobs against a real PostgreSQL: upgrade from the previous version on
a database with data, a second migrate changes nothing, the retention job, the job as `arus sink`
runs it, and the TimescaleDB path (continuous aggregates, policies) whenever the extension exists."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from consumers.rollups import RollupJob, retention_once, rollup_mode, rollup_once
from infra.db import connect, has_timescale, migrate
from infra.settings import Settings
from tests.helpers import pg_fetch, pg_scalar
from tests.integration.test_migrations import catalog

ORIGIN_SQL = "TIMESTAMPTZ '2000-01-01 00:00:00+07'"


@pytest.fixture
def empty_db(pg_server_url: str) -> Iterator[str]:
    name = f"r_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def migrations_before(tmp_path: Path, version: int) -> Path:
    src = resources.files("infra").joinpath("migrations")
    dst = tmp_path / "migrations"
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name.endswith(".sql") and int(entry.name[:3]) < version:
            (dst / entry.name).write_text(entry.read_text("utf-8"), "utf-8")
    return dst


def insert_minutes(dsn: str, start: datetime, minutes: int, device: str = "up-1", region: str = "35.09.19.1001",
                   updated_at: str = "now()") -> None:
    """1-minute aggregates of one device (and its kecamatan) with value = minute index."""
    with connect(dsn, autocommit=True) as conn:
        for scope, key, reg in (("device", device, region), ("kecamatan", region[:8], region[:8])):
            conn.execute(
                f"""INSERT INTO aggregates (bucket, scope, key, region_code, metric, bucket_end, count, min, max,
                                           sum, mean, last, last_time, final, updated_at)
                    SELECT %(s)s + i * interval '1 minute', %(scope)s, %(key)s, %(reg)s, 'waterLevel',
                           %(s)s + (i + 1) * interval '1 minute', 2, i, i + 1, 2 * i + 1, i + 0.5, i + 1,
                           %(s)s + i * interval '1 minute' + interval '30 seconds', true, {updated_at}
                    FROM generate_series(0, %(n)s - 1) AS i""",
                {"s": start, "scope": scope, "key": key, "reg": reg, "n": minutes},
            )


HOURLY_TRUTH = f"""
SELECT scope, key, metric, date_bin('1 hour', bucket, {ORIGIN_SQL}) AS b, sum(count), min(min), max(max), sum(sum),
       (array_agg(last ORDER BY last_time DESC))[1], max(last_time)
FROM aggregates GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"""
HOURLY = "SELECT scope, key, metric, bucket, count, min, max, sum, last, last_time FROM rollup_hourly ORDER BY 1, 2, 3, 4"
DAILY_TRUTH = f"""
SELECT scope, key, metric, date_bin('1 day', bucket, {ORIGIN_SQL}) AS b, sum(count), min(min), max(max), sum(sum)
FROM aggregates GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"""
DAILY = "SELECT scope, key, metric, bucket, count, min, max, sum FROM rollup_daily ORDER BY 1, 2, 3, 4"


def plain_only(dsn: str) -> None:
    with connect(dsn) as conn:
        if rollup_mode(conn) != "plain":
            pytest.skip("TimescaleDB path: rollups are continuous aggregates (test_timescale_path)")


def test_upgrade_from_the_previous_version_rolls_up_existing_data(empty_db: str, tmp_path: Path) -> None:
    old = migrations_before(tmp_path, 5)
    applied = migrate(empty_db, old)
    assert applied and all(int(n[:3]) < 5 for n in applied)
    assert pg_scalar(empty_db, "SELECT to_regclass('rollup_hourly')") is None
    with connect(empty_db, autocommit=True) as conn:
        conn.execute("INSERT INTO devices (device_id, kind, region_code) VALUES ('up-1', 'water_level', '35.09.19.1001')")
    start = datetime(2026, 2, 27, 16, 0, tzinfo=UTC)  # 23:00 WIB: the data crosses a WIB midnight
    insert_minutes(empty_db, start, 180)
    # the new version: everything shipped, applied over the old database
    applied = migrate(empty_db)
    assert [n for n in applied if n.startswith("005")] == ["005_rollups"]
    plain_only(empty_db)
    assert pg_fetch(empty_db, HOURLY) == pg_fetch(empty_db, HOURLY_TRUTH)
    assert len(pg_fetch(empty_db, HOURLY)) == 2 * 3
    assert pg_fetch(empty_db, DAILY) == pg_fetch(empty_db, DAILY_TRUTH)
    assert len(pg_fetch(empty_db, DAILY)) == 2 * 2  # 23:00 WIB belongs to one day, 00:00-02:00 to the next
    # applying again changes nothing, data included
    before = catalog(empty_db)
    rows = pg_fetch(empty_db, "SELECT xmin::text, * FROM rollup_hourly ORDER BY scope, key, bucket")
    assert migrate(empty_db) == []
    assert catalog(empty_db) == before
    assert pg_fetch(empty_db, "SELECT xmin::text, * FROM rollup_hourly ORDER BY scope, key, bucket") == rows
    # and the job after the upgrade has nothing to change: the migration's backfill is complete
    with connect(empty_db, autocommit=True) as conn:
        res = rollup_once(conn)
    assert (res.hourly_rows, res.daily_rows) == (0, 0)
    assert pg_fetch(empty_db, "SELECT xmin::text, * FROM rollup_hourly ORDER BY scope, key, bucket") == rows


def test_job_follows_new_and_updated_windows(fresh_database_url: str) -> None:
    dsn = fresh_database_url
    plain_only(dsn)
    start = datetime(2026, 1, 10, 3, 0, tzinfo=UTC)
    insert_minutes(dsn, start, 120)
    job = RollupJob(Settings(database_url=dsn, retention_interval_s=3600))
    try:
        assert job.tick() == "plain"
        assert pg_fetch(dsn, HOURLY) == pg_fetch(dsn, HOURLY_TRUTH)
        assert pg_fetch(dsn, DAILY) == pg_fetch(dsn, DAILY_TRUTH)
        # the sink updates one window (a late reading): only its hour and day move
        pg_fetch(dsn, "UPDATE aggregates SET count = count + 1, max = 500, sum = sum + 500, updated_at = now()"
                      " WHERE scope = 'device' AND bucket = %s", (start + timedelta(minutes=70),))
        before = dict(((r[0], r[1], r[2]), r[3]) for r in pg_fetch(
            dsn, "SELECT scope, key, bucket, xmin::text FROM rollup_hourly"))
        job.tick()
        after = dict(((r[0], r[1], r[2]), r[3]) for r in pg_fetch(
            dsn, "SELECT scope, key, bucket, xmin::text FROM rollup_hourly"))
        assert {k for k in after if after[k] != before[k]} == {("device", "up-1", start + timedelta(hours=1))}
        assert pg_fetch(dsn, HOURLY) == pg_fetch(dsn, HOURLY_TRUTH)
        assert pg_fetch(dsn, DAILY) == pg_fetch(dsn, DAILY_TRUTH)
        lag = pg_scalar(dsn, "SELECT now() - watermark FROM rollup_state WHERE name = 'rollups'")
        assert timedelta(seconds=29) <= lag < timedelta(minutes=11)
    finally:
        if job._conn is not None:
            job._conn.close()


def test_retention_deletes_only_rows_past_their_table_age(fresh_database_url: str) -> None:
    dsn = fresh_database_url
    plain_only(dsn)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    with connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO devices (device_id, kind, region_code) VALUES ('ret-1', 'water_level', '35.09.19.1001')")
        conn.execute("""INSERT INTO readings (time, device_id, region_code, metric, value, event_id)
                        SELECT %s - d * interval '1 day' + interval '12 hours', 'ret-1', '35.09.19.1001', 'waterLevel', d, 'e' || d
                        FROM generate_series(0, 500, 10) AS d""", (now,))
    insert_minutes(dsn, now - timedelta(days=800), 30)
    insert_minutes(dsn, now - timedelta(days=2), 30)
    with connect(dsn, autocommit=True) as conn:
        rollup_once(conn)
    settings = Settings(database_url=dsn, retention_readings_days=400, retention_aggregates_days=365,
                        retention_rollup_hourly_days=700, retention_rollup_daily_days=None)
    with connect(dsn, autocommit=True) as conn:
        deleted = retention_once(conn, settings, batch=7)  # small batches: the loop must go on
    assert deleted["readings"] == len([d for d in range(0, 501, 10) if d > 400])
    assert pg_scalar(dsn, "SELECT max(value) FROM readings") == 400
    assert deleted["aggregates"] == 2 * 30
    assert pg_scalar(dsn, "SELECT min(bucket) FROM aggregates") >= now - timedelta(days=3)
    assert deleted["rollup_hourly"] > 0 and "rollup_daily" not in deleted
    assert pg_scalar(dsn, "SELECT min(bucket) FROM rollup_daily") < now - timedelta(days=799)
    with connect(dsn, autocommit=True) as conn:
        assert set(retention_once(conn, settings).values()) == {0}


def test_timescale_path(empty_db: str) -> None:
    available = pg_scalar(empty_db, "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
    migrate(empty_db)
    with psycopg.connect(empty_db) as conn:
        installed = has_timescale(conn)
        mode = rollup_mode(conn)
    if not available or not installed:
        assert mode == "plain"
        pytest.skip("the timescaledb extension is not available here; the plain path is tested above")
    assert mode == "timescale"
    caggs = {r[0]: r[1] for r in pg_fetch(
        empty_db, "SELECT view_name, materialized_only FROM timescaledb_information.continuous_aggregates")}
    assert caggs == {"rollup_hourly": False, "rollup_daily": False}
    jobs = {(r[0], r[1]) for r in pg_fetch(
        empty_db, "SELECT proc_name, coalesce(c.view_name, j.hypertable_name) FROM timescaledb_information.jobs j"
                  " LEFT JOIN timescaledb_information.continuous_aggregates c"
                  "   ON c.materialization_hypertable_name = j.hypertable_name")}
    assert {("policy_refresh_continuous_aggregate", "rollup_hourly"),
            ("policy_refresh_continuous_aggregate", "rollup_daily"),
            ("policy_compression", "readings"), ("policy_compression", "aggregates"),
            ("policy_retention", "readings"), ("policy_retention", "aggregates")} <= jobs
    # the same numbers as the plain path: real-time aggregation answers before any refresh
    insert_minutes(empty_db, datetime(2026, 2, 27, 16, 0, tzinfo=UTC), 180)
    assert pg_fetch(empty_db, HOURLY) == pg_fetch(empty_db, HOURLY_TRUTH)
    assert pg_fetch(empty_db, DAILY) == pg_fetch(empty_db, DAILY_TRUTH)
    job = RollupJob(Settings(database_url=empty_db, retention_readings_days=300))
    try:
        assert job.tick() == "timescale"
    finally:
        if job._conn is not None:
            job._conn.close()
    assert pg_fetch(empty_db, HOURLY) == pg_fetch(empty_db, HOURLY_TRUTH)
    assert pg_scalar(empty_db, "SELECT (config->>'drop_after')::interval FROM timescaledb_information.jobs"
                               " WHERE proc_name = 'policy_retention' AND hypertable_name = 'readings'") \
        == timedelta(days=300)


def test_job_task_rolls_up_and_stops_promptly(fresh_database_url: str) -> None:
    """The task as `arus sink` runs it: it keeps the rollups current and stops when asked."""
    import asyncio

    from tests.helpers import wait_until_async

    dsn = fresh_database_url
    plain_only(dsn)
    job = RollupJob(Settings(database_url=dsn, rollup_interval_s=0.2))

    async def scenario() -> float:
        task = asyncio.create_task(job.run())
        insert_minutes(dsn, datetime(2026, 1, 5, 0, 0, tzinfo=UTC), 90)
        await wait_until_async(lambda: pg_fetch(dsn, HOURLY) == pg_fetch(dsn, HOURLY_TRUTH)
                               and len(pg_fetch(dsn, HOURLY)) == 4, 20, message="rollups follow the aggregates")
        job.request_stop()
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(task, 10)
        return asyncio.get_running_loop().time() - t0

    assert asyncio.run(scenario()) < 5
    assert job._conn is None or job._conn.closed
