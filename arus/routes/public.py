"""The public transparency page `/public` (static HTML + JS + CSS from arus/static/public/, nothing
from a CDN). The page reads GET /v1/indicators and /v1/indicators/{id} (arus/routes/indicators.py):
each indicator per kecamatan against its target, a trend chart drawn as inline SVG by its own script,
the Satu Data metadata, and the open-data downloads (CSV + metadata JSON). Small cells arrive blanked
from the API and are shown as hidden."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Response

from infra.settings import Settings

_FILES = {"index.html": "text/html; charset=utf-8", "public.js": "text/javascript; charset=utf-8",
          "public.css": "text/css; charset=utf-8"}
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"}


# next to the package, not importlib.resources: an editable install run from another directory
# resolves "arus" to a namespace path that cannot read files
STATIC = Path(__file__).resolve().parent.parent / "static"

def _read(name: str) -> str:
    return (STATIC / "public" / name).read_text("utf-8")


def routes(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["public"])

    @router.get("/public", include_in_schema=False)
    def page() -> Response:
        """Halaman transparansi: indikator janji kerja per kecamatan terhadap target."""
        return Response(_read("index.html"), media_type=_FILES["index.html"], headers=_HEADERS)

    @router.get("/public/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in _FILES or name == "index.html":
            raise HTTPException(404, "not found")
        return Response(_read(name), media_type=_FILES[name], headers=_HEADERS)

    return router
