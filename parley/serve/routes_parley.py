"""Parley's own routes: conversations, traces, feedback, memory, knowledge, users; health, metrics.

    GET    /api/conversations?q=TEXT          the caller's conversations, newest first; with q, those
                                              whose title or a message contains TEXT (any case)
    GET    /api/conversations/{id}            one, with its turns (withdrawn ones left out)
    PATCH  /api/conversations/{id}            {"title": "..."}: rename it
    DELETE /api/conversations/{id}
    POST   /api/turns/{id}/withdraw           {"reason": "regenerate" | "edit"}: take that turn (an
                                              answer with its question, or a question) and every later
                                              one out of the history, before sending the question again
    GET    /api/turns/{id}/trace              what each pipeline stage decided for that answer
    POST   /api/turns/{id}/feedback           {"rating": 1 | -1, "edited_text": "..."}
    GET    /api/turns/{id}/feedback
    GET    /api/memory          POST /api/memory {"text": "..."}          DELETE /api/memory/{id}
    POST   /api/knowledge (multipart: file, collection)   GET /api/knowledge   DELETE /api/knowledge/{id}
    GET    /api/users                         admins only
    GET    /health   GET /metrics             no key needed

Every read and write goes through a `Store` method that takes the caller's user id, so
another user's ids behave exactly as ids that do not exist: 404.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from parley.pipeline.knowledge import KnowledgeConfig, ingest
from parley.serve.server import Server
from parley.serve.errors import APIError
from parley.serve.protocol import FeedbackRequest, MemoryRequest, RenameRequest, WithdrawRequest
from parley.store import User


Id = Annotated[int, Path(ge=1, le=2**63 - 1, description="an id, as the list routes give them")]


# the upload is read by hand (to cap its size), so its form is documented here
UPLOAD = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary"}, "collection": {"type": "string"}}}}}}}


def _missing(what: str, ident: int) -> APIError:
    return APIError(404, f"no {what} {ident}", code="not_found")


def parley_routes(server: Server) -> APIRouter:
    router = APIRouter()
    auth = Depends(server.authenticate)

    @router.get("/api/conversations")
    def conversations(q: Annotated[str | None, Query(max_length=200, description="search text")] = None,
                      user: User = auth) -> dict:
        store = server.store()
        found = store.search_conversations(user.id, q) if q and q.strip() else store.list_conversations(user.id)
        return {"data": [dataclasses.asdict(c) for c in found]}

    @router.get("/api/conversations/{conv_id}")
    def conversation(conv_id: Id, user: User = auth) -> dict:
        store = server.store()
        conv = store.get_conversation(user.id, conv_id)
        if conv is None:
            raise _missing("conversation", conv_id)
        messages = store.messages(user.id, conv_id)
        return {**dataclasses.asdict(conv), "turns": [dataclasses.asdict(m) for m in messages]}  # the API's name

    @router.patch("/api/conversations/{conv_id}")
    def rename_conversation(conv_id: Id, body: RenameRequest, user: User = auth) -> dict:
        renamed = server.store().rename_conversation(user.id, conv_id, body.title.strip())
        if renamed is None:
            raise _missing("conversation", conv_id)
        return dataclasses.asdict(renamed)

    @router.delete("/api/conversations/{conv_id}")
    def delete_conversation(conv_id: Id, user: User = auth) -> dict:
        if not server.store().delete_conversation(user.id, conv_id):
            raise _missing("conversation", conv_id)
        return {"id": conv_id, "deleted": True}

    @router.get("/api/turns/{turn_id}/trace")
    def trace(turn_id: Id, user: User = auth) -> dict:
        found = server.store().get_trace(user.id, turn_id)
        if found is None:
            raise APIError(404, f"no trace for turn {turn_id} (only assistant answers have one)", code="not_found")
        return found

    @router.post("/api/turns/{turn_id}/withdraw")
    def withdraw(turn_id: Id, body: WithdrawRequest, user: User = auth) -> dict:
        try:
            gone = server.store().withdraw(user.id, turn_id, regenerated=body.reason == "regenerate")
        except ValueError as e:
            if "unknown turn" in str(e):
                raise _missing("turn", turn_id) from None
            raise APIError(400, str(e), code="invalid_value") from None
        question = gone[0].content if gone[0].role == "user" else None
        return {"conversation_id": gone[0].conversation_id, "question": question, "withdrawn": [m.id for m in gone]}

    @router.post("/api/turns/{turn_id}/feedback")
    def feedback(turn_id: Id, body: FeedbackRequest, user: User = auth) -> dict:
        try:
            saved = server.store().add_feedback(user.id, turn_id, body.rating, body.edited_text)
        except ValueError as e:
            if "unknown turn" in str(e):
                raise _missing("turn", turn_id) from None
            raise APIError(400, str(e), code="invalid_value") from None
        return dataclasses.asdict(saved)

    @router.get("/api/turns/{turn_id}/feedback")
    def get_feedback(turn_id: Id, user: User = auth) -> dict:
        found = server.store().get_feedback(user.id, turn_id)
        if found is None:
            raise APIError(404, f"no feedback on turn {turn_id}", code="not_found")
        return dataclasses.asdict(found)

    @router.post("/api/memory", status_code=201)
    def remember(body: MemoryRequest, user: User = auth) -> dict:
        from parley.pipeline.state import Memory, MemoryInputError

        try:
            fact = Memory(server.store(), server.embed_once).remember(user.id, body.text)
        except MemoryInputError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        return {"id": fact.id, "text": fact.text}

    @router.get("/api/memory")
    def memory(user: User = auth) -> dict:
        facts = server.store().list_memory(user.id)
        return {"data": [{"id": f.id, "text": f.text, "created_at": f.created_at} for f in facts]}

    @router.delete("/api/memory/{fact_id}")
    def forget(fact_id: Id, user: User = auth) -> dict:
        if not server.store().delete_memory(user.id, fact_id):
            raise _missing("memory fact", fact_id)
        return {"id": fact_id, "deleted": True}

    @router.post("/api/knowledge", openapi_extra=UPLOAD)
    async def upload(request: Request, response: Response, user: User = auth) -> dict:
        limit = server.settings.max_upload_bytes
        form = await request.form(max_files=1, max_fields=4)
        file, collection = form.get("file"), form.get("collection") or "default"
        if not isinstance(file, UploadFile) or not file.filename or not isinstance(collection, str):
            raise APIError(400, "send a multipart form with a 'file' field (and optionally 'collection')",
                           code="invalid_value", param="file")
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise APIError(413, f"the file is over the {limit} byte upload limit; split it", code="too_large")
        name = re.sub(r"[^\w.\- ]", "_", FilePath(file.filename).name).strip(". ") or "upload"
        result = await run_in_threadpool(_ingest, server, user, name[-200:], data, collection)
        if result.status == "error":
            raise APIError(400, result.message, code="invalid_file", param="file")
        response.status_code = 201 if result.status == "stored" else 200
        return {"id": result.document_id, "name": result.name, "status": result.status, "chunks": result.chunks,
                "message": result.message}

    @router.get("/api/knowledge")
    def documents(user: User = auth) -> dict:
        return {"data": [dataclasses.asdict(d) for d in server.store().list_documents(user.id)]}

    @router.delete("/api/knowledge/{doc_id}")
    def delete_document(doc_id: Id, user: User = auth) -> dict:
        if not server.store().delete_document(user.id, doc_id):
            raise _missing("document", doc_id)
        return {"id": doc_id, "deleted": True}

    @router.get("/api/users")
    def users(user: User = auth) -> dict:
        if user.role != "admin":
            raise APIError(403, "only admins may list users", code="forbidden")
        return {"data": [dataclasses.asdict(u) for u in server.store().list_users()]}

    @router.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": server.model_name, "pending": server.engine.stats()["waiting"],
                "kernels": server.engine.kernels_path, "kv_dtype": server.engine.kv_dtype}

    @router.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> Response:
        stats = server.engine.stats()
        gauges = {"parley_queue_depth": ("generation requests waiting to start", stats["waiting"]),
                  "parley_generating": ("generation requests running now", stats["running"])}
        return Response(server.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    return router


def _ingest(server: Server, user: User, name: str, data: bytes, collection: str):
    with tempfile.TemporaryDirectory(prefix="parley-upload-") as folder:
        path = FilePath(folder) / name
        path.write_bytes(data)
        config = KnowledgeConfig(max_bytes=server.settings.max_upload_bytes)
        [result] = ingest(server.store(), server.embed_once, user.id, [path], collection, config=config,
                          source=f"upload:{name}")
    # the message names the file the client sent, not the server's temporary folder
    return dataclasses.replace(result, message=result.message.replace(f"{folder}/", ""))

