"""The operator console at `/` (static HTML + JS from arus/static/, nothing from a CDN) and the small
JSON it polls: GET /v1/status/kecamatan, the per-kecamatan status board (recent 1-minute aggregates,
devices online, active alerts and their worst severity) plus dead letters of the last hour."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, HTTPException, Response

from infra.settings import Settings
from schemas.alerts import SEVERITIES
from schemas.errors import InfraError

WIB = ZoneInfo("Asia/Jakarta")
_STATIC = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
_NO_CACHE = {"Cache-Control": "no-cache"}

STATUS_SQL = """
WITH agg AS (
    SELECT key, count(*) AS windows, sum(count) AS readings, max(bucket) AS latest
    FROM aggregates WHERE scope = 'kecamatan' AND bucket > now() - interval '15 minutes' GROUP BY key),
dev AS (
    SELECT left(region_code, 8) AS kec, count(*) AS devices, count(*) FILTER (WHERE status = 'online') AS online
    FROM devices WHERE revoked_at IS NULL GROUP BY 1),
al AS (
    SELECT kecamatan, count(*) AS active, max(array_position(%s::text[], severity)) AS worst
    FROM alerts WHERE state IN ('open', 'acknowledged') GROUP BY kecamatan)
SELECT r.code, r.name, coalesce(agg.windows, 0), coalesce(agg.readings, 0), agg.latest,
       coalesce(dev.devices, 0), coalesce(dev.online, 0), coalesce(al.active, 0), al.worst
FROM regions r
LEFT JOIN agg ON agg.key = r.code
LEFT JOIN dev ON dev.kec = r.code
LEFT JOIN al ON al.kecamatan = r.code
WHERE r.level = 'kecamatan'
ORDER BY r.code
"""


# next to the package, not importlib.resources: an editable install run from another directory
# resolves "arus" to a namespace path that cannot read files
STATIC = Path(__file__).resolve().parent.parent / "static"

def _static(name: str) -> str:
    return (STATIC / name).read_text("utf-8")


def routes(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["console"])

    @router.get("/", include_in_schema=False)
    def console() -> Response:
        """Konsol operator: live alerts, acknowledge/resolve, status per kecamatan."""
        return Response(_static("console.html"), media_type="text/html; charset=utf-8", headers=_NO_CACHE)

    @router.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in _STATIC:
            raise HTTPException(404, "not found")
        return Response(_static(name), media_type=_STATIC[name], headers=_NO_CACHE)

    @router.get("/v1/status/kecamatan")
    def status_kecamatan() -> dict[str, Any]:
        """Per kecamatan: 1-minute aggregate windows and readings of the last 15 minutes, the newest
        window, devices (online), active (open + acknowledged) alerts and the worst severity among
        them; and dead letters of the last hour by reason. Times UTC ISO 8601 and WIB."""
        if settings.database_url is None:
            raise HTTPException(503, "no database configured (ARUS_DATABASE_URL)")
        from infra.db import connect

        try:
            with connect(settings.database_dsn(), autocommit=True) as conn:
                rows = conn.execute(STATUS_SQL, (list(SEVERITIES),)).fetchall()
                dead = conn.execute(
                    "SELECT reason, count(*) FROM dead_letters WHERE time > now() - interval '1 hour'"
                    " GROUP BY 1 ORDER BY 2 DESC").fetchall()
        except InfraError as exc:
            raise HTTPException(503, str(exc)) from None
        now = datetime.now(UTC)
        return {
            "generated_at": now.isoformat(timespec="seconds"),
            "generated_at_wib": now.astimezone(WIB).strftime("%Y-%m-%d %H:%M:%S WIB"),
            "kecamatan": [
                {"code": code, "name": name, "windows": int(windows), "readings": int(readings),
                 "latest_window": latest.astimezone(UTC).isoformat(timespec="seconds") if latest else None,
                 "latest_window_wib": latest.astimezone(WIB).strftime("%H:%M WIB") if latest else None,
                 "devices": int(devices), "devices_online": int(online), "active_alerts": int(active),
                 "worst_severity": SEVERITIES[worst - 1] if worst else None}
                for code, name, windows, readings, latest, devices, online, active, worst in rows],
            "dead_letters_last_hour": {reason: int(n) for reason, n in dead},
        }

    return router
