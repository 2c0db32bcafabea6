"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    client.chat.completions.create(model="smollm2", messages=[...], stream=True)  # the raw model
    client.chat.completions.create(model="parley", messages=[...],                # the assistant
                                   extra_headers={"X-Parley-Conversation": "12"})

A registered model answers directly: its chat template renders the messages (or the prompt
of /v1/completions is encoded as it is, and with `echo` sent back before its completion) and
the engine streams tokens, with the user's own LoRA adapter where they have one (`parley
learn user=NAME`), as the assistant's turns do.
"parley" runs the last user message through the assistant's whole pipeline (safety, memory,
knowledge, respond ...) in the conversation the header names, or a new one; the reply
carries the conversation and saved turn ids (header and a "parley" field), for feedback and
traces, and what answered (the model and version the answer was saved with, and whether the
user's own adapter did). Streams are Server-Sent Events ending with `data: [DONE]`; an error
after the stream began arrives as one `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from collections.abc import AsyncIterator

import numpy as np
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from parley.engine.engine import PromptError
from parley.engine.text import TextAssembler
from parley.learn.personal import adapter_for
from parley.pipeline.assistant import MessageError
from parley.pipeline.frames import ShownText
from parley.serve import protocol as p
from parley.serve.errors import APIError, from_exception
from parley.serve.routes_audio import audio_models
from parley.serve.server import ASSISTANT_MODEL, EMBEDDING_MODEL, Server
from parley.serve.turns import TurnDone, TurnStarted, user_salt
from parley.store import User


# with "stream": true the answer is Server-Sent Events instead of one JSON body
STREAMED = {200: {"description": "the completion, or with stream=true its chunks as Server-Sent Events",
                  "content": {"text/event-stream": {}}}}


