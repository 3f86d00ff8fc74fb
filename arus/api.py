"""Assembly of the HTTP service (`arus api`): health, metrics, and the routers of later features."""

from __future__ import annotations

from typing import Any

import psycopg
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from infra.settings import Settings


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

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(prom), media_type=CONTENT_TYPE_LATEST)

    return app


def run_api(settings: Settings) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host="0.0.0.0", port=settings.http_port, log_level="warning")  # noqa: S104
