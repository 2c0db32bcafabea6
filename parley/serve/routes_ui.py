"""The web UI: one static page (no build step, nothing fetched from elsewhere) that talks to
the same API as every other client, plus the one read the page needs that the API lacks.

    app.include_router(ui_routes(server))     # in create_app
    # GET /                 the page (its Content-Security-Policy allows this origin only)
    # GET /admin            the admins' page of learning rounds and model versions (/api/learn/*)
    # GET /static/app.js    its scripts, style and vendored libraries, from parley/serve/static/
    # GET /api/chunks/{id}  a knowledge chunk's text, for showing what a citation [n] refers to
    # GET /api/settings     what this server runs with that a user may see: model, persona, stages

The page and its files need no key (they hold no data); the other routes take the caller's
key like every /api route, and another user's chunk ids are 404s. The libraries in
static/vendor/ (Markdown, sanitising, highlighting) are pinned copies: see its README.md.
"""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import FileResponse

from parley.serve.server import Server
from parley.serve.errors import APIError
from parley.store import User

STATIC = FilePath(__file__).parent / "static"
JS, CSS = "text/javascript", "text/css"
FILES = {"app.js": JS, "render.js": JS, "icons.js": JS, "app.css": CSS,  # all the page loads besides itself
         "voice.js": JS, "voice.css": CSS,  # the Talk button (the live voice route, routes_voice.py)
         "vendor/markdown-it.min.js": JS, "vendor/purify.min.js": JS, "vendor/highlight.min.js": JS,
         "admin.js": JS}  # the admin page's
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
          "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


def ui_routes(server: Server) -> APIRouter:
    router = APIRouter()
    auth = Depends(server.authenticate)

    @router.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": POLICY, "Cache-Control": "no-cache"})

    @router.get("/admin", include_in_schema=False)
    def admin_page() -> FileResponse:
        return FileResponse(STATIC / "admin.html", media_type="text/html",
                            headers={"Content-Security-Policy": POLICY, "Cache-Control": "no-cache"})

    @router.get("/static/{name:path}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        if name not in FILES:  # a fixed list: no path from the request ever reaches the file system
            raise APIError(404, f"no static file {name!r}", code="not_found")
        return FileResponse(STATIC / name, media_type=FILES[name], headers={"Cache-Control": "no-cache"})

    @router.get("/api/chunks/{chunk_id}")
    def chunk(chunk_id: Annotated[int, Path(ge=1, le=2**63 - 1)], user: User = auth) -> dict:
        found = server.store().get_chunks(user.id, [chunk_id])
        if not found:
            raise APIError(404, f"no chunk {chunk_id} (its document may have been deleted)", code="not_found")
        c = found[0]
        return {"id": c.chunk_id, "document_id": c.document_id, "document": c.document_name, "ord": c.ord,
                "page": c.page, "text": c.text}

    @router.get("/api/settings")
    def settings(user: User = auth) -> dict:
        cfg = server.settings
        return {"model": server.model_name, "version": _version(server), "persona": cfg.persona,
                "stages": list(cfg.stages), "max_tokens": cfg.max_tokens}

    return router


def _version(server: Server) -> str | None:
    """Which copy of the model this is, as the registry recorded its import (None if the
    engine was handed to the app rather than loaded from the registry)."""
    found = {m.name: m.meta for m in server.registry.list()}.get(server.model_name)
    if not found or "imported_at" not in found:
        return server.version  # "v3" once `parley learn` made versions; None otherwise
    source = FilePath(found.get("source", "")).name
    copy = f"{source}, imported {found['imported_at']}" if source else f"imported {found['imported_at']}"
    return f"{server.version}: {copy}" if server.version else copy
