"""Program indicators over HTTP (the catalogue + indicator_values).

GET /v1/indicators                 the catalogue with Satu Data metadata and the current standing
                                   (latest kabupaten value of each series)
GET /v1/indicators/{id}            values by region and period; `id` is an indicator (all its series)
                                   or one series (`<id>.<category>`). Filters: region (code), level
                                   (kecamatan | kabupaten), category, from, to (ISO 8601 / YYYY-MM-DD,
                                   WIB when no offset), latest=true (only each region's latest period),
                                   limit. format=json (default) | csv (open data) | fiware (NGSI-LD
                                   KeyPerformanceIndicator entities).
GET /v1/indicators/{id}/metadata   the Satu Data metadata of one indicator (JSON, for the open data).

Small cells: a suppressed row carries no value, numerator, denominator or person count; that is how
the stream and the recompute store it, and this module checks it again before answering (a row with
fewer than `indicator_min_persons` persons is blanked whatever the table says).
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from psycopg.rows import dict_row

from infra.indicators import Catalogue, Indicator, load_catalogue
from infra.indicators.catalogue import FIWARE_STANDING
from infra.indicators.periods import label
from infra.settings import Settings
from schemas.regions import KABUPATEN_CODE

WIB = ZoneInfo("Asia/Jakarta")
_PARAMS = frozenset({"region", "level", "category", "from", "to", "latest", "limit", "format"})
COLUMNS = ("indicator_id", "base_id", "category", "region_code", "region_name", "region_level", "period",
           "period_start", "period_end", "period_label", "value", "unit", "numerator", "denominator",
           "n_persons", "target", "standing", "suppressed", "computed_at")

_ROWS_SQL = """
SELECT v.indicator_id, v.base_id, v.category, v.region_code, r.name AS region_name, v.period, v.period_start,
       v.period_end, v.value, v.unit, v.numerator, v.denominator, v.n_persons, v.target, v.standing,
       v.suppressed, v.computed_at
FROM indicator_values v LEFT JOIN regions r ON r.code = v.region_code
WHERE (v.indicator_id = %(id)s OR (%(all)s AND v.indicator_id LIKE %(like)s))
  AND (%(region)s::text IS NULL OR v.region_code = %(region)s)
  AND (%(level)s::text IS NULL OR (%(level)s = 'kabupaten') = (v.region_code NOT LIKE '%%.%%.%%'))
  AND (%(category)s::text IS NULL OR v.category = %(category)s)
  AND (%(from)s::timestamptz IS NULL OR v.period_start >= %(from)s)
  AND (%(to)s::timestamptz IS NULL OR v.period_start < %(to)s)
ORDER BY v.indicator_id, v.region_code, v.period_start
"""
_CURRENT_SQL = """
SELECT DISTINCT ON (indicator_id) indicator_id, base_id, category, region_code, period, period_start,
       period_end, value, unit, numerator, denominator, n_persons, target, standing, suppressed, computed_at