def openai_routes(server: Server) -> APIRouter:
    router = APIRouter(prefix="/v1")
    auth = Depends(server.authenticate)

    @router.get("/models")
    def list_models(user: User = auth) -> dict:
        names = [m.name for m in server.registry.list()]
        names = sorted({*names, server.model_name}) + [ASSISTANT_MODEL, EMBEDDING_MODEL, *audio_models()]
        return {"object": "list", "data": [p.model_card(n) for n in names]}

    @router.get("/models/{name}")
    def get_model(name: str, user: User = auth) -> dict:
        if name not in (ASSISTANT_MODEL, EMBEDDING_MODEL, *audio_models()):
            _check_model(server, name)
        return p.model_card(name)

    @router.post("/chat/completions", responses=STREAMED)
    async def chat(req: p.ChatRequest, request: Request, user: User = auth,
                   conversation: str | None = Header(None, alias="X-Parley-Conversation")):
        if req.model == ASSISTANT_MODEL:
            return await _assistant_chat(server, req, user, conversation, request)
        _check_model(server, req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
        try:
            ids = server.tokenizer.encode_chat(messages)
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value", param="messages") from None
        return await _complete(server, req, ids, user, request, chat=True)

    @router.post("/completions", responses=STREAMED)
    async def completions(req: p.CompletionRequest, request: Request, user: User = auth):
        _check_model(server, req.model)
        return await _complete(server, req, server.tokenizer.encode(req.text), user, request, chat=False)

    @router.post("/embeddings")
    def embeddings(req: p.EmbeddingRequest, user: User = auth) -> dict:
        if req.model != EMBEDDING_MODEL:
            raise APIError(404, f"no embedding model named {req.model!r}; use {EMBEDDING_MODEL!r}",
                           code="model_not_found", param="model")
        _check_embedding_size(server, req.texts)
        vectors = np.asarray(server.embed(req.texts, remember=False), dtype="<f4")  # base64: little-endian float32
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.tobytes()).decode() if req.encoding_format == "base64" else v.tolist()}
                for i, v in enumerate(vectors)]
        tokens = server.count_embedding_tokens(req.texts)
        return {"object": "list", "model": EMBEDDING_MODEL, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return router


def _check_embedding_size(server: Server, texts: list[str]) -> None:
    most, chars = server.settings.max_embedding_inputs, server.settings.max_embedding_chars
    if len(texts) > most:
        raise APIError(400, f"{len(texts)} inputs is over this server's limit of {most} per request; "
                       "send them in several requests", code="too_many_inputs", param="input")
    if (total := sum(map(len, texts))) > chars:
        raise APIError(400, f"the inputs have {total} characters together, over this server's limit of {chars} "
                       "per request; send them in several requests", code="input_too_long", param="input")


def _check_model(server: Server, name: str) -> None:
    if name == server.model_name:
        return
    known = {m.name for m in server.registry.list()}
    hint = (f"it is registered, but this server serves {server.model_name!r}: restart with --model {name}"
            if name in known else "GET /v1/models lists the models")
    raise APIError(404, f"the model {name!r} does not exist here; {hint}", code="model_not_found", param="model")


async def _complete(server: Server, req: p.ChatRequest | p.CompletionRequest, ids: list[int], user: User,
                    request: Request, chat: bool):
    try:
        params = req.sampling(server.engine.context_length, len(ids), server.tokenizer.stop_ids,
                              server.settings.max_tokens)
    except ValueError as e:
        raise APIError(400, str(e), code="context_length_exceeded", param="max_tokens") from None
    # cached prompt pages: this user's alone; their own adapter, as the assistant's turns have it (turns.py)
    params = dataclasses.replace(params, cache_salt=user_salt(user),
                                 adapter=adapter_for(server.engine, server.store(), user.id))
    try:
        handle = server.engine.submit(ids, params)  # QueueFull -> 429
    except PromptError as e:  # the prompt itself (longer than the context ...): named as sent
        raise APIError(400, str(e), code="invalid_value", param="messages" if chat else "prompt") from None
    text = TextAssembler(server.tokenizer, req.stops)

    async def pieces() -> AsyncIterator[str]:
        try:
            async for event in handle.events():
                if piece := text.push(event):
                    yield piece
                if text.finish_reason:
                    return
        finally:
            handle.cancel()  # the client left, or a stop string ended it: free its pages
            server.metrics.add_tokens(text.tokens)

    rid, model = p.new_id("chatcmpl" if chat else "cmpl"), req.model
    echoed = req.text if req.echo else ""  # /v1/completions' echo (a chat request refuses it): the prompt first

    def usage() -> dict:  # read once generation is over
        return p.usage(len(ids), text.tokens)

    if not req.stream:
        # generated apart from the reply, so that a client who leaves before it is done stops it (a streamed
        # reply stops when its next piece cannot be sent; a whole one would run to max_tokens for nobody)
        answer = await _joined_unless_gone(pieces(), request)
        if answer is None:
            return Response(status_code=499)  # pieces() cancelled the request, which frees its pages
        if chat:
            return p.chat_completion(rid, model, answer, text.finish_reason, len(ids), text.tokens)
        return p.text_completion(rid, model, echoed + answer, text.finish_reason, usage())

    async def chunks() -> AsyncIterator[dict]:
        if chat:
            yield p.chat_chunk(rid, model, {"role": "assistant", "content": ""})
        elif echoed:
            yield p.text_completion(rid, model, echoed, None)
        async for piece in pieces():
            yield p.chat_chunk(rid, model, {"content": piece}) if chat else p.text_completion(rid, model, piece, None)
        yield p.chat_chunk(rid, model, {}, text.finish_reason) if chat else \
            p.text_completion(rid, model, "", text.finish_reason)
        if req.stream_options and req.stream_options.include_usage:
            yield p.usage_chunk(rid, model, "chat.completion.chunk" if chat else "text_completion", usage())

    return _sse(server, chunks())


def _sse(server: Server, chunks: AsyncIterator[dict], headers: dict | None = None) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        server.metrics.stream_delta(1)
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as e:  # the status line is gone: report the error in the stream
            yield f"data: {json.dumps(from_exception(e).body())}\n\n"
        finally:
            server.metrics.stream_delta(-1)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **(headers or {})})


# how often a turn that has not yet said anything checks whether its client is still there
GONE_CHECK_SECONDS = 0.25


