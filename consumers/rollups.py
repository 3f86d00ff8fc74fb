"""Hourly and daily rollups of the 1-minute aggregates, and retention: the periodic storage jobs
that run inside `arus sink` (next to the Kafka sinks, consumers/sink.py `_main`).

Plain PostgreSQL (rollup_hourly / rollup_daily are tables, 005_rollups.sql):
  every `rollup_interval_s` the job takes the 1-minute windows changed since its watermark
  (aggregates.updated_at > watermark, an index scan), derives the hours and WIB days they belong to,
  and recomputes exactly those buckets from `aggregates` (hours) and from `rollup_hourly` (days).
  An upsert that would not change a row leaves it alone, so a late reading rewrites only the hour
  and the day it falls in, and running the job twice changes nothing. The watermark stays a margin
  behind: it never passes a write transaction that is still open (its rows would be invisible now
  and carry an older updated_at), so nothing is skipped; recomputing a bucket twice is harmless.
  Several sinks may run the job: the watermark row is locked, so they take turns.
  Every `retention_interval_s` rows older than retention_<table>_days are deleted in small batches.

TimescaleDB (rollup_hourly / rollup_daily are continuous aggregates, 005_rollups.timescale.sql):
  refresh, compression and retention are TimescaleDB policies. The job only (once) materialises the
  whole history after the migration created the views WITH NO DATA, and re-applies the retention and
  compression ages of the settings when they differ from the policies'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge
from psycopg import sql

from infra.db import connect
from infra.settings import Settings

log = logging.getLogger("arus.rollups")

WIB = timezone(timedelta(hours=7))
# Origin of every date_bin: buckets of an hour or more start at WIB midnight (no DST in Indonesia).
ORIGIN = datetime(2000, 1, 1, tzinfo=WIB)
ORIGIN_SQL = "TIMESTAMPTZ '2000-01-01 00:00:00+07'"

STATE_ROLLUPS = "rollups"
STATE_CAGG_REFRESH = "cagg_full_refresh"
# The watermark trails now() by at least this much and at most MAX_LAG (an idle-in-transaction
# session must not hold the job back forever; a sink transaction lasts well under a second).
MIN_LAG = timedelta(seconds=30)
MAX_LAG = timedelta(minutes=10)
RETENTION_BATCH = 50_000

# table -> (time column, Settings field with its retention in days)
RETENTION: dict[str, tuple[str, str]] = {
    "readings": ("time", "retention_readings_days"),
    "aggregates": ("bucket", "retention_aggregates_days"),
    "rollup_hourly": ("bucket", "retention_rollup_hourly_days"),
    "rollup_daily": ("bucket", "retention_rollup_daily_days"),
}

_STATE_COLS = ("region_code", "count", "min", "max", "sum", "mean", "last", "last_time")


def _upsert(table: str, select: str) -> str:
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in _STATE_COLS)
    old = ", ".join(f"{table}.{c}" for c in _STATE_COLS)
    new = ", ".join(f"EXCLUDED.{c}" for c in _STATE_COLS)
    return (
        f"INSERT INTO {table} (bucket, scope, key, metric, {', '.join(_STATE_COLS)}) {select}"
        f" ON CONFLICT (scope, key, metric, bucket) DO UPDATE SET {sets}"
        f" WHERE ({old}) IS DISTINCT FROM ({new})"
    )


# The merge of windows into a bigger bucket: counts and sums add up, min/max of min/max, the mean is
# sum/count (never a mean of means), `last` is the value with the latest observation time.
_MERGE = (
    "(array_agg(s.region_code ORDER BY s.last_time DESC))[1], sum(s.count), min(s.min), max(s.max),"
    " sum(s.sum), sum(s.sum) / sum(s.count), (array_agg(s.last ORDER BY s.last_time DESC))[1], max(s.last_time)"
)

_TOUCHED_DDL = (
    'CREATE TEMP TABLE IF NOT EXISTS rollup_touched (scope text COLLATE "C", key text COLLATE "C",'
    ' metric text COLLATE "C", bucket timestamptz) ON COMMIT DELETE ROWS'
)
_TOUCHED = (
    "INSERT INTO rollup_touched (scope, key, metric, bucket)"
    f" SELECT DISTINCT scope, key, metric, date_bin('1 hour', bucket, {ORIGIN_SQL})"
    " FROM aggregates WHERE updated_at > %(wm)s"
)
_HOURLY = _upsert(
    "rollup_hourly",
    f"SELECT t.bucket, s.scope, s.key, s.metric, {_MERGE}"
    " FROM rollup_touched t JOIN aggregates s ON s.scope = t.scope AND s.key = t.key AND s.metric = t.metric"
    " AND s.bucket >= t.bucket AND s.bucket < t.bucket + interval '1 hour'"
    " GROUP BY t.bucket, s.scope, s.key, s.metric",
)
_DAILY = _upsert(
    "rollup_daily",
    f"SELECT t.day, s.scope, s.key, s.metric, {_MERGE}"
    f" FROM (SELECT DISTINCT scope, key, metric, date_bin('1 day', bucket, {ORIGIN_SQL}) AS day"
    "       FROM rollup_touched) t"
    " JOIN rollup_hourly s ON s.scope = t.scope AND s.key = t.key AND s.metric = t.metric"
    " AND s.bucket >= t.day AND s.bucket < t.day + interval '1 day'"
    " GROUP BY t.day, s.scope, s.key, s.metric",
)
# The oldest write transaction of another session: its rows are invisible to us until it commits.
_OLDEST_WRITER = (
    "SELECT now(), (SELECT min(xact_start) FROM pg_stat_activity"
    " WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid())"
)


@dataclass(frozen=True)
class RollupResult:
    touched_hours: int  # (series, hour) pairs with a changed 1-minute window
    hourly_rows: int  # rows of rollup_hourly inserted or changed
    daily_rows: int
    watermark: datetime
    mode: str = "plain"


def rollup_mode(conn: psycopg.Connection[Any]) -> str:
    """'plain' (tables kept by this job), 'timescale' (continuous aggregates) or 'absent'."""
    row = conn.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass('rollup_hourly')").fetchone()
    if row is None:
        return "absent"
    return "plain" if row[0] in ("r", b"r") else "timescale"


def new_watermark(now: datetime, oldest_writer: datetime | None) -> datetime:
    """How far the job may say it got: MIN_LAG behind now, not past an open write transaction, but
    never more than MAX_LAG behind (pure; unit-tested)."""
    wm = now - MIN_LAG
    if oldest_writer is not None:
        wm = min(wm, oldest_writer - timedelta(seconds=1))
    return max(wm, now - MAX_LAG)


def rollup_once(conn: psycopg.Connection[Any]) -> RollupResult:
    """One run of the plain-PostgreSQL rollup job (conn idle, autocommit or not). Idempotent."""
    with conn.transaction():
        conn.execute(
            "INSERT INTO rollup_state (name, watermark) VALUES (%s, '-infinity') ON CONFLICT (name) DO NOTHING",
            (STATE_ROLLUPS,),
        )
        row = conn.execute(
            "SELECT watermark FROM rollup_state WHERE name = %s FOR UPDATE", (STATE_ROLLUPS,)
        ).fetchone()
        assert row is not None
        old_wm = row[0]
        clock = conn.execute(_OLDEST_WRITER).fetchone()
        assert clock is not None
        wm = new_watermark(clock[0], clock[1])
        conn.execute(_TOUCHED_DDL)
        touched = conn.execute(_TOUCHED, {"wm": old_wm}).rowcount
        hourly = daily = 0
        if touched:
            hourly = conn.execute(_HOURLY).rowcount
            daily = conn.execute(_DAILY).rowcount
        conn.execute("TRUNCATE rollup_touched")
        if wm > old_wm:
            conn.execute(
                "UPDATE rollup_state SET watermark = %s, updated_at = now() WHERE name = %s", (wm, STATE_ROLLUPS)
            )
    return RollupResult(touched, hourly, daily, max(wm, old_wm))


def retention_once(conn: psycopg.Connection[Any], settings: Settings, batch: int = RETENTION_BATCH) -> dict[str, int]:
    """Delete rows older than each table's retention (plain PostgreSQL), in short transactions."""
    deleted: dict[str, int] = {}
    for table, (column, field) in RETENTION.items():
        days = getattr(settings, field)
        if days is None:
            continue
        stmt = sql.SQL(
            "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE {c} < now() - make_interval(days => %s)"
            " LIMIT %s))"
        ).format(t=sql.Identifier(table), c=sql.Identifier(column))
        total = 0
        while True:
            with conn.transaction():
                n = conn.execute(stmt, (days, batch)).rowcount
            total += n
            if n < batch:
                break
        deleted[table] = total
    return deleted


