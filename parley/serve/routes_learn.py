"""Learning rounds and model versions, for admins (`parley learn` runs the rounds):

    GET  /api/learn/rounds                 every round of the served model: data counts, report card, decision
    GET  /api/learn/rounds/{n}/report      one round's report card (Markdown)
    GET  /api/learn/versions               the served model's versions, the current one and the one serving
    POST /api/learn/promote  {"version": "v3"}
    POST /api/learn/rollback {"version": ""}   ('' = the newest version older than the current)
    GET  /api/me/personalization           any user: opted in?, their adapter (version, round) if they have one
    PUT  /api/me/personalization {"on": false}   opt out: their adapter and its training data are deleted,
                                           and their examples withdrawn from the rounds (withdrawal.withdraw)

A promotion or rollback moves the registry's link; the server switches to that version before
the next request (Server.refresh), so the reply already says which version serves.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from pydantic import Field

from parley.learn import personal
from parley.learn.rounds import list_rounds
from parley.serve.errors import APIError
from parley.serve.protocol import _Request
from parley.serve.server import Server
from parley.store import User


class PersonalizationRequest(_Request):
    on: bool


class VersionRequest(_Request):
    version: str = Field("", max_length=16, pattern=r"^(v[1-9][0-9]*)?$")


def learn_routes(server: Server) -> APIRouter:
    router = APIRouter()

    def admin(user: User = Depends(server.authenticate)) -> User:
        if user.role != "admin":
            raise APIError(403, "only admins may see learning rounds or change model versions", code="forbidden")
        return user

    only_admins = Depends(admin)

    def versions() -> dict:
        try:
            found = server.registry.versions(server.model_name)
        except LookupError as e:  # an engine handed to the app: not a registered model
            raise APIError(404, str(e.args[0]), code="not_found") from None
        return {"model": server.model_name, "serving": server.version or "v1",
                "data": [{"version": v.label, "current": v.current, **v.info} for v in found]}

    @router.get("/api/learn/rounds")
    def rounds(user: User = only_admins) -> dict:
        return {"model": server.model_name, "data": list_rounds(server.model_name, server.registry.home)}

    # the answer is Markdown, its errors JSON as everywhere: documented both ways (a PlainTextResponse
    # class would document the errors as text/plain too)
    @router.get("/api/learn/rounds/{n}/report",
                responses={200: {"content": {"text/markdown": {"schema": {"type": "string"}}}}})
    def report(n: int, user: User = only_admins) -> PlainTextResponse:
        found = [r for r in list_rounds(server.model_name, server.registry.home) if r["round"] == n]
        path = Path(found[0]["folder"]) / "report.md" if found else None
        if path is None or not path.is_file():
            raise APIError(404, f"no report card for round {n} of {server.model_name}", code="not_found")
        return PlainTextResponse(path.read_text(encoding="utf-8"), media_type="text/markdown")

    @router.get("/api/learn/versions")
    def list_versions(user: User = only_admins) -> dict:
        return versions()

    @router.post("/api/learn/promote")
    def promote(req: VersionRequest, user: User = only_admins) -> dict:
        if not req.version:
            raise APIError(400, "give the version to promote, e.g. {\"version\": \"v2\"}", code="invalid_request")
        _move(server, lambda: server.registry.promote(server.model_name, req.version))
        return versions()

    @router.post("/api/learn/rollback")
    def rollback(req: VersionRequest, user: User = only_admins) -> dict:
        _move(server, lambda: server.registry.rollback(server.model_name, req.version))
        return versions()

    def personalization(user: User) -> dict:
        folder = personal.adapters_dir(server.model_name, server.registry.home) / str(user.id)
        meta = json.loads((folder / "adapter.json").read_text()) if (folder / "adapter.json").is_file() else None
        on = server.store().personalized(user.id)
        adapter = {k: meta.get(k) for k in ("base", "base_version", "round", "rank")} if meta else None
        return {"on": on, "adapter": adapter, "serving": on and personal.adapter_for(server.engine, server.store(),
                                                                                      user.id) != ""}

    @router.get("/api/me/personalization")
    def get_personalization(user: User = Depends(server.authenticate)) -> dict:
        return personalization(user)

    @router.put("/api/me/personalization")
    def set_personalization(req: PersonalizationRequest, user: User = Depends(server.authenticate)) -> dict:
        server.store().set_personalized(user.id, req.on)
        if not req.on:  # opting out deletes what there is: the adapter and the data it was trained on
            personal.forget(user.id, server.registry.home)
            if server.engine.adapters is not None:
                server.engine.adapters.forget(str(user.id))
        return personalization(user)

    return router


def _move(server: Server, change) -> None:
    try:
        change()
    except LookupError as e:
        raise APIError(404, str(e.args[0]), code="not_found") from None
    server.refresh()
