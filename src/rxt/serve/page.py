"""The web page at ``/``: a chat beside the memory it builds, from static files in the package.

No build step and nothing from a CDN (the server may be offline): ``static/`` holds plain HTML,
CSS and ES modules, shipped as package data. The page talks to this server's own API — the
Responses API streaming, ``previous_response_id`` for the next turn or a fork — and needs the
API key only when keys are configured (``/healthz`` says). It is public: it holds no data,
every call it makes carries the user's key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"

# The page runs only its own scripts and talks only to this server: an injected script or a
# framing site gets nowhere. Blob URLs are how a downloaded state is handed to the browser.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def install_page(app: FastAPI) -> None:
    """Serve ``static/index.html`` at ``/`` and the rest of ``static/`` under ``/static``."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