# --------------------------------------------------------------------------- TimescaleDB


def timescale_full_refresh(conn: psycopg.Connection[Any]) -> bool:
    """Materialise the whole history of both continuous aggregates once (conn in autocommit: the
    procedure cannot run in a transaction block). Returns True when it ran now."""
    done = conn.execute("SELECT 1 FROM rollup_state WHERE name = %s", (STATE_CAGG_REFRESH,)).fetchone()
    if done is not None:
        return False
    for view in ("rollup_hourly", "rollup_daily"):
        # window_end: up to an hour ago; the policies and real-time aggregation cover the rest
        conn.execute(
            sql.SQL("CALL refresh_continuous_aggregate({}, NULL, now() - interval '1 hour')").format(
                sql.Literal(view)
            )
        )
    conn.execute(
        "INSERT INTO rollup_state (name, watermark) VALUES (%s, now()) ON CONFLICT (name) DO NOTHING",
        (STATE_CAGG_REFRESH,),
    )
    return True


_POLICY_TARGET = """
SELECT coalesce(
  (SELECT materialization_hypertable_name FROM timescaledb_information.continuous_aggregates
   WHERE view_name = %(t)s),
  %(t)s)
"""


def _policy_interval(conn: psycopg.Connection[Any], table: str, proc: str, key: str) -> timedelta | None:
    row = conn.execute(
        "SELECT (j.config->>%(key)s)::interval FROM timescaledb_information.jobs j"
        f" WHERE j.proc_name = %(proc)s AND j.hypertable_name = ({_POLICY_TARGET})",
        {"key": key, "proc": proc, "t": table},
    ).fetchone()
    return None if row is None else row[0]


