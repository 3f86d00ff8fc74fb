"""GET /v1/regions: the Kemendagri hierarchy of Kabupaten Jember (table `regions`).

Filters: `level` (kabupaten | kecamatan | desa | kelurahan), `parent` (a region code: its direct
children). Codes are the reference codes used everywhere else (devices, readings, /v1/series region).
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from infra.settings import Settings

LEVELS = ("provinsi", "kabupaten", "kecamatan", "desa", "kelurahan")
_PARAMS = frozenset({"level", "parent"})
_CODE_RE = re.compile(r"^[0-9]{2}(\.[0-9]{2,4}){0,3}$")
_SQL = """
SELECT r.code, r.name, r.level, r.parent_code,
       (SELECT count(*) FROM regions c WHERE c.parent_code = r.code) AS children
FROM regions r
WHERE (%(level)s::text IS NULL OR r.level = %(level)s)
  AND (%(parent)s::text IS NULL OR r.parent_code = %(parent)s)
ORDER BY r.code
"""


def _bad(parameter: str, message: str, valid: list[str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": "bad_parameter", "parameter": parameter, "message": message}
    if valid is not None:
        body["valid"] = valid
    return JSONResponse(status_code=400, content=body)


def routes(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["regions"])

    @router.get("/v1/regions", summary="Kemendagri regions of Jember, by level or parent")
    def regions(request: Request) -> JSONResponse:
        q = request.query_params
        unknown = sorted(set(q) - _PARAMS)
        if unknown:
            return _bad(unknown[0][:40], f"unknown parameter {unknown[0][:40]!r}", sorted(_PARAMS))
        level = q.get("level") or None
        parent = q.get("parent") or None
        if level is not None and level not in LEVELS:
            return _bad("level", f"unknown level {level[:40]!r}", list(LEVELS))
        if parent is not None and not _CODE_RE.match(parent):
            return _bad("parent", f"not a region code: {parent[:60]!r} (e.g. 35.09 or 35.09.19)")
        with psycopg.connect(settings.database_dsn(), connect_timeout=5,
                             options="-c default_transaction_read_only=on") as conn:
            if parent is not None and conn.execute(
                    "SELECT 1 FROM regions WHERE code = %s", (parent,)).fetchone() is None:
                return _bad("parent", f"unknown region {parent[:60]!r}")
            rows = conn.execute(_SQL, {"level": level, "parent": parent}).fetchall()
        items = [{"code": c, "name": n, "level": lv, "parent_code": pc, "children": ch}
                 for c, n, lv, pc, ch in rows]
        return JSONResponse({"count": len(items), "regions": items})

    return router