async def _assistant_chat(server: Server, req: p.ChatRequest, user: User, conversation: str | None,
                          request: Request):
    if req.stops:
        raise APIError(400, "stop strings are not supported with model 'parley'", code="invalid_value", param="stop")
    last = next((m.text for m in reversed(req.messages) if m.role == "user"), None)
    if last is None:
        raise APIError(400, "the messages have no user message to answer", code="invalid_value", param="messages")
    try:  # the pipeline writes the prompt, so only the bound without it can be checked here
        asked = req.answer_tokens(server.engine.context_length)
    except ValueError as e:
        raise APIError(400, str(e), code="context_length_exceeded", param="max_tokens") from None
    overrides = {k: v for k, v in (("temperature", req.temperature), ("top_p", req.top_p), ("seed", req.seed),
                                   ("max_tokens", asked)) if v is not None}
    turn = server.turns.start(user, _conversation(server, user, conversation), last, overrides)
    items, ahead = turn.frames(), []
    # wait for the first words (or the end): errors before them (a full queue, a bad message)
    # are then plain HTTP errors rather than an event in a stream that already said 200; a
    # client that leaves meanwhile (the page's Stop before any text) stops the turn at once
    first = asyncio.ensure_future(_first_words(items, ahead))
    try:
        if not await _unless_gone(first, request):  # raises the turn's exception, if it failed before saying anything
            turn.stop()
            return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
    except (MessageError, PromptError) as e:  # the last user message's (empty, too long ...): named as sent
        turn.stop()
        last = max((i for i, m in enumerate(req.messages) if m.role == "user"), default=len(req.messages) - 1)
        field = f"messages.{last}.content"  # the message is said as it was (a chat client shows it): param names it
        raise APIError(400, str(e), code="invalid_value", param=field) from None
    except BaseException:
        turn.stop()
        raise
    started = next((i.conversation_id for i in ahead if isinstance(i, (TurnStarted, TurnDone))), None)
    done: list[TurnDone] = []

    async def pieces() -> AsyncIterator[str]:
        shown = ShownText()
        try:
            async for item in _chain(ahead, items):
                if isinstance(item, TurnDone):
                    done.append(item)
                elif text := shown(item):
                    yield text
        finally:
            turn.stop()
            server.metrics.add_tokens(done[0].completion_tokens if done else 0)

    rid, headers = p.new_id("chatcmpl"), {"X-Parley-Conversation": str(started)} if started else {}

    def ids() -> dict:  # where the answer was saved, and what wrote it
        return {"conversation_id": started, "turn_id": done[0].message_id if done else None,
                "answered_by": done[0].answered_by if done else None, "adapter": done[0].adapter if done else False}

    if not req.stream:  # generated apart from the reply, as in _complete: a client that leaves stops it
        answer = await _joined_unless_gone(pieces(), request)
        if answer is None:
            turn.stop()  # pieces() stops it too, unless it never started
            return Response(status_code=499)
        counts = (done[0].prompt_tokens, done[0].completion_tokens) if done else (0, 0)
        body = p.chat_completion(rid, ASSISTANT_MODEL, answer, done[0].finish_reason if done else "stop", *counts)
        return JSONResponse({**body, "parley": ids()}, headers=headers)

    async def chunks() -> AsyncIterator[dict]:
        yield p.chat_chunk(rid, ASSISTANT_MODEL, {"role": "assistant", "content": ""})
        async for text in pieces():
            yield p.chat_chunk(rid, ASSISTANT_MODEL, {"content": text})
        yield {**p.chat_chunk(rid, ASSISTANT_MODEL, {}, done[0].finish_reason if done else "stop"), "parley": ids()}

    return _sse(server, chunks(), headers)


async def _unless_gone(task: asyncio.Future, request: Request) -> bool:
    """Wait for `task` while checking every GONE_CHECK_SECONDS that its client is still there: False, with the
    task cancelled, if the client left first. An exception (the task's own too) cancels the task and propagates."""
    try:
        while not (await asyncio.wait({task}, timeout=GONE_CHECK_SECONDS))[0]:
            if await request.is_disconnected():
                task.cancel()
                return False
        task.result()
        return True
    except BaseException:
        task.cancel()
        raise


async def _joined_unless_gone(pieces: AsyncIterator[str], request: Request) -> str | None:
    """The pieces joined, gathered apart from the reply (`_unless_gone`); None if the client left first."""
    async def joined() -> str:
        return "".join([piece async for piece in pieces])

    whole = asyncio.ensure_future(joined())
    return whole.result() if await _unless_gone(whole, request) else None


async def _first_words(items: AsyncIterator, ahead: list) -> None:
    """Move a turn's items into `ahead` up to its first shown text, or its end."""
    while not ahead or not (isinstance(ahead[-1], TurnDone) or ShownText()(ahead[-1])):
        item = await anext(items, None)
        if item is None:
            break
        ahead.append(item)


async def _chain(first: list, rest: AsyncIterator) -> AsyncIterator:
    for item in first:
        yield item
    async for item in rest:
        yield item


def _conversation(server: Server, user: User, header: str | None) -> int | None:
    if header is None or not header.strip():
        return None
    digits = header.strip()
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses
    if not (digits.isascii() and digits.isdigit()) or int(digits) > 2**63 - 1:
        raise APIError(400, f"X-Parley-Conversation must be a conversation id (ASCII digits), not {header!r}",
                       code="invalid_value", param="X-Parley-Conversation")
    conv_id = int(digits)
    if server.store().get_conversation(user.id, conv_id) is None:
        raise APIError(404, f"no conversation {conv_id}; omit the header to start a new one",
                       code="not_found", param="X-Parley-Conversation")
    return conv_id
