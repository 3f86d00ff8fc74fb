"""GET /v1/series: one metric over time for a region (any level, rolled up by code prefix) or a device.

Parameters (all optional but `metric`):
  metric   a metric name of schemas/sensors.py (waterLevel, pm25, ...)
  region   a Kemendagri code of Jember at any level: 35.09 (kabupaten), 35.09.19 (kecamatan),
           35.09.19.2001 (desa/kelurahan). Without region and device: the whole kabupaten.
  device   a device id (with region too: only if the device's readings are in that region)
  from,to  RFC 3339 with an offset (2026-11-28T07:00:00+07:00 or ...Z); default: the last 24 hours
  bucket   1m 5m 15m 1h 6h 1d; default: the smallest giving at most 1,500 points
  agg      avg min max sum count last p95 (default avg)
  format   json (default) or csv

Buckets of an hour or more start at 00:00 Asia/Jakarta (WIB); every point is a whole bucket: `from`
is rounded down to its bucket and `to` up (the response echoes the range used). Buckets without data
are left out. `n` is the number of readings behind each point.

Where the numbers come from (the same numbers from each, up to float rounding):
  p95                       raw `readings` (percentile_cont); ranges up to series_raw_max_days
  range <= 7 days, or bucket < 1h   `aggregates` (the stream's 1-minute windows)
  longer, bucket 1h / 6h     `rollup_hourly`;  longer, bucket 1d   `rollup_daily`
Regions: kabupaten and kecamatan use the per-kecamatan windows (plus devices registered at the
kabupaten itself), a desa its devices' windows. avg is sum/count over the bucket (a reading-weighted
mean, never a mean of means); last is the value with the latest observation time.

Every bad parameter is a 400 with {"error": "bad_parameter", "parameter", "message"} (and the valid
values where there is a list); the SQL is fixed text with bound parameters, its only variable parts
(table, aggregate expression) come from the whitelists below. The session is read-only with a
statement timeout.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from psycopg import sql
from psycopg.pq import TransactionStatus

from infra.settings import Settings
from schemas.regions import KABUPATEN_CODE, load_regions
from schemas.sensors import SENSOR_KINDS

T = TypeVar("T")
WIB = ZoneInfo("Asia/Jakarta")
ORIGIN = datetime(2000, 1, 1, tzinfo=timezone(timedelta(hours=7)))  # 00:00 WIB: origin of every bucket
BUCKETS: dict[str, timedelta] = {
    "1m": timedelta(minutes=1), "5m": timedelta(minutes=5), "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1), "6h": timedelta(hours=6), "1d": timedelta(days=1),
}
AGGS = ("avg", "min", "max", "sum", "count", "last", "p95")
FORMATS = ("json", "csv")
PARAMS = frozenset({"metric", "region", "device", "from", "to", "bucket", "agg", "format"})
DEFAULT_SPAN = timedelta(hours=24)
DEFAULT_TARGET_POINTS = 1500
AGGREGATES_MAX_SPAN = timedelta(days=7)  # longer ranges with buckets of 1h+ read the rollups
_DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def metric_units() -> dict[str, str]:
    units: dict[str, str] = {}
    for kind in SENSOR_KINDS.values():
        for m in kind.metrics.values():
            units.setdefault(m.name, m.unit)
    return dict(sorted(units.items()))


METRICS = metric_units()

# Whitelisted SQL: the value expression per source family and agg.
_ROLLED = {
    "avg": "sum(s.sum) / sum(s.count)",
    "min": "min(s.min)",
    "max": "max(s.max)",
    "sum": "sum(s.sum)",
    "count": "sum(s.count)",
    "last": "(array_agg(s.last ORDER BY s.last_time DESC))[1]",
}
_RAW = {
    "avg": "avg(s.value)",
    "min": "min(s.value)",
    "max": "max(s.value)",
    "sum": "sum(s.value)",
    "count": "count(*)",
    "last": "(array_agg(s.value ORDER BY s.time DESC))[1]",
    "p95": "percentile_cont(0.95) WITHIN GROUP (ORDER BY s.value)",
}
SOURCES = ("readings", "aggregates", "rollup_hourly", "rollup_daily")


class BadParameter(Exception):
    def __init__(self, parameter: str, message: str, valid: list[str] | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message
        self.valid = valid

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"error": "bad_parameter", "parameter": self.parameter, "message": self.message}
        if self.valid is not None:
            body["valid"] = self.valid
        return JSONResponse(status_code=400, content=body)


# --------------------------------------------------------------------------- pure planning


def parse_time(name: str, text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadParameter(name, f"{name} must be an RFC 3339 time such as 2026-11-28T07:00:00+07:00, "
                                 f"got {text[:60]!r}") from None
    if t.tzinfo is None or t.utcoffset() is None:
        raise BadParameter(name, f"{name} needs a UTC offset (Z or +07:00): {text[:60]!r}")
    if not datetime(1970, 1, 1, tzinfo=UTC) <= t <= datetime(9999, 1, 1, tzinfo=UTC):
        raise BadParameter(name, f"{name} is out of range: {text[:60]!r}")
    return t.astimezone(UTC)


def floor_bucket(t: datetime, width: timedelta) -> datetime:
    """date_bin(width, t, ORIGIN) in Python."""
    n = (t - ORIGIN) // width
    return (ORIGIN + n * width).astimezone(UTC)


def align(lo: datetime, hi: datetime, width: timedelta) -> tuple[datetime, datetime]:
    """from rounded down, to rounded up to whole buckets."""
    a = floor_bucket(lo, width)
    b = floor_bucket(hi, width)
    if b < hi:
        b += width
    return a, b


def default_bucket(span: timedelta) -> str:
    for name, width in BUCKETS.items():
        if span / width <= DEFAULT_TARGET_POINTS:
            return name
    return "1d"


def choose_source(width: timedelta, agg: str, span: timedelta) -> str:
    """Which table answers: raw readings only for p95; the 1-minute windows for short ranges and
    sub-hour buckets; otherwise the rollup whose bucket divides the requested one."""
    if agg == "p95":
        return "readings"
    if width < timedelta(hours=1) or span <= AGGREGATES_MAX_SPAN:
        return "aggregates"
    if width % timedelta(days=1) == timedelta(0):
        return "rollup_daily"
    return "rollup_hourly"


@dataclass(frozen=True)
class Plan:
    metric: str
    region: str | None
    region_level: str
    device: str | None
    lo: datetime
    hi: datetime
    bucket: str
    agg: str
    fmt: str
    source: str

    @property
    def width(self) -> timedelta:
        return BUCKETS[self.bucket]

    @property
    def points_max(self) -> int:
        return math.ceil((self.hi - self.lo) / self.width)


def plan(params: dict[str, str], settings: Settings, now: datetime) -> Plan:
    """Validate the query parameters and decide bucket, range and source (no database)."""
    unknown = sorted(set(params) - PARAMS)
    if unknown:
        raise BadParameter(unknown[0][:40], f"unknown parameter {unknown[0][:40]!r}", sorted(PARAMS))
    metric = params.get("metric")
    if not metric:
        raise BadParameter("metric", "metric is required", list(METRICS))
    if metric not in METRICS:
        raise BadParameter("metric", f"unknown metric {metric[:60]!r}", list(METRICS))
    regions = load_regions()
    region = params.get("region") or None
    if region is not None and region not in regions:
        raise BadParameter("region", f"unknown region {region[:60]!r}: a Kemendagri code of Kabupaten Jember "
                                     "such as 35.09, 35.09.19 or 35.09.19.2001 (GET /v1/regions lists them)")
    device = params.get("device") or None
    if device is not None and not _DEVICE_RE.match(device):
        raise BadParameter("device", f"not a device id: {device[:60]!r}")
    agg = params.get("agg") or "avg"
    if agg not in AGGS:
        raise BadParameter("agg", f"unknown agg {agg[:20]!r}", list(AGGS))
    fmt = params.get("format") or "json"
    if fmt not in FORMATS:
        raise BadParameter("format", f"unknown format {fmt[:20]!r}", list(FORMATS))
    hi = parse_time("to", params["to"]) if params.get("to") else now
    lo = parse_time("from", params["from"]) if params.get("from") else hi - DEFAULT_SPAN
    if lo >= hi:
        raise BadParameter("from", f"from ({lo.isoformat()}) must be before to ({hi.isoformat()})")
    bucket = params.get("bucket") or default_bucket(hi - lo)
    if bucket not in BUCKETS:
        raise BadParameter("bucket", f"unknown bucket {bucket[:20]!r}", list(BUCKETS))
    width = BUCKETS[bucket]
    requested = hi - lo
    lo, hi = align(lo, hi, width)
    span = hi - lo
    points = math.ceil(span / width)
    if points > settings.series_max_points:
        raise BadParameter("bucket", f"{points:,} buckets of {bucket} in this range, more than the limit of "
                                     f"{settings.series_max_points:,}: use a larger bucket or a shorter range")
    if agg == "p95" and span > timedelta(days=settings.series_raw_max_days):
        raise BadParameter("agg", f"p95 is computed from raw readings, for ranges up to "
                                  f"{settings.series_raw_max_days} days; this range is {span}")
    level = regions[region].level if region is not None else ("device" if device else "kabupaten")
    # the source follows the range asked for ("the last 7 days"), not its rounding to whole buckets
    return Plan(metric, region, level, device, lo, hi, bucket, agg, fmt, choose_source(width, agg, requested))


@functools.cache
def _kecamatans_of(kabupaten: str) -> tuple[str, ...]:
    return tuple(sorted(r.code for r in load_regions().values() if r.parent_code == kabupaten))


def build_query(p: Plan) -> tuple[sql.Composed, dict[str, Any]]:
    """The SQL of a plan: fixed text, whitelisted table and expression, bound values only."""
    params: dict[str, Any] = {"metric": p.metric, "lo": p.lo, "hi": p.hi, "width": p.width, "origin": ORIGIN,
                              "device": p.device, "code": p.region, "prefix": f"{p.region}.%"}
    conds: list[str] = []
    if p.source == "readings":
        time_col, expr, n_expr = "time", _RAW[p.agg], "count(*)"
        if p.device is not None:
            conds.append("s.device_id = %(device)s")
        if p.region is not None:
            conds.append("(s.region_code = %(code)s OR s.region_code LIKE %(prefix)s)")
    else:
        time_col, expr, n_expr = "bucket", _ROLLED[p.agg], "sum(s.count)"
        if p.device is not None:
            conds.append("s.scope = 'device' AND s.key = %(device)s")
            if p.region is not None:
                conds.append("(s.region_code = %(code)s OR s.region_code LIKE %(prefix)s)")
        elif p.region_level in ("desa", "kelurahan"):
            conds.append("s.scope = 'device' AND s.region_code = %(code)s")
        elif p.region_level == "kecamatan":
            conds.append("s.scope = 'kecamatan' AND s.region_code = %(code)s")
        else:  # the kabupaten: every kecamatan, plus devices registered at the kabupaten itself
            code = p.region or KABUPATEN_CODE
            params["code"] = code
            # equality on the 32 codes, not `LIKE '35.09.%'`: the prefix also matches every device row of
            # every desa, which the (metric, region_code, bucket) index would walk only to discard
            params["codes"] = [code, *_kecamatans_of(code)]
            conds.append("s.region_code = ANY(%(codes)s)"
                         " AND (s.scope = 'kecamatan' OR (s.scope = 'device' AND s.region_code = %(code)s))")
    where = " AND ".join(["s.metric = %(metric)s", f"s.{time_col} >= %(lo)s", f"s.{time_col} < %(hi)s", *conds])
    assert p.source in SOURCES
    text = (f"SELECT date_bin(%(width)s, s.{time_col}, %(origin)s) AS t, {expr} AS value, {n_expr} AS n"
            f" FROM {{table}} s WHERE {where} GROUP BY 1 ORDER BY 1")
    return sql.SQL(text).format(table=sql.Identifier(p.source)), params  # type: ignore[arg-type]


# --------------------------------------------------------------------------- HTTP


def _utc(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _wib(t: datetime) -> str:
    return t.astimezone(WIB).isoformat()


class IdleConnections:
    """A few idle read-only connections kept for the next request (a new connection costs more than
    most series queries). No background thread: a connection is made on demand, checked when taken,
    closed when it is broken, busy or surplus."""

    def __init__(self, settings: Settings, keep: int = 4) -> None:
        self.settings = settings
        self.keep = keep
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    def _new(self) -> psycopg.Connection[Any]:
        s = self.settings
        return psycopg.connect(
            s.database_dsn(), connect_timeout=5, autocommit=True, application_name="arus-api-series",
            options=f"-c default_transaction_read_only=on -c statement_timeout={s.series_statement_timeout_ms}",
        )

    def run(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        reused = conn is not None
        if conn is None or conn.closed or conn.broken:
            conn, reused = self._new(), False
        try:
            result = fn(conn)
        except psycopg.OperationalError:
            conn.close()
            if not reused:
                raise
            conn = self._new()  # the idle one had died (server restart): once more on a new one
            try:
                result = fn(conn)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if len(self._idle) < self.keep and conn.info.transaction_status == TransactionStatus.IDLE:
                self._idle.append(conn)
                return result
        conn.close()
        return result


def routes(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["series"])
    conns = IdleConnections(settings)

    @router.get("/v1/series", summary="One metric over time for a region or a device")
    def series(request: Request) -> Response:
        raw = request.query_params
        for name in raw:
            if len(raw.getlist(name)) > 1:
                return BadParameter(name[:40], f"{name[:40]} given more than once").response()
        try:
            p = plan(dict(raw), settings, datetime.now(UTC))
        except BadParameter as bad:
            return bad.response()
        query, params = build_query(p)

        def fetch(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]] | None:
            if p.device is not None and conn.execute(
                    "SELECT 1 FROM devices WHERE device_id = %s", (p.device,)).fetchone() is None:
                return None
            return conn.execute(query, params).fetchall()

        rows = conns.run(fetch)
        if rows is None:
            return BadParameter("device", f"unknown device {p.device!r}").response()
        points = [(t, float(v) if v is not None else None, int(n)) for t, v, n in rows]
        if p.fmt == "csv":
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["time", "time_wib", "value", "n"])
            for t, v, n in points:
                w.writerow([_utc(t), _wib(t), "" if v is None else repr(v), n])
            name = f"{p.metric}_{p.device or p.region or KABUPATEN_CODE}_{p.bucket}_{p.agg}.csv"
            return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                            headers={"Content-Disposition": f'attachment; filename="{name}"',
                                     "X-Arus-Source": p.source})
        region = p.region if p.region is not None else (None if p.device else KABUPATEN_CODE)
        body = {
            "metric": p.metric, "unit": METRICS[p.metric], "region": region,
            "region_name": load_regions()[region].name if region else None, "device": p.device,
            "from": _utc(p.lo), "to": _utc(p.hi), "bucket": p.bucket, "agg": p.agg, "source": p.source,
            "count": len(points),
            "points": [{"time": _utc(t), "time_wib": _wib(t), "value": v, "n": n} for t, v, n in points],
        }
        return JSONResponse(body, headers={"X-Arus-Source": p.source})

    return router