def timescale_apply_policies(conn: psycopg.Connection[Any], settings: Settings) -> list[str]:
    """Make the retention and compression policies match the settings (autocommit conn)."""
    changed: list[str] = []
    for table, (_, field) in RETENTION.items():
        days = getattr(settings, field)
        current = _policy_interval(conn, table, "policy_retention", "drop_after")
        wanted = None if days is None else timedelta(days=days)
        if current == wanted:
            continue
        with conn.transaction():
            conn.execute("SELECT remove_retention_policy(%s, if_exists => TRUE)", (table,))
            if wanted is not None:
                conn.execute("SELECT add_retention_policy(%s, drop_after => %s)", (table, wanted))
        changed.append(f"retention {table} {days} days")
    for table in ("readings", "aggregates"):
        wanted = timedelta(days=settings.compress_after_days)
        if _policy_interval(conn, table, "policy_compression", "compress_after") == wanted:
            continue
        with conn.transaction():
            conn.execute("SELECT remove_compression_policy(%s, if_exists => TRUE)", (table,))
            conn.execute("SELECT add_compression_policy(%s, compress_after => %s)", (table, wanted))
        changed.append(f"compression {table} after {settings.compress_after_days} days")
    return changed


# --------------------------------------------------------------------------- the periodic task


class RollupJob:
    """The storage jobs of `arus sink`. A failure is logged and retried at the next tick: it never
    stops the sink (rollups are derived data; the next successful run catches up)."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.dsn = settings.database_dsn()
        self.stopping = asyncio.Event()
        reg = registry if registry is not None else CollectorRegistry()
        self.runs = Counter("arus_rollup_runs_total", "storage job runs", ["job", "outcome"], registry=reg)
        self.rows = Counter("arus_rollup_rows_total", "rollup rows written / rows deleted", ["table"], registry=reg)
        self.lag = Gauge("arus_rollup_watermark_lag_seconds", "now - the rollup job's watermark", registry=reg)
        self._conn: psycopg.Connection[Any] | None = None
        self._last_retention = float("-inf")
        self._timescale_ready = False

    def request_stop(self) -> None:
        self.stopping.set()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.dsn, autocommit=True)
        return self._conn

    def tick(self) -> str:
        """One round of whatever is due (blocking; run in a thread). Returns the mode."""
        conn = self._connection()
        mode = rollup_mode(conn)
        if mode == "plain":
            res = rollup_once(conn)
            self.rows.labels("rollup_hourly").inc(res.hourly_rows)
            self.rows.labels("rollup_daily").inc(res.daily_rows)
            self.lag.set(max(0.0, time.time() - res.watermark.timestamp()))
            self.runs.labels("rollups", "ok").inc()
            if res.hourly_rows or res.daily_rows:
                log.info("rollups: %d changed hours -> %d hourly, %d daily rows",
                         res.touched_hours, res.hourly_rows, res.daily_rows)
            if time.monotonic() - self._last_retention >= self.settings.retention_interval_s:
                deleted = retention_once(conn, self.settings)
                self._last_retention = time.monotonic()
                for table, n in deleted.items():
                    self.rows.labels(f"deleted_{table}").inc(n)
                self.runs.labels("retention", "ok").inc()
                if any(deleted.values()):
                    log.info("retention: deleted %s", deleted)
        elif mode == "timescale" and not self._timescale_ready:
            for change in timescale_apply_policies(conn, self.settings):
                log.info("timescaledb policy set: %s", change)
            if timescale_full_refresh(conn):
                log.info("continuous aggregates materialised over the whole history")
            self._timescale_ready = True
        return mode

    async def run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    await asyncio.to_thread(self.tick)
                except Exception as exc:  # noqa: BLE001 - derived data: log, retry at the next tick
                    self.runs.labels("rollups", "error").inc()
                    log.warning("storage job failed (retrying in %.0fs): %s", self.settings.rollup_interval_s, exc)
                    if self._conn is not None:
                        with contextlib.suppress(Exception):
                            self._conn.close()
                        self._conn = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.settings.rollup_interval_s)
        finally:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
