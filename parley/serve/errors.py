"""The one place where failures become HTTP answers, shaped as OpenAI's errors.

    raise APIError(404, "no conversation 7", code="not_found")
    # -> HTTP 404 {"error": {"message": "no conversation 7", "type": "not_found_error",
    #                        "param": null, "code": "not_found"}}

Routes raise `APIError` (or let a library's own error through: a bad prompt, a full queue,
an unknown model); `install(app)` maps every one of them, and FastAPI's validation errors,
to the right status with the same JSON body. Input can never cause a 500: a bad value is a
400, a missing key a 401, another user's id a 404, a body over the limit a 413, a full
queue a 429 with Retry-After. A body Starlette or FastAPI cannot parse (a broken form, JSON
that is not UTF-8 or is nested too deep: `JsonBodyCheck`) is a 400 that says why, too.
"""

from __future__ import annotations

import json
import logging
import math
import re
import types
from typing import Annotated, Literal, Union, get_args, get_origin

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

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


def _validation(exc: RequestValidationError, content_type: str, body_model: type | None) -> APIError:
    """The 400 for a request FastAPI did not validate; `body_model` (the route's body type, None: it has none) names
    the fields."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = tuple(first.get("loc", ()))
    if loc == ("body",) and "json" not in content_type.lower():
        # FastAPI reads a body as JSON only when it says it is: curl -d sends it as a form
        return APIError(400, f"the request body was sent as {content_type or 'no content type'!r}; send JSON with "
                        "the header 'Content-Type: application/json'", code="invalid_value")
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON: "
                        f"{first.get('ctx', {}).get('error', 'parse error')}", code="invalid_json")
    if loc[:1] == ("body",) and body_model is not None:
        where, union = _as_sent(body_model, loc[1:])
    else:
        where, union = [str(p) for p in loc if p not in ("body", "query", "path", "header")], None
    if union is not None:  # every shape the field may take failed: say which there are
        depth, annotation = union
        param = ".".join(where[:depth])
        message = f"{param} must be {_accepted(annotation)}"
        for error in errors:  # the value had one shape's outside (a list) but not its inside: what was wrong
            inner = _as_sent(body_model, tuple(error["loc"])[1:])[0] if error["loc"][:1] == ("body",) else []
            if len(inner) > depth and inner[:depth] == where[:depth]:
                message += f"; {'.'.join(inner)}: {error['msg']}"
                break
        return APIError(400, message, code="invalid_value", param=param)
    param = ".".join(where) or None
    message = first.get("msg", "invalid request")
    return APIError(400, f"{param}: {message}" if param else message, code="invalid_value", param=param)


def _as_sent(annotation, loc: tuple) -> tuple[list[str], tuple[int, object] | None]:
    """pydantic's location of an error inside `annotation` as the client's JSON path, and where the path crosses a
    union, (the parts of the path that name the union's field, the union): pydantic puts in the name of the union's
    member it tried (`messages.0.content.str`, `messages.0.content.list[TextPart].0`), which no client wrote."""
    where, union = [], None
    for part in loc:
        members = [m for m in _alternatives(annotation) if m is not type(None)]  # pydantic tries null apart
        if len(members) > 1 and isinstance(part, str):  # the name of the member tried: left out
            union = union or (len(where), annotation)
            annotation = next((m for m in members if _name(m) == part.split("[")[0]), None)
            continue
        where.append(str(part))
        annotation = _inside(members[0], part)
    return where, union


def _alternatives(annotation) -> list:
    """The types a union's value may have (`str | None`: str and NoneType); any other type alone."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return list(get_args(annotation)) if get_origin(annotation) in (Union, types.UnionType) else [annotation]


def _inside(annotation, part):
    """The type of `part` (a field's name, a list's index, a dict's key) inside a value of `annotation`; None:
    not known."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field else None
    args = get_args(annotation)
    if get_origin(annotation) in (list, tuple, set, frozenset) and args:
        return args[0]
    return args[1] if get_origin(annotation) is dict and len(args) == 2 else None


def _name(annotation) -> str:
    return getattr(get_origin(annotation) or annotation, "__name__", str(annotation))


_KINDS = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object"}


def _accepted(annotation) -> str:
    """The shapes a union's value may take, for people: 'a string, a list of strings, or null'."""
    shapes = [_shape(a) for a in _alternatives(annotation)]
    return " or ".join(shapes) if len(shapes) < 3 else ", ".join(shapes[:-1]) + ", or " + shapes[-1]


def _shape(annotation, many: bool = False) -> str:
    if annotation is type(None):
        return "null"
    if get_origin(annotation) is list and get_args(annotation):
        return ("lists" if many else "a list") + " of " + _shape(get_args(annotation)[0], many=True)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):  # its required fields, fixed values shown
        required = [(name, f.annotation) for name, f in annotation.model_fields.items() if f.is_required()]
        fields = ", ".join(f'"{name}": ' + (json.dumps(get_args(t)[0]) if get_origin(t) is Literal else "...")
                           for name, t in required)
        return ("objects like {" if many else "an object like {") + fields + "}"
    kind = _KINDS.get(annotation, _name(annotation))
    return kind + "s" if many else ("an " if kind[0] in "aeiou" else "a ") + kind


