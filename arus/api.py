"""Assembly of the HTTP service (`arus api`): health, metrics, and the routers of later features."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote
from zoneinfo import ZoneInfo

import psycopg
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from arus.routes.alerts import routes as alerts_routes
from arus.routes.console import routes as console_routes
from arus.routes.devices import routes as devices_routes
from arus.routes.indicators import routes as indicators_routes
from arus.routes.public import routes as public_routes
from arus.routes.regions import routes as regions_routes
from arus.routes.series import routes as series_routes
from infra.settings import Settings
from producers.agency_http import router as agency_router

WIB = ZoneInfo("Asia/Jakarta")


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> FastAPI:
    prom = registry or CollectorRegistry()
    requests = Counter("arus_api_requests_total", "HTTP requests", ["path"], registry=prom)
    app = FastAPI(title="Arus API", version="1", description="Jember smart-city data platform")

    @app.middleware("http")
    async def refuse_control_characters(request: Request, call_next: Any) -> Response:
        # PostgreSQL text cannot hold NUL and no identifier, code or filter of ours contains control
        # characters: refuse them once here, with a clear message, instead of in every handler.
        raw = unquote(request.url.path + "?" + (request.url.query or ""))
        if any(ord(c) < 32 or c == "\x7f" for c in raw):
            return JSONResponse({"detail": "the path and query parameters must not contain NUL or other "
                                           "control characters"}, status_code=400)
        return await call_next(request)

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

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(prom), media_type=CONTENT_TYPE_LATEST)

    app.include_router(agency_router(settings, prom))
    app.include_router(devices_routes(settings))
    app.include_router(indicators_routes(settings))  # GET /v1/indicators[/{id}] (issue 6)
    app.include_router(public_routes(settings))  # /public transparency page (issue 6)
    app.include_router(series_routes(settings))
    app.include_router(regions_routes(settings))
    app.include_router(alerts_routes(settings, prom))
    app.include_router(console_routes(settings))  # `/`: the operator console (issue 5)
    return app


def run_api(settings: Settings) -> None:
    import uvicorn

    # SSE clients never end their requests: stop waiting for them after 2 s on shutdown
    uvicorn.run(create_app(settings), host="0.0.0.0", port=settings.http_port, log_level="warning",  # noqa: S104
                timeout_graceful_shutdown=2)
