"""GET /v1/devices: the device registry with each device's status and last observation.

Filters: `kind`, `region` (a Kemendagri code prefix: `35.09.19` matches the kecamatan and its desa),
`status` (online | offline | unknown | revoked). Times are UTC ISO 8601 (`last_seen`, `status_since`)
with a WIB display field beside each (`last_seen_wib`, ...). `status` is derived in the stream
(stream_processors/device_status.py): `status_reason` says why (status_message: the device or its MQTT
last will; reading; silent: no reading for longer than its kind's expected interval times the
tolerance factor). A revoked device shows status `revoked`.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

import psycopg
from fastapi import APIRouter, HTTPException, Query
from psycopg.rows import dict_row

from infra.settings import Settings
from schemas.sensors import SENSOR_KINDS

WIB = ZoneInfo("Asia/Jakarta")
_REGION_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
StatusFilter = Literal["online", "offline", "unknown", "revoked"]

_SQL = """
SELECT device_id, kind, region_code, r.name AS region_name, revoked_at, last_seen, status, status_reason,
       status_time, created_at
FROM devices d LEFT JOIN regions r ON r.code = d.region_code
WHERE (%(kind)s::text IS NULL OR d.kind = %(kind)s)
  AND (%(region)s::text IS NULL OR d.region_code = %(region)s OR d.region_code LIKE %(region_like)s)
  AND (%(status)s::text IS NULL
       OR (%(status)s = 'revoked' AND d.revoked_at IS NOT NULL)
       OR (%(status)s <> 'revoked' AND d.revoked_at IS NULL AND d.status = %(status)s))
ORDER BY d.device_id
LIMIT %(limit)s
"""


def _utc(t: datetime | None) -> str | None:
    return t.astimezone(ZoneInfo("UTC")).isoformat().replace("+00:00", "Z") if t is not None else None


def _wib(t: datetime | None) -> str | None:
    return t.astimezone(WIB).strftime("%Y-%m-%d %H:%M:%S WIB") if t is not None else None


def device_json(row: dict[str, Any]) -> dict[str, Any]:
    kind = SENSOR_KINDS.get(row["kind"])
    return {
        "device_id": row["device_id"],
        "kind": row["kind"],
        "region_code": row["region_code"],
        "region_name": row["region_name"],
        "status": "revoked" if row["revoked_at"] is not None else row["status"],
        "status_reason": row["status_reason"],
        "status_since": _utc(row["status_time"]),
        "status_since_wib": _wib(row["status_time"]),
        "last_seen": _utc(row["last_seen"]),
        "last_seen_wib": _wib(row["last_seen"]),
        "expected_interval_s": kind.expected_interval_s if kind is not None else None,
        "registered_at": _utc(row["created_at"]),
        "revoked_at": _utc(row["revoked_at"]),
    }


def routes(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["devices"])

    @router.get("/v1/devices")
    def list_devices(
        kind: str | None = Query(None, description="sensor kind, e.g. water_level"),
        region: str | None = Query(None, description="region code prefix, e.g. 35.09.19", max_length=64),
        status: StatusFilter | None = Query(None),
        limit: int = Query(1000, ge=1, le=10_000),
    ) -> dict[str, Any]:
        """Registered devices with their status (online/offline/unknown/revoked) and last observation."""
        if kind is not None and kind not in SENSOR_KINDS:
            raise HTTPException(422, f"unknown kind {kind!r}; one of {', '.join(sorted(SENSOR_KINDS))}")
        if settings.database_url is None:
            raise HTTPException(503, "no database configured")
        region = region.rstrip(".") if region else None
        if region is not None and not _REGION_RE.match(region):
            raise HTTPException(422, "region must be a Kemendagri code (prefix) such as 35.09.19")
        params = {"kind": kind, "region": region, "region_like": f"{region}.%" if region else None,
                  "status": status, "limit": limit}
        with psycopg.connect(settings.database_dsn(), connect_timeout=5, row_factory=dict_row) as conn:
            rows = conn.execute(_SQL, params).fetchall()
        devices = [device_json(r) for r in rows]
        return {"count": len(devices), "devices": devices}

    return router
