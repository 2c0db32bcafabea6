"""The one place where failures become HTTP answers, shaped as OpenAI's errors.

    raise APIError(404, "no conversation 7", code="not_found")
    # -> HTTP 404 {"error": {"message": "no conversation 7", "type": "not_found_error",
    #                        "param": null, "code": "not_found"}}

Routes raise `APIError` (or let a library's own error through: a bad prompt, a full queue,
an unknown model); `install(app)` maps every one of them, and FastAPI's validation errors,
to the right status with the same JSON body. Input can never cause a 500: a bad value is a
400, a missing key a 401, another user's id a 404, a body over the limit a 413, a full
queue a 429 with Retry-After.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

log = logging.getLogger("parley.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error's body, as OpenAI's; documented for every route (the app's `responses`)."""

    error: ErrorDetail


RESPONSES = {"4XX": {"model": ErrorBody, "description": "bad input (400), a missing or invalid key (401), "
                     "not allowed (403), unknown id (404), too large (413), rate limit or full queue (429)"},
             "5XX": {"model": ErrorBody, "description": "a bug (500), shutting down (503)"}}


class APIError(Exception):
    """An answer other than success: status, a message saying what is wrong and how to fix it."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(max(1, math.ceil(self.retry_after)))} if self.retry_after is not None else None
        if self.status == 401:
            headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def from_exception(exc: BaseException) -> APIError:
    """The APIError for any exception a route can raise (500 only for our own bugs)."""
    from parley.engine.engine import EngineClosed, PromptError, QueueFull
    from parley.pipeline.assistant import MessageError
    from parley.pipeline.knowledge import KnowledgeError
    from parley.pipeline.readers import ReadError
    from parley.registry import ModelNotFound

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), code="queue_full", retry_after=exc.retry_after)
    if isinstance(exc, EngineClosed):
        return APIError(503, str(exc), code="shutting_down", retry_after=5)
    if isinstance(exc, ModelNotFound):
        return APIError(404, str(exc), code="model_not_found", param="model")
    if isinstance(exc, (PromptError, MessageError, KnowledgeError, ReadError)):
        return APIError(400, str(exc), code="invalid_value")
    log.error("internal error", exc_info=exc)
    return APIError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                    code="internal_error")


def _validation(exc: RequestValidationError, content_type: str) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    where = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    if tuple(first.get("loc", ())) == ("body",) and "json" not in content_type.lower():
        # FastAPI reads a body as JSON only when it says it is: curl -d sends it as a form
        return APIError(400, f"the request body was sent as {content_type or 'no content type'!r}; send JSON with "
                        "the header 'Content-Type: application/json'", code="invalid_value")
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON: "
                        f"{first.get('ctx', {}).get('error', 'parse error')}", code="invalid_json")
    param = ".".join(where) or None
    message = first.get("msg", "invalid request")
    return APIError(400, f"{param}: {message}" if param else message, code="invalid_value", param=param)


def install(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation(exc, request.headers.get("content-type", "")).response()

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    from parley.engine.engine import EngineClosed, PromptError, QueueFull
    from parley.pipeline.assistant import MessageError
    from parley.pipeline.knowledge import KnowledgeError
    from parley.pipeline.readers import ReadError
    from parley.registry import ModelNotFound

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http_error)
    # the expected failures, each by class: Starlette handles these without logging a crash
    for cls in (APIError, QueueFull, EngineClosed, ModelNotFound, PromptError, MessageError, KnowledgeError,
                ReadError):
        app.add_exception_handler(cls, api_error)
    app.add_exception_handler(Exception, api_error)  # our bugs: a logged 500, still OpenAI-shaped