FROM indicator_values WHERE region_code = %s
ORDER BY indicator_id, period_start DESC
"""
_UPDATED_SQL = "SELECT coalesce(base_id, split_part(indicator_id, '.', 1)), max(computed_at) FROM indicator_values GROUP BY 1"


def _bad(param: str, message: str, allowed: list[str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": "bad_request", "param": param, "message": message}
    if allowed is not None:
        body["allowed"] = allowed
    return JSONResponse(body, status_code=400)


def _when(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if len(text) <= 10:
        value = datetime.combine(value.date(), time(0), WIB)
    return value if value.tzinfo else value.replace(tzinfo=WIB)


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z") if t is not None else None


def public_row(row: dict[str, Any], ind: Indicator, min_persons: int) -> dict[str, Any]:
    """A stored row as published: ISO times, period label in WIB, small cells blanked."""
    out = {k: row.get(k) for k in COLUMNS}
    n = row.get("n_persons")
    if ind.personal and (row.get("suppressed") or n is None or n < min_persons):
        out.update(value=None, numerator=None, denominator=None, n_persons=None, standing=None, suppressed=True)
    start = row["period_start"]
    out["region_level"] = "kabupaten" if row["region_code"].count(".") == 1 else "kecamatan"
    out["period_label"] = label(ind.frequency, int(start.timestamp() * 1000))
    out["period_start"], out["period_end"] = _iso(start), _iso(row.get("period_end"))
    out["computed_at"] = _iso(row.get("computed_at"))
    out["base_id"] = ind.id
    out["unit"] = row.get("unit") or ind.unit
    return out


def metadata(ind: Indicator, catalogue: Catalogue, last_updated: datetime | None, min_persons: int) -> dict[str, Any]:
    meta = ind.metadata()
    meta.update({
        "last_updated": _iso(last_updated),
        "example_catalogue": catalogue.example,
        "source_agency": ind.owner_agency,
        "privacy": ({"small_cell_suppression": True, "min_persons": min_persons,
                     "note": "nilai dari kurang dari k orang tidak ditampilkan (UU 27/2022)"}
                    if ind.personal else {"small_cell_suppression": False}),
        "links": {"values": f"/v1/indicators/{ind.id}", "csv": f"/v1/indicators/{ind.id}?format=csv",
                  "metadata": f"/v1/indicators/{ind.id}/metadata"},
    })
    return meta


def fiware_entity(row: dict[str, Any], ind: Indicator) -> dict[str, Any]:
    """One published row as an NGSI-LD KeyPerformanceIndicator (key-values)."""
    return {
        "id": f"urn:ngsi-ld:KeyPerformanceIndicator:jember:{row['indicator_id']}:{row['region_code']}:"
              f"{row['period_start']}",
        "type": "KeyPerformanceIndicator", "kpiName": ind.name, "description": ind.definition,
        "process": ind.promise, "organization": {"name": ind.owner_agency},
        "calculationFrequency": ind.frequency, "calculationMethod": "automatic", "category": ["quantitative"],
        "calculationPeriod": {"from": row["period_start"], "to": row["period_end"]},
        "calculationDate": row["computed_at"], "kpiValue": row["value"], "businessTarget": row["target"],
        "currentStanding": FIWARE_STANDING.get(row["standing"] or ""), "area": row["region_code"],
    }


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow(["" if r[c] is None else r[c] for c in COLUMNS])
    return buf.getvalue()


def routes(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["indicators"])
    k = settings.indicator_min_persons
    load_catalogue(settings.indicator_catalogue_file)  # a broken catalogue stops `arus api` at start, with reasons

    def catalogue() -> Catalogue:
        return load_catalogue(settings.indicator_catalogue_file)

    def connect() -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(settings.database_dsn(), connect_timeout=5, row_factory=dict_row,
                               options="-c default_transaction_read_only=on")

    @router.get("/v1/indicators", summary="The indicator catalogue with metadata and current standing")
    def indicators() -> JSONResponse:
        cat = catalogue()
        with connect() as conn:
            current = conn.execute(_CURRENT_SQL, (KABUPATEN_CODE,)).fetchall()
            updated = {r["coalesce"]: r["max"] for r in conn.execute(_UPDATED_SQL).fetchall()}
        items = []
        for ind in cat.indicators:
            meta = metadata(ind, cat, updated.get(ind.id), k)
            mine = [public_row(r, ind, k) for r in current
                    if r["indicator_id"] == ind.id or r["indicator_id"].startswith(ind.id + ".")]
            meta["current"] = mine
            items.append(meta)
        return JSONResponse({"example": cat.example, "notice": cat.notice, "min_persons": k,
                             "count": len(items), "indicators": items})

    @router.get("/v1/indicators/{indicator_id}/metadata", summary="Satu Data metadata of one indicator")
    def indicator_metadata(indicator_id: str) -> JSONResponse:
        cat = catalogue()
        found = cat.series(indicator_id)
        if found is None:
            return JSONResponse({"error": "not_found", "message": f"no indicator {indicator_id[:80]!r}"}, 404)
        ind = found[0]
        with connect() as conn:
            updated = {r["coalesce"]: r["max"] for r in conn.execute(_UPDATED_SQL).fetchall()}
        return JSONResponse(metadata(ind, cat, updated.get(ind.id), k),
                            headers={"Content-Disposition": f'inline; filename="{ind.id}.metadata.json"'})

    @router.get("/v1/indicators/{indicator_id}", summary="Indicator values by region and period (json|csv|fiware)")
    def indicator_values(indicator_id: str, request: Request) -> Response:
        q = request.query_params
        unknown = sorted(set(q) - _PARAMS)
        if unknown:
            return _bad(unknown[0][:40], f"unknown parameter {unknown[0][:40]!r}", sorted(_PARAMS))
        cat = catalogue()
        found = cat.series(indicator_id)
        if found is None:
            return JSONResponse({"error": "not_found", "message": f"no indicator {indicator_id[:80]!r}",
                                 "known": [i.id for i in cat.indicators]}, 404)
        ind, category = found
        fmt = q.get("format", "json")
        if fmt not in ("json", "csv", "fiware"):
            return _bad("format", f"unknown format {fmt[:20]!r}", ["json", "csv", "fiware"])
        level = q.get("level") or None
        if level not in (None, "kecamatan", "kabupaten"):
            return _bad("level", f"unknown level {level[:20]!r}", ["kecamatan", "kabupaten"])
        params: dict[str, Any] = {"id": indicator_id, "all": category is None, "like": ind.id + ".%",
                                  "region": q.get("region") or None, "level": level,
                                  "category": q.get("category") or None}
        for name in ("from", "to"):
            try:
                params[name] = _when(q[name]) if q.get(name) else None
            except ValueError:
                return _bad(name, f"not a date or ISO 8601 time: {q[name][:40]!r}")
        try:
            limit = int(q.get("limit", "10000"))
            if not 1 <= limit <= 100_000:
                raise ValueError
        except ValueError:
            return _bad("limit", "limit must be an integer 1..100000")
        with connect() as conn:
            rows = conn.execute(_ROWS_SQL, params).fetchall()
        if q.get("latest") in ("1", "true", "yes"):
            latest: dict[tuple[str, str], dict[str, Any]] = {}
            for r in rows:  # ordered by period_start: the last one of each (series, region) wins
                latest[(r["indicator_id"], r["region_code"])] = r
            rows = list(latest.values())
        rows = rows[-limit:]
        out = [public_row(r, ind, k) for r in rows]
        if fmt == "csv":
            return Response(to_csv(out), media_type="text/csv; charset=utf-8",
                            headers={"Content-Disposition": f'attachment; filename="{indicator_id}.csv"'})
        if fmt == "fiware":
            return JSONResponse([fiware_entity(r, ind) for r in out])
        return JSONResponse({"indicator": metadata(ind, cat, max((r["computed_at"] for r in rows), default=None), k),
                             "count": len(out), "values": out})

    return router
