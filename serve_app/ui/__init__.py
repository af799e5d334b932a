"""The browser console at /ui: static files shipped in the package, served by the same app.

It is a client of the public HTTP API only (no route of its own), so it is also an example of that
API. No build step: plain HTML, CSS and JavaScript modules, with one vendored library
(`static/vendor/fetch-event-source`, Server-Sent Events over `fetch` so a key can be sent).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount_console(app: FastAPI) -> None:
    """Serve the console at /ui/ (its static files need no key) and send a browser at / there."""
    app.mount("/ui", StaticFiles(directory=STATIC, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/")