def _unreadable(exc: HTTPException) -> APIError:
    """Starlette's and FastAPI's own 400: a body they could not parse."""
    if isinstance(exc.__cause__, APIError):  # JsonBodyCheck's, raised to FastAPI as it read the body
        return exc.__cause__
    if isinstance(exc.__context__, MultiPartException):
        return APIError(400, f"the form could not be read: {exc.detail} Send it as multipart/form-data the way HTTP "
                        "clients make it (curl -F model=whisper-1 -F file=@speech.wav): the Content-Type header "
                        "names the boundary between the parts, and each part its field's name", code="invalid_form")
    if isinstance(exc.__cause__, ValueError):  # past the JSON parser's syntax: a number of over 4300 digits
        return APIError(400, f"the request body's JSON could not be read: {str(exc.__cause__).split(';')[0]}; send "
                        "numbers that long as strings", code="invalid_json")
    return APIError(400, f"the request body could not be read ({type(exc.__cause__ or exc).__name__}): send a JSON "
                    "object with the header 'Content-Type: application/json'", code="invalid_body")


MAX_JSON_DEPTH = 64  # arrays and objects inside each other; OpenAI's requests need fewer than 10
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.S)  # possessive: linear time on any body
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as int8


def json_body_error(body: bytes, what: str = "the request body") -> APIError | None:
    """Why a JSON body must not go to the parser, or None. It must be UTF-8, as RFC 8259 says (Python's parser also
    guesses UTF-16 and -32, and a bad byte was a vague error), and nested at most MAX_JSON_DEPTH deep (the parser
    and the validators recurse once per level: `[` * 100000 was a RecursionError); measured without parsing.
    `what` names the JSON in the message: the live voice socket checks its text messages here too."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return APIError(400, f"{what} is not UTF-8 text: byte 0x{body[e.start]:02x} at offset {e.start} "
                        f"is {e.reason}; send the JSON encoded as UTF-8 (and any binary data as base64 in a string)",
                        code="invalid_json")
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return None  # too few to be too deep (most bodies): no need to look closer
    steps = np.frombuffer(_STRING.sub(b"", body).translate(_STEPS, _NOT_BRACKETS), np.int8)
    deepest = int(steps.cumsum().max()) if steps.size else 0
    if deepest > MAX_JSON_DEPTH:
        return APIError(400, f"{what}'s JSON has arrays and objects {deepest} levels inside each other; "
                        f"this server reads at most {MAX_JSON_DEPTH}: send flatter JSON", code="too_deep")
    return None


class JsonBodyCheck:
    """ASGI middleware: a JSON body, once it is all in and before anything parses it, passes `json_body_error` or
    its APIError is raised to the reader (FastAPI makes that a 400 caused by it, which `install` answers with)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        kind = dict(scope.get("headers") or []).get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope["type"] != "http" or not (kind.startswith(b"application/") and kind.endswith((b"/json", b"+json"))):
            return await self.app(scope, receive, send)
        chunks = []

        async def receiving():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body = b"".join(chunks)
                    chunks.clear()
                    if error := json_body_error(body):
                        raise error
            return message

        await self.app(scope, receiving, send)


def install(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        body = getattr(request.scope.get("route"), "body_field", None)
        return _validation(exc, request.headers.get("content-type", ""),
                           body.field_info.annotation if body is not None else None).response()

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:  # our routes raise APIError: this is a body Starlette or FastAPI could not parse
            return _unreadable(exc).response()
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
