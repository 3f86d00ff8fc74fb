"""Assembly of the HTTP service (`arus api`): health, metrics, and the routers of later features."""

from __future__ import annotations

from datetime import datetime
from html import escape
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from fastapi import FastAPI, Response
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from arus.routes.devices import routes as devices_routes
from arus.routes.regions import routes as regions_routes
from arus.routes.series import routes as series_routes
from infra.settings import Settings
from producers.agency_http import router as agency_router

WIB = ZoneInfo("Asia/Jakarta")
_STATUS_SQL = """
SELECT r.code, r.name, count(a.bucket), coalesce(sum(a.count), 0), max(a.bucket)
FROM regions r
LEFT JOIN aggregates a ON a.scope = 'kecamatan' AND a.key = r.code AND a.bucket > now() - interval '15 minutes'
WHERE r.level = 'kecamatan'
GROUP BY r.code, r.name ORDER BY r.code
"""


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> FastAPI:
    prom = registry or CollectorRegistry()
    requests = Counter("arus_api_requests_total", "HTTP requests", ["path"], registry=prom)
    app = FastAPI(title="Arus API", version="1", description="Jember smart-city data platform")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        requests.labels("/healthz").inc()
        db = "unconfigured"
        if settings.database_url is not None:
            try:
                with psycopg.connect(settings.database_dsn(), connect_timeout=3) as conn:
                    conn.execute("SELECT 1")
                db = "ok"
            except psycopg.Error:
                db = "unreachable"
        return {"status": "ok" if db != "unreachable" else "degraded", "database": db}

    @app.get("/", response_class=HTMLResponse)
    def status_page() -> str:
        """A plain status board per kecamatan until the operator console (issue 5) replaces it."""
        requests.labels("/").inc()
        if settings.database_url is None:
            return "<h1>Arus</h1><p>No database configured.</p>"
        with psycopg.connect(settings.database_dsn(), connect_timeout=3) as conn:
            rows = conn.execute(_STATUS_SQL).fetchall()
            dead = conn.execute(
                "SELECT reason, count(*) FROM dead_letters WHERE time > now() - interval '1 hour'"
                " GROUP BY 1 ORDER BY 2 DESC").fetchall()
        now = datetime.now(WIB).strftime("%Y-%m-%d %H:%M:%S WIB")
        body = "".join(
            f"<tr><td>{escape(code)}</td><td>{escape(name)}</td><td>{buckets}</td><td>{count}</td>"
            f"<td>{escape(last.astimezone(WIB).strftime('%H:%M') if last else '-')}</td></tr>"
            for code, name, buckets, count, last in rows)
        dl = "".join(f"<li>{escape(reason)}: {n}</li>" for reason, n in dead) or "<li>none</li>"
        return (f"<!doctype html><html lang=id><head><meta charset=utf-8><title>Arus</title>"
                f"<meta http-equiv=refresh content=10><style>body{{font-family:sans-serif;margin:2em}}"
                f"td,th{{padding:.2em .8em;text-align:left}}</style></head><body><h1>Arus — status</h1>"
                f"<p>{now}. Last 15 minutes of 1-minute aggregates per kecamatan.</p><table><tr><th>kode</th>"
                f"<th>kecamatan</th><th>windows</th><th>readings</th><th>latest window</th></tr>{body}"
                f"</table><h2>Dead letters, last hour</h2><ul>{dl}</ul></body></html>")

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(prom), media_type=CONTENT_TYPE_LATEST)

    app.include_router(agency_router(settings, prom))
    app.include_router(devices_routes(settings))
    app.include_router(series_routes(settings))
    app.include_router(regions_routes(settings))
    return app


def run_api(settings: Settings) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host="0.0.0.0", port=settings.http_port, log_level="warning")  # noqa: S104
